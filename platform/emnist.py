"""Load EMNIST from the official NIST gzip/IDX layout into a ``GlyphBank``.

The layout is the one in NIST's ``gzip.zip`` (Cohen et al. 2017)::

    emnist-<split>-train-images-idx3-ubyte.gz   magic 2051, count, 28, 28, pixels
    emnist-<split>-train-labels-idx1-ubyte.gz   magic 2049, count, labels
    emnist-<split>-test-images-idx3-ubyte.gz
    emnist-<split>-test-labels-idx1-ubyte.gz
    emnist-<split>-mapping.txt                  "label ascii_code" per line

``url`` is a folder holding those files (a local path or any fsspec URL:
``file://``, ``memory://``, ``s3://``), a folder with a ``gzip/`` folder in it,
or the ``gzip.zip`` archive itself. Images are stored transposed in these files;
the bank holds them upright. Example::

    bank = load_emnist("~/data/emnist/gzip.zip", split="balanced")
"""

from __future__ import annotations

import gzip
import logging
import posixpath
import re
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from scribeline.platform.errors import GlyphSourceError, StorageError
from scribeline.platform.glyphs import (
    GLYPH_SIZE,
    SPLIT_CODES,
    GlyphBank,
    assign_splits,
)
from scribeline.platform.storage import resolve, sha256_bytes

logger = logging.getLogger(__name__)

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
_FILE_RE = re.compile(
    r"^emnist-(?P<split>[a-z]+)-(?:(?:train|test)-(?:images|labels)-idx[13]-ubyte"
    r"(?:\.gz)?|mapping\.txt)$"
)
_LAYOUT_HINT = (
    "pass the folder that holds the official emnist-<split>-*-idx*-ubyte.gz and "
    "emnist-<split>-mapping.txt files, or the official gzip.zip"
)


@dataclass
class _Folder:
    """The EMNIST files found at a URL: file name -> how to read its bytes."""

    where: str
    paths: dict[str, str]
    read_path: Callable[[str], bytes]

    def label(self, name: str) -> str:
        """How messages name a file: its name and where it was found."""
        return f"{name} in {self.where}"

    def read(self, name: str) -> bytes:
        try:
            return self.read_path(self.paths[name])
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise GlyphSourceError(
                f"cannot read {name} in {self.where}: {type(err).__name__}: {err}. "
                "Check the URL and its storage options, or download the file again."
            ) from err


def load_emnist(
    url: str,
    split: str = "byclass",
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 20170301,
    storage_options: dict[str, Any] | None = None,
) -> GlyphBank:
    """Load one EMNIST split (``byclass``, ``balanced``, ``letters``, ...).

    With both the EMNIST train and test files present, the train glyphs form
    the train split and the test glyphs are divided between val and test, per
    class, in the ratio ``val_fraction : test_fraction``. With only one of them
    (e.g. the test files alone), ``assign_splits`` holds out a reproducible part
    of each class. Either way each glyph image is in exactly one split.

    Raises ``GlyphSourceError`` for a missing or malformed file, naming the file.
    """
    started = time.perf_counter()
    with _open_folder(url, storage_options) as folder:
        names = _split_files(folder, split)
        mapping_raw = folder.read(names["mapping"])
        class_chars, label_to_class = _parse_mapping(
            folder.label(names["mapping"]), mapping_raw
        )
        files = [_file_entry(names["mapping"], mapping_raw)]

        # Read each part (train, test) present: labels first, they are small and
        # a broken one fails before 30 MB of images are read.
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for part in ("train", "test"):
            if part not in names:
                continue
            images_name, labels_name = names[part]
            labels = _read_file(folder, labels_name, LABELS_MAGIC, files)
            images = _read_file(folder, images_name, IMAGES_MAGIC, files)
            if len(images) != len(labels):
                raise GlyphSourceError(
                    f"{images_name} holds {len(images)} images but {labels_name} "
                    f"holds {len(labels)} labels in {folder.where}; the two files "
                    "must come from the same download. Download both again."
                )
            classes = _classes_of(
                labels, folder.label(labels_name), names["mapping"], label_to_class
            )
            parts[part] = (images, classes)

    _check_every_class_used(parts, class_chars, names["mapping"], folder.where)

    # Assign splits: the EMNIST train/test division is kept where both exist.
    if len(parts) == 2:
        train_classes, test_classes = parts["train"][1], parts["test"][1]
        splits = np.concatenate(
            [
                np.full(len(train_classes), SPLIT_CODES["train"], dtype=np.int8),
                _divide_held_out(test_classes, val_fraction, test_fraction, seed),
            ]
        )
    else:
        (only_classes,) = (classes for _, classes in parts.values())
        splits = assign_splits(only_classes, val_fraction, test_fraction, seed)

    # Images are stored transposed (column-major) by NIST: flip them upright,
    # copying each part once into one contiguous array.
    images = np.empty((len(splits), GLYPH_SIZE, GLYPH_SIZE), dtype=np.uint8)
    start = 0
    for part_images, _ in parts.values():
        images[start : start + len(part_images)] = part_images.transpose(0, 2, 1)
        start += len(part_images)
    classes = np.concatenate([classes for _, classes in parts.values()])
    bank = GlyphBank(
        images=images,
        classes=classes,
        class_chars=class_chars,
        splits=splits,
        source={"kind": "emnist", "split": split, "files": files},
    )
    logger.info(
        "Loaded EMNIST %s from %s: %d glyph images, %d classes, splits %s (%.1f s)",
        split,
        folder.where,
        len(images),
        len(class_chars),
        bank.split_counts(),
        time.perf_counter() - started,
    )
    return bank


