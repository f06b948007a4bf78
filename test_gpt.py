"""Tests for gpt.py, section by section: python -m pytest -q test_gpt.py

Each test checks one property, against a reference where one exists (the naive BPE trainer,
GPT-2's published token ids, PyTorch's own modules, losses and optimizer), against examples
worked out by hand, or as a property (a round trip, causality, RoPE's relative positions).
Everything a test writes goes under pytest's tmp_path, never into the working directory.
"""

import argparse
import base64
import contextlib
import copy
import dataclasses
import errno
import gc
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import pathlib
import random
import re
import signal
import string
import subprocess
import sys
import time
import unicodedata
import warnings
from collections import Counter
from itertools import chain, pairwise, product

import numpy as np
import pytest
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt


HERE = os.path.dirname(os.path.abspath(__file__))
TINYSTORIES = os.path.join(HERE, "data", "tinystories_train.txt")
GPT2_DIR = os.path.join(HERE, "data", "gpt2")  # OpenAI's GPT-2 tokenizer files (modified MIT)
EOT = "<|endoftext|>"
BYTES_VOCAB = {i: bytes([i]) for i in range(256)}  # a tokenizer with no merges at all


def exit_code(argv: list[str]) -> int:
    """gpt.main's exit code, also for a mistake argparse catches (it exits, main returns)."""
    try:
        return gpt.main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(capsys, command: str) -> str:
    """The single stderr line of a failed command (and no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"gpt.py {command}: error:")
    return lines[0]


# ==================================================================================================
# The module as a whole
# ==================================================================================================

def test_import_does_nothing(tmp_path):
    """Importing gpt.py prints nothing and writes nothing."""
    result = subprocess.run([sys.executable, "-B", "-c", "import gpt"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": HERE}, capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["gpt.py", "test_gpt.py"])
def test_lines_fit_in_100_characters(name):
    """The style guide's line limit, so that both files read side by side."""
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        long_lines = [n for n, line in enumerate(f, 1) if len(line.rstrip("\n")) > 100]
    assert long_lines == []


def test_source_compiles_without_warnings():
    """gpt.py has no invalid escape sequences (a SyntaxWarning from Python 3.12, later an error)."""
    with open(os.path.join(HERE, "gpt.py"), encoding="utf-8") as f:
        source = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(source, "gpt.py", "exec")


@pytest.mark.parametrize("value, depth", [(7, 0), ("[", 0), ([], 1), ([1, {"a": [2]}], 3),
                                          ({"a": {"b": {}}}, 3), ([("x", [1])], 3)])
def test_json_depth_counts_nesting(value, depth):
    """json_depth counts levels of arrays and objects (and the tuples of object_pairs_hook)."""
    assert gpt.json_depth(value) == depth


@pytest.mark.parametrize("content, named", [
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested more than 32 levels deep"),
    (b"[" * 33 + b"]" * 33, "JSON nested more than 32 levels deep"),
    (b'{"a": Infinity}', "Infinity is not a JSON number"),
    (b"[NaN]", "NaN is not a JSON number"),
    (b"[1e999]", "the number 1e999 is too large"),
    (b"[" + b"9" * 5000 + b"]", "is not JSON we can use"),
    (b"{not json", "is not JSON (Expecting"),
    (b"  ", "is empty"),
    (b"\xff[]", "is not UTF-8 text (byte 0xff at offset 0)"),
], ids=["deep", "33-deep", "infinity", "nan", "overflow", "long-int", "not-json", "empty",
        "not-utf8"])
def test_read_json_refuses_what_no_file_of_ours_holds(tmp_path, content, named):
    """read_json refuses deep nesting, non-finite and huge numbers, broken JSON and bytes that
    are not UTF-8, with one ValueError line that names the file."""
    path = tmp_path / "f.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        gpt.read_json(path)
    message = str(error.value)
    assert message.startswith(str(path)) and named in message and "\n" not in message, message


def test_read_json_refuses_special_and_large_files(tmp_path, monkeypatch):
    """A device, a directory, a pipe (without waiting for a writer) and a file over
    JSON_MAX_BYTES are refused before they are read; 32 levels and the limit itself pass."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in ("/dev/zero", str(fifo)):
        with pytest.raises(ValueError, match=f"^{path} is not a regular file$"):
            gpt.read_json(path)
    with pytest.raises(ValueError, match=f"^{tmp_path}: cannot read it \\(Is a directory\\)$"):
        gpt.read_json(tmp_path)
    monkeypatch.setattr(gpt, "JSON_MAX_BYTES", 64)
    (tmp_path / "big.json").write_text("[" + " " * 62 + "]")
    assert gpt.read_json(tmp_path / "big.json") == []
    (tmp_path / "big.json").write_text("[" + " " * 63 + "]")
    with pytest.raises(ValueError, match="big.json is larger than"):
        gpt.read_json(tmp_path / "big.json")
    (tmp_path / "deep.json").write_text("[" * 32 + "]" * 32)
    assert gpt.json_depth(gpt.read_json(str(tmp_path / "deep.json"))) == 32


def test_ctrl_c_while_parsing_arguments_is_one_line(monkeypatch, capsys):
    """Ctrl-C before a command starts (here, in argument parsing) is one line and exit code 2,
    and the handler in force before (SIG_IGN when pytest runs in the background) is put back."""
    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(gpt, "build_parser", interrupted)
    before = signal.getsignal(signal.SIGINT)
    assert gpt.main(["sample"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "gpt.py: interrupted while starting; nothing was done"
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="watches /proc/PID/maps")
def test_ctrl_c_while_importing_is_one_line(tmp_path):
    """Ctrl-C while `python gpt.py` still imports its libraries is one line and exit code 2."""
    process = subprocess.Popen([sys.executable, "-B", os.path.join(HERE, "gpt.py"), "sample",
                                "--checkpoint", str(tmp_path / "missing.pt")],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    # numpy's library is mapped once `import numpy` runs: the handler is set before it.
    while process.poll() is None and "numpy" not in open(f"/proc/{process.pid}/maps").read():
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err


# ==================================================================================================
# §1 Tokenizer
# ==================================================================================================

@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    """About 200 KB of TinyStories (a few hundred stories), cut at the end of a line."""
    with open(TINYSTORIES, "rb") as f:
        data = f.read(200_000)
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_bytes(data[:data.rindex(b"\n") + 1])
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(corpus_path):
    """A 500-token BPE tokenizer trained once for the whole module."""
    vocab, merges = gpt.train_bpe(corpus_path, 500, [EOT], num_workers=1)
    return gpt.Tokenizer(vocab, merges, [EOT])


# §1's readable forms; after `import gpt` the plain names stand for their fast twins (§19).
PlainTokenizer = gpt.READABLE_FORMS["Tokenizer"]
plain_train_bpe_incremental = gpt.READABLE_FORMS["train_bpe_incremental"]


def train_incrementally(text: str, vocab_size: int, special_tokens: list[str]):
    """§1's readable incremental trainer on the pre-token counts of text."""
    counts = gpt.pretoken_counts(text, special_tokens)
    return plain_train_bpe_incremental(counts, vocab_size, special_tokens)


@pytest.fixture(params=["train_bpe", "train_bpe_naive", "train_bpe_incremental"])
def train(request, tmp_path):
    """The three trainers behind one signature: train(text, vocab_size, special_tokens)."""
    if request.param == "train_bpe_naive":
        return gpt.train_bpe_naive
    if request.param == "train_bpe_incremental":
        return train_incrementally

    def train_from_file(text, vocab_size, special_tokens):
        path = tmp_path / "corpus.txt"
        path.write_bytes(text.encode("utf-8"))
        return gpt.train_bpe(str(path), vocab_size, special_tokens, num_workers=1)
    return train_from_file


@pytest.mark.parametrize("text, expected", [
    ("Hi  there, it's 42!", ["Hi", " ", " there", ",", " it", "'s", " 42", "!"]),
    # A run of spaces gives its last space to the next word; trailing spaces stay one run.
    ("a\n\n b  ", ["a", "\n\n", " b", "  "]),
    ("we'll 2024...", ["we", "'ll", " 2024", "..."]),
    ("", []),
])
def test_pretokenize_hand_examples(text, expected):
    """pretokenize() splits as GPT-2's regex does (worked out by hand)."""
    assert gpt.pretokenize(text) == expected


@pytest.mark.parametrize("ids, pair, expected", [
    ([1, 2, 2, 2], (2, 2), [1, 9, 2]),  # overlapping occurrences: leftmost first
    ([2, 2, 2, 2], (2, 2), [9, 9]),
    ([1, 2, 3], (3, 4), [1, 2, 3]),     # pair absent
    ([1, 2, 1, 2], (1, 2), [9, 9]),
    ([], (1, 2), []),
    ([3, 1, 2], (1, 2), [3, 9]),
])
def test_merge_hand_examples(ids, pair, expected):
    """merge replaces non-overlapping occurrences left to right."""
    assert gpt.merge(ids, pair, 9) == expected


def test_pretoken_counts_hand_example():
    """The trainers' input: each distinct pre-token with its count, special tokens cut out."""
    text = "the cat" + EOT + "the cat sat" + EOT
    assert gpt.pretoken_counts(text, [EOT]) == {"the": 2, " cat": 2, " sat": 1}
    assert gpt.pretoken_counts("a" + EOT, [])["|>"] == 1  # not special: plain text


def test_count_pairs_and_most_frequent_pair_hand_examples():
    """Pairs are counted once per occurrence times the word's count; ties go to the greatest
    (left bytes, right bytes), not to the greatest ids."""
    assert gpt.count_pairs([[1, 2, 3], [1, 2]], [2, 5]) == {(1, 2): 7, (2, 3): 2}
    assert gpt.count_pairs([[7], []], [3, 4]) == {}
    vocab = {**BYTES_VOCAB, 256: b"zz", 257: b"a"}
    assert gpt.most_frequent_pair({(97, 98): 2, (98, 99): 2, (1, 1): 1}, vocab) == (98, 99)
    assert gpt.most_frequent_pair({(256, 97): 4, (257, 98): 4, (99, 1): 3}, vocab) == (256, 97)


def test_bytes_to_unicode_matches_gpt2():
    """GPT-2's printable byte spelling: a bijection onto visible characters, Ġ for space."""
    spell = gpt.bytes_to_unicode()
    assert sorted(spell) == list(range(256))
    assert len(set(spell.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in spell.values())
    # Printable ASCII stands for itself; space is the 33rd shifted byte, newline the 11th.
    assert (spell[ord("a")], spell[ord("!")], spell[ord(" ")], spell[ord("\n")]) == \
        ("a", "!", "Ġ", "Ċ")


# --- training -------------------------------------------------------------------------------------

# Sennrich et al.'s example, worked by hand under GPT-2's pre-tokenizer ("_" is the space, which
# joins the word after it):
#   pre-tokens:  low x1, _low x4, _lower x2, _widest x3, _newest x6
#   pair counts: es 3+6=9, st 9, we 2+6=8, lo 1+4+2=7, ow 7, _l 6, _n 6, ne 6, ew 6,
#                _w 3, wi 3, id 3, de 3, er 2
#   1. es and st tie at 9; ('s','t') > ('e','s')                                  -> st
#   2. (e, st) 9 is the only 9                                                   -> est
#   3. we fell to 2 (newest is n e w est); lo and ow tie at 7; 'o' > 'l'          -> ow
#   4. (l, ow) 7                                                                  -> low
#   5. five pairs at 6: (_,low) (_,n) (n,e) (e,w) (w,est); 'w' is the greatest    -> west
#   6. (_,low) (_,n) (n,e) (e,west) at 6; 'n' is the greatest                     -> ne
#   7. (_,low) (_,ne) (ne,west) at 6                                              -> newest
#   8. (_,low) and (_,newest) at 6; 'newest' > 'low'                              -> _newest
#   9. (_,low) 6; everything else is at most 3                                    -> _low
SENNRICH_TEXT = ("low low low low low lower lower widest widest widest "
                 "newest newest newest newest newest newest")
SENNRICH_MERGES = [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"),
                   (b"n", b"e"), (b"ne", b"west"), (b" ", b"newest"), (b" ", b"low")]


def test_bpe_hand_worked_example(train):
    """Both trainers learn the hand-worked merges of the classic low/lower/newest/widest text."""
    vocab, merges = train(SENNRICH_TEXT, 256 + len(SENNRICH_MERGES), [])
    assert merges == SENNRICH_MERGES
    assert [vocab[256 + i] for i in range(len(merges))] == [a + b for a, b in SENNRICH_MERGES]
    assert len(vocab) == 256 + len(SENNRICH_MERGES)


@pytest.mark.parametrize("text, expected", [
    # "ab", " ac": three pairs at 1; ('a','c') > ('a','b') > (' ','a'). Then (a,b) beats
    # (' ','ac') since 'a' > ' '. Then no pair is left: training stops early.
    ("ab ac", [(b"a", b"c"), (b"a", b"b"), (b" ", b"ac")]),
    # "ba", " ab" x2: the count comes first, so (b,a), the greatest pair, is merged last.
    ("ba ab ab", [(b"a", b"b"), (b" ", b"ab"), (b"b", b"a")]),
    # "abc", " az", " ab": (a,b) and (' ',a) tie at 2, 'a' > ' '. Then four pairs at 1:
    # (ab,c) (' ',a) (a,z) (' ',ab). Pairs compare as (left, right), and b"ab" > b"a", so
    # (ab,c) wins, although the concatenation "az" > "abc". Then (a,z); then (' ',az) and
    # (' ',ab) tie and b"az" > b"ab".
    ("abc az ab", [(b"a", b"b"), (b"ab", b"c"), (b"a", b"z"), (b" ", b"az"), (b" ", b"ab")]),
])
def test_bpe_tie_break_greatest_pair(train, text, expected):
    """Equal counts go to the lexicographically greatest (left, right) pair; stop when none."""
    vocab, merges = train(text, 1000, [])
    assert merges == expected
    assert len(vocab) == 256 + len(expected)


def test_vocab_size_counts_bytes_and_specials(train):
    """vocab_size includes the 256 bytes and the special tokens; smaller is refused."""
    with pytest.raises(ValueError, match="256"):
        train("aaa bbb", 256, [EOT])
    vocab, merges = train("aaa bbb", 257, [EOT])
    assert merges == [] and len(vocab) == 257 and vocab[256] == EOT.encode()


def test_special_tokens_are_never_merged(train):
    """Special tokens are cut out before counting: id 256, and no merge reaches into them."""
    text = "".join("the cat" + EOT * (1 + i % 2) for i in range(50))
    vocab, merges = train(text, 1000, [EOT])
    # "the" x50 and " cat" x50; all five pairs tie at 50, so by the tie-break: (t,h), (th,e)
    # (b"th" > b"c"), (c,a), (ca,t) (b"ca" > b" "), (' ',cat); then nothing is left to merge.
    assert merges == [(b"t", b"h"), (b"th", b"e"), (b"c", b"a"), (b"ca", b"t"), (b" ", b"cat")]
    assert vocab[256] == EOT.encode() and len(vocab) == 256 + 1 + 5
    tokenizer = gpt.Tokenizer(vocab, merges, [EOT])
    assert tokenizer.encode("a" + EOT + "b") == [ord("a"), 256, ord("b")]


@pytest.mark.parametrize("specials, named", [
    ([""], "empty"), ([EOT, "", "<|x|>"], "empty"),
    ([EOT, "<|x|>", EOT], f"{EOT!r} is given twice"),
], ids=["empty", "empty-among-others", "twice"])
def test_empty_or_repeated_special_tokens_are_refused(specials, named):
    """An empty special token (it would match between every two characters, so every other id
    would be it) or one given twice (two ids) is refused, by the library as by the command."""
    with pytest.raises(ValueError, match=re.escape(named)):
        gpt.check_special_tokens(specials)
    with pytest.raises(ValueError, match=re.escape(named)):
        gpt.Tokenizer(BYTES_VOCAB, [], specials)


WORD_ALPHABET = "aabbcdeé日🙂01'"
SEPARATORS = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", ", ", ". ", "!? ", " -- ", "\r\n"]


def random_text(seed: int, num_words: int) -> str:
    """Text from a small random vocabulary of words (multi-byte characters, digits, "'"), joined
    by spaces, punctuation and newlines, with an occasional <|endoftext|>."""
    rng = random.Random(seed)
    words = ["".join(rng.choices(WORD_ALPHABET, k=rng.randint(1, 6))) for _ in range(12)]
    words += ["aaaa", "it's", "we'll", "42"]
    parts = []
    for _ in range(num_words):
        parts.append(rng.choice(words))
        parts.append(EOT if rng.random() < 0.03 else rng.choice(SEPARATORS))
    return "".join(parts)


TRICKY_TEXTS = [
    "Hi  there, it's 42!",
    "   leading spaces and trailing ones   ",
    "tabs\tand\t\tnew\nlines\n\n\n x\r\n y",
    "one\ntwo\n\nthree \nfour\n five\n",
    "odd spaces:\x1c x \xa0y\u3000z \u3000 w\x1c\x1c q",
    "it's we'll they've I'd 'tis don't X'S",
    "digits 1 22 333 4444, 3.14 -7 x1y2",
    "emoji 🙂🙂 🙂 a🙂 日本語 héllo wörld",
    "!!! ?? , . ;; --> <|notspecial|>",
]


def test_reverse_keys_sort_pairs_greatest_first():
    """Pairs of tokens sorted by their tokens' reverse_keys, one after the other, come in the
    reverse order of (left, right): prefixes after their extensions, bytes 0 and 255 included."""
    rng = random.Random(0)
    tokens = [b"\x00", b"\xff", b"a", b"ab", b"abc", b"b", b"\xff\x00", b"\x00\xff"]
    tokens += [bytes(rng.choices([0, 1, 97, 98, 254, 255], k=rng.randint(1, 4)))
               for _ in range(60)]
    token_pairs = [(rng.choice(tokens), rng.choice(tokens)) for _ in range(3000)]
    by_key = sorted(token_pairs, key=lambda p: gpt.reverse_key(p[0]) + gpt.reverse_key(p[1]))
    assert by_key == sorted(token_pairs, reverse=True)


@pytest.mark.parametrize("seed", range(20))
def test_train_bpe_equals_naive(tmp_path, seed):
    """The fast trainer and the readable incremental one learn exactly the naive reference's
    vocab and merges."""
    text = random_text(seed, num_words=400)
    special_tokens = [EOT] if seed % 4 else []  # without it, "<|endoftext|>" is plain text
    vocab_size = 1000 if seed % 5 == 0 else 256 + len(special_tokens) + 5 + 3 * seed
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    fast = gpt.train_bpe(str(path), vocab_size, special_tokens, num_workers=1)
    naive = gpt.train_bpe_naive(text, vocab_size, special_tokens)
    assert fast == naive == train_incrementally(text, vocab_size, special_tokens)


def test_fast_incremental_trainer_is_the_default_twin():
    """After import, train_bpe_incremental is the fast twin, and both learn the same merges
    from the same counts, with the same progress flag."""
    assert gpt.train_bpe_incremental is gpt.fast_train_bpe_incremental
    counts = gpt.pretoken_counts(random_text(7, num_words=2000), [EOT])
    assert (gpt.fast_train_bpe_incremental(counts, 600, [EOT], verbose=False)
            == plain_train_bpe_incremental(counts, 600, [EOT], verbose=False))


@pytest.mark.parametrize("long_bytes", [gpt.LONG_PRETOKEN_BYTES, 0], ids=["long", "all-linked"])
@pytest.mark.parametrize("seed", range(3))
def test_train_bpe_equals_naive_with_long_pretokens(tmp_path, monkeypatch, seed, long_bytes):
    """Pre-tokens over LONG_PRETOKEN_BYTES, merged where each pair occurs (_LinkedWords), learn
    exactly the naive reference's merges: a 20 KB run of a few letters, runs of one character
    (overlapping pairs), long words that occur twice, beside ordinary text; and so do all the
    words when every one of them is taken as long."""
    monkeypatch.setattr(gpt, "LONG_PRETOKEN_BYTES", long_bytes)
    rng = random.Random(seed)
    long_words = ["".join(rng.choices("aab", k=20_000)), "a" * 301, "é" * 100, "\n" * 150,
                  "".join(rng.choices("ab日", k=100))]
    text = " ".join([random_text(seed, num_words=200), *long_words, *long_words[1:3], "x\t"])
    vocab_size = 256 + 1 + 30 + 20 * seed
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    fast = gpt.train_bpe(str(path), vocab_size, [EOT], num_workers=1)
    assert fast == gpt.train_bpe_naive(text, vocab_size, [EOT])


def test_train_bpe_on_python_source_equals_naive(tmp_path):
    """On code (indentation, comment rules over LONG_PRETOKEN_BYTES, string literals), here the
    start of gpt.py cut into documents, the fast trainer learns the naive reference's merges."""
    source = open(gpt.__file__, encoding="utf-8").read()[:30_000]
    text = EOT.join(source.split("\n\n\n"))  # each top-level definition a document
    assert "    " in text and "# " + "=" * 98 in text
    path = tmp_path / "source.txt"
    path.write_bytes(text.encode("utf-8"))
    fast = gpt.train_bpe(str(path), 256 + 1 + 500, [EOT], num_workers=1)
    assert fast == gpt.train_bpe_naive(text, 256 + 1 + 500, [EOT])


def test_train_bpe_on_a_huge_pretoken(tmp_path, monkeypatch):
    """A 300 KB line of letters (one pre-token) learns 1,000 merges with work bounded by its
    length: at most two pairs replaced per merged occurrence, and never the whole word re-spelled,
    which took 20 s here (hours for 3 MB)."""
    replaced, respelled = [], []  # one entry per pair replaced, one per word re-spelled
    replace, merge_words = gpt._LinkedWords._replace, gpt.fast_merge_words

    def merge_words_and_record(words, freqs, pair, new, pair_count, pair_words):
        respelled.extend(len(words[i]) for i in pair_words.get(pair, ()))
        return merge_words(words, freqs, pair, new, pair_count, pair_words)
    monkeypatch.setattr(gpt._LinkedWords, "_replace",
                        lambda self, *args: replaced.append(1) or replace(self, *args))
    monkeypatch.setattr(gpt, "fast_merge_words", merge_words_and_record)
    rng = random.Random(0)
    text = "".join(rng.choice(["once", "upon", "a", "time", "there", "was"]) for _ in range(75_000))
    path = tmp_path / "line.txt"
    path.write_bytes(text.encode("utf-8"))
    vocab, merges = gpt.train_bpe(str(path), 256 + 1000, [], num_workers=1)
    assert len(merges) == 1000
    assert {b"once", b"upon", b"time", b"there", b"was"} <= set(vocab.values())
    assert len(replaced) <= 2 * len(text) and respelled == []


# --- encoding and decoding ------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "",
    "a",
    "Once upon a time, there was a little cat named Tom.",
    "héllo wörld 你好 🙂",
    "\x00\x01\t\r\n\x7f",
    f"The end.{EOT}Once upon a time{EOT}{EOT} x{EOT}",
    *TRICKY_TEXTS,
])
def test_encode_decode_round_trip(tokenizer, text):
    """decode(encode(text)) gives the text back, and each special token is one id."""
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids.count(tokenizer.special_ids[EOT]) == text.count(EOT)


def encode_by_replaying_merges(tokenizer: gpt.Tokenizer, text: str) -> list[int]:
    """BPE encoding by its definition: apply every merge, in the order learned, to each
    pre-token (slow, but obviously right)."""
    ids = []
    for pretoken in gpt.pretokenize(text):
        word = [bytes([b]) for b in pretoken.encode("utf-8")]
        for left, right in tokenizer.merges:
            word = gpt.merge(word, (left, right), left + right)
        ids += [tokenizer.id_of[token] for token in word]
    return ids


def test_encode_equals_replaying_merges(tokenizer, corpus_path):
    """encode(), plain and fast, gives the ids of applying the merges one by one in the order
    they were learned."""
    with open(corpus_path, encoding="utf-8") as f:
        text = f.read(3000).replace(EOT, "") + "".join(TRICKY_TEXTS)
    replayed = encode_by_replaying_merges(tokenizer, text)
    plain = PlainTokenizer(tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens)
    assert tokenizer.encode(text) == replayed and plain.encode(text) == replayed


@pytest.mark.parametrize("specials", [[EOT, EOT * 2], [EOT * 2, EOT]], ids=["short-first",
                                                                            "long-first"])
@pytest.mark.parametrize("text, expected", [
    ("x" + EOT + "y", ["x", EOT, "y"]),
    ("x" + EOT * 2 + "y", ["x", EOT * 2, "y"]),
    (EOT * 3, [EOT * 2, EOT]),
    ("<|endoftext|", ["<", "|", "e", "n", "d", "o", "f", "t", "e", "x", "t", "|"]),
])
def test_overlapping_special_tokens_longest_wins(specials, text, expected):
    """With <|endoftext|> and its double both registered, the longer match is one token."""
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], specials)
    ids = {**{s: tokenizer.special_ids[s] for s in specials}, **{chr(b): b for b in range(128)}}
    assert tokenizer.encode(text) == [ids[piece] for piece in expected]


def test_decode_invalid_utf8_gives_replacement_character(tokenizer):
    """Bytes that are not UTF-8 decode to U+FFFD instead of raising."""
    # ids 0-255 are the bytes; "é" is C3 A9 in UTF-8, so C3 alone is half a character.
    assert tokenizer.decode([0xC3, 0xA9]) == "é"
    assert tokenizer.decode([0xC3]) == "\ufffd"
    assert tokenizer.decode([ord("a"), 0xC3, ord("b")]) == "a\ufffdb"


@pytest.mark.parametrize("bad_id", [500, 10**6, -1])
def test_decode_unknown_id_raises(tokenizer, bad_id):
    """An id outside the vocabulary is a ValueError naming the id."""
    with pytest.raises(ValueError, match=str(bad_id)):
        tokenizer.decode([ord("a"), bad_id])



@pytest.mark.parametrize("call, error, named", [
    (lambda t: t.encode(None), TypeError, "the text must be a str, got NoneType None"),
    (lambda t: t.encode(b"Hi"), TypeError, "the text must be a str, got bytes b'Hi'"),
    (lambda t: t.encode("Once\ud800 upon"), ValueError,
     "the text holds '\\ud800' at position 4, a lone surrogate"),
    (lambda t: list(t.encode_iterable(["Once", " upon", 7])), TypeError,
     "text 2 of the texts must be a str, got int 7"),
    (lambda t: list(t.encode_iterable(["Once", "\udcff"])), ValueError,
     "text 1 of the texts holds '\\udcff' at position 0"),
    (lambda t: list(gpt.decode_stream([72, 500], t)), ValueError,
     "token id 500 is not in the vocabulary"),
], ids=["none", "bytes", "surrogate", "iterable-int", "iterable-surrogate", "stream-unknown-id"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "readable"])
def test_encode_and_decode_stream_refuse_what_they_cannot_take(tokenizer, fast, call, error,
                                                                named):
    """What is not text, or holds a lone surrogate (no UTF-8 bytes), is a TypeError or a
    ValueError naming it, from the readable encoder and the fast one alike, not an error from
    deep inside them; decode_stream refuses an unknown id as decode does."""
    if not fast:
        if "encode_iterable" in inspect.getsource(call):
            pytest.skip("encode_iterable is the fast tokenizer's")
        tokenizer = PlainTokenizer(tokenizer.vocab, tokenizer.merges, [EOT])
    with pytest.raises(error) as raised:
        call(tokenizer)
    assert str(raised.value).startswith(named), raised.value


@pytest.mark.parametrize("ids", [
    [72, 105], (72, 105), iter([72, 105]), torch.tensor([72, 105]),
    torch.tensor([72, 105], dtype=torch.uint8), np.array([72, 105]),
    np.array([72, 105], dtype=np.uint16), [np.int64(72), torch.tensor(105)],
], ids=["list", "tuple", "iterator", "tensor", "uint8-tensor", "array", "uint16-array",
        "numpy-and-0d-tensor-elements"])
def test_decode_takes_lists_tensors_and_arrays(ids):
    """Ids in a list, a 1-D tensor or a numpy array of any integer type decode alike."""
    assert gpt.Tokenizer(BYTES_VOCAB, []).decode(ids) == "Hi"


@pytest.mark.parametrize("one_id", [72, np.int64(72), np.uint16(72), torch.tensor(72)],
                         ids=["int", "numpy-int64", "numpy-uint16", "0d-tensor"])
def test_decode_takes_one_id(one_id):
    """A single id, such as an element of an array, decodes to its token."""
    assert gpt.Tokenizer(BYTES_VOCAB, []).decode(one_id) == "H"


@pytest.mark.parametrize("ids, named", [
    (torch.tensor([[72, 105]]), "1-D"), (np.array([[72], [105]]), "(2, 1)"),
    (72.5, "integers"), ([72.0], "integers"), (torch.tensor([72.0]), "integers"),
    (np.array([72.0]), "integers"), ("Hi", "integers"),
], ids=["2d-tensor", "2d-array", "float", "float-in-list", "float-tensor", "float-array", "str"])
def test_decode_refuses_2d_arrays_and_floats(ids, named):
    """A 2-D array or a float is a ValueError saying what decode takes."""
    with pytest.raises(ValueError, match=re.escape(named)):
        gpt.Tokenizer(BYTES_VOCAB, []).decode(ids)


# --- save and load --------------------------------------------------------------------------------
def duplicate_token_tokenizer() -> gpt.Tokenizer:
    """BPE can build one string two ways: here b"abc" is both (ab, c) and (a, bc)."""
    vocab = {**BYTES_VOCAB, 256: b"ab", 257: b"bc", 258: b"abc", 259: b"abc",
             260: "é".encode(), 261: "é!".encode()}
    merges = [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"a", b"bc"),
              (b"\xc3", b"\xa9"), ("é".encode(), b"!")]
    return gpt.Tokenizer(vocab, merges, ["<|fin|>"])


@pytest.mark.parametrize("which", ["trained", "duplicate-tokens"])
def test_save_load_round_trip(tmp_path, tokenizer, which):
    """load(save(t)) has the same vocab, merges and special tokens, and encodes alike."""
    original = tokenizer if which == "trained" else duplicate_token_tokenizer()
    original.save(str(tmp_path / "tok"))
    loaded = gpt.Tokenizer.load(str(tmp_path / "tok"))
    assert loaded.vocab == original.vocab
    assert loaded.merges == original.merges
    assert loaded.special_tokens == original.special_tokens
    assert loaded.fingerprint() == original.fingerprint()
    text = "abc é! Once upon a time<|fin|>" + EOT + "".join(TRICKY_TEXTS)
    assert loaded.encode(text) == original.encode(text)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_tokenizer_files_take_paths(tmp_path, tokenizer, fast):
    """save, load and read_gpt2_files take a pathlib.Path as well as a str, and load gives the
    class it is called on."""
    cls = gpt.Tokenizer if fast else PlainTokenizer
    directory = tmp_path / "tok"
    cls(tokenizer.vocab, tokenizer.merges, [EOT]).save(directory)
    loaded = cls.load(directory)
    from_files = cls(*gpt.read_gpt2_files(directory / "vocab.json", directory / "merges.txt"),
                     [EOT])
    for t in (loaded, from_files):
        assert type(t) is cls and t.fingerprint() == tokenizer.fingerprint()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'none.txt'}: no such file")):
        gpt.read_gpt2_files(directory / "vocab.json", tmp_path / "none.txt")
    (directory / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match="merges.txt: every line must be two tokens"):
        cls.load(directory)


@pytest.mark.parametrize("vocab, specials, named", [
    ('{"a": Infinity}', None, "Infinity is not a JSON number"),
    ('{"a": {"b": 1}}', None, "is not an id from 0"),
    ('{"a": -1}', None, "'a': -1 is not an id from 0"),
    ('{"a": 1048576}', None, "'a': 1048576 is not an id from 0 to 1,048,575"),
    ('{"a": 1.0}', None, "is not an id"),
    ('["a", 0]', None, "is not a JSON object of tokens"),
    ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", None, "JSON nested more than"),
    (None, "[1, 2]", "special_tokens.json is not a JSON list of strings"),
    (None, '"<|endoftext|>"', "special_tokens.json is not a JSON list of strings"),
], ids=["infinite-id", "nested", "byte-id-minus-1", "huge-id", "float-id", "array", "deep",
        "int-specials", "str-specials"])
def test_tokenizer_files_with_bad_values_are_refused(tmp_path, tokenizer, vocab, specials,
                                                     named):
    """A vocab.json or special_tokens.json holding what no tokenizer file holds is one
    ValueError naming the file, not an OverflowError, RecursionError or AttributeError."""
    tokenizer.save(str(tmp_path))
    if vocab is not None:
        (tmp_path / "vocab.json").write_text(vocab)
    if specials is not None:
        (tmp_path / "special_tokens.json").write_text(specials)
    with pytest.raises(ValueError) as error:
        gpt.Tokenizer.load(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message and named in message and "\n" not in message, message


def test_fingerprint_is_the_sha256_of_the_saved_files(tmp_path, tokenizer, gpt2_tokenizer):
    """fingerprint() hashes exactly the bytes save() writes, so any change to the vocabulary,
    the merges or the special tokens changes it; a GPT-2 tokenizer loaded from OpenAI's files
    keeps its fingerprint through save and load."""
    tokenizer.save(str(tmp_path / "tok"))
    digest = hashlib.sha256()
    for name in ["vocab.json", "merges.txt", "special_tokens.json"]:
        data = (tmp_path / "tok" / name).read_bytes()
        digest.update(f"{name} {len(data)}\n".encode() + data)
    assert tokenizer.fingerprint() == digest.hexdigest()
    fewer_merges = gpt.Tokenizer(tokenizer.vocab, tokenizer.merges[:-1], [EOT])
    more_specials = gpt.Tokenizer(tokenizer.vocab, tokenizer.merges, [EOT, "<|x|>"])
    fingerprints = {t.fingerprint() for t in (tokenizer, fewer_merges, more_specials)}
    assert len(fingerprints) == 3
    gpt2_tokenizer.save(str(tmp_path / "gpt2"))
    assert (gpt.Tokenizer.load(str(tmp_path / "gpt2")).fingerprint()
            == gpt2_tokenizer.fingerprint())


def test_saved_files_use_gpt2_spelling(tmp_path, tokenizer):
    """vocab.json and merges.txt are GPT-2-style text (Ġ for space), and nothing else is saved."""
    tokenizer.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["merges.txt", "special_tokens.json", "vocab.json"]
    spell = gpt.bytes_to_unicode()
    spelled = lambda token: "".join(spell[b] for b in token)
    vocab_json = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab_json["Ġthe"] == tokenizer.id_of[b" the"]
    assert vocab_json == {spelled(token): i for i, token in tokenizer.vocab.items()}
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert lines[1:] == [f"{spelled(a)} {spelled(b)}" for a, b in tokenizer.merges]
    specials = json.loads((tmp_path / "special_tokens.json").read_text(encoding="utf-8"))
    assert specials == [EOT]


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    """OpenAI's GPT-2 tokenizer files, with <|endoftext|> registered as special."""
    loaded = gpt.Tokenizer.load(GPT2_DIR)  # the directory has no special_tokens.json
    return gpt.Tokenizer(loaded.vocab, loaded.merges, [EOT])


# GPT-2's ids as published in tiktoken's own tests (tests/test_encoding.py), and the well-known
# "Hello" 15496, "," 11. The zeros show that BPE is not greedy longest-match: 9 zeros are
# 6 + 3, though an 8-zero token exists.
@pytest.mark.parametrize("text, expected", [
    ("hello world", [31373, 995]),
    ("hello <|endoftext|>", [31373, 220, 50256]),
    ("Hello, world", [15496, 11, 995]),
    ("0", [15]),
    ("00000000", [8269]),
    ("000000000", [10535, 830]),
    ("0000000000000000", [25645]),
    ("00000000000000000", [8269, 10535, 830]),
])
def test_gpt2_exact_ids(gpt2_tokenizer, text, expected):
    """Given GPT-2's vocab.json and merges.txt, encode() gives GPT-2's own token ids."""
    assert gpt2_tokenizer.encode(text) == expected
    assert gpt2_tokenizer.decode(expected) == text


# --- Other byte-level BPE tokenizers: Llama 3's, Qwen's and SmolLM's settings -------------------
# The published pre-tokenizer patterns of Llama 3 (meta-llama/Meta-Llama-3-8B's tokenizer.json)
# and Qwen2 (transformers' tokenization_qwen2.py, PRETOKENIZE_REGEX), which Qwen3 keeps.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                  r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Each layout's Tokenizer settings, as read_hf_tokenizer gives them.
LAYOUTS = {"gpt2": {},
           "smollm": {"split_patterns": [r"\p{N}", gpt.GPT2_PATTERN]},
           "llama3": {"split_patterns": [LLAMA3_PATTERN], "ignore_merges": True},
           "qwen": {"split_patterns": [QWEN2_PATTERN], "normalizer": "NFC"}}
HARD_TEXTS = TRICKY_TEXTS + [
    "def f(x):\n    return {'a': [1, 2]}  # note\r\n\r\n\tif x >= 1234567:\n        pass\n",
    '<div class="a"><p>Hi &amp; bye</p></div>\n<br/>\n\n',
    "1234567890 3.14159 -42 1,000,000 ½ ² Ⅻ ٣٤٥ 𝟘𝟙",
    "e\u0301 cafe\u0301 A\u030a \u212b \u037e ﬁ Ǆ ſ K",  # NFC composes and replaces these
    "I'M SHE'LL we'VE 'S ’s",
    "trailing spaces   \n  \n",
]


def with_layout(tokenizer: gpt.Tokenizer, layout: str, cls=None) -> gpt.Tokenizer:
    """The same vocabulary, merges and special tokens with a layout's settings."""
    return (cls or gpt.Tokenizer)(tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens,
                                  **LAYOUTS[layout])


@pytest.mark.parametrize("text, pattern, expected", [
    ("ab12", r"\p{N}", ["ab", "1", "2"]),
    ("12ab", r"\p{N}+", ["12", "ab"]),
    ("", r"\p{N}", []),
    ("a b", r"x", ["a b"]),
])
def test_split_isolated_hand_examples(text, pattern, expected):
    """Matches and the text between them both become pieces, none of them empty."""
    assert gpt.split_isolated(text, regex.compile(pattern)) == expected
    assert gpt.READABLE_FORMS["split_isolated"](text, regex.compile(pattern)) == expected


@pytest.mark.parametrize("layout, text, expected", [
    ("gpt2", "x 1234 y's", ["x", " 1234", " y", "'s"]),
    ("smollm", "x 1234 y's", ["x", " ", "1", "2", "3", "4", " y", "'s"]),
    ("llama3", "x 1234567 Y'S\n\n", ["x", " ", "123", "456", "7", " Y", "'S", "\n\n"]),
    ("qwen", "x 123 (y)\n", ["x", " ", "1", "2", "3", " (", "y", ")\n"]),
])
def test_pretokenize_with_each_layouts_patterns(layout, text, expected):
    """Each pattern cuts the pieces of the one before (worked out by hand): SmolLM's digits one
    by one, then GPT-2's pattern; Llama 3's runs of three digits; Qwen's single digits."""
    patterns = [regex.compile(p) for p in LAYOUTS[layout].get("split_patterns",
                                                              [gpt.GPT2_PATTERN])]
    assert gpt.pretokenize(text, patterns) == expected


def test_fast_split_isolated_equals_the_readable_one():
    """The findall shortcut gives split_isolated's pieces, for patterns whose matches cover
    every text and for those that leave gaps (or match nothing but the empty string)."""
    rng = random.Random(0)
    chars = "ab Z1 2\n\t.,'é日🙂\u0301"
    for pattern in [gpt.GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, r"\p{N}", r"x*", r"(a)b"]:
        compiled = regex.compile(pattern)
        for _ in range(300):
            text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 12)))
            assert gpt.fast_split_isolated(text, compiled) == gpt.READABLE_FORMS["split_isolated"](
                text, compiled), (pattern, text)


@pytest.mark.parametrize("form", ["readable", "fast"])
def test_encode_merges_the_leftmost_occurrence_first(form):
    """A merge list may use a token before the merge that makes it (Llama 3's, converted from
    tiktoken's ranks, does): "abab" with merges (ab, a), then (a, b) merges the first "ab",
    then "aba" at once, as `tokenizers` does; merging both "ab"s first would give [ab, ab]."""
    vocab = {**BYTES_VOCAB, 256: b"ab", 257: b"aba"}
    cls = PlainTokenizer if form == "readable" else gpt.FastTokenizer
    tokenizer = cls(vocab, [(b"ab", b"a"), (b"a", b"b")])
    assert tokenizer.encode("abab") == [257, ord("b")]


@pytest.mark.parametrize("form", ["readable", "fast"])
def test_ignore_merges_takes_a_pretoken_that_is_a_token_whole(form):
    """With ignore_merges (Llama 3), a pre-token found in the vocabulary is that one token, even
    where the merges would build it otherwise; without, the merges decide."""
    vocab = {**BYTES_VOCAB, 256: b"ab", 257: b"bc", 258: b"abc"}
    merges = [(b"a", b"b"), (b"b", b"c"), (b"a", b"bc")]
    cls = PlainTokenizer if form == "readable" else gpt.FastTokenizer
    assert cls(vocab, merges).encode("abc abc") == [256, 99, 32, 256, 99]
    assert cls(vocab, merges, ignore_merges=True).encode("abc abc") == [258, 32, 256, 99]


@pytest.mark.parametrize("form", ["readable", "fast"])
def test_nfc_normalizer_composes_the_text_between_special_tokens(form):
    """With the NFC normalizer (Qwen), "e" + a combining accent encodes as "é" does; special
    tokens are cut out first and matched as written."""
    cls = PlainTokenizer if form == "readable" else gpt.FastTokenizer
    tokenizer = cls(BYTES_VOCAB, [], [EOT], normalizer="NFC")
    assert tokenizer.encode(f"cafe\u0301{EOT}A\u030a") == tokenizer.encode(f"café{EOT}Å")
    assert cls(BYTES_VOCAB, []).encode("e\u0301") == list("e\u0301".encode())


def test_other_settings_are_saved_and_fingerprinted_ours_unchanged(tmp_path, tokenizer):
    """A tokenizer with GPT-2's settings (ours) saves the three files it always did; another
    layout adds tokenizer_settings.json, which its fingerprint covers and load() reads back."""
    assert tokenizer.settings() == {}
    assert set(tokenizer.saved_files()) == {"vocab.json", "merges.txt", "special_tokens.json"}
    fingerprints = {tokenizer.fingerprint()}
    for layout in ["smollm", "llama3", "qwen"]:
        other = with_layout(tokenizer, layout)
        assert other.settings() == LAYOUTS[layout]
        fingerprints.add(other.fingerprint())
        other.save(tmp_path / layout)
        loaded = gpt.Tokenizer.load(tmp_path / layout)
        assert loaded.settings() == other.settings()
        assert loaded.fingerprint() == other.fingerprint()
    assert len(fingerprints) == 4


@pytest.mark.parametrize("settings, named", [
    ({"normalizer": "NFKC"}, "NFKC"),
    ({"split_patterns": "\\p{N}"}, "split_patterns"),
    ({"lowercase": True}, "lowercase"),
    ({"ignore_merges": 1}, "ignore_merges"),
    (["NFC"], "NFC"),
])
def test_bad_tokenizer_settings_file_is_refused(tmp_path, tokenizer, settings, named):
    """A tokenizer_settings.json with another setting, or one of another kind, is one line
    naming the file and what it holds; a pattern that is no regular expression too."""
    tokenizer.save(tmp_path)
    (tmp_path / "tokenizer_settings.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=f"tokenizer_settings.json.*{re.escape(named)}"):
        gpt.Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_settings.json").write_text(json.dumps({"split_patterns": ["(x"]}))
    with pytest.raises(ValueError, match="not a regular expression"):
        gpt.Tokenizer.load(tmp_path)


# ==================================================================================================
# §2 Data
# ==================================================================================================

@pytest.mark.parametrize("vocab_size, dtype", [
    (256, np.uint16), (65_536, np.uint16), (65_537, np.uint32), (100_000, np.uint32)])
def test_token_dtype(vocab_size, dtype):
    """uint16 while every id fits in 16 bits (ids up to 65,535), uint32 beyond."""
    assert gpt.token_dtype(vocab_size) == np.dtype(dtype)


# --- batches --------------------------------------------------------------------------------------
def test_get_batch_shapes_and_shifted_targets():
    """x and y are (B, T) int64 on the device; each is a window of the data, y one token later."""
    torch.manual_seed(0)
    data = np.arange(1000, dtype=np.uint16)  # token i is i, so a window names its own start
    x, y = gpt.get_batch(data, batch_size=8, context_length=16, device="cpu")
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert x.device == y.device == torch.device("cpu")
    assert torch.equal(y[:, :-1], x[:, 1:])
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = row_x[0]
        assert row_x == data[start:start + 16].tolist()
        assert row_y == data[start + 1:start + 17].tolist()


def test_get_batch_draws_every_valid_start_and_no_other():
    """Over many draws, every start 0 .. N-T-1 occurs and none beyond (y must stay in the data)."""
    num_tokens, context_length = 20, 5
    x, _ = gpt.get_batch(np.arange(num_tokens), 3000, context_length, "cpu",
                         generator=torch.Generator().manual_seed(0))
    assert set(x[:, 0].tolist()) == set(range(num_tokens - context_length))


def test_get_batch_from_uint16_memmap(tmp_path):
    """Batches read from a memory-mapped uint16 token file hold the file's ids as int64."""
    torch.manual_seed(0)
    data = (65535 - np.arange(500)).astype(np.uint16)  # ids above 32,767: not read as int16
    data.tofile(tmp_path / "tokens.bin")
    tokens = np.memmap(tmp_path / "tokens.bin", dtype=np.uint16, mode="r")
    x, y = gpt.get_batch(tokens, 4, 8, "cpu")
    assert x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = 65535 - row_x[0]
        assert row_x == data[start:start + 8].tolist()
        assert row_y == data[start + 1:start + 9].tolist()


@pytest.mark.parametrize("num_tokens", [3, 10])
def test_get_batch_too_short_data_raises(num_tokens):
    """Data of at most context_length tokens has no window with a target: ValueError naming it."""
    with pytest.raises(ValueError, match=rf"\b{num_tokens}\b"):
        gpt.get_batch(np.arange(num_tokens), 2, 10, "cpu")


def test_get_batch_seeded_generator_is_reproducible():
    """The same seed draws the same batch; another seed draws another."""
    data = np.arange(10_000)
    draw = lambda seed: gpt.get_batch(data, 4, 8, "cpu", torch.Generator().manual_seed(seed))
    (x1, y1), (x2, y2), (x3, _) = draw(7), draw(7), draw(8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


# ==================================================================================================
# §3 Model
# ==================================================================================================

def tiny_config(**overrides) -> gpt.ModelConfig:
    """A model small enough to train in a fraction of a second."""
    sizes = dict(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=4, d_ff=48)
    return gpt.ModelConfig(**{**sizes, **overrides})


def train_on_batch(model, optimizer, x, y, steps: int) -> list[float]:
    """Take `steps` optimizer steps on one fixed batch; the losses before each step."""
    losses = []
    for _ in range(steps):
        loss = gpt.cross_entropy(model(x), y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


def readable_model(config: gpt.ModelConfig) -> gpt.TransformerLM:
    """A model built from §3's readable forms, as `train --readable` builds it."""
    gpt.use_fast_twins(False)
    try:
        return gpt.TransformerLM(config)
    finally:
        gpt.use_fast_twins(True)


def truncated_normal_std(std: float, cut: float = 3.0) -> float:
    """The standard deviation of N(0, std^2) cut at +-cut std: a little below std."""
    pdf = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(cut / math.sqrt(2))
    return std * math.sqrt(1 - 2 * cut * pdf / mass)



# --- Linear and Embedding -------------------------------------------------------------------------
def test_linear_equals_matmul_and_f_linear():
    """Linear(d_in, d_out) has a (d_out, d_in) weight and computes x @ W^T, as F.linear does."""
    torch.manual_seed(0)
    layer = gpt.Linear(6, 10)
    assert layer.weight.shape == (10, 6)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_linear_init_is_glorot_truncated_at_3_std():
    """Weights have std sqrt(2 / (d_in + d_out)), cut at 3 std."""
    torch.manual_seed(0)
    d_in, d_out = 300, 700
    weight = gpt.Linear(d_in, d_out).weight.detach()
    std = math.sqrt(2 / (d_in + d_out))
    assert weight.std().item() == pytest.approx(truncated_normal_std(std), rel=0.01)
    assert weight.abs().max().item() <= 3 * std
    assert weight.abs().max().item() > 2.9 * std  # cut at 3 std, not closer in


@pytest.mark.parametrize("form", ["readable", "fast"])
def test_embedding_equals_f_embedding_with_gradients(form):
    """Embedding and its fast twin look up rows as F.embedding does, and sum the gradients of
    repeated ids."""
    torch.manual_seed(0)
    forms = {"readable": gpt.READABLE_FORMS["Embedding"], "fast": gpt.FastEmbedding}
    embedding = forms[form](10, 4)
    ids = torch.tensor([[1, 2, 1, 7], [3, 1, 2, 1]])
    reference = embedding.weight.detach().clone().requires_grad_()
    out, expected = embedding(ids), F.embedding(ids, reference)
    assert out.shape == (2, 4, 4)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn(2, 4, 4)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(embedding.weight.grad, reference.grad)


def test_embedding_init_is_unit_normal_truncated_at_3():
    """Embedding rows start as N(0, 1) cut at +-3."""
    torch.manual_seed(0)
    weight = gpt.Embedding(1000, 200).weight.detach()
    assert weight.std().item() == pytest.approx(truncated_normal_std(1.0), rel=0.01)
    assert 2.9 < weight.abs().max().item() <= 3.0



# --- RMSNorm --------------------------------------------------------------------------------------
RMSNORMS = {"readable": gpt.READABLE_FORMS["RMSNorm"], "fast": gpt.FastRMSNorm}


@pytest.mark.parametrize("form", RMSNORMS)
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_rmsnorm_equals_torch_rmsnorm(eps, form):
    """RMSNorm's output and its gradients for input and gain equal torch.nn.RMSNorm's, in the
    readable form and the fast twin."""
    torch.manual_seed(0)
    norm, reference = RMSNORMS[form](16, eps), torch.nn.RMSNorm(16, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
        reference.weight.copy_(norm.weight)
    x = (0.3 * torch.randn(2, 5, 16)).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    out, expected = norm(x), reference(x_ref)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn(2, 5, 16)
    out.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad)


@pytest.mark.parametrize("form", RMSNORMS)
def test_rmsnorm_bf16_input_gives_bf16_close_to_float32(form):
    """A bf16 input gives a bf16 output (and input gradient) close to the float32 result."""
    torch.manual_seed(0)
    norm = RMSNORMS[form](64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(4, 64).bfloat16().requires_grad_()
    x32 = x.detach().float().requires_grad_()
    out, expected = norm(x), F.rms_norm(x32, (64,), norm.weight.detach(), eps=1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    upstream = torch.randn(4, 64)
    out.backward(upstream.bfloat16())
    expected.backward(upstream.bfloat16().float())
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=2e-2, rtol=2e-2)


def test_rmsnorm_function_gradcheck():
    """The hand-derived backward of FastRMSNormFunction matches finite differences in float64."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    gain = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: gpt.FastRMSNormFunction.apply(x, g, 1e-5),
                                    (x, gain))



# --- rotary position embedding --------------------------------------------------------------------
def rotate_pairs_by_hand(x: list[float], position: int, theta: float) -> list[float]:
    """RoPE by its definition: pair (x[2i], x[2i+1]) turns by position * theta^(-2i/D)."""
    out = []
    for i in range(len(x) // 2):
        angle = position * theta ** (-2 * i / len(x))
        a, b = x[2 * i], x[2 * i + 1]
        cos, sin = math.cos(angle), math.sin(angle)
        out += [a * cos - b * sin, a * sin + b * cos]
    return out


def test_rope_rotates_adjacent_pairs():
    """Dimensions (0,1), (2,3), ... turn as 2-D vectors, by the angles of a hand-written loop."""
    torch.manual_seed(0)
    rope = gpt.RotaryEmbedding(theta=100.0, d_k=6, max_seq_len=8)
    x = torch.randn(2, 5, 6)  # (B, T, D)
    positions = torch.tensor([0, 1, 2, 5, 7])
    out = rope(x, positions)
    for b in range(2):
        for t, position in enumerate(positions.tolist()):
            expected = rotate_pairs_by_hand(x[b, t].tolist(), position, 100.0)
            torch.testing.assert_close(out[b, t], torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_rope_keeps_norms_and_position_0_is_identity():
    """A rotation keeps every vector's length; at position 0 nothing turns."""
    torch.manual_seed(0)
    rope = gpt.RotaryEmbedding(theta=10000.0, d_k=16, max_seq_len=32)
    x = torch.randn(3, 2, 32, 16)  # (B, H, T, D)
    out = rope(x, torch.arange(32))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :], atol=0, rtol=0)


@pytest.mark.parametrize("m, n, shift", [(3, 1, 10), (0, 0, 25), (2, 9, 40), (12, 4, 1)])
def test_rope_scores_depend_on_relative_position_only(m, n, shift):
    """q at position m and k at n score as q at m+s and k at n+s: only m - n counts."""
    torch.manual_seed(0)
    rope = gpt.RotaryEmbedding(theta=10000.0, d_k=16, max_seq_len=64)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    score = lambda i, j: (rope(q, torch.tensor([i])) @ rope(k, torch.tensor([j])).T).item()
    assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
    # ... and the offset does matter: another one gives another score.
    assert abs(score(m + 1, n) - score(m, n)) > 1e-3



# --- attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0.0, 1000.0], ids=["plain", "shifted-by-1000"])
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_equals_torch_softmax(shift, dim):
    """softmax equals torch.softmax, and stays finite for inputs around +1000."""
    torch.manual_seed(0)
    x = 5 * torch.randn(2, 3, 9) + shift  # exp(1000) overflows float32: the max must come off
    out = gpt.softmax(x, dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.softmax(x, dim))


@pytest.mark.parametrize("use_mask", [False, True], ids=["no-mask", "mask"])
def test_attention_equals_torch_sdpa(use_mask):
    """The readable attention equals F.scaled_dot_product_attention (mask True = may attend)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = None
    if use_mask:
        mask = torch.rand(5, 7) < 0.5
        mask[:, 0] = True  # every query attends to something
    torch.testing.assert_close(gpt.scaled_dot_product_attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("causal, T, S, block", [
    (True, 70, 70, 16), (True, 64, 64, 64), (True, 5, 5, 1), (True, 33, 33, 8),
    (False, 70, 70, 16), (False, 9, 30, 4), (False, 1, 17, 64)])
def test_tiled_attention_equals_the_plain_attention(causal, T, S, block):
    """Block by block with the online softmax gives the plain attention's result, whether the
    blocks divide T or not; with causal=True, exactly the causal mask."""
    torch.manual_seed(0)
    # Scores of spread-out size, so a later block often raises the running max.
    q, k, v = 3 * torch.randn(2, 3, T, 8), 3 * torch.randn(2, 3, S, 8), torch.randn(2, 3, S, 8)
    mask = gpt.sliding_causal_mask(T, T) if causal else None
    torch.testing.assert_close(gpt.tiled_attention(q, k, v, causal=causal, block=block),
                               gpt.scaled_dot_product_attention(q, k, v, mask))


@pytest.mark.parametrize("rows", [2, 200], ids=["separate-products", "one-stacked-product"])
def test_fast_project_equals_separate_projections(rows):
    """fast_project(x, (Wq, Wk, Wv)) is [x Wq^T, x Wk^T, x Wv^T] side by side, on both of its
    paths."""
    torch.manual_seed(0)
    x = torch.randn(rows, 16)
    weights = tuple(torch.randn(d_out, 16) for d_out in (16, 8, 24))
    expected = torch.cat([x @ w.T for w in weights], dim=-1)
    torch.testing.assert_close(gpt.fast_project(x, weights), expected)


# The attention of the models `import` reads: grouped-query attention (2 key/value heads for 4
# query heads), qk-norm, and a head width D = 6 of its own (H * D = 24, not C = 32).
IMPORTED_ATTENTION = dict(num_kv_heads=2, head_dim=6, qk_norm_eps=1e-6)


@pytest.mark.parametrize("kind", [{}, IMPORTED_ATTENTION], ids=["ours", "gqa-qknorm-headdim"])
@pytest.mark.parametrize("context_length", [None, 16, 4], ids=["no-window", "causal", "window"])
@pytest.mark.parametrize("use_rope", [True, False], ids=["rope", "nope"])
def test_fast_attention_equals_readable_attention(use_rope, context_length, kind):
    """FastMultiHeadSelfAttention (one stacked projection, F.scaled_dot_product_attention)
    equals the readable attention with the same weights, in output and gradients, whether each
    query sees all its past or a sliding window of it, and with GQA, qk-norm and a head width
    of its own."""
    torch.manual_seed(0)
    rope = gpt.RotaryEmbedding(10000.0, kind.get("head_dim", 8), 16) if use_rope else None
    readable = gpt.READABLE_FORMS["MultiHeadSelfAttention"](32, 4, rope, context_length, **kind)
    fast = gpt.FastMultiHeadSelfAttention(32, 4, rope, context_length, **kind)
    fast.load_state_dict(readable.state_dict())
    x = torch.randn(2, 11, 32, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    out, out_fast = readable(x), fast(x_fast)
    torch.testing.assert_close(out_fast, out)
    out.square().sum().backward()
    out_fast.square().sum().backward()
    torch.testing.assert_close(x_fast.grad, x.grad)


@pytest.mark.parametrize("form", ["readable", "fast"])
def test_grouped_query_attention_equals_attention_with_repeated_heads(form):
    """GQA with 2 key/value heads for 4 query heads computes what plain attention computes
    when each key/value head's rows are copied for both query heads of its group."""
    torch.manual_seed(0)
    rope = gpt.RotaryEmbedding(10000.0, 8, 16)
    attention = gpt.READABLE_FORMS["MultiHeadSelfAttention"] if form == "readable" else \
        gpt.FastMultiHeadSelfAttention
    gqa, plain = attention(32, 4, rope, num_kv_heads=2), attention(32, 4, rope)
    state = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight"):  # (KV*D, C) -> (H*D, C): heads 0 0 1 1
        state[name] = state[name].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    plain.load_state_dict(state)
    x = torch.randn(2, 11, 32)
    torch.testing.assert_close(gqa(x), plain(x))
    assert gqa.k_proj.weight.shape == (16, 32)  # half the keys and values of plain's


def test_qk_norm_is_rms_norm_of_each_heads_query_and_key():
    """With qk-norm, each head's query and key (before RoPE) is torch's F.rms_norm of its D
    dimensions, with its own gain, shared by the heads."""
    torch.manual_seed(0)
    attn = gpt.READABLE_FORMS["MultiHeadSelfAttention"](32, 4, None, **IMPORTED_ATTENTION)
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32)
    q, k, _ = attn.queries_keys_values(x, 0)  # (B, H, T, D), (B, KV, T, D)
    for got, proj, norm, heads in ((q, attn.q_proj, attn.q_norm, 4),
                                   (k, attn.k_proj, attn.k_norm, 2)):
        raw = (x @ proj.weight.T).view(2, 5, heads, 6).transpose(1, 2)
        torch.testing.assert_close(got, F.rms_norm(raw, (6,), norm.weight, eps=1e-6))


def test_llama3_frequencies_keep_fast_pairs_slow_down_slow_ones_and_blend_between():
    """Llama 3's scaling (factor 8, low 1, high 4, 8,192 positions, theta 500,000, D = 128):
    pairs turning more than 4 times over 8,192 positions keep their speed, those turning less
    than once turn 8 times slower, those between lie between, ordered as before; factor 1
    changes nothing."""
    inv_freq = 500000.0 ** (-torch.arange(0, 128, 2).float() / 128)  # (64,)
    scaled = gpt.llama3_frequencies(inv_freq, 8.0, 1.0, 4.0, 8192)
    turns = 8192 * inv_freq / (2 * math.pi)
    fast, slow = turns > 4, turns < 1
    assert fast.sum() > 10 and slow.sum() > 10 and (~fast & ~slow).sum() > 2
    assert torch.equal(scaled[fast], inv_freq[fast])
    torch.testing.assert_close(scaled[slow], inv_freq[slow] / 8, rtol=1e-6, atol=0)
    between = ~fast & ~slow
    assert ((scaled[between] < inv_freq[between]) & (scaled[between] > inv_freq[between] / 8)).all()
    assert (scaled.diff() < 0).all()  # still slower pair after pair
    torch.testing.assert_close(gpt.llama3_frequencies(inv_freq, 1.0, 1.0, 4.0, 8192), inv_freq)


def test_llama3_frequencies_equal_transformers():
    """Our Llama 3 RoPE frequencies are transformers' own, for the frequencies of Llama 3.2."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)
    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32,
                                      rope_parameters=rope, max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    model = gpt.TransformerLM(tiny_config(d_model=2048, num_heads=32, num_layers=1, d_ff=8,
                                          rope_theta=500000.0, rope_factor=32.0,
                                          rope_original_context=8192))
    torch.testing.assert_close(model.rope.inv_freq, theirs, rtol=1e-6, atol=0)


def test_rope_tables_grow_with_the_positions_met():
    """A model of 131,072 positions builds RoPE tables for the positions it has read, not for
    its whole context (64 MB at D = 64)."""
    model = gpt.TransformerLM(tiny_config(context_length=131072))
    model(torch.zeros(1, 10, dtype=torch.long))
    assert 10 <= len(model.rope.cos) < 100


@pytest.mark.parametrize("activation", [gpt.silu, gpt.gelu], ids=["swiglu", "geglu"])
def test_fast_swiglu_equals_readable_swiglu(activation):
    """FastSwiGLU (w1 and w3 in one product) equals the readable SwiGLU with the same weights."""
    torch.manual_seed(0)
    readable = gpt.READABLE_FORMS["SwiGLU"](16, 40, activation)
    fast = gpt.FastSwiGLU(16, 40, activation)
    fast.load_state_dict(readable.state_dict())
    x = torch.randn(4, 50, 16)  # 200 rows: the stacked product
    torch.testing.assert_close(fast(x), readable(x))


@pytest.mark.parametrize("form", ["fast", "readable"])
def test_model_is_causal(form):
    """Changing token t leaves the logits before t unchanged and changes those from t on."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config()) if form == "fast" else readable_model(tiny_config())
    tokens = torch.randint(0, 64, (2, 12))
    changed = tokens.clone()
    changed[:, 5] = (tokens[:, 5] + 1) % 64
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :5], before[:, :5], atol=1e-6, rtol=1e-6)
    assert ((after[:, 5:] - before[:, 5:]).abs().amax(dim=-1) > 1e-4).all()



# --- feed-forward ---------------------------------------------------------------------------------
def test_silu_and_gelu_equal_their_definitions():
    """silu(x) = x * sigmoid(x); gelu equals F.gelu (the exact, erf-based one)."""
    x = torch.linspace(-8, 8, 101)
    torch.testing.assert_close(gpt.silu(x), x * torch.sigmoid(x))
    torch.testing.assert_close(gpt.gelu(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    torch.testing.assert_close(gpt.gelu(x), F.gelu(x))


@pytest.mark.parametrize("activation, reference", [(gpt.silu, F.silu), (gpt.gelu, F.gelu)],
                         ids=["swiglu", "geglu"])
def test_swiglu_equals_its_formula(activation, reference):
    """SwiGLU(x) = w2(act(w1 x) * w3 x), written out with the module's own weights."""
    torch.manual_seed(0)
    ffn = gpt.SwiGLU(16, 40, activation)
    x = torch.randn(2, 3, 16)
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    assert w1.shape == w3.shape == (40, 16) and w2.shape == (16, 40)
    expected = F.linear(reference(F.linear(x, w1)) * F.linear(x, w3), w2)
    torch.testing.assert_close(ffn(x), expected)


FFN_FORMULAS = {
    "swiglu": lambda x, f: f.w2(F.silu(f.w1(x)) * f.w3(x)),
    "geglu": lambda x, f: f.w2(F.gelu(f.w1(x)) * f.w3(x)),
    "silu": lambda x, f: f.w2(F.silu(f.w1(x))),
    "gelu": lambda x, f: f.w2(F.gelu(f.w1(x))),
}


@pytest.mark.parametrize("ffn_kind", FFN_FORMULAS)
def test_model_feed_forward_kinds_compute_their_formulas(ffn_kind):
    """Each ffn_kind builds the feed-forward of its name: gated or plain, silu or gelu."""
    torch.manual_seed(0)
    ffn = gpt.TransformerLM(tiny_config(ffn_kind=ffn_kind)).layers[0].ffn
    x = torch.randn(2, 3, 32)
    torch.testing.assert_close(ffn(x), FFN_FORMULAS[ffn_kind](x, ffn))



# --- the whole model ------------------------------------------------------------------------------
def test_model_logits_shape_and_initial_loss():
    """Logits are (B, T, V), and at initialisation the loss on random tokens is close to ln V."""
    torch.manual_seed(0)
    config = tiny_config(vocab_size=256, d_model=64)
    model = gpt.TransformerLM(config)
    tokens = torch.randint(0, 256, (8, 16))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (8, 16, 256)
    loss = gpt.cross_entropy(logits[:, :-1], tokens[:, 1:]).item()
    assert abs(loss - math.log(256)) < 0.5


def test_model_state_dict_has_cs336_names():
    """The state dict's keys are exactly CS336's names, so its reference weights load."""
    model = gpt.TransformerLM(tiny_config(num_layers=2))
    per_layer = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                 "attn.output_proj.weight", "ln1.weight", "ffn.w1.weight", "ffn.w2.weight",
                 "ffn.w3.weight", "ln2.weight"]
    expected = {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"}
    expected |= {f"layers.{i}.{name}" for i in range(2) for name in per_layer}
    assert set(model.state_dict()) == expected


@pytest.mark.parametrize("overrides", [{}, dict(norm_position="post", ffn_kind="geglu")],
                         ids=["default", "post-norm-geglu"])
def test_readable_and_fast_models_share_checkpoints_and_train_alike(overrides):
    """A readable and a fast model of one seed start with the same state dict (same keys and
    values; each loads the other's), and three training steps give the same losses: the
    readable ones with every readable form of §1-§7, as under --readable."""
    config = tiny_config(**overrides)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    losses, states = {}, {}
    for form in ("readable", "fast"):
        torch.manual_seed(0)
        gpt.use_fast_twins(form == "fast")
        try:
            model = gpt.TransformerLM(config)
            states[form] = {name: t.clone() for name, t in model.state_dict().items()}
            losses[form] = train_on_batch(model, gpt.AdamW(model.parameters(), lr=3e-3),
                                          tokens[:, :-1], tokens[:, 1:], steps=3)
        finally:
            gpt.use_fast_twins(True)
    readable_state, fast_state = states["readable"], states["fast"]
    assert readable_state.keys() == fast_state.keys()
    assert all(torch.equal(readable_state[name], fast_state[name]) for name in fast_state)
    readable_model(config).load_state_dict(fast_state)
    gpt.TransformerLM(config).load_state_dict(readable_state)
    assert losses["readable"] == pytest.approx(losses["fast"], rel=1e-5)
    assert losses["fast"][-1] < losses["fast"][0] - 0.5  # it did train


def test_readable_model_runs_no_fused_kernel_and_no_autograd_function(monkeypatch):
    """The readable model's forward and backward call neither F.scaled_dot_product_attention nor
    FastRMSNormFunction, and hold no fast twin; the fast model calls both."""
    torch.manual_seed(0)
    readable, fast = readable_model(tiny_config()), gpt.TransformerLM(tiny_config())
    fast_classes = tuple(c for c in gpt.FAST_TWINS.values() if isinstance(c, type))
    assert not any(isinstance(m, fast_classes) for m in readable.modules())
    called = []
    sdpa, rms_apply = F.scaled_dot_product_attention, gpt.FastRMSNormFunction.apply
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: called.append("sdpa") or sdpa(*a, **k))
    monkeypatch.setattr(gpt.FastRMSNormFunction, "apply",
                        lambda *a: called.append("rmsnorm") or rms_apply(*a))
    tokens = torch.randint(0, 64, (2, 12))
    readable(tokens).sum().backward()
    assert called == []
    fast(tokens).sum().backward()
    assert {"sdpa", "rmsnorm"} <= set(called)


@pytest.mark.parametrize("overrides, named", [
    (dict(d_model=30, num_heads=4), ["30", "4"]),
    (dict(d_model=24, num_heads=8), ["24", "8", "3"]),  # head width 3: RoPE needs pairs
    (dict(vocab_size=0), ["vocab_size", "0"]),
    (dict(context_length=-5), ["context_length", "-5"]),
    (dict(d_model=0), ["d_model", "0"]),
    (dict(num_layers=0), ["num_layers", "0"]),
    (dict(num_heads=-1), ["num_heads", "-1"]),
    (dict(d_ff=0), ["d_ff", "0"]),
    (dict(ffn_kind="swish"), ["ffn_kind", "swish"]),
    (dict(norm_position="middle"), ["norm_position", "middle"]),
    (dict(position_encoding="alibi"), ["position_encoding", "alibi"]),
    (dict(dropout=1.0), ["dropout", "1.0"]),
    (dict(dropout=-0.1), ["dropout", "-0.1"]),
    (dict(tie_init="embedding"), ["tie_init", "embedding", "tie_embeddings"]),
    (dict(use_norm=False, norm_position="post"), ["post", "use_norm"]),
    (dict(num_kv_heads=3), ["num_heads 4", "num_kv_heads 3"]),
    (dict(num_kv_heads=0), ["num_kv_heads", "0"]),
    (dict(head_dim=5), ["head width 5", "even"]),
    (dict(rope_factor=0.5), ["rope_factor", "0.5"]),
    (dict(rope_factor=8.0, rope_low_freq=4.0, rope_high_freq=1.0), ["rope_low_freq", "4.0"]),
], ids=["not-divisible", "odd-head-width", "vocab_size", "context_length", "d_model",
        "num_layers", "num_heads", "d_ff", "ffn_kind", "norm_position", "position_encoding",
        "dropout-1", "dropout-negative", "tie-init-untied", "post-norm-without-norm",
        "kv-heads-uneven", "kv-heads-zero", "odd-head-dim", "rope-factor-below-1",
        "rope-blend-reversed"])
def test_model_config_rejects_bad_values(overrides, named):
    """A bad architecture is a ValueError whose message names the bad values."""
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    for text in named:
        assert text in str(error.value)


def test_model_config_odd_head_width_allowed_without_rope():
    """An odd head width is fine when there is no RoPE to rotate pairs."""
    config = tiny_config(d_model=24, num_heads=8, position_encoding="nope")
    assert config.head_dim == 3
    assert gpt.TransformerLM(config)(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 64)


def expected_parameter_count(config: gpt.ModelConfig) -> int:
    """The parameter count worked out from the config (RoPE's tables are no parameters)."""
    V, C, d_ff = config.vocab_size, config.d_model, config.d_ff
    gated = config.ffn_kind in ("swiglu", "geglu")
    ffn = 3 * C * d_ff if gated else 2 * C * (3 * d_ff // 2)
    per_layer = 4 * C * C + ffn + (2 * C if config.use_norm else 0)
    positions = config.context_length * C if config.position_encoding == "learned" else 0
    return (V * C + config.num_layers * per_layer + (C if config.use_norm else 0)
            + (0 if config.tie_embeddings else V * C) + positions)


ABLATIONS = [dict(), dict(use_norm=False), dict(norm_position="post"),
             dict(position_encoding="nope"), dict(position_encoding="learned"),
             dict(position_encoding="sinusoidal"), dict(ffn_kind="swiglu"),
             dict(ffn_kind="geglu"), dict(ffn_kind="silu"), dict(ffn_kind="gelu"),
             dict(ffn_kind="relu"), dict(tie_embeddings=True),
             dict(tie_embeddings=True, tie_init="embedding"), dict(dropout=0.1)]


@pytest.mark.parametrize("overrides", ABLATIONS,
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_ablations_build_count_and_train(overrides):
    """Every ablation builds with the parameter count of its formula, and AdamW lowers its loss."""
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    model = gpt.TransformerLM(config)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(config)
    tokens = torch.randint(0, 64, (4, 17))
    losses = train_on_batch(model, gpt.AdamW(model.parameters(), lr=3e-3), tokens[:, :-1],
                            tokens[:, 1:], steps=8)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("kind", ["silu", "gelu", "relu"])
def test_plain_feed_forwards_match_the_gated_ones_in_parameters(kind):
    """At the same d_ff, a plain MLP (1.5x wider) has exactly the parameters of SwiGLU."""
    count = lambda **o: sum(p.numel() for p in gpt.TransformerLM(tiny_config(**o)).parameters())
    assert count(ffn_kind=kind) == count(ffn_kind="swiglu")


def test_relu_equals_its_definition():
    """relu(x) = max(x, 0), as F.relu."""
    x = torch.randn(100)
    torch.testing.assert_close(gpt.relu(x), F.relu(x))


def test_dropout_zeroes_a_share_p_keeps_the_mean_and_is_off_in_eval():
    """Training: about p of the values are zeroed, the rest scaled by 1/(1-p), so the mean
    stays; evaluation: the identity, and the model's outputs are deterministic."""
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = gpt.dropout(x, 0.1, training=True)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005
    assert y.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs(y.mean().item() - 1) < 0.01
    assert gpt.dropout(x, 0.1, training=False) is x
    model = gpt.TransformerLM(tiny_config(dropout=0.5))
    tokens = torch.randint(0, 64, (2, 16))
    assert not torch.equal(model(tokens), model(tokens))  # training: new masks every call
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_no_attention_dropout_drops_only_the_branches():
    """attention_dropout False: attention weights are whole (the same output as with dropout
    off), while the branches' outputs still lose a share p."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(dropout=0.5, attention_dropout=False))
    block = model.layers[0]
    assert block.attn.dropout_p == 0.0 and block.dropout_p == 0.5
    x = torch.randn(2, 16, model.config.d_model)
    assert torch.equal(block.attn(x), block.attn(x))  # no mask drawn on the weights
    assert not torch.equal(block(x), block(x))


def test_sampling_with_dropout_is_deterministic_with_a_seed():
    """Sampling runs the model in evaluation mode: dropout is off, the seed decides."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(dropout=0.5)).train()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    runs = [torch.cat(list(gpt.generate_batch(model, prompt, 10, seed=5))) for _ in range(2)]
    assert torch.equal(*runs)


def test_sinusoidal_positions_formula():
    """pe[p, 2i] = sin(p / 10000^(2i/C)), pe[p, 2i+1] = cos(p / 10000^(2i/C)); row 0 is 0, 1."""
    pe = gpt.sinusoidal_positions(10, 8)
    p, i = 7, 3
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 8)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 8)), abs=1e-6)
    assert pe[0].tolist() == [0, 1] * 4


@pytest.mark.parametrize("kind", ["learned", "sinusoidal"])
def test_absolute_positions_end_at_the_context_length(kind):
    """Learned and sinusoidal positions exist for 0 .. context_length - 1: past them the model
    refuses, and generation re-reads the last window (as with the whole text recomputed)."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(position_encoding=kind, context_length=8)).eval()
    with pytest.raises(ValueError, match="past the last of the 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    prompt = torch.randint(0, 64, (1, 5))
    tokens = prompt
    for token in gpt.generate_batch(model, prompt, 12, temperature=0):
        expected = model(tokens[:, -8:])[:, -1].argmax(-1)  # greedy over the last window
        assert torch.equal(token, expected)
        tokens = torch.cat((tokens, token[:, None]), dim=1)


def test_tied_embeddings_keep_the_chosen_init():
    """Tied with tie_init "output": the small Glorot init of lm_head; "embedding": std 1."""
    torch.manual_seed(0)
    for init, std in (("output", math.sqrt(2 / (32 + 64))), ("embedding", 1.0)):
        model = gpt.TransformerLM(tiny_config(tie_embeddings=True, tie_init=init))
        assert model.lm_head.weight is model.token_embeddings.weight
        assert model.lm_head.weight.std().item() == pytest.approx(std, rel=0.15)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_norm_position_pre_or_post(norm_position):
    """Post-norm blocks end in a norm (output RMS 1 at init); pre-norm ones keep the residual."""
    torch.manual_seed(0)
    block = gpt.TransformerLM(tiny_config(norm_position=norm_position)).layers[0]
    x = 5 * torch.randn(2, 6, 32)
    with torch.no_grad():
        rms = block(x).square().mean(-1).sqrt()
    if norm_position == "post":
        torch.testing.assert_close(rms, torch.ones(2, 6))
    else:
        assert (rms > 3).all()  # x, with RMS 5, passes through the residual path


@pytest.mark.parametrize("position_encoding", ["rope", "nope"])
def test_nope_model_sees_no_positions(position_encoding):
    """Without RoPE, a one-layer model's last prediction ignores the order of the earlier tokens."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(num_layers=1, position_encoding=position_encoding))
    tokens = torch.randint(0, 64, (1, 10))
    shuffled = torch.cat((tokens[:, :-1].flip(1), tokens[:, -1:]), dim=1)
    with torch.no_grad():
        last, last_shuffled = model(tokens)[0, -1], model(shuffled)[0, -1]
    if position_encoding == "nope":
        torch.testing.assert_close(last_shuffled, last)
    else:
        assert (last_shuffled - last).abs().max() > 1e-3


def test_tiny_model_overfits_one_batch():
    """A tiny model memorises one batch: the loss falls from about ln V to well below 1."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config())
    tokens = torch.randint(0, 64, (4, 17))
    losses = train_on_batch(model, gpt.AdamW(model.parameters(), lr=1e-2), tokens[:, :-1],
                            tokens[:, 1:], steps=60)
    assert losses[0] > 3.5 and max(losses[-5:]) < 0.5, (losses[0], losses[-5:])


# ==================================================================================================
# §4 Loss and AdamW
# ==================================================================================================

def readable(name: str):
    """The readable form of §1-§7 behind a plain name, whichever form the name runs now."""
    return gpt.READABLE_FORMS[name]


# §4's cross_entropy as written, and its fast twin (§19): both are checked against torch.
CROSS_ENTROPY_FORMS = {"readable": readable("cross_entropy"), "fast": gpt.fast_cross_entropy}


def check_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, atol=1e-6, rtol=1e-5,
                        loss_atol=1e-6, cross_entropy=gpt.fast_cross_entropy):
    """cross_entropy's value and gradient equal F.cross_entropy's on the float32 logits."""
    logits = logits.detach().requires_grad_()
    reference = logits.detach().float().requires_grad_()
    loss = cross_entropy(logits, targets)
    expected = F.cross_entropy(reference.reshape(-1, reference.shape[-1]), targets.reshape(-1))
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, atol=loss_atol, rtol=1e-6)
    loss.backward()
    expected.backward()
    assert logits.grad.dtype == logits.dtype and torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("form", CROSS_ENTROPY_FORMS)
@pytest.mark.parametrize("shape", [(6, 11), (2, 5, 11)], ids=["2d", "3d"])
@pytest.mark.parametrize("shift", [0.0, 1000.0], ids=["plain", "shifted-by-1000"])
def test_cross_entropy_equals_torch(shape, shift, form):
    """cross_entropy equals F.cross_entropy for (N, V) and (B, T, V) logits, even around +1000."""
    torch.manual_seed(0)
    logits = 3 * torch.randn(shape) + shift
    # float32 numbers near 1000 are 6e-5 apart: the loss can only agree to about that much.
    tolerances = dict(atol=1e-5, loss_atol=1e-4) if shift else {}
    check_cross_entropy(logits, torch.randint(0, 11, shape[:-1]), **tolerances,
                        cross_entropy=CROSS_ENTROPY_FORMS[form])


@pytest.mark.parametrize("form", CROSS_ENTROPY_FORMS)
def test_cross_entropy_bf16_logits(form):
    """bf16 logits give the float32 loss of their values, and a bf16 gradient."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 7, 50)).bfloat16()
    check_cross_entropy(logits, torch.randint(0, 50, (4, 7)), atol=1e-4, rtol=1e-2,
                        cross_entropy=CROSS_ENTROPY_FORMS[form])


def test_cross_entropy_over_several_chunks():
    """The fast twin over more rows than one slice (20 rows of V = 50,000), the last partial."""
    torch.manual_seed(0)
    logits = torch.randn(45, 50_000)
    check_cross_entropy(logits, torch.randint(0, 50_000, (45,)))


@pytest.mark.parametrize("shift", [0.0, 1000.0], ids=["plain", "shifted-by-1000"])
def test_fast_cross_entropy_equals_the_formula(shift):
    """The fast twin equals the readable formula, loss and gradient."""
    torch.manual_seed(0)
    logits = 3 * torch.randn(40, 30) + shift
    targets = torch.randint(0, 30, (40,))
    plain = logits.clone().requires_grad_()
    fast = logits.clone().requires_grad_()
    loss = readable("cross_entropy")(plain, targets)
    torch.testing.assert_close(loss, gpt.fast_cross_entropy(fast, targets), atol=1e-4, rtol=1e-6)
    loss.backward()
    gpt.fast_cross_entropy(fast, targets).backward()
    torch.testing.assert_close(plain.grad, fast.grad)


PARAM_SHAPES = [(5,), (3, 4), (2, 3, 4), ()]


def run_adamw(optimizer_class, params, groups, steps: int, seed: int = 0):
    """Run an optimizer on the given parameters with the same random gradients every time."""
    optimizer = optimizer_class(groups(params))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return optimizer


ADAMW_GROUPS = {
    "one-group": lambda ps: [dict(params=ps, lr=5e-3, betas=(0.9, 0.95), weight_decay=0.1)],
    "two-groups": lambda ps: [dict(params=ps[:2], lr=3e-2, weight_decay=0.3),
                              dict(params=ps[2:], lr=1e-3, betas=(0.8, 0.99), eps=1e-6,
                                   weight_decay=0.0)],
}


# §4's per-parameter AdamW, and its vectorised twin (§19)
ADAMW_FORMS = {"readable": readable("AdamW"), "fast": gpt.FastAdamW}


@pytest.mark.parametrize("form", ADAMW_FORMS)
@pytest.mark.parametrize("groups", ADAMW_GROUPS.values(), ids=ADAMW_GROUPS.keys())
def test_adamw_equals_torch_adamw(groups, form):
    """100 steps of AdamW (with weight decay, one or two parameter groups) equal torch's."""
    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in PARAM_SHAPES]
    ours = [nn.Parameter(p.clone()) for p in start]
    theirs = [nn.Parameter(p.clone()) for p in start]
    run_adamw(ADAMW_FORMS[form], ours, groups, steps=100)
    run_adamw(torch.optim.AdamW, theirs, groups, steps=100)
    for a, b, p in zip(ours, theirs, start):
        assert not torch.allclose(a, p)  # the parameters did move
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fast_adamw_equals_the_per_parameter_one():
    """FastAdamW's parameters and state equal the per-parameter AdamW's over 50 steps."""
    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in PARAM_SHAPES]
    fast, plain = [nn.Parameter(p.clone()) for p in start], [nn.Parameter(p.clone()) for p in start]
    fast_optimizer = run_adamw(gpt.FastAdamW, fast, ADAMW_GROUPS["two-groups"], steps=50)
    plain_optimizer = run_adamw(readable("AdamW"), plain, ADAMW_GROUPS["two-groups"], steps=50)
    for a, b, p in zip(fast, plain, start):
        assert not torch.allclose(a, p)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        state_a, state_b = fast_optimizer.state[a], plain_optimizer.state[b]
        assert state_a["step"] == state_b["step"] == 50
        torch.testing.assert_close(state_a["exp_avg_sq"], state_b["exp_avg_sq"])


@pytest.mark.parametrize("restored_form", ADAMW_FORMS)
def test_adamw_state_dict_round_trip(restored_form):
    """A restored AdamW continues as the original: exactly, or readable from fast's state."""
    torch.manual_seed(0)
    groups = ADAMW_GROUPS["two-groups"]
    params = [nn.Parameter(torch.randn(shape)) for shape in PARAM_SHAPES]
    original = run_adamw(gpt.FastAdamW, params, groups, steps=5)
    saved = copy.deepcopy(original.state_dict())
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    restored = ADAMW_FORMS[restored_form](groups(copies))
    restored.load_state_dict(saved)
    for optimizer, ps in [(original, params), (restored, copies)]:
        generator = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
    for a, b in zip(params, copies):
        if restored_form == "fast":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("form", ADAMW_FORMS)
def test_adamw_skips_parameters_without_gradient(form):
    """A parameter whose grad is None is neither moved nor given optimizer state."""
    torch.manual_seed(0)
    used, unused = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    before = unused.detach().clone()
    optimizer = ADAMW_FORMS[form]([used, unused], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        used.grad = torch.randn(3)
        optimizer.step()
    assert torch.equal(unused, before)
    assert unused not in optimizer.state and optimizer.state[used]["step"] == 3


@pytest.mark.parametrize("kwargs, named", [
    (dict(lr=-0.1), "-0.1"), (dict(lr=float("nan")), "nan"),
    (dict(betas=(1.0, 0.999)), "1.0"), (dict(betas=(0.9, -0.5)), "-0.5"),
], ids=["negative-lr", "nan-lr", "beta1-1", "negative-beta2"])
def test_adamw_rejects_bad_hyperparameters(kwargs, named):
    """A negative or NaN learning rate, or a beta outside [0, 1), is a ValueError naming it."""
    with pytest.raises(ValueError, match=re.escape(named)):
        gpt.AdamW([nn.Parameter(torch.zeros(2))], **kwargs)


def test_adamw_groups_decay_the_matrices_only():
    """Every parameter is in one group: the matrices with the weight decay, the gains without."""
    model = gpt.TransformerLM(tiny_config())
    decayed, plain = gpt.adamw_groups(model.parameters(), 0.3)
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.3, 0.0)
    assert all(p.ndim == 2 for p in decayed["params"]) and plain["params"]
    assert all(p.ndim == 1 for p in plain["params"])
    grouped = {id(p) for p in decayed["params"] + plain["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


# --- Muon -----------------------------------------------------------------------------------------
MUON_SHAPES = [(32, 32), (16, 48), (48, 16)]  # square, wide, tall


def muon_groups(params, **settings) -> list[dict]:
    """Two groups: the square and wide matrices with `settings`, the tall one on its own."""
    return [dict(params=params[:2], lr=0.02, **settings),
            dict(params=params[2:], lr=0.05, momentum=0.9, weight_decay=0.0)]


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain-momentum"])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_muon_equals_torch_muon(adjust_lr_fn, nesterov):
    """Five steps of Muon on a square, a wide and a tall matrix, in two groups (weight decay in
    one, another momentum in the other), equal torch.optim.Muon's, parameter by parameter after
    every step, for each learning-rate adjustment, with and without Nesterov."""
    torch.manual_seed(0)
    start = [torch.randn(shape) for shape in MUON_SHAPES]
    ours, theirs = ([nn.Parameter(p.clone()) for p in start] for _ in range(2))
    settings = dict(weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    optimizers = [gpt.Muon(muon_groups(ours, **settings)),
                  torch.optim.Muon(muon_groups(theirs, **settings))]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    for a, p in zip(ours, start):
        assert not torch.allclose(a, p, atol=1e-3)  # the parameters did move


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "float32"])
@pytest.mark.parametrize("shape", MUON_SHAPES, ids=["square", "wide", "tall"])
def test_muon_step_is_orthogonal(shape, ns_dtype):
    """A first Muon step moves W by lr x scale x O, O about U V^T for the gradient U S V^T:
    from singular values spread over 1 to 10, O's all lie in the quintic's band, 0.65 to 1.2,
    and O is within 0.35 of U V^T (spectral norm), in bf16 and in float32."""
    generator = torch.Generator().manual_seed(0)
    k = min(shape)
    U = torch.linalg.qr(torch.randn(shape[0], k, generator=generator))[0]  # (A, k)
    V = torch.linalg.qr(torch.randn(shape[1], k, generator=generator))[0]  # (B, k)
    W = nn.Parameter(torch.zeros(shape))
    W.grad = U @ torch.diag(torch.linspace(1, 10, k)) @ V.T
    gpt.Muon([W], lr=1.0, weight_decay=0.0, ns_dtype=ns_dtype).step()
    O = -W.detach() / gpt.muon_lr_scale(W.shape, None)
    singular_values = torch.linalg.svdvals(O)
    assert 0.65 < singular_values.min() and singular_values.max() < 1.2
    assert torch.linalg.matrix_norm(O - U @ V.T, ord=2) < 0.35


@pytest.mark.parametrize("shape, adjust_lr_fn, expected", [
    ((256, 256), None, 1.0), ((688, 256), "original", math.sqrt(688 / 256)),
    ((256, 688), None, 1.0), ((256, 688), "match_rms_adamw", 0.2 * math.sqrt(688))])
def test_muon_lr_scale_hand_values(shape, adjust_lr_fn, expected):
    """Jordan's scale sqrt(max(1, A / B)) lifts only tall matrices; Moonlight's is
    0.2 sqrt(max(A, B)) for any shape."""
    assert gpt.muon_lr_scale(torch.Size(shape), adjust_lr_fn) == pytest.approx(expected)


@pytest.mark.parametrize("params, kwargs, named", [
    ([nn.Parameter(torch.zeros(4))], {}, "(4,)"),
    ([nn.Parameter(torch.zeros(2, 2))], dict(momentum=1.0), "1.0"),
    ([nn.Parameter(torch.zeros(2, 2))], dict(lr=-0.5), "-0.5"),
    ([nn.Parameter(torch.zeros(2, 2))], dict(adjust_lr_fn="spectral"), "spectral"),
], ids=["vector", "momentum-1", "negative-lr", "unknown-adjustment"])
def test_muon_rejects_what_it_cannot_update(params, kwargs, named):
    """A parameter that is not a matrix, a momentum of 1, a negative learning rate or an
    unknown learning-rate adjustment is a ValueError naming it."""
    with pytest.raises(ValueError, match=re.escape(named)):
        gpt.Muon(params, **kwargs)


# ==================================================================================================
# §5 Schedule and clipping
# ==================================================================================================

# max_lr 1, min_lr 0.1, warmup 10, cycle 110: linear to 1 over 10 steps, then a cosine over 100
# steps down to 0.1: lr = 0.1 + 0.9 * (1 + cos(pi * (it - 10) / 100)) / 2, then 0.1 for good.
@pytest.mark.parametrize("it, expected", [
    (0, 0.0), (5, 0.5), (9, 0.9), (10, 1.0),
    (35, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2),  # a quarter of the way: 0.868...
    (60, 0.55),                                          # halfway
    (85, 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2),  # three quarters: 0.231...
    (110, 0.1), (111, 0.1), (200, 0.1),
])
def test_lr_cosine_schedule_hand_table(it, expected):
    """Warmup, cosine decay and the floor at the values worked out by hand."""
    assert gpt.lr_cosine_schedule(it, 1.0, 0.1, 10, 110) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("clip_grad_norm", [readable("clip_grad_norm"), gpt.fast_clip_grad_norm],
                         ids=["readable", "fast"])
@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clipped", "below-max"])
def test_clip_grad_norm_equals_torch(max_norm, clip_grad_norm):
    """The returned norm and the clipped gradients equal clip_grad_norm_'s; grad None ignored."""
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2), (3,)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours[:-1], theirs[:-1]):  # the last parameter has no gradient
        a.grad = torch.randn(a.shape)
        b.grad = a.grad.clone()
    grads_before = [p.grad.clone() for p in ours[:-1]]
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected)
    assert (norm.item() > max_norm) == (max_norm == 0.5)  # each case tests what its id says
    for a, b in zip(ours[:-1], theirs[:-1]):
        torch.testing.assert_close(a.grad, b.grad)
    if max_norm == 100.0:
        assert all(torch.equal(p.grad, g) for p, g in zip(ours[:-1], grads_before))
    else:
        clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:-1]]))
        assert clipped.item() == pytest.approx(max_norm, rel=1e-4)
    assert ours[-1].grad is None


# ==================================================================================================
# §6 Training
# ==================================================================================================

@pytest.mark.parametrize("num_tokens, count, expected", [
    (10, 3, [0, 3, 7]),          # the docstring's example: 7 is the last start with a target
    (10, 100, list(range(8))),   # a short file: each of its 8 starts once
    (1000, 2, [0, 997]),
])
def test_evaluation_starts_spread_evenly(num_tokens, count, expected):
    """The validation windows start evenly from the first token to the last that has a target."""
    assert gpt.evaluation_starts(num_tokens, 2, count).tolist() == expected


# --- the training loop ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def token_dir(tmp_path_factory, corpus_path):
    """Token files and a 300-token tokenizer from the test corpus, made once for the module."""
    directory = tmp_path_factory.mktemp("tokens")
    text = open(corpus_path, encoding="utf-8").read()
    cut = len(text) * 4 // 5
    train_text, valid_text = directory / "train.txt", directory / "valid.txt"
    train_text.write_text(text[:cut], encoding="utf-8")
    valid_text.write_text(text[cut:], encoding="utf-8")
    assert gpt.main(["tokenize", "--train", str(train_text), "--valid", str(valid_text),
                     "--vocab-size", "300", "--out-dir", str(directory), "--workers", "1"]) == 0
    return str(directory)


TINY_MODEL = ["--context-length", "16", "--d-model", "32", "--num-layers", "2", "--num-heads",
              "4", "--d-ff", "64"]


def train_args(token_dir: str, out_dir, *extra: str) -> list[str]:
    """A few steps of a tiny model: seconds on any CPU."""
    return ["train", "--data-dir", token_dir, "--out-dir", str(out_dir), "--batch-size", "4",
            "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1",
            "--warmup-steps", "2", "--dtype", "float32", "--max-steps", "6", "--device", "cpu",
            *TINY_MODEL, *extra]


def metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir) -> dict[int, float]:
    return {m["step"]: m["train_loss"] for m in metrics(out_dir) if "train_loss" in m}


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out_dir, "latest.pt"), weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_training_reduces_the_loss(tmp_path, token_dir):
    """Forty steps at a high learning rate take the validation loss well below ln(V)."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "40", "--eval-interval",
                               "40", "--lr", "1e-2")) == 0
    val = [m["val_loss"] for m in metrics(tmp_path) if "val_loss" in m]
    assert val[0] > math.log(300) - 0.5 and val[-1] < val[0] - 1.0


def test_gradient_accumulation_equals_one_big_batch(tmp_path, token_dir):
    """2 micro-batches of 4 give the same update as one batch of 8 (the same 8 windows)."""
    assert gpt.main(train_args(token_dir, tmp_path / "big", "--batch-size", "8",
                               "--max-steps", "2")) == 0
    assert gpt.main(train_args(token_dir, tmp_path / "accum", "--batch-size", "4",
                               "--grad-accum", "2", "--max-steps", "2")) == 0
    assert_same_weights(final_weights(tmp_path / "big"), final_weights(tmp_path / "accum"),
                        exact=False)


# ==================================================================================================
# §7 Sampling
# ==================================================================================================

def sampling_model(context_length: int = 8, seed: int = 0, **overrides) -> gpt.TransformerLM:
    torch.manual_seed(seed)
    return gpt.TransformerLM(tiny_config(context_length=context_length, **overrides)).eval()


# The sizes of the models `import` reads, in a tiny model: GQA, qk-norm, D * H != C.
IMPORTED_SIZES = dict(num_kv_heads=2, qk_norm=True, head_dim=6)


@pytest.mark.parametrize("kind", [{}, IMPORTED_SIZES], ids=["ours", "gqa-qknorm-headdim"])
@pytest.mark.parametrize("form", ["fast", "readable"])
def test_kv_cache_equals_recomputing_past_the_context_length(form, kind):
    """Cached logits equal full recomputation within 1e-4, for 3x the context length."""
    model = sampling_model(context_length=8, **kind)
    if form == "readable":
        readable = readable_model(model.config).eval()
        readable.load_state_dict(model.state_dict())
        model = readable
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)  # (B, 24, V): every position sees its last 8 tokens
        caches = [gpt.KVCache(8) for _ in model.layers]
        prompt = model(tokens[:, :5], caches=caches)
        steps = [model(tokens[:, t:t + 1], start_pos=t, caches=caches) for t in range(5, 24)]
    cached = torch.cat([prompt, *steps], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)


def test_kv_cache_holds_the_generations_positions_of_the_key_value_heads(monkeypatch):
    """A model of 8,192 positions caches what the generation runs through (5 prompt tokens
    and 7 new ones), of its 2 key/value heads, not its 4 query heads."""
    made = []

    class RecordedCache(gpt.KVCache):
        def __init__(self, capacity: int):
            super().__init__(capacity)
            made.append(self)

    monkeypatch.setattr(gpt, "KVCache", RecordedCache)
    model = sampling_model(context_length=8192, **IMPORTED_SIZES)
    list(gpt.generate_batch(model, torch.zeros(1, 5, dtype=torch.long), 7, temperature=0))
    assert len(made) == 2 and {cache.k.shape for cache in made} == {(1, 2, 12, 6)}


def test_sliding_window_is_the_context_length():
    """Past the context length a token sees exactly the last context_length tokens."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(context_length=8, num_layers=1))
    tokens = torch.randint(0, model.config.vocab_size, (1, 20))
    changed = tokens.clone()
    changed[0, 3] = (changed[0, 3] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # With one layer, position 10 sees tokens 3..10 and position 11 sees 4..11.
    assert not torch.allclose(a[0, 10], b[0, 10])
    torch.testing.assert_close(a[0, 11:], b[0, 11:])
    mask = gpt.sliding_causal_mask(4, 2)
    assert mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_cached_and_uncached_generation_give_the_same_greedy_tokens():
    """Greedy generation with and without the KV cache agrees, past the context length too."""
    model = sampling_model(context_length=8)
    prompts = torch.randint(0, model.config.vocab_size, (2, 5))
    runs = [torch.stack(list(gpt.generate_batch(model, prompts, 20, temperature=0,
                                                use_cache=use_cache)))
            for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_temperature_0_is_argmax():
    """Temperature 0 picks the likeliest next token."""
    model = sampling_model()
    prompt = [3, 1, 4, 1, 5]
    first = next(gpt.generate(model, prompt, 1, temperature=0))
    with torch.no_grad():
        assert first == int(model(torch.tensor([prompt]))[0, -1].argmax())


# §7's filter_logits as written, and its fast twin (§19), which sorts only the top 64 for top-p
FILTER_FORMS = {"readable": readable("filter_logits"), "fast": gpt.fast_filter_logits}


@pytest.mark.parametrize("form", FILTER_FORMS)
def test_top_k_keeps_exactly_k_even_with_ties(form):
    """top-k leaves exactly k finite logits, even where equal logits straddle the cut."""
    filter_logits = FILTER_FORMS[form]
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0]])
    kept = filter_logits(logits, 1.0, top_k=3)
    assert torch.isfinite(kept).sum() == 3 and torch.isfinite(kept[0, 1])
    torch.testing.assert_close(filter_logits(logits, 2.0, top_k=6), logits / 2)


@pytest.mark.parametrize("top_p, expected", [
    (0.7, [0, 1]),          # 0.5 is short of 0.7; 0.5 + 0.3 reaches it
    (0.79, [0, 1]),
    (0.81, [0, 1, 2]),      # 0.5 + 0.3 is short of 0.81
    (0.45, [0]),            # the first token alone reaches 0.45
    (0.01, [0]),            # always at least one token
    (1.0, [0, 1, 2, 3]),
])
@pytest.mark.parametrize("form", FILTER_FORMS)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected, form):
    """top-p keeps the likeliest tokens whose probabilities first reach p, at least one."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    order = torch.tensor([2, 0, 3, 1])  # shuffled, so that sorting matters
    kept = FILTER_FORMS[form](probs[:, order].log(), 1.0, top_p=top_p)
    assert sorted(order[torch.isfinite(kept[0])].tolist()) == expected


@pytest.mark.parametrize("scale, top_p, top_k", [(0.1, 0.9, None), (3.0, 0.9, None),
                                                 (3.0, 0.5, 100), (0.1, 0.95, 300)],
                         ids=["flat", "peaked", "with-top-k", "flat-with-top-k"])
def test_fast_filter_logits_equals_the_readable_one(scale, top_p, top_k):
    """The fast twin keeps filter_logits' logits, the nucleus within the top 64 or beyond."""
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * scale
    kept = gpt.fast_filter_logits(logits, 0.8, top_k, top_p)
    torch.testing.assert_close(kept, readable("filter_logits")(logits, 0.8, top_k, top_p))
    within_64 = (torch.isfinite(kept).sum(dim=-1) <= 64).tolist()
    assert within_64 == [scale == 3.0] * 3  # each case tests the branch its id says


def test_top_p_beyond_the_top_64_keeps_the_right_set():
    """When the 64 likeliest tokens hold less than p, top-p still keeps the right set."""
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 0.1  # nearly flat: the nucleus holds hundreds of tokens
    kept = gpt.fast_filter_logits(logits, 1.0, top_p=0.9)
    probs = torch.softmax(logits, dim=-1)
    for row, kept_row in zip(probs, kept):
        sorted_probs, order = row.sort(descending=True)
        size = int((sorted_probs.cumsum(0) - sorted_probs < 0.9).sum())
        assert size > 64
        assert set(order[:size].tolist()) == set(torch.isfinite(kept_row).nonzero()[:, 0].tolist())


def test_sample_from_follows_the_distribution():
    """Inverse-CDF sampling draws each token about as often as its probability, never a
    zero-probability one."""
    probs = torch.tensor([[0.0, 0.2, 0.5, 0.0, 0.3]]).repeat(20000, 1)
    ids = gpt.sample_from(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=5) / len(ids)
    assert counts[0] == 0 and counts[3] == 0
    torch.testing.assert_close(counts, probs[0], atol=0.015, rtol=0)


@pytest.mark.parametrize("form", FILTER_FORMS)
def test_filters_apply_in_order_temperature_top_k_top_p(form):
    """Temperature reshapes the distribution before top-p measures it."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sharp = FILTER_FORMS[form](logits, 0.25, top_k=3, top_p=0.9)
    flat = FILTER_FORMS[form](logits, 4.0, top_k=3, top_p=0.9)
    assert torch.isfinite(sharp).sum() == 1 and torch.isfinite(flat).sum() == 3


def test_seed_makes_sampling_reproducible():
    """The same seed gives the same tokens; different seeds give different ones."""
    model = sampling_model()
    prompt = [1, 2, 3]
    runs = {seed: list(gpt.generate(model, prompt, 30, temperature=1.5, seed=seed))
            for seed in (0, 1)}
    assert runs[0] == list(gpt.generate(model, prompt, 30, temperature=1.5, seed=0))
    assert runs[0] != runs[1]


def test_generation_stops_at_the_end_of_text_token():
    """generate yields the end-of-text token last and stops there."""
    model = sampling_model()
    greedy = list(gpt.generate(model, [1, 2, 3], 12, temperature=0))
    eos_id = greedy[3]
    stopped = list(gpt.generate(model, [1, 2, 3], 12, temperature=0, eos_id=eos_id))
    assert stopped == greedy[:greedy.index(eos_id) + 1]


@pytest.mark.parametrize("kwargs, named", [
    (dict(temperature=-0.1), "-0.1"), (dict(top_k=0), "top-k"), (dict(top_p=0.0), "top-p"),
    (dict(top_p=1.5), "1.5")])
def test_bad_sampling_settings_raise(kwargs, named):
    """A negative temperature, top-k < 1 or top-p outside (0, 1] is refused, naming the value."""
    with pytest.raises(ValueError, match=re.escape(named)):
        list(gpt.generate(sampling_model(), [1, 2], 3, **kwargs))


@pytest.mark.parametrize("prompt, max_new_tokens, error, named", [
    ([1, 64], 3, ValueError, "token id 64 is not in the model's vocabulary (0 to 63)"),
    ([1, -2], 3, ValueError, "token id -2 is not in the model's vocabulary (0 to 63)"),
    ([1, 2], -1, ValueError, "max_new_tokens must be an integer >= 0, got -1"),
], ids=["id-too-large", "id-negative", "negative-count"])
def test_generate_refuses_ids_outside_the_vocabulary(prompt, max_new_tokens, error, named):
    """A prompt id the embedding has no row for, or a negative number of tokens to generate, is
    refused naming it: not an IndexError from the embedding, nor silently nothing."""
    model = sampling_model()
    assert model.config.vocab_size == 64
    with pytest.raises(error, match=re.escape(named)):
        list(gpt.generate(model, prompt, max_new_tokens))
    assert list(gpt.generate(model, [1, 2], 0)) == []


def test_stream_never_splits_a_character():
    """A character whose bytes come in separate tokens is printed whole, once complete."""
    tokenizer = gpt.Tokenizer(dict(BYTES_VOCAB), [])
    text = "né 🙂!"
    pieces = list(gpt.decode_stream(list(text.encode("utf-8")), tokenizer))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "🙂" in pieces  # four byte-tokens, one piece
    assert list(gpt.decode_stream([0x61, 0xE9, 0x62], tokenizer)) == ["a", "", "\ufffdb", ""]


# ==================================================================================================
# §8 Files
# ==================================================================================================

@pytest.mark.parametrize("data", [
    b"plain ASCII", "é日🙂 cut anywhere by the blocks".encode(), b"abc" * 10 + b"\xff" + b"x",
    "aé".encode()[:-1], b"ok \xed\xa0\x80 surrogate", "日".encode()[:2] + b"x", b"\xc0\xaf",
], ids=["ascii", "multibyte", "bad-byte", "cut-at-end", "surrogate", "cut-inside", "overlong"])
@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 1 << 16])
def test_check_text_file_finds_the_first_bad_byte_anywhere(tmp_path, data, block_bytes):
    """The streaming check in blocks accepts exactly what a one-shot strict decode accepts, and
    names the same offset, wherever the blocks cut a character."""
    path = tmp_path / "text.txt"
    path.write_bytes(data)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        with pytest.raises(ValueError, match=f"{path} is not UTF-8 text .*offset {e.start}\\)"):
            gpt.check_text_file(str(path), block_bytes)
    else:
        assert gpt.check_text_file(str(path), block_bytes) == len(data)


def test_open_for_writing_refuses_a_symbolic_link(tmp_path):
    """A file we write is never written through a symbolic link someone planted at its name: the
    link is refused with an OSError naming it, and the file it points to is unchanged."""
    target, link = tmp_path / "notes.txt", tmp_path / "metrics.jsonl"
    target.write_text("mine")
    link.symlink_to(target)
    for mode in ("w", "a", "wb"):
        with pytest.raises(OSError, match=f"{link} is a symbolic link"):
            gpt.open_for_writing(str(link), mode)
    assert target.read_text() == "mine"
    with gpt.open_for_writing(str(tmp_path / "new.txt"), "a") as f:
        f.write("é")
    assert (tmp_path / "new.txt").read_text(encoding="utf-8") == "é"


def test_directory_lock_one_holder_released_on_errors(tmp_path):
    """The lock holds our pid while its block runs; a second taker is refused with one line
    naming the holder; it is released by an error or Ctrl-C too; a directory made for it and
    left empty is removed again; not taken, it writes nothing."""
    run = tmp_path / "run"
    with gpt.directory_lock(str(run)):
        assert (run / "gpt.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=f"{run} is in use by another run \\(process "
                                             f"{os.getpid()}\\)"):
            with gpt.directory_lock(str(run)):
                pass
        assert (run / "gpt.lock").exists()  # a refused taker leaves the holder's lock alone
    assert not run.exists()
    for error in (KeyboardInterrupt, ValueError):
        with pytest.raises(error):
            with gpt.directory_lock(str(tmp_path)):
                raise error()
        assert not (tmp_path / "gpt.lock").exists() and tmp_path.exists()
    with gpt.directory_lock(str(run), taken=False):
        assert not run.exists()


def test_a_lock_on_a_full_disk_names_it_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """`train` into a new directory on a full disk says which file could not be written, and
    leaves no empty lock (which the next run would take for a run starting now) and no
    directory behind."""
    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fdopen", lambda fd, *args, **kwargs: FullDisk(fd, "w"))
    run = tmp_path / "new" / "run"
    assert exit_code(["train", "--out-dir", str(run), "--data-dir", str(tmp_path)]) == 2
    assert one_error_line(capsys, "train").endswith(
        f"cannot write {run / 'gpt.lock'}: the disk is full (No space left on device)")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, age, busy", [
    ("dead", 0, False), ("", 0, True), ("", 60, False), ("garbage", 60, False),
    ("99999999999", 0, False)], ids=["dead-pid", "being-written", "empty-and-old", "garbage",
                                     "huge-number"])
def test_directory_lock_clears_a_stale_lock(tmp_path, content, age, busy):
    """A lock of a dead process (kill -9), or one holding no pid long after it was made, is
    cleared and taken; an empty lock made a moment ago is being taken by another run: busy."""
    lock = tmp_path / "gpt.lock"
    lock.write_text(str(dead_pid()) if content == "dead" else content)
    made = time.time() - age
    os.utime(lock, (made, made))
    if busy:
        with pytest.raises(ValueError, match="in use by another run \\(a run starting now"):
            with gpt.directory_lock(str(tmp_path)):
                pass
        return
    with gpt.directory_lock(str(tmp_path)):
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


# ==================================================================================================
# §9 Parallel BPE
# ==================================================================================================

# --- pre-tokenizer --------------------------------------------------------------------------------
def test_split_words_hand_examples():
    """split_words() cuts at every space, unless one sits inside or at the end of a whitespace
    run; then it cuts only at the spaces that follow a non-space."""
    assert gpt.split_words("Hi there,\nit's  42!") == ["Hi", "there,\nit's", "", "42!"]
    assert gpt.split_words(" a b ") == ["", "a", "b", ""]
    assert gpt.split_words("a   b c") == ["a", "  b", "c"]     # a space between spaces
    assert gpt.split_words("a\n  b c\t ") == ["a\n  b", "c\t "]  # after a newline; at the end
    assert gpt.split_words("") == [""]


def pretokenize_words(words: list[str]) -> list[str]:
    """The pre-tokens of split_words' output, each word but the first after its space."""
    return gpt.pretokenize(words[0]) + [p for w in words[1:] for p in gpt.pretokenize(" " + w)]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_split_words_keep_pretokens_whole(text):
    """Pre-tokenizing word by word gives the pre-tokens of the whole text."""
    assert pretokenize_words(gpt.split_words(text)) == gpt.pretokenize(text)
    assert " ".join(gpt.split_words(text)) == text


def test_split_words_exact_on_every_short_string():
    """Every string of up to 5 characters from letters, digits, punctuation, an apostrophe and
    five kinds of whitespace (\\x1c is whitespace to `re` but not to `regex`) pre-tokenizes word
    by word exactly as whole; and always splitting at spaces would not."""
    alphabet = ["a", "1", ".", "'", "s", " ", "\n", "\t", "\xa0", "\x1c"]
    texts = ["".join(t) for n in range(6) for t in product(alphabet, repeat=n)]
    assert all(pretokenize_words(gpt.split_words(t)) == gpt.pretokenize(t) for t in texts)
    assert any(pretokenize_words(t.split(" ")) != gpt.pretokenize(t) for t in texts)


def test_ascii_pattern_classes_are_those_of_regex():
    """On each of the 128 ASCII characters, the `re` pattern's classes agree with `regex`'s
    \\p{L}, \\p{N} and \\s, the three classes of GPT-2's pattern."""
    for c in map(chr, range(128)):
        for pattern, cls in (("[A-Za-z]", r"\p{L}"), ("[0-9]", r"\p{N}"),
                             ("[\t\n\x0b\x0c\r ]", r"\s")):
            assert bool(re.fullmatch(pattern, c)) == bool(regex.fullmatch(cls, c)), (c, cls)


def test_fast_pretokenize_exact_on_every_short_ascii_string():
    """Every string of up to 5 characters from letters (those of contractions among them),
    digits, punctuation, an apostrophe and four kinds of whitespace pre-tokenizes as GPT-2's
    pattern does; and longer random ASCII strings, and non-ASCII text (which takes `regex`)."""
    alphabet = ["a", "s", "l", "1", ".", "'", " ", "\n", "\t", "\x1c", "\x0b"]
    texts = ["".join(t) for n in range(6) for t in product(alphabet, repeat=n)]
    rng = random.Random(0)
    texts += ["".join(rng.choices(string.printable + "\x1c\x1f'", k=rng.randint(1, 60)))
              for _ in range(3000)]
    texts += TRICKY_TEXTS
    assert all(gpt.fast_pretokenize(t) == gpt.pretokenize(t) for t in texts)


def test_fast_pretokenize_exact_on_mixed_ascii_and_other_text():
    """Text with a few non-ASCII characters: its ASCII lines go to `re`, the others to `regex`,
    cut at line breaks; every short string of line breaks, spaces, letters and non-ASCII
    characters (a letter, a no-break space, an ideographic space, NEL), and random mixes."""
    alphabet = ["a", ".", " ", "\n", "\n", "é", "\xa0", "\u3000", "\x85", "1"]
    texts = ["".join(t) for n in range(6) for t in product(alphabet, repeat=n)]
    rng = random.Random(1)
    texts += ["".join(rng.choices(alphabet + ["x.\n", "y\n  ", "中文"], k=rng.randint(1, 80)))
              for _ in range(3000)]
    assert all(gpt.fast_pretokenize(t) == gpt.pretokenize(t) for t in texts)


# Code (indented: runs of spaces) and prose, ASCII or not, empty, and spaces at the edges.
CODE_AND_PROSE = [
    "def f(x):\n    if x:\n        return 'a'  # it's\n\n\n",
    "Once upon a time, a cat sat. It's 42!\n",
    "    x = 1\n\ty\t= 'é'  \n  \u3000z\n",
    "Tom  ran. Hé said: ¡hola! 日本語\n",
    "",
    " a  \n  ",
]


def test_count_pretokens_of_code_and_prose_documents(tmp_path):
    """Counting pre-tokens document by document, code pre-tokenized whole and prose word by word,
    gives the counts of pretokenize on each document, those of §1's pretoken_counts."""
    docs = CODE_AND_PROSE * 3
    path = tmp_path / "docs.txt"
    path.write_bytes(EOT.join(docs).encode("utf-8"))
    counts = gpt.count_pretokens_in_chunk(str(path), 0, path.stat().st_size, [EOT])
    assert counts == Counter(p for doc in docs for p in gpt.pretokenize(doc))
    assert counts == gpt.pretoken_counts(EOT.join(docs), [EOT])  # the twin of §1's counts


def documents_file(path, seed: int = 0, num_docs: int = 400) -> str:
    """Write ASCII documents of random length, separated by runs of 1 to 3 <|endoftext|>."""
    rng = random.Random(seed)
    text = "".join("doc " + "x" * rng.randint(0, 150) + EOT * rng.randint(1, 3)
                   for _ in range(num_docs))
    path.write_bytes(text.encode("utf-8"))
    return text


# With only the double registered, a run of three <|endoftext|> is the double then a plain
# "<|endoftext|>" text: a cut at the run's second <|endoftext|> would split the double.
@pytest.mark.parametrize("specials", [[EOT], [EOT, EOT * 2], [EOT * 2]],
                         ids=["eot", "eot+double", "double-only"])
def test_chunk_boundaries_cut_at_special_tokens(tmp_path, specials):
    """Every inner cut is where a special token of the whole text starts, never inside a run."""
    text = documents_file(tmp_path / "docs.txt")
    data = text.encode("utf-8")  # ASCII: byte offsets are character offsets
    starts = {m.start() for m in gpt.special_tokens_regex(specials).finditer(text)}
    encoded = [s.encode("utf-8") for s in specials]
    for chunk_bytes in (50, 300, 5000):
        cuts = gpt.chunk_boundaries(str(tmp_path / "docs.txt"), specials, chunk_bytes)
        assert cuts[0] == 0 and cuts[-1] == len(data) and len(cuts) > 2
        assert all(a + chunk_bytes <= b for a, b in zip(cuts[:-2], cuts[1:-1])), "chunk too small"
        for cut in cuts[1:-1]:
            assert any(data.startswith(s, cut) for s in encoded)
            assert not any(data[:cut].endswith(s) for s in encoded), "cut inside a run"
            assert cut in starts, f"cut at {cut} splits the special token matched there"


def test_whitespace_boundaries_hand_example(tmp_path):
    """Without special tokens: the first line end after each chunk's length, else a word end."""
    path = tmp_path / "w.txt"
    path.write_bytes(b"one two\nthree\n")
    assert gpt.chunk_boundaries(str(path), [], 4) == [0, 7, 13, 14]
    assert gpt.chunk_boundaries(str(path), [], 2) == [0, 3, 7, 13, 14]  # "one| two"
    path.write_bytes("日本語\u00a0\n語".encode() * 3)  # no ASCII before any whitespace
    assert gpt.chunk_boundaries(str(path), [], 2) == [0, path.stat().st_size]


NO_MARKER_TEXTS = {
    "prose": "Once upon a time, there was a cat.\nIt sat.  \n\n  Then it ran!\n" * 300,
    "crlf": "def f(x):\r\n    return x  \r\n\r\n" * 400,
    "long-lines": " ".join(f"word{i}," for i in range(3000)) + "\n" + "x" * 5000 + " end",
    "unicode-space": "a\u00a0\nb \u3000\nc\u2028d\n 日本語 \t\n" * 400,
}


@pytest.mark.parametrize("name", NO_MARKER_TEXTS)
def test_chunks_without_markers_count_and_encode_as_the_whole(tmp_path, tokenizer, name):
    """A text without special tokens is cut into many chunks, and the chunks' pre-token counts
    and encoded ids add up to those of the whole text, whatever its line ends and lengths."""
    text = NO_MARKER_TEXTS[name]
    path = tmp_path / "text.txt"
    path.write_bytes(text.encode("utf-8"))
    cuts = gpt.chunk_boundaries(str(path), [], 1000)
    assert len(cuts) > 5
    counts, ids = Counter(), []
    for a, b in zip(cuts, cuts[1:]):
        counts += gpt.count_pretokens_in_chunk(str(path), a, b, [])
        ids += tokenizer.encode(gpt.read_text(str(path), a, b))
    assert counts == Counter(gpt.pretokenize(text))
    assert ids == tokenizer.encode(text)


def test_plan_chunks_of_a_byte_range_cover_it_exactly(tmp_path):
    """A byte range is planned like a file of its own: chunks tile [start, end), cut only at
    special tokens."""
    text = documents_file(tmp_path / "docs.txt", num_docs=4000)
    data = text.encode()
    start, end = data.index(EOT.encode(), 1000), data.rindex(EOT.encode(), 0, len(data) - 1000)
    chunks = gpt.plan_chunks((str(tmp_path / "docs.txt"), start, end), [EOT], num_workers=2)
    assert len(chunks) > 2 and chunks[0][1] == start and chunks[-1][2] == end
    assert all(a[2] == b[1] for a, b in pairwise(chunks))
    assert all(data.startswith(EOT.encode(), cut) for _, cut, _ in chunks)


def test_train_bpe_in_parallel_equals_naive(tmp_path):
    """Counting pre-tokens in several chunks on 2 workers changes nothing."""
    text = random_text(seed=123, num_words=60_000)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    assert len(gpt.plan_chunks(str(path), [EOT], num_workers=2)) > 2
    fast = gpt.train_bpe(str(path), 400, [EOT], num_workers=2)
    assert fast == gpt.train_bpe_naive(text, 400, [EOT])


def test_train_bpe_takes_a_path(corpus_path):
    """train_bpe takes a pathlib.Path (as CS336's tests pass it), or a byte range of one, as
    well as a str."""
    path = pathlib.Path(corpus_path)
    expected = gpt.train_bpe(corpus_path, 300, [EOT], num_workers=1)
    assert gpt.train_bpe(path, 300, [EOT], num_workers=1) == expected
    assert gpt.train_bpe((path, 0, path.stat().st_size), 300, [EOT], num_workers=1) == expected


@pytest.mark.parametrize("num_workers", [1, 2])
def test_encode_and_train_on_a_byte_range_equal_a_copy_of_it(tmp_path, corpus_path, tokenizer,
                                                            num_workers):
    """encode_files and train_bpe given (path, start, end) give what they give on a file that
    holds only those bytes."""
    data = open(corpus_path, "rb").read()
    start, end = data.index(b"\n", 10_000) + 1, data.rindex(EOT.encode(), 0, 150_000)
    (tmp_path / "part.txt").write_bytes(data[start:end])
    source = (corpus_path, start, end)
    files = [(source, str(tmp_path / "range.bin")), (str(tmp_path / "part.txt"),
                                                     str(tmp_path / "copy.bin"))]
    counts = list(gpt.encode_files(tokenizer, files, num_workers))
    assert counts[0] == counts[1]
    assert (tmp_path / "range.bin").read_bytes() == (tmp_path / "copy.bin").read_bytes()
    assert (gpt.train_bpe(source, 300, [EOT], num_workers)
            == gpt.train_bpe(str(tmp_path / "part.txt"), 300, [EOT], num_workers))


# ==================================================================================================
# §10 The fast encoder and token files
# ==================================================================================================

def safe_cuts(text: str) -> list[int]:
    """The positions in text where SAFE_CUT_RE allows a cut, in increasing order."""
    return sorted(m.start() for m in gpt.SAFE_CUT_RE.finditer(text))


def test_safe_cuts_hand_example():
    """Cuts after a non-space before whitespace, and at a change of kind (letter, digit, other),
    but not after whitespace, nor between "'" and a letter (a contraction)."""
    # i t ' s _ 4 2 n d . \n \n x: cuts at t|' s|_ 2|n d|. .|\n
    assert safe_cuts("it's 42nd.\n\nx") == [2, 4, 7, 9, 10]
    assert safe_cuts("one\ntwo\r\nthree") == [3, 7]
    assert safe_cuts("  \n\t\xa0") == [] and safe_cuts("letters") == []


# Letters (some that end contractions), a digit, "'", other punctuation, and whitespace: \x1c is
# whitespace to stdlib `re` but not to `regex` (nor to GPT-2's pattern); \xa0 is to both.
CUT_ALPHABET = ["a", "s", "l", "1", ".", "'", " ", "\n", "\r", "\t", "\xa0", "\x1c"]


def test_safe_cuts_split_pretokens_exactly_whatever_surrounds_them():
    """At every cut SAFE_CUT_RE finds, pre-tokenizing the two sides apart gives the pre-tokens
    of the whole: on every string of up to 4 characters, and on random longer ones."""
    rng = random.Random(0)
    texts = chain((t for n in range(5) for t in map("".join, product(CUT_ALPHABET, repeat=n))),
                  ("".join(rng.choices(CUT_ALPHABET, k=12)) for _ in range(3000)))
    for text in texts:
        for cut in safe_cuts(text):
            assert gpt.pretokenize(text[:cut]) + gpt.pretokenize(text[cut:]) == \
                gpt.pretokenize(text), (text, cut)


def test_unsafe_space_regex_knows_all_of_regexs_whitespace():
    """UNSAFE_SPACE_RE uses stdlib `re`, whose whitespace must include all of `regex`'s, or it
    would miss spaces that GPT-2's pattern joins to a whitespace run."""
    every_char = "".join(map(chr, range(sys.maxunicode + 1)))
    whitespace = regex.findall(r"\s", every_char)
    assert len(whitespace) >= 25
    assert all(re.fullmatch(r"\s", c) for c in whitespace)


def cut_into(cut: str, monkeypatch) -> None:
    """Make Tokenizer.encode cut all text into pre-tokens, or (as now) prose into words."""
    if cut == "pre-tokens":
        monkeypatch.setattr(gpt, "UNSAFE_SPACE_RE", re.compile(""))  # matches any text


@pytest.mark.parametrize("cut", ["words", "pre-tokens"])
def test_encode_equals_pretokens_merged_one_by_one_on_every_short_text(tmp_path, cut,
                                                                       monkeypatch):
    """encode() (words from split_words and their shortcuts, or pre-tokens from
    fast_pretokenize; two caches) gives the plain encode's ids (each pre-token of the whole
    text merged on its own), for every text of up to 4 pieces
    drawn from words, punctuation, digits, a contraction, a non-ASCII letter and whitespace. The
    tokenizer learns from random texts of these pieces, so that runs of whitespace are tokens
    too."""
    pieces = ["the", "é", ",", '!"', "'s", "7", " ", "\n", "\t"]
    rng = random.Random(0)
    corpus = tmp_path / "pieces.txt"
    corpus.write_text("".join(rng.choice(pieces) for _ in range(20_000)), encoding="utf-8")
    vocab, merges = gpt.train_bpe(str(corpus), 400, [], num_workers=1)
    # Merges that cross pre-token boundaries, ranked first (never learned, but possible in a
    # vocabulary from elsewhere): a shortcut that encoded across a boundary would use them.
    cross = [(b"e", b"7"), (b"e", b","), (b",", b"t"), (b"\n", b"t"), (b"\t", b" ")]
    vocab.update({len(vocab) + i: left + right for i, (left, right) in enumerate(cross)})
    merges = cross + merges
    tokenizer, plain = gpt.Tokenizer(vocab, merges), PlainTokenizer(vocab, merges)
    cut_into(cut, monkeypatch)
    assert {b"\n\t", b"\t\t", b" the"} <= set(tokenizer.vocab.values())
    for n in range(5):
        for text in map("".join, product(pieces, repeat=n)):
            assert tokenizer.encode(text) == plain.encode(text), repr(text)


@pytest.mark.parametrize("cut", ["words", "pre-tokens"])
def test_fast_encode_equals_the_plain_encode_on_stories(tokenizer, corpus_path, cut,
                                                       monkeypatch):
    """FastTokenizer.encode (caches, shortcuts) equals §1's Tokenizer.encode (a merge loop per
    pre-token) on real stories with their document markers, cut into words or pre-tokens."""
    text = open(corpus_path, encoding="utf-8").read()
    fast = gpt.Tokenizer(tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens)
    cut_into(cut, monkeypatch)
    plain = PlainTokenizer(tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens)
    assert EOT in text
    assert fast.encode(text) == plain.encode(text)


def test_encode_cuts_code_into_pre_tokens_and_prose_into_words():
    """Text with runs of spaces (code) is cut into pre-tokens, other text into words (the
    word cache fills); both give the plain encode's ids."""
    vocab = {**BYTES_VOCAB, 256: b" t", 257: b"he", 258: b" the", 259: b"  "}
    merges = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b" ", b" ")]
    tokenizer, plain = gpt.Tokenizer(vocab, merges), PlainTokenizer(vocab, merges)
    code = "def f(x):\n    return the(x)\n"
    assert tokenizer.encode(code) == plain.encode(code) and not tokenizer.after_space
    prose = "the cat and the dog"
    assert tokenizer.encode(prose) == plain.encode(prose)
    assert set(tokenizer.after_space) == {"cat", "and", "the", "dog"}


def test_isalpha_letters_are_regex_letters():
    """The encoder's shortcuts take str.isalpha() characters for `\\p{L}` ones: Python's
    Unicode tables must not count as letters what `regex`'s do not."""
    every_char = "".join(map(chr, range(sys.maxunicode + 1)))
    letters = set(regex.findall(r"\p{L}", every_char))
    assert len(letters) > 100_000
    assert all(c in letters for c in every_char if c.isalpha())


def merging_every_pair_tokenizer(text: str, special_tokens: list[str]) -> gpt.Tokenizer:
    """A tokenizer with a merge for every pair of adjacent bytes in text, ranked at random."""
    pairs = sorted({(bytes([a]), bytes([b])) for a, b in pairwise(text.encode("utf-8"))})
    random.Random(0).shuffle(pairs)
    vocab = {**BYTES_VOCAB, **{256 + i: left + right for i, (left, right) in enumerate(pairs)}}
    return gpt.Tokenizer(vocab, pairs, special_tokens)


@pytest.mark.parametrize("which", ["tokenizer", "gpt2_tokenizer", "every-pair"])
def test_long_pretokens_merge_with_a_heap_as_the_plain_loop(request, which, monkeypatch):
    """Above LONG_PRETOKEN_BYTES, encode_word merges with a heap: exactly as the fast loop and
    §1's plain encode_word do, on random long words spelled from the vocabulary's own tokens and
    on runs of one character (where every pair ties, so the leftmost must win)."""
    rng = random.Random(0)
    if which == "every-pair":
        tok = merging_every_pair_tokenizer("".join(rng.choices("aabé日", k=500)), [])
    else:
        tok = request.getfixturevalue(which)
    pieces = [t.decode() for t in tok.vocab.values() if t.isascii() and t.strip().isalpha()]
    pieces = ["a", "a", "b", "é", "日"] if which == "every-pair" else pieces
    words = ["".join(rng.choices(pieces, k=rng.randint(100, 200))) for _ in range(8)]
    words += ["a" * 600, "é" * 200, " " * 599, "\n" * 300, "ab" * 250]
    assert all(len(w.encode("utf-8")) > gpt.LONG_PRETOKEN_BYTES for w in words)
    with_heap = [tok.encode_word(w) for w in words]
    plain = PlainTokenizer(tok.vocab, tok.merges, tok.special_tokens)
    assert [plain.encode_word(w) for w in words] == with_heap
    monkeypatch.setattr(gpt, "LONG_PRETOKEN_BYTES", math.inf)
    assert [tok.encode_word(w) for w in words] == with_heap


@pytest.mark.parametrize("text", ["letters" * 15_000, " " * 100_000, "\n\t \xa0" * 20_000],
                         ids=["letters", "spaces", "whitespace"])
def test_encode_a_huge_pretoken(text):
    """A 100 KB pre-token, which takes minutes when each merge scans the whole word, is encoded
    in well under a second, merged as the heap test above checks, and decodes back."""
    tokenizer = merging_every_pair_tokenizer(text[:100], [])
    assert len(gpt.pretokenize(text)) == 1
    ids = tokenizer.encode(text)
    assert len(ids) < 0.8 * len(text.encode("utf-8")) and tokenizer.decode(ids) == text


def test_a_huge_pretoken_costs_a_bounded_memory_per_byte():
    """A 50 KB line of letters (one pre-token) is trained on and encoded in memory of a few
    tens of bytes a byte: positions in typed arrays, where lists of Python ints and a heap of
    tuples took 130-140 (over 1.8 GB for an 8 MB line). Allocations, not time, are measured."""
    import tracemalloc
    text = "".join(random.Random(0).choices(["once", "upon", "a", "time", "there"], k=15_000))
    tracemalloc.start()
    try:
        vocab, merges = gpt.fast_train_bpe_incremental({text: 1}, 256 + 100, [])
        train_peak = tracemalloc.get_traced_memory()[1]
        tokenizer = gpt.Tokenizer(vocab, merges)
        tracemalloc.reset_peak()
        ids = tokenizer.encode_word(text)
        encode_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert train_peak < 70 * len(text) and encode_peak < 40 * len(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 4


# "<| x y |>" holds spaces, so a stream must not cut inside it before it has fully arrived.
@pytest.mark.parametrize("specials", [[EOT], [EOT, EOT * 2], [EOT, "<| x y |>"]],
                         ids=["eot", "eot+double", "eot+spaced"])
@pytest.mark.parametrize("text", [
    "a  b\n\n c'll 12 <|endoftext|>x  ",
    EOT + EOT + " " + EOT + "end",
    "Once upon a time,  there was\n\na cat.\x1c🙂 日本 it's",
    "a<| x y |>b <| x y |> c<| x",
    "\t  \tx y\n  z \u3000  \x1d!",
    "one\ntwo\r\nthree\n\n\tfour\x1c\x1dfive\x1e\x1f\n",   # one word per line, \x1c-\x1f
    "\xa0x\xa0 \n\t\r\n\n  \n",                         # whitespace only, but for one x
    "it's42nd.'s\n''ll\n$5,6<|endoftext|>'ve",              # lines with no spaces
])
def test_encode_iterable_equals_encode_on_any_split(specials, text):
    """Streaming pieces gives encode()'s ids, however the text is cut into pieces. Every pair
    of adjacent bytes is a merge, so that a cut in the wrong place would change the ids."""
    tokenizer = merging_every_pair_tokenizer(text, specials)
    expected = tokenizer.encode(text)
    assert list(tokenizer.encode_iterable(list(text))) == expected  # one character at a time
    for i in range(len(text) + 1):
        assert list(tokenizer.encode_iterable([text[:i], text[i:]])) == expected, i


# Each shape as the pieces of a stream, about 300 KB in all: where the stream is searched again
# from its start at each piece, as it once was, one word per line takes minutes. The last three
# shapes are a single pre-token each, which the stream must hold whole.
STREAM_SHAPES = {
    "one word per line": ["Once\n", "upon\r\n", "a\n", "time,\n"] * 15_000,
    "one huge line": ["the cat sat on the mat, " * 4] * 3_000,
    "lines without spaces": ["it's,42.\n", "x\x1cy\n", "''\n"] * 15_000,
    "only newlines": ["\n"] * 300_000,
    "only whitespace": [" \t\xa0\n\r\u3000 " * 10] * 3_000,
    "only letters": ["abcde" * 20] * 3_000,
}


@pytest.mark.parametrize("shape", STREAM_SHAPES)
def test_encode_iterable_searches_each_character_once(shape):
    """Streaming gives encode()'s ids, each character is searched for a cut once and encoded
    once, and where cuts exist it is encoded a few pieces at a time."""
    pieces = STREAM_SHAPES[shape]
    text = "".join(pieces)
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], [EOT])
    searched, encoded = [], []
    last_safe_cut, encode = tokenizer._last_safe_cut, tokenizer.encode
    tokenizer._last_safe_cut = lambda buffer, start, end, longest: (
        searched.append(max(end - start, 0)) or last_safe_cut(buffer, start, end, longest))
    tokenizer.encode = lambda text: encoded.append(len(text)) or encode(text)
    assert list(tokenizer.encode_iterable(pieces)) == list(text.encode("utf-8"))
    assert sum(searched) <= len(text) and sum(encoded) == len(text)
    if shape.startswith("only"):
        assert max(encoded) == len(text)  # one pre-token: no cut anywhere
    else:
        assert max(encoded) <= 3 * (max(map(len, pieces)) + len(EOT))  # a few pieces


def test_encode_pauses_the_cycle_collector_and_restores_it(tokenizer):
    """The caches fill with the cycle collector off, and encode() leaves it as it found it."""
    seen = []
    encode_piece = tokenizer.cache.encode
    tokenizer.cache.encode = lambda text: seen.append(gc.isenabled()) or encode_piece(text)
    try:
        assert gc.isenabled()
        tokenizer.encode("never seen before: zqxj")
        assert seen and not any(seen)
        assert gc.isenabled()
        gc.disable()
        tokenizer.encode("zqxjj")
        assert not gc.isenabled()
    finally:
        gc.enable()
        tokenizer.cache.encode = encode_piece


def test_encode_iterable_equals_encode_on_file_lines(tokenizer, corpus_path):
    """Streaming the lines of a file gives the ids of encoding the whole file at once."""
    with open(corpus_path, encoding="utf-8", newline="") as f:
        expected = tokenizer.encode(f.read())
    with open(corpus_path, encoding="utf-8", newline="") as f:
        assert list(tokenizer.encode_iterable(f)) == expected

@pytest.mark.parametrize("layout", ["smollm", "llama3", "qwen"])
def test_fast_encode_equals_the_plain_encode_with_other_layouts(tokenizer, corpus_path, layout):
    """With another layout's settings, FastTokenizer takes §1's way through its pre-token cache:
    the plain tokenizer's ids on hard texts, random strings and stories, which decode back (the
    text NFC-composed, with the NFC normalizer)."""
    fast, plain = with_layout(tokenizer, layout), with_layout(tokenizer, layout, PlainTokenizer)
    rng = random.Random(0)
    chars = list("ab Z1 2\n\r\t.,'é日🙂\u0301\xa0") + ["'S", EOT, "123456"]
    texts = HARD_TEXTS + ["".join(rng.choices(chars, k=rng.randint(0, 16))) for _ in range(300)]
    texts.append(pathlib.Path(corpus_path).read_text(encoding="utf-8")[:20_000])
    normalize = (lambda t: unicodedata.normalize("NFC", t)) if layout == "qwen" else str
    for text in texts:
        ids = fast.encode(text)
        assert ids == plain.encode(text), text
        assert fast.decode(ids) == normalize(text)


@pytest.mark.parametrize("layout", ["smollm", "llama3", "qwen"])
@pytest.mark.parametrize("text", [
    "a  b\n\n c'll 1234567 <|endoftext|>x  ",
    EOT + EOT + " " + EOT + "end",
    "e\u0301\ne\u0301<|endoftext|>\u0301\n\n 12",
])
def test_encode_iterable_with_other_layouts_cuts_only_at_special_tokens(layout, text):
    """Other layouts' patterns may join any two characters, and NFC compose them: the stream is
    cut only before special tokens, and gives encode()'s ids however the text arrives."""
    tokenizer = with_layout(merging_every_pair_tokenizer(text, [EOT]), layout, gpt.FastTokenizer)
    expected = tokenizer.encode(text)
    assert list(tokenizer.encode_iterable(list(text))) == expected
    for i in range(len(text) + 1):
        assert list(tokenizer.encode_iterable([text[:i], text[i:]])) == expected, i
    assert tokenizer._last_safe_cut("ab\ncd" + EOT + "ef", 0, 18, len(EOT)) == 5


def test_encode_files_with_another_layout_cuts_at_special_tokens_only(tmp_path, tokenizer):
    """A text without special tokens is not cut at line ends for another layout's pattern
    (Llama 3's joins ".\\n" into one pre-token): its token file is encode() of the whole."""
    text = "The end.\n\nOnce upon a time. 12345\n" * 3000
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    for specials in ([], [EOT]):
        llama = gpt.FastTokenizer(tokenizer.vocab, tokenizer.merges, specials,
                                  **LAYOUTS["llama3"])
        out = tmp_path / "text.bin"
        assert list(gpt.encode_files(llama, [(str(path), str(out))], num_workers=2)) == [
            len(llama.encode(text))]
        assert np.fromfile(out, dtype=np.uint16).tolist() == llama.encode(text)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_encode_file_equals_encode(tmp_path, tokenizer, corpus_path, num_workers):
    """The token file holds encode(whole text) as raw uint16, whatever the number of workers."""
    assert len(gpt.plan_chunks(corpus_path, [EOT], num_workers)) > 1  # really cut in chunks
    out = tmp_path / "tokens.bin"
    (num_tokens,) = gpt.encode_files(tokenizer, [(corpus_path, str(out))], num_workers)
    with open(corpus_path, encoding="utf-8", newline="") as f:
        expected = tokenizer.encode(f.read())
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    assert num_tokens == len(expected) and out.stat().st_size == 2 * len(expected)
    assert os.listdir(tmp_path) == ["tokens.bin"]  # no temporary file left behind


@pytest.mark.parametrize("num_workers", [1, 2])
def test_encode_files_in_one_pool_equal_encode(tmp_path, tokenizer, corpus_path, num_workers):
    """Several files through one pool: each token file holds encode() of its own text."""
    other = tmp_path / "other.txt"
    other.write_text(EOT.join(TRICKY_TEXTS) * 20, encoding="utf-8")
    files = [(corpus_path, str(tmp_path / "a.bin")), (str(other), str(tmp_path / "b.bin")),
             (corpus_path, str(tmp_path / "c.bin"))]
    counts = list(gpt.encode_files(tokenizer, files, num_workers))
    for (text_path, out_path), num_tokens in zip(files, counts, strict=True):
        with open(text_path, encoding="utf-8", newline="") as f:
            expected = tokenizer.encode(f.read())
        assert np.fromfile(out_path, dtype=np.uint16).tolist() == expected
        assert num_tokens == len(expected)
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.bin", "c.bin", "other.txt"]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_encode_file_error_leaves_no_file(tmp_path, tokenizer, corpus_path, num_workers):
    """A chunk that fails (not UTF-8) after others were written leaves no token file behind."""
    with open(corpus_path, "rb") as f:
        (tmp_path / "bad.txt").write_bytes(f.read() + b"\xff")  # only the last chunk is bad
    assert len(gpt.plan_chunks(str(tmp_path / "bad.txt"), [EOT], num_workers)) > 1
    files = [(str(tmp_path / "bad.txt"), str(tmp_path / "tokens.bin"))]
    with pytest.raises(ValueError, match="not UTF-8"):
        list(gpt.encode_files(tokenizer, files, num_workers))
    assert os.listdir(tmp_path) == ["bad.txt"]


def test_token_files_take_paths(tmp_path, tokenizer, corpus_path, capsys):
    """encode_files, write_token_info and open_tokens take a pathlib.Path for every path."""
    text, out = pathlib.Path(corpus_path), tmp_path / "tokens.bin"
    (num_tokens,) = gpt.encode_files(tokenizer, [(text, out)], 1, verbose=True)
    assert f"encode {corpus_path}:" in capsys.readouterr().err
    gpt.write_token_info(out, tokenizer.fingerprint(), np.dtype(np.uint16), num_tokens, text)
    assert json.loads((tmp_path / "tokens.bin.json").read_text())["text"] == corpus_path
    assert len(gpt.open_tokens(out, len(tokenizer.vocab), tokenizer)) == num_tokens


@pytest.fixture
def token_file(tmp_path, token_dir):
    """A copy of a token file written by `tokenize`, with its sidecar, and its tokenizer."""
    import shutil
    for name in ["train.bin", "train.bin.json"]:
        shutil.copy(os.path.join(token_dir, name), tmp_path / name)
    return str(tmp_path / "train.bin"), gpt.Tokenizer.load(os.path.join(token_dir, "tokenizer"))


def test_open_tokens_checks_the_sidecar(token_file, tokenizer, capsys):
    """open_tokens accepts a token file whose sidecar names its tokenizer and length, and refuses
    one made by another tokenizer, or whose length disagrees, telling to run tokenize again."""
    path, own = token_file
    data = gpt.open_tokens(path, len(own.vocab), own)
    assert len(data) == json.load(open(path + ".json"))["num_tokens"]
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match=f"{path} was encoded by another tokenizer.*again"):
        gpt.open_tokens(path, len(tokenizer.vocab), tokenizer)
    with open(path, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=f"{path} holds .* tokens, but .*tokenize` again"):
        gpt.open_tokens(path, len(own.vocab))  # the old call, without a tokenizer, checks this
    with open(path + ".json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=f"{path}.json is corrupt"):
        gpt.open_tokens(path, len(own.vocab), own)


@pytest.mark.parametrize("sidecar", ['{"tokenizer_sha256": 5, "dtype": "uint16", '
                                     '"num_tokens": 3}',
                                     '{"tokenizer_sha256": "ab", "dtype": "uint16", '
                                     '"num_tokens": Infinity}',
                                     "[" * 3000 + "]" * 3000],
                         ids=["number-fingerprint", "infinite-count", "deep"])
def test_open_tokens_refuses_a_hostile_sidecar(token_file, sidecar):
    """A sidecar with a value of the wrong type, a non-finite number or deep nesting is called
    corrupt in one line, not a TypeError, OverflowError or RecursionError."""
    path, own = token_file
    with open(path + ".json", "w") as f:
        f.write(sidecar)
    with pytest.raises(ValueError, match=f"^{path}.json is corrupt.*again$"):
        gpt.open_tokens(path, len(own.vocab), own)


@pytest.mark.parametrize("text, start", [
    (f"{EOT}\nOnce.{EOT}\nTwo.{EOT} Three{EOT}\n", "\n"),
    (f"{EOT}\n\nOnce.{EOT}\n\nTwo.{EOT}\nThree", "\n\n"),
    (f"{EOT}Once.{EOT}Two.{EOT}\nThree", ""),
    ("no end token here\n", ""),
], ids=["newline", "blank-line", "nothing", "no-end-token"])
def test_find_story_start_is_the_commonest_whitespace_after_the_end_token(text, start):
    """find_story_start gives the whitespace that most often follows the end token, "" when
    it is nothing or there is no end token."""
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], [EOT])
    assert gpt.find_story_start(np.array(tokenizer.encode(text)), tokenizer) == start
    no_specials = gpt.Tokenizer(BYTES_VOCAB, [])
    assert gpt.find_story_start(np.array(no_specials.encode(text)), no_specials) == ""


def test_open_tokens_without_sidecar_is_accepted_with_a_note(token_file, capsys):
    """A token file from an older gpt.py, without a sidecar, loads, with one note on stderr."""
    path, own = token_file
    os.remove(path + ".json")
    assert len(gpt.open_tokens(path, len(own.vocab), own)) == os.path.getsize(path) // 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"note: {path} has no train.bin.json")


# ==================================================================================================
# §11 Checkpoints
# ==================================================================================================

def trained_model(config: gpt.ModelConfig, seed: int = 0, steps: int = 3):
    """A model and its AdamW after a few steps on a fixed batch, and that batch."""
    torch.manual_seed(seed)
    model = gpt.TransformerLM(config)
    optimizer = gpt.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, config.vocab_size, (2, config.context_length + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    train_on_batch(model, optimizer, x, y, steps)
    return model, optimizer, (x, y)


@pytest.mark.parametrize("to", ["path", "bytesio"])
def test_checkpoint_round_trip_continues_identically(tmp_path, to):
    """A restored model and optimizer train on exactly as the originals do."""
    config = tiny_config(num_layers=1, tie_embeddings=True)
    model, optimizer, (x, y) = trained_model(config)
    target = str(tmp_path / "ckpt.pt") if to == "path" else io.BytesIO()
    gpt.save_checkpoint(model, optimizer, 3, target, config=dataclasses.asdict(config))
    if to == "bytesio":
        target.seek(0)
    torch.manual_seed(123)  # different initial weights, all to be overwritten
    restored = gpt.TransformerLM(config)
    restored_optimizer = gpt.AdamW(restored.parameters(), lr=1e-2)
    assert gpt.load_checkpoint(target, restored, restored_optimizer) == 3
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    train_on_batch(model, optimizer, x, y, steps=3)
    train_on_batch(restored, restored_optimizer, x, y, steps=3)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_checkpoint_stores_extra_data(tmp_path):
    """Keyword arguments of save_checkpoint come back from read_checkpoint."""
    config = tiny_config(num_layers=1)
    model, optimizer, _ = trained_model(config, steps=1)
    path = str(tmp_path / "ckpt.pt")
    gpt.save_checkpoint(model, optimizer, 7, path, config=dataclasses.asdict(config),
                        note="hello", losses=[1.5, 2.5])
    checkpoint = gpt.read_checkpoint(path)
    assert checkpoint["iteration"] == 7
    assert checkpoint["config"] == dataclasses.asdict(config)
    assert (checkpoint["note"], checkpoint["losses"]) == ("hello", [1.5, 2.5])


@pytest.mark.parametrize("overrides", [dict(d_model=64), dict(num_layers=2), dict(vocab_size=65)],
                         ids=["wider", "deeper", "larger-vocab"])
def test_checkpoint_for_another_architecture_is_refused(tmp_path, overrides):
    """Loading into a model of another shape is a ValueError saying so."""
    model, optimizer, _ = trained_model(tiny_config(num_layers=1), steps=1)
    gpt.save_checkpoint(model, optimizer, 1, str(tmp_path / "ckpt.pt"))
    other = gpt.TransformerLM(tiny_config(**{"num_layers": 1, **overrides}))
    with pytest.raises(ValueError, match="different architecture"):
        gpt.load_checkpoint(str(tmp_path / "ckpt.pt"), other)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of real checkpoints: a small one (under 64 KiB) and a larger one."""
    checkpoints = {}
    for size, d_model in [("small", 8), ("large", 32)]:
        config = tiny_config(num_layers=1, d_model=d_model, num_heads=2)
        model, optimizer, _ = trained_model(config, steps=1)
        path = tmp_path_factory.mktemp("checkpoint") / "ckpt.pt"
        gpt.save_checkpoint(model, optimizer, 1, str(path))
        checkpoints[size] = path.read_bytes()
    assert len(checkpoints["small"]) < 1 << 16 < len(checkpoints["large"])
    return checkpoints


@pytest.mark.parametrize("kind, arg", [
    ("bytes", b""), ("bytes", b"this is not a checkpoint\n"),
    ("random", 1), ("random", 100), ("random", 5000),
    ("truncated", ("small", 100)), ("truncated", ("small", 0.5)), ("truncated", ("small", -1)),
    ("truncated", ("large", 0.5)), ("truncated", ("large", -1)),
], ids=["empty", "text", "random-1", "random-100", "random-5000", "small-first-100",
        "small-half", "small-all-but-1", "large-half", "large-all-but-1"])
def test_corrupt_checkpoint_is_one_line_value_error(tmp_path, checkpoint_bytes, kind, arg):
    """Random bytes, text or a truncated checkpoint give a one-line ValueError naming the file
    and saying that it is damaged or truncated."""
    if kind == "bytes":
        data = arg
    elif kind == "random":
        data = np.random.default_rng(arg).bytes(arg)
    else:
        size, cut = arg
        whole = checkpoint_bytes[size]
        data = whole[:int(cut * len(whole)) if isinstance(cut, float) else cut]
    path = tmp_path / "ckpt.pt"
    path.write_bytes(data)
    model = gpt.TransformerLM(tiny_config(num_layers=1))
    with pytest.raises(ValueError) as error:
        gpt.load_checkpoint(str(path), model)
    assert "\n" not in str(error.value)
    assert str(path) in str(error.value) and "damaged or truncated" in str(error.value)


def full_checkpoint() -> dict:
    """What `train` saves, for a tiny model with a bytes-only tokenizer and <|endoftext|>."""
    config = tiny_config(num_layers=1, vocab_size=257)
    model, optimizer, _ = trained_model(config, steps=1)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": 1,
            "config": dataclasses.asdict(config),
            "tokenizer": dict(vocab=BYTES_VOCAB, merges=[], special_tokens=[EOT]),
            "args": {"preset": "laptop", "batch_size": 4, "lr": 1e-3, "min_lr": None},
            "best_val_loss": 5.5, "total_steps": 10, "rng": [torch.Generator().get_state()]}


def test_checkpoint_functions_take_paths(tmp_path):
    """save_checkpoint, load_checkpoint, load_for_sampling, newest_checkpoint and
    remove_stale_temp_files take a pathlib.Path as well as a str."""
    saved = full_checkpoint()
    config = gpt.ModelConfig(**saved["config"])
    model, optimizer, _ = trained_model(config, steps=1)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / "latest.pt"
    gpt.save_checkpoint(model, optimizer, 1, path, config=saved["config"],
                        tokenizer=saved["tokenizer"])
    assert gpt.newest_checkpoint(run_dir) == str(path)
    assert gpt.load_checkpoint(path, gpt.TransformerLM(config)) == 1
    restored, tokenizer = gpt.load_for_sampling(path, torch.device("cpu"))
    assert torch.equal(restored.state_dict()[next(iter(saved["model"]))],
                       model.state_dict()[next(iter(saved["model"]))])
    assert tokenizer.encode("hi" + EOT) == [104, 105, 256]
    assert gpt.remove_stale_temp_files(run_dir) == [] and os.listdir(run_dir) == ["latest.pt"]


def test_sample_readable_encodes_with_the_plain_tokenizer(tmp_path, capsys, monkeypatch):
    """`sample --readable` encodes the prompt with §1's plain Tokenizer, `sample` with its fast
    twin, and afterwards the name Tokenizer stands for the fast twin again."""
    torch.save(full_checkpoint(), tmp_path / "ckpt.pt")
    used = []
    for cls in (PlainTokenizer, gpt.FastTokenizer):
        monkeypatch.setattr(cls, "encode", lambda self, text, cls=cls, encode=cls.encode:
                            used.append(cls) or encode(self, text))
    for flags, expected in ((["--readable"], PlainTokenizer), ([], gpt.FastTokenizer)):
        used.clear()
        assert gpt.main(["sample", "--checkpoint", str(tmp_path / "ckpt.pt"), "--prompt", "Hi",
                         "--max-new-tokens", "2", "--device", "cpu", *flags]) == 0
        assert used and set(used) == {expected}
        assert gpt.Tokenizer is gpt.FastTokenizer
    capsys.readouterr()


def load_as(use: str, path: str):
    """Read a checkpoint as `use` needs it: any use, `train --resume`, or `sample`."""
    if use == "read":
        return gpt.read_checkpoint(path)
    if use == "resume":
        return gpt.check_resumable(gpt.read_checkpoint(path), path)
    return gpt.load_for_sampling(path, torch.device("cpu"))


def test_full_checkpoint_passes_every_check(tmp_path):
    """A checkpoint of the shape `train` writes is fit for resuming and for sampling."""
    torch.save(full_checkpoint(), tmp_path / "ckpt.pt")
    for use in ("read", "resume", "sample"):
        load_as(use, str(tmp_path / "ckpt.pt"))


# Each case: the use that must refuse the file, the part to replace, its new value (a function of
# the right value), and a word the message must hold.
BAD_STRUCTURES = {
    "model-str": ("read", "model", lambda v: "str", "model state"),
    "model-float": ("read", "model", lambda v: {**v, "layers.0.ln1.weight": 1.0}, "model state"),
    "model-int-key": ("read", "model", lambda v: {0: torch.zeros(3)}, "model state"),
    "iteration-str": ("read", "iteration", lambda v: "7", "iteration"),
    "iteration-negative": ("read", "iteration", lambda v: -1, "iteration"),
    "iteration-bool": ("read", "iteration", lambda v: True, "iteration"),
    "rng-short": ("resume", "rng", lambda v: [torch.zeros(3)], "rng"),
    "rng-float": ("resume", "rng", lambda v: [v[0].float()], "rng"),
    "rng-empty": ("resume", "rng", lambda v: [], "rng"),
    "rng-tensor": ("resume", "rng", lambda v: v[0], "rng"),
    "optimizer-list": ("resume", "optimizer", lambda v: [], "optimizer"),
    "optimizer-lr-str": ("resume", "optimizer", lambda v: {**v, "param_groups": [
        {**v["param_groups"][0], "lr": "fast"}]}, "optimizer"),
    "optimizer-no-moments": ("resume", "optimizer", lambda v: {**v, "state": {0: {"step": 1}}},
                             "optimizer"),
    "optimizer-muon-no-momentum": ("resume", "optimizer", lambda v: {**v, "param_groups": [
        {**v["param_groups"][0], "optimizer": "muon"}]}, "optimizer"),
    "args-optimizer": ("resume", "args", lambda v: {**v, "optimizer": "sgd"}, "optimizer"),
    "config-str": ("resume", "config", lambda v: "tiny", "config"),
    "config-unknown": ("resume", "config", lambda v: {**v, "colour": "red"}, "colour"),
    "config-float-width": ("resume", "config", lambda v: {**v, "d_model": 32.0}, "d_model"),
    "config-str-bool": ("resume", "config", lambda v: {**v, "tie_embeddings": "no"},
                        "tie_embeddings"),
    "config-missing": ("resume", "config", lambda v: {k: v[k] for k in v if k != "d_ff"},
                       "d_ff"),
    "best-str": ("resume", "best_val_loss", lambda v: "low", "best_val_loss"),
    "best-nan": ("resume", "best_val_loss", lambda v: math.nan, "best_val_loss"),
    "total-float": ("resume", "total_steps", lambda v: 2.5, "total_steps"),
    "args-list": ("resume", "args", lambda v: [], "args"),
    "args-preset": ("resume", "args", lambda v: {**v, "preset": "huge"}, "preset"),
    "args-batch-str": ("resume", "args", lambda v: {**v, "batch_size": "8"}, "batch_size"),
    "args-lr-str": ("resume", "args", lambda v: {**v, "lr": "1e-3"}, "lr"),
    "tokenizer-str": ("sample", "tokenizer", lambda v: "gpt2", "tokenizer"),
    "tokenizer-str-tokens": ("sample", "tokenizer",
                             lambda v: {**v, "vocab": {i: "x" for i in range(257)}}, "tokenizer"),
    "tokenizer-bad-merge": ("sample", "tokenizer", lambda v: {**v, "merges": [(b"a",)]},
                            "tokenizer"),
    "tokenizer-no-bytes": ("sample", "tokenizer", lambda v: {**v, "vocab": {0: b"a"}},
                           "tokenizer"),
    "tokenizer-larger": ("sample", "tokenizer", lambda v: {**v, "special_tokens": [EOT, "<x>"]},
                         "vocabulary"),
    "config-million-layers": ("sample", "config", lambda v: {**v, "num_layers": 10**6},
                              "num_layers 1,000,000, more than"),
    "config-huge-vocab": ("sample", "config", lambda v: {**v, "vocab_size": 10**9},
                          "vocab_size 1,000,000,000"),
    "config-huge-context": ("resume", "config", lambda v: {**v, "context_length": 10**7},
                            "context_length"),
    "config-more-layers": ("sample", "config", lambda v: {**v, "num_layers": 2},
                           "asks for 2 layers, but its weights hold 1"),
    "config-larger-vocab": ("sample", "config", lambda v: {**v, "vocab_size": 70_000},
                            "different architecture"),
    "config-wider": ("resume", "config", lambda v: {**v, "d_model": 64, "num_heads": 2,
                                                    "num_kv_heads": 2, "head_dim": 32},
                     "different architecture"),
    "config-kv-heads-text": ("sample", "config", lambda v: {**v, "num_kv_heads": "2"},
                             "num_kv_heads should be of type int | None"),
    "config-kv-heads-uneven": ("sample", "config", lambda v: {**v, "num_kv_heads": 3},
                               "not divisible by num_kv_heads 3"),
    "config-fewer-kv-heads": ("sample", "config", lambda v: {**v, "num_kv_heads": 2},
                              "different architecture"),
    "config-huge-head-dim": ("sample", "config", lambda v: {**v, "head_dim": 10**6},
                             "head_dim 1,000,000, more than"),
    "config-qk-norm": ("resume", "config", lambda v: {**v, "qk_norm": True},
                       "different architecture"),
    "config-rope-factor": ("sample", "config", lambda v: {**v, "rope_factor": 0.5},
                           "rope_factor"),
    "sample-config": ("sample", "config", lambda v: {**v, "ffn_kind": 3}, "ffn_kind"),
    "model-nan": ("read", "model", lambda v: {**v, "layers.0.ln1.weight": math.nan * v[
        "layers.0.ln1.weight"]}, "its weights layers.0.ln1.weight hold NaN"),
    "model-inf": ("resume", "model", lambda v: {**v, "layers.0.ln2.weight": math.inf * v[
        "layers.0.ln2.weight"]}, "its weights layers.0.ln2.weight hold infinite values"),
    "config-inf-theta": ("sample", "config", lambda v: {**v, "rope_theta": math.inf},
                         "rope_theta (inf) and norm_eps (1e-05) must be positive and finite"),
    "config-inf-eps": ("resume", "config", lambda v: {**v, "norm_eps": math.inf},
                       "norm_eps (inf) must be positive and finite"),
}


@pytest.mark.parametrize("use, key, change, named", BAD_STRUCTURES.values(),
                         ids=BAD_STRUCTURES.keys())
def test_checkpoint_of_wrong_structure_is_refused(tmp_path, use, key, change, named):
    """A checkpoint that unpickles but has a part of the wrong type or shape is refused by the
    use that needs that part: one ValueError naming the file and the part."""
    checkpoint = full_checkpoint()
    checkpoint[key] = change(checkpoint[key])
    path = str(tmp_path / "ckpt.pt")
    torch.save(checkpoint, path)
    with pytest.raises(ValueError) as error:
        load_as(use, path)
    message = str(error.value)
    assert path in message and named in message and "\n" not in message, message


@pytest.mark.parametrize("command", [["sample", "--prompt", "Once"],
                                     ["inspect", "--prompt", "Once upon", "--out-dir", "."],
                                     ["export", "--out", "hf"],
                                     ["finetune", "--data", "qa.json", "--out-dir", "ft"]],
                         ids=["sample", "inspect", "export", "finetune"])
def test_commands_refuse_a_checkpoint_with_nan_weights(tmp_path, monkeypatch, capsys, command):
    """A checkpoint whose weights hold a NaN is sampled from, inspected, exported and fine-tuned
    by none: one line naming the tensor, and nothing written."""
    checkpoint = full_checkpoint()
    checkpoint["model"]["layers.0.attn.q_proj.weight"][3, 5] = math.nan
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    (tmp_path / "qa.json").write_text(json.dumps([{"question": "Who?", "answer": "Max."}] * 4))
    monkeypatch.chdir(tmp_path)
    assert exit_code([*command, "--checkpoint", "ckpt.pt"]) == 2
    assert one_error_line(capsys, command[0]).endswith(
        "ckpt.pt: its weights layers.0.attn.q_proj.weight hold NaN, as those of a diverged run "
        "do: refused")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "qa.json"]


def test_config_is_checked_against_the_weights_before_allocating(tmp_path, monkeypatch):
    """A config that disagrees with the weights is refused before a model is built."""
    checkpoint = full_checkpoint()
    checkpoint["config"]["d_ff"] *= 1000
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    built, build = [], gpt.TransformerLM.__init__

    def recording_build(self, config):
        built.append(torch.empty(0).device.type)  # where tensors would be made
        build(self, config)
    monkeypatch.setattr(gpt.TransformerLM, "__init__", recording_build)
    with pytest.raises(ValueError, match="different architecture"):
        gpt.load_for_sampling(str(tmp_path / "ckpt.pt"), torch.device("cpu"))
    assert built == ["meta"]  # the only model made: the shapes, without memory


@pytest.mark.parametrize("value, expected", [(None, ""), ("\n", "\n"), ("", ""),
                                             ("Once", None), (7, None), ("\n" * 17, None)])
def test_saved_story_start_is_a_little_whitespace(value, expected):
    """A checkpoint's story_start is whitespace of 16 characters at most; one without it (an
    older gpt.py's) starts prompts right after the end token, as before."""
    checkpoint = {} if value is None else {"story_start": value}
    if expected is None:
        with pytest.raises(ValueError, match="^ckpt.pt: its story_start is"):
            gpt.saved_story_start(checkpoint, "ckpt.pt")
    else:
        assert gpt.saved_story_start(checkpoint, "ckpt.pt") == expected

# --- An imported model's checkpoint: another layout's tokenizer, and generation settings ---------
# The chat templates of HuggingFaceTB/SmolLM2-135M-Instruct and of Qwen3 (Qwen/Qwen3-0.6B), as
# their tokenizer_config.json holds them: data, to check what chat_format reads from them.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN3_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' "
    "%}\n        {{- messages[0].content + '\\n\\n' }}\n    {%- endif %}\n    {{- \"# Tools\\n\\n"
    "You may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool "
    "in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    "
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n'"
    " + messages[0].content + '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- set ns = "
    "namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n{%- for message in"
    " messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n    {%- if "
    "ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_"
    "response>') and message.content.endswith('</tool_response>')) %}\n        {%- set ns.multi_"
    "step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or "
    "(message.role == \"system\" and not loop.first) %}\n        {{- '<|im_start|>' + "
    "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role"
    " == \"assistant\" %}\n        {%- set content = message.content %}\n        {%- set "
    "reasoning_content = '' %}\n        {%- if message.reasoning_content is defined and "
    "message.reasoning_content is not none %}\n            {%- set reasoning_content = "
    "message.reasoning_content %}\n        {%- else %}\n            {%- if '</think>' in "
    "message.content %}\n                {%- set content = message.content.split('</think>')[-1]"
    ".lstrip('\\n') %}\n                {%- set reasoning_content = message.content.split("
    "'</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n            {%- endif "
    "%}\n        {%- endif %}\n        {%- if loop.index0 > ns.last_query_index %}\n            "
    "{%- if loop.last or (not loop.last and reasoning_content) %}\n                {{- "
    "'<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n            {%- else %}\n                "
    "{{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n        "
    "{%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        "
    "{%- endif %}\n        {%- if message.tool_calls %}\n            {%- for tool_call in "
    "message.tool_calls %}\n                {%- if (loop.first and content) or (not loop.first) "
    "%}\n                    {{- '\\n' }}\n                {%- endif %}\n                {%- if "
    "tool_call.function %}\n                    {%- set tool_call = tool_call.function %}\n"
    "                {%- endif %}\n                {{- '<tool_call>\\n{\"name\": \"' }}\n"
    "                {{- tool_call.name }}\n                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n                    {{- "
    "tool_call.arguments }}\n                {%- else %}\n                    {{- "
    "tool_call.arguments | tojson }}\n                {%- endif %}\n                {{- '}\\n"
    "</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n        {{- "
    "'<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if loop.first or "
    "(messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}"
    "\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + "
    "1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    "
    "{%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>"
    "assistant\\n' }}\n    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n    {%- endif %}\n{%- endif %}\n")
# A Llama 3 Instruct template's start: not ChatML, kept for export and refused for a chat.
LLAMA3_CHAT_TEMPLATE = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>'"
                        " + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + "
                        "'<|eot_id|>' }}{%- endfor %}")
CHATML_SPECIALS = [EOT, "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]  # ids 256-259


def chat_tokenizer(layout: str = "llama3") -> gpt.Tokenizer:
    """Bytes as tokens, then ChatML's special tokens and a bos, with a layout's settings."""
    return gpt.Tokenizer(BYTES_VOCAB, [], CHATML_SPECIALS, **LAYOUTS[layout])


def imported_checkpoint(path, template: str | None = SMOLLM2_TEMPLATE, layout: str = "llama3",
                        **generation) -> tuple:
    """A random tiny model saved as `import` saves one: a tokenizer of another layout, and the
    generation settings read_hf_tokenizer gives (bos <|begin_of_text|>, eos <|endoftext|> and
    <|im_end|>)."""
    tokenizer = chat_tokenizer(layout)
    settings = {"bos_ids": [259], "eos_ids": [256, 258],
                "chat": gpt.chat_format(template, tokenizer), **generation}
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(vocab_size=260, context_length=64))
    gpt.save_weights_only(model.state_dict(), model.config, tokenizer, 0, str(path),
                          generation=settings)
    return tokenizer, settings


def test_checkpoint_keeps_tokenizer_settings_and_generation(tmp_path, tokenizer):
    """A checkpoint stores a tokenizer's settings and the generation settings when it has them,
    and reads both back; ours store the three keys they always did, and no generation."""
    original, generation = imported_checkpoint(tmp_path / "imported.pt")
    model, loaded, checkpoint = gpt.read_model(str(tmp_path / "imported.pt"))
    assert loaded.settings() == LAYOUTS["llama3"] and loaded.fingerprint() == original.fingerprint()
    assert model.config.vocab_size == 260 and max(loaded.vocab) == 259
    assert gpt.saved_generation(checkpoint["generation"], loaded, "x") == generation
    ours = gpt.TransformerLM(tiny_config(vocab_size=257))
    gpt.save_weights_only(ours.state_dict(), ours.config, gpt.Tokenizer(BYTES_VOCAB, [], [EOT]), 0,
                          str(tmp_path / "o.pt"))
    checkpoint = gpt.read_checkpoint(str(tmp_path / "o.pt"))
    assert checkpoint["tokenizer"].keys() == {"vocab", "merges", "special_tokens"}
    assert "generation" not in checkpoint
    assert gpt.saved_generation(checkpoint.get("generation"), loaded, "x") is None


@pytest.mark.parametrize("part, key, value, named", [
    ("generation", "eos_ids", [10**6], "generation settings are damaged"),
    ("generation", "bos_ids", [True], "generation settings are damaged"),
    ("generation", "chat", {"before": "", "after": "", "end": "<|x|>", "template": ""},
     "generation settings are damaged"),
    ("generation", "extra", 1, "generation settings are damaged"),
    ("tokenizer", "normalizer", "NFKC", "damaged tokenizer settings"),
    ("tokenizer", "lowercase", True, "damaged tokenizer settings"),
    ("tokenizer", "split_patterns", ["(x"], "not a regular expression"),
])
def test_damaged_generation_or_tokenizer_settings_are_one_line(tmp_path, capsys, part, key,
                                                               value, named):
    """A checkpoint whose generation settings or tokenizer settings are damaged is refused with
    one line and exit code 2."""
    imported_checkpoint(tmp_path / "imported.pt")
    checkpoint = torch.load(tmp_path / "imported.pt", weights_only=True)
    checkpoint[part][key] = value
    torch.save(checkpoint, tmp_path / "damaged.pt")
    capsys.readouterr()
    assert gpt.main(["sample", "--checkpoint", str(tmp_path / "damaged.pt"), "--prompt", "x",
                     "--max-new-tokens", "2"]) == 2
    assert named in one_error_line(capsys, "sample")


def test_optimizer_state_of_another_shape_is_refused(tmp_path):
    """Moments whose shapes do not match the parameters are refused when restored."""
    checkpoint = full_checkpoint()
    states = checkpoint["optimizer"]["state"]
    states[0], states[1] = states[1], states[0]  # embedding and first norm: (257, 32), (32,)
    path = str(tmp_path / "ckpt.pt")
    torch.save(checkpoint, path)
    model = gpt.TransformerLM(gpt.ModelConfig(**checkpoint["config"]))
    with pytest.raises(ValueError, match="optimizer's exp_avg has shape"):
        gpt.load_checkpoint(path, model, gpt.AdamW(model.parameters()))
    del checkpoint["optimizer"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="optimizer state is None"):
        gpt.load_checkpoint(path, model, gpt.AdamW(model.parameters()))


UNPICKLED = []


def _record_unpickling():
    """Called only if a pickle is allowed to run code while loading."""
    UNPICKLED.append(True)


class CodeOnLoad:
    """An object whose unpickling calls a function: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (_record_unpickling, ())


class SystemCallOnLoad:
    """An object whose unpickling calls a function of a module torch blocks by name (posix)."""

    def __reduce__(self):
        return (os.getpid, ())


@pytest.mark.parametrize("payload, named", [(CodeOnLoad(), "_record_unpickling"),
                                            (SystemCallOnLoad(), "posix.getpid")])
def test_checkpoint_with_arbitrary_object_is_refused(tmp_path, payload, named):
    """A pickle of an arbitrary object is refused (weights_only=True), runs no code, and the
    message says it could have, naming the function, not that the file is damaged."""
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "iteration": 0, "payload": payload}, path)
    with pytest.raises(ValueError) as error:
        gpt.read_checkpoint(str(path))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert "could run code" in str(error.value) and named in str(error.value)
    assert "damaged" not in str(error.value)
    assert UNPICKLED == []


def test_save_checkpoint_leaves_no_temporary_file(tmp_path):
    """Saving twice to one path leaves exactly that file in the directory, the second version."""
    model, optimizer, _ = trained_model(tiny_config(num_layers=1), steps=1)
    gpt.save_checkpoint(model, optimizer, 1, str(tmp_path / "ckpt.pt"))
    gpt.save_checkpoint(model, optimizer, 2, str(tmp_path / "ckpt.pt"))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert gpt.read_checkpoint(str(tmp_path / "ckpt.pt"))["iteration"] == 2


# A full disk fails a write with an OSError, or inside torch's zip writer with a RuntimeError.
@pytest.mark.parametrize("error, named", [
    (OSError("No space left on device"), "No space left"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 65088 vs 64976"),
     "disk full"),
], ids=["oserror", "runtimeerror"])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, error, named):
    """If writing fails half-way, the previous checkpoint is still there, whole, and loads; the
    error is an OSError naming the file."""
    config = tiny_config(num_layers=1)
    model, optimizer, (x, y) = trained_model(config, steps=1)
    path = str(tmp_path / "ckpt.pt")
    gpt.save_checkpoint(model, optimizer, 1, path)
    saved = (tmp_path / "ckpt.pt").read_bytes()
    saved_state = copy.deepcopy(model.state_dict())
    train_on_batch(model, optimizer, x, y, steps=1)  # the model moves on

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match=named) as raised:
        gpt.save_checkpoint(model, optimizer, 2, path)
    monkeypatch.undo()
    assert path in str(raised.value) and "\n" not in str(raised.value)

    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert (tmp_path / "ckpt.pt").read_bytes() == saved
    restored = gpt.TransformerLM(config)
    assert gpt.load_checkpoint(path, restored) == 1
    for name, tensor in saved_state.items():
        assert torch.equal(restored.state_dict()[name], tensor), name


# Saves a checkpoint, then saves again over it with the file-size limit below its size. With
# SIGXFSZ ignored, a write past the limit fails with EFBIG, as a write to a full disk fails.
DISK_FULL_SCRIPT = """
import os, resource, signal, sys
import gpt, torch
path = sys.argv[1]
torch.manual_seed(0)
model = gpt.TransformerLM(gpt.ModelConfig(64, 16, 32, 1, 4, 48))
optimizer = gpt.AdamW(model.parameters())
gpt.save_checkpoint(model, optimizer, 1, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) // 2, resource.RLIM_INFINITY))
try:
    gpt.save_checkpoint(model, optimizer, 2, path)
except OSError as e:
    print(e)
    sys.exit(2)
"""


@pytest.mark.skipif(os.name != "posix", reason="file-size limits are POSIX")
def test_save_past_a_real_size_limit_is_one_line_oserror(tmp_path):
    """A save that runs out of space raises an OSError naming the file, removes its temporary
    file, and leaves the previous checkpoint whole."""
    path = str(tmp_path / "ckpt.pt")
    result = subprocess.run([sys.executable, "-B", "-c", DISK_FULL_SCRIPT, path], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": HERE})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and path in lines[0] and "could not write" in lines[0], result.stdout
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    model = gpt.TransformerLM(gpt.ModelConfig(64, 16, 32, 1, 4, 48))
    assert gpt.load_checkpoint(path, model, gpt.AdamW(model.parameters())) == 1


@pytest.mark.skipif(os.name != "posix", reason="processes are asked about with os.kill(pid, 0)")
def test_remove_stale_temp_files_removes_only_those_of_ended_processes(tmp_path):
    """A temporary checkpoint whose process has ended is removed; one of a running process (this
    one, its parent), anything that is not such a file, and every other file stay."""
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    stale = [f"latest.pt.tmp-{ended.pid}", f"best.pt.tmp-{ended.pid}"]
    kept = [f"latest.pt.tmp-{os.getpid()}", f"best.pt.tmp-{os.getppid()}", "latest.pt",
            "metrics.jsonl", "latest.pt.tmp-0", f"latest.pt.tmp-{10**30}", "notes.tmp-x",
            f"latest.pt.tmp-{ended.pid}.bak"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / f"folder.tmp-{ended.pid}").mkdir()
    assert gpt.remove_stale_temp_files(str(tmp_path)) == sorted(str(tmp_path / n) for n in stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + [f"folder.tmp-{ended.pid}"])


# ==================================================================================================
# §12 Devices, precision and several processes
# ==================================================================================================

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA check needs a CUDA GPU"))]


def bf16_rounding(model, x, y) -> float:
    """How far bf16 autocast moves the gradients from float32's, eager both: the worst relative
    difference over the parameters."""
    grads = []
    for amp in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp is not None):
            logits = model(x)
        gpt.cross_entropy(logits, y).backward()
        grads.append([p.grad.float() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return max(((b - a).norm() / a.norm()).item() for a, b in zip(*grads))


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_model_and_loss_give_the_eager_gradients(device, amp):
    """torch.compile of the whole model and the loss computes every parameter's gradient as
    eager mode does: in float32 within 1e-4 (relative); in bf16 autocast, where compiled and
    eager code round at different places, within twice what bf16 itself changes (about 1e-2)."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(vocab_size=256, context_length=32)).to(device)
    x = torch.randint(0, 256, (4, 32), device=device)
    y = torch.roll(x, -1, 1)
    tolerance = 1e-4 if amp is None else 2 * bf16_rounding(model, x, y)
    torch._dynamo.reset()  # compile afresh: no kernels cached by another test
    error, name = gpt.compiled_gradient_error(model, torch.compile(model),
                                              torch.compile(gpt.cross_entropy), x, y, amp)
    assert error <= tolerance, f"{name}: relative gradient difference {error:.1e}"
    assert all(p.grad is None for p in model.parameters())


def test_compiled_gradient_error_sees_a_wrong_gradient():
    """The check that guards --compile notices a gradient that is off, and names its owner."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config())
    x = torch.randint(0, 64, (2, 16))

    def halved_embedding_grad(ids):  # a "compiled" model with a wrong embedding gradient
        logits = model(ids)
        model.token_embeddings.weight.register_hook(lambda g: g / 2)
        return logits

    error, name = gpt.compiled_gradient_error(model, halved_embedding_grad, gpt.cross_entropy,
                                              x, torch.roll(x, -1, 1))
    assert (name, round(error, 6)) == ("token_embeddings.weight", 0.5)


@pytest.mark.parametrize("error, falls_back", [(0.0, False), (1.0, True)])
def test_train_compile_falls_back_to_eager_when_gradients_differ(tmp_path, token_dir, capsys,
                                                                 monkeypatch, error, falls_back):
    """With --compile, a batch's compiled gradients are checked against eager ones first; when
    they differ, one line says so and training goes on uncompiled."""
    monkeypatch.setattr(torch, "compile", lambda f: f)  # the check itself is tested above
    monkeypatch.setattr(gpt, "compiled_gradient_error",
                        lambda *args: (error, "token_embeddings.weight"))
    assert gpt.main(train_args(token_dir, tmp_path, "--compile", "--max-steps", "2")) == 0
    said = "torch.compile changed the gradients (token_embeddings.weight" in capsys.readouterr().out
    assert said == falls_back


def test_train_goes_on_uncompiled_when_the_compiler_fails(token_dir, tmp_path, monkeypatch,
                                                          capsys):
    """A compiler that fails (no C++ compiler, say) costs one line, not the run."""
    def fail(*args):
        raise RuntimeError("InductorError: no working C++ compiler found. Install one")
    monkeypatch.setattr(torch, "compile", lambda f: f)
    monkeypatch.setattr(gpt, "compiled_gradient_error", fail)
    assert gpt.main(train_args(token_dir, tmp_path, "--compile", "--max-steps", "2")) == 0
    assert ("torch.compile failed (RuntimeError: InductorError: no working C++ compiler found); "
            "training without it") in capsys.readouterr().out


@pytest.mark.parametrize("given, decay, beta2", [
    ([], 0.3, 0.99), (["--preset", "base"], 0.1, 0.95),
    (["--weight-decay", "0.05", "--beta2", "0.9"], 0.05, 0.9)])
def test_weight_decay_and_beta2_come_from_the_preset_unless_given(token_dir, tmp_path, given,
                                                                  decay, beta2):
    """The laptop preset decays its matrices by 0.3 and averages squared gradients with beta2
    0.99; the others take GPT-3's 0.1 and 0.95; the flags win. Norms' gains are never decayed."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "1", *given)) == 0
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)
    # AdamW's groups (beside Muon's, in the laptop recipe): the matrices, then the gains.
    groups = [g for g in saved["optimizer"]["param_groups"] if g.get("optimizer") != "muon"]
    assert [g["weight_decay"] for g in groups] == [decay, 0.0]
    assert [g["betas"][1] for g in groups] == [beta2, beta2]
    assert (saved["args"]["weight_decay"], saved["args"]["beta2"]) == (decay, beta2)


@pytest.mark.parametrize("device, given, expected, explained", [
    ("cpu", {}, dict(preset="laptop", batch_size=None, compile=False), False),
    ("cpu", dict(compile=True), dict(preset="laptop", batch_size=None, compile=True), False),
    ("cpu", dict(max_time=600.0), dict(preset="laptop", batch_size=None, compile=True), False),
    ("cpu", dict(max_time=60.0), dict(preset="laptop", batch_size=None, compile=False), False),
    ("cpu", dict(max_time=600.0, compile=False), dict(compile=False), False),
    ("cuda", {}, dict(preset="base", batch_size=128, compile=True), True),
    ("cuda", dict(batch_size=64, compile=False), dict(preset="base", batch_size=64,
                                                      compile=False), True),
    ("cuda", dict(preset="laptop"), dict(preset="laptop", batch_size=None, compile=True), False),
    ("mps", {}, dict(preset="laptop", batch_size=None, compile=False), False),
    ("cuda", dict(readable=True), dict(preset="base", batch_size=128, compile=False), True),
])
def test_pick_recipe_by_device(device, given, expected, explained):
    """The laptop recipe on CPUs and Macs, compiled on a CPU for time budgets of 5 minutes or
    more; on CUDA the GPU recipe, unless a --preset is given; what the user gives always stands;
    --readable is never compiled."""
    args = argparse.Namespace(**{**dict(preset=None, batch_size=None, compile=None,
                                        max_time=None, readable=False), **given})
    said = gpt.pick_recipe(args, torch.device(device))
    assert {k: getattr(args, k) for k in expected} == expected
    assert (said is not None) == explained


def test_rank_device_one_gpu_per_process(monkeypatch):
    """torchrun's process i takes cuda:i; more processes than GPUs is one clear line."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert gpt.rank_device(torch.device("cpu"), 1, 2) == torch.device("cpu")
    assert gpt.rank_device(torch.device("cuda"), 0, 1) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"2 processes on a machine with 1 GPU.*"
                                         r"--nproc_per_node 1"):
        gpt.rank_device(torch.device("cuda"), 0, 2)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_torchrun_two_cpu_processes_train_and_agree(tmp_path, token_dir, optimizer):
    """Under torchrun, 2 gloo ranks train together and end with identical weights, with AdamW
    or with Muon (each rank orthogonalizes the same averaged gradient)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", os.path.join(HERE, "gpt.py"),
               *train_args(token_dir, tmp_path, "--max-steps", "4", "--optimizer", optimizer)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "x 2 ranks" in result.stdout
    assert "all 2 ranks hold identical weights" in result.stdout
    assert result.stdout.count("done: 4 steps") == 1  # rank 0 alone reports
    assert len(torch.load(tmp_path / "latest.pt", weights_only=True)["rng"]) == 2


# ==================================================================================================
# §13 Time budgets and signals
# ==================================================================================================

def test_time_budget_plan_hand_example(monkeypatch):
    """The docstring's example: 60 s left at step 100, 0.5 s a step, 2 s of evaluation and
    checkpoints every 250 steps -> the schedule ends at step 214."""
    clock = [1000.0]
    monkeypatch.setattr(gpt.time, "perf_counter", lambda: clock[0])
    budget = gpt.TimeBudget(100.0)
    budget.step_seconds = [9.0, 9.0] + [0.5] * 60  # the first two (compiling) are not counted
    budget.eval_seconds, budget.save_seconds = 1.0, 0.5
    clock[0] += 40.0
    assert budget.plan(100, eval_interval=250) == 100 + int(58 / (0.5 + 2 / 250)) == 214
    assert not budget.is_over()
    clock[0] += 58.0
    assert budget.is_over()  # only the 2 s for the final evaluation and checkpoints are left
    assert gpt.TimeBudget(100.0).plan(5, 250) is None  # no step timed yet: no plan


class FakeClock:
    """time.perf_counter for gpt.py, moved on by the steps and evaluations it times."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_time_budget_is_planned_again_when_the_machine_slows_down(tmp_path, token_dir,
                                                                  monkeypatch, capsys):
    """A run whose steps slow from 0.1 s to 0.3 s halfway still ends its cosine at --min-lr,
    and ends, final evaluation and checkpoint included, within its budget and near it."""
    clock = FakeClock()
    monkeypatch.setattr(gpt, "time", clock)
    train_step, evaluate = gpt.train_step, gpt.evaluate

    def slowing_step(*args, **kwargs):
        clock.now += 0.1 if clock.now < 8 else 0.3
        return train_step(*args, **kwargs)

    def timed_evaluate(*args, **kwargs):
        clock.now += 0.5
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(gpt, "train_step", slowing_step)
    monkeypatch.setattr(gpt, "evaluate", timed_evaluate)
    args = [a for a in train_args(token_dir, tmp_path) if a not in ("--max-steps", "6")]
    assert gpt.main(args + ["--max-time", "20s", "--eval-interval", "25", "--lr", "1e-3",
                            "--min-lr", "1e-4", "--log-interval", "1"]) == 0
    first_plan = int(re.search(r"planned (\d+) steps", capsys.readouterr().out).group(1))
    logged = [m for m in metrics(tmp_path) if "lr" in m]
    # The last step's rate is the cosine's value one step before its end: within 1% of min.
    assert 1e-4 <= logged[-1]["lr"] < 1.01e-4
    evaluations = [m for m in metrics(tmp_path) if "val_loss" in m]
    assert 18.5 <= evaluations[-1]["elapsed"] <= 20  # 1.5 s kept for evaluation and saves
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert checkpoint["finished"] and checkpoint["total_steps"] == logged[-1]["step"]
    # The plan made from the first, fast steps asked for many more steps than there was time for.
    assert logged[-1]["step"] < first_plan - 10


def press_ctrl_c_at_call(monkeypatch, name: str, n: int):
    """Make the n-th call of gpt.<name> (a batch sampler, say) first raise SIGINT, as if the
    user pressed Ctrl-C just then. Returns the original, to put back."""
    original, calls = getattr(gpt, name), []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(gpt, name, interrupting)
    return original


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, token_dir, monkeypatch,
                                                        capsys):
    """Ctrl-C finishes the step, saves, exits 2 with one line; --resume then matches a straight
    run."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert gpt.main(train_args(token_dir, straight, "--decay-steps", "6")) == 0
    get_batch = press_ctrl_c_at_call(monkeypatch, "get_batch", 4)  # in step 4
    capsys.readouterr()
    assert gpt.main(train_args(token_dir, stopped, "--decay-steps", "6")) == 2
    err = capsys.readouterr().err
    assert "interrupted at step 4" in err and "--resume" in err and "Traceback" not in err
    assert torch.load(stopped / "latest.pt", weights_only=True)["iteration"] == 4
    monkeypatch.setattr(gpt, "get_batch", get_batch)
    assert gpt.main(train_args(token_dir, stopped, "--decay-steps", "6", "--resume")) == 0
    assert_same_weights(final_weights(straight), final_weights(stopped))


def start_training(token_dir, out_dir) -> subprocess.Popen:
    """`gpt.py train` in its own process, for real signals; returns once it is past step 1."""
    command = [sys.executable, os.path.join(HERE, "gpt.py"),
               *train_args(token_dir, out_dir, "--max-steps", "100000", "--eval-interval",
                           "100000")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:
        if line.startswith("step      1/"):
            return process
    raise AssertionError(process.stderr.read())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_exits_2(tmp_path, token_dir, signum):
    """SIGTERM (kill, schedulers, preemption) is treated like Ctrl-C: the step finishes, latest.pt
    is saved, the process exits 2 with one line, and --resume goes on from there."""
    process = start_training(token_dir, tmp_path)
    assert (tmp_path / "gpt.lock").read_text().strip() == str(process.pid)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and f"{signal.Signals(signum).name}: interrupted" in lines[-1]
    step = torch.load(tmp_path / "latest.pt", weights_only=True)["iteration"]
    assert f"at step {step}: saved" in lines[-1] and step >= 1
    assert not (tmp_path / "gpt.lock").exists()  # released on the way out


def test_second_ctrl_c_while_reporting_still_exits_2(tmp_path, token_dir, monkeypatch, capsys):
    """A second Ctrl-C that arrives while the first is being reported cannot make the process
    die by the signal (exit -2): further signals are ignored until it exits with code 2."""
    log = gpt.log

    def log_and_interrupt(message, end="\n"):
        if "interrupted" in message:
            signal.raise_signal(signal.SIGINT)
        log(message, end)

    monkeypatch.setattr(gpt, "log", log_and_interrupt)
    press_ctrl_c_at_call(monkeypatch, "get_batch", 1)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in the background
    assert gpt.main(train_args(token_dir, tmp_path)) == 2
    assert "interrupted at step 1" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # restored after main


# ==================================================================================================
# §14 The training run
# ==================================================================================================

def test_train_command_end_to_end(tmp_path, token_dir, capsys):
    """`train` logs every step, evaluates on schedule, and writes checkpoints and metrics."""
    assert gpt.main(train_args(token_dir, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "context_length=16" in out and "done: 6 steps" in out
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in metrics(tmp_path) if "val_loss" in m] == [0, 3, 6]
    assert all(math.isfinite(loss) for loss in train_losses(tmp_path).values())
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert checkpoint["iteration"] == 6 and checkpoint["config"]["d_model"] == 32
    assert checkpoint["tokenizer"]["special_tokens"] == [EOT]
    assert (tmp_path / "best.pt").exists()
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "latest.pt", "metrics.jsonl"]


def without_flags(argv: list[str], *flags: str) -> list[str]:
    """argv without each of `flags` and the value after it."""
    argv = list(argv)
    for flag in flags:
        del argv[argv.index(flag):argv.index(flag) + 2]
    return argv


def test_time_budget_plan_keeps_time_for_the_evaluations_to_come(monkeypatch):
    """With evaluations at set times (eval_interval inf), the plan keeps the time of those
    still to come aside: the hand example's 60 s left, 0.5 s a step, 2 s an evaluation with
    its checkpoints, and 3 evaluations before the final one -> 100 + int((60 - 4 x 2) / 0.5)."""
    clock = [1000.0]
    monkeypatch.setattr(gpt.time, "perf_counter", lambda: clock[0])
    budget = gpt.TimeBudget(100.0)
    budget.step_seconds = [9.0, 9.0] + [0.5] * 60
    budget.eval_seconds, budget.save_seconds = 1.0, 0.5
    clock[0] += 40.0
    assert budget.plan(100, math.inf, evals_left=3) == 100 + int(52 / 0.5) == 204


@pytest.fixture
def fake_time(monkeypatch):
    """gpt.py's clock, moved on 0.1 s by each training step and 0.01 s by each validation batch
    of 4 windows (train_args' batch size); returns the clock and the windows of each evaluate."""
    clock, windows = FakeClock(), []
    train_step, evaluate = gpt.train_step, gpt.evaluate

    def timed_step(*args, **kwargs):
        clock.now += 0.1
        return train_step(*args, **kwargs)

    def timed_evaluate(model, data, starts, *args):
        clock.now += 0.01 * math.ceil(len(starts) / 4)
        windows.append(len(starts))
        return evaluate(model, data, starts, *args)

    monkeypatch.setattr(gpt, "time", clock)
    monkeypatch.setattr(gpt, "train_step", timed_step)
    monkeypatch.setattr(gpt, "evaluate", timed_evaluate)
    return clock, windows


def test_time_budget_evaluates_at_sixteenths_on_sized_batches(tmp_path, token_dir, fake_time,
                                                               capsys):
    """Under a time budget with no --eval-interval, a run evaluates at step 0, at the first step
    past each 1/16 of the budget and at the end, not every 250 steps; with no --eval-batches it
    times a batch and takes the most (5 here) that its 17 evaluations run in 5% of the budget,
    says what they cost, and keeps the count on --resume (no evaluation at the resume itself)."""
    _, windows = fake_time
    argv = without_flags(train_args(token_dir, tmp_path), "--max-steps", "--eval-interval",
                         "--eval-batches")
    assert gpt.main(argv + ["--max-time", "20s"]) == 0
    evaluations = [m for m in metrics(tmp_path) if "val_loss" in m]
    assert len(evaluations) == 17 and evaluations[0]["step"] == 0
    for k, record in enumerate(evaluations[1:16], 1):  # 20 s / 16 = 1.25 s apart
        assert k * 1.25 <= record["elapsed"] < k * 1.25 + 0.2
    assert windows[:3] == [4, 4, 4] and set(windows[3:]) == {5 * 4}  # timed, then 5 batches
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["args"]["eval_batches"] == 5
    # 3 timed batches, then 17 x 5 batches of 0.01 s in a 20 s run
    assert "; 17 evaluations took 0.9s (4.4% of the time)" in capsys.readouterr().out
    last_step, windows[:] = evaluations[-1]["step"], []
    assert gpt.main(argv + ["--resume", "--max-time", "5s"]) == 0
    assert set(windows) == {5 * 4}
    resumed = [m["step"] for m in metrics(tmp_path) if "val_loss" in m][17:]
    assert len(resumed) >= 4 and resumed[0] > last_step


def test_an_evaluation_that_outlasts_a_mark_is_not_followed_by_another_at_once(
        tmp_path, token_dir, fake_time, monkeypatch):
    """On a busy machine an evaluation may take longer than 1/16 of the budget: the next one
    waits for the first mark after it ends, rather than coming at the very next step."""
    clock, windows = fake_time
    evaluate = gpt.evaluate

    def one_slow_evaluate(*args):
        if len(windows) == 5:  # the third evaluation, after the three timed batches
            clock.now += 2.0  # longer than a mark of 20 s / 16 = 1.25 s
        return evaluate(*args)

    monkeypatch.setattr(gpt, "evaluate", one_slow_evaluate)
    argv = without_flags(train_args(token_dir, tmp_path), "--max-steps", "--eval-interval",
                         "--eval-batches")
    assert gpt.main(argv + ["--max-time", "20s"]) == 0
    steps = [m["step"] for m in metrics(tmp_path) if "val_loss" in m]
    assert len(steps) == 16  # one mark passed during the slow evaluation
    assert all(later - earlier > 1 for earlier, later in pairwise(steps[:-1]))


@pytest.mark.parametrize("extra, every", [(["--max-time", "20s", "--eval-interval", "50"], 50),
                                          (["--max-steps", "6"], 250)],
                         ids=["eval-interval-wins", "step-budget"])
def test_eval_interval_or_a_step_budget_evaluates_every_n_steps(tmp_path, token_dir, fake_time,
                                                                extra, every):
    """Given --eval-interval, or under --max-steps alone, a run evaluates every N steps (250 by
    default) and at the end, on 20 batches, as it always did."""
    _, windows = fake_time
    argv = without_flags(train_args(token_dir, tmp_path), "--max-steps", "--eval-interval",
                         "--eval-batches")
    assert gpt.main(argv + extra) == 0
    steps = [m["step"] for m in metrics(tmp_path) if "val_loss" in m]
    assert steps[:-1] == list(range(0, steps[-1], every))
    assert set(windows) == {20 * 4}
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)["args"]
    assert (saved["eval_interval"], saved["eval_batches"]) == (every, 20)


def test_progress_line_elapsed_plus_left_is_the_budget(tmp_path, token_dir, fake_time, capsys):
    """Under a time budget, the time a log line says is left is what is left of the budget."""
    argv = without_flags(train_args(token_dir, tmp_path), "--max-steps")
    assert gpt.main(argv + ["--max-time", "20s"]) == 0
    told = re.findall(r"(\d+)s elapsed, (\d+)s left", capsys.readouterr().out)
    assert len(told) > 100
    assert all(19 <= int(elapsed) + int(left) <= 20 for elapsed, left in told)


def test_two_seeded_runs_are_identical(tmp_path, token_dir):
    """The same seed gives bit-identical weights; another seed gives others."""
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert gpt.main(train_args(token_dir, tmp_path / name, "--seed", seed)) == 0
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    assert not torch.equal(final_weights(tmp_path / "a")["lm_head.weight"],
                           final_weights(tmp_path / "c")["lm_head.weight"])


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_identical(tmp_path, token_dir, optimizer):
    """N steps, then --resume for N more, equals 2N steps in one run, loss by loss, bit by bit,
    with AdamW or Muon (which the resumed run keeps without being told)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert gpt.main(train_args(token_dir, straight, "--max-steps", "8", "--decay-steps", "8",
                               "--optimizer", optimizer)) == 0
    assert gpt.main(train_args(token_dir, split, "--max-steps", "4", "--decay-steps", "8",
                               "--optimizer", optimizer)) == 0
    assert gpt.main(train_args(token_dir, split, "--max-steps", "8", "--decay-steps", "8",
                               "--resume")) == 0
    assert train_losses(straight) == train_losses(split)
    assert_same_weights(final_weights(straight), final_weights(split))


def test_fresh_run_into_a_run_directory_is_refused(tmp_path, token_dir, capsys):
    """A new run never silently replaces an earlier run's checkpoints and metrics: it is refused
    with one line naming --resume, --out-dir and --overwrite; --overwrite replaces them."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "3")) == 0
    before = {name: (tmp_path / name).read_bytes()
              for name in ("latest.pt", "best.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert gpt.main(train_args(token_dir, tmp_path, "--lr", "5e-3")) == 2
    line = one_error_line(capsys, "train")
    assert all(flag in line for flag in ("--resume", "--out-dir", "--overwrite"))
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert gpt.main(train_args(token_dir, tmp_path, "--overwrite", "--max-steps", "2")) == 0
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["iteration"] == 2
    assert max(train_losses(tmp_path)) == 2


@pytest.mark.parametrize("warmup", ["2", "10"], ids=["warmup-2", "warmup-past-the-end"])
def test_resume_extends_a_finished_run_at_the_minimum_lr(tmp_path, token_dir, capsys, warmup):
    """--resume with a larger --max-steps extends a finished run: its cosine has ended, so the
    extra steps train at --min-lr, and the log says so (also after a run that ended during a
    longer --warmup-steps)."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "4", "--lr", "1e-3",
                               "--warmup-steps", warmup)) == 0
    capsys.readouterr()
    assert gpt.main(train_args(token_dir, tmp_path, "--resume", "--max-steps", "7",
                               "--warmup-steps", warmup)) == 0
    assert "train at the minimum learning rate, 0.0001" in capsys.readouterr().out
    lrs = {m["step"]: m["lr"] for m in metrics(tmp_path) if "lr" in m}
    assert sorted(lrs) == list(range(1, 8))
    assert [lrs[s] for s in (5, 6, 7)] == [pytest.approx(1e-4)] * 3


def test_resume_extends_a_finished_run_by_time(tmp_path, token_dir):
    """--resume --max-time on a finished run trains on for that time (it did nothing before)."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "3")) == 0
    args = [a for a in train_args(token_dir, tmp_path, "--resume", "--max-time", "2s")
            if a not in ("--max-steps", "6")]
    assert gpt.main(args) == 0
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["iteration"] > 3


@pytest.mark.parametrize("extra, named", [
    ([], "finished at step 3"),
    (["--max-steps", "3"], "already has 3 steps"),
    (["--overwrite"], "--overwrite"),
], ids=["no-budget", "no-more-steps", "overwrite"])
def test_resume_of_a_finished_run_needs_a_new_budget(tmp_path, token_dir, capsys, extra, named):
    """A finished run resumed without a budget beyond its end is refused in one line, intact."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "3")) == 0
    before = (tmp_path / "latest.pt").read_bytes()
    args = [a for a in train_args(token_dir, tmp_path, "--resume") if a not in ("--max-steps",
                                                                                 "6")]
    capsys.readouterr()
    assert gpt.main(args + extra) == 2
    assert named in one_error_line(capsys, "train")
    assert (tmp_path / "latest.pt").read_bytes() == before


def test_nan_loss_stops_cleanly_and_keeps_the_last_checkpoint(tmp_path, token_dir, monkeypatch,
                                                              capsys):
    """A NaN loss stops the run with one line and exit 2; the checkpoint before it stays."""
    cross_entropy, calls = gpt.cross_entropy, []

    def diverging_cross_entropy(logits, targets):
        loss = cross_entropy(logits, targets)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) >= 5:  # training steps 5 and later
                return loss * float("nan")
        return loss

    monkeypatch.setattr(gpt, "cross_entropy", diverging_cross_entropy)
    assert gpt.main(train_args(token_dir, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nan" in err and "step 5" in err
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["iteration"] == 3
    assert [m["step"] for m in metrics(tmp_path) if "train_loss" in m] == [1, 2, 3, 4]


@pytest.mark.parametrize("losses, written", [([3.0, 2.0, 1.0], "latest.pt, best.pt"),
                                             ([1.0, 2.0, 3.0], "latest.pt")],
                         ids=["improving", "best-at-step-0"])
def test_train_lists_the_checkpoints_it_wrote(tmp_path, token_dir, monkeypatch, capsys, losses,
                                              written):
    """The last line names the checkpoints written: no best.pt when no evaluation after step 0
    (which saves nothing) beat the first."""
    evaluations = iter(losses)
    monkeypatch.setattr(gpt, "evaluate", lambda *args: next(evaluations))
    assert gpt.main(train_args(token_dir, tmp_path)) == 0
    assert f"checkpoints in {tmp_path} ({written})" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "best.pt") == ("best" in written)


@pytest.fixture
def bad_token_dirs(tmp_path, token_dir):
    """Token directories that are wrong in one way each."""
    import shutil
    dirs = {}
    for name in ("big-ids", "odd-bytes", "short", "no-valid", "bin-is-dir"):
        dirs[name] = tmp_path / name
        shutil.copytree(token_dir, dirs[name])

    def write_tokens(path, data: bytes) -> None:  # with a sidecar that agrees on the length
        path.write_bytes(data)
        info = json.loads(path.with_name(path.name + ".json").read_text())
        path.with_name(path.name + ".json").write_text(json.dumps({**info,
                                                                   "num_tokens": len(data) // 2}))
    write_tokens(dirs["big-ids"] / "train.bin", np.array([5, 299, 300, 7], "<u2").tobytes())
    write_tokens(dirs["odd-bytes"] / "valid.bin", b"\x01\x00\x02")
    write_tokens(dirs["short"] / "valid.bin", np.arange(10, dtype="<u2").tobytes())
    os.remove(dirs["no-valid"] / "valid.bin")
    os.remove(dirs["bin-is-dir"] / "train.bin")
    (dirs["bin-is-dir"] / "train.bin").mkdir()
    return dirs


@pytest.mark.parametrize("extra, named", [
    (["--data-dir", "{tmp}/nowhere"], "tokenize` first"),
    (["--data-dir", "{tmp}/big-ids"], "token id 300"),
    (["--data-dir", "{tmp}/odd-bytes"], "3 bytes"),
    (["--data-dir", "{tmp}/short"], "context_length 16"),
    (["--data-dir", "{tmp}/no-valid"], "valid.bin not found"),
    (["--d-model", "30"], "d_model 30"),
    (["--num-heads", "3"], "num_heads 3"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-steps", "-1"], "--max-steps"),
    (["--max-time", "soon"], "soon"),
    (["--grad-clip", "0"], "--grad-clip"),
    (["--out-dir", "{tmp}/afile/run"], "{tmp}/afile/run"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
     "cuda"),
    (["--resume"], "no {tmp}/run/latest.pt"),
    (["--max-time", "inf"], "'inf'"),
    (["--max-time", "1e400"], "'1e400'"),
    (["--max-time", ""], "--max-time"),
    (["--max-time", "0s"], "'0s'"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr"),
    (["--beta2", "1.5"], "--beta2"),
    (["--seed", str(10**23)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--d-model", "1e3"], "--d-model"),
    (["--rope-theta", "inf"], "--rope-theta"),
    (["--batch-size", str(10**12)], "--batch-size"),
    (["--preset", "huge"], "--preset"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--optimizer", "adamw", "--muon-lr", "0.01"], "--muon-lr 0.01"),
    (["--optimizer", "sgd"], "--optimizer"),
    (["--optimizer", "muon", "--muon-lr", "0"], "--muon-lr"),
    (["--data-dir", "{tmp}/bin-is-dir"], "bin-is-dir/train.bin is a directory"),
    (["--max-time", "-5m"], "--max-time: expected a positive, finite duration, got '-5m'"),
    (["--lr", "-1e-3"], "--lr: expected a number > 0.0, got '-1e-3'"),
], ids=["no-data", "ids-too-big", "odd-bytes", "too-short", "no-valid", "d-model", "heads",
        "batch", "steps", "time", "clip", "unwritable", "device", "nothing-to-resume",
        "time-inf", "time-overflow", "time-empty", "time-zero", "lr-inf", "lr-nan",
        "min-lr-above-lr", "beta2", "seed-too-big", "seed-negative", "d-model-float",
        "rope-theta-inf", "out-of-memory", "unknown-preset", "unknown-flag",
        "muon-lr-without-muon", "unknown-optimizer", "muon-lr-zero", "train-bin-a-directory",
        "time-negative", "lr-negative"])
def test_train_bad_input_is_one_line_and_exit_2(tmp_path, token_dir, bad_token_dirs, capsys,
                                                extra, named):
    """A user mistake gives exit code 2 and one stderr line naming it, before any training."""
    (tmp_path / "afile").write_bytes(b"a regular file")
    extra = [e.format(tmp=tmp_path) for e in extra]
    args = train_args(token_dir, tmp_path / "run") + extra
    capsys.readouterr()
    assert exit_code(args) == 2
    assert named.format(tmp=tmp_path) in one_error_line(capsys, "train")
    assert not os.path.exists(tmp_path / "run" / "latest.pt")


@pytest.mark.parametrize("command", ["train", "finetune", "experiment"])
def test_a_busy_out_dir_is_refused(tmp_path, token_dir, capsys, command):
    """train, finetune and experiment into an --out-dir another run holds stop with one line
    naming it, before writing anything there."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "gpt.lock").write_text(f"{os.getpid()}\n")  # held by a live process: this one
    (tmp_path / "qa.json").write_text(json.dumps(QA_PAIRS))
    argv = {"train": train_args(token_dir, out),
            "finetune": finetune_args(tmp_path / "qa.json", out, "--from-scratch",
                                      "--data-dir", token_dir),
            "experiment": ["experiment", "--out-dir", str(out), "dropout", "--max-steps", "1"]}
    capsys.readouterr()
    assert exit_code(argv[command]) == 2
    assert f"{out} is in use by another run (process {os.getpid()})" in one_error_line(capsys,
                                                                                      command)
    assert os.listdir(out) == ["gpt.lock"]


def test_train_never_writes_through_a_planted_link(tmp_path, token_dir, capsys):
    """A metrics.jsonl that is a symbolic link to a user's file, in a fresh --out-dir, is
    refused with one line; the user's file is unchanged."""
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(mine)
    capsys.readouterr()
    assert exit_code(train_args(token_dir, tmp_path / "run")) == 2
    assert "metrics.jsonl is a symbolic link" in one_error_line(capsys, "train")
    assert mine.read_text() == "my notes"


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest(tmp_path, token_dir, capsys):
    """--optimizer muon: Muon for the 14 matrices of the 2 blocks, at --muon-lr scaled by the
    schedule as --lr is, with the weight decay that shrinks as AdamW's does; AdamW for the
    embeddings, the output layer and the gains; one optimizer state in the checkpoint."""
    assert gpt.main(train_args(token_dir, tmp_path, "--optimizer", "muon", "--muon-lr", "0.05",
                               "--max-steps", "2")) == 0
    assert "Muon for the 14 weight matrices of the blocks" in capsys.readouterr().out
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)
    muon, decayed, gains = saved["optimizer"]["param_groups"]
    assert [g["optimizer"] for g in (muon, decayed, gains)] == ["muon", "adamw", "adamw"]
    assert [len(g["params"]) for g in (muon, decayed, gains)] == [14, 2, 5]
    assert muon["lr"] == pytest.approx(decayed["lr"] * 0.05 / 3e-3)
    assert muon["weight_decay"] == pytest.approx(0.3 * 3e-3 / 0.05)
    states = saved["optimizer"]["state"]
    assert ({tuple(states[i]["momentum_buffer"].shape) for i in muon["params"]}
            == {(32, 32), (64, 32), (32, 64)})
    # The token embeddings and the output layer: one row per token each.
    assert [tuple(states[i]["exp_avg"].shape) for i in decayed["params"]] == [(300, 32)] * 2
    assert saved["args"]["optimizer"] == "muon" and saved["args"]["muon_lr"] == 0.05


@pytest.mark.parametrize("first, then", [("adamw", "muon"), ("muon", "adamw")])
def test_resume_with_another_optimizer_is_refused(tmp_path, token_dir, capsys, first, then):
    """--resume with another --optimizer than the run's is one line, the checkpoint intact."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "3", "--optimizer",
                               first)) == 0
    before = (tmp_path / "latest.pt").read_bytes()
    capsys.readouterr()
    assert gpt.main(train_args(token_dir, tmp_path, "--resume", "--optimizer", then)) == 2
    line = one_error_line(capsys, "train")
    assert f"--optimizer {then}" in line and f"trains with {first}" in line
    assert (tmp_path / "latest.pt").read_bytes() == before


def test_resume_with_another_configuration_is_refused(tmp_path, token_dir, capsys):
    """--resume with a different architecture names the difference and keeps the checkpoint."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "3")) == 0
    before = (tmp_path / "latest.pt").read_bytes()
    capsys.readouterr()
    assert gpt.main(train_args(token_dir, tmp_path, "--resume", "--d-model", "64")) == 2
    assert "d_model 32 -> 64" in one_error_line(capsys, "train")
    assert (tmp_path / "latest.pt").read_bytes() == before


def edit_checkpoint(path, change) -> None:
    """Load the checkpoint at `path`, let `change` edit its dict, save it back."""
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


def swap_first_merges(checkpoint: dict) -> None:
    merges = checkpoint["tokenizer"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]


@pytest.mark.parametrize("change, refused", [
    (lambda c: c.update(tokenizer_fingerprint="0" * 64), True),
    (lambda c: [c.pop(k) for k in ("tokenizer_fingerprint", "kind")], False),
    (lambda c: [c.pop("tokenizer_fingerprint"), swap_first_merges(c)], True)],
    ids=["another-tokenizer", "old-checkpoint-same-tokenizer", "old-checkpoint-other-merges"])
def test_resume_refuses_another_tokenizer(tmp_path, token_dir, capsys, change, refused):
    """A checkpoint records its tokenizer's fingerprint and --resume refuses another tokenizer
    with one line; a checkpoint from before the field has it computed from the tokenizer it
    stores, and resumes when that is the same (recording the fields at its next save)."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "3")) == 0
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=True)
    tokenizer = gpt.Tokenizer.load(os.path.join(token_dir, "tokenizer"))
    assert checkpoint["tokenizer_fingerprint"] == tokenizer.fingerprint()
    assert checkpoint["kind"] == "pretraining"
    edit_checkpoint(tmp_path / "latest.pt", change)
    capsys.readouterr()
    assert exit_code(train_args(token_dir, tmp_path, "--resume", "--max-steps", "5")) == (
        2 if refused else 0)
    if refused:
        assert "another tokenizer" in one_error_line(capsys, "train")
    else:
        resumed = torch.load(tmp_path / "latest.pt", weights_only=True)
        assert resumed["iteration"] == 5 and resumed["kind"] == "pretraining"
        assert resumed["tokenizer_fingerprint"] == tokenizer.fingerprint()


def test_experiment_runs_each_arm_and_tabulates(tmp_path, token_dir, capsys):
    """`experiment dropout` trains its two arms with the same flags and writes their table;
    a train flag that does not fit is refused before any arm trains."""
    flags = train_args(token_dir, tmp_path)[1:]
    flags = flags[:flags.index("--out-dir")] + flags[flags.index("--out-dir") + 2:]
    assert gpt.main(["experiment", "--out-dir", str(tmp_path), "dropout", *flags]) == 0
    table = (tmp_path / "dropout" / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| dropout 0 |")
    assert "| dropout 0.1 | `--dropout 0.1` |" in table[3]
    for row in table[2:]:
        assert row.split(" | ")[3:5] == ["6", f"{6 * 4 * 16:,}"]  # steps, tokens: the same
    assert table[2].split(" | ")[2] == table[3].split(" | ")[2]  # the same parameters
    # The overlaid curves: drawn when matplotlib is installed (CI installs it), else not.
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "dropout" / "curves.png").exists() == has_matplotlib
    assert exit_code(["experiment", "--out-dir", str(tmp_path / "x"), "lr", *flags,
                      "--out-dir", "y"]) == 2
    assert not (tmp_path / "x").exists()
    # Run again with the same flags, the arms are kept, not trained again; with other flags,
    # their directories are refused (--overwrite would replace them).
    capsys.readouterr()
    assert gpt.main(["experiment", "--out-dir", str(tmp_path), "dropout", *flags]) == 0
    assert capsys.readouterr().out.count("trained already with these flags, kept") == 2
    assert (tmp_path / "dropout" / "results.md").read_text().splitlines() == table
    assert exit_code(["experiment", "--out-dir", str(tmp_path), "dropout", *flags,
                      "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_interrupted_experiment_goes_on_with_the_same_command(tmp_path, token_dir, capsys,
                                                              monkeypatch):
    """Ctrl-C in an arm says to run the same command again, which keeps the finished arm and
    resumes the interrupted one; a metrics line without `elapsed` gives no error; an arm whose
    varied flag the common flags override is labelled with what it trained with."""
    flags = train_args(token_dir, tmp_path)[1:]  # with --batch-size 4, which `batch` varies
    flags = flags[:flags.index("--out-dir")] + flags[flags.index("--out-dir") + 2:]
    command = ["experiment", "--out-dir", str(tmp_path), "batch", *flags]
    get_batch = press_ctrl_c_at_call(monkeypatch, "get_batch", 8)  # the second arm's step 2
    capsys.readouterr()
    assert gpt.main(command) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted at step 2" in line and "--resume" not in line
    assert f"same command runs again: python gpt.py experiment --out-dir {tmp_path} batch" in line
    monkeypatch.setattr(gpt, "get_batch", get_batch)
    default, records = tmp_path / "default" / "metrics.jsonl", metrics(tmp_path / "default")
    del records[-1]["elapsed"]  # the last line: the one the table's time was read from
    default.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert gpt.main(command) == 0
    out = capsys.readouterr().out
    assert "default: trained already" in out and "batch-16: resuming it" in out
    assert sorted(train_losses(tmp_path / "batch" / "batch-16")) == [1, 2, 3, 4, 5, 6]
    table = (tmp_path / "batch" / "results.md").read_text().splitlines()
    assert table[2].startswith("| batch_size 4 | `(the default)` |")
    assert table[3].startswith("| batch 16 | `--batch-size 16` |")
    assert [row.split(" | ")[4] for row in table[2:]] == [f"{6 * 4 * 16:,}", f"{6 * 16 * 16:,}"]


@pytest.mark.parametrize("name, flags, arm, said", [
    ("norm", ["--no-use-norm"], "'post-norm' of experiment norm (--norm-position post",
     "use_norm False removes"),
    ("optimizer", ["--muon-lr", "0.05"], "'adamw' of experiment optimizer (--optimizer adamw",
     "--muon-lr 0.05 is Muon's learning rate"),
    ("lr", ["--min-lr", "5e-4"], "'lr 1e-4' of experiment lr (--lr 1e-4",
     "--min-lr 0.0005 is above the peak learning rate --lr 0.0001"),
], ids=["norm", "optimizer", "lr"])
def test_experiment_checks_every_arm_before_the_first_trains(tmp_path, capsys, name, flags, arm,
                                                             said):
    """Flags that conflict with a later arm's are refused before any arm trains (here before
    the data is even looked for), naming the arm."""
    command = ["experiment", "--out-dir", str(tmp_path / "x"), name, *flags,
               "--data-dir", str(tmp_path / "no-data")]
    assert exit_code(command) == 2
    line = one_error_line(capsys, "experiment")
    assert f"arm {arm}" in line and said in line, line
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("seconds, expected", [(0, 9.0), (10, 4.0), (25, 3.25), (30, 3.0),
                                               (99, 3.0)])
def test_loss_at_reads_between_evaluations(seconds, expected):
    """The loss at a time is read on the line between the evaluations around it; before the
    first and after the last, theirs."""
    evals = [(2.0, 9.0), (10.0, 4.0), (30.0, 3.0)]
    assert gpt.loss_at(evals, seconds) == pytest.approx(expected)


def test_results_table_compares_arms_at_equal_time(tmp_path, capsys):
    """The table's last column is each arm's loss when the quickest arm ended: its own final
    loss, and the slower arm's loss by then, read between its evaluations."""
    common = dict(parameters=10, steps=100, tokens=1000, best=3.0)
    quick = dict(common, seconds=20.0, final=3.5, evals=[(1.0, 9.0), (20.0, 3.5)])
    slow = dict(common, seconds=40.0, final=3.0, evals=[(1.0, 9.0), (10.0, 5.0), (30.0, 3.0)])
    gpt.write_results(str(tmp_path), [("adamw", [], quick),
                                      ("muon lr 0.02", ["--optimizer", "muon"], slow)])
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].endswith("| val loss at 20s |")
    assert table[2].endswith("| 3.500 | 3.500 |") and table[3].endswith("| 3.000 | 4.000 |")


def test_optimizer_experiment_tries_muon_at_three_learning_rates():
    """`experiment optimizer` sets the default recipe (Muon at the laptop preset's rate) against
    AdamW alone and Muon at each other learning rate its arm names; every arm's flags parse."""
    arms = gpt.EXPERIMENTS["optimizer"]
    laptop = gpt.PRESETS["laptop"]
    assert arms[0] == (f"muon lr {laptop['muon_lr']:g}", []) and laptop["optimizer"] == "muon"
    assert arms[1] == ("adamw", ["--optimizer", "adamw"])
    for arm, flags in arms[2:]:
        args = gpt.build_parser().parse_args(["train", *flags])
        assert args.optimizer == "muon" and arm == f"muon lr {args.muon_lr:g}"
    assert len(arms) == 4


def test_resume_of_a_checkpoint_from_before_newer_model_fields(tmp_path, token_dir):
    """A checkpoint whose config lacks fields added since (dropout, tie_init) resumes with
    their defaults."""
    assert gpt.main(train_args(token_dir, tmp_path, "--max-steps", "3")) == 0
    path = tmp_path / "latest.pt"
    checkpoint = torch.load(path, weights_only=True)
    for name in ("dropout", "tie_init"):
        del checkpoint["config"][name]
    torch.save(checkpoint, path)
    assert gpt.main(train_args(token_dir, tmp_path, "--resume", "--max-steps", "5")) == 0


# ==================================================================================================
# §15 tokenize: inputs and outputs
# ==================================================================================================

DOCS = "aaaa" + EOT + "bbbb" + EOT + "cc\ncc"  # documents end at 17 and 34, a line at 37, of 39


@pytest.mark.parametrize("text, specials, fraction, expected", [
    (DOCS, [EOT], 0.1, (34, "after a special token")),  # 4 bytes from the end: the point is 35
    (DOCS, [EOT], 0.5, (17, "after a special token")),  # the last document end before 19
    (DOCS, [EOT], 0.9, (17, "after a special token")),  # none before 4: the first after it
    (DOCS, [], 0.1, (37, "after a line break")),  # no special tokens: the first line after 35
    ("one\ntwo\nthree\n", [EOT], 0.3, (8, "after a line break")),  # no special token in it
    ("one\ntwo" + EOT, [EOT], 0.1, (4, "after a line break")),  # the only special ends it
])
def test_hold_out_cuts_after_a_document_or_else_a_line(tmp_path, text, specials, fraction,
                                                        expected):
    """Hand-worked cuts: after the last special token before the point that leaves `fraction`
    for validation, else the first after it; in a text with none inside it, at a line break."""
    (tmp_path / "text.txt").write_text(text)
    assert gpt.hold_out(str(tmp_path / "text.txt"), fraction, specials) == expected


def test_hold_out_with_no_boundary_is_refused(tmp_path):
    """A text with no line break and no special token gives no place to cut: --valid is asked."""
    (tmp_path / "text.txt").write_text("one line" + EOT)
    with pytest.raises(ValueError, match="no special token and no line break.*--valid"):
        gpt.hold_out(str(tmp_path / "text.txt"), 0.1, [EOT])


@pytest.fixture
def small_texts(tmp_path, corpus_path):
    """A train and a valid text of a few KB, from the TinyStories sample."""
    with open(corpus_path, encoding="utf-8", newline="") as f:
        lines = f.readlines()
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("".join(lines[:150]), encoding="utf-8", newline="")
    valid.write_text("".join(lines[150:200]), encoding="utf-8", newline="")
    return train, valid


def test_a_refused_tokenize_leaves_no_new_out_dir(tmp_path, small_texts, monkeypatch, capsys):
    """A tokenize into a new out-dir that fails on the way (here a full disk as the sidecar is
    written) leaves nothing behind: no out-dir, no empty tokenizer/, no parent made for it; and
    says so, not that previous files are kept."""
    def disk_full(path, *args):
        raise OSError(f"cannot write {path}.json: the disk is full")
    monkeypatch.setattr(gpt, "write_token_info", disk_full)
    train, valid = small_texts
    out = tmp_path / "new" / "out"
    assert exit_code(["tokenize", "--train", str(train), "--valid", str(valid), "--workers", "1",
                      "--vocab-size", "300", "--out-dir", str(out)]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.endswith(f"train.bin.json: the disk is full; nothing was written to {out}")
    assert sorted(os.listdir(tmp_path)) == ["train.txt", "valid.txt"]


def test_tokenize_leaves_no_earlier_tokenizers_settings(tmp_path, small_texts, tokenizer):
    """A tokenizer of GPT-2's settings written where one of other settings was (by tokenize
    --tokenizer, here of Qwen's layout) leaves no tokenizer_settings.json of the earlier one
    behind: the directory loads as the tokenizer written."""
    train, valid = small_texts
    with_layout(tokenizer, "qwen").save(tmp_path / "qwen")
    out = tmp_path / "out"
    args = ["tokenize", "--train", str(train), "--valid", str(valid), "--workers", "1",
            "--out-dir", str(out)]
    assert gpt.main(args + ["--tokenizer", str(tmp_path / "qwen")]) == 0
    assert (out / "tokenizer" / "tokenizer_settings.json").exists()
    assert gpt.main(args + ["--vocab-size", "300"]) == 0
    assert sorted(os.listdir(out / "tokenizer")) == ["merges.txt", "special_tokens.json",
                                                     "vocab.json"]
    assert gpt.Tokenizer.load(out / "tokenizer").settings() == {}


def test_tokenize_command_end_to_end(tmp_path, small_texts):
    """`tokenize` trains, saves the tokenizer and writes token files that decode to the texts;
    encoding again with the saved tokenizer writes the same files."""
    train, valid = small_texts
    out = tmp_path / "out"
    args = ["tokenize", "--train", str(train), "--valid", str(valid), "--workers", "1"]
    assert gpt.main(args + ["--out-dir", str(out), "--vocab-size", "300"]) == 0
    assert sorted(os.listdir(out / "tokenizer")) == ["merges.txt", "special_tokens.json",
                                                     "vocab.json"]
    tokenizer = gpt.Tokenizer.load(str(out / "tokenizer"))
    assert len(tokenizer.vocab) == 300 and tokenizer.special_tokens == [EOT]
    for split, text_path in [("train", train), ("valid", valid)]:
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        assert tokenizer.decode(ids) == text_path.read_text(encoding="utf-8")
        info = json.loads((out / f"{split}.bin.json").read_text())
        assert info == {"tokenizer_sha256": tokenizer.fingerprint(), "dtype": "uint16",
                        "num_tokens": len(ids), "text": str(text_path),
                        "text_bytes": [0, text_path.stat().st_size]}
    assert sorted(os.listdir(out)) == ["tokenizer", "train.bin", "train.bin.json", "valid.bin",
                                       "valid.bin.json"]  # and no staging directory

    again = tmp_path / "again"
    assert gpt.main(args + ["--out-dir", str(again), "--tokenizer", str(out / "tokenizer")]) == 0
    for name in ["train.bin", "valid.bin", "train.bin.json", "valid.bin.json"]:
        assert (again / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize("specials, where", [([EOT], "after a special token"),
                                             ([], "after a line break")])
def test_tokenize_holds_out_the_end_of_a_train_text(tmp_path, corpus_path, capsys, specials,
                                                    where):
    """--train without --valid: the last tenth or so of the text, cut after a special token
    (without special tokens, after a line), becomes valid.bin; BPE learns from the rest only."""
    text = open(corpus_path, encoding="utf-8", newline="").read()
    data = text.encode()
    out = tmp_path / "out"
    assert gpt.main(["tokenize", "--train", corpus_path, "--out-dir", str(out), "--vocab-size",
                     "300", "--workers", "1", "--special-tokens", *specials]) == 0
    cut = json.loads((out / "valid.bin.json").read_text())["text_bytes"][0]
    assert f"held out the last {len(data) - cut:,} bytes" in capsys.readouterr().out
    assert 0.1 <= 1 - cut / len(data) < 0.12
    assert data[:cut].endswith(EOT.encode() if specials else b"\n")
    tokenizer = gpt.Tokenizer.load(str(out / "tokenizer"))
    for split, part in [("train", data[:cut]), ("valid", data[cut:])]:
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        assert tokenizer.decode(ids) == part.decode()
    (tmp_path / "head.txt").write_bytes(data[:cut])
    vocab, merges = gpt.train_bpe(str(tmp_path / "head.txt"), 300, specials, num_workers=1)
    assert (tokenizer.vocab, tokenizer.merges) == (vocab, merges)


@pytest.mark.parametrize("changes, named", [
    ({"--train": "{tmp}/missing.txt"}, "{tmp}/missing.txt"),
    ({"--valid": "{tmp}/missing.txt"}, "{tmp}/missing.txt"),
    ({"--train": "{tmp}/empty.txt"}, "{tmp}/empty.txt"),
    ({"--train": "{tmp}/not_utf8.txt"}, "{tmp}/not_utf8.txt is not UTF-8 text (invalid byte at "
                                        "offset 3,000)"),
    ({"--valid": "{tmp}/not_utf8.txt"}, "{tmp}/not_utf8.txt is not UTF-8 text (invalid byte at "
                                        "offset 3,000)"),
    ({"--vocab-size": "100"}, "100"),
    ({"--workers": "0"}, "--workers"),
    ({"--out-dir": "{tmp}/afile/out"}, "{tmp}/afile/out"),  # under a file: fails even for root
    ({"--tokenizer": "{tmp}/corrupt"}, "{tmp}/corrupt"),
    ({"--tokenizer": "{tmp}/missing"}, "{tmp}/missing"),
    ({"--special-tokens": [""]}, "a special token is empty"),
    ({"--special-tokens": [EOT, "<|x|>", EOT]}, f"special token {EOT!r} is given twice"),
    *[({"--valid": None, "--valid-fraction": bad}, "--valid-fraction must be between 0 and 1")
      for bad in ["0", "1", "-0.1", "nan"]],
    ({"--valid-fraction": "0.2"}, "--valid-fraction applies only to a --train text without"),
    ({"--train": "{tmp}/one_line.txt", "--valid": None},
     "{tmp}/one_line.txt has no special token and no line break"),
    ({"--train": "{tmp}/corrupt"}, "{tmp}/corrupt is a directory"),
    ({"--valid": "/dev/zero"}, "/dev/zero is not a regular file"),
], ids=["missing-train", "missing-valid", "empty-train", "not-utf8", "not-utf8-valid",
        "small-vocab", "no-workers", "unwritable-out", "corrupt-tokenizer", "missing-tokenizer",
        "empty-special", "special-twice", "fraction-0", "fraction-1", "fraction-negative",
        "fraction-nan", "fraction-with-valid", "nowhere-to-hold-out", "train-a-directory",
        "valid-a-device"])
def test_tokenize_bad_input_is_one_line_and_exit_2(tmp_path, small_texts, capsys, changes,
                                                   named):
    """A user mistake gives exit code 2 and one stderr line naming the bad value, and leaves the
    previous files in OUT_DIR as they were: found before anything is written."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "not_utf8.txt").write_bytes(b"abc" * 1000 + b"\xff\xfe")  # bad at the end
    (tmp_path / "one_line.txt").write_text("a text without a line break or a special token")
    (tmp_path / "afile").write_bytes(b"a regular file")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "vocab.json").write_text("not json")
    (tmp_path / "corrupt" / "merges.txt").write_text("#version: 0.2\n")
    out = tmp_path / "out"
    previous = {"train.bin": b"old train", "valid.bin": b"old valid",
                "tokenizer/vocab.json": b"old vocab"}
    for name, data in previous.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    train, valid = small_texts
    options = {"--train": [str(train)], "--valid": [str(valid)], "--out-dir": [str(out)],
               "--vocab-size": ["300"], "--workers": ["1"]}
    for flag, value in changes.items():
        options[flag] = [v.format(tmp=tmp_path) for v in
                         ([] if value is None else value if isinstance(value, list) else [value])]
    args = [arg for flag, values in options.items() if values for arg in [flag, *values]]
    capsys.readouterr()
    assert gpt.main(["tokenize", *args]) == 2
    assert named.format(tmp=tmp_path) in one_error_line(capsys, "tokenize")
    assert sorted(os.listdir(out)) == ["tokenizer", "train.bin", "valid.bin"]
    assert {name: (out / name).read_bytes() for name in previous} == previous


def dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_tokenize_removes_what_killed_runs_left(tmp_path, small_texts, capsys):
    """Staging directories and temporary files named after a process that no longer runs are
    removed; those of a running process (a tokenize at work) and other files are kept."""
    out, dead, alive = tmp_path / "out", dead_pid(), os.getppid()
    leftovers = [f".tokenize-{dead}/train.bin.tmp{dead}", f"train.bin.tmp{dead}",
                 f"valid.bin.json.tmp{dead}", f"tokenizer/vocab.json.tmp{dead}"]
    kept = [f".tokenize-{alive}/train.bin.tmp{alive}", f"train.bin.tmp{alive}", "notes.tmp1"]
    for name in leftovers + kept:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    train, valid = small_texts
    assert gpt.main(["tokenize", "--train", str(train), "--valid", str(valid), "--out-dir",
                     str(out), "--vocab-size", "300", "--workers", "1"]) == 0
    assert not any((out / name).exists() for name in leftovers)
    assert not (out / f".tokenize-{dead}").exists()
    assert all((out / name).exists() for name in kept)
    removed = f"removed {out}/.tokenize-{dead}, left by a run that was killed"
    assert removed in capsys.readouterr().err


def child_pids(pid: int) -> list[int]:
    """The running processes whose parent is `pid`, from Linux's /proc."""
    children = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]  # after "(name)"
        except OSError:
            continue  # it ended meanwhile
        if int(parent) == pid and state != "Z":
            children.append(int(entry))
    return children


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.fixture
def slow_tokenize(tmp_path, tokenizer):
    """Start `python gpt.py tokenize` on about 24 MB (seconds of work) with 2 workers, in a
    subprocess, and wait until its workers are encoding; returns the process and the workers."""
    with open(TINYSTORIES, "rb") as f:
        (tmp_path / "big.txt").write_bytes(f.read() * 4)
    tokenizer.save(str(tmp_path / "tok"))

    def start(out_dir) -> tuple[subprocess.Popen, list[int]]:
        process = subprocess.Popen(
            [sys.executable, "-B", os.path.join(HERE, "gpt.py"), "tokenize", "--train",
             str(tmp_path / "big.txt"), "--tokenizer", str(tmp_path / "tok"), "--out-dir",
             str(out_dir), "--workers", "2"], cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        partial = out_dir / f".tokenize-{process.pid}" / f"train.bin.tmp{process.pid}"
        deadline = time.monotonic() + 120
        while not (partial.exists() and len(workers := child_pids(process.pid)) == 2):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.01)
        return process, workers
    return start


def assert_ended_quietly(process: subprocess.Popen, workers: list[int]) -> str:
    """Wait for the process; check its workers ended with it and nothing printed a traceback.
    Returns its stderr."""
    _, err = process.communicate(timeout=60)  # the workers hold stderr open while they run
    deadline = time.monotonic() + 10  # for init to reap them
    while any(map(is_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(map(is_running, workers))
    assert "Traceback" not in err and "Error" not in err, err
    return err


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals and /proc are Linux's")
def test_kill_9_mid_tokenize_leaves_nothing_the_next_run_keeps(tmp_path, small_texts,
                                                               slow_tokenize, capsys):
    """kill -9 in the middle of encoding: the workers die with the main process, without a
    traceback; the next tokenize removes the staging directory left behind and writes correct
    files."""
    out = tmp_path / "out"
    process, workers = slow_tokenize(out)
    process.kill()
    assert_ended_quietly(process, workers)
    assert os.listdir(out) == [f".tokenize-{process.pid}"]  # what the killed run left

    train, valid = small_texts
    assert gpt.main(["tokenize", "--train", str(train), "--valid", str(valid), "--out-dir",
                     str(out), "--vocab-size", "300", "--workers", "1"]) == 0
    assert sorted(os.listdir(out)) == ["tokenizer", "train.bin", "train.bin.json", "valid.bin",
                                       "valid.bin.json"]
    tokenizer = gpt.Tokenizer.load(str(out / "tokenizer"))
    for split, text_path in [("train", train), ("valid", valid)]:
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        assert tokenizer.decode(ids) == text_path.read_text(encoding="utf-8")


def previous_outputs(out, small_texts) -> dict[str, bytes]:
    """Tokenize the small texts into `out`; returns every file written there, by name."""
    train, valid = small_texts
    assert gpt.main(["tokenize", "--train", str(train), "--valid", str(valid), "--out-dir",
                     str(out), "--vocab-size", "300", "--workers", "1"]) == 0
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_sigterm_mid_tokenize_exits_2_and_keeps_the_previous_files(tmp_path, small_texts,
                                                                   slow_tokenize):
    """SIGTERM in the middle of encoding stops tokenize like Ctrl-C: exit code 2, one line, the
    workers ended, the staging directory removed and the previous files untouched."""
    out = tmp_path / "out"
    previous = previous_outputs(out, small_texts)
    process, workers = slow_tokenize(out)
    process.terminate()
    err = assert_ended_quietly(process, workers)
    assert process.returncode == 2
    assert err.strip().splitlines()[-1] == ("gpt.py tokenize: SIGTERM: interrupted; complete "
                                            "files are kept")
    assert {str(p.relative_to(out)): p.read_bytes()
            for p in out.rglob("*") if p.is_file()} == previous
    assert sorted(os.listdir(out)) == ["tokenizer", "train.bin", "train.bin.json", "valid.bin",
                                       "valid.bin.json"]


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_disk_full_names_the_file_and_keeps_the_previous_files(tmp_path, small_texts,
                                                               corpus_path):
    """A write that fails (here a 50 kB file-size limit, so writes fail with EFBIG as on a full
    disk) gives exit code 2 and a last line naming the token file and the cause; the previous
    files stay as they were."""
    import resource
    out = tmp_path / "out"
    previous = previous_outputs(out, small_texts)
    limit = 50_000  # more than the tokenizer's files, less than train.bin's ~180 kB

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
    result = subprocess.run(
        [sys.executable, "-B", os.path.join(HERE, "gpt.py"), "tokenize", "--train", corpus_path,
         "--valid", str(small_texts[1]), "--out-dir", str(out), "--vocab-size", "300",
         "--workers", "1"], cwd=tmp_path, capture_output=True, text=True,
        preexec_fn=limit_file_size)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gpt.py tokenize: error: cannot write {out}/.tokenize-")
    assert "train.bin: the file is larger than the file system or a limit allows" in last
    assert last.endswith(f"; the previous files in {out} are kept")
    assert {str(p.relative_to(out)): p.read_bytes()
            for p in out.rglob("*") if p.is_file()} == previous
    assert sorted(os.listdir(out)) == ["tokenizer", "train.bin", "train.bin.json", "valid.bin",
                                       "valid.bin.json"]


PUBLISHED = ["tokenizer/merges.txt", "tokenizer/vocab.json", "train.bin", "train.bin.json"]


def files_under(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("had", [PUBLISHED, PUBLISHED[1:3], []], ids=["all", "some", "none"])
def test_publish_failing_at_any_step_puts_the_previous_files_back(tmp_path, monkeypatch, had):
    """Whichever of publish's renames fails, out_dir holds exactly its previous files after,
    every one of them, and none of the new ones; the error names the file and says so."""
    calls = 1 + len(PUBLISHED)  # a run with no failure: count the renames
    for k in range(1, calls):
        out, staging = tmp_path / f"out{k}", tmp_path / f"out{k}" / ".tokenize-1"
        (out / "tokenizer").mkdir(parents=True)  # as write_outputs makes it
        for name in PUBLISHED:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(f"new {name}")
        for name in had:
            (out / name).write_text(f"old {name}")
        previous = {n: b for n, b in files_under(out).items() if not n.startswith(".tokenize")}
        replace, count = os.replace, []

        def failing_replace(src, dst, k=k):
            count.append(1)
            if len(count) == k:
                raise OSError(errno.EIO, "Input/output error")
            return replace(src, dst)
        monkeypatch.setattr(os, "replace", failing_replace)
        with pytest.raises(OSError, match=f"cannot publish {out}/{PUBLISHED[k - 1]}: "
                                          f"Input/output error; {out} is as it was"):
            gpt.publish(str(staging), str(out), PUBLISHED)
        monkeypatch.setattr(os, "replace", replace)
        assert {n: b for n, b in files_under(out).items()
                if not n.startswith(".tokenize")} == previous, f"failed at rename {k}"


def test_tokenize_checks_every_destination_before_moving_one(tmp_path, small_texts, capsys):
    """A destination that cannot be written (valid.bin.json a directory) is found before any
    file moves: exit 2, one line naming it, and the previous tokenizer and files untouched."""
    out = tmp_path / "out"
    previous = previous_outputs(out, small_texts)
    (out / "valid.bin.json").unlink()
    (out / "valid.bin.json").mkdir()
    del previous["valid.bin.json"]
    train, valid = small_texts
    capsys.readouterr()
    assert exit_code(["tokenize", "--train", str(train), "--valid", str(valid), "--out-dir",
                      str(out), "--vocab-size", "280", "--workers", "1"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot publish {out}/valid.bin.json: it is a directory" in line
    assert files_under(out) == previous


# ==================================================================================================
# §16 Export: the Hugging Face format
# ==================================================================================================

def read_safetensors(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A safetensors file parsed by hand: (header, tensors), checking the layout on the way: an
    8-byte little-endian length, that many bytes of JSON, then data that the tensors' offsets
    tile exactly, with no gap, overlap or leftover byte."""
    data = open(path, "rb").read()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    spans = sorted(tuple(entry["data_offsets"]) for entry in entries.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(body)
    assert all(a[1] == b[0] for a, b in pairwise(spans))
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool}
    tensors = {}
    for name, entry in entries.items():
        dtype = dtypes[entry["dtype"]]
        size = torch.empty(0, dtype=dtype).element_size()
        begin, end = entry["data_offsets"]
        assert end - begin == math.prod(entry["shape"]) * size
        # Read as little-endian integers of the element's width, then reinterpreted.
        ints = np.frombuffer(body[begin:end], dtype=f"<{'u' if size == 1 else 'i'}{size}")
        tensor = torch.from_numpy(ints.astype(ints.dtype.newbyteorder("="))).view(dtype)
        tensors[name] = tensor.reshape(entry["shape"])
    return header, tensors


def test_safetensors_parse_back_to_the_tensors_written(tmp_path):
    """write_safetensors' header gives each tensor's dtype, shape and offsets, its data starts
    8-byte aligned, and every tensor reads back equal, bit for bit, whatever its dtype."""
    tensors = {"matrix": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16),
               "half": torch.randn(2, 2).half(), "ids": torch.arange(-3, 4),
               "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "strided": torch.randn(4, 6).T}  # not contiguous: written in its logical order
    gpt.write_safetensors(str(tmp_path / "t.safetensors"), tensors)
    header, read = read_safetensors(tmp_path / "t.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert header["matrix"] == {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}
    assert int.from_bytes((tmp_path / "t.safetensors").read_bytes()[:8], "little") % 8 == 0
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name


def test_little_endian_bytes_hand_example():
    """1.0 in float32 is 0x3f800000, written lowest byte first."""
    assert gpt.little_endian_bytes(torch.tensor([1.0])) == b"\x00\x00\x80\x3f"
    assert gpt.little_endian_bytes(torch.tensor([1], dtype=torch.int16)) == b"\x01\x00"


def test_rope_halves_hand_example():
    """Within each head of width 4, rows (0, 1, 2, 3) go to (0, 2, 1, 3)."""
    rows = torch.arange(8.0)[:, None]  # 2 heads of D = 4, one input column
    assert gpt.rope_halves(rows, num_heads=2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def rotate_half_llama(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's RoPE as `transformers` writes it, on x (..., T, D) at positions 0 .. T-1:
    dimension i turns with dimension i + D/2, by the angle position * theta^(-2i/D)."""
    T, D = x.shape[-2:]
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)  # (D/2,)
    angles = torch.outer(torch.arange(T).float(), inv_freq)        # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)                   # (T, D): i and i + D/2 alike
    x1, x2 = x[..., :D // 2], x[..., D // 2:]
    return x * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()


def attention_scores(x, wq, wk, num_heads: int, rotate) -> torch.Tensor:
    """q k^T of x (T, C) for every head: (H, T, T), after `rotate` turns q and k (H, T, D)."""
    T, C = x.shape
    q = (x @ wq.T).view(T, num_heads, -1).transpose(0, 1)  # (H, T, D)
    k = (x @ wk.T).view(T, num_heads, -1).transpose(0, 1)
    return rotate(q) @ rotate(k).transpose(-2, -1)         # (H, T, D) @ (H, D, T) -> (H, T, T)


def test_rope_halves_make_llamas_rotation_give_our_attention_scores():
    """The q and k projections with rows reordered by rope_halves, rotated Llama's way (halves),
    give the scores that the original ones give rotated ours (adjacent pairs); without the
    reordering they do not."""
    torch.manual_seed(0)
    T, C, H, theta = 12, 32, 4, 100.0
    x, wq, wk = torch.randn(T, C), torch.randn(C, C), torch.randn(C, C)
    rope = gpt.RotaryEmbedding(theta, C // H, T)
    ours = attention_scores(x, wq, wk, H, lambda t: rope(t, torch.arange(T)))
    llama = lambda t: rotate_half_llama(t, theta)
    reordered = attention_scores(x, gpt.rope_halves(wq, H), gpt.rope_halves(wk, H), H, llama)
    torch.testing.assert_close(reordered, ours, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(attention_scores(x, wq, wk, H, llama), ours, atol=1e-2)


def llama_logits(weights: dict[str, torch.Tensor], config: dict, ids: list[int]) -> torch.Tensor:
    """LlamaForCausalLM's forward pass written out in plain torch, from the exported weights and
    config.json alone: ids (T,) -> logits (T, V)."""
    H, D, T = config["num_attention_heads"], config["head_dim"], len(ids)
    norm = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                        + config["rms_norm_eps"]) * g
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = weights["model.embed_tokens.weight"][ids]  # (T, C)
    for i in range(config["num_hidden_layers"]):
        w = {name.removeprefix(f"model.layers.{i}."): tensor for name, tensor in weights.items()}
        h = norm(x, w["input_layernorm.weight"])
        q, k, v = ((h @ w[f"self_attn.{n}_proj.weight"].T).view(T, H, D).transpose(0, 1)
                   for n in "qkv")                                     # (H, T, D) each
        q, k = (rotate_half_llama(t, config["rope_theta"]) for t in (q, k))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~causal, -math.inf)
        y = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, H * D)  # (T, C)
        x = x + y @ w["self_attn.o_proj.weight"].T
        h = norm(x, w["post_attention_layernorm.weight"])
        gate, up = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    head = weights["model.embed_tokens.weight" if config["tie_word_embeddings"] else
                   "lm_head.weight"]
    return norm(x, weights["model.norm.weight"]) @ head.T


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_exported_weights_run_as_llama_give_our_logits(tmp_path, tie):
    """The safetensors file and config.json, run through Llama's forward pass (written out
    above), give our model's logits; with tied embeddings there is no lm_head to store."""
    torch.manual_seed(0)
    config = tiny_config(tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-6)
    model = gpt.TransformerLM(config).eval()
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], [EOT])
    gpt.write_safetensors(str(tmp_path / "model.safetensors"), gpt.llama_state_dict(model))
    _, weights = read_safetensors(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in weights) == (not tie)
    assert len(weights) == 2 + 9 * config.num_layers + (not tie)
    llama_config = json.loads(json.dumps(gpt.llama_config(config, tokenizer)))
    ids = torch.randint(0, config.vocab_size, (config.context_length,)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(llama_logits(weights, llama_config, ids), ours,
                               atol=1e-4, rtol=1e-4)


def test_export_config_of_gqa_qk_norm_and_scaled_rope():
    """A model with qk-norm is exported as Qwen3, GQA as num_key_value_heads, a head width of
    its own as head_dim, and Llama 3's RoPE scaling as the Hub's rope_scaling."""
    config = tiny_config(vocab_size=257, num_kv_heads=2, head_dim=6, qk_norm=True,
                         rope_factor=8.0, rope_original_context=8)
    hf = gpt.llama_config(config, gpt.Tokenizer(BYTES_VOCAB, [], [EOT]))
    assert (hf["architectures"], hf["model_type"]) == (["Qwen3ForCausalLM"], "qwen3")
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]) == (4, 2, 6)
    assert hf["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    names = gpt.llama_state_dict(gpt.TransformerLM(config)).keys()
    assert "model.layers.1.self_attn.k_norm.weight" in names


def test_export_config_matches_the_model():
    """config.json holds every size of the model under Llama's names, and the end-of-text id."""
    config = tiny_config(vocab_size=257, tie_embeddings=True, rope_theta=500.0, norm_eps=1e-6)
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], [EOT, "<|pad|>"])
    assert gpt.llama_config(config, tokenizer) == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 257,
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 500.0,
        "max_position_embeddings": 16, "tie_word_embeddings": True, "bos_token_id": 256,
        "eos_token_id": 256, "torch_dtype": "float32", "use_cache": True}
    no_specials = gpt.llama_config(config, gpt.Tokenizer(BYTES_VOCAB, []))
    assert no_specials["bos_token_id"] is None and no_specials["eos_token_id"] is None


@pytest.mark.parametrize("which", ["trained", "duplicate-tokens"])
def test_export_tokenizer_files_load_back(tmp_path, tokenizer, which):
    """The exported tokenizer reads back with Tokenizer.load as the same tokenizer, and its
    tokenizer.json holds the same vocabulary (the first id of a duplicated string), merges and
    special tokens, with the settings that make `tokenizers` encode as we do."""
    original = tokenizer if which == "trained" else duplicate_token_tokenizer()
    for name, data in gpt.hf_tokenizer_files(original, 16).items():
        (tmp_path / name).write_bytes(data)
    loaded = gpt.Tokenizer.load(str(tmp_path))
    assert (loaded.vocab, loaded.merges, loaded.special_tokens) == (
        original.vocab, original.merges, original.special_tokens)
    fast = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    spell = gpt.bytes_to_unicode()
    spelled = lambda token: "".join(spell[b] for b in token)
    special = original.special_tokens[0]
    expected = {spelled(token): original.id_of[token] for token in original.vocab.values()}
    expected[special] = expected.pop(spelled(special.encode()))  # as written, not spelled
    assert fast["model"]["vocab"] == expected
    assert fast["model"]["merges"] == [f"{spelled(a)} {spelled(b)}" for a, b in original.merges]
    assert fast["model"]["ignore_merges"] is False
    assert [(t["id"], t["content"], t["special"]) for t in fast["added_tokens"]] == [
        (original.special_ids[special], special, True)]
    assert fast["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False,
                                     "trim_offsets": True, "use_regex": True}
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert settings["eos_token"] == settings["bos_token"] == special
    assert settings["model_max_length"] == 16


@pytest.mark.parametrize("overrides, named", [
    (dict(use_norm=False), "use_norm=False"),
    (dict(norm_position="post"), "norm_position='post'"),
    (dict(position_encoding="nope"), "position_encoding='nope'"),
    (dict(ffn_kind="geglu"), "ffn_kind='geglu'"),
    (dict(ffn_kind="silu"), "ffn_kind='silu'"),
    (dict(ffn_kind="gelu"), "ffn_kind='gelu'"),
], ids=["no-norm", "post-norm", "nope", "geglu", "silu-mlp", "gelu-mlp"])
def test_export_refuses_what_llama_cannot_express(tmp_path, capsys, overrides, named):
    """An ablation that Llama cannot compute is refused with one line naming the setting, and
    nothing is written."""
    with pytest.raises(ValueError, match=re.escape(named)):
        gpt.check_exportable(tiny_config(**overrides))
    path = write_export_checkpoint(tmp_path, **overrides)
    capsys.readouterr()
    assert exit_code(["export", "--checkpoint", path, "--out", str(tmp_path / "hf")]) == 2
    assert named in one_error_line(capsys, "export")
    assert not (tmp_path / "hf").exists()


def write_export_checkpoint(tmp_path, **overrides) -> str:
    """A checkpoint of a tiny model with a byte-level tokenizer, as `train` writes for sampling."""
    config = tiny_config(vocab_size=257, **overrides)
    model = gpt.TransformerLM(config)
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], [EOT])
    path = str(tmp_path / "model.pt")
    gpt.save_checkpoint(model, gpt.AdamW(model.parameters()), 7, path,
                        config=dataclasses.asdict(config),
                        tokenizer=dict(vocab=tokenizer.vocab, merges=tokenizer.merges,
                                       special_tokens=tokenizer.special_tokens))
    return path


def test_export_command_writes_every_file_and_a_weights_only_checkpoint(tmp_path, capsys):
    """`export` writes the Hugging Face files and a gpt.pt that holds the same model with no
    optimizer state; exporting gpt.pt again gives the same files."""
    path = write_export_checkpoint(tmp_path, tie_embeddings=True)
    assert gpt.main(["export", "--checkpoint", path, "--out", str(tmp_path / "hf")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "hf")) == [
        ".gpt-export.json", "config.json", "generation_config.json", "gpt.pt", "merges.txt",
        "model.safetensors",
        "special_tokens.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.json"]
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 256, "eos_token_id": 256}  # 256: <|endoftext|>
    original, weights_only = gpt.read_checkpoint(path), gpt.read_checkpoint(
        str(tmp_path / "hf" / "gpt.pt"))
    assert "optimizer" in original and "optimizer" not in weights_only
    assert weights_only["iteration"] == 7 and weights_only["config"] == original["config"]
    assert_same_weights(weights_only["model"], original["model"])
    assert gpt.main(["export", "--checkpoint", str(tmp_path / "hf" / "gpt.pt"),
                     "--out", str(tmp_path / "again")]) == 0
    for name in os.listdir(tmp_path / "hf"):
        if name not in ("gpt.pt", ".gpt-export.json"):  # these name their sources
            assert (tmp_path / "again" / name).read_bytes() == (
                tmp_path / "hf" / name).read_bytes(), name


def test_export_writes_only_into_a_new_empty_or_earlier_export_directory(tmp_path, capsys):
    """export refuses a directory holding files it did not write (a user's, a tokenizer's),
    and an earlier export unless --overwrite, which replaces it, but not when a file of the
    user's has joined it; each refusal is one line and leaves every file as it was."""
    path = write_export_checkpoint(tmp_path)
    export = lambda out, *extra: exit_code(["export", "--checkpoint", path, "--out", str(out),
                                            *extra])
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.json").write_text("{}")
    capsys.readouterr()
    assert export(tokenizer_dir) == 2
    assert "holds files that no export or import wrote (vocab.json)" in one_error_line(capsys,
                                                                                        "export")
    assert os.listdir(tokenizer_dir) == ["vocab.json"]
    assert (tokenizer_dir / "vocab.json").read_text() == "{}"
    hf = tmp_path / "hf"
    hf.mkdir()  # empty: taken
    assert export(hf) == 0
    before = files_under(hf)
    capsys.readouterr()
    assert export(hf) == 2
    assert "--overwrite" in one_error_line(capsys, "export")
    (hf / "model.safetensors").write_bytes(b"old")
    assert export(hf, "--overwrite") == 0
    assert files_under(hf) == before
    (hf / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert export(hf, "--overwrite") == 2
    assert "other files (notes.txt)" in one_error_line(capsys, "export")
    assert (hf / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["hf", "model.pt", "tokenizer"]  # nothing staged left


def test_export_cleans_up_after_a_killed_export(tmp_path, capsys):
    """A killed export's half-written directory is removed by the next export, and an earlier
    export it had moved aside (killed between the two renames) is put back in place."""
    path = write_export_checkpoint(tmp_path)
    hf = tmp_path / "hf"
    assert gpt.main(["export", "--checkpoint", path, "--out", str(hf)]) == 0
    previous = files_under(hf)
    dead = dead_pid()
    hf.rename(tmp_path / f".hf.export-old-{dead}")
    (tmp_path / f".hf.export-new-{dead}").mkdir()
    (tmp_path / f".hf.export-new-{dead}" / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    assert exit_code(["export", "--checkpoint", path, "--out", str(hf)]) == 2  # no --overwrite
    assert "earlier export" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["hf", "model.pt"]
    assert files_under(hf) == previous


def test_sample_from_the_weights_only_file_gives_the_same_story(tmp_path, trained_run, capsys):
    """`sample --checkpoint DIR/gpt.pt` writes what sampling from the training checkpoint
    writes, with the same seed."""
    assert gpt.main(["export", "--run-dir", str(trained_run), "--out", str(tmp_path)]) == 0
    stories = []
    for source in (["--run-dir", str(trained_run)], ["--checkpoint", str(tmp_path / "gpt.pt")]):
        capsys.readouterr()
        assert gpt.main(["sample", *source, "--prompt", "Once upon a time", "--seed", "3",
                         "--max-new-tokens", "12"]) == 0
        stories.append(capsys.readouterr().out)
    assert stories[0] == stories[1] and len(stories[0]) > len("Once upon a time\n")


@pytest.mark.parametrize("extra, named", [
    (["--checkpoint", "{tmp}/missing.pt"], "{tmp}/missing.pt"),
    (["--run-dir", "{tmp}/empty"], "no checkpoint"),
    (["--checkpoint", "{tmp}/model.pt", "--out", "{tmp}/file"], "{tmp}/file"),
], ids=["missing", "no-checkpoint", "out-is-a-file"])
def test_export_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, named):
    """A missing checkpoint or an --out that is a file gives one line and exit code 2."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    write_export_checkpoint(tmp_path)
    args = ["export", "--out", str(tmp_path / "hf")]  # a second --out replaces this one
    capsys.readouterr()
    assert exit_code(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    assert named.format(tmp=tmp_path) in one_error_line(capsys, "export")


def test_transformers_loads_the_export_and_computes_our_model(tmp_path, trained_run):
    """AutoModelForCausalLM and AutoTokenizer load the export with no code of ours; the logits
    agree within 1e-4 over a whole context, and greedy decoding gives the same tokens."""
    transformers = pytest.importorskip("transformers")
    assert gpt.main(["export", "--run-dir", str(trained_run), "--out", str(tmp_path)]) == 0
    model, tokenizer = gpt.load_for_sampling(str(tmp_path / "gpt.pt"), torch.device("cpu"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(hf_model).__name__ == "LlamaForCausalLM" and hf_tokenizer.is_fast
    T = model.config.context_length
    ids = tokenizer.encode(open(TINYSTORIES, encoding="utf-8").read(2000))[:T]
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])), hf_model(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = [tokenizer.special_ids[EOT]] + tokenizer.encode("Once upon a")
    assert hf_tokenizer(EOT + "Once upon a")["input_ids"] == prompt
    n = T - len(prompt)  # Llama has no sliding window: stay within the context
    greedy = [int(t) for t in gpt.generate_batch(model, torch.tensor([prompt]), n, 0.0)]
    # eos_token_id=None: n tokens even past an end of text.
    hf_greedy = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, attention_mask=torch.ones(1, len(prompt),
                                                                               dtype=torch.long))
    assert hf_greedy[0, len(prompt):].tolist() == greedy


@pytest.mark.parametrize("which", ["trained", "duplicate-tokens", "gpt2"])
def test_transformers_tokenizer_gives_our_ids(tmp_path, request, which):
    """AutoTokenizer, reading the exported tokenizer files, gives the ids Tokenizer.encode gives
    on every kind of text, special tokens included, and decodes them back to the text."""
    transformers = pytest.importorskip("transformers")
    original = {"trained": lambda: request.getfixturevalue("tokenizer"),
                "duplicate-tokens": duplicate_token_tokenizer,
                "gpt2": lambda: request.getfixturevalue("gpt2_tokenizer")}[which]()
    for name, data in gpt.hf_tokenizer_files(original, 1024).items():
        (tmp_path / name).write_bytes(data)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    special = original.special_tokens[0]
    for text in ["abc é! Once upon a time" + special + "The end.", *TRICKY_TEXTS]:
        ids = original.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text

# --- Reading Hugging Face tokenizers (read_hf_tokenizer, for `import`) --------------------------

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, corpus_path):
    """Model directories whose tokenizer.json `tokenizers` itself wrote, one per layout gpt.py
    reads: GPT-2's own vocabulary and merges (as `tokenizers` saves merges, ["a", "b"], and
    rewritten in the older form "a b"); Llama 3's, made from GPT-2's ranks as transformers
    converts tiktoken's (a Split, ignore_merges, merges that use a token before the merge that
    makes it, <|begin_of_text|> before every text); Qwen's and SmolLM's, trained here on
    TinyStories with ChatML's special tokens and their chat templates."""
    pytest.importorskip("tokenizers")
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers,
                            processors, trainers)
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter
    root, dirs = tmp_path_factory.mktemp("hf"), {}

    def save(name, hf, **files):
        dirs[name] = root / name
        dirs[name].mkdir()
        hf.save(str(dirs[name] / "tokenizer.json"))
        for file, content in files.items():
            (dirs[name] / f"{file}.json").write_text(json.dumps(content))

    def trained(pre_tokenizer, specials, normalizer=None):
        hf = Tokenizer(BPE())
        hf.normalizer, hf.pre_tokenizer = normalizer, pre_tokenizer
        hf.decoder = decoders.ByteLevel()
        lines = pathlib.Path(corpus_path).read_text(encoding="utf-8").splitlines(keepends=True)
        hf.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=1500, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        return hf

    gpt2_vocab = json.loads(pathlib.Path(GPT2_DIR, "vocab.json").read_text(encoding="utf-8"))
    with open(os.path.join(GPT2_DIR, "merges.txt"), encoding="utf-8") as f:
        gpt2_merges = [tuple(line.split()) for line in f.read().splitlines()[1:] if line]
    hf = Tokenizer(BPE(gpt2_vocab, gpt2_merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder, hf.post_processor = decoders.ByteLevel(), processors.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    save("gpt2", hf, config={"eos_token_id": 50256})
    spec = json.loads((dirs["gpt2"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert isinstance(spec["model"]["merges"][0], list)
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    dirs["gpt2-string-merges"] = root / "gpt2-string-merges"
    dirs["gpt2-string-merges"].mkdir()
    (dirs["gpt2-string-merges"] / "tokenizer.json").write_text(json.dumps(spec))

    unspell = {c: b for b, c in gpt.bytes_to_unicode().items()}
    with open(root / "gpt2.tiktoken", "w") as f:
        for token, rank in gpt2_vocab.items():
            if token != EOT:
                f.write(f"{base64.b64encode(bytes(unspell[c] for c in token)).decode()} {rank}\n")
    hf = TikTokenConverter(str(root / "gpt2.tiktoken"), pattern=LLAMA3_PATTERN,
                           extra_special_tokens=["<|begin_of_text|>", "<|eot_id|>"]).converted()
    hf.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                             processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", 50256)])])
    save("llama3", hf, generation_config={"bos_token_id": 50256, "eos_token_id": [50257]},
         tokenizer_config={"chat_template": LLAMA3_CHAT_TEMPLATE})

    chatml = [EOT, "<|im_start|>", "<|im_end|>"]
    hf = trained(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), [],
        normalizers.NFC())
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in chatml])
    hf.add_tokens([AddedToken(s, special=False, normalized=False) for s in ["<think>", "</think>"]])
    im_end = hf.token_to_id("<|im_end|>")
    save("qwen", hf, tokenizer_config={"chat_template": QWEN3_TEMPLATE, "eos_token": EOT},
         generation_config={"eos_token_id": [im_end, hf.token_to_id(EOT)]})
    hf = trained(pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), chatml)
    save("smollm", hf, config={"eos_token_id": 2},
         tokenizer_config={"chat_template": SMOLLM2_TEMPLATE})
    return dirs


# Each directory's settings, bos and eos ids, and chat (text before a question) as read.
HF_EXPECTED = {
    "gpt2": ({}, [], [50256], None),
    "gpt2-string-merges": ({}, [], [], None),
    "llama3": (LAYOUTS["llama3"], [50256], [50257], "not ChatML"),
    "qwen": (LAYOUTS["qwen"], [], ["<|im_end|>", EOT], "<|im_start|>user\n"),
    "smollm": (LAYOUTS["smollm"], [], [2], "<|im_start|>system\nYou are a helpful AI assistant "
               "named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"),
}


@pytest.mark.parametrize("name", HF_EXPECTED)
def test_read_hf_tokenizer_gives_the_ids_of_tokenizers(hf_dirs, corpus_path, name):
    """Each layout's tokenizer.json reads to a tokenizer that gives `tokenizers`' ids on hard
    text (code, HTML, digit runs, emoji, CJK, accents NFC composes, \\r\\n, trailing spaces,
    special tokens and Qwen3's non-special <think> inside text), random strings and stories,
    in its plain form too; `tokenizers` puts bos_ids first, and both decode alike. The
    generation settings are read from the directory's configuration files."""
    from tokenizers import Tokenizer
    hf = Tokenizer.from_file(str(hf_dirs[name] / "tokenizer.json"))
    ours, generation = gpt.read_hf_tokenizer(str(hf_dirs[name]))
    settings, bos_ids, eos, before = HF_EXPECTED[name]
    assert ours.settings() == settings and generation["bos_ids"] == bos_ids
    assert generation["eos_ids"] == [ours.special_ids.get(e, e) for e in eos]
    chat = generation["chat"]
    assert (chat and (chat["before"] or "not ChatML")) == before
    plain = PlainTokenizer(ours.vocab, ours.merges, ours.special_tokens, **ours.settings())
    rng = random.Random(0)
    chars = list("ab Z1 2\n\r\t.,'é日🙂\u0301\xa0") + ["'S", "123456", *ours.special_tokens[:3]]
    texts = [*HARD_TEXTS, f"x{EOT}y <|im_start|>user\nHi<|im_end|>\n<think>\n\n</think>",
             *("".join(rng.choices(chars, k=rng.randint(0, 16))) for _ in range(200))]
    normalize = (lambda t: unicodedata.normalize("NFC", t)) if ours.normalizer else str
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids == plain.encode(text), text
        assert hf.encode(text).ids == bos_ids + ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False) == normalize(text)
    stories = pathlib.Path(corpus_path).read_text(encoding="utf-8")
    assert ours.encode(stories) == hf.encode(stories, add_special_tokens=False).ids


def exported_tokenizer_json(tmp_path, change) -> str:
    """A directory holding an exported Llama-3-style tokenizer.json, changed by `change`."""
    spec = gpt.tokenizer_json(chat_tokenizer("llama3"), [259])
    change(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    return str(tmp_path)


def set_in(path: str, value):
    """A change that sets spec[k1][k2]... = value, for path "k1.k2..." (numbers index lists)."""
    def change(spec):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        for key in parents:
            spec = spec[key]
        spec[last] = value
    return change


@pytest.mark.parametrize("path, value, named", [
    ("model.type", "WordPiece", "'WordPiece', not BPE"),
    ("model.type", "Unigram", "'Unigram', not BPE"),
    ("model.byte_fallback", True, "byte_fallback"),
    ("model.continuing_subword_prefix", "##", "continuing_subword_prefix"),
    ("model.end_of_word_suffix", "</w>", "end_of_word_suffix"),
    ("model.dropout", 0.1, "dropout"),
    ("model.vocab.a b", 300, "token 'a b'"),
    ("model.merges", ["a b c"], "merge 'a b c'"),
    ("model.merges", [["a", "zz"]], "not in the vocabulary"),
    ("normalizer", {"type": "NFKC"}, "normalizer NFKC"),
    ("normalizer", {"type": "Sequence", "normalizers": []}, "normalizer Sequence"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "_"}, "pre-tokenizer Metaspace"),
    ("pre_tokenizer.pretokenizers.1.add_prefix_space", True, "pre-tokenizer ByteLevel"),
    ("pre_tokenizer.pretokenizers.0.behavior", "Removed", "pre-tokenizer Split"),
    ("pre_tokenizer.pretokenizers.0.invert", True, "pre-tokenizer Split"),
    ("pre_tokenizer.pretokenizers.0.pattern", {"Regex": "(x"}, "not a regular expression"),
    ("pre_tokenizer", {"type": "Whitespace"}, "pre-tokenizer Whitespace"),
    ("added_tokens.0.lstrip", True, "with lstrip"),
    ("added_tokens.0.rstrip", True, "with rstrip"),
    ("added_tokens.0.single_word", True, "with single_word"),
    ("added_tokens.0.id", 97, "another token's id"),
    ("decoder", {"type": "WordPiece"}, "decoder WordPiece"),
    ("post_processor.single", [{"Sequence": {"id": "A", "type_id": 0}},
                               {"SpecialToken": {"id": EOT, "type_id": 0}}],
     "post-processor TemplateProcessing"),
    ("post_processor", {"type": "RobertaProcessing"}, "post-processor RobertaProcessing"),
    ("model", {"type": "BPE", "vocab": {}}, "not laid out as tokenizer.json is"),
])
def test_read_hf_tokenizer_refuses_what_it_cannot_compute(tmp_path, path, value, named):
    """Another model than byte-level BPE, BPE with options, other normalizers, pre-tokenizers,
    decoders and post-processors, added tokens that take spaces or another's id: one line
    naming what is not supported."""
    with pytest.raises(ValueError, match=re.escape(named)):
        gpt.read_hf_tokenizer(exported_tokenizer_json(tmp_path, set_in(path, value)))


def test_read_hf_tokenizer_refuses_normalized_tokens_files_and_templates(tmp_path):
    """An added token matched in NFC-normalized text, a directory without tokenizer.json, a
    chat_template that is a list of named templates and an eos id the tokenizer has not: one
    line each."""
    def nfc_normalized(spec):
        spec["normalizer"] = {"type": "NFC"}
        spec["added_tokens"][0]["normalized"] = True
    with pytest.raises(ValueError, match="with normalized"):
        gpt.read_hf_tokenizer(exported_tokenizer_json(tmp_path, nfc_normalized))
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        gpt.read_hf_tokenizer(str(tmp_path / "nothing"))
    hf_dir = exported_tokenizer_json(tmp_path, lambda spec: None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": SMOLLM2_TEMPLATE}]}))
    with pytest.raises(ValueError, match="not one template"):
        gpt.read_hf_tokenizer(hf_dir)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match="generation settings are damaged"):
        gpt.read_hf_tokenizer(hf_dir)


@pytest.mark.parametrize("template, thinking", [(SMOLLM2_TEMPLATE, False), (QWEN3_TEMPLATE, True)])
def test_chat_prompt_is_what_the_template_renders(template, thinking):
    """The prompt `sample --qa` writes for a question is what transformers' apply_chat_template
    renders from SmolLM2-Instruct's and Qwen3's templates, generation prompt added (Qwen3's
    without thinking, enable_thinking=False), with the system prompt SmolLM2's puts first."""
    transformers = pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template
    tokenizer = chat_tokenizer()
    chat = gpt.chat_format(template, tokenizer)
    qa = gpt.qa_template(tokenizer, {"bos_ids": [259], "eos_ids": [256], "chat": chat}, "x")
    assert qa.start == [] and qa.end == tokenizer.special_ids["<|im_end|>"]
    for question in ["Who is Lily?", " Why?\n "]:
        messages = [[{"role": "user", "content": question.strip()}]]
        rendered = render_jinja_template(messages, chat_template=template,
                                         add_generation_prompt=True, enable_thinking=False)
        assert qa.prompt(question) == rendered[0][0]
    assert ("<think>" in qa.after) == thinking
    llama = gpt.chat_format(LLAMA3_CHAT_TEMPLATE, tokenizer)
    assert llama == {"before": None, "after": None, "end": None, "template": LLAMA3_CHAT_TEMPLATE}
    with pytest.raises(ValueError, match="not ChatML"):
        gpt.qa_template(tokenizer, {"bos_ids": [], "eos_ids": [256], "chat": llama}, "x")


@pytest.mark.parametrize("layout", ["smollm", "llama3", "qwen"])
def test_export_of_an_imported_model_reads_back_the_same(tmp_path, layout, capsys):
    """`export` of a checkpoint with another layout's tokenizer and generation settings writes
    files that read_hf_tokenizer reads back to the same tokenizer and settings (no library
    needed); with transformers installed, AutoTokenizer gives our ids, bos first, and its chat
    template renders our prompt."""
    tokenizer, generation = imported_checkpoint(tmp_path / "imported.pt", layout=layout)
    assert gpt.main(["export", "--checkpoint", str(tmp_path / "imported.pt"),
                     "--out", str(tmp_path / "hf")]) == 0
    back, back_generation = gpt.read_hf_tokenizer(str(tmp_path / "hf"))
    assert (back.vocab, back.merges, back.special_tokens, back.settings()) == (
        tokenizer.vocab, tokenizer.merges, tokenizer.special_tokens, tokenizer.settings())
    assert back_generation == generation and back.fingerprint() == tokenizer.fingerprint()
    configs = [json.loads((tmp_path / "hf" / name).read_text())
               for name in ("config.json", "generation_config.json")]
    assert all((c["bos_token_id"], c["eos_token_id"]) == (259, [256, 258]) for c in configs)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in HARD_TEXTS:
        assert hf(text)["input_ids"] == [259] + tokenizer.encode(text), text
    qa = gpt.qa_template(tokenizer, generation, "x")
    prompt = hf.apply_chat_template([{"role": "user", "content": "Who is Lily?"}],
                                    tokenize=False, add_generation_prompt=True)
    assert prompt == qa.prompt("Who is Lily?")
    assert hf(prompt, add_special_tokens=False)["input_ids"] == qa.prompt_ids(tokenizer,
                                                                              "Who is Lily?")


# --- import: a Hugging Face checkpoint read back -------------------------------------------------
def export_for_import(tmp_path, **overrides) -> pathlib.Path:
    """An export of a tiny model of ours (weights with spread, so that a wrong layout shows):
    the Hugging Face directory that `import` reads, made without transformers."""
    torch.manual_seed(0)
    path = write_export_checkpoint(tmp_path, **overrides)
    checkpoint = torch.load(path, weights_only=True)
    for name, tensor in checkpoint["model"].items():  # norm gains too: qk-norm's are reordered
        tensor.copy_(torch.randn_like(tensor) * 0.3 + (1.0 if tensor.ndim == 1 else 0.0))
    torch.save(checkpoint, path)
    assert gpt.main(["export", "--checkpoint", path, "--out", str(tmp_path / "hf")]) == 0
    return tmp_path / "hf"


def logits_of(path: str, ids: torch.Tensor, form: str = "fast") -> torch.Tensor:
    """The logits of the model of checkpoint `path`, built of the fast twins or the readable
    forms of §3."""
    model, _, _ = gpt.read_model(path)
    if form == "readable":
        readable = readable_model(model.config).eval()
        readable.load_state_dict(model.state_dict())
        model = readable
    with torch.no_grad():
        return model(ids)


OUR_KINDS = {"ours": {}, "gqa-tied": dict(num_kv_heads=2, tie_embeddings=True),
             "qwen3-llama3-rope": dict(IMPORTED_SIZES, num_kv_heads=1, rope_factor=8.0,
                                       rope_original_context=8)}


@pytest.mark.parametrize("overrides", OUR_KINDS.values(), ids=OUR_KINDS.keys())
def test_import_of_an_export_gives_the_same_model_and_exports_the_same_files(tmp_path, capsys,
                                                                             overrides):
    """`export` then `import` gives back the config, tokenizer and weights exactly, so the same
    logits, in the fast and the readable forms; exporting the import writes the same Hugging
    Face files again. Needs no transformers."""
    hf = export_for_import(tmp_path, **overrides)
    capsys.readouterr()
    assert gpt.main(["import", str(hf), "--out-dir", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "float32" in printed and "sample --run-dir" in printed
    assert sorted(os.listdir(tmp_path / "run")) == [".gpt-export.json", "gpt.pt"]
    original = gpt.read_checkpoint(str(hf / "gpt.pt"))
    imported = gpt.read_checkpoint(str(tmp_path / "run" / "gpt.pt"))
    assert imported["config"] == original["config"] and imported["kind"] == "imported"
    assert imported["tokenizer"] == original["tokenizer"]
    # Our export puts no token before a text (ByteLevel post-processing) and ends with <eot>.
    assert imported["generation"] == {"bos_ids": [], "eos_ids": [256], "chat": None}
    assert_same_weights(imported["model"], original["model"])
    ids = torch.randint(0, 257, (2, 16))
    for form in ("fast", "readable"):
        assert torch.equal(logits_of(str(tmp_path / "run" / "gpt.pt"), ids, form),
                           logits_of(str(hf / "gpt.pt"), ids, form))
    assert gpt.main(["export", "--run-dir", str(tmp_path / "run"), "--out",
                     str(tmp_path / "again")]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (hf / name).read_bytes(), name


def test_safetensors_header_reads_the_safetensors_librarys_files(tmp_path):
    """Tensors that the safetensors library writes, in each dtype import takes, come back
    bit for bit through safetensors_header and read_tensor, as float32."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(),
               "c": torch.randn(2, 4).half(), "empty": torch.zeros(0, 3)}
    safetensors_torch.save_file(tensors, str(tmp_path / "t.safetensors"))
    header = gpt.safetensors_header(str(tmp_path / "t.safetensors"))
    assert {name: entry[1:3] for name, entry in header.items()} == {
        name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    for name, tensor in tensors.items():
        read = gpt.read_tensor(*header[name])
        assert read.dtype == torch.float32 and torch.equal(read, tensor.float()), name


def hf_reference_dir(tmp_path, kind: str):
    """A tiny model of `transformers` with weights of some spread, saved by save_pretrained in
    the dtype and the shards of `kind`, with our byte-level tokenizer's files beside it; and the
    model loaded back from those files in float32."""
    transformers = pytest.importorskip("transformers")
    arch, settings, dtype, shard = HF_KINDS[kind]
    config = getattr(transformers, arch)(**{
        "vocab_size": 257, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
        **settings})
    torch.manual_seed(0)
    model = getattr(transformers, arch.replace("Config", "ForCausalLM"))(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    hf = tmp_path / "hf"
    model.to(dtype).save_pretrained(str(hf), **({"max_shard_size": shard} if shard else {}))
    for name, data in gpt.hf_tokenizer_files(gpt.Tokenizer(BYTES_VOCAB, [], [EOT]), 128).items():
        (hf / name).write_bytes(data)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    return hf, reference.eval()


# arch, settings, dtype of the saved weights, max_shard_size
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)
HF_KINDS = {
    "llama-gqa-fp32": ("LlamaConfig", dict(num_key_value_heads=2), torch.float32, None),
    "llama-tied-bf16": ("LlamaConfig", dict(num_key_value_heads=1, tie_word_embeddings=True),
                        torch.bfloat16, None),
    "llama3-rope-fp16": ("LlamaConfig", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
                         torch.float16, None),
    "qwen3-qknorm-headdim-bf16": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=12,
                                                      tie_word_embeddings=True),
                                  torch.bfloat16, None),
    "llama-sharded": ("LlamaConfig", dict(num_key_value_heads=2), torch.float32, "20KB"),
    # rows past the tokenizer's 257 tokens, as Qwen pads its vocabulary
    "qwen3-padded-rows": ("Qwen3Config", dict(num_key_value_heads=2, vocab_size=264),
                          torch.float32, None),
}


@pytest.mark.parametrize("kind", HF_KINDS)
def test_imported_model_computes_transformers_logits(tmp_path, kind):
    """A tiny model saved by transformers' save_pretrained (GQA, tied or not, Llama 3's RoPE
    scaling, Qwen3's qk-norm and head width, fp32, bf16 and fp16 weights, shards, rows past the
    tokenizer's tokens, which import drops) imports into a model whose logits are transformers'
    within 1e-4, in the fast and the readable forms; exported again, transformers loads it as
    the same architecture, with the same logits."""
    hf, reference = hf_reference_dir(tmp_path, kind)
    if kind == "llama-sharded":
        assert (hf / "model.safetensors.index.json").exists()
    assert gpt.main(["import", str(hf), "--out-dir", str(tmp_path / "run")]) == 0
    ids = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        theirs = reference(ids).logits[..., :257]  # the tokens' rows
    assert theirs.std() > 1  # logits of some spread: a wrong layout would show
    for form in ("fast", "readable"):
        ours = logits_of(str(tmp_path / "run" / "gpt.pt"), ids, form)
        assert (ours - theirs).abs().max().item() < 1e-4, form
    assert gpt.main(["export", "--run-dir", str(tmp_path / "run"), "--out",
                     str(tmp_path / "again")]) == 0
    again = type(reference).from_pretrained(str(tmp_path / "again")).eval()
    assert type(again) is type(reference)
    with torch.no_grad():
        assert (again(ids).logits - theirs).abs().max().item() < 1e-4
    assert again.config.vocab_size == 257


@pytest.mark.parametrize("kind", ["llama-tied-bf16", "qwen3-qknorm-headdim-bf16"])
def test_sample_greedy_continues_as_transformers_generate(tmp_path, capsys, kind):
    """`sample --temperature 0` on an imported model prints the tokens that transformers'
    greedy generate() picks after the same prompt, fast and --readable."""
    hf, reference = hf_reference_dir(tmp_path, kind)
    assert gpt.main(["import", str(hf), "--out-dir", str(tmp_path / "run")]) == 0
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], [EOT])
    prompt = tokenizer.encode("Once")  # as sample feeds it: after no bos, as tokenizer.json says
    greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                eos_token_id=None, pad_token_id=0,
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    new = greedy[0, len(prompt):].tolist()
    eos = reference.config.eos_token_id  # config.json's, which import keeps as the end token
    expected = "Once" + tokenizer.decode(new[:new.index(eos)] if eos in new else new) + "\n"
    for readable in ([], ["--readable"]):
        capsys.readouterr()
        assert gpt.main(["sample", "--run-dir", str(tmp_path / "run"), "--prompt", "Once",
                         "--temperature", "0", "--max-new-tokens", "30", *readable]) == 0
        assert capsys.readouterr().out == expected


def test_inspect_and_finetune_take_an_imported_model(tmp_path, capsys):
    """`inspect` shows an imported GQA and qk-norm model's attention (a row per query head) and
    `finetune` trains it for a few steps."""
    hf = export_for_import(tmp_path, context_length=128, **IMPORTED_SIZES)
    assert gpt.main(["import", str(hf), "--out-dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert gpt.main(["inspect", "--run-dir", str(tmp_path / "run"), "--prompt", "Once upon",
                     "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^ +[01] +[0-3] +(\d\.\d\d +){4} '", printed, re.M)) == 2 * 4
    assert re.search(r"^layers.0.attn.k_proj.weight +12x32 ", printed, re.M)
    data = tmp_path / "qa.json"
    data.write_text(json.dumps(QA_PAIRS[:10]), encoding="utf-8")
    assert gpt.main(finetune_args(data, tmp_path / "ft", "--checkpoint",
                                  str(tmp_path / "run" / "gpt.pt"), "--max-steps", "2")) == 0
    assert os.path.isfile(tmp_path / "ft" / "latest.pt")


def rewrite_safetensors(path: pathlib.Path, change) -> None:
    """Replace a safetensors file's header by change(header), keeping its data."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    text = json.dumps(change(json.loads(data[8:8 + length]))).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])


def edit_json(path: pathlib.Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


NORM = "model.norm.weight"
LN = "model.layers.0.input_layernorm.weight"
HUGE = dict(hidden_size=65536, num_attention_heads=1024, num_key_value_heads=1024, head_dim=64,
            intermediate_size=1 << 18, num_hidden_layers=64, vocab_size=1 << 20)
# what to damage -> how, and the words the one-line refusal must hold
BAD_IMPORTS = {
    "gpt2": ("config.json", lambda c: {**c, "architectures": ["GPT2LMHeadModel"]},
             "GPT2LMHeadModel"),
    "mixture-of-experts": ("config.json", lambda c: {**c, "architectures": ["Qwen3MoeForCausalLM"]},
                           "Qwen3MoeForCausalLM"),
    "sliding-window": ("config.json", lambda c: {**c, "architectures": ["Qwen3ForCausalLM"],
                                                 "use_sliding_window": True}, "sliding-window"),
    "sliding-layers": ("config.json", lambda c: {**c, "layer_types": ["sliding_attention"] * 2},
                       "sliding-window"),
    "attention-bias": ("config.json", lambda c: {**c, "attention_bias": True}, "biases"),
    "mlp-bias": ("config.json", lambda c: {**c, "mlp_bias": True}, "biases"),
    "gelu": ("config.json", lambda c: {**c, "hidden_act": "gelu"}, "activation 'gelu'"),
    "yarn": ("config.json", lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4}},
             "RoPE scaling 'yarn'"),
    "kv-heads-uneven": ("config.json", lambda c: {**c, "num_key_value_heads": 3},
                        "not divisible by num_kv_heads 3"),
    "width-as-text": ("config.json", lambda c: {**c, "hidden_size": "32"}, "d_model"),
    "too-large-for-memory": ("config.json", lambda c: {**c, **HUGE}, "GiB in float32, more than"),
    "header-length-10^15": ("model.safetensors", "length", "header would be "
                            "1,000,000,000,000,000 bytes"),
    "offsets-past-the-end": ("model.safetensors", lambda h: {
        **h, NORM: {**h[NORM], "data_offsets": [h[NORM]["data_offsets"][0], 10**9]}},
        "outside the file's data"),
    "overlapping": ("model.safetensors", lambda h: {
        **h, NORM: {**h[NORM], "data_offsets": h[LN]["data_offsets"]}}, "overlap"),
    "int-dtype": ("model.safetensors", lambda h: {**h, NORM: {**h[NORM], "dtype": "I32"}},
                  "dtype 'I32'"),
    "bytes-not-shape": ("model.safetensors", lambda h: {**h, NORM: {**h[NORM], "shape": [33]}},
                        "has 128 bytes, where shape [33] takes 132"),
    "misshapen": ("model.safetensors", lambda h: {**h, NORM: {**h[NORM], "shape": [4, 8]}},
                  f"{NORM} has shape (4, 8) there, (32,) here"),
    "missing": ("model.safetensors", lambda h: {k: v for k, v in h.items() if k != NORM},
                f"missing ['{NORM}']"),
    "extra": ("model.safetensors", lambda h: {**h, "model.layers.0.self_attn.q_proj.bias": {
        "dtype": "F32", "shape": [0], "data_offsets": [0, 0]}},
        "unexpected ['model.layers.0.self_attn.q_proj.bias']"),
    "shard-outside": ("model.safetensors.index.json", lambda _: {
        "weight_map": {NORM: "../model.safetensors"}}, "weight_map"),
    "no-weights": ("model.safetensors", None, "has no model.safetensors"),
    "no-config": ("config.json", None, "no config.json"),
    "not-a-directory": ("", None, "is not a directory"),
}


@pytest.mark.parametrize("what, change, named", BAD_IMPORTS.values(), ids=BAD_IMPORTS.keys())
def test_import_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, what, change,
                                                                 named):
    """A model gpt.py cannot run, sizes beyond memory, a safetensors header that lies, missing,
    extra or misshapen tensors, a missing file: one line naming the problem, exit code 2, and
    no out-dir or staging directory left."""
    (tmp_path / "made").mkdir()
    hf = export_for_import(tmp_path / "made")
    path = hf / what
    if change is None:
        path.unlink() if path.is_file() else None
        if what == "":
            hf = tmp_path / "made" / "model.pt"  # a file
    elif change == "length":
        path.write_bytes((10**15).to_bytes(8, "little") + path.read_bytes()[8:])
    elif what.endswith(".json"):
        edit_json(path, change) if path.exists() else path.write_text(json.dumps(change(None)))
    else:
        rewrite_safetensors(path, change)
    capsys.readouterr()
    assert exit_code(["import", str(hf), "--out-dir", str(tmp_path / "run")]) == 2
    assert named in one_error_line(capsys, "import")
    assert sorted(os.listdir(tmp_path)) == ["made"]


def test_import_writes_only_into_a_new_empty_or_earlier_import_directory(tmp_path, capsys):
    """import refuses an out-dir that holds a run (a latest.pt), saying that no export or
    import wrote it and leaving it as it was; an earlier import unless --overwrite, which
    replaces it; and an out-dir another process holds the lock of, as train does."""
    hf = export_for_import(tmp_path)
    run, new = tmp_path / "run", tmp_path / "new"
    run.mkdir()
    (run / "latest.pt").write_bytes(b"a run")
    capsys.readouterr()
    assert exit_code(["import", str(hf), "--out-dir", str(run)]) == 2
    assert (f"--out-dir {run} holds files that no export or import wrote (latest.pt)"
            in one_error_line(capsys, "import"))
    assert files_under(run) == {"latest.pt": b"a run"}
    assert gpt.main(["import", str(hf), "--out-dir", str(new)]) == 0
    capsys.readouterr()
    assert exit_code(["import", str(hf), "--out-dir", str(new)]) == 2
    assert "holds an earlier import: replace it with --overwrite" in one_error_line(capsys,
                                                                                    "import")
    before = files_under(new)
    (new / "gpt.lock").write_text(f"{os.getpid()}\n")  # held by a live process: this one
    assert exit_code(["import", str(hf), "--out-dir", str(new), "--overwrite"]) == 2
    assert f"{new} is in use by another run" in one_error_line(capsys, "import")
    os.remove(new / "gpt.lock")
    assert files_under(new) == before
    assert gpt.main(["import", str(hf), "--out-dir", str(new), "--overwrite"]) == 0
    assert sorted(os.listdir(new)) == [".gpt-export.json", "gpt.pt"]  # the lock released
    assert sorted(os.listdir(tmp_path)) == ["hf", "model.pt", "new", "run"]


# ==================================================================================================
# §17 Looking inside: curves, attention and weights
# ==================================================================================================

def captured_attention(model: gpt.TransformerLM, token_ids: torch.Tensor) -> list[tuple]:
    """Each attention layer's input and output (B, T, C) in an ordinary forward (fast path)."""
    seen = []
    hooks = [layer.attn.register_forward_hook(
        lambda module, args, output: seen.append((args[0], output))) for layer in model.layers]
    with torch.no_grad():
        model(token_ids)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("overrides", [{}, dict(position_encoding="nope"),
                                       dict(norm_position="post"), IMPORTED_SIZES],
                         ids=["rope", "nope", "post", "gqa-qknorm-headdim"])
def test_attention_maps_are_causal_distributions(overrides):
    """Every row of every head's weights sums to 1, and nothing is above the diagonal."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(**overrides))
    maps = gpt.attention_maps(model, torch.randint(0, 64, (2, 16)))
    assert len(maps) == 2 and all(m.shape == (2, 4, 16, 16) for m in maps)
    for weights in maps:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 16))
        assert torch.equal(weights.triu(1), torch.zeros_like(weights))
        assert (weights[..., torch.ones(16, 16).tril().bool()] > 0).all()  # the past: all seen


@pytest.mark.parametrize("overrides", [{}, dict(position_encoding="nope"),
                                       dict(norm_position="post"), IMPORTED_SIZES],
                         ids=["rope", "nope", "post", "gqa-qknorm-headdim"])
def test_attention_maps_give_the_fast_path_output(overrides):
    """Each layer's weights times its values, through the output projection, are what the
    layer computes in the model's forward with F.scaled_dot_product_attention."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config(**overrides))
    token_ids = torch.randint(0, 64, (2, 12))
    maps = gpt.attention_maps(model, token_ids)
    KV, D = model.config.num_kv_heads, model.config.head_dim
    for weights, (x, output), layer in zip(maps, captured_attention(model, token_ids),
                                           model.layers):
        attn = layer.attn
        assert isinstance(attn, gpt.FastMultiHeadSelfAttention)
        v = (x @ attn.v_proj.weight.T).view(2, 12, KV, D).transpose(1, 2)  # (B, KV, T, D)
        v = v.repeat_interleave(4 // KV, dim=1)                            # (B, H, T, D)
        mixed = (weights @ v).transpose(1, 2).reshape(2, 12, 4 * D)
        torch.testing.assert_close(mixed @ attn.output_proj.weight.T, output)


@pytest.mark.parametrize("shape", [(32, 32), (48, 32), (7, 300), (1, 5)])
def test_spectral_norm_equals_matrix_2_norm(shape):
    """spectral_norm is torch.linalg.matrix_norm(W, 2), the largest singular value."""
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert gpt.spectral_norm(W) == pytest.approx(torch.linalg.matrix_norm(W, 2).item(), rel=1e-5)


def test_weight_stats_cover_every_matrix_once():
    """weight_stats lists each 2-D parameter once (a tied matrix once), with its spectral norm
    and a histogram holding every entry; a fresh model's norms are those at initialisation."""
    torch.manual_seed(0)
    for tie in (False, True):
        model = gpt.TransformerLM(tiny_config(tie_embeddings=tie))
        stats = gpt.weight_stats(model, bins=10)
        assert len(stats) == 2 * 7 + 2 - tie
        for s, (name, W) in zip(stats, ((n, p) for n, p in model.named_parameters()
                                        if p.ndim == 2)):
            assert s["name"] == name and s["counts"].sum() == W.numel()
            assert s["sigma"] == pytest.approx(torch.linalg.matrix_norm(W, 2).item(), rel=1e-5)
    initial = gpt.initial_spectral_norms(model.config)
    torch.manual_seed(0)
    fresh = gpt.weight_stats(gpt.TransformerLM(model.config), bins=10)
    assert initial == {s["name"]: s["sigma"] for s in fresh}


def test_weight_histogram_hand_example_and_numpy():
    """The docstring's example, and numpy.histogram's counts over the symmetric range."""
    counts, edges = gpt.weight_histogram(torch.tensor([[-1.0, 0.5, 1.0]]), 2)
    assert counts.tolist() == [1, 2] and edges.tolist() == [-1, 0, 1]
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    counts, edges = gpt.weight_histogram(W, 12)
    top = W.abs().max().item()
    expected, _ = np.histogram(W.numpy(), bins=12, range=(-top, top))
    assert counts.tolist() == expected.tolist()


def test_attention_summary_hand_example():
    """Two heads over 3 positions: one spreads evenly, one puts everything on position 0."""
    even = torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3]])
    sink = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0]])
    summary = gpt.attention_summary(torch.stack([even, sink]))
    mean = (1 / 2 + 1 / 3) / 2
    torch.testing.assert_close(summary["first"], torch.tensor([mean, 1.0]))
    torch.testing.assert_close(summary["self"], torch.tensor([mean, 0.0]))
    torch.testing.assert_close(summary["previous"], torch.tensor([mean, 0.5]))
    torch.testing.assert_close(summary["entropy"], torch.tensor([(1 + math.log2(3)) / 2, 0.0]))


def test_next_token_table_equals_softmax_of_the_logits():
    """The top k are torch's softmax and topk of the logits; p(next) is the probability of the
    token that follows, so -log of it is the cross-entropy at that position."""
    torch.manual_seed(0)
    model = gpt.TransformerLM(tiny_config())
    token_ids = torch.randint(0, 64, (10,))
    probs, ids, came = gpt.next_token_table(model, token_ids, 3)
    with torch.no_grad():
        logits = model(token_ids[None])[0]
    expected = F.softmax(logits, dim=-1).topk(3, dim=-1)
    torch.testing.assert_close(probs, expected.values)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(-came.log(), F.cross_entropy(logits[:-1], token_ids[1:],
                                                            reduction="none"))


def test_sparkline_hand_example():
    """Heights in ten levels; twenty groups of bins from more bins."""
    assert gpt.sparkline(torch.tensor([0.0, 1, 4, 9])) == " .=@"
    assert gpt.sparkline(torch.ones(60)) == "@" * 20


def test_metric_series_keeps_the_records_of_a_resumed_run():
    """Steps logged twice (after the checkpoint a run resumed from) keep the later record."""
    records = [dict(step=s, elapsed=float(i), train_loss=float(i), lr=0.1, grad_norm=1.0)
               for i, s in enumerate([1, 2, 3, 2, 3, 4])]
    records.insert(2, dict(step=2, elapsed=1.5, val_loss=5.0))
    assert [(r["step"], r["elapsed"]) for r in gpt.metric_series(records, "train")] == [
        (1, 0.0), (2, 3.0), (3, 4.0), (4, 5.0)]
    assert gpt.metric_series(records, "val") == [records[2]]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_pngs(directory, names: list[str]) -> None:
    image = pytest.importorskip("matplotlib.image")  # only when matplotlib is installed
    for name in names:
        assert (directory / name).read_bytes()[:8] == PNG_SIGNATURE, name
        height, width, _ = image.imread(directory / name).shape
        assert height > 100 and width > 100


def test_train_records_the_tokens_seen(trained_run):
    """Every metrics.jsonl line counts the tokens seen: step x 4 sequences x 16 tokens."""
    records = metrics(trained_run)
    assert records and all(r["tokens"] == r["step"] * 4 * 16 for r in records)


def test_plot_command_end_to_end(tmp_path, trained_run, capsys):
    """`plot` of two runs prints each run's evaluations and draws both on valid PNGs; a
    metrics.jsonl without token counts gets them from the run's checkpoint."""
    pytest.importorskip("matplotlib")
    other = tmp_path / "other"
    other.mkdir()
    (other / "latest.pt").write_bytes((trained_run / "latest.pt").read_bytes())
    (other / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if k != "tokens"}) + "\n"
        for r in metrics(trained_run)))
    out = tmp_path / "figures"
    assert gpt.main(["plot", str(trained_run), str(other), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in (trained_run.name, "other"):
        assert f"{name} (" in printed and "30 steps, 1,920 tokens" in printed
    assert re.search(r"^ +30 +1,920 +(\d+m)?\d+s +\d\.\d{4} +\d\.\d{4} +\d+\.\d\d$", printed, re.M)
    assert f"wrote {out / 'curves.png'}" in printed
    assert_valid_pngs(out, ["curves.png", "lr_and_grad_norm.png"])


def test_plot_never_draws_through_a_planted_link(tmp_path, trained_run, capsys):
    """A curves.png that is a symbolic link to a user's file is refused with one line, and the
    user's file is unchanged."""
    pytest.importorskip("matplotlib")
    mine = tmp_path / "mine.txt"
    mine.write_text("my file")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "curves.png").symlink_to(mine)
    capsys.readouterr()
    assert exit_code(["plot", str(trained_run), "--out-dir", str(tmp_path / "figures")]) == 2
    assert "curves.png is a symbolic link" in capsys.readouterr().err.strip().splitlines()[-1]
    assert mine.read_text() == "my file"


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_plot_on_a_full_disk_names_the_picture_and_keeps_the_earlier_one(tmp_path, trained_run):
    """A picture that cannot be written whole (here a 10 kB file-size limit, so writes fail with
    EFBIG as on a full disk) is one line naming it, and the earlier pictures stay whole: each
    is written to a temporary file and renamed into place."""
    pytest.importorskip("matplotlib")
    import resource
    out = tmp_path / "figures"
    assert gpt.main(["plot", str(trained_run), "--out-dir", str(out)]) == 0
    before = files_under(out)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
    result = subprocess.run([sys.executable, "-B", os.path.join(HERE, "gpt.py"), "plot",
                             str(trained_run), "--out-dir", str(out)], cwd=tmp_path,
                            capture_output=True, text=True, preexec_fn=limit_file_size)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"gpt.py plot: error: cannot write {out / 'curves.png'}: the file is larger than the "
        f"file system or a limit allows (File too large)")
    assert files_under(out) == before


def test_read_metrics_skips_infinite_and_huge_numbers(tmp_path, capsys):
    """Lines holding Infinity, NaN, a loss whose perplexity overflows or a number too large for
    a float are skipped with a note, and the table of the rest prints."""
    good = {"step": 1, "elapsed": 2.0, "val_loss": 3.0, "tokens": 64}
    lines = ['{"step": 2, "elapsed": 3.0, "val_loss": Infinity, "tokens": 96}',
             '{"step": 2, "elapsed": 3.0, "val_loss": NaN, "tokens": 96}',
             json.dumps({**good, "step": 3, "val_loss": 1e300}),
             json.dumps({**good, "step": 4, "tokens": 10**400}),
             "[" * 10_000 + "]" * 10_000]
    (tmp_path / "metrics.jsonl").write_text("\n".join([json.dumps(good)] + lines) + "\n")
    assert gpt.read_metrics(str(tmp_path)) == [good]
    assert "skipped 5 line(s) that are no metrics record, the first is line 2" in (
        capsys.readouterr().err)
    gpt.print_run_table(gpt.run_curves(str(tmp_path), "run"))
    assert "1 steps, 64 tokens" in capsys.readouterr().out


def test_a_run_that_starts_at_a_huge_loss_keeps_every_record(tmp_path, capsys):
    """Tied embeddings with the embedding's init start near a loss of 181 (e^181 ~ 4.6e+78): its
    evaluations are records that plot reads back, and the logs show their perplexity without
    overflowing past a loss of 709 or rounding to "10.0e+78". An earlier run's val_ppl is read
    too."""
    records = [{"step": 0, "val_loss": 181.13324, "elapsed": 4.58, "tokens": 0},
               {"step": 0, "val_loss": 181.13324, "val_ppl": 4.6e78, "elapsed": 4.58, "tokens": 0},
               {"step": 50, "val_loss": 26.91043, "elapsed": 30.63, "tokens": 102400}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert gpt.read_metrics(str(tmp_path)) == records
    assert "skipped" not in capsys.readouterr().err
    assert [gpt.format_perplexity(loss) for loss in (2.3089, 181.13324, 800.0, 181.9012)] == [
        "10.06", "4.6e+78", "2.7e+347", "1.0e+79"]
    gpt.print_run_table(gpt.run_curves(str(tmp_path), "run"))
    assert "best val loss 26.9104 (perplexity 4.9e+11) at step 50" in capsys.readouterr().out


def test_inspect_command_end_to_end(tmp_path, trained_run, capsys):
    """`inspect` prints a row per head, per position and per matrix, and draws valid PNGs."""
    pytest.importorskip("matplotlib")
    assert gpt.main(["inspect", "--run-dir", str(trained_run), "--prompt", "Once upon a time",
                     "--device", "cpu", "--top-k", "3", "--out-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^ +[01] +[0-3] +(\d\.\d\d +){4} '", printed, re.M)) == 2 * 4
    assert re.search(r"^ +0 '<\|endoftext\|>' +\d\.\d{3}  ('.*' \d\.\d{3}  ){2}'.*' \d\.\d{3}$",
                     printed, re.M)
    assert re.search(r"^lm_head.weight +300x32 ", printed, re.M)
    assert_valid_pngs(tmp_path, ["attention.png", "weights.png", "spectral_norms.png"])


@pytest.mark.parametrize("argv", [["plot", "{run}"], ["inspect", "--run-dir", "{run}",
                                                      "--prompt", "Once upon a time"]],
                         ids=["plot", "inspect"])
def test_tables_without_matplotlib(tmp_path, trained_run, capsys, monkeypatch, argv):
    """Without matplotlib the tables are printed, one line says how to install it, and no
    picture is written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    run = tmp_path / "run"
    run.mkdir()
    for name in ("latest.pt", "metrics.jsonl"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    assert gpt.main([a.format(run=run) for a in argv] + ["--device", "cpu"] * (
        argv[0] == "inspect")) == 0
    printed = capsys.readouterr()
    assert ("val ppl" if argv[0] == "plot" else "entropy") in printed.out
    assert "wrote" not in printed.out
    assert [line for line in printed.err.splitlines() if "pip" in line] == [
        "the pictures need matplotlib: pip install matplotlib (the tables above do not)"]
    assert not [name for name in os.listdir(run) if name.endswith(".png")]


@pytest.mark.parametrize("argv, named", [
    (["plot", "{tmp}/empty"], "{tmp}/empty/metrics.jsonl not found"),
    (["plot", "{tmp}/garbage"], "holds no metrics"),
    (["plot", "{tmp}/old"], "no checkpoint in {tmp}/old"),
    (["inspect", "--run-dir", "{tmp}/empty", "--prompt", "Hi"], "no checkpoint in {tmp}/empty"),
    (["inspect", "--run-dir", "{run}", "--prompt", ""], "--prompt is empty"),
    (["inspect", "--run-dir", "{run}", "--prompt", "Once upon a time " * 5],
     "more than the model's context of 16"),
    (["inspect", "--run-dir", "{run}", "--prompt", "Hi", "--top-k", "301"], "--top-k 301"),
    (["inspect", "--prompt", "Hi", "--bins", "0"], "--bins"),
], ids=["no-metrics", "no-records", "old-metrics-no-checkpoint", "no-checkpoint",
        "empty-prompt", "long-prompt", "top-k", "bins"])
def test_look_inside_bad_input_is_one_line_and_exit_2(tmp_path, trained_run, capsys, argv,
                                                      named):
    """A missing metrics file or checkpoint, an empty prompt or one beyond the context, an
    impossible setting: exit code 2 and one line naming it."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metrics.jsonl").write_text('{"step": 1\n')
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"step": 0, "val_loss": 5.7, "elapsed": 1}\n')
    device = ["--device", "cpu"] if argv[0] == "inspect" else []
    assert exit_code([a.format(tmp=tmp_path, run=trained_run) for a in argv] + device) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "skipped" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"gpt.py {argv[0]}: error:")
    assert named.format(tmp=tmp_path) in lines[0]


class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self) -> bool:
        return True


METER = re.compile(r"\rstep \d+/(\d+|\?) \| loss \d+\.\d{4} \| [\d,]+ tok/s \| ETA \S+\033\[K")


def test_train_meter_only_on_a_terminal(tmp_path, token_dir, capsys, monkeypatch):
    """On a terminal a live line shows step, loss, tokens/s and ETA, cleared before each log
    line; the log lines are those a log file gets, which has no live line. Both end naming
    the plot command."""
    assert gpt.main(train_args(token_dir, tmp_path / "file", "--max-steps", "4")) == 0
    in_file = capsys.readouterr().out
    assert "\r" not in in_file and "\033" not in in_file
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert gpt.main(train_args(token_dir, tmp_path / "tty", "--max-steps", "4")) == 0
    on_screen = terminal.getvalue()
    assert METER.search(on_screen)
    # Each live line is erased ("\r\033[K") or redrawn ("\r...") before anything else comes.
    assert not re.search(METER.pattern + r"(?!\r)", on_screen)
    plain = METER.sub("", on_screen).replace("\r\033[K", "")
    assert "\r" not in plain and "\033" not in plain

    def shape(text: str) -> list[str]:  # the log without the times, speeds and directories
        return [re.sub(r"[\d.,]+|\S*(file|tty)\S*", "#", line) for line in text.splitlines()]
    assert shape(plain) == shape(in_file)
    assert in_file.splitlines()[-1] == f"curves: python gpt.py plot {tmp_path / 'file'}"


# ==================================================================================================
# §18 Fine-tuning: question-answer pairs
# ==================================================================================================

def bytes_tokenizer() -> gpt.Tokenizer:
    """Bytes as tokens (no merges) and <|endoftext|> as 256: every id can be worked by hand."""
    return gpt.Tokenizer(BYTES_VOCAB, [], [EOT])


def our_template(tokenizer: gpt.Tokenizer) -> gpt.QATemplate:
    """Our models' Q&A layout: <eot>Question: ...\nAnswer: ...<eot>."""
    return gpt.qa_template(tokenizer, None, "the test")


def test_qa_sequence_template_and_mask_hand_example():
    """<eot>Question: Hi?\\nAnswer: Yo.<eot>: the prompt's 21 targets are ignored, those of
    " Yo." and of the end token count; with everything=True all 25 count."""
    inputs, targets = gpt.qa_sequence(bytes_tokenizer(), " Hi? ", "Yo.\n",
                                      our_template(bytes_tokenizer()))
    prompt = list(b"Question: Hi?\nAnswer:")
    assert len(prompt) == 21
    assert inputs.tolist() == [256] + prompt + list(b" Yo.")
    assert targets.tolist() == [-100] * 21 + list(b" Yo.") + [256]
    _, everything = gpt.qa_sequence(bytes_tokenizer(), "Hi?", "Yo.",
                                    our_template(bytes_tokenizer()), everything=True)
    assert everything.tolist() == prompt + list(b" Yo.") + [256]


def test_qa_sequence_prompt_is_what_sample_qa_gives(tokenizer):
    """With merges, the pair still starts with exactly the ids `sample --qa` feeds the model
    (<eot>, then the prompt encoded alone), and decodes back to the template."""
    eot = tokenizer.special_ids[EOT]
    template = our_template(tokenizer)
    inputs, targets = gpt.qa_sequence(tokenizer, "Where is the dog?", "The dog is in the park.",
                                      template)
    prompt = [eot] + tokenizer.encode(template.prompt("Where is the dog?"))
    assert inputs[:len(prompt)].tolist() == prompt
    assert (targets[:len(prompt) - 1] == gpt.IGNORE_INDEX).all()
    assert (targets[len(prompt) - 1:] != gpt.IGNORE_INDEX).all() and targets[-1] == eot
    assert tokenizer.decode(inputs[1:].tolist() + [int(targets[-1])]) == (
        f"Question: Where is the dog?\nAnswer: The dog is in the park.{EOT}")


@pytest.mark.parametrize("shape", [(7, 11), (2, 5, 13)])
def test_masked_cross_entropy_equals_torch_ignore_index(shape):
    """masked_cross_entropy equals F.cross_entropy(ignore_index=-100), value and gradient, and
    equals cross_entropy on the scored positions alone."""
    torch.manual_seed(0)
    logits = torch.randn(*shape, requires_grad=True)
    targets = torch.randint(0, shape[-1], shape[:-1])
    targets[..., ::2] = gpt.IGNORE_INDEX
    loss = gpt.masked_cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(loss, logits)
    flat_logits, flat_targets = logits.reshape(-1, shape[-1]), targets.reshape(-1)
    reference = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)
    kept = flat_targets != gpt.IGNORE_INDEX
    torch.testing.assert_close(loss, gpt.cross_entropy(flat_logits[kept], flat_targets[kept]))


def test_masked_cross_entropy_gives_question_targets_no_gradient():
    """The logits of positions whose target is ignored (the question's) get a gradient of
    exactly zero, and what those targets are changes nothing."""
    inputs, targets = gpt.qa_sequence(bytes_tokenizer(), "Hi?", "Yo.",
                                      our_template(bytes_tokenizer()))
    model = gpt.TransformerLM(tiny_config(vocab_size=257, context_length=32))
    logits = model(torch.from_numpy(inputs)[None])  # (1, T, V)
    logits.retain_grad()
    y = torch.from_numpy(targets)[None]
    gpt.masked_cross_entropy(logits, y).backward()
    ignored = y[0] == gpt.IGNORE_INDEX
    assert ignored.sum() == 21
    assert (logits.grad[0, ignored] == 0).all() and (logits.grad[0, ~ignored] != 0).any()
    question_only = y.clone()
    question_only[0, ignored] = 5  # scoring the question now: another loss
    assert gpt.masked_cross_entropy(logits, question_only) != gpt.masked_cross_entropy(logits, y)


def qa_pairs(lengths: list[int], eot: int = 9) -> gpt.QAPairs:
    """Pairs of the given numbers of positions: pair i's inputs are eot, then 10i + 1, ...;
    its targets the same ids plus 100."""
    inputs = [[eot] + [10 * i + j for j in range(1, n)] for i, n in enumerate(lengths)]
    flat = np.array(list(chain(*inputs)))
    return gpt.QAPairs(flat, flat + 100, np.cumsum([0] + lengths),
                       [(f"q{i}", f"a{i}") for i in range(len(lengths))])


def test_pack_pairs_hand_example():
    """Pairs of 3, 2 and 2 positions in rows of 5: row 0 holds pairs 0 and 1, row 1 pair 2
    and 3 positions that predict nothing; with one row, pair 2 is left for another batch."""
    pairs = qa_pairs([3, 2, 2])
    x, y = gpt.pack_pairs(pairs, [0, 1, 2], rows=4, context_length=5)
    assert x.tolist() == [[9, 1, 2, 9, 11], [9, 21, 0, 0, 0]]
    assert y.tolist() == [[109, 101, 102, 109, 111], [109, 121, -100, -100, -100]]
    x, y = gpt.pack_pairs(pairs, [2, 0, 1], rows=1, context_length=5)
    assert x.tolist() == [[9, 21, 9, 1, 2]]


def test_qa_batch_rows_hold_whole_pairs_only():
    """Every row of a random batch is whole pairs end to end (each from its <eot>), then
    positions that predict nothing; the draws follow the generator."""
    pairs = qa_pairs([5, 3, 7, 2, 6, 4, 8, 3])
    whole = {tuple(pairs.inputs[a:b]) for a, b in pairwise(pairs.starts)}
    for seed in range(5):
        x, y = gpt.qa_batch(pairs, 2, 10, "cpu", torch.Generator().manual_seed(seed))
        again = gpt.qa_batch(pairs, 2, 10, "cpu", torch.Generator().manual_seed(seed))
        assert torch.equal(x, again[0]) and torch.equal(y, again[1])
        for row, targets in zip(x.tolist(), y.tolist()):
            used = max(i for i, t in enumerate(targets) if t != gpt.IGNORE_INDEX) + 1
            starts = [i for i in range(used) if row[i] == 9] + [used]
            assert starts[0] == 0
            assert all(tuple(row[a:b]) in whole for a, b in pairwise(starts))
            assert all(t == gpt.IGNORE_INDEX for t in targets[used:])


@pytest.mark.parametrize("num_pairs, fraction, held", [
    (20, 0.1, [9, 19]), (220, 0.1, list(range(9, 220, 10))), (3, 0.5, [0, 2]), (2, 0.1, [1]),
])
def test_hold_out_pairs_evenly_spread(num_pairs, fraction, held):
    """round(fraction x pairs) held out, at least one, the last of each stretch."""
    train_ids, held_ids = gpt.hold_out_pairs(num_pairs, fraction, "qa.json")
    assert held_ids == held and sorted(train_ids + held_ids) == list(range(num_pairs))


QA_NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Tim", "Mia", "Sam", "Anna", "Bob"]
QA_THINGS = ["a red ball", "the big tree", "his dog", "cake", "the park", "a blue kite",
             "her cat", "the moon", "apples", "the sea"]
QA_PLACES = ["home", "school", "the shop", "the farm", "the lake", "the zoo", "the beach",
             "the hill", "the pond", "the woods"]
QA_PAIRS = ([{"question": f"What does {n} like?", "answer": f"{n} likes {t}."}
             for n, t in zip(QA_NAMES, QA_THINGS)]
            + [{"question": f"Where is {n}?", "answer": f"{n} is at {p}.", "id": i}
               for i, (n, p) in enumerate(zip(QA_NAMES, QA_PLACES))])


def finetune_args(data, out_dir, *extra: str) -> list[str]:
    """A few steps of fine-tuning: seconds on any CPU."""
    return ["finetune", "--data", str(data), "--out-dir", str(out_dir), "--batch-size", "4",
            "--eval-interval", "2", "--log-interval", "1", "--warmup-steps", "2", "--dtype",
            "float32", "--device", "cpu", "--max-steps", "4", "--show-answers", "1", *extra]


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, token_dir):
    """A tiny model fine-tuned from scratch on 20 pairs (2 held out) until it knows them."""
    directory = tmp_path_factory.mktemp("qa")
    data = directory / "qa.json"
    data.write_text(json.dumps(QA_PAIRS), encoding="utf-8")
    out = directory / "run"
    assert gpt.main(finetune_args(
        data, out, "--from-scratch", "--data-dir", token_dir, "--context-length", "64",
        "--d-model", "64", "--num-layers", "2", "--num-heads", "4", "--d-ff", "128",
        "--batch-size", "8", "--lr", "1e-2", "--max-steps", "80", "--eval-interval", "40")) == 0
    return data, out


def test_finetune_from_scratch_reproduces_the_trained_answers(qa_run, capsys):
    """After fine-tuning, greedy decoding gives back each trained pair's answer exactly, and
    `sample --qa` prints the template and the answer, and stops at the end token."""
    data, out = qa_run
    model, tokenizer = gpt.load_for_sampling(str(out / "latest.pt"), torch.device("cpu"))
    eot = tokenizer.special_ids[EOT]
    trained = [p for i, p in enumerate(QA_PAIRS) if i not in (9, 19)]
    for pair in trained:
        prompt = [eot] + tokenizer.encode(our_template(tokenizer).prompt(pair["question"]))
        answer = list(gpt.generate(model, prompt, 40, temperature=0, eos_id=eot))
        assert tokenizer.decode(answer) == " " + pair["answer"] + EOT
    capsys.readouterr()
    assert gpt.main(["sample", "--qa", "--run-dir", str(out), "--prompt", "Where is Ben?",
                     "--temperature", "0", "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == "Question: Where is Ben?\nAnswer: Ben is at the shop.\n"


def test_finetune_records_the_held_out_answers_loss(qa_run):
    """Each evaluation records the held-out answers' loss, which fine-tuning lowers; the run's
    checkpoints and metrics are train's."""
    data, out = qa_run
    records = metrics(out)
    assert [m["step"] for m in records if "val_loss" in m] == [0, 40, 80]
    val = [m["val_loss"] for m in records if "val_loss" in m]
    assert val[-1] < val[0] - 1
    assert sorted(os.listdir(out)) == ["best.pt", "latest.pt", "metrics.jsonl"]
    checkpoint = torch.load(out / "latest.pt", weights_only=True)
    assert checkpoint["args"]["data"] == str(data) and checkpoint["iteration"] == 80


def test_sample_qa_interactive(qa_run, capsys, monkeypatch):
    """With --qa and no --prompt, each line typed is a question, answered until the end token."""
    monkeypatch.setattr("sys.stdin", io.StringIO("What does Tom like?\nWhere is Sue?\n\n"))
    assert gpt.main(["sample", "--qa", "--run-dir", str(qa_run[1]), "--temperature", "0",
                     "--max-new-tokens", "40"]) == 0
    assert capsys.readouterr().out == ("> Question: What does Tom like?\nAnswer: Tom likes "
                                       "the big tree.\n> Question: Where is Sue?\nAnswer: Sue "
                                       "is at the farm.\n> ")  # "> " asks for the next one


def write_pairs(path, pairs) -> str:
    path.write_text(json.dumps(pairs), encoding="utf-8")
    return str(path)


def test_finetune_starts_from_the_checkpoints_weights(tmp_path, qa_run, capsys):
    """Fine-tuning a checkpoint starts from its weights: the first evaluation gives its last
    one's loss on the same held-out pairs, and a step at a vanishing lr leaves them as they
    were. Each evaluation prints a greedy answer to a held-out question."""
    data, base = qa_run
    out = tmp_path / "out"
    capsys.readouterr()
    assert gpt.main(finetune_args(data, out, "--checkpoint", str(base / "latest.pt"), "--lr",
                                  "1e-12", "--weight-decay", "0", "--max-steps", "1")) == 0
    log = capsys.readouterr().out
    assert log.count("held-out answers at step") == 2
    assert re.search(r"\n  What does Bob like\? -> '.+' \(held out: 'Bob likes the sea.'\)\n",
                     log)
    val = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert val[0] == [m["val_loss"] for m in metrics(base) if "val_loss" in m][-1]
    assert_same_weights(final_weights(out), final_weights(base), exact=False)
    assert {"latest.pt", "metrics.jsonl"} <= set(os.listdir(out))  # best.pt: not better


def test_finetune_without_a_budget_runs_finetune_steps(tmp_path, qa_run, monkeypatch):
    """Without --max-steps or --max-time, fine-tuning takes FINETUNE_STEPS steps, and its
    schedule ends there."""
    monkeypatch.setattr(gpt, "FINETUNE_STEPS", 3)
    args = finetune_args(qa_run[0], tmp_path, "--checkpoint", str(qa_run[1] / "latest.pt"))
    at = args.index("--max-steps")
    assert gpt.main(args[:at] + args[at + 2:]) == 0
    checkpoint = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert (checkpoint["iteration"], checkpoint["total_steps"]) == (3, 3)
    assert sorted(train_losses(tmp_path)) == [1, 2, 3]


def test_finetune_run_directory_is_safe_and_resumes(tmp_path, qa_run, capsys):
    """A fresh fine-tuning run into a directory that holds one is refused, as train's is;
    --resume continues it; --overwrite may not delete the checkpoint it starts from."""
    data, base = qa_run
    args = finetune_args(data, tmp_path, "--checkpoint", str(base / "latest.pt"))
    assert gpt.main(args) == 0
    capsys.readouterr()
    assert gpt.main(args) == 2
    assert "--resume" in one_error_line(capsys, "finetune")
    assert gpt.main(args + ["--resume", "--max-steps", "6"]) == 0
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["iteration"] == 6
    assert sorted(train_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    assert gpt.main(finetune_args(data, tmp_path, "--checkpoint", str(tmp_path / "latest.pt"),
                                  "--overwrite")) == 2
    assert "--overwrite would delete" in one_error_line(capsys, "finetune")


@pytest.mark.parametrize("old", [False, True], ids=["recorded-kind", "old-checkpoint"])
def test_resume_refuses_a_run_of_the_other_kind(tmp_path, token_dir, qa_run, capsys, old):
    """`finetune --resume` on a pretraining run and `train --resume` on a fine-tuning run are
    refused with one line naming the kind and the command that continues it; a checkpoint from
    before the kind was recorded is known by its settings."""
    data, _ = qa_run
    pretrained, finetuned = tmp_path / "pretrained", tmp_path / "finetuned"
    assert gpt.main(train_args(token_dir, pretrained, "--max-steps", "3",
                               "--context-length", "64")) == 0
    assert gpt.main(finetune_args(data, finetuned, "--checkpoint",
                                  str(pretrained / "latest.pt"), "--max-steps", "2")) == 0
    assert torch.load(finetuned / "latest.pt", weights_only=True)["kind"] == "fine-tuning"
    if old:
        for run in (pretrained, finetuned):
            edit_checkpoint(run / "latest.pt", lambda c: c.pop("kind"))
    capsys.readouterr()
    assert gpt.main(finetune_args(data, pretrained, "--resume", "--max-steps", "4")) == 2
    assert "is a pretraining run" in one_error_line(capsys, "finetune")
    assert gpt.main(train_args(token_dir, finetuned, "--resume", "--max-steps", "4")) == 2
    line = one_error_line(capsys, "train")
    assert "is a fine-tuning run" in line and "finetune --resume" in line


def test_finetune_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, qa_run, monkeypatch,
                                                                 capsys):
    """Ctrl-C in fine-tuning is train's: the step finishes, latest.pt is saved, exit code 2;
    --resume then ends with the weights of a run never stopped."""
    data, base = qa_run
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert gpt.main(finetune_args(data, straight, "--checkpoint", str(base / "latest.pt"))) == 0
    qa_batch = press_ctrl_c_at_call(monkeypatch, "qa_batch", 2)  # in step 2
    args = finetune_args(data, stopped, "--checkpoint", str(base / "latest.pt"))
    capsys.readouterr()
    assert gpt.main(args) == 2
    assert "interrupted at step 2" in capsys.readouterr().err
    assert torch.load(stopped / "latest.pt", weights_only=True)["iteration"] == 2
    monkeypatch.setattr(gpt, "qa_batch", qa_batch)
    assert gpt.main(args + ["--resume"]) == 0
    assert train_losses(straight) == train_losses(stopped)
    assert_same_weights(final_weights(straight), final_weights(stopped))


def test_train_on_everything_changes_the_training_loss_not_the_validation_loss(tmp_path,
                                                                              qa_run, capsys):
    """--train-on-everything scores the questions too, so the training loss differs; the
    validation loss stays that of the held-out answers, so the two runs compare."""
    data, base = qa_run
    for name, extra in (("answers", []), ("everything", ["--train-on-everything"])):
        assert gpt.main(finetune_args(data, tmp_path / name, "--checkpoint",
                                      str(base / "latest.pt"), "--max-steps", "1", *extra)) == 0
    assert "loss on: every token and" in capsys.readouterr().out
    first_val = [next(m["val_loss"] for m in metrics(tmp_path / name) if "val_loss" in m)
                 for name in ("answers", "everything")]
    assert first_val[0] == first_val[1]
    assert train_losses(tmp_path / "answers")[1] != train_losses(tmp_path / "everything")[1]


def test_finetune_valid_file_long_pairs_and_repeated_ids(tmp_path, qa_run, capsys):
    """--valid holds out a second file; a pair longer than the context is left out with a
    line naming it; a repeated id is a warning, not an error."""
    data, base = qa_run
    pairs = [dict(p, id="x") if i in (0, 4) else p for i, p in enumerate(QA_PAIRS)]
    pairs[3] = {"question": "Why?", "answer": " ".join(["Because it is so."] * 30)}
    valid = write_pairs(tmp_path / "valid.json", QA_PAIRS[:3])
    capsys.readouterr()
    assert gpt.main(finetune_args(write_pairs(tmp_path / "qa.json", pairs), tmp_path / "out",
                                  "--checkpoint", str(base / "latest.pt"), "--valid", valid,
                                  "--max-steps", "1")) == 0
    out, err = capsys.readouterr()
    assert f"pairs: 19 to train on, 3 held out ({valid})" in out
    assert (f"left out 1 pair(s) of {tmp_path / 'qa.json'} longer than the 64-token context: "
            f"items 3") in out
    assert f'warning: {tmp_path / "qa.json"}: repeated ids: "x" (items 0, 4)' in err


@pytest.mark.parametrize("content, named", [
    (b"", "{data} is empty"),
    (b'[{"question": "a",', "{data} is not JSON"),
    (b'{"question": "a", "answer": "b"}', "{data} holds a JSON object, not a list"),
    (b"[]", "{data} holds an empty list"),
    (b'[{"question": "a", "answer": "b"}, ["c", "d"]]', "{data}[1] is a JSON array"),
    (b'[{"question": "a", "answer": "b"}, {"answer": "c"}]', '{data}[1] has no "question"'),
    (b'[{"question": "a", "answer": "b"}, {"question": "c"}]', '{data}[1] has no "answer"'),
    (b'[{"question": " ", "answer": "b"}]', '{data}[0]: its "question" is empty'),
    (b'[{"question": "a", "answer": "b"}, {"question": "c", "answer": ""}]',
     '{data}[1]: its "answer" is empty'),
    (b'[{"question": 42, "answer": "b"}]', '{data}[0]: its "question" is 42, a JSON number'),
    (b'[{"question": "a", "answer": null}]', 'its "answer" is None, a JSON null, not a string'),
    (b'\xff[]', "{data} is not UTF-8 text (byte 0xff"),
    (b"[" * 100_000 + b"]" * 100_000, "{data}: JSON nested more than 32 levels deep"),
    (b'[{"question": "a", "answer": "b", "id": 1e999}]', "{data} is not JSON we can use"),
    (b'[{"question": "a", "answer": "b"}, {"question": "c", "answer": "d<|endoftext|>"}]',
     '{data}[1]: its "answer" holds the special token'),
    (b'[{"question": "a", "answer": "b"}]', "{data} has 1 pair(s): too few to hold out"),
    (b'[{"question": "a", "answer": "b"}, {"question": "c", "answer": "d\\ud800e"}]',
     "{data}[1]: its \"answer\" holds '\\ud800' at position 1, a lone surrogate"),
], ids=["empty-file", "not-json", "not-a-list", "empty-list", "item-not-object",
        "no-question", "no-answer", "empty-question", "empty-answer", "question-number",
        "answer-null", "not-utf8", "deep", "huge-number", "special-token", "too-few",
        "lone-surrogate"])
def test_finetune_bad_pairs_are_one_line_and_exit_2(tmp_path, qa_run, capsys, content, named):
    """Each mistake in the pairs gives exit code 2 and one line naming the file and the item's
    index, before a checkpoint is written."""
    data = tmp_path / "qa.json"
    data.write_bytes(content)
    capsys.readouterr()
    args = finetune_args(data, tmp_path / "out", "--checkpoint", str(qa_run[1] / "latest.pt"))
    assert exit_code(args) == 2
    assert named.format(data=data) in one_error_line(capsys, "finetune")
    assert not (tmp_path / "out" / "latest.pt").exists()


@pytest.mark.parametrize("extra, named", [
    (["--from-scratch", "--checkpoint", "{tmp}/x.pt"], "--from-scratch"),
    (["--valid", "{data}", "--valid-fraction", "0.2"], "--valid-fraction"),
    (["--d-model", "64"], "--d-model"),
    (["--preset", "base"], "--preset"),
    (["--checkpoint", "{tmp}/no-eot.pt"], "{tmp}/no-eot.pt: its tokenizer has no end-of-text"),
    (["--checkpoint", "{tmp}/missing.pt"], "{tmp}/missing.pt"),
    (["--run-dir", "{tmp}/empty"], "no checkpoint in {tmp}/empty"),
    (["--checkpoint", "{short}"], "longer than the model's 16-token context"),
    (["--from-scratch", "--data-dir", "{tmp}/empty"], "{tmp}/empty/tokenizer not found"),
    (["--valid-fraction", "0"], "--valid-fraction"),
    (["--show-answers", "-1"], "--show-answers"),
    (["--data", "{tmp}/missing.json"], "{tmp}/missing.json: cannot read it"),
    (["--data", "/dev/zero"], "/dev/zero is not a regular file"),
    (["--valid", "/dev/zero"], "/dev/zero is not a regular file"),
], ids=["scratch-and-checkpoint", "valid-twice", "model-flag", "preset", "no-end-token",
        "missing-checkpoint", "no-checkpoint", "context-too-short", "no-tokenizer",
        "fraction-0", "answers-negative", "missing-data", "data-dev-zero", "valid-dev-zero"])
def test_finetune_bad_setup_is_one_line_and_exit_2(tmp_path, qa_run, trained_run, capsys, extra,
                                                   named):
    """Contradictory flags, a checkpoint or tokenizer that cannot serve, a missing file: exit
    code 2 and one line naming it."""
    data, base = qa_run
    (tmp_path / "empty").mkdir()
    checkpoint = torch.load(base / "latest.pt", weights_only=True)
    checkpoint["tokenizer"]["special_tokens"] = []
    torch.save(checkpoint, tmp_path / "no-eot.pt")
    names = dict(tmp=tmp_path, data=data, short=trained_run / "latest.pt")
    args = finetune_args(data, tmp_path / "out", *[e.format(**names) for e in extra])
    if not {"--checkpoint", "--from-scratch", "--run-dir"} & set(args):
        args += ["--run-dir", str(base)]
    capsys.readouterr()
    assert exit_code(args) == 2
    assert named.format(**names) in one_error_line(capsys, "finetune")


def test_sample_qa_needs_an_end_token(tmp_path, qa_run, capsys):
    """sample --qa with a tokenizer that has no end-of-text token: one line and exit 2."""
    checkpoint = torch.load(qa_run[1] / "latest.pt", weights_only=True)
    checkpoint["tokenizer"]["special_tokens"] = []
    torch.save(checkpoint, tmp_path / "no-eot.pt")
    capsys.readouterr()
    assert gpt.main(["sample", "--qa", "--checkpoint", str(tmp_path / "no-eot.pt"), "--prompt",
                     "Hi?"]) == 2
    assert "no end-of-text token to end an answer" in one_error_line(capsys, "sample")

def test_qa_sequence_in_a_chat_format_hand_example():
    """In SmolLM2-Instruct's chat format a pair is its system turn, the user's turn and the
    assistant's, which ends in <|im_end|>: only the answer and that token are scored, and no
    bos comes first (the template writes none)."""
    tokenizer = chat_tokenizer("gpt2")
    generation = {"bos_ids": [259], "eos_ids": [256],
                  "chat": gpt.chat_format(SMOLLM2_TEMPLATE, tokenizer)}
    inputs, targets = gpt.qa_sequence(tokenizer, " Hi? ", "Yo.", gpt.qa_template(
        tokenizer, generation, "x"))
    start, end = 257, 258  # <|im_start|>, <|im_end|>
    system = list(b"system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    prompt = ([start] + system + [end] + list(b"\n") + [start] + list(b"user\nHi?") + [end]
              + list(b"\n") + [start] + list(b"assistant\n"))
    assert inputs.tolist() == prompt + list(b"Yo.")
    assert targets.tolist() == [-100] * (len(prompt) - 1) + list(b"Yo.") + [end]


def test_finetune_of_an_imported_chat_model_trains_and_answers_in_its_format(tmp_path, capsys,
                                                                            monkeypatch):
    """`finetune` of an imported model with a chat format trains on pairs in that format, in
    rows of FINETUNE_ROW_TOKENS at most (not its whole context), and keeps its generation
    settings; `sample --qa` on the result feeds the same prompt and stops at <|im_end|>."""
    tokenizer, generation = imported_checkpoint(tmp_path / "imported.pt", QWEN3_TEMPLATE)
    (tmp_path / "qa.json").write_text(json.dumps(
        [{"question": f"Who is {n}?", "answer": f"{n} is a cat."} for n in "ABCDEFGHIJ"]))
    monkeypatch.setattr(gpt, "FINETUNE_ROW_TOKENS", 60)  # the model's context is 64
    rows = []
    pack = gpt.pack_pairs
    monkeypatch.setattr(gpt, "pack_pairs", lambda *a: rows.append(a[3]) or pack(*a))
    assert gpt.main(["finetune", "--checkpoint", str(tmp_path / "imported.pt"), "--data",
                     str(tmp_path / "qa.json"), "--out-dir", str(tmp_path / "ft"),
                     "--max-steps", "2", "--eval-interval", "2", "--show-answers", "1"]) == 0
    assert set(rows) == {60}
    checkpoint = gpt.read_checkpoint(str(tmp_path / "ft" / "latest.pt"))
    assert checkpoint["generation"] == generation
    qa = gpt.qa_template(tokenizer, generation, "x")
    fed, steps = [], [torch.tensor([ord("Y")]), torch.tensor([258]), torch.tensor([ord("Z")])]
    monkeypatch.setattr(gpt, "generate_batch", lambda model, prompts, *rest, **kw:
                        fed.append(prompts[0].tolist()) or iter(steps))
    capsys.readouterr()
    assert gpt.main(["sample", "--qa", "--run-dir", str(tmp_path / "ft"), "--prompt",
                     "Who is A?"]) == 0
    assert fed == [qa.prompt_ids(tokenizer, "Who is A?")] and qa.end == 258
    assert capsys.readouterr().out == qa.prompt("Who is A?") + "Y\n"


# ==================================================================================================
# §19 The fast twins, switched in from one place
# ==================================================================================================

def call_shape(function) -> list[tuple]:
    """A callable's parameters as (name, kind, default): its signature, annotations aside."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("name", gpt.FAST_TWINS)
def test_importing_gpt_runs_the_fast_twins_with_the_readable_signatures(name):
    """After `import gpt` a plain name runs its twin, called exactly as the readable form."""
    fast, plain = gpt.FAST_TWINS[name], readable(name)
    assert getattr(gpt, name) is fast and fast is not plain
    if isinstance(plain, type):
        methods = ["__init__"] + [m for m in vars(plain) if not m.startswith("_")]
        for method in methods:
            assert call_shape(getattr(fast, method)) == call_shape(getattr(plain, method)), method
    else:
        assert call_shape(fast) == call_shape(plain)


def test_use_fast_twins_switches_every_name_and_back():
    """use_fast_twins(False) puts every readable form under its plain name; True the twins."""
    try:
        gpt.use_fast_twins(False)
        assert all(getattr(gpt, name) is readable(name) for name in gpt.FAST_TWINS)
    finally:
        gpt.use_fast_twins(True)
    assert all(getattr(gpt, name) is twin for name, twin in gpt.FAST_TWINS.items())


def record_fast_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make F.scaled_dot_product_attention, every torch._foreach_* function, torch.compile and
    the apply of every torch.autograd.Function subclass in gpt.py add their name to the list
    returned, each time they are called (and still run)."""
    calls = []

    def recording(name, function):
        def record(*args, **kwargs):
            calls.append(name)
            return function(*args, **kwargs)
        return record

    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        recording("sdpa", F.scaled_dot_product_attention))
    monkeypatch.setattr(torch, "compile", recording("compile", torch.compile))
    for name in dir(torch):
        if name.startswith("_foreach_"):
            monkeypatch.setattr(torch, name, recording("foreach", getattr(torch, name)))
    for value in vars(gpt).values():
        if isinstance(value, type) and issubclass(value, torch.autograd.Function):
            monkeypatch.setattr(value, "apply", recording("function", value.apply))
    return calls


@pytest.fixture(scope="module")
def readable_runs(tmp_path_factory, token_dir, trained_run):
    """`train --readable` (with a 10-minute budget, which would otherwise compile on a CPU) and
    `sample --readable` with top-p, each run once: the fast paths they called, train's output
    directory and sample's text."""
    out = tmp_path_factory.mktemp("readable")
    sample_args = ["sample", "--run-dir", str(trained_run), "--prompt", "Once upon a time",
                   "--max-new-tokens", "20", "--top-p", "0.9", "--seed", "1", "--readable"]
    calls, text = {}, io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls["train"] = record_fast_paths(monkeypatch)
        assert gpt.main(train_args(token_dir, out, "--max-time", "10m", "--readable")) == 0
        monkeypatch.undo()
        calls["sample"] = record_fast_paths(monkeypatch)
        with contextlib.redirect_stdout(text):
            assert gpt.main(sample_args) == 0
    return calls, out, text.getvalue()


@pytest.mark.parametrize("command, fast_path", [
    ("train", "sdpa"), ("train", "foreach"), ("train", "function"), ("train", "compile"),
    ("sample", "sdpa"), ("sample", "foreach"), ("sample", "function"),
])
def test_readable_commands_run_only_the_readable_forms(readable_runs, command, fast_path):
    """--readable calls no sdpa, torch._foreach_*, autograd Function of ours or torch.compile."""
    calls, _, _ = readable_runs
    assert fast_path not in calls[command]


def test_fast_twins_are_back_after_a_readable_command(readable_runs, token_dir, tmp_path, capsys):
    """After a readable main() returns, or refuses --readable --compile, the twins are back."""
    assert all(getattr(gpt, name) is twin for name, twin in gpt.FAST_TWINS.items())
    capsys.readouterr()
    assert gpt.main(train_args(token_dir, tmp_path, "--readable", "--compile")) == 2
    assert "--compile" in one_error_line(capsys, "train")
    assert all(getattr(gpt, name) is twin for name, twin in gpt.FAST_TWINS.items())


def test_readable_and_fast_training_give_the_same_losses(readable_runs, token_dir, tmp_path):
    """The readable forms and the fast twins train to the same losses, to float rounding."""
    _, readable_dir, _ = readable_runs
    assert gpt.main(train_args(token_dir, tmp_path, "--max-time", "10m", "--no-compile")) == 0
    fast, plain = metrics(tmp_path), metrics(readable_dir)
    assert [m["step"] for m in fast] == [m["step"] for m in plain]
    for key in ("train_loss", "val_loss", "grad_norm"):
        values = [(f[key], p[key]) for f, p in zip(fast, plain) if key in f]
        assert len(values) >= 2
        assert [f for f, _ in values] == pytest.approx([p for _, p in values], rel=1e-4)


def test_tokenize_readable_writes_the_same_files_with_the_readable_forms(token_dir, tmp_path,
                                                                       monkeypatch):
    """`tokenize --readable` trains with §1's incremental trainer and encodes with §1's plain
    Tokenizer, and writes the same tokenizer and token files as `tokenize` (token_dir's)."""
    called = []
    trainer, encode = readable("train_bpe_incremental"), PlainTokenizer.encode
    monkeypatch.setitem(gpt.READABLE_FORMS, "train_bpe_incremental",
                        lambda *a, **k: called.append("train") or trainer(*a, **k))
    monkeypatch.setattr(PlainTokenizer, "encode",
                        lambda self, text: called.append("encode") or encode(self, text))
    texts = [os.path.join(token_dir, f"{split}.txt") for split in ("train", "valid")]
    assert gpt.main(["tokenize", "--train", texts[0], "--valid", texts[1], "--vocab-size", "300",
                     "--out-dir", str(tmp_path), "--workers", "1", "--readable"]) == 0
    assert set(called) == {"train", "encode"}
    names = ["train.bin", "valid.bin", *(f"tokenizer/{name}" for name in
                                         ("vocab.json", "merges.txt", "special_tokens.json"))]
    for name in names:
        assert (tmp_path / name).read_bytes() == open(os.path.join(token_dir, name), "rb").read()


def test_readable_and_fast_sampling_give_the_same_text(readable_runs, trained_run, capsys):
    """`sample` with a seed and top-p writes the same text with or without --readable."""
    _, _, readable_text = readable_runs
    assert gpt.main(["sample", "--run-dir", str(trained_run), "--prompt", "Once upon a time",
                     "--max-new-tokens", "20", "--top-p", "0.9", "--seed", "1"]) == 0
    assert capsys.readouterr().out == readable_text


# ==================================================================================================
# §20 Command line: sample
# ==================================================================================================

@pytest.mark.parametrize("command", ["tokenize", "train", "sample", "experiment", "export",
                                     "import", "plot", "inspect", "finetune"])
def test_every_command_prints_its_help(command, capsys):
    """--help prints every flag's help, with its defaults filled in, and exits 0."""
    assert exit_code([command, "--help"]) == 0
    assert "--" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, token_dir):
    """A tiny model trained for a few steps: the checkpoint `sample` reads."""
    run = tmp_path_factory.mktemp("run")
    assert gpt.main(train_args(token_dir, run, "--max-steps", "30", "--lr", "1e-2",
                               "--eval-interval", "30")) == 0
    return run


def test_sample_command_end_to_end(trained_run, capsys):
    """`sample` continues the prompt on stdout, reports tokens/s on stderr, and a seed
    makes it reproducible."""
    args = ["sample", "--run-dir", str(trained_run), "--prompt", "Once upon a time",
            "--max-new-tokens", "20", "--seed", "3"]
    assert gpt.main(args) == 0
    first = capsys.readouterr()
    assert first.out.startswith("Once upon a time") and len(first.out) > len("Once upon a time")
    assert "tokens/s" in first.err and "tokens/s" not in first.out
    assert gpt.main(args) == 0
    assert capsys.readouterr().out == first.out
    assert gpt.main(args + ["--no-kv-cache"]) == 0  # the same tokens, the slow way
    assert capsys.readouterr().out == first.out


def test_sample_starts_a_story_as_training_did(trained_run, monkeypatch, capsys):
    """The checkpoint records what its data puts after the end token (a newline in
    TinyStories); `sample` and `inspect` put it between the end token and the prompt, and
    `sample --qa` keeps fine-tuning's template, the question right after the end token."""
    checkpoint = gpt.read_checkpoint(str(trained_run / "latest.pt"))
    assert checkpoint["story_start"] == "\n"
    _, tokenizer = gpt.load_for_sampling(str(trained_run / "latest.pt"), torch.device("cpu"))
    eot = gpt.end_of_text_id(tokenizer)
    fed = []
    monkeypatch.setattr(gpt, "generate_batch", lambda model, prompts, *rest, **kw:
                        fed.append(prompts[0].tolist()) or iter([]))
    base = ["sample", "--run-dir", str(trained_run), "--prompt", "Once upon"]
    assert gpt.main(base) == 0 and gpt.main(base + ["--qa"]) == 0
    assert fed == [[eot] + tokenizer.encode("\nOnce upon"),
                   [eot] + tokenizer.encode(our_template(tokenizer).prompt("Once upon"))]
    assert gpt.inspection_ids(tokenizer, "Once upon", 64, "\n") == fed[0]

def test_sample_of_an_imported_model_starts_with_bos_and_stops_at_any_eos(tmp_path, capsys,
                                                                          monkeypatch):
    """An imported model's prompt starts with its bos_ids, not our end-of-text token, and its
    samples end at any of its eos ids (Llama 3.2 Instruct lists three); with --qa and no chat
    format, QA_PROMPT follows its bos_ids."""
    tokenizer, _ = imported_checkpoint(tmp_path / "imported.pt", template=None)
    fed, rows = [], [[65, 66], [256, 67], [68, 258], [69, 70]]
    monkeypatch.setattr(gpt, "generate_batch", lambda model, prompts, *rest, **kw:
                        fed.append(prompts[0].tolist()) or iter(map(torch.tensor, rows)))
    base = ["sample", "--checkpoint", str(tmp_path / "imported.pt"), "--prompt", "Hi"]
    capsys.readouterr()
    assert gpt.main(base + ["--num-samples", "2"]) == 0
    assert capsys.readouterr().out == "--- sample 1 ---\nHiA\n--- sample 2 ---\nHiBC\n"
    rows = [[65], [258], [66]]
    assert gpt.main(base) == 0 and gpt.main(base + ["--qa"]) == 0
    assert capsys.readouterr().out == "HiA\nQuestion: Hi\nAnswer:A\n"
    assert fed == [[259] + tokenizer.encode("Hi")] * 2 + [
        [259] + tokenizer.encode("Question: Hi\nAnswer:")]


def test_sample_num_samples(trained_run, capsys):
    """--num-samples N prints N continuations, generated as one batch."""
    assert gpt.main(["sample", "--checkpoint", str(trained_run / "best.pt"), "--prompt", "The",
                     "--max-new-tokens", "8", "--num-samples", "3", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--- sample")] == [
        "--- sample 1 ---", "--- sample 2 ---", "--- sample 3 ---"]


def test_sample_interactive(trained_run, capsys, monkeypatch):
    """Without --prompt, each line typed is a prompt, until an empty line."""
    monkeypatch.setattr("sys.stdin", io.StringIO("Tom\nThe dog\n\nnever read\n"))
    assert gpt.main(["sample", "--run-dir", str(trained_run), "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "Tom" in out and "The dog" in out and "never read" not in out


def test_sample_interactive_prompt_not_utf8_is_one_line_and_exit_2(trained_run, capsys,
                                                                   monkeypatch):
    """A typed prompt that is not UTF-8 (a byte Python escapes as a surrogate) is refused."""
    monkeypatch.setattr("sys.stdin", io.StringIO("\udcff\n"))
    assert gpt.main(["sample", "--run-dir", str(trained_run), "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("gpt.py sample: error: the prompt typed is not valid")


# 10**17 samples of a 2-token prompt take 1.6e18 bytes, more than any address space: the
# allocation fails at once, even where the system promises memory it lacks (overcommit). On a
# GPU, torch raises torch.OutOfMemoryError instead.
@pytest.mark.parametrize("num_samples, gpu", [(10**17, False), (1000, True)],
                         ids=["cpu-allocation", "gpu-error"])
def test_sample_out_of_memory_is_one_line_and_exit_2(trained_run, capsys, monkeypatch,
                                                     num_samples, gpu):
    """Running out of memory ends sample with one line suggesting fewer samples."""
    def out_of_gpu_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    if gpu:
        monkeypatch.setattr(gpt, "generate_batch", out_of_gpu_memory)
    assert gpt.main(["sample", "--run-dir", str(trained_run), "--prompt", "Hi", "--device", "cpu",
                     "--num-samples", str(num_samples)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"gpt.py sample: error: out of memory on cpu generating "
                                    f"{num_samples:,} samples at once: give a smaller "
                                    f"--num-samples")


def sample_in_shell(trained_run, shell: str, *extra: str) -> subprocess.CompletedProcess:
    """Run `python gpt.py sample ARGS` as "$@" in a bash command line, which can close
    streams: capture_output or stdin=DEVNULL would give open ones."""
    command = [sys.executable, os.path.join(HERE, "gpt.py"), "sample", "--run-dir",
               str(trained_run), "--max-new-tokens", "20", *extra]
    return subprocess.run(["bash", "-c", shell, "bash", *command], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(os.name != "posix", reason="bash closes the streams")
@pytest.mark.parametrize("shell, extra, named", [
    ('"$@" <&-', [], "stdin is closed"),
    ('"$@" >&-', ["--prompt", "Hi"], "stdout is closed"),
], ids=["stdin", "stdout"])
def test_sample_with_a_closed_stream_is_one_line_and_exit_2(trained_run, shell, extra, named):
    """With stdin closed and no --prompt, or stdout closed, sample says so in one line."""
    result = sample_in_shell(trained_run, shell, *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("gpt.py sample: error:") and named in lines[0]


# `| true` reads nothing and has ended long before gpt.py, importing torch, writes a byte:
# the first write to stdout then fails, as it does after `| head -1` has its line.
@pytest.mark.skipif(os.name != "posix", reason="bash makes the pipe")
@pytest.mark.parametrize("num_samples", ["1", "3"], ids=["streamed", "batch"])
def test_sample_into_a_closed_pipe_stops_quietly(trained_run, num_samples):
    """When the reader of stdout has gone, sample stops with exit code 0 and no traceback,
    no error and no "Exception ignored" message."""
    result = sample_in_shell(trained_run, '"$@" | true; exit "${PIPESTATUS[0]}"', "--prompt",
                             "Hi", "--num-samples", num_samples)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("model:") and "error" not in result.stderr
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr


@pytest.mark.parametrize("extra, named", [
    (["--run-dir", "{tmp}/empty"], "gpt.py train"),
    (["--checkpoint", "{tmp}/corrupt.pt"], "{tmp}/corrupt.pt"),
    (["--checkpoint", "{tmp}/missing.pt"], "{tmp}/missing.pt"),
    (["--checkpoint", "{tmp}/bare.pt"], "no model config"),
    (["--temperature", "-1"], "-1"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.5"], "1.5"),
    (["--top-k", "0"], "top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(10**23)], "--seed"),
    (["--num-samples", str(10**23)], "--num-samples"),
    (["--prompt", "\udcff"], "--prompt"),  # what Python makes of the byte 0xff in argv
], ids=["no-checkpoint", "corrupt", "missing", "bare", "temperature", "top-p-0", "top-p-big",
        "top-k", "no-tokens", "seed-negative", "seed-huge", "samples-huge", "prompt-not-utf8"])
def test_sample_bad_input_is_one_line_and_exit_2(tmp_path, trained_run, capsys, extra, named):
    """A bad checkpoint or setting gives exit code 2 and one stderr line naming it."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    model = gpt.TransformerLM(tiny_config())
    gpt.save_checkpoint(model, gpt.AdamW(model.parameters()), 0, str(tmp_path / "bare.pt"))
    args = ["sample", "--run-dir", str(trained_run), "--prompt", "Hi"]
    capsys.readouterr()
    assert exit_code(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    assert named.format(tmp=tmp_path) in one_error_line(capsys, "sample")


# ==================================================================================================
# Benchmarks (opt-in): python -m pytest -m benchmark -s
#
# gpt.py against the libraries people would otherwise use: tiktoken's encoder, Hugging Face
# tokenizers' BPE trainer, and the same model built from PyTorch's modules. Each checks that the
# two agree, then prints how fast gpt.py is next to the other (never asserted: it depends on the
# machine). pytest.ini leaves them out of a plain run; each skips where its library is missing.
# ==================================================================================================

def timed(work) -> tuple[object, float]:
    """work()'s result and the seconds it took."""
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def report(*lines: str) -> None:
    """The figures of a benchmark, with the versions that made them (shown under -s)."""
    print(f"\n[python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"{os.cpu_count()} cores]", *lines, sep="\n  ")


@pytest.mark.benchmark
def test_benchmark_encode_against_tiktoken():
    """Encoding the bundled stories gives tiktoken's ids; prints gpt.py's throughput next to it."""
    tiktoken = pytest.importorskip("tiktoken")
    vocab, merges = gpt.train_bpe(TINYSTORIES, 10_000, [EOT])
    # tiktoken ranks tokens instead of listing merges: the lower rank merges first, so the 256
    # single bytes then each merge's result, in the order learned, give the same merges.
    ranks = {bytes([b]): b for b in range(256)}
    for a, b in merges:
        ranks.setdefault(a + b, len(ranks))
    reference = tiktoken.Encoding("gpt-py-bench", pat_str=gpt.GPT2_PATTERN,
                                  mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})
    id_of = {token: i for i, token in vocab.items()}
    ours_of_rank = {rank: id_of[token] for token, rank in ranks.items()}
    ours_of_rank[len(ranks)] = id_of[EOT.encode()]
    with open(TINYSTORIES, encoding="utf-8") as f:
        text = f.read()
    megabytes = len(text.encode()) / 1e6
    # A fresh Tokenizer: its first call, which fills the word cache, as `tokenize` pays it.
    ours, ours_s = timed(lambda: gpt.Tokenizer(vocab, merges, [EOT]).encode(text))
    theirs, theirs_s = timed(lambda: reference.encode(text, allowed_special={EOT}))
    assert ours == [ours_of_rank[rank] for rank in theirs]
    report(f"encode {megabytes:.1f} MB, {len(ours):,} tokens, identical ids",
           f"gpt.py Tokenizer.encode (first call): {megabytes / ours_s:.1f} MB/s",
           f"tiktoken {tiktoken.__version__} (one thread): {megabytes / theirs_s:.1f} MB/s",
           f"gpt.py / tiktoken: {theirs_s / ours_s:.2f}")


@pytest.mark.benchmark
def test_benchmark_bpe_training_against_tokenizers():
    """Both trainers learn a 10,000-token vocabulary from the stories; prints their time ratio."""
    hf = pytest.importorskip("tokenizers")
    vocab_size = 10_000
    (vocab, merges), ours_s = timed(lambda: gpt.train_bpe(TINYSTORIES, vocab_size, [EOT]))
    # GPT-2's byte-level BPE in `tokenizers`: its ByteLevel pre-tokenizer splits with GPT-2's
    # pattern, and the 256 bytes are the initial alphabet, as in gpt.py.
    reference = hf.Tokenizer(hf.models.BPE())
    reference.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = hf.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    _, theirs_s = timed(lambda: reference.train([TINYSTORIES], trainer))
    assert len(vocab) == reference.get_vocab_size() == vocab_size
    # Both spell bytes with GPT-2's printable table, so their vocabularies compare as strings;
    # ties between equally frequent pairs are broken differently, so a few tokens differ.
    spell = gpt.bytes_to_unicode()
    spelled = {"".join(spell[b] for b in token) for token in vocab.values()}
    shared = spelled & set(reference.get_vocab())
    report(f"BPE training on {os.path.basename(TINYSTORIES)}, vocabulary {vocab_size:,}",
           f"gpt.py train_bpe: {ours_s:.2f} s, {len(merges):,} merges",
           f"tokenizers {hf.__version__} BpeTrainer: {theirs_s:.2f} s",
           f"tokens in both vocabularies: {len(shared) / vocab_size:.1%}",
           f"gpt.py / tokenizers (time): {ours_s / theirs_s:.2f}")



class ModulesAttention(nn.Module):
    """Causal self-attention from PyTorch's parts: nn.Linear and F.scaled_dot_product_attention,
    with RoPE written as complex multiplication (pair (x1, x2) is x1 + i x2, turned by e^(i a))."""

    def __init__(self, config: gpt.ModelConfig):
        super().__init__()
        C, self.H, D = config.d_model, config.num_heads, config.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = (
            nn.Linear(C, C, bias=False) for _ in range(4))
        frequencies = config.rope_theta ** (-torch.arange(0, D, 2).float() / D)  # (D/2,)
        angles = torch.outer(torch.arange(config.context_length).float(), frequencies)
        self.register_buffer("turns", torch.polar(torch.ones_like(angles), angles),
                             persistent=False)  # (T, D/2), complex

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, T, D/2)
        return torch.view_as_real(pairs * self.turns[:x.shape[2]]).flatten(-2).type_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.H, -1).transpose(1, 2)  # each (B, H, T, D)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v, is_causal=True)
        return self.output_proj(y.transpose(1, 2).reshape(B, T, C))


class ModulesBlock(nn.Module):
    """A pre-norm block: nn.RMSNorm, the attention above, SwiGLU from three nn.Linear."""

    def __init__(self, config: gpt.ModelConfig):
        super().__init__()
        C, hidden = config.d_model, config.d_ff
        self.ln1, self.ln2 = (nn.RMSNorm(C, eps=config.norm_eps) for _ in range(2))
        self.attn = ModulesAttention(config)
        self.ffn = nn.Module()  # a bare container, so that the names read ffn.w1, as gpt.py's
        self.ffn.w1, self.ffn.w3 = (nn.Linear(C, hidden, bias=False) for _ in range(2))
        self.ffn.w2 = nn.Linear(hidden, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        h = self.ln2(x)
        return x + self.ffn.w2(F.silu(self.ffn.w1(h)) * self.ffn.w3(h))


class ModulesLM(nn.Module):
    """gpt.TransformerLM (pre-norm, RoPE, SwiGLU, untied) from PyTorch's modules, under the same
    parameter names, so that it loads a gpt.py state dict as it is."""

    def __init__(self, config: gpt.ModelConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(ModulesBlock(config) for _ in range(config.num_layers))
        self.ln_final = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embeddings(token_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_final(x))


@pytest.mark.benchmark
def test_benchmark_model_against_pytorch_modules():
    """The laptop model from PyTorch's modules, given gpt.py's weights, gives gpt.py's logits."""
    laptop = gpt.PRESETS["laptop"]
    config = gpt.ModelConfig(vocab_size=10_000, **{f.name: laptop[f.name] for f in
                                                   dataclasses.fields(gpt.ModelConfig)
                                                   if f.name in laptop})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ours = gpt.TransformerLM(config).to(device)
    theirs = ModulesLM(config).to(device)
    theirs.load_state_dict(ours.state_dict())
    batch = laptop["batch_size"]
    tokens = torch.randint(config.vocab_size, (batch, config.context_length + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)

    # Then the speed of a training step of each: forward, loss, backward, clipping, AdamW.
    def step(model, optimizer, loss_fn, clip):
        loss = loss_fn(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        clip(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    hyper = dict(lr=laptop["lr"], betas=(0.9, laptop["beta2"]), weight_decay=0.1)
    runs = {"gpt.py": (ours, gpt.AdamW(ours.parameters(), **hyper), gpt.cross_entropy,
                       gpt.clip_grad_norm),
            "modules": (theirs, torch.optim.AdamW(theirs.parameters(), **hyper),
                        F.cross_entropy, nn.utils.clip_grad_norm_)}
    seconds = {name: [] for name in runs}
    for i in range(8):  # alternated, so that a busy moment of the machine slows both
        for name, run in runs.items():
            _, s = timed(lambda: step(*run))
            if i > 0:  # the first step allocates the optimizer's state
                seconds[name].append(s)
    rate = {name: batch * config.context_length / np.median(s) for name, s in seconds.items()}
    report(f"laptop model ({sum(p.numel() for p in ours.parameters()):,} parameters), "
           f"batch {batch} x {config.context_length}, float32, {device.type}; logits agree",
           f"gpt.py (TransformerLM, cross_entropy, AdamW, clip_grad_norm): "
           f"{rate['gpt.py']:,.0f} tokens/s",
           f"torch.nn modules (F.cross_entropy, torch.optim.AdamW, clip_grad_norm_): "
           f"{rate['modules']:,.0f} tokens/s",
           f"gpt.py / modules: {rate['gpt.py'] / rate['modules']:.2f}")


@pytest.mark.benchmark
def test_benchmark_greedy_sampling_against_transformers(tmp_path):
    """A SmolLM2-135M-shaped model (random weights, saved by transformers in bf16) imported into
    gpt.py continues a prompt with transformers' greedy tokens; prints both speeds at batch 1."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
        max_position_embeddings=8192, rope_theta=100_000.0, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    # A byte-level tokenizer of 49,152 ids: the 256 bytes, two-byte merges, <|endoftext|> last.
    vocab, merges = dict(BYTES_VOCAB), []
    for a, b in product(range(256), repeat=2):
        if len(vocab) == 49_151:
            break
        merges.append((bytes([a]), bytes([b])))
        vocab[len(vocab)] = bytes([a, b])
    tokenizer = gpt.Tokenizer(vocab, merges, [EOT])
    for name, data in gpt.hf_tokenizer_files(tokenizer, 8192).items():
        (tmp_path / "hf" / name).write_bytes(data)
    assert gpt.main(["import", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "run")]) == 0
    ours, _, _ = gpt.read_model(str(tmp_path / "run" / "gpt.pt"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float32).eval()
    prompt = torch.randint(256, 49_151, (1, 16), generator=torch.Generator().manual_seed(0))
    new = 200
    runs = {"gpt.py": lambda: [int(t) for t in gpt.generate_batch(ours, prompt, new, 0.0)],
            "transformers": lambda: theirs.generate(
                prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
                attention_mask=torch.ones_like(prompt))[0, 16:].tolist()}
    seconds, tokens = {name: [] for name in runs}, {}
    for i in range(4):  # alternated; the first round warms up both
        for name, run in runs.items():
            tokens[name], s = timed(run)
            if i > 0:
                seconds[name].append(s)
    assert tokens["gpt.py"] == tokens["transformers"]
    rate = {name: new / np.median(s) for name, s in seconds.items()}
    report(f"greedy sampling, SmolLM2-135M's shape (134.5M parameters, float32), batch 1, "
           f"16-token prompt, {new} new tokens; the same tokens",
           f"gpt.py generate_batch (KV cache): {rate['gpt.py']:.1f} tokens/s",
           f"transformers {transformers.__version__} generate: {rate['transformers']:.1f} "
           f"tokens/s",
           f"gpt.py / transformers: {rate['gpt.py'] / rate['transformers']:.2f}")
