"""Read line images with an exported TFLite recognizer: PNGs in, text out.

    scribeline predict line1.png line2.png --model out/tflite/recognizer-int8.tflite
    scribeline predict --model out/tflite/recognizer-float32.tflite --dataset out/ds

    from scribeline.platform.predict import TFLiteReader
    reader = TFLiteReader.load("out/tflite/recognizer-int8-dynamic.tflite")
    texts = reader.predict(["line1.png", "line2.png"])     # paths, PNG bytes or arrays
    result = reader.evaluate_dataset("out/ds", "test")      # result.cer, result.wer

This is the app's side of the model, in Python: no TensorFlow, only the
``ai_edge_litert`` interpreter, numpy and Pillow. The ``.tflite`` file maps a
line image to per-step class probabilities; CTC decoding (best path: argmax per
step, merge repeats, drop the blank) happens here, as it must in an app.

Everything needed to read a model comes from its metadata (written by
``scribeline export``): the JSON file beside it (``recognizer-int8.json`` for
``recognizer-int8.tflite``), or, when only the ``.tflite`` file was copied, the
same JSON embedded in the flatbuffer's ``metadata`` under the name
``scribeline``. A model with neither is refused: its charset is unknown.

Fitting a line image to the model input (``fit_line``), in this order:

1. Greyscale (colour averaged by Pillow's ``L`` conversion; transparency is
   composited onto white paper first).
2. Polarity: the model reads ink 255 on background 0, as the dataset stores
   lines. The background is the median of the image's border pixels; when it
   is light (> 127) the image is dark ink on white paper and is inverted.
3. Contrast: the background level is subtracted and the darkest ink stretched
   to 255. Dataset lines (background 0, ink up to 255) pass unchanged. An image
   whose ink is within ``MIN_INK_CONTRAST`` grey levels of its background holds
   no ink and is refused.
4. Size: the height is scaled to the model height, keeping the aspect ratio
   (bilinear, antialiased when shrinking). A line that is then narrower than
   the model input is padded on the right with background, exactly as training
   pads lines. A line that is then wider is instead scaled down as a whole to
   the model width (aspect kept), centred vertically and padded above and
   below: it stays readable only while its glyphs stay large enough (a line of
   more than the training ``max_chars`` characters gets smaller glyphs than the
   model has seen; cut such lines in two).
5. ``float32 = uint8 / 255``, shape ``[1, height, width, 1]``.

The exported LSTMs are TFLite's fused ``UNIDIRECTIONAL_SEQUENCE_LSTM`` op,
which keeps its state in variable tensors between invocations: the reader
resets them before every line (``reset_all_variables``); an app must do the
same (Android: ``Interpreter.resetVariableTensors()``), or each line starts
from the previous line's final state.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scribeline.platform.errors import DatasetError, ScribelineError
from scribeline.platform.metrics import EvalResult, evaluate_texts
from scribeline.platform.model import (
    CharsetMismatchError,
    blank_index,
    greedy_decode,
)
from scribeline.platform.storage import resolve, sha256_bytes

logger = logging.getLogger(__name__)

METADATA_FORMAT = "scribeline-tflite-v1"
METADATA_NAME = "scribeline"  # the flatbuffer metadata entry holding the JSON
TFLITE_IDENTIFIER = b"TFL3"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Grey levels between the background and the darkest ink below which an image
# counts as blank: gray4 storage alone moves a pixel by up to 8 levels, and a
# scanned empty page varies by ~10-20; a pen stroke differs by 100+.
MIN_INK_CONTRAST = 32
# Border pixels lighter than this mean paper: dark ink on white, to invert.
LIGHT_BACKGROUND = 127


class ImageError(ScribelineError, ValueError):
    """A line image that is not a PNG, cannot be decoded, or holds no ink."""


class ModelMetadataError(ScribelineError):
    """A ``.tflite`` file without scribeline metadata, or with metadata that
    does not describe it."""


# --------------------------------------------------------------------------
# Line images: read a PNG, fit it to the model input
# --------------------------------------------------------------------------


def read_png(
    source: str | Path | bytes,
    height: int = 28,
    width: int = 896,
    storage_options: dict[str, Any] | None = None,
) -> np.ndarray:
    """A PNG line image (a path, URL or the file's bytes), fitted to
    ``[height, width] uint8`` with ink 255 on 0 (see ``fit_line``)."""
    name = "the given bytes" if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else _read_bytes(source, storage_options)
    return fit_line(decode_png(data, name), height, width, name)


def _read_bytes(source: str | Path, storage_options: dict[str, Any] | None) -> bytes:
    try:
        return resolve(str(source), storage_options).read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no line image at {source}.") from err


def decode_png(data: bytes, name: str = "image") -> np.ndarray:
    """PNG bytes -> ``[h, w] uint8`` greyscale as drawn (no polarity change)."""
    from PIL import Image, UnidentifiedImageError

    if not data.startswith(PNG_SIGNATURE):
        what = "is empty (0 bytes)" if not data else f"starts with {data[:8]!r}"
        raise ImageError(
            f"{name} is not a PNG (it {what}); pass line images as PNG files."
        )
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
                # Transparent parts are paper: composite onto white.
                rgba = picture.convert("RGBA")
                paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                picture = Image.alpha_composite(paper, rgba)
            if picture.mode in ("I", "I;16", "I;16B", "F"):
                pixels = np.asarray(picture, dtype=np.float64)
                top = max(float(pixels.max()), 1.0)
                scale = 255.0 / (65535.0 if top > 255 else 255.0)
                return np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8)
            return np.asarray(picture.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(
            f"{name} is a damaged PNG that cannot be decoded ({err}); export the "
            "line image again."
        ) from err


def fit_line(
    image: np.ndarray, height: int, width: int, name: str = "line image"
) -> np.ndarray:
    """Any line image -> ``[height, width] uint8``, ink 255 on 0, as the model
    reads lines (the module docstring lists the steps)."""
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2:
        raise ImageError(
            f"{name} has shape {pixels.shape}; expected a greyscale line image "
            "[height, width]."
        )
    h, w = pixels.shape
    if h == 0 or w == 0:
        raise ImageError(f"{name} is empty ({w}x{h} px); it holds no line to read.")
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(pixels.astype(np.float64)), 0, 255).astype(np.uint8)

    # Polarity and contrast: ink 255 on background 0.
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > LIGHT_BACKGROUND:
        pixels = 255 - pixels
        border = 255 - border
    background = int(np.median(border))
    peak = int(pixels.max())
    if peak - background < MIN_INK_CONTRAST:
        raise ImageError(
            f"{name} ({w}x{h} px) holds no ink: every pixel is within "
            f"{peak - background} grey levels of the background. Pass an image of a "
            "handwritten line."
        )
    if background != 0 or peak != 255:
        stretched = (pixels.astype(np.float32) - background) * (
            255.0 / (peak - background)
        )
        pixels = np.clip(np.rint(stretched), 0, 255).astype(np.uint8)

    # Size: scale to the model height; too wide lines scale down to the width.
    scale = height / h
    new_h, new_w = height, max(1, round(w * scale))
    if new_w > width:
        scale = width / w
        new_h, new_w = max(1, round(h * scale)), width
    if (new_h, new_w) != (h, w):
        resized = Image.fromarray(pixels).resize(
            (new_w, new_h), Image.Resampling.BILINEAR
        )
        pixels = np.asarray(resized, dtype=np.uint8)
    out = np.zeros((height, width), np.uint8)
    top = (height - new_h) // 2
    out[top : top + new_h, :new_w] = pixels
    return out


# --------------------------------------------------------------------------
# Metadata: beside the model, or embedded in its flatbuffer
# --------------------------------------------------------------------------


def metadata_url(model_url: str) -> str:
    """``.../recognizer-int8.tflite`` -> ``.../recognizer-int8.json``."""
    stem, ext = posixpath.splitext(model_url)
    return (stem if ext == ".tflite" else model_url) + ".json"


def embedded_metadata(content: bytes) -> dict[str, Any] | None:
    """The scribeline JSON embedded in a ``.tflite`` flatbuffer, or None."""
    from ai_edge_litert import schema_py_generated as schema

    check_flatbuffer(content, "the model")
    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if (entry.Name() or b"").decode() != METADATA_NAME:
            continue
        data = model.Buffers(entry.Buffer()).DataAsNumpy()
        if isinstance(data, int):  # an empty buffer reads as 0
            return None
        try:
            return json.loads(bytes(data))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelMetadataError(
                f"the model's embedded {METADATA_NAME!r} metadata is not valid JSON "
                f"({err}); export the checkpoint again."
            ) from err
    return None


def check_flatbuffer(content: bytes, name: str) -> None:
    if len(content) < 8 or content[4:8] != TFLITE_IDENTIFIER:
        raise ModelMetadataError(
            f"{name} is not a TFLite model (no {TFLITE_IDENTIFIER.decode()} "
            "flatbuffer identifier); pass a .tflite file written by scribeline "
            "export."
        )


# --------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------


@dataclass
class TFLiteReader:
    """A ``.tflite`` recognizer, its metadata and an interpreter for it."""

    content: bytes
    meta: dict[str, Any]
    source: str = "<memory>"
    num_threads: int = 1

    def __post_init__(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        check_flatbuffer(self.content, self.source)
        _check_meta(self.meta, self.source)
        try:
            self.interpreter = Interpreter(
                model_content=self.content, num_threads=self.num_threads
            )
            self.interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as err:
            raise ModelMetadataError(
                f"{self.source} does not load in the ai_edge_litert interpreter: {err}"
            ) from err
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        shape = [int(d) for d in self._input["shape"]]
        classes = int(self._output["shape"][-1])
        if shape != self.meta["input"]["shape"] or classes != len(self.charset) + 1:
            raise ModelMetadataError(
                f"the metadata of {self.source} describes input "
                f"{self.meta['input']['shape']} and {len(self.charset) + 1} classes, "
                f"the model has input {shape} and {classes} classes: the metadata "
                "belongs to another model. Export the checkpoint again."
            )

    @classmethod
    def load(
        cls,
        url: str | Path,
        storage_options: dict[str, Any] | None = None,
        num_threads: int = 1,
    ) -> TFLiteReader:
        """The model at ``url`` with its metadata (the JSON beside it, else the
        copy embedded in the file)."""
        url = str(url)
        try:
            content = resolve(url, storage_options).read_bytes()
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"no model at {url}; export one with `scribeline export CHECKPOINT "
                "--out DIR`."
            ) from err
        check_flatbuffer(content, url)
        side = metadata_url(url)
        try:
            meta = json.loads(resolve(side, storage_options).read_bytes())
            where = side
        except FileNotFoundError:
            meta, where = embedded_metadata(content), f"{url} (embedded)"
        except json.JSONDecodeError as err:
            raise ModelMetadataError(
                f"{side} is not valid JSON ({err}); export the checkpoint again."
            ) from err
        if meta is None:
            raise ModelMetadataError(
                f"{url} has no scribeline metadata: no {posixpath.basename(side)} "
                f"beside it and no {METADATA_NAME!r} entry in the file, so its "
                "charset and input are unknown. Use a model written by `scribeline "
                "export CHECKPOINT --out DIR` (it writes both)."
            )
        expected = meta.get("sha256")
        if expected and expected != sha256_bytes(content):
            raise ModelMetadataError(
                f"{where} describes another file (sha256 {expected[:12]}..., this "
                f"model is {sha256_bytes(content)[:12]}...); keep each .tflite "
                "with the .json exported with it."
            )
        logger.debug("loaded %s with metadata from %s", url, where)
        return cls(content, meta, url, num_threads)

    # -- what the model reads and writes --------------------------------------

    @property
    def charset(self) -> str:
        return self.meta["charset"]

    @property
    def blank_index(self) -> int:
        return int(self.meta["blank_index"])

    @property
    def height(self) -> int:
        return int(self.meta["input"]["shape"][1])

    @property
    def width(self) -> int:
        return int(self.meta["input"]["shape"][2])

    @property
    def variant(self) -> str:
        return str(self.meta.get("variant", "unknown"))

    # -- running it -----------------------------------------------------------

    def run(self, line: np.ndarray) -> np.ndarray:
        """One fitted line (``[height, width] uint8``, ink 255) -> per-step
        probabilities ``[T, len(charset) + 1]``."""
        x = np.asarray(line, np.float32).reshape(1, self.height, self.width, 1)
        it = self.interpreter
        it.reset_all_variables()  # the fused LSTMs' state: start every line at 0
        it.set_tensor(self._input["index"], x * np.float32(1.0 / 255.0))
        it.invoke()
        return it.get_tensor(self._output["index"])[0].copy()

    def fit(self, image: np.ndarray | str | Path | bytes) -> np.ndarray:
        """A path, URL, PNG bytes or array -> the fitted ``[height, width]`` line."""
        if isinstance(image, str | Path | bytes):
            return read_png(image, self.height, self.width)
        return fit_line(image, self.height, self.width)

    def probabilities(
        self, images: Iterable[np.ndarray | str | Path | bytes]
    ) -> np.ndarray:
        """``[n, T, len(charset) + 1]`` for line images of any size."""
        return np.stack([self.run(self.fit(image)) for image in images])

    def predict(self, images: Iterable[np.ndarray | str | Path | bytes]) -> list[str]:
        """The text of each line image (greedy CTC decoding)."""
        return [
            greedy_decode(self.run(self.fit(image))[None], self.charset)[0]
            for image in images
        ]

    def evaluate_dataset(
        self,
        url: str,
        split: str = "test",
        limit: int | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> EvalResult:
        """CER/WER on ``split`` of a dataset version made with the model's charset."""
        from scribeline.platform.dataset import iter_rows, read_manifest

        manifest = read_manifest(url, storage_options)
        check_charset(manifest, self.charset, url, f"the model {self.source}")
        truths, predictions = [], []
        for row in iter_rows(url, split, limit, storage_options):
            truths.append(row["text"])
            predictions += self.predict([row["image"]])
        if not truths:
            raise DatasetError(f"split {split!r} of {url} has no lines to evaluate.")
        return evaluate_texts(split, truths, predictions)


def predict(
    images: Iterable[np.ndarray | str | Path | bytes],
    model: str | Path,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """The text of each line image, read by the ``.tflite`` model at ``model``."""
    return TFLiteReader.load(model, storage_options).predict(images)


def check_charset(manifest: dict[str, Any], charset: str, url: str, what: str) -> None:
    """Raise ``CharsetMismatchError`` unless the dataset's charset is ``charset``."""
    chars = manifest["charset"]["chars"]
    if chars != charset:
        raise CharsetMismatchError(
            f"the dataset version at {url} has the charset {chars!r}, but {what} was "
            f"trained on {charset!r}; its class indices would mean other characters. "
            "Use a dataset version made with the model's charset."
        )


def _check_meta(meta: dict[str, Any], source: str) -> None:
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelMetadataError(
            f"the metadata of {source} has format {found!r}, not {METADATA_FORMAT!r}; "
            "export the checkpoint again with this version of scribeline."
        )
    missing = [k for k in ("charset", "blank_index", "input") if k not in meta]
    if missing:
        raise ModelMetadataError(
            f"the metadata of {source} lacks {', '.join(missing)}; export the "
            "checkpoint again."
        )
    if int(meta["blank_index"]) != blank_index(meta["charset"]):
        raise ModelMetadataError(
            f"the metadata of {source} puts the CTC blank at class "
            f"{meta['blank_index']}, this scribeline decodes it at class "
            f"{blank_index(meta['charset'])} (the last); it was made by an "
            "incompatible version."
        )