@contextmanager
def _open_folder(url: str, storage_options: dict[str, Any] | None) -> Iterator[_Folder]:
    """The EMNIST files at ``url``: a folder, a folder's ``gzip/``, or a zip."""
    loc = resolve(url, storage_options)
    fs = loc.fs
    try:
        exists = fs.exists(loc.path)
        is_file = exists and fs.isfile(loc.path)
    except OSError as err:
        raise StorageError(f"cannot reach {url}: {err}") from err
    if not exists:
        raise GlyphSourceError(
            f"EMNIST folder or archive {url} not found; {_LAYOUT_HINT}."
        )

    if not is_file:
        paths = _emnist_files(fs.ls(loc.path, detail=False))
        gzip_dir = posixpath.join(loc.path, "gzip")
        if not paths and fs.isdir(gzip_dir):
            paths = _emnist_files(fs.ls(gzip_dir, detail=False))
        yield _Folder(url, paths, fs.cat_file)
        return

    # A single file: the official gzip.zip (files under gzip/ inside it).
    with fs.open(loc.path, "rb") as raw:
        try:
            archive = fsspec.filesystem("zip", fo=raw)
        except zipfile.BadZipFile as err:
            raise GlyphSourceError(
                f"{url} is a file but not a zip archive ({err}); {_LAYOUT_HINT}."
            ) from err
        try:
            members = archive.find("", withdirs=False)
            yield _Folder(url, _emnist_files(members), archive.cat_file)
        finally:
            archive.close()


def _emnist_files(paths: list[str]) -> dict[str, str]:
    """File name -> path for the EMNIST files among ``paths`` (shallowest wins)."""
    found: dict[str, str] = {}
    for path in sorted(paths, key=lambda p: (p.count("/"), p)):
        name = posixpath.basename(path.rstrip("/"))
        if _FILE_RE.match(name):
            found.setdefault(name, path)
    return found


