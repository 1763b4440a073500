"""Look at line images: a PNG grid with each line's text, or one PNG a line."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scribeline.platform.errors import DatasetError
from scribeline.platform.settings import GenerateSettings

_TEXT_HEIGHT = 14
_GAP = 6


@dataclass
class Sample:
    sample_id: str
    text: str
    image: np.ndarray  # [height, width] uint8, 255 = ink


def samples_from_dataset(
    url: str, count: int, split: str | None, storage_options: dict[str, Any] | None
) -> list[Sample]:
    from scribeline.platform.dataset import iter_rows

    return [
        Sample(row["sample_id"], row["text"], row["image"])
        for row in iter_rows(url, split, count, storage_options)
    ]


def samples_from_settings(
    settings: GenerateSettings, count: int, split: str = "train"
) -> list[Sample]:
    """Render ``count`` lines of ``split`` now, the way a shard would."""
    from scribeline.platform.dataset import ShardPlan, load_sources, shard_rng
    from scribeline.platform.render import Renderer

    sources = load_sources(settings)
    plan = ShardPlan(split, 0, count)
    rng = shard_rng(settings, plan)
    pool = sources.corpus.sentences[split]
    texts = [pool[i] for i in rng.integers(0, len(pool), size=count)]
    lines = Renderer(sources.bank, settings.layout, split).render(texts, rng)
    return [
        Sample(f"preview-{i:04d}", text, lines.images[i, :, : lines.widths[i]])
        for i, text in enumerate(texts)
    ]


def write_grid(samples: list[Sample], out: Path) -> Path:
    """One PNG: each line image (dark ink on white) above its text."""
    if not samples:
        raise DatasetError("no samples to preview: the dataset or split is empty.")
    font = ImageFont.load_default()
    width = max(s.image.shape[1] for s in samples) + 2 * _GAP
    row_h = max(s.image.shape[0] for s in samples) + _TEXT_HEIGHT + 2 * _GAP
    grid = Image.new("L", (width, row_h * len(samples)), 255)
    draw = ImageDraw.Draw(grid)
    for i, sample in enumerate(samples):
        top = i * row_h + _GAP
        grid.paste(Image.fromarray(255 - sample.image), (_GAP, top))
        draw.text(
            (_GAP, top + sample.image.shape[0] + 2),
            f"{sample.sample_id}: {sample.text}",
            fill=0,
            font=font,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def write_pngs(samples: list[Sample], folder: Path) -> list[Path]:
    """Each line image as its own PNG (ink 255 on 0, as stored), named by id."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in samples:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", sample.sample_id) + ".png"
        path = folder / name
        Image.fromarray(sample.image).save(path)
        paths.append(path)
    return paths
