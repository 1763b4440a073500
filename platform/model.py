"""The line recognizer: a LeNet-5-style CNN, two BiLSTM layers, CTC.

One function, ``build_model``, builds the whole network with named layers::

    image  [B, 28, W, 1] float32, ink 1.0
    c1     Conv2D 5x5, same                 [B, 28, W, c1]
    s2     MaxPool 2x2                      [B, 14, W/2, c1]
    c3     Conv2D 5x5, same                 [B, 14, W/2, c3]
    s4     MaxPool 2 x time_pool            [B, 7, T, c3]      T = W / (2 * time_pool)
    columns  Permute + Reshape              [B, T, 7 * c3]     width is the time axis
    c5     Dense (a 7-high conv, as LeNet's C5 spans its whole input)  [B, T, c5]
    lstm1, lstm2  Bidirectional LSTM        [B, T, 2 * units]
    logits Dense charset + blank            [B, T, K + 1]      float32 always
    probs  Softmax                          [B, T, K + 1]      float32 always

The classic LeNet-5 layout (conv 5x5, subsample, conv 5x5, subsample, a conv
over the whole remaining height) is kept; subsampling is max pooling, tanh is
ReLU, and the fully connected head is replaced by the BiLSTMs that read the
sentence context (case and ambiguous glyphs). The second pooling is wider than
high so the width shrinks to the time axis: at the seed layout (896 px, 28 px a
character) ``time_pool=7`` gives 64 steps, two per character slot, which is the
most CTC can need for 32 characters (a label of L characters with r repeated
adjacent pairs needs L + r steps, and L + r <= 2L - 1).

The CTC blank is the LAST class: ``blank_index(charset) == len(charset)``.
Training, decoding and export all use this one rule (``BLANK_POSITION``).

``inference_model`` cuts image -> per-step probabilities from the built
network by layer name (``"image"`` to ``"probs"``); ``logits_model`` cuts
image -> logits for the loss. All three share the same weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from scribeline.platform.errors import ScribelineError

MODEL_NAME = "scribeline_crnn"
INPUT_LAYER = "image"
LOGITS_LAYER = "logits"
PROBS_LAYER = "probs"
BLANK_POSITION = "last"  # the CTC blank is class len(charset)


class LabelTooLongError(ScribelineError, ValueError):
    """A label needs more CTC time steps than the model has."""


class CharsetMismatchError(ScribelineError, ValueError):
    """A dataset's charset is not the one the model was built for."""


# --------------------------------------------------------------------------
# Charset, labels and the blank
# --------------------------------------------------------------------------


def blank_index(charset: str) -> int:
    """The CTC blank's class index: the last one, after every character."""
    return len(charset)


def num_classes(charset: str) -> int:
    """Output classes: every character of the charset plus the blank."""
    return len(charset) + 1


def encode_label(text: str, charset: str) -> list[int]:
    """Text -> class indices (positions in ``charset``).

    Raises ``CharsetMismatchError`` naming the first character outside the
    charset.
    """
    index = {char: i for i, char in enumerate(charset)}
    try:
        return [index[char] for char in text]
    except KeyError as err:
        raise CharsetMismatchError(
            f"label {text!r} holds {err.args[0]!r}, which is not in the charset "
            f"{charset!r}; train on a dataset made with this charset."
        ) from err


def ctc_steps_needed(label: Sequence[Any]) -> int:
    """Time steps CTC needs for ``label``: its length plus one per repeated pair.

    Two equal neighbours ("ll") must be separated by a blank, so they cost an
    extra step.
    """
    repeats = sum(1 for a, b in itertools.pairwise(label) if a == b)
    return len(label) + repeats


def check_labels_fit(labels: Iterable[str], time_steps: int) -> int:
    """Raise ``LabelTooLongError`` for the first label that cannot fit.

    Returns the most steps any label needs (for logging).
    """
    most = 0
    for text in labels:
        need = ctc_steps_needed(text)
        if need > time_steps:
            raise LabelTooLongError(
                f"label {text!r} needs {need} CTC time steps ({len(text)} "
                f"characters + {need - len(text)} repeated pairs) but the model "
                f"has {time_steps}; use a smaller time_pool (more steps) or "
                "shorter lines (layout.max_chars)."
            )
        most = max(most, need)
    return most


def greedy_decode(probs: np.ndarray, charset: str) -> list[str]:
    """Best-path CTC decoding: argmax per step, merge repeats, drop blanks.

    Args:
        probs: ``[B, T, len(charset) + 1]`` per-step probabilities (or logits:
            only the argmax matters).
    """
    best = np.asarray(probs).argmax(axis=-1)  # [B, T]
    blank = blank_index(charset)
    # Keep a step when it differs from the step before it and is not blank.
    changed = np.ones_like(best, dtype=bool)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = changed & (best != blank)
    chars = np.array(list(charset))
    return ["".join(chars[row[mask]]) for row, mask in zip(best, keep, strict=True)]