def _split_files(folder: _Folder, split: str) -> dict[str, Any]:
    """The names of the files of ``split``: mapping, and (images, labels) by part.

    A part whose images and labels are both missing is left out; half a part,
    or neither part, is an error.
    """
    # Splits with glyph files; mapping files alone (all six ship together) don't
    # count.
    present = sorted(
        {_FILE_RE.match(n).group("split") for n in folder.paths if "-idx" in n}
    )
    names: dict[str, Any] = {}
    for part in ("train", "test"):
        stems = [f"emnist-{split}-{part}-{kind}" for kind in ("images", "labels")]
        pair = [_find_idx(folder, stem) for stem in stems]
        if pair[0] and pair[1]:
            names[part] = tuple(pair)
        elif pair[0] or pair[1]:
            have, lack = (pair[0], "labels") if pair[0] else (pair[1], "images")
            raise GlyphSourceError(
                f"{folder.where} holds {have} but no {part} {lack} file for the "
                f"EMNIST {split} split; copy emnist-{split}-{part}-{lack}-"
                f"idx{1 if lack == 'labels' else 3}-ubyte.gz from the same download."
            )
    if not names:
        if present:
            others = (
                f"it holds glyph files of the split(s) {', '.join(present)}; "
                "pick one of them"
            )
        else:
            others = f"it holds no EMNIST files; {_LAYOUT_HINT}"
        raise GlyphSourceError(
            f"no emnist-{split}-train/test-images/labels files in {folder.where}: "
            f"{others} (EMNIST splits: {', '.join(EMNIST_SPLITS)})."
        )
    mapping = f"emnist-{split}-mapping.txt"
    if mapping not in folder.paths:
        raise GlyphSourceError(
            f"{mapping} is missing from {folder.where}; it maps the labels of the "
            f"{split} split to characters. Copy it from the same gzip.zip."
        )
    names["mapping"] = mapping
    return names


def _find_idx(folder: _Folder, stem: str) -> str | None:
    """``stem``'s IDX file name: the official ``.gz``, or an unpacked copy."""
    ndim = 3 if "-images" in stem else 1
    for name in (f"{stem}-idx{ndim}-ubyte.gz", f"{stem}-idx{ndim}-ubyte"):
        if name in folder.paths:
            return name
    return None


def _parse_mapping(name: str, raw: bytes) -> tuple[str, np.ndarray]:
    """``class_chars`` in label order and a label -> class lookup table.

    Lines are ``label ascii_code``; the letters split has ``label upper lower``
    and labels from 1: its classes draw the capital (case fallback in
    ``GlyphBank`` draws the small letter with it).
    """
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as err:
        raise GlyphSourceError(
            f"{name} is not an EMNIST mapping (not ASCII text: {err}); copy the "
            "mapping file from the official gzip.zip."
        ) from err
    codes: dict[int, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) not in (2, 3) or not all(f.isdigit() for f in fields):
            raise GlyphSourceError(
                f"line {number} of {name} is {line.strip()!r}; expected "
                "'label ascii_code' (or 'label upper lower' for letters). Copy the "
                "mapping file from the official gzip.zip."
            )
        label, code = int(fields[0]), int(fields[1])
        if label in codes:
            raise GlyphSourceError(
                f"{name} maps label {label} twice (line {number}); each label must "
                "appear once. Copy the mapping file from the official gzip.zip."
            )
        if not 33 <= code <= 126:
            raise GlyphSourceError(
                f"line {number} of {name} maps label {label} to character code "
                f"{code}, which is not a printable ASCII character; copy the "
                "mapping file from the official gzip.zip."
            )
        codes[label] = code
    if not codes:
        raise GlyphSourceError(
            f"{name} is empty; copy the mapping file from the official gzip.zip."
        )

    labels = sorted(codes)
    class_chars = "".join(chr(codes[label]) for label in labels)
    if len(set(class_chars)) != len(class_chars):
        doubled = sorted({c for c in class_chars if class_chars.count(c) > 1})
        raise GlyphSourceError(
            f"{name} maps several labels to {''.join(doubled)!r}; each character "
            "must have one label. Copy the mapping file from the official gzip.zip."
        )
    label_to_class = np.full(labels[-1] + 1, -1, dtype=np.int64)
    label_to_class[labels] = np.arange(len(labels))
    return class_chars, label_to_class


