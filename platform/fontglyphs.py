"""The embedded glyph bank: EMNIST-like glyphs rendered from handwriting fonts.

When no EMNIST is given, ``scribeline generate`` still works offline: the 62
characters ``0-9A-Za-z`` are rendered from the handwriting fonts that pip
installs with scribeline (Caveat, Indie Flower, Kalam; SIL OFL), each many
times with small random changes of slant, rotation, proportions, stroke weight
and position. Each glyph is made the way EMNIST made its images: the
character's ink box is fitted into the 28x28 frame keeping its aspect ratio
(so, as in EMNIST, ``o`` and ``O`` come out the same size), centred, with soft
anti-aliased edges, ink 255 on 0. Example::

    bank = embedded_glyph_bank()  # ~12k glyph images, ~1 s, cached per process
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scribeline.platform.errors import GlyphSourceError
from scribeline.platform.glyphs import GLYPH_SIZE, GlyphBank, assign_splits

logger = logging.getLogger(__name__)

CLASS_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
FONT_PACKAGES = ("fontpkg_caveat", "fontpkg_indie_flower", "fontpkg_kalam")
PER_FONT = 40  # glyph images per class per font file: 5 files -> 12,400 images

# Characters are drawn with capitals ~64 px high, where one px of extra stroke
# is a fine step of weight, then shrunk to SMALL_LONG_SIDE.
MASTER_CAP_HEIGHT = 64
# Extra stroke drawn around the outline (px each side, at drawing size) for
# weight variation; each glyph picks the one that widens its fitted strokes by
# up to MAX_THICKEN output px.
STROKES = (0, 1, 2, 3)
MAX_THICKEN = 1.2
# Caveat is a variable font: its weight axis runs 400..700.
VARIABLE_WEIGHTS = (400, 550, 700)
# The ink box's longer side, in output px: EMNIST's runs 22..24 px at ink > 128
# (measured on the byclass test split), leaving ~2 px blank around the glyph.
FIT_MIN, FIT_MAX = 21.0, 24.5
MAX_ROTATION_DEG = 7.0
MAX_SHEAR = 0.3  # tan of the slant; handwriting leans both ways
MAX_ASPECT = 0.15  # x and y stretched independently by up to +-15 %
MAX_OFFSET = 0.5  # px the ink box centre may move from the frame centre
# Masters are shrunk to this longer side (px) once drawn: glyphs are fitted to
# FIT_MIN..FIT_MAX px from them, near 1:1, where bilinear resampling is clean.
SMALL_LONG_SIDE = 24


@dataclass(frozen=True)
class _Master:
    """One character of one font weight and stroke, drawn and shrunk."""

    image: Image.Image  # shrunk so the ink box's longer side is SMALL_LONG_SIDE
    outline: np.ndarray  # [K, 2] x, y in ``image`` px: each ink row's two ends
    long_side: float  # the ink box's longer side as drawn (before shrinking)


def embedded_glyph_bank(
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 20170301,
    per_font: int = PER_FONT,
) -> GlyphBank:
    """The glyph bank rendered from the bundled handwriting fonts.

    ``per_font`` glyph images of each of the 62 classes come from every font
    file (Caveat's variable font counts once, its weights varied per glyph).
    ``seed`` fixes both the drawing and the held-out glyph images, so equal
    arguments give byte-identical banks. The bank is built once per process
    and shared; its arrays are read-only.
    """
    return _bank(float(val_fraction), float(test_fraction), int(seed), int(per_font))


@functools.lru_cache(maxsize=4)
def _bank(
    val_fraction: float, test_fraction: float, seed: int, per_font: int
) -> GlyphBank:
    images, classes, fonts = _render(seed, per_font)
    splits = assign_splits(classes, val_fraction, test_fraction, seed)
    splits.flags.writeable = False
    return GlyphBank(
        images=images,
        classes=classes,
        class_chars=CLASS_CHARS,
        splits=splits,
        source={"kind": "embedded-fonts", "fonts": fonts, "per_font": per_font},
    )


@functools.lru_cache(maxsize=2)
def _render(seed: int, per_font: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw ``per_font`` glyphs of every class from every font file."""
    if per_font < 1:
        raise GlyphSourceError(
            f"per_font is {per_font}; the embedded glyph bank needs at least 1 "
            f"glyph image per class and font (the default is {PER_FONT})."
        )
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    font_files = _font_files()
    n_classes = len(CLASS_CHARS)
    n = n_classes * per_font
    images = np.empty((len(font_files) * n, GLYPH_SIZE, GLYPH_SIZE), np.uint8)
    classes = np.tile(np.repeat(np.arange(n_classes), per_font), len(font_files))

    fonts = []
    for f, (package, path) in enumerate(font_files):
        fonts.append(
            {
                "name": path.name,
                "package": package,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
        _render_font(path, rng, per_font, images[f * n : (f + 1) * n])

    images.flags.writeable = False
    classes.flags.writeable = False
    logger.info(
        "Rendered the embedded glyph bank: %d glyph images from %d font files (%.1f s)",
        len(images),
        len(font_files),
        time.perf_counter() - started,
    )
    return images, classes, fonts


def _render_font(
    path: Path, rng: np.random.Generator, per_font: int, out: np.ndarray
) -> None:
    """Fill ``out`` with ``per_font`` glyphs of each class, in class order."""
    instances = _instances(path)
    n_classes = len(CLASS_CHARS)
    n = n_classes * per_font

    # Every random number for this font is drawn up front, in one order.
    char = np.repeat(np.arange(n_classes), per_font)
    instance = rng.integers(len(instances), size=n)
    rotation = np.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n))
    shear = rng.uniform(-MAX_SHEAR, MAX_SHEAR, n)
    stretch = rng.uniform(1 - MAX_ASPECT, 1 + MAX_ASPECT, (n, 2))
    fit = rng.uniform(FIT_MIN, FIT_MAX, n)
    offset = rng.uniform(-MAX_OFFSET, MAX_OFFSET, (n, 2))
    thicken = rng.uniform(0, MAX_THICKEN, n)

    # Masters are drawn on first use: most (weight, stroke) pairs serve only
    # some characters.
    masters: dict[tuple[int, int, int], _Master] = {}

    def master(i: int, stroke: int, c: int) -> _Master:
        key = (i, stroke, c)
        if key not in masters:
            masters[key] = _master(instances[i], CLASS_CHARS[c], STROKES[stroke])
        return masters[key]

    # Extra stroke: a small letter is enlarged more than a capital to fill the
    # frame, so the same master stroke would end up thicker; pick the stroke
    # that widens the fitted strokes by ``thicken`` px.
    plain = np.array(
        [
            [master(i, 0, c).long_side for c in range(n_classes)]
            for i in range(len(instances))
        ]
    )
    to_output = fit / plain[instance, char]
    stroke = np.clip(np.rint(thicken / (2 * to_output)), 0, len(STROKES) - 1)
    key = (instance * len(STROKES) + stroke.astype(int)) * n_classes + char

    # Slant, stretch and turn each glyph; its ink box after that, found from its
    # master's outline, decides the fit and the centring.
    forward = _forward_maps(rotation, shear, stretch)
    low, high = np.empty((n, 2)), np.empty((n, 2))
    chosen: list[_Master | None] = [None] * n
    for k in np.unique(key):
        members = np.flatnonzero(key == k)
        i, rest = divmod(int(k), len(STROKES) * n_classes)
        m = master(i, *divmod(rest, n_classes))
        mapped = m.outline @ forward[members].transpose(0, 2, 1)
        low[members], high[members] = mapped.min(axis=1), mapped.max(axis=1)
        for j in members:
            chosen[j] = m
    coefficients = _affine_coefficients(forward, low, high, fit, offset)

    for j, (m, coeffs) in enumerate(zip(chosen, coefficients.tolist(), strict=True)):
        glyph = m.image.transform(
            (GLYPH_SIZE, GLYPH_SIZE),
            Image.Transform.AFFINE,
            coeffs,
            Image.Resampling.BILINEAR,
        )
        out[j] = np.frombuffer(glyph.tobytes(), np.uint8).reshape(GLYPH_SIZE, -1)


def _forward_maps(
    rotation: np.ndarray, shear: np.ndarray, stretch: np.ndarray
) -> np.ndarray:
    """``[n, 2, 2]`` master px -> glyph shape: turn . slant . stretch."""
    cos, sin = np.cos(rotation), np.sin(rotation)
    turn = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    slant = np.zeros((len(rotation), 2, 2))
    slant[:, 0, 0] = stretch[:, 0]
    slant[:, 0, 1] = stretch[:, 0] * shear
    slant[:, 1, 1] = stretch[:, 1]
    return turn @ slant


def _affine_coefficients(
    forward: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    fit: np.ndarray,
    offset: np.ndarray,
) -> np.ndarray:
    """Pillow AFFINE coefficients ``[n, 6]``: glyph px -> (shrunk) master px.

    ``low``/``high`` bound the ink box of each master mapped by ``forward``;
    the box is scaled so its longer side is ``fit`` px and its centre lands on
    the frame centre plus ``offset``.
    """
    scale = fit / (high - low).max(axis=1)
    inverse = np.linalg.inv(forward * scale[:, None, None])
    box_centre = ((low + high) / 2)[:, :, None]
    target = (GLYPH_SIZE / 2 + offset)[:, :, None]
    shift = (np.linalg.inv(forward) @ box_centre - inverse @ target)[:, :, 0]
    return np.column_stack([inverse[:, 0], shift[:, 0], inverse[:, 1], shift[:, 1]])


def _font_files() -> list[tuple[str, Path]]:
    """(package, .ttf path) of every bundled font file, in a fixed order."""
    found = []
    for package in FONT_PACKAGES:
        try:
            module = importlib.import_module(package)
        except ImportError as err:
            raise GlyphSourceError(
                f"the font package {package} is not installed ({err}); reinstall "
                "scribeline, or pass --glyphs PATH_TO_EMNIST."
            ) from err
        paths = sorted(Path(module.ROOT).glob("files/*.ttf"))
        if not paths:
            raise GlyphSourceError(
                f"the font package {package} holds no .ttf file under "
                f"{module.ROOT}/files; reinstall it, or pass --glyphs PATH_TO_EMNIST."
            )
        found += [(package, path) for path in paths]
    return found


def _instances(path: Path) -> list[ImageFont.FreeTypeFont]:
    """The font at a size giving ~64 px capitals; each weight of a variable one."""
    probe = ImageFont.truetype(str(path), 100)
    cap_height = probe.getbbox("H", anchor="ls")
    size = round(100 * MASTER_CAP_HEIGHT / (cap_height[3] - cap_height[1]))
    try:
        axes = probe.get_variation_axes()
    except OSError:  # a static font has no variation axes
        axes = []
    if len(axes) != 1 or axes[0]["name"] not in (b"Weight", "Weight"):
        return [ImageFont.truetype(str(path), size)]
    instances = []
    for weight in VARIABLE_WEIGHTS:
        font = ImageFont.truetype(str(path), size)
        font.set_variation_by_axes([weight])
        instances.append(font)
    return instances


def _master(font: ImageFont.FreeTypeFont, char: str, stroke: int) -> _Master:
    """``char`` drawn large, cropped to its ink with a margin, then shrunk."""
    left, top, right, bottom = font.getbbox(char, anchor="ls", stroke_width=stroke)
    margin = 4
    canvas = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin))
    ImageDraw.Draw(canvas).text(
        (margin - left, margin - top),
        char,
        fill=255,
        font=font,
        anchor="ls",
        stroke_width=stroke,
        stroke_fill=255,
    )
    ink = np.asarray(canvas) >= 64
    rows = np.flatnonzero(ink.any(axis=1))
    if len(rows) == 0:
        raise GlyphSourceError(
            f"the font {font.getname()} draws no ink for {char!r}; it cannot be "
            "used for the embedded glyph bank."
        )
    # The convex hull of the ink lies within each row's outer ink pixels, so
    # the ink box after any affine map is the box of these corners mapped.
    first = ink[rows].argmax(axis=1)
    last = ink.shape[1] - ink[rows, ::-1].argmax(axis=1)
    xs = np.concatenate([first, first, last, last]).astype(np.float64)
    ys = np.concatenate([rows, rows + 1, rows, rows + 1]).astype(np.float64)
    long_side = max(rows[-1] + 1 - rows[0], last.max() - first.min())

    # Shrink the master so one glyph px is about one master px: each glyph is
    # then a single cheap 28x28 resample, and the antialiased shrink gives it
    # the soft edges of EMNIST.
    shrink = SMALL_LONG_SIDE / long_side
    small = canvas.resize(
        (max(1, round(canvas.width * shrink)), max(1, round(canvas.height * shrink))),
        Image.Resampling.LANCZOS,
    )
    factors = np.array(
        [small.width / canvas.width, small.height / canvas.height], np.float64
    )
    outline = np.column_stack([xs, ys]) * factors
    return _Master(small, outline, float(long_side))
