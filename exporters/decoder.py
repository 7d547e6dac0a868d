"""Qwen-VL language decoder -> one ONNX graph for prefill and decode (KV cache), for onnxruntime.

The graph is written directly with ``onnx.helper`` (no torch.onnx): it uses onnxruntime's fused
contrib ops, pulls weights one tensor at a time from a ``get_tensor(name)`` callable and streams
initializers straight into the external-data file, so the 7B decoder exports without ever holding
the model in RAM.

IO contract: ``runtime/contract.py`` (:class:`~runtime.contract.DecoderIO` names the inputs and
outputs, their dtypes and the KV layout; the graph is built from it). KV is float32 in the fp32
plan and float16 in the fp16/int4 plans (``kv_dtype`` overrides). Keys are stored after RoPE.
Attention (``attention``): MultiHeadAttention (``concat`` KV layout: present = past + new, a new
buffer every step) or GroupQueryAttention (``shared`` layout: one past/present buffer of the
cache's capacity, written in place; the mask enters as an additive bias, every row's cache holds
the mask's ``T`` columns, so ``seqlens_k = T - 1`` for all rows and padding stays masked).
``attention_bias=False`` builds GroupQueryAttention without that bias (onnxruntime's CUDA kernel
rejects one): it then attends to all ``T`` columns of every row, so the engine is marked
``padding: unpadded`` and the runtime refuses rows with padding before a real token.
the mask's ``T`` columns, so ``seqlens_k = T - 1`` for all rows and padding stays masked). With
GroupQueryAttention the KV may be ``int8``: codes with static per-channel scales in the graph
(``k_scale`` / ``v_scale``, calibrated by quant/kv_scales.py, which also mirrors the kernel).

Prompt-table trick: an id ``>= vocab_size`` selects row ``id - vocab_size`` of ``image_embeds``,
every other id the embedding table (``Where`` + two ``Gather``); the table never leaves the engine.
An id past the last image row is an error (Gather out of bounds), never a silent zero.

Logits: the final hidden state is sliced to its last ``logits_to_keep`` positions (0 = all) before
the LM head, so a prefill computes and returns only the rows its caller uses (the runtime: 1).

Positions: ``position = cumsum(attention_mask) - 1`` over the whole (past + current) mask, i.e. the
count of real tokens before a token (the GroupQueryAttention / onnxruntime-genai convention). For
batch 1 without padding this is ``P .. P+S-1``, exactly the reference. For a left-padded row the
real tokens start at position 0, so each row of a padded batch computes what it would alone; the HF
reference instead counts the pads (positions ``0..T-1`` whatever the mask), which makes
its padded rows differ from their unpadded runs. Pad tokens get position 0 and are masked as keys.

Precision plans (``plan``):

* ``fp32``: fp32 weights and activations; matches ``models.qwen_vl`` to float rounding.
* ``fp16``: fp16 weights/activations/KV; RMSNorm statistics are computed in fp32 inside
  (Skip)SimplifiedLayerNormalization, attention softmax in fp32 inside the attention kernel;
  logits are cast to fp32.
* ``int4``: the five Linears per layer as ``MatMulNBits`` (bits 4, block ``group_size``) from GPTQ
  tensors, act-order expressed as a ``Gather`` of the activation columns (no ``g_idx``); LM head
  int8 per channel (``MatMulNBits`` bits 8) or fp16; embedding table and norms fp16; activations
  fp16 or fp32 (``act_dtype``); KV fp16.
* ``edge``: ``int4``, with the embedding table as int8 rows and one fp16 scale per row, gathered
  and dequantised in the graph (``GatherBlockQuantized``, quant/embedding.py): half the table's
  bytes. ``embed`` overrides the table's dtype (``int4``: blocks of 32) and ``lm_head="int4"``
  gives a MatMulNBits int4 head (groups of 32) for any quantised plan.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from models.config import QwenVLConfig
from models.qwen_vl import rotary_cos_sin
from quant.fake_quant import LINEAR_SUFFIXES, check_gptq_shape
from quant.embedding import EMBED_MODES, QUANT_BITS, QuantizedEmbedding, quantize_embedding
from quant.kv_scales import KVScales, scale_names
from quant.lm_head import HEAD_KEY, head_weights
from quant.packing import GPTQTensors, MatMulNBitsWeights, PackingError, gptq_to_matmul_nbits
from quant.plans import DEFAULT_GROUP_SIZE
from quant.plans import PLANS as PRECISION_PLANS
from quant.plans import exportable_plans, kv_layout
from runtime.errors import EdgeError
from runtime.files import staging_dir
from runtime.contract import (ATTENTION_MASK, IMAGE_EMBEDS, INPUT_IDS, KV_LAYOUT_KEY, LOGITS,
                              LOGITS_TO_KEEP, PADDING_KEY, DecoderIO, Spec)
from runtime.engines import decoder_contract
from runtime.generate import DecodeState, GenerationConfig, Sampler, decode_tokens

log = logging.getLogger(__name__)

PLANS = exportable_plans()  # the precision plans this exporter builds (quant/plans.py)
OPSET = 21
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
ATTENTIONS = ("mha", "gqa", "plain")  # export_decoder(attention=...)
EXTERNAL_THRESHOLD = 1024  # bytes; smaller initializers stay inside decoder.onnx
_NP = {"fp32": np.float32, "fp16": np.float16}
_KV_NP = {**_NP, "int8": np.int8}  # int8: GroupQueryAttention's quantised cache (static scales)
_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
         np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
         np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL,
         np.dtype(np.int8): TensorProto.INT8}


class DecoderExportError(EdgeError, ValueError):
    """Arguments or weights the decoder exporter cannot turn into a graph."""


# ---------------------------------------------------------------------------------------------
# Weight sources
# ---------------------------------------------------------------------------------------------

@dataclass
class WeightSource:
    """Config + ``get(name) -> tensor`` over checkpoint tensor names (loaded one at a time)."""

    cfg: QwenVLConfig
    get: Callable[[str], torch.Tensor]
    has: Callable[[str], bool]

    @classmethod
    def from_model(cls, model: nn.Module) -> "WeightSource":
        params = dict(model.named_parameters())
        return cls(model.cfg, lambda n: params[n].detach(), lambda n: n in params)

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: QwenVLConfig | None = None) -> "WeightSource":
        """Tensors read lazily from ``path``; ``cfg``: its config, when already parsed."""
        from models.checkpoint import CheckpointReader

        reader = CheckpointReader(path)
        return cls(cfg or QwenVLConfig.from_pretrained(path), reader.get, reader.__contains__)


def _as_source(model: nn.Module | WeightSource | str | Path) -> WeightSource:
    if isinstance(model, WeightSource):
        return model
    if isinstance(model, nn.Module):
        return WeightSource.from_model(model)
    return WeightSource.from_checkpoint(model)


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------

@dataclass
class IOSpec:
    name: str
    dtype: str  # numpy name: int64, float32, float16
    shape: list[int | str]


@dataclass
class DecoderExportResult:
    onnx_path: Path
    data_path: Path
    plan: str
    settings: dict[str, Any]
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    op_counts: dict[str, int]
    weight_bytes: dict[str, int]  # by category: linear, lm_head, embedding, norm, rope, other
    bytes_per_token: int  # weight bytes read per decoded token (no embedding table, no KV)
    kv_bytes_per_token: int  # KV cache bytes per token of context (all layers, K and V)
    file_bytes: int
    seconds: float
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["onnx_path"], d["data_path"] = str(self.onnx_path), str(self.data_path)
        return d

    def summary(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in
                        sorted(self.op_counts.items(), key=lambda kv: -kv[1]))
        wb = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.weight_bytes.items() if v)
        return (f"decoder {self.plan} ({self.settings['act_dtype']} activations, "
                f"{self.settings['kv_dtype']} KV, lm_head {self.settings['lm_head']}): "
                f"{sum(self.op_counts.values())} nodes [{ops}]; weights [{wb}]; "
                f"{self.bytes_per_token / 2**20:.1f} MiB read per decoded token + "
                f"{self.kv_bytes_per_token / 1024:.1f} KiB KV per context token; "
                f"files {self.file_bytes / 2**20:.1f} MiB; {self.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# Graph builder with streamed external data
# ---------------------------------------------------------------------------------------------

class _GraphWriter:
    def __init__(self, data_file, data_name: str):
        self.f = data_file
        self.data_name = data_name
        self.offset = 0
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.bytes = Counter()
        self._names: set[str] = set()
        self._n = 0

    def init(self, name: str, arr: np.ndarray, cat: str) -> str:
        if name in self._names:
            raise DecoderExportError(f"duplicate initializer {name}")
        self._names.add(name)
        arr = np.ascontiguousarray(arr)
        self.bytes[cat] += arr.nbytes
        if arr.nbytes < EXTERNAL_THRESHOLD:
            self.inits.append(numpy_helper.from_array(arr, name))
            return name
        align = 4096 if arr.nbytes >= 65536 else 64
        pad = (-self.offset) % align
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        t = TensorProto(name=name, data_type=_ONNX[arr.dtype], dims=list(arr.shape))
        self.f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(self.offset)),
                     ("length", str(arr.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += arr.nbytes
        self.inits.append(t)
        return name

    def const(self, value, dtype) -> str:
        arr = np.asarray(value, dtype=dtype)
        self._n += 1
        return self.init(f"const_{self._n}", arr, "other")

    def op(self, op_type: str, inputs: list[str], n_out: int | list[str | None] = 1,
           scope: str = "", domain: str = "", **attrs) -> Any:
        """Add a node; ``n_out`` is a count or a list of output names (None = auto, "" = unused).

        Returns the output name for one output, else the list (unused ones as "").
        """
        self._n += 1
        base = f"{scope}/{op_type}_{self._n}" if scope else f"/{op_type}_{self._n}"
        spec = [None] * n_out if isinstance(n_out, int) else n_out
        outs = [f"{base}/out{j}" if o is None else o for j, o in enumerate(spec)]
        while inputs and inputs[-1] == "":
            inputs = inputs[:-1]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs


# ---------------------------------------------------------------------------------------------
# The decoder graph
# ---------------------------------------------------------------------------------------------

@dataclass
class _Settings:
    plan: str
    act_dtype: str
    kv_dtype: str
    lm_head: str
    embed: str
    group_size: int
    accuracy_level: int
    lm_head_accuracy_level: int
    attention: str
    max_positions: int
    attention_bias: bool = True  # gqa: the mask as an additive bias (False: unpadded rows only)


def _np(t: torch.Tensor, dtype) -> np.ndarray:
    """Torch (any float dtype, incl. bf16) -> numpy ``dtype`` without a full fp32 detour if fp16."""
    t = t.detach()
    if dtype == np.float16:
        return t.to(torch.float16).numpy()
    return t.to(torch.float32).numpy().astype(dtype, copy=False)


def _gptq_to_nbits_chunked(t: GPTQTensors, group_size: int, rows: int = 2048) -> MatMulNBitsWeights:
    """``gptq_to_matmul_nbits`` over slices of output rows (bounded temporaries for 7B Linears)."""
    n = t.out_features
    if n <= rows or n % 8:
        return gptq_to_matmul_nbits(t, group_size)
    parts = []
    for a in range(0, n, rows):
        b = min(n, a + rows)
        if a % 8 or b % 8:  # qzeros pack 8 output rows per int32
            return gptq_to_matmul_nbits(t, group_size)
        parts.append(gptq_to_matmul_nbits(GPTQTensors(
            qweight=np.ascontiguousarray(t.qweight[:, a:b]),
            qzeros=np.ascontiguousarray(t.qzeros[:, a // 8:b // 8]),
            scales=np.ascontiguousarray(t.scales[:, a:b]), g_idx=t.g_idx, bias=None, bits=t.bits),
            group_size))
    p0 = parts[0]
    zps = [p.zero_points for p in parts]
    if any(z is None for z in zps) and not all(z is None for z in zps):  # some slices all-8
        per_row = (-(-p0.K // group_size) + 1) // 2  # packed bytes per output row
        zps = [np.full(p.N * per_row, 0x88, np.uint8) if z is None else z
               for p, z in zip(parts, zps)]
    return MatMulNBitsWeights(
        B=np.concatenate([p.B for p in parts]), scales=np.concatenate([p.scales for p in parts]),
        zero_points=None if all(z is None for z in zps) else np.concatenate(zps),
        perm=p0.perm, K=p0.K, N=n, block_size=p0.block_size, bits=p0.bits)


@dataclass
class _GQAInputs:
    """GroupQueryAttention's per-call inputs, computed once from the mask: every row's cache
    holds ``T`` = mask-width tokens (padding included, masked by ``bias``), ``S`` of them new."""
    seqlens_k: str  # int32 [B], T - 1
    total_len: str  # int32 scalar, T
    query_lens: str  # int32 [B], S (lets batched multi-token chunks run on a cache)
    bias: str  # act dtype [B, 1, S, T]: 0 for real keys, -10000 (MHA's mask value) for masked;
    # "" without the bias (attention_bias=False)


@dataclass
class _LayerShared:
    """Graph names every layer reads: positions, the int32 mask, rotary tables, plain-mode bias,
    GroupQueryAttention's inputs."""
    pos: str
    mask_i32: str
    cos: str
    sin: str
    attn_bias: str | None
    gqa: _GQAInputs | None = None


