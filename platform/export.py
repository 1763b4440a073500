"""Export a trained recognizer to TFLite, and prove each file reads like it.

    scribeline export out/model --out out/tflite
    python -c "from scribeline.platform.export import export_tflite; \\
        export_tflite('out/model', 'out/tflite')"

From a training checkpoint (``Recognizer.load``: weights, charset, geometry) to
one ``.tflite`` file per variant, each with a JSON file beside it::

    recognizer-float32.tflite       weights and activations float32
    recognizer-float16.tflite       float16 weights, float32 compute
    recognizer-int8-dynamic.tflite  int8 weights, activations quantised on the fly
    recognizer-int8.tflite          int8 weights and activations (calibrated on
                                    train-split lines); float32 input and output
    recognizer-<variant>.json       what an app needs (charset, blank index, input
                                    shape, normalisation) and what was measured
    export.json                     this report: every variant, kept or dropped

The graph. The file maps ``image [1, height, width, 1] float32`` (ink 1.0) to
``probs [1, T, len(charset) + 1]``, the softmax per time step; CTC decoding
stays outside (``scribeline.platform.predict``, and the app). The input is
fixed: batch 1 and the training height and width from the checkpoint's
geometry; narrower lines are padded, as training pads them.

Each Keras LSTM is exported as a ``tf.function`` marked the way TensorFlow's
converter recognises a Keras LSTM (``api_implements="lstm_..."``), so it
becomes TFLite's fused ``UNIDIRECTIONAL_SEQUENCE_LSTM`` op; a Bidirectional
layer becomes two of them, the backward one between two ``REVERSE_V2``. Keras
3's own LSTM converts to a ``WHILE`` loop with a fixed batch (and to Flex
TensorList ops with a dynamic one): the gate rejects both. Two properties of
the fused op:

- it keeps its state in variable tensors between invocations: reset them
  before every line (``reset_all_variables``; Android
  ``resetVariableTensors``), as ``predict.TFLiteReader`` does; without it the
  second line starts from the first one's state (probabilities off by ~0.4);
- the converter sets its cell clip to 10, Keras does not clip, and trained
  cell states do exceed 10 (~49 in the model trained on real data): the clip
  moved float32 probabilities by up to 5e-3. ``unclip_lstm_cells`` sets it to
  0 (no clip) in the flatbuffer, after which float32 matches Keras to ~1e-6.

The gate: a variant is written only if

1. its flatbuffer holds builtin ops only, read from the file itself
   (``list_ops``): no custom ops (``Flex*`` would need the Flex delegate, which
   neither ``ai_edge_litert`` nor TensorFlow's wheel has; TensorList ops only
   exist as Flex ops), no ``WHILE`` (an LSTM that was not fused), no resource
   variable ops (weights that were not frozen), and one fused sequence-LSTM op
   per LSTM direction;
2. it loads and runs in the ``ai_edge_litert`` interpreter with the expected
   input and output shapes;
3. on at least ``parity_lines`` held-out lines (the test split of the dataset
   version the checkpoint was trained on, or ``dataset_url``) its CER is within
   ``CER_TOLERANCE`` (0.5 points) of the Keras model's on the same lines, and
   its per-step probabilities are within ``PROB_TOLERANCE[variant]`` of the
   Keras model's (the largest absolute difference over every line, step and
   class).

float32, float16 and int8-dynamic must pass, or the export fails with an
``ExportError`` naming the variant and the reason, and writes nothing. Full
int8 is kept only if it passes; otherwise it is dropped with a warning and the
report says why.

Tolerances. The largest absolute probability difference to Keras, measured on
four models: a tiny one (6k parameters, 8 steps; 20 test lines), the
``scribeline run`` demo (184k parameters, 600 steps on the embedded fonts) and
the default network (449k parameters) after 600 and 2300 steps of 128 lines of
EMNIST + WikiSplit (test CER 6.6% and 3.1%); 500 test lines each. The
tolerance leaves ~3x headroom over the largest. The better a model is trained,
the sharper its softmax and the more a small logit change moves a probability
at an ambiguous step, so the int8 figures grow with training; the CER gate is
the one a reader feels.

=============  ==============================================  ==========
variant        measured: tiny / demo / real 600 / real 2300    tolerance
=============  ==============================================  ==========
float32        7e-9 / 1.0e-6 / 1.5e-6 / 1.8e-6                 1e-4
float16        3.5e-6 / 1.5e-3 / 1.2e-3 / 1.5e-3               0.01
int8-dynamic   1.1e-4 / 0.050 / 0.060 / 0.117                  0.35
int8           (failed CER) / 0.087-0.13 / 0.077 / 0.118       0.35
=============  ==============================================  ==========

Full int8 of the tiny model fails the CER gate on 20 lines (one line's worth
of characters) and is dropped; on the other models the quantised variants
change the greedy decoding of 10 to 30 of 500 lines while the CER moves by
under 0.1 point.

Metadata. The JSON beside each model is also embedded in the flatbuffer's
``metadata`` list under the name ``scribeline`` (TFLite's own field for
this, read with ``predict.embedded_metadata``), so a ``.tflite`` copied alone
still carries its charset. The embedded copy lacks the two fields that depend
on the final bytes (``bytes``, ``sha256``). It is plain JSON, not the TFLite
Support library's ``TFLITE_METADATA`` schema: Android's metadata extractor
will not parse it. Embedding rewrites the flatbuffer through the schema's
object API; the rewritten file is checked to give exactly the outputs of the
converter's file before it is written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from scribeline import __version__
from scribeline.platform.errors import ScribelineError, SettingsError
from scribeline.platform.metrics import evaluate_texts
from scribeline.platform.model import greedy_decode
from scribeline.platform.predict import (
    METADATA_FORMAT,
    METADATA_NAME,
    TFLITE_IDENTIFIER,
    TFLiteReader,
    check_charset,
    fit_line,
)
from scribeline.platform.storage import Location, resolve, sha256_bytes, write_atomic

logger = logging.getLogger(__name__)

VARIANTS = ("float32", "float16", "int8-dynamic", "int8")
# Variants that are dropped with a warning, not an error, when they fail the
# gate: full int8 quantises the LSTM's activations too, which a model may not
# survive.
OPTIONAL_VARIANTS = ("int8",)
FILE_STEM = "recognizer"
REPORT = "export.json"
REPORT_FORMAT = "scribeline-export-v1"

# 0.5 CER points: a change a reader could notice (~75 more character errors on
# 500 lines of ~30 characters); the quantised variants measured move the CER by
# under 0.1 point.
CER_TOLERANCE = 0.005
# Largest absolute per-step probability difference to the Keras model: ~3x the
# largest measured (the table in the module docstring).
PROB_TOLERANCE = {
    "float32": 1e-4,
    "float16": 0.01,
    "int8-dynamic": 0.35,
    "int8": 0.35,
}
# Train-split lines that calibrate full int8's activation ranges: TFLite's
# guidance is ~100-500 samples; 200 take a few seconds on one core.
REPRESENTATIVE_LINES = 200
# The latency figure is per line with one interpreter thread (a phone's share).
LATENCY_THREADS = 1
# Lines whose outputs must match bit for bit after the metadata is embedded.
EMBED_CHECK_LINES = 8
KERAS_BATCH = 64

# Builtin ops that mean the export went wrong even though they are builtin.
REJECTED_BUILTINS = {
    "WHILE": "a WHILE loop: an LSTM was not fused into a sequence-LSTM op",
    "CALL_ONCE": "variable initialisers: the weights were not frozen",
    "VAR_HANDLE": "resource variables: the weights were not frozen",
    "READ_VARIABLE": "resource variables: the weights were not frozen",
    "ASSIGN_VARIABLE": "resource variables: the weights were not frozen",
}


class ExportError(ScribelineError):
    """A variant cannot be exported, or failed the gate; names both."""

    def __init__(self, variant: str | None, reason: str) -> None:
        self.variant = variant
        self.reason = reason
        where = f"the {variant} TFLite model" if variant else "TFLite export"
        super().__init__(f"{where} failed: {reason}")


class UnsupportedOpsError(ExportError):
    """The flatbuffer holds ops the plain TFLite runtime cannot run."""


class ParityError(ExportError):
    """The variant does not read like the Keras model."""


# --------------------------------------------------------------------------
# Ops in a flatbuffer
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class OpList:
    """The operators of a ``.tflite`` file, read from its flatbuffer."""

    counts: dict[str, int]  # op name (builtin, or the custom code) -> uses
    custom: tuple[str, ...]  # custom op codes (Flex ops are custom ops)
    subgraphs: int


@functools.cache
def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    ops = schema.BuiltinOperator
    return {
        value: name
        for name, value in vars(ops).items()
        if not name.startswith("_") and isinstance(value, int)
    }


def list_ops(content: bytes) -> OpList:
    """Every operator used by every subgraph of a ``.tflite`` flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    if len(content) < 8 or content[4:8] != TFLITE_IDENTIFIER:
        raise ExportError(None, "the converter's output is not a TFLite flatbuffer")
    model = schema.Model.GetRootAs(content, 0)
    names, custom = [], set()
    builtins = _builtin_names()
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live in BuiltinCode; the deprecated int8 field holds
        # 127 (PLACEHOLDER_FOR_GREATER_OP_CODES) for them.
        number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = builtins.get(number, f"BUILTIN_{number}")
        if name == "CUSTOM":
            name = (code.CustomCode() or b"?").decode()
            custom.add(name)
        names.append(name)
    counts: Counter[str] = Counter()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for j in range(graph.OperatorsLength()):
            counts[names[graph.Operators(j).OpcodeIndex()]] += 1
    return OpList(
        dict(sorted(counts.items())), tuple(sorted(custom)), model.SubgraphsLength()
    )


