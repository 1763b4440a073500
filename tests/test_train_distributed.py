"""Training on several devices and workers, and its entry points (CLI, flow).

- MirroredStrategy over two logical CPU devices gives the same loss and the
  same weights as one device for the same global batch. Logical devices must
  be configured before TensorFlow starts, so that test runs in a subprocess.
- A 2-worker Ray Train run (MultiWorkerMirroredStrategy) on the local cluster.
- ``scribeline train`` through typer, and the ``train_model`` Prefect flow.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from scribeline.platform import checkpoint as ckpt
from scribeline.platform.dataset import generate
from scribeline.platform.settings import GenerateSettings
from scribeline.platform.storage import resolve
from scribeline.platform.train_settings import TrainSettings

TINY = {
    "max_steps": 2,
    "batch_size": 16,
    "learning_rate": 3e-3,
    "warmup_steps": 0,
    "log_every": 1,
    "eval_lines": 8,
    "final_eval_lines": 8,
    "shuffle_buffer": 64,
    "model": {"c1": 4, "c3": 8, "c5": 16, "lstm_units": 8, "dropout": 0.0},
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("data") / "ds")
    generate(GenerateSettings(output=url, lines=200, shard_size=100))
    return url


def weights(output: str) -> list[np.ndarray]:
    return ckpt.load(resolve(output)).arrays["model"]


def test_mirrored_on_two_cpus_matches_one_device(tiny_dataset, tmp_path):
    script = textwrap.dedent(
        f"""
        import json
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        from scribeline.platform.train_settings import TrainSettings
        from scribeline.platform.training import train

        runs = {{}}
        for strategy in ("one", "mirrored"):
            settings = TrainSettings(
                dataset={tiny_dataset!r},
                output={str(tmp_path)!r} + "/" + strategy,
                strategy=strategy,
                augment={{"enabled": False}},
                **json.loads({json.dumps(TINY)!r}),
            )
            result = train(settings)
            runs[strategy] = {{"losses": result.losses, "replicas": result.replicas}}
        print(json.dumps(runs))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # never with the repository on sys.path
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["one"]["replicas"] == 1 and runs["mirrored"]["replicas"] == 2
    np.testing.assert_allclose(
        [loss for _, loss in runs["mirrored"]["losses"]],
        [loss for _, loss in runs["one"]["losses"]],
        rtol=1e-4,
    )
    # Two replicas sum two half-batch gradients, one device sums once: the
    # rounding differs, and Adam (dividing by sqrt(v)) turns a rounding
    # difference in a near-zero gradient into a visible share of one update.
    # So: equal to a small fraction of the learning rate.
    atol = 0.05 * TINY["learning_rate"] * TINY["max_steps"]
    for a, b in zip(
        weights(str(tmp_path / "one")), weights(str(tmp_path / "mirrored")), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=atol)


@pytest.mark.slow
def test_ray_train_two_workers(ray_cluster, tiny_dataset, tmp_path):
    from scribeline.workers.train import train_on_ray

    settings = TrainSettings(
        dataset=tiny_dataset, output=str(tmp_path / "model"), **TINY
    )
    result = train_on_ray(
        settings,
        num_workers=2,
        cpus_per_worker=1,
        storage_path=str(tmp_path / "ray"),
    )
    assert result.replicas == 2
    assert result.step == 2
    assert result.test["lines"] == 8
    final = json.loads((tmp_path / "model" / "final.json").read_text())
    assert final["replicas"] == 2
    assert ckpt.latest_name(resolve(settings.output)) == "ckpt-00000002"


def cli_app():
    from scribeline.main import app
    from scribeline.train_cmd import register

    if not any(c.name == "train" for c in app.registered_commands):
        register(app)
    return app


def test_cli_train_help():
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli_app(), ["train", "--help"])
    assert result.exit_code == 0
    for flag in ("--dataset", "--output", "--epochs", "--steps", "--strategy"):
        assert flag in result.output
    assert "--resume" in result.output and "--storage-option" in result.output


def test_cli_trains_and_refuses_bad_input(tiny_dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    for key, value in TINY["model"].items():
        monkeypatch.setenv(f"SCRIBELINE_TRAIN_MODEL__{key.upper()}", str(value))
    monkeypatch.setenv("SCRIBELINE_TRAIN_FINAL_EVAL_LINES", "8")
    app, runner = cli_app(), CliRunner()
    output = str(tmp_path / "model")
    args = ["train", "--dataset", tiny_dataset, "--output", output]
    result = runner.invoke(app, [*args, "--steps", "2", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    assert "checkpoint ckpt-00000002" in result.output
    again = runner.invoke(app, [*args, "--steps", "2", "--batch-size", "16"])
    assert again.exit_code == 2 and "pass --resume" in again.output
    bad = runner.invoke(app, [*args, "--strategy", "gpus"])
    assert bad.exit_code == 2 and "is not one of" in bad.output
    missing = runner.invoke(
        app, ["train", "--dataset", str(tmp_path / "nope"), "--output", output]
    )
    assert missing.exit_code == 2 and "no dataset version" in missing.output


@pytest.mark.slow
def test_flow_publishes_metrics_curves_and_samples(
    prefect_harness, tiny_dataset, tmp_path
):
    from prefect.artifacts import Artifact

    from scribeline.flows.train import (
        CURVES_KEY,
        METRICS_KEY,
        SAMPLES_KEY,
        train_model,
    )

    summary = train_model(
        dataset=tiny_dataset,
        output=str(tmp_path / "model"),
        max_steps=2,
        batch_size=16,
        overrides={
            k: v for k, v in TINY.items() if k not in ("max_steps", "batch_size")
        },
    )
    assert summary["step"] == 2 and summary["test"]["lines"] == 8
    metrics = Artifact.get(METRICS_KEY)
    assert metrics is not None and "final test" in str(metrics.data)
    curves = Artifact.get(CURVES_KEY)
    assert "data:image/png;base64," in str(curves.data)
    samples = Artifact.get(SAMPLES_KEY)
    assert str(samples.data).count("data:image/png;base64,") == 8
    with pytest.raises(Exception, match="storage_options must not be a flow parameter"):
        train_model(
            dataset=tiny_dataset,
            output=str(tmp_path / "other"),
            overrides={"storage_options": {"key": "x"}},
        )


def test_training_curve_png_is_drawn():
    from PIL import Image

    from scribeline.platform.report import training_curves_png

    png = training_curves_png([(1, 90.0), (2, 60.0), (3, 20.0)], [(3, 0.5)])
    image = Image.open(io.BytesIO(png))
    assert image.size == (1120, 360)
    # Ink in both panels: the loss line and the CER point are drawn.
    pixels = np.asarray(image.convert("L"))
    assert (pixels[:, :560] < 128).any() and (pixels[:, 560:] < 128).any()