def steps_from_label(label: Sequence[int], time_steps: int, charset: str) -> np.ndarray:
    """A one-hot ``[T, K+1]`` path that greedy decoding reads back as ``label``.

    Each character takes one step, a blank separates repeated characters, and
    the rest is blank: the round-trip check of encode and decode.
    """
    blank = blank_index(charset)
    path: list[int] = []
    for i, cls in enumerate(label):
        if i and label[i - 1] == cls:
            path.append(blank)
        path.append(int(cls))
    if len(path) > time_steps:
        raise LabelTooLongError(
            f"label of {len(label)} classes needs {len(path)} steps; the model has "
            f"{time_steps}."
        )
    path += [blank] * (time_steps - len(path))
    return np.eye(num_classes(charset), dtype=np.float32)[path]


# --------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------


def time_steps_for(width: int, time_pool: int) -> int:
    """CTC time steps for a line image ``width`` px wide."""
    return width // (2 * time_pool)


def build_model(
    charset: str,
    height: int = 28,
    width: int = 896,
    c1: int = 16,
    c3: int = 32,
    c5: int = 128,
    lstm_units: int = 96,
    time_pool: int = 7,
    dropout: float = 0.2,
    mixed_precision: bool = False,
) -> Any:
    """The training network: image -> per-step probabilities, layers named.

    With ``mixed_precision`` the convolutions and LSTMs compute in float16
    (GPUs); ``logits`` and ``probs`` stay float32 so that CTC is computed in
    float32.
    """
    import keras
    from keras import layers

    if height % 4:
        raise ScribelineError(
            f"line height {height} is not a multiple of 4; the two 2x poolings "
            "need one (EMNIST lines are 28 px high)."
        )
    steps = time_steps_for(width, time_pool)
    if steps < 1:
        raise ScribelineError(
            f"line width {width} px gives no time steps with time_pool={time_pool}."
        )
    policy = "mixed_float16" if mixed_precision else "float32"
    rows = height // 4

    image = keras.Input((height, width, 1), name=INPUT_LAYER)
    x = layers.Conv2D(
        c1, 5, padding="same", activation="relu", name="c1", dtype=policy
    )(image)
    x = layers.MaxPooling2D((2, 2), name="s2", dtype=policy)(x)
    x = layers.Conv2D(
        c3, 5, padding="same", activation="relu", name="c3", dtype=policy
    )(x)
    # Crop the width to a whole number of time steps before the wide pooling.
    x = layers.Cropping2D(
        ((0, 0), (0, x.shape[2] - steps * time_pool)), name="crop", dtype=policy
    )(x)
    x = layers.MaxPooling2D((2, time_pool), name="s4", dtype=policy)(x)

    # Width becomes time: [B, rows, T, C] -> [B, T, rows * C].
    x = layers.Permute((2, 1, 3), name="to_time", dtype=policy)(x)
    x = layers.Reshape((steps, rows * c3), name="columns", dtype=policy)(x)
    x = layers.Dense(c5, activation="relu", name="c5", dtype=policy)(x)
    x = layers.Dropout(dropout, name="c5_dropout", dtype=policy)(x)

    for name in ("lstm1", "lstm2"):
        x = layers.Bidirectional(
            layers.LSTM(
                lstm_units, return_sequences=True, name=f"{name}_cell", dtype=policy
            ),
            name=name,
            dtype=policy,
        )(x)
        x = layers.Dropout(dropout, name=f"{name}_dropout", dtype=policy)(x)

    logits = layers.Dense(num_classes(charset), name=LOGITS_LAYER, dtype="float32")(x)
    probs = layers.Softmax(name=PROBS_LAYER, dtype="float32")(logits)
    return keras.Model(image, probs, name=MODEL_NAME)


def logits_model(model: Any) -> Any:
    """Image -> logits, cut from the built network by layer name (for the loss)."""
    import keras

    return keras.Model(
        model.get_layer(INPUT_LAYER).output,
        model.get_layer(LOGITS_LAYER).output,
        name=f"{MODEL_NAME}_logits",
    )


def inference_model(model: Any) -> Any:
    """Image -> per-step probabilities, cut by layer name (for export/TFLite)."""
    import keras

    return keras.Model(
        model.get_layer(INPUT_LAYER).output,
        model.get_layer(PROBS_LAYER).output,
        name=f"{MODEL_NAME}_inference",
    )


def model_time_steps(model: Any) -> int:
    """The length of the model's time axis."""
    return int(model.get_layer(LOGITS_LAYER).output.shape[1])
