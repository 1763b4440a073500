"""The renderer: exact seed layout, fresh glyph per character, saturating overlap."""

from __future__ import annotations

import numpy as np
import pytest

from scribeline.platform.errors import SettingsError
from scribeline.platform.glyphs import GlyphBank, assign_splits
from scribeline.platform.render import Renderer
from scribeline.platform.settings import LayoutSettings

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def make_bank(per_class: int = 12, ink: int | None = None) -> GlyphBank:
    """A bank whose glyph images are random blocks, each one distinct."""
    rng = np.random.default_rng(7)
    n = len(CHARS) * per_class
    images = np.zeros((n, 28, 28), np.uint8)
    if ink is None:
        images[:, 5:23, 7:21] = rng.integers(1, 256, (n, 18, 14), dtype=np.uint8)
    else:
        images[:, 5:23, 7:21] = ink
    classes = np.repeat(np.arange(len(CHARS)), per_class)
    return GlyphBank(images, classes, CHARS, assign_splits(classes, 0.1, 0.1, 3))


def test_seed_layout_is_exact_slots():
    bank = make_bank()
    renderer = Renderer(bank, LayoutSettings(), "train")
    texts = ["Hello world", "a", "0123456789 abcdefghij KLMNOPQRST"]
    rng = np.random.default_rng(1)
    lines = renderer.render(texts, rng)

    assert lines.images.shape == (3, 28, 32 * 28)
    assert lines.images.dtype == np.uint8
    assert (lines.widths == 896).all()
    # Replay the same draws: slot k holds exactly the glyph drawn for char k.
    codes, _ = renderer.encode(texts)
    glyphs = renderer.draw_glyphs(codes, np.random.default_rng(1))
    for i, text in enumerate(texts):
        for k in range(32):
            slot = lines.images[i, :, 28 * k : 28 * (k + 1)]
            if k < len(text) and text[k] != " ":
                index = glyphs[i, k] - 1
                assert bank.classes[index] == bank.class_of(text[k])
                np.testing.assert_array_equal(slot, bank.images[index])
            else:
                assert not slot.any(), f"slot {k} of {text!r} should be blank"
    starts = lines.span_starts[lines.span_offsets[0] : lines.span_offsets[1]]
    ends = lines.span_ends[lines.span_offsets[0] : lines.span_offsets[1]]
    np.testing.assert_array_equal(starts, np.arange(11) * 28)
    np.testing.assert_array_equal(ends, np.arange(1, 12) * 28)


def test_glyphs_are_drawn_only_from_the_split():
    bank = make_bank()
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        renderer = Renderer(bank, LayoutSettings(), split)
        codes, _ = renderer.encode(["abcdefghijklmnopqrstuvwxyzABCDEF"] * 50)
        glyphs = renderer.draw_glyphs(codes, np.random.default_rng(0)) - 1
        assert (bank.splits[glyphs] == code).all()


def test_every_occurrence_gets_a_fresh_glyph():
    bank = make_bank(per_class=40)
    renderer = Renderer(bank, LayoutSettings(), "train")
    lines = renderer.render(["e" * 32], np.random.default_rng(5))
    slots = lines.images[0].reshape(28, 32, 28).transpose(1, 0, 2)
    distinct = {slot.tobytes() for slot in slots}
    assert len(distinct) > 16, "the same glyph image was reused for every 'e'"


def test_case_fallback_for_merged_classes():
    # EMNIST balanced has no class for lower-case 'o': it draws with 'O'.
    chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt"
    classes = np.repeat(np.arange(len(chars)), 5)
    images = np.zeros((len(classes), 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 255
    bank = GlyphBank(images, classes, chars, assign_splits(classes, 0, 0, 1))
    assert bank.class_of("o") == bank.class_of("O") == chars.index("O")
    assert bank.class_of("a") != bank.class_of("A")
    assert "o" in bank.charset and "c" in bank.charset


@pytest.mark.parametrize("mode", ["seed", "natural"])
def test_same_generator_state_same_pixels(mode):
    bank = make_bank()
    renderer = Renderer(bank, LayoutSettings(mode=mode), "train")
    texts = ["The quick brown fox", "jumps over 12 lazy dogs"]
    a = renderer.render(texts, np.random.default_rng(9))
    b = renderer.render(texts, np.random.default_rng(9))
    np.testing.assert_array_equal(a.images, b.images)
    c = renderer.render(texts, np.random.default_rng(10))
    assert not np.array_equal(a.images, c.images)


def test_natural_layout_spans_and_widths():
    bank = make_bank()
    renderer = Renderer(bank, LayoutSettings(mode="natural"), "train")
    texts = ["Hi there", "a much longer line of text 123", "x"]
    lines = renderer.render(texts, np.random.default_rng(2))
    assert lines.widths[1] > lines.widths[0] > lines.widths[2]
    for i, text in enumerate(texts):
        lo, hi = lines.span_offsets[i], lines.span_offsets[i + 1]
        assert hi - lo == len(text)
        starts, ends = lines.span_starts[lo:hi], lines.span_ends[lo:hi]
        assert (np.diff(starts) > 0).all()
        assert (ends >= starts).all()
        assert ends.max() <= lines.widths[i]
        # Nothing is drawn past the line's own width.
        assert not lines.images[i, :, lines.widths[i] :].any()
        assert lines.images[i, :, : lines.widths[i]].any()


def test_overlapping_ink_saturates_instead_of_wrapping():
    # Every glyph is a solid block of 200: a wrapping uint8 sum of two
    # overlapping blocks would give 144, a saturating max gives 200.
    bank = make_bank(ink=200)
    layout = LayoutSettings(
        mode="natural", spacing_mean=-3, spacing_std=0, min_spacing=-3, scale_min=1.0
    )
    renderer = Renderer(bank, layout, "train")
    lines = renderer.render(
        ["abcdefghijklmnopqrstuvwxyz"] * 20, np.random.default_rng(4)
    )
    values = set(np.unique(lines.images).tolist())
    assert values <= {0, 200}, values
    # The blocks do overlap: ink is contiguous across glyph boundaries.
    row = lines.images[0, 14, : lines.widths[0]]
    inked = np.flatnonzero(row)
    assert inked.max() - inked.min() + 1 == len(inked)


def test_text_longer_than_the_line_is_refused():
    renderer = Renderer(make_bank(), LayoutSettings(max_chars=8), "train")
    with pytest.raises(SettingsError, match="max_chars is 8"):
        renderer.render(["nine char"], np.random.default_rng(0))


def test_character_outside_the_charset_is_refused():
    renderer = Renderer(make_bank(), LayoutSettings(), "train")
    with pytest.raises(SettingsError, match="not in the charset"):
        renderer.render(["hello, world"], np.random.default_rng(0))
    with pytest.raises(SettingsError, match="not ASCII"):
        renderer.render(["café"], np.random.default_rng(0))


def test_taller_lines_center_the_glyphs():
    bank = make_bank()
    renderer = Renderer(bank, LayoutSettings(height=40), "train")
    lines = renderer.render(["ab"], np.random.default_rng(0))
    assert lines.images.shape == (1, 40, 896)
    assert not lines.images[0, :6].any() and not lines.images[0, 34:].any()
