"""``scribeline deploy``: serve the nightly regeneration deployment.

    scribeline deploy --root s3://bucket/handwriting --keep 7 \\
        --timezone Europe/Berlin --lines 1000000 --storage-secret s3-creds

Wired into the ``scribeline`` command by ``register(app)``.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from scribeline.common import CorpusOpt, GlyphsOpt

DEPLOY_HELP = """Serve the nightly deployment in this process until Ctrl-C.

Registers the `nightly-generate/<name>` deployment with the Prefect API in
PREFECT_API_URL, on a cron schedule in an explicit time zone, and runs its
flow runs here. Every night writes a new dataset version under --root, moves
<root>/latest.json to it and keeps the newest --keep versions.

Credentials never go into the deployment (Prefect stores and shows its
parameters): use --storage-secret (a Prefect Secret block holding the storage
options as JSON) or set SCRIBELINE_STORAGE_OPTIONS / AWS_* in this
environment; flow runs inherit it.
"""


def register(app: typer.Typer) -> None:
    """Add the ``deploy`` command to ``app`` (once: calling again is a no-op)."""
    if any(command.callback is deploy for command in app.registered_commands):
        return
    app.command("deploy", help=DEPLOY_HELP)(deploy)


def deploy(
    root: Annotated[
        str,
        typer.Option(
            "--root", help="Folder or URL for latest.json and versions/ (s3://...)."
        ),
    ],
    keep: Annotated[
        int, typer.Option(min=1, help="Complete dataset versions to keep.")
    ] = 7,
    cron: Annotated[
        str,
        typer.Option(
            help="When to run, in --timezone. 04:00 is never skipped or repeated "
            "by daylight-saving changes."
        ),
    ] = "0 4 * * *",
    timezone: Annotated[
        str, typer.Option(help="IANA time zone of --cron, e.g. Europe/Berlin.")
    ] = "UTC",
    name: Annotated[str, typer.Option(help="Deployment name.")] = "nightly",
    lines: Annotated[
        int | None, typer.Option("--lines", "-n", help="Lines a night.")
    ] = None,
    glyphs: GlyphsOpt = None,
    corpus: CorpusOpt = None,
    shard_size: Annotated[int | None, typer.Option(help="Lines per shard.")] = None,
    layout: Annotated[
        str | None, typer.Option(help="seed (fixed slots) or natural (jitter).")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Fixed seed for every night (default: YYYYMMDD a night)."),
    ] = None,
    runner: Annotated[
        str | None,
        typer.Option(help="local or ray (default: ray when --ray-address is given)."),
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster (ray://host:10001, auto).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Local processes, or Ray workers.")
    ] = None,
    storage_secret: Annotated[
        str | None,
        typer.Option(help="Prefect Secret block with the storage options (JSON)."),
    ] = None,
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline/--dataset-only",
            help="Every night run the whole pipeline (generate, train, export, "
            "evaluate: nightly-pipeline/NAME), or only generate a dataset version "
            "(nightly-generate/NAME, the default).",
        ),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Training steps a night (--pipeline)."),
    ] = None,
    parity_lines: Annotated[
        int,
        typer.Option(
            min=1,
            help="Held-out lines each TFLite export must read like the Keras model "
            "(--pipeline); the test split must hold at least this many.",
        ),
    ] = 500,
) -> None:
    from scribeline.flows import nightly
    from scribeline.platform.errors import ScribelineError

    settings: dict[str, Any] = {
        k: v
        for k, v in {
            "lines": lines,
            "glyphs": glyphs,
            "corpus": corpus,
            "shard_size": shard_size,
            "seed": seed,
        }.items()
        if v is not None
    }
    if layout is not None:
        settings["layout"] = {"mode": layout}
    try:
        if pipeline:
            from scribeline.flows.pipeline import nightly_pipeline_deployment

            deployment = nightly_pipeline_deployment(
                root,
                keep=keep,
                cron=cron,
                timezone=timezone,
                settings=settings or None,
                training={"max_steps": steps} if steps else None,
                parity_lines=parity_lines,
                name=name,
                runner=runner,
                ray_address=ray_address,
                workers=workers,
                storage_secret=storage_secret,
                seed_per_night=seed is None,
            )
        else:
            deployment = nightly.nightly_deployment(
                root,
                keep=keep,
                cron=cron,
                timezone=timezone,
                settings=settings or None,
                name=name,
                runner=runner,
                ray_address=ray_address,
                workers=workers,
                storage_secret=storage_secret,
                seed_per_night=seed is None,
            )
    except (ScribelineError, ValueError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from err

    shifted = nightly.dst_shifted_days(cron, timezone)
    if shifted:
        typer.secho(
            f"warning: {cron!r} in {timezone} falls in a daylight-saving change on "
            f"{', '.join(d.isoformat() for d in shifted)}: those nights run at a "
            "shifted time. Pick a time from 04:00 to 23:59 to avoid it.",
            fg="yellow",
            err=True,
        )
    flow_name = "nightly-pipeline" if pipeline else "nightly-generate"
    typer.echo(
        f"serving {flow_name}/{name}: {cron} ({timezone}), root {root}, keep {keep}"
    )
    _serve(deployment)


def _serve(deployment: Any) -> None:
    """Serve until interrupted. Flow runs start as `python -m prefect.engine`
    subprocesses; PYTHONSAFEPATH keeps the working directory off their
    sys.path, where a checkout's `platform/` would shadow the standard
    library."""
    from prefect import serve

    os.environ.setdefault("PYTHONSAFEPATH", "1")
    serve(deployment)
