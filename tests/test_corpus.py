"""Corpus loading and the clean-v2 cleaning policy.

Run: ``pytest tests/test_corpus.py`` (the real-data tests need ../shared/data).
"""

from __future__ import annotations

import logging
import string
import time
import uuid

import fsspec
import pytest

from scribeline.platform.corpus import (
    CLEANING_POLICY,
    clean,
    detokenize,
    load_corpus,
    split_of,
)
from scribeline.platform.errors import CorpusError

BYCLASS = " " + string.digits + string.ascii_uppercase + string.ascii_lowercase
PRINTABLE = " " + "".join(sorted(set(string.printable) - set(string.whitespace)))
DIGITS = " 0123456789"


def write(tmp_path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return str(path)


def load(urls, charset=BYCLASS, max_chars=32, val=0.0, test=0.0, **kwargs):
    return load_corpus(urls, charset, max_chars, val, test, **kwargs)


# --- detokenize -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("tokenized", "expected"),
    [
        (
            "Neher was born in 12 , rue du Marché , Obernai , Bas - Rhin .",
            "Neher was born in 12, rue du Marché, Obernai, Bas-Rhin.",
        ),
        (
            "He signed a five - year deal worth $ 25 million with Philadelphia .",
            "He signed a five-year deal worth $25 million with Philadelphia.",
        ),
        (
            "'' I Do n't Care if the Sun Do n't Shine '' is a popular song , "
            "written by Mack David .",
            "\"I Don't Care if the Sun Don't Shine\" is a popular song, "
            "written by Mack David.",
        ),
        (
            "Adolph Gustav Kiefer ( 27 June 1918 -- 5 May 2017 ) was an American "
            "former competition swimmer .",
            "Adolph Gustav Kiefer (27 June 1918 – 5 May 2017) was an American "
            "former competition swimmer.",
        ),
        (
            "Adjacent to Troutbeck Resort is a popular shop called ' Santa 's "
            "Grotto ' .",
            "Adjacent to Troutbeck Resort is a popular shop called 'Santa's Grotto'.",
        ),
        (
            "Patterson was named as an All - Stars both with the Yankees ' Double - "
            "A Albany - Colonie Yankees and Triple - A Columbus Clippers in 1986 .",
            "Patterson was named as an All-Stars both with the Yankees' Double-A "
            "Albany-Colonie Yankees and Triple-A Columbus Clippers in 1986.",
        ),
        (
            "In addition , they made Sam , who in the play is known as ' The Rabbit "
            ", ' a complex character .",
            "In addition, they made Sam, who in the play is known as 'The Rabbit,' "
            "a complex character.",
        ),
        (
            "' Bandolier - Budgie ' , a free iTunes app for iPad , iPhone and iPod "
            "touch , was released in December 2011 . ",
            "'Bandolier-Budgie', a free iTunes app for iPad, iPhone and iPod touch, "
            "was released in December 2011.",
        ),
        (
            "Hnæf ( d. 450 ? ) and Hildeburh ; approximately 80 % of them : yes !",
            "Hnæf (d. 450?) and Hildeburh; approximately 80% of them: yes!",
        ),
        ("they 're sure I 'm right , we 'll see", "they're sure I'm right, we'll see"),
        ("`` Quoted '' text", '"Quoted" text'),
        # The opening quote was in the other half of the split sentence.
        ("Again Schwartz scores 100 % hits . ''", 'Again Schwartz scores 100% hits."'),
    ],
)
def test_detokenize_real_wikisplit_lines(tokenized, expected):
    assert detokenize(tokenized) == expected


# --- clean ----------------------------------------------------------------------
def test_clean_folds_unicode_to_ascii():
    assert clean("Café Straße “quoted” ‘x’", PRINTABLE, 100) == [
        "Cafe Strasse \"quoted\" 'x'"
    ]
    assert clean("naïve em—dash", PRINTABLE, 100) == ["naive em-dash"]
    assert clean("naïve em—dash", BYCLASS, 100) == ["naive em dash"]


def test_clean_keeps_non_ascii_characters_the_charset_draws():
    assert clean("Café", " Caféf", 100) == ["Café"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("well-known", "well known"),
        ("and/or", "and or"),
        ("snake_case", "snake case"),
        ("1918–2017", "1918 2017"),
        ("Hello, world! (U.S.)", "Hello world US"),
        ("Bob's car: 100% #1", "Bobs car 100 1"),
    ],
)
def test_clean_separators_become_spaces_and_the_rest_is_dropped(text, expected):
    assert clean(text, BYCLASS, 100) == [expected]


def test_clean_keeps_separators_the_charset_draws():
    assert clean("well-known and/or", BYCLASS + "-/", 100) == ["well-known and/or"]


