"""Character and word error rates, and which characters get confused.

CER = (character edits to turn each prediction into its truth, summed) /
(characters of the truths, summed); WER the same over words split on spaces.
Edit distances come from ``rapidfuzz`` (Levenshtein, C++).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from rapidfuzz.distance import Levenshtein


@dataclass
class EvalResult:
    """Error rates over a set of lines, with the most frequent confusions."""

    split: str
    lines: int
    chars: int
    char_errors: int
    words: int
    word_errors: int
    exact_lines: int = 0
    confusions: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def cer(self) -> float:
        return self.char_errors / max(self.chars, 1)

    @property
    def wer(self) -> float:
        return self.word_errors / max(self.words, 1)

    @property
    def line_accuracy(self) -> float:
        return self.exact_lines / max(self.lines, 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            cer=round(self.cer, 6),
            wer=round(self.wer, 6),
            line_accuracy=round(self.line_accuracy, 6),
        )
        return out


def char_errors(truth: str, prediction: str) -> int:
    return Levenshtein.distance(truth, prediction)


def word_errors(truth: str, prediction: str) -> int:
    return Levenshtein.distance(truth.split(), prediction.split())


def cer(truths: list[str], predictions: list[str]) -> float:
    errors = sum(map(char_errors, truths, predictions))
    return errors / max(sum(map(len, truths)), 1)


def wer(truths: list[str], predictions: list[str]) -> float:
    errors = sum(map(word_errors, truths, predictions))
    return errors / max(sum(len(t.split()) for t in truths), 1)


def confusions(
    truths: list[str], predictions: list[str], top: int = 15
) -> list[dict[str, Any]]:
    """The most frequent character edits: substitutions, deletions, insertions.

    Each entry: ``{"truth": "l", "predicted": "I", "count": 42}``; a deletion
    has ``predicted=""``, an insertion ``truth=""``.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for truth, prediction in zip(truths, predictions, strict=True):
        for op in Levenshtein.editops(truth, prediction):
            if op.tag == "replace":
                counts[truth[op.src_pos], prediction[op.dest_pos]] += 1
            elif op.tag == "delete":
                counts[truth[op.src_pos], ""] += 1
            else:
                counts["", prediction[op.dest_pos]] += 1
    return [
        {"truth": t, "predicted": p, "count": n}
        for (t, p), n in counts.most_common(top)
    ]


def evaluate_texts(
    split: str,
    truths: list[str],
    predictions: list[str],
    top_confusions: int = 15,
    samples: int = 12,
) -> EvalResult:
    """CER, WER and confusions of predictions against their truths."""
    return EvalResult(
        split=split,
        lines=len(truths),
        chars=sum(map(len, truths)),
        char_errors=sum(map(char_errors, truths, predictions)),
        words=sum(len(t.split()) for t in truths),
        word_errors=sum(map(word_errors, truths, predictions)),
        exact_lines=sum(t == p for t, p in zip(truths, predictions, strict=True)),
        confusions=confusions(truths, predictions, top_confusions),
        samples=[
            {"truth": t, "prediction": p}
            for t, p in zip(truths[:samples], predictions[:samples], strict=True)
        ],
    )


def format_confusions(items: list[dict[str, Any]]) -> str:
    """``'l'->'I' x42, 'O'->'o' x30, ...`` for logs."""

    def show(char: str) -> str:
        return repr(char) if char else "(none)"

    return ", ".join(
        f"{show(c['truth'])}->{show(c['predicted'])} x{c['count']}" for c in items
    )
