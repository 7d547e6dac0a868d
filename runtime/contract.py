"""The engines' I/O contract, said once: names, dtypes, KV layout and the prompt-table rule.

The exporter builds the graphs from it (:meth:`DecoderIO.from_config`, the vision names), the
runtime reads it back from an engine's inputs/outputs (:meth:`DecoderIO.from_io`) and from the
bundle manifest (:meth:`PromptTable.from_manifest`); validation, benchmarks and tests use the same
objects, so no other module computes table ids or KV shapes. Torch-free (numpy only).

Decoder engine (``L`` layers, ``H`` heads, ``D`` head dim, KV dtype float16, float32 or int8)::

    input_ids                   int64   [batch, sequence_length]
    image_embeds                float32 [image_rows, hidden]          (image_rows may be 0)
    attention_mask              int64   [batch, total_sequence_length]
    past_key_values.{i}.key     KV      [batch, H, past_sequence_length, D]   i = 0..L-1
    past_key_values.{i}.value   KV      [batch, H, past_sequence_length, D]
    logits_to_keep              int64   [1]                            (engines that have it)
    ->
    logits                      float32 [batch, kept_length, vocab_size]
    present.{i}.key             KV      [batch, H, total_sequence_length, D]
    present.{i}.value           KV      [batch, H, total_sequence_length, D]

KV layouts (``kv_layout``, in the engine's metadata): ``concat`` (MultiHeadAttention) writes
``present = concat(past, new)``, a second buffer, every step. ``shared`` (GroupQueryAttention)
takes past and present as the *same* buffer of the cache's capacity ``C``: ``[batch, H, C, D]``
bound as both, the new keys written in place at ``[P, T)`` (``T`` = the attention mask's width,
``P = T - sequence_length``), nothing else copied. Row ``t`` of every batch entry is mask column
``t`` in both layouts (padding and dropped tokens are masked, never compacted). Fed ``past`` of
length ``P`` instead, a ``shared`` engine returns ``present`` of length ``T`` like ``concat``.

Padding (``padding``, in the engine's metadata; engines without it are ``masked``): ``masked``
engines hide every key whose mask column is 0 (left padding, dropped tokens). ``unpadded``
engines (GroupQueryAttention without an attention bias: onnxruntime's CUDA kernel rejects one)
attend to every cached column before ``T``, so each row's real tokens must come first and without
gaps: a row may end in masked columns (a finished row of a batch) but never has a real token after
a 0. The runtime refuses any other mask (:meth:`DecoderIO.check_mask`) and drops cached tokens
by rewinding the cache instead of masking them.

Logits (``logits_to_keep``, Hugging Face's name and convention): ``k >= 1`` keeps the last
``min(k, sequence_length)`` positions of the final hidden state before the LM head, ``k = 0`` keeps
every position. The runtime's prefill and decode steps pass 1 (a 2048-token prefill returns
``[batch, 1, V]`` instead of 1.24 GB of fp32 logits at full size); validation's teacher-forced
decoder stage passes 0. Engines exported before the input existed return every position
(``kept_length = sequence_length``): the runtime reads whether an engine has the input
(:attr:`DecoderIO.logits_to_keep`) and feeds it only then (:meth:`DecoderIO.logits_feed`).

KV dtype ``int8`` (``shared`` layout only): the cache holds int8 codes, ``round(x * (1 / scale))``
saturated to [-128, 127], with static fp32 scales stored inside the graph (one per layer and
channel ``h * D + d``, for keys after RoPE and for values); the runtime only allocates and binds
the int8 buffer. A zeroed buffer is valid (its rows are masked until written).

Vision engine: ``pixel_values`` float32 ``[N, 3, S, S]`` -> ``image_embeds`` float32
``[N, n_queries, hidden]``.

Prompt-table rule: an id ``>= vocab_size`` selects row ``id - vocab_size`` of ``image_embeds``
(the vision output of all images, flattened to ``[N * n_queries, hidden]``); the slots between
``<img>`` and ``</img>`` of the prompt become those table ids (:meth:`PromptTable.table_ids`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import EdgeError

INPUT_IDS = "input_ids"
IMAGE_EMBEDS = "image_embeds"
ATTENTION_MASK = "attention_mask"
LOGITS_TO_KEEP = "logits_to_keep"
LOGITS = "logits"
PIXEL_VALUES = "pixel_values"
PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
KV_DTYPES = ("float16", "float32", "int8")
KV_LAYOUTS = ("concat", "shared")
KV_LAYOUT_KEY = "kv_layout"  # decoder metadata key naming the layout
#: Revision of the decoder graph's I/O (part of the exporter's cache key): 2 added
#: ``logits_to_keep`` and the ``padding`` metadata.
DECODER_IO_VERSION = 2
PADDINGS = ("masked", "unpadded")
PADDING_KEY = "padding"  # decoder metadata key: whether the mask's zeros hide keys

Spec = tuple[str, str, list[Any]]  # (name, numpy dtype name, shape with symbolic dims)


class ContractError(EdgeError, ValueError):
    """Inputs that break the engine contract (unbalanced image tags, a graph without the
    decoder's inputs, ...); the message says what is wrong."""


def image_spans(ids: Sequence[int], image_start: int, image_end: int) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` index ranges strictly between each ``<img>`` and ``</img>``."""
    out: list[tuple[int, int]] = []
    open_at: int | None = None
    for i, t in enumerate(ids):
        t = int(t)
        if t == image_start:
            if open_at is not None:
                raise ContractError(f"unbalanced image tags: <img> at {i} before the </img> "
                                    f"of the <img> at {open_at}")
            open_at = i
        elif t == image_end:
            if open_at is None:
                raise ContractError(f"unbalanced image tags: </img> at {i} without <img>")
            out.append((open_at + 1, i))
            open_at = None
    if open_at is not None:
        raise ContractError(f"unbalanced image tags: <img> at {open_at} is never closed")
    return out


@dataclass(frozen=True)
class VisionIO:
    """The vision engine's inputs and outputs."""

    image_size: int
    n_queries: int
    hidden: int
    input_name: str = PIXEL_VALUES
    output_name: str = IMAGE_EMBEDS

    def input_spec(self) -> Spec:
        return (self.input_name, "float32", ["batch", 3, self.image_size, self.image_size])

    def output_spec(self) -> Spec:
        return (self.output_name, "float32", ["batch", self.n_queries, self.hidden])

    @classmethod
    def from_config(cls, cfg: Any) -> "VisionIO":
        """From a ``models.config.QwenVLConfig`` (the exporter's side)."""
        v = cfg.visual
        return cls(int(v.image_size), int(v.n_queries), int(v.output_dim))

    @classmethod
    def from_manifest(cls, model: Mapping[str, Any]) -> "VisionIO":
        return cls(int(model["image_size"]), int(model["n_queries"]), int(model["hidden"]))


@dataclass(frozen=True)
class DecoderIO:
    """The decoder engine's inputs and outputs, and the KV cache layout they imply."""

    layers: int
    heads: int
    head_dim: int
    hidden: int | None
    vocab_size: int | None
    kv_dtype: str = "float16"  # numpy dtype name
    kv_layout: str = "concat"  # concat | shared (see the module docstring)
    logits_to_keep: bool = False  # the engine takes the ``logits_to_keep`` input
    padding: str = "masked"  # masked | unpadded (see the module docstring)

    def __post_init__(self) -> None:
        if self.kv_layout not in KV_LAYOUTS:
            raise ContractError(f"KV layout must be one of {', '.join(KV_LAYOUTS)}, not "
                                f"'{self.kv_layout}': re-export the decoder")
        if self.padding not in PADDINGS:
            raise ContractError(f"padding must be one of {', '.join(PADDINGS)}, not "
                                f"'{self.padding}': re-export the decoder")
        if self.padding == "unpadded" and not self.shared_kv:
            raise ContractError("an unpadded decoder must have the shared KV layout (it drops "
                                "cached tokens by rewinding): re-export the decoder")
        if self.kv_dtype not in KV_DTYPES:
            raise ContractError(f"KV dtype must be one of {', '.join(KV_DTYPES)}, not "
                                f"'{self.kv_dtype}': re-export the decoder")

    @property
    def quantized_kv(self) -> bool:
        """The cache holds int8 codes (scales inside the graph; see the module docstring)."""
        return self.kv_dtype == "int8"

    @property
    def masks_keys(self) -> bool:
        """The mask's zeros hide keys (left padding, dropped tokens); False: unpadded rows only."""
        return self.padding == "masked"

    def check_mask(self, mask: np.ndarray, past: int) -> None:
        """Refuse a mask an ``unpadded`` engine would get wrong: ``mask [B, P + S]`` of a call on
        a cache of ``past`` tokens must keep each row's real tokens first and without gaps among
        the new columns and the last cached one (earlier columns were checked when written)."""
        if self.masks_keys:
            return
        cols = np.asarray(mask)[:, max(past - 1, 0):]
        if (np.diff(cols, axis=1) > 0).any():
            raise ContractError(
                "this decoder (GroupQueryAttention without an attention bias, the gpu target's) "
                "takes unpadded rows only, and a row has a real token after padding or a dropped "
                "token: run requests one at a time (Pipeline.chat, the server) or batch prompts "
                "of equal length, or use a bundle exported with --target cpu")

    @property
    def shared_kv(self) -> bool:
        """Past and present are one buffer of the cache's capacity (bound as both)."""
        return self.kv_layout == "shared"

    def kv_names(self, i: int) -> tuple[str, str, str, str]:
        """(past key, past value, present key, present value) names of layer ``i``."""
        return (PAST_KEY.format(i), PAST_VALUE.format(i), PRESENT_KEY.format(i),
                PRESENT_VALUE.format(i))

    def kv_shape(self, batch: int, length: int | str) -> list[Any]:
        """``[batch, H, length, D]`` of one layer's key (or value)."""
        return [batch, self.heads, length, self.head_dim]

    def kv_elements(self, batch: int, length: int) -> int:
        return int(batch) * self.heads * int(length) * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes per token of context, all layers, key and value."""
        return 2 * self.layers * self.heads * self.head_dim * np.dtype(self.kv_dtype).itemsize

    def input_specs(self) -> list[Spec]:
        """The graph inputs, in order."""
        out: list[Spec] = [(INPUT_IDS, "int64", ["batch", "sequence_length"]),
                           (IMAGE_EMBEDS, "float32", ["image_rows", self.hidden]),
                           (ATTENTION_MASK, "int64", ["batch", "total_sequence_length"])]
        for i in range(self.layers):
            pk, pv, _, _ = self.kv_names(i)
            shape = self.kv_shape("batch", "kv_capacity" if self.shared_kv
                                  else "past_sequence_length")
            out += [(pk, self.kv_dtype, list(shape)), (pv, self.kv_dtype, list(shape))]
        if self.logits_to_keep:
            out.append((LOGITS_TO_KEEP, "int64", [1]))
        return out

    def logits_rows(self, sequence_length: int, keep: int) -> int:
        """Positions whose logits a call of ``sequence_length`` tokens returns when asked to keep
        ``keep`` (0 = all); every position on an engine without the input."""
        if not self.logits_to_keep or keep <= 0:
            return int(sequence_length)
        return min(int(keep), int(sequence_length))

    def logits_feed(self, keep: int) -> dict[str, np.ndarray]:
        """The ``logits_to_keep`` input for ``keep`` (0 = all positions), or nothing for an
        engine without it (it returns every position)."""
        if not self.logits_to_keep:
            return {}
        if keep < 0:
            raise ContractError(f"logits_to_keep must be >= 0 (0 = all positions), not {keep}")
        return {LOGITS_TO_KEEP: np.array([keep], np.int64)}

    def output_specs(self) -> list[Spec]:
        """The graph outputs, in order."""
        rows = "kept_length" if self.logits_to_keep else "sequence_length"
        out: list[Spec] = [(LOGITS, "float32", ["batch", rows, self.vocab_size])]
        for i in range(self.layers):
            _, _, ok, ov = self.kv_names(i)
            shape = self.kv_shape("batch", "kv_capacity" if self.shared_kv
                                  else "total_sequence_length")
            out += [(ok, self.kv_dtype, list(shape)), (ov, self.kv_dtype, list(shape))]
        return out

    @classmethod
    def from_config(cls, cfg: Any, kv_dtype: str, kv_layout: str = "concat",
                    padding: str = "masked") -> "DecoderIO":
        """From a ``models.config.QwenVLConfig``, the plan's KV dtype (``fp16``/``float16``),
        the attention's KV layout and padding; the graphs built from it take
        ``logits_to_keep``."""
        kv = {"fp16": "float16", "fp32": "float32"}.get(kv_dtype, kv_dtype)
        if kv not in KV_DTYPES:
            raise ContractError(f"KV dtype must be one of {', '.join(KV_DTYPES)}, not '{kv_dtype}'")
        if kv == "int8" and kv_layout != "shared":
            raise ContractError("an int8 KV cache exists only in the shared layout "
                                "(GroupQueryAttention): re-export with attention 'gqa'")
        return cls(int(cfg.num_hidden_layers), int(cfg.num_attention_heads), int(cfg.head_dim),
                   int(cfg.hidden_size), int(cfg.vocab_size), kv, kv_layout, True, padding)

    @classmethod
    def from_io(cls, inputs: Mapping[str, tuple[Any, Sequence[Any]]],
                outputs: Mapping[str, tuple[Any, Sequence[Any]]],
                vocab_size: int | None = None, kv_layout: str = "concat",
                padding: str = "masked") -> "DecoderIO":
        """From a graph's ``{name: (dtype, shape)}`` inputs and outputs (the runtime's side).

        ``vocab_size`` is used when the logits' last dim is symbolic; ``kv_layout`` and
        ``padding`` come from the engine's metadata (``KV_LAYOUT_KEY``, ``PADDING_KEY``; engines
        without them are ``concat`` and ``masked``)."""
        need = (INPUT_IDS, ATTENTION_MASK, PAST_KEY.format(0))
        if any(n not in inputs for n in need) or LOGITS not in outputs:
            raise ContractError(f"not a decoder engine (inputs {list(inputs)})")
        layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        kv_type, kv_shape = inputs[PAST_KEY.format(0)]
        emb = inputs.get(IMAGE_EMBEDS)
        hidden = emb[1][1] if emb is not None else None
        vocab = outputs[LOGITS][1][2]
        return cls(layers, int(kv_shape[1]), int(kv_shape[3]),
                   int(hidden) if isinstance(hidden, int) else None,
                   int(vocab) if isinstance(vocab, int) else vocab_size,
                   np.dtype(kv_type).name, kv_layout, LOGITS_TO_KEEP in inputs, padding)


@dataclass(frozen=True)
class PromptTable:
    """The prompt-table id rule and the image tag ids it keys on."""

    vocab_size: int
    image_start: int
    image_end: int
    image_pad: int
    n_queries: int

    @classmethod
    def from_config(cls, cfg: Any) -> "PromptTable":
        """From a ``models.config.QwenVLConfig`` (``<img>`` = image_start_id, then ``</img>``,
        ``<imgpad>``, as the original tokenizer numbers them)."""
        s = int(cfg.image_start_id)
        return cls(int(cfg.vocab_size), s, s + 1, s + 2, int(cfg.visual.n_queries))

    @classmethod
    def from_manifest(cls, model: Mapping[str, Any]) -> "PromptTable":
        """From a bundle manifest's ``model`` facts."""
        sp = model["special_ids"]
        return cls(int(model["vocab_size"]), int(sp["img_start"]), int(sp["img_end"]),
                   int(sp["img_pad"]), int(model["n_queries"]))

    def spans(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        return image_spans(ids, self.image_start, self.image_end)

    def table_ids(self, ids: Sequence[int], start: int = 0,
                  first_row: int = 0) -> tuple[np.ndarray, list[int]]:
        """Engine ids for ``ids[start:]``: every image slot becomes ``vocab_size + row``.

        Rows count the image spans that end after ``start`` (spans wholly before ``start`` are
        already in the KV cache and need no features), from ``first_row`` (a batch's later
        requests address their images behind the earlier ones'). Returns the ids and the indexes
        of the spans they address, i.e. which images' features ``image_embeds`` must hold, in
        order."""
        spans = self.spans(ids)
        out = np.array(ids[start:], dtype=np.int64)
        used: list[int] = []
        row = int(first_row)
        for k, (a, e) in enumerate(spans):
            if e <= start:
                continue
            if e - a != self.n_queries:
                raise ContractError(f"image span of {e - a} slots, the vision engine makes "
                                    f"{self.n_queries}")
            lo = max(a, start)
            out[lo - start:e - start] = self.vocab_size + row + np.arange(lo - a, e - a)
            used.append(k)
            row += self.n_queries
        return out, used
