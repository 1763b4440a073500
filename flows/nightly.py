"""Nightly regeneration: a new dataset version every night, the last N kept.

    scribeline deploy --root s3://bucket/handwriting --keep 7 \\
        --timezone Europe/Berlin --lines 1000000

``nightly_generate`` writes a new dataset version under ``root``, moves the
``latest.json`` pointer to it, and deletes all but the newest ``keep`` versions
(never the one ``latest.json`` names)::

    <root>/latest.json                      {"version": "versions/2026-03-08-...", ...}
    <root>/versions/2026-03-07-55a3d5bb8698/  manifest.json, shards/
    <root>/versions/2026-03-08-1f0c9e2a4b71/

A version folder is named by its night (the date of the scheduled start in the
deployment's time zone) and the first 12 hex digits of its dataset version. By
default each night gets its own seed (``YYYYMMDD`` of the night), so a retry of
the same night resumes the same folder and yields the same bytes, and a rerun
after success does nothing.

``nightly_deployment`` builds the deployment that ``scribeline deploy`` serves:
a cron schedule with an explicit time zone.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.runtime import flow_run
from prefect.schedules import Cron

from scribeline.flows.generate import (
    credential_safe_flow,
    display_url,
    generate_dataset,
    load_storage_secret,
    resolve_settings,
    runner_choice,
)
from scribeline.platform import dataset
from scribeline.platform.errors import DatasetError, SettingsError
from scribeline.platform.storage import Location, resolve, write_atomic

# 04:00 local time: daylight-saving transitions happen between 00:00 and 03:00
# local time, so 04:00 is never skipped (spring forward) nor repeated (fall
# back); no IANA zone skips or repeats it in 2026-2027 (checked with zoneinfo).
# With a time inside a transition Prefect 3.9 still runs once a night, but at a
# shifted wall time on those nights (02:30 becomes 03:30); older Prefect
# releases and plain cron skip or repeat it.
DEFAULT_CRON = "0 4 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_KEEP = 7
DEPLOYMENT_NAME = "nightly"
LATEST = "latest.json"
LATEST_FORMAT = "scribeline-latest-v1"
VERSIONS = "versions"
VERSIONS_KEY = "nightly-versions"

_VERSION_NAME = re.compile(r"^(\d{4}-\d{2}-\d{2})-([0-9a-f]{12})$")


# --------------------------------------------------------------------------
# Schedules and time zones
# --------------------------------------------------------------------------


def check_timezone(timezone: str) -> ZoneInfo:
    """The IANA zone ``timezone`` (e.g. ``Europe/Berlin``), or a SettingsError."""
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise SettingsError(
            f"unknown time zone {timezone!r}; use an IANA name such as UTC, "
            "Europe/Berlin or America/New_York."
        ) from err


def dst_shifted_days(
    cron: str, timezone: str, start: dt.date | None = None, days: int = 366
) -> list[dt.date]:
    """Days on which a daily ``cron`` (``M H * * *``) time is skipped or repeated
    by a daylight-saving change in ``timezone``; empty for other crons."""
    fields = cron.split()
    if len(fields) != 5 or fields[2:] != ["*", "*", "*"]:
        return []
    if not (fields[0].isdigit() and fields[1].isdigit()):
        return []
    minute, hour = int(fields[0]), int(fields[1])
    zone = check_timezone(timezone)
    start = start or dt.date.today()
    shifted = []
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        wall = dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone)
        repeated = wall.utcoffset() != wall.replace(fold=1).utcoffset()
        skipped = wall.astimezone(dt.UTC).astimezone(zone).time() != wall.time()
        if repeated or skipped:
            shifted.append(day)
    return shifted


def night_of(when: dt.datetime, timezone: str) -> dt.date:
    """The calendar night a run scheduled at ``when`` belongs to, in ``timezone``."""
    return when.astimezone(check_timezone(timezone)).date()


# --------------------------------------------------------------------------
# Versions under a root: list, point latest, prune
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredVersion:
    name: str  # <night>-<12 hex digits of the dataset version>
    night: str
    complete: bool  # manifest.json is in place
    created_at: str  # from the manifest; "" while incomplete

    @property
    def order(self) -> tuple[str, str, str]:
        return (self.night, self.created_at, self.name)


def list_versions(root: Location) -> list[StoredVersion]:
    """Version folders under ``root/versions``, oldest night first."""
    folder = root.child(VERSIONS)
    # Shards may have been written by other processes (Ray workers): a cached
    # listing would miss them.
    root.fs.invalidate_cache(folder.path)
    try:
        entries = root.fs.ls(folder.path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        match = _VERSION_NAME.match(name)
        if not match:
            continue  # not ours (or a temporary object): leave it alone
        manifest = _read_json(folder.child(name, dataset.MANIFEST))
        found.append(
            StoredVersion(
                name,
                match.group(1),
                manifest is not None,
                (manifest or {}).get("created_at", ""),
            )
        )
    return sorted(found, key=lambda v: v.order)


def read_latest(root: Location) -> dict[str, Any] | None:
    """The ``latest.json`` pointer under ``root``, or None."""
    return _read_json(root.child(LATEST))


def latest_url(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The URL of the dataset version that ``<url>/latest.json`` points to."""
    root = resolve(url, storage_options)
    pointer = read_latest(root)
    if pointer is None:
        raise FileNotFoundError(
            f"no {LATEST} under {root.url}: no nightly version has been committed "
            "there yet."
        )
    return root.child(pointer["version"]).url