def check_ops(variant: str, ops: OpList, lstm_directions: int) -> None:
    """Raise ``UnsupportedOpsError`` unless ``ops`` are builtin ops a plain
    TFLite runtime runs, with one fused sequence-LSTM op per LSTM direction."""
    listing = ", ".join(f"{name} x{n}" for name, n in ops.counts.items())
    if ops.custom:
        flex = [c for c in ops.custom if c.startswith("Flex")]
        kind = (
            "TensorFlow (Flex) ops, which need the Flex delegate that neither "
            "ai_edge_litert nor the TensorFlow wheel ships"
            if flex
            else "custom ops the plain TFLite runtime does not have"
        )
        raise UnsupportedOpsError(
            variant, f"it needs {', '.join(ops.custom)}: {kind}. Ops: {listing}."
        )
    for name, why in REJECTED_BUILTINS.items():
        if name in ops.counts:
            raise UnsupportedOpsError(
                variant, f"it holds {name}, {why}. Ops: {listing}."
            )
    fused = ops.counts.get("UNIDIRECTIONAL_SEQUENCE_LSTM", 0)
    fused += 2 * ops.counts.get("BIDIRECTIONAL_SEQUENCE_LSTM", 0)  # both directions
    if fused < lstm_directions:
        raise UnsupportedOpsError(
            variant,
            f"the model has {lstm_directions} LSTM directions but the file holds "
            f"{fused} fused sequence-LSTM ops. Ops: {listing}.",
        )