def test_clean_collapses_whitespace_and_strips():
    assert clean("  a \t b\n\n c\u00a0 d  ", BYCLASS, 100) == ["a b c d"]


@pytest.mark.parametrize("text", ["", "   ", "!!! ... ---", "?!"])
def test_clean_nothing_left_is_empty(text):
    assert clean(text, BYCLASS, 32) == []


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        ("the quick brown fox jumps", 10, ["the quick"]),
        ("the quick brown fox jumps", 9, ["the quick"]),
        ("the quick brown fox jumps", 15, ["the quick brown"]),
        ("the quick brown fox jumps", 25, ["the quick brown fox jumps"]),
        ("abcdefghijklmnop xyz", 5, ["abcde"]),
        ("the, quick, brown", 9, ["the quick"]),
    ],
)
def test_cut_keeps_the_longest_prefix_at_a_word_boundary(text, max_chars, expected):
    assert clean(text, BYCLASS, max_chars, "cut") == expected


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        (
            "the quick brown fox jumps over",
            10,
            ["the quick", "brown fox", "jumps over"],
        ),
        ("the quick brown fox", 100, ["the quick brown fox"]),
        ("a abcdefghijkl b", 5, ["a", "abcde", "fghij", "kl b"]),
        ("one two three", 3, ["one", "two", "thr", "ee"]),
    ],
)
def test_wrap_splits_at_word_boundaries(text, max_chars, expected):
    lines = clean(text, BYCLASS, max_chars, "wrap")
    assert lines == expected
    assert all(len(line) <= max_chars for line in lines)


def test_clean_rejects_an_unknown_overflow():
    with pytest.raises(CorpusError, match=r"'squeeze'.*'cut' or 'wrap'"):
        clean("abc", BYCLASS, 32, "squeeze")


# --- split_of -------------------------------------------------------------------
def test_split_of_is_stable():
    # Computed once with blake2b(digest_size=8); a change here re-splits every
    # dataset version, so it needs a new cleaning policy version.
    expected = {
        "sentence number 0": "train",
        "sentence number 3": "val",
        "sentence number 4": "val",
        "sentence number 12": "test",
        "sentence number 21": "test",
        "The cat sat on the mat": "train",
    }
    assert {s: split_of(s, 0.2, 0.2) for s in expected} == expected
    assert split_of("x", 0.05, 0.05) == "train"
    assert split_of("x", 0.3, 0.3) == "test"


def test_split_of_proportions():
    n = 10_000
    splits = [split_of(f"synthetic sentence {i}", 0.2, 0.1) for i in range(n)]
    assert abs(splits.count("test") / n - 0.1) < 0.015
    assert abs(splits.count("val") / n - 0.2) < 0.015
    assert abs(splits.count("train") / n - 0.7) < 0.015


def test_split_of_with_zero_fractions_is_all_train():
    assert {split_of(f"s {i}", 0.0, 0.0) for i in range(200)} == {"train"}


# --- load_corpus ----------------------------------------------------------------
def test_load_text_file_counts_and_dedupes(tmp_path):
    url = write(
        tmp_path,
        "corpus.txt",
        "Hello world.\nCafé au lait!\n\nHello world.\nHello, world\n???\n"
        "A sentence far too long to fit on one line at all\n",
    )
    corpus = load(url, max_chars=20)
    assert corpus.sentences == {
        "train": ["Hello world", "Cafe au lait", "A sentence far too"],
        "val": [],
        "test": [],
    }
    stats = corpus.stats
    assert stats["sentences_read"] == 6
    assert stats["lines_kept"] == 3
    assert stats["duplicates"] == 2
    assert stats["dropped_empty"] == 1
    assert stats["cut"] == 1
    assert stats["wrapped"] == 0
    assert stats["folded_to_ascii"] == 1
    assert stats["chars_dropped"] == 1 + 1 + 1 + 1 + 3
    assert stats["lines_by_split"] == {"train": 3, "val": 0, "test": 0}
    assert corpus.source["kind"] == "text"
    assert corpus.source["cleaning"] == CLEANING_POLICY == "clean-v2"
    (entry,) = corpus.source["files"]
    assert entry["name"] == "corpus.txt"
    assert entry["bytes"] == len((tmp_path / "corpus.txt").read_bytes())
    assert len(entry["sha256"]) == 64


def test_dedupe_applies_to_cut_lines_so_no_line_is_in_two_splits(tmp_path):
    # 300 sentences that differ only after max_chars all cut to one line.
    text = "".join(f"The same opening words then {i}\n" for i in range(300))
    corpus = load(write(tmp_path, "same.txt", text), max_chars=20, val=0, test=0)
    assert corpus.sentences["train"] == ["The same opening"]
    assert corpus.stats["duplicates"] == 299


