"""Shared test fixtures.

Tests that need the real data in ``../shared/data`` (EMNIST ByClass, WikiSplit)
use the ``shared_data`` fixture: they skip with a reason where that folder is
missing, and fail instead when ``CI`` is set, where it must be present.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import pytest

# Hermetic state: Prefect, Ray and Keras keep theirs in a temporary folder for
# this test session, never in the home directory. Set before they are imported.
STATE = Path(tempfile.mkdtemp(prefix="scribeline-test-"))
os.environ["PREFECT_HOME"] = str(STATE / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["KERAS_HOME"] = str(STATE / "keras")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
# Ray 2.60 turns token authentication on by default and would write the token
# to ~/.ray; give it a token file of ours instead.
(STATE / "ray-token").write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_TOKEN_PATH"] = str(STATE / "ray-token")

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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)

    def start(self) -> S3Server:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    @property
    def storage_options(self) -> dict:
        """What a user passes to scribeline (and s3fs) for this endpoint."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {
                "endpoint_url": self.endpoint,
                "region_name": "us-east-1",
            },
        }

    def make_bucket(self, name: str) -> str:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"


@pytest.fixture(scope="session")
def s3_server():
    """One S3 server for the test session, stopped at the end."""
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh, empty bucket URL (``s3://name``) on the session's S3 server."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return s3_server.make_bucket(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite in the session's state folder)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_cluster():
    """A local 2-CPU Ray cluster for the session, shut down at the end."""
    import ray

    # A short path: Ray's unix sockets must fit in 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