# --------------------------------------------------------------------------
# The export graph: Keras layers, with each LSTM as a fusable function
# --------------------------------------------------------------------------


def _lstm_function(go_backwards: bool) -> Callable[..., Any]:
    """A ``tf.function`` the TFLite converter replaces by one fused
    ``UNIDIRECTIONAL_SEQUENCE_LSTM`` op.

    The converter's Keras-LSTM fusion matches functions whose
    ``api_implements`` attribute starts with ``lstm_`` and whose signature is
    ``(inputs, init_h, init_c, kernel, recurrent_kernel, bias) -> (last output,
    outputs, h, c, runtime)``, reading ``time_major`` and ``go_backwards``
    from attributes. Only ``outputs`` may be used. The body is a plain LSTM
    (Keras gate order i, f, c, o) so the SavedModel computes the same thing in
    TensorFlow: ``export_graph`` checks it against Keras before converting.
    """
    import tensorflow as tf

    def standard_lstm(inputs, init_h, init_c, kernel, recurrent_kernel, bias):
        x = tf.reverse(inputs, [1]) if go_backwards else inputs
        projected = tf.einsum("bti,ij->tbj", x, kernel) + bias

        def step(carry: Any, z_x: Any) -> Any:
            h, c = carry
            z = z_x + tf.matmul(h, recurrent_kernel)
            i, f, g, o = tf.split(z, 4, axis=1)
            c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            return tf.sigmoid(o) * tf.tanh(c), c

        hs, cs = tf.scan(step, projected, initializer=(init_h, init_c))
        outputs = tf.transpose(hs, [1, 0, 2])
        return outputs[:, -1], outputs, hs[-1], cs[-1], tf.constant(0.0)

    return tf.function(
        standard_lstm,
        autograph=False,
        experimental_attributes={
            "api_implements": f"lstm_{uuid.uuid4().hex}",
            "api_preferred_device": "CPU",
            "time_major": False,
            "go_backwards": go_backwards,
        },
    )


