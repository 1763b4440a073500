"""Prefect flows: artifacts, resume, nightly versions, credentials, schedules,
the deploy command, and one run against a real `prefect server start`."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image

from scribeline.flows import nightly
from scribeline.flows.generate import (
    PROGRESS_KEY,
    REDACTED,
    SAMPLES_KEY,
    SPLITS_KEY,
    SUMMARY_KEY,
    generate_dataset,
    run_generate_flow,
)
from scribeline.platform import dataset
from scribeline.platform.settings import GenerateSettings
from scribeline.platform.storage import resolve

# Credentials no flow run may show: moto accepts any key, so these are unusual
# enough that finding them anywhere means a leak.
FAKE_KEY = "AKIASCRIBELINEFAKE7Q"
FAKE_SECRET = "sEcReT-scribeline-3f9c1d7e-must-never-be-logged"


def tiny(output, **overrides) -> dict:
    """A 5-shard dataset on the embedded default (fonts + pyjokes)."""
    return {"output": str(output), "lines": 240, "shard_size": 100, "seed": 3} | (
        overrides
    )


def shard_hashes(manifest: dict) -> dict[str, str]:
    return {s["name"]: s["sha256"] for s in manifest["shards"]}


# --------------------------------------------------------------------------
# Reading back through the Prefect API
# --------------------------------------------------------------------------


def client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def flow_run_of(state):
    with client() as c:
        return c.read_flow_run(state.state_details.flow_run_id)


def artifacts_of(flow_run_id) -> dict:
    """The artifacts of a flow run by key."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client() as c:
        found = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
    return {a.key: a for a in found}


def logs_of(flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs go to the API in batches
    with client() as c:
        logs = c.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs]


def child_runs_of(flow_run_id) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with client() as c:
        return c.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )


def png_of(markdown: str) -> Image.Image:
    encoded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert encoded, markdown[:200]
    return Image.open(io.BytesIO(base64.b64decode(encoded.group(1))))


# --------------------------------------------------------------------------
# generate_dataset
# --------------------------------------------------------------------------


def test_flow_run_publishes_progress_summary_samples_and_logs(
    prefect_harness, tmp_path
):
    state = generate_dataset(tiny(tmp_path / "ds"), samples=4, return_state=True)
    assert state.is_completed(), state.message
    manifest = state.result()
    assert manifest == dataset.read_manifest(str(tmp_path / "ds"))
    assert dataset.verify(str(tmp_path / "ds")) == []

    run = flow_run_of(state)
    assert run.flow_id is not None and run.state.is_completed()
    assert run.parameters["settings"]["lines"] == 240
    artifacts = artifacts_of(run.id)
    assert {PROGRESS_KEY, SUMMARY_KEY, SPLITS_KEY, SAMPLES_KEY} <= set(artifacts)

    assert artifacts[PROGRESS_KEY].type == "progress"
    assert float(artifacts[PROGRESS_KEY].data) == 100.0

    summary = artifacts[SUMMARY_KEY].data
    totals = manifest["totals"]
    assert manifest["dataset_version"] in summary
    assert f"| lines | {totals['lines']:,} |" in summary
    assert "| shards | 5 (5 written by this run, 0 already committed) |" in summary
    assert f"{totals['bytes']:,}" in summary
    assert re.search(r"\| lines/s \| [\d,]+ \(240 lines in", summary)
    assert manifest["charset"]["chars"] in summary
    assert "embedded-pyjokes: sentences_read" in summary

    splits = json.loads(artifacts[SPLITS_KEY].data)
    assert {row["split"]: row["lines"] for row in splits} == {
        split: entry["lines"] for split, entry in totals["by_split"].items()
    }

    grid = png_of(artifacts[SAMPLES_KEY].data)
    assert grid.width > manifest["settings"]["layout"]["max_chars"] * 28
    assert grid.height >= 4 * 28

    logs = "\n".join(logs_of(run.id))
    assert "generating 240 lines in 5 shards" in logs
    assert "5 of 5 shards committed" in logs
    assert f"dataset version {manifest['dataset_version']} committed" in logs


def test_run_generate_flow_is_what_generate_prefect_calls(prefect_harness, tmp_path):
    settings = GenerateSettings(**tiny(tmp_path / "ds", lines=60, shard_size=60))
    manifest = run_generate_flow(settings, samples=0)
    assert manifest == dataset.read_manifest(settings.output)
    # Same settings through the plain path: the same bytes.
    plain = dataset.generate(
        settings.model_copy(update={"output": str(tmp_path / "p")})
    )
    assert shard_hashes(plain) == shard_hashes(manifest)


