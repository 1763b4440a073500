"""The whole platform in one run: generate -> train -> export -> evaluate.

    scribeline run                      # the embedded default: a few minutes
    scribeline run --glyphs ~/data/emnist/gzip.zip \\
        --corpus ~/data/wiki-split/train.tsv --lines 300000 --steps 2300 \\
        --batch-size 128 --full-model --output s3://bucket/runs/first --prefect
    python -c "from scribeline.flows.pipeline import nightly_pipeline; \\
        nightly_pipeline('out/run')"

``nightly_pipeline`` (a Prefect flow) and ``run_pipeline`` (what ``scribeline
run`` calls, with or without Prefect) run four stages, each the platform's own
function:

1. generate a dataset version (the ``generate-dataset`` flow, as a subflow; or
   ``nightly-generate`` with ``nightly=True``: a new version under the root
   every night, ``latest.json``, the last ``keep`` kept);
2. train a recognizer on it (``training.train``; an interrupted run resumes
   from its last checkpoint when started again with the same output);
3. export it to TFLite with the parity gate (``export.export_tflite``, the
   Prefect task ``export_tflite``); a variant that fails the gate fails the run,
   except full int8, which is dropped with a warning;
4. evaluate every exported model on the whole test split with the app-side
   reader (``predict.TFLiteReader``: the files as written, their metadata,
   CTC decoding outside the model).

Where everything goes, under the output root::

    <root>/dataset/       the dataset version (nightly: <root>/versions/<name>/)
    <root>/model/         checkpoints, final.json, tensorboard/
    <root>/tflite/        recognizer-<variant>.tflite + .json, export.json
    <root>/summary.json   everything below, machine-readable
    <root>/summary.md     the same as markdown, images inline

With ``nightly=True`` model, tflite and summary go to ``<root>/runs/<night>-<id>/``
and runs whose dataset version was pruned are deleted with it.

One summary artifact (key ``pipeline-summary``) is published to the flow run:
dataset stats, training, a table of every model (Keras and each TFLite variant:
size, CER/WER on the test split, parity with Keras, per-line latency with one
thread) and sample predictions with their line images as data URIs. The
subflow of stage 1 publishes its own progress and summary as before.

Defaults (``DEMO_GENERATE``, ``DEMO_TRAINING``) are sized for the embedded
glyphs and corpus on a 2-core machine: 10,000 lines (500 test lines, what the
parity gate reads) and a small network trained for 600 steps of 32 lines,
a few minutes in all. That model reads the embedded fonts (test CER ~4%) but
has seen a few hundred jokes in three fonts: it shows the machinery end to
end, it is no handwriting model. The real job passes
EMNIST, a corpus and larger sizes: ``lines``, ``max_steps`` or ``epochs``,
``batch_size`` and the full network (``scribeline run --full-model``, or
``training={"model": ModelSettings().model_dump()}``).

Credentials: as for ``generate_dataset`` (environment, ``storage_secret`` or
in-process ``storage_options``; never flow parameters). One set of storage
options serves every URL under the root.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field, replace
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.runtime import flow_run
from prefect.schedules import Cron
from pydantic import ValidationError

from scribeline.flows.generate import (
    credential_safe_flow,
    display_url,
    generate_dataset,
    load_storage_secret,
    resolve_settings,
    runner_choice,
)
from scribeline.platform.errors import SettingsError
from scribeline.platform.settings import GenerateSettings
from scribeline.platform.storage import Location, resolve, write_atomic
from scribeline.platform.train_settings import TrainSettings

logger = logging.getLogger(__name__)

SUMMARY_KEY = "pipeline-summary"
SUMMARY_FORMAT = "scribeline-pipeline-v1"
DEFAULT_ROOT = "scribeline-data/run"
DEPLOYMENT_NAME = "nightly"  # shown as nightly-pipeline/nightly
RUNS = "runs"

# The embedded default, sized for a 2-core machine (see the module docstring).
DEMO_GENERATE: dict[str, Any] = {
    "lines": 10_000,  # 5% test = 500 lines: what the export's parity gate reads
    "shard_size": 5_000,  # 2 train shards: the reader interleaves them
}
DEMO_TRAINING: dict[str, Any] = {
    "max_steps": 600,  # ~19k lines seen: past CTC's all-blank phase, ~2-3 min
    "batch_size": 32,  # small steps learn faster per line on 2 cores
    "learning_rate": 4e-3,  # a small net tolerates a high peak
    "warmup_steps": 50,
    "eval_lines": 200,  # val lines at each epoch end
    "checkpoint_every": 200,
    "shuffle_buffer": 2048,
    "log_every": 50,
    # ~180k parameters (the default network: ~450k): ~2x its speed on a CPU.
    "model": {"c1": 8, "c3": 16, "c5": 64, "lstm_units": 64, "dropout": 0.1},
}
DEFAULT_VARIANTS = ("float32", "float16", "int8-dynamic", "int8")
SAMPLE_LINES = 6


# --------------------------------------------------------------------------
# The plan: every URL and every setting, resolved once
# --------------------------------------------------------------------------


@dataclass
class PipelinePlan:
    """What a pipeline run writes where, and with which settings."""

    root: str
    run: str  # the folder of model/, tflite/, summary.*
    dataset: str  # the dataset version URL
    generate: GenerateSettings
    training: TrainSettings
    variants: list[str]
    parity_lines: int = 500
    eval_lines: int | None = None
    samples: int = SAMPLE_LINES
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> str:
        return _join(self.run, "model")

    @property
    def tflite(self) -> str:
        return _join(self.run, "tflite")

    @property
    def summary(self) -> str:
        return _join(self.run, "summary.md")

    def locate(self, dataset: str, run: str) -> PipelinePlan:
        """The plan with the dataset and run folders set (known after stage 1
        in nightly mode)."""
        training = self.training.model_copy(
            update={"dataset": dataset, "output": _join(run, "model")}
        )
        return replace(self, dataset=dataset, run=run, training=training)


def _join(url: str, *parts: str) -> str:
    return url.rstrip("/") + "/" + "/".join(parts)


def make_plan(
    root: str,
    settings: GenerateSettings | dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    variants: list[str] | tuple[str, ...] | None = None,
    parity_lines: int = 500,
    eval_lines: int | None = None,
    samples: int = SAMPLE_LINES,
    storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
) -> PipelinePlan:
    """Resolve the settings of every stage; fail now on bad ones, not after
    an hour of training."""
    from scribeline.platform.export import check_variants

    if isinstance(settings, GenerateSettings):
        values = settings.model_dump()
    else:
        values = {**DEMO_GENERATE, **(settings or {})}
    generate = resolve_settings(
        values, workers=workers, storage_options=storage_options
    )
    options = dict(generate.storage_options)
    dataset = _join(root, "dataset")
    generate = generate.model_copy(update={"output": dataset})

    given = dict(training or {})
    if "storage_options" in given:
        raise SettingsError(
            "storage options are not training settings here: give them once for "
            "the whole run (storage_options, storage_secret or the environment)."
        )
    model = {**DEMO_TRAINING["model"], **(given.pop("model", None) or {})}
    fields = {**DEMO_TRAINING, **given, "model": model}
    if "epochs" in given and "max_steps" not in given:
        fields.pop("max_steps")  # epochs asked for: the demo step cap must not win
    fields.update(
        dataset=dataset,
        output=_join(root, "model"),
        storage_options=options,
        resume=True,  # a rerun continues an interrupted run (same settings only)
    )
    try:
        train_settings = TrainSettings(**fields)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'training'}: {e['msg']}"
            for e in err.errors()
        )
        raise SettingsError(f"invalid training settings: {problems}.") from None
    if parity_lines < 1:
        raise SettingsError(f"parity_lines must be at least 1, got {parity_lines}.")
    return PipelinePlan(
        root=root,
        run=root,
        dataset=dataset,
        generate=generate,
        training=train_settings,
        variants=check_variants(list(variants or DEFAULT_VARIANTS)),
        parity_lines=parity_lines,
        eval_lines=eval_lines,
        samples=samples,
        storage_options=options,
    )


# --------------------------------------------------------------------------
# The stages, as plain functions (the flow wraps them as tasks)
# --------------------------------------------------------------------------


def train_stage(plan: PipelinePlan, log: Any) -> Any:
    """Train (or resume) the recognizer; progress lines at the loop's cadence."""
    from scribeline.platform.training import train

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            log.info(
                "train step %d/%d loss %.3f %.1f lines/s",
                event["step"],
                event["total_steps"],
                event["loss"],
                event["lines_per_s"],
            )
        elif event["event"] == "validation" and "val_cer" in event:
            log.info("train step %d: val CER %.4f", event["step"], event["val_cer"])

    return train(plan.training, on_progress=progress)


