"""Dataset versions: Parquet shards of line images and the manifest that lists them.

A dataset version is a folder (any storage URL) holding::

    manifest.json              written last: what the version holds
    shards/train-00000.parquet one row per line image, zstd
    shards/val-00000.parquet
    shards/test-00000.parquet

Columns of a shard (the image column is encoded as ``manifest["image_encoding"]``
says, see ``scribeline.platform.imagecodec``; ``decode_image`` reads it)::

    sample_id  string   "<split>-<shard>-<row>", unique in the version
    split      string   train | val | test
    text       string   the label, cleaned to the charset
    image      binary   the line image, gray4 (default) or raw8
    width      int32
    height     int32
    char_spans list<struct<start: int32, end: int32>>  x-span of each character

Shard ``k`` of split ``s`` is rendered from ``(seed, s, k)`` alone, so the same
settings give the same bytes whatever the number of processes or machines. A
shard is written under a temporary name and moved into place when complete;
``manifest.json`` is written after every shard is in place. While a version is
being written ``_pending.json`` records which version it is, so a rerun after a
crash finishes only the missing shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import posixpath
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from scribeline import __version__
from scribeline.platform import imagecodec
from scribeline.platform.corpus import CLEANING_POLICY, Corpus, load_corpus
from scribeline.platform.errors import DatasetError, StorageError
from scribeline.platform.glyphs import (
    CHARSET_VERSION,
    SPLIT_CODES,
    GlyphBank,
    load_glyph_bank,
)
from scribeline.platform.render import RenderedLines, Renderer
from scribeline.platform.settings import SPLITS, GenerateSettings, stable_digest
from scribeline.platform.storage import (
    TMP_PREFIX,
    Location,
    resolve,
    sha256_bytes,
    write_atomic,
)

logger = logging.getLogger(__name__)

FORMAT = "scribeline-dataset-v1"
MANIFEST = "manifest.json"
PENDING = "_pending.json"
SHARD_DIR = "shards"
# While a version is being written, each committed shard's record (rows,
# bytes, sha256) lands here, so a resume reads small files, not every shard.
RECORD_DIR = "_records"
SHARD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field(
            "char_spans",
            pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())])),
            nullable=False,
        ),
    ],
    metadata={"scribeline.format": FORMAT},
)


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """One shard to render: its split, its index within the split, its rows."""

    split: str
    index: int
    rows: int

    @property
    def name(self) -> str:
        return f"{SHARD_DIR}/{self.split}-{self.index:05d}.parquet"


@dataclass(frozen=True)
class ShardRecord:
    """What a committed shard holds; returned by workers (never pixels)."""

    name: str
    split: str
    rows: int
    bytes: int
    sha256: str
    seconds: float = 0.0


def split_line_counts(settings: GenerateSettings) -> dict[str, int]:
    """Lines per split: val and test fractions of ``lines``, the rest train."""
    val = round(settings.lines * settings.val_fraction)
    test = round(settings.lines * settings.test_fraction)
    return {"train": settings.lines - val - test, "val": val, "test": test}


def plan_shards(settings: GenerateSettings) -> list[ShardPlan]:
    """Every shard of the version, in a fixed order (train, val, test)."""
    plans = []
    counts = split_line_counts(settings)
    for split in ("val", "test"):
        if counts[split] == 0 and getattr(settings, f"{split}_fraction") > 0:
            logger.warning(
                "%d lines leave the %s split empty (%s_fraction %.2f); generate "
                "more lines for an evaluation split",
                settings.lines,
                split,
                split,
                getattr(settings, f"{split}_fraction"),
            )
    for split, count in counts.items():
        for index in range(math.ceil(count / settings.shard_size)):
            rows = min(settings.shard_size, count - index * settings.shard_size)
            plans.append(ShardPlan(split, index, rows))
    return plans


# --------------------------------------------------------------------------
# Sources: the glyph bank and the corpus, loaded once per process
# --------------------------------------------------------------------------


@dataclass
class Sources:
    bank: GlyphBank
    corpus: Corpus

    def describe(self) -> dict[str, Any]:
        return {"glyphs": self.bank.source, "corpus": self.corpus.source}


_SOURCES_CACHE: dict[str, Sources] = {}


def load_sources(settings: GenerateSettings) -> Sources:
    """Load the glyph bank and the corpus the settings name (cached per process)."""
    key = stable_digest(settings.content_dict())
    cached = _SOURCES_CACHE.get(key)
    if cached is not None:
        return cached
    bank = load_glyph_bank(settings)
    corpus = load_corpus(
        settings.corpus,
        charset=bank.charset,
        max_chars=settings.layout.max_chars,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        overflow=settings.overflow,
        fmt=settings.corpus_format,
        storage_options=settings.storage_options,
    )
    sources = Sources(bank, corpus)
    _SOURCES_CACHE.clear()  # one dataset's sources per process is enough
    _SOURCES_CACHE[key] = sources
    return sources


def dataset_version(settings: GenerateSettings, sources: Sources) -> str:
    """The content id of a dataset version: settings that shape the shards,
    the sources' checksums, the charset, the cleaning policy and the format."""
    return stable_digest(
        {
            "format": FORMAT,
            "settings": settings.content_dict(),
            "charset": sources.bank.charset,
            "cleaning_policy": CLEANING_POLICY,
            "sources": _checksums(sources.describe()),
        }
    )