def test_rerun_after_interrupted_run_commits_only_missing_shards(
    prefect_harness, tmp_path, monkeypatch
):
    out = tmp_path / "ds"
    write_shard = dataset.write_shard
    written: list[str] = []

    def crash_on_third(settings, plan, sources=None):
        if len(written) == 2:
            raise RuntimeError("worker lost in the middle of a shard")
        record = write_shard(settings, plan, sources)
        written.append(plan.name)
        return record

    monkeypatch.setattr(dataset, "write_shard", crash_on_third)
    state = generate_dataset(tiny(out), samples=0, return_state=True)
    assert state.is_failed()
    assert "worker lost" in state.message
    assert not (out / dataset.MANIFEST).exists()
    first = sorted(p.name for p in (out / "shards").iterdir())
    assert first == sorted(Path(n).name for n in written)  # nothing partial
    progress = artifacts_of(flow_run_of(state).id)[PROGRESS_KEY]
    assert float(progress.data) < 100.0

    # The rerun writes only the three missing shards.
    rerun: list[str] = []

    def counting(settings, plan, sources=None):
        rerun.append(plan.name)
        return write_shard(settings, plan, sources)

    monkeypatch.setattr(dataset, "write_shard", counting)
    state = generate_dataset(tiny(out), samples=0, return_state=True)
    assert state.is_completed(), state.message
    manifest = state.result()
    assert len(rerun) == 3 and not set(rerun) & set(written)
    artifacts = artifacts_of(flow_run_of(state).id)
    assert float(artifacts[PROGRESS_KEY].data) == 100.0
    assert "5 (3 written by this run, 2 already committed)" in (
        artifacts[SUMMARY_KEY].data
    )

    # Byte-identical to a run that never crashed.
    monkeypatch.setattr(dataset, "write_shard", write_shard)
    clean = dataset.generate(GenerateSettings(**tiny(tmp_path / "clean")))
    assert shard_hashes(manifest) == shard_hashes(clean)
    assert manifest["dataset_version"] == clean["dataset_version"]

    # A third run finds the version complete and writes nothing.
    state = generate_dataset(tiny(out), samples=0, return_state=True)
    assert state.is_completed()
    assert "5 (0 written by this run, 5 already committed)" in (
        artifacts_of(flow_run_of(state).id)[SUMMARY_KEY].data
    )


@pytest.mark.slow
def test_flow_dispatches_to_ray(prefect_harness, ray_cluster, tmp_path):
    pytest.importorskip("scribeline.workers.generate")
    state = generate_dataset(
        tiny(tmp_path / "ray"), runner="ray", samples=0, return_state=True
    )
    assert state.is_completed(), state.message
    assert flow_run_of(state).parameters["runner"] == "ray"
    clean = dataset.generate(GenerateSettings(**tiny(tmp_path / "local")))
    assert shard_hashes(state.result()) == shard_hashes(clean)


# --------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------


def leaks(*texts) -> list[str]:
    return [t[:120] for t in map(str, texts) if FAKE_SECRET in t or FAKE_KEY in t]


def database_bytes() -> bytes:
    """The harness's SQLite database (and its write-ahead log), raw."""
    from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL

    path = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


def test_credentials_never_reach_parameters_artifacts_logs(
    prefect_harness, s3_server, s3_bucket
):
    from prefect.blocks.system import Secret

    options = {
        **s3_server.storage_options,
        "key": FAKE_KEY,
        "secret": FAKE_SECRET,
    }
    small = {"lines": 60, "shard_size": 30, "seed": 5}

    # In-process: credentials inside the settings parameter.
    settings = GenerateSettings(
        output=f"{s3_bucket}/in-process", storage_options=options, **small
    )
    passed = generate_dataset(settings, samples=2, return_state=True)
    # From a Secret block (what a deployment uses).
    Secret(value=options).save("scribeline-test-s3", overwrite=True)
    from_block = generate_dataset(
        {"output": f"{s3_bucket}/from-block", **small},
        storage_secret="scribeline-test-s3",
        samples=2,
        return_state=True,
    )
    # A failing run: its error message and traceback are logged and stored.
    failed = generate_dataset(
        GenerateSettings(
            output=f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/ds",
            storage_options=options,
            **small,
        ),
        samples=0,
        return_state=True,
    )
    assert passed.is_completed(), passed.message
    assert from_block.is_completed(), from_block.message
    assert failed.is_failed()

    for state in (passed, from_block, failed):
        run = flow_run_of(state)
        stored = json.dumps(run.model_dump(mode="json"))
        artifacts = [a.model_dump(mode="json") for a in artifacts_of(run.id).values()]
        assert not leaks(stored, state.message, *artifacts, *logs_of(run.id))
    params = flow_run_of(passed).parameters["settings"]
    assert params["storage_options"] == REDACTED
    assert params["output"] == f"{s3_bucket}/in-process"
    assert "no-such-bucket" in failed.message, failed.message
    # Not in the manifests either, nor anywhere in the Prefect database (the
    # Secret block's value is stored encrypted).
    for name in ("in-process", "from-block"):
        manifest = dataset.read_manifest(f"{s3_bucket}/{name}", options)
        assert not leaks(json.dumps(manifest))
    assert FAKE_SECRET.encode() not in database_bytes()
    assert FAKE_KEY.encode() not in database_bytes()


