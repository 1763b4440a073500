"""``scribeline export``, ``scribeline predict`` and ``scribeline run``.

    scribeline export out/run/model --out out/tflite
    scribeline predict line.png --model out/tflite/recognizer-int8.tflite
    scribeline predict --model out/tflite/recognizer-float32.tflite --dataset out/ds
    scribeline run                                  # generate -> train -> export
    scribeline run --glyphs ~/data/emnist/gzip.zip --corpus ~/data/train.tsv \\
        --lines 300000 --steps 2300 --batch-size 128 --output out/real

Wired into the ``scribeline`` command by ``register(app)``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.table import Table

from scribeline.common import (
    CorpusOpt,
    GlyphsOpt,
    SplitOpt,
    StorageOpt,
    console,
    fail,
    storage_options,
)

VariantsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--variants",
        help="TFLite variants, comma-separated or repeated: float32, float16, "
        "int8-dynamic, int8. Default: all four.",
    ),
]
ParityOpt = Annotated[
    int,
    typer.Option(
        "--parity-lines",
        min=1,
        help="Held-out test lines each variant must read like the Keras model.",
    ),
]


def register(app: typer.Typer) -> None:
    """Add ``export``, ``predict`` and ``run`` to ``app`` (once)."""
    present = {command.callback for command in app.registered_commands}
    for name, command in (("export", export), ("predict", predict), ("run", run)):
        if command not in present:
            app.command(name)(command)


def _quiet_tensorflow() -> None:
    """TensorFlow's C++ info and warning lines drown the output; errors stay."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _variants(given: list[str] | None) -> tuple[str, ...] | None:
    if not given:
        return None
    return tuple(v.strip() for item in given for v in item.split(",") if v.strip())


def _size(count: int | None) -> str:
    if count is None:
        return ""
    return f"{count / 1e6:.2f} MB" if count >= 1e6 else f"{count / 1e3:.0f} KB"


# --------------------------------------------------------------------------
# scribeline export
# --------------------------------------------------------------------------


