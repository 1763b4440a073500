"""``scribeline up`` / ``down``: the real stack on one machine, without containers.

    scribeline up --root s3://scribeline/nightly \\
        --storage-option endpoint_url=http://127.0.0.1:9000
    export PREFECT_API_URL=http://127.0.0.1:4200/api   # as `up` prints
    scribeline down

``up`` starts, each in its own process group, with all state under
``--state-dir``:

1. a Prefect server (``prefect server start``, SQLite, UI on ``--prefect-port``),
2. a local Ray cluster (``ray start --head --block``),
3. ``scribeline deploy`` serving the nightly deployment against both,

waits until each is healthy, and writes ``<state-dir>/stack.json`` (ports,
PIDs, log files). ``down`` stops what that file lists: SIGTERM to each process
group, SIGKILL after a grace period, and checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from scribeline.common import fail, storage_options

STATE_FILE = "stack.json"
DEFAULT_STATE = Path("scribeline-data") / "stack"


def register(app: typer.Typer) -> None:
    """Add ``up`` and ``down`` to ``app`` (once)."""
    if any(c.callback is up for c in app.registered_commands):
        return
    app.command("up")(up)
    app.command("down")(down)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        # As servers do, so a port left in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _bin(name: str) -> str:
    """A console script installed beside this Python (the same environment)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def _start(
    command: list[str], log: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen:
    handle = log.open("ab")
    return subprocess.Popen(
        command,
        stdout=handle,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,  # its own process group: `down` stops it whole
    )


def _wait(check, what: str, process: subprocess.Popen, log: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        if check():
            return
        time.sleep(0.5)
    raise RuntimeError(f"{what} was not ready after {timeout:.0f} s; see {log}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _deployment_ready(api: str, flow_name: str, name: str) -> bool:
    try:
        request = urllib.request.Request(f"{api}/deployments/name/{flow_name}/{name}")
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def up(
    root: Annotated[
        str, typer.Option(help="Where nightly versions go (folder or s3:// URL).")
    ] = str(Path("scribeline-data") / "nightly"),
    state_dir: Annotated[
        Path, typer.Option(help="Logs, Prefect database, Ray session files.")
    ] = DEFAULT_STATE,
    prefect_port: Annotated[int, typer.Option(help="Prefect API and UI.")] = 4200,
    ray_cpus: Annotated[
        int, typer.Option(min=1, help="CPUs the local Ray cluster offers.")
    ] = max(os.cpu_count() or 1, 1),
    lines: Annotated[
        int, typer.Option("--lines", "-n", help="Lines a night.")
    ] = 10_000,
    cron: Annotated[str, typer.Option(help="Nightly schedule.")] = "0 4 * * *",
    timezone: Annotated[str, typer.Option(help="IANA time zone of --cron.")] = "UTC",
    glyphs: Annotated[
        str | None, typer.Option("--glyphs", "--emnist", help="EMNIST source.")
    ] = None,
    corpus: Annotated[str | None, typer.Option(help="Corpus file(s).")] = None,
    storage_option: Annotated[
        list[str] | None,
        typer.Option(help="fsspec option KEY=VALUE for --root (repeatable)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each.")] = 120,
    pipeline: Annotated[
        bool,
        typer.Option(
            "--pipeline/--dataset-only",
            help="Serve the whole nightly pipeline (generate, train, export) or "
            "only dataset generation (the default).",
        ),
    ] = False,
) -> None:
    """Start a Prefect server, a local Ray cluster and the nightly deployment.

    Everything listens on 127.0.0.1. `scribeline down` stops it all.
    """

    state_dir = state_dir.resolve()
    state_path = state_dir / STATE_FILE
    if state_path.exists():
        raise fail(
            f"a stack is already up ({state_path}); run `scribeline down "
            f"--state-dir {state_dir}` first."
        )
    if not _port_free(prefect_port):
        raise fail(
            f"port {prefect_port} on 127.0.0.1 is taken; pass --prefect-port with "
            "a free port."
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    options = storage_options(storage_option)
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(state_dir / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api,
        "PYTHONSAFEPATH": "1",  # a checkout's platform/ must not shadow stdlib
    }
    if options:
        env["SCRIBELINE_STORAGE_OPTIONS"] = json.dumps(options)
    if "RAY_AUTH_TOKEN_PATH" not in env and "RAY_AUTH_MODE" not in env:
        token = state_dir / "ray-token"
        if not token.exists():
            token.write_text(os.urandom(32).hex())
            token.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
        # Servers turn token auth on by default; clients (ray status, the
        # deploy process) must be told to use it too.
        env["RAY_AUTH_MODE"] = "token"
    stack: dict[str, Any] = {"state_dir": str(state_dir), "processes": {}}
    started: list[subprocess.Popen] = []

    def record(name: str, process: subprocess.Popen, log: Path) -> None:
        started.append(process)
        stack["processes"][name] = {"pid": process.pid, "log": str(log)}
        state_path.write_text(json.dumps(stack, indent=2))

    try:
        # 1. Prefect server.
        log = state_dir / "prefect-server.log"
        server = _start(
            [
                _bin("prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(prefect_port),
            ],
            log,
            env,
            state_dir,
        )
        record("prefect-server", server, log)
        _wait(lambda: _healthy(f"{api}/health"), "prefect server", server, log, timeout)
        stack["prefect_api_url"] = api
        typer.echo(f"prefect server  {api}  (UI http://127.0.0.1:{prefect_port})")

        # 2. Ray head, in the foreground of its own process group (--block).
        ray_port, client_port = _free_port(), _free_port()
        ray_tmp = Path("/tmp") / f"scribeline-ray-{ray_port}"  # short: socket paths
        log = state_dir / "ray.log"
        ray = _start(
            [
                _bin("ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(ray_port),
                "--ray-client-server-port",
                str(client_port),
                "--num-cpus",
                str(ray_cpus),
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--temp-dir",
                str(ray_tmp),
            ],
            log,
            env,
            state_dir,
        )
        record("ray", ray, log)
        address = f"127.0.0.1:{ray_port}"
        _wait(
            lambda: _ray_ready(address, env),
            "ray head",
            ray,
            log,
            timeout,
        )
        stack["ray_address"] = address
        stack["ray_temp_dir"] = str(ray_tmp)
        typer.echo(f"ray cluster     {address}  ({ray_cpus} CPUs)")

        # 3. The nightly deployment, served against both.
        command = [
            _bin("scribeline"),
            "deploy",
            "--root",
            root,
            "--lines",
            str(lines),
            "--cron",
            cron,
            "--timezone",
            timezone,
            "--ray-address",
            address,
            "--workers",
            str(ray_cpus),
        ]
        if pipeline:
            command.append("--pipeline")
        if glyphs:
            command += ["--glyphs", glyphs]
        if corpus:
            command += ["--corpus", corpus]
        log = state_dir / "deploy.log"
        worker = _start(command, log, {**env, "RAY_ADDRESS": address}, state_dir)
        record("deploy", worker, log)
        flow_name = "nightly-pipeline" if pipeline else "nightly-generate"
        _wait(
            lambda: _deployment_ready(api, flow_name, "nightly"),
            "nightly deployment",
            worker,
            log,
            timeout,
        )
        stack["deployment"] = f"{flow_name}/nightly"
        state_path.write_text(json.dumps(stack, indent=2))
    except (RuntimeError, OSError) as err:
        _stop_all(stack)
        state_path.unlink(missing_ok=True)
        raise fail(f"the stack did not come up: {err}") from err

    typer.echo(f"deployment      {stack['deployment']}  {cron} ({timezone})")
    typer.echo(f"state           {state_path}")
    typer.echo(f"next: export PREFECT_API_URL={api}; scribeline down when done")


def _ray_ready(address: str, env: dict[str, str]) -> bool:
    result = subprocess.run(
        [_bin("ray"), "status", "--address", address],
        env=env,
        capture_output=True,
        timeout=60,
    )
    return result.returncode == 0


def down(
    state_dir: Annotated[
        Path, typer.Option(help="The --state-dir given to `scribeline up`.")
    ] = DEFAULT_STATE,
    grace: Annotated[float, typer.Option(help="Seconds before SIGKILL.")] = 20,
) -> None:
    """Stop the stack `scribeline up` started; leave no process behind."""

    state_path = state_dir.resolve() / STATE_FILE
    if not state_path.exists():
        raise fail(f"no stack is up at {state_dir} ({STATE_FILE} not found).")
    stack = json.loads(state_path.read_text())
    left = _stop_all(stack, grace)
    if left:
        raise fail(f"processes still running after SIGKILL: {left}")
    state_path.unlink()
    typer.echo(f"stopped {', '.join(stack['processes'])}")


def _stop_all(stack: dict[str, Any], grace: float = 20) -> list[int]:
    """Stop every recorded process group, newest first; return PIDs left."""
    groups = [p["pid"] for p in reversed(list(stack["processes"].values()))]
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_group_alive(g) for g in groups):
        time.sleep(0.3)
    for pgid in groups:
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
    time.sleep(0.5)
    return [g for g in groups if _group_alive(g)]


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in the process group."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: any member, zombies included
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
