"""The training input pipeline: a dataset version's shards as ``tf.data``.

A split is read by its manifest, from a local folder or any fsspec URL
(``s3://`` with ``storage_options``)::

    pieces (shard, rows) of this worker, in a seeded order per epoch
      -> interleave: ``readers`` reader threads, one piece each, decoding row
         groups into chunks of 128 rows taken round-robin (a fixed order)
      -> tf.data: unbatch -> shuffle (bounded buffer, seeded)
      -> batch (drop_remainder for training) -> normalise (+ noise) -> prefetch

The readers are Python threads feeding one ``from_generator`` rather than a
``tf.data`` parallel interleave of generators: TensorFlow deadlocks destroying
such an interleave while a generator waits for the GIL (seen with TF 2.21), and
pyarrow's reading and zstd decoding release the GIL anyway. Iterate with
``InputStream.iterate()``, which stops the readers cleanly.

Elements are ``(images, labels, label_lengths, texts)``: ``[B, H, W, 1] float32``
with ink 1.0 and background 0.0; ``[B, L] int32`` class indices into the
manifest's ordered charset (padding 0, ignored beyond ``label_lengths``);
``[B] int32``; ``[B] string``. The CTC blank is class ``len(charset)``
(``scribeline.platform.model.blank_index``), never a label value.

Multi-worker runs: the split's rows, in manifest order, are cut into
``workers`` equal contiguous ranges whose length is a multiple of the
per-worker batch, so every worker reads a disjoint set of rows and runs the
same number of steps (fewer than one global batch of rows is left out of an
epoch; the training log says how many). Each worker reads only the shards its
range touches.

Determinism: with a fixed seed an epoch's batches are the same sequence on
every run, so a resumed run skips the batches it already trained on
(``skip_batches``) and continues with the same data and the same noise.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from scribeline.platform.dataset import read_manifest
from scribeline.platform.errors import DatasetError
from scribeline.platform.model import CharsetMismatchError, check_labels_fit
from scribeline.platform.storage import Location, resolve

logger = logging.getLogger(__name__)

# Rows handed from a reader to tf.data at once: small enough that the
# interleave mixes shards finely, large enough to amortise the Python call.
CHUNK_ROWS = 128

# Older manifests call raw8 by its long name.
_ENCODING_ALIASES = {"raw-uint8": "raw8"}


class EmptyDatasetError(DatasetError):
    """A split has no rows, or fewer than one batch."""


@dataclass(frozen=True)
class Piece:
    """A run of rows ``[start, stop)`` of one shard, read by one worker."""

    shard: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class SplitScan:
    """What reading the labels of a split found (text, width and height only)."""

    rows: int
    max_width: int
    heights: set[int]
    max_label: int
    max_steps: int


@dataclass
class DatasetSource:
    """A dataset version opened by its manifest; the pipeline's input."""

    url: str
    manifest: dict[str, Any]
    root: Location
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls, url: str, storage_options: dict[str, Any] | None = None
    ) -> DatasetSource:
        manifest = read_manifest(url, storage_options)
        return cls(url, manifest, resolve(url, storage_options), storage_options or {})

    @property
    def charset(self) -> str:
        return self.manifest["charset"]["chars"]

    @property
    def version(self) -> str:
        return self.manifest["dataset_version"]

    @property
    def encoding(self) -> str:
        name = self.manifest.get("image_encoding", {}).get("name", "raw8")
        return _ENCODING_ALIASES.get(name, name)

    @property
    def layout(self) -> dict[str, Any]:
        return self.manifest["settings"]["layout"]

    def shards(self, split: str) -> list[tuple[str, int]]:
        """``(name, rows)`` of the split's shards in manifest order."""
        return [
            (s["name"], int(s["rows"]))
            for s in self.manifest["shards"]
            if s["split"] == split
        ]

    def rows(self, split: str) -> int:
        return sum(rows for _, rows in self.shards(split))

    def open_shard(self, name: str) -> Any:
        return self.root.fs.open(self.root.child(name).path, "rb")

    def scan(self, split: str, time_steps: int | None = None) -> SplitScan:
        """Read every label of ``split`` (text, width, height columns only).

        Checks that every character is in the charset and, with
        ``time_steps``, that every label fits the CTC time axis.
        """
        allowed = set(self.charset)
        rows, max_width, heights, max_label, max_steps = 0, 0, set(), 0, 0
        for name, _ in self.shards(split):
            with self.open_shard(name) as f:
                table = pq.read_table(f, columns=["text", "width", "height"])
            texts = table.column("text").to_pylist()
            for text in texts:
                if not allowed.issuperset(text):
                    bad = sorted(set(text) - allowed)
                    raise CharsetMismatchError(
                        f"label {text!r} in {self.url}/{name} holds {''.join(bad)!r},"
                        f" outside the manifest's charset {self.charset!r}; the "
                        "dataset version is damaged: regenerate it."
                    )
            if time_steps is not None:
                max_steps = max(max_steps, check_labels_fit(texts, time_steps))
            rows += len(texts)
            if texts:
                max_label = max(max_label, max(len(t) for t in texts))
                max_width = max(max_width, int(table.column("width").to_numpy().max()))
                heights.update(np.unique(table.column("height").to_numpy()).tolist())
        return SplitScan(rows, max_width, heights, max_label, max_steps)


