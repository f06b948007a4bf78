"""Tests for gpt.py, section by section: python -m pytest -q test_gpt.py

Each test checks one property, against a reference where one exists (the naive BPE trainer,
GPT-2's published token ids), against examples worked out by hand, or as a round trip.
Everything a test writes goes under pytest's tmp_path, never into the working directory.
"""

import json
import os
import random
import subprocess
import sys
import warnings
from itertools import chain

import numpy as np
import pytest

import gpt

HERE = os.path.dirname(os.path.abspath(__file__))
TINYSTORIES = os.path.join(HERE, "data", "tinystories_train.txt")
GPT2_DIR = os.path.join(HERE, "..", "shared", "data", "gpt2")
EOT = "<|endoftext|>"
BYTES_VOCAB = {i: bytes([i]) for i in range(256)}  # a tokenizer with no merges at all


# ==================================================================================================
# The module as a whole
# ==================================================================================================

def test_import_does_nothing(tmp_path):
    """Importing gpt.py prints nothing and writes nothing."""
    result = subprocess.run([sys.executable, "-B", "-c", "import gpt"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": HERE}, capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert os.listdir(tmp_path) == []


def test_source_compiles_without_warnings():
    """gpt.py has no invalid escape sequences (a SyntaxWarning from Python 3.12, later an error)."""
    with open(os.path.join(HERE, "gpt.py"), encoding="utf-8") as f:
        source = f.read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(source, "gpt.py", "exec")


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


@pytest.fixture(params=["train_bpe", "train_bpe_naive"])
def train(request, tmp_path):
    """Both trainers behind one signature: train(text, vocab_size, special_tokens)."""
    if request.param == "train_bpe_naive":
        return gpt.train_bpe_naive

    def train_from_file(text, vocab_size, special_tokens):
        path = tmp_path / "corpus.txt"
        path.write_bytes(text.encode("utf-8"))
        return gpt.train_bpe(str(path), vocab_size, special_tokens, num_workers=1)
    return train_from_file


# --- pre-tokenizer --------------------------------------------------------------------------------

def test_fragments_hand_example():
    """fragments() cuts only before a space or newline that sits between two non-spaces."""
    assert gpt.fragments("Hi  there, it's\n42!") == ["Hi  there,", " it's", "\n42!"]
    assert gpt.fragments("a\n b c\n\nd") == ["a\n b", " c\n\nd"]
    assert gpt.fragments("") == [""]


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


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_fragments_keep_pretokens_whole(text):
    """Pre-tokenizing fragment by fragment gives the pre-tokens of the whole text."""
    assert list(chain.from_iterable(map(gpt.pretokenize, gpt.fragments(text)))) == \
        gpt.pretokenize(text)
    assert "".join(gpt.fragments(text)) == text


@pytest.mark.parametrize("word, pair, expected", [
    ((1, 2, 2, 2), (2, 2), (1, 9, 2)),  # overlapping occurrences: leftmost first
    ((2, 2, 2, 2), (2, 2), (9, 9)),
    ((1, 2, 3), (3, 4), (1, 2, 3)),     # pair absent
    ((1, 2, 1, 2), (1, 2), (9, 9)),
    ((), (1, 2), ()),
    ([3, 1, 2], (1, 2), [3, 9]),        # a list stays a list
])
def test_merge_pair_hand_examples(word, pair, expected):
    """merge_pair replaces non-overlapping occurrences left to right, keeping the type."""
    assert gpt.merge_pair(word, pair, 9) == expected


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


@pytest.mark.parametrize("seed", range(20))
def test_train_bpe_equals_naive(tmp_path, seed):
    """The fast trainer learns exactly the naive reference's vocab and merges."""
    text = random_text(seed, num_words=400)
    special_tokens = [EOT] if seed % 4 else []  # without it, "<|endoftext|>" is plain text
    vocab_size = 1000 if seed % 5 == 0 else 256 + len(special_tokens) + 5 + 3 * seed
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    fast = gpt.train_bpe(str(path), vocab_size, special_tokens, num_workers=1)
    assert fast == gpt.train_bpe_naive(text, vocab_size, special_tokens)


def test_train_bpe_in_parallel_equals_naive(tmp_path):
    """Counting pre-tokens in several chunks on 2 workers changes nothing."""
    text = random_text(seed=123, num_words=60_000)
    path = tmp_path / "corpus.txt"
    path.write_bytes(text.encode("utf-8"))
    assert len(gpt.plan_chunks(str(path), [EOT], num_workers=2)) > 2
    fast = gpt.train_bpe(str(path), 400, [EOT], num_workers=2)
    assert fast == gpt.train_bpe_naive(text, 400, [EOT])


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
        word = tuple(bytes([b]) for b in pretoken.encode("utf-8"))
        for left, right in tokenizer.merges:
            word = gpt.merge_pair(word, (left, right), left + right)
        ids += [tokenizer.id_of[token] for token in word]
    return ids


def test_encode_equals_replaying_merges(tokenizer, corpus_path):
    """encode() gives the ids of applying the merges one by one in the order they were learned."""
    with open(corpus_path, encoding="utf-8") as f:
        text = f.read(3000).replace(EOT, "") + "".join(TRICKY_TEXTS)
    assert tokenizer.encode(text) == encode_by_replaying_merges(tokenizer, text)


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


# "<| x y |>" holds spaces, so a stream must not cut inside it before it has fully arrived.
@pytest.mark.parametrize("specials", [[EOT], [EOT, EOT * 2], [EOT, "<| x y |>"]],
                         ids=["eot", "eot+double", "eot+spaced"])
@pytest.mark.parametrize("text", [
    "a  b\n\n c'll 12 <|endoftext|>x  ",
    EOT + EOT + " " + EOT + "end",
    "Once upon a time,  there was\n\na cat.\x1c🙂 日本 it's",
    "a<| x y |>b <| x y |> c<| x",
])
def test_encode_iterable_equals_encode_on_any_split(specials, text):
    """Streaming pieces gives encode()'s ids, however the text is cut into pieces."""
    tokenizer = gpt.Tokenizer(BYTES_VOCAB, [], specials)
    expected = tokenizer.encode(text)
    assert list(tokenizer.encode_iterable(list(text))) == expected  # one character at a time
    for i in range(len(text) + 1):
        assert list(tokenizer.encode_iterable([text[:i], text[i:]])) == expected, i


def test_encode_iterable_equals_encode_on_file_lines(tokenizer, corpus_path):
    """Streaming the lines of a file gives the ids of encoding the whole file at once."""
    with open(corpus_path, encoding="utf-8", newline="") as f:
        expected = tokenizer.encode(f.read())
    with open(corpus_path, encoding="utf-8", newline="") as f:
        assert list(tokenizer.encode_iterable(f)) == expected


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
    text = "abc é! Once upon a time<|fin|>" + EOT + "".join(TRICKY_TEXTS)
    assert loaded.encode(text) == original.encode(text)


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
    if not os.path.isdir(GPT2_DIR):
        pytest.skip(f"GPT-2 tokenizer files not found at {GPT2_DIR}")
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


# ==================================================================================================
# §2 Data
# ==================================================================================================

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


def test_chunk_boundaries_without_special_tokens_is_one_chunk(tmp_path):
    """With no special tokens to cut at, the whole file is one chunk."""
    text = documents_file(tmp_path / "docs.txt")
    assert gpt.chunk_boundaries(str(tmp_path / "docs.txt"), [], 50) == [0, len(text)]


@pytest.mark.parametrize("vocab_size, dtype", [
    (256, np.uint16), (65_536, np.uint16), (65_537, np.uint32), (100_000, np.uint32)])
def test_token_dtype(vocab_size, dtype):
    """uint16 while every id fits in 16 bits (ids up to 65,535), uint32 beyond."""
    assert gpt.token_dtype(vocab_size) == np.dtype(dtype)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_encode_file_equals_encode(tmp_path, tokenizer, corpus_path, num_workers):
    """The token file holds encode(whole text) as raw uint16, whatever the number of workers."""
    assert len(gpt.plan_chunks(corpus_path, [EOT], num_workers)) > 1  # really cut in chunks
    out = tmp_path / "tokens.bin"
    num_tokens = gpt.encode_file(tokenizer, corpus_path, str(out), num_workers)
    with open(corpus_path, encoding="utf-8", newline="") as f:
        expected = tokenizer.encode(f.read())
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    assert num_tokens == len(expected) and out.stat().st_size == 2 * len(expected)
    assert os.listdir(tmp_path) == ["tokens.bin"]  # no temporary file left behind


@pytest.mark.parametrize("num_workers", [1, 2])
def test_encode_file_error_leaves_no_file(tmp_path, tokenizer, corpus_path, num_workers):
    """A chunk that fails (not UTF-8) after others were written leaves no token file behind."""
    with open(corpus_path, "rb") as f:
        (tmp_path / "bad.txt").write_bytes(f.read() + b"\xff")  # only the last chunk is bad
    assert len(gpt.plan_chunks(str(tmp_path / "bad.txt"), [EOT], num_workers)) > 1
    with pytest.raises(ValueError, match="not UTF-8"):
        gpt.encode_file(tokenizer, str(tmp_path / "bad.txt"), str(tmp_path / "tokens.bin"),
                        num_workers)
    assert os.listdir(tmp_path) == ["bad.txt"]


# ==================================================================================================
# §8 Command line
# ==================================================================================================

@pytest.fixture
def small_texts(tmp_path, corpus_path):
    """A train and a valid text of a few KB, from the TinyStories sample."""
    with open(corpus_path, encoding="utf-8", newline="") as f:
        lines = f.readlines()
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text("".join(lines[:150]), encoding="utf-8", newline="")
    valid.write_text("".join(lines[150:200]), encoding="utf-8", newline="")
    return train, valid


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

    again = tmp_path / "again"
    assert gpt.main(args + ["--out-dir", str(again), "--tokenizer", str(out / "tokenizer")]) == 0
    for name in ["train.bin", "valid.bin"]:
        assert (again / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.parametrize("flag, value, named", [
    ("--train", "{tmp}/missing.txt", "{tmp}/missing.txt"),
    ("--valid", "{tmp}/missing.txt", "{tmp}/missing.txt"),
    ("--train", "{tmp}/empty.txt", "{tmp}/empty.txt"),
    ("--train", "{tmp}/not_utf8.txt", "{tmp}/not_utf8.txt"),
    ("--vocab-size", "100", "100"),
    ("--workers", "0", "--workers"),
    ("--out-dir", "{tmp}/afile/out", "{tmp}/afile/out"),  # under a file: fails even for root
    ("--tokenizer", "{tmp}/corrupt", "{tmp}/corrupt"),
    ("--tokenizer", "{tmp}/missing", "{tmp}/missing"),
], ids=["missing-train", "missing-valid", "empty-train", "not-utf8", "small-vocab", "no-workers",
        "unwritable-out", "corrupt-tokenizer", "missing-tokenizer"])
def test_tokenize_bad_input_is_one_line_and_exit_2(tmp_path, small_texts, capsys, flag, value,
                                                   named):
    """A user mistake gives exit code 2, one stderr line naming the bad value, no token files."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "not_utf8.txt").write_bytes(b"abc\xff\xfe")
    (tmp_path / "afile").write_bytes(b"a regular file")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "vocab.json").write_text("not json")
    (tmp_path / "corrupt" / "merges.txt").write_text("#version: 0.2\n")
    train, valid = small_texts
    options = {"--train": str(train), "--valid": str(valid), "--out-dir": str(tmp_path / "out"),
               "--vocab-size": "300", "--workers": "1"}
    options[flag] = value.format(tmp=tmp_path)
    capsys.readouterr()
    assert gpt.main(["tokenize", *chain.from_iterable(options.items())]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("gpt.py tokenize: error:")
    assert named.format(tmp=tmp_path) in lines[0]
    assert "Traceback" not in err
    for name in ["train.bin", "valid.bin", "train.bin.partial", "valid.bin.partial"]:
        assert not os.path.exists(os.path.join(options["--out-dir"], name))
