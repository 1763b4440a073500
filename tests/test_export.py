"""TFLite export, the parity gate, predict, and the pipeline end to end.

A tiny dataset from the embedded generator and a tiny model trained a few steps
(module fixtures) keep every export to seconds on two CPU cores. Such a model
reads almost nothing; parity is checked on probabilities, which it has.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from scribeline.platform import export as export_module
from scribeline.platform.dataset import generate, iter_rows
from scribeline.platform.export import (
    ExportError,
    ParityError,
    UnsupportedOpsError,
    check_ops,
    export_tflite,
    list_ops,
)
from scribeline.platform.model import CharsetMismatchError
from scribeline.platform.predict import (
    ImageError,
    ModelMetadataError,
    TFLiteReader,
    embedded_metadata,
    fit_line,
    read_png,
)
from scribeline.platform.recognizer import Recognizer
from scribeline.platform.settings import GenerateSettings
from scribeline.platform.train_settings import TrainSettings
from scribeline.platform.training import train

TINY_MODEL = {"c1": 4, "c3": 8, "c5": 16, "lstm_units": 8, "dropout": 0.1}
TEST_LINES = 20  # 5% of 400
# What the float32 file of the CNN + 2 x BiLSTM network holds, and nothing else:
# each LSTM direction one fused op, the backward ones between two reverses.
FLOAT32_OPS = {
    "CONCATENATION": 2,
    "CONV_2D": 2,
    "FULLY_CONNECTED": 2,
    "MAX_POOL_2D": 2,
    "RESHAPE": 1,
    "REVERSE_V2": 4,
    "SOFTMAX": 1,
    "STRIDED_SLICE": 1,
    "TRANSPOSE": 1,
    "UNIDIRECTIONAL_SEQUENCE_LSTM": 4,
}

cli = CliRunner()


def scribeline(*args: str):
    from scribeline.export_cmd import register
    from scribeline.main import app

    register(app)
    return cli.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(dataset URL, checkpoint URL): 400 embedded lines, a tiny model, 8 steps."""
    root = tmp_path_factory.mktemp("export")
    dataset = str(root / "ds")
    generate(GenerateSettings(output=dataset, lines=400, shard_size=200))
    output = str(root / "model")
    train(
        TrainSettings(
            dataset=dataset,
            output=output,
            max_steps=8,
            batch_size=16,
            learning_rate=3e-3,
            warmup_steps=0,
            checkpoint_every=100,
            eval_lines=10,
            shuffle_buffer=64,
            model=TINY_MODEL,
        )
    )
    return dataset, output


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """(report, folder): all four variants of the tiny model."""
    folder = tmp_path_factory.mktemp("tflite")
    report = export_tflite(trained[1], str(folder), parity_lines=TEST_LINES)
    return report, folder


@pytest.fixture(scope="module")
def keras(trained):
    return Recognizer.load(trained[1])


def rows_of(dataset: str, split: str = "test", count: int | None = None):
    return list(iter_rows(dataset, split, count))


# --------------------------------------------------------------------------
# Export: ops, interpreter, parity, variants, metadata
# --------------------------------------------------------------------------


