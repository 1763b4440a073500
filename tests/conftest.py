"""Shared test fixtures.

Tests that need the real data in ``../shared/data`` (EMNIST ByClass, WikiSplit)
use the ``shared_data`` fixture: they skip with a reason where that folder is
missing, and fail instead when ``CI`` is set, where it must be present.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("SCRIBELINE_SHARED_DATA", REPO.parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The ``../shared/data`` folder, or a skip (a failure under CI=true)."""
    if (SHARED_DATA / "emnist").is_dir() and (SHARED_DATA / "wikisplit").is_dir():
        return SHARED_DATA
    reason = f"real data not found at {SHARED_DATA} (EMNIST + WikiSplit)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI requires it")
    pytest.skip(reason)