def export_stage(plan: PipelinePlan) -> dict[str, Any]:
    from scribeline.platform.export import export_tflite

    return export_tflite(
        plan.model,
        plan.tflite,
        dataset_url=plan.dataset,
        variants=plan.variants,
        parity_lines=plan.parity_lines,
        storage_options=plan.storage_options,
    )


def evaluate_stage(plan: PipelinePlan, report: dict[str, Any]) -> dict[str, Any]:
    """CER/WER of every kept TFLite model on the test split, read from the
    written files by the app-side reader; and sample predictions."""
    import numpy as np

    from scribeline.platform.dataset import iter_rows
    from scribeline.platform.predict import TFLiteReader, fit_line
    from scribeline.platform.recognizer import Recognizer
    from scribeline.platform.report import data_uri, line_png

    kept = {
        variant: TFLiteReader.load(entry["file"], plan.storage_options)
        for variant, entry in report["variants"].items()
        if entry["status"] == "kept"
    }
    results = {}
    for variant, reader in kept.items():
        started = time.perf_counter()
        result = reader.evaluate_dataset(
            plan.dataset, "test", plan.eval_lines, plan.storage_options
        )
        results[variant] = {
            "cer": round(result.cer, 6),
            "wer": round(result.wer, 6),
            "lines": result.lines,
            "seconds": round(time.perf_counter() - started, 2),
        }

    # Sample predictions: the Keras model and every kept variant, same lines.
    keras = Recognizer.load(plan.model, plan.storage_options)
    height, width = keras.geometry.height, keras.geometry.width
    rows = list(iter_rows(plan.dataset, "test", plan.samples, plan.storage_options))
    samples = []
    if rows:
        lines = np.stack([fit_line(r["image"], height, width) for r in rows])
        by_model = {"keras": keras.read(lines)}
        by_model.update({v: reader.predict(lines) for v, reader in kept.items()})
        for i, row in enumerate(rows):
            samples.append(
                {
                    "sample_id": row["sample_id"],
                    "image": data_uri(line_png(row["image"])),
                    "truth": row["text"],
                    **{name: texts[i] for name, texts in by_model.items()},
                }
            )
    return {"variants": results, "samples": samples}