def test_export_writes_every_variant_with_its_metadata(exported, trained):
    report, folder = exported
    assert report["parity"]["lines"] == TEST_LINES
    assert set(report["variants"]) == {"float32", "float16", "int8-dynamic", "int8"}
    for variant, entry in report["variants"].items():
        model = folder / f"recognizer-{variant}.tflite"
        if entry["status"] == "dropped":  # only full int8 may be
            assert variant == "int8" and entry["reason"]
            assert not model.exists()
            continue
        meta = json.loads(model.with_suffix(".json").read_text())
        manifest = json.loads((Path(trained[0]) / "manifest.json").read_text())
        assert meta["charset"] == manifest["charset"]["chars"]
        assert meta["blank_index"] == len(meta["charset"])
        assert meta["input"]["shape"] == [1, 28, 896, 1]
        assert meta["dataset_version"] == manifest["dataset_version"]
        assert meta["variant"] == variant and meta["bytes"] == model.stat().st_size
        assert meta["normalisation"]["pixels"].startswith("float32 = uint8 / 255")
        metrics = meta["metrics"]
        assert metrics["lines"] == TEST_LINES
        assert {"cer", "wer"} <= set(metrics["keras"]) & set(metrics["tflite"])
        assert abs(metrics["cer_delta"]) <= 0.005
        assert metrics["max_prob_diff"] <= export_module.PROB_TOLERANCE[variant]
        assert meta["latency"]["threads"] == 1 and meta["latency"]["median_ms"] > 0
        # The same JSON rides inside the flatbuffer (less bytes and sha256).
        inside = embedded_metadata(model.read_bytes())
        assert inside == {k: v for k, v in meta.items() if k not in ("bytes", "sha256")}
    sizes = {v: e["bytes"] for v, e in report["variants"].items() if "bytes" in e}
    assert sizes["float16"] < sizes["float32"]
    assert json.loads((folder / "export.json").read_text()) == report


def test_only_builtin_ops_with_fused_lstms(exported):
    report, folder = exported
    ops = list_ops((folder / "recognizer-float32.tflite").read_bytes())
    assert ops.counts == FLOAT32_OPS
    assert ops.custom == () and ops.subgraphs == 1
    for variant, entry in report["variants"].items():
        if entry["status"] != "kept":
            continue
        ops = list_ops((folder / f"recognizer-{variant}.tflite").read_bytes())
        assert ops.counts == entry["ops"]
        assert ops.counts["UNIDIRECTIONAL_SEQUENCE_LSTM"] == 4
        assert not {"WHILE", "VAR_HANDLE", "READ_VARIABLE"} & set(ops.counts)
        extra = set(ops.counts) - set(FLOAT32_OPS) - {"DEQUANTIZE", "QUANTIZE"}
        assert not extra, extra


def test_the_gate_rejects_while_loops_and_flex_ops(keras, tmp_path):
    """Keras 3's own LSTM converts to a WHILE loop (fixed batch) or to Flex
    TensorList ops (dynamic batch); neither passes."""
    import tensorflow as tf

    from scribeline.platform.model import inference_model

    model = inference_model(keras.model)
    fixed = str(tmp_path / "fixed")
    model.export(fixed, input_signature=[tf.TensorSpec([1, 28, 896, 1])], verbose=False)
    looped = list_ops(tf.lite.TFLiteConverter.from_saved_model(fixed).convert())
    assert "WHILE" in looped.counts and looped.subgraphs > 1
    with pytest.raises(
        UnsupportedOpsError, match="float32 TFLite model failed: it holds WHILE"
    ):
        check_ops("float32", looped, lstm_directions=4)

    dynamic = str(tmp_path / "dynamic")
    model.export(dynamic, verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(dynamic)
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS,
        tf.lite.OpsSet.SELECT_TF_OPS,
    ]
    flex = list_ops(converter.convert())
    assert any(name.startswith("FlexTensorList") for name in flex.custom)
    with pytest.raises(UnsupportedOpsError, match=r"needs Flex.*Flex delegate"):
        check_ops("int8", flex, lstm_directions=4)


def test_interpreter_reads_like_keras_on_the_same_lines(exported, keras, trained):
    _, folder = exported
    reader = TFLiteReader.load(folder / "recognizer-float32.tflite")
    rows = rows_of(trained[0])
    images = np.stack([r["image"] for r in rows])
    expected = keras.probabilities(images)
    got = reader.probabilities(images)
    np.testing.assert_allclose(
        got, expected, atol=export_module.PROB_TOLERANCE["float32"]
    )
    assert reader.predict(images) == keras.read(images)
    # The fused LSTMs keep state between invocations; the reader resets it.
    again = reader.probabilities(images[:1])
    np.testing.assert_array_equal(again[0], got[0])


