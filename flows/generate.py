"""Prefect flow: generate a dataset version and show it in the Prefect UI.

    scribeline generate --prefect --lines 100000 --output s3://bucket/ds
    python -c "from scribeline.flows.generate import generate_dataset; \\
        generate_dataset({'lines': 100000, 'output': 'out/ds'})"

``generate_dataset`` plans the shards, skips the ones the output already holds
(a rerun after a crash finishes only what is missing, with the same bytes),
dispatches the rest to local processes or to Ray, commits the manifest, and
publishes to the flow run:

- a progress artifact (key ``generate-progress``), updated from the flow at a
  steady cadence as shards land, never from the workers;
- a markdown summary (``dataset-summary``): lines, shards, bytes, lines/s,
  charset, corpus stats, dataset version;
- a table of the splits (``dataset-splits``);
- sample line images (``dataset-samples``): a PNG grid embedded as a data URI;
- run logs at stage boundaries (per-shard detail at debug).

Credentials. Flow parameters are stored by the Prefect API and shown in the UI,
so storage credentials must never be parameters. Three ways to give them, all
kept out of the API:

- environment: ``SCRIBELINE_STORAGE_OPTIONS`` (JSON, read by the settings) or
  the standard ``AWS_*`` variables that s3fs reads itself;
- ``storage_secret``: the name of a Prefect ``Secret`` block holding the
  storage options as a JSON object (encrypted at rest by the server);
- in-process only: ``settings`` with ``storage_options``. Flows here are
  ``CredentialSafeFlow``: any ``storage_options`` in their parameters is
  replaced by ``**********`` before the flow run is sent to the API, so a
  deployment run would receive the placeholder, not the credentials. Use one
  of the two ways above for deployments.
"""

from __future__ import annotations

import base64
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import Flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from pydantic import ValidationError

from scribeline.platform import dataset
from scribeline.platform.dataset import Runner, ShardRecord
from scribeline.platform.errors import SettingsError, StorageError
from scribeline.platform.settings import GenerateSettings

REDACTED = "**********"
PROGRESS_KEY = "generate-progress"
SUMMARY_KEY = "dataset-summary"
SPLITS_KEY = "dataset-splits"
SAMPLES_KEY = "dataset-samples"
RUNNERS = ("local", "ray")

# The progress artifact is rewritten at most this often: one API call per
# shard would cost more than the shard itself with 100,000 small shards.
PROGRESS_INTERVAL_S = 2.0


# --------------------------------------------------------------------------
# Flows whose parameters never carry credentials
# --------------------------------------------------------------------------


class CredentialSafeFlow(Flow):
    """A Prefect flow that strips storage credentials from its stored parameters.

    Prefect stores the parameters of every flow run (``serialize_parameters``)
    and shows them in the UI. Here any ``storage_options`` value, at any depth,
    becomes ``**********``, and objects that are not plain JSON (a runner
    holding a filesystem, say) are stored as ``<TypeName>`` only. The flow
    function itself still receives the real values in-process.
    """

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        plain = {key: _plain(value) for key, value in parameters.items()}
        return _redact(super().serialize_parameters(plain))


def credential_safe_flow(**options: Any):
    """``@flow(**options)``, building a ``CredentialSafeFlow``."""

    def decorate(fn):
        return CredentialSafeFlow(fn, **options)

    return decorate


def _plain(value: Any) -> Any:
    if isinstance(value, GenerateSettings):
        return value.model_dump(mode="json")  # redacted below
    if value is None or isinstance(value, str | int | float | bool | dict | list):
        return value
    return f"<{type(value).__name__}>"


