"""Prefect flow: train a line recognizer and publish how it went.

    python -c "from scribeline.flows.train import train_model; \\
        train_model(dataset='out/ds', output='out/model', epochs=3)"

``train_model`` runs the one training loop (``platform.training.train``) in
this process, or on Ray Train workers with ``ray_workers=N``, and publishes to
the flow run:

- ``train-metrics``: a table, one row per validation (step, epoch, mean loss,
  val CER/WER, lines/s) and the final val and test rows;
- ``train-curves``: a markdown summary (test CER/WER, throughput, the most
  frequent character errors) with the training curves as an embedded PNG;
- ``train-samples``: test lines as images with their truth and prediction;
- run logs at the training loop's cadence (``log_every``), from the flow only.

Credentials never travel as flow parameters (Prefect stores and shows them):
give storage options through ``SCRIBELINE_TRAIN_STORAGE_OPTIONS`` (JSON, read
by ``TrainSettings``) or name a Prefect ``Secret`` block holding them as JSON
with ``storage_secret``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from scribeline.platform.errors import SettingsError
from scribeline.platform.metrics import format_confusions
from scribeline.platform.report import data_uri, line_png, training_curves_png
from scribeline.platform.train_settings import TrainSettings
from scribeline.platform.training import TrainResult

METRICS_KEY = "train-metrics"
CURVES_KEY = "train-curves"
SAMPLES_KEY = "train-samples"
SAMPLE_LINES = 8


def build_settings(
    dataset: str,
    output: str,
    overrides: dict[str, Any] | None,
    storage_secret: str | None,
) -> TrainSettings:
    """Settings from the flow's parameters, the environment and a Secret block."""
    overrides = dict(overrides or {})
    if "storage_options" in overrides:
        raise SettingsError(
            "storage_options must not be a flow parameter (Prefect stores and "
            "shows parameters); use SCRIBELINE_TRAIN_STORAGE_OPTIONS or a Secret "
            "block named by storage_secret."
        )
    fields = {k: v for k, v in overrides.items() if v is not None}
    if storage_secret:
        from scribeline.flows.generate import load_storage_secret

        fields["storage_options"] = load_storage_secret(storage_secret)
    return TrainSettings(dataset=dataset, output=output, **fields)


