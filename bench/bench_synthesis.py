"""Synthesis benchmark: lines/s on one core, end to end, and bytes per line.

    python bench/bench_synthesis.py                      # real data if present
    python bench/bench_synthesis.py --lines 100000 --textbook-lines 2000

End to end means what ``scribeline generate --workers 1`` does for every line:
pick a sentence and glyphs, compose the line image, encode, write Parquet shards
to a local folder, checksum them and commit the manifest. Loading the glyph
bank and corpus is timed separately (it happens once per process).

The textbook approach, timed in the same run on a subset: a float64 canvas per
line, one Python paste per character, every image kept in memory and saved
with ``np.save`` (200 KB per line). It is run on ``--textbook-lines`` lines
because 100,000 of its images would need 20 GB of memory; its rate and bytes
per line do not depend on the count.

Run from outside the repository root (``cd /tmp`` first), so the repo's
``platform/`` folder is not on ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from scribeline.platform import dataset
from scribeline.platform.settings import GenerateSettings

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def textbook(texts: list[str], sources: dataset.Sources, out: Path) -> float:
    """The yardstick: a float64 canvas and a Python paste per character."""
    started = time.perf_counter()
    images = textbook_compose(texts, sources)
    np.save(out, np.stack(images))
    return time.perf_counter() - started


def textbook_compose(texts: list[str], sources: dataset.Sources) -> list[np.ndarray]:
    bank = sources.bank
    rng = np.random.default_rng(0)
    by_class = [np.flatnonzero(bank.classes == c) for c in range(len(bank.class_chars))]
    images = []
    for text in texts:
        canvas = np.zeros((28, 32 * 28), dtype=np.float64)
        for k, char in enumerate(text):
            if char == " ":
                continue
            choices = by_class[bank.class_of(char)]
            glyph = bank.images[choices[rng.integers(len(choices))]]
            canvas[:, k * 28 : (k + 1) * 28] = glyph / 255.0
        images.append(canvas)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--textbook-lines", type=int, default=2_000)
    parser.add_argument("--layout", default="seed", choices=["seed", "natural"])
    parser.add_argument("--encoding", default="gray4", choices=["gray4", "raw8"])
    args = parser.parse_args()

    real = (SHARED / "emnist").is_dir()
    work = Path(tempfile.mkdtemp(prefix="scribeline-bench-"))
    settings = GenerateSettings(
        output=str(work / "ds"),
        lines=args.lines,
        shard_size=args.shard_size,
        glyphs=str(SHARED / "emnist") if real else None,
        corpus=(
            f"{SHARED}/wikisplit/test.tsv,{SHARED}/wikisplit/tune.tsv" if real else None
        ),
        layout={"mode": args.layout},
        image_encoding=args.encoding,
        workers=1,
    )
    print(f"data: {'EMNIST byclass + WikiSplit' if real else 'embedded default'}")
    print(f"cpu affinity: {len(os.sched_getaffinity(0))} cores visible, 1 used")

    started = time.perf_counter()
    sources = dataset.load_sources(settings)
    load_s = time.perf_counter() - started

    started, cpu = time.perf_counter(), time.process_time()
    manifest = dataset.generate(settings)
    gen_s = time.perf_counter() - started
    gen_cpu = time.process_time() - cpu
    lines = manifest["totals"]["lines"]
    bytes_per_line = manifest["totals"]["bytes"] / lines

    pool = sources.corpus.sentences["train"]
    picks = np.random.default_rng(1).integers(0, len(pool), args.textbook_lines)
    texts = [pool[i] for i in picks]
    tb_file = work / "textbook.npy"
    cpu = time.process_time()
    tb_s = textbook(texts, sources, tb_file)
    tb_cpu = time.process_time() - cpu
    tb_rate = args.textbook_lines / tb_s
    tb_bytes = tb_file.stat().st_size / args.textbook_lines

    # Composing alone (pick glyphs + compose, no encoding or writing), both ways.
    from scribeline.platform.render import Renderer

    renderer = Renderer(sources.bank, settings.layout, "train")
    rng = np.random.default_rng(2)
    many = [pool[i] for i in rng.integers(0, len(pool), 20_000)]
    cpu = time.process_time()
    for start in range(0, len(many), 1024):
        renderer.render(many[start : start + 1024], rng)
    compose_rate = len(many) / (time.process_time() - cpu)
    cpu = time.process_time()
    textbook_compose(texts, sources)
    tb_compose_rate = len(texts) / (time.process_time() - cpu)

    rate, cpu_rate = lines / gen_s, lines / gen_cpu
    tb_cpu_rate = args.textbook_lines / tb_cpu
    print(f"sources loaded once:      {load_s:8.2f} s")
    header = ("lines", "wall s", "lines/s", "CPU lines/s", "bytes/line")
    print(f"{'':22}" + "".join(f"{h:>12}" for h in header))
    for name, n, secs, r, cr, b in (
        ("scribeline (1 core)", lines, gen_s, rate, cpu_rate, bytes_per_line),
        (
            "textbook (1 core)",
            args.textbook_lines,
            tb_s,
            tb_rate,
            tb_cpu_rate,
            tb_bytes,
        ),
    ):
        print(f"{name:22}{n:>12,}{secs:>12.2f}{r:>12,.0f}{cr:>12,.0f}{b:>12,.0f}")
    print(
        f"speed ratio {rate / tb_rate:,.0f}x wall, {cpu_rate / tb_cpu_rate:,.0f}x CPU; "
        f"size ratio {tb_bytes / bytes_per_line:,.0f}x; encoding "
        f"{manifest['image_encoding']['name']}"
    )
    print(
        f"composing only (CPU): {compose_rate:,.0f} vs {tb_compose_rate:,.0f} "
        f"lines/s = {compose_rate / tb_compose_rate:,.0f}x"
    )
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
