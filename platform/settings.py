"""Typed settings for generating a dataset version.

Every tunable number lives here, with the reason for its default. Values come
from (highest first) explicit arguments / CLI flags, ``SCRIBELINE_*`` environment
variables (nested fields with ``__``, e.g. ``SCRIBELINE_LAYOUT__MODE=natural``),
then these defaults. The resolved settings are written into every manifest,
without ``storage_options`` (they may hold credentials).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scribeline.platform.errors import SettingsError

SPLITS = ("train", "val", "test")


class LayoutSettings(BaseModel):
    """How glyphs are placed on a line image.

    ``seed`` is the reference layout: every character in a fixed slot of
    ``slot_width`` pixels, lines padded to ``max_chars`` characters, so every line
    image is ``height x max_chars * slot_width``. ``natural`` packs glyphs by
    their ink with jittered spacing, word gaps, vertical jitter, scale and slant;
    its line images have variable width.
    """

    mode: Literal["seed", "natural"] = Field(
        "seed", description="seed: fixed slots (exactly reproducible); natural: jitter"
    )
    height: int = Field(28, ge=28, le=256, description="EMNIST glyphs are 28 px high")
    max_chars: int = Field(
        32, ge=1, le=512, description="32 chars fit a phone-width line at 28 px"
    )
    slot_width: int = Field(28, ge=8, le=64, description="seed layout: one glyph box")
    spacing_mean: float = Field(
        2.0, ge=-8, le=16, description="natural: px between glyph ink; 2 reads as print"
    )
    spacing_std: float = Field(
        1.5, ge=0, le=8, description="natural: jitter; negative gaps make overlap"
    )
    min_spacing: int = Field(
        -3, ge=-8, le=0, description="natural: most overlap allowed, px"
    )
    word_gap_min: int = Field(10, ge=0, le=64, description="natural: space width, px")
    word_gap_max: int = Field(18, ge=0, le=64, description="natural: space width, px")
    vertical_jitter: int = Field(
        2, ge=0, le=6, description="natural: +-px; EMNIST leaves ~4 px above and below"
    )
    scale_min: float = Field(
        0.85, gt=0.3, le=1.0, description="natural: smallest glyph scale"
    )
    scale_max: float = Field(1.0, gt=0.3, le=1.0, description="natural: largest")
    slant_max: float = Field(
        0.25, ge=0, le=0.6, description="natural: +- shear (tan), drawn once per line"
    )
    margin: int = Field(4, ge=0, le=64, description="natural: blank px at both ends")

    @model_validator(mode="after")
    def _ranges(self) -> LayoutSettings:
        if self.word_gap_min > self.word_gap_max:
            raise SettingsError(
                f"layout.word_gap_min ({self.word_gap_min}) is larger than "
                f"layout.word_gap_max ({self.word_gap_max}); swap them."
            )
        if self.scale_min > self.scale_max:
            raise SettingsError(
                f"layout.scale_min ({self.scale_min}) is larger than "
                f"layout.scale_max ({self.scale_max}); swap them."
            )
        return self


class GenerateSettings(BaseSettings):
    """Everything that decides the content of a dataset version.

    Two runs with equal settings (``output``, ``storage_options`` and ``workers``
    aside) and equal sources produce the same shards, byte for byte.
    """

    model_config = SettingsConfigDict(
        env_prefix="SCRIBELINE_", env_nested_delimiter="__", extra="forbid"
    )

    glyphs: str | None = Field(
        None,
        description="EMNIST folder, gzip.zip or fsspec URL; None: embedded fonts",
    )
    emnist_split: Literal[
        "byclass", "bymerge", "balanced", "letters", "digits", "mnist"
    ] = Field(
        "byclass", description="byclass keeps letter case; balanced merges 15 letters"
    )
    corpus: str | None = Field(
        None, description="WikiSplit .tsv or a text file (one sentence a line)"
    )
    corpus_format: Literal["auto", "wikisplit", "text"] = Field(
        "auto", description="auto: .tsv is WikiSplit, anything else plain text"
    )
    output: str = Field(
        "scribeline-data/dataset", description="dataset version URL (folder, s3://)"
    )
    lines: int = Field(
        10_000, ge=1, le=10**10, description="10k lines take ~1 s on one core"
    )
    shard_size: int = Field(
        10_000,
        ge=1,
        le=100_000,
        description="lines per shard: ~27 MB, one object per task at the seed layout",
    )
    seed: int = Field(0, ge=0, description="the dataset seed; shards derive from it")
    val_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="of sentences, glyph images and lines"
    )
    test_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="of sentences, glyph images and lines"
    )
    glyph_split_seed: int = Field(
        20170301,
        description="fixes which glyph images are held out, whatever the dataset seed",
    )
    overflow: Literal["cut", "wrap"] = Field(
        "cut",
        description="long sentences: cut at a word boundary, or wrap into lines",
    )
    layout: LayoutSettings = Field(default_factory=LayoutSettings)
    image_encoding: Literal["gray4", "raw8"] = Field(
        "gray4",
        description="gray4: 16 levels, ~3.2 KB/line; raw8: lossless, ~6.1 KB/line",
    )
    compression_level: int = Field(
        3, ge=1, le=22, description="zstd 3: level 6+ costs 5x the time for 10% less"
    )
    row_group_size: int = Field(
        1024, ge=16, le=100_000, description="rows a reader decodes at once (~3 MB)"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="passed to fsspec for every URL (endpoint, key); never logged",
    )
    workers: int = Field(
        1, ge=1, le=4096, description="local processes; does not change the output"
    )

    @model_validator(mode="after")
    def _fractions(self) -> GenerateSettings:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise SettingsError(
                f"val_fraction + test_fraction is "
                f"{self.val_fraction + self.test_fraction:.2f}; keep it under 0.9 so "
                "training has sentences and glyphs left."
            )
        return self

    def content_dict(self) -> dict[str, Any]:
        """The settings that decide the shards' content (no paths, no secrets).

        ``emnist_split`` only matters when EMNIST is the glyph source.
        """
        exclude = {"output", "storage_options", "workers"}
        if not self.glyphs:
            exclude.add("emnist_split")
        return self.model_dump(mode="json", exclude=exclude)

    def public_dict(self) -> dict[str, Any]:
        """The settings as written beside outputs: everything but storage options."""
        return self.model_dump(mode="json", exclude={"storage_options"})


def stable_digest(obj: Any, length: int = 16) -> str:
    """A short sha256 of the canonical JSON of ``obj``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