def export(
    checkpoint_url: Annotated[
        str, typer.Argument(help="Training output URL (holds latest.json).")
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Folder or URL for the .tflite files.")
    ],
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Dataset version for the held-out lines. Default: the one the "
            "checkpoint was trained on."
        ),
    ] = None,
    variants: VariantsOpt = None,
    parity_lines: ParityOpt = 500,
    storage_option: StorageOpt = None,
) -> None:
    """Export a checkpoint to TFLite: float32, float16, int8-dynamic, int8.

    Each variant is written only if its file holds builtin ops only, runs in
    the ai_edge_litert interpreter, and on --parity-lines held-out test lines
    reads like the Keras model (CER within 0.5 points, probabilities within the
    variant's tolerance). A failing variant fails the export; full int8 is
    dropped with a warning instead. Each model gets a JSON file beside it
    (charset, blank, input, normalisation, metrics), also embedded in it.
    """
    _quiet_tensorflow()
    from scribeline.platform.errors import ScribelineError
    from scribeline.platform.export import VARIANTS, export_tflite

    try:
        report = export_tflite(
            checkpoint_url,
            out,
            dataset_url=dataset,
            variants=_variants(variants) or VARIANTS,
            parity_lines=parity_lines,
            storage_options=storage_options(storage_option),
        )
    except (ScribelineError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    _print_export(report)
    kept = [v for v, entry in report["variants"].items() if entry["status"] == "kept"]
    typer.echo(f"wrote {', '.join(kept)} -> {report['output']}")


def _print_export(report: dict[str, Any]) -> None:
    keras = report["keras"]
    table = Table(
        title=f"TFLite export of {report['checkpoint']['name']} "
        f"({report['parity']['lines']} held-out test lines)"
    )
    table.add_column("model", no_wrap=True)
    for column in ("size", "CER", "WER", "prob diff", "ms/line"):
        table.add_column(column, justify="right", no_wrap=True)
    params = f"{keras['parameters'] / 1e3:,.0f}k params"
    table.add_row("keras", params, f"{keras['cer']:.4f}", f"{keras['wer']:.4f}")
    for variant, entry in report["variants"].items():
        if entry["status"] == "dropped":
            table.add_row(variant, "dropped")
            continue
        metrics = entry["metrics"]
        table.add_row(
            variant,
            _size(entry["bytes"]),
            f"{metrics['tflite']['cer']:.4f}",
            f"{metrics['tflite']['wer']:.4f}",
            f"{metrics['max_prob_diff']:.2g}",
            f"{entry['latency']['median_ms']:.1f}",
        )
    console.print(table)
    console.print(
        "prob diff: the largest per-step probability difference to the Keras "
        "model; ms/line: median, one interpreter thread.",
        highlight=False,
    )
    for variant, entry in report["variants"].items():
        if entry["status"] == "dropped":
            console.print(
                f"[yellow]dropped {variant}:[/] {entry['reason']}", highlight=False
            )


# --------------------------------------------------------------------------
# scribeline predict
# --------------------------------------------------------------------------


def predict(
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="A .tflite file from scribeline export."),
    ],
    images: Annotated[
        list[str] | None,
        typer.Argument(help="PNG line images (paths or URLs), any size."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="Evaluate a dataset version's split and print CER/WER."),
    ] = None,
    split: Annotated[
        str, typer.Option(help="Split evaluated with --dataset.")
    ] = "test",
    limit: Annotated[
        int | None, typer.Option(min=1, help="Lines evaluated with --dataset.")
    ] = None,
    threads: Annotated[int, typer.Option(min=1, help="Interpreter threads.")] = 1,
    storage_option: StorageOpt = None,
) -> None:
    """Read PNG line images with an exported TFLite model and print their text.

    One image: its text. Several: one line each, IMAGE<TAB>TEXT. Images of any
    size and polarity are fitted to the model input as the metadata says (height
    scaled, narrower lines padded, wider ones scaled down). With --dataset,
    prints the CER/WER of the model on that dataset version's --split instead.
    """
    from scribeline.platform.errors import ScribelineError
    from scribeline.platform.predict import TFLiteReader, read_png

    if not images and not dataset:
        raise fail("give PNG line images to read, or --dataset URL to evaluate.")
    options = storage_options(storage_option)
    try:
        reader = TFLiteReader.load(model, options, num_threads=threads)
        for image in images or []:
            line = read_png(image, reader.height, reader.width, options)
            text = reader.predict([line])[0]
            typer.echo(text if len(images or []) == 1 else f"{image}\t{text}")
        if dataset:
            result = reader.evaluate_dataset(dataset, split, limit, options)
            typer.echo(
                f"{reader.variant} on {dataset} ({split}, {result.lines:,} lines): "
                f"CER {result.cer:.4f} WER {result.wer:.4f} line accuracy "
                f"{result.line_accuracy:.4f}"
            )
    except (ScribelineError, FileNotFoundError) as err:
        raise fail(str(err)) from err


# --------------------------------------------------------------------------
# scribeline run
# --------------------------------------------------------------------------