# --------------------------------------------------------------------------
# Which rows each worker reads
# --------------------------------------------------------------------------


def assign_rows(
    shards: list[tuple[str, int]], worker: int, workers: int, batch: int
) -> list[Piece]:
    """The pieces of ``worker``'s contiguous, equal range of the split's rows.

    Every worker gets ``floor(total / workers / batch) * batch`` rows, so all
    run the same number of full batches (``batch`` is the per-worker batch).
    """
    total = sum(rows for _, rows in shards)
    per_worker = total // workers // batch * batch
    start, stop = worker * per_worker, (worker + 1) * per_worker
    pieces, offset = [], 0
    for name, rows in shards:
        lo, hi = max(start, offset), min(stop, offset + rows)
        if lo < hi:
            pieces.append(Piece(name, lo - offset, hi - offset))
        offset += rows
    return pieces


def steps_per_epoch(source: DatasetSource, split: str, global_batch: int) -> int:
    """Full global batches in one pass over ``split`` (the same for any workers)."""
    return source.rows(split) // global_batch


# --------------------------------------------------------------------------
# Reading one piece: Parquet row groups -> decoded, label-encoded chunks
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """The fixed shape of every element: image height/width, label length."""

    height: int
    width: int
    max_label: int


def read_piece(
    source: DatasetSource, piece: Piece, geometry: Geometry, charset: str
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(images uint8 [n,H,W], labels, lengths, texts)`` chunks of a piece."""
    lut = {char: i for i, char in enumerate(charset)}
    with source.open_shard(piece.shard) as f:
        parquet = pq.ParquetFile(f)
        first = 0
        for group in range(parquet.metadata.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            lo, hi = max(piece.start, first), min(piece.stop, first + n)
            first += n
            if lo >= hi:
                continue
            table = parquet.read_row_group(
                group, columns=["text", "image", "width", "height"]
            ).slice(lo - (first - n), hi - lo)
            for at in range(0, table.num_rows, CHUNK_ROWS):
                chunk = table.slice(at, CHUNK_ROWS)
                texts = chunk.column("text").to_pylist()
                images = decode_images(chunk, geometry, source.encoding)
                labels, lengths = encode_labels(texts, lut, geometry.max_label)
                yield images, labels, lengths, np.array(texts, dtype=object)


def decode_images(table: Any, geometry: Geometry, encoding: str) -> np.ndarray:
    """The ``image`` column of a table -> ``[n, H, W] uint8``, padded right.

    Lines of one width (the seed layout) decode with one reshape of the column's
    data buffer; narrower lines (the natural layout) are padded with background.
    """
    column = table.column("image").combine_chunks()
    widths = table.column("width").to_numpy()
    heights = table.column("height").to_numpy()
    n, (height, width) = len(column), (geometry.height, geometry.width)
    if n and (heights.max() != height or widths.max() > width):
        raise DatasetError(
            f"a line image is {heights.max()}x{widths.max()} px; this pipeline "
            f"reads {height}x{width}. Train on one layout, or build the model for "
            "the larger size."
        )
    offsets = np.frombuffer(column.buffers()[1], np.int32)[
        column.offset : column.offset + n + 1
    ]
    data = np.frombuffer(column.buffers()[2], np.uint8)
    row_bytes = _row_bytes(widths, encoding)
    if n and (widths == widths[0]).all():
        packed = data[offsets[0] : offsets[-1]].reshape(n, height, row_bytes[0])
        images = _unpack(packed, int(widths[0]), encoding)
        if images.shape[2] == width:
            return images
        out = np.zeros((n, height, width), np.uint8)
        out[:, :, : images.shape[2]] = images
        return out
    out = np.zeros((n, height, width), np.uint8)
    for i in range(n):
        packed = data[offsets[i] : offsets[i + 1]].reshape(1, height, row_bytes[i])
        out[i, :, : widths[i]] = _unpack(packed, int(widths[i]), encoding)[0]
    return out


def _row_bytes(widths: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "gray4":
        return (widths + 1) // 2
    if encoding == "raw8":
        return widths
    raise DatasetError(
        f"unknown image encoding {encoding!r} in the manifest; this scribeline "
        "reads gray4 and raw8: upgrade scribeline or regenerate the dataset."
    )


# gray4 byte -> its two pixels (high nibble first), each level * 17.
_GRAY4_PAIRS = np.stack(
    [(np.arange(256) >> 4) * 17, (np.arange(256) & 0x0F) * 17], axis=1
).astype(np.uint8)


def _unpack(packed: np.ndarray, width: int, encoding: str) -> np.ndarray:
    """``[n, H, row_bytes]`` -> ``[n, H, width] uint8`` (255 ink)."""
    if encoding == "raw8":
        return packed
    pixels = _GRAY4_PAIRS[packed].reshape(*packed.shape[:2], packed.shape[2] * 2)
    return pixels[..., :width]


def encode_labels(
    texts: list[str], lut: dict[str, int], max_label: int
) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> ``[n, max_label] int32`` class indices (padded with 0), lengths."""
    labels = np.zeros((len(texts), max_label), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for i, text in enumerate(texts):
        codes = [lut[char] for char in text[:max_label]]
        labels[i, : len(codes)] = codes
        lengths[i] = len(codes)
    return labels, lengths


# --------------------------------------------------------------------------
# Reading pieces in threads, interleaved in a fixed order
# --------------------------------------------------------------------------


class _PieceReader:
    """Reads one piece in a thread into a small queue of chunks."""

    def __init__(
        self,
        source: DatasetSource,
        piece: Piece,
        geometry: Geometry,
        charset: str,
        cancel: threading.Event,
    ) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=4)
        self.cancel = cancel
        self.thread = threading.Thread(
            target=self._run,
            args=(source, piece, geometry, charset),
            name=f"scribeline-reader-{piece.shard}",
            daemon=True,
        )
        self.thread.start()

    def _run(self, *args: Any) -> None:
        try:
            for chunk in read_piece(*args):
                if not self._put(("chunk", chunk)):
                    return
            self._put(("end", None))
        except BaseException as err:  # handed to the consumer, raised there
            self._put(("error", err))

    def _put(self, item: Any) -> bool:
        while not self.cancel.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        """The next chunk, or None at the end of the piece (or on cancel)."""
        while not self.cancel.is_set():
            try:
                kind, value = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "error":
                raise value
            return value if kind == "chunk" else None
        return None


def interleave_chunks(
    source: DatasetSource,
    pieces: list[Piece],
    geometry: Geometry,
    charset: str,
    readers: int,
    cancel: threading.Event,
) -> Iterator[Any]:
    """Chunks of ``pieces``, ``readers`` pieces read at once by threads, taken
    round-robin one chunk at a time; a finished piece's slot goes to the next
    piece. The order depends on nothing but the arguments (deterministic)."""
    pending = iter(pieces)

    def start() -> _PieceReader | None:
        piece = next(pending, None)
        if piece is None:
            return None
        return _PieceReader(source, piece, geometry, charset, cancel)

    slots = [r for r in (start() for _ in range(readers)) if r is not None]
    at = 0
    while slots and not cancel.is_set():
        chunk = slots[at].get()
        if chunk is None:
            replacement = start()
            if replacement is not None:
                slots[at] = replacement
            else:
                del slots[at]
                at = at % len(slots) if slots else 0
            continue
        yield chunk
        at = (at + 1) % len(slots)


# --------------------------------------------------------------------------
# The tf.data pipeline
# --------------------------------------------------------------------------


@dataclass
class InputStream:
    """A ``tf.data`` pipeline fed by reader threads, and how to stop them.

    Iterate it with ``with stream.iterate() as batches:``. TensorFlow cannot
    destroy an iterator while one of its threads waits inside a Python
    generator (the destructor holds the GIL that the generator needs: a
    deadlock), so leaving the block stops the readers and drains what is
    buffered before the iterator goes away.
    """

    dataset: Any
    cancel: threading.Event
    batches: int | None = None

    @contextlib.contextmanager
    def iterate(self) -> Iterator[Any]:
        iterator = iter(self.dataset)
        try:
            yield iterator
        finally:
            self.cancel.set()
            with contextlib.suppress(Exception):
                for _ in iterator:
                    pass
            del iterator


def make_dataset(
    source: DatasetSource,
    split: str,
    batch_size: int,
    geometry: Geometry,
    charset: str,
    *,
    training: bool = True,
    worker: int = 0,
    workers: int = 1,
    worker_batch: int | None = None,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 4096,
    readers: int = 4,
    skip_batches: int = 0,
    augment: Any = None,
    limit: int | None = None,
) -> InputStream:
    """One epoch of ``split`` for ``worker`` of ``workers`` as a ``tf.data`` stream.

    Args:
        batch_size: rows per element (the per-replica batch under a strategy).
        worker_batch: rows one worker consumes per step (per-replica batch x
            replicas on the worker); the worker's range is a multiple of it.
            Defaults to ``batch_size``.
        training: shuffle, drop the remainder, augment. Off: every row of the
            split (up to ``limit``) in manifest order, the last batch partial.
        skip_batches: batches of this epoch already trained on (resume).
        augment: ``AugmentSettings`` or None.
    """
    import tensorflow as tf

    if training:
        pieces = assign_rows(
            source.shards(split), worker, workers, worker_batch or batch_size
        )
        order = np.random.default_rng([seed, epoch]).permutation(len(pieces))
        pieces = [pieces[i] for i in order]
    else:
        pieces = [Piece(name, 0, rows) for name, rows in source.shards(split)]
        pieces = _first_rows(pieces, limit)
    rows = sum(p.rows for p in pieces)
    if not pieces:
        raise EmptyDatasetError(
            f"split {split!r} of {source.url} gives worker {worker} of {workers} no "
            f"rows ({source.rows(split)} rows, batch {worker_batch or batch_size}); "
            "generate more lines or use a smaller --batch-size."
        )

    signature = (
        tf.TensorSpec((None, geometry.height, geometry.width), tf.uint8),
        tf.TensorSpec((None, geometry.max_label), tf.int32),
        tf.TensorSpec((None,), tf.int32),
        tf.TensorSpec((None,), tf.string),
    )
    cancel = threading.Event()

    def chunks() -> Iterator[Any]:
        yield from interleave_chunks(
            source, pieces, geometry, charset, min(readers, len(pieces)), cancel
        )

    ds = tf.data.Dataset.from_generator(chunks, output_signature=signature)
    ds = ds.unbatch()
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=_mix(seed, epoch))
        ds = ds.skip(skip_batches * batch_size)
    ds = ds.batch(batch_size, drop_remainder=training)
    ds = ds.enumerate(start=skip_batches)
    noise = augment if (training and augment is not None and augment.enabled) else None
    ds = ds.map(
        lambda i, elem: _prepare(i, elem, noise, _mix(seed, epoch)),
        num_parallel_calls=2,
        deterministic=True,
    )
    options = tf.data.Options()
    options.deterministic = True
    # Rows are assigned to workers above; tf.distribute must not shard again.
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF
    )
    batches = (
        rows // batch_size - skip_batches if training else math.ceil(rows / batch_size)
    )
    return InputStream(ds.with_options(options).prefetch(2), cancel, batches)


