"""embedded_glyph_bank: EMNIST-like glyphs rendered from the bundled fonts."""

from __future__ import annotations

import numpy as np
import pytest

from scribeline.platform import fontglyphs
from scribeline.platform.errors import GlyphSourceError
from scribeline.platform.fontglyphs import CLASS_CHARS, embedded_glyph_bank
from scribeline.platform.glyphs import SPLIT_CODES, assign_splits

FONT_FILES = {
    "Caveat[wght].ttf",
    "IndieFlower-Regular.ttf",
    "Kalam-Bold.ttf",
    "Kalam-Light.ttf",
    "Kalam-Regular.ttf",
}


@pytest.fixture(scope="module")
def bank():
    return embedded_glyph_bank()


def test_bank_holds_62_classes_from_every_font(bank) -> None:
    assert bank.class_chars == CLASS_CHARS
    assert len(bank.class_chars) == 62
    assert bank.images.shape == (62 * fontglyphs.PER_FONT * len(FONT_FILES), 28, 28)
    assert bank.images.dtype == np.uint8
    assert np.array_equal(
        np.bincount(bank.classes), np.full(62, fontglyphs.PER_FONT * len(FONT_FILES))
    )
    source = bank.source
    assert source["kind"] == "embedded-fonts"
    assert source["per_font"] == fontglyphs.PER_FONT
    assert {f["name"] for f in source["fonts"]} == FONT_FILES
    assert all(len(f["sha256"]) == 64 and f["package"] for f in source["fonts"])


def test_every_class_is_in_every_split(bank) -> None:
    for split, code in SPLIT_CODES.items():
        assert set(bank.classes[bank.splits == code]) == set(range(62)), split
        bank.pools(split)
    assert np.array_equal(
        bank.splits, assign_splits(bank.classes, 0.05, 0.05, 20170301)
    )


def test_similar_characters_are_separate_classes(bank) -> None:
    lookalikes = ["l", "I", "1", "i", "o", "O", "0"]
    classes = {char: bank.class_of(char) for char in lookalikes}
    assert len(set(classes.values())) == len(lookalikes)
    means = {c: bank.images[bank.classes == k].mean(0) for c, k in classes.items()}
    for a, b in [("l", "I"), ("I", "1"), ("o", "0"), ("O", "0")]:
        assert np.abs(means[a] - means[b]).mean() > 1.0, (a, b)


def test_glyphs_are_centred_with_a_blank_border(bank) -> None:
    images = bank.images.astype(np.float64)
    border = np.concatenate(
        [images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1
    )
    assert border.max() < 64
    assert images[:, 8:20, 8:20].mean() > 4 * images[:, :4].mean()
    # The ink's centre of mass stays near the frame centre, as in EMNIST.
    total = images.sum(axis=(1, 2))
    assert total.min() > 0
    rows = (images.sum(axis=2) * np.arange(28)).sum(axis=1) / total
    cols = (images.sum(axis=1) * np.arange(28)).sum(axis=1) / total
    assert np.abs(rows - 13.5).max() < 6 and np.abs(cols - 13.5).max() < 6
    # Ink is white on black, soft-edged: a fair share of grey pixels.
    assert bank.images.max() == 255
    grey = ((bank.images > 0) & (bank.images < 255)).mean()
    assert grey > 0.05


def test_glyphs_are_upright(bank) -> None:
    # L: a wide stroke along the bottom, a tall one down the left.
    letter = bank.images[bank.classes == bank.class_of("L")].mean(0)
    assert letter[18:].sum() > 1.3 * letter[:10].sum()
    assert letter[:, :10].sum() > 1.3 * letter[:, 18:].sum()


def test_samples_of_a_class_differ(bank) -> None:
    for c in range(62):
        members = bank.images[bank.classes == c]
        distinct = {image.tobytes() for image in members}
        assert len(distinct) == len(members), CLASS_CHARS[c]


def test_built_once_per_process_and_read_only(bank) -> None:
    assert embedded_glyph_bank() is bank
    with pytest.raises(ValueError, match="read-only"):
        bank.images[0, 0, 0] = 1


def test_same_seed_same_bytes_other_seed_other_glyphs() -> None:
    # Bypass the in-process cache: two real builds.
    render = fontglyphs._render.__wrapped__
    images, classes, _ = render(5, 2)
    again, _, _ = render(5, 2)
    other, _, _ = render(6, 2)
    assert images.shape == (62 * 2 * len(FONT_FILES), 28, 28)
    assert np.array_equal(np.bincount(classes), np.full(62, 2 * len(FONT_FILES)))
    assert images.tobytes() == again.tobytes()
    assert not np.array_equal(images, other)


def test_per_font_must_be_positive() -> None:
    with pytest.raises(GlyphSourceError, match="per_font is 0"):
        embedded_glyph_bank(per_font=0)
