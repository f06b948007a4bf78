# /// script
# requires-python = ">=3.10"
# dependencies = ["torch", "numpy", "regex"]
# ///
"""gpt.py: a small GPT-style language model, from raw text to stories, in one file.

Read it top to bottom: every part of a modern language model is written here from scratch on
plain PyTorch tensors, in the order the data flows through it.

    §1 Tokenizer      byte-level BPE: pre-tokenize, train merges, encode/decode, save/load
    §2 Data           corpus -> token file on disk (parallel, atomic); memory-mapped batches
    §3 Model          config, Linear/Embedding, RMSNorm, RoPE, attention, SwiGLU, block, LM
    §4 Loss, AdamW    cross-entropy and the AdamW optimizer
    §5 Schedule       warmup + cosine learning rate, gradient clipping
    §6 Training       the training loop, evaluation and checkpoints
    §7 Sampling       greedy, temperature, top-k, top-p, with a KV cache
    §8 Command line   the three subcommands below and main()

(§1, §2's token files and §8's `tokenize` are in place; the other sections arrive with the model,
the training loop and the sampler.)

The three commands, on the bundled TinyStories sample:

    python gpt.py tokenize        # train BPE on data/tinystories_train.txt, write data/*.bin
    python gpt.py train           # train the model, with progress, evaluation and checkpoints
    python gpt.py sample --prompt "Once upon a time"

References:
    GPT-2        Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"
    BPE          Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"
    RMSNorm      Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"
    RoPE         Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"
    SwiGLU       Shazeer 2020, "GLU Variants Improve Transformer"
    AdamW        Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"
    cosine       Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts"
    top-p        Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"
    TinyStories  Eldan & Li 2023, "TinyStories: How Small Can Language Models Be and Still Speak
                 Coherent English?"

Tensor shapes in comments use these letters:
    B batch, T time (sequence position), C model width (d_model), H heads,
    D head width (d_model / H), V vocabulary size.
"""

from __future__ import annotations

import argparse
import heapq
import json
import mmap
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import closing
from itertools import chain, repeat

import numpy as np
import regex


def log(message: str, end: str = "\n") -> None:
    """Progress and summaries go to stderr, so stdout stays clean for what a command produces."""
    print(message, end=end, file=sys.stderr, flush=True)


class Progress:
    """A one-line progress meter for long work: MB done, MB/s and the time left.

    On a terminal it redraws one line in place; in a log file it writes a line every few seconds.
    """

    def __init__(self, label: str, total_bytes: int):
        self.label, self.total, self.done = label, total_bytes, 0
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last >= (0.2 if self.tty else 5.0) or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            line = (f"{self.label}: {self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  "
                    f"{rate / 1e6:.1f} MB/s  ETA {eta:.0f}s")
            if self.tty:  # redraw in place; the final state stays on screen
                log("\r" + line, end="\n" if self.done >= self.total else "")
            else:
                log(line)