def test_each_quantized_variant_passes_the_gate(exported, keras, trained):
    report, folder = exported
    rows = rows_of(trained[0], count=6)
    images = np.stack([r["image"] for r in rows])
    expected = keras.probabilities(images)
    for variant in ("float16", "int8-dynamic", "int8"):
        entry = report["variants"][variant]
        if entry["status"] == "dropped":
            assert variant == "int8"
            assert re.search(
                r"CER on \d+ test lines|probabilities differ", entry["reason"]
            )
            continue
        reader = TFLiteReader.load(folder / f"recognizer-{variant}.tflite")
        tolerance = export_module.PROB_TOLERANCE[variant]
        assert np.abs(reader.probabilities(images) - expected).max() <= tolerance
        assert entry["bytes"] < report["variants"]["float32"]["bytes"]


def test_full_int8_failing_the_gate_is_dropped_with_the_reason(
    trained, tmp_path, monkeypatch, caplog
):
    monkeypatch.setitem(export_module.PROB_TOLERANCE, "int8", 0.0)
    stale = tmp_path / "recognizer-int8.tflite"
    stale.write_bytes(b"an int8 model from an earlier export")
    report = export_tflite(
        trained[1], str(tmp_path), variants=("float32", "int8"), parity_lines=TEST_LINES
    )
    entry = report["variants"]["int8"]
    assert entry["status"] == "dropped"
    assert re.search(
        r"CER on \d+ test lines|probabilities differ .* than the 0.0 allowed",
        entry["reason"],
    )
    assert "dropped the int8 model" in caplog.text
    assert not stale.exists()
    assert report["variants"]["float32"]["status"] == "kept"


def test_a_required_variant_failing_the_gate_fails_the_export(
    trained, tmp_path, monkeypatch
):
    monkeypatch.setitem(export_module.PROB_TOLERANCE, "float16", 0.0)
    out = tmp_path / "out"
    with pytest.raises(
        ParityError,
        match=r"the float16 TFLite model failed: its per-step probabilities differ",
    ):
        export_tflite(
            trained[1], str(out), variants=("float32", "float16"), parity_lines=5
        )
    assert not out.exists()  # nothing written


def test_too_few_test_lines_for_the_parity_check(trained, tmp_path):
    with pytest.raises(ExportError, match=r"has 20 lines; the parity check needs 500"):
        export_tflite(trained[1], str(tmp_path), variants=("float32",))


def test_export_to_s3_and_read_back(trained, s3_server, s3_bucket):
    options = s3_server.storage_options
    out = f"{s3_bucket}/tflite"
    report = export_tflite(
        trained[1],
        out,
        variants=("float32",),
        parity_lines=TEST_LINES,
        storage_options=options,
    )
    assert report["variants"]["float32"]["file"] == f"{out}/recognizer-float32.tflite"
    reader = TFLiteReader.load(f"{out}/recognizer-float32.tflite", options)
    image = rows_of(trained[0], count=1)[0]["image"]
    assert reader.predict([image]) == Recognizer.load(trained[1]).read(image[None])


# --------------------------------------------------------------------------
# Predict: PNGs from the generator, sizes, polarity
# --------------------------------------------------------------------------


