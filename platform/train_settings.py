"""Typed settings for training a line recognizer.

Values come from (highest first) explicit arguments / CLI flags,
``SCRIBELINE_TRAIN_*`` environment variables (nested fields with ``__``, e.g.
``SCRIBELINE_TRAIN_MODEL__LSTM_UNITS=128``), then these defaults. The resolved
settings, without ``storage_options``, are written into every checkpoint.

The model defaults were chosen by measuring train-step throughput on a 2-core
CPU (see ``bench/bench_pipeline.py`` and the README): the LSTMs over the time
axis dominate, so the time axis is as short as CTC allows (64 steps for 32
characters) and the batch large enough to amortise each step's overhead.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scribeline.platform.errors import SettingsError


class ModelSettings(BaseModel):
    """Layer sizes of the CNN + BiLSTM network (``platform/model.py``)."""

    c1: int = Field(16, ge=1, le=512, description="first conv filters; 16 > 6: case")
    c3: int = Field(32, ge=1, le=512, description="second conv filters (LeNet: 16)")
    c5: int = Field(
        128, ge=1, le=4096, description="per-column features fed to the LSTMs"
    )
    lstm_units: int = Field(
        96, ge=4, le=2048, description="per direction; 128 costs ~1.2x as much on CPU"
    )
    time_pool: int = Field(
        7,
        ge=1,
        le=64,
        description="width pooling: 896 px / (2 * 7) = 64 steps, 2 per 28-px glyph",
    )
    dropout: float = Field(0.2, ge=0, lt=1, description="after c5 and each BiLSTM")

    def build_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class AugmentSettings(BaseModel):
    """Training-time noise, applied per batch in the input pipeline.

    Stored shards stay clean (noise makes them 6x larger, STACK.md); each
    training batch gets fresh, seeded noise so a resumed run sees the same.
    """

    enabled: bool = Field(True, description="off for exact-loss comparisons")
    noise_std: float = Field(
        0.08,
        ge=0,
        le=1,
        description="std of uniform pixel noise; visible, not obscuring",
    )
    ink_min: float = Field(
        0.6, gt=0, le=1, description="ink intensity drawn in [ink_min, 1] per line"
    )
    blur_prob: float = Field(
        0.3, ge=0, le=1, description="share of lines softened by a 3x3 blur"
    )


class TrainSettings(BaseSettings):
    """Everything a training run needs; written into every checkpoint."""

    model_config = SettingsConfigDict(
        env_prefix="SCRIBELINE_TRAIN_", env_nested_delimiter="__", extra="forbid"
    )

    dataset: str = Field(
        "scribeline-data/dataset", description="dataset version URL (folder, s3://)"
    )
    output: str = Field(
        "scribeline-data/model",
        description="checkpoint URL (folder, s3://); TensorBoard logs go in it too",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="passed to fsspec for every URL (endpoint, key); never logged",
    )
    epochs: int = Field(10, ge=1, le=100_000, description="passes over the train split")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many steps (overrides epochs)"
    )
    max_minutes: float | None = Field(
        None, gt=0, description="stop (with a final checkpoint) after this wall time"
    )
    batch_size: int = Field(
        128,
        ge=1,
        le=65_536,
        description="global batch; 128 amortises the LSTM's per-step cost on CPU",
    )
    learning_rate: float = Field(
        2e-3, gt=0, le=1, description="Adam peak; CTC from scratch likes 1e-3..3e-3"
    )
    warmup_steps: int = Field(
        200, ge=0, description="linear warmup: CTC's early gradients are large"
    )
    final_lr_fraction: float = Field(
        0.05, ge=0, le=1, description="cosine decay ends at this share of the peak"
    )
    clipnorm: float | None = Field(
        5.0, gt=0, description="global gradient-norm clip; CTC has rare spikes"
    )
    seed: int = Field(0, ge=0, description="weights, shuffle order and noise")
    shuffle_buffer: int = Field(
        4096,
        ge=1,
        le=1_000_000,
        description="rows; with shuffled shard order it mixes ~4 row groups",
    )
    readers: int = Field(
        4, ge=1, le=64, description="shards read in parallel (interleave cycle)"
    )
    checkpoint_every: int = Field(
        500, ge=1, description="steps between checkpoints (~5 min on 2 CPU cores)"
    )
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="older ones deleted")
    log_every: int = Field(50, ge=1, description="steps between progress lines")
    eval_lines: int | None = Field(
        2048, ge=1, description="val lines per validation (None: all); ~6 s on CPU"
    )
    eval_every: int | None = Field(
        None, ge=1, description="steps between validations besides epoch ends"
    )
    final_eval_lines: int | None = Field(
        None, ge=1, description="val and test lines at the end (None: all of them)"
    )
    strategy: Literal["auto", "one", "mirrored", "multiworker"] = Field(
        "auto",
        description="auto: mirrored with 2+ GPUs, else one device; multiworker: "
        "set by the Ray launcher",
    )
    mixed_precision: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: float16 compute on GPUs only (CTC stays float32)"
    )
    threads: int = Field(
        0, ge=0, le=1024, description="TF intra-op threads; 0: TensorFlow's default"
    )
    resume: bool = Field(
        False, description="continue from the output's last checkpoint"
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)

    @model_validator(mode="after")
    def _checks(self) -> TrainSettings:
        if self.dataset.rstrip("/") == self.output.rstrip("/"):
            raise SettingsError(
                f"dataset and output are the same URL ({self.output}); write "
                "checkpoints to their own folder."
            )
        return self

    def public_dict(self) -> dict[str, Any]:
        """The settings as written beside outputs: everything but storage options."""
        return self.model_dump(mode="json", exclude={"storage_options"})
