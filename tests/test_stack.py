"""`scribeline up` / `down`: the real single-machine stack, started for real.

Prefect server and Ray on loopback, storage on the test S3 server; the nightly
deployment is triggered through the Prefect API and must finish; `down` must
leave no process behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIBELINE = str(Path(sys.executable).with_name("scribeline"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.mark.slow
def test_up_runs_the_nightly_deployment_and_down_stops_everything(
    tmp_path, s3_server, s3_bucket
):
    state = tmp_path / "stack"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    endpoint = s3_server.endpoint
    up = subprocess.run(
        [
            SCRIBELINE,
            "up",
            "--state-dir",
            str(state),
            "--root",
            f"{s3_bucket}/nightly",
            "--prefect-port",
            str(port),
            "--ray-cpus",
            "2",
            "--lines",
            "60",
            "--storage-option",
            "key=testing",
            "--storage-option",
            "secret=testing",
            "--storage-option",
            f"endpoint_url={endpoint}",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=400,
    )
    stack_file = state / "stack.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        stack = json.loads(stack_file.read_text())
        api = stack["prefect_api_url"]
        assert api == f"http://127.0.0.1:{port}/api"

        # Trigger the deployment through the API and wait for the flow run.
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("prefect")),
                "deployment",
                "run",
                "nightly-generate/nightly",
                "--watch",
                "--watch-timeout",
                "300",
            ],
            env={**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(state / "cli")},
            capture_output=True,
            text=True,
            timeout=360,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Completed" in run.stdout

        import fsspec

        fs = fsspec.filesystem("s3", **s3_server.storage_options)
        latest = json.loads(fs.cat_file(f"{s3_bucket[5:]}/nightly/latest.json"))
        assert latest["lines"] == 60
        manifest = json.loads(
            fs.cat_file(f"{s3_bucket[5:]}/nightly/{latest['version']}/manifest.json")
        )
        assert manifest["totals"]["lines"] == 60
    finally:
        pgids = []
        if stack_file.exists():
            pgids = [
                p["pid"]
                for p in json.loads(stack_file.read_text())["processes"].values()
            ]
        down = subprocess.run(
            [SCRIBELINE, "down", "--state-dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert pgids and not [g for g in pgids if alive(g)]
    assert not stack_file.exists()