def test_deployment_refuses_storage_options_in_its_parameters(tmp_path):
    from scribeline.platform.errors import SettingsError

    with pytest.raises(SettingsError, match="storage_secret"):
        nightly.nightly_deployment(
            str(tmp_path), settings={"storage_options": {"secret": FAKE_SECRET}}
        )


# --------------------------------------------------------------------------
# Nightly versions
# --------------------------------------------------------------------------


NIGHTLY = {"lines": 40, "shard_size": 20}


def test_nightly_keeps_n_versions_and_moves_latest(prefect_harness, tmp_path):
    root = tmp_path / "nightly"
    pointers = []
    for night in ("2026-03-07", "2026-03-08", "2026-03-09"):
        state = nightly.nightly_generate(
            str(root),
            keep=2,
            settings=NIGHTLY,
            night=night,
            samples=1,
            return_state=True,
        )
        assert state.is_completed(), state.message
        pointers.append(state.result())

    versions = sorted(p.name for p in (root / "versions").iterdir())
    assert [v[:10] for v in versions] == ["2026-03-08", "2026-03-09"]
    latest = json.loads((root / nightly.LATEST).read_text())
    assert latest == pointers[-1]
    assert latest["version"] == f"versions/{versions[-1]}"
    url = nightly.latest_url(str(root))
    manifest = dataset.read_manifest(url)
    assert manifest["settings"]["seed"] == 20260309  # a new seed every night
    assert manifest["dataset_version"].startswith(versions[-1][11:])
    assert len({p["dataset_version"] for p in pointers}) == 3

    # The nightly run shows the versions; its subflow shows the dataset.
    run = flow_run_of(state)
    table = json.loads(artifacts_of(run.id)[nightly.VERSIONS_KEY].data)
    assert {(r["version"][:10], r["status"]) for r in table} == {
        ("2026-03-07", "deleted"),
        ("2026-03-08", "kept"),
        ("2026-03-09", "latest"),
    }
    (child,) = child_runs_of(run.id)
    assert child.parameters["settings"]["output"] == url
    assert SUMMARY_KEY in artifacts_of(child.id)

    # The same night again: nothing new, nothing deleted, latest unchanged.
    again = nightly.nightly_generate(
        str(root), keep=2, settings=NIGHTLY, night="2026-03-09", samples=0
    )
    assert again == latest
    assert sorted(p.name for p in (root / "versions").iterdir()) == versions

    # A backfill of an older night leaves latest on the newest night.
    nightly.nightly_generate(
        str(root), keep=2, settings=NIGHTLY, night="2026-03-01", samples=0
    )
    assert json.loads((root / nightly.LATEST).read_text()) == latest


def test_prune_never_deletes_the_version_latest_points_to(tmp_path):
    root = resolve(str(tmp_path))
    for night in ("2026-01-01", "2026-01-02", "2026-01-03"):
        name = f"{night}-{'a' * 12}"
        folder = tmp_path / "versions" / name
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"created_at": night}))
    # An abandoned (older, incomplete) version and one still being written.
    (tmp_path / "versions" / f"2025-12-31-{'b' * 12}").mkdir()
    (tmp_path / "versions" / f"2026-01-04-{'c' * 12}").mkdir()
    (tmp_path / "versions" / "not-a-version").mkdir()
    (tmp_path / nightly.LATEST).write_text(
        json.dumps({"version": f"versions/2026-01-01-{'a' * 12}"})
    )

    deleted = nightly.prune_versions(root, keep=1, protect=set())
    assert sorted(deleted) == [f"2025-12-31-{'b' * 12}", f"2026-01-02-{'a' * 12}"]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == [
        f"2026-01-01-{'a' * 12}",  # latest points here
        f"2026-01-03-{'a' * 12}",  # the newest complete one
        f"2026-01-04-{'c' * 12}",  # may still be finished
        "not-a-version",
    ]


