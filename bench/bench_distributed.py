"""Distributed generation benchmark: in-process vs Ray vs Prefect + Ray.

    cd /tmp && python /work/main/bench/bench_distributed.py --dispatch   # ~6 min
    cd /tmp && python /work/main/bench/bench_distributed.py --lines 20000 --no-prefect
    cd /tmp && python /work/main/bench/bench_distributed.py --dispatch-only

The 100,000-line workload of ``bench_synthesis.py`` (real EMNIST + WikiSplit
when ``../shared/data`` exists, else the embedded default), written end to end
(plan, render, encode, write Parquet, checksum, commit the manifest) by:

- in-process: ``dataset.generate`` with the default runner, one process;
- Ray, 1 and 2 workers: ``RayRunner`` on a local cluster of that many CPUs;
- Prefect + Ray: the ``generate_dataset`` flow (progress artifact, summary
  table, sample images) around the same ``RayRunner``, under a temporary
  Prefect API;

each to a local folder and to an S3 server (``moto_server``, its own process)
on 127.0.0.1. Cluster start-up (with a tiny warm-up run that starts the worker
processes) and the Prefect API are timed apart from the runs: a long-lived
cluster pays them once, not per dataset. Lines/s is lines over the wall time of
the whole run, so loading the glyph bank and corpus on the driver is in every
row. Scaling efficiency = rate(2 workers) / (2 x rate(1 worker)).

``--dispatch`` also compares ways of giving the workers the glyph bank and
corpus, on many small shards where per-task cost shows: tasks that fetch the
sources once per worker process (what ``RayRunner`` does), tasks that receive
them as an argument (deserialized for every task), and a pool of actors that
hold them.

Run from outside the repository root (``cd /tmp`` first), so the repo's
``platform/`` folder is not on ``sys.path``. On a shared 2-core machine the
figures move by 10-20% between runs: compare rows of one run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STATE = Path(tempfile.mkdtemp(prefix="scribeline-bench-dist-"))
# Prefect and Ray keep their state here, not in the home directory; set before
# either is imported.
os.environ.setdefault("PREFECT_HOME", str(STATE / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("SCRIBELINE_STATE_DIR", str(STATE / "scribeline"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the table, not run logs

from scribeline.platform import dataset  # noqa: E402
from scribeline.platform.settings import GenerateSettings  # noqa: E402
from scribeline.workers.generate import RayRunner, configure_token_auth  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUCKET = "bench"
RAY_TEMP_DIRS: list[str] = []  # removed at exit with STATE


# --------------------------------------------------------------------------
# The S3 server: moto in its own process, so it does not share our GIL
# --------------------------------------------------------------------------


class MotoProcess:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.options = {
            "key": "bench",
            "secret": "bench",
            "client_kwargs": {
                "endpoint_url": self.endpoint,
                "region_name": "us-east-1",
            },
        }

    def __enter__(self) -> MotoProcess:
        server = Path(sys.executable).with_name("moto_server")
        self._proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._proc.terminate()
        self._proc.wait(10)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        )

    def clear(self, prefix: str) -> None:
        """Delete a dataset version: moto keeps every object in memory."""
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=prefix
        )
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})


# --------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, s3: MotoProcess | None) -> None:
        self.args = args
        self.s3 = s3
        self.work = STATE / "out"
        self.rows: list[dict[str, Any]] = []
        self.shards: dict[str, list[str]] = {}
        self.real = (SHARED / "emnist").is_dir() and not args.embedded

    def settings(self, target: str, name: str, **overrides: Any) -> GenerateSettings:
        slug = name.replace(" ", "-").replace("+", "")
        if target == "s3":
            output, options = f"s3://{BUCKET}/{slug}", self.s3.options
        else:
            output, options = str(self.work / slug), {}
        values: dict[str, Any] = {
            "output": output,
            "storage_options": options,
            "lines": self.args.lines,
            "shard_size": self.args.shard_size,
        }
        if self.real:
            values["glyphs"] = str(SHARED / "emnist")
            values["corpus"] = (
                f"{SHARED}/wikisplit/test.tsv,{SHARED}/wikisplit/tune.tsv"
            )
        values.update(overrides)
        return GenerateSettings(**values)

    def targets(self) -> list[str]:
        return ["folder", "s3"] if self.s3 else ["folder"]

    def run(
        self,
        name: str,
        target: str,
        call: Callable[[GenerateSettings], dict[str, Any]],
        **overrides: Any,
    ) -> None:
        settings = self.settings(target, name, **overrides)
        dataset._SOURCES_CACHE.clear()  # every row loads the sources itself
        started = time.perf_counter()
        manifest = call(settings)
        seconds = time.perf_counter() - started
        lines = manifest["totals"]["lines"]
        self.rows.append(
            {"run": name, "target": target, "seconds": seconds, "rate": lines / seconds}
        )
        self.shards[f"{name} -> {target}"] = [s["sha256"] for s in manifest["shards"]]
        print(f"  {name:24} -> {target:6} {seconds:7.2f} s {lines / seconds:9,.0f} /s")
        if target == "s3":
            self.s3.clear(settings.output.removeprefix(f"s3://{BUCKET}/"))
        else:
            shutil.rmtree(settings.output, ignore_errors=True)


def start_ray(num_cpus: int, bench: Bench) -> float:
    """Start a local cluster and warm its workers (imports) with a tiny run.

    ``RayRunner()`` then joins this cluster (ray is initialized in-process).
    """
    import ray

    configure_token_auth(create=True)
    started = time.perf_counter()
    # Not under STATE: Ray's socket paths must stay under 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    RAY_TEMP_DIRS.append(temp_dir)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
        configure_logging=False,
    )
    warm = bench.settings("folder", f"warm-up-{num_cpus}", lines=40, shard_size=4)
    dataset.generate(warm, runner=RayRunner())
    shutil.rmtree(warm.output, ignore_errors=True)
    return time.perf_counter() - started


def prefect_flow() -> Callable[..., dict[str, Any]] | None:
    try:
        from scribeline.flows.generate import generate_dataset
    except ImportError as err:
        print(f"  (no Prefect flow: {err})")
        return None
    return generate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--embedded", action="store_true", help="ignore shared data")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-prefect", action="store_true")
    parser.add_argument("--dispatch", action="store_true", help="also tasks vs actors")
    parser.add_argument("--dispatch-only", action="store_true")
    args = parser.parse_args()
    logging.getLogger("scribeline").setLevel(logging.ERROR)  # no demo-data notes

    with contextlib.ExitStack() as stack:
        s3 = None if args.no_s3 or args.dispatch_only else MotoProcess()
        if s3 is not None:
            stack.enter_context(s3)
        bench = Bench(args, s3)
        print(
            f"data: {'EMNIST byclass + WikiSplit' if bench.real else 'embedded'}; "
            f"{args.lines:,} lines in shards of {args.shard_size:,}; "
            f"{len(os.sched_getaffinity(0))} cores"
        )
        if not args.dispatch_only:
            startup = run_matrix(bench, args)
            print_table(bench, startup)
        if args.dispatch or args.dispatch_only:
            compare_dispatch(bench)
    for folder in [STATE, *RAY_TEMP_DIRS]:
        shutil.rmtree(folder, ignore_errors=True)


def run_matrix(bench: Bench, args: argparse.Namespace) -> dict[str, float]:
    import ray

    startup: dict[str, float] = {}
    flow = None if args.no_prefect else prefect_flow()
    with contextlib.ExitStack() as stack:
        if flow is not None:
            from prefect.testing.utilities import prefect_test_harness

            started = time.perf_counter()
            stack.enter_context(prefect_test_harness(server_startup_timeout=120))
            startup["prefect API"] = time.perf_counter() - started

        for target in bench.targets():
            bench.run("in-process", target, dataset.generate)
        for workers in (1, 2):
            startup[f"ray {workers}"] = start_ray(workers, bench)
            label = f"ray {workers} worker" + ("s" if workers > 1 else "")
            for target in bench.targets():
                bench.run(
                    label, target, lambda s: dataset.generate(s, runner=RayRunner())
                )
            if flow is not None:
                for target in bench.targets():
                    bench.run(
                        f"prefect + {label}",
                        target,
                        lambda s: flow(settings=s, runner=RayRunner(), samples=8),
                    )
            ray.shutdown()
    return startup


def print_table(bench: Bench, startup: dict[str, float]) -> None:
    rows = {(r["run"], r["target"]): r for r in bench.rows}
    print()
    print(
        "| run | target | wall s | lines/s | vs in-process | scaling |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    for (run, target), row in rows.items():
        base = rows[("in-process", target)]
        versus = row["seconds"] / base["seconds"] - 1
        scaling = ""
        if run.startswith("ray 2"):
            one = rows[("ray 1 worker", target)]
            scaling = f"{row['rate'] / (2 * one['rate']):.0%}"
        print(
            f"| {run} | {target} | {row['seconds']:.2f} | {row['rate']:,.0f} | "
            f"{versus:+.0%} | {scaling} |"
        )
    print()
    print(
        "start-up, not in the rows: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items())
    )
    identical = len({tuple(v) for v in bench.shards.values()}) == 1
    print(f"identical shards in every run: {'yes' if identical else 'NO'}")


# --------------------------------------------------------------------------
# Dispatch: how the glyph bank and corpus reach the workers
# --------------------------------------------------------------------------


def compare_dispatch(bench: Bench) -> None:
    import ray

    lines, shard_size = min(bench.args.lines, 40_000), 1_000
    print(f"\ndispatch, 2 workers, {lines:,} lines in shards of {shard_size:,}:")
    startup = start_ray(2, bench)
    try:
        runners: dict[str, Callable[..., Iterator[dataset.ShardRecord]]] = {
            "tasks, sources once per worker (RayRunner)": RayRunner(),
            "tasks, sources as an argument": tasks_with_sources_argument,
            "actor pool holding the sources": actor_pool,
        }
        for name, runner in runners.items():
            bench.run(
                name,
                "folder",
                lambda s, r=runner: dataset.generate(s, runner=r),
                lines=lines,
                shard_size=shard_size,
            )
    finally:
        ray.shutdown()
    print(f"(cluster start and warm-up {startup:.1f} s, not counted)")


def tasks_with_sources_argument(
    settings: GenerateSettings, job: dataset.GenerationJob, todo: list
) -> Iterator[dataset.ShardRecord]:
    import ray

    write = ray.remote(num_cpus=1)(dataset.write_shard)
    sources = ray.put(job.sources)
    yield from _bounded(ray, [(write.remote, (settings, p, sources)) for p in todo])


def actor_pool(
    settings: GenerateSettings, job: dataset.GenerationJob, todo: list
) -> Iterator[dataset.ShardRecord]:
    import ray

    @ray.remote(num_cpus=1)
    class ShardWriter:
        def __init__(self, sources: dataset.Sources) -> None:
            self.sources = sources

        def write(self, settings: GenerateSettings, plan: Any) -> dataset.ShardRecord:
            return dataset.write_shard(settings, plan, self.sources)

    sources = ray.put(job.sources)
    actors = [ShardWriter.remote(sources) for _ in range(2)]
    calls = [(actors[i % 2].write.remote, (settings, p)) for i, p in enumerate(todo)]
    yield from _bounded(ray, calls)
    for actor in actors:
        ray.kill(actor)


def _bounded(ray: Any, calls: list, limit: int = 4) -> Iterator[Any]:
    pending, queue = [], iter(calls)
    while True:
        for submit, call_args in queue:
            pending.append(submit(*call_args))
            if len(pending) >= limit:
                break
        if not pending:
            return
        ready, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(ready)


if __name__ == "__main__":
    main()
