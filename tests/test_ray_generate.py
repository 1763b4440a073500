"""Ray runner: same bytes as in-process, S3 from workers, killed workers, resume.

All on the session's local 2-CPU Ray cluster (``ray_cluster``) and moto S3
server (``s3_server``), both on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from scribeline.platform import dataset
from scribeline.platform.settings import GenerateSettings
from scribeline.workers import generate as ray_generate
from scribeline.workers.generate import RayRunner, ShardTaskError

# Ray names a worker process after the task it is running.
TASK_TITLE = "ray::scribeline.write_shard"

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/cmdline").exists(), reason="finds Ray workers in /proc"
)


def settings_for(output: str, **overrides) -> GenerateSettings:
    """A small dataset on the embedded default: 9 shards of up to 400 lines."""
    values = {"output": output, "lines": 3000, "shard_size": 400, "seed": 5}
    values.update(overrides)
    return GenerateSettings(**values)


def shard_bytes(root: Path) -> dict[str, str]:
    if not (root / "shards").is_dir():
        return {}
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "shards").iterdir())
        if not dataset.is_temporary(p.name)
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same settings written by the in-process runner, fault-free."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    dataset.generate(settings_for(str(out)))
    return out


class WorkerKiller:
    """SIGKILLs the first ``count`` worker processes seen running a shard task."""

    def __init__(self, count: int = 1) -> None:
        self.count = count
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        deadline = time.monotonic() + 60  # bounded, whatever the test does
        while not self._stop.is_set() and time.monotonic() < deadline:
            for pid in task_pids():
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                if len(self.killed) >= self.count:
                    return
            time.sleep(0.01)


def task_pids() -> list[int]:
    """PIDs of worker processes running a shard task now (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().startswith(TASK_TITLE.encode()):
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def test_ray_shards_are_byte_identical_to_in_process(ray_cluster, tmp_path, reference):
    out = tmp_path / "ray"
    seen = []
    manifest = dataset.generate(
        settings_for(str(out)),
        on_shard=lambda record, done, total: seen.append((done, total)),
        runner=RayRunner(),
    )
    assert shard_bytes(out) == shard_bytes(reference)
    assert (
        manifest["dataset_version"]
        == dataset.read_manifest(str(reference))["dataset_version"]
    )
    assert seen[-1] == (9, 9)
    assert dataset.verify(str(out)) == []


@pytest.mark.slow
def test_ray_workers_write_to_s3_with_credentials_from_the_driver_env(
    ray_cluster, s3_server, s3_bucket, reference, monkeypatch
):
    # Set after ray.init: the workers never see these variables, so the run
    # only works if the driver resolves them into explicit storage options.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    url = f"{s3_bucket}/versions/v1"
    manifest = dataset.generate(settings_for(url), runner=RayRunner())

    local = dataset.read_manifest(str(reference))
    assert manifest["shards"] == local["shards"]
    assert dataset.verify(url) == []
    assert "testing" not in str(manifest)


@pytest.mark.slow
def test_worker_killed_mid_shard_is_retried_and_bytes_are_identical(
    ray_cluster, tmp_path, reference
):
    out = tmp_path / "ray"
    with WorkerKiller(count=2) as killer:
        dataset.generate(settings_for(str(out)), runner=RayRunner(max_retries=3))
    assert len(killer.killed) == 2
    assert not any(Path(f"/proc/{pid}").exists() for pid in killer.killed)
    assert shard_bytes(out) == shard_bytes(reference)
    assert dataset.verify(str(out)) == []


@pytest.mark.slow
def test_worker_killed_without_retries_is_one_clear_error_then_rerun_finishes(
    ray_cluster, tmp_path, reference
):
    out = tmp_path / "ray"
    s = settings_for(str(out))
    # One task at a time, so nothing is still running when the error arrives.
    runner = RayRunner(max_retries=0, max_in_flight=1)
    with WorkerKiller(count=1), pytest.raises(ShardTaskError, match="died 1 times"):
        dataset.generate(s, runner=runner)
    with pytest.raises(FileNotFoundError, match="has not finished"):
        dataset.read_manifest(str(out))

    committed = set(shard_bytes(out))
    written = []
    dataset.generate(
        s, on_shard=lambda r, done, total: written.append(r.name), runner=RayRunner()
    )
    assert len(written) == 9 - len(committed)
    assert not committed & {Path(name).name for name in written}
    assert shard_bytes(out) == shard_bytes(reference)


def test_interrupted_run_reruns_only_the_missing_shards(
    ray_cluster, tmp_path, reference
):
    out = tmp_path / "ray"
    s = settings_for(str(out))

    def stop_after_three(record, done, total):
        if done == 3:
            raise KeyboardInterrupt  # what Ctrl-C in the driver looks like

    with pytest.raises(KeyboardInterrupt):
        dataset.generate(
            s, on_shard=stop_after_three, runner=RayRunner(max_in_flight=1)
        )
    assert len(shard_bytes(out)) == 3
    assert not (out / dataset.MANIFEST).exists()

    written = []
    dataset.generate(
        s, on_shard=lambda r, done, total: written.append(r.name), runner=RayRunner()
    )
    assert len(written) == 6
    assert shard_bytes(out) == shard_bytes(reference)


def test_in_flight_tasks_stay_bounded(ray_cluster, tmp_path, monkeypatch):
    """The driver never has more than max_in_flight shard tasks submitted."""
    import ray

    peak = 0
    real_wait = ray.wait

    def counting_wait(refs, **kwargs):
        nonlocal peak
        peak = max(peak, len(refs))
        return real_wait(refs, **kwargs)

    monkeypatch.setattr(ray, "wait", counting_wait)
    s = settings_for(str(tmp_path / "ds"), lines=600, shard_size=20)
    manifest = dataset.generate(s, runner=RayRunner(max_in_flight=3))
    assert manifest["totals"]["shards"] == 31
    assert peak == 3


def test_token_file_is_made_in_the_state_dir_not_home(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("SCRIBELINE_STATE_DIR", str(tmp_path / "state"))

    # Joining a cluster: no token is invented.
    assert ray_generate.configure_token_auth(create=False) is None
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ

    path = ray_generate.configure_token_auth(create=True)
    assert path == tmp_path / "state" / ray_generate.TOKEN_FILE
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert len(path.read_text()) == 64
    assert path.stat().st_mode & 0o077 == 0
    assert ray_generate.configure_token_auth(create=True) == path  # reused

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ShardTaskError, match="missing or empty"):
        ray_generate.configure_token_auth(create=True)


def test_bad_runner_arguments_are_refused():
    with pytest.raises(ValueError, match="num_workers must be at least 1, got 0"):
        RayRunner(num_workers=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        RayRunner(max_in_flight=0)


STANDALONE = """
import json, os, sys
from scribeline.platform import dataset
from scribeline.platform.settings import GenerateSettings
from scribeline.workers.generate import RayRunner

s = GenerateSettings(output=sys.argv[1], lines=300, shard_size=100, seed=5)
manifest = dataset.generate(s, runner=RayRunner(num_workers=1))
print(json.dumps([x["sha256"] for x in manifest["shards"]]))
"""


@pytest.mark.slow
def test_runner_starts_its_own_cluster_outside_home(tmp_path):
    """No cluster yet: one is started for the run, its state kept out of $HOME."""
    import json
    import subprocess
    import sys

    home, state, out = tmp_path / "home", tmp_path / "state", tmp_path / "ds"
    home.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SCRIBELINE_"))
    }
    env.update(HOME=str(home), SCRIBELINE_STATE_DIR=str(state))
    before = {p.name for p in Path("/tmp").glob("ray-scribeline-*")}
    done = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    local = dataset.generate(
        settings_for(str(tmp_path / "local"), lines=300, shard_size=100)
    )
    assert json.loads(done.stdout.splitlines()[-1]) == [
        x["sha256"] for x in local["shards"]
    ]
    assert (state / ray_generate.TOKEN_FILE).is_file()
    assert not (home / ".ray").exists()
    # The run's temp dir is removed after a clean run.
    assert {p.name for p in Path("/tmp").glob("ray-scribeline-*")} <= before