def test_predict_on_generator_pngs_equals_keras(exported, keras, trained, tmp_path):
    _, folder = exported
    pngs = tmp_path / "pngs"
    result = scribeline(
        "preview", "--dataset", trained[0], "--split", "test", "--count", "4",
        "--out", tmp_path / "grid.png", "--png-dir", pngs,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted(pngs.glob("*.png"))
    assert len(files) == 4
    model = folder / "recognizer-float32.tflite"
    result = scribeline("predict", *files, "--model", model)
    assert result.exit_code == 0, result.output
    printed = dict(line.split("\t") for line in result.stdout.splitlines())

    rows = {r["sample_id"]: r for r in rows_of(trained[0], count=4)}
    images = np.stack([rows[f.stem]["image"] for f in files])
    assert [printed[str(f)] for f in files] == keras.read(images)
    reader = TFLiteReader.load(model)
    np.testing.assert_allclose(
        reader.probabilities(files), keras.probabilities(images), atol=1e-4
    )
    single = scribeline("predict", files[0], "--model", model)
    assert single.stdout.strip() == keras.read(images[:1])[0]


def test_lines_narrower_wider_taller_and_dark_on_white(
    exported, keras, trained, tmp_path
):
    _, folder = exported
    reader = TFLiteReader.load(folder / "recognizer-float32.tflite")
    image = rows_of(trained[0], count=1)[0]["image"]
    ink = np.flatnonzero(image.max(axis=0))

    # Narrower: cropped after its last ink, dark ink on white paper.
    narrow = tmp_path / "narrow.png"
    Image.fromarray(255 - image[:, : ink[-1] + 1]).save(narrow)
    fitted = read_png(narrow, 28, 896)
    np.testing.assert_array_equal(fitted, image)  # padded back, polarity undone
    assert reader.predict([narrow]) == keras.read(image[None])

    # Wider: 1.5x the model width; scaled down as a whole, centred vertically.
    wide = np.concatenate([image, image[:, :448]], axis=1)
    wide_png = tmp_path / "wide.png"
    Image.fromarray(wide).save(wide_png)
    fitted = read_png(wide_png, 28, 896)
    assert fitted.shape == (28, 896)
    assert fitted[:4].max() == 0 and fitted[23:].max() == 0  # 19 px high, centred
    expected = np.asarray(
        Image.fromarray(wide).resize((896, 19), Image.Resampling.BILINEAR)
    )
    np.testing.assert_array_equal(fitted[4:23], expected)
    assert isinstance(reader.predict([wide_png])[0], str)

    # Taller: a 2x line is scaled back to the model height.
    tall = np.asarray(
        Image.fromarray(image).resize((1792, 56), Image.Resampling.NEAREST)
    )
    back = fit_line(tall, 28, 896)
    assert back.shape == (28, 896)
    assert np.abs(back.astype(int) - image).mean() < 8


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_not_a_png_and_empty_images(exported, tmp_path):
    _, folder = exported
    model = folder / "recognizer-float32.tflite"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes.png is not a PNG \(it starts with"):
        read_png(text)
    result = scribeline("predict", text, "--model", model)
    assert result.exit_code == 2 and "is not a PNG" in result.output

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match=r"is not a PNG \(it is empty \(0 bytes\)\)"):
        read_png(empty)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((28, 300), 255, np.uint8)).save(blank)
    with pytest.raises(ImageError, match=r"blank.png \(300x28 px\) holds no ink"):
        read_png(blank)
    result = scribeline("predict", blank, "--model", model)
    assert result.exit_code == 2 and "holds no ink" in result.output
    with pytest.raises(ImageError, match=r"is empty \(0x28 px\)"):
        fit_line(np.zeros((28, 0), np.uint8), 28, 896)
    with pytest.raises(FileNotFoundError, match="no line image at"):
        read_png(tmp_path / "missing.png")


def test_a_model_without_its_metadata(exported, keras, tmp_path):
    from scribeline.platform.export import convert, save_for_conversion
    from scribeline.platform.model import inference_model

    _, folder = exported
    # The converter's own output: no JSON beside it, nothing embedded.
    check = np.zeros((1, 28, 896, 1), np.float32)
    save_for_conversion(
        inference_model(keras.model), [1, 28, 896, 1], str(tmp_path / "sm"), check
    )
    plain = tmp_path / "plain.tflite"
    plain.write_bytes(convert(str(tmp_path / "sm"), "float32"))
    with pytest.raises(
        ModelMetadataError, match=r"plain.tflite has no scribeline metadata"
    ):
        TFLiteReader.load(plain)
    result = scribeline("predict", "--model", plain, "--dataset", "x")
    assert result.exit_code == 2 and "has no scribeline metadata" in result.output

    # The .tflite alone still reads: its metadata is embedded.
    alone = tmp_path / "alone.tflite"
    shutil.copy(folder / "recognizer-float32.tflite", alone)
    assert TFLiteReader.load(alone).charset == keras.charset

    # Another model's JSON beside it is refused.
    shutil.copy(folder / "recognizer-float16.json", tmp_path / "alone.json")
    with pytest.raises(ModelMetadataError, match="describes another file"):
        TFLiteReader.load(alone)

    not_tflite = tmp_path / "x.tflite"
    not_tflite.write_bytes(b"\x89PNG\r\n\x1a\n0000")
    with pytest.raises(ModelMetadataError, match="is not a TFLite model"):
        TFLiteReader.load(not_tflite)


