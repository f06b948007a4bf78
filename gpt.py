# /// script
# requires-python = ">=3.10"
# dependencies = ["torch", "numpy", "regex"]
# ///
"""gpt.py: a small GPT-style language model, from raw text to stories, in one file.

Read it top to bottom: every part of a modern language model is written here from scratch on
plain PyTorch tensors, in the order the data flows through it. The file is two books in one.
The ideas come first, each in its readable form; a reader can stop after §7 having seen them all:

    §1 Tokenizer      byte-level BPE: pre-tokenize, merge, train (naive, then incremental),
                      encode and decode, GPT-2's file format
    §2 Data           token files on disk; random windows as batches
    §3 Model          config, Linear/Embedding, RMSNorm, RoPE (and Llama 3's scaling),
                      attention (grouped-query, qk-norm), SwiGLU, the block, the LM; then the
                      variants of the classic ablations
    §4 Loss, AdamW    cross-entropy and AdamW as formulas; weight decay for matrices only; Muon
    §5 Schedule       warmup + cosine learning rate, gradient clipping
    §6 Training       the presets, one training step, evaluation
    §7 Sampling       temperature, top-k, top-p, a KV cache, a sliding window

Then the machinery that makes the ideas fast, safe and usable, each part naming the idea it
speeds up or protects:

    §8  Files         atomic writes, UTF-8 and JSON checks, the tokenizer's checks and files
    §9  Parallel BPE  worker processes, chunks cut at document boundaries, the fast
                      incremental trainer, train_bpe
    §10 Fast encoder  cached encoding (FastTokenizer), parallel encoding to token files
    §11 Checkpoints   save, validate, resume, load for sampling
    §12 Devices       the model's fast twins (fused RMSNorm, projections and attention),
                      CUDA/MPS/CPU, bf16, torch.compile (checked), torchrun
    §13 Budgets       time budgets, Ctrl-C and SIGTERM
    §14 The run       the training run: inputs, model, the loop, logs, checkpoints
    §15 tokenize      inputs checked first, outputs published together
    §16 Export        the Hugging Face format both ways: config, safetensors, tokenizer
                      files; import of Llama and Qwen3 checkpoints, their tokenizers and chat
    §17 Look inside   curves, attention maps, next-token tables, weight histograms, norms
    §18 Fine-tuning   question-answer pairs: template, packing, answer-only loss
    §19 Twins         the fast twins switched in for the readable forms, in one place
    §20 Command line  the subcommands and main()

What runs by default is not §1-§7 verbatim: §19 switches in the fast twins (the same results,
tested), and `train` compiles the model with torch.compile (§12 decides when: on CUDA, and on
a CPU for a time budget of 5 minutes or more, as the default 10-minute run has). `--readable`
(tokenize, train, sample) runs the book's own code, eagerly, to step through in a debugger.

The three commands, on the bundled TinyStories sample:

    python gpt.py tokenize        # train BPE on data/tinystories_train.txt, write data/*.bin
    python gpt.py train           # train the model, with progress, evaluation and checkpoints
    python gpt.py sample --prompt "Once upon a time"

and, to teach the trained model to answer questions (§18):

    python gpt.py finetune --data data/qa_example.json
    python gpt.py sample --qa --run-dir data/finetune --prompt "Who is Lily?"

References:
    GPT-2        Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"
    BPE          Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"
    RMSNorm      Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"
    RoPE         Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding"
    SwiGLU       Shazeer 2020, "GLU Variants Improve Transformer"
    AdamW        Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"
    Muon         Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
                 (kellerjordan.github.io/posts/muon); Liu et al. 2025, "Muon is Scalable for
                 LLM Training"
    cosine       Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts"
    top-p        Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration"
    GQA          Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer
                 Models from Multi-Head Checkpoints"
    Flash        Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention
                 with IO-Awareness"
    TinyStories  Eldan & Li 2023, "TinyStories: How Small Can Language Models Be and Still Speak
                 Coherent English?"

Tensor shapes in comments use these letters:
    B batch, T time (sequence position), C model width (d_model), H heads,
    KV key/value heads (H, but for grouped-query attention), D head width (d_model / H unless
    the config sets head_dim), F feed-forward hidden width, V vocabulary size,
    S positions a query attends to (the keys and values).
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import errno
import gc
import hashlib
import heapq
import io
import json
import math
import mmap
import multiprocessing
import operator
import os
import pickle
import re
import shlex
import shutil
import signal
import stat
import string
import sys
import time
import unicodedata
from array import array
from bisect import bisect_right
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, fields, replace
from decimal import Decimal
from functools import partial
from itertools import chain, islice, pairwise, repeat


def interrupted_at_start(signum, frame):
    """Machinery, set here so that it holds while torch loads (a second or more): Ctrl-C before
    main() takes over is one line and exit code 2, as later on (§20); nothing is written yet."""
    print("\ngpt.py: interrupted while starting; nothing was done", file=sys.stderr, flush=True)
    os._exit(2)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_at_start)

import numpy as np
import regex
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel


def log(message: str, end: str = "\n") -> None:
    """Progress meters, notes and errors go to stderr; stdout holds a command's results."""
    print(message, end=end, file=sys.stderr, flush=True)


# ==================================================================================================
# §1 Tokenizer: byte-level BPE
#
# Text becomes a sequence of integer ids. We start from the 256 possible bytes (so any string can
# be encoded, emoji included) and learn merges: repeatedly join the most frequent adjacent pair of
# tokens into a new token (Sennrich et al. 2016). As in GPT-2, text is first cut into pre-tokens
# (words with their leading space, numbers, punctuation runs) and merges never cross them.
# One representation throughout, as in minbpe: a word is a list of token ids. Here: pre-tokenize,
# count pairs, merge, the naive trainer, the incremental one; then the Tokenizer: special tokens
# cut out, pre-tokenize, merge by rank, bytes back to text, GPT-2's file format. The fast
# versions are in §9 (training) and §10 (encoding), the checks and file reading in §8.
# ==================================================================================================

# GPT-2's pre-tokenizer: contractions, optionally-space-prefixed letter runs / number runs /
# punctuation runs, then whitespace. `\s+(?!\S)` leaves the last space of a run to the next word,
# so " world" stays one pre-token after several spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)


def split_isolated(text: str, pattern: regex.Pattern) -> list[str]:
    """Cut text around every match of pattern, keeping the matches and the text between them
    (an "Isolated" split, in the words of Hugging Face's tokenizers). Its fast twin,
    fast_split_isolated (§10), runs in its place by default (§19).
    Example: split_isolated("ab12", regex.compile(r"\\p{N}")) -> ['ab', '1', '2']."""
    pieces, done = [], 0
    for match in pattern.finditer(text):
        pieces += [text[done:match.start()], match[0]]
        done = match.end()
    return [piece for piece in pieces + [text[done:]] if piece]


def pretokenize(text: str, patterns: Iterable[regex.Pattern] = (PRETOKEN_RE,)) -> list[str]:
    """Cut text by each pattern in turn, each cutting the pieces of the one before. Ours is
    GPT-2's pattern alone; SmolLM's cuts out each digit first (\\p{N}), then applies GPT-2's;
    Llama 3's and Qwen's are one pattern of their own (they keep up to 3 digits, or 1, together).
    Example: pretokenize("Hi  there, it's 42!") -> ['Hi', ' ', ' there', ',', ' it', "'s",
    ' 42', '!']"""
    pieces = [text]
    for pattern in patterns:
        pieces = [part for piece in pieces for part in split_isolated(piece, pattern)]
    return pieces


def special_tokens_regex(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """A regex that finds special tokens, longest first, so that with both `<|endoftext|>` and
    `<|endoftext|><|endoftext|>` registered the double one wins. None when there are none."""
    ordered = sorted(set(special_tokens), key=len, reverse=True)
    return regex.compile("(" + "|".join(map(regex.escape, ordered)) + ")") if ordered else None


def split_on_special_tokens(text: str, special_re: regex.Pattern | None) -> list[str]:
    """Example: split("a<|endoftext|>b", ...) -> ['a', '<|endoftext|>', 'b']: the odd positions
    are special tokens, the even positions the (possibly empty) text between them."""
    return special_re.split(text) if special_re else [text]


# How text becomes what the trainers take. A merge never crosses a pre-token, so a pre-token is
# merged alike wherever it occurs: after pre-tokenizing, the trainers need only each distinct
# pre-token and how often it occurs. That shrinks the work by two orders of magnitude
# (TinyStories' 1.4M pre-tokens are ~9k distinct words). §9 counts a large file in parallel
# chunks (count_pretokens), giving these same counts.
def pretoken_counts(text: str, special_tokens: list[str]) -> Counter[str]:
    """How often each pre-token occurs in text. Special tokens are cut out first: they mark
    document boundaries, and no merge may reach into them or across them.
    Example: pretoken_counts("the cat<|endoftext|>the", ["<|endoftext|>"]) ->
    Counter({'the': 2, ' cat': 1})."""
    pieces = split_on_special_tokens(text, special_tokens_regex(special_tokens))[::2]
    return Counter(pretoken for piece in pieces for pretoken in pretokenize(piece))


def initial_vocab(special_tokens: list[str]) -> dict[int, bytes]:
    """Ids 0-255 are the single bytes, then the special tokens in the order given."""
    vocab = {i: bytes([i]) for i in range(256)}
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab


def count_pairs(words: list[list[int]], freqs: list[int]) -> Counter[tuple[int, int]]:
    """How often each adjacent pair of tokens occurs, a word counting as often as it occurs.
    Example: count_pairs([[1, 2, 3], [1, 2]], [2, 5]) -> Counter({(1, 2): 7, (2, 3): 2})."""
    pair_counts: Counter[tuple[int, int]] = Counter()
    for word, freq in zip(words, freqs):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
    return pair_counts


def merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` by new_id, left to right, without overlaps: the step
    training repeats (Tokenizer.encode_word comes to the same, one occurrence at a time).
    Example: merge([1, 2, 2, 2], (2, 2), 9) -> [1, 9, 2]."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def most_frequent_pair(pair_counts: dict[tuple[int, int], int],
                       vocab: dict[int, bytes]) -> tuple[int, int]:
    """The pair to merge next: the most frequent, and among equals the greatest (left bytes,
    right bytes), the tie-break of Stanford CS336's assignment, which makes the merges unique.
    Example: {(97, 98): 2, (98, 99): 2} -> (98, 99), since (b"b", b"c") > (b"a", b"b")."""
    return max(pair_counts, key=lambda pair: (pair_counts[pair], vocab[pair[0]], vocab[pair[1]]))


def train_bpe_naive(text: str, vocab_size: int, special_tokens: list[str]
                    ) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The reference trainer: recount every pair after every merge.

    It is too slow for real corpora (each merge rescans all words), but it is the definition
    that the other trainers must reproduce exactly, and the tests check that they do.
    Returns vocab {id: bytes} (ids 0-255 the bytes, then the special tokens, then one per merge)
    and the merges [(left, right), ...] in the order they were learned.
    """
    check_vocab_size(vocab_size, special_tokens)  # room for the bytes and special tokens (§8)
    counts = pretoken_counts(text, special_tokens)
    # Each distinct pre-token as the ids of its bytes (id b is the byte b), and its count.
    words, freqs = [list(pretoken.encode("utf-8")) for pretoken in counts], list(counts.values())
    vocab = initial_vocab(special_tokens)
    merges = []
    while len(vocab) < vocab_size:
        pair_counts = count_pairs(words, freqs)
        if not pair_counts:
            break  # every word is a single token: nothing is left to merge
        pair = most_frequent_pair(pair_counts, vocab)
        new_id = len(vocab)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        words = [merge(word, pair, new_id) for word in words]
    return vocab, merges


def train_bpe_incremental(counts: dict[str, int], vocab_size: int, special_tokens: list[str],
                          verbose: bool = False
                          ) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The incremental trainer: train_bpe_naive's vocab and merges, from pre-token counts, without
    recounting every pair after every merge.

    Merging (a, b) changes only the words that hold (a, b). So we keep, for each pair, the words
    that hold it, and after a merge update the pair counts from those words alone: take away
    each word's pairs before the merge, add its pairs after it. Its fast twin,
    fast_train_bpe_incremental (§9), runs in its place by default (§19); it also finds the most
    frequent pair with a heap, instead of scanning them all.
    Example: counts {"aaab": 1}, vocab_size 259 -> merges [(b"a", b"a"), (b"aa", b"a"),
    (b"aaa", b"b")]: first the commonest pair, then ties go to the greatest pair.
    """
    check_vocab_size(vocab_size, special_tokens)  # (§8)
    words, freqs = [list(pretoken.encode("utf-8")) for pretoken in counts], list(counts.values())
    pair_counts = count_pairs(words, freqs)
    # pair -> the words that hold it, by index (after a merge, some no longer do)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_words[pair].add(i)
    vocab = initial_vocab(special_tokens)
    merges = []
    while len(vocab) < vocab_size and pair_counts:
        pair = most_frequent_pair(pair_counts, vocab)
        new_id = len(vocab)
        vocab[new_id] = vocab[pair[0]] + vocab[pair[1]]
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        for i in pair_words.pop(pair):
            # The word's pairs before the merge leave the counts, its pairs after it come in.
            old = words[i]
            words[i] = merge(old, pair, new_id)
            for p in zip(old, old[1:]):
                pair_counts[p] -= freqs[i]
                if pair_counts[p] == 0:
                    del pair_counts[p]  # the merged pair, and the pairs it took apart
            for p in zip(words[i], words[i][1:]):
                pair_counts[p] += freqs[i]
                pair_words[p].add(i)
        if verbose and len(merges) % 1000 == 0:
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


class Tokenizer:
    """Encodes text to token ids and back, given a BPE vocabulary and its merges: the readable
    version, which `--readable` runs. Its fast twin, FastTokenizer (§10), gives the same ids
    many times faster; §19 switches it in under this name.

    vocab: {id: bytes}; merges: [(left, right), ...] in the order learned; special_tokens:
    strings that always become one token of their own (added to vocab if missing). The other
    settings are GPT-2's unless given (models we import differ, see read_hf_tokenizer, §16):
    split_patterns, the pre-tokenizer's patterns (pretokenize); normalizer "NFC", to compose
    each accented letter into one character first (Qwen); ignore_merges, to take a pre-token
    that is a token whole, without merging (Llama 3).
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                 special_tokens: list[str] | None = None,
                 split_patterns: Iterable[str] = (GPT2_PATTERN,), normalizer: str | None = None,
                 ignore_merges: bool = False):
        self.vocab, self.merges = dict(vocab), list(merges)
        self.special_tokens = list(special_tokens or [])
        self.split_patterns, self.normalizer = list(split_patterns), normalizer
        self.ignore_merges = ignore_merges
        # Refuse, naming it, what could not encode: a merge of unknown tokens, say (§8).
        check_tokenizer(self.vocab, self.merges, self.special_tokens, self.split_patterns)
        self.split_res = [regex.compile(p) for p in self.split_patterns]
        known = set(self.vocab.values())
        for s in self.special_tokens:
            if s.encode("utf-8") not in known:
                self.vocab[max(self.vocab) + 1] = s.encode("utf-8")
        # bytes -> id. If two ids spell the same bytes (BPE can build one string two ways), the
        # first id wins, as in every byte-level BPE encoder.
        self.id_of: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            self.id_of.setdefault(self.vocab[i], i)
        self.byte_ids = [self.id_of[bytes([b])] for b in range(256)]
        # (left id, right id) -> rank, a lower rank learned earlier; merge rank r makes token
        # merged_id[r].
        self.merge_rank: dict[tuple[int, int], int] = {}
        self.merged_id: list[int] = []
        for rank, (left, right) in enumerate(self.merges):
            self.merge_rank.setdefault((self.id_of[left], self.id_of[right]), rank)
            self.merged_id.append(self.id_of[left + right])
        self.special_ids = {s: self.id_of[s.encode("utf-8")] for s in self.special_tokens}
        self.special_re = special_tokens_regex(self.special_tokens)

    def encode_word(self, pretoken: str) -> list[int]:
        """Apply the merges to one pre-token, the earliest learned first, until none applies.
        Example (TinyStories merges): " there" -> [b' ', b't', b'h', b'e', b'r', b'e'] ->
        ... -> [b' there'] -> [id of ' there'].

        Each step merges the leftmost occurrence of the earliest-learned pair, as Hugging Face's
        tokenizers do. For merges we trained this is `merge`, pair after pair, as training
        applied them: the new token's pairs were learned after it, so the same pair stays the
        earliest and its next occurrence, further right, goes next. Merges converted from
        tiktoken's ranks (Llama 3's) differ: there an earlier-ranked pair may form with the new
        token and take a token of the next occurrence first.
        """
        word = pretoken.encode("utf-8")
        if self.ignore_merges and word in self.id_of:
            return [self.id_of[word]]
        ids = [self.byte_ids[b] for b in word]
        while len(ids) >= 2:
            # The pair learned first, leftmost; a pair that is no merge ranks after every merge.
            rank, i = min((self.merge_rank.get(p, math.inf), i)
                          for i, p in enumerate(zip(ids, ids[1:])))
            if rank == math.inf:
                break  # no pair left is a merge
            ids[i:i + 2] = [self.merged_id[rank]]
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> ids: cut out the special tokens, pre-tokenize the rest, merge each pre-token.
        Example (TinyStories tokenizer): "Once upon a time<|endoftext|>" ->
        [ids of 'Once', ' upon', ' a', ' time', '<|endoftext|>']."""
        check_text(text)  # a str that has UTF-8 bytes (§8)
        ids: list[int] = []
        for i, piece in enumerate(split_on_special_tokens(text, self.special_re)):
            if i % 2:
                ids.append(self.special_ids[piece])  # a special token: one id of its own
            else:
                if self.normalizer:
                    piece = unicodedata.normalize(self.normalizer, piece)
                for pretoken in pretokenize(piece, self.split_res):
                    ids.extend(self.encode_word(pretoken))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray | int) -> str:
        """Token ids back to text; bytes that are not valid UTF-8 (a multi-byte character cut in
        the middle) become U+FFFD instead of raising. Example: [72, 105] -> "Hi" with the 256
        byte tokens as ids 0-255."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int] | torch.Tensor | np.ndarray | int) -> bytes:
        """The bytes that ids stand for, which decode() turns into text."""
        # A list, a 1-D tensor or array (what the model gives), or one id, as ints, checked (§8).
        return b"".join([self.vocab[i] for i in token_id_list(ids, self.vocab)])

    def saved_files(self) -> dict[str, bytes]:
        """The files save() writes, by name: vocab.json and merges.txt in GPT-2's format (bytes
        spelled printably), and special_tokens.json. They are also what fingerprint() hashes."""
        spell = bytes_to_unicode()
        spelled = lambda token: "".join(spell[b] for b in token)
        # Written by hand rather than json.dump: if BPE built the same string twice, a dict would
        # keep one id, and the file must keep both to load back exactly.
        entries = (f"{json.dumps(spelled(self.vocab[i]), ensure_ascii=False)}: {i}"
                   for i in sorted(self.vocab))
        vocab_json = "{\n" + ",\n".join(entries) + "\n}\n"
        merges_txt = "#version: 0.2\n" + "".join(f"{spelled(a)} {spelled(b)}\n"
                                                 for a, b in self.merges)
        files = {"vocab.json": vocab_json.encode("utf-8"),
                 "merges.txt": merges_txt.encode("utf-8"),
                 "special_tokens.json": json.dumps(self.special_tokens,
                                                   ensure_ascii=False).encode("utf-8")}
        if self.settings():  # only where they differ from ours: our files stay as they were
            files["tokenizer_settings.json"] = json.dumps(self.settings()).encode("utf-8")
        return files

    def settings(self) -> dict:
        """The settings that differ from GPT-2's, as the constructor takes them; {} for ours."""
        defaults = {"split_patterns": [GPT2_PATTERN], "normalizer": None, "ignore_merges": False}
        return {key: getattr(self, key) for key, value in defaults.items()
                if getattr(self, key) != value}

    def fingerprint(self) -> str:
        """The sha256 of saved_files(): token files record it to name the tokenizer that made
        them. It hashes what save() would write, not the files on disk, so a tokenizer loaded
        back (even from GPT-2's own files) has the fingerprint of the one that was saved."""
        digest = hashlib.sha256()
        for name, data in self.saved_files().items():
            digest.update(f"{name} {len(data)}\n".encode("utf-8") + data)
        return digest.hexdigest()

    def save(self, directory: str | os.PathLike) -> None:
        """Write saved_files() into `directory`, each file replaced whole or not at all (§8)."""
        os.makedirs(directory, exist_ok=True)
        for name, data in self.saved_files().items():
            write_atomically(os.path.join(directory, name), data)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """The tokenizer save() wrote into `directory`, or GPT-2's own vocab.json and
        merges.txt: saved_files() read back and checked by read_tokenizer_files (§8)."""
        return cls(**read_tokenizer_files(directory))


def end_of_text_id(tokenizer: Tokenizer) -> int | None:
    """The id of the first special token, which `sample` (and training data) use to end a story
    and to start a fresh one; None without special tokens."""
    return tokenizer.special_ids[tokenizer.special_tokens[0]] if tokenizer.special_tokens else None


# ==================================================================================================
# §2 Data: token files and batches
#
# A tokenized corpus is one long array of ids on disk, read through a memory map so it may be
# larger than memory. A training example is a window of context_length ids, and its targets
# are the same window shifted by one: every position learns to predict the next token.
# ==================================================================================================

def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id: half the disk and page cache of uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def batch_at(data: np.ndarray, starts: np.ndarray, context_length: int,
             device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `data` that begin at `starts`: inputs and next-token targets on `device`.

    Each window has context_length + 1 tokens: x = data[s : s+T], y = data[s+1 : s+T+1].
    Example: data = [5, 6, 7, 8], T = 2, starts = [1]  ->  x = [[6, 7]], y = [[7, 8]].
    `data` may be a np.memmap: fancy indexing reads only the pages the windows touch.
    """
    windows = data[starts[:, None] + np.arange(context_length + 1)]  # (B, T+1)
    windows = torch.from_numpy(windows.astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T) each
    return to_device(x, device), to_device(y, device)  # on CUDA, pinned memory (§12)


def get_batch(data: np.ndarray, batch_size: int, context_length: int, device: str | torch.device,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of a token array, every start in
    [0, len(data) - context_length - 1] equally likely; see batch_at."""
    num_starts = len(data) - context_length
    if num_starts < 1:
        raise ValueError(f"the data has {len(data):,} tokens, too few for one window of "
                         f"context_length {context_length} plus its next-token target")
    starts = torch.randint(0, num_starts, (batch_size,), generator=generator).numpy()
    return batch_at(data, starts, context_length, device)


# ==================================================================================================
# §3 Model: a pre-norm transformer language model
#
# Token ids -> embeddings -> N blocks of (RMSNorm -> causal self-attention with RoPE -> add,
# RMSNorm -> SwiGLU feed-forward -> add) -> RMSNorm -> a linear map to next-token logits.
# The architecture of GPT-2 (Radford et al. 2019) with LLaMA's updates: RMSNorm (Zhang &
# Sennrich 2019), rotary positions (Su et al. 2021), SwiGLU (Shazeer 2020), no biases. The
# modern model comes first; the variants of the classic ablations follow it, labelled.
# ==================================================================================================

@dataclass
class ModelConfig:
    """The architecture. Saved in every checkpoint, so sampling needs no architecture flags."""

    vocab_size: int        # V: token ids are 0 .. V-1 (the tokenizer's vocabulary size)
    context_length: int    # T: the longest sequence the model reads at once
    d_model: int           # C: width of the residual stream
    num_layers: int        # transformer blocks stacked on each other
    num_heads: int         # H: attention heads, each D wide (query heads, under GQA)
    d_ff: int              # hidden width of a gated feed-forward (non-gated kinds get 1.5x)
    rope_theta: float = 10000.0  # RoPE base: pair i turns by position * theta^(-2i/D)
    norm_eps: float = 1e-5       # added to the mean square in RMSNorm, so 0 never divides
    # Ideas of the models `import` reads (§16); the defaults give our own models.
    num_kv_heads: int | None = None  # KV: key/value heads, each shared by H / KV query heads
    #                                  (grouped-query attention); None: H, one each
    head_dim: int | None = None      # D; None: C / H. Qwen3 sets it apart (D * H != C)
    qk_norm: bool = False            # an RMSNorm over each head's query and key (Qwen3, OLMo 2)
    # Llama 3's RoPE scaling (llama3_frequencies; rope_factor 1: none): pairs turning fewer than
    # rope_low_freq times over rope_original_context positions turn rope_factor times slower,
    # those turning more than rope_high_freq times keep their speed, a blend in between.
    rope_factor: float = 1.0
    rope_low_freq: float = 1.0
    rope_high_freq: float = 4.0
    rope_original_context: int = 8192  # the context the model was first trained at
    # Switches for the classic ablations; the defaults give the modern model, and each variant
    # is explained where it is built, after TransformerLM (MODEL_CHOICES lists the values).
    tie_embeddings: bool = False  # share one matrix between token embeddings and output logits
    tie_init: str = "output"     # tied: keep lm_head's small init ("output") or the embedding's
    use_norm: bool = True        # False removes every RMSNorm
    norm_position: str = "pre"   # "pre": x + f(norm(x)) (modern); "post": norm(x + f(x)) (2017)
    position_encoding: str = "rope"  # rope | nope (none) | learned | sinusoidal (added vectors)
    ffn_kind: str = "swiglu"     # swiglu | geglu (gated) | silu | gelu | relu (plain MLP)
    # Regularization, off by default: the zeroed share of attention weights and of residual
    # branches (dropout, below). attention_dropout False: of the branches only, as dropping
    # attention weights needs the (T, T) matrix written out, which a fused kernel never does.
    dropout: float = 0.0
    attention_dropout: bool = True

    def __post_init__(self):
        check_model_config(self)  # refuses, naming it, what cannot be built (§11)
        self.num_kv_heads = self.num_kv_heads or self.num_heads  # computed once, then saved
        self.head_dim = self.head_dim or self.d_model // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        # A gated feed-forward has three C x d_ff matrices, a plain one two: 1.5x the hidden
        # width gives both the same parameter count (exactly when d_ff is even).
        return self.d_ff if self.ffn_kind in ("swiglu", "geglu") else 3 * self.d_ff // 2

    @property
    def absolute_positions(self) -> bool:
        """Position vectors added to the token's, one per position up to context_length."""
        return self.position_encoding in ("learned", "sinusoidal")


class Linear(nn.Module):
    """y = x W^T, without bias: Llama and most LMs since drop it at no loss (Qwen2 keeps one on
    the query, key and value projections)."""

    def __init__(self, d_in: int, d_out: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in, device=device, dtype=dtype))
        # std = sqrt(2 / (fan_in + fan_out)) (Glorot & Bengio 2010) keeps activations and
        # gradients at the same scale through the layer; the cut at 3 std stops rare outliers.
        std = math.sqrt(2 / (d_in + d_out))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T  # (..., d_in) @ (d_in, d_out) -> (..., d_out)


class Embedding(nn.Module):
    """A lookup table: token id i -> row i of a (num_embeddings, embedding_dim) matrix. Its
    fast twin, FastEmbedding (§12), runs in its place by default (§19)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        # N(0, 1) cut at +-3, as the CS336 assignment asks (nn.Embedding draws N(0, 1) with no
        # cut); the cut only keeps rare outliers out. The scale matters little to the blocks,
        # which read the residual stream through an RMSNorm; the stream itself keeps it.
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]  # (B, T) -> (B, T, C)


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain per channel.

    Unlike LayerNorm it neither subtracts the mean nor adds a bias: cheaper, and as good.
    Its fast twin, FastRMSNorm (§12), runs in its place by default (§19).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))  # g, (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 (or wider) even when the model runs in bf16 (autocast, §12): a mean of
        # squares loses too much in bf16's 7 stored mantissa bits. Then back to x's dtype.
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))          # (..., C)
        # rmsnorm(x) = x / sqrt(mean(x^2) + eps) * g
        r = torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)  # (..., 1)
        return (x32 * r * self.weight).to(x.dtype)                        # (..., C)


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq: float,
                       high_freq: float, original_context: int) -> torch.Tensor:
    """Llama 3's RoPE scaling (Meta 2024): RoPE's turning speeds inv_freq (D/2,), adapted so
    that a model trained on original_context positions reads `factor` times as many.

    Pair i turns once every 2 pi / inv_freq[i] positions, its wavelength. Slow pairs, turning
    fewer than low_freq times over the original context, never saw larger angles in training:
    they turn `factor` times slower, so a longer context stays within the angles they learned.
    Fast pairs, turning more than high_freq times, tell near positions apart: kept as they are.
    Between the two, a blend, linear in the number of turns.
    """
    turns = original_context * inv_freq / (2 * math.pi)  # (D/2,): turns over the old context
    # keep = 0: slowed by factor; 1: kept as it is
    keep = ((turns - low_freq) / (high_freq - low_freq)).clamp(0, 1)  # (D/2,)
    return (1 - keep) * inv_freq / factor + keep * inv_freq            # (D/2,)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE): encode a token's position by rotating its query and key.

    Dimensions are taken in adjacent pairs (0,1), (2,3), ...; pair i at position p turns by the
    angle p * theta^(-2i/D). A rotation keeps lengths, and the dot product of a query rotated by
    angle a and a key rotated by angle b depends only on a - b: attention scores see relative
    positions, not absolute ones. The cos and sin tables grow with the positions met (cover):
    an imported model's 131,072 positions would take 64 MB that a short prompt never reads.

    Adjacent pairs are the layout of the paper, of Meta's Llama code and of the CS336 assignment;
    Hugging Face's pairs i with i + D/2 ("rotate half"), the same rotations with the dimensions
    listed in another order: export and import reorder the query and key rows (§16).
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None,
                 scaling: tuple[float, float, float, int] | None = None):
        # d_k is the head width (ModelConfig.head_dim) and max_seq_len the positions to tabulate
        # at first: the names of the CS336 assignment's RoPE, kept for its tests. scaling:
        # llama3_frequencies' (above) factor, low_freq, high_freq, original_context, or None.
        super().__init__()
        inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device).float() / d_k)  # (D/2,)
        if scaling is not None:
            inv_freq = llama3_frequencies(inv_freq, *scaling)
        # Buffers follow the model to its device but are no parameters and are not saved:
        # they are a function of the config.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.cover(max_seq_len)

    def cover(self, num_positions: int) -> None:
        """Make the tables reach num_positions (generation can run past the context length)."""
        if hasattr(self, "cos") and len(self.cos) >= num_positions:
            return
        if hasattr(self, "cos"):
            num_positions = max(num_positions, 2 * len(self.cos))  # grow rarely
        positions = torch.arange(num_positions, device=self.inv_freq.device).float()
        angles = torch.outer(positions, self.inv_freq)  # (positions, D/2)
        # Each angle twice, once per member of its pair: (positions, D), the layout of x.
        angles = angles.repeat_interleave(2, dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)  # (positions, D)
        self.register_buffer("sin", angles.sin(), persistent=False)  # (positions, D)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (..., T, D) at `positions` (T,), rotated."""
        # A pair (x1, x2) turned by angle a is (x1 cos a - x2 sin a, x1 sin a + x2 cos a):
        # x * cos + swapped * sin, with swapped = (-x2, x1) for every pair.
        cos = self.cos[positions].to(x.dtype)  # (T, D); x's dtype, so bf16 stays bf16
        sin = self.sin[positions].to(x.dtype)  # (T, D)
        x1, x2 = x[..., 0::2], x[..., 1::2]                         # (..., T, D/2)
        swapped = torch.stack((-x2, x1), dim=-1).flatten(-2)        # (..., T, D)
        return x * cos + swapped * sin                              # (..., T, D)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each value with probability p and scale the others by 1 / (1 - p), so the expected
    value is unchanged (Srivastava et al. 2014): units cannot rely on each other, which fights
    memorising a small corpus. Off by default (p = 0); in evaluation and sampling, the identity."""
    if not training or p == 0:
        return x
    keep = torch.rand(x.shape, device=x.device) >= p  # (same shape as x) True with prob. 1 - p
    return x * keep / (1 - p)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """softmax(x)_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x)).

    Subtracting the max changes nothing mathematically and keeps exp() from overflowing:
    the largest term becomes exp(0) = 1. A row of all -inf (nothing to attend to) gives NaN.
    """
    exp = torch.exp(x - x.amax(dim=dim, keepdim=True))
    return exp / exp.sum(dim=dim, keepdim=True)


def scaled_dot_product_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                                 mask: torch.Tensor | None = None,
                                 dropout_p: float = 0.0) -> torch.Tensor:
    """The attention of the transformer: softmax(Q K^T / sqrt(D)) V, where `mask` is True where
    a query may attend to a key. The fast twin of the attention (§12) runs
    F.scaled_dot_product_attention, whose fused kernels compute the same without storing the
    (T, S) score matrix (tiled_attention shows how).
    """
    # Dividing by sqrt(D) keeps scores near unit variance, so softmax does not saturate.
    # (.., T, D) @ (.., D, S) -> (.., T, S)
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # exp(-inf) = 0: no weight at all
    weights = dropout(softmax(scores, dim=-1), dropout_p, training=dropout_p > 0)  # (.., T, S)
    return weights @ V  # (.., T, S) @ (.., S, D) -> (.., T, D)


def sliding_causal_mask(T: int, window: int, device=None,
                        num_keys: int | None = None) -> torch.Tensor:
    """(T, S) booleans for T queries that are the last T of S = num_keys positions (default T):
    query i, at position p = S - T + i, may attend to key j when p - window < j <= p.

    Example: T = 4, window = 2 -> rows [1 0 0 0], [1 1 0 0], [0 1 1 0], [0 0 1 1].
    Training never needs the window (T <= window); generation past the context length does.
    """
    S = T if num_keys is None else num_keys
    p = torch.arange(S - T, S, device=device)[:, None]  # (T, 1): the queries' positions
    j = torch.arange(S, device=device)[None, :]         # (1, S): the keys'
    return (j <= p) & (j > p - window)                  # (T, S)


class MultiHeadSelfAttention(nn.Module):
    """Causal self-attention: each position gathers information from itself and earlier ones.

    H heads attend independently, each in its own D-wide slice of the C-wide vectors, so one head
    can follow syntax while another follows a character's name. Given a context_length, a
    position sees at most that many tokens ending at itself: the span the model is trained on.

    Grouped-query attention (GQA, Ainslie et al. 2023), in the models `import` reads: KV < H
    key/value heads, each shared by a group of H / KV query heads, and the KV cache (§7) holds
    only those: SmolLM2-135M's 3 for 9 query heads cache 30 layers x (k, v) x 3 heads x 64 dims
    x 4 bytes = 46 KB a token in float32, not 138 KB (377 MB at 8,192 tokens, not 1.1 GB).
    Its fast twin, FastMultiHeadSelfAttention (§12), runs in its place by default (§19).
    """

    def __init__(self, d_model: int, num_heads: int, rope: RotaryEmbedding | None = None,
                 context_length: int | None = None, dropout_p: float = 0.0,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 qk_norm_eps: float | None = None):
        super().__init__()
        self.num_heads, self.context_length = num_heads, context_length
        self.num_kv_heads = KV = num_kv_heads or num_heads
        self.head_dim = D = head_dim or d_model // num_heads
        self.dropout_p = dropout_p  # of the attention weights, while training
        self.q_proj = Linear(d_model, num_heads * D)
        self.k_proj = Linear(d_model, KV * D)
        self.v_proj = Linear(d_model, KV * D)
        self.output_proj = Linear(num_heads * D, d_model)
        self.rope = rope
        # qk-norm (Dehghani et al. 2023; Qwen3, OLMo 2), with qk_norm_eps: an RMSNorm over each
        # head's query and key. A score q.k / sqrt(D) is then bounded by the learned gains, not
        # by how large the projections grow: unbounded scores saturate the softmax into one-hot
        # rows whose gradients vanish, a cause of loss spikes (Wortsman et al. 2023).
        self.q_norm = RMSNorm(D, qk_norm_eps) if qk_norm_eps else None
        self.k_norm = RMSNorm(D, qk_norm_eps) if qk_norm_eps else None

    def forward(self, x: torch.Tensor, start_pos: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C) holds positions start_pos .. start_pos + T - 1; cache: when generating,
        this layer's KVCache (§7), which keeps the keys and values of the tokens before."""
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, start_pos)  # (B, H, T, D); k, v (B, KV, T, D)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, KV, S, D): the prompt's own, then every cached one
        # A query sees its own position and the context_length - 1 before it (with no
        # context_length, every earlier one): the span the model was trained on.
        y = self.attend(q, k, v, self.context_length or k.shape[-2])  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, -1)  # heads side by side again: (B, T, H*D)
        return self.output_proj(y)               # (B, T, C)

    def queries_keys_values(self, x: torch.Tensor,
                            start_pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The heads' queries (B, H, T, D), keys and values (B, KV, T, D) for x (B, T, C), head h
        being slice h of a projection; queries and keys normed (qk-norm) and rotated."""
        B, T, C = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)   # (B, T, H*D) -> (B, H, T, D)
        k = self.k_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)  # (B, KV, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # each head's D dims, as RMSNorm norms C
        if self.rope is not None:
            # Queries and keys turn by their positions; values carry content only.
            self.rope.cover(start_pos + T)
            positions = torch.arange(start_pos, start_pos + T, device=x.device)  # (T,)
            q, k = self.rope(q, positions), self.rope(k, positions)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int) -> torch.Tensor:
        """q (B, H, T, D), the last T of the S positions of k and v (B, KV, S, D): each query
        takes from the keys at its own position and the window - 1 before it. -> (B, H, T, D)"""
        T, S = q.shape[-2], k.shape[-2]
        # GQA: key/value head j serves query heads j*g .. j*g + g - 1, g = H / KV, so each is
        # repeated g times to line up with its queries (g = 1: every head has its own).
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, H, S, D)
        # (T, S); from a KVCache, T = 1 and S <= window: all True (KVCache says why that holds)
        mask = sliding_causal_mask(T, window, q.device, num_keys=S)
        p = self.dropout_p if self.training else 0.0
        return scaled_dot_product_attention(q, k, v, mask, p)         # (B, H, T, D)


def silu(x: torch.Tensor) -> torch.Tensor:
    """silu(x) = x * sigmoid(x): smooth, and unlike ReLU it lets a little negative signal through.

    F.silu computes exactly this in one fused kernel, which saves a full activation's memory in
    the backward pass; a test checks it against x * sigmoid(x).
    """
    return F.silu(x)


class SwiGLU(nn.Module):
    """The gated feed-forward: w2(silu(w1 x) * w3 x).

    silu(w1 x) is the gate (Hugging Face's gate_proj is w1, its up_proj w3): it scales each
    hidden unit of w3 x. With three matrices, d_ff = 8/3 C matches the parameters of a plain
    4C-wide MLP, and works better (Shazeer 2020). Its fast twin, FastSwiGLU (§12), runs in its
    place by default (§19).
    """

    def __init__(self, d_model: int, d_ff: int, activation=silu):
        super().__init__()
        self.w1 = Linear(d_model, d_ff)
        self.w2 = Linear(d_ff, d_model)
        self.w3 = Linear(d_model, d_ff)
        self.activation = activation  # silu; GeGLU, an ablation, passes gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T, F) twice, gated, -> (B, T, C)
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


def norm_layer(config: ModelConfig) -> nn.Module:
    """RMSNorm, or a no-op for the no-normalisation ablation (use_norm False)."""
    return RMSNorm(config.d_model, config.norm_eps) if config.use_norm else nn.Identity()


def feed_forward(config: ModelConfig) -> nn.Module:
    """SwiGLU, or the feed-forward of the ablation that ffn_kind names: GeGLU (gated), or a
    plain MLP of silu, gelu or relu (MLP, gelu and relu are with the variants, below)."""
    activation = {"geglu": gelu, "gelu": gelu, "relu": relu}.get(config.ffn_kind, silu)
    if config.ffn_kind in ("swiglu", "geglu"):
        return SwiGLU(config.d_model, config.ffn_hidden, activation)
    return MLP(config.d_model, config.ffn_hidden, activation)


class TransformerBlock(nn.Module):
    """Attention then feed-forward, each added to the residual stream x: x = x + f(norm(x)).

    Pre-norm (GPT-2 onwards) normalises each sublayer's input and leaves the residual path
    untouched, so gradients flow straight from the loss to every layer.
    """

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding | None = None):
        super().__init__()
        self.ln1 = norm_layer(config)
        self.attn = MultiHeadSelfAttention(config.d_model, config.num_heads, rope,
                                           config.context_length,
                                           config.dropout if config.attention_dropout else 0.0,
                                           config.num_kv_heads, config.head_dim,
                                           config.norm_eps if config.qk_norm else None)
        self.ln2 = norm_layer(config)
        self.ffn = feed_forward(config)
        self.dropout_p = config.dropout  # of each branch's output, before it joins the residual

    def forward(self, x: torch.Tensor, start_pos: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C) at positions start_pos ..; cache: this layer's KVCache (§7) or None."""
        p, training = self.dropout_p, self.training  # dropout: the identity at p = 0
        x = x + dropout(self.attn(self.ln1(x), start_pos, cache), p, training)  # (B, T, C)
        return x + dropout(self.ffn(self.ln2(x)), p, training)                 # (B, T, C)


class TransformerLM(nn.Module):
    """Token ids (B, T) -> next-token logits (B, T, V); position t sees tokens 0..t only."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.token_embeddings = Embedding(config.vocab_size, config.d_model)
        # One RoPE table shared by every layer: it depends only on the config, and grows with
        # the positions met (from 0 here).
        scaling = (config.rope_factor, config.rope_low_freq, config.rope_high_freq,
                   config.rope_original_context) if config.rope_factor != 1 else None
        self.rope = (RotaryEmbedding(config.rope_theta, config.head_dim, 0, scaling=scaling)
                     if config.position_encoding == "rope" else None)
        # Position vectors (None here), the post-norm block, no norms and tying are variants for
        # the ablations (after the model), each built where the modern part would be.
        self.positions = (AbsolutePositions(config.context_length, config.d_model,
                                            config.position_encoding == "learned")
                          if config.absolute_positions else None)
        block = PostNormBlock if config.norm_position == "post" else TransformerBlock
        self.layers = nn.ModuleList(block(config, self.rope) for _ in range(config.num_layers))
        self.ln_final = norm_layer(config)
        self.lm_head = Linear(config.d_model, config.vocab_size)
        if config.tie_embeddings:
            tie_weights(self, config.tie_init)

    def forward(self, token_ids: torch.Tensor, start_pos: int = 0,
                caches: list[KVCache] | None = None) -> torch.Tensor:
        """token_ids (B, T) at positions start_pos, start_pos + 1, ... -> logits (B, T, V).

        caches: one KVCache per layer, for generation (§7)."""
        x = self.token_embeddings(token_ids)  # (B, T) -> (B, T, C)
        if self.positions is not None:
            x = x + self.positions(start_pos, token_ids.shape[1])  # (B, T, C) + (T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, start_pos, caches[i] if caches else None)  # (B, T, C)
        return self.lm_head(self.ln_final(x))  # (B, T, C) -> (B, T, V)


# --- Variants for the classic ablations -----------------------------------------------------------
# Each is switched on by a field of ModelConfig and the model above is built by default. NoPE
# (position_encoding "nope", Kazemnejad et al. 2023) needs no code: no RoPE, and nothing added
# to the embeddings.

# The values of ModelConfig's string switches (the command line offers the same choices).
MODEL_CHOICES = {"norm_position": ("pre", "post"),
                 "position_encoding": ("rope", "nope", "learned", "sinusoidal"),
                 "ffn_kind": ("swiglu", "geglu", "silu", "gelu", "relu"),
                 "tie_init": ("output", "embedding")}


def tie_weights(model: TransformerLM, init: str) -> None:
    """One matrix reads tokens in and scores them out (GPT-2; Press & Wolf 2017). init "output"
    keeps lm_head's small init: the embedding's std of 1 would start the logits sqrt(C) times
    too large, which is the ablation init "embedding" shows."""
    if init == "output":
        model.token_embeddings.weight = model.lm_head.weight
    else:
        model.lm_head.weight = model.token_embeddings.weight


class PostNormBlock(TransformerBlock):
    """The original transformer's block (Vaswani et al. 2017): x = norm(x + f(x)).

    Normalising after each addition puts a norm on the residual path itself, so gradients pass
    through every norm on their way down; it needs a careful warmup to train (Xiong et al. 2020).
    """

    def forward(self, x: torch.Tensor, start_pos: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        p, training = self.dropout_p, self.training
        x = self.ln1(x + dropout(self.attn(x, start_pos, cache), p, training))  # (B, T, C)
        return self.ln2(x + dropout(self.ffn(x), p, training))                 # (B, T, C)


def sinusoidal_positions(num_positions: int, d_model: int) -> torch.Tensor:
    """The fixed position vectors of the original transformer (Vaswani et al. 2017):
        pe[p, 2i] = sin(p / 10000^(2i/C)),   pe[p, 2i+1] = cos(p / 10000^(2i/C))
    Each pair of channels is a clock of its own speed; nearby positions get similar vectors.
    Example: pe[0] = [0, 1, 0, 1, ...]."""
    positions = torch.arange(num_positions).float()[:, None]                    # (T, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2).float() / d_model)      # (C/2,)
    angles = positions * inv_freq                                               # (T, C/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[:, :d_model]  # (T, C)


class AbsolutePositions(nn.Module):
    """One vector per position 0 .. context_length - 1, added to the token embeddings: learned
    (GPT-2, initialised N(0, 0.01) as there) or the fixed sinusoids. Unlike RoPE, they say where
    a token is, not how far apart two are, and there is no vector past the last position."""

    def __init__(self, context_length: int, d_model: int, learned: bool):
        super().__init__()
        if learned:
            self.weight = nn.Parameter(torch.empty(context_length, d_model))  # (T, C)
            nn.init.trunc_normal_(self.weight, mean=0.0, std=0.01, a=-0.03, b=0.03)
        else:  # a function of the config: a buffer, not saved
            self.register_buffer("weight", sinusoidal_positions(context_length, d_model),
                                 persistent=False)

    def forward(self, start_pos: int, T: int) -> torch.Tensor:
        if start_pos + T > len(self.weight):
            raise ValueError(f"position {start_pos + T - 1} is past the last of the "
                             f"{len(self.weight)} absolute position vectors (context_length)")
        return self.weight[start_pos:start_pos + T]  # (T, C)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """gelu(x) = x * Phi(x), Phi the standard normal CDF (GPT-2's activation), fused like silu."""
    return F.gelu(x)


def relu(x: torch.Tensor) -> torch.Tensor:
    """relu(x) = max(x, 0): the original transformer's activation (Vaswani et al. 2017)."""
    return x.clamp_min(0)


class MLP(nn.Module):
    """The plain feed-forward of the ablations: w2(act(w1 x)), no gate."""

    def __init__(self, d_model: int, d_hidden: int, activation=silu):
        super().__init__()
        self.w1 = Linear(d_model, d_hidden)
        self.w2 = Linear(d_hidden, d_model)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)))  # (B, T, C) -> (B, T, F) -> (B, T, C)


# ==================================================================================================
# §4 Loss and optimizer
#
# Cross-entropy scores the logits against the true next tokens; AdamW (Loshchilov & Hutter
# 2019) turns gradients into updates with per-parameter step sizes and decoupled weight decay.
# Both are written here as their formulas; training runs their fast twins (§19) unless told
# --readable. Muon (Jordan et al. 2024) orthogonalizes a matrix's momentum, so that every
# direction moves by the same step.
# ==================================================================================================

def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean over positions of -log softmax(z)[y], for logits z (..., V) and targets y (...).

    -log softmax(z)[y] = -log(exp(z_y) / sum_j exp(z_j)) = logsumexp(z) - z_y, and
    logsumexp(z) = m + log(sum_j exp(z_j - m)) with m = max(z), so exp never overflows.
    A model that guesses uniformly scores ln(V) (9.21 for V = 10,000); lower is better. Its
    fast twin, fast_cross_entropy (§19), runs in its place by default (§19).
    """
    logits = logits.float()  # in float32: bf16 would round the loss to 2-3 significant digits
    m = logits.amax(-1, keepdim=True)                                # (..., 1)
    lse = m + torch.exp(logits - m).sum(-1, keepdim=True).log()      # (..., 1)
    return (lse - logits.gather(-1, targets[..., None])).mean()


# The target of a position that is not scored. Fine-tuning (`finetune`) scores an answer but
# not its question. -100 is PyTorch's own ignore_index: F.cross_entropy is the reference.
IGNORE_INDEX = -100


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy over the positions whose target is not IGNORE_INDEX, for logits (..., V)
    and targets (...): the mean of those alone, and no gradient at all for the others. At
    least one position must be scored (the mean of none is NaN)."""
    keep = targets.reshape(-1) != IGNORE_INDEX                          # (N,)
    scored = logits.reshape(-1, logits.shape[-1])[keep]                 # (K, V), K kept
    return cross_entropy(scored, targets.reshape(-1)[keep])


@torch.no_grad()
def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step (Loshchilov & Hutter 2019) of one parameter p, in place, as written:
    g its gradient, m and v its running moments, t the step number (from 1)."""
    beta1, beta2 = betas
    p.mul_(1 - lr * weight_decay)               # p = p - lr * weight_decay * p: decoupled decay
    m.mul_(beta1).add_((1 - beta1) * g)         # m = beta1 * m + (1 - beta1) * g
    v.mul_(beta2).add_((1 - beta2) * g * g)     # v = beta2 * v + (1 - beta2) * g^2
    # Undo the bias of m and v toward their zero start: m_hat = m / (1 - beta1^t), likewise v.
    m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
    p.sub_(lr * m_hat / (v_hat.sqrt() + eps))   # p = p - lr * m_hat / (sqrt(v_hat) + eps)


def closure_loss(closure) -> torch.Tensor | None:
    """PyTorch's optimizer convention: step(closure) first recomputes the loss, with gradients
    on (step itself runs under no_grad); None without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class AdamW(torch.optim.Optimizer):
    """adamw_update (above, its formulas line by line) for every parameter that has a gradient,
    one after the other. torch.optim.Optimizer holds the parameter groups (each may set its own
    lr, betas, eps, weight_decay) and each parameter's state, and saves both in state_dict().
    Its fast twin, FastAdamW (§19), runs in its place by default (§19).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        if not lr >= 0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"eps ({eps}) and weight_decay ({weight_decay}) must be >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter once; closure (PyTorch's convention) recomputes the loss."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:  # no gradient this step: neither moved nor decayed
                    continue
                state = self.state[p]
                if not state:  # the first step: both moments start at zero
                    state.update(step=0, exp_avg=torch.zeros_like(p),
                                 exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"],
                             group["lr"], group["betas"], group["eps"], group["weight_decay"])
        return loss


def adamw_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay for the matrices, none for the 1-D parameters
    (the norms' gains).

    Decay pulls weights toward zero, which keeps the matrices (nearly all the parameters) from
    growing to memorise the training text. A gain only sets the scale of its norm's output, one
    number per channel: pulling it toward zero would shrink what the norm just normalised, for
    no protection against memorising. (nanoGPT draws the same line.)
    """
    params = list(params)
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# Muon's quintic, from Keller Jordan's 2024 Muon write-up: the coefficients that make the slope at
# 0 as steep as possible (a = 3.4445: a small singular value grows 3.4x a step) while 5 steps
# still leave every singular value from about 2e-3 to 1 in a band around 1 (about 0.7 to 1.2)
# rather than exactly on it, which trains as well as exactly orthogonal updates do. Smaller
# ones fall short (1e-3 ends near 0.5): directions the gradient hardly holds stay small.
MUON_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5,
                  coefficients: tuple[float, float, float] = MUON_COEFFICIENTS, eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """About U V^T for the SVD G = U S V^T, without an SVD: every singular value of G (m, n)
    pushed toward 1, its singular vectors kept. Returns (m, n), in `dtype`.

    Since X X^T = U S^2 U^T, the step X <- a X + b (X X^T) X + c (X X^T)^2 X maps each singular
    value s to a s + b s^3 + c s^5, on all of them at once: small ones grow about a-fold, large
    ones are pulled back. bf16 is the precision of Jordan's and torch's Muon: the iteration
    forgives its rounding, as it only has to land near 1. torch.addmm(C, P, Q, beta=x, alpha=y)
    is x C + y P Q in one pass, rounded once: as torch.optim.Muon computes it, bit for bit.
    """
    a, b, c = coefficients
    X = G.to(dtype)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.mT  # (n, m): X X^T is then the smaller of the two square products
    # The Frobenius norm is at least the largest singular value: they all start in [0, 1].
    X = X / X.norm().clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT                                # (m, n) @ (n, m) -> (m, m)
        B = torch.addmm(A, A, A, beta=b, alpha=c)   # B = b A + c A^2
        X = torch.addmm(X, B, X, beta=a)            # X = a X + B X: (m, m) @ (m, n) -> (m, n)
    return X.mT if tall else X


def muon_lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """How much Muon scales its learning rate for a matrix of `shape` (A out, B in).

    An orthogonal (A, B) update has entries of RMS 1 / sqrt(max(A, B)).
    "original" (Jordan, also for None): sqrt(max(1, A / B)), so a tall matrix's update (a narrow
    input read into a wide output) has the RMS of a square one's, 1 / sqrt(B).
    "match_rms_adamw" (Liu et al. 2025, Moonlight): 0.2 * sqrt(max(A, B)), an RMS of 0.2, about
    that of AdamW's updates, so that AdamW's learning rate and weight decay carry over.
    """
    A, B = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return math.sqrt(max(1.0, A / B))


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): momentum whose update is orthogonalized, for the 2-D weight
    matrices of the hidden layers. A gradient matrix is dominated by a few directions; giving
    each direction the same step lets the rare ones learn too. It takes torch.optim.Muon's
    arguments, and ns_dtype, the dtype of the Newton-Schulz iteration. The default run (laptop)
    trains the blocks' matrices with it and the rest with AdamW: why, just below the class.

    For each matrix W (A, B) with gradient G, momentum mu, at learning rate lr:
        M = mu * M + (1 - mu) * G             running mean of gradients
        U = (1 - mu) * G + mu * M             Nesterov: G pushed on by the momentum (else M)
        O = newton_schulz(U)                  U's directions, every singular value near 1
        W = W - lr * weight_decay * W         decay the weight, independent of G
        W = W - lr * muon_lr_scale(A, B) * O
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = MUON_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 ns_dtype: torch.dtype = torch.bfloat16):
        if not lr >= 0 or not weight_decay >= 0:
            raise ValueError(f"lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got "
                             f"{adjust_lr_fn!r}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_coefficients=tuple(ns_coefficients),
                                      eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
        self.ns_dtype = ns_dtype
        for p in (p for group in self.param_groups for p in group["params"]):
            if p.ndim != 2:
                raise ValueError(f"Muon updates matrices; a parameter of shape "
                                 f"{tuple(p.shape)} needs another optimizer, such as AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in (p for p in group["params"] if p.grad is not None):
                G, state = p.grad, self.state[p]
                if not state:  # the first step: the momentum starts at zero
                    state["momentum_buffer"] = torch.zeros_like(p)
                M = state["momentum_buffer"]
                M.lerp_(G, 1 - mu)                             # M = mu M + (1 - mu) G
                U = G.lerp(M, mu) if group["nesterov"] else M  # U = (1 - mu) G + mu M
                # O: U orthogonalized, (A, B) like W
                O = newton_schulz(U, group["ns_steps"], group["ns_coefficients"], group["eps"],
                                  self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])         # W = W - lr weight_decay W
                # W = W - lr * muon_lr_scale(A, B) * O: the step, sized for W's shape
                p.add_(O, alpha=-lr * muon_lr_scale(p.shape, group["adjust_lr_fn"]))
        return loss


# How the default run splits the parameters between Muon and AdamW (make_optimizer, §14, builds
# the two). Muon takes the weight matrices inside the blocks, which map one hidden space to
# another: the matrices it is for. AdamW keeps the token embeddings, a lookup table whose rows
# each see only the gradients of their own token; the output layer, whose rows each score one
# token; and the norms' gains, which are vectors (Jordan 2024 draws the same line). Muon peaks
# at its own learning rate (muon_lr, 0.02 against AdamW's 3e-3 for laptop): set_lr (§5) moves
# both along one schedule, Muon's group scaled by its "lr_scale" = muon_lr / lr. Decoupled decay
# shrinks W by lr * weight_decay a step, so Muon's weight decay is weight_decay * lr / muon_lr:
# at the larger rate, the same shrink as AdamW's.


# ==================================================================================================
# §5 Learning-rate schedule and gradient clipping
#
# A linear warmup, then a cosine decay to a minimum (Loshchilov & Hutter 2017); and clipping
# the gradient's global norm, so one bad batch cannot throw the weights far.
# ==================================================================================================

def lr_cosine_schedule(it: int, max_lr: float, min_lr: float, warmup_iters: int,
                       cosine_cycle_iters: int) -> float:
    """The learning rate at step `it` (the training's `step`); the cosine ends at step
    cosine_cycle_iters (--decay-steps, by default the last step). The names are those of the
    Stanford CS336 assignment, so a student's tests run against this function.

    Example: max_lr 1, min_lr 0.1, warmup 10, cycle 110: it 0 -> 0, 5 -> 0.5, 10 -> 1,
    60 -> 0.55 (halfway down the cosine), 110 -> 0.1, 200 -> 0.1.
    So the first step (it 0) trains at learning rate 0: it moves no weight, but AdamW's moments
    take in its gradient, and later steps' updates start from it.
    """
    if it < warmup_iters:
        return max_lr * it / warmup_iters
    if it >= cosine_cycle_iters:  # also a cosine of no length: warmup straight into min_lr
        return min_lr
    # lr = min + (max - min) * (1 + cos(pi * progress)) / 2, progress from 0 to 1
    progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of the next step. An optimizer reads "lr" from each parameter
    group at every step(), so the schedule needs no hook into it: before each step the run
    (§14) writes lr_cosine_schedule(step) there. A group with an "lr_scale" follows the same
    schedule from its own peak, lr_scale times higher: Muon's, at muon_lr / lr (§4)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale all gradients together so that their global L2 norm is at most max_norm.

    Returns the norm before clipping (worth logging: spikes warn of instability). One factor
    for all keeps the gradient's direction, and so SGD's update; AdamW and Muon, which set
    their step's size themselves, instead give a clipped batch less weight in their averages.
    Its fast twin, fast_clip_grad_norm (§19), runs in its place by default (§19).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # ||g|| = sqrt(sum over tensors of ||g_i||^2): the norm of all gradients as one long vector
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    # min(1, max_norm / (norm + eps)), as a tensor: no sync with the GPU to decide whether to clip
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale)
    return norm


# ==================================================================================================
# §6 Training: recipes, the step and evaluation
#
# A training step draws a batch, runs the model, scores it, backpropagates, clips and updates.
# The run around it (§14) repeats it: each step's learning rate first (lr_cosine_schedule, set
# with set_lr), then every so often an evaluation on fixed held-out windows and a checkpoint.
# The presets say which model and recipe it trains.
# ==================================================================================================

# Named configurations, each a model and the batch size (in sequences) and peak learning rate
# it trains with; every value has its own flag. Why these values (data/results.md has the runs):
# - laptop (the default): batch 8 and lr 3e-3 gave the lowest validation loss in a fixed time
#   on a 2-core CPU. Weight decay 0.3: a step reads 8 x 256 = 2,048 tokens, so ~700 steps are
#   a pass over the bundled 1.44M, and a run of a few thousand steps reads each token several
#   times; stronger decay holds back memorising them. beta2 0.99, as batches of 8 give noisy
#   gradients, whose squares AdamW then averages over about 100 steps instead of 20.
#   d_ff 688 is 8/3 x 256 (SwiGLU's width for the parameters of a 4x MLP), rounded up to 16.
# - base: the 23M TinyStories model of Stanford CS336's assignment 1 (d_ff 1344 = 8/3 x 512,
#   rounded to 64), lr 1e-3 from that course's sweeps; batch 128 in the GPU recipe (§12).
# - small, medium, large: GPT-2's widths and depths (Radford et al. 2019), with the GPT-3
#   paper's peak learning rates for those sizes (Table 2.1). Not tuned here.
# - all but laptop: weight decay 0.1 and beta2 0.95, GPT-3's and LLaMA's (Brown et al. 2020).
# - optimizer: AdamW where a preset names none; "muon" trains the blocks' matrices with Muon
#   (§4) at the preset's muon_lr, else at MUON_LR. laptop: Muon, as in 10-minute runs it ended
#   a little lower than AdamW with both seeds (2.309 against 2.314, 2.291 against 2.323), in
#   fewer, slower steps.
PRESETS = {
    "laptop": dict(context_length=256, d_model=256, num_layers=4, num_heads=8, d_ff=688,
                   batch_size=8, lr=3e-3, weight_decay=0.3, beta2=0.99, optimizer="muon",
                   muon_lr=0.02),
    "base": dict(context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
                 batch_size=32, lr=1e-3, weight_decay=0.1, beta2=0.95),
    "small": dict(context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
                  batch_size=16, lr=6e-4, weight_decay=0.1, beta2=0.95),
    "medium": dict(context_length=1024, d_model=1024, num_layers=24, num_heads=16, d_ff=4096,
                   batch_size=16, lr=3e-4, weight_decay=0.1, beta2=0.95),
    "large": dict(context_length=1024, d_model=1280, num_layers=36, num_heads=20, d_ff=5120,
                  batch_size=16, lr=2.5e-4, weight_decay=0.1, beta2=0.95),
}


# Muon's peak learning rate where a preset names none: Jordan's 0.02 for GPT-2 small in the
# NanoGPT speedrun. Its updates have a set spectral norm at any width, so one rate goes further
# across sizes than AdamW's does.
MUON_LR = 0.02


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, next_batch, grad_accum: int,
               grad_clip: float, amp: torch.dtype | None = None,
               loss_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: forward, loss and backward for each of `grad_accum` micro-batches
    (drawn by next_batch()), then clip and update. The loss is cross_entropy unless loss_fn
    says otherwise (fine-tuning's). Returns the mean loss and the gradient norm before
    clipping, as tensors on the device: reading one would make the CPU wait for the GPU."""
    loss_fn = loss_fn or cross_entropy
    loss_sum = 0.0
    for micro in range(grad_accum):
        x, y = next_batch()  # (B, T) each
        # Under torchrun, gradients are exchanged once, after the last micro-batch (§12).
        with gradients_held(model, last=micro == grad_accum - 1):
            with autocast(x.device, amp):  # bf16 matmuls where amp says so (§12)
                logits = model(x)  # (B, T, V)
            # Each micro-batch adds mean_loss / accum: the gradients sum to those of the mean
            # loss over the whole accum x B batch.
            loss = loss_fn(logits, y) / grad_accum
            loss.backward()
        loss_sum = loss_sum + loss.detach()
    grad_norm = clip_grad_norm(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def evaluation_starts(num_tokens: int, context_length: int, count: int) -> np.ndarray:
    """Where the validation windows begin: `count` starts spread evenly over a file of
    num_tokens tokens (fewer if it is short). The same windows at every evaluation, so that
    two evaluations differ only by the model; random ones would add their own noise.
    Example: 10 tokens, context_length 2, count 3 -> [0, 3, 7] (the last ends at token 9).
    """
    last = num_tokens - context_length - 1  # the last start that leaves room for a target
    return np.linspace(0, last, min(count, last + 1)).astype(np.int64)


@torch.no_grad()
def evaluate(model: nn.Module, data: np.ndarray, starts: np.ndarray, batch_size: int,
             context_length: int, device: torch.device, amp: torch.dtype | None) -> float:
    """The mean loss over the windows of `data` at `starts` (evaluation_starts): held-out text
    the model never trains on, so it measures what generalises rather than what is memorised."""
    model.eval()  # no dropout
    total = torch.zeros((), device=device)
    for i in range(0, len(starts), batch_size):
        x, y = batch_at(data, starts[i:i + batch_size], context_length, device)  # (b, T) each
        with autocast(device, amp):  # as train_step
            logits = model(x)  # (b, T, V)
        total += cross_entropy(logits, y) * len(x)  # the batch's mean, weighted by its rows
    model.train()
    return total.item() / len(starts)


# ==================================================================================================
# §7 Sampling: from a prompt to a story, one token at a time
#
# Run the model on the prompt, turn the last position's logits into probabilities, filter
# them (temperature, top-k, top-p: Holtzman et al. 2020), draw a token, append, repeat. A KV
# cache, whose one home is here (KVCache), keeps each layer's keys and values so each new token
# costs one position, not all. The last idea: what follows makes the ideas fast, safe, usable.
# ==================================================================================================

def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Apply, in this order, temperature, top-k and top-p to next-token logits (B, V).

    Removed tokens get -inf, so softmax gives them probability 0. temperature must be > 0
    (0, greedy decoding, is handled by the caller). Its fast twin, fast_filter_logits (§19),
    runs in its place by default (§19).
    Example: probabilities [0.5, 0.3, 0.15, 0.05] with top_p 0.7 keep the first two: 0.5 alone
    is short of 0.7, 0.5 + 0.3 reaches it.
    """
    logits = logits / temperature  # (B, V); < 1 sharpens, > 1 flattens
    if top_k is not None and top_k < logits.shape[-1]:
        top = logits.topk(top_k, dim=-1)  # exactly k survivors, even among equal logits
        logits = torch.full_like(logits, -math.inf).scatter(-1, top.indices, top.values)
    if top_p is not None and top_p < 1:
        probs = softmax(logits, dim=-1)                       # (B, V)
        top, order = probs.sort(dim=-1, descending=True)      # (B, V) each, likeliest first
        # Drop a token when the tokens before it already reach p; the first one always stays.
        mass_before = top.cumsum(dim=-1) - top                # (B, V)
        kept = logits.gather(-1, order).masked_fill(mass_before >= top_p, -math.inf)  # (B, V)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, kept)  # original order
    return logits


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row of probs (B, V): (B,) ids.

    Inverse-CDF sampling: draw u uniformly in [0, total), take the first token whose cumulative
    probability exceeds u. The same distribution as torch.multinomial, without its per-token
    random number for every one of the V tokens.
    Example: probs [0.2, 0.5, 0.3], cumulative [0.2, 0.7, 1.0]; u = 0.45 picks token 1.
    """
    cumulative = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(len(probs), 1, generator=generator, device=probs.device)  # (B, 1)
    u = u * cumulative[:, -1:]  # uniform in [0, total), total = 1 up to rounding
    ids = torch.searchsorted(cumulative, u, right=True)[:, 0]  # (B,)
    return ids.clamp(max=probs.shape[-1] - 1)  # u below the total by rounding only


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
               top_p: float | None, generator: torch.Generator) -> torch.Tensor:
    """One token (B,) for each row of next-token logits (B, V): at temperature 0 the likeliest
    (greedy); else one drawn after the filters, in this order: temperature, top-k, top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = filter_logits(logits.float(), temperature, top_k, top_p)  # (B, V)
    return sample_from(softmax(logits, dim=-1), generator)             # (B,)


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """The random numbers of one generation: from `seed`, or from a fresh random seed (None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class KVCache:
    """One layer's keys and values of the tokens seen so far, so that each new token costs the
    model one position, not all. The layer's attention (§3) takes it as `cache`; it holds the
    KV key/value heads, fewer than the query heads under GQA.

    Holds `capacity` positions: a generation's prompt and new tokens, at most a context length
    (so a model of 8,192 positions reserves what one story needs, not 8,192). Past the context
    length, a ring: token p goes to slot p % capacity, overwriting the token that has just left
    the window. The ring never needs shifting because the keys are stored after RoPE has rotated
    them (§3): each carries its own position, and a score q . k depends on the two positions,
    not on the slot. And the attention's mask is right over slots in any order: after the
    prompt, one token comes at a time (T = 1), and the S <= capacity <= window keys cached are
    all its past or itself, so sliding_causal_mask(1, window, num_keys=S) is all True.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k = self.v = None  # (B, KV, capacity, D) once the first tokens arrive
        self.length = 0         # tokens seen so far

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values (B, KV, T, D); return those their queries
        attend to: on the first call the prompt's own, all T of them (a long prompt's early
        queries need keys the ring will not keep); after it, every cached one."""
        prompt, n = self.length == 0, k.shape[2]
        if prompt:
            B, KV, _, D = k.shape
            self.k = k.new_zeros(B, KV, self.capacity, D)  # (B, KV, capacity, D)
            self.v = v.new_zeros(B, KV, self.capacity, D)
        assert prompt or n == 1, "after the prompt, feed one token at a time"
        keep = min(n, self.capacity)  # of a long prompt, only the last window stays
        slots = torch.arange(self.length + n - keep, self.length + n, device=k.device)
        self.k[:, :, slots % self.capacity] = k[:, :, n - keep:]  # (B, KV, keep, D)
        self.v[:, :, slots % self.capacity] = v[:, :, n - keep:]
        self.length += n
        if prompt:
            return k, v
        filled = min(self.length, self.capacity)
        return self.k[:, :, :filled], self.v[:, :, :filled]  # (B, KV, S, D)


def last_logits(model: TransformerLM, tokens: torch.Tensor,
                caches: list[KVCache] | None = None) -> torch.Tensor:
    """The logits (B, V) of the token after tokens (B, T). A model with position vectors (a
    variant, §3) has none past context_length: it reads the last window, its first token at
    position 0 again (as GPT-2 does)."""
    if model.config.absolute_positions:
        tokens = tokens[:, -model.config.context_length:]
    return model(tokens, caches=caches)[:, -1]


@torch.no_grad()
def generate_batch(model: TransformerLM, prompts: torch.Tensor, max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, seed: int | None = None,
                   use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Continue each row of `prompts` (B, T0); yield the next tokens (B,) step by step.

    With use_cache, the prompt is run once and each step then feeds only the newest token,
    whose query attends to the cached keys and values. Without, each step runs the model over
    the whole sequence again: the readable reference, slow but obviously right. Both see the
    same thing: each token attends to itself and the context_length - 1 tokens before it.
    """
    # Refuse ids the model has no row for, filters out of range (§8).
    check_sampling_args(prompts, model.config.vocab_size, max_new_tokens, temperature, top_k,
                        top_p)
    model.eval()
    device = next(model.parameters()).device
    generator = seeded_generator(seed, device)
    tokens = prompts.to(device)  # (B, T)
    # Slots for every position this generation runs through, at most a window's. Position
    # vectors re-read the last window at every step (last_logits): no cache.
    capacity = min(model.config.context_length, tokens.shape[1] + max_new_tokens)
    use_cache = use_cache and not model.config.absolute_positions
    caches = [KVCache(capacity) for _ in model.layers] if use_cache else None
    logits, length = last_logits(model, tokens, caches), tokens.shape[1]  # (B, V)
    for _ in range(max_new_tokens):
        next_ids = next_token(logits, temperature, top_k, top_p, generator)  # (B,)
        yield next_ids
        if caches is not None:
            # Only the new token; start_pos gives it its absolute position for RoPE.
            logits = model(next_ids[:, None], start_pos=length, caches=caches)[:, -1]
        else:
            tokens = torch.cat((tokens, next_ids[:, None]), dim=1)  # (B, T+1)
            logits = last_logits(model, tokens)
        length += 1


def generate(model: TransformerLM, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None,
             use_cache: bool = True) -> Iterator[int]:
    """Yield up to max_new_tokens token ids that continue prompt_ids, stopping after eos_id.

    Filters run in this order: temperature (0 = greedy argmax), top-k, top-p; then one token
    is drawn with a generator seeded by `seed` (None: a fresh random seed).
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    prompts = torch.tensor([prompt_ids])  # (1, T0)
    for next_ids in generate_batch(model, prompts, max_new_tokens, temperature, top_k, top_p,
                                   seed, use_cache):
        token = int(next_ids[0])
        yield token
        if token == eos_id:
            return


def decode_stream(tokens: Iterable[int], tokenizer: Tokenizer,
                  eos_id: int | None = None) -> Iterator[str]:
    """Text as tokens arrive, one piece per token, stopping at eos_id.

    A character's bytes may be split over several tokens ("é" is the two bytes C3 A9); an
    incremental decoder holds incomplete bytes back until the character is whole, so no piece
    ever ends in half a character. A piece may be empty.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        if token == eos_id:
            break
        yield decoder.decode(tokenizer.decode_bytes(token))
    yield decoder.decode(b"", final=True)  # bytes left over become U+FFFD


# ==================================================================================================
# §8 Machinery: files that survive crashes, and checked inputs
#
# Protects §1-§2's files and §6's checkpoints: a write either completes or leaves the old file;
# a failed write says why in words; input text is checked for UTF-8 before any work, every JSON
# file is read through one guarded reader, and what §1's Tokenizer and §7's generation are
# given is checked, so that a mistake is one line naming it.
# ==================================================================================================

# Why a write usually fails, in words: the system's own "File too large" does not say that a
# limit (ulimit -f) is the cause, and numpy's tofile() says only "42782 requested and 11037
# written".
WRITE_FAILURES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EFBIG: "the file is larger than the file system or a limit allows"}


def write_all(f, data, path: str) -> None:
    """Write `data` to the open file `f` and flush it; if the disk refuses, an OSError that names
    `path` and says why."""
    try:
        f.write(data)
        f.flush()
    except OSError as e:
        reason = WRITE_FAILURES.get(e.errno, "the write failed")
        raise OSError(f"cannot write {path}: {reason} ({e.strerror or e})") from None


def open_for_writing(path: str, mode: str = "wb"):
    """open(path, mode) for "wb", "ab", "w" or "a", except that a symbolic link at `path` is
    refused, not followed: a link planted there (metrics.jsonl -> ~/notes.txt, say) would have
    us overwrite the file it names."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise link_refused(path) from None
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def link_refused(path: str) -> OSError:
    return OSError(f"{path} is a symbolic link: gpt.py writes only files of its own, never "
                   f"through a link; remove it or give another directory")


def write_atomically(path: str, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half. The
    temporary file's name holds our process id, for cleaning up after a kill -9."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open_for_writing(tmp) as f:
            write_all(f, data, path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_dir(directory: str) -> None:
    """Fail now, not after an hour of work, if results cannot be written to `directory`."""
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    with open_for_writing(probe):
        pass
    os.remove(probe)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back until the block ends (not on Windows), for steps that must
    not stop halfway: they arrive once it has."""
    can_hold = hasattr(signal, "pthread_sigmask")
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held) if can_hold else None
    try:
        yield
    finally:
        if can_hold:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def process_is_running(pid: int) -> bool:
    """Whether a process exists: signal 0 asks without disturbing it. A number too large to be
    a pid counts as running, so that nothing is removed on its account."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass  # it runs, as another user; or it cannot be asked about
    return True


LOCK_NAME = "gpt.lock"  # in a run's --out-dir while a command writes there: its process id
LOCK_BEING_WRITTEN = 10.0  # seconds: an empty lock this young is being taken, not stale


def lock_owner(path: str) -> int | None:
    """The process id a lock file holds, 0 for a lock being written (no number yet), None for a
    stale one (its process is dead, or it holds no number long after it was made)."""
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii", "replace").strip()
        age = time.time() - os.lstat(path).st_mtime
    except FileNotFoundError:
        return None  # released while we looked
    if not text.isdigit():
        return 0 if age < LOCK_BEING_WRITTEN else None
    pid = int(text)  # Linux's pids stay below 2^22: a larger number names no process
    return pid if 0 < pid < 1 << 22 and process_is_running(pid) else None


def take_lock(path: str) -> None:
    """Create the lock file at `path` holding our process id, or say who holds it. O_CREAT with
    O_EXCL is atomic: of two processes that try at once, exactly one creates the file."""
    for _ in range(3):  # after a stale lock is cleared, try again
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = lock_owner(path)
            if owner is not None:
                who = f"process {owner}" if owner else "a run starting now"
                raise ValueError(f"{os.path.dirname(path)} is in use by another run ({who}): "
                                 f"wait for it to end, or give another --out-dir (if no run "
                                 f"uses it, remove {path})") from None
            with suppress(FileNotFoundError):
                os.remove(path)  # left by a process that was killed (kill -9, a power cut)
            continue
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:  # unbuffered: a full disk fails here
                write_all(f, f"{os.getpid()}\n".encode(), path)
        except OSError:
            os.remove(path)  # an empty lock would read as a run starting now
            raise
        return
    raise ValueError(f"could not take the lock {path}: other runs keep taking it")


@contextmanager
def made_if_missing(directory: str) -> Iterator[None]:
    """Make `directory` and its missing parents; when the block ends, remove again those of them,
    and the folders made in them, that are still empty: a refused command leaves nothing."""
    made = None  # the outermost folder made
    if not os.path.isdir(directory):
        made = os.path.abspath(directory)
        while not os.path.isdir(os.path.dirname(made)):
            made = os.path.dirname(made)
    os.makedirs(directory, exist_ok=True)
    try:
        yield
    finally:
        for folder, _, _ in os.walk(made, topdown=False) if made else ():
            with suppress(OSError):  # a folder that holds files stays
                os.rmdir(folder)


@contextmanager
def directory_lock(directory: str, taken: bool = True) -> Iterator[None]:
    """One writer at a time in `directory`, a run's --out-dir: its lock file is held while the
    block runs and removed when it ends, by an error or Ctrl-C too. `taken` False (the other
    ranks under torchrun, which write nothing there) takes none. A directory made for the lock
    and left empty is removed again."""
    if not taken:
        yield
        return
    path = os.path.join(directory, LOCK_NAME)
    with made_if_missing(directory):
        take_lock(path)
        try:
            yield
        finally:
            with suppress(FileNotFoundError):
                os.remove(path)


# Text to read is a whole file (its path, a str or a pathlib.Path), or a byte range (path, start,
# end) of one: the train part of a file whose end is held out for validation, say.
TextSource = str | os.PathLike | tuple[str | os.PathLike, int, int]


def text_range(source: TextSource) -> tuple[str, int, int]:
    """Example: "stories.txt" or Path("stories.txt") -> ("stories.txt", 0, 5956704); a range
    keeps its bounds, its path given as a str."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), 0, os.path.getsize(source)
    path, start, end = source
    return os.fspath(path), start, end


def text_name(source: TextSource) -> str:
    """Example: ("stories.txt", 0, 900) -> "stories.txt[0:900]", "stories.txt" -> itself."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    path, start, end = source
    return f"{os.fspath(path)}[{start}:{end}]"


@contextmanager
def mapped(path: str) -> Iterator[mmap.mmap]:
    """A file mapped read-only into memory, for searches that touch a few pages here and there:
    call forget_pages after each search."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield data


def forget_pages(data: mmap.mmap) -> None:
    """Unmap the pages a search touched (the file stays in the OS's cache). Linux maps file
    pages 2 MB at a time here and counts them as the process's memory until unmapped: planning
    the chunks of a 500 MB text held 230 MiB, of a 10 GB one it would hold 5 GB."""
    if hasattr(mmap, "MADV_DONTNEED"):
        data.madvise(mmap.MADV_DONTNEED)


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


def check_text(text, where: str = "the text") -> None:
    """Refuse what cannot be encoded, naming it: a value that is not a str, or a str holding a
    lone surrogate ("\\ud800", from a JSON escape, say), which has no UTF-8 bytes."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__} {repr(text)[:30]}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} holds {text[e.start]!r} at position {e.start:,}, a lone "
                         f"surrogate, which is no character and has no UTF-8 encoding") from None


def not_a_file(path: str) -> str:
    """Why `path` is not a file to read, for a message that names it first."""
    kind = "a directory" if os.path.isdir(path) else "not a regular file (a device? a pipe?)"
    return f"is {kind}" if os.path.exists(path) else "not found"


def check_text_file(path: str, block_bytes: int = 1 << 16) -> int:
    """The size of a text file we are about to read, refusing a missing or empty file, or one
    with a byte anywhere that is not UTF-8: better now than after an hour of work. Decoding in
    blocks of 64 KB (which stay in the CPU's cache) checks over 2 GB/s in constant memory."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} {not_a_file(path)}")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path} is empty")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # of the block's first byte in the file
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            carried = len(decoder.getstate()[0])  # the start of a character the last block cut
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text (invalid byte at offset "
                                 f"{offset - carried + e.start:,})") from None
            if not block:
                return size
            offset += len(block)


# Every JSON file gpt.py reads (tokenizer files, token-file sidecars, metrics lines, Q&A data)
# goes through read_json or parse_json, so that a broken or hostile file is one line naming it
# and the problem, never a RecursionError, an OverflowError or all memory used. Our own files
# nest three deep at most and the largest, a vocabulary of 10^6 tokens, holds some 30 MB.
JSON_MAX_DEPTH = 32
JSON_MAX_BYTES = 1 << 28  # 256 MB


def finite_float(text: str) -> float:
    """parse_float for json: 1e999 would become inf, which no file of ours holds."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is too large")
    return value


def refuse_constant(name: str):
    """parse_constant for json: Python's json takes NaN and Infinity, which JSON does not."""
    raise ValueError(f"{name} is not a JSON number")


def json_depth(value) -> int:
    """How deeply arrays and objects nest, counted level by level (no recursion).
    Example: json_depth([1, {"a": [2]}]) -> 3; json_depth(7) -> 0."""
    depth, level = 0, [value]
    while any(isinstance(v, (list, tuple, dict)) for v in level):
        depth += 1
        level = [child for v in level if isinstance(v, (list, tuple, dict))
                 for child in (v.values() if isinstance(v, dict) else v)]
    return depth


def parse_json(text: str, where: str, object_pairs_hook=None):
    """The value of a JSON text, or a ValueError naming `where`: NaN, Infinity, a number too
    large for a float, and nesting deeper than JSON_MAX_DEPTH are refused."""
    too_deep = f"{where}: JSON nested more than {JSON_MAX_DEPTH} levels deep"
    try:
        value = json.loads(text, parse_float=finite_float, parse_constant=refuse_constant,
                           object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        what = f"not JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        raise ValueError(f"{where} is {what if text.strip() else 'empty'}") from None
    except ValueError as e:  # from the two hooks, or an integer of over 4,300 digits
        raise ValueError(f"{where} is not JSON we can use ({e})") from None
    except RecursionError:  # json's parser recurses once a level, so it gives up first
        raise ValueError(too_deep) from None
    if json_depth(value) > JSON_MAX_DEPTH:
        raise ValueError(too_deep)
    return value


def read_json(path: str | os.PathLike, object_pairs_hook=None):
    """The value of the JSON file `path` (through parse_json), or a ValueError naming it: a file
    that is missing, not a regular file (/dev/zero, a pipe), over JSON_MAX_BYTES or not UTF-8."""
    path = os.fspath(path)
    try:
        # O_NONBLOCK: opening a pipe would otherwise wait for a writer that may never come.
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError(f"{path} is not a regular file")
            raw = f.read(JSON_MAX_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    if len(raw) > JSON_MAX_BYTES:
        raise ValueError(f"{path} is larger than {JSON_MAX_BYTES >> 20} MB, too large to be one "
                         f"of our JSON files")
    try:
        text = raw.decode("utf-8-sig")  # -sig: the byte-order mark some editors add
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start})") from None
    return parse_json(text, path, object_pairs_hook)


# Protects §1's Tokenizer: what it is given, and the files it reads back, are checked here, so
# that a mistake or a damaged file is one line naming it, never a KeyError deep inside.

# The largest vocabulary a tokenizer file or a checkpoint may hold: four times the largest in
# use today (Gemma's 262,144), and small enough to refuse before memory is allocated for it.
MAX_VOCAB_SIZE = 1 << 20


def check_special_tokens(special_tokens: list[str]) -> None:
    """Refuse an empty special token, which would match between every two characters, and one
    given twice, which would take two ids."""
    for i, token in enumerate(special_tokens):
        if not token:
            raise ValueError("a special token is empty: it would match between every two "
                             "characters")
        if token in special_tokens[:i]:
            raise ValueError(f"special token {token!r} is given twice")


def check_vocab_size(vocab_size: int, special_tokens: list[str]) -> None:
    """Refuse a vocabulary too small for the 256 bytes and the special tokens (§1's trainers)."""
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab size {vocab_size} is too small: it must hold the 256 bytes and "
                         f"{len(special_tokens)} special token(s), at least "
                         f"{256 + len(special_tokens)}")


def check_tokenizer(vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                    special_tokens: list[str], split_patterns: list[str]) -> None:
    """Refuse what §1's Tokenizer could not encode with: a bad special token, a split pattern
    that is no regular expression, a vocabulary without every single byte, a merge of tokens
    that the vocabulary (with the special tokens) does not hold."""
    check_special_tokens(special_tokens)
    for pattern in split_patterns:
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise ValueError(f"a split pattern is not a regular expression ({e})") from None
    known = {*vocab.values(), *(s.encode("utf-8") for s in special_tokens)}
    missing = [bytes([b]) for b in range(256) if bytes([b]) not in known]
    if missing:
        raise ValueError(f"the vocabulary lacks single-byte tokens such as {missing[0]!r}")
    for rank, (left, right) in enumerate(merges):
        if left not in known or right not in known or left + right not in known:
            raise ValueError(f"merge {rank} ({left!r}, {right!r}) uses a token that is not "
                             "in the vocabulary")


def token_id_list(ids, vocab: dict[int, bytes]) -> list[int]:
    """What Tokenizer.decode takes, as a list of ids of `vocab`, or a ValueError naming what is
    not one: a list of ints, a 1-D tensor or numpy array of integers, or one id."""
    # Tensors and arrays become lists of ints first: a tensor's elements are tensors, which
    # hash by identity, so not one of them would be found in the vocabulary.
    if isinstance(ids, (torch.Tensor, np.ndarray, np.generic)):
        if ids.ndim > 1:
            raise ValueError(f"decode takes a 1-D sequence of token ids, got shape "
                             f"{tuple(ids.shape)}: decode each row on its own")
        ids = ids.reshape(-1).tolist()
    elif not isinstance(ids, Iterable):
        ids = [ids]  # one id
    try:
        # operator.index takes ints of every kind (numpy's, 0-D integer tensors), not floats.
        ids = list(map(operator.index, ids))
    except TypeError as e:
        raise ValueError(f"token ids must be integers ({e})") from None
    unknown = set(ids).difference(vocab)  # a set: a million ids are checked in milliseconds
    if unknown:
        first = next(i for i in ids if i in unknown)
        raise ValueError(f"token id {first} is not in the vocabulary ({len(vocab)} tokens)")
    return ids


def check_sampling_args(prompts: torch.Tensor, vocab_size: int, max_new_tokens: int,
                        temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Protects §7's generate_batch: refuse, naming it, what generation cannot use: ids the
    embedding has no row for, a negative count of tokens, filters out of range."""
    bad = prompts[(prompts < 0) | (prompts >= vocab_size)]
    if len(bad):
        raise ValueError(f"token id {bad[0]} is not in the model's vocabulary (0 to "
                         f"{vocab_size - 1})")
    if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")


def check_tokenizer_settings(settings, where: str) -> dict:
    """Refuse what a tokenizer_settings.json or a checkpoint must not hold: Tokenizer's other
    settings (split_patterns, normalizer, ignore_merges) of other kinds, or any other key."""
    ok = {"split_patterns": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
          "normalizer": lambda v: v in (None, "NFC"),
          "ignore_merges": lambda v: isinstance(v, bool)}
    if not (isinstance(settings, dict) and all(k in ok and ok[k](v) for k, v in settings.items())):
        raise ValueError(f"{where}: damaged tokenizer settings {str(settings)[:60]}")
    return settings


def read_gpt2_files(vocab_path: str | os.PathLike, merges_path: str | os.PathLike
                    ) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """The vocab and merges of a vocab.json and a merges.txt in GPT-2's format (ours, written
    by §1's saved_files, or OpenAI's), or a ValueError naming what is wrong with them."""
    vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
    unspell = {c: b for b, c in bytes_to_unicode().items()}
    # Pairs, not a dict: GPT-2's format may spell one string twice, under two ids.
    entries = read_json(vocab_path, object_pairs_hook=list)
    if not (isinstance(entries, list) and all(isinstance(e, tuple) for e in entries)):
        raise ValueError(f"{vocab_path} is not a JSON object of tokens and their ids")
    for token, i in entries:
        if not (type(i) is int and 0 <= i < MAX_VOCAB_SIZE and isinstance(token, str)):
            raise ValueError(f"{vocab_path}: {str(token)[:30]!r}: {str(i)[:30]} is not an id "
                             f"from 0 to {MAX_VOCAB_SIZE - 1:,}")
    try:
        vocab = {i: bytes(unspell[c] for c in token) for token, i in entries}
        with open(merges_path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        merges = [tuple(bytes(unspell[c] for c in part) for part in line.split(" "))
                  for line in lines if line and not line.startswith("#version")]
    except FileNotFoundError as e:
        raise ValueError(f"{e.filename}: no such file") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{vocab_path}, {merges_path}: corrupt tokenizer files "
                         f"({type(e).__name__}: {e})") from None
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{merges_path}: every line must be two tokens")
    return vocab, merges


def read_tokenizer_files(directory: str | os.PathLike) -> dict:
    """Tokenizer's arguments, read from the files its save() wrote into `directory` (or from
    GPT-2's own vocab.json and merges.txt, which have no special tokens), each checked."""
    directory = os.fspath(directory)
    paths = {name: os.path.join(directory, name) for name in
             ("vocab.json", "merges.txt", "special_tokens.json", "tokenizer_settings.json")}
    for name in ("vocab.json", "merges.txt"):
        if not os.path.isfile(paths[name]):
            raise ValueError(f"{directory} holds no tokenizer ({name} is missing); "
                             "run `python gpt.py tokenize` first")
    special_tokens = (read_json(paths["special_tokens.json"])
                      if os.path.isfile(paths["special_tokens.json"]) else [])
    if not (isinstance(special_tokens, list) and all(isinstance(s, str) for s in special_tokens)):
        raise ValueError(f"{paths['special_tokens.json']} is not a JSON list of strings")
    settings_path = paths["tokenizer_settings.json"]
    settings = (check_tokenizer_settings(read_json(settings_path), settings_path)
                if os.path.isfile(settings_path) else {})
    vocab, merges = read_gpt2_files(paths["vocab.json"], paths["merges.txt"])
    return dict(vocab=vocab, merges=merges, special_tokens=special_tokens, **settings)


# ==================================================================================================
# §9 Machinery: parallel BPE training
#
# Speeds up §1's trainer: the text is cut into chunks at document boundaries, worker processes
# count the pre-tokens of each chunk (§1's pretoken_counts), and fast_train_bpe_incremental, the
# twin of §1's train_bpe_incremental, learns the merges from the counts.
# ==================================================================================================

def default_workers() -> int:
    """The CPU cores this process may use (a container may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


PR_SET_PDEATHSIG = 1  # prctl(2): the signal Linux sends a process when its parent dies


def _init_worker(parent_pid: int, initializer, initargs) -> None:
    # Ctrl-C reaches every process of the terminal: the main process alone handles it and stops
    # the workers. It stops them with SIGTERM, which must end a worker at once, not run a handler
    # inherited from the main process (main() makes SIGTERM raise KeyboardInterrupt there).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):  # forked inside worker_pool's signals_held()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if sys.platform == "linux":
        # A main process killed with kill -9 cannot stop its workers, which would run on and
        # die later on a broken pipe, with a traceback: have the kernel kill them with it.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl: nobody will signal us
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


def worker_pool(num_workers: int, initializer=None, initargs=()):
    """A process pool whose workers leave Ctrl-C to the main process (which then stops them).

    On Linux we fork: a forked worker starts in milliseconds with gpt.py already imported, while
    a spawned one would spend a second re-importing torch. macOS's system libraries are not safe
    to fork, so there (and on Windows) Python's default, spawn, is used.
    """
    method = "fork" if sys.platform == "linux" else None
    # Held while the workers are forked: a signal that came mid-fork would run our handler in
    # Python's at-fork hooks, which swallow the KeyboardInterrupt it raises. The workers let
    # signals through again (_init_worker), and the main process gets any held one after this.
    with signals_held():
        return multiprocessing.get_context(method).Pool(
            num_workers, initializer=_init_worker, initargs=(os.getpid(), initializer, initargs))


def map_jobs(func, jobs: list, num_workers: int, ordered: bool,
             initializer=None, initargs=()) -> Iterator:
    """func(job) for every job: in this process when one worker (or one job) suffices, else in a
    pool, in job order if `ordered` or as they finish. The pool stops when iteration ends, is
    abandoned or fails; wrap the call in contextlib.closing to stop it at a known moment."""
    if num_workers == 1 or len(jobs) <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(func, jobs)
        return
    with worker_pool(min(num_workers, len(jobs)), initializer, initargs) as pool:
        yield from (pool.imap if ordered else pool.imap_unordered)(func, jobs)


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


# Where a text without document markers can be cut: after a printable ASCII character and
# before whitespace, a cut that GPT-2's pattern always makes (SAFE_CUT_RE's first kind, "word|\n"),
# so both sides pre-tokenize as within the whole. Bytes are tested, not characters, so only ASCII
# counts: a multi-byte character might be whitespace (U+00A0) that joins the run after it. The
# first pattern ends a line (before its trailing spaces, "\r" and "\n"); the second, for text
# without line breaks, any word.
LINE_END_CUT_RE = re.compile(rb"[\x21-\x7e](?=[ \t\r]*\n)")
WORD_END_CUT_RE = re.compile(rb"[\x21-\x7e](?=[ \t\n\r])")


def whitespace_boundaries(path: str, start: int, end: int, chunk_bytes: int) -> list[int]:
    """Byte offsets that cut a text without special tokens into chunks of about `chunk_bytes`:
    at the first line end after each chunk_bytes, or else the first word end, or nowhere.
    Example: b"one two\nthree\n" from 0 to 14 with chunk_bytes 4 -> [0, 7, 13, 14]."""
    cuts = [start]
    with mapped(path) as data:
        pos = start + chunk_bytes
        while pos < end:
            # Lines are usually short: look for a line end in the next chunk's length first.
            match = (LINE_END_CUT_RE.search(data, pos - 1, min(end, pos + chunk_bytes))
                     or WORD_END_CUT_RE.search(data, pos - 1, end))
            forget_pages(data)
            if not match or match.end() >= end:
                break
            cuts.append(match.end())
            pos = match.end() + chunk_bytes
    return cuts + [end]


def chunk_boundaries(source: TextSource, special_tokens: list[str], chunk_bytes: int
                     ) -> list[int]:
    """Byte offsets that cut a text into chunks of about `chunk_bytes`, each cut at the start of
    a special token, so no document (and no pre-token) is split between two workers.

    A cut is refused where an occurrence of a special token starts before it and reaches it
    (overlapping it, or ending right there): in a run such as `<|endoftext|><|endoftext|>`,
    which may be one longer special token, the cut could split what encode() would match.
    Without special tokens, see whitespace_boundaries. Offsets are the file's, start to end.
    Example: a 10 MB file with a document break every few KB, chunk_bytes=4e6 ->
    [0, 4000231, 8000514, 10000000].
    """
    path, start, end = text_range(source)
    specials = [s.encode("utf-8") for s in special_tokens]
    if not specials:
        return whitespace_boundaries(path, start, end, chunk_bytes)
    cuts = [start]
    if end - start > chunk_bytes:
        with mapped(path) as data:
            pos = start + chunk_bytes
            while pos < end:
                hits = [h for h in (data.find(s, pos, end) for s in specials) if h >= 0]
                forget_pages(data)
                if not hits:
                    break
                cut = min(hits)
                # An occurrence starting at cut - len(s) .. cut - 1 lies within this window.
                if any(data.find(s, max(cut - len(s), start), min(cut + len(s) - 1, end)) >= 0
                       for s in specials):
                    pos = cut + 1  # inside or right after a run of specials: try the next one
                    continue
                if cut > cuts[-1]:
                    cuts.append(cut)
                pos = cut + chunk_bytes
    return cuts + [end]


def plan_chunks(source: TextSource, special_tokens: list[str], num_workers: int,
                max_chunk_bytes: int = 4 << 20) -> list[tuple[str, int, int]]:
    """(path, start, end) pieces of a text for the workers: a few MB each, and at least four per
    worker on a small text, so every core stays busy until the end."""
    path, start, end = text_range(source)
    chunk = max(min(max_chunk_bytes, (end - start) // (4 * num_workers)), 1 << 16)
    cuts = chunk_boundaries((path, start, end), special_tokens, chunk)
    return [(path, a, b) for a, b in zip(cuts, cuts[1:])]


# GPT-2's pattern, for ASCII text only, in the standard library's `re`: about twice as fast as
# `regex` on the same text (31 against 15 MB/s on the Python standard library's source here),
# and exact, because on ASCII the classes are small and known: \p{L} is A-Z and a-z, \p{N} is
# 0-9, and `regex`'s \s is tab, newline, vertical tab, form feed, carriage return and space
# (not \x1c-\x1f, which `re`'s \s would add; hence the explicit class). A test checks every
# ASCII character's class and every short string against PRETOKEN_RE.
_WS = r"\t\n\x0b\x0c\r "
ASCII_PRETOKEN_RE = re.compile(rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+"""
                               rf"""| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+""")


NON_ASCII_RE = re.compile(r"[^\x00-\x7f]+")


def fast_pretokenize(text: str) -> list[str]:
    """pretokenize(text), with `re` on the text's ASCII stretches: all of it, usually (and
    str.isascii() costs nothing: Python strings carry it as a flag). A line that holds other
    characters goes to `regex`, cut out at line breaks where the pattern always cuts."""
    if text.isascii():
        return ASCII_PRETOKEN_RE.findall(text)
    pretokens: list[str] = []
    done = 0  # text[:done] is pre-tokenized
    for run in NON_ASCII_RE.finditer(text):
        if run.start() < done:
            continue  # on a line already given to `regex`
        start, end = line_cut_before(text, run.start(), done), line_cut_after(text, run.end())
        pretokens += ASCII_PRETOKEN_RE.findall(text, done, start)
        pretokens += PRETOKEN_RE.findall(text, start, end)
        done = end
    pretokens += ASCII_PRETOKEN_RE.findall(text, done)
    return pretokens


# A line break after a visible ASCII character is a cut of GPT-2's pattern (SAFE_CUT_RE, below):
# no pre-token holds a non-space and whitespace side by side.
def line_cut_before(text: str, i: int, lo: int) -> int:
    """The last such line break in text[lo:i], or lo."""
    cut = text.rfind("\n", lo, i)
    while cut > lo and not "!" <= text[cut - 1] <= "~":
        cut = text.rfind("\n", lo, cut)
    return max(cut, lo)


def line_cut_after(text: str, j: int) -> int:
    """The first such line break at or after j, or the end of the text."""
    cut = text.find("\n", j)
    while cut != -1 and not "!" <= text[cut - 1] <= "~":
        cut = text.find("\n", cut + 1)
    return len(text) if cut == -1 else cut


# Splitting text into words at spaces makes encoding fast: each word is pre-tokenized and merged
# once, and every later occurrence is a dictionary lookup. The split is exact wherever the space
# starts a pre-token of its own in GPT-2's pattern, which almost every space does. The exceptions
# have whitespace before them and whitespace or the end of the text after them ("a   b",
# "\n  x", a final "\t "): `\s+(?!\S)` joins them to the whitespace before. Text without such
# spaces (nearly all prose) is split with str.split, which with the search for such spaces runs
# over twice as fast as splitting with the regex below; text with them is cut only before the
# spaces that follow a non-space, which always start a pre-token. (Stdlib `re` counts a few
# control characters as whitespace that `regex` does not: UNSAFE_SPACE_RE then finds more spaces
# and SAFE_SPACE_RE fewer, which only removes cuts, so both stay exact.)
UNSAFE_SPACE_RE = re.compile(r" (?!\S)(?<=\s )")  # whitespace before, whitespace or the end after
SAFE_SPACE_RE = re.compile(r"(?<=\S) ")          # a space after a non-space


def split_words(text: str) -> list[str]:
    """Cut text before spaces that start a pre-token (all of them, or those after a non-space),
    dropping those spaces: every word but the first stands for " " + word, and each
    pre-tokenizes on its own as within the whole text.
    Example: split_words("Hi there,\nit's  42!") -> ['Hi', "there,\nit's", '', '42!'], which
    stand for 'Hi', " there,\nit's", ' ', ' 42!'."""
    return SAFE_SPACE_RE.split(text) if UNSAFE_SPACE_RE.search(text) else text.split(" ")


# Speeds up §1's pretoken_counts: the same counts, for a byte range of a file.
def count_pretokens_in_chunk(path: str, start: int, end: int,
                             special_tokens: list[str]) -> Counter[str]:
    """pretoken_counts of a byte range of a file: how often each pre-token occurs, special
    tokens removed (they delimit documents and never take part in merges).
    Example: "the cat<|endoftext|>the" -> Counter({'the': 2, ' cat': 1})."""
    special_re = special_tokens_regex(special_tokens)
    counts: Counter[str] = Counter()
    first_words: Counter[str] = Counter()  # the first word of each document
    words: Counter[str] = Counter()        # the others, each standing for " " + word
    for i, piece in enumerate(split_on_special_tokens(read_text(path, start, end), special_re)):
        if i % 2 == 1:
            continue
        # Two ways to count, each the faster on its kind of text. Prose repeats its words
        # (TinyStories: 38k distinct space-separated words of 1.1M), so counting words in C and
        # pre-tokenizing each distinct one once is fastest. Code has a distinct word in four
        # (names, literals, indentation) and is pre-tokenized whole in one findall: 2x faster
        # there. Runs of spaces (indentation), which split_words must treat apart, tell code
        # from prose.
        if UNSAFE_SPACE_RE.search(piece):
            counts.update(fast_pretokenize(piece))
        else:  # every space starts a pre-token: split_words would split at each of them
            piece_words = piece.split(" ")
            first_words[piece_words[0]] += 1
            words.update(islice(piece_words, 1, None))
    for text, n in chain(first_words.items(), ((" " + w, n) for w, n in words.items())):
        for pretoken in fast_pretokenize(text):
            counts[pretoken] += n
    return counts


def _count_chunk(job: tuple[str, int, int, list[str]]) -> tuple[int, Counter[str]]:
    path, start, end, special_tokens = job
    return end - start, count_pretokens_in_chunk(path, start, end, special_tokens)


def count_pretokens(source: TextSource, special_tokens: list[str], num_workers: int,
                    verbose: bool = False) -> Counter[str]:
    """Pre-token counts of a file or a byte range of one, in parallel: each worker reads its own
    chunks from disk, so memory holds a few chunks and the distinct pre-tokens, whatever the
    file's size."""
    chunks = plan_chunks(source, special_tokens, num_workers)
    jobs = [(p, a, b, special_tokens) for p, a, b in chunks]
    progress = (Progress(f"pre-tokenize {text_name(source)}", sum(b - a for _, a, b in chunks))
                if verbose else None)
    counts: Counter[str] = Counter()
    with closing(map_jobs(_count_chunk, jobs, num_workers, ordered=False)) as results:
        for nbytes, chunk_counts in results:
            counts.update(chunk_counts)
            if progress:
                progress.advance(nbytes)
    return counts


# --- Speeds up §1's train_bpe_incremental -------------------------------------------------------
# fast_train_bpe_incremental learns the same merges with three tricks. (1) A word is spelled as a
# string, one character per token, chr(id): its bytes to start with (Latin-1 maps byte b to
# chr(b)). A pair is then a two-character string, and merging it into chr(new_id) is
# str.replace, which merges left to right without overlaps, as §1's merge does, but in C instead
# of a Python loop. (2) A heap finds the most frequent pair, instead of a scan of all pairs.
# (3) The rare very long pre-tokens (a megabyte line of letters) sit in a linked list, merged
# only where the pair occurs.
def spelled_pairs(word: str | list[str]) -> Iterator[str]:
    """The adjacent pairs of a word spelled one character per token, each as a two-character
    string.
    Example: spelled_pairs("abc") -> "ab", "bc"."""
    return map(operator.add, word, word[1:])


# Ties go to the lexicographically greatest pair, but Python's heap pops its smallest entry.
# So the heap files each pair under a string that sorts the other way round: every byte b is
# written chr(255 - b), and every token ends in chr(256), which is above them all, so that a
# token comes before its own prefixes (b"ab" > b"a"). Such strings compare in C: 1.3x faster
# training than a class with a Python __lt__ at 32k merges.
REVERSE_BYTES = bytes(range(255, -1, -1))


def reverse_key(token: bytes) -> str:
    """A string that sorts before another one when its token sorts after the other's.
    Example: reverse_key(b"ab") = "\x9e\x9d\u0100" < reverse_key(b"a") = "\x9e\u0100"."""
    return token.translate(REVERSE_BYTES).decode("latin-1") + "\u0100"


# Pre-tokens longer than this many bytes are merged where each pair occurs, rather than by
# going over the whole word at every merge, which costs its length each time: hours for a
# megabyte line of letters. The fast trainer keeps them in _LinkedWords, and
# FastTokenizer.encode_word (§10) merges them with a heap. Ordinary words are shorter
# (TinyStories' longest is 17 bytes) and keep the simpler loops; from 64 bytes on, the linked
# versions are faster anyway (measured: 1.2x to encode such a word, 1.8x to train on a corpus
# of them).
LONG_PRETOKEN_BYTES = 64


def sorted_in_place(positions: array) -> array:
    """Sort in place, with numpy: sorted() would make a list of Python ints, 36 bytes each."""
    np.frombuffer(positions, dtype=positions.typecode).sort()
    return positions


class _LinkedWords:
    """train_bpe's long pre-tokens, where a merge costs the occurrences of its pair, not the
    length of the words. The words' symbols (token ids) sit in one doubly linked list, a gap
    (-1) before and after each word; for each pair (spelled as two characters), `where` lists
    the positions of its left symbols.
    Example: "abab" is ids [-1, a, b, a, b, -1], where["ab"] = [1, 3], where["ba"] = [2];
    merging "ab" into X leaves the list -1 X X -1, where["XX"] = [1].
    Positions sit in arrays of 4-byte ints, 16 bytes a letter in all: in lists of Python ints
    (36 bytes each) an 8 MB line of letters took 1.2 GB. (Its distinct pairs cost as in any text.)
    """

    def __init__(self, words: list[str], freqs: list[int]):
        size = sum(map(len, words)) + len(words) + 1  # the symbols and the gaps
        kind = "i" if size < 1 << 31 else "q"  # C ints hold the positions of a text below 2 GB
        self.ids = array("i", [-1])  # the token at each position; -1 once merged away
        self.starts = array(kind)    # the position of each word's first symbol
        for word in words:
            self.starts.append(len(self.ids))
            self.ids.extend(word.encode("latin-1"))
            self.ids.append(-1)
        self.freqs = list(freqs)     # the count of each word
        self.next = array(kind, range(1, size + 1))  # the position of the next symbol
        self.prev = array(kind, range(-1, size - 1))
        # Positions are never taken out of `where`: one whose pair has changed since is stale,
        # and skipped when that pair is merged. Each merged occurrence removes a symbol and adds
        # two entries at most, so the lists hold at most three entries per symbol in all.
        self.where: dict[str, array] = defaultdict(partial(array, kind))
        for word, start in zip(words, self.starts):
            for i, pair in enumerate(spelled_pairs(word), start):
                self.where[pair].append(i)

    def freq(self, i: int) -> int:
        """The count of the word that holds position i."""
        return self.freqs[bisect_right(self.starts, i) - 1]

    def pair_counts(self) -> dict[str, int]:
        """Example: words "abab" x1 and "ab" x3 -> {"ab": 5, "ba": 1}."""
        return {pair: sum(map(self.freq, at)) for pair, at in self.where.items()}

    def fast_merge(self, pair: str, new: str, pair_count: dict[str, int]) -> set[str]:
        """§1's merge, only where the pair occurs: merge its occurrences left to right in each
        word, without overlaps, and update pair_count. Returns the new pairs (they hold `new`)
        that these words now have.
        Example: merging "aa" into X in "aaaa" gives "XX" and returns {"XX"}."""
        ids, after, before = self.ids, self.next, self.prev
        a, b = pair
        a_id, b_id = ord(a), ord(b)
        created = set()
        for i in sorted_in_place(self.where.pop(pair, array("i"))):
            j = after[i]
            if ids[i] != a_id or ids[j] != b_id:
                continue  # stale: changed by an earlier merge, or just now ("aaa" is aa a)
            freq, h, k = self.freq(i), before[i], after[j]
            ids[i], ids[j] = ord(new), -1  # i takes the new token, j leaves the list
            after[i], before[k] = k, i
            pair_count[pair] -= freq
            # The pairs with the neighbours change: (h, a) at h becomes (h, new) at h, and
            # (b, k) at j becomes (new, k) at i.
            if ids[h] >= 0:
                left = chr(ids[h])
                created.add(self._replace(h, left + a, left + new, freq, pair_count))
            if ids[k] >= 0:
                right = chr(ids[k])
                created.add(self._replace(i, b + right, new + right, freq, pair_count))
        return {p for p in created if pair_count[p] > 0}  # "aaaa": (aa, a) came and went

    def _replace(self, at: int, old: str, new: str, freq: int,
                 pair_count: dict[str, int]) -> str:
        """One occurrence of pair old becomes one of new, whose left symbol is at `at`.
        Example: merging "ab" in "habk" replaces "ha" by "hX" at h's position."""
        pair_count[old] -= freq
        pair_count[new] += freq
        self.where[new].append(at)
        return new


def fast_merge_words(words: list[str], freqs: list[int], pair: str, new: str,
                     pair_count: dict[str, int], pair_words: dict[str, list[int]]) -> set[str]:
    """§1's merge on the words spelled one character per token: merge `pair` into `new` in the
    words that contain it (pair_words says which), and update the pair counts. Returns the new
    pairs, those holding `new`.
    Example: word "zabc" x 2, pair "ab" -> "zXc": "za", "ab" and "bc" lose 2, "zX" and "Xc"
    gain 2 and are returned."""
    a, b = pair
    grown = set()
    for i in pair_words.pop(pair, ()):
        word = words[i]
        at = word.find(pair)
        if at < 0:
            continue  # stale: an earlier merge took this pair apart, or the word came twice
        merged = word.replace(pair, new)
        freq = freqs[i]
        if len(merged) == len(word) - 1:
            # One occurrence (nearly always): only it and the pairs with its neighbours change,
            # h a b k -> h X k. Updating just these is 1.3x faster than recounting the word.
            pair_count[pair] -= freq
            if at > 0:
                h = word[at - 1]
                pair_count[h + a] -= freq
                pair_count[h + new] += freq
                pair_words[h + new].append(i)
                grown.add(h + new)
            if at + 2 < len(word):
                k = word[at + 2]
                pair_count[b + k] -= freq
                pair_count[new + k] += freq
                pair_words[new + k].append(i)
                grown.add(new + k)
        else:  # several: take away all the word's pairs, add all the merged word's
            for p in spelled_pairs(word):
                pair_count[p] -= freq
            for p in spelled_pairs(merged):
                pair_count[p] += freq
                if new in p:
                    pair_words[p].append(i)
                    grown.add(p)
        words[i] = merged
    return grown


def fast_train_bpe_incremental(counts: dict[str, int], vocab_size: int,
                               special_tokens: list[str], verbose: bool = False
                               ) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """§1's train_bpe_incremental, the same vocab and merges (tested), many times faster: words
    spelled one character per token, a heap, long pre-tokens linked (see above).
    Example: counts {"aaab": 1}, vocab_size 259 -> merges [(b"a", b"a"), (b"aa", b"a"),
    (b"aaa", b"b")].
    """
    check_vocab_size(vocab_size, special_tokens)
    vocab = initial_vocab(special_tokens)
    # words[i]: the i-th distinct pre-token, spelled one character per token
    words = [pre.encode("utf-8").decode("latin-1") for pre in counts]
    freqs = list(counts.values())
    # The rare very long ones go to `linked`, and leave an empty word here.
    long = [i for i, word in enumerate(words) if len(word) > LONG_PRETOKEN_BYTES]
    linked = _LinkedWords([words[i] for i in long], [freqs[i] for i in long])
    for i in long:
        words[i] = ""
    pair_count: dict[str, int] = defaultdict(int, linked.pair_counts())
    # pair -> words containing it; a list (faster than a set), where a word may come twice
    pair_words: dict[str, list[int]] = defaultdict(list)
    for i, word in enumerate(words):
        for pair in spelled_pairs(word):
            pair_count[pair] += freqs[i]
            pair_words[pair].append(i)
    # Max-heap by (count, pair) via negated counts. Entries go stale as counts drop; rather than
    # delete them, we check each popped entry against pair_count and re-file it if it is stale.
    # keys[id]: the token's reverse_key; a pair's key is its two tokens' keys, one after the other
    keys = [reverse_key(token) for token in vocab.values()]
    heap = [(-n, keys[ord(pair[0])] + keys[ord(pair[1])], pair) for pair, n in pair_count.items()]
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
        new_id, new = len(vocab), chr(len(vocab))
        left, right = vocab[ord(pair[0])], vocab[ord(pair[1])]
        vocab[new_id] = left + right
        keys.append(reverse_key(left + right))
        merges.append((left, right))
        # The long words merge the pair where it occurs, the others are re-spelled. Only pairs
        # with the new token can have grown, so only they are pushed; shrunken pairs are fixed
        # lazily when popped.
        grown = linked.fast_merge(pair, new, pair_count)
        grown |= fast_merge_words(words, freqs, pair, new, pair_count, pair_words)
        assert pair_count.pop(pair) == 0, "every word with the merged pair was re-spelled"
        for p in grown:
            heapq.heappush(heap, (-pair_count[p], keys[ord(p[0])] + keys[ord(p[1])], p))
        if verbose and time.perf_counter() - last_report > 5:  # only long runs report progress
            last_report = time.perf_counter()
            log(f"merges: {len(merges):,}/{vocab_size - 256 - len(special_tokens):,}")
    return vocab, merges


def train_bpe(input_path: TextSource, vocab_size: int, special_tokens: list[str],
              num_workers: int | None = None,
              verbose: bool = False) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn a byte-level BPE vocabulary from a text file (a path, or a byte range (path,
    start, end) of one), the same as train_bpe_naive on its text: count its pre-tokens in
    parallel workers, then train_bpe_incremental (fast_train_bpe_incremental by default, §19)."""
    special_tokens = list(special_tokens)
    check_vocab_size(vocab_size, special_tokens)
    counts = count_pretokens(input_path, special_tokens, num_workers or default_workers(),
                             verbose)
    return train_bpe_incremental(counts, vocab_size, special_tokens, verbose)


# ==================================================================================================
# §10 Machinery: the fast encoder and token files
#
# Speeds up §1's Tokenizer: FastTokenizer caches the ids of every word it has seen, so encoding
# is mostly dictionary lookups, and it encodes a file in parallel chunks; tested equal to §1's
# Tokenizer.encode token for token. Token files record the tokenizer that made them.
# ==================================================================================================

# Where a stream of text can be cut and each side encoded on its own (encode_iterable): between
# two characters that no pre-token of GPT-2's pattern holds side by side, the first not
# whitespace. Only whitespace runs hold whitespace, so "word|\n" is a cut; runs of letters, of
# digits or of other characters hold one kind each, and only a contraction ("'s") holds two, so
# a change of kind is a cut too, except from "'" to a letter. The pattern ends a pre-token at such
# a cut whatever follows, and the run that ends there is the same whatever precedes. (A cut after
# whitespace is not safe: "\n\nx" is "\n", "\n", "x", but "\n\n" alone is one pre-token.)
# `regex`'s \s, \p{L}, \p{N} are those of GPT-2's pattern (stdlib `re` also counts \x1c-\x1f as
# whitespace). REVERSE searches from the end, as we want the last cut.
SAFE_CUT_RE = regex.compile(r"(?<=\S)(?=\s)"                      # "word|\n"
                            r"|(?<=\p{L})(?=[^\s\p{L}])"           # "cat|," "don|'t"
                            r"|(?<=\p{N})(?=[^\s\p{N}])"           # "42|nd"
                            r"|(?<=[^\s\p{L}\p{N}])(?=\p{N})"      # "$|5"
                            r"|(?<=[^\s\p{L}\p{N}'])(?=\p{L})",    # ".|The", but not "'|s"
                            regex.REVERSE)


@contextmanager
def cycle_collector_paused():
    """Pause Python's cycle collector for work that allocates many objects but no reference
    cycles, like filling the encoder's cache: left on, it would now and then scan every object
    in the process (torch's many included) for cycles there are none of, which cost a fifth of
    a first encode() right after training a tokenizer. Reference counting still frees memory."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _Cache(dict):
    """string -> its token ids, computed by `encode` on a miss.

    Text repeats the same words endlessly, so almost every lookup is a hit and encoding runs at
    dictionary speed. The cache is cleared when it grows past `max_size` entries, which bounds
    its memory on corpora with millions of distinct words. Ids are stored as tuples, which the
    cycle collector stops tracking once it has seen they hold only ints: a full cache of lists
    would add a million objects to every later full collection (during training, say).
    """

    def __init__(self, encode, max_size: int = 1 << 20):
        super().__init__()
        self.encode, self.max_size = encode, max_size

    def __missing__(self, text: str) -> tuple[int, ...]:
        if len(self) >= self.max_size:
            self.clear()
        ids = self[text] = tuple(self.encode(text))
        return ids


# The fast twin of §1's split_isolated.
def fast_split_isolated(text: str, pattern: regex.Pattern) -> list[str]:
    """split_isolated, by findall (in C) where the matches cover the whole text, as those of
    GPT-2's, Llama 3's and Qwen's patterns always do: there are no gaps to keep."""
    matches = pattern.findall(text) if not pattern.groups else []
    if sum(map(len, matches)) == len(text):
        return list(filter(None, matches))  # without the empty matches, as split_isolated
    return READABLE_FORMS["split_isolated"](text, pattern)


# The rank of a pair that is no merge: after every real rank.
_NOT_A_MERGE = sys.maxsize


# Speeds up §1's Tokenizer: the name Tokenizer stands for this class after `import gpt` (§19).
class FastTokenizer(Tokenizer):
    """§1's Tokenizer with a fast encode: the same ids (a test checks it on every kind of text).

    Words repeat endlessly, so encode() looks each one up in a cache and runs the merges only on
    a miss; encode_iterable() streams a large file in constant memory; long pre-tokens merge with
    a heap. This is the tokenizer the commands use; load() returns one.
    """

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[bytes, bytes]],
                 special_tokens: list[str] | None = None,
                 split_patterns: Iterable[str] = (GPT2_PATTERN,), normalizer: str | None = None,
                 ignore_merges: bool = False):
        super().__init__(vocab, merges, special_tokens, split_patterns, normalizer, ignore_merges)
        # The shortcuts below know GPT-2's pattern; with other settings encode() goes §1's way.
        self.gpt2_split = not self.settings().keys() - {"ignore_merges"}
        # Three caches. For prose cut into words: text -> ids, for text that pre-tokenizes on
        # its own (pre-tokens, the first word of a text, what follows a newline); and word ->
        # ids of " " + word, for the words cut before a space (nearly all), which saves building
        # " " + word at every lookup. For code cut into pre-tokens: pre-token -> ids, filled by
        # encode_word directly (encode_piece would run the pattern again on each new one).
        self.cache = _Cache(self.encode_piece)
        self.after_space = _Cache(self._encode_after_space)
        self.pretokens = _Cache(self.encode_word)

    def encode_word(self, pretoken: str) -> list[int]:
        """§1's encode_word, the same ids: fast_merge's loop, or for a long pre-token a heap."""
        data = pretoken.encode("utf-8")
        if self.ignore_merges and data in self.id_of:
            return [self.id_of[data]]
        if len(data) > LONG_PRETOKEN_BYTES:  # ids in an array: 4 bytes each, not a list's 8
            return self.fast_merge_with_heap(array("i", map(self.byte_ids.__getitem__, data)))
        return self.fast_merge([self.byte_ids[b] for b in data])

    def fast_merge(self, ids: list[int]) -> list[int]:
        """§1's merge loop in encode_word, on the ids of a pre-token's bytes: the leftmost
        occurrence of the earliest-learned pair is merged at each step, and each pair's rank is
        kept in a list, updated only beside the merge."""
        rank = self.merge_rank.get
        ranks = list(map(rank, zip(ids, ids[1:]), repeat(_NOT_A_MERGE)))  # ranks[i]: ids[i:i+2]
        while ranks:
            best = min(ranks)
            if best == _NOT_A_MERGE:
                break
            i = ranks.index(best)
            ids[i:i + 2] = [self.merged_id[best]]
            # Only the pairs on either side of the new token change.
            del ranks[i]
            if i > 0:
                ranks[i - 1] = rank((ids[i - 1], ids[i]), _NOT_A_MERGE)
            if i < len(ranks):
                ranks[i] = rank((ids[i], ids[i + 1]), _NOT_A_MERGE)
        return ids

    def fast_merge_with_heap(self, ids: array) -> list[int]:
        """fast_merge for a long pre-token, in O(n log n): the same pair is merged at each step
        (the earliest learned, leftmost first), but a heap finds it instead of a scan, and a
        linked list of symbols merges it without moving the rest.
        Example (a merge (a, a) only): ids of "aaaaa" -> [aa, aa, a], as encode_word gives.

        Memory: a heap of (rank, position) tuples and lists of Python ints took 190 bytes a
        byte of an 8 MB line of letters; here the heap holds ranks, and each rank's positions
        wait in an array of 4-byte ints, 16 bytes a byte in all. The order is the same: merging
        rank r makes only pairs learned after r, so each rank is taken once, leftmost first.
        """
        rank = self.merge_rank.get
        n = len(ids)
        kind = "i" if n < 1 << 31 else "q"
        after = array(kind, range(1, n + 1))    # after[i]: the symbol after i; n: none
        before = array(kind, range(-1, n - 1))  # before[i]: the symbol before i; -1: none
        waiting = defaultdict(partial(array, kind))  # rank -> positions of its pairs' left symbols
        for i, pair in enumerate(zip(ids, islice(ids, 1, None))):
            if (r := rank(pair)) is not None:
                waiting[r].append(i)
        ranks = list(waiting)  # the heap of the ranks waiting
        heapq.heapify(ranks)
        while ranks:
            r = heapq.heappop(ranks)
            for i in sorted_in_place(waiting.pop(r)):
                j = after[i]
                # Entries go stale when a neighbour merges: use one only if its pair is there.
                if ids[i] < 0 or j == n or rank((ids[i], ids[j])) != r:
                    continue
                # Merge: i takes the new token, j leaves the list.
                ids[i], ids[j] = self.merged_id[r], -1
                k = after[i] = after[j]
                if k < n:
                    before[k] = i
                # The new token forms new pairs with its neighbours h and k, to wait their turn.
                for at, right in ((before[i], i), (i, k)):
                    if at >= 0 and right < n and (later := rank((ids[at], ids[right]))) is not None:
                        if later not in waiting:
                            heapq.heappush(ranks, later)
                        waiting[later].append(at)
        # One int object per distinct id: an int read from an array is a new one each time.
        shared: dict[int, int] = {}
        return [shared.setdefault(token, token) for token in ids if token >= 0]

    def encode_piece(self, text: str) -> list[int]:
        """Encode text that holds no special token and pre-tokenizes on its own (a pre-token,
        the first word of a text), through the cache. Example: "Once," -> pre-tokens
        ['Once', ','] -> [id of 'Once', id of ','].

        Letters alone, after at most one space, are one pre-token (` ?\\p{L}+`): such text
        skips the regex and its per-call cost.
        """
        if text.isalpha() or (text[:1] == " " and text[1:].isalpha()):
            return self.encode_word(text)
        pretokens = fast_pretokenize(text)
        if len(pretokens) == 1:
            return self.encode_word(text)
        return list(chain.from_iterable(map(self.cache.__getitem__, pretokens)))

    def _encode_after_space(self, word: str) -> Iterable[int]:
        """The ids of " " + word. The commonest shapes of word take shortcuts that give what
        GPT-2's pattern gives without running it: letters, maybe followed by ASCII punctuation
        (" time," -> " time" + ","), and two parts joined by a newline before a non-space
        ("time.\nThe" -> " time." + "\n" + "The"). Other words go through the pattern."""
        letters = word.rstrip(string.punctuation)
        if letters.isalpha():
            # The letters are one pre-token and the punctuation another (or nothing); the main
            # cache keeps " time" once for "time", "time," and "time!".
            return self.cache[" " + letters] + self.cache[word[len(letters):]]
        head, _, tail = word.partition("\n")
        if tail and not tail[0].isspace():
            # A newline before a non-space is a pre-token of its own, whatever precedes it.
            return self.after_space[head] + self.cache["\n"] + self.cache[tail]
        return self.encode_piece(" " + word)

    # Two ways to cut text for the caches. Words (split at spaces by str.split, several times
    # faster than the pattern) pay off where they repeat, as in prose: 1 in 30 of TinyStories'
    # words is new. In code, 1 in 4 is ("self._buffer.pop()", or a line's end, the next line's
    # indentation and a name joined), and each new one costs the pattern anyway, and more. There
    # pre-tokens, found by the pattern (`re` on ASCII text) and looked up one by one, are twice
    # as fast, as they repeat like prose's words (1 in 60 is new). Runs of spaces tell code (and
    # indented documents) from prose.
    def encode(self, text: str) -> list[int]:
        """The ids §1's Tokenizer.encode gives, from the caches: split the text into words at
        spaces, or into pre-tokens, and look each one up."""
        check_text(text)
        ids: list[int] = []
        with cycle_collector_paused():
            for i, piece in enumerate(split_on_special_tokens(text, self.special_re)):
                if i % 2:
                    ids.append(self.special_ids[piece])
                elif not piece:
                    continue
                elif not self.gpt2_split:  # §1's way, each pre-token looked up
                    if self.normalizer:
                        piece = unicodedata.normalize(self.normalizer, piece)
                    ids.extend(chain.from_iterable(
                        map(self.pretokens.__getitem__, pretokenize(piece, self.split_res))))
                elif UNSAFE_SPACE_RE.search(piece):
                    # The hot loop, all in C: look each pre-token up, extend with its ids.
                    ids.extend(chain.from_iterable(
                        map(self.pretokens.__getitem__, fast_pretokenize(piece))))
                else:  # every space starts a pre-token: split_words would split at each
                    words = piece.split(" ")
                    ids.extend(self.cache[words[0]])
                    ids.extend(chain.from_iterable(
                        map(self.after_space.__getitem__, islice(words, 1, None))))
        return ids

    def encode_iterable(self, texts: Iterable[str]) -> Iterator[int]:
        """Encode a stream of strings (say, the lines of a large file) lazily, giving exactly the
        ids that encode() gives for their concatenation.

        Pieces are joined in a buffer, and everything before the buffer's last safe cut (see
        SAFE_CUT_RE; with other settings than GPT-2's, only before a special token) is
        encoded: what follows such a cut cannot change what precedes it. Only
        newly arrived text is searched for cuts, so the time is linear in the text. Memory holds
        the text since the last cut, usually a line or less; but a single pre-token (a megabyte
        of letters, or of whitespace) has no cut inside, and must be held whole to be encoded
        exactly.
        """
        longest_special = max(map(len, self.special_tokens), default=0)
        buffer = ""                # text not yet encoded
        searched = 0               # buffer[:searched] holds no safe cut
        pending: list[str] = []    # pieces not yet added to the buffer
        pending_size = 0
        for n, text in enumerate(texts):
            check_text(text, f"text {n} of the texts")
            pending.append(text)
            pending_size += len(text)
            # Join pieces once they are as long as the buffer: a pre-token that arrives in a
            # million small pieces is then copied a few times, not a million.
            if pending_size < len(buffer):
                continue
            buffer += "".join(pending)
            pending, pending_size = [], 0
            # Stay clear of the end by the longest special token, which might still be arriving.
            end = len(buffer) - longest_special
            cut = self._last_safe_cut(buffer, searched, end, longest_special)
            searched = max(searched, end)
            if cut > 0:
                yield from self.encode(buffer[:cut])
                buffer = buffer[cut:]
                searched -= cut
        yield from self.encode(buffer + "".join(pending))

    def _last_safe_cut(self, buffer: str, start: int, end: int, longest_special: int) -> int:
        """The last safe cut at a position in [start, end) that no special token spans, or 0.
        Example: ("one\ntwo\nthr", 0, 11, 0) -> 7, the cut between "two" and "\n"."""
        if end <= max(start, 1):
            return 0
        # SAFE_CUT_RE searches backwards, and in that mode its lookbehind sees nothing before
        # pos: pos = start - 1 lets it see the character before a cut at start.
        cuts = (match.start() for match in SAFE_CUT_RE.finditer(buffer, max(start, 1) - 1, end))
        if not self.gpt2_split:  # other patterns may join any two characters: cut at specials
            found = self.special_re.finditer(buffer, max(start - longest_special, 0), end,
                                             overlapped=True) if self.special_re else ()
            cuts = reversed([match.start() for match in found])
        for cut in cuts:
            # Refuse a cut that an occurrence of a special token spans, at any alignment: a
            # special token may hold cuts of its own, like "<|" + "endoftext" + "|>".
            nearby = (self.special_re.finditer(buffer, max(cut - longest_special, 0),
                                               cut + longest_special, overlapped=True)
                      if self.special_re else ())
            if not any(m.start() < cut < m.end() for m in nearby):
                return cut
        return 0


_worker_tokenizer: FastTokenizer | None = None  # the tokenizer that _encode_chunk_in_worker uses


def _init_encoder(tokenizer: FastTokenizer) -> None:
    # Forked workers share the caller's tokenizer (cache included); spawned ones get a pickle.
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk_in_worker(job: tuple[str, int, int, np.dtype]) -> tuple[int, np.ndarray]:
    path, start, end, dtype = job
    ids = _worker_tokenizer.encode(read_text(path, start, end))
    return end - start, np.array(ids, dtype=dtype)


def encode_files(tokenizer: Tokenizer, files: list[tuple[TextSource, str | os.PathLike]],
                 num_workers: int, verbose: bool = False) -> Iterator[int]:
    """Encode texts into token files, given as (text, token path) pairs, a text being a file or
    a byte range of one; yields each file's number of tokens once it is written.

    Workers encode chunks of a few MB (cut at special tokens, so the result equals encoding the
    whole text at once) and the main process appends them in order. One pool serves all the
    files, so the next file finds the workers' caches filled. Output goes to a temporary file
    renamed into place at the end, so an error or Ctrl-C never leaves a half-written file that
    looks complete.
    """
    dtype = token_dtype(max(tokenizer.vocab) + 1)
    # Without special tokens, chunks are cut at line ends, safe for GPT-2's pattern only.
    whole = not tokenizer.special_tokens and tokenizer.settings().keys() - {"ignore_merges"}
    plans = [(source, out_path, [text_range(source)] if whole
              else plan_chunks(source, tokenizer.special_tokens, num_workers))
             for source, out_path in files]
    jobs = [(path, start, end, dtype) for _, _, chunks in plans for path, start, end in chunks]
    results = map_jobs(_encode_chunk_in_worker, jobs, num_workers, ordered=True,
                       initializer=_init_encoder, initargs=(tokenizer,))
    with closing(results):
        for source, out_path, chunks in plans:
            progress = (Progress(f"encode {text_name(source)}", sum(b - a for _, a, b in chunks))
                        if verbose else None)
            tmp_path = f"{out_path}.tmp{os.getpid()}"
            try:
                num_tokens = 0
                with open(tmp_path, "wb") as f:
                    for nbytes, ids in islice(results, len(chunks)):
                        write_all(f, ids.data, out_path)
                        num_tokens += len(ids)
                        if progress:
                            progress.advance(nbytes)
                os.replace(tmp_path, out_path)
            finally:
                # Remove an unfinished file before closing() stops the workers: that takes a
                # moment, and a second Ctrl-C in that moment must not leave the file behind.
                if os.path.exists(tmp_path):
                    os.remove(tmp_path)
            yield num_tokens


def write_token_info(path: str | os.PathLike, fingerprint: str, dtype: np.dtype, num_tokens: int,
                     source: TextSource) -> None:
    """Write the sidecar of the token file `path`: which tokenizer (its fingerprint), type and
    text made it.
    Example: train.bin.json = {"tokenizer_sha256": "9f2c...", "dtype": "uint16",
    "num_tokens": 1431520, "text": "/home/me/data/tinystories_train.txt",
    "text_bytes": [0, 5956704]}."""
    path = os.fspath(path)
    text_path, start, end = text_range(source)
    info = {"tokenizer_sha256": fingerprint, "dtype": dtype.name, "num_tokens": num_tokens,
            "text": os.path.abspath(text_path), "text_bytes": [start, end]}
    write_atomically(path + ".json", (json.dumps(info, indent=1) + "\n").encode("utf-8"))


def check_token_info(path: str | os.PathLike, dtype: np.dtype, tokenizer: Tokenizer | None
                     ) -> None:
    """Refuse a token file whose sidecar names another tokenizer (when `tokenizer` is given),
    another type, or another length. A file without a sidecar, written by an older gpt.py, is
    accepted with a note."""
    path = os.fspath(path)
    info_path = path + ".json"
    if not os.path.exists(info_path):
        log(f"note: {path} has no {os.path.basename(info_path)} (an older gpt.py wrote it), so "
            "which tokenizer made it cannot be checked")
        return
    again = "run `python gpt.py tokenize` again"
    try:
        info = read_json(info_path)
        fingerprint, saved_dtype, num_tokens = (
            info["tokenizer_sha256"], info["dtype"], int(info["num_tokens"]))
        if not (isinstance(fingerprint, str) and isinstance(saved_dtype, str)):
            raise TypeError("tokenizer_sha256 and dtype must be strings")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path} is corrupt ({type(e).__name__}: {e}): {again}") from None
    if tokenizer is not None and fingerprint != tokenizer.fingerprint():
        raise ValueError(f"{path} was encoded by another tokenizer (sha256 {fingerprint[:12]}) "
                         f"than this one ({tokenizer.fingerprint()[:12]}): {again}")
    num_found = os.path.getsize(path) // dtype.itemsize
    if (saved_dtype, num_tokens) != (dtype.name, num_found):
        raise ValueError(f"{path} holds {num_found:,} {dtype.name} tokens, but {info_path} says "
                         f"{num_tokens:,} {saved_dtype}: {again}")


def open_tokens(path: str | os.PathLike, vocab_size: int, tokenizer: Tokenizer | None = None
                ) -> np.memmap:
    """Memory-map a token file written by `tokenize`, checking that it fits the tokenizer: by its
    sidecar (see check_token_info), and by its largest id."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} {not_a_file(path)}: run `python gpt.py tokenize` first")
    dtype = token_dtype(vocab_size)
    size = os.path.getsize(path)
    if size == 0 or size % dtype.itemsize:
        raise ValueError(f"{path} has {size:,} bytes, not a whole number of {dtype.name} tokens "
                         f"(the type for a {vocab_size:,}-token vocabulary)")
    check_token_info(path, dtype, tokenizer)
    data = np.memmap(path, dtype=dtype, mode="r")
    # One pass in slices of 64M ids, so even a huge file never sits in memory whole.
    largest = max(int(data[i:i + (1 << 26)].max()) for i in range(0, len(data), 1 << 26))
    if largest >= vocab_size:
        raise ValueError(f"{path} holds token id {largest:,}, but the tokenizer has only "
                         f"{vocab_size:,} tokens: was it encoded with another tokenizer?")
    return data


def find_story_start(data: np.ndarray, tokenizer: Tokenizer) -> str:
    """What the training text puts between an end-of-text token and the document after it, if
    it is whitespace: "\\n" in the bundled TinyStories files. `sample` puts it after the end
    token before a prompt, so that a story starts as in training (a trained model gave "Once"
    a loss of 12.8 nats right after the end token, 0.68 after "\\n"). The whitespace found most
    often after the end token in the first 1M tokens decides."""
    if end_of_text_id(tokenizer) is None:
        return ""
    text = tokenizer.decode(data[:1 << 20])
    after = Counter(re.findall(re.escape(tokenizer.special_tokens[0]) + r"(\s*)", text))
    return after.most_common(1)[0][0] if after else ""


# ==================================================================================================
# §11 Machinery: checkpoints
#
# Protects §6's training: a checkpoint holds everything to resume or sample, is written
# atomically, and is read without running code (weights_only); a damaged or foreign one is
# refused with one line, before any work.
# ==================================================================================================

def unwrap(model: nn.Module) -> nn.Module:
    """The plain TransformerLM inside torch.compile's or DistributedDataParallel's wrapper."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)      # DistributedDataParallel


def first_line(error: BaseException) -> str:
    """An exception as one short line for an error message: its type and first sentence, without
    the terminal colour codes torch puts in. Example: "EOFError: Ran out of input"."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    message = re.split(r"(?<=[a-z0-9])\.\s", message.splitlines()[0] if message else "")[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    out, **extra) -> None:
    """Save model and optimizer state, the step count and anything in `extra` to `out`.

    `out` is a path or a binary file object. A path is written atomically: to a temporary file in
    the same directory, flushed to disk, then renamed over the old checkpoint, so a crash or kill
    at any moment leaves either the old complete file or the new complete file.
    """
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "iteration": iteration, **extra}
    if not isinstance(out, (str, os.PathLike)):
        torch.save(state, out)
        return
    tmp_path = f"{out}.tmp-{os.getpid()}"  # the pid in the name: see remove_stale_temp_files
    try:
        with open_for_writing(tmp_path) as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, out)
    except (OSError, RuntimeError) as e:
        # A full disk (or a file-size limit) stops the write with an OSError, or with a
        # RuntimeError when it stops inside torch's zip writer.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, RuntimeError):
            reason = f"the write stopped partway, is the disk full? ({first_line(e)})"
        raise OSError(f"could not write checkpoint {out}: {reason}; the previous "
                      f"checkpoint there, if any, is unchanged") from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def remove_stale_temp_files(directory: str) -> list[str]:
    """Remove the temporary files that save_checkpoint left in `directory` when its process died
    before it could clean up (killed, out of memory, power cut); returns their paths.

    Their names end in .tmp-PID: a file whose process no longer runs is garbage, while one of a
    running process may be a checkpoint being written right now, and is left alone.
    Example: latest.pt.tmp-4242 goes if no process 4242 exists.
    """
    if os.name != "posix":
        return []  # os.kill(pid, 0) only asks about a process on POSIX; on Windows it kills it
    removed = []
    for entry in os.scandir(directory):
        match = re.fullmatch(r".+\.tmp-([0-9]+)", entry.name)
        pid = int(match[1]) if match else 0  # pid 0 would ask about our own process group
        if (0 < pid != os.getpid() and entry.is_file(follow_symlinks=False)
                and not process_is_running(pid)):
            os.remove(entry.path)
            removed.append(entry.path)
    return sorted(removed)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value) -> str:
    """A value for an error message: its repr, or its type if the repr is long."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def check_model_config(c: ModelConfig) -> None:
    """Protects §3's ModelConfig: a ValueError naming the bad value if the architecture cannot
    be built, from the flags, a checkpoint or an imported model's config."""
    for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff",
                 "num_kv_heads", "head_dim", "rope_original_context"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            if value is None and name in ("num_kv_heads", "head_dim"):
                continue  # derived in __post_init__
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, allowed in MODEL_CHOICES.items():
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, "
                             f"got {getattr(c, name)!r}")
    D = c.head_dim or c.d_model // c.num_heads
    width = f"{D}" if c.head_dim else f"d_model / num_heads = {c.d_model} / {c.num_heads} = {D}"
    rules = [  # (holds, what to say when it does not), checked in this order
        (c.head_dim or c.d_model % c.num_heads == 0,
         f"d_model {c.d_model} is not divisible by num_heads {c.num_heads}"),
        (c.num_heads % (c.num_kv_heads or 1) == 0,
         f"num_heads {c.num_heads} is not divisible by num_kv_heads {c.num_kv_heads}"),
        (c.position_encoding != "rope" or D % 2 == 0,
         f"RoPE rotates pairs of dimensions, so the head width {width} must be even"),
        (0 < c.rope_theta < math.inf and 0 < c.norm_eps < math.inf,
         f"rope_theta ({c.rope_theta}) and norm_eps ({c.norm_eps}) must be positive and finite"),
        (1 <= c.rope_factor < math.inf and 0 < c.rope_low_freq < c.rope_high_freq < math.inf,
         f"RoPE scaling needs 1 <= rope_factor and 0 < rope_low_freq < rope_high_freq, all "
         f"finite; got {c.rope_factor}, {c.rope_low_freq}, {c.rope_high_freq}"),
        (0 <= c.dropout < 1, f"dropout must be in [0, 1), got {c.dropout!r}"),
        (c.tie_embeddings or c.tie_init == "output",
         f"tie_init {c.tie_init!r} chooses the init of tied embeddings: it needs tie_embeddings"),
        (c.use_norm or c.norm_position == "pre",
         "norm_position 'post' places norms that use_norm False removes: give one or the other")]
    for holds, message in rules:
        if not holds:
            raise ValueError(message)


# The largest architecture a checkpoint may ask for, beyond anything this file trains and
# within what real models use (Qwen's vocabulary of 151,936, Llama 3.2's 131,072 positions).
# With the weights' own shapes (check_state_fits) it refuses a config that would allocate
# without bound before a single tensor is made; context_length is in no weight's shape under
# RoPE, and sizes only the tables that grow with the positions met.
CONFIG_LIMITS = {"vocab_size": MAX_VOCAB_SIZE, "context_length": 1 << 17,  # Llama 3.1's 128k
                 "d_model": 1 << 16, "num_layers": 1 << 10, "num_heads": 1 << 10,
                 "d_ff": 1 << 18, "head_dim": 1 << 12, "rope_original_context": 1 << 17}


def saved_config(saved, name: str, state: dict[str, torch.Tensor] | None = None) -> ModelConfig:
    """The ModelConfig that a checkpoint stores as a dict, checked to be within CONFIG_LIMITS and
    to fit the checkpoint's weights `state` (if given), or a ValueError saying what is wrong.

    Each field must have its annotated type: ModelConfig itself would take tie_embeddings="no"
    (a true value) or a float width, and fail later in a way that names neither.
    """
    if not isinstance(saved, dict):
        raise ValueError(f"{name}: its model config is {shown(saved)}, not a dict")
    kinds = {field.name: field.type for field in fields(ModelConfig)}
    checks = {"int": is_int, "float": is_number, "bool": lambda v: isinstance(v, bool),
              "str": lambda v: isinstance(v, str), "int | None": lambda v: v is None or is_int(v)}
    for key, value in saved.items():
        if key not in kinds:
            raise ValueError(f"{name}: its model config has an unknown field {key!r}")
        if not checks[kinds[key]](value):
            raise ValueError(f"{name}: its model config's {key} should be of type "
                             f"{kinds[key]}, got {shown(value)}")
    try:
        config = ModelConfig(**saved)
    except (TypeError, ValueError) as e:  # a missing field, or a value out of range
        raise ValueError(f"{name}: invalid model config ({e})") from None
    for key, limit in CONFIG_LIMITS.items():
        if getattr(config, key) > limit:
            raise ValueError(f"{name}: its model config asks for {key} {getattr(config, key):,}, "
                             f"more than the {limit:,} gpt.py allows")
    if state is None:
        return config
    layers = {key.split(".")[1] for key in state if key.startswith("layers.")}
    if len(layers) != config.num_layers:
        raise ValueError(f"{name}: its model config asks for {config.num_layers:,} layers, but "
                         f"its weights hold {len(layers):,}")
    with torch.device("meta"):  # the shapes of the model, without allocating its memory
        check_state_fits(TransformerLM(config).state_dict(), state, name)
    return config


def check_optimizer_state(saved, name: str) -> None:
    """Check that `saved` has the shape of AdamW.state_dict(): {"state": {index: {"step": int,
    "exp_avg": tensor, "exp_avg_sq": tensor}}, "param_groups": [{"params": [index, ...],
    "lr", "betas", "eps", "weight_decay"}, ...]}; or, with Muon (Optimizers), also groups
    marked "optimizer": "muon" with a "momentum" for betas, and states of a "momentum_buffer"."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    states = saved.get("state") if isinstance(saved, dict) else None
    good_betas = lambda g: (isinstance(g.get("betas"), (tuple, list)) and len(g["betas"]) == 2
                            and all(map(is_number, g["betas"])))
    good_group = lambda g: (isinstance(g, dict) and isinstance(g.get("params"), list)
                            and all(map(is_int, g["params"]))
                            and all(is_number(g.get(k)) for k in ("lr", "eps", "weight_decay"))
                            and (is_number(g.get("momentum")) if g.get("optimizer") == "muon"
                                 else good_betas(g)))
    adamw_state = lambda s: (is_int(s.get("step")) and all(isinstance(s.get(k), torch.Tensor)
                                                           for k in ("exp_avg", "exp_avg_sq")))
    good_state = lambda s: (isinstance(s, dict) and (
        isinstance(s.get("momentum_buffer"), torch.Tensor) or adamw_state(s)))
    if not (isinstance(groups, list) and all(map(good_group, groups))
            and isinstance(states, dict) and all(map(good_state, states.values()))):
        raise ValueError(f"{name}: its optimizer state is damaged or not that of AdamW or Muon; "
                         f"it cannot be resumed")


def read_checkpoint(src) -> dict:
    """Load a checkpoint's contents onto the CPU, refusing anything that is not plain data, and
    check what every use needs: model state (names -> tensors) and a step count.

    weights_only=True restricts unpickling to tensors and plain containers: a checkpoint from the
    internet can then not run code on this machine.
    """
    name = src if isinstance(src, (str, os.PathLike)) else getattr(src, "name", "checkpoint")
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such checkpoint") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ValueError(f"{name}: cannot read it ({e.strerror})") from None
    except Exception as e:  # a damaged file fails in many ways: zip, pickle, I/O, indexing
        # weights_only refuses a file that asks for a function or a class by name (a GLOBAL),
        # in one of two wordings; other refusals give their reason on a line of their own.
        unsafe = (re.search(r"GLOBAL (\S+?)\.? ", str(e))
                  if isinstance(e, pickle.UnpicklingError) else None)
        if unsafe:
            raise ValueError(f"{name} holds a Python object ({unsafe[1]}) besides tensors and "
                             f"plain data: refused, as loading it could run code") from None
        refusal = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
        reason = f"{type(e).__name__}: {refusal[1]}" if refusal else first_line(e)
        raise ValueError(f"{name} is damaged or truncated, or not a checkpoint at all "
                         f"({reason})") from None
    if not isinstance(checkpoint, dict) or not {"model", "iteration"} <= checkpoint.keys():
        raise ValueError(f"{name}: not a gpt.py checkpoint (no model state or iteration)")
    state, iteration = checkpoint["model"], checkpoint["iteration"]
    if not isinstance(state, dict):
        raise ValueError(f"{name}: its model state is {shown(state)}, not a dict of tensors")
    for key, value in state.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise ValueError(f"{name}: its model state holds {shown(value)} under {shown(key)}, "
                             f"where a tensor under a parameter's name belongs")
        # One tensor at a time (a mask of a byte an element): no copy of all the weights.
        if value.is_floating_point() and not torch.isfinite(value).all():
            what = "NaN" if value.isnan().any() else "infinite values"
            raise ValueError(f"{name}: its weights {key} hold {what}, as those of a diverged "
                             f"run do: refused")
    if not (is_int(iteration) and iteration >= 0):
        raise ValueError(f"{name}: its iteration is {shown(iteration)}, not a step count")
    return checkpoint


def check_resumable(checkpoint: dict, name: str) -> None:
    """Check that a read checkpoint holds everything `train --resume` needs, each of the right
    type, so that a damaged or foreign file fails here, naming what is wrong, and not as a
    traceback in the middle of setting up the run."""
    missing = {"config", "optimizer", "args", "best_val_loss", "total_steps", "rng"}
    missing -= checkpoint.keys()
    if missing:
        raise ValueError(f"{name} lacks {', '.join(sorted(missing))}: not written "
                         f"by `python gpt.py train`, so it cannot be resumed")
    saved_config(checkpoint["config"], name, checkpoint["model"])
    check_optimizer_state(checkpoint["optimizer"], name)
    settings, best, total, rng = (checkpoint[key] for key in
                                  ("args", "best_val_loss", "total_steps", "rng"))
    state_size = torch.Generator().get_state().numel()  # the CPU generator's state, in bytes
    # (what, its value, what it should be, whether it is)
    checks = [
        ("args", settings, "a dict of settings", isinstance(settings, dict)),
        ("best_val_loss", best, "a number", is_number(best) and not math.isnan(best)),
        ("total_steps", total, "a positive integer or None",
         total is None or is_int(total) and total >= 1),
        ("rng", rng, f"a list of {state_size}-byte generator states",
         isinstance(rng, list) and len(rng) > 0
         and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8
                 and s.shape == (state_size,) for s in rng))]
    # The settings that a resumed run takes over from the checkpoint (see train()).
    taken_over = {"preset": (f"one of {', '.join(PRESETS)}",
                             lambda v: isinstance(v, str) and v in PRESETS),
                  "batch_size": ("a positive integer", lambda v: is_int(v) and v >= 1),
                  "lr": ("a number", is_number), "min_lr": ("a number", is_number),
                  "optimizer": ("adamw or muon", lambda v: v in ("adamw", "muon")),
                  "muon_lr": ("a number", is_number)}
    for key, (kind, check) in taken_over.items():
        value = settings.get(key) if isinstance(settings, dict) else None
        checks.append((f"args[{key!r}]", value, kind, value is None or check(value)))
    for what, value, kind, ok in checks:
        if not ok:
            raise ValueError(f"{name}: its {what} should be {kind}, got {shown(value)}; "
                             f"it cannot be resumed")


def check_state_fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                     name: str) -> None:
    """Check that `state` has the names and shapes of a model's state dict `expected`, or say
    exactly how the two architectures differ."""
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"{name} is for a different architecture: missing "
                         f"{missing[:3] or 'nothing'}, unexpected {unexpected[:3] or 'nothing'}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ValueError(f"{name} is for a different architecture: {key} has shape "
                             f"{tuple(state[key].shape)} there, {tuple(tensor.shape)} here")


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Copy `state` into `model`, or say exactly how the two architectures differ."""
    check_state_fits(unwrap(model).state_dict(), state, name)
    unwrap(model).load_state_dict(state)


def restore_checkpoint(checkpoint: dict, model: nn.Module,
                       optimizer: torch.optim.Optimizer | None, name: str) -> int:
    """Copy a read checkpoint's model (and optimizer) state in; returns its iteration."""
    load_model_state(model, checkpoint["model"], name)
    if optimizer is not None:
        saved = checkpoint.get("optimizer")
        if not isinstance(saved, dict):
            raise ValueError(f"{name}: its optimizer state is {shown(saved)}, not a dict")
        try:
            optimizer.load_state_dict(saved)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{name}: its optimizer state does not fit this model "
                             f"({first_line(e)})") from None
        # load_state_dict pairs states with parameters by position only: check the shapes,
        # or a mismatch would fail at the first step, far from its cause.
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if (isinstance(param, torch.Tensor) and isinstance(value, torch.Tensor)
                        and value.ndim and value.shape != param.shape):
                    raise ValueError(f"{name}: its optimizer's {key} has shape "
                                     f"{tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(param.shape)}")
    return checkpoint["iteration"]


def load_checkpoint(src, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Restore model (and optimizer) state from `src`, a path or binary file object; returns the
    iteration it was saved at."""
    name = src if isinstance(src, (str, os.PathLike)) else "the checkpoint"
    return restore_checkpoint(read_checkpoint(src), model, optimizer, name)


def tokenizer_state(tokenizer: Tokenizer) -> dict:
    """The tokenizer as checkpoints store it (saved_tokenizer reads it back): vocab, merges,
    special tokens and, only where they differ from GPT-2's, its settings."""
    return dict(vocab=tokenizer.vocab, merges=tokenizer.merges,
                special_tokens=tokenizer.special_tokens, **tokenizer.settings())


def saved_tokenizer(saved, name: str, vocab_size: int) -> Tokenizer:
    """The tokenizer stored in a checkpoint: {"vocab": {id: bytes}, "merges": [(bytes, bytes),
    ...], "special_tokens": [str, ...]} and any TOKENIZER_SETTINGS, checked before it is
    rebuilt, and checked to cover exactly the ids 0 .. vocab_size - 1 that the model gives."""
    vocab, merges, specials = (saved.get(key) if isinstance(saved, dict) else None
                               for key in ("vocab", "merges", "special_tokens"))
    if not (isinstance(vocab, dict) and vocab
            and all(is_int(i) and isinstance(token, bytes) for i, token in vocab.items())
            and isinstance(merges, (list, tuple))
            and all(isinstance(m, (list, tuple)) and len(m) == 2
                    and all(isinstance(part, bytes) for part in m) for m in merges)
            and isinstance(specials, list) and all(isinstance(s, str) for s in specials)):
        raise ValueError(f"{name}: its tokenizer is damaged or not in gpt.py's form (vocab "
                         f"{{id: bytes}}, merges [(bytes, bytes)], special_tokens [str])")
    settings = check_tokenizer_settings({key: value for key, value in saved.items() if key
                                         not in ("vocab", "merges", "special_tokens")}, name)
    try:
        tokenizer = Tokenizer(vocab, merges, specials, **settings)
    except ValueError as e:  # a merge of unknown tokens, a missing byte, a non-UTF-8 special
        raise ValueError(f"{name}: its tokenizer is inconsistent ({e})") from None
    if max(tokenizer.vocab) + 1 != vocab_size:
        raise ValueError(f"{name}: its tokenizer's ids go up to {max(tokenizer.vocab)}, but its "
                         f"model has a {vocab_size}-token vocabulary")
    return tokenizer


def saved_generation(generation, tokenizer: Tokenizer, name: str) -> dict | None:
    """An imported model's generation settings, checked to be as hf_generation (§16) makes
    them and to name tokens of `tokenizer`; None, for our own models, which have none."""
    if generation is None:
        return None
    ids = lambda v: isinstance(v, list) and all(is_int(i) and i in tokenizer.vocab for i in v)
    chat = generation.get("chat") if isinstance(generation, dict) else None
    texts = lambda c: [c["before"], c["after"], c["end"], c["template"]]
    chatml = lambda c: (all(isinstance(t, str) for t in texts(c))
                        and c["end"] in tokenizer.special_ids)
    other = lambda c: texts(c)[:3] == [None] * 3 and isinstance(c["template"], str)
    good_chat = chat is None or (isinstance(chat, dict) and chat.keys() == {
        "before", "after", "end", "template"} and (chatml(chat) or other(chat)))
    if not (isinstance(generation, dict) and generation.keys() == {"bos_ids", "eos_ids", "chat"}
            and ids(generation["bos_ids"]) and ids(generation["eos_ids"]) and good_chat):
        raise ValueError(f"{name}: its generation settings are damaged, or name tokens its "
                         f"tokenizer lacks")
    return generation


# What each kind of run is continued with: a checkpoint records its kind, so that `--resume`
# cannot carry a fine-tuned model back into pretraining, or the other way round.
RUN_KINDS = {"pretraining": "train", "fine-tuning": "finetune"}


def run_kind(checkpoint: dict, name: str) -> str:
    """"pretraining" or "fine-tuning". A checkpoint from before gpt.py recorded it tells by its
    settings: only `finetune` has --train-on-everything."""
    kind = checkpoint.get("kind")
    if kind is None:
        return "fine-tuning" if "train_on_everything" in checkpoint["args"] else "pretraining"
    if kind not in RUN_KINDS:
        raise ValueError(f"{name}: its kind is {shown(kind)}, not one of {', '.join(RUN_KINDS)}")
    return kind


def check_run_kind(checkpoint: dict, name: str, kind: str) -> None:
    """Refuse to resume a run of the other kind: `train` continues pretraining only, and
    `finetune` fine-tuning only."""
    saved = run_kind(checkpoint, name)
    if saved != kind:
        raise ValueError(f"{name} is a {saved} run, not a {kind} one: continue it with "
                         f"`python gpt.py {RUN_KINDS[saved]} --resume`, or give another "
                         f"--out-dir")


def check_same_tokenizer(checkpoint: dict, name: str, tokenizer: Tokenizer, source: str) -> None:
    """Refuse to resume a run with another tokenizer than it learned (the same ids would then
    mean other tokens). A checkpoint from before gpt.py recorded the tokenizer's fingerprint
    has it computed from the tokenizer it stores."""
    saved = checkpoint.get("tokenizer_fingerprint")
    if saved is None and "tokenizer" in checkpoint:
        vocab_size = checkpoint["config"]["vocab_size"]
        saved = saved_tokenizer(checkpoint["tokenizer"], name, vocab_size).fingerprint()
    if saved is not None and not isinstance(saved, str):
        raise ValueError(f"{name}: its tokenizer_fingerprint is {shown(saved)}, not a string")
    here = tokenizer.fingerprint()
    if saved not in (None, here):
        raise ValueError(f"{name} was trained with another tokenizer than {source} "
                         f"(fingerprint {saved[:12]}... there, {here[:12]}... here): resume "
                         f"with the tokenizer it was trained with, or give another --out-dir")


def saved_story_start(checkpoint: dict, name: str) -> str:
    """The text a checkpoint's training data puts after the end-of-text token (see
    find_story_start); "" for a checkpoint of an older gpt.py, whose prompts follow the bare
    end token as they always did."""
    start = checkpoint.get("story_start", "")
    if start != "" and not (isinstance(start, str) and len(start) <= 16 and start.isspace()):
        raise ValueError(f"{name}: its story_start is {shown(start)}, not a little whitespace")
    return start


def read_model(path: str) -> tuple[TransformerLM, Tokenizer, dict]:
    """The model (on the CPU, in evaluation mode), the tokenizer and the checkpoint they were
    rebuilt from, a training checkpoint or a weights-only one, each part checked."""
    checkpoint = read_checkpoint(path)
    if not {"config", "tokenizer"} <= checkpoint.keys():
        raise ValueError(f"{path}: no model config or tokenizer in it; was it written by "
                         f"`python gpt.py train`?")
    config = saved_config(checkpoint["config"], path, checkpoint["model"])
    tokenizer = saved_tokenizer(checkpoint["tokenizer"], path, config.vocab_size)
    model = TransformerLM(config)
    load_model_state(model, checkpoint["model"], path)
    return model.eval(), tokenizer, checkpoint


def load_for_sampling(path: str, device: torch.device) -> tuple[TransformerLM, Tokenizer]:
    """Rebuild the model and the tokenizer from a checkpoint alone."""
    model, tokenizer, _ = read_model(path)
    return model.to(device), tokenizer


def newest_checkpoint(run_dir: str) -> str:
    """The most recently written .pt file in run_dir."""
    paths = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.endswith(".pt")] \
        if os.path.isdir(run_dir) else []
    paths = [p for p in paths if os.path.isfile(p)]  # not a directory that happens to end in .pt
    if not paths:
        raise ValueError(f"no checkpoint in {run_dir}: train one with `python gpt.py train`, "
                         f"or give --checkpoint PATH")
    return max(paths, key=lambda p: (os.path.getmtime(p), p.endswith("latest.pt")))


# ==================================================================================================
# §12 Machinery: devices, precision and several processes
#
# Speeds up §3-§6 where the hardware allows: CUDA, then Apple's MPS, then the CPU; bf16
# autocast where it is fast; torch.compile, checked against eager gradients; and torchrun's
# processes, one per GPU, averaging gradients with DistributedDataParallel. Last, the fast twins
# of §3's modules: the same functions in fewer passes over memory and fused kernels.
# ==================================================================================================

# What `train` picks on a CUDA GPU when no --preset is given. The laptop recipe keeps a GPU
# nearly idle (about 100k of the 2.5M tokens/s an H200 reached with this one): the base model
# at 128 x 256 tokens a step, with bf16 autocast and torch.compile, fills the card.
GPU_RECIPE = dict(preset="base", batch_size=128)


# torch.compile on a CPU: about 20 s to compile the laptop model on the 2-core CPU here, then
# steps about 1.3x faster (8,400 against 6,600 tokens/s), so it pays for itself after about a
# minute and a half; the default 10-minute run gets 2,299 steps instead of 1,789 (README).
CPU_COMPILE_MIN_TIME = 300.0  # seconds: time budgets at least this long compile on a CPU


def pick_recipe(args: argparse.Namespace, device: torch.device) -> str | None:
    """Fill in the preset, batch size and --compile the user left open, by device; return a
    line saying why when the device chose the recipe, else None."""
    on_gpu = device.type == "cuda"
    if args.readable:
        # A debugger cannot step into the code torch.compile generates: --readable is eager.
        if args.compile:
            raise ValueError("--readable runs eagerly, so that a debugger can step through it: "
                             "drop --compile")
        args.compile = False
    if args.compile is None:
        # On a GPU, fused kernels are worth the minute of compiling. On a CPU, for a time
        # budget of some minutes (a step budget says nothing about time). Not on MPS, where
        # the compiler's Metal backend is still young.
        long_on_cpu = device.type == "cpu" and (args.max_time or 0.0) >= CPU_COMPILE_MIN_TIME
        args.compile = on_gpu or long_on_cpu
    if args.preset is not None or not on_gpu:
        args.preset = args.preset or "laptop"
        return None
    args.preset = GPU_RECIPE["preset"]
    args.batch_size = args.batch_size or GPU_RECIPE["batch_size"]
    return (f"recipe: on a CUDA GPU, preset {args.preset} at batch {args.batch_size}"
            f"{', compiled' if args.compile else ''} (--preset laptop for the CPU recipe)")


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA, then Apple's MPS, then the CPU, unless `requested` names one."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r}: expected cpu, cuda, cuda:N, mps or "
                         f"auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {requested}: this machine has "
                         f"{torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {requested}: MPS is not available on this machine")
    return device


def rank_device(device: torch.device, local_rank: int, local_world_size: int) -> torch.device:
    """The device of one of torchrun's processes: GPU number LOCAL_RANK, one GPU each; or the CPU.
    Every process checks the count, so all stop together rather than wait for each other."""
    if device.type != "cuda":
        return device
    gpus = torch.cuda.device_count()
    if local_world_size > gpus:
        raise ValueError(f"torchrun started {local_world_size} processes on a machine with "
                         f"{gpus} GPU(s): one process per GPU (--nproc_per_node {gpus}), or "
                         f"--device cpu")
    return torch.device("cuda", local_rank)


def cpu_has_fast_bf16() -> bool:
    """True on x86 CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), which multiply bf16
    matrices about twice as fast as float32 ones; elsewhere bf16 is emulated, and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, requested: str) -> torch.dtype | None:
    """The dtype of mixed precision for --dtype, or None for plain float32."""
    if requested == "float32":
        return None
    if requested == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        # bf16 needs no loss scaling; GPUs without native bf16 (before Ampere) stay in float32.
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else None
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


# Machinery for §6's training step and evaluation, and §2's batches: a line there each.
def autocast(device: torch.device, amp: torch.dtype | None):
    """Mixed precision for a forward pass: with amp bfloat16 the matmuls run in bf16 (the norms
    and the loss stay in float32, as §3 and §4 write them); None: plain float32."""
    return torch.autocast(device.type, dtype=amp, enabled=amp is not None)


def gradients_held(model: nn.Module, last: bool):
    """Under torchrun, DistributedDataParallel's no_sync for every micro-batch but the last:
    their backward keeps the gradients on this process, and the last one's exchanges them all
    at once. A model on one process: nothing."""
    return nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to CUDA through page-locked memory, so that the copy runs
    while the GPU is still busy with the last step."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on `device` (the machine's RAM for the CPU and MPS), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_batch_fits(rows: int, positions: int, vocab_size: int, device: torch.device,
                     flag: str, bytes_per_logit: int = 4) -> None:
    """Refuse a batch whose (rows, positions, V) logits alone exceed the device's memory (in
    training, 4 bytes each at the least: bf16 logits and their bf16 gradient). Such a batch
    would fail anyway, and on Linux often not with an error but with the kernel killing the
    process (and maybe others) once the memory is touched. A batch that passes can still fail,
    with the out-of-memory error train() reports."""
    need, have = rows * positions * vocab_size * bytes_per_logit, device_memory(device)
    if have is not None and need > have:
        raise ValueError(f"{flag} {rows:,} cannot fit: its logits alone need "
                         f"{need / 2**30:,.0f} GiB and {device} has {have / 2**30:,.0f} GiB; "
                         f"try a smaller {flag}")


def is_out_of_memory(error: BaseException) -> bool:
    """Python and numpy raise MemoryError; torch a RuntimeError that says "CUDA out of memory"
    (its subclass torch.OutOfMemoryError), "MPS backend out of memory", or, on the CPU,
    "DefaultCPUAllocator: can't allocate memory"."""
    text = str(error)
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError)
        and ("out of memory" in text or "can't allocate memory" in text))


def broadcast(value, world_size: int):
    """Rank 0's `value` on every rank (a decision all ranks must share)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_mean(value: torch.Tensor, world_size: int) -> float:
    """The mean of a scalar tensor over all ranks, as a Python float."""
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)  # a sum: gloo has no average
        value /= world_size
    return value.item()


# Compiled and eager gradients differ by rounding only: float32 agrees to about 1e-6 and bf16
# autocast to about 1e-3; a compiler bug shows as a difference near 1 (seen: 1.0).
COMPILED_GRADIENT_TOLERANCE = 0.1


def compiled_gradient_error(model: nn.Module, compiled: nn.Module, compiled_loss_fn,
                            x: torch.Tensor, y: torch.Tensor,
                            amp: torch.dtype | None = None) -> tuple[float, str]:
    """The worst relative difference |g_compiled - g_eager| / |g_eager|, over the parameters,
    between one batch's gradients computed by `model` with cross_entropy and by its compiled
    version with `compiled_loss_fn`; and the parameter's name. Leaves no gradients behind.

    torch.compile must compute the same function: float32 agrees to about 1e-6, bf16 autocast
    to about 1e-3 (the two round at different places).
    """
    grads = []
    for forward, loss_fn in ((model, cross_entropy), (compiled, compiled_loss_fn)):
        model.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            logits = forward(x)  # (B, T, V)
        loss_fn(logits, y).backward()
        grads.append({name: p.grad.float() for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    eager, compiled_grads = grads
    errors = {name: ((compiled_grads[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
              for name, g in eager.items()}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


# --- The model's fast twins (§3) -----------------------------------------------------------------
# Each subclasses its readable form in §3 and overrides how it computes, never what it holds, so
# a fast and a readable model have the same parameters and state-dict keys: a checkpoint from
# one loads in the other. §19 switches them in; tests check each against its readable form.

# The fast twin of §3's Embedding.
class FastEmbedding(Embedding):
    """weight[token_ids], written as index_select: its backward sums the gradient rows with
    index_add, several times faster on a CPU than the scatter behind plain indexing."""

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Plain indexing: the compiler writes its own kernel for the backward's sum of rows.
            return super().forward(token_ids)  # (B, T) -> (B, T, C)
        rows = self.weight.index_select(0, token_ids.reshape(-1))  # (B*T, C)
        return rows.view(*token_ids.shape, -1)                      # (B, T, C)


# For the fast twin of §3's RMSNorm, in training: its backward, derived by hand.
class FastRMSNormFunction(torch.autograd.Function):
    """RMSNorm's forward and its backward, derived by hand.

    With r = 1 / sqrt(mean(x^2) + eps), xhat = x * r and y = xhat * g, for an upstream gradient
    dy and u = dy * g:
        dL/dg = sum over positions of dy * xhat
        dL/dx = r * (u - xhat * mean(u * xhat))       (the second term is the path through r)
    Autograd would keep and walk every intermediate of the forward; this needs about half the
    passes over memory, which makes the model's dozen norms noticeably cheaper.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))     # (..., C), as in RMSNorm
        r = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, gain, r)
        return (x32 * r).mul_(gain).to(x.dtype)                      # (..., C)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, gain, r = ctx.saved_tensors
        xhat = x.to(r.dtype) * r          # recomputed: cheaper than keeping it from the forward
        dy = dy.to(r.dtype)
        dgain = (dy * xhat).flatten(0, -2).sum(0)  # (C,)
        u = dy * gain                                                         # (..., C)
        dx = (u - xhat.mul_((u * xhat).mean(-1, keepdim=True))).mul_(r)       # (..., C)
        return dx.to(x.dtype), dgain, None


# The fast twin of §3's RMSNorm.
class FastRMSNorm(RMSNorm):
    """RMSNorm through FastRMSNormFunction when a backward will follow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            # Evaluation and generation: no backward, so skip the autograd.Function, whose
            # bookkeeping is a large share of a one-token generation step. Under torch.compile
            # the compiler derives the backward of the plain formula and fuses it itself.
            return super().forward(x)
        return FastRMSNormFunction.apply(x, self.weight, self.eps)  # (..., C) -> (..., C)


# For the fast twins of §3's attention and SwiGLU: several projections of x in one product.
def fast_project(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x @ [W1; W2; ...]^T: x times several weight matrices, the results side by side.

    For many rows (training), one product with the stacked weights keeps the cores busier than
    several small ones; for a few rows (generation, one token at a time), stacking the weights
    would cost more than the products. Either way the weights stay separate matrices, as in the
    state dict.
    """
    # 64 rows: a training batch has thousands (B x T), generation one per sample; the cut lies
    # anywhere between, and 64 leaves room for batched sampling.
    if x.numel() >= 64 * x.shape[-1]:
        return x @ torch.cat(weights).T               # (..., C) @ (C, sum of d_out)
    return torch.cat([x @ w.T for w in weights], dim=-1)


# The fast twin of §3's MultiHeadSelfAttention.
class FastMultiHeadSelfAttention(MultiHeadSelfAttention):
    """One product for the three projections, and F.scaled_dot_product_attention, whose fused
    kernels (flash, memory-efficient) never store the (T, S) scores, as tiled_attention (below)
    shows; its plain C++ fallback, where they do not apply, does."""

    def queries_keys_values(self, x: torch.Tensor,
                            start_pos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        H, KV, D = self.num_heads, self.num_kv_heads, self.head_dim
        weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
        qkv = fast_project(x, weights)                             # (B, T, (H + 2KV) D)
        qkv = qkv.view(B, T, H + 2 * KV, D).transpose(1, 2)        # (B, H + 2KV, T, D)
        qk, v = qkv[:, :H + KV], qkv[:, H + KV:]                   # queries and keys; values
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        if self.rope is not None:
            # Queries and keys rotate alike, so one call turns both: (B, H + KV, T, D).
            self.rope.cover(start_pos + T)
            qk = self.rope(qk, torch.arange(start_pos, start_pos + T, device=x.device))
        return qk[:, :H], qk[:, H:], v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int) -> torch.Tensor:
        T, S = q.shape[-2], k.shape[-2]
        # GQA: enable_gqa shares each key/value head with its group of queries, with no copies.
        fused = partial(F.scaled_dot_product_attention, q, k, v,
                        dropout_p=self.dropout_p if self.training else 0.0,
                        enable_gqa=q.shape[1] != k.shape[1])
        if T == S and T <= window:  # plain causal attention: the kernels need no mask
            return fused(is_causal=True)
        # One new token, which sees every cached key (KVCache, §7). Not is_causal: for 1 query
        # and S keys PyTorch aligns that mask top-left, keeping only the first key.
        if T == 1 and S <= window:
            return fused()
        return fused(attn_mask=sliding_causal_mask(T, window, q.device, num_keys=S))  # (T, S)


# The fast twin of §3's SwiGLU.
class FastSwiGLU(SwiGLU):
    """SwiGLU with w1 x and w3 x in one product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d_ff = self.w1.weight.shape[0]
        gate, up = fast_project(x, (self.w1.weight, self.w3.weight)).split(d_ff, -1)  # (B, T, F)
        return self.w2(self.activation(gate) * up)  # (B, T, F) -> (B, T, C)


# What F.scaled_dot_product_attention does inside, written out to be read (and tested): a
# memory trick rather than a new idea, and far too slow in Python for the model to use.
def tiled_attention(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, causal: bool = True,
                    block: int = 64) -> torch.Tensor:
    """The same softmax(Q K^T / sqrt(D)) V, one (block, block) tile of scores at a time: the idea
    of FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023), written out to be read.

    The plain version writes the whole (T, S) score matrix to memory and reads it back twice
    (softmax, then @ V); at T = 1024 that is 4 MB per head, far more traffic than Q, K and V
    themselves. Here each query block walks the key blocks keeping, per query, a running max m,
    a running sum l of exp(score - m) and an unnormalised output o. When a new block raises the
    max, the old l and o were summed against a smaller m and are rescaled by exp(m_old - m_new):
        o = o * exp(m_old - m_new) + exp(s - m_new) @ V_j,   l = l * exp(..) + sum exp(s - m_new)
    and o / l at the end is exactly the softmax-weighted sum. A GPU kernel keeps a tile in fast
    on-chip memory, so scores never reach main memory. With causal=True, T == S and query i
    sees keys 0..i; key blocks wholly in a query block's future are skipped.
    """
    T, S, D = Q.shape[-2], K.shape[-2], Q.shape[-1]
    out = torch.empty_like(Q)
    for i in range(0, T, block):
        q = Q[..., i:i + block, :] / math.sqrt(D)                        # (.., Tq, D)
        m = q.new_full((*q.shape[:-1], 1), -math.inf)                    # running max (.., Tq, 1)
        l = q.new_zeros(*q.shape[:-1], 1)                                # running sum (.., Tq, 1)
        o = torch.zeros_like(q)                                          # output (.., Tq, D)
        for j in range(0, min(S, i + block) if causal else S, block):
            s = q @ K[..., j:j + block, :].transpose(-2, -1)  # (.., Tq, D) @ (.., D, Tk)
            if causal:
                query = torch.arange(i, i + s.shape[-2], device=s.device)[:, None]
                key = torch.arange(j, j + s.shape[-1], device=s.device)[None, :]
                s = s.masked_fill(key > query, -math.inf)                # (.., Tq, Tk)
            # The first key block holds key 0, which every query sees: m is finite from here.
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            p = torch.exp(s - m_new)                                     # (.., Tq, Tk)
            rescale = torch.exp(m - m_new)                               # (.., Tq, 1)
            l = l * rescale + p.sum(-1, keepdim=True)
            o = o * rescale + p @ V[..., j:j + block, :]  # (.., Tq, Tk) @ (.., Tk, D)
            m = m_new
        out[..., i:i + block, :] = o / l
    return out


# ==================================================================================================
# §13 Machinery: time budgets and signals
#
# Protects a run's time and work: the schedule is planned to end when the budget does, and
# Ctrl-C or SIGTERM finish the step and save before the process exits.
# ==================================================================================================

def parse_duration(text: str) -> float:
    """Seconds in "90", "90s", "10m" or "1.5h". Example: "1.5h" -> 5400.0."""
    units = {"s": 1, "m": 60, "h": 3600}
    amount, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(amount) * units[unit]
    except ValueError:
        raise ValueError(f"expected a duration like 90s, 10m or 2h, got {text!r}") from None
    if not 0 < seconds < math.inf:
        raise ValueError(f"expected a positive, finite duration, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Example: 75 -> "1m15s", 3725 -> "1h02m"."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class TimeBudget:
    """Plans the number of steps so that the cosine schedule ends as a time budget runs out.

    The plan is made again at every step from the recent step times, so a run whose machine
    slows down (or speeds up) halfway still ends its schedule at the deadline, not with the
    learning rate at its peak or with minutes unused. The time of the last evaluation and of a
    checkpoint is kept aside for the final ones, so the run as a whole ends within its budget.
    """

    WARMUP_STEPS = 2   # the first steps compile kernels and warm caches: not timed
    TIMED_STEPS = 10   # steps timed before the first plan: enough to average out noise
    RECENT_STEPS = 50  # the plan follows the mean of the last 50 steps: a slowdown shows soon

    def __init__(self, seconds: float, used: float = 0.0):
        self.seconds = seconds
        self.started = time.perf_counter() - used  # a resumed run goes on with its own clock
        self.step_seconds: list[float] = []
        self.eval_seconds = 0.0  # the last evaluation's duration
        self.save_seconds = 0.0  # the last checkpoint's duration

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def reserve(self) -> float:
        """Seconds to keep for the final evaluation and checkpoints (latest.pt and best.pt);
        until a checkpoint has been timed, assume it takes as long as an evaluation."""
        return self.eval_seconds + 2 * (self.save_seconds or self.eval_seconds)

    def plan(self, step: int, eval_interval: float, evals_left: int = 0) -> int | None:
        """The step at which the schedule should end, or None while the steps are being timed.
        Example: at step 100 with 60 s left, 0.5 s a step, and 2 s for an evaluation with its
        checkpoints every 250 steps -> 100 + int((60 - 2) / (0.5 + 2 / 250)) = 214. Evaluations
        at set times instead (eval_interval inf), evals_left of them before the final one: their
        time is kept aside too."""
        timed = self.step_seconds[self.WARMUP_STEPS:]
        if len(timed) < self.TIMED_STEPS:
            return None
        recent = timed[-self.RECENT_STEPS:]
        # Each step also owes its share of the evaluation and checkpoints every eval_interval.
        per_step = sum(recent) / len(recent) + self.reserve() / eval_interval
        left = self.seconds - self.elapsed() - self.reserve() * (1 + evals_left)
        return step + max(1, int(left / per_step))

    def is_over(self) -> bool:
        """True once only the time kept for the final evaluation and checkpoint is left."""
        return self.elapsed() + self.reserve() >= self.seconds


@contextmanager
def stop_requests(enabled: bool = True):
    """Yield a list that becomes non-empty when Ctrl-C (SIGINT) or SIGTERM arrives: the loop then
    stops after its current step and saves. SIGTERM is what `kill`, job schedulers and cloud
    preemption send, so it gets the same care. A second signal quits at once."""
    requested: list[str] = []

    def request_stop(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)
        log(f"\n{requested[0]}: stopping after this step to save a checkpoint (again to quit "
            f"now)")

    # Under torchrun every rank would decide alone and they would fall out of step.
    names = (signal.SIGINT, signal.SIGTERM) if enabled else ()
    previous = {name: signal.signal(name, request_stop) for name in names}
    try:
        yield requested
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)


# ==================================================================================================
# §14 Machinery: the training run
#
# Drives §6's train_step: check every input, build or restore the model and optimizer, then
# the loop: learning rate -> maybe evaluate and checkpoint -> step -> log.
# ==================================================================================================

# When a run evaluates. Under a time budget: at step 0, at the first step past each 1/EVAL_POINTS
# of the budget, and at the end, a curve of 17 points on any machine (every 250 steps gives a
# 10-minute run 3 points on a slow CPU, 13 on a fast one), on as many validation batches as
# keep all the evaluations within EVAL_SHARE of the budget (size_evaluation). Under --max-steps,
# or given --eval-interval: every EVAL_INTERVAL steps, on EVAL_BATCHES batches.
EVAL_POINTS, EVAL_SHARE = 16, 0.05
EVAL_INTERVAL, EVAL_BATCHES, MIN_EVAL_BATCHES = 250, 20, 2


def resolve_config(args: argparse.Namespace, vocab_size: int,
                   saved: dict | None = None) -> ModelConfig:
    """The preset (or a resumed checkpoint's config), with every flag the user gave on top."""
    base = dict(saved) if saved else {k: v for k, v in PRESETS[args.preset].items()
                                      if k in ModelConfig.__dataclass_fields__}
    if saved and saved["vocab_size"] != vocab_size:
        raise ValueError(f"the checkpoint in {args.out_dir} is for a {saved['vocab_size']:,}-token "
                         f"vocabulary, but {args.data_dir}/tokenizer has {vocab_size:,} tokens")
    base["vocab_size"] = vocab_size
    overrides = {name: getattr(args, name) for name in ModelConfig.__dataclass_fields__
                 if getattr(args, name, None) is not None}
    config = ModelConfig(**{**base, **overrides})
    if saved:
        saved = asdict(ModelConfig(**saved))  # fields newer than the checkpoint: defaults
        changed = [f"{name} {saved[name]} -> {value}" for name, value in asdict(config).items()
                   if saved[name] != value]
        if changed:
            raise ValueError(f"the checkpoint in {args.out_dir} has another configuration "
                             f"({', '.join(changed)}); drop them, or use another --out-dir")
    return config


def check_run_dir(args: argparse.Namespace) -> None:
    """A fresh run must not silently replace the checkpoints of an earlier one in OUT_DIR."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in OUT_DIR and --overwrite replaces it: "
                         "give one or the other")
    metrics = os.path.join(args.out_dir, "metrics.jsonl")
    if os.path.islink(metrics):  # open_for_writing refuses it too; this says so before any work
        raise ValueError(f"{metrics} is a symbolic link: gpt.py writes only files of its own, "
                         f"never through a link; remove it or give another --out-dir")
    existing = [name for name in ("latest.pt", "best.pt")
                if os.path.exists(os.path.join(args.out_dir, name))]
    if existing and not (args.resume or args.overwrite):
        raise ValueError(f"{args.out_dir} already holds a run ({' and '.join(existing)}): "
                         f"continue it with --resume, train into another --out-dir, or replace "
                         f"it with --overwrite")


def plan_resume(args: argparse.Namespace, checkpoint: dict, path: str) -> tuple[int | None, float]:
    """How a resumed run goes on: (the step its schedule ends at, if known yet; the seconds of its
    time budget already used). Sets args.max_steps, args.max_time and args.decay_steps to match.

    An interrupted run continues exactly where it stopped, within its own budget, unless a new
    --max-steps or --max-time is given. A finished run is extended only when asked (--max-steps
    beyond its last step, or a --max-time), and its cosine has ended: the extra steps train at
    --min-lr. One longer run would differ, since its cosine would stretch over all the steps.
    """
    step, saved, total = checkpoint["iteration"], checkpoint["args"], checkpoint["total_steps"]
    finished = checkpoint.get("finished", total is not None and step >= total)
    new_budget = args.max_steps is not None or args.max_time is not None
    if not finished:
        if new_budget:
            return args.max_steps, 0.0
        args.max_steps, args.max_time = saved.get("max_steps"), saved.get("max_time")
        if isinstance(args.max_time, str):  # written by an older gpt.py: "10m"
            args.max_time = parse_duration(args.max_time)
        return total, checkpoint.get("elapsed", 0.0)
    if not new_budget:
        raise ValueError(f"the run in {path} finished at step {step}; to train it further, "
                         f"give --max-steps beyond {step} or a --max-time")
    if args.max_steps is not None and args.max_steps <= step:
        raise ValueError(f"--max-steps {args.max_steps}: {path} already has {step} steps")
    if args.decay_steps is None:
        args.decay_steps = step  # where the cosine ended: the extra steps run at --min-lr
    return args.max_steps, 0.0


class TrainingMeter:
    """`train`'s live line, redrawn in place under the log lines (Run.say clears it first), on a
    terminal only: a log file keeps the log lines alone.
        step 412/1789 | loss 3.0625 | 6,391 tok/s | ETA 7m30s"""

    def __init__(self, stream):
        self.stream = stream
        self.last = -math.inf  # when the line was last drawn
        self.drawn = False     # whether a line is on the screen now

    def update(self, run, loss: torch.Tensor) -> None:
        """Redraw after a step, at most every 0.2 s: reading the loss makes a CPU wait for its
        GPU, which a few times a second costs little."""
        now = time.perf_counter()
        if now - self.last < 0.2:
            return
        self.last = now
        recent = run.budget.step_seconds[-10:]  # the current speed
        speed = run.tokens_per_step * len(recent) / max(sum(recent), 1e-9)
        eta = format_duration(time_left(run)) if run.total_steps else "?"  # "?" until planned
        # \r goes back to the start of the line; \033[K (ANSI) erases what a longer line left.
        self.stream.write(f"\rstep {run.step}/{run.total_steps or '?'} | loss {loss.item():.4f} | "
                          f"{speed:,.0f} tok/s | ETA {eta}\033[K")
        self.stream.flush()
        self.drawn = True

    def clear(self) -> None:
        """Erase the line, so that a log line can take its place."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False


@dataclass
class Run:
    """What one training run holds, made by start_run and advanced by train_loop."""
    args: argparse.Namespace
    device: torch.device
    rank: int                    # this process among torchrun's (0 when alone)
    world_size: int              # processes training together
    amp: torch.dtype | None      # autocast dtype, or None for float32
    tokenizer: Tokenizer
    train_data: np.ndarray       # token ids, memory-mapped
    valid_data: np.ndarray
    config: ModelConfig
    batch_size: int              # sequences per micro-batch and process
    max_lr: float
    min_lr: float
    model: nn.Module = None      # the plain model: its weights, saved in checkpoints
    fast_model: nn.Module = None  # what steps call: the model, compiled and/or DDP-wrapped
    eval_model: nn.Module = None  # what evaluation calls: compiled, never DDP-wrapped
    loss_fn: object = None       # cross_entropy, maybe compiled
    optimizer: torch.optim.Optimizer = None  # AdamW, or Optimizers of Muon and AdamW
    batch_rng: torch.Generator = None
    eval_starts: np.ndarray = None  # the validation windows, the same at every evaluation
    step: int = 0
    best_val_loss: float = math.inf
    total_steps: int | None = None  # where the schedule ends; None until a time budget plans it
    budget: TimeBudget = None
    metrics: object = None       # the open metrics.jsonl (rank 0)
    loss_sum: torch.Tensor = None  # training loss summed on the device since the last log
    steps_since_log: int = 0
    announced: bool = False      # whether the time budget's plan has been printed
    next_eval: float | None = None  # the time cadence's: elapsed seconds when the next is due
    evaluations: int = 0         # by this command, and the seconds they took
    eval_seconds: float = 0.0
    meter: TrainingMeter | None = None  # the live line, on a terminal (rank 0)
    # What fine-tuning (`finetune`) changes; None, for `train`: get_batch, cross_entropy,
    # evaluate() on the valid windows, random weights.
    get_batch: object = None       # (train_data, B, T, device, generator) -> x, y (B, T) each
    loss: object = None            # (logits, targets) -> mean loss; loss_fn is it, maybe compiled
    evaluate: object = None        # run -> validation loss
    start_from: str | None = None  # a checkpoint whose weights a fresh run starts from
    kind: str = "pretraining"      # or "fine-tuning": recorded in checkpoints (see RUN_KINDS)
    story_start: str = ""          # what the data puts after the end token: find_story_start
    generation: dict | None = None  # an imported model's (saved_generation): kept in checkpoints
    row_length: int = 0            # positions per row: the context, or fine-tuning's shorter rows

    def __post_init__(self):
        self.row_length = self.row_length or self.config.context_length

    def say(self, message: str) -> None:
        if self.rank == 0:  # one process talks for all
            if self.meter:
                self.meter.clear()
            print(message, flush=True)

    def path(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.args.grad_accum * self.row_length * self.world_size


def time_left(run: Run) -> float:
    """Seconds to the end of the run: a time budget's own remainder (the plan ends the run
    then); under --max-steps, the mean step so far times the steps to go, within any budget."""
    budget = run.budget
    left = budget.seconds - budget.elapsed()
    if run.args.max_steps is not None:
        mean_step = sum(budget.step_seconds) / len(budget.step_seconds)
        left = min(left, mean_step * (run.total_steps - run.step))
    return max(left, 0.0)


def start_process(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """(device, rank, world size): one process, or one of several started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(args.device)
    if world_size > 1:
        device = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")),
                             int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # NCCL moves gradients from GPU to GPU; gloo works between CPU processes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        # TF32: float32 matmuls on tensor cores with a 10-bit mantissa, several times faster.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, rank, world_size


def read_resume(args: argparse.Namespace,
                kind: str = "pretraining") -> tuple[dict | None, int | None, float]:
    """With --resume: the checkpoint to continue (a run of this kind), where its schedule ends
    and the seconds of its budget used; flags not given again are those the run started with."""
    if not args.resume:
        return None, args.max_steps, 0.0
    path = os.path.join(args.out_dir, "latest.pt")
    if not os.path.exists(path):
        raise ValueError(f"--resume: there is no {path} to resume from")
    checkpoint = read_checkpoint(path)
    check_resumable(checkpoint, path)
    check_run_kind(checkpoint, path, kind)
    # The checkpoint holds the state of the optimizer the run started with (AdamW before Muon).
    optimizer = checkpoint["args"].get("optimizer") or "adamw"
    if args.optimizer not in (None, optimizer):
        raise ValueError(f"--optimizer {args.optimizer}: the run in {path} trains with "
                         f"{optimizer}, whose state its checkpoint holds; resume it without "
                         f"--optimizer, or train into another --out-dir")
    args.optimizer = optimizer
    for name, value in checkpoint["args"].items():
        if (name in ("preset", "batch_size", "lr", "min_lr", "weight_decay", "beta2", "muon_lr",
                     "eval_batches") and getattr(args, name) is None):
            setattr(args, name, value)
    return (checkpoint, *plan_resume(args, checkpoint, path))


def settle_optimizer(args: argparse.Namespace, lr: float) -> tuple[float, float]:
    """The peak and final learning rates (--lr, else `lr`; --min-lr, else a tenth). Fills in
    --weight-decay, --beta2 and --optimizer left open: the preset's, or without a preset
    (fine-tuning a trained model) GPT-3's 0.1 and 0.95, and AdamW; with Muon, --muon-lr too."""
    max_lr = lr if args.lr is None else args.lr
    min_lr = max_lr / 10 if args.min_lr is None else args.min_lr
    if not min_lr <= max_lr:
        raise ValueError(f"--min-lr {min_lr:g} is above the peak learning rate --lr {max_lr:g}")
    usual = dict(weight_decay=0.1, beta2=0.95, optimizer="adamw")
    for name in usual:
        if getattr(args, name) is None:
            setattr(args, name, PRESETS[args.preset].get(name, usual[name]) if args.preset
                    else usual[name])
    if args.optimizer == "adamw" and args.muon_lr is not None:
        raise ValueError(f"--muon-lr {args.muon_lr:g} is Muon's learning rate, and the optimizer "
                         f"is AdamW alone: drop it, or give --optimizer muon")
    if args.optimizer == "muon" and args.muon_lr is None:
        args.muon_lr = PRESETS[args.preset].get("muon_lr", MUON_LR) if args.preset else MUON_LR
    return max_lr, min_lr


def settle_recipe(args: argparse.Namespace, device: torch.device, vocab_size: int,
                  saved: dict | None = None) -> tuple[str | None, ModelConfig, float, float]:
    """Fill in the flags left open (by the device, the preset, or the config `saved` of a run
    resumed), refusing any that conflict: returns start_run's recipe line, config and lrs."""
    if args.max_steps is None and args.max_time is None:
        args.max_time = 600.0  # the default budget: 10 minutes
    if args.max_steps is not None or args.eval_interval is not None:  # every N steps
        args.eval_interval = args.eval_interval or EVAL_INTERVAL
        args.eval_batches = args.eval_batches or EVAL_BATCHES
    recipe = pick_recipe(args, device)
    config = resolve_config(args, vocab_size, saved)
    return recipe, config, *settle_optimizer(args, PRESETS[args.preset]["lr"])


def start_run(args: argparse.Namespace) -> tuple[Run, dict | None, float]:
    """Check every input before any work (a mistake should cost seconds, not an hour) and
    settle the recipe; returns the run, the checkpoint to resume and the budget already used."""
    device, rank, world_size = start_process(args)
    check_run_dir(args)
    tokenizer_dir = os.path.join(args.data_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"{tokenizer_dir} not found: run `python gpt.py tokenize` first")
    tokenizer = Tokenizer.load(tokenizer_dir)
    vocab_size = max(tokenizer.vocab) + 1
    train_data = open_tokens(os.path.join(args.data_dir, "train.bin"), vocab_size, tokenizer)
    valid_data = open_tokens(os.path.join(args.data_dir, "valid.bin"), vocab_size, tokenizer)
    checkpoint, total_steps, time_used = read_resume(args)
    if checkpoint:
        check_same_tokenizer(checkpoint, os.path.join(args.out_dir, "latest.pt"), tokenizer,
                             tokenizer_dir)
    recipe, config, max_lr, min_lr = settle_recipe(args, device, vocab_size,
                                                   checkpoint and checkpoint["config"])
    run = Run(args, device, rank, world_size, autocast_dtype(device, args.dtype), tokenizer,
              train_data, valid_data, config, args.batch_size or PRESETS[args.preset]["batch_size"],
              max_lr, min_lr, total_steps=total_steps,
              story_start=find_story_start(train_data, tokenizer))
    T = config.context_length
    check_batch_fits(run.batch_size, T, vocab_size, device, "--batch-size")
    for name, data in (("train.bin", train_data), ("valid.bin", valid_data)):
        if len(data) <= T:
            raise ValueError(f"{name} has {len(data):,} tokens, too few for one window of "
                             f"context_length {T}")
    if rank == 0:
        check_writable_dir(args.out_dir)
        for path in remove_stale_temp_files(args.out_dir):
            log(f"removed {path}, left by a run killed while saving")
    if recipe:
        run.say(recipe)
    return run, checkpoint, time_used


def compile_model(run: Run) -> None:
    """With --compile, torch.compile the model and the loss, if that keeps the eager gradients."""
    run.eval_model, run.loss_fn = run.model, run.loss or cross_entropy
    if not run.args.compile:
        return
    # torch.compile fuses the many elementwise operations (norms, RoPE, SwiGLU, the loss's
    # formula) into a few generated kernels, backward included. The first step pays for the
    # compilation: typically half a minute to a minute.
    compiled, loss_fn = torch.compile(run.model), torch.compile(run.loss_fn)
    # A compiler bug would train a wrong model for hours without a sign (one did, on CUDA:
    # see the README). One batch, eager and compiled, must give the same gradients.
    x, y = batch_at(run.valid_data, run.eval_starts[:run.batch_size],
                    run.config.context_length, run.device)
    try:
        error, name = compiled_gradient_error(run.model, compiled, loss_fn, x, y, run.amp)
    except Exception as e:
        # No C++ compiler for the CPU, an unsupported platform, a compiler bug: each has its own
        # exception type, and none should stop a run that trains as well (if slower) without.
        run.model.zero_grad(set_to_none=True)  # the check's half-made gradients
        run.say(f"torch.compile failed ({first_line(e)}); training without it")
        return
    if broadcast(error, run.world_size) > COMPILED_GRADIENT_TOLERANCE:
        run.say(f"torch.compile changed the gradients ({name}: relative difference "
                f"{error:.1e}); training without it")
        return
    run.eval_model, run.loss_fn = compiled, loss_fn


class Optimizers(torch.optim.Optimizer):
    """Several optimizers stepping as one, for `train --optimizer muon` (§4's Muon and AdamW):
    one list of param groups, each naming its optimizer under "optimizer", and one state, so the
    schedule, the checkpoints and --resume see one optimizer. Each step lends every optimizer
    its groups and the shared state, all that any torch optimizer steps from."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        super().__init__([{**group, "optimizer": name} for name, optimizer in optimizers.items()
                          for group in optimizer.param_groups], {})

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "train_step computes the loss itself"
        for name, optimizer in self.optimizers.items():
            optimizer.param_groups = [g for g in self.param_groups if g["optimizer"] == name]
            optimizer.state = self.state  # keyed by parameter: no two optimizers share one
            optimizer.step()


def make_optimizer(run: Run) -> torch.optim.Optimizer:
    """AdamW; with --optimizer muon, Muon for the weight matrices inside the blocks, AdamW else."""
    args, params = run.args, list(run.model.parameters())
    # Muon is for matrices that map one hidden space to another (Jordan 2024): the embedding (a
    # lookup table whose rows each see few gradients) and the output layer stay with AdamW.
    hidden = ([p for p in run.model.layers.parameters() if p.ndim == 2]
              if args.optimizer == "muon" else [])
    rest = [p for p in params if all(p is not q for q in hidden)]
    adamw = AdamW(adamw_groups(rest, args.weight_decay), lr=run.max_lr,
                  betas=(args.beta1, args.beta2))
    if not hidden:
        return adamw
    # Decoupled decay shrinks W by lr * weight_decay a step: Muon's, at its larger learning
    # rate, is set for the same shrink as AdamW's, and the schedule keeps the two in step.
    # Newton-Schulz runs in bf16 where the run computes in bf16 (as Jordan's and torch's Muon
    # do), in float32 where bf16 matmuls are emulated, and slower.
    decay = args.weight_decay * run.max_lr / args.muon_lr
    # Its group peaks at --muon-lr: set_lr scales the one schedule to both peaks.
    muon = Muon([{"params": hidden, "lr_scale": args.muon_lr / run.max_lr}], lr=args.muon_lr,
                weight_decay=decay, ns_dtype=run.amp or torch.float32)
    # Under torchrun, DDP has averaged the gradients before the step: every rank holds the same
    # gradient and momentum, so computes the same update, and the weights stay identical.
    return Optimizers({"muon": muon, "adamw": adamw})


def build_model(run: Run, checkpoint: dict | None) -> None:
    """The model, its optimizer and the random state: fresh, or as the checkpoint left them."""
    args = run.args
    torch.manual_seed(args.seed)
    run.model = TransformerLM(run.config).to(run.device)
    run.optimizer = make_optimizer(run)
    # Each rank draws its own batches from its own generator, saved in every checkpoint.
    run.batch_rng = torch.Generator().manual_seed(args.seed + run.rank)
    if checkpoint:
        # The optimizer's state holds its hyperparameters (betas, weight decay): kept on resume.
        run.step = restore_checkpoint(checkpoint, run.model, run.optimizer, run.path("latest.pt"))
        run.best_val_loss = checkpoint["best_val_loss"]
        run.batch_rng.set_state(checkpoint["rng"][run.rank % len(checkpoint["rng"])])
        run.say(f"resumed from {run.path('latest.pt')} at step {run.step}")
        if args.decay_steps is not None and run.step >= args.decay_steps:
            run.say(f"the cosine ended at step {args.decay_steps}: the steps from {run.step} on "
                    f"train at the minimum learning rate, {run.min_lr:g}")
    elif run.start_from:  # fine-tuning: a trained model's weights, with a fresh optimizer
        load_checkpoint(run.start_from, run.model)
    if run.eval_starts is None:  # fine-tuning brings its own: the held-out pairs
        # Left open (the time cadence), EVAL_BATCHES until the first evaluation sizes them.
        run.eval_starts = evaluation_starts(len(run.valid_data), run.config.context_length,
                                            (args.eval_batches or EVAL_BATCHES) * run.batch_size)
    compile_model(run)
    run.fast_model = run.eval_model
    if run.world_size > 1:
        # DDP averages the gradients of all ranks during backward, overlapping the
        # communication with the computation of the remaining layers' gradients.
        run.fast_model = DistributedDataParallel(
            run.eval_model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def describe(run: Run, num_params: int) -> None:
    """The lines that open a run's log: model, device and precision, data and recipe."""
    args, T = run.args, run.row_length
    precision = "float32" if run.amp is None else f"{str(run.amp).replace('torch.', '')} autocast"
    ranks = f" x {run.world_size} ranks" if run.world_size > 1 else ""
    run.say(f"model: {run.config}")
    run.say(f"parameters: {num_params:,} ({num_params / 1e6:.1f}M) | device {run.device}{ranks} "
            f"| {precision}{' | compiled' if run.eval_model is not run.model else ''}")
    run.say(f"data: {len(run.train_data):,} train and {len(run.valid_data):,} valid tokens | "
            f"{run.tokens_per_step:,} tokens per step ({run.batch_size} x {T} x {args.grad_accum} "
            f"accum{ranks}) | lr {run.max_lr:g} -> {run.min_lr:g}, warmup {args.warmup_steps} "
            f"steps")
    muon = [p for g in run.optimizer.param_groups if g.get("optimizer") == "muon"
            for p in g["params"]]
    if muon:
        run.say(f"optimizer: Muon for the {len(muon)} weight matrices of the blocks (lr "
                f"{args.muon_lr:g} -> {run.min_lr * args.muon_lr / run.max_lr:g}), AdamW for "
                f"the rest")


def record(run: Run, **fields) -> None:
    """One line of metrics.jsonl, for plotting."""
    if run.metrics:
        run.metrics.write(json.dumps({**fields, "tokens": run.step * run.tokens_per_step}) + "\n")
        run.metrics.flush()


def save_run(run: Run, path: str, finished: bool = False) -> None:
    """A checkpoint of the run as it stands: everything to resume it exactly or sample from it."""
    started = time.perf_counter()
    rng_states = [run.batch_rng.get_state()]
    if run.world_size > 1:
        rng_states = [None] * run.world_size
        dist.all_gather_object(rng_states, run.batch_rng.get_state())
    if run.rank == 0:
        save_checkpoint(run.model, run.optimizer, run.step, path, config=asdict(run.config),
                        args={k: v for k, v in vars(run.args).items()
                              if isinstance(v, (str, int, float, bool, type(None)))},
                        tokenizer=tokenizer_state(run.tokenizer),
                        tokenizer_fingerprint=run.tokenizer.fingerprint(), kind=run.kind,
                        best_val_loss=run.best_val_loss, total_steps=run.total_steps,
                        finished=finished, elapsed=run.budget.elapsed(), rng=rng_states,
                        story_start=run.story_start,
                        **({"generation": run.generation} if run.generation else {}))
    run.budget.save_seconds = time.perf_counter() - started


def check_finite(run: Run, loss: float, what: str) -> None:
    if not math.isfinite(loss):
        raise ValueError(f"the {what} became {loss} at step {run.step}: training diverged (try a "
                         f"lower --lr); the last good checkpoint is kept in {run.args.out_dir}")


def next_mark(budget: TimeBudget) -> float:
    """The elapsed seconds at which the next 1/EVAL_POINTS of the budget will have passed."""
    mark = budget.seconds / EVAL_POINTS
    return (budget.elapsed() // mark + 1) * mark


def size_evaluation(run: Run) -> None:
    """Set --eval-batches, left open under a time budget, to the most batches (at least
    MIN_EVAL_BATCHES, at most EVAL_BATCHES) that the run's EVAL_POINTS + 1 evaluations (step
    0, each mark, the end) run in EVAL_SHARE of the budget, timing one batch twice after a
    first that may compile. The checkpoints keep the count: --resume uses the same windows."""
    B, T = run.batch_size, run.config.context_length
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        evaluate(run.eval_model, run.valid_data, run.eval_starts[:B], B, T, run.device, run.amp)
        seconds.append(time.perf_counter() - started)
    per_batch = max((seconds[1] + seconds[2]) / 2, 1e-9)
    fit = int(run.budget.seconds * EVAL_SHARE / (EVAL_POINTS + 1) / per_batch)
    run.args.eval_batches = broadcast(min(max(fit, MIN_EVAL_BATCHES), EVAL_BATCHES),
                                      run.world_size)
    run.eval_starts = evaluation_starts(len(run.valid_data), T, run.args.eval_batches * B)


def format_perplexity(loss: float) -> str:
    """e^loss as the logs show it: two decimals, or a power of ten where it is large (a model
    whose logits start large, as tied embeddings with the embedding's init, starts near a loss
    of 181: e^181 ~ 4.6e+78, and past a loss of 709 e^loss overflows a float).
    Example: 2.3089 -> "10.06", 181.13 -> "4.6e+78"."""
    # Decimal's exp has no float's range, and rounds 9.96e+78 up to 1.0e+79.
    return f"{math.exp(loss):.2f}" if loss < 20 else f"{Decimal(loss).exp():.1e}"


def evaluate_and_save(run: Run, finished: bool) -> None:
    """Evaluate on the validation windows, log it, and checkpoint (best.pt when it improved)."""
    started = time.perf_counter()
    if run.args.eval_batches is None:
        size_evaluation(run)
    timed = time.perf_counter()  # the budget plans with the time of an evaluation itself
    val_loss = (run.evaluate(run) if run.evaluate else
                evaluate(run.eval_model, run.valid_data, run.eval_starts, run.batch_size,
                         run.config.context_length, run.device, run.amp))
    val_loss = broadcast(val_loss, run.world_size)  # the same "best" on every rank
    run.budget.eval_seconds = time.perf_counter() - timed
    run.eval_seconds += time.perf_counter() - started
    run.evaluations += 1
    check_finite(run, val_loss, "validation loss")
    is_best = val_loss < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, val_loss)
    run.say(f"step {run.step:>6} | val loss {val_loss:.4f} | val ppl "
            f"{format_perplexity(val_loss)}{' | best so far' if is_best else ''}")
    record(run, step=run.step, val_loss=round(val_loss, 5), elapsed=round(run.budget.elapsed(), 2))
    if run.step > 0:
        save_run(run, run.path("latest.pt"), finished)
        if is_best:
            save_run(run, run.path("best.pt"), finished)
    # The time cadence's next: the first mark after this evaluation ends, not one it outlasted
    # (on a busy machine, evaluations would otherwise follow each other step after step).
    run.next_eval = next_mark(run.budget)


def log_progress(run: Run, lr: float, grad_norm: torch.Tensor) -> None:
    """The log line of the last few steps: loss, lr, gradient norm, speed and time left."""
    budget = run.budget
    train_loss = rank_mean(run.loss_sum, run.world_size) / run.steps_since_log
    check_finite(run, train_loss, "training loss")
    recent = budget.step_seconds[-run.steps_since_log:]
    tokens_per_s = run.tokens_per_step * run.steps_since_log / sum(recent)
    elapsed = budget.elapsed()
    run.say(f"step {run.step:>6}/{run.total_steps or '?'} | loss {train_loss:.4f} | "
            f"lr {lr:.2e} | grad norm {grad_norm.item():.2f} | {tokens_per_s:,.0f} tok/s | "
            f"{format_duration(elapsed)} elapsed"
            f"{f', {format_duration(time_left(run))} left' if run.total_steps else ''}")
    record(run, step=run.step, train_loss=round(train_loss, 5), lr=lr,
           grad_norm=round(grad_norm.item(), 5), tokens_per_s=round(tokens_per_s),
           elapsed=round(elapsed, 2))
    run.loss_sum.zero_()
    run.steps_since_log = 0


def plan_step(run: Run) -> tuple[bool, bool]:
    """Whether the run is done, and whether to evaluate (see EVAL_POINTS); with a time budget,
    plan the steps again first. Every rank follows rank 0's clock, so all act at the same step."""
    args, budget = run.args, run.budget
    interval, evals_left = args.eval_interval, 0
    if interval:
        due = run.step % interval == 0
    else:  # the time cadence; a resumed run waits for the next mark
        if run.next_eval is None:
            run.next_eval = 0.0 if run.step == 0 else next_mark(budget)
        due, interval = budget.elapsed() >= run.next_eval, math.inf
        passed = int(budget.elapsed() * EVAL_POINTS // budget.seconds)
        evals_left = max(EVAL_POINTS - 1 - passed, 0)
    plan = budget.plan(run.step, interval, evals_left) if args.max_steps is None else None
    done = run.step >= (plan or run.total_steps or math.inf) or budget.is_over()
    done, due, plan = broadcast((done, due, plan), run.world_size)
    if plan is not None:
        run.total_steps = plan
        if not run.announced:
            run.say(f"time budget {format_duration(run.budget.seconds)}: planned "
                    f"{run.total_steps} steps (planned again as the run goes)")
            run.announced = True
    if done:
        run.total_steps = run.step  # the schedule ends here, whatever the plan said
    return done, due or done


def train_loop(run: Run) -> None:
    """The loop: plan -> lr -> maybe evaluate and checkpoint -> train_step -> log."""
    args = run.args
    next_batch = partial(run.get_batch or get_batch, run.train_data, run.batch_size,
                         run.row_length, run.device, run.batch_rng)
    # Losses are summed on the device, so the GPU never waits for the CPU to read them.
    run.loss_sum = torch.zeros((), device=run.device)
    with stop_requests(enabled=run.world_size == 1) as stop_requested:
        while True:
            done, due = plan_step(run)
            decay_end = args.decay_steps or run.total_steps or 10 ** 9  # no plan yet: warmup
            lr = lr_cosine_schedule(run.step, run.max_lr, run.min_lr,
                                    min(args.warmup_steps, decay_end), decay_end)
            set_lr(run.optimizer, lr)
            if due:
                evaluate_and_save(run, finished=done)
            if done:
                return
            if stop_requested:
                check_finite(run, rank_mean(run.loss_sum, run.world_size), "training loss")
                save_run(run, run.path("latest.pt"))
                raise KeyboardInterrupt(f"{stop_requested[0]}: interrupted at step {run.step}: "
                                        f"saved {run.path('latest.pt')}; continue with --resume")
            started = time.perf_counter()
            loss, grad_norm = train_step(run.fast_model, run.optimizer, next_batch,
                                         args.grad_accum, args.grad_clip, run.amp, run.loss_fn)
            run.loss_sum += loss
            run.step += 1
            run.steps_since_log += 1
            run.budget.step_seconds.append(time.perf_counter() - started)
            if run.meter:
                run.meter.update(run, loss)
            if run.step % args.log_interval == 0 or run.step == run.total_steps:
                log_progress(run, lr, grad_norm)


def finish_ranks(run: Run) -> None:
    """Check that every rank ended with the same weights, then leave together."""
    # Every rank applied the same averaged gradients, so all must hold the same weights.
    total = torch.stack([p.detach().double().sum() for p in run.model.parameters()]).sum()
    low, high = total.clone(), total.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    assert low == high, f"ranks disagree: weight sums from {low.item()} to {high.item()}"
    run.say(f"all {run.world_size} ranks hold identical weights")
    # Release DDP's hold on the process group, wait for every rank, close.
    run.fast_model = None
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, start=start_run) -> None:
    """`python gpt.py train`: check the inputs, build the model, run the loop, report.
    `finetune` is this with another start (start_finetune): its own model, data and loss."""
    command_started = time.perf_counter()
    run, checkpoint, time_used = start(args)
    build_model(run, checkpoint)
    describe(run, sum(p.numel() for p in run.model.parameters()))
    if run.rank == 0:
        # A resumed run appends to its metrics; a fresh one starts the file again, and with
        # --overwrite the previous run's checkpoints go now, so `sample` cannot pick up one.
        if not checkpoint:
            for name in ("latest.pt", "best.pt"):
                if os.path.exists(run.path(name)):
                    os.remove(run.path(name))
        run.metrics = open_for_writing(run.path("metrics.jsonl"), "a" if checkpoint else "w")
    # The time budget counts from the start of the command (and, on resume, what the run used).
    run.budget = TimeBudget(args.max_time or math.inf,
                            time_used + time.perf_counter() - command_started)
    run.meter = TrainingMeter(sys.stdout) if run.rank == 0 and sys.stdout.isatty() else None
    try:
        train_loop(run)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise ValueError(f"out of memory on {run.device} with --batch-size {run.batch_size} (and "
                         f"rows of {run.row_length} positions): try a smaller "
                         f"--batch-size, with --grad-accum to keep the tokens per step") from None
    finally:
        if run.metrics:
            run.metrics.close()
        if run.meter:
            run.meter.clear()
    if run.world_size > 1:
        finish_ranks(run)
    written = [name for name in ("latest.pt", "best.pt") if os.path.exists(run.path(name))]
    share = run.eval_seconds / (time.perf_counter() - command_started)
    run.say(f"done: {run.step} steps in {format_duration(run.budget.elapsed())}, best val loss "
            f"{run.best_val_loss:.4f}; {run.evaluations} evaluations took "
            f"{run.eval_seconds:.1f}s ({share:.1%} of the time); checkpoints in {args.out_dir} "
            f"({', '.join(written)})")
    run.say(f"curves: python gpt.py plot {args.out_dir}")


# The classic experiments: arms of (name, train flags), the first the default recipe, each run
# with the same budget, seed and data. What they test, and the seed reports they repeat:
# - lr: the learning-rate sweep (CS336: best near 1e-3 for the 23M model, divergence near 1e-2)
# - norm: RMSNorm removed, and post-norm (Xiong et al. 2020 on why pre-norm trains easier)
# - position: RoPE, none (NoPE: a causal mask alone leaks positions), learned and sinusoidal
# - ffn: SwiGLU against GeGLU, and plain MLPs with SiLU, GELU and ReLU, at equal parameters
# - tying: one matrix for input and output, with either initialisation (Press & Wolf 2017)
# - dropout: 0.1 on attention weights and branch outputs, against none
# - batch, size: two batch sizes; three model sizes around the laptop model
# - optimizer: AdamW alone against Muon for the blocks' matrices (Jordan et al. 2024) at three
#   learning rates. Give --max-steps for equal steps (and --compile for a CPU's speed); the
#   table's loss at equal time reads the other comparison off the same runs.
EXPERIMENTS = {
    "lr": [("lr 3e-3", []), ("lr 1e-4", ["--lr", "1e-4"]), ("lr 1e-3", ["--lr", "1e-3"]),
           ("lr 1e-2", ["--lr", "1e-2"])],
    "norm": [("pre-norm", []), ("post-norm", ["--norm-position", "post"]),
             ("no norm", ["--no-use-norm"])],
    "position": [("rope", []), ("nope", ["--position-encoding", "nope"]),
                 ("learned", ["--position-encoding", "learned"]),
                 ("sinusoidal", ["--position-encoding", "sinusoidal"])],
    "ffn": [("swiglu", []), *((kind, ["--ffn-kind", kind]) for kind in ("geglu", "silu", "gelu",
                                                                        "relu"))],
    "tying": [("untied", []), ("tied, output init", ["--tie-embeddings"]),
              ("tied, embedding init", ["--tie-embeddings", "--tie-init", "embedding"])],
    "dropout": [("dropout 0", []), ("dropout 0.1", ["--dropout", "0.1"])],
    "batch": [("batch 8", []), ("batch 16", ["--batch-size", "16"])],
    "size": [("laptop: 256 wide, 4 layers", []),
             ("128 wide, 2 layers", ["--d-model", "128", "--num-layers", "2", "--num-heads", "4",
                                     "--d-ff", "352"]),
             ("384 wide, 6 layers", ["--d-model", "384", "--num-layers", "6", "--num-heads", "6",
                                     "--d-ff", "1024"])],
    "optimizer": [("muon lr 0.02", []), ("adamw", ["--optimizer", "adamw"]),
                  *((f"muon lr {lr}", ["--optimizer", "muon", "--muon-lr", lr])
                    for lr in ("0.01", "0.04"))],
}


def arm_result(out_dir: str) -> dict:
    """What a finished arm reached, from its latest.pt and its metrics (read_metrics, §17)."""
    records = read_metrics(out_dir)
    evals = [(r["elapsed"], r["val_loss"]) for r in metric_series(records, "val")]
    path = os.path.join(out_dir, "latest.pt")
    checkpoint = read_checkpoint(path)
    config, args = saved_config(checkpoint["config"], path, checkpoint["model"]), checkpoint["args"]
    step = checkpoint["iteration"]
    batch = args["batch_size"] or PRESETS[args["preset"]]["batch_size"]
    return dict(parameters=sum(p.numel() for p in TransformerLM(config).parameters()), steps=step,
                tokens=step * batch * args["grad_accum"] * config.context_length,
                seconds=records[-1]["elapsed"], best=min(loss for _, loss in evals),
                final=evals[-1][1], evals=evals)


def loss_at(evals: list[tuple[float, float]], seconds: float) -> float:
    """The validation loss `seconds` into a run, on the line between the (elapsed, val_loss)
    evaluations around it. Example: (10 s, 4.0) and (30 s, 3.0): 3.25 at 25 s."""
    for (t0, loss0), (t1, loss1) in zip(evals, evals[1:]):
        if t0 <= seconds <= t1:
            return loss0 + (loss1 - loss0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return evals[0][1] if seconds < evals[0][0] else evals[-1][1]


def arm_state(directory: str, argv: list[str]) -> str:
    """What an arm's directory holds of a run of exactly these train flags (its experiment.json):
    "done" (finished), "interrupted" (to resume), or "new" (nothing of theirs)."""
    try:
        with open(os.path.join(directory, "experiment.json"), encoding="utf-8") as f:
            same = json.load(f) == argv
    except (OSError, ValueError, RecursionError):
        return "new"
    path = os.path.join(directory, "latest.pt")
    if not (same and os.path.isfile(path)):
        return "new"
    checkpoint = read_checkpoint(path)
    total = checkpoint.get("total_steps")
    finished = checkpoint.get("finished", total is not None and checkpoint["iteration"] >= total)
    return "done" if finished else "interrupted"


def arm_dir(args: argparse.Namespace, name: str, flags: list[str], arm: str) -> str:
    """Where an arm trains: OUT_DIR/NAME/ARM, or for the default recipe, OUT_DIR/default."""
    if not flags:
        return os.path.join(args.out_dir, "default")
    return os.path.join(args.out_dir, name, re.sub(r"[^a-z0-9]+", "-", arm.lower()).strip("-"))


def write_results(out: str, results: list[tuple[str, list[str], dict]]) -> None:
    """The comparison table of an experiment's arms, printed and written to OUT/results.md."""
    rows = [(arm, " ".join(flags) or "(the default)", r) for arm, flags, r in results]
    # Equal time: where the quickest arm ended. Under a time budget that is about every arm's
    # end; under --max-steps (equal steps) it is the loss the slower arms had by then.
    seconds = min(r["evals"][-1][0] for _, _, r in rows)
    table = ["| arm | flags | parameters | steps | tokens | time | best val loss | "
             f"final val loss | val loss at {format_duration(seconds)} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, flags, r in rows:
        table.append(f"| {arm} | `{flags}` | {r['parameters']:,} | {r['steps']:,} | "
                     f"{r['tokens']:,} | {format_duration(r['seconds'])} | "
                     f"{r['best']:.3f} | {r['final']:.3f} | {loss_at(r['evals'], seconds):.3f} |")
    os.makedirs(out, exist_ok=True)
    write_atomically(os.path.join(out, "results.md"), ("\n".join(table) + "\n").encode())
    print("\n".join(table))
    print(f"results in {os.path.join(out, 'results.md')}")


# ==================================================================================================
# §15 Machinery: tokenize's inputs and outputs
#
# Protects §1-§2's files: every input is checked first, outputs are staged and published
# together, and what a killed run left behind is removed.
# ==================================================================================================

# The bundled TinyStories sample, which `tokenize` encodes when given no text of its own.
BUNDLED_TRAIN, BUNDLED_VALID = "data/tinystories_train.txt", "data/tinystories_valid.txt"
# The share of a --train text held out when no --valid is given: a tenth is the usual choice,
# enough text for a steady validation loss while nine tenths are left to train on.
DEFAULT_VALID_FRACTION = 0.1


def hold_out(path: str, fraction: float, special_tokens: list[str]) -> tuple[int, str]:
    """Where the last `fraction` of a file starts, moved to a document boundary (right after a
    special token) or, in a file without one, to a line boundary: the last one before that
    point, else the first after it. Returns the offset and the kind of boundary.
    Example: fraction 0.1 of a 1,000-byte file whose documents end at 850 and 950 -> 850."""
    size = os.path.getsize(path)
    target = size - max(1, round(size * fraction))
    kinds = [([s.encode("utf-8") for s in special_tokens], "after a special token"),
             ([b"\n"], "after a line break")]
    with mapped(path) as data:
        for marks, where in kinds:
            before = [hit + len(m) for m in marks if (hit := data.rfind(m, 0, target)) >= 0]
            after = [hit + len(m) for m in marks
                     if 0 <= (hit := data.find(m, target)) < size - len(m)]
            if before or after:
                return (max(before) if before else min(after)), where
    raise ValueError(f"{path} has no special token and no line break to cut a validation part "
                     "at: give one with --valid")


def tokenize_inputs(args: argparse.Namespace, special_tokens: list[str]) -> dict[str, TextSource]:
    """The train and valid texts (files, or byte ranges of one), each file checked (it exists,
    is not empty, is UTF-8 throughout) before anything is written. Given neither --train nor
    --valid: the bundled pair. Given --train alone: its end is held out as validation data, so
    that a model of the user's text is judged on text like it, not on TinyStories."""
    holding_out = args.train is not None and args.valid is None
    if args.valid_fraction is not None:
        if not holding_out:
            raise ValueError("--valid-fraction applies only to a --train text without --valid")
        if not 0 < args.valid_fraction < 1:  # NaN fails this test too
            raise ValueError(f"--valid-fraction must be between 0 and 1, got "
                             f"{args.valid_fraction}")
    train_path = BUNDLED_TRAIN if args.train is None else args.train
    train_size = check_text_file(train_path)
    if not holding_out:
        valid_path = BUNDLED_VALID if args.valid is None else args.valid
        check_text_file(valid_path)
        return {"train": train_path, "valid": valid_path}
    fraction = DEFAULT_VALID_FRACTION if args.valid_fraction is None else args.valid_fraction
    cut, where = hold_out(train_path, fraction, special_tokens)
    print(f"valid: held out the last {train_size - cut:,} bytes ({1 - cut / train_size:.1%}) "
          f"of {train_path}, cut {where} at byte {cut:,}")
    return {"train": (train_path, 0, cut), "valid": (train_path, cut, train_size)}


# What a tokenize killed by kill -9 (or a crash, or a power cut) leaves in its output directory,
# each name ending in the id of the process that wrote it: its staging directory, the temporary
# files of an older gpt.py, and check_writable_dir's probe.
LEFTOVER_RE = re.compile(r"(?:\.tokenize-|\.write-test-|(?:train|valid)\.bin(?:\.json)?\.tmp"
                         r"|(?:vocab\.json|merges\.txt|special_tokens\.json)\.tmp)(\d{1,9})")


def remove_leftovers(out_dir: str) -> None:
    """Remove what killed runs of `tokenize` left in out_dir and out_dir/tokenizer, unless the
    process named in it still runs: that is a tokenize at work."""
    if os.name != "posix":
        return  # on Windows, os.kill(pid, 0) would not ask about a process but stop it
    for directory in (out_dir, os.path.join(out_dir, "tokenizer")):
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            match = LEFTOVER_RE.fullmatch(name)
            if match and not process_is_running(int(match[1])):
                path = os.path.join(directory, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
                log(f"removed {path}, left by a run that was killed")


@contextmanager
def staging_dir(out_dir: str) -> Iterator[str]:
    """A new directory in out_dir, named after this process, for a run's outputs until
    publish() moves them into place. It is removed when the block ends, so an error or Ctrl-C
    leaves out_dir as it was; after a kill -9, the next run removes it."""
    path = os.path.join(out_dir, f".tokenize-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)  # left by a dead process that had our id
    os.makedirs(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_destinations(staging: str, out_dir: str, names: list[str]) -> None:
    """Fail before the first file moves if any of them could not: a destination that is a
    directory, a folder we may not write in, or one on another file system than the staging
    directory (os.replace renames; it cannot move a file between file systems)."""
    device = os.stat(staging).st_dev
    for name in names:
        path = os.path.join(out_dir, name)
        folder = os.path.dirname(path)
        if os.path.isdir(path) and not os.path.islink(path):
            raise OSError(f"cannot publish {path}: it is a directory; remove it")
        if os.stat(folder).st_dev != device:
            raise OSError(f"cannot publish into {folder}: it is on another file system than "
                          f"{out_dir} (a mount or a link?)")
        if not os.access(folder, os.W_OK):
            raise OSError(f"cannot publish into {folder}: no permission to write there")


def keep_previous(path: str, backup: str) -> None:
    """A second name (a hard link, else a copy) for the file at `path`, if there is one, so that
    publish can put it back. A link costs no space and no time."""
    if not os.path.lexists(path):
        return
    os.makedirs(os.path.dirname(backup), exist_ok=True)
    try:
        os.link(path, backup, follow_symlinks=False)
    except OSError:  # a file system without hard links
        shutil.copy2(path, backup, follow_symlinks=False)


def publish(staging: str, out_dir: str, names: list[str]) -> None:
    """Move staged files into out_dir, all or none: every destination is checked first, each
    previous file is kept under a second name until all have moved, and a failure on the way
    puts them back (the caller holds Ctrl-C and SIGTERM back). A name not staged is removed
    from out_dir (a file the new outputs must not be read with). The tokenizer goes first and
    each token file before its sidecar, so that a kill -9 or a power cut in the middle leaves
    old token files whose sidecars name the old tokenizer, or a new token file with its old
    sidecar: training refuses both rather than mix them."""
    check_destinations(staging, out_dir, names)
    backups = os.path.join(staging, ".previous")
    moved = []  # the names in place, newest last
    try:
        for name in names:
            path = os.path.join(out_dir, name)
            keep_previous(path, os.path.join(backups, name))
            staged = os.path.join(staging, name)
            os.replace(staged, path) if os.path.lexists(staged) else os.remove(path)
            moved.append(name)
    except OSError as e:
        for done in reversed(moved):
            backup, placed = os.path.join(backups, done), os.path.join(out_dir, done)
            os.replace(backup, placed) if os.path.lexists(backup) else os.remove(placed)
        raise OSError(f"cannot publish {path}: {e.strerror or e}; {out_dir} is as it was") from None


def write_outputs(tokenizer: Tokenizer, sources: dict[str, TextSource], out_dir: str,
                  workers: int, save_tokenizer: bool) -> None:
    """Write the tokenizer (if `save_tokenizer`), the token files and their sidecars into a
    staging directory, then publish them together: a failure or Ctrl-C on the way leaves the
    previous files in out_dir untouched, never a mix of old and new."""
    dtype = token_dtype(max(tokenizer.vocab) + 1)
    fingerprint = tokenizer.fingerprint()
    kept = (f"the previous files in {out_dir} are kept" if os.path.isdir(out_dir)
            and os.listdir(out_dir) else f"nothing was written to {out_dir}")
    with made_if_missing(out_dir), staging_dir(out_dir) as staging:
        names = []  # of the files to publish, relative to staging and out_dir
        files = [(source, os.path.join(staging, f"{split}.bin"))
                 for split, source in sources.items()]
        try:
            if save_tokenizer:
                tokenizer.save(os.path.join(staging, "tokenizer"))
                names += [f"tokenizer/{name}"
                          for name in sorted(os.listdir(os.path.join(staging, "tokenizer")))]
                # An earlier tokenizer's settings would be read with this one's files: publish
                # removes them, as a name it is given but not staged.
                stale = "tokenizer/tokenizer_settings.json"
                names += [stale] * (os.path.lexists(os.path.join(out_dir, stale))
                                    and stale not in names)
            started = time.perf_counter()
            with closing(encode_files(tokenizer, files, workers, verbose=True)) as counts:
                for (split, source), (_, path), num_tokens in zip(sources.items(), files, counts):
                    write_token_info(path, fingerprint, dtype, num_tokens, source)
                    names += [f"{split}.bin", f"{split}.bin.json"]
                    _, start, end = text_range(source)
                    print(f"{split}: {text_name(source)} -> {os.path.join(out_dir, split)}.bin: "
                          f"{num_tokens:,} tokens ({dtype.name}), "
                          f"{(end - start) / max(num_tokens, 1):.2f} bytes/token")
        except OSError as e:
            raise OSError(f"{e}; {kept}") from None
        os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)
        with signals_held():
            publish(staging, out_dir, names)
    seconds = time.perf_counter() - started
    total = sum(end - start for _, start, end in map(text_range, sources.values()))
    print(f"encoded {total / 1e6:,.1f} MB in {seconds:.2f}s with {workers} "
          f"worker{'s' * (workers > 1)}: {total / 1e6 / seconds:.1f} MB/s")


# ==================================================================================================
# §16 Machinery: export to and import from the Hugging Face format
#
# Makes §3's model usable elsewhere. It is a LLaMA (Touvron et al. 2023) in all but names:
# pre-norm RMSNorm, rotary position embeddings, a SwiGLU feed-forward, no biases. So `export`
# writes it as `transformers`' LlamaForCausalLM, which AutoModelForCausalLM.from_pretrained and
# the tools built on it load with no code of ours: config.json, the weights as safetensors (a
# JSON header, then raw little-endian tensors), the tokenizer files, and a weights-only gpt.pt
# for `gpt.py sample`. `import` reads such a directory back, ours or a Llama or Qwen3 model
# trained elsewhere, every header checked before a byte is allocated.
# ==================================================================================================

# Our parameter names -> LlamaForCausalLM's; {i} is the layer.
LLAMA_NAMES = {
    "token_embeddings.weight": "model.embed_tokens.weight",
    "layers.{i}.ln1.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attn.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attn.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attn.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attn.output_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",  # qk_norm only
    "layers.{i}.attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.ln2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.ffn.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",  # silu(w1 x) * w3 x
    "layers.{i}.ffn.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.ffn.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "ln_final.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# The safetensors names of the dtypes a model's tensors can have.
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                      torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def check_exportable(config: ModelConfig) -> None:
    """Refuse, naming the setting, an ablation that a Llama model cannot compute."""
    # (setting, what Llama needs, what Llama has)
    needs = [("use_norm", True, "an RMSNorm before each sublayer"),
             ("norm_position", "pre", "pre-norm blocks, x + f(norm(x))"),
             ("position_encoding", "rope", "rotary position embeddings"),
             ("ffn_kind", "swiglu", "the gated feed-forward with silu, SwiGLU")]
    for name, needed, llama in needs:
        if getattr(config, name) != needed:
            raise ValueError(f"cannot export a model with {name}={getattr(config, name)!r}: a "
                             f"Llama model has only {llama}, {name}={needed!r}")


def rope_halves(weight: torch.Tensor, num_heads: int, inverse: bool = False) -> torch.Tensor:
    """The rows of a query or key projection (H*D, C), reordered within each head for Llama's
    rotary embedding; inverse=True puts Llama's back in our order (`import`).

    Ours turns adjacent pairs (2j, 2j+1) by the angle p * theta^(-2j/D) (RotaryEmbedding);
    Llama's `rotate_half` turns dimension j with j + D/2 by that angle. So our 2j becomes
    Llama's j, and 2j+1 becomes j + D/2: each head's rows in the order 0, 2, ..., D-2, then
    1, 3, ..., D-1. Example, D = 4: rows (0, 1, 2, 3) -> (0, 2, 1, 3). Queries and keys are
    reordered alike, and q.k sums over the D dimensions in any order, so every attention score
    is unchanged; values and the output projection keep their order. qk-norm's gains (D,) move
    with their dimensions: one head of rows.
    """
    D = len(weight) // num_heads
    if inverse:  # (H, 2, D/2, C): Llama's halves -> (H, D/2, 2, C): our pairs
        return weight.reshape(num_heads, 2, D // 2, -1).transpose(1, 2).reshape(weight.shape)
    pairs = weight.reshape(num_heads, D // 2, 2, -1)  # (H, D/2, 2, C): pair j, member 0 or 1
    return pairs.transpose(1, 2).reshape(weight.shape)  # (H, 2, D/2, C): first members, then second


def rope_heads(name: str, config: ModelConfig) -> int | None:
    """How many heads' rows in RoPE's layout parameter `name` holds (see rope_halves), or None:
    H for the queries, KV for the keys, one for qk-norm's gains, which every head shares."""
    kind = name.split(".")[-2]
    return {"q_proj": config.num_heads, "k_proj": config.num_kv_heads, "q_norm": 1,
            "k_norm": 1}.get(kind)


def llama_names(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """LLAMA_NAMES layer by layer, for the parameters in `state`: ours -> Llama's. A tied model
    has no lm_head: `tie_word_embeddings` makes Llama share the embedding."""
    names = {ours.format(i=i): theirs.format(i=i) for ours, theirs in LLAMA_NAMES.items()
             for i in (range(config.num_layers) if "{i}" in ours else [0])}
    assert state.keys() <= names.keys(), f"no Llama names for {state.keys() - names.keys()}"
    return {name: names[name] for name in state
            if not (config.tie_embeddings and name == "lm_head.weight")}


def llama_state_dict(model: TransformerLM) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaForCausalLM's names, q and k reordered for its RoPE."""
    state, out = model.state_dict(), {}
    for ours, theirs in llama_names(model.config, state).items():
        tensor = state[ours]
        if rope_heads(ours, model.config):
            # Our RoPE turns pairs (2j, 2j+1), Llama's (j, j + D/2): see rope_halves.
            tensor = rope_halves(tensor, rope_heads(ours, model.config))
        out[theirs] = tensor.detach().cpu().contiguous()
    return out


def llama_config(config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """config.json: our ModelConfig in the words of `transformers`' LlamaConfig, or of its
    Qwen3Config for a model with qk-norm (Qwen3 is Llama with it)."""
    eos_id = end_of_text_id(tokenizer)
    qwen = config.qk_norm
    hf = {"architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
          "model_type": "qwen3" if qwen else "llama",
          "vocab_size": config.vocab_size, "hidden_size": config.d_model,
          "intermediate_size": config.ffn_hidden, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_kv_heads,  # fewer than the heads under GQA
          "head_dim": config.head_dim, "hidden_act": "silu", "attention_bias": False,
          "attention_dropout": 0.0, "mlp_bias": False, "rms_norm_eps": config.norm_eps,
          "rope_theta": config.rope_theta, "max_position_embeddings": config.context_length,
          "tie_word_embeddings": config.tie_embeddings,
          # One token both ends a story and starts the next, as in GPT-2's config.
          "bos_token_id": eos_id, "eos_token_id": eos_id,
          "torch_dtype": "float32", "use_cache": True}
    if config.rope_factor != 1:  # the Hub's form, which transformers 4 and 5 both read
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": config.rope_factor,
                              "low_freq_factor": config.rope_low_freq,
                              "high_freq_factor": config.rope_high_freq,
                              "original_max_position_embeddings": config.rope_original_context}
    return hf


def tokenizer_json(tokenizer: Tokenizer, bos_ids: list[int] = ()) -> dict:
    """tokenizer.json, which AutoTokenizer loads as a fast tokenizer (Hugging Face's
    `tokenizers`) that gives the ids Tokenizer.encode gives: byte-level BPE with GPT-2's
    pre-tokenizer (or the tokenizer's split patterns, each an Isolated Split, and its
    normalizer), our merges in order, the special tokens cut out first, bos_ids before every
    text. Special tokens are in the vocabulary as written, not spelled (`tokenizers` gives one
    the id it has there); a string BPE built twice keeps its first id, the one our encoder
    produces. ignore_merges is off for ours: a word found whole in the vocabulary would skip
    the merges our encoder applies.
    """
    spell = bytes_to_unicode()
    spelled = lambda token: "".join(spell[b] for b in token)
    vocab = dict(tokenizer.special_ids)  # {"<|endoftext|>": 256}
    for i in sorted(tokenizer.vocab):
        if i not in tokenizer.special_ids.values():
            vocab.setdefault(spelled(tokenizer.vocab[i]), i)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    pre_tokenizer, post_processor = byte_level, byte_level
    if tokenizer.split_patterns != [GPT2_PATTERN]:
        splits = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated",
                   "invert": False} for p in tokenizer.split_patterns]
        pre_tokenizer = {"type": "Sequence",
                         "pretokenizers": [*splits, {**byte_level, "use_regex": False}]}
    if bos_ids:
        names = [tokenizer.vocab[i].decode("utf-8") for i in bos_ids]
        bos = [{"SpecialToken": {"id": name, "type_id": 0}} for name in names]
        text = lambda name, type_id: [{"Sequence": {"id": name, "type_id": type_id}}]
        post_processor = {"type": "TemplateProcessing", "single": bos + text("A", 0),
                          "pair": bos + text("A", 0) + bos + text("B", 1),
                          "special_tokens": {name: {"id": name, "ids": [i], "tokens": [name]}
                                             for name, i in zip(names, bos_ids)}}
    added = [{"id": tokenizer.special_ids[s], "content": s, "single_word": False,
              "lstrip": False, "rstrip": False, "normalized": False, "special": True}
             for s in tokenizer.special_tokens]
    model = {"type": "BPE", "dropout": None, "unk_token": None,
             "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
             "byte_fallback": False, "ignore_merges": tokenizer.ignore_merges, "vocab": vocab,
             "merges": [f"{spelled(a)} {spelled(b)}" for a, b in tokenizer.merges]}
    normalizer = {"type": tokenizer.normalizer} if tokenizer.normalizer else None
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor, "decoder": byte_level, "model": model}


def hf_tokenizer_files(tokenizer: Tokenizer, context_length: int,
                       generation: dict | None = None) -> dict[str, bytes]:
    """The tokenizer as files, by name: ours (which Tokenizer.load reads), tokenizer.json, and
    the two that tell AutoTokenizer which tokens are special (an imported model's bos and eos,
    and chat template, are those it came with)."""
    specials, names = {}, tokenizer.special_tokens
    if generation:
        bos, eos = ([tokenizer.vocab[i].decode("utf-8") for i in generation[key][:1]]
                    for key in ("bos_ids", "eos_ids"))
        specials = {key: ids[0] for key, ids in (("bos_token", bos), ("eos_token", eos)) if ids}
        names = [s for s in names if s not in bos + eos]
    elif tokenizer.special_tokens:
        eos = tokenizer.special_tokens[0]
        specials = {"bos_token": eos, "eos_token": eos}
        names = names[1:]
    if names:
        specials["additional_special_tokens"] = names
    # model_max_length: longer inputs get a warning; cleaning up spaces would turn " ." into ".".
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
                "clean_up_tokenization_spaces": False, **specials}
    if generation and generation["chat"]:
        settings["chat_template"] = generation["chat"]["template"]
    as_json = lambda value: (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
    bos_ids = generation["bos_ids"] if generation else []
    return {**tokenizer.saved_files(),
            "tokenizer.json": as_json(tokenizer_json(tokenizer, bos_ids)),
            "tokenizer_config.json": as_json(settings),
            "special_tokens_map.json": as_json(specials)}


# --- Reading a Hugging Face tokenizer, for `import` -----------------------------------------------
# tokenizer.json describes a pipeline: normalizer, pre-tokenizer, model, post-processor, decoder.
# Llama 3's, Qwen's and SmolLM's are byte-level BPE, which §1's Tokenizer computes with its
# settings; anything else is refused, naming it, rather than given other ids than `tokenizers`.

def hf_split_patterns(spec, where: str) -> list[str]:
    """tokenizer.json's pre_tokenizer as §1's split_patterns. Examples: ByteLevel(use_regex)
    -> [GPT2_PATTERN]; Sequence [Digits(individual_digits), ByteLevel(use_regex)] (SmolLM) ->
    [r"\\p{N}", GPT2_PATTERN]; Sequence [Split(pattern, Isolated), ByteLevel] -> [pattern]."""
    steps = spec["pretokenizers"] if spec and spec.get("type") == "Sequence" else [spec]
    patterns = []
    for i, step in enumerate(steps):
        kind, last = (step or {}).get("type"), i == len(steps) - 1
        if kind == "Split" and not last and step["behavior"] == "Isolated" and not step["invert"]:
            given = step["pattern"]
            patterns.append(given["Regex"] if "Regex" in given else regex.escape(given["String"]))
        elif kind == "Digits" and not last:
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel" and last and step.get("add_prefix_space") is False:
            patterns += [GPT2_PATTERN] if step.get("use_regex", True) else []
        else:
            raise ValueError(f"{where}: its pre-tokenizer {kind} is not supported here: gpt.py "
                             f"reads Split (Isolated, not inverted) and Digits, then ByteLevel "
                             f"without add_prefix_space")
    return patterns


def hf_bpe(model: dict, where: str) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """tokenizer.json's BPE vocabulary and merges ("a b" or ["a", "b"]), unspelled to bytes."""
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: its model is {shown(model.get('type'))}, not BPE; WordPiece "
                         f"and Unigram (SentencePiece) models are not supported")
    for key, plain in (("dropout", None), ("byte_fallback", False),
                       ("continuing_subword_prefix", ""), ("end_of_word_suffix", "")):
        if model.get(key) not in (None, plain):
            raise ValueError(f"{where}: BPE with {key} {shown(model[key])} is not supported")
    unspell = {c: b for b, c in bytes_to_unicode().items()}
    vocab, merges = {}, []
    for token, i in model["vocab"].items():
        if not (is_int(i) and 0 <= i < MAX_VOCAB_SIZE and set(token) <= unspell.keys()):
            raise ValueError(f"{where}: token {token[:30]!r}, id {shown(i)}, is not byte-level")
        vocab[i] = bytes(unspell[c] for c in token)
    for pair in model["merges"]:
        parts = pair.split(" ") if isinstance(pair, str) else pair
        if len(parts) != 2 or not set("".join(parts)) <= unspell.keys():
            raise ValueError(f"{where}: merge {shown(pair)} is not two byte-level tokens")
        merges.append(tuple(bytes(unspell[c] for c in part) for part in parts))
    return vocab, merges


def hf_added_tokens(added: list, vocab: dict[int, bytes], normalizer: bool,
                    where: str) -> list[str]:
    """Put tokenizer.json's added_tokens in vocab at their ids; their contents, in the order of
    their ids, are §1's special tokens: `tokenizers` splits each out whole (special or not, like
    Qwen3's <think>) before it normalizes the text between them."""
    id_of = {token: i for i, token in vocab.items()}
    for token in sorted(added, key=lambda t: t["id"]):
        content, i = token["content"], token["id"]
        data = content.encode("utf-8")
        for flag in ("lstrip", "rstrip", "single_word", "normalized")[:3 + normalizer]:
            if token.get(flag):
                raise ValueError(f"{where}: added token {content!r} with {flag} is not supported")
        if not is_int(i) or vocab.get(i, data) != data or id_of.get(data, i) != i:
            raise ValueError(f"{where}: added token {content!r} has another token's id or bytes")
        vocab[i] = data
    return [token["content"] for token in sorted(added, key=lambda t: t["id"])]


def hf_bos_ids(post, where: str) -> list[int]:
    """The ids tokenizer.json's post_processor puts before every text: Llama 3's
    TemplateProcessing, <|begin_of_text|>; ByteLevel (SmolLM2's, Qwen's) none."""
    bos = []
    steps = post["processors"] if post and post["type"] == "Sequence" else [post] if post else []
    for step in steps:
        # "single" lists what one text becomes: "SpecialToken"s and the text ("Sequence").
        items = [next(iter(item)) for item in step.get("single", [])]
        if step["type"] == "TemplateProcessing" and items == ["SpecialToken"] * (
                len(items) - 1) + ["Sequence"]:
            bos += [i for item in step["single"][:-1]
                    for i in step["special_tokens"][item["SpecialToken"]["id"]]["ids"]]
        elif step["type"] != "ByteLevel":
            raise ValueError(f"{where}: its post-processor {step['type']} is not supported: "
                             f"gpt.py reads ByteLevel, and TemplateProcessing that puts tokens "
                             f"only before the text")
    return bos


def read_hf_tokenizer(hf_dir: str) -> tuple[Tokenizer, dict]:
    """A model directory's tokenizer, which gives the ids `tokenizers` gives, and its generation
    settings (hf_generation), which `import` keeps in the checkpoint under "generation"."""
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir} holds no tokenizer.json, the tokenizer format gpt.py reads")
    spec = read_json(path)
    try:
        normalizer = (spec["normalizer"] or {"type": None})["type"]
        for what, kind, ok in (("normalizer", normalizer, (None, "NFC")),
                               ("decoder", spec["decoder"]["type"], ("ByteLevel",))):
            if kind not in ok:
                raise ValueError(f"{path}: its {what} {kind} is not supported (NFC, ByteLevel)")
        vocab, merges = hf_bpe(spec["model"], path)
        split_patterns = hf_split_patterns(spec["pre_tokenizer"], path)
        special_tokens = hf_added_tokens(spec["added_tokens"], vocab, bool(normalizer), path)
        bos_ids = hf_bos_ids(spec["post_processor"], path)
    except (AttributeError, KeyError, TypeError, StopIteration) as e:
        raise ValueError(f"{path} is not laid out as tokenizer.json is ({first_line(e)})") from None
    try:
        tokenizer = Tokenizer(vocab, merges, special_tokens, split_patterns, normalizer,
                              spec["model"].get("ignore_merges") is True)
    except ValueError as e:  # a merge of tokens not in the vocabulary, a byte missing from it
        raise ValueError(f"{path}: {e}") from None
    return tokenizer, hf_generation(hf_dir, tokenizer, bos_ids)


def chat_format(template: str | None, tokenizer: Tokenizer) -> dict | None:
    """A chat_template read without a template engine, where it is ChatML, SmolLM2-Instruct's
    and Qwen's format (each turn <|im_start|>{role}\\n{text}<|im_end|>\\n): the text before
    and after a user's question, up to the assistant's turn, and the token that ends it
    (qa_template, §18, uses them). Other templates are kept, for export, with None for those.
    Example (SmolLM2-Instruct): {"before": "<|im_start|>system\\nYou are a helpful AI ...
    <|im_end|>\\n<|im_start|>user\\n", "after": "<|im_end|>\\n<|im_start|>assistant\\n",
    "end": "<|im_end|>", "template": template}."""
    chat = {"before": None, "after": None, "end": None, "template": template}
    if template is None or not ({"<|im_start|>", "<|im_end|>"} <= tokenizer.special_ids.keys()
                                and "<|im_start|>" in template and "bos_token" not in template):
        return chat if template is not None else None
    # A system turn written out in the template is put first when none is given (SmolLM2's).
    found = regex.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}\\]*)<\|im_end\|>", template)
    system = f"<|im_start|>system\n{found[1]}<|im_end|>\n" if found else ""
    # Qwen3's template has the model think aloud first unless enable_thinking=False, which
    # renders an empty thinking block: so do we, for the answer to come at once (a small
    # model would spend --max-new-tokens thinking, and finetune's answers hold no thoughts).
    thinking = "<think>\n\n</think>\n\n" if "enable_thinking" in template else ""
    return {**chat, "before": system + "<|im_start|>user\n",
            "after": "<|im_end|>\n<|im_start|>assistant\n" + thinking, "end": "<|im_end|>"}


def hf_generation(hf_dir: str, tokenizer: Tokenizer, bos_ids: list[int]) -> dict:
    """How a model directory's prompts start and generations end: {"bos_ids": the ids before
    every prompt (from tokenizer.json), "eos_ids": the ids that end a generation (those of
    generation_config.json, else config.json, else tokenizer_config.json's eos_token), "chat":
    chat_format of chat_template.jinja or of tokenizer_config.json's chat_template}."""
    files = {}
    for name in ("generation_config.json", "config.json", "tokenizer_config.json"):
        path = os.path.join(hf_dir, name)
        files[name] = read_json(path) if os.path.isfile(path) else {}
        if not isinstance(files[name], dict):
            raise ValueError(f"{path} is not a JSON object")
    settings = files["tokenizer_config.json"]
    eos = files["generation_config.json"].get("eos_token_id",
                                              files["config.json"].get("eos_token_id"))
    if eos is None and settings.get("eos_token"):  # a name, or {"content": name, ...}
        name = settings["eos_token"]
        eos = tokenizer.special_ids.get(name["content"] if isinstance(name, dict) else name)
    jinja = os.path.join(hf_dir, "chat_template.jinja")
    template = read_text(jinja) if os.path.isfile(jinja) else settings.get("chat_template")
    if not isinstance(template, (str, type(None))):
        raise ValueError(f"{hf_dir}: its chat_template is {shown(template)}, not one template")
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    generation = {"bos_ids": bos_ids, "eos_ids": eos_ids,
                  "chat": chat_format(template, tokenizer)}
    return saved_generation(generation, tokenizer, hf_dir)


def little_endian_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements as raw little-endian bytes, whatever the machine's byte order.
    Example: torch.tensor([1.0]) -> b'\\x00\\x00\\x80\\x3f'."""
    size = tensor.element_size()
    # Reinterpreted as integers of the same width (numpy has no bfloat16), which numpy then
    # writes in the byte order asked for; a no-op copy on little-endian machines.
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    array = tensor.detach().cpu().contiguous().reshape(-1).view(ints).numpy()
    return array.astype(f"<{'u' if size == 1 else 'i'}{size}").tobytes()


@contextmanager
def replaced(path: str) -> Iterator:
    """An open binary file that becomes `path` only once the with-block completes, so a crash
    leaves the old file or the new one, never half (write_atomically, for data in pieces)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open_for_writing(tmp) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write tensors in the safetensors format: an 8-byte little-endian header length N, N bytes
    of JSON {name: {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin, end]}}, then
    every tensor's bytes back to back, the offsets counted from the end of the header.
    Example: {"w": a (2, 3) float32} -> header {"w": {"dtype": "F32", "shape": [2, 3],
    "data_offsets": [0, 24]}}, then 24 bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # spaces, so the tensors start 8-byte aligned
    with replaced(path) as f:
        write_all(f, len(text).to_bytes(8, "little") + text, path)
        for tensor in tensors.values():
            write_all(f, little_endian_bytes(tensor), path)


def save_weights_only(state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer,
                      iteration: int, path: str, story_start: str = "", **extra) -> None:
    """A checkpoint with what load_for_sampling reads and nothing else: no optimizer state (two
    thirds of a training checkpoint); `extra` says where it is from (`import`'s)."""
    try:
        with replaced(path) as f:
            torch.save({"model": state, "iteration": iteration, "config": asdict(config),
                        "tokenizer": tokenizer_state(tokenizer),
                        "story_start": story_start, **extra}, f)
    except RuntimeError as e:  # torch's zip writer stops so when the disk is full
        raise OSError(f"cannot write {path}: the write stopped partway, is the disk full? "
                      f"({first_line(e)})") from None


# An export's (or import's) list of the files it wrote: a later one replaces that directory only
# when asked (--overwrite), and only while it holds nothing else.
EXPORT_MARKER = ".gpt-export.json"


def export_sibling(out: str, what: str, pid: int | None = None) -> str:
    """A directory beside `out`, on its file system: "new" for an export being written, "old"
    for the one it replaces. Example: ("hf/llama", "new") -> "hf/.llama.export-new-4242"."""
    parent, base = os.path.split(out)
    return os.path.join(parent, f".{base}.export-{what}-{os.getpid() if pid is None else pid}")


def remove_export_leftovers(out: str) -> None:
    """Clean up after an export killed on the way (kill -9, a power cut): its half-written
    directory goes, and a previous export it had moved aside but not yet replaced comes back."""
    parent, base = os.path.split(out)
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = re.fullmatch(rf"\.{re.escape(base)}\.export-(new|old)-(\d{{1,9}})", name)
        if not match or process_is_running(int(match[2])):
            continue
        path = os.path.join(parent, name)
        if match[1] == "old" and not os.path.lexists(out):
            os.rename(path, out)
            log(f"put back {out}, the export a killed run had moved aside")
        else:
            shutil.rmtree(path)
            log(f"removed {path}, left by a run that was killed")


def check_export_dir(out: str, overwrite: bool, flag: str) -> None:
    """`export` and `import` write only into a new or empty directory, or, with --overwrite, one
    holding an earlier export or import alone: never into a tokenizer's, data or run directory."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"{flag} {out} is a file: give a directory")
    names = set(os.listdir(out)) - {LOCK_NAME} if os.path.isdir(out) else set()
    if not names:
        return
    try:
        with open(os.path.join(out, EXPORT_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
        ours = set(marker["files"]) | {EXPORT_MARKER}
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"{flag} {out} holds files that no export or import wrote "
                         f"({', '.join(sorted(names)[:3])}{', ...' * (len(names) > 3)}): give "
                         f"a new or empty directory") from None
    earlier = f"an earlier {'import' if 'imported' in marker else 'export'}"
    if names - ours:
        raise ValueError(f"{flag} {out} holds {earlier} and other files "
                         f"({', '.join(sorted(names - ours)[:3])}): give a new or empty one")
    if not overwrite:
        raise ValueError(f"{flag} {out} holds {earlier}: replace it with --overwrite, or give a "
                         f"new or empty directory")


def publish_export(staging: str, out: str) -> None:
    """Put a complete export in place of `out` by renaming directories, so that a kill leaves
    the previous export or the new one, never a mix. An earlier export is moved aside first
    (a rename cannot replace a directory that holds files), then removed; the lock moves in."""
    old, lock = export_sibling(out, "old"), os.path.join(out, LOCK_NAME)
    with signals_held():
        if os.path.lexists(lock):
            os.replace(lock, os.path.join(staging, LOCK_NAME))
        if os.path.isdir(out) and os.listdir(out):
            os.rename(out, old)
        os.rename(staging, out)  # onto a missing or an empty directory
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def export_staging(out: str, overwrite: bool, flag: str) -> Iterator[str]:
    """A directory for the files of an export (or an import) beside OUT, on its file system,
    put in OUT's place when the block completes; meanwhile OUT is locked as a run's is."""
    remove_export_leftovers(out)
    check_export_dir(out, overwrite, flag)
    with directory_lock(out):
        staging = export_sibling(out, "new")
        check_writable_dir(staging)
        try:
            yield staging
            publish_export(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# --- Import: a Hugging Face checkpoint as a gpt.pt ------------------------------------------------
# `import` reads config.json and the safetensors files (never the network) into a weights-only
# gpt.pt. Headers and sizes are checked before a tensor is read; then one tensor at a time
# becomes float32 in our RoPE's layout: memory holds the model and one tensor of the file.

# The architectures `import` runs -> whether they have qk-norm (Qwen3 is Llama with it).
IMPORTABLE = {"LlamaForCausalLM": False, "Qwen3ForCausalLM": True}
# config.json's names of ModelConfig's fields (RoPE's: hf_model_config)
HF_CONFIG_NAMES = {"vocab_size": "vocab_size", "context_length": "max_position_embeddings",
                   "d_model": "hidden_size", "num_layers": "num_hidden_layers",
                   "num_heads": "num_attention_heads", "d_ff": "intermediate_size",
                   "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                   "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings"}
# The weights' dtypes `import` reads; each becomes float32.
IMPORT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def hf_model_config(path: str) -> tuple[dict, str]:
    """config.json as ModelConfig's fields (checked by saved_config), and the architecture; a
    model gpt.py cannot compute is refused, naming what it lacks. RoPE's settings are read as
    the Hub's files have them (rope_theta, rope_scaling) or transformers 5's (rope_parameters)."""
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ValueError(f"{path} is {shown(hf)}, not a JSON object")
    names, rope = hf.get("architectures"), hf.get("rope_parameters") or hf.get("rope_scaling")
    arch = names[0] if isinstance(names, list) and len(names) == 1 else names
    rope = rope if isinstance(rope, dict) else {} if rope is None else {"rope_type": rope}
    kind = rope.get("rope_type", rope.get("type", "default"))
    lacks = [(arch not in IMPORTABLE, f"architecture {shown(arch)} is not one gpt.py runs: "
                                      f"{' or '.join(IMPORTABLE)}, dense"),
             (hf.get("hidden_act", "silu") != "silu",
              f"activation {shown(hf.get('hidden_act'))}: gpt.py's SwiGLU has silu"),
             (hf.get("attention_bias") or hf.get("mlp_bias"),
              "biases (attention_bias or mlp_bias): gpt.py's layers have none"),
             (hf.get("use_sliding_window") or any(layer != "full_attention" for layer in
                                                  hf.get("layer_types") or []),
              "sliding-window attention: gpt.py's attends to the whole context"),
             (kind not in ("default", "llama3"),
              f"RoPE scaling {shown(kind)}: gpt.py has Llama 3's only")]
    for present, what in lacks:
        if present:
            raise ValueError(f"{path}: {what}")
    fields = {ours: hf[theirs] for ours, theirs in HF_CONFIG_NAMES.items()
              if hf.get(theirs) is not None}
    # transformers' defaults, for what a config.json may leave out
    fields.setdefault("norm_eps", 1e-6)
    fields.update(rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                  qk_norm=IMPORTABLE[arch])
    if kind == "llama3":
        fields.update(rope_factor=rope.get("factor"), rope_low_freq=rope.get("low_freq_factor"),
                      rope_high_freq=rope.get("high_freq_factor"),
                      rope_original_context=rope.get("original_max_position_embeddings",
                                                     hf.get("max_position_embeddings")))
    if arch == "Qwen3ForCausalLM":
        fields.setdefault("head_dim", 128)  # Qwen3Config's default
    return fields, arch


def safetensors_header(path: str) -> dict[str, tuple[str, torch.dtype, tuple, int, int]]:
    """The tensors of a safetensors file (see write_safetensors): {name: (path, dtype, shape,
    start, end)}, start and end counted in the file. The header is checked against the file
    before anything is allocated: its length, dtypes, byte counts that fit the shapes, and
    offsets within the file that never overlap."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if size < 8 or length > min(size - 8, JSON_MAX_BYTES):
            raise ValueError(f"{path}: its header would be {length:,} bytes in a file of "
                             f"{size:,}: damaged, or not safetensors")
        header = parse_json(f.read(length).decode("utf-8", errors="replace"), path)
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its header is {shown(header)}, not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        entry = entry if isinstance(entry, dict) else {}
        dtype, shape = IMPORT_DTYPES.get(entry.get("dtype")), entry.get("shape")
        start, end = (entry.get("data_offsets") or [None, None])[:2]
        problems = [  # (holds, what is wrong when it does not), checked in this order
            (dtype is not None, f"dtype {shown(entry.get('dtype'))}, not F32, BF16 or F16"),
            (isinstance(shape, list) and all(is_int(n) and n >= 0 for n in shape),
             f"shape {shown(shape)}"),
            (is_int(start) and is_int(end) and 0 <= start <= end <= size - 8 - length,
             f"offsets {shown(entry.get('data_offsets'))} outside the file's data")]
        for ok, what in problems:
            if not ok:
                raise ValueError(f"{path}: tensor {shown(name)} has {what}")
        if end - start != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {shown(name)} has {end - start:,} bytes, where "
                             f"shape {shape} takes {math.prod(shape) * dtype.itemsize:,}")
        tensors[name] = (path, dtype, tuple(shape), 8 + length + start, 8 + length + end)
    spans = sorted((start, end, name) for name, (*_, start, end) in tensors.items())
    for (_, end, first), (start, _, second) in pairwise(spans):
        if start < end:
            raise ValueError(f"{path}: tensors {shown(first)} and {shown(second)} overlap")
    return tensors


def checkpoint_tensors(hf_dir: str) -> dict[str, tuple]:
    """Every tensor of a checkpoint, by safetensors_header: of model.safetensors, or of the
    shards that model.safetensors.index.json lists."""
    index, files = os.path.join(hf_dir, "model.safetensors.index.json"), ["model.safetensors"]
    if os.path.isfile(index):
        weight_map = read_json(index)
        files = sorted({*weight_map["weight_map"].values()}) if isinstance(
            weight_map, dict) and isinstance(weight_map.get("weight_map"), dict) else [0]
        if not all(isinstance(n, str) and n == os.path.basename(n)
                   and n.endswith(".safetensors") for n in files):
            raise ValueError(f"{index}: its weight_map should name .safetensors files beside it")
    tensors = {}
    for path in (os.path.join(hf_dir, file) for file in files):
        if not os.path.isfile(path):
            raise ValueError(f"{hf_dir} has no {os.path.basename(path)}: gpt.py reads weights in "
                             f"the safetensors format only")
        for name, entry in safetensors_header(path).items():
            if name in tensors:
                raise ValueError(f"{path}: tensor {shown(name)} is in {tensors[name][0]} too")
            tensors[name] = entry
    return tensors


def read_hf_checkpoint(hf_dir: str) -> tuple[ModelConfig, dict[str, str], dict[str, tuple], str]:
    """A checkpoint's config, checked against its tensors' headers and this machine's memory;
    our parameter names -> its tensors'; its tensors (checkpoint_tensors); its architecture."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint")
    fields, arch = hf_model_config(path)
    tensors = checkpoint_tensors(hf_dir)
    if fields.get("tie_embeddings") is True and "lm_head.weight" in tensors:
        fields["tie_embeddings"] = False  # an output matrix of its own: transformers unties too
    config = saved_config(fields, path)
    with torch.device("meta"):  # shapes without memory: the model's, and the headers'
        expected = TransformerLM(config).state_dict()
        present = {name: torch.empty(shape) for name, (_, _, shape, _, _) in tensors.items()}
    names = llama_names(config, expected)
    count = sum(expected[ours].numel() for ours in names)  # a tied matrix once
    memory = device_memory(torch.device("cpu"))
    if memory is not None and 4 * count > memory:
        raise ValueError(f"{path}: its {count:,} parameters take {4 * count / 2**30:,.1f} GiB "
                         f"in float32, more than this machine's {memory / 2**30:,.1f} GiB")
    check_state_fits({theirs: expected[ours] for ours, theirs in names.items()}, present, hf_dir)
    return config, names, tensors, arch


def read_tensor(path: str, dtype: torch.dtype, shape: tuple, start: int,
                end: int) -> torch.Tensor:
    """One tensor of a safetensors file, bytes start .. end, as float32."""
    with open(path, "rb") as f:
        f.seek(start)
        data = bytearray(end - start)
        if f.readinto(data) != len(data):
            raise ValueError(f"{path} was cut short while it was read")
    # Little-endian integers of the element's width, reinterpreted: little_endian_bytes undone.
    ints = np.frombuffer(data, dtype=f"<i{dtype.itemsize}")
    ints = ints.astype(ints.dtype.newbyteorder("="), copy=False)
    return torch.from_numpy(ints).view(dtype).reshape(shape).float()


def read_hf_weights(config: ModelConfig, names: dict[str, str],
                    tensors: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Our model's state dict from a checkpoint checked by read_hf_checkpoint: one tensor at a
    time, in float32, q and k (and qk-norm's gains) put back in our RoPE's layout."""
    state = {}
    for ours, theirs in names.items():
        state[ours] = read_tensor(*tensors[theirs])
        if rope_heads(ours, config):  # Llama's halves back to our pairs: see rope_halves
            state[ours] = rope_halves(state[ours], rope_heads(ours, config), inverse=True)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["token_embeddings.weight"]  # one tensor, saved once
    return state


# ==================================================================================================
# §17 Machinery: looking inside, curves, attention and weights
#
# What a run did and what a trained model does, as numbers first: the training curves of
# metrics.jsonl; each head's attention weights, from the readable attention of §3; the
# likeliest next tokens at each position of a prompt; and per weight matrix a histogram and the
# spectral norm (its largest singular value: how far it can stretch a vector). The numbers need
# torch alone and are printed as tables; `plot` and `inspect` also draw them when matplotlib is
# installed (an optional extra; the Agg backend writes PNG files and needs no display).
# ==================================================================================================

# A metrics.jsonl line is an evaluation or a training log line, told apart by these numbers.
METRIC_KINDS = {"val": ("val_loss",), "train": ("train_loss", "lr", "grad_norm")}


# The largest number a record may hold, above any real run's: matplotlib turns every number into
# a float. val_ppl, e^val_loss, which earlier runs recorded too, may reach e^700.
METRIC_LIMITS = {"train_loss": 700, "val_loss": 700, "val_ppl": math.exp(700)}
METRIC_MAX = 1e18


def is_metric_record(record) -> bool:
    """A line written by `train`: a dict with an integer step, the elapsed seconds and the
    numbers of one of METRIC_KINDS, each within its limit."""
    return (isinstance(record, dict) and is_int(record.get("step"))
            and is_number(record.get("elapsed"))
            and any(all(is_number(record.get(key)) for key in keys)
                    for keys in METRIC_KINDS.values())
            and all(abs(value) <= METRIC_LIMITS.get(key, METRIC_MAX)
                    for key, value in record.items() if is_number(value)))


def read_metrics(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl, in the order written. A line that is not a record
    (the half-written last line of a killed run) is skipped with a note."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: RUN_DIR must be a directory `python gpt.py train` "
                         f"wrote (its --out-dir)")
    records, skipped = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            try:
                record = parse_json(line, f"{path} line {line_number}")
            except ValueError:
                record = None
            if is_metric_record(record):
                records.append(record)
            else:
                skipped.append(line_number)
    if skipped:
        log(f"{path}: skipped {len(skipped)} line(s) that are no metrics record, the first "
            f"is line {skipped[0]}")
    if not records:
        raise ValueError(f"{path} holds no metrics yet: `train` writes its first at step 0")
    return records


def metric_series(records: list[dict], kind: str) -> list[dict]:
    """The records of one kind ("train" or "val") in step order. A resumed run goes on from its
    checkpoint's step, so the steps an interrupted run logged after that checkpoint come twice:
    the later records replace the earlier ones.
    Example: steps 0, 5, 10, 5 (resumed from step 5), 10 -> the records of 0, 5, 10 last written.
    """
    kept = []
    for record in records:
        if all(is_number(record.get(key)) for key in METRIC_KINDS[kind]):
            while kept and kept[-1]["step"] >= record["step"]:
                kept.pop()
            kept.append(record)
    return kept


def tokens_per_step_of(run_dir: str) -> int:
    """Tokens per optimizer step of a run, from its newest checkpoint: for metrics written
    before `train` recorded the tokens seen. batch x grad_accum x context x processes (a
    checkpoint keeps one random state per process)."""
    paths = [os.path.join(run_dir, n) for n in ("latest.pt", "best.pt")]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ValueError(f"{run_dir}/metrics.jsonl has no token counts (it predates them) and "
                         f"there is no checkpoint in {run_dir} to work them out from")
    checkpoint = read_checkpoint(max(paths, key=os.path.getmtime))
    config = saved_config(checkpoint.get("config"), paths[0], checkpoint["model"])
    args = checkpoint.get("args")
    if not (isinstance(args, dict) and args.get("preset") in PRESETS):
        raise ValueError(f"{paths[0]}: no training arguments in it to count tokens with")
    batch = args.get("batch_size") or PRESETS[args["preset"]]["batch_size"]
    return batch * args.get("grad_accum", 1) * config.context_length * len(checkpoint["rng"])


def run_curves(run_dir: str, name: str) -> dict:
    """One run's curves: {"name", "dir", "train": [record], "val": [record]}, with tokens seen."""
    records = read_metrics(run_dir)
    if not all(is_int(r.get("tokens")) for r in records):
        per_step = tokens_per_step_of(run_dir)
        records = [{"tokens": r["step"] * per_step, **r} for r in records]
    return dict(name=name, dir=run_dir, train=metric_series(records, "train"),
                val=metric_series(records, "val"))


def print_run_table(run: dict) -> None:
    """A run in a few lines: where it got to, then each evaluation (the train loss is that of
    the log line at the same step, the mean of the steps before it)."""
    last = max(run["train"] + run["val"], key=lambda r: (r["step"], r["elapsed"]))
    summary = f"{last['step']} steps, {last['tokens']:,} tokens, {format_duration(last['elapsed'])}"
    if run["val"]:
        best = min(run["val"], key=lambda r: r["val_loss"])
        summary += (f"; best val loss {best['val_loss']:.4f} (perplexity "
                    f"{format_perplexity(best['val_loss'])}) at step {best['step']}")
    print(f"{run['name']} ({run['dir']}): {summary}")
    train_loss = {r["step"]: r["train_loss"] for r in run["train"]}
    print(f"{'step':>8} {'tokens':>13} {'time':>7} {'train loss':>10} {'val loss':>9} "
          f"{'val ppl':>10}")
    for r in run["val"]:
        train = f"{train_loss[r['step']]:.4f}" if r["step"] in train_loss else ""
        print(f"{r['step']:>8} {r['tokens']:>13,} {format_duration(r['elapsed']):>7} "
              f"{train:>10} {r['val_loss']:>9.4f} {format_perplexity(r['val_loss']):>10}")


def pyplot():
    """matplotlib.pyplot drawing into files, or None (with a line saying how to install it)
    when matplotlib is not installed: pictures are an optional extra, the tables are not."""
    try:
        import matplotlib
    except ImportError:
        log("the pictures need matplotlib: pip install matplotlib (the tables above do not)")
        return None
    matplotlib.use("Agg")  # draw into files: no window, no display needed
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str, plt) -> str:
    """Draw into memory, then write the file as checkpoints are written: a full disk leaves the
    earlier picture whole, and the error names the file."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)  # 80 dots per inch: sharp on a screen, tens of KB
    plt.close(fig)
    if os.path.islink(path):  # never replace, or draw through, a link planted at the name
        raise link_refused(path)
    write_atomically(path, png.getvalue())
    return path


def column(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records]


def draw_curves(runs: list[dict], out_dir: str, plt) -> list[str]:
    """curves.png: training and validation loss against steps, tokens seen and wall time, on a
    log axis, which shows the first steps' fall and the last steps' creep alike (perplexity,
    e^loss, is in the table); lr_and_grad_norm.png: both against steps. One colour a run."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained", sharey=True)
    x_axes = (("step", "step", 1), ("tokens", "tokens seen", 1), ("elapsed", "minutes", 60))
    for i, run in enumerate(runs):
        style = dict(color=f"C{i % 10}", marker="o", markersize=3)
        for ax, (key, label, unit) in zip(axes, x_axes):
            ax.plot([x / unit for x in column(run["train"], key)],
                    column(run["train"], "train_loss"), color=style["color"], alpha=0.4,
                    label=f"{run['name']} train")
            ax.plot([x / unit for x in column(run["val"], key)], column(run["val"], "val_loss"),
                    **style, label=f"{run['name']} validation")
            ax.set_xlabel(label)
    axes[0].set(ylabel="loss (nats per token)", yscale="log")
    axes[0].yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
    axes[0].yaxis.set_minor_formatter(plt.FuncFormatter(
        lambda y, _: f"{y:g}" if y in (2, 3, 4, 6) else ""))
    # 4800000 tokens reads as 4.8M, not as 4.8 beside a lone "1e6"
    axes[1].xaxis.set_major_formatter(plt.FuncFormatter(
        lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k" if x else "0"))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("training and validation loss")
    paths = [save_figure(fig, os.path.join(out_dir, "curves.png"), plt)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), layout="constrained")
    for i, run in enumerate(runs):
        for ax, key in zip(axes, ("lr", "grad_norm")):
            ax.plot(column(run["train"], "step"), column(run["train"], key), color=f"C{i % 10}",
                    label=run["name"])
    for ax, label in zip(axes, ("learning rate", "gradient norm (before clipping)")):
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    paths.append(save_figure(fig, os.path.join(out_dir, "lr_and_grad_norm.png"), plt))
    return paths


def attention_weights(attn: MultiHeadSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The weights softmax(Q K^T / sqrt(D)) of one attention layer, for its input x (B, T, C) at
    positions 0..T-1: (B, H, T, T), row i holding how much query i takes from each position
    0..i (it sums to 1). The readable attention of §3 gives them: with the values V set to the
    identity matrix, softmax(..) @ V is the weights themselves (tested against the fast path)."""
    B, T, C = x.shape
    H = attn.num_heads
    q, k, _ = attn.queries_keys_values(x, 0)  # (B, H, T, D), k (B, KV, T, D), as the layer's
    k = k.repeat_interleave(H // attn.num_kv_heads, dim=1)  # each key head for its group: GQA
    identity = torch.eye(T, device=x.device, dtype=q.dtype).expand(B, H, T, T)  # V = I
    mask = sliding_causal_mask(T, T, x.device)  # (T, T): query i sees keys 0..i
    return scaled_dot_product_attention(q, k, identity, mask)  # (B, H, T, T) @ I -> (B, H, T, T)


@torch.no_grad()
def attention_maps(model: TransformerLM, token_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention weights for token_ids (B, T), T <= context_length: one (B, H, T, T)
    per layer. The model runs its own forward; a forward pre-hook (PyTorch calls it with a
    module's inputs just before the module runs) hands over each attention layer's input x,
    whatever came before it (embeddings, positions, norms), for attention_weights."""
    assert token_ids.shape[1] <= model.config.context_length, "a prompt beyond the context"
    inputs = []  # each attention layer's x (B, T, C), in the order the layers run
    hooks = [layer.attn.register_forward_pre_hook(lambda attn, args: inputs.append(args[0]))
             for layer in model.layers]
    try:
        model(token_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return [attention_weights(layer.attn, x) for layer, x in zip(model.layers, inputs)]


def attention_summary(weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's weights (H, T, T), T >= 2, in four numbers per head (H,), averaged over the
    queries 1..T-1 (query 0 can only look at itself): the weight on the first position (a
    large one is an attention sink), on the query itself and on the position before it, and
    the entropy of a row in bits (0: all on one position; log2(n): spread evenly over n)."""
    H, T, _ = weights.shape
    rows = weights[:, 1:]                                     # (H, T-1, T)
    query = torch.arange(1, T, device=weights.device)         # (T-1,)
    return {"first": rows[..., 0].mean(-1),
            "self": rows[:, query - 1, query].mean(-1),
            "previous": rows[:, query - 1, query - 1].mean(-1),
            # xlogy(p, p) = p log p, and 0 where p = 0: the masked future adds nothing.
            "entropy": -torch.special.xlogy(rows, rows).sum(-1).mean(-1) / math.log(2)}


@torch.no_grad()
def next_token_table(model: TransformerLM, token_ids: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the model expects after each position of token_ids (T,): the k likeliest next
    tokens' probabilities and ids, each (T, k), likeliest first; and the probability it gave
    the token that did come next (T-1,), whose -log is that position's loss."""
    logits = model(token_ids[None])[0].float()  # (1, T) -> (T, V)
    probs = softmax(logits, dim=-1)             # (T, V)
    top = probs.topk(k, dim=-1)                 # (T, k) each
    came = probs[:-1].gather(-1, token_ids[1:, None])[:, 0]  # (T-1,)
    return top.values, top.indices, came


def spectral_norm(W: torch.Tensor) -> float:
    """The largest singular value of W: the most W stretches a vector, max |W x| / |x|.
    svdvals computes the singular values alone (no singular vectors), largest first."""
    return torch.linalg.svdvals(W.detach().float())[0].item()


def weight_histogram(W: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of W's entries in `bins` equal bins over [-max |w|, max |w|] (symmetric: zero at
    the centre), and the bins + 1 edges. Example: W = [-1, 0.5, 1], bins = 2 -> counts [1, 2],
    edges [-1, 0, 1]."""
    w = W.detach().float().flatten().cpu()
    top = w.abs().max().item() or 1.0  # an all-zero matrix fits any range
    return torch.histc(w, bins, -top, top), torch.linspace(-top, top, bins + 1)


def weight_stats(model: nn.Module, bins: int) -> list[dict]:
    """Per weight matrix (the 2-D parameters; a tied one once): name, shape, standard
    deviation, largest |w|, spectral norm, and the histogram's counts and edges."""
    stats = []
    for name, W in model.named_parameters():
        if W.ndim == 2:
            counts, edges = weight_histogram(W, bins)
            stats.append(dict(name=name, shape=tuple(W.shape), std=W.std().item(),
                              max=W.abs().max().item(), sigma=spectral_norm(W),
                              counts=counts, edges=edges))
    return stats


def initial_spectral_norms(config: ModelConfig) -> dict[str, float]:
    """The spectral norms of a freshly initialised model of this config (seed 0), the yardstick
    for a trained one; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        fresh = TransformerLM(config)
    return {name: spectral_norm(W) for name, W in fresh.named_parameters() if W.ndim == 2}


def matrix_place(name: str) -> tuple[int | None, str]:
    """Example: "layers.2.attn.q_proj.weight" -> (2, "attn.q_proj"); "lm_head.weight" ->
    (None, "lm_head")."""
    parts = name.removesuffix(".weight").split(".")
    if parts[0] == "layers":
        return int(parts[1]), ".".join(parts[2:])
    return None, ".".join(parts)


# A histogram in ten characters, from an empty bin to the fullest.
SPARK_LEVELS = " .:-=+*#%@"


def sparkline(counts: torch.Tensor, width: int = 20) -> str:
    """A histogram in one line of `width` characters (fewer bins: one each), each showing its
    share of the bins by height. Example: [0, 1, 4, 9] -> " .=@" (levels 0, 1, 4 and 9 of 9)."""
    groups = torch.stack([c.sum() for c in counts.tensor_split(min(width, len(counts)))])
    levels = (groups / groups.max().clamp_min(1) * (len(SPARK_LEVELS) - 1)).ceil().long()
    return "".join(SPARK_LEVELS[level] for level in levels.tolist())


def token_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as Python writes the string, quotes included, so a leading space shows.
    Example: the id of b" upon" -> "' upon'"."""
    return repr(tokenizer.vocab[token_id].decode("utf-8", "replace"))


def print_attention_table(maps: list[torch.Tensor], labels: list[str]) -> None:
    """attention_summary of each layer's weights (H, T, T), a row a head, and the last query's
    strongest key."""
    print("attention per head, averaged over the queries after the first: the weight on the "
          "first position,\non the query itself, on the one before; entropy in bits; the last "
          "query's strongest key")
    print(f"{'layer':>5} {'head':>4} {'first':>6} {'self':>6} {'prev':>6} {'entropy':>7}  last")
    for layer, weights in enumerate(maps):
        summary = attention_summary(weights)
        top, where = weights[:, -1].max(-1)  # (H,) each: the last query's strongest key
        for head, (p, key) in enumerate(zip(top.tolist(), where.tolist())):
            numbers = " ".join(f"{summary[name][head].item():>6.2f}"
                               for name in ("first", "self", "previous", "entropy"))
            print(f"{layer:>5} {head:>4} {numbers}  {labels[key]} {p:.2f}")


def print_next_token_table(tokenizer: Tokenizer, labels: list[str], table: tuple) -> None:
    """next_token_table's numbers, one row per position."""
    probs, ids, came = table
    width = max(len(label) for label in labels)
    print(f"\nthe next token after each position: p(next) is the probability given to the token "
          f"that came;\nthen the {probs.shape[1]} likeliest")
    print(f"{'pos':>4} {'token':<{width}} {'p(next)':>7}  candidates")
    for t, label in enumerate(labels):
        p_next = f"{came[t].item():.3f}" if t < len(came) else "-"
        candidates = "  ".join(f"{token_label(tokenizer, i)} {p:.3f}"
                               for i, p in zip(ids[t].tolist(), probs[t].tolist()))
        print(f"{t:>4} {label:<{width}} {p_next:>7}  {candidates}")


def print_weight_table(stats: list[dict], initial: dict[str, float]) -> None:
    """weight_stats, one row per matrix, with the spectral norm at initialisation beside."""
    print("\nweights: standard deviation, largest |w|, spectral norm (sigma) now and at "
          "initialisation,\nand the histogram over [-max|w|, max|w|]")
    width = max(len(s["name"]) for s in stats)
    print(f"{'matrix':<{width}} {'shape':>10} {'std':>7} {'max|w|':>7} {'sigma':>7} {'at init':>7}")
    for s in stats:
        shape = "x".join(map(str, s["shape"]))
        print(f"{s['name']:<{width}} {shape:>10} {s['std']:>7.4f} {s['max']:>7.3f} "
              f"{s['sigma']:>7.2f} {initial[s['name']]:>7.2f}  [{sparkline(s['counts'])}]")


def draw_attention(maps: list[torch.Tensor], labels: list[str], path: str, plt) -> str:
    """One heatmap per layer (a row of the figure) and head (a column), query positions down and
    keys across, the prompt's tokens on the outer axes."""
    L, H, T = len(maps), maps[0].shape[0], maps[0].shape[-1]
    fig, axes = plt.subplots(L, H, figsize=(1.6 * H + 1.5, 1.6 * L + 1.5), squeeze=False,
                             layout="constrained")
    for layer, weights in enumerate(maps):
        for head in range(H):
            ax = axes[layer, head]
            image = ax.imshow(weights[head].float().cpu().numpy(), vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=7)
            # Token labels on the left column and the bottom row; past 40 they would overlap.
            bottom, left = layer == L - 1 and T <= 40, head == 0 and T <= 40
            ax.set_xticks(range(T) if bottom else [], labels if bottom else [], rotation=90,
                          fontsize=6)
            ax.set_yticks(range(T) if left else [], labels if left else [], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.5, label="attention weight")
    fig.suptitle("attention weights: row = query position, column = the position it reads")
    return save_figure(fig, path, plt)


def draw_histograms(stats: list[dict], path: str, plt) -> str:
    """A histogram per weight matrix: a row per layer, and one for the matrices outside the
    layers (the embeddings and the output head)."""
    rows = defaultdict(list)  # layer, or None outside the layers -> [(kind, stats)]
    for s in stats:
        layer, kind = matrix_place(s["name"])
        rows[layer].append((kind, s))
    columns = max(len(row) for row in rows.values())
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.1 * columns, 1.6 * len(rows)),
                             squeeze=False, layout="constrained")
    for ax, (layer, row) in zip(axes, rows.items()):
        for i in range(len(row), columns):
            ax[i].axis("off")
        for i, (kind, s) in enumerate(row):
            ax[i].stairs(s["counts"].numpy(), s["edges"].numpy(), fill=True)
            where = "" if layer is None else f"layer {layer}: "
            ax[i].set_title(f"{where}{kind}\nstd {s['std']:.3f}, sigma {s['sigma']:.2f}",
                            fontsize=7)
            ax[i].set_yticks([])
            ax[i].tick_params(labelsize=6)
    return save_figure(fig, path, plt)


def draw_spectral_norms(stats: list[dict], initial: dict[str, float], path: str, plt) -> str:
    """Each kind of matrix in the layers (q_proj, ..., w3), its spectral norm against the layer:
    trained (solid) and at initialisation (dashed, the same colour)."""
    now = {s["name"]: s["sigma"] for s in stats}
    by_kind = defaultdict(list)  # kind -> [(layer, name)]
    for name in now:
        layer, kind = matrix_place(name)
        if layer is not None:
            by_kind[kind].append((layer, name))
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for i, (kind, places) in enumerate(by_kind.items()):
        layers, names = zip(*places)
        ax.plot(layers, [now[n] for n in names], color=f"C{i % 10}", marker="o", label=kind)
        ax.plot(layers, [initial[n] for n in names], color=f"C{i % 10}", linestyle="--",
                alpha=0.6)
    ax.set_xticks(sorted({layer for places in by_kind.values() for layer, _ in places}))
    ax.set(xlabel="layer", ylabel="spectral norm (largest singular value)",
           title="spectral norms: trained (solid), at initialisation (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, plt)


# ==================================================================================================
# §18 Machinery: fine-tuning, teaching a trained model to answer
#
# Fine-tuning trains a trained model further, on examples of what it should do: here, a user's
# question-answer pairs. Each pair becomes one sequence of a fixed template that ends in the
# end-of-text token, so the model learns where an answer stops, and the loss scores only the
# answer and that end token (masked_cross_entropy, §4): the question is given, not written. The
# run is §14's, started by start_finetune: the same loop, logs, checkpoints, signals and budget.
# ==================================================================================================

# One pair as the model sees it, from the end-of-text token <eot> that starts it (as it started
# every story in pretraining) to the one that ends it:
#     <eot>Question: {question}\nAnswer: {answer}<eot>
# The prompt is everything up to "Answer:"; the answer follows it after one space. An imported
# model that chats answers in its own format instead (qa_template).
QA_PROMPT = "Question: {question}\nAnswer:"
FINETUNE_VALID_FRACTION = 0.1  # pairs held out without --valid: every tenth
ANSWER_TOKENS = 64             # longest sample answer at an evaluation: the example's are < 40
# The recipe, tuned on the 10-minute laptop model and data/qa_example.json: of peak learning
# rates 3e-4, 1e-3 and 3e-3 over 150 steps, 1e-3 reached the lowest held-out loss (0.68, 0.50,
# 0.60), by step 100; 100 steps of its own cosine end there too (0.50). A batch of 8 rows of 256
# tokens holds about 70 of the example's pairs, so 100 steps are some 36 passes over them.
FINETUNE_LR = 1e-3
FINETUNE_BATCH_SIZE = 8        # rows of context_length tokens, or of FINETUNE_ROW_TOKENS
# Rows of an imported model's 8,192-token context would take 13 GB of SmolLM2's logits, not 0.8.
FINETUNE_ROW_TOKENS = 512
FINETUNE_STEPS = 100
FINETUNE_WARMUP = 20           # steps
FINETUNE_EVAL_INTERVAL = 25    # steps


@dataclass
class QATemplate:
    """How a model reads a question and writes its answer: the ids `start`, then the text
    before + question + after (the prompt), then answer_prefix + answer, then the id `end`."""
    start: list[int]
    before: str
    after: str
    answer_prefix: str
    end: int

    def prompt(self, question: str) -> str:
        """Example (ours): " Who is Max? " -> "Question: Who is Max?\\nAnswer:"."""
        return self.before + question.strip() + self.after

    def prompt_ids(self, tokenizer: Tokenizer, question: str) -> list[int]:
        return self.start + tokenizer.encode(self.prompt(question))


def qa_template(tokenizer: Tokenizer, generation: dict | None, name: str) -> QATemplate:
    """Our models' QA_PROMPT between end-of-text tokens (the first special token, which ended
    the stories in pretraining); for an imported model (`generation`, see hf_generation) its
    chat format where it has one, else QA_PROMPT after its bos_ids, ended by its first eos id."""
    chat = generation and generation["chat"]
    if chat and chat["end"] is None:
        raise ValueError(f"{name}: its chat template is not ChatML (<|im_start|>...<|im_end|>), "
                         f"the one chat format gpt.py writes")
    if chat:  # no bos_ids: a template writes any itself, and its text is encoded without them
        return QATemplate([], chat["before"], chat["after"], "", tokenizer.special_ids[chat["end"]])
    before, after = QA_PROMPT.split("{question}")
    ours = generation is None
    end = end_of_text_id(tokenizer) if ours else next(iter(generation["eos_ids"]), None)
    if end is None:
        hint = " (`tokenize --special-tokens '<|endoftext|>'` makes one)" if ours else ""
        raise ValueError(f"{name}: its tokenizer has no end-of-text token to end an answer with"
                         f"{hint}")
    return QATemplate([end] if ours else generation["bos_ids"], before, after, " ", end)


def qa_sequence(tokenizer: Tokenizer, question: str, answer: str, template: QATemplate,
                everything: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One pair as inputs and next-token targets (L,) each, IGNORE_INDEX where nothing is learned.

    Example, with bytes as tokens and 256 as <eot>, question "Hi?" and answer "Yo.":
        ids     = [256] + bytes of "Question: Hi?\\nAnswer:" (21) + bytes of " Yo." + [256]
        inputs  = ids[:-1]: 256, Q, u, ..., r, :, ' ', Y, o, .
        targets = ids[1:] with the prompt's 21 IGNORE_INDEX: -100 x 21, ' ', Y, o, ., 256
    With everything=True the 21 are kept too. The prompt and the answer are encoded apart, so
    the prompt's tokens are exactly those `sample --qa` gives the model.
    """
    prompt = template.prompt_ids(tokenizer, question)
    ids = np.array(prompt + tokenizer.encode(template.answer_prefix + answer.strip())
                   + [template.end], dtype=np.int64)
    inputs, targets = ids[:-1], ids[1:].copy()
    if not everything:
        targets[:len(prompt) - 1] = IGNORE_INDEX  # the question: context, not to be learned
    return inputs, targets


def json_kind(value) -> str:
    """The JSON name of a parsed value's type. Example: json_kind({}) -> "object"."""
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def check_qa_item(item, where: str) -> tuple[str, str]:
    """An item's (question, answer), stripped of surrounding whitespace, or a ValueError."""
    if not isinstance(item, dict):
        raise ValueError(f'{where} is a JSON {json_kind(item)}, not an object with a "question" '
                         f'and an "answer"')
    for key in ("question", "answer"):
        if key not in item:
            raise ValueError(f'{where} has no "{key}"')
        if not isinstance(item[key], str):
            raise ValueError(f'{where}: its "{key}" is {shown(item[key])}, a JSON '
                             f'{json_kind(item[key])}, not a string')
        check_text(item[key], f'{where}: its "{key}"')
        if not item[key].strip():
            raise ValueError(f'{where}: its "{key}" is empty')
    return item["question"].strip(), item["answer"].strip()


def read_qa_file(path: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of a JSON file that holds a list of objects such as
        {"question": "Who is Max?", "answer": "Max is Lily's dog.", "id": 7, "category": "pets"}
    ("id" and "category" are optional and ignored, but a repeated id is reported). A mistake is a
    ValueError naming the item by its index from 0: qa.json[3] is the fourth."""
    expected = 'a list of {"question": ..., "answer": ...} objects'
    try:
        items = read_json(path)
    except ValueError as e:
        raise ValueError(f"{e}: give {expected}") from None
    if not isinstance(items, list) or not items:
        what = "an empty list" if isinstance(items, list) else f"a JSON {json_kind(items)}"
        raise ValueError(f"{path} holds {what}, not {expected}")
    pairs = [check_qa_item(item, f"{path}[{i}]") for i, item in enumerate(items)]
    # A repeated "id" is often a pair pasted twice, or an id not updated: say so, and go on.
    seen = defaultdict(list)
    for i, item in enumerate(items):
        if "id" in item:
            seen[json.dumps(item["id"], sort_keys=True)].append(str(i))
    repeated = [f"{key} (items {', '.join(where)})" for key, where in seen.items()
                if len(where) > 1]
    if repeated:
        log(f"warning: {path}: repeated ids: {'; '.join(repeated[:5])}"
            f"{' ...' if len(repeated) > 5 else ''}")
    return pairs


def hold_out_pairs(num_pairs: int, fraction: float, path: str) -> tuple[list[int], list[int]]:
    """The indices of the pairs to train on and of those to hold out: round(fraction x num_pairs)
    of them (at least one), evenly spread, so that every part of a file sorted by topic is
    tested. Example: 20 pairs, fraction 0.1 -> hold out 9 and 19, the last of each ten."""
    held = max(1, round(fraction * num_pairs))
    if held >= num_pairs:
        raise ValueError(f"{path} has {num_pairs} pair(s): too few to hold out {fraction:g} of "
                         f"them and train on the rest; give --valid FILE")
    held_out = [(i + 1) * num_pairs // held - 1 for i in range(held)]
    return sorted(set(range(num_pairs)) - set(held_out)), held_out


@dataclass
class QAPairs:
    """Pairs laid end to end, each as qa_sequence makes it: pair i is inputs[starts[i]:
    starts[i + 1]], with its targets at the same positions."""
    inputs: np.ndarray   # (P,) ids: "<eot>Question: ...\nAnswer: ..." of each pair in turn
    targets: np.ndarray  # (P,) the next ids, IGNORE_INDEX where nothing is learned
    starts: np.ndarray   # (N + 1,) where each pair begins, then where the last one ends
    items: list[tuple[str, str]]  # (question, answer) of each pair

    def __len__(self) -> int:
        """The tokens of all the pairs, as len() of a token file: what the run's log counts."""
        return len(self.inputs)


def encode_pairs(pairs: list[tuple[str, str]], indices: list[int], tokenizer: Tokenizer,
                 template: QATemplate, context_length: int, everything: bool,
                 path: str) -> tuple[QAPairs, list[int]]:
    """The pairs at `indices` as QAPairs, and the indices of those left out: longer than the
    context, where they could only be cut (and a cut answer never ends)."""
    inputs, targets, kept, too_long = [], [], [], []
    for i in indices:
        question, answer = pairs[i]
        for key, text in (("question", question), ("answer", answer)):
            special = tokenizer.special_re and tokenizer.special_re.search(text)
            if special:
                raise ValueError(f'{path}[{i}]: its "{key}" holds the special token '
                                 f'{special[0]!r}, which would cut the pair in two')
        x, y = qa_sequence(tokenizer, question, answer, template, everything)  # (L,) each
        if len(x) > context_length:
            too_long.append(i)
            continue
        inputs.append(x)
        targets.append(y)
        kept.append(pairs[i])
    if not kept:
        raise ValueError(f"{path}: every pair of the {len(indices)} is longer than the model's "
                         f"{context_length}-token context")
    starts = np.cumsum([0] + [len(x) for x in inputs])
    return QAPairs(np.concatenate(inputs), np.concatenate(targets), starts, kept), too_long


def pack_pairs(pairs: QAPairs, order: Iterable[int], rows: int,
               context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay the pairs in `order` end to end in rows of context_length positions, as the stories
    were laid in pretraining, until `rows` rows are full or the pairs run out. A pair that does
    not fit at the end of a row starts the next, so none is ever cut. Returns inputs and targets
    (R, T), R <= rows; positions after a row's last pair predict nothing.
    Example: pairs of 3, 2 and 2 positions in rows of 5: row 0 = pairs 0 and 1; row 1 = pair 2,
    then 3 empty positions.
    """
    x = np.zeros((rows, context_length), dtype=np.int64)  # (rows, T): an empty position's input
    # is any id, as no position of a pair attends to the positions after it
    y = np.full((rows, context_length), IGNORE_INDEX, dtype=np.int64)  # (rows, T)
    row, col = 0, 0
    for i in order:
        start, end = pairs.starts[i], pairs.starts[i + 1]
        if col + end - start > context_length:
            row, col = row + 1, 0
            if row == rows:
                break
        x[row, col:col + end - start] = pairs.inputs[start:end]
        y[row, col:col + end - start] = pairs.targets[start:end]
        col += end - start
    return x[:row + 1], y[:row + 1]


def qa_batch(pairs: QAPairs, batch_size: int, context_length: int, device: str | torch.device,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-tuning's get_batch: up to batch_size rows of pairs drawn in a random order and
    packed (pack_pairs); inputs and targets (B, T), IGNORE_INDEX where nothing is learned."""
    order = torch.randperm(len(pairs.items), generator=generator).tolist()
    x, y = pack_pairs(pairs, order, batch_size, context_length)  # (B, T) each
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def show_answers(run: Run) -> None:
    """Answer the first --show-answers held-out questions greedily, and print them. An answer
    that has not ended within ANSWER_TOKENS tokens ends in " ..."."""
    template = qa_template(run.tokenizer, run.generation, "the run")
    if run.args.show_answers:
        run.say(f"held-out answers at step {run.step} (greedy):")
    for question, expected in run.valid_data.items[:run.args.show_answers]:
        prompt = template.prompt_ids(run.tokenizer, question)
        end = template.end
        tokens = list(generate(run.model, prompt, ANSWER_TOKENS, temperature=0, eos_id=end))
        answer = "".join(decode_stream(tokens, run.tokenizer, end)).strip()
        answer += "" if tokens[-1] == end else " ..."
        run.say(f"  {question} -> {answer!r} (held out: {expected!r})")
    run.model.train()  # generate() left it in eval mode


@torch.no_grad()
def evaluate_answers(run: Run) -> float:
    """Fine-tuning's evaluation: the mean loss over the held-out answers' tokens and end tokens
    (also with --train-on-everything, so that the two compare), then a few sample answers."""
    T, B = run.row_length, run.batch_size
    x, y = pack_pairs(run.valid_data, run.eval_starts, len(run.eval_starts), T)  # (R, T) each
    x, y = x[:run.args.eval_batches * B], y[:run.args.eval_batches * B]
    run.eval_model.eval()
    total, count = torch.zeros((), device=run.device), 0
    for i in range(0, len(x), B):
        xb, yb = (torch.from_numpy(a[i:i + B]).to(run.device) for a in (x, y))  # (b, T) each
        with torch.autocast(run.device.type, dtype=run.amp, enabled=run.amp is not None):
            logits = run.eval_model(xb)  # (b, T, V)
        scored = int((y[i:i + B] != IGNORE_INDEX).sum())
        total += masked_cross_entropy(logits, yb) * scored  # the batch's mean, by its tokens
        count += scored
    run.eval_model.train()
    show_answers(run)
    return total.item() / count


def check_finetune_args(args: argparse.Namespace) -> None:
    """Refuse flags that contradict each other, before any work."""
    if args.from_scratch and args.checkpoint:
        raise ValueError("--checkpoint names the model to fine-tune and --from-scratch starts "
                         "from random weights: give one or the other")
    if args.valid and args.valid_fraction is not None:
        raise ValueError("--valid gives the held-out pairs and --valid-fraction takes them "
                         "from --data: give one or the other")
    model_flags = ["preset"] + [field.name for field in fields(ModelConfig)]
    given = [name for name in model_flags if getattr(args, name, None) is not None]
    if given and not args.from_scratch:
        raise ValueError(f"--{given[0].replace('_', '-')}: a fine-tuned model keeps its "
                         f"checkpoint's architecture; model flags go with --from-scratch")


def finetune_model(args: argparse.Namespace, resumed: dict | None
                   ) -> tuple[ModelConfig, Tokenizer, str, str, dict | None]:
    """The config and tokenizer of the model to fine-tune, where they come from (the run resumed,
    --checkpoint or the newest in --run-dir, or with --from-scratch the preset and --data-dir's
    tokenizer), its story_start and, for an imported model, its generation settings."""
    if resumed or not args.from_scratch:
        path = (os.path.join(args.out_dir, "latest.pt") if resumed
                else args.checkpoint or newest_checkpoint(args.run_dir))
        checkpoint = resumed or read_checkpoint(path)
        if not {"config", "tokenizer"} <= checkpoint.keys():
            raise ValueError(f"{path}: no model config or tokenizer in it; was it written by "
                             f"`python gpt.py train`?")
        config = saved_config(checkpoint["config"], path, checkpoint["model"])
        tokenizer = saved_tokenizer(checkpoint["tokenizer"], path, config.vocab_size)
        # A resumed run keeps its architecture: model flags, if given, must agree with it.
        return (resolve_config(args, config.vocab_size, asdict(config)), tokenizer, path,
                saved_story_start(checkpoint, path),
                saved_generation(checkpoint.get("generation"), tokenizer, path))
    tokenizer_dir = os.path.join(args.data_dir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise ValueError(f"{tokenizer_dir} not found: --from-scratch takes the tokenizer that "
                         f"`python gpt.py tokenize` writes there (or give --data-dir)")
    tokenizer = Tokenizer.load(tokenizer_dir)
    args.preset = args.preset or "laptop"
    return resolve_config(args, max(tokenizer.vocab) + 1), tokenizer, tokenizer_dir, "", None


def finetune_data(args: argparse.Namespace, pairs: list[tuple[str, str]],
                  valid_pairs: list[tuple[str, str]] | None, tokenizer: Tokenizer,
                  template: QATemplate, context_length: int
                  ) -> tuple[QAPairs, QAPairs, list[str]]:
    """The pairs to train on and the held-out ones (--valid's, or some of --data's), encoded,
    and the lines that say what was done with them."""
    if valid_pairs is not None:
        valid_path, held_from = args.valid, args.valid
        train_ids, held_ids = list(range(len(pairs))), list(range(len(valid_pairs)))
    else:
        fraction = args.valid_fraction or FINETUNE_VALID_FRACTION
        valid_pairs, valid_path = pairs, args.data
        train_ids, held_ids = hold_out_pairs(len(pairs), fraction, args.data)
        held_from = (f"items {', '.join(map(str, held_ids[:3]))}{', ...' * (len(held_ids) > 3)}"
                     f" of {args.data}")
    train, long_train = encode_pairs(pairs, train_ids, tokenizer, template, context_length,
                                     args.train_on_everything, args.data)
    valid, long_valid = encode_pairs(valid_pairs, held_ids, tokenizer, template, context_length,
                                     False, valid_path)
    notes = [f"pairs: {len(train.items)} to train on, {len(valid.items)} held out ({held_from})",
             f"loss on: {'every token' if args.train_on_everything else 'the answers'} and "
             f"the tokens that end them"]
    for path, left_out in ((args.data, long_train), (valid_path, long_valid)):
        if left_out:
            notes.append(f"left out {len(left_out)} pair(s) of {path} longer than the "
                         f"{context_length}-token context: items "
                         f"{', '.join(map(str, left_out[:10]))}{' ...' * (len(left_out) > 10)}")
    return train, valid, notes


def start_finetune(args: argparse.Namespace) -> tuple[Run, dict | None, float]:
    """start_run for fine-tuning: check every input first (the pairs before the checkpoint,
    which takes longer to read), then settle the model to start from, the data and the recipe;
    returns the run, the checkpoint to resume and the budget already used."""
    device, rank, world_size = start_process(args)
    check_finetune_args(args)
    check_run_dir(args)
    pairs = read_qa_file(args.data)
    valid_pairs = read_qa_file(args.valid) if args.valid else None
    checkpoint, total_steps, time_used = read_resume(args, "fine-tuning")
    config, tokenizer, source, story_start, generation = finetune_model(args, checkpoint)
    start_from = None if checkpoint or args.from_scratch else source
    if args.overwrite and start_from and (os.path.realpath(os.path.dirname(start_from))
                                          == os.path.realpath(args.out_dir)):
        raise ValueError(f"--overwrite would delete {start_from}, the checkpoint to fine-tune: "
                         f"give another --out-dir")
    T = min(config.context_length, FINETUNE_ROW_TOKENS)
    train_pairs, valid_pairs, notes = finetune_data(args, pairs, valid_pairs, tokenizer,
                                                    qa_template(tokenizer, generation, source), T)
    if args.max_steps is None and args.max_time is None:
        args.max_steps = total_steps = FINETUNE_STEPS
    # From scratch, the preset's learning rate; a trained model needs smaller steps not to forget.
    max_lr, min_lr = settle_optimizer(args, PRESETS[args.preset]["lr"] if args.preset
                                      else FINETUNE_LR)
    batch_size = args.batch_size or (PRESETS[args.preset]["batch_size"] if args.preset
                                     else FINETUNE_BATCH_SIZE)
    run = Run(args, device, rank, world_size, autocast_dtype(device, args.dtype), tokenizer,
              train_pairs, valid_pairs, config, batch_size, max_lr, min_lr,
              total_steps=total_steps, get_batch=qa_batch, loss=masked_cross_entropy,
              evaluate=evaluate_answers, start_from=start_from, kind="fine-tuning",
              story_start=story_start, generation=generation, row_length=T,
              eval_starts=np.arange(len(valid_pairs.items)))
    check_batch_fits(run.batch_size, T, config.vocab_size, device, "--batch-size")
    if rank == 0:
        check_writable_dir(args.out_dir)
        for path in remove_stale_temp_files(args.out_dir):
            log(f"removed {path}, left by a run killed while saving")
    run.say(f"fine-tuning {'random weights' if args.from_scratch and not checkpoint else source}"
            f" on {args.data}")
    for line in notes:
        run.say(line)
    return run, checkpoint, time_used


# ==================================================================================================
# §19 Machinery: the fast twins, switched in from one place
#
# §1-§7 define each idea once, in its readable form, under its plain name. The machinery
# defines a fast twin for some of them (named fast_<name>, or Fast<Name> for a class), tested
# equal; those of the loss, AdamW, clipping and top-p are just below. Here the plain names are
# pointed at the twins: the ideas call each other by module-level name, so rebinding a name here
# changes what every caller runs, with no flag inside the ideas.
# Importing gpt.py leaves the fast twins in place; `--readable` puts the readable forms back, so
# a reader stepping through a run in a debugger sees exactly the code of §1-§7.
# ==================================================================================================

class SlicedCrossEntropy(torch.autograd.Function):
    """Forward and backward of §4's mean cross-entropy, written out by hand, for logits (N, V).

    The gradient is simple enough to write directly: d loss / d logits = (softmax - onehot) / N.
    Both passes walk the (N, V) logits in slices of about a million values. Whole-size
    temporaries would cost more than the arithmetic: on a CPU every fresh 80 MB buffer is paged in
    from the OS, while a 4 MB one is reused from cache. A GPU has no such cost, so it takes big
    slices there and launches few kernels.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        N, V = logits.shape
        rows = max(1, (1 << 20 if logits.device.type == "cpu" else 1 << 28) // V)
        lse = torch.empty(N, 1, device=logits.device)  # (N, 1)
        for i in range(0, N, rows):
            z = logits[i:i + rows]  # (rows, V)
            # logsumexp(z) = m + log(sum_j exp(z_j - m)), m = max(z): exp never overflows
            m = z.amax(dim=-1, keepdim=True)
            lse[i:i + rows] = m + torch.exp(z - m).sum(dim=-1, keepdim=True).log()
        # loss_i = -log softmax(z_i)[y_i] = logsumexp(z_i) - z_i[y_i]
        target_logits = logits.gather(-1, targets[:, None])  # (N, 1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows = rows
        return (lse - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        rows = ctx.rows
        grad = torch.empty_like(logits)  # (N, V)
        for i in range(0, len(logits), rows):
            # softmax(z) = exp(z - logsumexp(z)), written straight into the gradient
            torch.sub(logits[i:i + rows], lse[i:i + rows], out=grad[i:i + rows]).exp_()
        grad[torch.arange(len(targets), device=grad.device), targets] -= 1  # - onehot(y)
        grad *= grad_loss / len(targets)  # (N, V): the mean's 1/N, times the upstream gradient
        return grad, None


# The fast twin of §4's cross_entropy.
def fast_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """cross_entropy for logits (..., V) and targets (...), in float32, by SlicedCrossEntropy;
    under torch.compile by the readable formula itself, which the compiler fuses, backward
    included (a hand-written backward would keep it from fusing)."""
    logits = logits.float().reshape(-1, logits.shape[-1])  # (N, V), N = all positions
    targets = targets.reshape(-1)                          # (N,)
    if torch.compiler.is_compiling():
        return READABLE_FORMS["cross_entropy"](logits, targets)
    return SlicedCrossEntropy.apply(logits, targets)


# The fast twin of §4's AdamW.
class FastAdamW(AdamW):
    """AdamW, vectorised: the torch._foreach_* calls apply each line of adamw_update to all
    parameters at once, a few kernel launches per step rather than a few per parameter."""

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter once; closure (PyTorch's convention) recomputes the loss."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in params:
                if not self.state[p]:  # the first step: moments start at zero
                    self.state[p].update(step=0, exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
                self.state[p]["step"] += 1
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            m = [s["exp_avg"] for s in states]
            v = [s["exp_avg_sq"] for s in states]
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m + (1 - beta1)(g - m), adamw_update's m
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
            # Parameters may differ in step count (one that had no gradient for a while),
            # hence one bias correction per parameter. With c = sqrt(1 - beta2^t), the update
            # m / (sqrt(v) / c + eps) equals c * m / (sqrt(v) + eps * c): one pass less.
            steps = [s["step"] for s in states]
            c = [math.sqrt(1 - beta2 ** t) for t in steps]
            denom = torch._foreach_sqrt(v)
            torch._foreach_add_(denom, [eps * c_t for c_t in c])
            step_sizes = [-lr * c_t / (1 - beta1 ** t) for c_t, t in zip(c, steps)]
            torch._foreach_addcdiv_(params, m, denom, step_sizes)
        return loss


# The fast twin of §5's clip_grad_norm.
def fast_clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """clip_grad_norm with the norms and the scaling of all gradients in two foreach calls."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)
    return norm


# The fast twin of §7's filter_logits.
def fast_filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                       top_p: float | None = None) -> torch.Tensor:
    """filter_logits, with top-p's sort cut short. Sorting all V probabilities is the slowest
    part of a generation step, but the nucleus is nearly always among the few likeliest tokens:
    take the top 64, and sort everything only when their mass falls short of p (any token
    beyond them is dropped either way)."""
    logits = logits / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        top = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, -math.inf).scatter(-1, top.indices, top.values)
    if top_p is not None and top_p < 1:
        probs = softmax(logits, dim=-1)  # (B, V)
        top, order = probs.topk(min(64, probs.shape[-1]), dim=-1)  # (B, 64), descending
        if (top.sum(dim=-1) < top_p).any():
            top, order = probs.sort(dim=-1, descending=True)       # (B, V)
        mass_before = top.cumsum(dim=-1) - top  # (B, K), K = 64 or V
        kept = logits.gather(-1, order).masked_fill(mass_before >= top_p, -math.inf)  # (B, K)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, kept)  # (B, V)
    return logits


# plain name in §1-§7 -> its fast twin in the machinery
FAST_TWINS: dict[str, object] = {
    "train_bpe_incremental": fast_train_bpe_incremental,
    "split_isolated": fast_split_isolated,
    "Tokenizer": FastTokenizer,
    "cross_entropy": fast_cross_entropy,
    "AdamW": FastAdamW,
    "clip_grad_norm": fast_clip_grad_norm,
    "filter_logits": fast_filter_logits,
    "Embedding": FastEmbedding,
    "RMSNorm": FastRMSNorm,
    "MultiHeadSelfAttention": FastMultiHeadSelfAttention,
    "SwiGLU": FastSwiGLU,
}
READABLE_FORMS: dict[str, object] = {name: globals()[name] for name in FAST_TWINS}


def use_fast_twins(fast: bool = True) -> None:
    """Run the fast twins (the default) or, with fast=False, the readable forms of §1-§7."""
    globals().update(FAST_TWINS if fast else READABLE_FORMS)


use_fast_twins(True)


# ==================================================================================================
# §20 Command line
#
# Each subcommand is a plain function of its parsed arguments. A mistake in the user's input
# (a missing file, an impossible size) raises ValueError or OSError with a message naming the
# bad value; main() prints that one line and exits with code 2.
# ==================================================================================================

def cmd_tokenize(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    # -- Check every input before writing anything: a mistake leaves the previous files as they
    # were, and costs seconds, not the minutes of training BPE first.
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    workers = args.workers or default_workers()
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
        special_tokens = tokenizer.special_tokens
    else:
        special_tokens = args.special_tokens
        check_special_tokens(special_tokens)
        check_vocab_size(args.vocab_size, special_tokens)
    sources = tokenize_inputs(args, special_tokens)
    with made_if_missing(args.out_dir):  # a probe: write_outputs makes it for good
        check_writable_dir(args.out_dir)
    remove_leftovers(args.out_dir)
    tokenizer_dir = os.path.join(args.out_dir, "tokenizer")

    if args.tokenizer:
        print(f"tokenizer: loaded from {args.tokenizer} ({len(tokenizer.vocab):,} tokens)")
    else:
        _, start, end = text_range(sources["train"])
        vocab, merges = train_bpe(sources["train"], args.vocab_size, special_tokens, workers,
                                  verbose=True)
        tokenizer = Tokenizer(vocab, merges, special_tokens)
        print(f"tokenizer: trained on {text_name(sources['train'])} ({(end - start) / 1e6:,.1f} "
              f"MB) in {time.perf_counter() - started:.1f}s: {len(vocab):,} tokens, "
              f"{len(merges):,} merges")
    # The token files' directory always holds their tokenizer.
    save_tokenizer = os.path.abspath(args.tokenizer or "") != os.path.abspath(tokenizer_dir)
    write_outputs(tokenizer, sources, args.out_dir, workers, save_tokenizer)
    longest = sorted((t for i, t in tokenizer.vocab.items()
                      if t.decode("utf-8", "replace") not in tokenizer.special_tokens),
                     key=len, reverse=True)[:5]
    print("longest tokens: " + ", ".join(repr(t.decode("utf-8", "replace")) for t in longest))
    print(f"done in {time.perf_counter() - started:.1f}s; tokenizer in {tokenizer_dir}")


def check_prompt(prompt: str, source: str) -> str:
    """Refuse a prompt that is not UTF-8 text. Python hands over bytes that are not UTF-8 as
    surrogate escapes (b"\\xff" -> "\\udcff"), which have no UTF-8 encoding. We could decode
    them as U+FFFD instead, but the model would then continue a prompt the user never typed;
    better to say so (the usual cause is a terminal set to another encoding, such as Latin-1)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        char = prompt[e.start]
        what = (f"byte 0x{ord(char) - 0xDC00:02x}" if "\udc80" <= char <= "\udcff"
                else f"character {char!r}")
        raise ValueError(f"{source} is not valid UTF-8 text ({what} at position {e.start}): "
                         f"is the terminal set to UTF-8?") from None
    return prompt


def interactive_prompts() -> Iterator[str]:
    """Prompts typed at the terminal, until an empty line or Ctrl-D."""
    log("type a prompt and press Enter; an empty line or Ctrl-D quits")
    while True:
        try:
            prompt = input("> ")
        except EOFError:
            return
        except UnicodeDecodeError as e:
            raise ValueError(f"the prompt typed is not valid UTF-8 text (byte "
                             f"0x{e.object[e.start]:02x}): is the terminal set to UTF-8?") from None
        if not prompt:
            return
        yield check_prompt(prompt, "the prompt typed")


def story_ids(tokenizer: Tokenizer, prompt: str, story_start: str,
              generation: dict | None = None) -> list[int]:
    """The prompt's ids as a fresh story in the training data: after the end-of-text token and
    what the data puts after it (story_start), encoded together with the prompt as training
    encoded them. Example (TinyStories): "Once" -> [<|endoftext|>, '\\n', 'Once']. An imported
    model's prompt starts with its bos_ids instead (see hf_generation)."""
    if generation is not None:
        return generation["bos_ids"] + tokenizer.encode(prompt)
    eos_id = end_of_text_id(tokenizer)
    if eos_id is None:
        return tokenizer.encode(prompt)
    return [eos_id] + tokenizer.encode(story_start + prompt)


def sample_prompt(model: TransformerLM, tokenizer: Tokenizer, prompt: str, prompt_ids: list[int],
                  stop_ids: set[int], args: argparse.Namespace) -> int:
    """Continue one prompt, the text `prompt` fed as prompt_ids, up to a token of stop_ids: a
    single sample is streamed to stdout as it is generated; several are generated as one batch
    and printed at the end. Returns the number of tokens generated."""
    if not prompt_ids:
        raise ValueError("the prompt is empty and the tokenizer has no end-of-text token "
                         "to start from")
    # The prompt repeated by torch, not as a Python list of rows: a batch too large for
    # memory then fails at once, in one allocation.
    device = next(model.parameters()).device
    batch = torch.tensor([prompt_ids], device=device).repeat(args.num_samples, 1)  # (N, T0)
    steps = generate_batch(model, batch, args.max_new_tokens, args.temperature, args.top_k,
                           args.top_p, args.seed, use_cache=not args.no_kv_cache)
    if args.num_samples == 1:
        sampled = []

        def tokens():
            for next_ids in steps:
                sampled.append(int(next_ids[0]))
                if sampled[-1] in stop_ids:
                    return
                yield sampled[-1]

        sys.stdout.write(prompt)
        for piece in decode_stream(tokens(), tokenizer):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return len(sampled)
    columns, ended = [], torch.zeros(args.num_samples, dtype=torch.bool)  # (N,) each
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long)
    for next_ids in steps:
        columns.append(next_ids.cpu())
        ended |= torch.isin(columns[-1], stops)
        if ended.all():
            break
    for i, row in enumerate(torch.stack(columns, dim=1).tolist()):  # (N, steps)
        end = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
        text = "".join(decode_stream(row[:end], tokenizer))
        print(f"--- sample {i + 1} ---\n{prompt}{text}")
    return len(columns) * args.num_samples


def cmd_sample(args: argparse.Namespace) -> None:
    if args.prompt is not None:
        check_prompt(args.prompt, "--prompt")
    # Python sets sys.stdout and sys.stdin to None when the shell closed them (`>&-`, `<&-`).
    if sys.stdout is None:
        raise ValueError("stdout is closed, so the samples have nowhere to go: redirect it "
                         "(to a file, or to /dev/null) instead of closing it")
    if args.prompt is None and sys.stdin is None:
        raise ValueError("stdin is closed, so no prompt can be typed: give --prompt TEXT")
    path = args.checkpoint or newest_checkpoint(args.run_dir)
    device = pick_device(args.device)
    model, tokenizer, checkpoint = read_model(path)
    model = model.to(device)
    story_start = saved_story_start(checkpoint, path)
    generation = saved_generation(checkpoint.get("generation"), tokenizer, path)
    # Questions, in finetune's template (qa_template), which also ends the answers.
    template = qa_template(tokenizer, generation, path) if args.qa else None
    stop_ids = set(generation["eos_ids"]) if generation else {end_of_text_id(tokenizer)}
    stop_ids |= {template.end} if template else set()
    log(f"model: {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"device {device})")
    prompts = [args.prompt] if args.prompt is not None else interactive_prompts()
    try:
        for prompt in prompts:
            started = time.perf_counter()
            ids = (template.prompt_ids(tokenizer, prompt) if template
                   else story_ids(tokenizer, prompt, story_start, generation))
            count = sample_prompt(model, tokenizer, template.prompt(prompt) if template
                                  else prompt, ids, stop_ids - {None}, args)
            sys.stdout.flush()  # here, where a broken pipe is caught, not at exit
            seconds = time.perf_counter() - started
            log(f"[{count} tokens in {seconds:.2f}s: {count / seconds:.1f} tokens/s"
                f"{'' if args.no_kv_cache else ', KV cache'}]")
    except BrokenPipeError:
        # Whoever reads stdout has stopped (`| head -1`): they have what they wanted, so we
        # stop quietly, with exit code 0, like a run that ended. stdout is pointed at /dev/null
        # so that Python's last flush of what is still buffered does not fail once more.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        advice = ("give a smaller --num-samples" if args.num_samples > 1
                  else "give a shorter prompt")
        raise ValueError(f"out of memory on {device} generating {args.num_samples:,} "
                         f"sample{'s' * (args.num_samples > 1)} at once: {advice}") from None


def write_export(staging: str, model: TransformerLM, tokenizer: Tokenizer, iteration: int,
                 source: str, story_start: str, generation: dict | None = None) -> None:
    """Write every file of an export into `staging`, the marker that lists them last."""
    out = lambda name: os.path.join(staging, name)
    write_safetensors(out("model.safetensors"), llama_state_dict(model))
    files = {"config.json": llama_config(model.config, tokenizer)}
    eos_id = end_of_text_id(tokenizer)
    # generate() stops at the end of a story. No pad_token_id: a generate() told no eos would
    # take the leading end-of-text token of a prompt for padding, and mask it out.
    if eos_id is not None:
        files["generation_config.json"] = {"bos_token_id": eos_id, "eos_token_id": eos_id}
    if generation:  # an imported model's own, as it came
        bos, eos = generation["bos_ids"], generation["eos_ids"]
        # With no bos before a prompt, the first end token stands in, as in GPT-2's config.
        ids = {"bos_token_id": bos[0] if bos else eos[0] if eos else None,
               "eos_token_id": eos if len(eos) > 1 else eos[0] if eos else None}
        files["config.json"].update(ids)
        files["generation_config.json"] = ids
    for name, value in files.items():
        write_atomically(out(name), (json.dumps(value, indent=2) + "\n").encode())
    for name, data in hf_tokenizer_files(tokenizer, model.config.context_length,
                                         generation).items():
        write_atomically(out(name), data)
    save_weights_only(model.state_dict(), model.config, tokenizer, iteration, out("gpt.pt"),
                      story_start, **({"generation": generation} if generation else {}))
    marker = {"files": sorted(os.listdir(staging)), "checkpoint": source, "step": iteration}
    write_atomically(out(EXPORT_MARKER), (json.dumps(marker, indent=2) + "\n").encode())


def cmd_export(args: argparse.Namespace) -> None:
    path = args.checkpoint or newest_checkpoint(args.run_dir)
    model, tokenizer, checkpoint = read_model(path)  # on the CPU, checked as for sampling
    check_exportable(model.config)
    iteration, story_start = checkpoint["iteration"], saved_story_start(checkpoint, path)
    generation = saved_generation(checkpoint.get("generation"), tokenizer, path)
    out = os.path.realpath(args.out)  # a link given as --out: the directory it names
    with export_staging(out, args.overwrite, "--out") as staging:
        write_export(staging, model, tokenizer, iteration, path, story_start, generation)
    num_params = sum(p.numel() for p in model.parameters())
    size = lambda name: os.path.getsize(os.path.join(out, name)) / 1e6
    print(f"model: {path} (step {iteration:,}, {num_params / 1e6:.1f}M parameters)")
    print(f"wrote {args.out}: model.safetensors ({size('model.safetensors'):.1f} MB), the "
          f"config and tokenizer files, gpt.pt ({size('gpt.pt'):.1f} MB, for gpt.py sample)")
    print(f'load it with AutoModelForCausalLM.from_pretrained("{args.out}") and '
          f'AutoTokenizer.from_pretrained("{args.out}")')


def cmd_import(args: argparse.Namespace) -> None:
    """`python gpt.py import HF_DIR --out-dir RUN_DIR`: §16's import, staged as an export is."""
    if not os.path.isdir(args.hf_dir):
        raise ValueError(f"{args.hf_dir} is not a directory: give the directory of a Hugging "
                         f"Face checkpoint (config.json, model.safetensors, tokenizer.json)")
    config, names, tensors, arch = read_hf_checkpoint(args.hf_dir)
    tokenizer, generation = read_hf_tokenizer(args.hf_dir)
    rows = max(tokenizer.vocab) + 1  # the rows of the embedding and output that a token reaches
    if rows > config.vocab_size:
        raise ValueError(f"{args.hf_dir}: its tokenizer's ids go up to {rows - 1}, but "
                         f"config.json gives a {config.vocab_size}-token vocabulary")
    with export_staging(os.path.realpath(args.out_dir), args.overwrite, "--out-dir") as staging:
        state = read_hf_weights(config, names, tensors)
        if rows < config.vocab_size:
            # Qwen pads its 151,669 tokens to 151,936 rows, a multiple that suits GPUs: rows no
            # token reaches are dropped (a sampler could draw them, and nothing decodes them).
            config = replace(config, vocab_size=rows)
            embedding = state["token_embeddings.weight"][:rows].clone()
            state["lm_head.weight"] = (embedding if config.tie_embeddings
                                       else state["lm_head.weight"][:rows].clone())
            state["token_embeddings.weight"] = embedding
        save_weights_only(state, config, tokenizer, 0, os.path.join(staging, "gpt.pt"),
                          kind="imported", source=os.path.abspath(args.hf_dir),
                          architecture=arch, generation=generation)
        marker = {"files": ["gpt.pt"], "imported": os.path.abspath(args.hf_dir)}
        write_atomically(os.path.join(staging, EXPORT_MARKER), json.dumps(marker).encode())
    dtypes = sorted({str(tensors[theirs][1]).removeprefix("torch.") for theirs in names.values()})
    count = sum(t.numel() for t in {id(t): t for t in state.values()}.values())
    print(f"model: {args.hf_dir} ({arch}, {count / 1e6:.1f}M parameters, {', '.join(dtypes)})")
    print(f"wrote {args.out_dir}: gpt.pt, in float32 ({4 * count / 1e6:.1f} MB); sample it with "
          f"`python gpt.py sample --run-dir {shlex.quote(args.out_dir)}`")


def cmd_plot(args: argparse.Namespace) -> None:
    # Runs are named by their folder in the legend, or by the path as given when two share one.
    names = [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
    if len(set(names)) < len(names):
        names = args.run_dirs
    runs = [run_curves(d, name) for d, name in zip(args.run_dirs, names)]
    out_dir = args.out_dir or args.run_dirs[0]
    check_writable_dir(out_dir)
    for run in runs:
        print_run_table(run)
    plt = pyplot()
    if plt is not None:
        for path in draw_curves(runs, out_dir, plt):
            print(f"wrote {path}")


def inspection_ids(tokenizer: Tokenizer, prompt: str, context_length: int,
                   story_start: str = "", generation: dict | None = None) -> list[int]:
    """The prompt's ids as `sample` feeds them (story_ids): at most the context, at least two."""
    check_prompt(prompt, "--prompt")
    if not prompt:
        raise ValueError("--prompt is empty: give the text to show attention and predictions for")
    eos_id = end_of_text_id(tokenizer)
    ids = story_ids(tokenizer, prompt, story_start, generation)
    before = " with the end-of-text token before it" if eos_id is not None else ""
    if len(ids) > context_length:
        raise ValueError(f"--prompt is {len(ids)} tokens{before}, more than the model's context "
                         f"of {context_length}: give a shorter one")
    if len(ids) < 2:
        raise ValueError("--prompt is 1 token, and attention needs 2 positions to show "
                         "anything: give a longer one")
    return ids


def cmd_inspect(args: argparse.Namespace) -> None:
    path = args.checkpoint or newest_checkpoint(args.run_dir)
    out_dir = args.out_dir or os.path.dirname(path) or "."
    check_writable_dir(out_dir)
    device = pick_device(args.device)
    model, tokenizer, checkpoint = read_model(path)
    model = model.to(device)
    ids = inspection_ids(tokenizer, args.prompt, model.config.context_length,
                         saved_story_start(checkpoint, path),
                         saved_generation(checkpoint.get("generation"), tokenizer, path))
    if args.top_k > model.config.vocab_size:
        raise ValueError(f"--top-k {args.top_k}: the model has {model.config.vocab_size} tokens")
    log(f"model: {path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"device {device}); prompt: {len(ids)} tokens")
    labels = [token_label(tokenizer, i) for i in ids]
    token_ids = torch.tensor(ids, device=device)                       # (T,)
    maps = [weights[0] for weights in attention_maps(model, token_ids[None])]  # (H, T, T) each
    stats, initial = weight_stats(model, args.bins), initial_spectral_norms(model.config)
    print_attention_table(maps, labels)
    print_next_token_table(tokenizer, labels, next_token_table(model, token_ids, args.top_k))
    print_weight_table(stats, initial)
    plt = pyplot()
    if plt is not None:
        print(f"wrote {draw_attention(maps, labels, os.path.join(out_dir, 'attention.png'), plt)}")
        print(f"wrote {draw_histograms(stats, os.path.join(out_dir, 'weights.png'), plt)}")
        spectral = os.path.join(out_dir, "spectral_norms.png")
        print(f"wrote {draw_spectral_norms(stats, initial, spectral, plt)}")


def cmd_train(args: argparse.Namespace, start=start_run) -> None:
    """`python gpt.py train`, and `finetune` (start=start_finetune): §14's training run. One
    run at a time writes into OUT_DIR: the process that writes (rank 0) holds its lock."""
    with directory_lock(args.out_dir, taken=os.environ.get("RANK", "0") == "0"):
        train(args, start)


def arm_labels(name: str, common: list[str]) -> list[str]:
    """The arms' names for the results table, except where the flags given to every arm change
    what the experiment varies: such an arm is labelled with the values it really trained with.
    Example: `experiment batch --batch-size 4` -> ["batch_size 4", "batch 16"]."""
    parse = lambda flags: {key: value for key, value in
                           vars(build_parser().parse_args(["train", *flags])).items()
                           if key not in ("run", "parser")}  # the command, not a setting
    plain = parse([])
    declared = [parse(flags) for _, flags in EXPERIMENTS[name]]
    varied = sorted({key for own in declared for key in own if own[key] != plain[key]})
    labels = []
    for (arm, flags), own in zip(EXPERIMENTS[name], declared):
        trained = parse([*common, *flags])
        if all(trained[key] == own[key] for key in varied):
            labels.append(arm)
        else:
            labels.append(", ".join(f"{key} {trained[key]}" for key in varied
                                    if trained[key] != plain[key]))
    return labels


def cmd_experiment(args: argparse.Namespace) -> None:
    """`python gpt.py experiment NAME [train flags]`: train each arm of EXPERIMENTS[NAME] with
    the same flags (budget, seed, data) into OUT_DIR/NAME/<arm>, then tabulate the results.
    Run again with the same flags, it keeps the finished arms and resumes an interrupted one."""
    if any(flag.split("=")[0] in ("--out-dir", "--resume") for flag in args.train_flags):
        raise ValueError("experiment: give --out-dir before NAME (each arm trains into "
                         "OUT_DIR/NAME/ARM), and no --resume")
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    runs = {}  # arm directory -> its train flags, arguments and state, before any trains
    for name in names:
        for arm, flags in EXPERIMENTS[name]:
            directory = arm_dir(args, name, flags, arm)
            # The arm's flags, as recorded: --overwrite says what to do, not what to train.
            argv = [a for a in ["train", *args.train_flags, *flags, "--out-dir", directory]
                    if a != "--overwrite"]
            train_args = build_parser().parse_args(argv)
            try:  # on a copy, with any vocabulary: no check depends on its size
                settle_recipe(argparse.Namespace(**vars(train_args)),
                              pick_device(train_args.device), MAX_VOCAB_SIZE)
            except ValueError as e:
                given = " ".join(flags) or "the default"
                raise ValueError(f"arm {arm!r} of experiment {name} ({given}, with the flags "
                                 f"given): {e}") from None
            runs[directory] = argv, train_args, arm_state(directory, argv)
    again = shlex.join(["python", "gpt.py", "experiment", "--out-dir", args.out_dir, args.name,
                        *args.train_flags])
    with directory_lock(args.out_dir):
        # Any other run in an arm's directory is refused unless --overwrite.
        for directory, (argv, train_args, state) in runs.items():
            train_args.overwrite = "--overwrite" in args.train_flags and state == "new"
            train_args.resume = state == "interrupted"
            if train_args.resume:  # within the budget it started with, like a plain --resume
                train_args.max_steps = train_args.max_time = None
            if state == "new" and not train_args.overwrite and os.path.isfile(
                    os.path.join(directory, "latest.pt")):
                raise ValueError(f"{directory} holds a run of other train flags than these: "
                                 f"give its flags again to go on with it, train into another "
                                 f"--out-dir, or replace it with --overwrite")
            if state != "done":
                check_run_dir(train_args)
        for directory, (argv, train_args, state) in runs.items():
            if state == "done":  # by an earlier experiment, or the default shared by all
                print(f"== {directory}: trained already with these flags, kept", flush=True)
                continue
            print(f"== {directory}{': resuming it' * (state == 'interrupted')}", flush=True)
            os.makedirs(directory, exist_ok=True)
            write_atomically(os.path.join(directory, "experiment.json"), json.dumps(argv).encode())
            try:
                cmd_train(train_args)
            except KeyboardInterrupt as e:
                said = str(e).removesuffix("; continue with --resume") or "interrupted"
                raise KeyboardInterrupt(f"{said}; finished arms are kept, and this one resumes "
                                        f"when the same command runs again: {again}") from None
        write_experiments(args, names)


def write_experiments(args: argparse.Namespace, names: list[str]) -> None:
    """Each experiment's results table and overlaid curves, in OUT_DIR/NAME."""
    plt = pyplot()  # the overlaid curves, when matplotlib is installed
    for name in names:
        out = os.path.join(args.out_dir, name)
        arms = [arm_dir(args, name, flags, arm) for arm, flags in EXPERIMENTS[name]]
        labels = arm_labels(name, args.train_flags)
        write_results(out, [(label, flags, arm_result(directory)) for label, (_, flags), directory
                            in zip(labels, EXPERIMENTS[name], arms)])
        if plt is not None:
            runs = [run_curves(directory, label) for directory, label in zip(arms, labels)]
            for path in draw_curves(runs, out, plt):
                print(f"wrote {path}")


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake on the command line is one line (not the usage, then the error)
    and exit code 2, like every other bad input."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A minus then a digit is a value, not a flag, as from Python 3.13 on: `--max-time -5m`
        # is then refused as negative, not as "expected one argument".
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag is reported by the subcommand it was given to."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            getattr(parsed, "parser", self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def number(kind, low: float = -math.inf, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite int or float in [low, high] (or (low, high] if low_open).
    Example: number(int, 1)("0") fails with "expected an integer >= 1, got '0'"."""
    bounds = [f"{'>' if low_open else '>='} {low}"] if low > -math.inf else []
    bounds += [f"<= {high}"] if high < math.inf else []
    expected = " ".join(["an integer" if kind is int else "a number", " and ".join(bounds)])

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        finite = value is not None and (kind is int or math.isfinite(value))
        if not (finite and value <= high and (value > low if low_open else value >= low)):
            raise argparse.ArgumentTypeError(f"expected {expected.strip()}, got {text!r}")
        return value

    return parse


def duration(text: str) -> float:
    """An argparse type for --max-time: see parse_duration."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="gpt.py", description="Train a small GPT from scratch: tokenize, train, sample; "
                                  "finetune, experiment, export, import; plot, inspect.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_tokenize_parser(commands)
    add_train_parser(commands)
    add_sample_parser(commands)
    add_experiment_parser(commands)
    add_export_parser(commands)
    add_import_parser(commands)
    add_look_inside_parsers(commands)
    add_finetune_parser(commands)
    return parser


def add_tokenize_parser(commands) -> None:
    tok = commands.add_parser(
        "tokenize", help="train a BPE tokenizer and encode a corpus into token files",
        description="Train byte-level BPE on the train text (or load a tokenizer), then encode "
                    "the train and valid texts into OUT_DIR/train.bin and OUT_DIR/valid.bin. "
                    "Every input is checked first, and OUT_DIR's files are replaced only once "
                    "all the new ones are written.")
    tok.add_argument("--train", metavar="PATH",
                     help=f"UTF-8 text to train BPE on and to encode (default: {BUNDLED_TRAIN})")
    tok.add_argument("--valid", metavar="PATH",
                     help="UTF-8 text to encode as validation data (default: with --train, the "
                          "end of that text, see --valid-fraction; without, "
                          f"{BUNDLED_VALID})")
    tok.add_argument("--valid-fraction", type=float, metavar="F",
                     help="with --train and no --valid: the share of the train text held out "
                          "for validation, taken from its end and cut after a special token "
                          "(or else a line break); BPE never sees it (default: "
                          f"{DEFAULT_VALID_FRACTION}, the usual tenth)")
    tok.add_argument("--vocab-size", type=int, default=10_000,
                     help="tokens in all: 256 bytes + special tokens + merges "
                          "(default: %(default)s)")
    tok.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"],
                     help="strings that are always one token and delimit documents, each "
                          "non-empty and given once (default: %(default)s; give none for no "
                          "special tokens)")
    tok.add_argument("--out-dir", default="data",
                     help="where tokenizer/, train.bin and valid.bin go, each token file with "
                          "a .json sidecar naming its tokenizer (default: %(default)s)")
    tok.add_argument("--tokenizer", metavar="DIR",
                     help="encode only, with the tokenizer saved in DIR (no BPE training; "
                          "--vocab-size and --special-tokens are then ignored)")
    tok.add_argument("--workers", type=int, default=None,
                     help="worker processes (default: every available core)")
    tok.add_argument("--readable", action="store_true",
                     help=f"{READABLE_HELP}: §1's incremental trainer and plain encoder, still "
                          f"fed by the parallel workers of §9 and §10 (the same files)")
    tok.set_defaults(run=cmd_tokenize, parser=tok)


READABLE_HELP = ("run the readable code of §1-§7 instead of the fast twins of §19 (same "
                 "results, slower): for stepping through the book in a debugger")


DEVICE_HELP = "cpu, cuda, cuda:1, mps, or auto: CUDA, then MPS, then CPU (default: %(default)s)"


def add_checkpoint_flags(parser: argparse.ArgumentParser, what: str = "checkpoint file") -> None:
    """The model a command reads: --checkpoint, or the newest checkpoint in --run-dir."""
    parser.add_argument("--checkpoint", metavar="PATH",
                        help=f"{what} (default: the newest in RUN_DIR)")
    parser.add_argument("--run-dir", default="data/run",
                        help="where `train` wrote its checkpoints (default: %(default)s)")


def add_train_parser(commands) -> None:
    tr = commands.add_parser(
        "train", help="train the model on the token files",
        description="Train a transformer LM on DATA_DIR/train.bin, evaluating on valid.bin; "
                    "checkpoints, metrics.jsonl and the tokenizer go to OUT_DIR. Under "
                    "`torchrun --nproc_per_node=N` it trains on N processes (DDP).")
    tr.add_argument("--preset", choices=list(PRESETS),
                    help="model size and its batch size and learning rate (default: laptop, "
                         "about 10 minutes on a 2-core CPU; on CUDA, base at batch 128 and "
                         "compiled; on --resume, the run's own)")
    tr.add_argument("--data-dir", default="data",
                    help="where `tokenize` wrote train.bin, valid.bin and tokenizer/ "
                         "(default: %(default)s)")
    add_run_flags(tr, "data/run", "none", "10m unless --max-steps is given")
    tr.add_argument("--compile", action=argparse.BooleanOptionalAction,
                    help="torch.compile the model: faster steps after a slow first one "
                         "(default: on on CUDA, and on a CPU for a --max-time of 5m or more)")
    tr.add_argument("--readable", action="store_true",
                    help=f"{READABLE_HELP}; eagerly, as a debugger cannot step into the code "
                         f"torch.compile generates (so not with --compile)")
    add_optimization_flags(tr)
    add_model_flags(tr)
    tr.set_defaults(run=cmd_train, parser=tr)


def add_run_flags(tr: argparse.ArgumentParser, out_dir: str, steps: str, time: str) -> None:
    """Where a run of `train` or `finetune` writes, its budget and its device."""
    tr.add_argument("--out-dir", default=out_dir,
                    help="checkpoints latest.pt and best.pt, and metrics.jsonl "
                         "(default: %(default)s)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the run in OUT_DIR from its latest.pt: an interrupted run "
                         "exactly where it stopped; a finished one for a new --max-steps or "
                         "--max-time, at --min-lr")
    tr.add_argument("--overwrite", action="store_true",
                    help="start a fresh run in an OUT_DIR that holds one, deleting its "
                         "checkpoints (without it, such an OUT_DIR is refused)")
    tr.add_argument("--max-steps", type=number(int, 1),
                    help=f"optimizer steps to train for (default: {steps})")
    tr.add_argument("--max-time", metavar="DURATION", type=duration,
                    help=f"time budget such as 90s, 10m or 2h, counted from the start: the "
                         f"schedule is planned, and planned again as the run goes, to end when "
                         f"it runs out (default: {time})")
    tr.add_argument("--device", default="auto", help=DEVICE_HELP)
    tr.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="bfloat16 autocast or plain float32; auto: bf16 on GPUs and on CPUs "
                         "with bf16 instructions (default: %(default)s)")


def add_optimization_flags(tr: argparse.ArgumentParser) -> None:
    """The budget's and the optimizer's flags, and the bookkeeping's."""
    tr.add_argument("--batch-size", type=number(int, 1),
                    help="sequences per micro-batch and rank (default: from the preset)")
    tr.add_argument("--grad-accum", type=number(int, 1), default=1,
                    help="micro-batches per optimizer step (default: %(default)s)")
    tr.add_argument("--lr", type=number(float, 0.0, low_open=True),
                    help="peak learning rate; with --optimizer muon, AdamW's (default: from "
                         "the preset)")
    tr.add_argument("--min-lr", type=number(float, 0.0),
                    help="learning rate at the end of the cosine (default: lr / 10)")
    tr.add_argument("--warmup-steps", type=number(int, 0), default=100,
                    help="steps of linear warmup from 0 (default: %(default)s)")
    tr.add_argument("--decay-steps", type=number(int, 1),
                    help="step at which the cosine reaches --min-lr (default: the last step)")
    # beta2 0.95 and weight decay 0.1 (where AdamW's own defaults are 0.999 and 0.01): the
    # values of GPT-3 (Brown et al. 2020, appendix B) and LLaMA; a beta2 of 0.95 forgets old
    # squared gradients sooner, which keeps large models' loss spikes rarer. The laptop preset
    # decays more and averages longer (see PRESETS).
    tr.add_argument("--weight-decay", type=number(float, 0.0),
                    help="AdamW's decoupled weight decay of the matrices; Muon's is set to "
                         "shrink them as much per step (default: from the preset: 0.3 for "
                         "laptop, else 0.1)")
    tr.add_argument("--optimizer", choices=("adamw", "muon"),
                    help="adamw: AdamW for every parameter; muon: Muon (§4) for the weight "
                         "matrices inside the blocks, AdamW at --lr for the embeddings, the "
                         "output layer and the gains (default: from the preset: muon for "
                         "laptop, else adamw; on --resume, the run's own)")
    tr.add_argument("--muon-lr", type=number(float, 0.0, low_open=True),
                    help=f"Muon's peak learning rate, scaled by the schedule as --lr is; its "
                         f"weight decay is --weight-decay x lr / muon-lr, for AdamW's shrink "
                         f"per step (default: {MUON_LR:g}, with --optimizer muon only)")
    tr.add_argument("--beta1", type=number(float, 0.0, 1.0), default=0.9,
                    help="AdamW's gradient averaging (default: %(default)s)")
    tr.add_argument("--beta2", type=number(float, 0.0, 1.0),
                    help="AdamW's squared-gradient averaging (default: from the preset: 0.99 "
                         "for laptop, else 0.95)")
    tr.add_argument("--grad-clip", type=number(float, 0.0, low_open=True), default=1.0,
                    help="largest global gradient norm (default: %(default)s)")
    tr.add_argument("--eval-interval", type=number(int, 1),
                    help=f"steps between evaluations and checkpoints (default: under a time "
                         f"budget, {EVAL_POINTS} evaluations spread over it; else "
                         f"{EVAL_INTERVAL})")
    tr.add_argument("--eval-batches", type=number(int, 1),
                    help=f"validation batches per evaluation (default: {EVAL_BATCHES}; with "
                         f"evaluations spread over a time budget, as many as take "
                         f"{EVAL_SHARE * 100:.0f}%% of it, at least {MIN_EVAL_BATCHES})")
    tr.add_argument("--log-interval", type=number(int, 1), default=25,
                    help="steps between log lines (default: %(default)s)")
    tr.add_argument("--seed", type=number(int, 0, 2**63 - 1), default=0,
                    help="random seed, 0 to 2**63 - 1 (default: %(default)s)")


# A gloss per ModelConfig field, for --help; ModelConfig's comments say more.
MODEL_FLAG_HELP = {
    "context_length": "tokens the model reads at once", "d_model": "width of the residual stream",
    "num_layers": "transformer blocks", "num_heads": "attention heads",
    "d_ff": "hidden width of a gated feed-forward (plain kinds get 1.5x)",
    "rope_theta": "RoPE's base", "norm_eps": "RMSNorm's epsilon",
    "tie_embeddings": "one matrix for the token embeddings and the output layer",
    "tie_init": "tied: keep the output layer's small init, or the embedding's std-1 init",
    "use_norm": "--no-use-norm removes every RMSNorm (an ablation)",
    "norm_position": "pre-norm (modern) or post-norm (the 2017 transformer)",
    "position_encoding": "rotary, none, or learned or sinusoidal vectors added to the tokens'",
    "ffn_kind": "gated (swiglu, geglu) or plain two-layer feed-forward (silu, gelu, relu)",
    "dropout": "share of attention weights and branch outputs zeroed while training, in [0, 1)",
    "attention_dropout": "--no-attention-dropout: dropout of branch outputs only (faster)",
}


def add_model_flags(tr: argparse.ArgumentParser) -> None:
    """One flag per ModelConfig field, each overriding the preset's value."""
    model_flags = tr.add_argument_group(
        "model", "each overrides the preset's value; see ModelConfig in gpt.py for their meaning")
    for field in fields(ModelConfig):
        if field.name not in MODEL_FLAG_HELP:
            continue  # vocab_size is the tokenizer's; the sizes of imported models have none
        flag, gloss = "--" + field.name.replace("_", "-"), MODEL_FLAG_HELP[field.name]
        if field.type == "bool":
            model_flags.add_argument(flag, action=argparse.BooleanOptionalAction, help=gloss)
        else:
            kind = {"int": number(int, 1), "float": number(float, 0.0, low_open=True)}
            kind = number(float, 0.0, 1.0) if field.name == "dropout" else kind.get(field.type, str)
            model_flags.add_argument(flag, type=kind, choices=MODEL_CHOICES.get(field.name),
                                     help=gloss)


def add_experiment_parser(commands) -> None:
    ex = commands.add_parser(
        "experiment", help="train the arms of a classic experiment and compare them",
        description="Train each arm of an experiment on the same budget, seed and data (the "
                    "train flags after NAME apply to every arm), then write a table of the "
                    "results to OUT_DIR/NAME/results.md. Arms: " + "; ".join(
                        f"{name}: {', '.join(arm for arm, _ in arms)}"
                        for name, arms in EXPERIMENTS.items()))
    ex.add_argument("name", choices=[*EXPERIMENTS, "all"], help="which experiment (all: each)")
    ex.add_argument("--out-dir", default="data/experiments",
                    help="each arm trains into OUT_DIR/NAME/ARM (default: %(default)s)")
    ex.add_argument("train_flags", nargs=argparse.REMAINDER,
                    help="train flags for every arm, e.g. --max-steps 300 (see train --help)")
    ex.set_defaults(run=cmd_experiment, parser=ex)


def add_export_parser(commands) -> None:
    ex = commands.add_parser(
        "export", help="write a checkpoint in the Hugging Face format (Llama)",
        description="Write the model as a Llama model that Hugging Face transformers loads "
                    "with no custom code (config.json, model.safetensors, the tokenizer), and a "
                    "weights-only gpt.pt that `gpt.py sample --checkpoint` reads. Ablations "
                    "Llama cannot compute (post-norm, no norm, NoPE, a feed-forward other than "
                    "SwiGLU) are refused.")
    add_checkpoint_flags(ex)
    ex.add_argument("--out", metavar="DIR", required=True,
                    help="a new or empty directory for the files (made if missing)")
    ex.add_argument("--overwrite", action="store_true",
                    help="replace an earlier export in DIR (one that holds nothing else)")
    ex.set_defaults(run=cmd_export, parser=ex)


def add_import_parser(commands) -> None:
    im = commands.add_parser(
        "import", help="read a Hugging Face checkpoint (Llama, Qwen3) into a run directory",
        description="Read a local Hugging Face checkpoint directory of a LlamaForCausalLM or "
                    "a dense Qwen3ForCausalLM into OUT_DIR/gpt.pt, a weights-only checkpoint "
                    "that sample, inspect, finetune and export read. Nothing is downloaded.")
    im.add_argument("hf_dir", metavar="HF_DIR", help="the checkpoint's directory")
    im.add_argument("--out-dir", required=True,
                    help="a new or empty directory for gpt.pt (made if missing)")
    im.add_argument("--overwrite", action="store_true",
                    help="replace an earlier import or export in OUT_DIR (one that holds nothing "
                         "else)")
    im.set_defaults(run=cmd_import, parser=im)


def add_look_inside_parsers(commands) -> None:
    """The `plot` and `inspect` subcommands."""
    pl = commands.add_parser(
        "plot", help="draw the training curves of one or more runs",
        description="Print each run's evaluations from RUN_DIR/metrics.jsonl and draw, with "
                    "matplotlib if installed, curves.png (loss and validation perplexity "
                    "against steps, tokens seen and wall time; several runs overlaid) and "
                    "lr_and_grad_norm.png.")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                    help="a directory `train` wrote (its --out-dir); several are overlaid, "
                         "named by their folder")
    pl.add_argument("--out-dir", help="where the PNG files go (default: the first RUN_DIR)")
    pl.set_defaults(run=cmd_plot, parser=pl)

    ins = commands.add_parser(
        "inspect", help="show a trained model's attention, predictions and weights",
        description="Run a prompt through a trained model and print, per layer and head, a "
                    "summary of its attention; per position, the likeliest next tokens; per "
                    "weight matrix, its spread and spectral norm. With matplotlib installed, "
                    "also draw attention.png, weights.png and spectral_norms.png.")
    ins.add_argument("--prompt", required=True,
                     help="the text to run through the model, at most its context long")
    add_checkpoint_flags(ins)
    ins.add_argument("--top-k", type=number(int, 1), default=5,
                     help="next-token candidates shown per position (default: %(default)s)")
    ins.add_argument("--bins", type=number(int, 1, 1000), default=60,
                     help="histogram bins per weight matrix (default: %(default)s)")
    ins.add_argument("--out-dir",
                     help="where the PNG files go (default: the checkpoint's directory)")
    ins.add_argument("--device", default="auto", help=DEVICE_HELP)
    ins.set_defaults(run=cmd_inspect, parser=ins)


def add_finetune_parser(commands) -> None:
    ft = commands.add_parser(
        "finetune", help="teach a trained model to answer: fine-tune it on question-answer pairs",
        conflict_handler="resolve",  # to give --batch-size and --lr their own defaults below
        description="Fine-tune a trained model (the newest checkpoint in RUN_DIR, or "
                    "--checkpoint) on a JSON list of question-answer pairs, scoring only the "
                    "answers; checkpoints and metrics.jsonl go to OUT_DIR, as `train`'s do. "
                    "Then: `python gpt.py sample --qa --run-dir OUT_DIR`.")
    add_finetune_data_flags(ft)
    add_run_flags(ft, "data/finetune", f"{FINETUNE_STEPS} unless --max-time", "none")
    ft.add_argument("--preset", choices=list(PRESETS),
                    help="with --from-scratch: the model's size (default: laptop)")
    add_optimization_flags(ft)
    ft.add_argument("--batch-size", type=number(int, 1),
                    help=f"rows of context_length tokens per micro-batch and rank (default: "
                         f"{FINETUNE_BATCH_SIZE}; with --from-scratch, the preset's)")
    ft.add_argument("--lr", type=number(float, 0.0, low_open=True),
                    help=f"peak learning rate (default: {FINETUNE_LR:g}; with --from-scratch, "
                         f"the preset's)")
    add_model_flags(ft)
    # Uncompiled: compile_model checks its gradients on pretraining windows, which fine-tuning
    # has not. A step of a short list of pairs is quick anyway.
    ft.set_defaults(run=partial(cmd_train, start=start_finetune), parser=ft, compile=False,
                    warmup_steps=FINETUNE_WARMUP, eval_interval=FINETUNE_EVAL_INTERVAL,
                    eval_batches=EVAL_BATCHES, log_interval=10)


def add_finetune_data_flags(ft: argparse.ArgumentParser) -> None:
    """What fine-tuning learns from: the pairs, the held-out ones, the model to start from."""
    ft.add_argument("--data", required=True, metavar="FILE",
                    help='JSON list of {"question": ..., "answer": ...} objects ("id" and '
                         '"category" are optional and ignored)')
    ft.add_argument("--valid", metavar="FILE",
                    help="held-out pairs, in the same form (default: some of --data's, see "
                         "--valid-fraction)")
    ft.add_argument("--valid-fraction", type=number(float, 0.0, 1.0, low_open=True), metavar="F",
                    help=f"without --valid: the share of --data's pairs held out, evenly spread "
                         f"(default: {FINETUNE_VALID_FRACTION}, every tenth pair: items 9, "
                         f"19, ...)")
    add_checkpoint_flags(ft, "the trained model to fine-tune")
    ft.add_argument("--from-scratch", action="store_true",
                    help="start from random weights instead: a model of --preset and the model "
                         "flags, with the tokenizer in DATA_DIR")
    ft.add_argument("--data-dir", default="data",
                    help="with --from-scratch: where `tokenize` wrote tokenizer/ "
                         "(default: %(default)s)")
    ft.add_argument("--train-on-everything", action="store_true",
                    help="score every token, the questions' too (default: only the answers and "
                         "their end tokens); the validation loss stays the answers'")
    ft.add_argument("--show-answers", type=number(int, 0), default=3,
                    help="held-out questions answered greedily at each evaluation "
                         "(default: %(default)s)")


def add_sample_parser(commands) -> None:
    sa = commands.add_parser(
        "sample", help="generate text from a trained checkpoint",
        description="Continue a prompt with a trained model; without --prompt, read prompts "
                    "interactively. The story goes to stdout, figures to stderr.")
    sa.add_argument("--prompt", help="text to continue (default: ask interactively)")
    sa.add_argument("--qa", action="store_true",
                    help="the prompts are questions: wrap each in `finetune`'s template (an "
                         "imported chat model's own) and print the answer, which ends at the "
                         "end-of-text (end-of-turn) token")
    add_checkpoint_flags(sa)
    sa.add_argument("--max-new-tokens", type=number(int, 1), default=256,
                    help="most tokens to generate per sample (default: %(default)s)")
    sa.add_argument("--temperature", type=number(float, 0.0), default=0.8,
                    help="< 1 safer, > 1 wilder; 0 = always the likeliest token "
                         "(default: %(default)s)")
    sa.add_argument("--top-k", type=number(int, 1), help="sample among the k likeliest tokens only")
    sa.add_argument("--top-p", type=number(float, 0.0, 1.0, low_open=True), default=0.95,
                    help="sample among the fewest tokens that cover probability p; 1 = all "
                         "(default: %(default)s)")
    sa.add_argument("--num-samples", type=number(int, 1, 2**63 - 1), default=1,
                    help="continuations of the prompt, generated as one batch "
                         "(default: %(default)s)")
    sa.add_argument("--seed", type=number(int, 0, 2**63 - 1),
                    help="random seed, 0 to 2**63 - 1: the same seed gives the same text "
                         "(default: random)")
    sa.add_argument("--device", default="auto", help=DEVICE_HELP)
    sa.add_argument("--no-kv-cache", action="store_true",
                    help="recompute the whole sequence for every token (slow reference)")
    sa.add_argument("--readable", action="store_true", help=READABLE_HELP)
    sa.set_defaults(run=cmd_sample, parser=sa)


def raise_interrupt(signum, frame):
    """SIGTERM (from `kill`, a job scheduler or a cloud preemption) stops a command the way
    Ctrl-C does: unfinished files are removed and complete ones kept."""
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}: interrupted; complete files are kept")


def main(argv: list[str] | None = None) -> int:
    previous = {name: signal.getsignal(name) for name in (signal.SIGINT, signal.SIGTERM)}
    # From here on Ctrl-C raises KeyboardInterrupt, caught below (interrupted_at_start ends).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        log("\ngpt.py: interrupted while starting; nothing was done")
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
        return 2
    signal.signal(signal.SIGTERM, raise_interrupt)
    readable = getattr(args, "readable", False)
    if readable:
        use_fast_twins(False)
    try:
        try:
            args.run(args)
        except (ValueError, OSError) as e:
            log(f"gpt.py {args.command}: error: {e}")
            return 2
        except KeyboardInterrupt as e:
            # Further signals are ignored while the work that is safe is reported.
            for name in previous:
                signal.signal(name, signal.SIG_IGN)
            log(f"\ngpt.py {args.command}: {str(e) or 'interrupted; complete files are kept'}")
            return 2
    except KeyboardInterrupt:  # a second Ctrl-C while the first error was being reported
        return 2
    finally:
        if readable:
            use_fast_twins(True)
        for name, handler in previous.items():
            signal.signal(name, handler)
    return 0


if __name__ == "__main__":
    exit_code = main()
    # The command is over and its files are safe: a late Ctrl-C must not turn exit code 2 into a
    # death by signal while the interpreter shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, interpreter shutdown can race with the distributed backend's
        # background threads and abort a rank whose work is done and saved. Leave at once,
        # without running those C++ destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
