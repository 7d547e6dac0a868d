"""Tiny byte-level BPE vocabularies in the ``qwen.tiktoken`` layout, for nano checkpoints and tests.

Why: the real 151,643-token vocabulary is not shipped here, yet tests and nano checkpoints need a
vocabulary with the same *structure*: ranks 0..255 are the single bytes in GPT-2 byte order (as in
the real file), merges are learned on text pre-split with Qwen's ``PAT_STR``, and every merged
token is reachable by tiktoken's rank-ordered BPE. Deterministic: same corpus, same ranks.
"""

from __future__ import annotations

import functools

import heapq
import logging
from collections import Counter, defaultdict

import regex

from runtime.tokenizer import PAT_STR

log = logging.getLogger(__name__)


def gpt2_byte_order() -> list[int]:
    """The 256 byte values in GPT-2 ``bytes_to_unicode`` order: printable ranges first."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    seen = set(printable)
    return printable + [b for b in range(256) if b not in seen]


def byte_ranks() -> dict[bytes, int]:
    """Ranks 0..255: rank 0 = b"!", 188 = b"\\x00", 198 = b"\\n", 220 = b" "."""
    return {bytes([b]): r for r, b in enumerate(gpt2_byte_order())}


def pretokenize(text: str) -> list[str]:
    """Split text the way tiktoken does before BPE (Qwen ``PAT_STR``)."""
    return regex.findall(PAT_STR, text)


def train_bpe(corpus: str, n_merges: int) -> dict[bytes, int]:
    """Learn up to ``n_merges`` merges on ``corpus``; return ranks (256 bytes + merges).

    Standard BPE: repeatedly merge the most frequent adjacent pair (ties: smallest
    ``(left, right)`` bytes), applied left to right in every word. A pair whose concatenation is
    already a token is merged in the words but gets no new rank. Stops early (with a warning) when
    no pair is left.
    """
    if n_merges < 0:
        raise ValueError(f"n_merges must be >= 0, got {n_merges}")
    ranks = byte_ranks()
    words = Counter(w.encode("utf-8") for w in pretokenize(corpus))
    # each unique word as a list of symbols (bytes); freq per word
    syms: list[list[bytes]] = [[bytes([b]) for b in w] for w in words]
    freq: list[int] = list(words.values())
    pair_count, where, heap = _pair_index(syms, freq)

    added = 0
    while added < n_merges:
        best = _pop_best(heap, pair_count)
        if best is None:
            log.warning("train_bpe: corpus exhausted after %d of %d merges", added, n_merges)
            break
        a, b = best
        new = a + b
        if new not in ranks:
            ranks[new] = len(ranks)
            added += 1
        touched = _merge_pair(a, b, syms, freq, pair_count, where)
        pair_count.pop((a, b), None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, p[0], p[1]))
            else:
                pair_count.pop(p, None)
                where.pop(p, None)
    return ranks


def _pair_index(syms: list[list[bytes]], freq: list[int]):
    """Weighted count of every adjacent pair, the words holding it, and a max-heap of counts."""
    pair_count: dict[tuple[bytes, bytes], int] = defaultdict(int)
    where: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for wi, s in enumerate(syms):
        for a, b in zip(s, s[1:]):
            pair_count[(a, b)] += freq[wi]
            where[(a, b)].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    return pair_count, where, heap


def _pop_best(heap: list[tuple[int, bytes, bytes]],
              pair_count: dict[tuple[bytes, bytes], int]) -> tuple[bytes, bytes] | None:
    """Pop the best pair whose heap entry is current (lazy deletion); None when none is left."""
    while heap:
        negc, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) == -negc and negc < 0:
            return a, b
    return None


def _merge_pair(a: bytes, b: bytes, syms: list[list[bytes]], freq: list[int],
                pair_count: dict[tuple[bytes, bytes], int],
                where: dict[tuple[bytes, bytes], set[int]]) -> dict[tuple[bytes, bytes], int]:
    """Merge ``(a, b)`` left to right in every word holding it, updating the pair index.

    Returns the pairs whose counts changed (insertion-ordered, as the heap pushes depend on it).
    """
    new = a + b
    touched: dict[tuple[bytes, bytes], int] = {}
    for wi in sorted(where.pop((a, b), ())):
        s, f = syms[wi], freq[wi]
        for x, y in zip(s, s[1:]):  # remove this word's old pairs
            pair_count[(x, y)] -= f
            touched[(x, y)] = 0
        out: list[bytes] = []
        i = 0
        while i < len(s):
            if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                out.append(new)
                i += 2
            else:
                out.append(s[i])
                i += 1
        syms[wi] = out
        for x, y in zip(out, out[1:]):
            pair_count[(x, y)] += f
            where[(x, y)].add(wi)
            touched[(x, y)] = 0
    return touched


_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black", "pink",
            "brown", "grey", "gray", "cyan")
_SHAPES = ("circle", "square", "triangle", "star", "rectangle", "diamond", "hexagon", "cross",
           "heart")
_SIGNS = ("OPEN", "STOP", "EXIT", "SALE", "PUSH", "PULL", "NO", "YES", "CLOSED", "HOTEL", "TAXI",
          "BUS", "PARK", "CAFE", "BAR", "POLICE", "DANGER", "ENTER", "SLOW", "YIELD", "FIRE",
          "WAIT", "GO", "NORTH", "SOUTH", "EAST", "WEST", "BANK", "SHOP", "FOOD", "BOOKS",
          "MUSIC", "PHONE", "LIFT")


def _build_corpus() -> str:
    lines = [
        "You are a helpful assistant.",
        "system", "user", "assistant",
        "Picture 1:", "Picture 2:", "Picture 3:",
        "Describe the image in English:",
        "Generate the caption in English with grounding:",
        "What does the sign say?", "What is it?", "What is in the image?",
        "Where is the red circle?",
        "Describe the image.", "Answer:",
        "This is a photo of a sign. The sign says OPEN.",
        "The image shows a picture with shapes on a white background.",
        "There is a red circle and a blue square in the image.",
        "The photo is of a street, and the text on the sign is STOP.",
        "Yes, it is. No, it is not. I do not know.",
        "It is on the left of the image, and the other one is on the right.",
        "at the top, at the bottom, in the middle, in the center, next to, above, below",
        "one two three four five six seven eight nine ten",
        "0 1 2 3 4 5 6 7 8 9",
        "(0,0),(1000,1000) (12,345),(678,999) (536,509),(588,602)",
        "A man and a woman are walking with their dog along the beach near the water.",
        "Two people stand next to a car that is parked on the road in front of a house.",
        "A small cat sits on a table by the window, looking at a bird outside.",
        "The room has a bed, a chair, a lamp and a large picture on the wall.",
        "Please answer the question about the picture with a short sentence.",
        "Here are the objects I can find, from left to right and from top to bottom.",
        "The number on the door is 42, and the price written below it is 19.",
        "Which shape is bigger? How many objects are there? Count them carefully.",
        "People, trees, buildings, cars, animals, flowers, signs, letters and numbers.",
    ]
    for c in _COLOURS:
        lines += ["system", "You are a helpful assistant.", "user", "Picture 1:",
                  f"Where is the {c} circle?", "assistant", f"The {c} circle is here."]
        for s in _SHAPES:
            lines.append(f"a {c} {s}, the {c} {s} and the {s} in the image.")
            lines.append(f"Where is the {c} {s}?")
    for w in _SIGNS:
        lines += [w, f"The sign says {w}. {w.capitalize()} {w.lower()}"]
    return "\n".join(lines) + "\n"


#: Built-in English corpus (a few KB) covering demo/test prompts and answers.
NANO_CORPUS: str = _build_corpus()


@functools.lru_cache(maxsize=4)
def _nano_ranks_cached(n_merges: int) -> tuple[tuple[bytes, int], ...]:
    return tuple(train_bpe(NANO_CORPUS, n_merges).items())


def nano_ranks(n_merges: int = 512) -> dict[bytes, int]:
    """The nano vocabulary: ``train_bpe(NANO_CORPUS, n_merges)`` (cached: training takes seconds)."""
    return dict(_nano_ranks_cached(n_merges))