def point_latest(
    root: Location, name: str, night: dt.date, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Move ``latest.json`` to version ``name``, unless it names a later night
    (a backfill of an old night leaves it where it is). Returns the pointer."""
    current = read_latest(root)
    if current is not None and current.get("night", "") > night.isoformat():
        return current
    pointer = {
        "format": LATEST_FORMAT,
        "version": f"{VERSIONS}/{name}",
        "night": night.isoformat(),
        "dataset_version": manifest["dataset_version"],
        "lines": manifest["totals"]["lines"],
        "created_at": manifest["created_at"],
    }
    # Atomic: a reader sees the old pointer or the new one, never a torn file.
    write_atomic(root.child(LATEST), json.dumps(pointer, indent=2).encode())
    return pointer


def prune_versions(root: Location, keep: int, protect: set[str]) -> list[str]:
    """Delete all but the newest ``keep`` complete versions; return their names.

    Never deleted: the version ``latest.json`` names, the names in ``protect``,
    and incomplete versions newer than the newest complete one (a retry may
    still finish them). Older incomplete versions were abandoned: deleted.
    """
    if keep < 1:
        raise SettingsError(f"keep must be at least 1, got {keep}.")
    pointer = read_latest(root)
    protected = set(protect)
    if pointer is not None:
        protected.add(posixpath.basename(pointer["version"].rstrip("/")))
    versions = list_versions(root)
    complete = [v for v in versions if v.complete]
    kept = {v.name for v in complete[-keep:]}
    newest = complete[-1].order if complete else None
    deleted = []
    for version in versions:
        if version.name in kept or version.name in protected:
            continue
        if not version.complete and (newest is None or version.order > newest):
            continue
        delete_version(root, version.name)
        deleted.append(version.name)
    return deleted


def delete_version(root: Location, name: str) -> None:
    """Delete a version folder, its manifest first: a reader never takes a
    half-deleted version for a complete one."""
    folder = root.child(VERSIONS, name)
    with contextlib.suppress(FileNotFoundError):
        root.fs.rm(folder.child(dataset.MANIFEST).path)
    root.fs.rm(folder.path, recursive=True)
    root.fs.invalidate_cache(folder.path)


def _read_json(loc: Location) -> dict[str, Any] | None:
    try:
        return json.loads(loc.read_bytes())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{loc.url} is not valid JSON ({err}); delete it and run again."
        ) from err


# --------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------


@credential_safe_flow(
    name="nightly-generate",
    description="Write a new dataset version under a root, move latest, prune.",
    validate_parameters=False,  # settings may be a GenerateSettings in-process
)
def nightly_generate(
    root: str,
    keep: int = DEFAULT_KEEP,
    settings: dict[str, Any] | None = None,
    timezone: str = DEFAULT_TIMEZONE,
    night: str | None = None,
    seed_per_night: bool = True,
    runner: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    storage_secret: str | None = None,
    samples: int = 8,
) -> dict[str, Any]:
    """Generate tonight's dataset version under ``root``; return ``latest.json``.

    Args:
        root: folder or URL that holds ``latest.json`` and ``versions/``.
        keep: complete versions to keep (at least 1).
        settings: ``GenerateSettings`` fields; ``output`` is ignored (set per
            version).
        timezone: the schedule's IANA time zone: it decides which night a run
            belongs to.
        night: generate this night (``YYYY-MM-DD``) instead, e.g. a backfill.
        seed_per_night: seed each night with ``YYYYMMDD`` (new lines every
            night); False keeps ``settings.seed``.
        runner, ray_address, workers, storage_secret, samples: as for
            ``generate_dataset``.
    """
    logger = get_run_logger()
    if keep < 1:
        raise SettingsError(f"keep must be at least 1, got {keep}.")
    if night is not None:
        try:
            tonight = dt.date.fromisoformat(night)
        except ValueError as err:
            raise SettingsError(f"night {night!r} is not a YYYY-MM-DD date.") from err
    else:
        tonight = night_of(flow_run.scheduled_start_time, timezone)

    # Settings for tonight: the seed from the night, the folder from the version.
    extra_options = load_storage_secret(storage_secret) if storage_secret else None
    base = resolve_settings(settings, storage_options=extra_options)
    if seed_per_night:
        base = base.model_copy(update={"seed": int(tonight.strftime("%Y%m%d"))})
    version = dataset.dataset_version(base, dataset.load_sources(base))
    name = f"{tonight.isoformat()}-{version[:12]}"
    top = resolve(root, base.storage_options)
    output = top.child(VERSIONS, name).url
    logger.info("night %s: dataset version %s -> %s", tonight, version, name)

    # Generate (a subflow: its progress, summary and samples show under it).
    manifest = generate_dataset(
        settings=base.model_copy(update={"output": output}),
        runner=runner,
        ray_address=ray_address,
        workers=workers,
        samples=samples,
    )

    # Point latest at it, then prune: never the other way round.
    pointer = point_latest(top, name, tonight, manifest)
    if pointer["version"].endswith(name):
        logger.info("latest -> %s", pointer["version"])
    else:
        logger.warning(
            "night %s is older than the latest version (%s): latest left as is",
            tonight,
            pointer["version"],
        )
    deleted = prune_versions(top, keep, protect={name})
    for gone in deleted:
        logger.info("deleted old version %s", gone)
    publish_versions(top, pointer, deleted)
    return pointer


def publish_versions(
    root: Location, pointer: dict[str, Any], deleted: list[str]
) -> None:
    latest = posixpath.basename(pointer["version"])
    rows = [
        {
            "version": v.name,
            "night": v.night,
            "status": "latest" if v.name == latest else "kept",
            "complete": v.complete,
            "created_at": v.created_at,
        }
        for v in list_versions(root)
    ]
    rows += [
        {"version": n, "night": n[:10], "status": "deleted", "complete": None}
        for n in deleted
    ]
    create_table_artifact(
        rows,
        key=VERSIONS_KEY,
        description=f"dataset versions under {display_url(root.url)}",
    )


# --------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------


def nightly_deployment(
    root: str,
    *,
    keep: int = DEFAULT_KEEP,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    settings: dict[str, Any] | None = None,
    name: str = DEPLOYMENT_NAME,
    runner: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    storage_secret: str | None = None,
    seed_per_night: bool = True,
    samples: int = 8,
) -> RunnerDeployment:
    """The nightly deployment: ``nightly_generate`` on ``cron`` in ``timezone``.

    Serve it with ``prefect.serve(nightly_deployment(...))`` (what
    ``scribeline deploy`` does). Deployment parameters are stored by the API:
    ``settings`` may not hold storage options; give credentials with
    ``storage_secret`` or environment variables where it is served.
    """
    check_timezone(timezone)
    if runner is not None:
        runner_choice(runner, ray_address)
    if keep < 1:
        raise SettingsError(f"keep must be at least 1, got {keep}.")
    if settings and "storage_options" in settings:
        raise SettingsError(
            "deployment parameters are stored and shown by Prefect: keep storage "
            "options out of settings and pass storage_secret (a Prefect Secret "
            "block) or set SCRIBELINE_STORAGE_OPTIONS / AWS_* where it is served."
        )
    resolve_settings(settings)  # fail now, not at 04:00
    parameters: dict[str, Any] = {"root": root, "keep": keep, "timezone": timezone}
    optional = {
        "settings": settings or None,
        "runner": runner,
        "ray_address": ray_address,
        "workers": workers,
        "storage_secret": storage_secret,
    }
    parameters.update({k: v for k, v in optional.items() if v is not None})
    parameters.update(seed_per_night=seed_per_night, samples=samples)
    return nightly_generate.to_deployment(
        name,
        schedule=Cron(cron, timezone=timezone),
        parameters=parameters,
        description=f"A new dataset version under {display_url(root)} every night "
        f"({cron} {timezone}), the last {keep} kept.",
        tags=["scribeline"],
        # A module path, not a file path: a file path would put the repository
        # root on sys.path, where `platform/` shadows the standard library.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