def test_wrap_keeps_all_lines_of_a_sentence_in_one_split(tmp_path):
    text = "".join(f"sentence {i} has several words to wrap\n" for i in range(400))
    corpus = load(
        write(tmp_path, "w.txt", text), max_chars=12, val=0.2, test=0.2, overflow="wrap"
    )
    assert corpus.stats["wrapped"] == 400
    for split, lines in corpus.sentences.items():
        assert all(len(line) <= 12 for line in lines)
        numbers = {line.split()[1] for line in lines if line.startswith("sentence")}
        for other, other_lines in corpus.sentences.items():
            if other != split:
                other_numbers = {
                    line.split()[1] for line in other_lines if line.startswith("sen")
                }
                assert not numbers & other_numbers


def test_a_sentence_is_never_in_two_splits(tmp_path):
    text = "".join(f"line {i % 700}\n" for i in range(2000))
    corpus = load(write(tmp_path, "c.txt", text), val=0.2, test=0.2)
    sets = [set(lines) for lines in corpus.sentences.values()]
    assert sum(len(s) for s in sets) == 700
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert corpus.stats["duplicates"] == 1300
    for split, lines in corpus.sentences.items():
        assert all(split_of(line, 0.2, 0.2) == split for line in lines)


def test_wikisplit_tsv_is_split_and_detokenized(tmp_path):
    tsv = (
        "Bob 's car , red .\tBob 's car is red . <::::> It is fast .\n"
        "x\tThey 're well - known . <::::> \n"
    )
    corpus = load(write(tmp_path, "wiki.tsv", tsv), charset=PRINTABLE)
    assert corpus.sentences["train"] == [
        "Bob's car is red.",
        "It is fast.",
        "They're well-known.",
    ]
    assert corpus.source["kind"] == "wikisplit"


def test_text_format_is_not_detokenized(tmp_path):
    corpus = load(write(tmp_path, "t.txt", "Bob 's car , red .\n"), charset=PRINTABLE)
    assert corpus.sentences["train"] == ["Bob 's car , red ."]


def test_format_can_be_forced(tmp_path):
    url = write(tmp_path, "wiki.data", "a\tBob 's car .\n")
    assert load(url, fmt="wikisplit").sentences["train"] == ["Bobs car"]
    with pytest.raises(CorpusError, match=r"'csv'.*'auto', 'wikisplit' or 'text'"):
        load(url, fmt="csv")


def test_several_urls_comma_separated_list_and_fsspec(tmp_path):
    a = write(tmp_path, "a.txt", "first sentence\n")
    b = write(tmp_path, "b.tsv", "x\tsecond one . <::::> third one .\n")
    joined = load(f"{a},{b}")
    assert joined.sentences["train"] == ["first sentence", "second one", "third one"]
    assert joined.source["kind"] == "mixed"
    assert [f["name"] for f in joined.source["files"]] == ["a.txt", "b.tsv"]
    assert load([a, b]).sentences == joined.sentences

    fs = fsspec.filesystem("memory")
    path = f"/corpus-{uuid.uuid4().hex}/m.txt"
    fs.pipe(path, b"from memory\n")
    assert load(f"memory://{path}").sentences["train"] == ["from memory"]


def test_embedded_pyjokes_default(caplog):
    with caplog.at_level(logging.WARNING, logger="scribeline.platform.corpus"):
        corpus = load(None, val=0.05, test=0.05)
    assert corpus.source["kind"] == "embedded-pyjokes"
    (entry,) = corpus.source["files"]
    assert entry["name"].startswith("pyjokes-")
    assert len(entry["sha256"]) == 64
    assert corpus.stats["sentences_read"] > 283  # jokes split into sentences
    assert all(corpus.sentences[s] for s in ("train", "val", "test"))
    assert all(
        len(line) <= 32 and set(line) <= set(BYCLASS)
        for lines in corpus.sentences.values()
        for line in lines
    )
    warning = caplog.text
    assert "embedded" in warning
    assert "--corpus path/to/wikisplit.tsv" in warning
    assert "google-research-datasets/wiki-split" in warning


# --- bad input ------------------------------------------------------------------
def test_missing_file_names_the_url(tmp_path):
    url = str(tmp_path / "nope.tsv")
    with pytest.raises(FileNotFoundError, match=r"nope\.tsv not found"):
        load(url)


def test_empty_corpus(tmp_path):
    url = write(tmp_path, "empty.txt", "\n  \n")
    with pytest.raises(CorpusError, match=r"empty\.txt holds no sentences"):
        load(url)


