"""Checkpoints on a storage URL: weights, optimizer state and data position.

An output URL (local folder or ``s3://``) holds::

    latest.json                      which checkpoint is newest (written last)
    checkpoints/ckpt-00001500.npz    every variable's value, by position
    checkpoints/ckpt-00001500.json   step, epoch, data position, variable paths,
                                     dataset version, charset, settings, history
    final.json                       the finished run: metrics, checkpoint name

Every file goes through ``write_atomic`` (a temporary name, then a move), and
``latest.json`` moves only after both checkpoint files are in place, so a run
killed at any point leaves the previous checkpoint readable. Only the chief
worker writes; every worker reads the same checkpoint to resume.

The format is numpy's ``.npz`` rather than ``tf.train.Checkpoint`` so that the
same bytes work on every fsspec backend (TensorFlow's own file layer has no
s3fs) and can be read without TensorFlow.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from scribeline.platform.errors import ScribelineError
from scribeline.platform.storage import Location, sha256_bytes, write_atomic

logger = logging.getLogger(__name__)

FORMAT = "scribeline-checkpoint-v1"
LATEST = "latest.json"
FINAL = "final.json"
FOLDER = "checkpoints"


class CheckpointError(ScribelineError):
    """A checkpoint is damaged or does not fit the model being restored."""


@dataclass
class Checkpoint:
    """A checkpoint read back: its metadata and its arrays by group."""

    name: str
    meta: dict[str, Any]
    arrays: dict[str, list[np.ndarray]]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def save(
    root: Location,
    step: int,
    groups: dict[str, list[tuple[str, np.ndarray]]],
    meta: dict[str, Any],
    keep: int,
) -> str:
    """Write one checkpoint, point ``latest.json`` at it, prune old ones.

    Args:
        groups: e.g. ``{"model": [(path, value), ...], "optimizer": [...]}``;
            values are stored by position, paths are kept to check a restore.
    """
    name = checkpoint_name(step)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        **{
            f"{group}/{i:05d}": value
            for group, items in groups.items()
            for i, (_, value) in enumerate(items)
        },
    )
    data = buffer.getvalue()
    meta = {
        **meta,
        "format": FORMAT,
        "name": name,
        "step": step,
        "variables": {
            group: [[path, list(np.shape(value))] for path, value in items]
            for group, items in groups.items()
        },
        "weights": {
            "file": f"{name}.npz",
            "bytes": len(data),
            "sha256": sha256_bytes(data),
        },
    }
    folder = root.child(FOLDER)
    write_atomic(folder.child(f"{name}.npz"), data)
    write_atomic(folder.child(f"{name}.json"), json.dumps(meta, indent=2).encode())
    write_atomic(
        root.child(LATEST), json.dumps({"checkpoint": name, "step": step}).encode()
    )
    logger.info("checkpoint %s written to %s (%d bytes)", name, root.url, len(data))
    _prune(root, keep)
    return name


def _prune(root: Location, keep: int) -> None:
    folder = root.child(FOLDER)
    try:
        names = sorted(
            posixpath.basename(p)[: -len(".json")]
            for p in root.fs.ls(folder.path, detail=False)
            if p.endswith(".json") and posixpath.basename(p).startswith("ckpt-")
        )
    except FileNotFoundError:
        return
    for name in names[:-keep]:
        for suffix in (".npz", ".json"):
            with contextlib.suppress(FileNotFoundError):
                root.fs.rm(folder.child(name + suffix).path)
        logger.debug("removed old checkpoint %s", name)


def latest_name(root: Location) -> str | None:
    """The newest checkpoint's name, or None when the output holds none."""
    try:
        pointer = json.loads(root.child(LATEST).read_bytes())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{root.child(LATEST).url} is not valid JSON ({err}); delete it to "
            "resume from the newest file in checkpoints/."
        ) from err
    return pointer["checkpoint"]


def read_meta(root: Location, name: str) -> dict[str, Any]:
    return json.loads(root.child(FOLDER, f"{name}.json").read_bytes())


def load(root: Location, name: str | None = None) -> Checkpoint | None:
    """Read a checkpoint (the latest by default); None when there is none."""
    name = name or latest_name(root)
    if name is None:
        return None
    meta = read_meta(root, name)
    data = root.child(FOLDER, meta["weights"]["file"]).read_bytes()
    if sha256_bytes(data) != meta["weights"]["sha256"]:
        raise CheckpointError(
            f"{root.url}/{FOLDER}/{meta['weights']['file']} does not match the "
            "sha256 in its metadata; the checkpoint is damaged: delete it and "
            "latest.json to resume from an older one."
        )
    with np.load(io.BytesIO(data)) as npz:
        arrays = {
            group: [npz[f"{group}/{i:05d}"] for i in range(len(items))]
            for group, items in meta["variables"].items()
        }
    return Checkpoint(name, meta, arrays)


def check_shapes(
    checkpoint: Checkpoint, group: str, variables: list[tuple[str, tuple]]
) -> None:
    """Raise ``CheckpointError`` unless ``variables`` match the checkpoint's."""
    saved = checkpoint.meta["variables"].get(group, [])
    if len(saved) != len(variables):
        raise CheckpointError(
            f"checkpoint {checkpoint.name} holds {len(saved)} {group} variables, "
            f"the {group} being restored has {len(variables)}; it was made with "
            "other model settings: use the same settings, or a new --output."
        )
    for (path, shape), (saved_path, saved_shape) in zip(variables, saved, strict=True):
        if list(shape) != list(saved_shape):
            raise CheckpointError(
                f"checkpoint {checkpoint.name}: {group} variable {saved_path} has "
                f"shape {saved_shape}, the model's {path} has {list(shape)}; it was "
                "made with other model settings: use the same, or a new --output."
            )


def write_final(root: Location, summary: dict[str, Any]) -> None:
    write_atomic(root.child(FINAL), json.dumps(summary, indent=2).encode())


def read_final(root: Location) -> dict[str, Any]:
    try:
        return json.loads(root.child(FINAL).read_bytes())
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"no finished training run at {root.url} ({FINAL} is missing); run "
            "`scribeline train --output URL` to completion first."
        ) from err