# --------------------------------------------------------------------------
# Schedules across daylight-saving changes
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timezone", "night"),
    [
        ("America/New_York", dt.date(2026, 3, 8)),  # spring forward 02:00 -> 03:00
        ("America/New_York", dt.date(2026, 11, 1)),  # fall back 02:00 -> 01:00
        ("Europe/Berlin", dt.date(2026, 3, 29)),  # spring forward 02:00 -> 03:00
        ("Europe/Berlin", dt.date(2026, 10, 25)),  # fall back 03:00 -> 02:00
    ],
)
def test_nightly_schedule_runs_exactly_once_a_night_across_dst(timezone, night):
    from prefect.server.schemas.schedules import CronSchedule

    deployment = nightly.nightly_deployment("/tmp/unused", timezone=timezone)
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == nightly.DEFAULT_CRON
    assert schedule.schedule.timezone == timezone

    # Prefect's own schedule class computes the run times the server would.
    cron = CronSchedule(cron=schedule.schedule.cron, timezone=timezone)
    zone = ZoneInfo(timezone)
    start = dt.datetime.combine(night - dt.timedelta(days=3), dt.time(), zone)
    end = dt.datetime.combine(night + dt.timedelta(days=4), dt.time(), zone)
    dates = asyncio.run(cron.get_dates(start=start, end=end))
    local = [d.astimezone(zone) for d in dates]
    days = [d.date() for d in local]
    assert days == [night + dt.timedelta(days=i) for i in range(-3, 4)]
    assert {(d.hour, d.minute) for d in local} == {(4, 0)}
    offsets = {d.utcoffset() for d in local}
    assert len(offsets) == 2  # the change happened inside the window


def test_dst_shifted_days_flags_times_inside_a_change():
    assert nightly.dst_shifted_days(nightly.DEFAULT_CRON, "America/New_York") == []
    assert nightly.dst_shifted_days(nightly.DEFAULT_CRON, "Europe/Berlin") == []
    start = dt.date(2026, 1, 1)
    assert nightly.dst_shifted_days("30 2 * * *", "America/New_York", start) == [
        dt.date(2026, 3, 8)  # 02:30 does not exist that night
    ]
    assert nightly.dst_shifted_days("30 1 * * *", "America/New_York", start) == [
        dt.date(2026, 11, 1)  # 01:30 happens twice that night
    ]
    assert nightly.dst_shifted_days("*/5 * * * *", "Europe/Berlin", start) == []


# --------------------------------------------------------------------------
# scribeline deploy
# --------------------------------------------------------------------------


@pytest.fixture
def deploy_app(monkeypatch):
    """The scribeline app with `deploy` registered; serving is recorded, not run."""
    from scribeline import deploy_cmd
    from scribeline.main import app

    deploy_cmd.register(app)
    served = []
    monkeypatch.setattr(deploy_cmd, "_serve", served.append)
    return app, served


