"""Training: one loop for one device, MirroredStrategy and MultiWorkerMirroredStrategy.

    scribeline train --dataset out/ds --output out/model --epochs 3
    python -c "from scribeline.platform.training import train; \\
        from scribeline.platform.train_settings import TrainSettings; \\
        train(TrainSettings(dataset='out/ds', output='out/model'))"

The same ``train`` runs everywhere: the default strategy (one CPU or GPU),
``MirroredStrategy`` (several devices of one machine) and
``MultiWorkerMirroredStrategy`` (each Ray Train worker calls ``train`` with
``strategy="multiworker"``, see ``scribeline.workers.train``). The step is a
custom one: ``strategy.run`` inside a ``tf.function``, the loss reduced with
``strategy.reduce``. Keras 3's ``model.fit`` is not used because under
``MultiWorkerMirroredStrategy`` it fails converting PerReplica values to
tensors (an upstream bug, STACK.md).

Loss: each replica sums CTC over its lines and divides by the GLOBAL batch;
the optimizer sums gradients over replicas, so any number of replicas computes
the same update as one device with the same global batch.

Phases of a run: open the dataset and read every label (charset and CTC
length checks), build or restore the model and optimizer, train with periodic
checkpoints, evaluate on val after each epoch, and at the end evaluate on val
and test and write ``final.json``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scribeline import __version__
from scribeline.platform import checkpoint as ckpt
from scribeline.platform.errors import ScribelineError, SettingsError
from scribeline.platform.metrics import EvalResult, evaluate_texts, format_confusions
from scribeline.platform.model import (
    BLANK_POSITION,
    CharsetMismatchError,
    blank_index,
    build_model,
    greedy_decode,
    logits_model,
    model_time_steps,
    time_steps_for,
)
from scribeline.platform.pipeline import (
    DatasetSource,
    EmptyDatasetError,
    Geometry,
    make_dataset,
    steps_per_epoch,
)
from scribeline.platform.settings import SPLITS
from scribeline.platform.storage import Location, resolve
from scribeline.platform.train_settings import TrainSettings

logger = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]


class CheckpointMismatchError(ScribelineError):
    """The output's checkpoint belongs to another dataset version or model."""


@dataclass
class TrainResult:
    """What a finished run produced (also written to ``final.json``)."""

    output: str
    checkpoint: str
    step: int
    epoch: int
    dataset_version: str
    charset: str
    val: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    train_samples_per_s: float = 0.0
    train_seconds: float = 0.0
    seconds: float = 0.0
    replicas: int = 1


# --------------------------------------------------------------------------
# Devices and strategies
# --------------------------------------------------------------------------


def configure_threads(threads: int) -> None:
    """Set TensorFlow's thread pools; must run before TensorFlow starts."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        logger.warning(
            "TensorFlow is already running; threads=%d is ignored (set it before "
            "the first TensorFlow operation)",
            threads,
        )


def make_strategy(name: str) -> Any:
    """The ``tf.distribute`` strategy for ``auto | one | mirrored | multiworker``."""
    import tensorflow as tf

    if name == "multiworker":
        # First: it configures collective ops, which must precede any other
        # TensorFlow runtime use (listing devices included).
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        # Every GPU, or every (logical) CPU device on a machine without one.
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    return tf.distribute.get_strategy()  # the default: one device


def is_chief(strategy: Any) -> bool:
    """Worker 0 of a multi-worker run writes checkpoints and evaluates."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0
    )


def worker_position(strategy: Any) -> tuple[int, int]:
    """``(this worker's index, number of workers)``; ``(0, 1)`` on one machine."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return 0, 1
    local = len(strategy.extended.worker_devices)
    return int(resolver.task_id), strategy.num_replicas_in_sync // local


def use_mixed_precision(setting: str) -> bool:
    import tensorflow as tf

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if setting == "on" and not has_gpu:
        logger.warning("mixed precision on a CPU is slower than float32; it is on")
    return setting == "on" or (setting == "auto" and has_gpu)


# --------------------------------------------------------------------------
# The model, the optimizer and their state
# --------------------------------------------------------------------------


def make_optimizer(settings: TrainSettings, total_steps: int, mixed: bool) -> Any:
    import keras

    decay = max(total_steps - settings.warmup_steps, 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if settings.warmup_steps else settings.learning_rate,
        decay_steps=decay,
        alpha=settings.final_lr_fraction,
        warmup_target=settings.learning_rate if settings.warmup_steps else None,
        warmup_steps=settings.warmup_steps,
    )
    # NOTE: Keras clips each replica's gradient before summing the replicas, so
    # with several replicas clipnorm bounds each share, not the global norm.
    # It only acts on rare CTC spikes; one device and N replicas agree otherwise.
    optimizer = keras.optimizers.Adam(schedule, clipnorm=settings.clipnorm)
    if mixed:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def state_groups(model: Any, optimizer: Any) -> dict[str, list[tuple[str, Any]]]:
    """Every variable a checkpoint holds: the model's (weights and dropout seed
    state) and the optimizer's (iteration, moments, loss scale)."""
    return {
        "model": [(v.path, v) for v in model.variables],
        "optimizer": [(v.path, v) for v in optimizer.variables],
    }


