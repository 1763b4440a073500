"""load_emnist: the official NIST gzip/IDX layout, from folders, zips, memory://."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import uuid
import zipfile
from pathlib import Path

import fsspec
import numpy as np
import pytest

from scribeline.platform.emnist import load_emnist
from scribeline.platform.errors import GlyphSourceError
from scribeline.platform.glyphs import SPLIT_CODES, assign_splits

DIGITS = "0123456789"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BYCLASS = DIGITS + UPPER + UPPER.lower()
BALANCED = DIGITS + UPPER + "abdefghnqrt"


# --- fixtures in the official layout ------------------------------------------


def glyph_images(n: int, seed: int = 0, first: int = 0) -> np.ndarray:
    """``n`` distinct upright 28x28 glyphs: a random stroke, number in row 0."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), np.uint8)
    rows = rng.integers(2, 26, n)
    images[np.arange(n), rows, 4:24] = 255
    numbers = np.arange(first, first + n, dtype=">u4")
    images[:, 0, :4] = numbers.view(np.uint8).reshape(n, 4)
    return images


def gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1)


def idx_images(upright: np.ndarray) -> bytes:
    """IDX3 bytes as NIST stores them: big-endian header, images transposed."""
    header = struct.pack(">IIII", 2051, len(upright), 28, 28)
    return header + np.ascontiguousarray(upright.transpose(0, 2, 1)).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def mapping_text(chars: str, first_label: int = 0) -> bytes:
    lines = [f"{first_label + i} {ord(c)}" for i, c in enumerate(chars)]
    return ("\n".join(lines) + "\n").encode()