def _fused_lstm(layer: Any, batch: int) -> Callable[[Any], Any]:
    """One Keras LSTM layer (return_sequences) as the fusable function."""
    import tensorflow as tf

    cell = layer.cell
    unsupported = {
        "activation": getattr(cell.activation, "__name__", "") != "tanh",
        "recurrent_activation": getattr(cell.recurrent_activation, "__name__", "")
        != "sigmoid",
        "use_bias=False": not cell.use_bias,
        "return_sequences=False": not layer.return_sequences,
        "stateful": layer.stateful,
    }
    bad = [name for name, found in unsupported.items() if found]
    if bad:
        raise ExportError(
            None,
            f"LSTM layer {layer.name!r} uses {', '.join(bad)}; the fused TFLite LSTM "
            "supports tanh/sigmoid LSTMs with a bias that return sequences.",
        )
    kernel = tf.constant(np.asarray(cell.kernel, np.float32))
    recurrent = tf.constant(np.asarray(cell.recurrent_kernel, np.float32))
    bias = tf.constant(np.asarray(cell.bias, np.float32))
    function = _lstm_function(layer.go_backwards)
    units = cell.units

    def call(x: Any) -> Any:
        zeros = tf.zeros([batch, units], tf.float32)
        outputs = function(x, zeros, zeros, kernel, recurrent, bias)[1]
        # A backward LSTM emits its outputs in the order it read them.
        return tf.reverse(outputs, [1]) if layer.go_backwards else outputs

    return call


def export_graph(model: Any, batch: int = 1) -> tuple[Callable[[Any], Any], int]:
    """``image -> probs`` for ``model`` (a chain of layers, e.g.
    ``platform.model.inference_model``), with LSTMs fusable; and the number of LSTM
    directions it holds."""
    import keras
    import tensorflow as tf

    steps: list[Callable[[Any], Any]] = []
    directions = 0
    previous = model.inputs[0]
    for layer in model.layers[1:]:
        if layer.input is not previous:
            raise ExportError(
                None,
                f"layer {layer.name!r} does not read the output of the layer before "
                "it; the exporter handles a chain of layers (image -> probs) only.",
            )
        previous = layer.output
        if isinstance(layer, keras.layers.Bidirectional):
            if layer.merge_mode != "concat":
                raise ExportError(
                    None,
                    f"Bidirectional layer {layer.name!r} merges with "
                    f"{layer.merge_mode!r}; the exporter supports 'concat'.",
                )
            pair = [_fused_lstm(layer.forward_layer, batch)]
            pair.append(_fused_lstm(layer.backward_layer, batch))
            steps.append(lambda x, pair=pair: tf.concat([f(x) for f in pair], -1))
            directions += 2
        elif isinstance(layer, keras.layers.LSTM):
            steps.append(_fused_lstm(layer, batch))
            directions += 1
        elif isinstance(layer, keras.layers.RNN):
            raise ExportError(
                None,
                f"recurrent layer {layer.name!r} ({type(layer).__name__}) has no "
                "fused TFLite op here; only LSTM layers are exported.",
            )
        else:
            steps.append(functools.partial(layer, training=False))

    def forward(image: Any) -> Any:
        x = image
        for step in steps:
            x = step(x)
        return x

    return forward, directions


def save_for_conversion(
    model: Any, input_shape: list[int], folder: str, check: np.ndarray
) -> int:
    """Write ``model``'s export graph as a SavedModel; return its LSTM directions.

    ``check``: one input ``[1, H, W, 1]`` on which the graph must compute what
    the Keras model computes (it is a rewrite of the LSTMs).
    """
    import keras
    import tensorflow as tf

    forward, directions = export_graph(model, batch=input_shape[0])
    expected = np.asarray(model(check, training=False))
    got = np.asarray(forward(tf.constant(check)))
    if not np.allclose(got, expected, atol=1e-4):
        raise ExportError(
            None,
            "the export graph computes other probabilities than the Keras model "
            f"(largest difference {np.abs(got - expected).max():.2e}); this is a "
            "bug in the exporter.",
        )
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serve",
        fn=forward,
        input_signature=[tf.TensorSpec(input_shape, tf.float32, name="image")],
    )
    archive.write_out(folder, verbose=False)
    return directions


