"""Prompt ids for Qwen-VL: ChatML (Chat models) and raw (base model), built at the token level.

Why token level and not a string fed to the tokenizer: the original builds a string such as
``Picture 1:<img>PATH</img>\\nWhat is it?`` and lets the tokenizer turn tag text into special ids,
so any user text containing ``<img>`` or ``<|im_start|>`` could inject tags (and the original
then opens the path written inside ``<img>``). Here structural ids come only from structure:
image spans from ``n_images``, ChatML markers from the builder. The one exception is the
grounding tags (``<ref>``, ``</ref>``, ``<box>``, ``</box>``, ``<quad>``, ``</quad>``): typed in
a message they become their special ids, as in the original, because users write
``<ref>the cup</ref>`` to ask for a box and a model cannot answer the plain-text bytes. They
cannot open anything or break the ChatML structure; :class:`Ref`/:class:`Box`/:class:`Tag`
parts place them from a program. ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ``<img>``,
``</img>`` and ``<imgpad>`` typed by a user stay plain text.

Equivalence with HF (``make_context``): the original BPE-encodes the content string in
one pass, which tiktoken splits at special tokens, so consecutive plain-text pieces between two
special tokens are joined and encoded as ONE string here (``"\\n"`` after ``</img>`` plus the
query). The image span holds ``n_slots`` ``<imgpad>`` ids instead of the path bytes; the model
overwrites those positions with image features, so the output is identical (vLLM does the same).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from .errors import EdgeError
from .contract import ContractError, image_spans
from .tokenizer import GROUNDING_ST, QwenTokenizer

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful assistant."
GRID = 1000  # grounding coordinates live on a 0..1000 grid
#: Image slots per image when the caller does not say (Qwen-VL's 256 resampler queries, the
#: config's default ``n_queries``); the pipeline passes the bundle's own count.
N_SLOTS = 256


class PromptError(EdgeError, ValueError):
    """A prompt that cannot be built; the message says what to fix."""


@dataclass(frozen=True)
class Ref:
    """A ``<ref>text</ref>`` span (a referring expression) placed by a program, not typed text."""

    text: str


@dataclass(frozen=True)
class Box:
    """A ``<box>(x1,y1),(x2,y2)</box>`` span on the 0..1000 grid (integers, like ``%d``)."""

    x1: int
    y1: int
    x2: int
    y2: int

    def __post_init__(self) -> None:
        for f in ("x1", "y1", "x2", "y2"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= GRID:
                raise PromptError(f"Box.{f}={v!r}: coordinates must be ints on the 0..{GRID} "
                                  f"grid (scale pixels by 1000/width, 1000/height)")

    def text(self) -> str:
        return f"({self.x1:d},{self.y1:d}),({self.x2:d},{self.y2:d})"


@dataclass(frozen=True)
class Tag:
    """A lone grounding tag, e.g. the trailing ``<box>`` of a base-model referring prompt
    (``<img>..</img><ref>EXPR</ref><box>``: the model writes the coordinates)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in GROUNDING_ST:
            raise PromptError(f"Tag({self.name!r}): only {sorted(GROUNDING_ST)} may be placed "
                              f"as tags; images are given by n_images")


Part = Union[str, Ref, Box, Tag]
Query = Union[str, Ref, Box, Tag, Sequence[Part]]


@dataclass
class Turn:
    """One past exchange. ``response`` as ids is used verbatim (reuse the exact generated ids);
    as text it is encoded with only the grounding tags special (it is model output).
    Images of a turn are numbered from "Picture 1:" like HF ``from_list_format`` per query."""

    query: Query
    response: str | list[int]
    n_images: int = 0


def _parts(query: Query) -> list[Part]:
    if isinstance(query, (str, Ref, Box, Tag)):
        return [query]
    if isinstance(query, (bytes, bytearray, memoryview)):
        raise PromptError(f"the prompt is {type(query).__name__}, not text: decode it first "
                          "(e.g. prompt.decode('utf-8'))")
    try:
        parts = list(query)
    except TypeError:
        raise PromptError(f"query must be a str, Ref, Box or a sequence of them, got "
                          f"{type(query).__name__}") from None
    for p in parts:
        if not isinstance(p, (str, Ref, Box, Tag)):
            raise PromptError(f"query part {p!r} is a {type(p).__name__}; use str, Ref, Box, Tag "
                              f"(images are given by n_images, not as parts)")
    return parts


