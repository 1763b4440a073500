"""The corpus: sentences to draw, cleaned to a glyph bank's charset, split.

``load_corpus`` reads WikiSplit TSVs or plain text files (local paths or any
fsspec URL), detokenizes WikiSplit, cleans every sentence to the charset, fits it
to ``max_chars``, drops duplicates and assigns each sentence to train, val or test
by a stable hash. With no corpus it falls back to the jokes shipped in ``pyjokes``.

Cleaning policy ``clean-v2`` (any change to these rules needs a new version
string, because it changes the text of every dataset version built with it;
``clean-v1`` romanized every script, which put words into labels that the
sentence never held, e.g. an emoji became ``snake``):

1. Fold: a character that is neither ASCII nor in the charset becomes its plain
   form where one exists, and nothing otherwise: accents are stripped by
   Unicode decomposition (``é`` -> ``e``, ``²`` -> ``2``, ``ﬁ`` -> ``fi``); a
   short table covers Latin letters and punctuation that do not decompose
   (``ß`` -> ``ss``, ``æ`` -> ``ae``, ``ø`` -> ``o``, ``ł`` -> ``l``, curly
   quotes -> straight quotes, en/em dashes and the minus sign -> ``-``); any
   other Latin letter is transliterated by ``anyascii``; everything else (other
   scripts, symbols, emoji) is dropped.
2. Whitespace (ASCII whitespace, and non-ASCII spaces once folded) becomes a space.
3. Separators ``-``, ``/`` and ``_`` become a space when the charset lacks them,
   so that ``well-known`` becomes ``well known``, not ``wellknown``.
4. Every other character not in the charset is dropped. The space is always
   kept: it separates words whether or not the charset lists it. Where a
   character was dropped, a space left before ``, . ; : ! ? ) ] }`` or after
   ``( [ {`` goes, and so do brackets left empty.
5. Runs of spaces collapse to one; leading and trailing spaces go. A sentence
   left empty is dropped.
6. A sentence longer than ``max_chars``: ``cut`` keeps the longest prefix that
   ends at a word boundary and fits (a first word longer than ``max_chars`` is
   cut hard at ``max_chars``); ``wrap`` breaks it greedily into lines of at most
   ``max_chars`` at word boundaries (a word longer than a line is cut hard into
   ``max_chars`` pieces, each starting a new line).
7. Dedupe and split: a sentence's key is its lines joined by one space (for
   ``cut`` the kept line, for ``wrap`` the cleaned sentence). Sentences whose
   key was seen before in the corpus are dropped (counted as duplicates). The
   key's ``blake2b`` digest (``digest_size=8``, big-endian, divided by 2**64)
   gives ``u`` in [0, 1): ``u < test_fraction`` is test, ``u < test_fraction +
   val_fraction`` is val, anything else train. All lines of one sentence go to
   one split, and equal lines from ``cut`` can never land in two splits. With
   ``wrap``, two different sentences can share a line (``2008``): such a line
   is removed from val and test when train has it, and from test when val has
   it (counted as ``cross_split_lines``).

WikiSplit detokenization (``detokenize``) runs before cleaning, for WikiSplit
input only, and is part of the policy too. Its rules, in order: two backticks
and a doubled ``'' ''`` become one ``''``; ``'' ... ''`` pairs (in order) become
``"..."``; when a sentence holds an odd number of lone ``'`` tokens, a ``'``
after a word ending in ``s`` (not ``as``, ``is``, ``was``...) and before a word
is a possessive (``Yankees' Double``); the other lone ``'`` pair into ``'...'``;
a quote left unpaired opens at the start of the sentence and closes anywhere
else; ``'s 're 've 'll 'd 'm n't`` attach to the word before; `` - `` between
two word characters is a hyphen (``well-known``) and ``--`` an en dash; no space
before ``, . ; : ! ? % ) ] }``, none after ``( [ {`` nor between ``$ £ €`` and a
digit.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import posixpath
import re
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from anyascii import anyascii

from scribeline.platform.errors import CorpusError
from scribeline.platform.storage import resolve, sha256_bytes

logger = logging.getLogger(__name__)

CLEANING_POLICY = "clean-v2"
SPLIT_NAMES = ("train", "val", "test")
WIKISPLIT_SEPARATOR = "<::::>"
WIKISPLIT_URL = "https://github.com/google-research-datasets/wiki-split"
SEPARATORS = "-/_"

Split = Literal["train", "val", "test"]

# --- detokenization -------------------------------------------------------------
# WikiSplit tokenizes with spaces around every punctuation token. It writes both
# opening and closing double quotes as '' (never ``), so quotes are paired in
# order; a lone ' is a quote or, in "Yankees ' Double", a possessive. The text is
# padded with a space at both ends so that every token is " token " and the
# patterns can start with a literal: 20,000 sentences take ~0.2 s, not ~0.65 s.
_DOUBLE_PAIR = re.compile(r" '' (.+?) ''(?= )")
_POSSESSIVE = re.compile(r" (\w*[sS]) '(?= \w)")
_SINGLE_PAIR = re.compile(r" ' (.+?) '(?= )")
# A contraction is followed by a space or punctuation, not by ', so that a
# quoted single letter ('M') is not glued to the word before it.
_CONTRACTION = re.compile(r" (?=(?:'s|'re|'ve|'ll|'d|'m|n't)[ ,.;:!?)\]}\"])", re.I)
_HYPHEN = re.compile(r"(\w) - (?=\w)")
_GLUE_LEFT = re.compile(r" ([,.;:!?%)\]}])")
_GLUE_RIGHT = re.compile(r"([(\[{]) |([$£€]) (?=\d)")
# Words ending in s that are never possessives, so "known as ' The Rabbit '"
# keeps its quote.
_NOT_POSSESSIVE = frozenset(
    {"as", "is", "was", "has", "his", "its", "this", "thus", "us", "yes", "does"}
)


def _possessive(match: re.Match[str]) -> str:
    word = match.group(1)
    return match.group(0) if word.lower() in _NOT_POSSESSIVE else f" {word}'"


def detokenize(text: str) -> str:
    """Undo WikiSplit's tokenization: ``Bob 's car , he said .`` -> ``Bob's car,
    he said.`` (rules in the module docstring, part of ``clean-v2``)."""
    t = " " + " ".join(text.split()) + " "

    # Quotes first: pairing needs every quote still a separate token. A quote
    # left unpaired (its partner is in the other half of a split sentence) opens
    # at the start of the sentence and closes anywhere else.
    if "`" in t:
        t = t.replace(" `` ", " '' ")
    if "''" in t:
        while " '' '' " in t:
            t = t.replace(" '' '' ", " '' ")
        t = _DOUBLE_PAIR.sub(r' "\1"', t)
        if t.startswith(" '' "):
            t = ' "' + t[4:]
        t = t.replace(" '' ", '" ')
    if " ' " in t:
        if t.count(" ' ") % 2:
            t = _POSSESSIVE.sub(_possessive, t)
        t = _SINGLE_PAIR.sub(r" '\1'", t)
        if t.startswith(" ' "):
            t = " '" + t[3:]
        t = t.replace(" ' ", "' ")

    # Then words and punctuation.
    if "'" in t:
        t = _CONTRACTION.sub("", t)
    if " - " in t:
        t = _HYPHEN.sub(r"\1-", t)
    if " -- " in t:
        t = t.replace(" -- ", " \N{EN DASH} ")
    t = _GLUE_LEFT.sub(r"\1", t)
    t = _GLUE_RIGHT.sub(r"\1\2", t)
    return t.strip()


# --- cleaning -------------------------------------------------------------------
@dataclass(frozen=True)
class _Cleaner:
    """The translate tables for one charset, built once per corpus."""

    charset: frozenset[str]
    table: dict[int, str | None]

    @classmethod
    def for_charset(cls, charset: str) -> _Cleaner:
        chars = frozenset(charset) | {" "}
        table: dict[int, str | None] = {}
        # After folding only ASCII and charset characters are left, so a table
        # over ASCII covers every character that must change.
        for code in range(128):
            char = chr(code)
            if char in chars:
                continue
            if char.isspace() or char in SEPARATORS:
                table[code] = " "
            else:
                table[code] = None
        return cls(chars, table)

    def fold(self, text: str) -> str:
        if text.isascii():
            return text
        return "".join(
            c if c.isascii() or c in self.charset else _fold_char(c) for c in text
        )

    def text(self, folded: str) -> tuple[str, int]:
        """The cleaned sentence and how many characters were dropped."""
        kept = folded.translate(self.table)
        # Whitespace and separators map to one space each, the rest to nothing.
        dropped = len(folded) - len(kept)
        return " ".join(kept.split()), dropped

    @staticmethod
    def tidy(text: str) -> str:
        """After a drop: no "spelling , which", "( Cir" or "( )" left behind."""
        text = " ".join(_EMPTY_BRACKETS.sub(" ", text).split())
        return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


# Latin letters and punctuation with a plain form that Unicode decomposition
# does not give.
_FOLD = {
    "ß": "ss", "ẞ": "SS", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE",
    "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ð": "d",
    "Ð": "D", "þ": "th", "Þ": "Th", "ı": "i", "ħ": "h", "Ħ": "H",
    "‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "`": "'",
    "“": '"', "”": '"', "„": '"', "‟": '"', "″": '"', "«": '"', "»": '"',
    "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "―": "-", "−": "-",
    "…": "...", "⁄": "/",
}  # fmt: skip


_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{]) ")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)|\[\s*\]")


@functools.lru_cache(maxsize=4096)
def _fold_char(char: str) -> str:
    """The plain ASCII form of one character, or "" when it has none."""
    if char.isspace():
        return " "
    if char in _FOLD:
        return _FOLD[char]
    base = "".join(
        c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
    )
    if base.isascii():
        return base
    if unicodedata.name(char, "").startswith("LATIN "):
        return anyascii(char)
    return ""


def _fit(text: str, max_chars: int, overflow: str) -> list[str]:
    if len(text) <= max_chars:
        return [text]
    if overflow == "cut":
        end = text.rfind(" ", 0, max_chars + 1)
        return [text[:end] if end > 0 else text[:max_chars]]
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        while len(word) > max_chars:
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:max_chars])
            word = word[max_chars:]
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= max_chars:
            line = f"{line} {word}"
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines


def _check_overflow(overflow: str, max_chars: int) -> None:
    if overflow not in ("cut", "wrap"):
        raise CorpusError(f"overflow is {overflow!r}; use 'cut' or 'wrap'.")
    if max_chars < 1:
        raise CorpusError(f"max_chars is {max_chars}; give at least 1.")


def clean(text: str, charset: str, max_chars: int, overflow: str = "cut") -> list[str]:
    """Clean one sentence to ``charset`` and fit it to lines of ``max_chars``.

    Returns the lines (one for ``cut``, one or more for ``wrap``), or ``[]``
    when nothing drawable is left. Rules: ``clean-v2`` in the module docstring.
    """
    _check_overflow(overflow, max_chars)
    cleaner = _Cleaner.for_charset(charset)
    folded = cleaner.fold(text)
    cleaned, lost = cleaner.text(folded)
    if lost or len(folded) < len(text):
        cleaned = cleaner.tidy(cleaned)
    return _fit(cleaned, max_chars, overflow) if cleaned else []


def split_of(sentence: str, val_fraction: float, test_fraction: float) -> Split:
    """The split of a cleaned sentence, from a hash that is the same everywhere."""
    digest = hashlib.blake2b(sentence.encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


# --- loading --------------------------------------------------------------------
@dataclass
class Corpus:
    """Cleaned lines by split, what happened to the input, and where it came from.

    Attributes:
        sentences: ``{"train": [...], "val": [...], "test": [...]}``, cleaned
            lines of at most ``max_chars`` in corpus order, duplicates removed.
        stats: counts: ``sentences_read``, ``lines_kept``, ``dropped_empty``,
            ``cut``, ``wrapped``, ``folded_to_ascii``, ``chars_dropped``,
            ``duplicates``, ``lines_by_split`` and ``seconds``.
        source: ``kind`` (``wikisplit``, ``text``, ``mixed`` or
            ``embedded-pyjokes``), ``cleaning`` (the policy version) and
            ``files``: ``[{name, url, format, bytes, sha256}]``.
    """

    sentences: dict[str, list[str]]
    stats: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)


def _split_urls(urls: str | list[str]) -> list[str]:
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    items = [u.strip() for u in items if u and u.strip()]
    if not items:
        raise CorpusError(
            f"no corpus URL in {urls!r}; give a path or URL, or several separated "
            "by commas (test.tsv,tune.tsv)."
        )
    return items


def _format_of(url: str, fmt: str) -> str:
    if fmt not in ("auto", "wikisplit", "text"):
        raise CorpusError(
            f"corpus format {fmt!r} is unknown; use 'auto', 'wikisplit' or 'text'."
        )
    if fmt != "auto":
        return fmt
    return "wikisplit" if url.lower().endswith(".tsv") else "text"


def _decode(data: bytes, url: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise CorpusError(
            f"{url} is not UTF-8: byte {err.start} (line {line}) is "
            f"{data[err.start : err.start + 1]!r}; re-encode the file as UTF-8 "
            "(iconv -t UTF-8)."
        ) from err
    return text.removeprefix("\ufeff")


def _read_file(url: str, fmt: str, storage_options: dict[str, Any] | None):
    """The raw sentences of one file and its entry for ``source.files``."""
    loc = resolve(url, storage_options)
    try:
        data = loc.read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"corpus file {url} not found; check the path, or give --corpus "
            "path/to/wikisplit.tsv or any text file with one sentence a line."
        ) from err
    text = _decode(data, url)
    entry = {
        "name": posixpath.basename(loc.path),
        "url": url,
        "format": fmt,
        "bytes": len(data),
        "sha256": sha256_bytes(data),
    }
    return _sentences_in(text, url, fmt), entry


def _sentences_in(text: str, url: str, fmt: str) -> list[str]:
    lines = text.split("\n")
    if fmt == "text":
        return [s for s in (line.strip() for line in lines) if s]
    sentences: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        columns = line.rstrip("\r").split("\t")
        if len(columns) < 2:
            raise CorpusError(
                f"line {number} of {url} has no second column; a WikiSplit TSV "
                "holds 'sentence<TAB>split sentences' on every line. For plain "
                "text with one sentence a line use --corpus-format text."
            )
        for part in columns[1].split(WIKISPLIT_SEPARATOR):
            if part.strip():
                sentences.append(detokenize(part))
    return sentences


def _embedded_jokes() -> tuple[list[str], dict[str, Any]]:
    from importlib.metadata import version

    import pyjokes

    jokes = pyjokes.get_jokes(language="en", category="all")
    joined = "\n".join(jokes).encode("utf-8")
    sentences = [
        s for joke in jokes for s in re.split(r"(?<=[.?!])\s+", joke.strip()) if s
    ]
    entry = {
        "name": f"pyjokes-{version('pyjokes')}",
        "url": None,
        "format": "text",
        "bytes": len(joined),
        "sha256": sha256_bytes(joined),
    }
    logger.warning(
        "no corpus given: using the %d jokes embedded in pyjokes (%d sentences), "
        "fine for a demo, too small and repetitive to train on. Point at a real "
        "corpus with --corpus path/to/wikisplit.tsv or any text file with one "
        "sentence a line (WikiSplit: %s).",
        len(jokes),
        len(sentences),
        WIKISPLIT_URL,
    )
    return sentences, entry


def load_corpus(
    urls: str | list[str] | None,
    charset: str,
    max_chars: int,
    val_fraction: float,
    test_fraction: float,
    overflow: str = "cut",
    fmt: str = "auto",
    storage_options: dict[str, Any] | None = None,
) -> Corpus:
    """Read, clean, dedupe and split a corpus (policy ``clean-v2``).

    Args:
        urls: a path or fsspec URL, several separated by commas, a list of them,
            or ``None`` for the jokes embedded in ``pyjokes``.
        charset: what the glyph bank draws (``GlyphBank.charset``).
        max_chars: the longest line.
        val_fraction, test_fraction: of sentences, by ``split_of``.
        overflow: ``cut`` or ``wrap`` sentences longer than ``max_chars``.
        fmt: ``auto`` (``.tsv`` is WikiSplit, anything else text), ``wikisplit``
            or ``text`` (one sentence a line, no detokenization).
        storage_options: passed to fsspec for every URL.

    Raises:
        FileNotFoundError: a file is missing (the message names the URL).
        CorpusError: the corpus is empty, not UTF-8, a malformed TSV, nothing in
            it survives cleaning, or a split with a fraction above 0 gets no line.
    """
    _check_overflow(overflow, max_chars)
    start = time.perf_counter()

    # Read every file; nothing is cleaned until all of them parsed.
    if urls is None:
        raw, entry = _embedded_jokes()
        files, kind, where = [entry], "embedded-pyjokes", "the embedded pyjokes corpus"
    else:
        raw, files = [], []
        for url in _split_urls(urls):
            sentences, entry = _read_file(url, _format_of(url, fmt), storage_options)
            raw.extend(sentences)
            files.append(entry)
        formats = {f["format"] for f in files}
        kind = formats.pop() if len(formats) == 1 else "mixed"
        where = ", ".join(f["url"] for f in files)
    if not raw:
        raise CorpusError(
            f"{where} holds no sentences; give a WikiSplit .tsv or a text file "
            "with one sentence a line."
        )

    lines, stats = _clean_all(
        raw, charset, max_chars, overflow, val_fraction, test_fraction
    )
    if stats["lines_kept"] == 0:
        raise CorpusError(
            f"none of the {len(raw)} sentences in {where} survives cleaning to the "
            f"charset {charset!r} ({len(charset)} characters): a glyph bank without "
            "letters (e.g. digits only) cannot draw text. Use a glyph bank with "
            "letters (EMNIST byclass) or a corpus written in that charset."
        )
    kept = stats["lines_kept"]
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if fraction > 0 and not lines[split]:
            raise CorpusError(
                f"the {split} split got no line: {where} gives only {kept} "
                f"line{'s' if kept != 1 else ''} after cleaning and dedupe, and "
                f"{split}_fraction is {fraction}; lower {split}_fraction or give a "
                "larger corpus."
            )
    if not lines["train"]:
        raise CorpusError(
            f"the train split got no line from the {stats['lines_kept']} lines of "
            f"{where}; lower val_fraction and test_fraction or give a larger corpus."
        )

    stats["seconds"] = round(time.perf_counter() - start, 3)
    if stats["dropped_empty"]:
        logger.warning(
            "%d of %d sentences had nothing drawable left in charset %r; dropped",
            stats["dropped_empty"],
            stats["sentences_read"],
            charset,
        )
    logger.info(
        "corpus %s: %d sentences read, %d lines kept (train %d, val %d, test %d), "
        "%d cut, %d wrapped, %d duplicates, %.2f s",
        where,
        stats["sentences_read"],
        stats["lines_kept"],
        *(stats["lines_by_split"][s] for s in SPLIT_NAMES),
        stats["cut"],
        stats["wrapped"],
        stats["duplicates"],
        stats["seconds"],
    )
    source = {"kind": kind, "cleaning": CLEANING_POLICY, "files": files}
    return Corpus(sentences=lines, stats=stats, source=source)


def _clean_all(
    raw: Iterable[str],
    charset: str,
    max_chars: int,
    overflow: str,
    val_fraction: float,
    test_fraction: float,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Clean, fit, dedupe and split raw sentences, counting what happens."""
    cleaner = _Cleaner.for_charset(charset)
    lines: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    seen: set[str] = set()
    read = empty = cut = wrapped = folded_count = dropped = duplicates = 0
    for sentence in raw:
        read += 1
        folded = cleaner.fold(sentence)
        folded_count += folded != sentence
        text, lost = cleaner.text(folded)
        dropped += lost
        if lost or len(folded) < len(sentence):
            text = cleaner.tidy(text)
        if not text:
            empty += 1
            continue
        fitted = _fit(text, max_chars, overflow)
        if len(text) > max_chars:
            cut += overflow == "cut"
            wrapped += overflow == "wrap"
        key = " ".join(fitted)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        lines[split_of(key, val_fraction, test_fraction)].extend(fitted)
    # Under wrap two sentences can share a line: evaluation must not see a
    # line that training saw.
    cross = 0
    for earlier, later in (("train", "val"), ("train", "test"), ("val", "test")):
        known = set(lines[earlier])
        kept = [line for line in lines[later] if line not in known]
        cross += len(lines[later]) - len(kept)
        lines[later] = kept
    stats = {
        "sentences_read": read,
        "lines_kept": sum(len(v) for v in lines.values()),
        "dropped_empty": empty,
        "cut": cut,
        "wrapped": wrapped,
        "folded_to_ascii": folded_count,
        "chars_dropped": dropped,
        "duplicates": duplicates,
        "cross_split_lines": cross,
        "lines_by_split": {s: len(lines[s]) for s in SPLIT_NAMES},
    }
    return lines, stats
