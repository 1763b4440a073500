"""The ``scribeline`` command: generate, preview, inspect, errors, fresh clone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from scribeline.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, list(args))
    return result


@pytest.mark.parametrize("command", [[], ["generate"], ["preview"], ["inspect"]])
def test_help_on_everything(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_generate_inspect_preview(tmp_path):
    out = tmp_path / "ds"
    result = run("generate", "-o", str(out), "-n", "120", "--shard-size", "60")
    assert result.exit_code == 0, result.output
    assert "dataset version" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["lines"] == 120

    result = run("inspect", str(out))
    assert result.exit_code == 0, result.output
    assert f"verified {len(manifest['shards'])} shards" in result.output

    result = run("inspect", str(out), "--json", "--no-verify")
    assert json.loads(result.output)["dataset_version"] == manifest["dataset_version"]

    grid, lines = tmp_path / "grid.png", tmp_path / "lines"
    result = run(
        "preview",
        "--dataset",
        str(out),
        "--count",
        "4",
        "--out",
        str(grid),
        "--png-dir",
        str(lines),
    )
    assert result.exit_code == 0, result.output
    assert Image.open(grid).size[1] > 4 * 28
    pngs = sorted(lines.glob("*.png"))
    assert len(pngs) == 4
    first = np.asarray(Image.open(pngs[0]))
    assert first.shape == (28, 896) and first.max() == 255


def test_preview_from_settings_natural_layout(tmp_path):
    grid = tmp_path / "grid.png"
    result = run("preview", "--layout", "natural", "--count", "3", "--out", str(grid))
    assert result.exit_code == 0, result.output
    assert grid.exists()


def test_inspect_reports_a_damaged_shard(tmp_path):
    out = tmp_path / "ds"
    assert run("generate", "-o", str(out), "-n", "40").exit_code == 0
    shard = next((out / "shards").glob("train-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    result = run("inspect", str(out))
    assert result.exit_code == 2
    assert "fail verification" in result.output
    assert shard.name in result.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["generate", "-n", "0"], "lines: Input should be greater than or equal to 1"),
        (["generate", "--layout", "cursive"], "layout.mode"),
        (["generate", "--storage-option", "oops"], "is not KEY=VALUE"),
        (["inspect", "/nonexistent/ds"], "no dataset version at /nonexistent/ds"),
        (["generate", "--glyphs", "/nonexistent/emnist"], "/nonexistent/emnist"),
        (["generate", "--corpus", "/nonexistent/c.txt"], "/nonexistent/c.txt"),
    ],
)
def test_bad_input_is_one_clear_line(args, words, tmp_path):
    if args[0] == "generate":
        args = [*args, "-o", str(tmp_path / "ds")]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_settings_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRIBELINE_LINES", "30")
    monkeypatch.setenv("SCRIBELINE_LAYOUT__MODE", "natural")
    out = tmp_path / "ds"
    assert run("generate", "-o", str(out)).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["lines"] == 30
    assert manifest["settings"]["layout"]["mode"] == "natural"


@pytest.mark.slow
def test_fresh_clone_runs_the_embedded_default(tmp_path):
    """A clean clone, built as a wheel, run from inside the clone with an empty
    HOME and no ../shared: the embedded default must work and say so."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(clone),
        ],
        check=True,
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONPATH": str(site),
        "SCRIBELINE_SHARED_DATA": str(tmp_path / "absent"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "scribeline", "generate", "-n", "200"],
        cwd=clone,  # the repository root: its platform/ must not shadow stdlib
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stderr.split())
    assert "No EMNIST given" in said and "--glyphs" in said
    assert "pyjokes" in said
    manifest = json.loads(
        (clone / "scribeline-data" / "dataset" / "manifest.json").read_text()
    )
    assert manifest["totals"]["lines"] == 200
    assert not any(home.iterdir()), "the run wrote into the home directory"


@pytest.mark.slow
def test_generate_as_a_prefect_flow(tmp_path, prefect_harness):
    out = tmp_path / "ds"
    result = run("generate", "--prefect", "-o", str(out), "-n", "40")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["totals"]["lines"] == 40


def test_version_and_pure_json(tmp_path):
    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == "0.1.0"
    out = tmp_path / "ds"
    assert run("generate", "-o", str(out), "-n", "20").exit_code == 0
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["totals"]["lines"] == 20


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--out", "grid.txt"], "must name a .png file"),
        (["--png-dir", "a-file"], "is a file; name a folder"),
    ],
)
def test_preview_refuses_bad_destinations(tmp_path, args, words, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    result = run("preview", "--count", "1", *args)
    assert result.exit_code == 2
    assert words in " ".join(result.output.split())


def test_preview_of_a_damaged_shard_is_one_clear_line(tmp_path):
    out = tmp_path / "ds"
    assert run("generate", "-o", str(out), "-n", "20").exit_code == 0
    shard = next((out / "shards").glob("train-*.parquet"))
    shard.write_bytes(b"PAR1" + b"\0" * 100)
    result = run("preview", "--dataset", str(out), "--out", str(tmp_path / "p.png"))
    assert result.exit_code == 2
    assert "is damaged" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_emnist_split_is_checked_and_ignored_without_emnist(tmp_path):
    result = run("generate", "--emnist-split", "foo", "-o", str(tmp_path / "a"))
    assert result.exit_code == 2 and "emnist_split" in result.output
    a, b = tmp_path / "b", tmp_path / "c"
    assert run("generate", "-n", "20", "-o", str(a)).exit_code == 0
    assert (
        run(
            "generate", "-n", "20", "--emnist-split", "balanced", "-o", str(b)
        ).exit_code
        == 0
    )
    version = json.loads((a / "manifest.json").read_text())["dataset_version"]
    assert version == json.loads((b / "manifest.json").read_text())["dataset_version"]
