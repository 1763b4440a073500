"""Dataset versions: shards, manifest, determinism, resume, storage URLs, errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from scribeline.platform import dataset
from scribeline.platform.errors import DatasetError, StorageError
from scribeline.platform.settings import GenerateSettings


def settings_for(output: str, **overrides) -> GenerateSettings:
    """A tiny dataset on the embedded default (fonts + pyjokes)."""
    values = {"output": output, "lines": 240, "shard_size": 100, "seed": 3}
    values.update(overrides)
    return GenerateSettings(**values)


def shard_bytes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((root / "shards").iterdir())
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "ds"
    dataset.generate(settings_for(str(out)))
    return out


def test_plan_covers_every_line_once():
    s = GenerateSettings(
        lines=1000, shard_size=300, val_fraction=0.1, test_fraction=0.05
    )
    plans = dataset.plan_shards(s)
    assert sum(p.rows for p in plans) == 1000
    counts = dataset.split_line_counts(s)
    assert counts == {"train": 850, "val": 100, "test": 50}
    assert [p.name for p in plans][:3] == [
        "shards/train-00000.parquet",
        "shards/train-00001.parquet",
        "shards/train-00002.parquet",
    ]
    assert all(p.rows <= 300 for p in plans)


def test_manifest_lists_complete_shards(tiny):
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["format"] == dataset.FORMAT
    assert manifest["totals"]["lines"] == 240
    assert {s["split"] for s in manifest["shards"]} == {"train", "val", "test"}
    for shard in manifest["shards"]:
        data = (tiny / shard["name"]).read_bytes()
        assert len(data) == shard["bytes"]
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert pq.read_metadata(tiny / shard["name"]).num_rows == shard["rows"]
    assert manifest["charset"]["chars"].startswith(" 0123456789ABC")
    assert manifest["sources"]["glyphs"]["kind"] == "embedded-fonts"
    assert manifest["sources"]["corpus"]["kind"] == "embedded-pyjokes"
    assert "storage_options" not in manifest["settings"]
    assert not (tiny / dataset.PENDING).exists()
    assert not [p for p in tiny.rglob("*") if dataset.is_temporary(p.name)]


def test_rows_hold_images_text_and_spans(tiny):
    manifest = dataset.read_manifest(str(tiny))
    charset = set(manifest["charset"]["chars"])
    rows = list(dataset.iter_rows(str(tiny), split="val"))
    assert len(rows) == manifest["totals"]["by_split"]["val"]["lines"]
    ids = [r["sample_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    for row in rows:
        assert row["split"] == "val"
        assert set(row["text"]) <= charset and row["text"].strip()
        assert row["image"].shape == (28, 896) and row["image"].dtype == np.uint8
        spans = row["char_spans"]
        assert len(spans) == len(row["text"])
        assert spans[0] == {"start": 0, "end": 28}


@pytest.mark.parametrize("reader", ["pandas", "polars", "duckdb"])
def test_common_tools_read_the_shards(tiny, reader):
    path = str(tiny / "shards" / "train-00000.parquet")
    if reader == "pandas":
        import pandas as pd

        frame = pd.read_parquet(path)
        first = frame.iloc[0]
        image = dataset.decode_image(first["image"], first["height"], first["width"])
        assert image.shape == (28, 896) and image.max() == 255
    elif reader == "polars":
        import polars as pl

        frame = pl.read_parquet(path)
        assert frame["image"].bin.size().to_list()[0] == 28 * 896 // 2
    else:
        import duckdb

        n, size = duckdb.sql(
            f"select count(*), max(octet_length(image)) from '{path}'"
        ).fetchall()[0]
        assert n == 100 and size == 28 * 896 // 2


def test_same_settings_same_bytes_whatever_the_processes(tmp_path, tiny):
    again = tmp_path / "again"
    dataset.generate(settings_for(str(again), workers=2))
    assert shard_bytes(again) == shard_bytes(tiny)
    other = tmp_path / "other-seed"
    dataset.generate(settings_for(str(other), seed=4))
    assert shard_bytes(other) != shard_bytes(tiny)


def test_rerun_after_a_crash_finishes_only_the_missing_shards(tmp_path, tiny):
    out = tmp_path / "ds"
    s = settings_for(str(out))
    job = dataset.prepare(s)
    # A crash after two shards: they are committed, the manifest is not.
    for plan in job.plans[:2]:
        dataset.write_shard(s, plan, job.sources)
    (out / "shards" / ".tmp-train-00002.parquet-deadbeef").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        dataset.read_manifest(str(out))

    # One record is lost (a writer killed between shard and record): that
    # shard is read back and checksummed instead.
    (out / "_records" / "train-00000.parquet.json").unlink()
    resumed = dataset.prepare(s)
    assert sorted(resumed.done) == sorted(p.name for p in job.plans[:2])
    for name, record in resumed.done.items():
        assert record.sha256 == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert len(resumed.todo) == len(job.plans) - 2
    written = []
    dataset.generate(s, on_shard=lambda record, done, total: written.append(record))
    assert len(written) == len(job.plans) - 2
    assert shard_bytes(out) == shard_bytes(tiny)
    # Leftovers of killed writers and the per-shard records are tidied away.
    assert not (out / "_records").exists()
    assert dataset.verify(str(out)) == []


def test_complete_version_is_not_rewritten(tmp_path):
    out = tmp_path / "ds"
    s = settings_for(str(out), lines=50, shard_size=50)
    first = dataset.generate(s)
    second = dataset.generate(s)
    assert second == first


def test_output_holding_another_version_is_refused(tiny):
    with pytest.raises(DatasetError, match="already holds dataset version"):
        dataset.generate(settings_for(str(tiny), seed=99))


def test_output_with_unrelated_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty and holds no scribeline"):
        dataset.generate(settings_for(str(tmp_path)))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=r"cannot (read|write) .*file/ds.*directory"):
        dataset.generate(settings_for(str(blocker / "ds")))


def test_verify_finds_damaged_and_missing_shards(tmp_path):
    out = tmp_path / "ds"
    manifest = dataset.generate(settings_for(str(out)))
    first, second = manifest["shards"][0]["name"], manifest["shards"][1]["name"]
    data = bytearray((out / first).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / first).write_bytes(bytes(data))
    (out / second).unlink()
    problems = dataset.verify(str(out))
    assert any(first in p and "sha256" in p for p in problems)
    assert any(second in p and "missing" in p for p in problems)


def test_memory_url_round_trip():
    url = "memory://scribeline-tests/ds"
    manifest = dataset.generate(settings_for(url, lines=60, shard_size=30))
    assert dataset.verify(url) == []
    rows = list(dataset.iter_rows(url, limit=5))
    assert len(rows) == 5
    assert manifest["totals"]["lines"] == 60


@pytest.mark.slow
def test_s3_round_trip_same_bytes_as_local(s3_server, s3_bucket, tiny):
    url = f"{s3_bucket}/datasets/tiny"
    s = settings_for(url, storage_options=s3_server.storage_options)
    manifest = dataset.generate(s)
    local = dataset.read_manifest(str(tiny))
    assert [x["sha256"] for x in manifest["shards"]] == [
        x["sha256"] for x in local["shards"]
    ]
    assert dataset.verify(url, s3_server.storage_options) == []
    assert "testing" not in json.dumps(manifest)  # no credentials in the manifest


def test_missing_bucket_is_one_clear_error(s3_server):
    s = settings_for(
        "s3://no-such-bucket-here/ds", storage_options=s3_server.storage_options
    )
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        dataset.generate(s)


@pytest.mark.parametrize("encoding", ["gray4", "raw8"])
@pytest.mark.parametrize("layout", ["seed", "natural"])
def test_stored_images_decode_to_what_was_rendered(tmp_path, encoding, layout):
    from scribeline.platform.imagecodec import _TO_LEVEL
    from scribeline.platform.render import Renderer

    s = settings_for(
        str(tmp_path / "ds"),
        lines=40,
        shard_size=40,
        val_fraction=0.1,
        test_fraction=0.1,
        image_encoding=encoding,
        layout={"mode": layout},
    )
    dataset.generate(s)
    sources = dataset.load_sources(s)
    plan = dataset.plan_shards(s)[0]
    rng = dataset.shard_rng(s, plan)
    pool = sources.corpus.sentences[plan.split]
    texts = [pool[i] for i in rng.integers(0, len(pool), size=plan.rows)]
    lines = Renderer(sources.bank, s.layout, plan.split).render(texts, rng)
    rows = list(dataset.iter_rows(str(tmp_path / "ds"), split=plan.split))
    assert [r["text"] for r in rows] == texts
    for i, row in enumerate(rows):
        rendered = lines.images[i, :, : lines.widths[i]]
        expected = rendered if encoding == "raw8" else _TO_LEVEL[rendered] * 17
        np.testing.assert_array_equal(row["image"], expected)
        assert np.abs(row["image"].astype(int) - rendered).max() <= 8


def test_rerun_repairs_missing_and_truncated_shards(tmp_path, tiny):
    out = tmp_path / "ds"
    s = settings_for(str(out))
    manifest = dataset.generate(s)
    first, second = (
        (out / manifest["shards"][0]["name"]),
        (out / manifest["shards"][1]["name"]),
    )
    first.write_bytes(first.read_bytes()[:1000])
    second.unlink()
    assert dataset.verify(str(out))
    repaired = dataset.generate(s)
    assert dataset.verify(str(out)) == []
    assert shard_bytes(out) == shard_bytes(tiny)
    assert [x["sha256"] for x in repaired["shards"]] == [
        x["sha256"] for x in manifest["shards"]
    ]


def test_resume_does_not_trust_a_damaged_shard_without_its_record(tmp_path, tiny):
    out = tmp_path / "ds"
    s = settings_for(str(out))
    job = dataset.prepare(s)
    dataset.write_shard(s, job.plans[0], job.sources)
    (out / "_records" / "train-00000.parquet.json").unlink()
    shard = out / job.plans[0].name
    shard.write_bytes(shard.read_bytes()[:5000])
    assert dataset.prepare(s).done == {}
    dataset.generate(s)
    assert shard_bytes(out) == shard_bytes(tiny)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('{"format": "scribeline-dataset-v1"}', "no valid 'dataset_version'"),
        ("[]", "is not a scribeline-dataset-v1 manifest"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_damaged_manifest_is_a_clear_error(tmp_path, content, words):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(DatasetError, match=words):
        dataset.read_manifest(str(tmp_path))
    with pytest.raises(DatasetError, match=words):
        dataset.generate(settings_for(str(tmp_path)))


def test_shards_without_manifest_or_pending_are_refused(tmp_path):
    out = tmp_path / "ds"
    dataset.generate(settings_for(str(out), lines=30, shard_size=30))
    (out / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="holds shards but neither"):
        dataset.generate(settings_for(str(out), lines=30, shard_size=30))


def test_tiny_runs_warn_that_a_split_is_empty(caplog):
    with caplog.at_level("WARNING"):
        plans = dataset.plan_shards(GenerateSettings(lines=5))
    assert {p.split for p in plans} == {"train"}
    assert "leave the val split empty" in caplog.text