def test_empty_url_list():
    with pytest.raises(CorpusError, match="no corpus URL"):
        load(" , ")


def test_digits_only_charset_nothing_survives(tmp_path):
    url = write(tmp_path, "words.txt", "Only words here\nand more words\n")
    with pytest.raises(CorpusError, match=r"none of the 2 sentences.*digits only"):
        load(url, charset=DIGITS)


def test_tsv_without_second_column_names_the_line(tmp_path):
    url = write(tmp_path, "bad.tsv", "a\tgood one .\njust one column\n")
    with pytest.raises(CorpusError, match=r"line 2 of .*bad\.tsv has no second column"):
        load(url)


def test_not_utf8_names_the_byte_and_line(tmp_path):
    url = write(
        tmp_path, "latin1.txt", "fine line\ncaf\xe9 au lait\n".encode("latin-1")
    )
    with pytest.raises(
        CorpusError, match=r"latin1\.txt is not UTF-8: byte 13 \(line 2\)"
    ):
        load(url)


def test_split_without_lines(tmp_path):
    # One sentence, and it hashes to train: val and test have nothing.
    url = write(tmp_path, "one.txt", "sentence number 0\n")
    assert load(url).sentences["train"] == ["sentence number 0"]
    with pytest.raises(
        CorpusError, match=r"val split got no line.*only 1 line after.*lower"
    ):
        load(url, val=0.05)
    with pytest.raises(CorpusError, match=r"test split got no line.*test_fraction"):
        load(url, test=0.05)


# --- real data ------------------------------------------------------------------
@pytest.mark.shared_data
def test_real_wikisplit_test_and_tune(shared_data):
    folder = shared_data / "wikisplit"
    start = time.perf_counter()
    corpus = load(f"{folder / 'test.tsv'},{folder / 'tune.tsv'}", val=0.05, test=0.05)
    seconds = time.perf_counter() - start
    stats = corpus.stats
    print("WikiSplit test+tune:", stats, f"{seconds:.2f} s")

    assert seconds < 5
    assert stats["sentences_read"] == 20_000
    assert 19_000 < stats["lines_kept"] <= 20_000
    assert stats["duplicates"] < 500
    assert stats["cut"] > 15_000  # most WikiSplit sentences are over 32 chars
    assert 500 < stats["folded_to_ascii"] < 2_000
    lines = [line for split in corpus.sentences.values() for line in split]
    assert len(lines) == len(set(lines))
    for line in lines:
        assert 0 < len(line) <= 32
        assert set(line) <= set(BYCLASS)
        assert "  " not in line and line == line.strip()
    n = stats["lines_kept"]
    for split, expected in (("train", 0.9), ("val", 0.05), ("test", 0.05)):
        assert abs(stats["lines_by_split"][split] / n - expected) < 0.015


@pytest.mark.shared_data
def test_real_wikisplit_detokenized_has_no_artifacts(shared_data):
    corpus = load(
        str(shared_data / "wikisplit" / "test.tsv"), charset=PRINTABLE, max_chars=400
    )
    lines = corpus.sentences["train"]
    assert len(lines) > 9_000
    for artifact in (" ,", " .", "( ", " )", "''", " 's ", " n't", "  "):
        bad = [line for line in lines if artifact in line]
        assert not bad, f"{artifact!r} in {len(bad)} lines, e.g. {bad[:2]}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("🐍 ❤️ ✨ hello", ["hello"]),
        ("服部克久 is a composer", ["is a composer"]),
        ("Shalom Hanoch (Hebrew: שלום חנוך) sang", ["Shalom Hanoch Hebrew sang"]),
        ("café Straße 5 °C and £3", ["cafe Strasse 5 C and 3"]),
        ("229 km² of Łódź", ["229 km2 of Lodz"]),
    ],
)
def test_no_script_or_symbol_becomes_words_in_the_label(raw, expected):
    # Only plain forms are kept: other scripts, symbols and emoji are dropped,
    # never romanized into words the sentence did not hold.
    assert clean(raw, BYCLASS, 48) == expected


def test_wrapped_lines_shared_by_two_sentences_stay_in_one_split(tmp_path):
    # Many sentences share the line "2008"; wherever their other lines go, the
    # shared line must not be in train and in an evaluation split.
    text = "\n".join(f"sentence number {i} ends in 2008" for i in range(400))
    corpus = load(
        write(tmp_path, "w.txt", text),
        max_chars=22,
        overflow="wrap",
        val=0.2,
        test=0.2,
    )
    train = set(corpus.sentences["train"])
    assert "in 2008" in train
    assert not train & set(corpus.sentences["val"])
    assert not train & set(corpus.sentences["test"])
    assert corpus.stats["cross_split_lines"] > 0