def run(
    output: Annotated[
        str, typer.Option("--output", "-o", help="Root folder or URL of the run.")
    ] = "scribeline-data/run",
    glyphs: GlyphsOpt = None,
    emnist_split: SplitOpt = None,
    corpus: CorpusOpt = None,
    lines: Annotated[
        int | None, typer.Option("--lines", "-n", min=1, help="Lines to generate.")
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option(min=1, help="Lines a shard.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Processes that write shards.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", min=1, help="Training steps.")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(min=1, help="Training epochs (instead of --steps)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", min=1, help="Global batch.")
    ] = None,
    lstm_units: Annotated[
        int | None, typer.Option(min=4, help="LSTM units per direction.")
    ] = None,
    full_model: Annotated[
        bool,
        typer.Option(
            "--full-model",
            help="Train TrainSettings' default network instead of the small demo one.",
        ),
    ] = False,
    variants: VariantsOpt = None,
    parity_lines: ParityOpt = 500,
    eval_lines: Annotated[
        int | None,
        typer.Option(min=1, help="Test lines evaluated per variant (default: all)."),
    ] = None,
    prefect: Annotated[
        bool,
        typer.Option(
            "--prefect",
            help="Run as the Prefect flow nightly-pipeline (summary artifact in the "
            "UI at PREFECT_API_URL).",
        ),
    ] = False,
    storage_option: StorageOpt = None,
) -> None:
    """Generate, train, export to TFLite, evaluate: the whole platform.

    A dataset version, a recognizer trained on it, its TFLite models (each
    through the parity gate) and their CER/WER on the test split.

    With no flags it uses the embedded glyphs and corpus and small sizes (a few
    minutes on 2 cores); with --glyphs/--corpus and larger --lines/--steps it
    is the real job. Prints where everything went and a table of the models.
    """
    _quiet_tensorflow()
    from scribeline.flows.pipeline import run_pipeline
    from scribeline.platform.errors import ScribelineError

    settings = {
        k: v
        for k, v in {
            "glyphs": glyphs,
            "emnist_split": emnist_split,
            "corpus": corpus,
            "lines": lines,
            "shard_size": shard_size,
        }.items()
        if v is not None
    }
    training: dict[str, Any] = {
        k: v
        for k, v in {
            "max_steps": steps,
            "epochs": epochs,
            "batch_size": batch_size,
        }.items()
        if v is not None
    }
    if full_model:
        # Every layer size from TrainSettings' defaults, not the demo's.
        from scribeline.platform.train_settings import ModelSettings

        training["model"] = ModelSettings().model_dump()
    if lstm_units is not None:
        training["model"] = {**training.get("model", {}), "lstm_units": lstm_units}
    try:
        summary = run_pipeline(
            output,
            settings=settings,
            training=training,
            variants=_variants(variants),
            parity_lines=parity_lines,
            eval_lines=eval_lines,
            prefect=prefect,
            storage_options=storage_options(storage_option),
            workers=workers,
            echo=typer.echo,
        )
    except (ScribelineError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    data = summary["dataset"]
    splits = ", ".join(f"{s} {n:,}" for s, n in data["by_split"].items())
    table = Table(
        title=f"test split of dataset version {data['version']} "
        f"({data['lines']:,} lines: {splits})"
    )
    table.add_column("model", no_wrap=True)
    for column in ("size", "CER", "WER", "parity dCER", "ms/line"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in summary["models"]:
        if row["status"] == "dropped":
            table.add_row(row["model"], "dropped")
            continue
        size = _size(row.get("bytes"))
        if row["model"] == "keras":
            size = f"{row['parameters'] / 1e3:,.0f}k params"
        delta = row.get("parity_cer_delta")
        table.add_row(
            row["model"],
            size,
            "" if row.get("cer") is None else f"{row['cer']:.4f}",
            "" if row.get("wer") is None else f"{row['wer']:.4f}",
            "" if delta is None else f"{100 * delta:+.2f} pts",
            "" if row.get("latency_ms") is None else f"{row['latency_ms']:.1f}",
        )
    console.print(table)
    console.print(
        "parity dCER: CER minus the Keras model's on the export's held-out lines; "
        "ms/line: median, one interpreter thread.",
        highlight=False,
    )
    for row in summary["models"]:
        if row["status"] == "dropped":
            console.print(
                f"[yellow]dropped {row['model']}:[/] {row['reason']}", highlight=False
            )
    seconds = summary["seconds"]
    typer.echo(
        "seconds: " + ", ".join(f"{stage} {value}" for stage, value in seconds.items())
    )