def test_deploy_cli_serves_a_cron_deployment_with_explicit_timezone(
    deploy_app, tmp_path
):
    from typer.testing import CliRunner

    app, served = deploy_app
    runner = CliRunner()
    result = runner.invoke(app, ["deploy", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--cron", "--timezone", "--root", "--keep", "--lines", "--glyphs"):
        assert option in result.output

    result = runner.invoke(
        app,
        [
            "deploy",
            "--root",
            str(tmp_path),
            "--timezone",
            "Europe/Berlin",
            "--keep",
            "3",
            "--lines",
            "40",
            "--corpus",
            "corpus.txt",
            "--storage-secret",
            "s3-creds",
        ],
    )
    assert result.exit_code == 0, result.output
    (deployment,) = served
    assert deployment.name == "nightly"
    assert deployment.entrypoint == "scribeline.flows.nightly.nightly_generate"
    (schedule,) = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (
        "0 4 * * *",
        "Europe/Berlin",
    )
    assert deployment.parameters == {
        "root": str(tmp_path),
        "keep": 3,
        "timezone": "Europe/Berlin",
        "settings": {"lines": 40, "corpus": "corpus.txt"},
        "storage_secret": "s3-creds",
        "seed_per_night": True,
        "samples": 8,
    }

    result = runner.invoke(
        app,
        [
            "deploy",
            "--root",
            str(tmp_path),
            "--cron",
            "30 2 * * *",
            "--timezone",
            "America/New_York",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "falls in a daylight-saving change" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["--cron", "every night"], "cron"),
        (["--lines", "0"], "lines"),
    ],
)
def test_deploy_cli_rejects_bad_input(deploy_app, tmp_path, args, message):
    from typer.testing import CliRunner

    app, served = deploy_app
    result = CliRunner().invoke(app, ["deploy", "--root", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert served == []


# --------------------------------------------------------------------------
# A real Prefect server
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()}")


def _stop(process: subprocess.Popen | None) -> None:
    """Stop a process this test started, and its children (its own session)."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


RUN_FLOW = """
import json, sys
from scribeline.flows.generate import generate_dataset
from scribeline.platform.settings import GenerateSettings
settings = GenerateSettings(**json.loads(sys.argv[1]))
state = generate_dataset(settings, samples=2, return_state=True)
print("FLOW_RUN_ID", state.state_details.flow_run_id, state.type.value)
"""

DEPLOY = """
from scribeline.main import app
from scribeline.deploy_cmd import register
register(app)
app()
"""


@pytest.mark.slow
def test_real_prefect_server_flow_run_artifacts_and_served_deployment(
    tmp_path, s3_server, s3_bucket
):
    """`prefect server start` on loopback: a flow run with its artifacts, and
    `scribeline deploy` serving the nightly deployment, which then runs."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    options = {**s3_server.storage_options, "key": FAKE_KEY, "secret": FAKE_SECRET}
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        # What a served deployment reads its credentials from.
        "SCRIBELINE_STORAGE_OPTIONS": json.dumps(options),
    }
    server_log, deploy_log = tmp_path / "server.log", tmp_path / "deploy.log"
    server = deploy = None
    try:
        with server_log.open("w") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_healthy(api, server, server_log, timeout=120)

        # Serve the nightly deployment while a flow runs in another process.
        with deploy_log.open("w") as log:
            deploy = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    DEPLOY,
                    "deploy",
                    "--root",
                    f"{s3_bucket}/nightly",
                    "--timezone",
                    "Europe/Berlin",
                    "--keep",
                    "2",
                    "--lines",
                    "40",
                    "--shard-size",
                    "20",
                ],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        settings = {"output": f"{s3_bucket}/ds", "lines": 60, "shard_size": 30}
        settings["storage_options"] = options
        ran = subprocess.run(
            [sys.executable, "-c", RUN_FLOW, json.dumps(settings)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert ran.returncode == 0, ran.stderr[-3000:]
        flow_run_id, state = re.search(r"FLOW_RUN_ID (\S+) (\S+)", ran.stdout).groups()
        assert state == "COMPLETED"

        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as c:
                run = c.read_flow_run(uuid.UUID(flow_run_id))
            assert run.state.is_completed()
            assert run.parameters["settings"]["storage_options"] == REDACTED
            artifacts = artifacts_of(run.id)
            assert float(artifacts[PROGRESS_KEY].data) == 100.0
            assert "| lines | 60 |" in artifacts[SUMMARY_KEY].data
            assert png_of(artifacts[SAMPLES_KEY].data).height > 0

            # The served deployment, registered with its cron schedule.
            deployment = None
            deadline = time.monotonic() + 90
            while deployment is None and time.monotonic() < deadline:
                assert deploy.poll() is None, deploy_log.read_text()[-3000:]
                try:
                    with get_client(sync_client=True) as c:
                        deployment = c.read_deployment_by_name(
                            "nightly-generate/nightly"
                        )
                except Exception:  # not registered yet
                    time.sleep(0.5)
            assert deployment is not None, deploy_log.read_text()[-3000:]
            (schedule,) = deployment.schedules
            assert schedule.active
            assert schedule.schedule.cron == "0 4 * * *"
            assert schedule.schedule.timezone == "Europe/Berlin"
            assert deployment.parameters["keep"] == 2
            assert "storage_options" not in json.dumps(deployment.parameters)

            # Run it now: the served process picks it up and runs it.
            nightly_run = run_deployment(
                "nightly-generate/nightly",
                parameters={"night": "2026-03-29"},
                timeout=120,
                poll_interval=1,
                as_subflow=False,
            )
            assert nightly_run.state.is_completed(), deploy_log.read_text()[-3000:]
        url = nightly.latest_url(f"{s3_bucket}/nightly", options)
        assert "/versions/2026-03-29-" in url
        assert dataset.read_manifest(url, options)["totals"]["lines"] == 40
    finally:
        _stop(deploy)
        _stop(server)
    database = b"".join(p.read_bytes() for p in home.glob("prefect.db*"))
    assert database and FAKE_SECRET.encode() not in database
    assert FAKE_KEY.encode() not in database