def summarize(
    plan: PipelinePlan,
    manifest: dict[str, Any],
    result: Any,
    report: dict[str, Any],
    evaluation: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Everything the run produced, as one JSON-able dict."""
    totals = manifest["totals"]
    models = [
        {
            "model": "keras",
            "status": "reference",
            "parameters": report["keras"]["parameters"],
            "bytes": 4 * report["keras"]["parameters"],  # float32 weights
            "cer": result.test.get("cer"),
            "wer": result.test.get("wer"),
            "lines": result.test.get("lines"),
        }
    ]
    for variant, entry in report["variants"].items():
        row: dict[str, Any] = {"model": variant, "status": entry["status"]}
        if entry["status"] == "kept":
            parity = entry["metrics"]
            row.update(
                file=entry["file"],
                bytes=entry["bytes"],
                **evaluation["variants"].get(variant, {}),
                parity_lines=parity["lines"],
                parity_cer_delta=parity["cer_delta"],
                max_prob_diff=parity["max_prob_diff"],
                latency_ms=entry["latency"]["median_ms"],
                latency_p90_ms=entry["latency"]["p90_ms"],
            )
        else:
            row["reason"] = entry["reason"]
        models.append(row)
    return {
        "format": SUMMARY_FORMAT,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "where": {
            "root": display_url(plan.root),
            "dataset": display_url(plan.dataset),
            "model": display_url(plan.model),
            "tflite": display_url(plan.tflite),
            "summary": display_url(plan.summary),
        },
        "dataset": {
            "version": manifest["dataset_version"],
            "lines": totals["lines"],
            "by_split": {s: e["lines"] for s, e in totals["by_split"].items()},
            "bytes": totals["bytes"],
            "bytes_per_line": totals["bytes_per_line"],
            "charset": manifest["charset"]["chars"],
            "glyphs": manifest["sources"]["glyphs"].get("kind"),
            "corpus": manifest["sources"]["corpus"].get("kind"),
            "layout": manifest["settings"]["layout"]["mode"],
        },
        "training": {
            "checkpoint": result.checkpoint,
            "steps": result.step,
            "epochs": result.epoch,
            "train_lines_per_s": round(result.train_samples_per_s, 1),
            "train_seconds": round(result.train_seconds, 1),
            "val": {k: result.val.get(k) for k in ("cer", "wer", "lines")},
            "test": {k: result.test.get(k) for k in ("cer", "wer", "lines")},
            "losses": result.losses,
            "history": result.history,
        },
        "export": {
            "parity_lines": report["parity"]["lines"],
            "cer_tolerance": report["parity"]["cer_tolerance"],
            "prob_tolerance": report["parity"]["prob_tolerance"],
            "input_shape": report["input_shape"],
        },
        "models": models,
        "samples": evaluation["samples"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown: tables, the training curves, sample lines."""
    from scribeline.platform.report import data_uri, training_curves_png

    data, training, where = summary["dataset"], summary["training"], summary["where"]
    splits = ", ".join(f"{s} {n:,}" for s, n in data["by_split"].items())
    out = [
        f"# Pipeline run: {where['root']}",
        "",
        "| | |",
        "|---|---|",
        f"| dataset | `{where['dataset']}` |",
        f"| model (checkpoints) | `{where['model']}` |",
        f"| TFLite models | `{where['tflite']}` |",
        f"| dataset version | `{data['version']}` ({data['glyphs']} glyphs, "
        f"{data['corpus']} corpus, {data['layout']} layout) |",
        f"| lines | {data['lines']:,} ({splits}); {data['bytes']:,} bytes, "
        f"{data['bytes_per_line']:,} a line |",
        f"| charset | {len(data['charset'])} characters |",
        f"| training | {training['steps']} steps ({training['epochs']} full epochs), "
        f"{training['train_lines_per_s']} lines/s, {training['train_seconds']} s |",
        "| stage times (s) | "
        + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items())
        + " |",
        "",
        "## Models on the test split",
        "",
        "| model | status | size | CER | WER | parity: CER delta, max prob diff "
        "| latency (1 thread) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["models"]:
        if row["status"] == "dropped":
            out.append(
                f"| {row['model']} | dropped: {_cell(row['reason'])} | | | | | |"
            )
            continue
        size = _size(row["bytes"])
        if row["model"] == "keras":
            size = f"{row['parameters']:,} params ({size} float32)"
        parity = (
            f"{100 * row['parity_cer_delta']:+.2f} pts, {row['max_prob_diff']:.2g} "
            f"({row['parity_lines']} lines)"
            if "parity_cer_delta" in row
            else "reference"
        )
        latency = f"{row['latency_ms']:.1f} ms" if "latency_ms" in row else ""
        out.append(
            f"| {row['model']} | {row['status']} | {size} | {_rate(row.get('cer'))} "
            f"| {_rate(row.get('wer'))} | {parity} | {latency} |"
        )
    losses = [(s, loss) for s, loss in training["losses"]]
    val_cer = [(h["step"], h["val_cer"]) for h in training["history"] if "val_cer" in h]
    png = training_curves_png(losses, val_cer)
    out += ["", "## Training", "", f"![training curves]({data_uri(png)})", ""]
    if summary["samples"]:
        names = [k for k in summary["samples"][0] if k not in ("sample_id", "image")]
        out += [
            "## Sample predictions (test split, greedy CTC decoding)",
            "",
            "| line image | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for sample in summary["samples"]:
            cells = [f"`{_cell(sample[n])}`" for n in names]
            out.append(f"| ![line]({sample['image']}) | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _size(count: int) -> str:
    return f"{count / 1e6:.2f} MB" if count >= 1e6 else f"{count / 1e3:.0f} KB"


def write_summary(plan: PipelinePlan, summary: dict[str, Any]) -> str:
    """``summary.json`` and ``summary.md`` into the run folder; the markdown."""
    markdown = summary_markdown(summary)
    root = resolve(plan.run, plan.storage_options)
    write_atomic(root.child("summary.json"), json.dumps(summary, indent=2).encode())
    write_atomic(root.child("summary.md"), markdown.encode())
    return markdown


# --------------------------------------------------------------------------
# The flow
# --------------------------------------------------------------------------


@task(name="train-recognizer", cache_policy=NONE)
def train_task(plan: PipelinePlan) -> Any:
    return train_stage(plan, get_run_logger())


@task(name="export_tflite", cache_policy=NONE)
def export_task(plan: PipelinePlan) -> dict[str, Any]:
    """``platform.export.export_tflite`` with the parity gate."""
    return export_stage(plan)


@task(name="evaluate-tflite", cache_policy=NONE)
def evaluate_task(plan: PipelinePlan, report: dict[str, Any]) -> dict[str, Any]:
    return evaluate_stage(plan, report)


@credential_safe_flow(
    name="nightly-pipeline",
    description="Generate a dataset version, train, export to TFLite, evaluate.",
    validate_parameters=False,  # settings may be a GenerateSettings in-process
)
def nightly_pipeline(
    root: str = DEFAULT_ROOT,
    settings: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    variants: list[str] | None = None,
    parity_lines: int = 500,
    eval_lines: int | None = None,
    samples: int = SAMPLE_LINES,
    nightly: bool = False,
    keep: int = 7,
    timezone: str = "UTC",
    night: str | None = None,
    seed_per_night: bool = True,
    runner: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    storage_secret: str | None = None,
) -> dict[str, Any]:
    """Generate, train, export and evaluate; publish one summary; return it.

    Args:
        root: output root (folder or URL); the module docstring shows the layout.
        settings: ``GenerateSettings`` fields over ``DEMO_GENERATE`` (``output``
            is set by the pipeline).
        training: ``TrainSettings`` fields over ``DEMO_TRAINING`` (``model``
            merged field by field; ``dataset``/``output`` are set here).
        variants: TFLite variants (default all four); parity_lines: held-out
            lines of the export gate; eval_lines: test lines evaluated per
            variant (None: all); samples: sample predictions shown.
        nightly: generate through ``nightly-generate`` (a version per night
            under ``root``, ``latest.json``, the newest ``keep`` kept) and put
            the run under ``root/runs/<version>``; ``timezone``, ``night`` and
            ``seed_per_night`` as for ``nightly_generate``.
        runner, ray_address, workers, storage_secret: as for
            ``generate_dataset``.
    """
    log = get_run_logger()
    extra = load_storage_secret(storage_secret) if storage_secret else None
    plan = make_plan(
        root, settings, training, variants, parity_lines, eval_lines, samples, extra
    )
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    # 1. Generate (a subflow with its own progress and summary).
    if nightly:
        manifest, plan = _nightly_dataset(
            plan, keep, timezone, night, seed_per_night, runner, ray_address, workers
        )
    else:
        manifest = generate_dataset(
            settings=plan.generate,
            runner=runner,
            ray_address=ray_address,
            workers=workers,
            samples=0,  # the pipeline's summary shows sample lines
        )
    seconds["generate"] = time.perf_counter() - started
    log.info(
        "dataset version %s: %d lines at %s",
        manifest["dataset_version"],
        manifest["totals"]["lines"],
        display_url(plan.dataset),
    )

    # 2-4. Train, export with the parity gate, evaluate the files.
    tick = time.perf_counter()
    result = train_task(plan)
    seconds["train"] = time.perf_counter() - tick
    log.info(
        "trained %d steps: test CER %.4f -> %s",
        result.step,
        result.test.get("cer", float("nan")),
        display_url(plan.model),
    )
    tick = time.perf_counter()
    report = export_task(plan)
    seconds["export"] = time.perf_counter() - tick
    for variant, entry in report["variants"].items():
        if entry["status"] == "dropped":
            log.warning("%s model dropped: %s", variant, entry["reason"])
    tick = time.perf_counter()
    evaluation = evaluate_task(plan, report)
    seconds["evaluate"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started

    # Publish: one summary artifact, and the same beside the outputs.
    summary = summarize(plan, manifest, result, report, evaluation, seconds)
    markdown = write_summary(plan, summary)
    create_markdown_artifact(
        markdown,
        key=SUMMARY_KEY,
        description=f"pipeline run {display_url(plan.run)}",
    )
    log.info("summary -> %s", display_url(plan.summary))
    return summary


def _nightly_dataset(
    plan: PipelinePlan,
    keep: int,
    timezone: str,
    night: str | None,
    seed_per_night: bool,
    runner: str | None,
    ray_address: str | None,
    workers: int | None,
) -> tuple[dict[str, Any], PipelinePlan]:
    """Tonight's dataset version via ``nightly-generate``; the run folder named
    after it; runs of pruned versions deleted."""
    from scribeline.flows import nightly as nightly_flows
    from scribeline.platform.dataset import read_manifest

    if night is None:
        # This run's night, not the subflow's: a late retry stays on its night.
        night = nightly_flows.night_of(flow_run.scheduled_start_time, timezone)
        night = night.isoformat()
    pointer = nightly_flows.nightly_generate(
        root=plan.root,
        keep=keep,
        settings=plan.generate,
        timezone=timezone,
        night=night,
        seed_per_night=seed_per_night,
        runner=runner,
        ray_address=ray_address,
        workers=workers,
        samples=0,
    )
    top = resolve(plan.root, plan.storage_options)
    # nightly_generate leaves latest.json on a later night when backfilling:
    # take this night's version by name.
    name = _version_of_night(top, night, nightly_flows) or posixpath.basename(
        pointer["version"].rstrip("/")
    )
    dataset_url = top.child(nightly_flows.VERSIONS, name).url
    plan = plan.locate(dataset_url, top.child(RUNS, name).url)
    _prune_runs(top, {v.name for v in nightly_flows.list_versions(top)} | {name})
    return read_manifest(dataset_url, plan.storage_options), plan


def _version_of_night(top: Location, night: str, nightly_flows: Any) -> str | None:
    found = [
        v.name
        for v in nightly_flows.list_versions(top)
        if v.night == night and v.complete
    ]
    return found[-1] if found else None


def _prune_runs(top: Location, versions: set[str]) -> None:
    """Delete ``runs/<name>`` folders whose dataset version is gone."""
    folder = top.child(RUNS)
    try:
        entries = top.fs.ls(folder.path, detail=False)
    except FileNotFoundError:
        return
    for entry in entries:
        name = posixpath.basename(entry.rstrip("/"))
        if name not in versions:
            with contextlib.suppress(FileNotFoundError):
                top.fs.rm(folder.child(name).path, recursive=True)
            logger.info("deleted the run of pruned dataset version %s", name)


# --------------------------------------------------------------------------
# The deployment: the nightly job runs the whole pipeline
# --------------------------------------------------------------------------


def nightly_pipeline_deployment(
    root: str,
    *,
    keep: int = 7,
    cron: str = "0 4 * * *",
    timezone: str = "UTC",
    settings: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    variants: list[str] | None = None,
    parity_lines: int = 500,
    name: str = DEPLOYMENT_NAME,
    runner: str | None = None,
    ray_address: str | None = None,
    workers: int | None = None,
    storage_secret: str | None = None,
    seed_per_night: bool = True,
    samples: int = SAMPLE_LINES,
) -> RunnerDeployment:
    """``nightly_pipeline`` with ``nightly=True`` on ``cron`` in ``timezone``:
    every night a new dataset version, a model trained on it, its TFLite
    exports and one summary.

    The counterpart of ``flows.nightly.nightly_deployment`` (dataset only);
    serve it the same way: ``prefect.serve(nightly_pipeline_deployment(...))``.
    Parameters are stored by Prefect: no storage options in ``settings`` or
    ``training``; use ``storage_secret`` or the environment.
    """
    from scribeline.flows.nightly import DEFAULT_CRON, check_timezone

    check_timezone(timezone)
    if runner is not None:
        runner_choice(runner, ray_address)
    if keep < 1:
        raise SettingsError(f"keep must be at least 1, got {keep}.")
    for what, given in (("settings", settings), ("training", training)):
        if given and "storage_options" in given:
            raise SettingsError(
                f"deployment parameters are stored and shown by Prefect: keep "
                f"storage options out of {what} and pass storage_secret (a Prefect "
                "Secret block) or set SCRIBELINE_STORAGE_OPTIONS / AWS_* where it "
                "is served."
            )
    make_plan(root, settings, training, variants, parity_lines)  # fail now
    parameters: dict[str, Any] = {
        "root": root,
        "nightly": True,
        "keep": keep,
        "timezone": timezone,
        "parity_lines": parity_lines,
        "seed_per_night": seed_per_night,
        "samples": samples,
    }
    optional = {
        "settings": settings or None,
        "training": training or None,
        "variants": list(variants) if variants else None,
        "runner": runner,
        "ray_address": ray_address,
        "workers": workers,
        "storage_secret": storage_secret,
    }
    parameters.update({k: v for k, v in optional.items() if v is not None})
    return nightly_pipeline.to_deployment(
        name,
        schedule=Cron(cron or DEFAULT_CRON, timezone=timezone),
        parameters=parameters,
        description=f"Every night ({cron} {timezone}) under {display_url(root)}: a "
        f"new dataset version, a recognizer trained on it, its TFLite exports; the "
        f"last {keep} kept.",
        tags=["scribeline"],
        # A module path: a file path would put the repository root on sys.path.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


# --------------------------------------------------------------------------
# For the CLI: `scribeline run`
# --------------------------------------------------------------------------


def run_pipeline(
    output: str = DEFAULT_ROOT,
    *,
    settings: GenerateSettings | dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    variants: list[str] | tuple[str, ...] | None = None,
    parity_lines: int = 500,
    eval_lines: int | None = None,
    samples: int = SAMPLE_LINES,
    prefect: bool = False,
    storage_options: dict[str, Any] | None = None,
    workers: int | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Run the pipeline here (``prefect=True``: as the ``nightly-pipeline``
    flow, visible at ``PREFECT_API_URL``); print where everything went; return
    the summary."""
    plan = make_plan(
        output,
        settings,
        training,
        variants,
        parity_lines,
        eval_lines,
        samples,
        storage_options,
        workers,
    )
    train = plan.training
    length = f"{train.max_steps} steps" if train.max_steps else f"{train.epochs} epochs"
    echo(
        f"pipeline -> {display_url(output)}: {plan.generate.lines:,} lines; "
        f"train {length} of {train.batch_size} lines; export "
        f"{', '.join(plan.variants)}"
    )
    if prefect:
        summary = nightly_pipeline(
            root=output,
            settings=plan.generate,
            training=_training_fields(plan.training),
            variants=plan.variants,
            parity_lines=parity_lines,
            eval_lines=eval_lines,
            samples=samples,
        )
    else:
        summary = _run_here(plan, echo)
    where = summary["where"]
    for what in ("dataset", "model", "tflite", "summary"):
        echo(f"{what:<8} {where[what]}")
    return summary


def _training_fields(settings: TrainSettings) -> dict[str, Any]:
    """The training settings the flow rebuilds (the URLs are the flow's)."""
    exclude = {"dataset", "output", "storage_options", "resume"}
    return settings.model_dump(mode="json", exclude=exclude)


def _run_here(plan: PipelinePlan, echo: Any) -> dict[str, Any]:
    """The four stages in this process, without Prefect."""
    from scribeline.platform import dataset

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    echo(f"[1/4] generating a dataset version -> {display_url(plan.dataset)}")
    manifest = dataset.generate(plan.generate)
    seconds["generate"] = time.perf_counter() - started

    tick = time.perf_counter()
    echo(f"[2/4] training -> {display_url(plan.model)}")
    result = train_stage(plan, logger)
    seconds["train"] = time.perf_counter() - tick

    tick = time.perf_counter()
    echo(f"[3/4] exporting TFLite models (parity gate) -> {display_url(plan.tflite)}")
    report = export_stage(plan)
    seconds["export"] = time.perf_counter() - tick

    tick = time.perf_counter()
    echo("[4/4] evaluating the exported models on the test split")
    evaluation = evaluate_stage(plan, report)
    seconds["evaluate"] = time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started

    summary = summarize(plan, manifest, result, report, evaluation, seconds)
    write_summary(plan, summary)
    return summary
