"""What every ``scribeline`` command shares: the console, errors, storage flags."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

# Logs, progress and errors go to stderr; stdout carries results (e.g. --json).
console = Console(stderr=True)

# Options that several commands take, declared once.
GlyphsOpt = Annotated[
    str | None,
    typer.Option(
        "--glyphs",
        "--emnist",
        help="EMNIST folder, gzip.zip or URL (official NIST layout). "
        "Default: embedded handwriting fonts.",
    ),
]
SplitOpt = Annotated[
    str | None,
    typer.Option(
        help="EMNIST split: byclass, balanced, bymerge, letters, digits, mnist."
    ),
]
CorpusOpt = Annotated[
    str | None,
    typer.Option(
        help="WikiSplit .tsv or text file(s), comma-separated. Default: the "
        "embedded pyjokes corpus."
    ),
]
StorageOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        help="fsspec option KEY=VALUE for every URL (repeatable), e.g. "
        "endpoint_url=http://127.0.0.1:9000",
    ),
]


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on one line; raise the result to exit with 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def storage_options(pairs: list[str] | None) -> dict[str, Any] | None:
    """``--storage-option KEY=VALUE`` flags -> fsspec/s3fs storage options.

    ``endpoint_url`` and ``region_name`` go under ``client_kwargs``, where s3fs
    expects them.
    """
    if not pairs:
        return None
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise fail(
                f"--storage-option {pair!r} is not KEY=VALUE; e.g. "
                "--storage-option endpoint_url=http://127.0.0.1:9000"
            )
        if key in ("endpoint_url", "region_name"):
            options.setdefault("client_kwargs", {})[key] = value
        else:
            options[key] = value
    return options