def default_workers() -> int:
    """The CPU cores this process may use (a container may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def worker_pool(num_workers: int, initializer=None, initargs=()):
    """A process pool whose workers leave Ctrl-C to the main process (which then stops them).

    On Linux we fork: a forked worker starts in milliseconds with gpt.py already imported, while
    a spawned one would spend a second re-importing torch. macOS's system libraries are not safe
    to fork, so there (and on Windows) Python's default, spawn, is used.
    """
    method = "fork" if sys.platform == "linux" else None
    return multiprocessing.get_context(method).Pool(
        num_workers, initializer=_init_worker, initargs=(initializer, initargs))


def _init_worker(initializer, initargs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def map_jobs(func, jobs: list, num_workers: int, ordered: bool,
             initializer=None, initargs=()) -> Iterator:
    """func(job) for every job: in this process when one worker (or one job) suffices, else in a
    pool, in job order if `ordered` or as they finish. The pool stops when iteration ends, is
    abandoned or fails; wrap the call in contextlib.closing to stop it at a known moment."""
    if num_workers == 1 or len(jobs) == 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(func, jobs)
        return
    with worker_pool(min(num_workers, len(jobs)), initializer, initargs) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(func, jobs)


# ==================================================================================================
# §1 Tokenizer: byte-level BPE
#
# Text becomes a sequence of integer ids. We start from the 256 possible bytes (so any string can
# be encoded, emoji included) and learn merges: repeatedly join the most frequent adjacent pair of
# tokens into a new token (Sennrich et al. 2016). As in GPT-2, text is first cut into pre-tokens
# (words with their leading space, numbers, punctuation runs) and merges never cross them.
# ==================================================================================================

# GPT-2's pre-tokenizer: contractions, optionally-space-prefixed letter runs / number runs /
# punctuation runs, then whitespace. `\s+(?!\S)` leaves the last space of a run to the next word,
# so " world" stays one pre-token after several spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)


# Before a space or a newline that stands between two non-space characters, GPT-2's pattern
# always ends one pre-token and starts the next (" word", " 42", "\n", ...), whatever the text
# around. Cutting text there into fragments ("Once", " upon", " a", " time,", "\nThe") is exact
# and nearly twice as fast as running the full pattern, so encoding and counting work on
# fragments and run the full pattern once per distinct fragment. (Stdlib `re` counts a few control
# characters as whitespace that `regex` does not; that only removes cuts, so it stays exact.)
FRAGMENT_CUT_RE = re.compile(r"(?=[ \n]\S)(?<=\S)")


def fragments(text: str) -> list[str]:
    """Example: fragments("Hi  there, it's\n42!") -> ['Hi  there,', " it's", '\n42!']"""
    return FRAGMENT_CUT_RE.split(text)


def pretokenize(text: str) -> list[str]:
    """Example: pretokenize("Hi  there, it's 42!") -> ['Hi', ' ', ' there', ',', ' it', "'s",
    ' 42', '!']"""
    return PRETOKEN_RE.findall(text)


def special_tokens_regex(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A regex that finds special tokens, longest first, so that with both `<|endoftext|>` and
    `<|endoftext|><|endoftext|>` registered the double one wins. None when there are none."""
    ordered = sorted(set(special_tokens), key=len, reverse=True)
    return regex.compile("(" + "|".join(map(regex.escape, ordered)) + ")") if ordered else None


def split_on_special_tokens(text: str, special_re: regex.Pattern | None) -> list[str]:
    """Example: split("a<|endoftext|>b", ...) -> ['a', '<|endoftext|>', 'b']: the odd positions
    are special tokens, the even positions the (possibly empty) text between them."""
    return special_re.split(text) if special_re else [text]


def check_vocab_size(vocab_size: int, special_tokens: list[str]) -> None:
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab size {vocab_size} is too small: it must hold the 256 bytes and "
                         f"{len(special_tokens)} special token(s), at least "
                         f"{256 + len(special_tokens)}")


def read_text(path: str, start: int = 0, end: int | None = None) -> str:
    """The bytes [start, end) of a file as text, with a clear error if they are not UTF-8."""
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(-1 if end is None else end - start)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset {start + e.start:,})"
                         ) from None


