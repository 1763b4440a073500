"""Can the input pipeline keep the model fed? Pipeline rows/s vs train-step rows/s.

    python bench/bench_pipeline.py                       # a 20k-line embedded dataset
    python bench/bench_pipeline.py --dataset /tmp/real/ds300k --batches 60

Measures, on this machine, one after another (never at once):

1. the training input pipeline alone, from a local dataset version: shuffled,
   decoded, label-encoded, normalised, with training noise, batched;
2. the same from S3: a moto server on 127.0.0.1, a few shards uploaded;
3. the model's consumption: the real train step (``make_train_step``, default
   ``TrainSettings``) on one fixed batch, so no input work is counted.

Also prints the pipeline's CPU-seconds per row: the pipeline shares the cores
with the model, so what it costs in CPU at the model's rate matters too.
Exits with status 1 when a pipeline delivers less than 3x the model's rate.
Timings on a shared machine are noisy; run it twice.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REQUIRED_RATIO = 3.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pipeline_rate(
    url: str, options: dict[str, Any], batches: int, batch: int
) -> dict[str, float]:
    from scribeline.platform.pipeline import DatasetSource, Geometry, make_dataset
    from scribeline.platform.train_settings import AugmentSettings

    source = DatasetSource.open(url, options)
    layout = source.layout
    geometry = Geometry(
        layout["height"],
        layout["max_chars"] * layout["slot_width"],
        layout["max_chars"],
    )
    stream = make_dataset(
        source, "train", batch, geometry, source.charset, augment=AugmentSettings()
    )
    with stream.iterate() as it:
        next(it)  # the shuffle buffer fills once per epoch: not the steady rate
        started, cpu = time.perf_counter(), cpu_seconds()
        rows = 0
        for _ in range(min(batches, stream.batches - 1)):
            rows += int(next(it)[0].shape[0])
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"rows_per_s": rows / wall, "cpu_s_per_row": cpu / rows, "rows": rows}


def model_rate(url: str, steps: int) -> dict[str, float]:
    import tensorflow as tf

    from scribeline.platform.model import blank_index, build_model, logits_model
    from scribeline.platform.pipeline import DatasetSource, Geometry, make_dataset
    from scribeline.platform.train_settings import TrainSettings
    from scribeline.platform.training import make_optimizer, make_train_step

    settings = TrainSettings(dataset=url, output=url + "-bench-unused")
    source = DatasetSource.open(url)
    layout = source.layout
    width = layout["max_chars"] * layout["slot_width"]
    geometry = Geometry(layout["height"], width, layout["max_chars"])
    strategy = tf.distribute.get_strategy()
    model = build_model(
        source.charset, layout["height"], width, **settings.model.build_kwargs()
    )
    net = logits_model(model)
    optimizer = make_optimizer(settings, 10_000, mixed=False)
    time_steps = int(net.output.shape[1])
    step = make_train_step(
        strategy,
        net,
        optimizer,
        time_steps,
        blank_index(source.charset),
        settings.batch_size,
    )
    stream = make_dataset(
        source, "train", settings.batch_size, geometry, source.charset, training=False
    )
    with stream.iterate() as it:
        images, labels, lengths, _ = next(it)
    batch = (images, labels, lengths)
    stop = tf.constant(0.0)
    for _ in range(3):  # trace and warm up
        step(batch, stop)
    started = time.perf_counter()
    for _ in range(steps):
        loss, _ = step(batch, stop)
    float(loss)
    wall = time.perf_counter() - started
    return {
        "rows_per_s": steps * settings.batch_size / wall,
        "batch_size": settings.batch_size,
        "parameters": model.count_params(),
        "time_steps": time_steps,
    }


def embedded_dataset(folder: Path, lines: int) -> str:
    from scribeline.platform.dataset import generate
    from scribeline.platform.settings import GenerateSettings

    url = str(folder / "dataset")
    generate(GenerateSettings(output=url, lines=lines, shard_size=5000))
    return url


def s3_copy(url: str, shards: int) -> tuple[str, dict[str, Any], Any]:
    """Upload the manifest and the first ``shards`` train shards to a moto server."""
    import boto3
    from moto.server import ThreadedMotoServer

    from scribeline.platform.dataset import read_manifest
    from scribeline.platform.storage import resolve

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket="bench")
    options = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    manifest = read_manifest(url)
    kept = [s for s in manifest["shards"] if s["split"] == "train"][:shards]
    manifest["shards"] = kept
    local, remote = resolve(url), resolve("s3://bench/dataset", options)
    for shard in kept:
        remote.fs.pipe_file(
            remote.child(shard["name"]).path, local.child(shard["name"]).read_bytes()
        )
    remote.fs.pipe_file(
        remote.child("manifest.json").path, json.dumps(manifest).encode()
    )
    return "s3://bench/dataset", options, server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", help="dataset version URL (default: generate)")
    parser.add_argument("--lines", type=int, default=20_000, help="when generating")
    parser.add_argument("--batches", type=int, default=40, help="pipeline batches")
    parser.add_argument("--model-steps", type=int, default=15, help="train steps")
    parser.add_argument("--s3-shards", type=int, default=2, help="shards uploaded")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 run")
    args = parser.parse_args()

    url = args.dataset or embedded_dataset(Path(tempfile.mkdtemp()), args.lines)
    model = model_rate(url, args.model_steps)
    print(
        f"model train step: {model['rows_per_s']:.1f} rows/s (batch "
        f"{model['batch_size']}, {model['parameters']:,} parameters, "
        f"{model['time_steps']} time steps)",
        flush=True,
    )
    results = {"local": pipeline_rate(url, {}, args.batches, model["batch_size"])}
    server = None
    if not args.no_s3:
        s3_url, options, server = s3_copy(url, args.s3_shards)
        results["s3"] = pipeline_rate(
            s3_url, options, args.batches, model["batch_size"]
        )
    ok = True
    for where, rate in results.items():
        ratio = rate["rows_per_s"] / model["rows_per_s"]
        share = rate["cpu_s_per_row"] * model["rows_per_s"]
        ok &= ratio >= REQUIRED_RATIO
        print(
            f"pipeline ({where}): {rate['rows_per_s']:.0f} rows/s over "
            f"{rate['rows']} rows = {ratio:.1f}x the model "
            f"({'ok' if ratio >= REQUIRED_RATIO else 'TOO SLOW'}, need "
            f"{REQUIRED_RATIO:.0f}x); {rate['cpu_s_per_row'] * 1e3:.2f} CPU-ms a row, "
            f"{share:.2f} cores at the model's rate",
            flush=True,
        )
    if server is not None:
        server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
