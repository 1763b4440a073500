"""The ``scribeline`` command.

    scribeline generate --glyphs ../shared/data/emnist \\
        --corpus ../shared/data/wikisplit/test.tsv --lines 100000 --output out/ds
    scribeline preview --dataset out/ds --out preview.png
    scribeline inspect out/ds

Every option of ``generate`` can also come from ``SCRIBELINE_*`` environment
variables (see ``scribeline.platform.settings``); flags win.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from scribeline import __version__
from scribeline.common import (
    CorpusOpt,
    GlyphsOpt,
    SplitOpt,
    StorageOpt,
    console,
    fail,
    storage_options,
)
from scribeline.platform.errors import ScribelineError

logger = logging.getLogger(__name__)
app = typer.Typer(
    name="scribeline",
    help="Synthetic handwritten-line datasets from EMNIST glyphs, and recognizers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logs.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """scribeline: make synthetic handwriting datasets and train line recognizers."""
    _setup_logging(verbose)


def _settings(overrides: dict[str, Any]) -> Any:
    """Build settings from flags that were given; the rest from env/defaults."""
    from scribeline.platform.settings import GenerateSettings

    given = {k: v for k, v in overrides.items() if v is not None}
    layout = {k: v for k, v in given.pop("layout", {}).items() if v is not None}
    if layout:
        base = GenerateSettings().layout.model_dump()
        given["layout"] = {**base, **layout}
    try:
        return GenerateSettings(**given)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise fail(f"{where}: {first['msg']} (got {first.get('input')!r})") from err


@app.command()
def generate(
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Dataset version URL.")
    ] = None,
    glyphs: GlyphsOpt = None,
    emnist_split: SplitOpt = None,
    corpus: CorpusOpt = None,
    lines: Annotated[int | None, typer.Option("--lines", "-n", help="Lines.")] = None,
    shard_size: Annotated[int | None, typer.Option(help="Lines per shard.")] = None,
    seed: Annotated[int | None, typer.Option(help="Dataset seed.")] = None,
    layout: Annotated[
        str | None, typer.Option(help="seed (fixed slots) or natural (jitter).")
    ] = None,
    max_chars: Annotated[int | None, typer.Option(help="Characters a line.")] = None,
    height: Annotated[int | None, typer.Option(help="Line image height, px.")] = None,
    overflow: Annotated[
        str | None, typer.Option(help="Long sentences: cut or wrap.")
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(help="Share of sentences, glyph images and lines for val."),
    ] = None,
    test_fraction: Annotated[
        float | None,
        typer.Option(help="Share of sentences, glyph images and lines for test."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Processes, or Ray workers with --ray-address (same output)."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Write shards on Ray: 'local' starts a local cluster, 'auto' or "
            "ray://host:10001 joins one."
        ),
    ] = None,
    prefect: Annotated[
        bool,
        typer.Option(
            "--prefect",
            help="Run as the Prefect flow generate-dataset (progress, summary and "
            "samples in the Prefect UI at PREFECT_API_URL).",
        ),
    ] = False,
    storage_option: StorageOpt = None,
) -> None:
    """Generate a dataset version: line images in Parquet shards + manifest.json.

    With no --glyphs and no --corpus it uses the embedded default (handwriting
    fonts and the pyjokes corpus), which needs no download. The plain run uses
    this process (or --workers local processes); --ray-address spreads shards
    over a Ray cluster; --prefect runs it as a Prefect flow.
    """
    from scribeline.platform import dataset

    settings = _settings(
        {
            "output": output,
            "glyphs": glyphs,
            "emnist_split": emnist_split,
            "corpus": corpus,
            "lines": lines,
            "shard_size": shard_size,
            "seed": seed,
            "overflow": overflow,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "workers": workers,
            "storage_options": storage_options(storage_option),
            "layout": {"mode": layout, "max_chars": max_chars, "height": height},
        }
    )
    address = None if ray_address in (None, "local") else ray_address
    try:
        if prefect:
            from scribeline.flows.generate import run_generate_flow

            manifest = run_generate_flow(
                settings,
                runner="ray" if ray_address else "local",
                ray_address=address,
                workers=settings.workers,
            )
        else:
            runner = None
            if ray_address:
                from scribeline.workers.generate import RayRunner

                runner = RayRunner(address=address, num_workers=settings.workers)
            manifest = _generate_with_progress(dataset, settings, runner)
    except (ScribelineError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    except KeyboardInterrupt:
        console.print(
            "interrupted: committed shards are kept; rerun the same command to "
            "finish the rest.",
            highlight=False,
        )
        raise typer.Exit(130) from None
    _print_summary(manifest)
    typer.echo(f"dataset version {manifest['dataset_version']} -> {settings.output}")


def _generate_with_progress(dataset: Any, settings: Any, runner: Any) -> dict:
    with _progress() as progress:
        task = progress.add_task("shards", total=None)

        def on_shard(record: Any, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return dataset.generate(settings, on_shard=on_shard, runner=runner)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def _print_summary(manifest: dict[str, Any]) -> None:
    totals = manifest["totals"]
    table = Table(title=f"dataset version {manifest['dataset_version']}")
    table.add_column("split")
    table.add_column("lines", justify="right")
    table.add_column("shards", justify="right")
    table.add_column("bytes", justify="right")
    for split, entry in totals["by_split"].items():
        table.add_row(
            split, f"{entry['lines']:,}", str(entry["shards"]), f"{entry['bytes']:,}"
        )
    table.add_row(
        "total",
        f"{totals['lines']:,}",
        str(totals["shards"]),
        f"{totals['bytes']:,}",
        style="bold",
    )
    console.print(table)
    seconds = manifest["generation"]["seconds"]
    rate = totals["lines"] / seconds if seconds else float("nan")
    console.print(
        f"{totals['bytes_per_line']:.0f} bytes/line, {seconds:.1f} s "
        f"({rate:,.0f} lines/s), charset {manifest['charset']['chars']!r}",
        highlight=False,
    )


@app.command()
def preview(
    dataset_url: Annotated[
        str | None,
        typer.Option("--dataset", help="Preview an existing dataset version."),
    ] = None,
    out: Annotated[Path, typer.Option(help="PNG grid to write.")] = Path("preview.png"),
    count: Annotated[int, typer.Option(min=1, max=1000, help="Lines to show.")] = 12,
    split: Annotated[str | None, typer.Option(help="train, val or test.")] = None,
    png_dir: Annotated[
        Path | None, typer.Option(help="Also write each line as its own PNG here.")
    ] = None,
    glyphs: GlyphsOpt = None,
    emnist_split: SplitOpt = None,
    corpus: CorpusOpt = None,
    layout: Annotated[str | None, typer.Option(help="seed or natural.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    storage_option: StorageOpt = None,
) -> None:
    """Write a PNG grid of sample line images with their text.

    From an existing dataset (--dataset URL) or rendered now from settings.
    """
    from scribeline.platform import preview as previews

    if out.suffix.lower() != ".png" or out.is_dir():
        raise fail(f"--out {out} must name a .png file, e.g. --out preview.png")
    if png_dir is not None and png_dir.exists() and not png_dir.is_dir():
        raise fail(f"--png-dir {png_dir} is a file; name a folder for the PNGs.")
    options = storage_options(storage_option)
    try:
        if dataset_url:
            samples = previews.samples_from_dataset(dataset_url, count, split, options)
        else:
            settings = _settings(
                {
                    "glyphs": glyphs,
                    "emnist_split": emnist_split,
                    "corpus": corpus,
                    "seed": seed,
                    "storage_options": options,
                    "layout": {"mode": layout},
                }
            )
            samples = previews.samples_from_settings(settings, count, split or "train")
        previews.write_grid(samples, out)
        if png_dir is not None:
            written = previews.write_pngs(samples, png_dir)
            typer.echo(f"{len(written)} line images -> {png_dir}")
    except (ScribelineError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    typer.echo(f"{len(samples)} lines -> {out}")


@app.command()
def inspect(
    dataset_url: Annotated[str, typer.Argument(help="Dataset version URL.")],
    verify: Annotated[
        bool, typer.Option(help="Check every shard's size and sha256.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest.")
    ] = False,
    storage_option: StorageOpt = None,
) -> None:
    """Summarise a dataset version and verify every shard's checksum."""
    from scribeline.platform import dataset

    options = storage_options(storage_option)
    try:
        manifest = dataset.read_manifest(dataset_url, options)
        problems = dataset.verify(dataset_url, options) if verify else []
    except (ScribelineError, FileNotFoundError) as err:
        raise fail(str(err)) from err
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        if verify and not problems:  # stdout stays pure JSON
            console.print(f"verified {len(manifest['shards'])} shards", highlight=False)
        elif problems:
            for problem in problems:
                console.print(f"bad shard {problem}", highlight=False)
            raise typer.Exit(2)
        return
    else:
        _print_summary(manifest)
        corpus = manifest["corpus"]
        console.print(
            f"created {manifest['created_at']} by scribeline "
            f"{manifest['scribeline_version']}; layout "
            f"{manifest['settings']['layout']['mode']}; glyphs "
            f"{manifest['sources']['glyphs'].get('kind')} "
            f"({manifest['glyph_bank']['images']:,} images); corpus "
            f"{manifest['sources']['corpus'].get('kind')} "
            f"({json.dumps(corpus, separators=(',', ':'))})",
            highlight=False,
            soft_wrap=True,
        )
    if verify:
        if problems:
            for problem in problems:
                console.print(f"[red]bad shard[/] {problem}", highlight=False)
            raise fail(
                f"{len(problems)} of {len(manifest['shards'])} shards fail "
                "verification; rerun the generate command that made this dataset "
                "version: it rewrites missing and damaged shards."
            )
        typer.echo(f"verified {len(manifest['shards'])} shards: all checksums match")


def _register_commands() -> None:
    from scribeline.deploy_cmd import register as register_deploy
    from scribeline.export_cmd import register as register_export
    from scribeline.stack_cmd import register as register_stack
    from scribeline.train_cmd import register as register_train

    register_train(app)
    register_export(app)
    register_deploy(app)
    register_stack(app)


_register_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