@task(name="train")
def run_training(settings: TrainSettings, ray_workers: int) -> TrainResult:
    """The training loop; progress lines go to the run logger at its cadence."""
    logger = get_run_logger()

    def progress(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "step":
            logger.info(
                "step %d/%d loss %.3f %.1f lines/s",
                event["step"],
                event["total_steps"],
                event["loss"],
                event["lines_per_s"],
            )
        elif kind == "validation" and "val_cer" in event:
            logger.info(
                "step %d: val CER %.4f WER %.4f",
                event["step"],
                event["val_cer"],
                event["val_wer"],
            )
        elif kind == "evaluation":
            logger.info("evaluating %s (%d lines)", event["split"], event["lines"])

    if ray_workers:
        from scribeline.workers.train import train_on_ray

        return train_on_ray(settings, num_workers=ray_workers)
    from scribeline.platform.training import train

    return train(settings, on_progress=progress)


@task(name="publish")
def publish(result: TrainResult, settings: TrainSettings) -> None:
    """The metrics table, the curves and sample predictions as artifacts."""
    rows = [
        {
            "step": h["step"],
            "epoch": h["epoch"],
            "loss": h["loss"],
            "val_cer": h.get("val_cer"),
            "val_wer": h.get("val_wer"),
            "lines_per_s": h["lines_per_s"],
        }
        for h in result.history
    ]
    for split in ("val", "test"):
        metrics = getattr(result, split)
        if metrics:
            rows.append(
                {
                    "step": result.step,
                    "epoch": f"final {split} ({metrics['lines']} lines)",
                    "loss": None,
                    "val_cer": metrics["cer"],
                    "val_wer": metrics["wer"],
                    "lines_per_s": round(result.train_samples_per_s, 2),
                }
            )
    create_table_artifact(
        table=rows, key=METRICS_KEY, description="Validation after each epoch"
    )
    create_markdown_artifact(
        markdown=summary_markdown(result), key=CURVES_KEY, description="Training run"
    )
    create_markdown_artifact(
        markdown=samples_markdown(result, settings),
        key=SAMPLES_KEY,
        description="Test lines: image, truth, prediction",
    )


def summary_markdown(result: TrainResult) -> str:
    test, val = result.test or {}, result.val or {}
    png = training_curves_png(
        [(s, loss) for s, loss in result.losses],
        [(h["step"], h["val_cer"]) for h in result.history if "val_cer" in h],
        [(h["step"], h["val_wer"]) for h in result.history if "val_wer" in h],
    )
    lines = [
        f"# Training run: {result.output}",
        "",
        "| | value |",
        "|---|---|",
        f"| test CER | {test.get('cer', float('nan')):.4f} |",
        f"| test WER | {test.get('wer', float('nan')):.4f} |",
        f"| val CER | {val.get('cer', float('nan')):.4f} |",
        f"| steps | {result.step} ({result.epoch} full epochs) |",
        f"| train lines/s | {result.train_samples_per_s:.1f} |",
        f"| replicas | {result.replicas} |",
        f"| dataset version | {result.dataset_version} |",
        f"| checkpoint | {result.checkpoint} |",
        "",
        f"![training curves]({data_uri(png)})",
        "",
    ]
    if test.get("confusions"):
        lines.append(
            "Most frequent test errors (truth->predicted): "
            + format_confusions(test["confusions"][:10])
        )
    return "\n".join(lines)


def samples_markdown(result: TrainResult, settings: TrainSettings) -> str:
    from scribeline.platform.pipeline import DatasetSource
    from scribeline.platform.recognizer import Recognizer

    reader = Recognizer.load(settings.output, settings.storage_options)
    source = DatasetSource.open(settings.dataset, settings.storage_options)
    split = "test" if source.rows("test") else "train"
    images, truths = _first_lines(source, split, reader, SAMPLE_LINES)
    predictions = reader.read(images) if len(images) else []
    out = [
        f"# Sample predictions ({split} split, greedy CTC decoding)",
        "",
        "| line image | truth | prediction |",
        "|---|---|---|",
    ]
    for image, truth, prediction in zip(images, truths, predictions, strict=True):
        mark = "" if truth == prediction else " ✗"
        out.append(
            f"| ![line]({data_uri(line_png(image))}) | `{truth}` | "
            f"`{prediction}`{mark} |"
        )
    return "\n".join(out)


def _first_lines(source: Any, split: str, reader: Any, count: int) -> tuple:
    import numpy as np

    from scribeline.platform.pipeline import make_dataset

    stream = make_dataset(
        source,
        split,
        count,
        reader.geometry,
        reader.charset,
        training=False,
        limit=count,
    )
    with stream.iterate() as batches:
        for images, _, _, texts in batches:
            pixels = np.rint(images.numpy()[..., 0] * 255).astype(np.uint8)
            return pixels, [t.decode() for t in texts.numpy()]
    return np.zeros((0, 1, 1), np.uint8), []


@flow(name="train-model")
def train_model(
    dataset: str,
    output: str,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    strategy: str | None = None,
    resume: bool = False,
    ray_workers: int = 0,
    overrides: dict[str, Any] | None = None,
    storage_secret: str | None = None,
) -> dict[str, Any]:
    """Train a recognizer on a dataset version; publish metrics, curves, samples.

    Args:
        overrides: any other ``TrainSettings`` field, e.g.
            ``{"learning_rate": 1e-3, "model": {"lstm_units": 128}}``.
        ray_workers: 0 trains in this process; N runs N Ray Train workers.
    """
    logger = get_run_logger()
    settings = build_settings(
        dataset,
        output,
        {
            "epochs": epochs,
            "max_steps": max_steps,
            "batch_size": batch_size,
            "strategy": strategy,
            "resume": resume or None,
            **(overrides or {}),
        },
        storage_secret,
    )
    logger.info(
        "training on %s -> %s (%s)",
        settings.dataset,
        settings.output,
        f"{ray_workers} Ray workers"
        if ray_workers
        else f"strategy {settings.strategy}",
    )
    result = run_training(settings, ray_workers)
    publish(result, settings)
    logger.info(
        "done: test CER %.4f WER %.4f, %.1f lines/s, checkpoint %s",
        result.test.get("cer", float("nan")),
        result.test.get("wer", float("nan")),
        result.train_samples_per_s,
        result.checkpoint,
    )
    return {
        "output": result.output,
        "checkpoint": result.checkpoint,
        "step": result.step,
        "val": {k: result.val.get(k) for k in ("cer", "wer", "lines")},
        "test": {k: result.test.get(k) for k in ("cer", "wer", "lines")},
        "train_samples_per_s": result.train_samples_per_s,
    }