def _checksums(obj: Any) -> Any:
    """Only the sha256 values of a sources description (names may move)."""
    if isinstance(obj, dict):
        return {k: _checksums(v) for k, v in obj.items() if k != "name"}
    if isinstance(obj, list):
        return [_checksums(v) for v in obj]
    return obj


# --------------------------------------------------------------------------
# Rendering and writing one shard
# --------------------------------------------------------------------------


def shard_rng(settings: GenerateSettings, plan: ShardPlan) -> np.random.Generator:
    """The generator for one shard: from the dataset seed and the shard alone."""
    return np.random.default_rng([settings.seed, SPLIT_CODES[plan.split], plan.index])


def render_shard(
    settings: GenerateSettings, plan: ShardPlan, sources: Sources
) -> bytes:
    """Render one shard and return its Parquet bytes (deterministic)."""
    rng = shard_rng(settings, plan)
    pool = sources.corpus.sentences[plan.split]
    renderer = Renderer(
        sources.bank, settings.layout, plan.split, settings.image_encoding
    )
    picks = rng.integers(0, len(pool), size=plan.rows)

    buffer = io.BytesIO()
    with pq.ParquetWriter(
        buffer,
        SHARD_SCHEMA,
        compression="zstd",
        compression_level=settings.compression_level,
        use_dictionary=["split"],
        write_statistics=["sample_id", "split", "width", "height"],
    ) as writer:
        step = settings.row_group_size
        for start in range(0, plan.rows, step):
            texts = [pool[i] for i in picks[start : start + step]]
            lines = renderer.render(texts, rng)
            table = _to_table(plan, start, texts, lines, settings.image_encoding)
            writer.write_table(table, row_group_size=step)
    return buffer.getvalue()


def _to_table(
    plan: ShardPlan,
    start: int,
    texts: list[str],
    lines: RenderedLines,
    encoding: imagecodec.ImageEncoding,
) -> pa.Table:
    n, height, _ = lines.images.shape
    widths = lines.widths
    images = lines.images
    if lines.encoding != encoding:
        images = imagecodec.encode(images, encoding)
    row_bytes = np.array([imagecodec.encoded_width(int(w), encoding) for w in widths])
    if (row_bytes == images.shape[2]).all():
        data = images.reshape(-1)
    else:  # natural layout: each line keeps its own width
        data = np.concatenate(
            [images[i, :, : row_bytes[i]].reshape(-1) for i in range(n)]
        )
    offsets = np.concatenate([[0], np.cumsum(row_bytes * height)]).astype(np.int32)
    image = pa.Array.from_buffers(
        pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )
    spans = pa.StructArray.from_arrays(
        [
            pa.array(lines.span_starts, pa.int32()),
            pa.array(lines.span_ends, pa.int32()),
        ],
        names=["start", "end"],
    )
    char_spans = pa.ListArray.from_arrays(
        pa.array(lines.span_offsets.astype(np.int32)), spans
    )
    ids = [f"{plan.split}-{plan.index:05d}-{start + i:06d}" for i in range(n)]
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array([plan.split] * n, pa.string()),
            pa.array(texts, pa.string()),
            image,
            pa.array(widths, pa.int32()),
            pa.array(np.full(n, height, np.int32)),
            char_spans.cast(SHARD_SCHEMA.field("char_spans").type),
        ],
        schema=SHARD_SCHEMA,
    )