def _first_rows(pieces: list[Piece], limit: int | None) -> list[Piece]:
    if limit is None:
        return pieces
    kept, left = [], limit
    for piece in pieces:
        if left <= 0:
            break
        kept.append(
            Piece(piece.shard, piece.start, piece.start + min(left, piece.rows))
        )
        left -= kept[-1].rows
    return kept


def _mix(seed: int, epoch: int) -> int:
    """One 31-bit seed from (seed, epoch), stable across runs and platforms."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**31 - 1)


def _prepare(index: Any, elem: Any, noise: Any, seed: int) -> Any:
    """uint8 batch -> float32 ``[B, H, W, 1]`` in [0, 1], optionally with noise."""
    import tensorflow as tf

    images, labels, lengths, texts = elem
    x = tf.cast(images, tf.float32)[..., None] * (1.0 / 255.0)
    if noise is not None:
        x = augment_batch(x, noise, tf.stack([tf.constant(seed, tf.int64), index]))
    return x, labels, lengths, texts


def augment_batch(x: Any, settings: Any, seed: Any) -> Any:
    """Per-line ink intensity, an occasional 3x3 blur, and pixel noise.

    Stateless random ops seeded by (run seed, epoch, batch index): the same batch
    gets the same noise on a rerun, which a resumed run relies on.
    """
    import tensorflow as tf

    batch = tf.shape(x)[0]
    seeds = tf.random.experimental.stateless_split(seed, 3)
    ink = tf.random.stateless_uniform(
        (batch, 1, 1, 1), seeds[0], minval=settings.ink_min, maxval=1.0
    )
    x = x * ink
    if settings.blur_prob > 0:
        kernel = tf.constant([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16.0
        blurred = tf.nn.conv2d(x, kernel[:, :, None, None], 1, "SAME")
        pick = tf.random.stateless_uniform((batch, 1, 1, 1), seeds[1])
        x = tf.where(pick < settings.blur_prob, blurred, x)
    if settings.noise_std > 0:
        # Uniform noise with the same standard deviation: a third of the cost
        # of normal noise, and the network cannot tell them apart.
        half_width = settings.noise_std * 3**0.5
        x = x + tf.random.stateless_uniform(
            tf.shape(x), seeds[2], minval=-half_width, maxval=half_width
        )
    return tf.clip_by_value(x, 0.0, 1.0)