def _values(groups: dict[str, list[tuple[str, Any]]]) -> dict[str, list]:
    return {
        g: [(p, np.asarray(v.numpy())) for p, v in items] for g, items in groups.items()
    }


def restore(
    checkpoint: ckpt.Checkpoint, groups: dict[str, list[tuple[str, Any]]]
) -> None:
    for group, items in groups.items():
        ckpt.check_shapes(checkpoint, group, [(p, tuple(v.shape)) for p, v in items])
        for (_, variable), value in zip(items, checkpoint.arrays[group], strict=True):
            variable.assign(value)


def make_train_step(
    strategy: Any,
    net: Any,
    optimizer: Any,
    time_steps: int,
    blank: int,
    global_batch: int,
) -> Callable[[Any, Any], Any]:
    """``step(per-replica (images, labels, lengths), stop flag) -> (loss, stop)``.

    ``strategy.run`` inside a ``tf.function``. Each replica sums CTC over its
    lines and divides by the global batch; the optimizer sums the replicas'
    gradients, so the update equals one device's with the same global batch.
    CTC runs on float32 logits whatever the compute precision.
    """
    import tensorflow as tf

    def step_fn(images: Any, labels: Any, lengths: Any, stop: Any) -> Any:
        with tf.GradientTape() as tape:
            logits = net(images, training=True)
            per_line = tf.nn.ctc_loss(
                labels=labels,
                logits=tf.cast(logits, tf.float32),
                label_length=lengths,
                logit_length=tf.fill([tf.shape(logits)[0]], time_steps),
                logits_time_major=False,
                blank_index=blank,
            )
            loss = tf.reduce_sum(per_line) / global_batch
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables, strict=True))
        return loss, tf.identity(stop)  # a value of this replica's, reducible

    @tf.function
    def train_step(batch: Any, stop: Any) -> Any:
        # ``stop`` is each worker's own deadline flag; summed, every worker sees
        # the same verdict and all stop after the same step (collective ops
        # support SUM, not MAX).
        loss, stop = strategy.run(step_fn, args=(*batch, stop))
        total = tf.distribute.ReduceOp.SUM
        return strategy.reduce(total, loss, None), strategy.reduce(total, stop, None)

    return train_step


# --------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------


def predict_texts(
    predict: Callable[[Any], Any], stream: Any, charset: str
) -> tuple[list[str], list[str]]:
    """Greedy-decode every batch of ``stream``; returns (truths, predictions)."""
    truths, predictions = [], []
    with stream.iterate() as batches:
        for images, _, _, texts in batches:
            probs = predict(images).numpy()
            predictions += greedy_decode(probs, charset)
            truths += [t.decode() for t in texts.numpy()]
    return truths, predictions


def evaluate_split(
    predict: Callable[[Any], Any],
    source: DatasetSource,
    split: str,
    geometry: Geometry,
    charset: str,
    batch_size: int,
    limit: int | None = None,
) -> EvalResult:
    dataset = make_dataset(
        source, split, batch_size, geometry, charset, training=False, limit=limit
    )
    truths, predictions = predict_texts(predict, dataset, charset)
    return evaluate_texts(split, truths, predictions)


# --------------------------------------------------------------------------
# TensorBoard scalars (written by the chief)
# --------------------------------------------------------------------------