def write_shard(
    settings: GenerateSettings, plan: ShardPlan, sources: Sources | None = None
) -> ShardRecord:
    """Render one shard and commit it to the output URL; return its record.

    This is the unit of work that local processes and Ray tasks run.
    """
    started = time.perf_counter()
    sources = sources or load_sources(settings)
    data = render_shard(settings, plan, sources)
    root = resolve(settings.output, settings.storage_options)
    write_atomic(root.child(plan.name), data)
    record = ShardRecord(
        plan.name, plan.split, plan.rows, len(data), sha256_bytes(data)
    )
    write_atomic(_record_location(root, plan), json.dumps(asdict(record)).encode())
    seconds = time.perf_counter() - started
    logger.debug("committed %s: %d rows, %d bytes", plan.name, plan.rows, len(data))
    return dataclasses.replace(record, seconds=seconds)


def _record_location(root: Location, plan: ShardPlan) -> Location:
    return root.child(RECORD_DIR, posixpath.basename(plan.name) + ".json")


# --------------------------------------------------------------------------
# A generation job: check the output, find what is left, commit the manifest
# --------------------------------------------------------------------------


@dataclass
class GenerationJob:
    """A dataset version being written to ``settings.output``."""

    settings: GenerateSettings
    sources: Sources
    version: str
    root: Location
    plans: list[ShardPlan]
    done: dict[str, ShardRecord]
    # The manifest, when the output already holds this version complete.
    complete: dict[str, Any] | None = None

    @property
    def todo(self) -> list[ShardPlan]:
        return [p for p in self.plans if p.name not in self.done]

    def commit(self, records: list[ShardRecord], seconds: float) -> dict[str, Any]:
        """Write ``manifest.json`` once every planned shard is in place."""
        by_name = dict(self.done)
        by_name.update({r.name: r for r in records})
        missing = [p.name for p in self.plans if p.name not in by_name]
        if missing:
            raise DatasetError(
                f"cannot commit {self.root.url}: {len(missing)} shards are missing "
                f"(first: {missing[0]}); rerun the same command to finish them."
            )
        shards = [by_name[p.name] for p in self.plans]
        manifest = build_manifest(self, shards, seconds)
        write_atomic(self.root.child(MANIFEST), json.dumps(manifest, indent=2).encode())
        with contextlib.suppress(FileNotFoundError):
            self.root.fs.rm(self.root.child(PENDING).path)
        self._clean_up()
        logger.info(
            "dataset version %s committed to %s: %d lines in %d shards",
            self.version,
            self.root.url,
            manifest["totals"]["lines"],
            len(shards),
        )
        return manifest

    def _clean_up(self) -> None:
        """Remove shard records and temporary objects left by killed writers.

        Readers never take either for a shard; this only tidies the folder.
        """
        fs = self.root.fs
        try:
            leftovers = [
                n
                for n in fs.ls(self.root.child(SHARD_DIR).path, detail=False)
                if is_temporary(n)
            ]
        except FileNotFoundError:
            leftovers = []
        records = self.root.child(RECORD_DIR).path
        for name, recursive in [(n, False) for n in leftovers] + [(records, True)]:
            try:
                fs.rm(name, recursive=recursive)
            except FileNotFoundError:
                pass
            except OSError as err:  # tidying only: the version is committed
                logger.warning("could not remove leftover %s: %s", name, err)