def other_charset_dataset(dataset: str, target: Path) -> str:
    """A copy of a dataset version whose manifest's charset is reordered."""
    shutil.copytree(dataset, target)
    manifest = json.loads((target / "manifest.json").read_text())
    chars = manifest["charset"]["chars"]
    manifest["charset"]["chars"] = chars[1:] + chars[0]
    (target / "manifest.json").write_text(json.dumps(manifest))
    return str(target)


def test_a_dataset_with_another_charset(exported, trained, tmp_path):
    _, folder = exported
    other = other_charset_dataset(trained[0], tmp_path / "other")
    with pytest.raises(
        CharsetMismatchError, match=r"has the charset .* but the checkpoint"
    ):
        export_tflite(
            trained[1], str(tmp_path / "out"), dataset_url=other, parity_lines=5
        )
    result = scribeline(
        "export", trained[1], "--out", tmp_path / "out", "--dataset", other
    )
    assert (
        result.exit_code == 2 and "its class indices would mean other" in result.output
    )
    model = folder / "recognizer-float32.tflite"
    result = scribeline("predict", "--model", model, "--dataset", other)
    assert result.exit_code == 2
    assert re.search(
        r"has the charset .* but the model .* was trained on", result.output
    )


# --------------------------------------------------------------------------
# The CLI
# --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "predict", "run"])
def test_help(command):
    result = scribeline(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_export_and_evaluate_through_the_cli(trained, tmp_path):
    out = tmp_path / "cli"
    result = scribeline(
        "export", trained[1], "--out", out, "--variants", "float32,int8-dynamic",
        "--parity-lines", TEST_LINES,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote float32, int8-dynamic" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json",
        "recognizer-float32.json",
        "recognizer-float32.tflite",
        "recognizer-int8-dynamic.json",
        "recognizer-int8-dynamic.tflite",
    ]
    model = out / "recognizer-int8-dynamic.tflite"
    result = scribeline("predict", "--model", model, "--dataset", trained[0])
    assert result.exit_code == 0, result.output
    assert re.search(
        r"int8-dynamic on .* \(test, 20 lines\): CER \d\.\d{4} WER", result.stdout
    )
    bad = scribeline("export", trained[1], "--out", out, "--variants", "int4")
    assert bad.exit_code == 2 and "unknown variant(s) 'int4'" in bad.output


# --------------------------------------------------------------------------
# The pipeline end to end
# --------------------------------------------------------------------------


TINY_RUN = [
    "--lines", "400", "--shard-size", "200", "--steps", "4", "--batch-size", "16",
    "--lstm-units", "8", "--parity-lines", str(TEST_LINES),
    "--variants", "float32,int8-dynamic",
]  # fmt: skip


def test_pipeline_end_to_end_as_a_prefect_flow(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from scribeline.flows.pipeline import SUMMARY_KEY

    root = tmp_path / "run"
    result = scribeline("run", "--output", root, "--prefect", *TINY_RUN)
    assert result.exit_code == 0, result.output
    for what in ("dataset", "model", "tflite", "summary"):
        assert re.search(rf"^{what} +{re.escape(str(root))}", result.stdout, re.M)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["dataset"]["by_split"] == {"train": 360, "val": 20, "test": 20}
    models = {m["model"]: m for m in summary["models"]}
    assert set(models) == {"keras", "float32", "int8-dynamic"}
    for name in ("float32", "int8-dynamic"):
        row = models[name]
        assert row["status"] == "kept" and row["lines"] == TEST_LINES
        assert {"cer", "wer", "bytes", "latency_ms", "max_prob_diff"} <= set(row)
        assert (root / "tflite" / f"recognizer-{name}.tflite").stat().st_size == row[
            "bytes"
        ]
    assert models["float32"]["cer"] == pytest.approx(models["keras"]["cer"], abs=0.005)
    assert len(summary["samples"]) == 6
    assert summary["samples"][0]["image"].startswith("data:image/png;base64,")

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_KEY]))
        )
    assert len(artifacts) == 1
    markdown = artifacts[0].data
    assert markdown == (root / "summary.md").read_text()
    for words in (
        summary["dataset"]["version"],
        "## Models on the test split",
        "| float32 | kept |",
        "| int8-dynamic | kept |",
        "![training curves](data:image/png;base64,",
        "## Sample predictions",
        "![line](data:image/png;base64,",
    ):
        assert words in markdown

    # Run again without Prefect: the dataset is complete, training resumes at
    # its last step, the export and the summary are written again.
    again = scribeline("run", "--output", root, *TINY_RUN)
    assert again.exit_code == 0, again.output
    assert json.loads((root / "summary.json").read_text())["training"]["steps"] == 4