def check_text_file(path: str) -> int:
    """The size of a text file we are about to read, refusing a missing or empty one."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path} is empty")
    return size


def chunk_boundaries(path: str, special_tokens: list[str], chunk_bytes: int) -> list[int]:
    """Byte offsets that cut a file into chunks of about `chunk_bytes`, each cut at the start of a
    special token, so no document (and no pre-token) is split between two workers.

    A cut is refused where an occurrence of a special token starts before it and reaches it
    (overlapping it, or ending right there): in a run such as `<|endoftext|><|endoftext|>`,
    which may be one longer special token, the cut could split what encode() would match.
    Without special tokens the file is one chunk.
    Example: a 10 MB file with a document break every few KB, chunk_bytes=4e6 ->
    [0, 4000231, 8000514, 10000000].
    """
    size = os.path.getsize(path)
    specials = [s.encode("utf-8") for s in special_tokens]
    cuts = [0]
    if specials and size > chunk_bytes:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            pos = chunk_bytes
            while pos < size:
                hits = [h for h in (data.find(s, pos) for s in specials) if h >= 0]
                if not hits:
                    break
                cut = min(hits)
                # An occurrence starting at cut - len(s) .. cut - 1 lies within this window.
                if any(data.find(s, max(cut - len(s), 0), cut + len(s) - 1) >= 0
                       for s in specials):
                    pos = cut + 1  # inside or right after a run of specials: try the next one
                    continue
                if cut > cuts[-1]:
                    cuts.append(cut)
                pos = cut + chunk_bytes
    return cuts + [size]


def plan_chunks(path: str, special_tokens: list[str], num_workers: int,
                max_chunk_bytes: int = 4 << 20) -> list[tuple[str, int, int]]:
    """(path, start, end) pieces for the workers: a few MB each, and at least four per worker
    on a small file, so every core stays busy until the end."""
    size = check_text_file(path)
    chunk = max(min(max_chunk_bytes, size // (4 * num_workers)), 1 << 16)
    cuts = chunk_boundaries(path, special_tokens, chunk)
    return [(path, a, b) for a, b in zip(cuts, cuts[1:])]


def count_pretokens_in_chunk(path: str, start: int, end: int,
                             special_tokens: list[str]) -> Counter[str]:
    """How often each pre-token occurs in a byte range of a file; special tokens are removed
    (they delimit documents and never take part in merges).
    Example: "the cat<|endoftext|>the" -> Counter({'the': 2, ' cat': 1})."""
    special_re = special_tokens_regex(special_tokens)
    fragment_counts: Counter[str] = Counter()
    for i, piece in enumerate(split_on_special_tokens(read_text(path, start, end), special_re)):
        if i % 2 == 0:
            fragment_counts.update(fragments(piece))
    counts: Counter[str] = Counter()
    for fragment, n in fragment_counts.items():
        for pretoken in pretokenize(fragment):
            counts[pretoken] += n
    return counts


def _count_chunk(job: tuple[str, int, int, list[str]]) -> tuple[int, Counter[str]]:
    path, start, end, special_tokens = job
    return end - start, count_pretokens_in_chunk(path, start, end, special_tokens)


def count_pretokens(path: str, special_tokens: list[str], num_workers: int,
                    verbose: bool = False) -> Counter[str]:
    """Pre-token counts of a whole file, in parallel: each worker reads its own chunks from disk,
    so memory holds a few chunks and the distinct pre-tokens, whatever the file's size."""
    chunks = plan_chunks(path, special_tokens, num_workers)
    jobs = [(p, a, b, special_tokens) for p, a, b in chunks]
    progress = Progress(f"pre-tokenize {path}", chunks[-1][2]) if verbose else None
    counts: Counter[str] = Counter()
    with closing(map_jobs(_count_chunk, jobs, num_workers, ordered=False)) as results:
        for nbytes, chunk_counts in results:
            counts.update(chunk_counts)
            if progress:
                progress.advance(nbytes)
    return counts