class ScalarLog:
    """TensorBoard scalars via ``tf.summary.write``.

    ``tf.summary.scalar`` needs the ``tensorboard`` package; ``write`` with the
    scalars plugin's metadata produces the same event records without it.
    Logs are written to a local folder and copied to ``<output>/tensorboard``
    when the output is remote.
    """

    def __init__(self, root: Location) -> None:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        self.root = root
        protocols = root.fs.protocol
        protocols = protocols if isinstance(protocols, tuple) else (protocols,)
        self.remote = "file" not in protocols
        self.folder = (
            tempfile.mkdtemp(prefix="scribeline-tb-")
            if self.remote
            else os.path.join(root.path, "tensorboard")
        )
        self.writer = tf.summary.create_file_writer(self.folder)
        self.metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        import tensorflow as tf

        with self.writer.as_default():
            for tag, value in values.items():
                tf.summary.write(
                    tag, tf.constant(float(value)), step=step, metadata=self.metadata
                )

    def sync(self) -> None:
        self.writer.flush()
        if self.remote:
            self.root.fs.put(
                self.folder + "/", self.root.child("tensorboard").path, recursive=True
            )


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


@dataclass
class RunState:
    """Where a run is: the global step and what it has measured so far."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_samples: int = 0
    # Since the last history entry (a validation):
    loss_sum: float = 0.0
    loss_steps: int = 0


def train(
    settings: TrainSettings,
    on_progress: Progress | None = None,
    strategy: Any = None,
) -> TrainResult:
    """Train (or resume) a recognizer on ``settings.dataset``; see the module doc.

    ``on_progress(event)`` is called on the chief with ``{"event": "step" |
    "validation" | "evaluation" | "done", ...}`` every ``log_every`` steps, at
    each validation and at the end. Returns the result (also written to
    ``<output>/final.json``).
    """
    trainer = Trainer(settings, on_progress, strategy)
    trainer.prepare()
    trainer.fit()
    return trainer.finish()


class Trainer:
    """One training run, in phases: ``prepare``, ``fit``, ``finish``."""

    def __init__(
        self,
        settings: TrainSettings,
        on_progress: Progress | None = None,
        strategy: Any = None,
    ) -> None:
        self.started = time.perf_counter()
        self.settings = settings
        configure_threads(settings.threads)
        self.strategy = strategy or make_strategy(settings.strategy)
        self.chief = is_chief(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        self.worker, self.workers = worker_position(self.strategy)
        self.local_replicas = self.replicas // self.workers
        self.notify = on_progress if (on_progress and self.chief) else _ignore
        if settings.batch_size % self.replicas:
            raise SettingsError(
                f"batch_size {settings.batch_size} does not divide over "
                f"{self.replicas} replicas; use a multiple of {self.replicas}."
            )
        self.global_batch = settings.batch_size
        self.per_replica = self.global_batch // self.replicas
        self.state = RunState()

    # -- phase 1: dataset, labels, output, model ------------------------------

    def prepare(self) -> None:
        """Read every label, check the output, build or restore the model."""
        settings = self.settings
        self.source = source = DatasetSource.open(
            settings.dataset, settings.storage_options
        )
        self.charset = source.charset
        self.blank = blank_index(self.charset)
        self._scan_labels()
        self.root = resolve(settings.output, settings.storage_options)
        existing = ckpt.load(self.root)
        if existing is not None and not settings.resume:
            raise CheckpointMismatchError(
                f"{self.root.url} already holds checkpoint {existing.name} (step "
                f"{existing.step}); pass --resume to continue it, or choose a new "
                "--output."
            )
        if existing is not None:
            _check_resumable(existing, source, settings)
        self._build(existing)

    def _scan_labels(self) -> None:
        settings, source = self.settings, self.source
        layout = source.layout
        width = int(layout["max_chars"]) * int(layout["slot_width"])
        if layout.get("mode") != "seed":  # natural lines: as wide as the widest
            width = max([width] + [source.scan(s).max_width for s in SPLITS])
        step_width = 2 * settings.model.time_pool
        width = math.ceil(width / step_width) * step_width
        self.time_steps = time_steps_for(width, settings.model.time_pool)
        # Every label of every split, checked against the time axis now rather
        # than as an infinite CTC loss hours into a run.
        self.scans = {s: source.scan(s, self.time_steps) for s in SPLITS}
        train_rows = self.scans["train"].rows
        if train_rows == 0:
            raise EmptyDatasetError(
                f"the train split of {source.url} has no rows; generate a dataset "
                "version with more --lines."
            )
        self.per_epoch = steps_per_epoch(source, "train", self.global_batch)
        if self.per_epoch == 0:
            raise EmptyDatasetError(
                f"the train split of {source.url} has {train_rows} rows, fewer "
                f"than one global batch of {self.global_batch}; use a smaller "
                "--batch-size or generate more lines."
            )
        self.geometry = Geometry(
            height=int(layout["height"]),
            width=width,
            max_label=max(s.max_label for s in self.scans.values()) or 1,
        )
        self.total_steps = settings.max_steps or settings.epochs * self.per_epoch
        logger.info(
            "dataset version %s: %d train rows (%d steps of %d per epoch, %d rows "
            "left out of each), %d val, %d test; lines %dx%d, %d time steps, "
            "longest label %d (needs %d steps); blank = class %d (%s)",
            source.version,
            train_rows,
            self.per_epoch,
            self.global_batch,
            train_rows - self.per_epoch * self.global_batch,
            self.scans["val"].rows,
            self.scans["test"].rows,
            self.geometry.height,
            self.geometry.width,
            self.time_steps,
            self.geometry.max_label,
            max(s.max_steps for s in self.scans.values()),
            self.blank,
            BLANK_POSITION,
        )

    def _build(self, existing: ckpt.Checkpoint | None) -> None:
        import keras
        import tensorflow as tf

        settings, strategy = self.settings, self.strategy
        self.mixed = use_mixed_precision(settings.mixed_precision)
        # The same initial weights for the same seed, on any strategy (this
        # also seeds Python's and NumPy's global generators).
        keras.utils.set_random_seed(settings.seed)
        with strategy.scope():
            self.model = build_model(
                self.charset,
                height=self.geometry.height,
                width=self.geometry.width,
                mixed_precision=self.mixed,
                **settings.model.build_kwargs(),
            )
            self.net = logits_model(self.model)
            self.optimizer = make_optimizer(settings, self.total_steps, self.mixed)
            self.optimizer.build(self.net.trainable_variables)
        self.groups = state_groups(self.model, self.optimizer)
        if existing is not None:
            restore(existing, self.groups)
            state = self.state
            state.step = existing.step
            state.history = existing.meta.get("history", [])
            state.losses = existing.meta.get("losses", [])
            state.train_seconds = existing.meta.get("train_seconds", 0.0)
            state.train_samples = existing.meta.get("train_samples", 0)
            logger.info("resumed from %s at step %d", existing.name, state.step)
        if model_time_steps(self.model) != self.time_steps:
            raise ScribelineError(
                f"the model has {model_time_steps(self.model)} time steps, the "
                f"labels were checked against {self.time_steps}; this is a bug."
            )
        self.train_step = make_train_step(
            strategy,
            self.net,
            self.optimizer,
            self.time_steps,
            self.blank,
            self.global_batch,
        )
        model = self.model
        self.predict = tf.function(lambda images: model(images, training=False))
        self.board = ScalarLog(self.root) if self.chief else None
        logger.info(
            "model: %d parameters, %d replicas on %d workers (%s), mixed precision %s",
            model.count_params(),
            self.replicas,
            self.workers,
            type(strategy).__name__,
            "on" if self.mixed else "off",
        )

    # -- phase 2: the steps ----------------------------------------------------

    def train_stream(self, epoch: int, skip: int) -> Any:
        """This worker's rows of one epoch, in per-replica batches."""
        settings = self.settings
        return make_dataset(
            self.source,
            "train",
            self.per_replica,
            self.geometry,
            self.charset,
            training=True,
            worker=self.worker,
            workers=self.workers,
            worker_batch=self.per_replica * self.local_replicas,
            epoch=epoch,
            seed=settings.seed,
            shuffle_buffer=settings.shuffle_buffer,
            readers=settings.readers,
            skip_batches=skip * self.local_replicas,
            augment=settings.augment,
        )

    def next_batch(self, batches: Any) -> Any:
        """One per-replica batch for each of this worker's replicas.

        Replica ids are global and numbered worker by worker.
        """
        import tensorflow as tf

        parts = [next(batches)[:3] for _ in range(self.local_replicas)]
        first = self.worker * self.local_replicas

        def value_fn(context: Any) -> Any:
            part = parts[context.replica_id_in_sync_group - first]
            return tuple(tf.identity(t) for t in part)  # onto the replica's device

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def fit(self) -> None:
        """Train from the current step to ``total_steps`` (or the time limit)."""
        settings, state = self.settings, self.state
        deadline = (
            self.started + settings.max_minutes * 60
            if settings.max_minutes
            else math.inf
        )
        self.last_saved = state.step
        logger.info(
            "training from step %d to %d (%.2f epochs)",
            state.step,
            self.total_steps,
            self.total_steps / self.per_epoch,
        )
        stopped = False
        while state.step < self.total_steps and not stopped:
            epoch, skip = divmod(state.step, self.per_epoch)
            steps = min(self.per_epoch - skip, self.total_steps - state.step)
            with self.train_stream(epoch, skip).iterate() as batches:
                stopped = self._steps(batches, steps, deadline)
            if state.step % self.per_epoch == 0 or stopped:
                self.validate()
        if stopped:
            logger.info(
                "max_minutes=%s reached: stopped at step %d",
                settings.max_minutes,
                state.step,
            )

    def _steps(self, batches: Any, steps: int, deadline: float) -> bool:
        """Run ``steps`` train steps; True when the time limit stopped them."""
        import tensorflow as tf

        settings, state = self.settings, self.state
        window, window_step = time.perf_counter(), state.step
        for _ in range(steps):
            tick = time.perf_counter()
            flag = tf.constant(1.0 if tick > deadline else 0.0)
            loss, stop = self.train_step(self.next_batch(batches), flag)
            loss = float(loss)
            state.train_seconds += time.perf_counter() - tick
            state.train_samples += self.global_batch
            state.step += 1
            state.loss_sum += loss
            state.loss_steps += 1
            if not math.isfinite(loss):
                raise ScribelineError(
                    f"the loss became {loss} at step {state.step}; lower "
                    "--learning-rate or set clipnorm, and resume from the last "
                    "checkpoint with --resume."
                )
            if state.step % settings.log_every == 0 or state.step == self.total_steps:
                elapsed = max(time.perf_counter() - window, 1e-9)
                rate = (state.step - window_step) * self.global_batch / elapsed
                self._log_step(loss, rate)
                window, window_step = time.perf_counter(), state.step
            if self.chief and state.step - self.last_saved >= settings.checkpoint_every:
                self.save()
            if (
                settings.eval_every
                and state.step % settings.eval_every == 0
                and state.step % self.per_epoch
            ):
                self.validate()
                window, window_step = time.perf_counter(), state.step
            if float(stop) > 0:
                return True
        return False

    def _log_step(self, loss: float, rate: float) -> None:
        state = self.state
        lr = float(self.optimizer.learning_rate)
        state.losses.append([state.step, round(loss, 5)])
        if self.board:
            self.board.scalars(
                state.step,
                {"train/loss": loss, "train/lines_per_s": rate, "train/lr": lr},
            )
        logger.info(
            "step %d/%d epoch %d loss %.4f lr %.2e %.1f lines/s",
            state.step,
            self.total_steps,
            state.step // self.per_epoch,
            loss,
            lr,
            rate,
        )
        self.notify(
            {
                "event": "step",
                "step": state.step,
                "total_steps": self.total_steps,
                "epoch": state.step // self.per_epoch,
                "loss": loss,
                "lines_per_s": rate,
            }
        )

    # -- validation, checkpoints -----------------------------------------------

    def evaluate(self, split: str, limit: int | None = None) -> EvalResult:
        return evaluate_split(
            self.predict,
            self.source,
            split,
            self.geometry,
            self.charset,
            self.global_batch,
            limit,
        )

    def validate(self) -> None:
        """A history entry: mean loss since the last one, val CER/WER (chief)."""
        state = self.state
        entry = {
            "step": state.step,
            "epoch": round(state.step / self.per_epoch, 3),
            "loss": round(state.loss_sum / max(state.loss_steps, 1), 5),
            "lines_per_s": round(
                state.train_samples / max(state.train_seconds, 1e-9), 2
            ),
        }
        state.loss_sum, state.loss_steps = 0.0, 0
        if self.chief and self.scans["val"].rows:
            val = self.evaluate("val", self.settings.eval_lines)
            entry.update(val_cer=round(val.cer, 5), val_wer=round(val.wer, 5))
            logger.info(
                "step %d (epoch %.2f): loss %.4f, val CER %.4f WER %.4f (%d lines)",
                state.step,
                entry["epoch"],
                entry["loss"],
                val.cer,
                val.wer,
                val.lines,
            )
            if self.board:
                self.board.scalars(state.step, {"val/cer": val.cer, "val/wer": val.wer})
        state.history.append(entry)
        self.notify({"event": "validation", **entry})
        if self.chief and state.step != self.last_saved:
            self.save()
        if self.board:
            self.board.sync()

    def save(self, final: dict[str, Any] | None = None) -> str:
        """A checkpoint of everything needed to resume (chief only)."""
        state = self.state
        meta = {
            "scribeline_version": __version__,
            "epoch": state.step // self.per_epoch,
            "step_in_epoch": state.step % self.per_epoch,
            "steps_per_epoch": self.per_epoch,
            "dataset": {"url": self.source.url, "dataset_version": self.source.version},
            "dataset_version": self.source.version,
            "charset": self.charset,
            "blank_index": self.blank,
            "geometry": vars(self.geometry),
            "time_steps": self.time_steps,
            "settings": self.settings.public_dict(),
            "history": state.history,
            "losses": state.losses,
            "train_seconds": state.train_seconds,
            "train_samples": state.train_samples,
            "final": final,
        }
        name = ckpt.save(
            self.root,
            state.step,
            _values(self.groups),
            meta,
            self.settings.keep_checkpoints,
        )
        self.last_saved = state.step
        return name

    # -- phase 3: full val and test, the final checkpoint ---------------------

    def finish(self) -> TrainResult:
        state, results = self.state, {}
        if self.chief:
            for split in ("val", "test"):
                if self.scans[split].rows == 0:
                    logger.warning("the %s split is empty: no %s metrics", split, split)
                    results[split] = {}
                    continue
                self.notify(
                    {
                        "event": "evaluation",
                        "split": split,
                        "lines": self.scans[split].rows,
                    }
                )
                result = self.evaluate(split, self.settings.final_eval_lines)
                logger.info(
                    "%s: CER %.4f WER %.4f line accuracy %.4f over %d lines; most "
                    "frequent errors: %s",
                    split,
                    result.cer,
                    result.wer,
                    result.line_accuracy,
                    result.lines,
                    format_confusions(result.confusions[:8]),
                )
                results[split] = result.to_dict()
        result = TrainResult(
            output=self.root.url,
            checkpoint=ckpt.checkpoint_name(state.step),
            step=state.step,
            epoch=state.step // self.per_epoch,
            dataset_version=self.source.version,
            charset=self.charset,
            val=results.get("val", {}),
            test=results.get("test", {}),
            history=state.history,
            losses=state.losses,
            train_samples_per_s=state.train_samples / max(state.train_seconds, 1e-9),
            train_seconds=state.train_seconds,
            seconds=time.perf_counter() - self.started,
            replicas=self.replicas,
        )
        if self.chief:
            summary = {
                **vars(result),
                "settings": self.settings.public_dict(),
                "geometry": vars(self.geometry),
                "time_steps": self.time_steps,
                "blank_index": self.blank,
            }
            self.save(final={"val": result.val, "test": result.test})
            ckpt.write_final(self.root, summary)
            if self.board:
                self.board.sync()
            self.notify({"event": "done", **summary})
        return result