def prepare(
    settings: GenerateSettings, sources: Sources | None = None
) -> GenerationJob:
    """Load the sources, check the output URL and find the shards left to write.

    Raises ``DatasetError`` if the output already holds a different dataset
    version (or unrelated files), ``StorageError`` if it cannot be written.
    """
    sources = sources or load_sources(settings)
    version = dataset_version(settings, sources)
    root = resolve(settings.output, settings.storage_options)
    plans = plan_shards(settings)
    done: dict[str, ShardRecord] = {}

    existing = _read_json(root.child(MANIFEST))
    pending = _read_json(root.child(PENDING))
    if existing is not None:
        _check_manifest(root, existing)
        _check_same_version(root, existing.get("dataset_version"), version)
        recorded = {s["name"]: ShardRecord(**s) for s in existing["shards"]}
        done = _intact(root, recorded)
        if len(done) == len(recorded):
            return GenerationJob(
                settings, sources, version, root, plans, done, existing
            )
        # Missing or truncated shards: take the manifest back and rewrite them.
        logger.warning(
            "%s: %d of %d shards are missing or damaged; rewriting them",
            root.url,
            len(recorded) - len(done),
            len(recorded),
        )
        _write_pending(root, version, settings)
        root.fs.rm(root.child(MANIFEST).path)
        return GenerationJob(settings, sources, version, root, plans, done)
    if pending is not None:
        _check_same_version(root, pending.get("dataset_version"), version)
        done = _intact(root, _committed_shards(root, plans))
        logger.info(
            "resuming dataset version %s at %s: %d of %d shards already committed",
            version,
            root.url,
            len(done),
            len(plans),
        )
    else:
        _check_empty(root)
        _write_pending(root, version, settings)
    return GenerationJob(settings, sources, version, root, plans, done)


def _write_pending(root: Location, version: str, settings: GenerateSettings) -> None:
    write_atomic(
        root.child(PENDING),
        json.dumps(
            {"dataset_version": version, "settings": settings.public_dict()},
            indent=2,
        ).encode(),
    )


def _intact(root: Location, records: dict[str, ShardRecord]) -> dict[str, ShardRecord]:
    """The records whose shard is present with the recorded size (one listing).

    Sizes catch missing and truncated shards cheaply; ``verify`` (``scribeline
    inspect``) compares checksums.
    """
    try:
        sizes = {
            posixpath.basename(entry["name"]): entry["size"]
            for entry in root.fs.ls(root.child(SHARD_DIR).path, detail=True)
        }
    except FileNotFoundError:
        return {}
    return {
        name: record
        for name, record in records.items()
        if sizes.get(posixpath.basename(name)) == record.bytes
    }


def _read_json(loc: Location) -> dict[str, Any] | None:
    try:
        return json.loads(loc.read_bytes())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{loc.url} is not valid JSON ({err}); the dataset version is damaged: "
            "delete its folder and generate again."
        ) from err


def _check_same_version(root: Location, found: str | None, version: str) -> None:
    if found != version:
        raise DatasetError(
            f"{root.url} already holds dataset version {found}, made with other "
            f"settings or sources than this run (version {version}). Choose a new "
            "--output, or delete that folder to replace it."
        )


def _check_empty(root: Location) -> None:
    try:
        entries = root.fs.ls(root.path, detail=False)
    except FileNotFoundError:
        return
    except OSError as err:
        raise StorageError(f"cannot list {root.url}: {err}") from err
    names = {posixpath.basename(e.rstrip("/")) for e in entries}
    if SHARD_DIR in names:
        raise DatasetError(
            f"{root.url} holds shards but neither {MANIFEST} nor {PENDING}: its "
            "record of which dataset version it is was deleted. Delete the folder "
            "and generate again, or choose another --output."
        )
    if entries and not root.fs.isfile(root.path):
        raise DatasetError(
            f"{root.url} is not empty and holds no scribeline dataset "
            f"({len(entries)} entries, e.g. {posixpath.basename(entries[0])}). "
            "Choose an empty or new folder for --output."
        )
    if entries:
        raise DatasetError(f"{root.url} is a file; --output must name a folder.")