def merge_pair(word, pair, new):
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new`.
    Example: merge_pair((1, 2, 2, 2), (2, 2), 9) -> (1, 9, 2)."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return type(word)(out)


def initial_vocab(special_tokens: list[str]) -> dict[int, bytes]:
    """Ids 0-255 are the single bytes, then the special tokens in the order given."""
    vocab = {i: bytes([i]) for i in range(256)}
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab


def train_bpe_naive(text: str, vocab_size: int, special_tokens: list[str]
                    ) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The readable reference trainer: recount every pair after every merge.

    It is too slow for real corpora (each merge rescans all words), but it is the definition
    that train_bpe must reproduce exactly, and the tests check that it does.
    """
    check_vocab_size(vocab_size, special_tokens)
    special_re = special_tokens_regex(special_tokens)
    pieces = split_on_special_tokens(text, special_re)[::2]
    # Each distinct pre-token, as a tuple of single-byte tokens, with how often it occurs.
    words = Counter(tuple(bytes([b]) for b in pre.encode("utf-8"))
                    for piece in pieces for pre in pretokenize(piece))
    vocab = initial_vocab(special_tokens)
    merges = []
    while len(vocab) < vocab_size:
        pair_counts: Counter[tuple[bytes, bytes]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        # Most frequent pair; ties go to the lexicographically greatest (left, right).
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        vocab[len(vocab)] = best[0] + best[1]
        words = Counter({merge_pair(word, best, best[0] + best[1]): n
                         for word, n in words.items()})
    return vocab, merges


class _GreatestFirst:
    """Wraps a (left, right) byte pair so that Python's min-heap pops the lexicographically
    greatest pair first among pairs of equal count: the BPE tie-break rule."""

    __slots__ = ("pair",)

    def __init__(self, pair: tuple[bytes, bytes]):
        self.pair = pair

    def __lt__(self, other: _GreatestFirst) -> bool:
        return self.pair > other.pair


def train_bpe(input_path: str, vocab_size: int, special_tokens: list[str],
              num_workers: int | None = None,
              verbose: bool = False) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn a byte-level BPE vocabulary from a text file (same result as train_bpe_naive).

    Returns vocab {id: bytes} (ids 0-255 the bytes, then the special tokens, then one per merge)
    and the merges [(left, right), ...] in the order they were learned.

    Two ideas make it fast. Pre-tokens are counted once, in parallel, and each distinct one is
    kept with its count: TinyStories' 1.4M pre-tokens are only ~9k distinct words. Then each merge
    updates the pair counts incrementally: we keep, for every pair, the words that contain it, so
    merging (a, b) revisits only those words, and a heap finds the next most frequent pair.
    """
    special_tokens = list(special_tokens)
    check_vocab_size(vocab_size, special_tokens)
    num_workers = num_workers or default_workers()
    counts = count_pretokens(input_path, special_tokens, num_workers, verbose)

    vocab = initial_vocab(special_tokens)
    # words[i]: the i-th distinct pre-token as a list of token ids (its bytes, to start with).
    words = [list(pre.encode("utf-8")) for pre in counts]
    freqs = list(counts.values())
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words containing it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] += freqs[i]
            pair_words[pair].add(i)
    # Max-heap by (count, pair) via negated counts. Entries go stale as counts drop; rather than
    # delete them, we check each popped entry against pair_count and re-file it if it is stale.
    heap = [(-n, _GreatestFirst((vocab[a], vocab[b])), (a, b)) for (a, b), n in pair_count.items()]
    heapq.heapify(heap)

    merges = []
    last_report = time.perf_counter()
    while len(vocab) < vocab_size and heap:
        neg_count, key, pair = heapq.heappop(heap)
        count = pair_count[pair]
        if count != -neg_count:
            if count > 0:
                heapq.heappush(heap, (-count, key, pair))
            continue
        new_id = len(vocab)
        a, b = pair
        vocab[new_id] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        # Re-spell only the words that contain (a, b): take away the counts of all their old pairs,
        # add those of their new pairs. Only pairs with new_id can have grown, so only they are
        # pushed; shrunken pairs are fixed lazily when popped.
        grown = set()
        for i in pair_words.pop(pair):
            word = words[i]
            merged = merge_pair(word, pair, new_id)
            if len(merged) == len(word):
                continue  # a stale entry: an earlier merge already took this word's (a, b) apart
            freq = freqs[i]
            for p in zip(word, word[1:]):
                pair_count[p] -= freq
            for p in zip(merged, merged[1:]):
                pair_count[p] += freq
                if new_id in p:
                    pair_words[p].add(i)
                    grown.add(p)
            words[i] = merged
        assert pair_count.pop(pair) == 0, "every word with the merged pair was re-spelled"
        for p in grown:
            heapq.heappush(heap, (-pair_count[p], _GreatestFirst((vocab[p[0]], vocab[p[1]])), p))
        if verbose and time.perf_counter() - last_report > 5:  # only long runs report progress
            last_report = time.perf_counter()
            log(f"merges: {len(merges):,}/{vocab_size - 256 - len(special_tokens):,}")
    return vocab, merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of bytes, used in vocab.json and merges.txt.

    Printable bytes stand for themselves; the 68 others (control characters, space, ...) are
    shifted to code points 256 and up, so every token is a visible string with no spaces.
    Example: b" hello" is spelled "Ġhello" (byte 32 -> chr(288) = 'Ġ').
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return mapping


def write_atomically(path: str, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# The rank of a pair that is no merge: after every real rank.
_NOT_A_MERGE = (float("inf"), -1)


class _Cache(dict):
    """string -> its token ids, computed by `encode` on a miss.

    Text repeats the same words endlessly, so almost every lookup is a hit and encoding runs at
    dictionary speed. The cache is cleared when it grows past `max_size` entries, which bounds
    its memory on corpora with millions of distinct words.
    """

    def __init__(self, encode, max_size: int = 1 << 20):
        super().__init__()
        self.encode, self.max_size = encode, max_size

    def __missing__(self, text: str) -> list[int]:
        if len(self) >= self.max_size:
            self.clear()
        ids = self[text] = self.encode(text)
        return ids


class Tokenizer:
    """Encodes text to token ids and back, given a BPE vocabulary and its merges.

    vocab: {id: bytes}; merges: [(left, right), ...] in the order learned; special_tokens:
    strings that always become one token of their own (added to vocab if missing).
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                 special_tokens: list[str] | None = None):
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = list(special_tokens or [])
        for s in self.special_tokens:
            if s.encode("utf-8") not in self.vocab.values():
                self.vocab[max(self.vocab) + 1] = s.encode("utf-8")
        # bytes -> id. If two ids spell the same bytes (BPE can build one string two ways), the
        # first id wins, as in every byte-level BPE encoder.
        self.id_of: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            self.id_of.setdefault(self.vocab[i], i)
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in self.id_of]
        if missing:
            raise ValueError(f"the vocabulary lacks single-byte tokens such as {missing[0]!r}")
        self.byte_ids = [self.id_of[bytes([b])] for b in range(256)]
        # (left id, right id) -> (rank, merged id); a lower rank was learned earlier.
        self.merge_rank: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(self.merges):
            if left not in self.id_of or right not in self.id_of or left + right not in self.id_of:
                raise ValueError(f"merge {rank} ({left!r}, {right!r}) uses a token that is not "
                                 "in the vocabulary")
            pair = (self.id_of[left], self.id_of[right])
            self.merge_rank.setdefault(pair, (rank, self.id_of[left + right]))
        self.special_ids = {s: self.id_of[s.encode("utf-8")] for s in self.special_tokens}
        self.special_re = special_tokens_regex(self.special_tokens)
        # One cache for fragments and pre-tokens alike: most fragments are one pre-token.
        self.cache = _Cache(self.encode_fragment)

    def encode_word(self, pretoken: str) -> list[int]:
        """Apply the merges to one pre-token, earliest-learned pair first, until none applies.
        Example (TinyStories merges): " there" -> [b' ', b't', b'h', b'e', b'r', b'e'] ->
        ... -> [b' there'] -> [id of ' there'].

        Merging the leftmost occurrence of the best pair and looking again equals merging all
        its occurrences at once: a pair containing the new token was learned later, so it
        never outranks the pair's other occurrences.
        """
        ids = [self.byte_ids[b] for b in pretoken.encode("utf-8")]
        while len(ids) > 1:
            ranks = list(map(self.merge_rank.get, zip(ids, ids[1:]), repeat(_NOT_A_MERGE)))
            best = min(ranks)
            if best is _NOT_A_MERGE:
                break
            i = ranks.index(best)
            ids[i:i + 2] = [best[1]]
        return ids

    def encode_fragment(self, fragment: str) -> list[int]:
        """Example: " time," -> pre-tokens [' time', ','] -> [id of ' time', id of ','].

        Letters alone, after at most one space, are one pre-token (` ?\\p{L}+`): such fragments,
        the most common kind, skip the regex and its per-call cost.
        """
        if fragment.isalpha() or (fragment[:1] == " " and fragment[1:].isalpha()):
            return self.encode_word(fragment)
        pretokens = pretokenize(fragment)
        if len(pretokens) == 1:
            return self.encode_word(fragment)
        return list(chain.from_iterable(map(self.cache.__getitem__, pretokens)))

    def encode(self, text: str) -> list[int]:
        """Example (TinyStories tokenizer): "Once upon a time<|endoftext|>" ->
        [ids of 'Once', ' upon', ' a', ' time', '<|endoftext|>']."""
        ids: list[int] = []
        lookup = self.cache.__getitem__
        for i, piece in enumerate(split_on_special_tokens(text, self.special_re)):
            if i % 2:
                ids.append(self.special_ids[piece])
            elif piece:
                # The hot loop, all in C: split into fragments, look each up, extend the list.
                ids.extend(chain.from_iterable(map(lookup, fragments(piece))))
        return ids

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Encode a stream of strings (say, the lines of a large file) lazily, giving exactly the
        ids that encode() gives for their concatenation, in memory that does not grow with it.

        Pieces are joined in a buffer, and everything up to the buffer's last fragment cut (see
        FRAGMENT_CUT_RE) is encoded, since what follows a cut cannot change what precedes it.
        """
        longest_special = max(map(len, self.special_tokens), default=0)
        buffer = ""
        for text in texts:
            buffer += text
            cut = self._last_safe_cut(buffer, longest_special)
            if cut > 0:
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
        yield from self.encode(buffer)

    def _last_safe_cut(self, buffer: str, longest_special: int) -> int:
        # Stay clear of the end by the longest special token, which might still be arriving,
        # and of the inside of any special token (a special could contain " x").
        limit = len(buffer) - longest_special
        inside = ([(m.start(), m.end()) for m in self.special_re.finditer(buffer)]
                  if self.special_re else [])
        cuts = [m.start() for m in FRAGMENT_CUT_RE.finditer(buffer, 0, max(limit, 0))]
        return next((cut for cut in reversed(cuts)
                     if not any(start < cut < end for start, end in inside)), 0)

    def decode(self, ids: Iterable[int]) -> str:
        """Token ids back to text; bytes that are not valid UTF-8 (a multi-byte character cut in
        the middle) become U+FFFD instead of raising."""
        try:
            data = b"".join(map(self.vocab.__getitem__, ids))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary "
                             f"({len(self.vocab)} tokens)") from None
        return data.decode("utf-8", errors="replace")

    def save(self, directory: str) -> None:
        """Write vocab.json and merges.txt in GPT-2's format (bytes spelled printably), plus
        special_tokens.json. Each file is replaced atomically."""
        os.makedirs(directory, exist_ok=True)
        spell = bytes_to_unicode()
        spelled = lambda token: "".join(spell[b] for b in token)
        # Written by hand rather than json.dump: if BPE built the same string twice, a dict would
        # keep one id, and the file must keep both to load back exactly.
        entries = (f"{json.dumps(spelled(self.vocab[i]), ensure_ascii=False)}: {i}"
                   for i in sorted(self.vocab))
        vocab_json = "{\n" + ",\n".join(entries) + "\n}\n"
        merges_txt = "#version: 0.2\n" + "".join(f"{spelled(a)} {spelled(b)}\n"
                                                 for a, b in self.merges)
        write_atomically(os.path.join(directory, "vocab.json"), vocab_json.encode("utf-8"))
        write_atomically(os.path.join(directory, "merges.txt"), merges_txt.encode("utf-8"))
        write_atomically(os.path.join(directory, "special_tokens.json"),
                         json.dumps(self.special_tokens, ensure_ascii=False).encode("utf-8"))

    @classmethod
    def load(cls, directory: str) -> Tokenizer:
        """Read a tokenizer written by save(), or GPT-2's own vocab.json and merges.txt."""
        paths = {name: os.path.join(directory, name)
                 for name in ("vocab.json", "merges.txt", "special_tokens.json")}
        for name in ("vocab.json", "merges.txt"):
            if not os.path.isfile(paths[name]):
                raise ValueError(f"{directory} holds no tokenizer ({name} is missing); "
                                 "run `python gpt.py tokenize` first")
        unspell = {c: b for b, c in bytes_to_unicode().items()}
        try:
            with open(paths["vocab.json"], encoding="utf-8") as f:
                pairs = json.load(f, object_pairs_hook=list)
            vocab = {int(i): bytes(unspell[c] for c in token) for token, i in pairs}
            with open(paths["merges.txt"], encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
            merges = [tuple(bytes(unspell[c] for c in part) for part in line.split(" "))
                      for line in lines if line and not line.startswith("#version")]
            special_tokens = []
            if os.path.isfile(paths["special_tokens.json"]):
                with open(paths["special_tokens.json"], encoding="utf-8") as f:
                    special_tokens = json.load(f)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{directory}: corrupt tokenizer files ({type(e).__name__}: {e})"
                             ) from None
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{paths['merges.txt']}: every line must be two tokens")
        return cls(vocab, merges, special_tokens)


# ==================================================================================================
# §2 Data: token files on disk
#
# A corpus is encoded once into a flat file of token ids, which training memory-maps: the OS pages
# in only the windows a batch reads, so a 10 GB corpus trains in the memory of a small one.
# Format: raw little-endian unsigned integers, no header; uint16 while every id fits (vocabularies
# up to 65,536 tokens), uint32 beyond. Documents follow each other, separated by <|endoftext|>.
# ==================================================================================================

def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: half the disk and page cache of uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


_worker_tokenizer: Tokenizer | None = None  # the tokenizer that _encode_chunk_in_worker uses


def _init_encoder(tokenizer: Tokenizer) -> None:
    # Forked workers share the caller's tokenizer (cache included); spawned ones get a pickle.
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk_in_worker(job: tuple[str, int, int, np.dtype]) -> tuple[int, np.ndarray]:
    path, start, end, dtype = job
    ids = _worker_tokenizer.encode(read_text(path, start, end))
    return end - start, np.array(ids, dtype=dtype)


def encode_file(tokenizer: Tokenizer, text_path: str, out_path: str, num_workers: int,
                verbose: bool = False) -> int:
    """Encode a text file into a token file; returns the number of tokens.

    Workers encode chunks of a few MB (cut at special tokens, so the result equals encoding the
    whole text at once) and the main process appends them in order. Output goes to a temporary
    file renamed into place at the end, so an error or Ctrl-C never leaves a half-written
    file that looks complete.
    """
    chunks = plan_chunks(text_path, tokenizer.special_tokens, num_workers)
    dtype = token_dtype(max(tokenizer.vocab) + 1)
    jobs = [(path, start, end, dtype) for path, start, end in chunks]
    progress = Progress(f"encode {text_path}", chunks[-1][2]) if verbose else None
    tmp_path = f"{out_path}.partial"
    results = map_jobs(_encode_chunk_in_worker, jobs, num_workers, ordered=True,
                       initializer=_init_encoder, initargs=(tokenizer,))
    with closing(results):
        try:
            num_tokens = 0
            with open(tmp_path, "wb") as f:
                for nbytes, ids in results:
                    ids.tofile(f)
                    num_tokens += len(ids)
                    if progress:
                        progress.advance(nbytes)
            os.replace(tmp_path, out_path)
        finally:
            # Remove an unfinished file before closing() stops the workers: that takes a moment,
            # and a second Ctrl-C in that moment must not leave the file behind.
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
    return num_tokens


# ==================================================================================================
# §8 Command line
#
# Each subcommand is a plain function of its parsed arguments. A mistake in the user's input
# (a missing file, an impossible size) raises ValueError or OSError with a message naming the bad
# value; main() prints that one line and exits with code 2.
# ==================================================================================================

def check_writable_dir(directory: str) -> None:
    """Fail now, not after an hour of work, if results cannot be written to `directory`."""
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    with open(probe, "wb"):
        pass
    os.remove(probe)


def cmd_tokenize(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    workers = args.workers or default_workers()
    splits = {"train": args.train, "valid": args.valid}
    sizes = {split: check_text_file(path) for split, path in splits.items()}
    check_writable_dir(args.out_dir)
    tokenizer_dir = os.path.join(args.out_dir, "tokenizer")

    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
        print(f"tokenizer: loaded from {args.tokenizer} ({len(tokenizer.vocab):,} tokens)")
    else:
        check_vocab_size(args.vocab_size, args.special_tokens)
        vocab, merges = train_bpe(args.train, args.vocab_size, args.special_tokens, workers,
                                  verbose=True)
        tokenizer = Tokenizer(vocab, merges, args.special_tokens)
        print(f"tokenizer: trained on {args.train} ({sizes['train'] / 1e6:,.1f} MB) in "
              f"{time.perf_counter() - started:.1f}s: {len(vocab):,} tokens, {len(merges):,} "
              "merges")
    if os.path.abspath(args.tokenizer or "") != os.path.abspath(tokenizer_dir):
        tokenizer.save(tokenizer_dir)  # the token files' directory always holds their tokenizer

    dtype = token_dtype(max(tokenizer.vocab) + 1)
    for split, path in splits.items():
        encode_started = time.perf_counter()
        out_path = os.path.join(args.out_dir, f"{split}.bin")
        num_tokens = encode_file(tokenizer, path, out_path, workers, verbose=True)
        seconds = time.perf_counter() - encode_started
        print(f"{split}: {path} -> {out_path}: {num_tokens:,} tokens ({dtype.name}), "
              f"{sizes[split] / max(num_tokens, 1):.2f} bytes/token, "
              f"{sizes[split] / 1e6 / seconds:.1f} MB/s")
    longest = sorted((t for i, t in tokenizer.vocab.items()
                      if t.decode("utf-8", "replace") not in tokenizer.special_tokens),
                     key=len, reverse=True)[:5]
    print("longest tokens: " + ", ".join(repr(t.decode("utf-8", "replace")) for t in longest))
    print(f"done in {time.perf_counter() - started:.1f}s; tokenizer in {tokenizer_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt.py", description="Train a small GPT from scratch: tokenize, train, sample.")
    commands = parser.add_subparsers(dest="command", required=True)

    tok = commands.add_parser(
        "tokenize", help="train a BPE tokenizer and encode a corpus into token files",
        description="Train byte-level BPE on the train text (or load a tokenizer), then encode "
                    "the train and valid texts into OUT_DIR/train.bin and OUT_DIR/valid.bin.")
    tok.add_argument("--train", default="data/tinystories_train.txt",
                     help="UTF-8 text to train BPE on and to encode (default: %(default)s)")
    tok.add_argument("--valid", default="data/tinystories_valid.txt",
                     help="UTF-8 text to encode as validation data (default: %(default)s)")
    tok.add_argument("--vocab-size", type=int, default=10_000,
                     help="tokens in all: 256 bytes + special tokens + merges "
                          "(default: %(default)s)")
    tok.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"],
                     help="strings that are always one token and delimit documents "
                          "(default: %(default)s; give none for no special tokens)")
    tok.add_argument("--out-dir", default="data",
                     help="where tokenizer/, train.bin and valid.bin go (default: %(default)s)")
    tok.add_argument("--tokenizer", metavar="DIR",
                     help="encode only, with the tokenizer saved in DIR (no BPE training; "
                          "--vocab-size and --special-tokens are then ignored)")
    tok.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: every available core)")
    tok.set_defaults(run=cmd_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        log(f"gpt.py {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:
        log(f"\ngpt.py {args.command}: interrupted; files already complete are kept")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
