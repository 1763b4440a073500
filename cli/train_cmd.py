"""``scribeline train``: train a line recognizer on a dataset version.

    scribeline train --dataset out/ds --output out/model --epochs 3
    scribeline train --dataset s3://b/ds --output s3://b/model --steps 20000 \\
        --storage-option endpoint_url=http://127.0.0.1:9000 --resume
    scribeline train --dataset out/ds --output out/model --strategy ray --workers 4

Every option can also come from ``SCRIBELINE_TRAIN_*`` environment variables
(see ``scribeline.platform.train_settings``); flags win. Wired into the app by
``register(app)``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from scribeline.common import console, fail, storage_options
from scribeline.platform.errors import ScribelineError

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "one", "mirrored", "ray")


def _settings(given: dict[str, Any]) -> Any:
    from scribeline.platform.train_settings import TrainSettings

    fields = {k: v for k, v in given.items() if v is not None}
    model = {k: v for k, v in fields.pop("model", {}).items() if v is not None}
    try:
        if model:  # merged with SCRIBELINE_TRAIN_MODEL__* by pydantic-settings
            fields["model"] = model
        return TrainSettings(**fields)
    except (ValidationError, ScribelineError) as err:
        if isinstance(err, ValidationError):
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "settings"
            raise fail(f"{where}: {first['msg']} (got {first.get('input')!r})") from err
        raise fail(str(err)) from err


def train(
    dataset: Annotated[
        str | None, typer.Option("--dataset", "-d", help="Dataset version URL.")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Checkpoint URL (folder or s3://)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Passes over the train split.")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", min=1, help="Stop after this many steps (wins over --epochs)."
        ),
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="Stop after this wall time, with a final checkpoint."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", min=1, help="Global batch.")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Adam peak learning rate.")
    ] = None,
    strategy: Annotated[
        str,
        typer.Option(
            help="auto (mirrored with 2+ GPUs, else one device), one, mirrored "
            "(every GPU or logical CPU of this machine), ray (Ray Train workers)."
        ),
    ] = "auto",
    workers: Annotated[
        int, typer.Option(min=1, help="Ray Train workers (with --strategy ray).")
    ] = 2,
    cpus_per_worker: Annotated[
        int, typer.Option(min=1, help="CPUs of each Ray Train worker.")
    ] = 1,
    gpu: Annotated[bool, typer.Option(help="One GPU per Ray Train worker.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue from the output's last checkpoint.")
    ] = False,
    lstm_units: Annotated[
        int | None, typer.Option(help="LSTM units per direction.")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Steps between validations (besides epochs).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Weights, order and noise.")] = None,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(
            "--storage-option",
            help="fsspec option KEY=VALUE for both URLs (repeatable), e.g. "
            "endpoint_url=http://127.0.0.1:9000",
        ),
    ] = None,
) -> None:
    """Train a CNN + BiLSTM + CTC line recognizer; report val and test CER/WER.

    Checkpoints (weights, optimizer state, data position) go to --output every
    few hundred steps and at each validation; --resume continues a run killed
    at any point. The end writes final.json with the metrics.
    """
    if strategy not in STRATEGIES:
        raise fail(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}.")
    settings = _settings(
        {
            "dataset": dataset,
            "output": output,
            "epochs": epochs,
            "max_steps": steps,
            "max_minutes": max_minutes,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "strategy": None if strategy in ("auto", "ray") else strategy,
            "resume": resume or None,
            "eval_every": eval_every,
            "seed": seed,
            "storage_options": storage_options(storage_option),
            "model": {"lstm_units": lstm_units},
        }
    )
    try:
        if strategy == "ray":
            from scribeline.workers.train import train_on_ray

            result = train_on_ray(
                settings,
                num_workers=workers,
                cpus_per_worker=cpus_per_worker,
                use_gpu=gpu,
            )
        else:
            result = _train_here(settings)
    except (ScribelineError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    _print_result(result)


def _train_here(settings: Any) -> Any:
    from scribeline.platform.training import train

    progress = Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:
        task = progress.add_task("train", total=None, status="")

        def on_progress(event: dict[str, Any]) -> None:
            kind = event["event"]
            if kind == "step":
                progress.update(
                    task,
                    completed=event["step"],
                    total=event["total_steps"],
                    status=f"loss {event['loss']:.3f} "
                    f"{event['lines_per_s']:.0f} lines/s",
                )
            elif kind == "validation" and "val_cer" in event:
                progress.console.print(
                    f"step {event['step']} epoch {event['epoch']:.2f}: loss "
                    f"{event['loss']:.4f}, val CER {event['val_cer']:.4f} WER "
                    f"{event['val_wer']:.4f}, {event['lines_per_s']:.1f} lines/s",
                    highlight=False,
                )
            elif kind == "evaluation":
                progress.update(task, status=f"evaluating {event['split']}")

        return train(settings, on_progress=on_progress)


def _print_result(result: Any) -> None:
    table = Table(title=f"training run -> {result.output}")
    table.add_column("split")
    table.add_column("lines", justify="right")
    table.add_column("CER", justify="right")
    table.add_column("WER", justify="right")
    for split in ("val", "test"):
        metrics = getattr(result, split) or {}
        if metrics:
            table.add_row(
                split,
                f"{metrics['lines']:,}",
                f"{metrics['cer']:.4f}",
                f"{metrics['wer']:.4f}",
            )
    console.print(table)
    typer.echo(
        f"step {result.step}, {result.train_samples_per_s:.1f} train lines/s over "
        f"{result.train_seconds:.0f} s, checkpoint {result.checkpoint} -> "
        f"{result.output}"
    )


def register(app: typer.Typer) -> None:
    """Add ``scribeline train`` to the app."""
    app.command(name="train")(train)
