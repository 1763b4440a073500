"""A trained recognizer loaded from a checkpoint: line images in, text out.

    from scribeline.platform.recognizer import Recognizer
    reader = Recognizer.load("out/model")            # the latest checkpoint
    texts = reader.read(images)                      # [n, 28, 896] uint8, 255 ink

Everything needed to rebuild the network comes from the checkpoint's metadata:
the charset (its order is the class order), the blank index, the image size and
the model settings. No dataset is needed to read lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from scribeline.platform import checkpoint as ckpt
from scribeline.platform.metrics import EvalResult, evaluate_texts
from scribeline.platform.model import (
    CharsetMismatchError,
    blank_index,
    build_model,
    greedy_decode,
)
from scribeline.platform.pipeline import DatasetSource, Geometry, make_dataset
from scribeline.platform.storage import resolve


@dataclass
class Recognizer:
    """A model with its charset and input geometry."""

    model: Any
    charset: str
    geometry: Geometry
    meta: dict[str, Any]

    @classmethod
    def load(
        cls,
        url: str,
        storage_options: dict[str, Any] | None = None,
        checkpoint: str | None = None,
    ) -> Recognizer:
        """The model of ``checkpoint`` (default: the latest) at output ``url``."""
        root = resolve(url, storage_options)
        saved = ckpt.load(root, checkpoint)
        if saved is None:
            raise FileNotFoundError(
                f"no checkpoint at {root.url} (latest.json is missing); train one "
                "with `scribeline train --output URL`."
            )
        meta = saved.meta
        charset = meta["charset"]
        if meta.get("blank_index", blank_index(charset)) != blank_index(charset):
            raise ckpt.CheckpointError(
                f"checkpoint {saved.name} puts the CTC blank at class "
                f"{meta['blank_index']}, this scribeline at {blank_index(charset)}; "
                "it was made by an incompatible version."
            )
        geometry = Geometry(**meta["geometry"])
        model = build_model(
            charset,
            height=geometry.height,
            width=geometry.width,
            **meta["settings"]["model"],
        )
        variables = [(v.path, tuple(v.shape)) for v in model.variables]
        ckpt.check_shapes(saved, "model", variables)
        for variable, value in zip(model.variables, saved.arrays["model"], strict=True):
            variable.assign(value)
        return cls(model, charset, geometry, meta)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Per-step class probabilities ``[n, T, len(charset) + 1]``.

        ``images``: ``[n, H, W]`` uint8 (255 ink) or float in [0, 1], ``W`` at
        most the model's width (narrower lines are padded with background).
        """
        x = np.asarray(images)
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        if x.ndim == 3:
            x = x[..., None]
        height, width = self.geometry.height, self.geometry.width
        if x.shape[1] != height or x.shape[2] > width:
            raise ValueError(
                f"line images are {x.shape[1]}x{x.shape[2]} px; this model reads "
                f"{height} px high and at most {width} px wide."
            )
        if x.shape[2] < width:
            x = np.pad(x, [(0, 0), (0, 0), (0, width - x.shape[2]), (0, 0)])
        return np.asarray(self.model(x.astype(np.float32), training=False))

    def read(self, images: np.ndarray) -> list[str]:
        """Greedy CTC decoding of each line image."""
        return greedy_decode(self.probabilities(images), self.charset)

    def evaluate(
        self,
        dataset: str,
        split: str = "test",
        storage_options: dict[str, Any] | None = None,
        limit: int | None = None,
        batch_size: int = 128,
    ) -> EvalResult:
        """CER/WER on a split of a dataset version made with the same charset."""
        source = DatasetSource.open(dataset, storage_options)
        if source.charset != self.charset:
            raise CharsetMismatchError(
                f"{dataset} has the charset {source.charset!r}, but the model was "
                f"trained on {self.charset!r}; its outputs would mean other "
                "characters. Evaluate on a dataset made with the model's charset."
            )
        geometry = Geometry(
            self.geometry.height,
            self.geometry.width,
            max(source.layout["max_chars"], 1),
        )
        stream = make_dataset(
            source,
            split,
            batch_size,
            geometry,
            self.charset,
            training=False,
            limit=limit,
        )
        truths, predictions = [], []
        with stream.iterate() as batches:
            for images, _, _, texts in batches:
                predictions += self.read(images.numpy())
                truths += [t.decode() for t in texts.numpy()]
        return evaluate_texts(split, truths, predictions)