def _committed_shards(root: Location, plans: list[ShardPlan]) -> dict[str, ShardRecord]:
    """Shards already in place (complete by construction: atomic commit).

    One listing finds them; their records come from the small files written
    after each shard. A shard whose record is missing (a writer killed between
    the two writes) is read back and checksummed.
    """
    try:
        present = {
            posixpath.basename(p)
            for p in root.fs.ls(root.child(SHARD_DIR).path, detail=False)
        }
    except FileNotFoundError:
        return {}
    done = {}
    for plan in plans:
        if posixpath.basename(plan.name) not in present:
            continue
        try:
            record = ShardRecord(
                **json.loads(_record_location(root, plan).read_bytes())
            )
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            data = root.child(plan.name).read_bytes()
            try:
                rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
            except (pa.ArrowException, OSError):
                rows = -1
            if rows != plan.rows:  # damaged after its commit: write it again
                continue
            record = ShardRecord(
                plan.name, plan.split, plan.rows, len(data), sha256_bytes(data)
            )
        done[plan.name] = record
    return done


def build_manifest(
    job: GenerationJob, shards: list[ShardRecord], seconds: float
) -> dict[str, Any]:
    bank, corpus = job.sources.bank, job.sources.corpus
    by_split: dict[str, dict[str, int]] = {}
    for s in shards:
        entry = by_split.setdefault(s.split, {"lines": 0, "shards": 0, "bytes": 0})
        entry["lines"] += s.rows
        entry["shards"] += 1
        entry["bytes"] += s.bytes
    lines = sum(s.rows for s in shards)
    total_bytes = sum(s.bytes for s in shards)
    return {
        "format": FORMAT,
        "dataset_version": job.version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "scribeline_version": __version__,
        "settings": job.settings.public_dict(),
        "charset": {
            "version": CHARSET_VERSION,
            "chars": bank.charset,
            "sha256": sha256_bytes(bank.charset.encode()),
        },
        "cleaning_policy": CLEANING_POLICY,
        "image_encoding": imagecodec.describe(job.settings.image_encoding),
        "sources": job.sources.describe(),
        "glyph_bank": {
            "images": len(bank.images),
            "classes": len(bank.class_chars),
            "by_split": bank.split_counts(),
        },
        "corpus": corpus.stats,
        "shards": [
            {k: v for k, v in asdict(s).items() if k != "seconds"} for s in shards
        ],
        "totals": {
            "lines": lines,
            "shards": len(shards),
            "bytes": total_bytes,
            "bytes_per_line": round(total_bytes / max(lines, 1), 1),
            "by_split": by_split,
        },
        "generation": {"seconds": round(seconds, 3)},
    }


# --------------------------------------------------------------------------
# Running a job in this process or in local processes
# --------------------------------------------------------------------------


Runner = Callable[
    [GenerateSettings, "GenerationJob", list[ShardPlan]], Iterator[ShardRecord]
]