def test_nightly_deployment_runs_the_pipeline(tmp_path):
    from scribeline.flows.pipeline import nightly_pipeline_deployment
    from scribeline.platform.errors import SettingsError

    deployment = nightly_pipeline_deployment(
        str(tmp_path / "root"),
        keep=3,
        timezone="Europe/Berlin",
        settings={"lines": 400},
        training={"max_steps": 10},
    )
    assert deployment.name == "nightly"
    assert deployment.entrypoint == "scribeline.flows.pipeline.nightly_pipeline"
    assert deployment.parameters["nightly"] is True
    assert deployment.parameters["training"] == {"max_steps": 10}
    schedule = deployment.schedules[0].schedule
    assert (schedule.cron, schedule.timezone) == ("0 4 * * *", "Europe/Berlin")
    with pytest.raises(SettingsError, match="keep storage options out of training"):
        nightly_pipeline_deployment(
            str(tmp_path), training={"storage_options": {"k": 1}}
        )
    with pytest.raises(SettingsError, match="invalid training settings: batch_size"):
        nightly_pipeline_deployment(str(tmp_path), training={"batch_size": 0})


def test_nightly_pipeline_keeps_a_run_per_kept_version(prefect_harness, tmp_path):
    from scribeline.flows import nightly
    from scribeline.flows.pipeline import nightly_pipeline

    root = tmp_path / "nightly"
    tiny = {
        "settings": {"lines": 400, "shard_size": 200},
        "training": {"max_steps": 2, "batch_size": 16, "model": TINY_MODEL},
        "variants": ["float32"],
        "parity_lines": TEST_LINES,
        "samples": 2,
        "nightly": True,
        "keep": 1,
    }
    first = nightly_pipeline(str(root), night="2026-03-07", **tiny)
    name = Path(first["where"]["dataset"]).name
    assert name.startswith("2026-03-07-")
    assert first["where"]["model"] == str(root / "runs" / name / "model")
    assert (root / "runs" / name / "tflite" / "recognizer-float32.tflite").exists()

    second = nightly_pipeline(str(root), night="2026-03-08", **tiny)
    newer = Path(second["where"]["dataset"]).name
    assert [v.name for v in nightly.list_versions(resolve_root(root))] == [newer]
    assert sorted(p.name for p in (root / "runs").iterdir()) == [newer]
    latest = json.loads((root / "latest.json").read_text())
    assert latest["version"] == f"versions/{newer}"


def resolve_root(path: Path):
    from scribeline.platform.storage import resolve

    return resolve(str(path))