def _redact(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            key: REDACTED if key == "storage_options" and value else _redact(value)
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [_redact(v) for v in obj]
    return obj


def secret_values(storage_options: Mapping[str, Any]) -> list[str]:
    """The strings in storage options that look like credentials (for scrubbing)."""
    found = []
    for key, value in storage_options.items():
        if isinstance(value, Mapping):
            found.extend(secret_values(value))
        elif isinstance(value, str) and re.search(
            r"key|secret|token|password|credential", key, re.IGNORECASE
        ):
            found.append(value)
    return [v for v in found if len(v) >= 4]


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


# --------------------------------------------------------------------------
# Settings, credentials and the runner
# --------------------------------------------------------------------------


def resolve_settings(
    settings: GenerateSettings | Mapping[str, Any] | None,
    *,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> GenerateSettings:
    """Settings from a ``GenerateSettings``, a dict of fields, or None (env and
    defaults), with local ``workers`` and extra ``storage_options`` merged in.

    Validation errors name the field and the rule, never the input values (the
    input may hold credentials).
    """
    if isinstance(settings, GenerateSettings):
        values = settings.model_dump()
    elif settings is None or isinstance(settings, Mapping):
        values = dict(settings or {})
    else:
        raise SettingsError(
            f"settings must be a GenerateSettings or a dict of its fields, got "
            f"{type(settings).__name__}."
        )
    if values.get("storage_options") == REDACTED:
        raise SettingsError(
            "settings.storage_options holds the redaction placeholder: storage "
            "credentials are never flow parameters. Give them with storage_secret "
            "(a Prefect Secret block) or SCRIBELINE_STORAGE_OPTIONS / AWS_* "
            "environment variables where the flow runs."
        )
    if workers is not None:
        values["workers"] = workers
    try:
        resolved = GenerateSettings(**values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}"
            for e in err.errors()
        )
        raise SettingsError(f"invalid generation settings: {problems}.") from None
    if storage_options:
        merged = {**resolved.storage_options, **storage_options}
        resolved = resolved.model_copy(update={"storage_options": merged})
    return resolved


def load_storage_secret(name: str) -> dict[str, Any]:
    """Storage options kept in the Prefect ``Secret`` block ``name``."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as err:
        raise SettingsError(
            f"no Prefect Secret block named {name!r}: create it with "
            f"Secret(value={{...storage options...}}).save({name!r})."
        ) from err
    if not isinstance(value, dict):
        raise SettingsError(
            f"the Secret block {name!r} must hold the storage options as a JSON "
            f"object (e.g. {{'key': ..., 'secret': ...}}), got a "
            f"{type(value).__name__}."
        )
    return value


def runner_choice(runner: str | None, ray_address: str | None) -> str:
    """``runner`` checked; None means Ray when ``ray_address`` is given."""
    choice = runner or ("ray" if ray_address else "local")
    if choice not in RUNNERS:
        raise SettingsError(
            f"runner {choice!r} is not known; use one of {', '.join(RUNNERS)}."
        )
    return choice


def make_runner(
    runner: str | Runner | None, ray_address: str | None, workers: int | None
) -> Runner | None:
    """The shard runner: None (dataset.generate's local one), Ray, or a runner
    object given as is (in-process callers)."""
    if callable(runner):
        return runner
    choice = runner_choice(runner, ray_address)
    if choice == "local":
        return None  # dataset.generate's own: this process or settings.workers
    try:
        from scribeline.workers.generate import RayRunner
    except ImportError as err:
        raise NotImplementedError(
            "the Ray runner (scribeline.workers.generate.RayRunner) is not "
            f"available here ({err}); use runner='local'."
        ) from err
    return RayRunner(address=ray_address, num_workers=workers)


# --------------------------------------------------------------------------
# Progress, reported from the flow
# --------------------------------------------------------------------------


class ShardProgress:
    """Counts committed shards and keeps one progress artifact up to date.

    ``on_shard`` is ``dataset.generate``'s callback: it runs in the flow, once
    per committed shard, and writes to the API at most every ``interval``
    seconds (and at the last shard).
    """

    def __init__(self, total: int, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.total = total
        self.interval = interval
        self.written = 0  # shards this run wrote
        self.already = 0  # shards committed before this run
        self.lines = 0  # lines this run wrote
        self.started = time.perf_counter()
        self.ended: float | None = None
        self._last_report = self.started
        self._logger = get_run_logger()
        self.artifact_id = create_progress_artifact(
            0.0, key=PROGRESS_KEY, description=f"0 of {total} shards committed"
        )

    def on_shard(self, record: ShardRecord, done: int, total: int) -> None:
        if self.written == 0:
            self.already = done - 1
        self.written += 1
        self.lines += record.rows
        self._logger.debug(
            "committed %s: %d lines, %d bytes, %.2f s",
            record.name,
            record.rows,
            record.bytes,
            record.seconds,
        )
        now = time.perf_counter()
        if done == total or now - self._last_report >= self.interval:
            self._last_report = now
            self.report(done, total)

    def report(self, done: int, total: int) -> None:
        rate = self.lines / max(time.perf_counter() - self.started, 1e-9)
        update_progress_artifact(
            self.artifact_id,
            100.0 * done / max(total, 1),
            description=f"{done} of {total} shards committed ({rate:,.0f} lines/s)",
        )
        self._logger.info(
            "%d of %d shards committed, %s lines written by this run (%s lines/s)",
            done,
            total,
            f"{self.lines:,}",
            f"{rate:,.0f}",
        )

    def finish(self) -> None:
        """Stop the clock: the run's shards are all committed."""
        self.ended = time.perf_counter()
        if self.written == 0:  # the version was complete before this run
            self.already = self.total
            self.report(self.total, self.total)

    @property
    def seconds(self) -> float:
        return (self.ended or time.perf_counter()) - self.started


# --------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------


@credential_safe_flow(
    name="generate-dataset",
    description="Generate a dataset version of synthetic handwritten line images.",
    validate_parameters=False,  # settings may be a GenerateSettings; checked below
)
def generate_dataset(
    settings: dict[str, Any] | None = None,
    runner: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    storage_secret: str | None = None,
    samples: int = 8,
) -> dict[str, Any]:
    """Generate a dataset version and return its manifest.

    Args:
        settings: ``GenerateSettings`` fields (a dict, or a ``GenerateSettings``
            in-process); fields not given come from ``SCRIBELINE_*`` variables
            and the defaults. ``output`` is the dataset version URL.
        runner: ``local`` (this process or ``workers`` local processes) or
            ``ray``; default: ``ray`` when ``ray_address`` is given. In-process
            callers may pass a runner object (``dataset.Runner``).
        ray_address: a Ray cluster (``ray://host:10001``, ``auto``); None
            starts a local one.
        workers: local processes, or Ray workers.
        storage_secret: name of a Prefect ``Secret`` block with the storage
            options (credentials) as a JSON object.
        samples: line images shown in the samples artifact (0: none).
    """
    logger = get_run_logger()
    extra_options = load_storage_secret(storage_secret) if storage_secret else None
    local = not callable(runner) and runner_choice(runner, ray_address) == "local"
    resolved = resolve_settings(
        settings,
        workers=workers if local else None,  # Ray workers are not processes here
        storage_options=extra_options,
    )
    secrets = secret_values(resolved.storage_options)
    try:
        return _generate(resolved, runner, ray_address, workers, samples, logger)
    except Exception as err:
        # Storage libraries put what they were given into some messages; the
        # flow run's state message and logs must not carry credentials.
        message = str(err)
        if any(s in message for s in secrets):
            raise StorageError(scrub(message, secrets)) from None
        raise


def _generate(
    settings: GenerateSettings,
    runner: str | Runner | None,
    ray_address: str | None,
    workers: int | None,
    samples: int,
    logger: Any,
) -> dict[str, Any]:
    # Plan: every shard of the version, in a fixed order.
    plans = dataset.plan_shards(settings)
    shard_runner = make_runner(runner, ray_address, workers)
    logger.info(
        "generating %s lines in %d shards to %s with the %s runner",
        f"{settings.lines:,}",
        len(plans),
        display_url(settings.output),
        type(shard_runner).__name__ if shard_runner else "local",
    )

    # Dispatch: dataset.generate skips committed shards and commits the manifest.
    progress = ShardProgress(len(plans))
    manifest = dataset.generate(settings, progress.on_shard, shard_runner)
    progress.finish()
    logger.info(
        "dataset version %s committed: %d shards written by this run, %d were "
        "already committed",
        manifest["dataset_version"],
        progress.written,
        progress.already,
    )

    # Publish: summary, splits, sample line images.
    publish_summary(manifest, settings.output, progress)
    if samples > 0:
        publish_samples(settings, samples)
    return manifest


# --------------------------------------------------------------------------
# Publishing to the Prefect UI
# --------------------------------------------------------------------------


def display_url(url: str) -> str:
    """A URL safe to show: any ``user:password@`` part removed."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", url)


def _md(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    """A markdown code span that survives backticks in ``text``."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def summary_markdown(
    manifest: dict[str, Any], output: str, progress: ShardProgress
) -> str:
    totals = manifest["totals"]
    layout = manifest["settings"]["layout"]
    charset = manifest["charset"]
    corpus = ", ".join(
        f"{k} {v}" for k, v in manifest["corpus"].items() if not isinstance(v, dict)
    )
    rate = progress.lines / max(progress.seconds, 1e-9)
    rows = [
        ("dataset version", f"`{manifest['dataset_version']}`"),
        ("output", f"`{display_url(output)}`"),
        ("lines", f"{totals['lines']:,}"),
        (
            "shards",
            f"{totals['shards']:,} ({progress.written:,} written by this run, "
            f"{progress.already:,} already committed)",
        ),
        ("bytes", f"{totals['bytes']:,} ({totals['bytes_per_line']:,} per line)"),
        (
            "lines/s",
            f"{rate:,.0f} ({progress.lines:,} lines in {progress.seconds:.2f} s)",
        ),
        ("layout", f"{layout['mode']}, height {layout['height']} px"),
        # The charset itself goes below, in a code span: escaped for a table
        # cell it would be unreadable.
        ("charset", f"{len(charset['chars'])} chars ({charset['version']})"),
        ("glyphs", f"{manifest['sources']['glyphs'].get('kind')}"),
        ("corpus", f"{manifest['sources']['corpus'].get('kind')}: {corpus}"),
        ("seed", manifest["settings"]["seed"]),
        ("scribeline", manifest["scribeline_version"]),
    ]
    lines = [
        f"# Dataset version {manifest['dataset_version']}",
        "",
        "| | |",
        "|---|---|",
        *(f"| {_md(k)} | {_md(v)} |" for k, v in rows),
        "",
        f"Charset: {_code(charset['chars'])}",
    ]
    return "\n".join(lines) + "\n"


def publish_summary(
    manifest: dict[str, Any], output: str, progress: ShardProgress
) -> None:
    create_markdown_artifact(
        summary_markdown(manifest, output, progress),
        key=SUMMARY_KEY,
        description=f"dataset version {manifest['dataset_version']}",
    )
    create_table_artifact(
        [
            {"split": split, **entry}
            for split, entry in manifest["totals"]["by_split"].items()
        ],
        key=SPLITS_KEY,
        description="lines, shards and bytes per split",
    )


def samples_markdown(png: bytes, title: str) -> str:
    encoded = base64.b64encode(png).decode("ascii")
    return f"# {title}\n\n![sample line images](data:image/png;base64,{encoded})\n"


def publish_samples(settings: GenerateSettings, count: int) -> None:
    """A PNG grid of the first ``count`` line images, as a markdown artifact."""
    from scribeline.platform.preview import samples_from_dataset, write_grid

    picked = samples_from_dataset(
        settings.output, count, None, settings.storage_options
    )
    with tempfile.TemporaryDirectory(prefix="scribeline-samples-") as folder:
        png = write_grid(picked, Path(folder) / "samples.png").read_bytes()
    create_markdown_artifact(
        samples_markdown(png, f"{len(picked)} sample line images"),
        key=SAMPLES_KEY,
        description="the first line images of the dataset version, with their text",
    )


# --------------------------------------------------------------------------
# For the CLI: `scribeline generate --prefect`
# --------------------------------------------------------------------------


def run_generate_flow(
    settings: GenerateSettings,
    *,
    runner: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    samples: int = 8,
) -> dict[str, Any]:
    """Run ``generate_dataset`` as a Prefect flow in this process; return the
    manifest.

    The flow run goes to the API in ``PREFECT_API_URL`` (or a temporary
    local server when none is set). ``settings.storage_options`` reach the
    flow in-process and never the API.
    """
    return generate_dataset(
        settings=settings,
        runner=runner,
        ray_address=ray_address,
        workers=workers,
        samples=samples,
    )