# --------------------------------------------------------------------------
# Converting one variant
# --------------------------------------------------------------------------


def convert(
    saved_model: str,
    variant: str,
    representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
) -> bytes:
    """The ``.tflite`` bytes of ``variant``, builtin ops only (no Flex)."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8-dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant == "int8":
        if representative is None:
            raise ExportError(variant, "full int8 needs representative lines")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        # int8 kernels only (the input and output stay float32, quantised and
        # dequantised at the edges, so every variant is fed the same way).
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif variant != "float32":
        raise SettingsError(f"unknown variant {variant!r}; use {', '.join(VARIANTS)}.")
    try:
        return bytes(converter.convert())
    except Exception as err:  # the converter raises ConverterError and others
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise ExportError(variant, f"the TFLite converter failed: {first}") from err


def embed_metadata(content: bytes, meta: dict[str, Any]) -> bytes:
    """``content`` with ``meta`` as JSON in the flatbuffer's ``metadata`` list
    (name ``scribeline``), replacing an earlier entry of that name."""
    from ai_edge_litert import schema_py_generated as schema

    def edit(model: Any) -> None:
        entries = [m for m in (model.metadata or []) if _text(m.name) != METADATA_NAME]
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name = METADATA_NAME
        entry.buffer = len(model.buffers) - 1
        model.metadata = [*entries, entry]

    return _rewrite(content, edit)


def unclip_lstm_cells(content: bytes) -> tuple[bytes, int]:
    """``content`` with the cell clip of every fused LSTM op set to 0 (none).

    The converter's Keras-LSTM fusion sets ``cell_clip=10``; Keras does not
    clip, and trained cell states do pass 10 (~49 in the real-data model of
    the README), which moved float32 probabilities by up to 5e-3. With the
    clip off, float32 matches Keras to ~1e-6. Returns the op count changed.
    """
    from ai_edge_litert import schema_py_generated as schema

    changed = 0

    def edit(model: Any) -> None:
        nonlocal changed
        kind = schema.BuiltinOptions.UnidirectionalSequenceLSTMOptions
        for graph in model.subgraphs or []:
            for op in graph.operators or []:
                if op.builtinOptionsType == kind and op.builtinOptions.cellClip:
                    op.builtinOptions.cellClip = 0.0
                    changed += 1

    rewritten = _rewrite(content, edit)
    return (rewritten if changed else content), changed


def _rewrite(content: bytes, edit: Callable[[Any], None]) -> bytes:
    """Unpack a flatbuffer with the schema's object API, ``edit`` it, repack."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    edit(model)
    builder = flatbuffers.Builder(len(content) + 65536)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def _text(value: str | bytes | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


# --------------------------------------------------------------------------
# The export
# --------------------------------------------------------------------------


@dataclass
class ParityLines:
    """Held-out lines fitted to the model input, with their truths."""

    lines: np.ndarray  # [n, H, W] uint8, ink 255
    truths: list[str]
    dataset_url: str
    dataset_version: str


def export_tflite(
    checkpoint_url: str,
    output_url: str,
    dataset_url: str | None = None,
    variants: tuple[str, ...] | list[str] = VARIANTS,
    parity_lines: int = 500,
    storage_options: dict[str, Any] | None = None,
    *,
    checkpoint: str | None = None,
    representative_lines: int = REPRESENTATIVE_LINES,
) -> dict[str, Any]:
    """Export the checkpoint at ``checkpoint_url`` to ``output_url``; return the
    report (also written to ``<output_url>/export.json``).

    Raises ``ExportError`` (naming the variant and the reason) when a required
    variant fails the gate, ``CharsetMismatchError`` when the dataset's
    charset is not the checkpoint's, ``FileNotFoundError`` for a missing
    checkpoint or dataset. Nothing is written unless every required variant
    passes.
    """
    from scribeline.platform.recognizer import Recognizer

    started = time.perf_counter()
    wanted = check_variants(variants)
    if parity_lines < 1:
        raise SettingsError(f"parity_lines must be at least 1, got {parity_lines}.")

    # Load: the checkpoint, the held-out lines, the Keras reference.
    reader = Recognizer.load(checkpoint_url, storage_options, checkpoint)
    geometry = reader.geometry
    input_shape = [1, geometry.height, geometry.width, 1]
    held_out = load_parity_lines(
        reader, dataset_url, parity_lines, storage_options, checkpoint_url
    )
    keras_probs = _keras_probabilities(reader, held_out.lines)
    keras_texts = greedy_decode(keras_probs, reader.charset)
    keras_eval = evaluate_texts("test", held_out.truths, keras_texts)
    logger.info(
        "Keras model %s: CER %.4f WER %.4f on %d test lines of %s",
        reader.meta.get("name", checkpoint_url),
        keras_eval.cer,
        keras_eval.wer,
        keras_eval.lines,
        held_out.dataset_url,
    )
    base_meta = _base_metadata(reader, checkpoint_url, held_out, input_shape)
    representative = None
    if "int8" in wanted:
        representative = _representative(
            reader, held_out.dataset_url, representative_lines, storage_options
        )

    # Convert and gate every variant; nothing is written before all pass.
    from scribeline.platform.model import inference_model

    results: dict[str, dict[str, Any]] = {}
    files: dict[str, tuple[bytes, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="scribeline-export-") as folder:
        check = held_out.lines[:1, :, :, None].astype(np.float32) / 255.0
        directions = save_for_conversion(
            inference_model(reader.model), input_shape, folder, check
        )
        for variant in wanted:
            try:
                content, meta = _export_variant(
                    folder,
                    variant,
                    representative,
                    base_meta,
                    held_out,
                    keras_probs,
                    keras_texts,
                    keras_eval,
                    directions,
                )
            except ExportError as err:
                if variant not in OPTIONAL_VARIANTS:
                    raise
                logger.warning("dropped the %s model: %s", variant, err.reason)
                results[variant] = {"status": "dropped", "reason": err.reason}
                continue
            files[variant] = (content, meta)
            results[variant] = {"status": "kept", **_summary(meta)}

    # Write: each model and its JSON, then the report.
    root = resolve(output_url, storage_options)
    for variant, (content, meta) in files.items():
        name = f"{FILE_STEM}-{variant}"
        write_atomic(root.child(f"{name}.tflite"), content)
        write_atomic(root.child(f"{name}.json"), json.dumps(meta, indent=2).encode())
        results[variant]["file"] = root.child(f"{name}.tflite").url
    for variant, result in results.items():
        if result["status"] == "dropped":
            _remove_stale(root, variant)
    report = {
        "format": REPORT_FORMAT,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scribeline_version": __version__,
        "output": root.url,
        "checkpoint": base_meta["checkpoint"],
        "dataset": {"url": held_out.dataset_url, "version": held_out.dataset_version},
        "charset": reader.charset,
        "input_shape": input_shape,
        "parity": {
            "split": "test",
            "lines": len(held_out.truths),
            "cer_tolerance": CER_TOLERANCE,
            "prob_tolerance": {v: PROB_TOLERANCE[v] for v in wanted},
        },
        "keras": {
            "cer": round(keras_eval.cer, 6),
            "wer": round(keras_eval.wer, 6),
            "lines": keras_eval.lines,
            "parameters": int(reader.model.count_params()),
        },
        "variants": results,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_atomic(root.child(REPORT), json.dumps(report, indent=2).encode())
    logger.info(
        "exported %s to %s in %.1f s",
        ", ".join(f"{v} ({r['status']})" for v, r in results.items()),
        root.url,
        report["seconds"],
    )
    return report


def check_variants(variants: tuple[str, ...] | list[str]) -> list[str]:
    """The variants asked for, in order, once each; ``SettingsError`` names
    unknown ones."""
    wanted = list(dict.fromkeys(variants))
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown or not wanted:
        raise SettingsError(
            f"unknown variant(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}."
        )
    return wanted


def load_parity_lines(
    reader: Any,
    dataset_url: str | None,
    count: int,
    storage_options: dict[str, Any] | None,
    checkpoint_url: str = "the checkpoint",
) -> ParityLines:
    """The first ``count`` test-split lines of the checkpoint's dataset version
    (or ``dataset_url``), fitted to the model input."""
    from scribeline.platform.dataset import iter_rows, read_manifest

    trained_on = reader.meta.get("dataset", {})
    url = dataset_url or trained_on.get("url")
    if not url:
        raise ExportError(
            None,
            f"{checkpoint_url} does not say which dataset it was trained on; pass "
            "--dataset URL for the held-out lines.",
        )
    try:
        manifest = read_manifest(url, storage_options)
    except FileNotFoundError as err:
        hint = "" if dataset_url else " (the dataset the checkpoint was trained on)"
        raise FileNotFoundError(
            f"{err} The parity check reads held-out lines from {url}{hint}; pass "
            "--dataset URL to use another copy of that dataset version."
        ) from err
    check_charset(manifest, reader.charset, url, f"the checkpoint {checkpoint_url}")
    version = manifest["dataset_version"]
    if version != reader.meta.get("dataset_version"):
        logger.warning(
            "parity lines come from dataset version %s, the checkpoint was trained "
            "on %s: the lines may not be held out from training",
            version,
            reader.meta.get("dataset_version"),
        )
    height, width = reader.geometry.height, reader.geometry.width
    lines, truths = [], []
    for row in iter_rows(url, "test", count, storage_options):
        lines.append(fit_line(row["image"], height, width, row["sample_id"]))
        truths.append(row["text"])
    if len(truths) < count:
        raise ExportError(
            None,
            f"the test split of {url} has {len(truths)} lines; the parity check "
            f"needs {count}. Generate a dataset version with more test lines, or "
            f"pass --parity-lines {len(truths) or 1} (a weaker check).",
        )
    return ParityLines(np.stack(lines), truths, url, version)


def _keras_probabilities(reader: Any, lines: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            reader.probabilities(lines[i : i + KERAS_BATCH])
            for i in range(0, len(lines), KERAS_BATCH)
        ]
    )


def _representative(
    reader: Any,
    dataset_url: str,
    count: int,
    storage_options: dict[str, Any] | None,
) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Train-split lines for full int8 calibration (never the test lines)."""
    from scribeline.platform.dataset import iter_rows

    height, width = reader.geometry.height, reader.geometry.width
    lines = [
        fit_line(row["image"], height, width)
        for row in iter_rows(dataset_url, "train", count, storage_options)
    ]
    if not lines:
        raise ExportError("int8", f"the train split of {dataset_url} is empty")

    def samples() -> Iterator[list[np.ndarray]]:
        for line in lines:
            yield [line[None, :, :, None].astype(np.float32) / 255.0]

    return samples


def _base_metadata(
    reader: Any, checkpoint_url: str, held_out: ParityLines, input_shape: list[int]
) -> dict[str, Any]:
    import tensorflow as tf

    from scribeline.platform.model import model_time_steps

    steps = model_time_steps(reader.model)
    return {
        "format": METADATA_FORMAT,
        "charset": reader.charset,
        "blank_index": reader.meta.get("blank_index", len(reader.charset)),
        "input": {
            "name": "image",
            "shape": input_shape,
            "dtype": "float32",
            "layout": "NHWC: batch 1, height, width, 1 channel",
        },
        "output": {
            "name": "probs",
            "shape": [1, steps, len(reader.charset) + 1],
            "dtype": "float32",
            "meaning": "softmax per time step over the charset's classes in order, "
            "then the CTC blank (last)",
        },
        "decoding": "greedy CTC: argmax per step, merge repeats, drop the blank",
        "normalisation": {
            "pixels": "float32 = uint8 / 255: ink 1.0, background 0.0",
            "polarity": "dark ink on light paper (border median > 127) is inverted",
            "contrast": "background subtracted, darkest ink stretched to 1.0",
            "height": f"scaled to {input_shape[1]} px, aspect ratio kept",
            "width": f"padded on the right to {input_shape[2]} px; wider lines "
            "scaled down as a whole to fit",
            "reference": "scribeline.platform.predict.fit_line",
        },
        "stateful_lstm": "the fused LSTM ops keep state in variable tensors: reset "
        "them before every line (ai_edge_litert: reset_all_variables(); Android: "
        "Interpreter.resetVariableTensors())",
        "dataset_version": reader.meta.get("dataset_version"),
        "dataset": reader.meta.get("dataset", {}).get("url"),
        "checkpoint": {
            "url": checkpoint_url,
            "name": reader.meta.get("name"),
            "step": reader.meta.get("step"),
        },
        "scribeline_version": __version__,
        "tensorflow_version": tf.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _export_variant(
    folder: str,
    variant: str,
    representative: Callable[[], Iterator[list[np.ndarray]]] | None,
    base_meta: dict[str, Any],
    held_out: ParityLines,
    keras_probs: np.ndarray,
    keras_texts: list[str],
    keras_eval: Any,
    lstm_directions: int,
) -> tuple[bytes, dict[str, Any]]:
    """Convert, check the ops, run the parity gate, embed the metadata."""
    started = time.perf_counter()
    content, _ = unclip_lstm_cells(convert(folder, variant, representative))
    ops = list_ops(content)
    check_ops(variant, ops, lstm_directions)
    meta = {**base_meta, "variant": variant, "ops": ops.counts}

    # Run it on every held-out line, one thread, timing each line.
    try:
        tflite = TFLiteReader(content, meta, f"the {variant} model", LATENCY_THREADS)
    except ScribelineError as err:
        raise ExportError(variant, f"it does not run: {err}") from err
    probs, seconds = [], []
    for line in held_out.lines:
        tick = time.perf_counter()
        probs.append(tflite.run(line))
        seconds.append(time.perf_counter() - tick)
    probs_array = np.stack(probs)
    if probs_array.shape != keras_probs.shape:
        raise ExportError(
            variant,
            f"its output has shape {list(probs_array.shape[1:])} per line, the Keras "
            f"model's {list(keras_probs.shape[1:])}",
        )
    texts = greedy_decode(probs_array, tflite.charset)
    result = evaluate_texts("test", held_out.truths, texts)
    diff = np.abs(probs_array - keras_probs)
    metrics = {
        "split": "test",
        "lines": result.lines,
        "keras": {"cer": round(keras_eval.cer, 6), "wer": round(keras_eval.wer, 6)},
        "tflite": {"cer": round(result.cer, 6), "wer": round(result.wer, 6)},
        "cer_delta": round(result.cer - keras_eval.cer, 6),
        "max_prob_diff": float(f"{diff.max():.3g}"),
        "mean_prob_diff": float(f"{diff.mean():.3g}"),
        "prob_tolerance": PROB_TOLERANCE[variant],
        "cer_tolerance": CER_TOLERANCE,
        "same_text_lines": sum(a == b for a, b in zip(texts, keras_texts, strict=True)),
    }
    latency = {
        "median_ms": round(1000 * float(np.median(seconds)), 3),
        "p90_ms": round(1000 * float(np.percentile(seconds, 90)), 3),
        "threads": LATENCY_THREADS,
        "lines": len(seconds),
    }
    meta.update(metrics=metrics, latency=latency)

    # The gate.
    if abs(result.cer - keras_eval.cer) > CER_TOLERANCE:
        raise ParityError(
            variant,
            f"its CER on {result.lines} test lines is {result.cer:.4f}, the Keras "
            f"model's {keras_eval.cer:.4f}: {100 * abs(metrics['cer_delta']):.2f} "
            f"points apart, more than the {100 * CER_TOLERANCE:.1f} allowed",
        )
    if diff.max() > PROB_TOLERANCE[variant]:
        raise ParityError(
            variant,
            f"its per-step probabilities differ from the Keras model's by up to "
            f"{diff.max():.3g} on {result.lines} test lines, more than the "
            f"{PROB_TOLERANCE[variant]} allowed for {variant}",
        )

    # Embed the metadata; the rewritten file must compute exactly the same.
    final = embed_metadata(content, meta)
    meta.update(bytes=len(final), sha256=sha256_bytes(final))
    check_reader = TFLiteReader(final, meta, f"the {variant} model", LATENCY_THREADS)
    for line, expected in zip(
        held_out.lines[:EMBED_CHECK_LINES], probs[:EMBED_CHECK_LINES], strict=False
    ):
        if not np.array_equal(check_reader.run(line), expected):
            raise ExportError(
                variant,
                "embedding the metadata changed the model's outputs; this is a bug",
            )
    logger.info(
        "%s: %d bytes, CER %.4f (Keras %.4f), max prob diff %.3g, %.2f ms/line, %.1f s",
        variant,
        len(final),
        result.cer,
        keras_eval.cer,
        diff.max(),
        latency["median_ms"],
        time.perf_counter() - started,
    )
    return final, meta


def _summary(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "bytes": meta["bytes"],
        "sha256": meta["sha256"],
        "metrics": meta["metrics"],
        "latency": meta["latency"],
        "ops": meta["ops"],
    }


def _remove_stale(root: Location, variant: str) -> None:
    """A model from an earlier export of a variant dropped now is removed: it
    would pass for this export's."""
    for suffix in (".tflite", ".json"):
        with contextlib.suppress(FileNotFoundError):
            root.fs.rm(root.child(f"{FILE_STEM}-{variant}{suffix}").path)