class _DecoderGraph:
    def __init__(self, src: WeightSource, s: _Settings, g: _GraphWriter,
                 quant: Mapping[str, GPTQTensors] | None, kv_scales: KVScales | None = None,
                 embed_table: QuantizedEmbedding | None = None):
        self.src, self.s, self.g, self.quant, self.kv_scales = src, s, g, quant, kv_scales
        self.embed_table = embed_table
        cfg = src.cfg
        self.cfg = cfg
        self.hid, self.H, self.D = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.L, self.V, self.F = cfg.num_hidden_layers, cfg.vocab_size, cfg.ffn_dim
        self.A = _NP[s.act_dtype]
        self.KV = _KV_NP[s.kv_dtype]
        self.tA, self.tKV = _ONNX[np.dtype(self.A)], _ONNX[np.dtype(self.KV)]
        # norms and biases in the plan's small-tensor dtype (fp32 plan: fp32, else fp16)
        self.small_dtype = _NP[PRECISION_PLANS[s.plan].small]
        from models.checkpoint import expected_shapes

        self.shapes = expected_shapes(cfg)
        # names and KV layout of the graph
        self.io = DecoderIO.from_config(cfg, s.kv_dtype, kv_layout(s.attention),
                                        "masked" if s.attention_bias else "unpadded")

    # -- helpers ------------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """A source tensor, checked against the shape the config implies."""
        t = self.src.get(name)
        if tuple(t.shape) != self.shapes.get(name):
            raise DecoderExportError(f"tensor {name} has shape {tuple(t.shape)}, the config expects "
                                     f"{self.shapes.get(name)}: weights and config.json disagree")
        return t

    def small(self, name: str) -> np.ndarray:
        """A norm weight / bias as the plan stores it, in the activation dtype."""
        return _np(self.get(name), self.small_dtype).astype(self.A)

    def cast(self, x: str, to, scope: str) -> str:
        return self.g.op("Cast", [x], scope=scope, to=_ONNX[np.dtype(to)])

    def fp_linear(self, x: str, name: str, wdtype, scope: str, cast_back: bool = True) -> str:
        """MatMul with the transposed weight in ``wdtype`` (+ Add bias); output in the act dtype
        (or in ``wdtype`` when ``cast_back`` is False)."""
        g = self.g
        wt = _np(self.get(name + ".weight"), wdtype).T  # [K, N] for MatMul
        W = g.init(name + ".weight_t", wt, "lm_head" if name == "lm_head" else "linear")
        del wt
        differs = np.dtype(wdtype) != np.dtype(self.A)
        xin = self.cast(x, wdtype, scope) if differs else x
        y = g.op("MatMul", [xin, W], scope=scope)
        bias_name = name + ".bias"
        if self.src.has(bias_name):
            b = g.init(bias_name, _np(self.get(bias_name), wdtype), "linear")
            y = g.op("Add", [y, b], scope=scope)
        if differs and cast_back:
            y = self.cast(y, self.A, scope)
        return y

    def nbits(self, x: str, name: str, mm: MatMulNBitsWeights, bias: np.ndarray | None,
              scope: str, cat: str, accuracy_level: int | None = None) -> str:
        g = self.g
        if mm.perm is not None:
            perm = g.init(name + ".perm", mm.perm.astype(np.int64), cat)
            x = g.op("Gather", [x, perm], scope=scope, axis=-1)
        B = g.init(name + ".qweight", mm.B, cat)
        sc = g.init(name + ".scales", mm.scales.astype(self.A), cat)
        zp = g.init(name + ".qzeros", mm.zero_points, cat) if mm.zero_points is not None else ""
        b = g.init(name + ".bias", bias.astype(self.A), cat) if bias is not None else ""
        return g.op("MatMulNBits", [x, B, sc, zp, "", b], scope=scope, domain=MS_DOMAIN,
                    K=mm.K, N=mm.N, bits=mm.bits, block_size=mm.block_size,
                    accuracy_level=(self.s.accuracy_level if accuracy_level is None
                                    else accuracy_level))

    def linear(self, x: str, name: str, scope: str) -> str:
        if not PRECISION_PLANS[self.s.plan].quantized:
            return self.fp_linear(x, name, self.A, scope)
        t = self.quant[name]
        k_in = self.hid if not name.endswith("mlp.c_proj") else self.F
        n_out = {"attn.c_attn": 3 * self.hid, "mlp.w1": self.F, "mlp.w2": self.F}.get(
            name.split(".", 3)[-1], self.hid)
        check_gptq_shape(name, t, n_out, k_in)
        gs = self.s.group_size
        if t.n_groups != -(-k_in // gs):
            raise PackingError(
                f"quant tensor {name} has {t.n_groups} groups for {k_in} inputs, i.e. group size "
                f"{k_in // max(t.n_groups, 1)}, but the exporter was asked for group_size {gs}: pass "
                "the group size the GPTQ run used")
        mm = _gptq_to_nbits_chunked(t, gs)
        if t.bias is not None:
            bias = t.bias.astype(np.float32)
        elif name + ".bias" in self.shapes and self.src.has(name + ".bias"):
            # GPTQ checkpoints store a (zero) bias for every Linear; only real biases count.
            bias = _np(self.get(name + ".bias"), np.float16).astype(np.float32)
        else:
            bias = None
        if bias is not None and not np.any(bias):
            bias = None
        return self.nbits(x, name, mm, bias, scope, "linear")

    def lm_head(self, x: str) -> tuple[str, Any]:
        """-> (logits name, its numpy dtype)."""
        mode, scope = self.s.lm_head, "/lm_head"
        if mode in ("fp32", "fp16"):
            dt = _NP[mode]
            return self.fp_linear(x, "lm_head", dt, scope, cast_back=False), dt
        # int8 per output channel / int4 per group, quantised in row chunks (quant/lm_head.py);
        # an int4 head quantised earlier (GPTQ: quant.lm_head.gptq_head) comes with the Linears
        t = self.quant.get(HEAD_KEY) if mode == "int4" and self.quant is not None else None
        if t is not None:
            check_gptq_shape(HEAD_KEY, t, self.V, self.hid)
            mm = _gptq_to_nbits_chunked(t, t.in_features // t.n_groups)
        else:
            mm = head_weights(self.get("lm_head.weight"), mode)
        return self.nbits(x, "lm_head", mm, None, scope, "lm_head",
                          self.s.lm_head_accuracy_level), self.A

    # -- graph --------------------------------------------------------------------------------
    def build(self) -> tuple[list, list]:
        g = self.g
        inputs = [_value_info(spec) for spec in self.io.input_specs()]
        outputs = [_value_info(spec) for spec in self.io.output_specs()]
        x, zero_i = self._embeddings()
        shared = self._positions(zero_i)

        # ---- blocks ----
        resid = x
        pending = None  # output of the previous sub-block, added to resid by the next norm
        eps = float(self.cfg.layer_norm_epsilon)
        t0 = time.perf_counter()
        for i in range(self.L):
            if i:
                log.debug("decoder layer %d/%d written (%.0f MiB, %.1f s)", i, self.L,
                          g.offset / 2**20, time.perf_counter() - t0)
            resid, pending = self._layer(i, resid, pending, shared, eps)
        lnf = g.init("transformer.ln_f.weight", self.small("transformer.ln_f.weight"), "norm")
        h = g.op("SkipSimplifiedLayerNormalization", [pending, resid, lnf], n_out=1,
                 scope="/ln_f", domain=MS_DOMAIN, epsilon=eps)
        logits, ldt = self.lm_head(self._kept_positions(h))
        if np.dtype(ldt) != np.dtype(np.float32):
            g.op("Cast", [logits], n_out=[LOGITS], scope="/lm_head", to=TensorProto.FLOAT)
        else:
            g.op("Identity", [logits], n_out=[LOGITS], scope="/lm_head")
        return inputs, outputs

    def _kept_positions(self, h: str) -> str:
        """The last ``logits_to_keep`` positions of ``h`` [B, S, hidden] (0 = all: Slice from
        ``-0``; more than S: all), so the LM head runs only on the rows a caller uses."""
        g, sc = self.g, "/logits_to_keep"
        start = g.op("Neg", [LOGITS_TO_KEEP], scope=sc)
        return g.op("Slice", [h, start, g.const([np.iinfo(np.int64).max], np.int64),
                              g.const([1], np.int64)], scope=sc)

    def _embeddings(self) -> tuple[str, str]:
        """Prompt-table trick: ids >= vocab pick image rows. -> (hidden states, int64 zero)."""
        g, hid, V = self.g, self.hid, self.V
        sc = "/embed"
        vocab = g.const(V, np.int64)
        is_img = g.op("GreaterOrEqual", [INPUT_IDS, vocab], scope=sc)
        zero_i = g.const(0, np.int64)
        tok_ids = g.op("Where", [is_img, zero_i, INPUT_IDS], scope=sc)
        tok, tok_dtype = self._token_rows(tok_ids, sc)
        if np.dtype(tok_dtype) != np.dtype(self.A):
            tok = self.cast(tok, self.A, sc)
        img = IMAGE_EMBEDS if self.A == np.float32 else self.cast(IMAGE_EMBEDS, self.A, sc)
        # row 0 of the table is a zero row, so an empty image_embeds still gathers
        table = g.op("Concat", [g.const(np.zeros((1, hid)), self.A), img], scope=sc, axis=0)
        shifted = g.op("Sub", [INPUT_IDS, g.const(V - 1, np.int64)], scope=sc)
        img_idx = g.op("Where", [is_img, shifted, zero_i], scope=sc)
        img_rows = g.op("Gather", [table, img_idx], scope=sc, axis=0)
        is_img3 = g.op("Unsqueeze", [is_img, g.const([-1], np.int64)], scope=sc)
        return g.op("Where", [is_img3, img_rows, tok], scope=sc), zero_i

    def _token_rows(self, tok_ids: str, sc: str) -> tuple[str, Any]:
        """Embedding rows of ``tok_ids`` -> (name, numpy dtype): a plain fp table, or int8/int4
        codes dequantised by ``GatherBlockQuantized`` (fp16 scales, so fp16 rows)."""
        g, w = self.g, self.get("transformer.wte.weight")
        if self.s.embed not in QUANT_BITS:
            dt = _NP[self.s.embed]
            wte = g.init("transformer.wte.weight", _np(w, dt), "embedding")
            return g.op("Gather", [wte, tok_ids], scope=sc, axis=0), dt
        q = self.embed_table or quantize_embedding(w, self.s.embed)
        del w
        if q.mode != self.s.embed or q.data.shape[0] != self.V:
            raise DecoderExportError(f"embed_table is a {q.mode} table of {q.data.shape[0]} rows: "
                                     f"the decoder needs {self.s.embed} rows for {self.V} tokens")
        data = g.init("transformer.wte.qweight", q.data, "embedding")
        scales = g.init("transformer.wte.scales", q.scales, "embedding")
        # zero point 2**(bits-1) is the kernel's default: not stored
        rows = g.op("GatherBlockQuantized", [data, tok_ids, scales], scope=sc, domain=MS_DOMAIN,
                    bits=q.bits, block_size=q.block_size, gather_axis=0, quantize_axis=1)
        return rows, np.float16

    def _positions(self, zero_i: str) -> _LayerShared:
        """Positions, masks and the rotary tables, shared by all layers."""
        g, cfg, s, D = self.g, self.cfg, self.s, self.D
        sc = "/positions"
        csum = g.op("CumSum", [ATTENTION_MASK, g.const(1, np.int64)], scope=sc)
        seq = g.op("Shape", [INPUT_IDS], scope=sc, start=1, end=2)
        start = g.op("Neg", [seq], scope=sc)
        pos = g.op("Slice", [csum, start, g.const([np.iinfo(np.int64).max], np.int64),
                             g.const([1], np.int64)], scope=sc)
        pos = g.op("Max", [g.op("Sub", [pos, g.const(1, np.int64)], scope=sc), zero_i], scope=sc)
        mask_i32 = g.op("Cast", [ATTENTION_MASK], scope=sc, to=TensorProto.INT32)
        inv_freq_pos = torch.arange(s.max_positions)
        cos, sin = rotary_cos_sin(inv_freq_pos, D, cfg.rotary_emb_base)  # fp32, as the reference
        cos_c = g.init("rotary.cos_cache", cos[:, : D // 2].numpy().astype(self.A), "rope")
        sin_c = g.init("rotary.sin_cache", sin[:, : D // 2].numpy().astype(self.A), "rope")
        attn_bias = self._plain_mask(seq) if s.attention == "plain" else None
        gqa = self._gqa_inputs(seq) if s.attention == "gqa" else None
        return _LayerShared(pos, mask_i32, cos_c, sin_c, attn_bias, gqa)

    def _gqa_inputs(self, seq: str) -> _GQAInputs:
        g, sc, i32 = self.g, "/positions", TensorProto.INT32
        total = g.op("Shape", [ATTENTION_MASK], scope=sc, start=1, end=2)  # [1] int64
        batch = g.op("Shape", [INPUT_IDS], scope=sc, start=0, end=1)
        last = g.op("Cast", [g.op("Sub", [total, g.const([1], np.int64)], scope=sc)], scope=sc,
                    to=i32)
        seqlens = g.op("Expand", [last, batch], scope=sc)
        total_len = g.op("Cast", [g.op("Squeeze", [total, g.const([0], np.int64)], scope=sc)],
                         scope=sc, to=i32)
        query_lens = g.op("Expand", [g.op("Cast", [seq], scope=sc, to=i32), batch], scope=sc)
        if not self.s.attention_bias:
            return _GQAInputs(seqlens, total_len, query_lens, "")
        keep = g.op("Cast", [g.op("Unsqueeze", [ATTENTION_MASK, g.const([1, 2], np.int64)],
                                  scope=sc)], scope=sc, to=TensorProto.BOOL)  # [B,1,1,T]
        bias = g.op("Where", [keep, g.const(0.0, self.A), g.const(-10000.0, self.A)], scope=sc)
        # the kernel wants [B, 1, S, T] (it does not broadcast the query axis)
        rows = g.op("Concat", [g.const([1, 1], np.int64), seq, g.const([1], np.int64)], scope=sc,
                    axis=0)
        bias = g.op("Expand", [bias, rows], scope=sc)
        return _GQAInputs(seqlens, total_len, query_lens, bias)

    def _layer(self, i: int, resid: str, pending: str | None, sh: _LayerShared,
               eps: float) -> tuple[str, str]:
        """One transformer block; -> (residual stream, MLP output not yet added to it)."""
        g, hid, H = self.g, self.hid, self.H
        p = f"transformer.h.{i}"
        sc = f"/layers.{i}"
        ln1 = g.init(f"{p}.ln_1.weight", self.small(f"{p}.ln_1.weight"), "norm")
        if pending is None:
            h = g.op("SimplifiedLayerNormalization", [resid, ln1], scope=sc + "/ln_1", axis=-1,
                     epsilon=eps, stash_type=1)
        else:
            h, _, _, resid = g.op("SkipSimplifiedLayerNormalization", [pending, resid, ln1],
                                  n_out=[None, "", "", None], scope=sc + "/ln_1",
                                  domain=MS_DOMAIN, epsilon=eps)
        qkv = self.linear(h, f"{p}.attn.c_attn", sc + "/attn/c_attn")
        q, k, v = g.op("Split", [qkv, g.const([hid] * 3, np.int64)], n_out=3,
                       scope=sc + "/attn", axis=-1)
        q = g.op("RotaryEmbedding", [q, sh.pos, sh.cos, sh.sin], scope=sc + "/attn/rope_q",
                 domain=MS_DOMAIN, num_heads=H, interleaved=0)
        k = g.op("RotaryEmbedding", [k, sh.pos, sh.cos, sh.sin], scope=sc + "/attn/rope_k",
                 domain=MS_DOMAIN, num_heads=H, interleaved=0)
        a = self._attention(i, q, k, v, sh, sc + "/attn")
        a = self.linear(a, f"{p}.attn.c_proj", sc + "/attn/c_proj")
        ln2 = g.init(f"{p}.ln_2.weight", self.small(f"{p}.ln_2.weight"), "norm")
        h, _, _, resid = g.op("SkipSimplifiedLayerNormalization", [a, resid, ln2],
                              n_out=[None, "", "", None], scope=sc + "/ln_2",
                              domain=MS_DOMAIN, epsilon=eps)
        up = self.linear(h, f"{p}.mlp.w1", sc + "/mlp/w1")
        gate = self.linear(h, f"{p}.mlp.w2", sc + "/mlp/w2")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], scope=sc + "/mlp")], scope=sc + "/mlp")
        pending = self.linear(g.op("Mul", [up, act], scope=sc + "/mlp"), f"{p}.mlp.c_proj",
                              sc + "/mlp/c_proj")
        return resid, pending

    def _attention(self, i: int, q: str, k: str, v: str, sh: _LayerShared, scope: str) -> str:
        g, H, D = self.g, self.H, self.D
        past_k, past_v, pres_k, pres_v = self.io.kv_names(i)
        if sh.gqa is not None:  # KV dtype = act dtype or int8 (_settings): one shared buffer
            a = sh.gqa
            scales, quant = self._kv_quant(i)
            o, _, _ = g.op("GroupQueryAttention",
                           [q, k, v, past_k, past_v, a.seqlens_k, a.total_len, "", "", "", a.bias,
                            "", *scales, "", "", a.query_lens], n_out=[None, pres_k, pres_v],
                           scope=scope, domain=MS_DOMAIN, num_heads=H, kv_num_heads=H,
                           scale=1.0 / math.sqrt(D), **quant)
            return o
        same = np.dtype(self.KV) == np.dtype(self.A)
        if not same:
            past_k, past_v = self.cast(past_k, self.A, scope), self.cast(past_v, self.A, scope)
        if self.s.attention == "mha":
            o, pk, pv = g.op("MultiHeadAttention", [q, k, v, "", sh.mask_i32, "", past_k, past_v],
                             n_out=[None, pres_k if same else None, pres_v if same else None],
                             scope=scope, domain=MS_DOMAIN, num_heads=H, unidirectional=1,
                             scale=1.0 / math.sqrt(D))
        else:
            o, pk, pv = self._plain_attention(q, k, v, past_k, past_v, sh.attn_bias, scope,
                                              pres_k if same else None, pres_v if same else None)
        if not same:
            g.op("Cast", [pk], n_out=[pres_k], scope=scope, to=self.tKV)
            g.op("Cast", [pv], n_out=[pres_v], scope=scope, to=self.tKV)
        return o

    def _kv_quant(self, i: int) -> tuple[list[str], dict[str, Any]]:
        """Layer ``i``'s ``k_scale`` / ``v_scale`` inputs and the int8-cache attributes of
        GroupQueryAttention (nothing for a float cache). The kernel stores ``round(x / scale)``;
        quant/kv_scales.py says what was measured and mirrors it."""
        if self.s.kv_dtype != "int8":
            return ["", ""], {}
        ks = self.kv_scales
        kn, vn = scale_names(i)
        names = [self.g.init(kn, ks.key[i].astype(np.float32), "other"),
                 self.g.init(vn, ks.value[i].astype(np.float32), "other")]
        return names, {"kv_cache_bit_width": 8, "k_quant_type": ks.quant_type,
                       "v_quant_type": ks.quant_type}

    # -- plain-op attention (fallback; fp32 scores and softmax) -------------------------------
    def _plain_mask(self, seq: str) -> str:
        g, sc = self.g, "/positions"
        total = g.op("Shape", [ATTENTION_MASK], scope=sc, start=1, end=2)
        past = g.op("Sub", [total, seq], scope=sc)
        one = g.const(1, np.int64)
        sq = lambda t: g.op("Squeeze", [t, g.const([0], np.int64)], scope=sc)  # noqa: E731
        kpos = g.op("Range", [g.const(0, np.int64), sq(total), one], scope=sc)  # [T]
        qpos = g.op("Range", [sq(past), sq(total), one], scope=sc)  # [S]
        causal = g.op("LessOrEqual", [g.op("Unsqueeze", [kpos, g.const([0], np.int64)], scope=sc),
                                      g.op("Unsqueeze", [qpos, g.const([1], np.int64)], scope=sc)],
                      scope=sc)  # [S, T]
        pad = g.op("Cast", [g.op("Unsqueeze", [ATTENTION_MASK, g.const([1, 2], np.int64)],
                                 scope=sc)], scope=sc, to=TensorProto.BOOL)  # [B,1,1,T]
        keep = g.op("And", [causal, pad], scope=sc)  # [B,1,S,T]
        return g.op("Where", [keep, g.const(0.0, np.float32),
                              g.const(np.finfo(np.float32).min, np.float32)], scope=sc)

    def _plain_attention(self, q, k, v, past_k, past_v, bias, scope, pres_k, pres_v):
        g, H, D = self.g, self.H, self.D
        heads = g.const([0, 0, H, D], np.int64)

        def bhsd(t):
            return g.op("Transpose", [g.op("Reshape", [t, heads], scope=scope)], scope=scope,
                        perm=[0, 2, 1, 3])

        kk = g.op("Concat", [past_k, bhsd(k)], n_out=[pres_k] if pres_k else 1, scope=scope, axis=2)
        vv = g.op("Concat", [past_v, bhsd(v)], n_out=[pres_v] if pres_v else 1, scope=scope, axis=2)
        qf, kf = bhsd(q), kk
        if self.A != np.float32:
            qf, kf = self.cast(qf, np.float32, scope), self.cast(kf, np.float32, scope)
        scores = g.op("MatMul", [qf, g.op("Transpose", [kf], scope=scope, perm=[0, 1, 3, 2])],
                      scope=scope)
        scores = g.op("Div", [scores, g.const(math.sqrt(D), np.float32)], scope=scope)
        probs = g.op("Softmax", [g.op("Add", [scores, bias], scope=scope)], scope=scope, axis=-1)
        if self.A != np.float32:
            probs = self.cast(probs, self.A, scope)
        o = g.op("MatMul", [probs, vv], scope=scope)
        o = g.op("Reshape", [g.op("Transpose", [o], scope=scope, perm=[0, 2, 1, 3]),
                             g.const([0, 0, H * D], np.int64)], scope=scope)
        return o, kk, vv


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _settings(cfg: QwenVLConfig, plan: str, act_dtype, kv_dtype, lm_head, group_size,
              accuracy_level, lm_head_accuracy_level, attention, max_positions,
              embed=None, attention_bias: bool = True) -> _Settings:
    if plan not in PLANS:
        raise DecoderExportError(f"unknown decoder plan '{plan}': use one of {', '.join(PLANS)}")
    spec = PRECISION_PLANS[plan]
    act = act_dtype or spec.act_dtype
    kv = kv_dtype or spec.kv_dtype
    head = lm_head or spec.lm_head
    embed = embed or spec.embed
    for what, val, ok in (("act_dtype", act, _NP), ("kv_dtype", kv, _KV_NP),
                          ("lm_head", head, ("int8", "int4", "fp16", "fp32")),
                          ("embed", embed, EMBED_MODES),
                          ("attention", attention, ATTENTIONS)):
        if val not in ok:
            raise DecoderExportError(f"{what} must be one of {', '.join(ok)}, not '{val}'")
    if not attention_bias and attention != "gqa":
        raise DecoderExportError(f"attention_bias=False is a GroupQueryAttention build option; "
                                 f"attention='{attention}' always masks with the attention mask")
    if kv == "int8" and attention != "gqa":
        raise DecoderExportError("an int8 KV cache needs attention='gqa' (GroupQueryAttention "
                                 "quantises its cache; the other attentions take float caches)")
    if attention == "gqa" and kv not in (act, "int8"):
        raise DecoderExportError(f"attention='gqa' reads and writes its KV buffer in the "
                                 f"activation dtype or int8: pass kv_dtype='{act}' or 'int8' "
                                 "(or attention='mha')")
    if act not in spec.act_dtypes:
        other = next((n for n in PLANS if PRECISION_PLANS[n].act_dtypes == (act,)), None)
        raise DecoderExportError(f"the {plan} plan has {'/'.join(spec.act_dtypes)} activations"
                                 + (f"; use plan='{other}' for {act}" if other else ""))
    if group_size < 16 or group_size & (group_size - 1):
        raise DecoderExportError(f"group_size {group_size}: MatMulNBits needs a power of two >= 16")
    if lm_head_accuracy_level is None:
        lm_head_accuracy_level = accuracy_level
    for level in (accuracy_level, lm_head_accuracy_level):
        if level not in (0, 1, 2, 3, 4):
            raise DecoderExportError("accuracy_level must be 0..4 (0 = unset, 4 = int8 activations)")
    if head == "int8" and lm_head_accuracy_level != 4:
        log.warning("int8 LM head with accuracy_level %d: onnxruntime's CPU kernel for 8-bit "
                    "MatMulNBits is fast only at accuracy_level 4 (measured ~50x slower otherwise, "
                    "seconds per token at full size); pass lm_head_accuracy_level=4 for CPU "
                    "deployment", lm_head_accuracy_level)
    if max_positions is None:
        # NTK / logN change RoPE past seq_length: the cache ends there so longer contexts fail
        exact = not (cfg.use_dynamic_ntk or cfg.use_logn_attn)
        max_positions = cfg.max_position_embeddings if exact else cfg.seq_length
    return _Settings(plan, act, kv, head, embed, group_size, accuracy_level,
                     lm_head_accuracy_level, attention, int(max_positions), bool(attention_bias))


def export_decoder(model: nn.Module | WeightSource | str | Path, out_path: str | Path,
                   plan: str = "fp32", quant_tensors: Mapping[str, GPTQTensors] | None = None,
                   group_size: int = DEFAULT_GROUP_SIZE, lm_head: str | None = None,
                   act_dtype: str | None = None, kv_dtype: str | None = None,
                   accuracy_level: int = 0, lm_head_accuracy_level: int | None = None,
                   attention: str = "mha", max_positions: int | None = None,
                   check: bool = True, embed: str | None = None,
                   attention_bias: bool = True,
                   kv_scales: KVScales | None = None,
                   embed_table: QuantizedEmbedding | None = None) -> DecoderExportResult:
    """Export the language decoder of ``model`` to ``out_path`` (+ ``out_path.data``).

    ``model``: the PyTorch reference, a ``WeightSource`` or a checkpoint directory (weights are read
    one tensor at a time). ``quant_tensors``: ``{"transformer.h.{i}.attn.c_attn": GPTQTensors, ...}``
    for the five Linears of every layer (required by, and only used by, ``plan="int4"``; may be a
    lazy Mapping). ``lm_head``: ``int8`` | ``fp16`` | ``fp32`` (default int8 for int4, else the plan
    dtype). ``act_dtype``: ``fp16``/``fp32`` activations of the int4 plan. ``kv_dtype`` overrides the
    KV dtype. ``accuracy_level``: MatMulNBits compute precision (0 = unset, exact; 4 = int8
    activations, 3.6x faster int4 decode on ORT CPU, bench/RESULTS.md);
    ``lm_head_accuracy_level`` (default: the same) for an int8 head, whose ORT CPU kernel is fast
    only at 4. ``attention``: ``mha`` (com.microsoft MultiHeadAttention, ``concat`` KV layout),
    ``gqa`` (com.microsoft GroupQueryAttention on one shared past/present buffer, ``shared`` KV
    layout, KV dtype = activation dtype; the runtime binds the buffer as both) or ``plain``
    (MatMul/Softmax fallback).
    ``embed``: the embedding table's dtype (default the plan's: ``int8`` rows for ``edge``);
    ``embed_table``: that table quantised elsewhere (another int4 block size or clipping:
    ``quant.embedding.quantize_embedding``). An int4 head: ``quant_tensors["lm_head"]`` when
    given (GPTQ, ``quant.lm_head.gptq_head``), else round-to-nearest in groups of 32.
    ``attention_bias``: ``gqa`` only; False builds it without the mask bias (onnxruntime's CUDA
    kernel rejects one): an ``unpadded`` engine (runtime/contract.py).
    ``kv_scales``: the static scales of an int8 KV cache (``kv_dtype="int8"``, GQA only;
    ``quant.kv_scales.calibrate_kv_scales``), stored in the graph.
    """
    t0 = time.perf_counter()
    src = _as_source(model)
    cfg = src.cfg
    s = _settings(cfg, plan, act_dtype, kv_dtype, lm_head, group_size, accuracy_level,
                  lm_head_accuracy_level, attention, max_positions, embed, attention_bias)
    if PRECISION_PLANS[plan].quantized:
        _require_quant_tensors(cfg, quant_tensors)
    if s.kv_dtype == "int8":
        if kv_scales is None:
            raise DecoderExportError("an int8 KV cache needs its static scales: pass kv_scales "
                                     "(quant.kv_scales.calibrate_kv_scales on the calib split)")
        kv_scales.check(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim)
    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    # .onnx and .data are written beside out_path, then moved into place: data first, the
    # .onnx last (its presence means the pair is complete)
    with staging_dir(out_path) as tmp:
        with open(tmp / data_name, "wb") as f:
            gw = _GraphWriter(f, data_name)
            dg = _DecoderGraph(src, s, gw, quant_tensors,
                               kv_scales if s.kv_dtype == "int8" else None, embed_table)
            inputs, outputs = dg.build()
        m, meta = _decoder_model(gw, dg, inputs, outputs)
        (tmp / out_path.name).write_bytes(m.SerializeToString())
        if check:
            _check(m, tmp)
        os.replace(tmp / data_name, out_path.parent / data_name)
        os.replace(tmp / out_path.name, out_path)

    res = _export_result(out_path, out_path.parent / data_name, gw, dg, inputs, outputs, meta, t0)
    log.info("%s", res.summary())
    return res


def _require_quant_tensors(cfg: QwenVLConfig,
                           quant_tensors: Mapping[str, GPTQTensors] | None) -> None:
    """A quantised plan needs GPTQ tensors for every Linear of every layer."""
    if quant_tensors is None:
        raise DecoderExportError("a quantised plan (int4, edge) needs quant_tensors (GPTQ tensors "
                                 "per Linear, from quant.gptq or quant.fake_quant.rtn_gptq_tensors)")
    names = [f"transformer.h.{i}.{sfx}" for i in range(cfg.num_hidden_layers)
             for sfx in LINEAR_SUFFIXES]
    missing = [n for n in names if n not in quant_tensors]
    if missing:
        raise DecoderExportError(f"quant_tensors lacks {len(missing)} of {len(names)} Linears, "
                                 f"first {missing[0]}")


def _decoder_model(gw: _GraphWriter, dg: _DecoderGraph, inputs: list,
                   outputs: list) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The ModelProto of the written graph and the metadata the runtime reads from it."""
    s, cfg = dg.s, dg.cfg
    graph = helper.make_graph(gw.nodes, "qwenvl_decoder", inputs, outputs, initializer=gw.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                helper.make_opsetid(MS_DOMAIN, 1)],
                          producer_name="qwenvl-edge", producer_version="0.1.0")
    m.ir_version = IR_VERSION
    meta = {
        "qwenvl_edge.engine": "decoder", "plan": s.plan, "act_dtype": s.act_dtype,
        "kv_dtype": s.kv_dtype, "lm_head": s.lm_head, "embed": s.embed,
        "num_layers": str(cfg.num_hidden_layers),
        "num_heads": str(dg.H), "head_dim": str(dg.D), "hidden_size": str(dg.hid),
        "vocab_size": str(dg.V), "max_positions": str(s.max_positions),
        "positions": "cumsum(attention_mask)-1", "image_token_offset": str(dg.V),
        KV_LAYOUT_KEY: dg.io.kv_layout, PADDING_KEY: dg.io.padding,
        **({"kv_quant": dg.kv_scales.quant_type} if dg.kv_scales is not None else {}),
        "settings": json.dumps(asdict(s)),
    }
    helper.set_model_props(m, meta)
    return m, meta


def _export_result(out_path: Path, data_path: Path, gw: _GraphWriter, dg: _DecoderGraph,
                   inputs: list, outputs: list, meta: dict[str, str],
                   t0: float) -> DecoderExportResult:
    """Summary of a finished export: I/O, op counts, weight and file sizes."""
    s = dg.s
    op_counts = Counter((f"{n.domain}::" if n.domain else "") + n.op_type for n in gw.nodes)
    wb = dict(gw.bytes)
    per_token = sum(v for k, v in wb.items() if k in ("linear", "lm_head", "norm"))
    return DecoderExportResult(
        onnx_path=out_path, data_path=data_path, plan=s.plan, settings=asdict(s),
        inputs=[IOSpec(i.name, _np_name(i.type.tensor_type.elem_type), _dims(i)) for i in inputs],
        outputs=[IOSpec(o.name, _np_name(o.type.tensor_type.elem_type), _dims(o)) for o in outputs],
        op_counts=dict(op_counts), weight_bytes=wb, bytes_per_token=per_token,
        kv_bytes_per_token=dg.io.kv_bytes_per_token,
        file_bytes=out_path.stat().st_size + data_path.stat().st_size,
        seconds=time.perf_counter() - t0, metadata=meta)


def _check(m: onnx.ModelProto, directory: Path) -> None:
    """onnx.checker on the graph (weights are external and not read).

    ``SimplifiedLayerNormalization`` is an onnxruntime kernel registered in the ONNX domain that
    onnx itself does not know, so the check runs on a copy where it is moved to com.microsoft
    (nodes of unregistered domains are only checked structurally).
    """
    c = onnx.ModelProto()
    c.CopyFrom(m)
    for n in c.graph.node:
        if n.op_type == "SimplifiedLayerNormalization":
            n.domain = MS_DOMAIN
    path = directory / "_check.onnx"  # beside the .data file, which the checker looks for
    path.write_bytes(c.SerializeToString())
    try:
        onnx.checker.check_model(str(path))
    finally:
        path.unlink()


def _value_info(spec: Spec) -> onnx.ValueInfoProto:
    name, dtype, shape = spec
    return helper.make_tensor_value_info(name, _ONNX[np.dtype(dtype)], shape)


def _np_name(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


def _dims(vi) -> list[int | str]:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


# ---------------------------------------------------------------------------------------------
# Running (tests, validation): onnxruntime only, no torch needed
# ---------------------------------------------------------------------------------------------

KVPair = tuple[np.ndarray, np.ndarray]


def run_decoder(session, input_ids, image_embeds=None, attention_mask=None,
                past: list[KVPair] | None = None,
                logits_to_keep: int = 0) -> tuple[np.ndarray, list[KVPair]]:
    """One decoder call with defaults filled in: no images, an all-ones mask, an empty past.

    ``session``: from :func:`runtime.engines.open_session`. ``logits_to_keep``: the last
    positions to return logits for (0 = all; engines without the input return all). Returns
    ``(logits [B,k,V] float32, present [(key, value)] per layer)``.
    """
    c = decoder_contract(session)
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    b, s = ids.shape
    if past is None:
        empty = np.zeros(c.kv_shape(b, 0), c.kv_dtype)
        past = [(empty, empty)] * c.layers
    p = past[0][0].shape[2]
    if attention_mask is None:
        attention_mask = np.ones((b, p + s), np.int64)
    if image_embeds is None:
        image_embeds = np.zeros((0, c.hidden), np.float32)
    feed = {INPUT_IDS: ids, ATTENTION_MASK: np.asarray(attention_mask, np.int64),
            IMAGE_EMBEDS: np.asarray(image_embeds, np.float32), **c.logits_feed(logits_to_keep)}
    for i, (k, v) in enumerate(past):
        pk, pv, _, _ = c.kv_names(i)
        feed[pk], feed[pv] = np.asarray(k, c.kv_dtype), np.asarray(v, c.kv_dtype)
    res = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
    present = [(res[c.kv_names(i)[2]], res[c.kv_names(i)[3]]) for i in range(c.layers)]
    return res[LOGITS], present


def greedy_generate(session, input_ids, image_embeds=None, max_new_tokens: int = 10,
                    stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Greedy decoding of one prompt (prompt-table ids) with the KV cache, through the runtime's
    decode loop (:func:`runtime.generate.decode_tokens`) over the whole vocabulary."""
    logits, past = run_decoder(session, input_ids, image_embeds, logits_to_keep=1)

    def forward(tok: int) -> np.ndarray:
        nonlocal past
        out, past = run_decoder(session, [[tok]], None, None, past)
        return out[0, -1]

    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    sampler = Sampler(gen, logits.shape[-1])
    return list(decode_tokens(forward, logits[0, -1], sampler, frozenset(stop_ids), gen,
                              DecodeState()))
