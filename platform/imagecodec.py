"""How line images are stored in a shard's ``image`` column.

Two encodings, chosen by measurement (``bench/bench_synthesis.py``; 28x896
EMNIST lines of ~29 characters, Parquet zstd level 3):

- ``gray4`` (default): 16 grey levels, two pixels a byte (the left pixel in
  the high nibble), each row padded to an even width. ~3.2 KB a line. Level
  ``q`` decodes to ``q * 17`` (0 -> 0, 15 -> 255); the largest change to any
  pixel is 8 of 255, far below what a recogniser can see.
- ``raw8``: lossless ``uint8``, one pixel a byte. ~6.1 KB a line: EMNIST's own
  gzip file spends ~250 bytes a glyph, so a lossless 30-glyph line cannot get
  much smaller at a speed that keeps up with the renderer.

Both are row-major, ``height x width``, 0 = background, 255 = ink.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ImageEncoding = Literal["gray4", "raw8"]
ENCODINGS = ("gray4", "raw8")

# uint8 value -> nearest of the 16 levels q * 17.
_TO_LEVEL = np.rint(np.arange(256) / 17).astype(np.uint8)


def describe(encoding: ImageEncoding) -> dict:
    """The manifest entry that tells any reader how to decode ``image``."""
    if encoding == "gray4":
        return {
            "name": "gray4",
            "layout": "row-major height x ceil(width/2) bytes; left pixel in the "
            "high nibble; pixel = level * 17",
            "ink": 255,
            "background": 0,
        }
    return {
        "name": "raw8",
        "layout": "row-major height x width bytes",
        "ink": 255,
        "background": 0,
    }


def encoded_width(width: int, encoding: ImageEncoding) -> int:
    """Bytes per image row."""
    return (width + 1) // 2 if encoding == "gray4" else width


def encode(images: np.ndarray, encoding: ImageEncoding) -> np.ndarray:
    """``[n, height, width] uint8`` -> ``[n, height, encoded_width] uint8``."""
    if encoding == "raw8":
        return np.ascontiguousarray(images)
    _check(encoding)
    return pack_levels(to_levels(images))


def to_levels(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> gray4 levels 0..15 (nearest ``level * 17``).

    Monotone, so ``to_levels(max(a, b)) == max(to_levels(a), to_levels(b))``:
    the renderer can quantise the glyph bank once and compose in levels.
    """
    return _TO_LEVEL[images]


def pack_levels(levels: np.ndarray) -> np.ndarray:
    """Levels ``[..., width]`` -> bytes ``[..., ceil(width / 2)]``, left pixel high."""
    if levels.shape[-1] % 2:
        levels = np.pad(levels, [(0, 0)] * (levels.ndim - 1) + [(0, 1)])
    return (levels[..., 0::2] << 4) | levels[..., 1::2]


def decode(data: bytes, height: int, width: int, encoding: ImageEncoding) -> np.ndarray:
    """One stored ``image`` value -> ``[height, width] uint8``."""
    _check(encoding)
    row = encoded_width(width, encoding)
    raw = np.frombuffer(data, np.uint8)
    if raw.size != height * row:
        raise ValueError(
            f"image holds {raw.size} bytes, but a {height}x{width} {encoding} image "
            f"needs {height * row}; the shard is damaged or the encoding is wrong."
        )
    raw = raw.reshape(height, row)
    if encoding == "raw8":
        return raw
    out = np.empty((height, row * 2), np.uint8)
    out[:, 0::2] = raw >> 4
    out[:, 1::2] = raw & 0x0F
    return out[:, :width] * np.uint8(17)


def _check(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(
            f"unknown image encoding {encoding!r}; use one of {', '.join(ENCODINGS)}."
        )
