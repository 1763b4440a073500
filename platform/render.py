"""The renderer: texts + a glyph bank -> line images, vectorised in numpy.

Every character occurrence gets its own freshly drawn glyph image (two ``e`` in
one line are two different handwritten ``e``); spaces are gaps. Two layouts:

- ``seed``: each character in a fixed slot (``slot_width`` px), lines padded to
  ``max_chars`` characters: every line image is ``height x max_chars*slot_width``.
  Composing is one gather of whole glyph images, so it runs at tens of thousands
  of lines a second.
- ``natural``: glyphs packed by their ink with jittered spacing (overlap
  allowed), word gaps, per-glyph vertical jitter and scale, and one slant per
  line (a writer's slant is steady). Overlapping ink is combined with a
  saturating ``max``, never a wrapping uint8 sum. Line images vary in width.

Both return the x-span of every character: where its ink box (a gap for a
space) starts and ends on the line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scribeline.platform import imagecodec
from scribeline.platform.errors import SettingsError
from scribeline.platform.glyphs import GLYPH_SIZE, GlyphBank
from scribeline.platform.settings import LayoutSettings

G = GLYPH_SIZE

# Natural layout: per-glyph affine maps are quantised to this many steps per
# parameter and precomputed once, so warping a glyph is one gather.
_SCALE_STEPS = 4
_SLANT_STEPS = 9
# Lines composed per numpy call: big enough to amortise the call, small
# enough that the tiles stay in cache.
_BLOCK = 256
# A column counts as ink when a pixel reaches 43 (gray4 level 3): the same
# test in both encodings, so the layout does not depend on the encoding.
_INK_RAW8 = 43
_INK_LEVEL = 3


@dataclass
class RenderedLines:
    """A batch of line images.

    Attributes:
        images: ``[B, height, width] uint8``; line ``i`` uses its first
            ``widths[i]`` columns (the rest is background).
        widths: ``[B] int32`` width of each line image.
        span_offsets: ``[B + 1] int64``: line ``i``'s characters are
            ``span_starts[span_offsets[i]:span_offsets[i + 1]]``.
        span_starts / span_ends: ``int32`` x-span of every character.
        encoding: ``raw8``: ``images`` are pixels; ``gray4``: ``images`` are
            already encoded as stored (``imagecodec``), ``encoded_width(w)``
            bytes a row.
    """

    images: np.ndarray
    widths: np.ndarray
    span_offsets: np.ndarray
    span_starts: np.ndarray
    span_ends: np.ndarray
    encoding: str = "raw8"


class Renderer:
    """Renders texts (already cleaned to ``bank.charset``) for one split.

    ``encoding="gray4"`` returns lines already encoded for storage: the glyph
    bank is quantised to gray4 levels once (quantising commutes with the
    saturating max), and in the seed layout with an even slot width the glyphs
    are packed two pixels a byte up front, so composing a line is the same
    gather over half the bytes and no encoding pass is left to do.
    """

    def __init__(
        self,
        bank: GlyphBank,
        layout: LayoutSettings,
        split: str,
        encoding: imagecodec.ImageEncoding = "raw8",
    ) -> None:
        self.bank = bank
        self.layout = layout
        self.split = split
        self.encoding = encoding
        self.charset = bank.charset
        self.offsets, self.counts, self.flat = bank.pools(split)
        # Glyph stack with a blank image at index 0 for spaces and padding.
        self.stack = np.concatenate(
            [np.zeros((1, G, G), np.uint8), bank.images.astype(np.uint8, copy=False)]
        )
        if encoding == "gray4":
            self.stack = _cached(
                bank, ("levels",), lambda: imagecodec.to_levels(self.stack)
            )
        if layout.mode == "seed":
            # Glyphs fitted to the slot width once, packed when storing gray4.
            slot = layout.slot_width
            self._packed = encoding == "gray4" and slot % 2 == 0
            self._tiles = _cached(
                bank,
                ("tiles", encoding, slot),
                lambda: (
                    imagecodec.pack_levels(_fit_slot(self.stack, slot))
                    if self._packed
                    else _fit_slot(self.stack, slot)
                ),
            )
        # Byte -> charset position; 255 marks a byte outside the charset.
        self.lut = np.full(256, 255, np.uint8)
        for i, char in enumerate(self.charset):
            self.lut[ord(char)] = i
        if layout.mode == "natural":
            self._maps = _warp_maps(layout)
            # Flattened glyphs plus one background pixel that the warp maps
            # point at for samples that fall outside the glyph.
            flat = self.stack.reshape(len(self.stack), G * G)
            self._flat_stack = np.concatenate(
                [flat, np.zeros((len(flat), 1), np.uint8)], axis=1
            )

    # -- text to charset positions -----------------------------------------

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> ``[B, L] uint8`` charset positions (0 = space/padding), lengths."""
        max_chars = self.layout.max_chars
        lengths = np.fromiter((len(t) for t in texts), np.int64, len(texts))
        if len(texts) and lengths.max() > max_chars:
            i = int(lengths.argmax())
            raise SettingsError(
                f"line {texts[i]!r} has {lengths[i]} characters; layout.max_chars "
                f"is {max_chars}. Clean texts with the same max_chars first."
            )
        try:
            raw = np.frombuffer("".join(texts).encode("ascii"), np.uint8)
        except UnicodeEncodeError as err:
            raise SettingsError(
                f"text is not ASCII ({err.object[err.start : err.end]!r}); clean it "
                "to the glyph bank's charset first."
            ) from err
        codes = self.lut[raw]
        if (codes == 255).any():
            bad = sorted({chr(b) for b in raw[codes == 255]})
            raise SettingsError(
                f"characters {''.join(bad)!r} are not in the charset "
                f"{self.charset!r}; clean texts to the charset first."
            )
        width = int(lengths.max()) if len(texts) else 0
        width = max(width, max_chars if self.layout.mode == "seed" else 0)
        padded = np.zeros((len(texts), width), np.uint8)
        rows = np.repeat(np.arange(len(texts)), lengths)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        cols = np.arange(len(raw)) - np.repeat(starts, lengths)
        padded[rows, cols] = codes
        return padded, lengths

    def draw_glyphs(self, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A freshly drawn glyph index (into ``stack``) for every position."""
        u = rng.random(codes.shape)
        pick = self.offsets[codes] + (u * self.counts[codes]).astype(np.int64)
        # Index 0 of the stack is blank; bank glyph j lives at j + 1.
        glyph = np.where(
            codes > 0, self.flat[np.minimum(pick, len(self.flat) - 1)] + 1, 0
        )
        return glyph

    # -- layouts ----------------------------------------------------------

    def render(self, texts: list[str], rng: np.random.Generator) -> RenderedLines:
        codes, lengths = self.encode(texts)
        glyphs = self.draw_glyphs(codes, rng)
        if self.layout.mode == "seed":
            return self._seed(glyphs, lengths)
        return self._natural(codes, glyphs, lengths, rng)

    def _seed(self, glyphs: np.ndarray, lengths: np.ndarray) -> RenderedLines:
        """Fixed slots: a gather and a transpose per block of lines.

        Blocks of ``_BLOCK`` lines keep the intermediate tiles in cache; one
        gather over a whole shard spends most of its time faulting in pages.
        """
        b, n = glyphs.shape
        slot, h = self.layout.slot_width, self.layout.height
        top = (h - G) // 2
        tile_w = self._tiles.shape[2]
        images = np.zeros((b, h, n * tile_w), np.uint8)
        for i in range(0, b, _BLOCK):
            tiles = self._tiles[glyphs[i : i + _BLOCK]]  # [block, n, G, tile_w]
            images[i : i + _BLOCK, top : top + G] = tiles.transpose(0, 2, 1, 3).reshape(
                len(tiles), G, n * tile_w
            )
        if self.encoding == "gray4" and not self._packed:
            images = imagecodec.pack_levels(images)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        k = np.arange(int(lengths.sum())) - np.repeat(offsets[:-1], lengths)
        starts = (k * slot).astype(np.int32)
        return RenderedLines(
            images=images,
            widths=np.full(b, n * slot, np.int32),
            span_offsets=offsets.astype(np.int64),
            span_starts=starts,
            span_ends=starts + slot,
            encoding=self.encoding,
        )

    def _natural(
        self,
        codes: np.ndarray,
        glyphs: np.ndarray,
        lengths: np.ndarray,
        rng: np.random.Generator,
    ) -> RenderedLines:
        lay = self.layout
        b, n = codes.shape
        valid = np.arange(n)[None, :] < lengths[:, None]
        space = codes == 0

        # Warp: quantised scale per glyph, slant per line, vertical shift per
        # glyph; each combination is a precomputed gather map.
        scale_q = rng.integers(0, _SCALE_STEPS, size=(b, n))
        slant_q = np.repeat(rng.integers(0, _SLANT_STEPS, size=(b, 1)), n, axis=1)
        jitter = lay.vertical_jitter
        dy = rng.integers(-jitter, jitter + 1, size=(b, n))
        maps = self._maps[scale_q, slant_q]  # [B, n, G*G] into a padded glyph
        tiles = np.take_along_axis(
            self._flat_stack[glyphs.reshape(-1)], maps.reshape(b * n, G * G), axis=1
        ).reshape(b, n, G, G)

        # Ink extent of each warped glyph decides where the next one goes.
        # Soft grey edges (EMNIST and the font bank alike) are not ink here.
        ink = _INK_LEVEL if self.encoding == "gray4" else _INK_RAW8
        ink_cols = tiles.max(axis=2) >= ink  # [B, n, G]
        has_ink = ink_cols.any(axis=2)
        left = np.where(has_ink, ink_cols.argmax(axis=2), G // 2)
        right = np.where(has_ink, G - ink_cols[:, :, ::-1].argmax(axis=2), G // 2)
        ink_width = right - left

        spacing = np.rint(rng.normal(lay.spacing_mean, lay.spacing_std, size=(b, n)))
        spacing = np.maximum(spacing, lay.min_spacing).astype(np.int64)
        gap = rng.integers(lay.word_gap_min, lay.word_gap_max + 1, size=(b, n))
        advance = np.where(space, gap, ink_width + spacing)
        advance = np.where(valid, np.maximum(advance, 1), 0)
        cursor = lay.margin + np.concatenate(
            [np.zeros((b, 1), np.int64), np.cumsum(advance, axis=1)[:, :-1]], axis=1
        )
        x0 = cursor - left  # where each 28-px glyph box starts
        span_end = np.where(space, cursor + gap, cursor + ink_width)
        line_end = np.where(
            lengths > 0,
            np.take_along_axis(span_end, np.maximum(lengths - 1, 0)[:, None], 1)[:, 0],
            0,
        )
        widths = (line_end + lay.margin).astype(np.int32)
        widths = np.maximum(widths, 1)

        # Paste with a saturating max. Glyph boxes that overlap must not be in
        # the same fancy-indexed write (the last write would win), so paste in
        # passes of positions k, k+p, k+2p, ... where p keeps boxes apart. The
        # canvas has room above, below and left for shifted boxes.
        h = lay.height
        pad = G
        canvas = np.zeros((b, h + 2 * pad, int(widths.max()) + 3 * pad), np.uint8)
        box_x = x0 + pad
        box_y = (h - G) // 2 + dy + pad
        ink = valid & ~space
        period = _paste_period(cursor, valid)
        rows = np.arange(G)
        for phase in range(period):
            sel_b, sel_k = np.nonzero(ink[:, phase::period])
            sel_k = sel_k * period + phase
            if len(sel_b) == 0:
                continue
            bi = sel_b[:, None, None]
            yi = (box_y[sel_b, sel_k][:, None] + rows)[:, :, None]
            xi = (box_x[sel_b, sel_k][:, None] + rows)[:, None, :]
            canvas[bi, yi, xi] = np.maximum(canvas[bi, yi, xi], tiles[sel_b, sel_k])
        canvas = canvas[:, pad : pad + h]
        images = canvas[:, :, pad : pad + int(widths.max())]
        # Columns past a line's own width must be background.
        images = images * (
            np.arange(images.shape[2])[None, None, :] < widths[:, None, None]
        )

        images = images.astype(np.uint8)
        if self.encoding == "gray4":
            images = imagecodec.pack_levels(images)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        starts = cursor[valid].astype(np.int32)
        ends = span_end[valid].astype(np.int32)
        return RenderedLines(images, widths, offsets, starts, ends, self.encoding)


def _cached(bank: GlyphBank, key: tuple, make):
    """Per-bank cache of prepared glyph stacks (one build per process)."""
    cache = bank.__dict__.setdefault("_render_cache", {})
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _fit_slot(tiles: np.ndarray, slot: int) -> np.ndarray:
    """Crop (slot < 28) or pad (slot > 28) each glyph box horizontally, centred."""
    if slot == G:
        return tiles
    if slot < G:
        cut = (G - slot) // 2
        return tiles[..., cut : cut + slot]
    pad = slot - G
    return np.pad(tiles, [(0, 0)] * 3 + [(pad // 2, pad - pad // 2)])


def _paste_period(cursor: np.ndarray, valid: np.ndarray) -> int:
    """Smallest p such that the glyph boxes of positions k and k+p never overlap.

    A box starts at ``cursor - left`` with ``0 <= left < G``, so two boxes
    whose cursors are at least ``2G - 1`` apart cannot overlap. Cursors grow
    strictly along a line, so checking k against k+p covers k+2p, k+3p, ...
    """
    n = cursor.shape[1]
    for p in range(1, n):
        both = valid[:, p:] & valid[:, :-p]
        if not both.any():
            return p
        if (cursor[:, p:] - cursor[:, :-p])[both].min() >= 2 * G - 1:
            return p
    return max(n, 1)


def _warp_maps(layout: LayoutSettings) -> np.ndarray:
    """Gather maps ``[_SCALE_STEPS, _SLANT_STEPS, G*G]`` into a flat glyph.

    Output pixel (y, x) samples the source glyph at the inverse of
    ``scale`` about the centre and ``x += slant * (centre_y - y)``; samples
    outside the glyph point at index ``G*G`` (a background pixel appended to
    every flattened glyph). Nearest-neighbour keeps it one gather.
    """
    scales = np.linspace(layout.scale_min, layout.scale_max, _SCALE_STEPS)
    slants = np.linspace(-layout.slant_max, layout.slant_max, _SLANT_STEPS)
    c = (G - 1) / 2
    yy, xx = np.mgrid[0:G, 0:G].astype(np.float64)
    maps = np.empty((_SCALE_STEPS, _SLANT_STEPS, G * G), np.int64)
    for i, s in enumerate(scales):
        for j, t in enumerate(slants):
            sy = (yy - c) / s + c
            sx = (xx - c - t * (c - yy)) / s + c
            iy, ix = np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64)
            inside = (iy >= 0) & (iy < G) & (ix >= 0) & (ix < G)
            maps[i, j] = np.where(inside, iy * G + ix, G * G).reshape(-1)
    return maps
