"""The glyph bank: upright 28x28 character images, by class, split for evaluation.

A ``GlyphBank`` holds every glyph image (``uint8``, 0 background, 255 ink,
upright), the class of each, and the split (train/val/test) each glyph image is
reserved for, so that no glyph image is ever drawn into both training and
evaluation lines. Loaders: ``load_emnist`` (official NIST layout) in
``scribeline.platform.emnist`` and ``embedded_glyph_bank`` (handwriting fonts
shipped in wheels) in ``scribeline.platform.fontglyphs``; ``load_glyph_bank``
picks one from the settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scribeline.platform.errors import GlyphSourceError

logger = logging.getLogger(__name__)

GLYPH_SIZE = 28
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
CHARSET_VERSION = "charset-v1"


@dataclass
class GlyphBank:
    """Glyph images by class, each reserved for one split.

    Attributes:
        images: ``[N, 28, 28] uint8``, upright, 0 = background, 255 = ink.
        classes: ``[N] int``, index into ``class_chars``.
        class_chars: the character each class draws, e.g. ``"0123...XYZabd..."``
            for EMNIST balanced (47 classes).
        splits: ``[N] int8``, ``SPLIT_CODES`` of the split each glyph image
            is reserved for.
        source: what the bank came from (kind, EMNIST split name, files with
            sha256), written into manifests.
    """

    images: np.ndarray
    classes: np.ndarray
    class_chars: str
    splits: np.ndarray
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.shape[1:] != (GLYPH_SIZE, GLYPH_SIZE):
            raise GlyphSourceError(
                f"glyph images have shape {self.images.shape[1:]}, expected 28x28."
            )
        if len(self.classes) != n or len(self.splits) != n:
            raise GlyphSourceError(
                f"{n} glyph images but {len(self.classes)} classes and "
                f"{len(self.splits)} split codes; they must match."
            )
        self._char_class = _char_to_class(self.class_chars)

    @property
    def charset(self) -> str:
        """Every character a line can hold, ordered: space, then sorted drawables."""
        return " " + "".join(sorted(self._char_class))

    def class_of(self, char: str) -> int:
        """The class that draws ``char`` (a lower-case letter merged into its
        capital in EMNIST balanced/bymerge is drawn with the capital's glyphs)."""
        try:
            return self._char_class[char]
        except KeyError:
            raise GlyphSourceError(
                f"no glyph draws {char!r}; the bank draws {self.charset!r}. Clean the "
                "text to the bank's charset first."
            ) from None

    def pools(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The glyph images reserved for ``split``, grouped by charset position.

        Returns ``(offsets, counts, flat)``: the glyph indices that may draw the
        character at ``charset[i]`` are ``flat[offsets[i]:offsets[i] + counts[i]]``.
        Space (position 0) has none. Raises if a drawable character has no glyph
        image left in this split.
        """
        cached = getattr(self, "_pools", {}).get(split)
        if cached is not None:
            return cached
        code = SPLIT_CODES[split]
        chosen = np.flatnonzero(self.splits == code)
        by_class = [
            chosen[self.classes[chosen] == c] for c in range(len(self.class_chars))
        ]
        charset = self.charset
        counts = np.zeros(len(charset), dtype=np.int64)
        parts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        for i, char in enumerate(charset[1:], start=1):
            members = by_class[self._char_class[char]]
            if len(members) == 0:
                raise GlyphSourceError(
                    f"no glyph image of {char!r} is left for the {split} split "
                    f"({self.source.get('kind', 'glyph bank')}); use a larger glyph "
                    "source or smaller val/test fractions."
                )
            counts[i] = len(members)
            parts.append(members.astype(np.int64))
        offsets = np.zeros(len(charset), dtype=np.int64)
        offsets[1:] = np.cumsum(counts)[:-1]
        result = (offsets, counts, np.concatenate(parts))
        self.__dict__.setdefault("_pools", {})[split] = result
        return result

    def split_counts(self) -> dict[str, int]:
        return {s: int((self.splits == c).sum()) for s, c in SPLIT_CODES.items()}


def _char_to_class(class_chars: str) -> dict[str, int]:
    """Map each drawable character to its class, with case fallback.

    A letter whose own case has no class is drawn with the other case's class
    (EMNIST balanced/bymerge merge c, i, j, k, l, m, o, p, s, u, v, w, x, y, z
    into their capitals; EMNIST letters has one class per letter).
    """
    table = {char: i for i, char in enumerate(class_chars)}
    for char, i in list(table.items()):
        if char.isalpha():
            for other in (char.lower(), char.upper()):
                table.setdefault(other, i)
    return table


def assign_splits(
    classes: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Reserve a reproducible part of each class for val and test.

    Within each class the glyph images are shuffled with ``seed`` alone; the
    first ``round(n * test_fraction)`` go to test, the next to val, the rest to
    train. With a non-zero fraction every class with at least 3 images keeps at
    least one image in each split.
    """
    rng = np.random.default_rng(seed)
    splits = np.zeros(len(classes), dtype=np.int8)
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        order = members[rng.permutation(len(members))]
        n = len(order)
        n_test = _held_out(n, test_fraction)
        n_val = _held_out(n, val_fraction)
        splits[order[:n_test]] = SPLIT_CODES["test"]
        splits[order[n_test : n_test + n_val]] = SPLIT_CODES["val"]
    return splits


def _held_out(n: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    k = round(n * fraction)
    return max(k, 1) if n >= 3 else k


def load_glyph_bank(settings: Any) -> GlyphBank:
    """The glyph bank the settings ask for: EMNIST, or the embedded fonts."""
    if settings.glyphs:
        from scribeline.platform.emnist import load_emnist

        return load_emnist(
            settings.glyphs,
            split=settings.emnist_split,
            val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction,
            seed=settings.glyph_split_seed,
            storage_options=settings.storage_options,
        )
    from scribeline.platform.fontglyphs import embedded_glyph_bank

    logger.warning(
        "No EMNIST given: using the embedded glyph bank rendered from handwriting "
        "fonts shipped with scribeline (Caveat, Indie Flower, Kalam). For real "
        "handwriting pass --glyphs PATH_TO_EMNIST (see README: Getting real data)."
    )
    return embedded_glyph_bank(
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        seed=settings.glyph_split_seed,
    )