def _read_idx(name: str, raw: bytes, magic: int, gzipped: bool) -> np.ndarray:
    """Decode one IDX file: ``[count, 28, 28]`` images or ``[count]`` labels."""
    if gzipped:
        try:
            # One decompress of the whole file: streaming through GzipFile is
            # several times slower on the 90 MB byclass images.
            data = gzip.decompress(raw)
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise GlyphSourceError(
                f"{name} is truncated or not gzip data ({type(err).__name__}: "
                f"{err}); download it again."
            ) from err
    else:
        data = raw

    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    what = "images" if magic == IMAGES_MAGIC else "labels"
    if len(data) < header:
        raise GlyphSourceError(
            f"{name} holds {len(data)} bytes, less than an IDX {what} header "
            f"({header} bytes); download it again."
        )
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise GlyphSourceError(
            f"{name} has IDX magic number {found}, expected {magic} for {what}; "
            "the file is damaged or not an EMNIST file. Download it again."
        )
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if dims[1:] and dims[1:] != [GLYPH_SIZE, GLYPH_SIZE]:
        raise GlyphSourceError(
            f"{name} holds {dims[1]}x{dims[2]} images; EMNIST images are 28x28. "
            "Use the official EMNIST files."
        )
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        problem = "is truncated" if len(data) < expected else "has trailing bytes"
        raise GlyphSourceError(
            f"{name} {problem}: its header says {dims[0]} {what} ({expected} bytes) "
            f"but it holds {len(data)} bytes; download it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _classes_of(
    labels: np.ndarray, labels_name: str, mapping_name: str, label_to_class: np.ndarray
) -> np.ndarray:
    """The class of each label, or an error naming the first unmapped label."""
    in_range = labels < len(label_to_class)
    classes = np.full(len(labels), -1, dtype=np.int64)
    classes[in_range] = label_to_class[labels[in_range]]
    bad = np.flatnonzero(classes < 0)
    if len(bad):
        mapped = np.flatnonzero(label_to_class >= 0)
        raise GlyphSourceError(
            f"{labels_name} has label {int(labels[bad[0]])} (glyph {int(bad[0])}, "
            f"{len(bad)} such glyphs) but {mapping_name} maps only labels "
            f"{int(mapped[0])}..{int(mapped[-1])}; the mapping does not belong to "
            "these labels. Use the mapping file of the same split."
        )
    return classes


def _check_every_class_used(
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    class_chars: str,
    mapping_name: str,
    where: str,
) -> None:
    """Every EMNIST split has glyphs of every class it maps; a mapping with
    unused classes belongs to another split (e.g. byclass with balanced labels).
    """
    counts = sum(
        np.bincount(classes, minlength=len(class_chars))
        for _, classes in parts.values()
    )
    unused = "".join(c for c, n in zip(class_chars, counts, strict=True) if n == 0)
    if unused:
        raise GlyphSourceError(
            f"{mapping_name} maps {len(class_chars)} classes but the label files in "
            f"{where} have no glyph of {len(unused)} of them ({unused!r}); the "
            "mapping does not belong to these labels. Use the mapping file of the "
            "same split."
        )


def _divide_held_out(
    classes: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Divide the EMNIST test glyphs between val and test, per class.

    Each class is shuffled with ``seed`` and cut in the ratio
    ``val_fraction : test_fraction``; a class of two or more glyphs keeps at
    least one in each when both fractions are non-zero. With both zero all
    stay in test: they are never trained on.
    """
    rng = np.random.default_rng(seed)
    splits = np.full(len(classes), SPLIT_CODES["test"], dtype=np.int8)
    total = val_fraction + test_fraction
    if total <= 0:
        return splits
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        order = members[rng.permutation(len(members))]
        n = len(order)
        n_val = round(n * val_fraction / total)
        if val_fraction > 0 and test_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        splits[order[:n_val]] = SPLIT_CODES["val"]
    return splits


def _read_file(
    folder: _Folder, name: str, magic: int, files: list[dict[str, Any]]
) -> np.ndarray:
    """Read and decode one IDX file, noting it (with its sha256) in ``files``."""
    raw = folder.read(name)
    files.append(_file_entry(name, raw))
    return _read_idx(folder.label(name), raw, magic, gzipped=name.endswith(".gz"))


def _file_entry(name: str, raw: bytes) -> dict[str, Any]:
    return {"name": name, "bytes": len(raw), "sha256": sha256_bytes(raw)}