def _ignore(event: dict[str, Any]) -> None:
    """The progress callback of workers other than the chief."""


def _check_resumable(
    existing: ckpt.Checkpoint, source: DatasetSource, settings: TrainSettings
) -> None:
    meta = existing.meta
    if meta.get("charset") != source.charset:
        raise CharsetMismatchError(
            f"checkpoint {existing.name} was trained on the charset "
            f"{meta.get('charset')!r}, but {source.url} has the charset "
            f"{source.charset!r}; the model's outputs would mean other characters. "
            "Train on a dataset with the same charset, or choose a new --output."
        )
    if meta.get("dataset_version") != source.version:
        raise CheckpointMismatchError(
            f"checkpoint {existing.name} was trained on dataset version "
            f"{meta.get('dataset_version')}, not {source.version} ({source.url}); "
            "its data position means nothing there. Resume with the same "
            "--dataset, or choose a new --output."
        )
    saved_model = meta.get("settings", {}).get("model")
    if saved_model != settings.model.model_dump(mode="json"):
        raise CheckpointMismatchError(
            f"checkpoint {existing.name} was made with model settings {saved_model}, "
            f"not {settings.model.model_dump(mode='json')}; resume with the same "
            "model settings, or choose a new --output."
        )
    if meta.get("settings", {}).get("batch_size") != settings.batch_size:
        raise CheckpointMismatchError(
            f"checkpoint {existing.name} was made with batch size "
            f"{meta['settings'].get('batch_size')}, not {settings.batch_size}; the "
            "data position counts batches: resume with the same --batch-size."
        )
