"""Training: model, labels, decoding, pipeline, checkpoints, resume, bad input.

A tiny dataset from the embedded generator (no downloads) and a tiny model keep
every training run to a few seconds on two CPU cores.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from scribeline.platform import checkpoint as ckpt
from scribeline.platform.dataset import generate
from scribeline.platform.metrics import cer, confusions, evaluate_texts, wer
from scribeline.platform.model import (
    CharsetMismatchError,
    LabelTooLongError,
    blank_index,
    check_labels_fit,
    ctc_steps_needed,
    encode_label,
    greedy_decode,
    steps_from_label,
)
from scribeline.platform.pipeline import (
    DatasetSource,
    EmptyDatasetError,
    Geometry,
    assign_rows,
    make_dataset,
)
from scribeline.platform.settings import GenerateSettings
from scribeline.platform.storage import resolve
from scribeline.platform.train_settings import TrainSettings
from scribeline.platform.training import CheckpointMismatchError, train

TINY_MODEL = {"c1": 4, "c3": 8, "c5": 16, "lstm_units": 8, "dropout": 0.1}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    """200 lines (180 train, 10 val, 10 test) from the embedded generator."""
    url = str(tmp_path_factory.mktemp("data") / "ds")
    generate(GenerateSettings(output=url, lines=200, shard_size=100))
    return url


def tiny_settings(dataset: str, output: str, **overrides) -> TrainSettings:
    fields = {
        "dataset": dataset,
        "output": output,
        "max_steps": 4,
        "batch_size": 16,
        "learning_rate": 3e-3,
        "warmup_steps": 0,
        "log_every": 1,
        "checkpoint_every": 100,
        "eval_lines": 10,
        "shuffle_buffer": 64,
        "model": TINY_MODEL,
    }
    fields.update(overrides)
    return TrainSettings(**fields)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """One finished tiny run: (settings, result)."""
    output = str(tmp_path_factory.mktemp("model") / "run")
    settings = tiny_settings(tiny_dataset, output, max_steps=10, checkpoint_every=4)
    return settings, train(settings)


def copy_dataset(url: str, target: Path, edit=None) -> str:
    """A copy of a dataset version whose manifest ``edit(manifest)`` changes."""
    shutil.copytree(url, target)
    manifest = json.loads((target / "manifest.json").read_text())
    if edit:
        edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return str(target)


# --------------------------------------------------------------------------
# Labels, the blank, decoding, metrics
# --------------------------------------------------------------------------

CHARSET = " abcdehlo"


def test_blank_is_the_last_class():
    assert blank_index(CHARSET) == len(CHARSET)


@pytest.mark.parametrize("text", ["hello", "a", "ll  oo", "", "aaa bb"])
def test_decoding_round_trip(text):
    label = encode_label(text, CHARSET)
    path = steps_from_label(label, time_steps=16, charset=CHARSET)
    assert greedy_decode(path[None], CHARSET) == [text]


def test_greedy_decoding_merges_repeats_and_drops_blanks():
    blank = blank_index(CHARSET)
    h, e, l = (CHARSET.index(c) for c in "hel")  # noqa: E741
    steps = [h, h, blank, e, l, l, blank, l, blank, blank]
    probs = np.eye(len(CHARSET) + 1)[steps][None]
    assert greedy_decode(probs, CHARSET) == ["hell"]


def test_ctc_steps_count_repeated_pairs():
    assert ctc_steps_needed("hello") == 6
    assert ctc_steps_needed("aaa") == 5
    assert check_labels_fit(["hello", "abc"], time_steps=6) == 6


def test_label_longer_than_time_axis_is_named():
    with pytest.raises(LabelTooLongError, match="label 'hello' needs 6 CTC time steps"):
        check_labels_fit(["abc", "hello"], time_steps=5)


def test_label_outside_charset_is_named():
    with pytest.raises(CharsetMismatchError, match="'z', which is not in the charset"):
        encode_label("haze", CHARSET)


def test_cer_wer_and_confusions():
    truths, predictions = ["hello world", "abc"], ["hallo world", "abc"]
    assert cer(truths, predictions) == pytest.approx(1 / 14)
    assert wer(truths, predictions) == pytest.approx(1 / 3)
    assert confusions(truths, predictions) == [
        {"truth": "e", "predicted": "a", "count": 1}
    ]
    result = evaluate_texts("test", truths, predictions)
    assert (result.char_errors, result.word_errors, result.exact_lines) == (1, 1, 1)


# --------------------------------------------------------------------------
# The input pipeline
# --------------------------------------------------------------------------


def test_workers_get_disjoint_equal_rows():
    shards = [("a", 100), ("b", 50), ("c", 70)]
    seen = []
    for worker in range(3):
        pieces = assign_rows(shards, worker, 3, batch=16)
        rows = [(p.shard, r) for p in pieces for r in range(p.start, p.stop)]
        assert len(rows) == 64  # floor(220 / 3 / 16) * 16
        seen += rows
    assert len(set(seen)) == len(seen)


def read_all(stream):
    with stream.iterate() as batches:
        return [tuple(t.numpy() for t in batch) for batch in batches]


def test_pipeline_decodes_labels_and_images(tiny_dataset):
    from scribeline.platform.dataset import iter_rows

    source = DatasetSource.open(tiny_dataset)
    geometry = Geometry(28, 896, 32)
    batches = read_all(
        make_dataset(source, "val", 4, geometry, source.charset, training=False)
    )
    images, labels, lengths, texts = (
        np.concatenate(x) for x in zip(*batches, strict=True)
    )
    rows = list(iter_rows(tiny_dataset, "val"))
    assert [t.decode() for t in texts] == [r["text"] for r in rows]
    assert images.shape == (len(rows), 28, 896, 1) and images.dtype == np.float32
    np.testing.assert_allclose(images[0, :, :, 0], rows[0]["image"] / 255.0, atol=1e-6)
    first = rows[0]["text"]
    assert lengths[0] == len(first)
    assert list(labels[0, : len(first)]) == encode_label(first, source.charset)


def test_pipeline_is_deterministic_and_skips_exactly(tiny_dataset):
    from scribeline.platform.train_settings import AugmentSettings

    source = DatasetSource.open(tiny_dataset)
    geometry = Geometry(28, 896, 32)

    def epoch(skip=0):
        return read_all(
            make_dataset(
                source,
                "train",
                16,
                geometry,
                source.charset,
                epoch=1,
                seed=3,
                shuffle_buffer=64,
                skip_batches=skip,
                augment=AugmentSettings(),
            )
        )

    full, resumed = epoch(), epoch(skip=4)
    assert len(full) == 180 // 16
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_pipeline_reads_shards_from_s3(tiny_dataset, s3_server, s3_bucket):
    from scribeline.platform.storage import resolve

    options = s3_server.storage_options
    remote = resolve(f"{s3_bucket}/ds", options)
    remote.fs.put(tiny_dataset + "/", remote.path + "/", recursive=True)
    local, s3 = (
        DatasetSource.open(tiny_dataset),
        DatasetSource.open(remote.url, options),
    )
    geometry = Geometry(28, 896, 32)
    a = read_all(make_dataset(local, "train", 16, geometry, local.charset, seed=1))
    b = read_all(make_dataset(s3, "train", 16, geometry, s3.charset, seed=1))
    assert len(a) == len(b) == 11
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x[0], y[0])
        np.testing.assert_array_equal(x[3], y[3])


# --------------------------------------------------------------------------
# Training, checkpoints, resume
# --------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_checkpoints(trained):
    settings, result = trained
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    root = Path(settings.output)
    assert json.loads((root / "latest.json").read_text())["step"] == 10
    assert sorted(p.name for p in (root / "checkpoints").glob("*.npz")) == [
        "ckpt-00000004.npz",
        "ckpt-00000008.npz",
        "ckpt-00000010.npz",
    ]
    final = json.loads((root / "final.json").read_text())
    source = DatasetSource.open(settings.dataset)
    assert final["dataset_version"] == source.version
    assert final["charset"] == source.charset
    assert final["settings"]["model"]["lstm_units"] == 8
    assert "storage_options" not in final["settings"]
    assert final["test"]["lines"] == 10 and final["test"]["cer"] >= 0
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))


class KilledError(Exception):
    """Stands in for a killed process."""


def test_resume_continues_from_the_same_step_and_state(tiny_dataset, tmp_path):
    straight = tiny_settings(tiny_dataset, str(tmp_path / "a"), max_steps=6)
    straight = straight.model_copy(update={"checkpoint_every": 3})
    full = train(straight)

    def kill_at_step_5(event):
        if event["event"] == "step" and event["step"] == 5:
            raise KilledError

    interrupted = straight.model_copy(update={"output": str(tmp_path / "b")})
    with pytest.raises(KilledError):
        train(interrupted, on_progress=kill_at_step_5)
    with pytest.raises(CheckpointMismatchError, match="pass --resume to continue"):
        train(interrupted)
    resumed = train(interrupted.model_copy(update={"resume": True}))

    assert resumed.step == full.step == 6
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [v for _, v in resumed.losses[3:]], [v for _, v in full.losses[3:]], rtol=1e-4
    )
    a = ckpt.load(resolve(straight.output))
    b = ckpt.load(resolve(interrupted.output))
    for group in ("model", "optimizer"):
        shapes = [
            [shape for _, shape in saved.meta["variables"][group]] for saved in (a, b)
        ]
        assert shapes[0] == shapes[1]
    for group in ("model", "optimizer"):  # weights, Adam moments, iteration
        for x, y in zip(a.arrays[group], b.arrays[group], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-6)


def test_checkpoints_go_to_s3(tiny_dataset, s3_server, s3_bucket):
    from scribeline.platform.recognizer import Recognizer

    options = s3_server.storage_options
    settings = tiny_settings(
        tiny_dataset, f"{s3_bucket}/model", max_steps=2, storage_options=options
    )
    result = train(settings)
    root = resolve(settings.output, options)
    assert ckpt.latest_name(root) == "ckpt-00000002"
    assert root.child("final.json").exists()
    assert root.child("tensorboard").exists()
    reader = Recognizer.load(settings.output, options)
    assert reader.charset == result.charset


def test_mixed_precision_computes_ctc_in_float32(tiny_dataset, tmp_path):
    from scribeline.platform.model import build_model

    model = build_model(" ab", c1=4, c3=8, c5=16, lstm_units=8, mixed_precision=True)
    assert model.get_layer("c3").compute_dtype == "float16"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.get_layer("probs").output.dtype == "float32"
    # The whole step with loss scaling (slow float16 on a CPU, but it runs).
    settings = tiny_settings(
        tiny_dataset, str(tmp_path / "m"), max_steps=2, mixed_precision="on"
    )
    result = train(settings)
    assert all(np.isfinite(loss) for _, loss in result.losses)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def test_label_longer_than_the_time_axis_stops_training(tiny_dataset, tmp_path):
    # time_pool 56: 896 px give 8 time steps, too few for these lines.
    model = {**TINY_MODEL, "time_pool": 56}
    settings = tiny_settings(tiny_dataset, str(tmp_path / "m"), model=model)
    with pytest.raises(
        LabelTooLongError, match=r"CTC time steps .* but the model has 8"
    ):
        train(settings)


def test_empty_dataset_is_refused(tiny_dataset, tmp_path):
    def no_train_shards(manifest):
        manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "train"]

    empty = copy_dataset(tiny_dataset, tmp_path / "empty", no_train_shards)
    with pytest.raises(EmptyDatasetError, match=r"train split .* has no rows"):
        train(tiny_settings(empty, str(tmp_path / "m")))
    with pytest.raises(EmptyDatasetError, match="fewer than one global batch of 256"):
        train(tiny_settings(tiny_dataset, str(tmp_path / "m"), batch_size=256))


def test_a_manifest_charset_that_does_not_match_the_model(trained, tmp_path):
    from scribeline.platform.recognizer import Recognizer

    settings, _ = trained

    def reorder_charset(manifest):
        chars = manifest["charset"]["chars"]
        manifest["charset"]["chars"] = chars[1:] + chars[0]

    other = copy_dataset(settings.dataset, tmp_path / "other", reorder_charset)
    output = tmp_path / "resumed"
    shutil.copytree(settings.output, output)
    resumed = settings.model_copy(
        update={"dataset": other, "output": str(output), "resume": True}
    )
    with pytest.raises(CharsetMismatchError, match="was trained on the charset"):
        train(resumed)
    with pytest.raises(CharsetMismatchError, match="but the model was trained on"):
        Recognizer.load(settings.output).evaluate(other, "test")


def test_a_label_outside_the_manifest_charset(tiny_dataset, tmp_path):
    def drop_e(manifest):
        manifest["charset"]["chars"] = manifest["charset"]["chars"].replace("e", "")

    damaged = copy_dataset(tiny_dataset, tmp_path / "damaged", drop_e)
    with pytest.raises(CharsetMismatchError, match="outside the manifest's charset"):
        train(tiny_settings(damaged, str(tmp_path / "m")))


# --------------------------------------------------------------------------
# The charset travels with the checkpoint
# --------------------------------------------------------------------------


def test_charset_reloaded_in_a_new_process_decodes_identically(trained, tmp_path):
    from scribeline.platform.dataset import iter_rows
    from scribeline.platform.recognizer import Recognizer

    settings, _ = trained
    images = np.stack([r["image"] for r in iter_rows(settings.dataset, "test")])
    np.save(tmp_path / "images.npy", images)
    here = Recognizer.load(settings.output)
    script = textwrap.dedent(
        f"""
        import json, numpy as np
        from scribeline.platform.recognizer import Recognizer
        reader = Recognizer.load({settings.output!r})
        images = np.load({str(tmp_path / "images.npy")!r})
        print(json.dumps({{"charset": reader.charset,
                          "texts": reader.read(images),
                          "probs": reader.probabilities(images[:2]).tolist()}}))
        """
    )
    # Run from the test's folder: never with the repository on sys.path.
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert (
        there["charset"] == here.charset == DatasetSource.open(settings.dataset).charset
    )
    assert there["texts"] == here.read(images)
    np.testing.assert_allclose(
        there["probs"], here.probabilities(images[:2]), rtol=1e-5, atol=1e-6
    )