def generate(
    settings: GenerateSettings,
    on_shard: Callable[[ShardRecord, int, int], None] | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Generate a dataset version and return its manifest.

    ``runner(settings, job, todo)`` writes the shards in ``todo`` and yields
    their records as they are committed; the default runs them here or in
    ``settings.workers`` local processes (``scribeline.workers`` has one for
    Ray). ``on_shard(record, done, total)`` is called in this process as each
    shard is committed.
    """
    started = time.perf_counter()
    job = prepare(settings)
    if job.complete is not None:
        logger.info(
            "%s already holds dataset version %s, complete; nothing to do",
            job.root.url,
            job.version,
        )
        return job.complete
    todo = job.todo
    total, finished = len(job.plans), len(job.done)
    logger.info(
        "dataset version %s: %d shards to write (%d already committed), %d lines",
        job.version,
        len(todo),
        finished,
        settings.lines,
    )
    records = []
    # closing(): an error here (in on_shard, say) stops the runner at once, so
    # it can cancel work in flight and shut down a cluster it started.
    with contextlib.closing((runner or local_runner)(settings, job, todo)) as stream:
        for record in stream:
            records.append(record)
            finished += 1
            if on_shard:
                on_shard(record, finished, total)
    return job.commit(records, time.perf_counter() - started)


def local_runner(
    settings: GenerateSettings, job: GenerationJob, todo: list[ShardPlan]
) -> Iterator[ShardRecord]:
    """Write shards in this process, or in ``settings.workers`` processes."""
    if settings.workers == 1 or len(todo) <= 1:
        for plan in todo:
            yield write_shard(settings, plan, job.sources)
        return
    # spawn, not fork: the parent may hold threads (progress bars, Prefect).
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        settings.workers, mp_context=ctx, initializer=_quiet_worker
    )
    try:
        futures = [pool.submit(write_shard, settings, plan) for plan in todo]
        for future in as_completed(futures):
            yield future.result()
    finally:
        # On Ctrl-C or an error, shards not started are dropped at once; the
        # ones being written finish or die, and a rerun resumes either way.
        pool.shutdown(wait=True, cancel_futures=True)


def _quiet_worker() -> None:
    """Worker processes: the parent already logged the source warnings."""
    logging.getLogger("scribeline").setLevel(logging.ERROR)


# --------------------------------------------------------------------------
# Reading a dataset version
# --------------------------------------------------------------------------


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> dict:
    """The manifest of the dataset version at ``url``."""
    root = resolve(url, storage_options)
    manifest = _read_json(root.child(MANIFEST))
    if manifest is None:
        pending = root.child(PENDING).exists()
        hint = (
            "its generation has not finished: rerun the same generate command"
            if pending
            else "generate one with `scribeline generate --output URL`"
        )
        raise FileNotFoundError(
            f"no dataset version at {root.url} ({MANIFEST} is missing); {hint}."
        )
    _check_manifest(root, manifest)
    return manifest


_MANIFEST_KEYS = {
    "dataset_version": str,
    "settings": dict,
    "charset": dict,
    "image_encoding": dict,
    "sources": dict,
    "shards": list,
    "totals": dict,
}


def _check_manifest(root: Location, manifest: Any) -> None:
    """A manifest that is JSON but not ours, or cut short, is a clear error."""
    where = f"{root.url}/{MANIFEST}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise DatasetError(
            f"{where} is not a {FORMAT} manifest (format {found!r}); regenerate "
            "the dataset version with this scribeline into an empty folder."
        )
    for key, kind in _MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise DatasetError(
                f"{where} has no valid {key!r}; the manifest is damaged: delete the "
                "folder and generate the dataset version again."
            )


def verify(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Check every shard's size and sha256 against the manifest.

    Returns a list of problems (empty when the version is intact).
    """
    root = resolve(url, storage_options)
    manifest = read_manifest(url, storage_options)
    problems = []
    for shard in manifest["shards"]:
        loc = root.child(shard["name"])
        try:
            data = loc.read_bytes()
        except FileNotFoundError:
            problems.append(f"{shard['name']}: missing")
            continue
        if len(data) != shard["bytes"]:
            problems.append(
                f"{shard['name']}: {len(data)} bytes, manifest says {shard['bytes']}"
            )
        elif sha256_bytes(data) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
    return problems


def iter_rows(
    url: str,
    split: str | None = None,
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Rows of a dataset version (optionally one split), images as arrays."""
    root = resolve(url, storage_options)
    manifest = read_manifest(url, storage_options)
    if split is not None and split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    count = 0
    encoding = manifest["image_encoding"]["name"]
    for shard in manifest["shards"]:
        if split is not None and shard["split"] != split:
            continue
        for row in _shard_rows(root, shard["name"], encoding):
            yield row
            count += 1
            if limit is not None and count >= limit:
                return


def _shard_rows(root: Location, name: str, encoding: str) -> Iterator[dict[str, Any]]:
    """One shard's rows, row group by row group (a preview reads one group)."""
    try:
        with root.fs.open(root.child(name).path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    row["image"] = decode_image(
                        row["image"], row["height"], row["width"], encoding
                    )
                    yield row
    except (pa.ArrowException, ValueError) as err:
        raise DatasetError(
            f"shard {name} of {root.url} is damaged ({err}); rerun the generate "
            "command that made it to rewrite damaged shards."
        ) from err


def decode_image(
    data: bytes, height: int, width: int, encoding: str = "gray4"
) -> np.ndarray:
    """A stored ``image`` value -> ``[height, width] uint8`` (255 = ink)."""
    return imagecodec.decode(data, height, width, encoding)


def is_temporary(name: str) -> bool:
    """Whether an object name is an uncommitted write (never a shard)."""
    return posixpath.basename(name).startswith(TMP_PREFIX)