class _Builder:
    """Accumulates ids; plain text is buffered so adjacent pieces are BPE-encoded in one pass."""

    def __init__(self, tok: QwenTokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self._text: list[str] = []

    def text(self, s: str) -> None:
        self._text.append(s)

    def special(self, *ids: int) -> None:
        self.flush()
        self.ids.extend(ids)

    def extend(self, ids: Sequence[int]) -> None:
        self.flush()
        self.ids.extend(int(i) for i in ids)

    def flush(self) -> None:
        if self._text:
            s = "".join(self._text)
            self._text = []
            if s:
                self.ids.extend(encode_text(self.tok, s))

    def done(self) -> list[int]:
        self.flush()
        return self.ids


def encode_text(tok: QwenTokenizer, text: str) -> list[int]:
    """Message text: grounding tags typed in it are special (as the original), the rest plain."""
    return tok.encode(text, allowed_special=GROUNDING_ST)


def _check_counts(n_images: int, n_slots: int) -> None:
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 0:
        raise PromptError(f"n_images must be an int >= 0, got {n_images!r}")
    if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
        raise PromptError(f"n_slots must be an int >= 1 ({N_SLOTS} for Qwen-VL), got {n_slots!r}")


def image_span(tok: QwenTokenizer, n_slots: int = N_SLOTS) -> list[int]:
    """``<img>`` + ``n_slots`` x ``<imgpad>`` + ``</img>``."""
    _check_counts(0, n_slots)
    return [tok.img_start_id] + [tok.img_pad_id] * n_slots + [tok.img_end_id]


def _add_parts(b: _Builder, parts: Sequence[Part]) -> None:
    tok = b.tok
    for p in parts:
        if isinstance(p, str):
            b.text(p)
        elif isinstance(p, Ref):
            b.special(tok.ref_start_id)
            b.extend(tok.encode(p.text))
            b.special(tok.ref_end_id)
        elif isinstance(p, Box):
            b.special(tok.box_start_id)
            b.extend(tok.encode(p.text()))
            b.special(tok.box_end_id)
        elif isinstance(p, Tag):
            b.special(tok.special_id(p.name))
        else:  # pragma: no cover - guarded by _parts
            raise PromptError(f"unsupported query part {p!r}")


def _content(b: _Builder, query: Query, n_images: int, n_slots: int) -> None:
    _check_counts(n_images, n_slots)
    parts = _parts(query)
    span = image_span(b.tok, n_slots)
    for k in range(1, n_images + 1):
        b.text(f"Picture {k}:")
        b.extend(span)
        b.text("\n")
    _add_parts(b, parts)


def encode_content(tok: QwenTokenizer, parts: Query, n_images: int = 0,
                   n_slots: int = N_SLOTS) -> list[int]:
    """User content: ``Picture k:`` + image span + ``\\n`` per image, then the parts."""
    b = _Builder(tok)
    _content(b, parts, n_images, n_slots)
    return b.done()


def _response_ids(tok: QwenTokenizer, response: str | Sequence[int]) -> list[int]:
    if isinstance(response, str):
        return tok.encode(response, allowed_special=GROUNDING_ST)
    try:
        return [int(i) for i in response]
    except (TypeError, ValueError):
        raise PromptError(f"Turn.response must be text or a list of token ids, got "
                          f"{type(response).__name__}") from None


def build_chat_ids(tok: QwenTokenizer, query: Query, n_images: int = 0,
                   history: Sequence[Turn] | None = (), system: str = DEFAULT_SYSTEM,
                   n_slots: int = N_SLOTS) -> list[int]:
    """ChatML prompt ids ending with ``<|im_start|>assistant\\n`` (generation starts there).

    Roles, "\\n" and contents are encoded separately, as ``make_context`` does. History images
    come before the current query's images in the id sequence (pass vision features in that
    order). No history truncation (HF drops old turns past max_window_size=6144).
    """
    nl = tok.encode("\n")
    start, end = tok.im_start_id, tok.im_end_id

    def role(name: str) -> list[int]:
        return [start] + tok.encode(name) + nl

    ids = role("system") + encode_text(tok, system) + [end]
    for t in history or ():
        if not isinstance(t, Turn):
            raise PromptError(f"history items must be Turn(query, response, n_images), got "
                              f"{type(t).__name__}")
        ids += nl + role("user") + encode_content(tok, t.query, t.n_images, n_slots) + [end]
        ids += nl + role("assistant") + _response_ids(tok, t.response) + [end]
    ids += nl + role("user") + encode_content(tok, query, n_images, n_slots) + [end]
    ids += nl + role("assistant")
    return ids


def build_raw_ids(tok: QwenTokenizer, query: Query, n_images: int = 0,
                  n_slots: int = N_SLOTS) -> list[int]:
    """Base-model ("raw") prompt: image spans (no "Picture k:") then the query parts."""
    _check_counts(n_images, n_slots)
    b = _Builder(tok)
    span = image_span(tok, n_slots)
    for _ in range(n_images):
        b.extend(span)
    _add_parts(b, _parts(query))
    return b.done()


def image_slot_positions(ids: Sequence[int], tok: QwenTokenizer) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` index ranges strictly between each ``<img>`` and ``</img>``
    (the engine contract's rule, :func:`runtime.contract.image_spans`)."""
    try:
        return image_spans(ids, tok.img_start_id, tok.img_end_id)
    except ContractError as e:
        raise PromptError(f"{e}; build prompts with build_chat_ids") from None