def emnist_files(
    split: str = "byclass",
    chars: str = BYCLASS,
    per_class: dict[str, int] | None = None,
    first_label: int = 0,
    seed: int = 0,
) -> tuple[dict[str, bytes], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Official-layout files of one split: name -> bytes, and what they hold.

    ``per_class`` gives the glyphs per class in each part (default: test only,
    5 per class); labels are shuffled as in the real files.
    """
    per_class = per_class if per_class is not None else {"test": 5}
    rng = np.random.default_rng(seed)
    files = {f"emnist-{split}-mapping.txt": mapping_text(chars, first_label)}
    held: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for offset, (part, k) in enumerate(sorted(per_class.items())):
        labels = np.repeat(np.arange(len(chars)) + first_label, k)
        labels = labels[rng.permutation(len(labels))]
        images = glyph_images(len(labels), seed=seed + offset, first=1_000_000 * offset)
        stem = f"emnist-{split}-{part}"
        files[f"{stem}-images-idx3-ubyte.gz"] = gz(idx_images(images))
        files[f"{stem}-labels-idx1-ubyte.gz"] = gz(idx_labels(labels))
        held[part] = (images, labels)
    return files, held


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_images_are_upright(tmp_path: Path) -> None:
    # An L drawn upright: a stroke down the left, a stroke along the bottom.
    letter = np.zeros((28, 28), np.uint8)
    letter[4:24, 6:9] = 255
    letter[21:24, 6:22] = 255
    files = {
        "emnist-digits-mapping.txt": mapping_text("L"),
        "emnist-digits-test-images-idx3-ubyte.gz": gz(idx_images(letter[None])),
        "emnist-digits-test-labels-idx1-ubyte.gz": gz(idx_labels(np.zeros(1))),
    }
    # Stored transposed, as NIST does: the raw payload is the L's transpose.
    raw = gzip.decompress(files["emnist-digits-test-images-idx3-ubyte.gz"])
    assert np.array_equal(np.frombuffer(raw[16:], np.uint8).reshape(28, 28), letter.T)

    bank = load_emnist(str(write(tmp_path, files)), split="digits")
    assert np.array_equal(bank.images[0], letter)
    assert bank.images.dtype == np.uint8 and bank.images.flags.c_contiguous


def test_byclass_classes_follow_the_mapping(tmp_path: Path) -> None:
    files, held = emnist_files()
    bank = load_emnist(str(write(tmp_path, files)))
    images, labels = held["test"]
    assert bank.class_chars == BYCLASS
    assert np.array_equal(bank.classes, labels)
    assert np.array_equal(bank.images, images)
    assert bank.class_of("a") != bank.class_of("A")


def test_mapping_lines_in_any_order(tmp_path: Path) -> None:
    files, _ = emnist_files(split="digits", chars=DIGITS)
    lines = files["emnist-digits-mapping.txt"].decode().splitlines()
    files["emnist-digits-mapping.txt"] = "\n".join(reversed(lines)).encode()
    bank = load_emnist(str(write(tmp_path, files)), split="digits")
    assert bank.class_chars == DIGITS


def test_balanced_draws_merged_small_letters_with_capitals(tmp_path: Path) -> None:
    files, _ = emnist_files(split="balanced", chars=BALANCED)
    bank = load_emnist(str(write(tmp_path, files)), split="balanced")
    assert len(bank.class_chars) == 47
    assert bank.class_of("o") == bank.class_of("O")
    assert bank.class_of("c") == bank.class_of("C")
    assert bank.class_of("a") != bank.class_of("A")
    assert "o" in bank.charset


def test_letters_split_maps_labels_from_one(tmp_path: Path) -> None:
    files, held = emnist_files(split="letters", chars=UPPER, first_label=1)
    files["emnist-letters-mapping.txt"] = "".join(
        f"{i + 1} {ord(c)} {ord(c.lower())}\n" for i, c in enumerate(UPPER)
    ).encode()
    bank = load_emnist(str(write(tmp_path, files)), split="letters")
    assert bank.class_chars == UPPER
    assert np.array_equal(bank.classes, held["test"][1] - 1)
    assert bank.class_of("b") == bank.class_of("B") == 1


def test_train_and_test_files_keep_the_official_division(tmp_path: Path) -> None:
    files, held = emnist_files(
        split="digits", chars=DIGITS, per_class={"train": 6, "test": 10}
    )
    bank = load_emnist(
        str(write(tmp_path, files)),
        split="digits",
        val_fraction=0.1,
        test_fraction=0.3,
    )
    n_train = len(held["train"][1])
    assert np.all(bank.splits[:n_train] == SPLIT_CODES["train"])
    assert np.array_equal(bank.images[:n_train], held["train"][0])
    held_out = bank.splits[n_train:]
    assert not np.any(held_out == SPLIT_CODES["train"])
    # Per class, 10 test-file glyphs cut 0.1 : 0.3 -> 2 (rounded 2.5) val, 8 test.
    for c in range(10):
        mine = held_out[bank.classes[n_train:] == c]
        assert (mine == SPLIT_CODES["val"]).sum() == 2
        assert (mine == SPLIT_CODES["test"]).sum() == 8


def test_test_files_alone_hold_out_part_of_each_class(tmp_path: Path) -> None:
    files, _ = emnist_files(per_class={"test": 20})
    url = str(write(tmp_path, files))
    bank = load_emnist(url, val_fraction=0.1, test_fraction=0.1, seed=7)
    assert np.array_equal(bank.splits, assign_splits(bank.classes, 0.1, 0.1, 7))
    for code in SPLIT_CODES.values():
        assert set(bank.classes[bank.splits == code]) == set(range(62))

    again = load_emnist(url, val_fraction=0.1, test_fraction=0.1, seed=7)
    other = load_emnist(url, val_fraction=0.1, test_fraction=0.1, seed=8)
    assert np.array_equal(again.splits, bank.splits)
    assert not np.array_equal(other.splits, bank.splits)


@pytest.mark.parametrize("parts", [{"test": 12}, {"train": 8, "test": 12}])
def test_no_glyph_image_is_in_two_splits(tmp_path: Path, parts: dict) -> None:
    files, _ = emnist_files(per_class=parts)
    bank = load_emnist(str(write(tmp_path, files)))
    seen: dict[bytes, int] = {}
    for image, split in zip(bank.images, bank.splits, strict=True):
        assert seen.setdefault(image.tobytes(), int(split)) == split
    assert len(seen) == len(bank.images)


def test_source_names_every_file_with_its_sha256(tmp_path: Path) -> None:
    files, _ = emnist_files()
    bank = load_emnist(str(write(tmp_path, files)))
    assert bank.source["kind"] == "emnist"
    assert bank.source["split"] == "byclass"
    listed = {f["name"]: f for f in bank.source["files"]}
    assert set(listed) == set(files)
    for name, data in files.items():
        assert listed[name]["bytes"] == len(data)
        assert listed[name]["sha256"] == hashlib.sha256(data).hexdigest()


def official_zip(files: dict[str, bytes]) -> bytes:
    """A gzip.zip shaped like NIST's: the files under a gzip/ folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"gzip/{name}", data)
    return buffer.getvalue()


def test_loads_the_official_zip(tmp_path: Path) -> None:
    files, held = emnist_files(split="balanced", chars=BALANCED)
    other, _ = emnist_files(split="digits", chars=DIGITS)
    archive = tmp_path / "gzip.zip"
    archive.write_bytes(official_zip(files | other))
    bank = load_emnist(str(archive), split="balanced")
    assert np.array_equal(bank.images, held["test"][0])
    assert {f["name"] for f in bank.source["files"]} == set(files)

    chained = load_emnist(f"zip://gzip::{archive}", split="balanced")
    assert np.array_equal(chained.images, bank.images)


def test_loads_from_memory_and_from_a_gzip_subfolder(tmp_path: Path) -> None:
    files, held = emnist_files()
    root = f"memory://emnist-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name, data in files.items():
        fs.pipe_file(f"{root}/gzip/{name}", data)
    try:
        bank = load_emnist(root)
        assert np.array_equal(bank.images, held["test"][0])
        assert np.array_equal(load_emnist(f"{root}/gzip").splits, bank.splits)
    finally:
        fs.rm(root, recursive=True)


def test_loads_unpacked_idx_files(tmp_path: Path) -> None:
    files, held = emnist_files(split="mnist", chars=DIGITS)
    unpacked = {
        name.removesuffix(".gz"): gzip.decompress(data)
        if name.endswith(".gz")
        else data
        for name, data in files.items()
    }
    bank = load_emnist(str(write(tmp_path, unpacked)), split="mnist")
    assert np.array_equal(bank.images, held["test"][0])


# --- bad input ----------------------------------------------------------------

TEST_IMAGES = "emnist-byclass-test-images-idx3-ubyte.gz"
TEST_LABELS = "emnist-byclass-test-labels-idx1-ubyte.gz"
MAPPING = "emnist-byclass-mapping.txt"


def broken(files: dict[str, bytes], name: str, data: bytes | None) -> dict:
    """``files`` with ``name`` replaced by ``data`` (or removed for None)."""
    files = dict(files)
    if data is None:
        del files[name]
    else:
        files[name] = data
    return files


def _images(n: int) -> bytes:
    return idx_images(glyph_images(n))


GOOD, _ = emnist_files(chars=DIGITS + "AB")  # 12 classes, 5 glyphs each


@pytest.mark.parametrize(
    ("files", "match"),
    [
        (broken(GOOD, MAPPING, None), "emnist-byclass-mapping.txt is missing"),
        (broken(GOOD, TEST_LABELS, None), "no test labels file"),
        (broken(GOOD, TEST_IMAGES, None), "no test images file"),
        (
            broken(GOOD, TEST_IMAGES, GOOD[TEST_LABELS]),
            f"{TEST_IMAGES} in .* has IDX magic number 2049, expected 2051",
        ),
        (
            broken(GOOD, TEST_LABELS, GOOD[TEST_IMAGES]),
            f"{TEST_LABELS} in .* has IDX magic number 2051, expected 2049",
        ),
        (
            broken(GOOD, TEST_IMAGES, GOOD[TEST_IMAGES][: len(GOOD[TEST_IMAGES]) // 2]),
            f"{TEST_IMAGES} in .* is truncated or not gzip data",
        ),
        (
            broken(GOOD, TEST_LABELS, b"not gzip at all"),
            f"{TEST_LABELS} in .* is truncated or not gzip data",
        ),
        (
            broken(GOOD, TEST_IMAGES, gz(_images(60)[:-784])),
            f"{TEST_IMAGES} in .* is truncated: its header says 60 images",
        ),
        (
            broken(GOOD, TEST_IMAGES, gz(_images(60) + b"\0")),
            f"{TEST_IMAGES} in .* has trailing bytes",
        ),
        (
            broken(GOOD, TEST_IMAGES, gz(b"\0\0\x08\x03")),
            "less than an IDX images header",
        ),
        (
            broken(GOOD, TEST_IMAGES, gz(_images(59))),
            f"{TEST_IMAGES} holds 59 images but {TEST_LABELS} holds 60 labels",
        ),
        (
            broken(
                GOOD,
                TEST_IMAGES,
                gz(struct.pack(">IIII", 2051, 1, 32, 32) + bytes(1024)),
            ),
            "EMNIST images are 28x28",
        ),
        (
            broken(GOOD, TEST_LABELS, gz(idx_labels(np.full(60, 12)))),
            f"{TEST_LABELS} in .* has label 12 .* maps only labels 0..11; the mapping "
            "does not belong",
        ),
        (
            broken(GOOD, MAPPING, mapping_text(DIGITS + "ABC")),
            "maps 13 classes but the label files .* have no glyph of 1 of them",
        ),
        (
            broken(GOOD, MAPPING, b"0 48\n1 forty-nine\n"),
            "line 2 of emnist-byclass-mapping.txt in .* is '1 forty-nine'",
        ),
        (broken(GOOD, MAPPING, b"0 48\n0 49\n"), "maps label 0 twice"),
        (broken(GOOD, MAPPING, b"0 48\n1 48\n"), "maps several labels to '0'"),
        (broken(GOOD, MAPPING, b"0 48\n1 7\n"), "not a printable ASCII character"),
        (broken(GOOD, MAPPING, b"\n"), "emnist-byclass-mapping.txt in .* is empty"),
        (broken(GOOD, MAPPING, b"\xff\xfe"), "not an EMNIST mapping"),
    ],
    ids=[
        "missing-mapping",
        "missing-labels",
        "missing-images",
        "images-magic",
        "labels-magic",
        "truncated-gzip",
        "not-gzip",
        "truncated-payload",
        "trailing-bytes",
        "short-header",
        "count-mismatch",
        "not-28x28",
        "label-outside-mapping",
        "unused-classes",
        "malformed-line",
        "duplicate-label",
        "duplicate-char",
        "unprintable",
        "empty-mapping",
        "binary-mapping",
    ],
)
def test_bad_files_name_the_file_and_the_problem(
    tmp_path: Path, files: dict, match: str
) -> None:
    with pytest.raises(GlyphSourceError, match=match) as caught:
        load_emnist(str(write(tmp_path, files)))
    assert "\n" not in str(caught.value)


def test_balanced_mapping_with_byclass_labels(tmp_path: Path) -> None:
    files, _ = emnist_files()
    balanced = emnist_files(split="balanced", chars=BALANCED)[0]
    files[MAPPING] = balanced["emnist-balanced-mapping.txt"]
    with pytest.raises(
        GlyphSourceError, match=r"has label (4[7-9]|5\d|6[01]) .*0\.\.46"
    ):
        load_emnist(str(write(tmp_path, files)))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(GlyphSourceError, match="nowhere not found; pass the folder"):
        load_emnist(str(tmp_path / "nowhere"))


def test_split_not_present_lists_the_splits_that_are(tmp_path: Path) -> None:
    folder = write(tmp_path, GOOD)
    with pytest.raises(
        GlyphSourceError,
        match=r"no emnist-balanced-train/test.* split\(s\) byclass; pick one",
    ):
        load_emnist(str(folder), split="balanced")


def test_folder_without_emnist_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(GlyphSourceError, match="holds no EMNIST files"):
        load_emnist(str(tmp_path))


def test_a_file_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "gzip.zip"
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(GlyphSourceError, match="is a file but not a zip archive"):
        load_emnist(str(path))


def test_truncated_member_in_the_zip(tmp_path: Path) -> None:
    archive = bytearray(official_zip(GOOD))
    # Corrupt the compressed images member's bytes: zip's CRC check fails.
    at = archive.index(GOOD[TEST_IMAGES][:64]) + 100
    archive[at : at + 50] = bytes(50)
    path = tmp_path / "gzip.zip"
    path.write_bytes(bytes(archive))
    with pytest.raises(GlyphSourceError, match=TEST_IMAGES):
        load_emnist(str(path))


# --- the real EMNIST byclass test split ---------------------------------------


@pytest.fixture(scope="module")
def real_bank(shared_data: Path):
    return load_emnist(str(shared_data / "emnist"))


@pytest.mark.shared_data
def test_real_byclass_loads(real_bank) -> None:
    assert len(real_bank.images) == 116_323
    assert real_bank.images.shape == (116_323, 28, 28)
    assert real_bank.class_chars == BYCLASS
    sha256 = {f["name"]: f["sha256"] for f in real_bank.source["files"]}
    assert sha256["emnist-byclass-test-images-idx3-ubyte.gz"] == (
        "829338a6d6d6cb8674cc0feced1552765cdce558a240fe45a7f27acc24d206a8"
    )
    for split, code in SPLIT_CODES.items():
        present = np.unique(real_bank.classes[real_bank.splits == code])
        assert len(present) == 62, split
        real_bank.pools(split)  # every character has glyphs in every split


@pytest.mark.shared_data
def test_real_glyphs_are_upright(real_bank) -> None:
    def mean_of(char: str) -> np.ndarray:
        return real_bank.images[real_bank.classes == real_bank.class_of(char)].mean(0)

    def upright_l(image: np.ndarray) -> bool:
        # L: a wide stroke along the bottom rows, a tall one down the left.
        return (
            image[18:].sum() > 1.3 * image[:10].sum()
            and image[:, :10].sum() > 1.3 * image[:, 18:].sum()
        )

    def upright_7(image: np.ndarray) -> bool:
        # 7: a bar along the top rows, a diagonal leaving the bottom centre.
        return image[:8].sum() > 1.3 * image[-8:].sum()

    letter, seven = mean_of("L"), mean_of("7")
    assert upright_l(letter) and not upright_l(letter.T)
    assert upright_7(seven) and not upright_7(seven.T)


@pytest.mark.shared_data
@pytest.mark.parametrize(
    ("split", "chars"),
    [
        ("byclass", BYCLASS),
        ("balanced", BALANCED),
        ("bymerge", BALANCED),
        ("letters", UPPER),
        ("digits", DIGITS),
        ("mnist", DIGITS),
    ],
)
def test_real_mapping_files(
    shared_data: Path, tmp_path: Path, split: str, chars: str
) -> None:
    mapping = f"emnist-{split}-mapping.txt"
    first = 1 if split == "letters" else 0
    files, held = emnist_files(split=split, chars=chars, first_label=first)
    files[mapping] = (shared_data / "emnist" / mapping).read_bytes()
    bank = load_emnist(str(write(tmp_path, files)), split=split)
    assert bank.class_chars == chars
    assert np.array_equal(bank.classes, held["test"][1] - first)
    if "E" in chars:  # letters merges every small letter into its capital
        merged = bank.class_of("e") == bank.class_of("E")
        assert merged == (split == "letters")
