"""Train on several machines: Ray Train's ``TensorflowTrainer`` running the one loop.

    from scribeline.platform.train_settings import TrainSettings
    from scribeline.workers.train import train_on_ray

    result = train_on_ray(TrainSettings(dataset="s3://b/ds", output="s3://b/model"),
                          num_workers=4, cpus_per_worker=8)

Each Ray Train worker runs ``scribeline.platform.training.train`` with a
``MultiWorkerMirroredStrategy`` (Ray sets ``TF_CONFIG``): the same custom step
as on one device, so a run on one laptop and one on a cluster differ only in
the strategy. Worker 0 is the chief: it writes checkpoints, TensorBoard logs
and ``final.json`` to the output URL and evaluates; every worker reads its own
disjoint, equal share of the training rows.

The output and the dataset must be reachable from every worker with the
storage options given here (an ``s3://`` URL, or a folder on a shared disk);
the options travel with the work, since environment variables set on the
driver after Ray started never reach the workers. The driver reads the run's
result back from ``<output>/final.json``.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from scribeline.platform import checkpoint as ckpt
from scribeline.platform.errors import ScribelineError
from scribeline.platform.storage import resolve
from scribeline.platform.train_settings import TrainSettings
from scribeline.platform.training import TrainResult

logger = logging.getLogger(__name__)


class DistributedTrainingError(ScribelineError, RuntimeError):
    """A Ray Train run failed on a worker."""


def train_on_ray(
    settings: TrainSettings,
    num_workers: int = 2,
    cpus_per_worker: int = 1,
    use_gpu: bool = False,
    address: str | None = None,
    storage_path: str | None = None,
) -> TrainResult:
    """Run ``train`` on ``num_workers`` Ray Train workers; return the chief's result.

    Args:
        address: a Ray cluster to join (``"auto"``, ``"ray://host:10001"``);
            None uses the cluster this process is connected to, or starts a
            local one.
        storage_path: where Ray Train keeps its own run state (not the
            checkpoints, which go to ``settings.output``); default: a
            temporary folder, enough because no Ray checkpoint is reported.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    # Fail on the driver, with the plain error, before any worker starts:
    # the dataset and the labels are checked again by the workers.
    _check_inputs(settings)
    if not ray.is_initialized():
        ray.init(address=address)
    config = {
        "settings": settings.model_dump(mode="json"),
        "threads": cpus_per_worker,
    }
    trainer = TensorflowTrainer(
        train_loop_per_worker=_train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=RunConfig(
            name="scribeline-train",
            storage_path=storage_path or tempfile.mkdtemp(prefix="scribeline-ray-"),
        ),
    )
    logger.info(
        "training on %d Ray workers (%d CPUs%s each) -> %s",
        num_workers,
        cpus_per_worker,
        ", 1 GPU" if use_gpu else "",
        settings.output,
    )
    try:
        trainer.fit()
    except Exception as err:
        raise DistributedTrainingError(
            f"the Ray Train run failed: {err}; the last checkpoint at "
            f"{settings.output} is intact: fix the cause and rerun with --resume."
        ) from err
    summary = ckpt.read_final(resolve(settings.output, settings.storage_options))
    fields = TrainResult.__dataclass_fields__
    return TrainResult(**{k: v for k, v in summary.items() if k in fields})


def _check_inputs(settings: TrainSettings) -> None:
    from scribeline.platform.pipeline import DatasetSource

    source = DatasetSource.open(settings.dataset, settings.storage_options)
    for split in ("train", "val", "test"):
        source.scan(split)


def _train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: the shared training loop under MultiWorkerMirrored."""
    import ray.train

    from scribeline.platform.training import train

    settings = TrainSettings(
        **{
            **config["settings"],
            "strategy": "multiworker",
            "threads": config["threads"],
        }
    )
    rank = ray.train.get_context().get_world_rank()

    def report(event: dict[str, Any]) -> None:
        if event["event"] == "validation":
            logger.info("worker %d: %s", rank, event)

    result = train(settings, on_progress=report)
    # A barrier and the run's metrics for Ray's own records; every worker
    # must call report the same number of times.
    ray.train.report(
        {
            "step": result.step,
            "train_samples_per_s": result.train_samples_per_s,
            "test_cer": result.test.get("cer"),
        }
    )
