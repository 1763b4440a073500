"""Write a dataset version's shards with Ray: one task per shard.

    from scribeline.platform import dataset
    from scribeline.workers.generate import RayRunner

    dataset.generate(settings, runner=RayRunner())                  # local cluster
    dataset.generate(settings, runner=RayRunner(address="auto"))    # running one
    dataset.generate(settings, runner=RayRunner("ray://head:10001"))

A task renders its shard from the settings and the shard plan alone (the glyph
bank and the corpus come from the object store, put there once per run),
writes the Parquet bytes straight to the output URL through
``dataset.write_shard`` and returns the ``ShardRecord``: metadata, never
pixels. The driver keeps a bounded number of tasks in flight, so a plan of
100,000 shards never floods the scheduler or the object store, and reports
progress from one place.

Faults: a task whose worker dies (OOM kill, node lost) is retried by Ray, up to
``max_retries`` times; so is one that fails with ``TransientStorageError``
(5xx answers, dropped connections that outlasted the storage layer's own
retries). Any other error stops the run with that error; shards already
written stay committed and a rerun of the same command writes only the rest.
Shards are deterministic, so a retried shard has the same bytes.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from scribeline.platform import dataset
from scribeline.platform.dataset import GenerationJob, ShardPlan, ShardRecord
from scribeline.platform.errors import ScribelineError
from scribeline.platform.settings import GenerateSettings
from scribeline.platform.storage import (
    TransientStorageError,
    explicit_storage_options,
)

logger = logging.getLogger(__name__)

# The driver logs a progress line at most this often (plus one at the end).
PROGRESS_EVERY_S = 10.0
# Tasks in flight per CPU when max_in_flight is not given: 2 keeps every worker
# busy while the driver collects a result, and bounds what is queued (one
# task's arguments are the settings and a plan: a few KB).
IN_FLIGHT_PER_CPU = 2
# Ray's unix socket paths must fit in 107 bytes: keep the temp dir short.
LONGEST_TEMP_ROOT = 40
TOKEN_FILE = "ray-auth-token"


class ShardTaskError(ScribelineError, RuntimeError):
    """A shard could not be written on the Ray cluster (workers kept dying)."""


class RayRunner:
    """A ``dataset.generate`` runner that writes shards as Ray tasks.

    Args:
        address: ``None`` starts a local cluster for the run (or uses the one
            this process is already connected to); ``"auto"`` joins the cluster
            running on this machine; ``"ray://host:10001"`` connects a client.
        num_workers: CPUs of the local cluster this runner starts (default: all
            of this machine's); on an existing cluster, the most shards
            rendered at once (default: the cluster's CPUs).
        max_in_flight: tasks submitted and not yet collected (default: twice
            the workers).
        max_retries: times Ray reruns a shard whose worker died or whose write
            failed transiently.
    """

    def __init__(
        self,
        address: str | None = None,
        num_workers: int | None = None,
        max_in_flight: int | None = None,
        max_retries: int = 3,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {max_retries}")
        self.address = address
        self.num_workers = num_workers
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries

    def __call__(
        self, settings: GenerateSettings, job: GenerationJob, todo: list[ShardPlan]
    ) -> Iterator[ShardRecord]:
        if not todo:
            return
        with _Cluster(self.address, self.num_workers) as cluster:
            yield from self._run(cluster, settings, job, todo)

    def _run(
        self,
        cluster: _Cluster,
        settings: GenerateSettings,
        job: GenerationJob,
        todo: list[ShardPlan],
    ) -> Iterator[ShardRecord]:
        import ray

        # Credentials from this process's environment travel as explicit
        # options: workers started earlier (or elsewhere) do not have them.
        options = explicit_storage_options(settings.output, settings.storage_options)
        task_settings = settings.model_copy(update={"storage_options": options})

        # The glyph bank and corpus go into the object store once; each worker
        # process fetches them once (numpy arrays map without a copy).
        sources = [ray.put(job.sources)]
        task = _write_shard_task.options(
            max_retries=self.max_retries,
            retry_exceptions=[TransientStorageError],
        )
        if self.max_in_flight:
            limit = self.max_in_flight
        elif self.num_workers and not cluster.started:
            limit = self.num_workers  # a shared cluster: at most this many at once
        else:
            limit = IN_FLIGHT_PER_CPU * cluster.cpus
        logger.info(
            "writing %d shards on Ray (%s, %d CPUs), at most %d in flight",
            len(todo),
            cluster.describe(),
            cluster.cpus,
            limit,
        )

        queue = iter(todo)
        in_flight: dict[Any, ShardPlan] = {}
        progress = _Progress(len(todo))
        try:
            while True:
                for plan in queue:
                    in_flight[task.remote(task_settings, plan, sources)] = plan
                    if len(in_flight) >= limit:
                        break
                if not in_flight:
                    break
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in ready:
                    plan = in_flight.pop(ref)
                    record = _result(ray, ref, plan, self.max_retries)
                    progress.update(record)
                    yield record
        finally:
            if in_flight:  # an error or the caller stopped: leave the cluster idle
                for ref in in_flight:
                    ray.cancel(ref)
        progress.done()


def _result(ray: Any, ref: Any, plan: ShardPlan, retries: int) -> ShardRecord:
    """The task's record, or its error as the user should see it."""
    from ray.exceptions import RayError, RayTaskError, WorkerCrashedError

    try:
        return ray.get(ref)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, ScribelineError | OSError):
            raise cause from err  # already a clear sentence naming the URL
        raise
    except WorkerCrashedError as err:
        raise ShardTaskError(
            f"the Ray worker writing {plan.name} died {retries + 1} times (killed "
            "or out of memory?); shards written so far are kept. Check the "
            "workers' memory, then rerun the same command to finish the rest."
        ) from err
    except RayError as err:  # node lost, object lost, OOM-killed by Ray, ...
        raise ShardTaskError(
            f"Ray could not run the task writing {plan.name} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            "; shards written so far are kept. Rerun the same command to finish "
            "the rest."
        ) from err


def _write_shard_task_body(
    settings: GenerateSettings, plan: ShardPlan, sources_ref: list[Any]
) -> ShardRecord:
    return dataset.write_shard(settings, plan, _worker_sources(sources_ref[0]))


# The sources of the run this worker process last served, by object id. Passed
# wrapped in a list so Ray does not fetch and deserialize them for every task.
_WORKER_SOURCES: dict[str, dataset.Sources] = {}


def _worker_sources(ref: Any) -> dataset.Sources:
    import ray

    key = ref.hex()
    if key not in _WORKER_SOURCES:
        _WORKER_SOURCES.clear()  # one run's sources per worker process
        _WORKER_SOURCES[key] = ray.get(ref)
    return _WORKER_SOURCES[key]


class _LazyRemote:
    """``ray.remote`` applied on first use, so importing this module is cheap."""

    def __init__(self) -> None:
        self._remote: Any = None

    def options(self, **kwargs: Any) -> Any:
        if self._remote is None:
            import ray

            self._remote = ray.remote(num_cpus=1)(_write_shard_task_body)
        return self._remote.options(name="scribeline.write_shard", **kwargs)


_write_shard_task = _LazyRemote()


class _Progress:
    """Progress lines from the driver: at most one every PROGRESS_EVERY_S."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.shards = 0
        self.lines = 0
        self.started = self.last = time.perf_counter()

    def update(self, record: ShardRecord) -> None:
        self.shards += 1
        self.lines += record.rows
        logger.debug(
            "shard %s: %d rows, %d bytes in %.2f s",
            record.name,
            record.rows,
            record.bytes,
            record.seconds,
        )
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S and self.shards < self.total:
            self.last = now
            self._log(now)

    def done(self) -> None:
        self._log(time.perf_counter())

    def _log(self, now: float) -> None:
        seconds = max(now - self.started, 1e-9)
        logger.info(
            "%d of %d shards written, %d lines, %.0f lines/s",
            self.shards,
            self.total,
            self.lines,
            self.lines / seconds,
        )


# --------------------------------------------------------------------------
# The cluster: join one, or start a local one for this run
# --------------------------------------------------------------------------


class _Cluster:
    """Connects to Ray for one run; shuts down only what it started."""

    def __init__(self, address: str | None, num_workers: int | None) -> None:
        self.address = address
        self.num_workers = num_workers
        self.started = False
        self.connected = False
        self.cpus = 1
        self._temp_dir: str | None = None

    def __enter__(self) -> _Cluster:
        import ray

        if ray.is_initialized():
            logger.debug("using the Ray connection this process already has")
        elif self.address is None:
            configure_token_auth(create=True)
            self._temp_dir = _short_temp_dir()
            ray.init(
                num_cpus=self.num_workers or os.cpu_count() or 1,
                include_dashboard=False,
                _temp_dir=self._temp_dir,
                # Progress comes from the driver; worker logs stay in the
                # session folder (and errors come back with the task).
                log_to_driver=False,
                configure_logging=False,
            )
            self.started = self.connected = True
        else:
            configure_token_auth(create=False)
            try:
                ray.init(address=self.address, log_to_driver=False)
            except (ConnectionError, RuntimeError) as err:
                raise ShardTaskError(
                    f"cannot connect to the Ray cluster at {self.address!r}: {err}. "
                    "Check the address (ray://HEAD:10001, HEAD:6379 or auto), that "
                    "the cluster is up, and its auth token (RAY_AUTH_TOKEN_PATH)."
                ) from err
            self.connected = True
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return self

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        import ray

        if self.connected:
            ray.shutdown()
        if self._temp_dir is not None:
            if kind is None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
            else:
                logger.info("Ray worker logs are kept in %s", self._temp_dir)

    def describe(self) -> str:
        if self.started:
            return "local cluster started for this run"
        return f"cluster at {self.address}" if self.address else "existing cluster"


def _short_temp_dir() -> str:
    root = tempfile.gettempdir()
    if len(root) > LONGEST_TEMP_ROOT or root.startswith(str(Path.home())):
        root = "/tmp"
    return tempfile.mkdtemp(prefix="ray-scribeline-", dir=root)


def state_dir() -> Path:
    """Where scribeline keeps small local state (the Ray auth token).

    ``SCRIBELINE_STATE_DIR``, else ``$XDG_STATE_HOME/scribeline``, else
    ``~/.local/state/scribeline``.
    """
    explicit = os.environ.get("SCRIBELINE_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "scribeline"


def configure_token_auth(create: bool) -> Path | None:
    """Name Ray's auth token explicitly, before ``ray.init``.

    Ray 2.60 turns token authentication on for the local clusters ``ray.init``
    starts, and for clients whenever a token is available; by default it would
    write and read ``~/.ray/auth_token``. Here: ``RAY_AUTH_MODE`` and a token
    given by ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` (the file must exist
    and not be empty) are respected; otherwise ``RAY_AUTH_TOKEN_PATH`` is set
    to the token file in ``state_dir()``, created (mode 0600) when ``create``
    is true, as it is for a local cluster. Joining an existing cluster with no
    token anywhere leaves Ray's own lookup alone. The mode itself is left to
    Ray: once the driver has imported ray, changing ``RAY_AUTH_MODE`` no longer
    reaches its cached config. Returns the token file in use, if any.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    given = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if given:
        path = Path(given)
        if not path.is_file() or not path.read_text().strip():
            raise ShardTaskError(
                f"RAY_AUTH_TOKEN_PATH names {path}, which is missing or empty. "
                "Point it at the cluster's token file, or unset it."
            )
        return path
    path = state_dir() / TOKEN_FILE
    if not path.is_file():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        logger.info("created a Ray auth token for local clusters in %s", path)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    return path
