"""Memory planner: will a precision plan fit a device *before* anything is built?

The number-one class of Jetson complaints is discovering an out-of-memory at build time or at the
first request. The arithmetic is simple and exact enough to decide early: weight bytes per engine
from the config's tensor shapes and the plan row's dtypes (``quant/plans.py``: vision, linear bits
and group size, head, embedding, the target's activation and KV dtypes), stored the way the
exporters store them (MatMulNBits codes + one scale per group in the activation dtype, norms,
biases and rotary tables in the activation dtype, fp32 LayerNorms and position tables in the
vision engine), KV bytes per token (the target's KV dtype: 1 byte an element for int8, plus its
fp32 per-channel scales) times the runtime's KV buffer sets, the prefill's logits (the
last position's only on a decoder with the ``logits_to_keep`` input), and a fixed allowance for
the runtime (CUDA context, ORT arenas, activations). ``python -m bench.memory``
checks every figure against a bundle's files and the runtime's measured peak RSS.
Figures for the full-size Qwen-VL-Chat are in docs/DESIGN.md §5 (ViT fp16 3.9 GB, int8 1.9 GB;
int4 decoder 3.4 GB; int8 head 0.6 GB; KV 524 KB/token in fp16).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from models.checkpoint import expected_shapes
from models.config import QwenVLConfig
from quant.embedding import table_bytes
from quant.plans import DTYPE_BITS, PLANS, PrecisionPlan

GB = 1e9
PAGE = 4096  # a gathered row of a memory-mapped table costs at least one page


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    usable_bytes: float  # what an application can really allocate (after OS, display, carve-outs)
    note: str


# Usable memory: Jetson boards share DRAM between CPU and GPU; the OS and the desktop take their
# share (Orin Nano 8 GB leaves ~5.2 GB, docs/DESIGN.md §5). Desktop: 24 GB less the CUDA context.
PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile("orin-nano-8gb", 5.2 * GB, "Jetson Orin Nano 8 GB, headless JetPack 6"),
    DeviceProfile("orin-nx-16gb", 12.5 * GB, "Jetson Orin NX 16 GB, headless"),
    DeviceProfile("agx-orin-32gb", 27.0 * GB, "Jetson AGX Orin 32 GB"),
    DeviceProfile("agx-orin-64gb", 58.0 * GB, "Jetson AGX Orin 64 GB"),
    DeviceProfile("desktop", 22.0 * GB, "desktop GPU with 24 GB (RTX 4090 class)"),
)}

QUANT_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.w1.weight", ".mlp.w2.weight",
                  ".mlp.c_proj.weight")
RUNTIME_OVERHEAD = 0.6 * GB  # CUDA context + ORT arenas + activations at batch 1
#: KV buffer sets the runtime holds per layout (runtime/engines.KVCache): ``concat`` reads past
#: from one set and writes present into the other, so a context of T tokens holds 2 x T tokens of
#: KV; ``shared`` (GroupQueryAttention) writes in place into one.
KV_BUFFERS = {"concat": 2, "shared": 1}

#: Re-loading the vision engine per request in sequential (low-memory) mode, in seconds per GB of
#: engine file: measured by ``python -m bench.memory`` (see bench/RESULTS.md for the command,
#: machine, date and load). ``None`` until measured: the planner then prints no figure.
VISION_LOAD_S_PER_GB: float | None = 1.33
VISION_LOAD_SOURCE = ("measured: fp16 vision engine of 0.48 GB (4 of 48 ViT layers at full width) "
                      "loaded in 0.64 s from the page cache, onnxruntime CPU, AMD EPYC 2 cores, "
                      "2026-12-06")
#: Re-loading the decoder in low-memory mode (a request with images releases it before the vision
#: engine loads): the full-size int4 ``--target cpu`` decoder (5.31 GB file, its embedding table
#: memory-mapped) loaded in 5.55 s from the page cache (`python -m bench.memory`, bench/RESULTS.md).
DECODER_LOAD_S_PER_GB: float | None = 1.05
DECODER_LOAD_SOURCE = ("measured: full-size int4 cpu decoder of 5.31 GB loaded in 5.55 s from the "
                       "page cache, onnxruntime CPU, AMD EPYC 2 cores, 2026-12-06")

# What onnxruntime's CPU executor holds beyond the files (each measured at full size with
# /proc/self/smaps, bench/RESULTS.md "Where the decode phase's memory went"):
#: MatMulNBits at accuracy level 4 prepacks its weight at load: the codes move into the packed
#: buffer, which adds an fp32 copy of each block's scale and an fp32 block sum, while the
#: original scales stay memory-mapped (and resident: the prepack read them). 4-bit: bytes per
#: block; 8-bit (one block per row): one fp32 per 64 weights along K.
PREPACK_BYTES_PER_4BIT_BLOCK = 8
PREPACK_BYTES_PER_8BIT_K64 = 4
#: A row gathered from the memory-mapped embedding table brings the kernel's readahead around
#: it into the resident set, once per tensor (codes, scales): Linux's default 128 KiB window.
READAHEAD_BYTES = 128 * 1024


@dataclass
class MemoryPlan:
    plan: str
    device: str
    usable_bytes: float
    vision_bytes: float
    decoder_linear_bytes: float
    lm_head_bytes: float
    embed_bytes: float
    other_bytes: float  # norms, biases, rotary tables (+ an int8 KV's scales)
    kv_bytes_per_token: float  # one K and one V per layer for one token
    bytes_read_per_token: float  # decode: every decoder weight once (embedding rows excluded)
    overhead_bytes: float
    context: int  # the context the plan was asked for
    max_context_resident: int  # both engines loaded at once
    max_context_sequential: int  # vision engine released before decoding
    fits: bool
    mode: str  # "resident", "sequential" or "does not fit"
    target: str = "gpu"  # the plan target whose activation / KV dtypes were counted
    group_size: int | None = None  # int4 Linears
    lm_head: str = ""  # LM-head dtype counted
    kv_buffers: int = KV_BUFFERS["concat"]
    logits_bytes_per_token: float = 0.0  # one position's logits (host fp32 + the head's output)
    # the prefill keeps the last position's logits (decoder input ``logits_to_keep``); False:
    # a decoder exported before it returns every prompt position's
    logits_last_only: bool = True
    # fp16 weights onnxruntime's CPU executor re-materialises in fp32: while the vision engine
    # runs; the decoder's when its graph is optimised at load (the fp16 originals then freed)
    cpu_cast_vision_bytes: float = 0.0
    cpu_cast_decoder_bytes: float = 0.0
    cpu_embed_mapped: bool = True  # the table stays memory-mapped (False: converted to fp32)
    embed_row_bytes: float = 0.0  # one embedding row (+ its scale)
    # at load: a MatMulNBits head held twice while prepacked, or the largest fp32 weight made
    # twice while an fp16 graph is optimised
    cpu_load_transient_bytes: float = 0.0
    cpu_prepack_bytes: float = 0.0  # MatMulNBits' packed scales + block sums (accuracy 4)
    embed_read_bytes_per_token: float = 0.0  # a gathered row's readahead, all its tensors
    cpu_vision_act_bytes: float = 0.0  # the vision encode's largest activations, one image
    vision_load_s: float | None = None  # estimated reload per request in sequential mode
    vision_load_note: str = ""
    decoder_load_s: float | None = None  # ... and the decoder's, after the vision engine
    decoder_load_note: str = ""
    kv_dtype: str = ""  # KV element dtype counted (quant/plans.py DTYPE_BITS names)
    kv_scale_bytes: float = 0.0  # an int8 KV's static fp32 scales (in other_bytes)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def decoder_bytes(self) -> float:
        return self.decoder_linear_bytes + self.lm_head_bytes + self.embed_bytes + self.other_bytes

    def kv_bytes(self, tokens: int | None = None) -> float:
        """KV bytes the runtime holds for ``tokens`` (default: the planned context)."""
        return self.kv_buffers * self.kv_bytes_per_token * (self.context if tokens is None
                                                            else tokens)

    def prefill_logits_bytes(self, prompt: int | None = None) -> float:
        """Logits a prefill of ``prompt`` tokens (default: the planned context) holds: one row
        with ``logits_to_keep``, else one per prompt position."""
        prompt = self.context if prompt is None else prompt
        return self.logits_bytes_per_token * (min(1, prompt) if self.logits_last_only else prompt)

    def peak_bytes(self, sequential: bool, tokens: int | None = None,
                   prompt: int | None = None, on_cpu: bool = False) -> float:
        """Predicted peak: both engines + KV + the prefill's logits + allowance (resident), or
        the larger of the vision engine alone and the decoder side (one engine at a time).

        ``tokens``: context held (default the planned one); ``prompt``: tokens prefilled at once
        (default ``tokens``: a prompt filling the context). ``on_cpu``: onnxruntime's CPU
        executor as measured (bench/RESULTS.md): fp32 copies of fp16 weights while an engine
        runs (kept by the memory arena of a resident engine), the memory-mapped embedding
        table resident only in its gathered rows (with the readahead around each), the packed
        MatMulNBits extras, the LM head twice while it is prepacked at load and the vision
        encode's activations; KV pages only for the tokens held (the runtime's host KV buffers
        refuse transparent huge pages: runtime/engines.host_buffer)."""
        tokens = self.context if tokens is None else tokens
        prompt = tokens if prompt is None else prompt
        weights, vision_run, load = self.decoder_bytes, self.vision_bytes, 0.0
        kv = self.kv_bytes(tokens)
        if on_cpu:
            row = max(self.embed_row_bytes, PAGE, self.embed_read_bytes_per_token)
            if self.cpu_embed_mapped:
                weights += min(self.embed_bytes, tokens * row) - self.embed_bytes
            weights += self.cpu_prepack_bytes + self.cpu_cast_decoder_bytes
            vision_run += self.cpu_cast_vision_bytes + self.cpu_vision_act_bytes
            load = self.cpu_load_transient_bytes
        dec_run = weights + kv + self.prefill_logits_bytes(prompt)
        if sequential:
            body = max(vision_run, weights + load, dec_run)
        else:
            body = max(self.vision_bytes + weights + load, vision_run + weights,
                       (vision_run if on_cpu else self.vision_bytes) + dec_run)
        return self.overhead_bytes + body

    def lines(self) -> list[str]:
        def g(b: float) -> str:
            return f"{b / GB:6.2f} GB" if b >= 0.05 * GB else f"{b / 1e6:6.2f} MB"

        out = [
            f"memory plan '{self.plan}' (target {self.target}, lm_head {self.lm_head}"
            + (f", group size {self.group_size}" if self.group_size else "")
            + f") for {self.device} ({self.usable_bytes / GB:.1f} GB usable):",
            f"  vision engine         {g(self.vision_bytes)}",
            f"  decoder linears       {g(self.decoder_linear_bytes)}",
            f"  lm_head               {g(self.lm_head_bytes)}",
            f"  embedding table       {g(self.embed_bytes)}",
            f"  norms, biases, rope   {g(self.other_bytes)}",
            f"  runtime allowance     {g(self.overhead_bytes)}",
            f"  KV cache              {self.kv_bytes_per_token / 1024:6.0f} KB/token x "
            f"{self.kv_buffers} buffers ({g(self.kv_bytes())} at {self.context} tokens"
            + (f", {self.kv_dtype}" if self.kv_dtype else "")
            + (f" + {self.kv_scale_bytes / 1024:.0f} KB of scales" if self.kv_scale_bytes else "")
            + ")",
            (f"  prefill logits        {g(self.prefill_logits_bytes())} (the last position only: "
             "the decoder's logits_to_keep input)" if self.logits_last_only else
             f"  prefill logits        {self.logits_bytes_per_token / 1024:6.0f} KB/prompt token "
             f"({g(self.prefill_logits_bytes())} for a {self.context}-token prompt)"),
            f"  bytes read per token  {g(self.bytes_read_per_token)}",
            f"  peak                  {g(self.peak_bytes(False))} both engines resident, "
            f"{g(self.peak_bytes(True))} one engine at a time"
            + (f" (onnxruntime CPU: {g(self.peak_bytes(False, on_cpu=True))} and "
               f"{g(self.peak_bytes(True, on_cpu=True))})" if self.target == "cpu" else ""),
            f"  largest context: {self.max_context_resident} tokens with both engines resident, "
            f"{self.max_context_sequential} with the vision engine released before decoding",
            "  low-memory mode: " + (f"~{self.vision_load_s:.1f} s per request to reload the "
                                     f"vision engine ({self.vision_load_note})"
                                     if self.vision_load_s is not None else
                                     "vision reload cost not measured (python -m bench.memory)"),
        ]
        if self.decoder_load_s is not None:
            out.append(f"                   + ~{self.decoder_load_s:.1f} s to reload the decoder "
                       f"after it ({self.decoder_load_note})")
        verdict = {"resident": "FITS", "sequential": "FITS only if the vision engine is released "
                   "before decoding (the runtime's low-memory mode)",
                   "does not fit": "DOES NOT FIT"}[self.mode]
        out.append(f"  verdict: {verdict} at {self.context} tokens")
        return out


@dataclass(frozen=True)
class _Storage:
    """Bytes per element of each engine part, as the exporters store them."""

    vision: int  # bits of the vision weights
    linear: int  # bits of the decoder Linears
    group_size: int | None
    head: int  # bits of the LM head
    embed: str  # embedding table dtype (quant/embedding.py stores it)
    act: float  # bytes of one activation-dtype element (scales, norms, biases, rope)
    kv: float  # bytes of one KV element
    kv_buffers: int  # KV buffer sets the runtime holds for the target's layout
    kv_dtype: str  # the KV element dtype counted
    int8_gemm: bool  # MatMulNBits at accuracy level 4 (prepacked for int8 activations on CPU)


def _storage(spec: PrecisionPlan, target: str, group_size: int | None, lm_head: str | None,
             kv_bits: int | None) -> _Storage:
    t = spec.target(target if target in spec.targets else "gpu")
    kv_dtype = next((n for n, b in DTYPE_BITS.items() if b == kv_bits), "") if kv_bits \
        else t.kv_dtype
    return _Storage(vision=DTYPE_BITS[spec.vision_dtype(target)], linear=spec.linear_bits,
                    group_size=(group_size or spec.group_size) if spec.quantized else None,
                    head=DTYPE_BITS[lm_head or spec.lm_head], embed=spec.embed,
                    act=DTYPE_BITS[t.act_dtype] / 8, kv=(kv_bits or DTYPE_BITS[t.kv_dtype]) / 8,
                    kv_buffers=KV_BUFFERS[t.kv_layout], kv_dtype=kv_dtype,
                    int8_gemm=t.accuracy_level == 4)


def kv_scale_bytes(cfg: QwenVLConfig, kv_dtype: str) -> float:
    """An int8 KV cache's static scales in the decoder graph: one fp32 per layer, channel, key
    and value (quant/kv_scales.py, per-channel); none for a float cache."""
    return 2 * cfg.num_hidden_layers * cfg.hidden_size * 4.0 if kv_dtype == "int8" else 0.0


def _nbits_bytes(rows: int, k: int, bits: int, block: int, scale_bytes: float) -> float:
    """MatMulNBits initializers of a [rows, k] weight: codes padded to whole blocks + one scale
    per block (symmetric: no zero points)."""
    blocks = -(-k // block)
    return rows * blocks * (block * bits / 8 + scale_bytes)


def _vision_bytes(cfg: QwenVLConfig, bits: int) -> float:
    """The vision engine's initializers (exporters/vision.py): 2-D+ weights at ``bits`` (+ fp32
    per-channel scale and an int8 zero point when int8), LayerNorms fp32, biases in the weight
    dtype (fp32 under int8), the two position tables re-sampled to the patch grid in fp32, the
    resampler's query path precomputed (queries x output_dim), its query projection dropped."""
    v = cfg.visual
    grid = (v.image_size // v.patch_size) ** 2
    wbytes, small = bits / 8, (2 if bits == 16 else 4)
    total = 0.0
    for name, shape in expected_shapes(cfg).items():
        if not name.startswith("transformer.visual."):
            continue
        n = math.prod(shape)
        if name.endswith("positional_embedding"):
            total += grid * shape[-1] * 4
        elif name.endswith("attn_pool.pos_embed"):
            total += grid * shape[-1] * 4 + v.n_queries * shape[-1] * small  # keys; query path
        elif name.endswith(("attn_pool.query", "ln_q.weight", "ln_q.bias")):
            continue  # folded into the precomputed query path above
        elif name.endswith("attn_pool.attn.in_proj_weight"):
            total += n * 2 / 3 * wbytes + (shape[0] * 2 / 3 * 5 if bits == 8 else 0)
        elif name.endswith("attn_pool.attn.in_proj_bias"):
            total += n * 2 / 3 * small
        elif len(shape) > 1:
            total += n * wbytes + (shape[0] * 5 if bits == 8 else 0)
        else:
            total += n * (4 if ".ln" in name or "ln_" in name else small)
    return total


def _int4_head_group(k: int) -> int:
    """The int4 LM head's MatMulNBits block (quant/lm_head.py)."""
    from quant.lm_head import INT4_GROUP  # noqa: PLC0415 - torch; only for int4 heads

    return INT4_GROUP if k % INT4_GROUP == 0 else k


def _nbits_weights(cfg: QwenVLConfig, s: _Storage) -> Iterator[tuple[str, int, int, int, int]]:
    """``(part, rows, K, bits, block)`` of each MatMulNBits weight the decoder exporter writes:
    the Linears when quantised, the LM head when 8- or 4-bit (int8: one block per row,
    quant.packing.quantize_int8_per_channel; int4: groups)."""
    shapes = expected_shapes(cfg)
    if s.group_size:
        for name, shape in shapes.items():
            if name.endswith(QUANT_SUFFIXES) and not name.startswith("transformer.visual."):
                yield "linear", shape[0], shape[1], s.linear, s.group_size
    if s.head < 16:
        rows, k = shapes["lm_head.weight"]
        block = (1 << max(4, math.ceil(math.log2(k)))) if s.head == 8 else _int4_head_group(k)
        yield "lm_head", rows, k, s.head, block


def _decoder_parts(cfg: QwenVLConfig, s: _Storage) -> dict[str, float]:
    """Decoder initializers by part (exporters/decoder.py's layout)."""
    parts = dict.fromkeys(("linear", "lm_head", "embed", "other"), 0.0)
    for part, rows, k, bits, block in _nbits_weights(cfg, s):
        parts[part] += _nbits_bytes(rows, k, bits, block, s.act)
    for name, shape in expected_shapes(cfg).items():
        n = math.prod(shape)
        if name.startswith("transformer.visual."):
            continue
        if name.endswith(QUANT_SUFFIXES):
            parts["linear"] += 0.0 if s.group_size else n * s.linear / 8  # else MatMulNBits
        elif name == "lm_head.weight":
            parts["lm_head"] += 0.0 if s.head < 16 else n * s.head / 8
        elif name == "transformer.wte.weight":  # codes + fp16 scales (quant/embedding.py)
            parts["embed"] += table_bytes(shape[0], shape[1], s.embed)
        else:  # norms and biases, in the activation dtype
            parts["other"] += n * s.act
    exact = not (cfg.use_dynamic_ntk or cfg.use_logn_attn)  # exporters/decoder.py's rule
    positions = cfg.max_position_embeddings if exact else cfg.seq_length
    parts["other"] += 2 * positions * cfg.head_dim // 2 * s.act  # rotary cos/sin tables
    parts["other"] += kv_scale_bytes(cfg, s.kv_dtype)
    return parts


def _cpu_cast_bytes(cfg: QwenVLConfig, s: _Storage, parts: dict[str, float],
                    vision: float) -> tuple[float, float]:
    """fp16 weights onnxruntime's CPU executor re-materialises as fp32 (measured:
    bench/RESULTS.md, "Memory planner vs measured"): the vision engine's fp16 matrices while it
    runs (kept beside the fp16 ones); with fp16 activations, every fp16 decoder weight when the
    graph is optimised at load, the embedding table included (the fp16 originals are freed, so
    the extra is their own size; measured at 4 layers: resident = 2x the decoder's file)."""
    vis = 2 * vision if s.vision == 16 else 0.0
    dec = 0.0
    if s.act == 2:
        dec += parts["linear"] if s.linear == 16 else 0.0
        dec += parts["lm_head"] if s.head == 16 else 0.0
        dec += parts["embed"] if s.embed == "fp16" else 0.0
    return vis, dec


def _cpu_load_transient(s: _Storage, parts: dict[str, float]) -> float:
    """Memory held only while the decoder loads on CPU: a MatMulNBits head twice while it is
    prepacked; with fp16 activations, the largest fp16 weight's fp32 copy made twice while
    the graph is optimised (measured at 4 layers: +2.49 GB = the fp32 head)."""
    if s.head < 16:
        return parts["lm_head"]
    if s.act == 2:
        return 2 * max(parts["lm_head"], parts["embed"] if s.embed == "fp16" else 0.0)
    return 0.0


def _cpu_prepack_bytes(cfg: QwenVLConfig, s: _Storage) -> float:
    """What MatMulNBits' CPU prepack adds at accuracy level 4 to the decoder Linears and a 4- or
    8-bit LM head (:data:`PREPACK_BYTES_PER_4BIT_BLOCK`, :data:`PREPACK_BYTES_PER_8BIT_K64`)."""
    if not s.int8_gemm:
        return 0.0
    return sum(rows * -(-k // block) * PREPACK_BYTES_PER_4BIT_BLOCK if bits == 4 else
               rows * -(-k // 64) * PREPACK_BYTES_PER_8BIT_K64 if bits == 8 else 0.0
               for _, rows, k, bits, block in _nbits_weights(cfg, s))


def _vision_act_bytes(cfg: QwenVLConfig) -> float:
    """The vision encode's largest live activations on CPU, one image: the attention scores and
    probabilities of one layer (fp32, heads x patches^2) and its MLP's input and output of the
    hidden width (measured at full size: 0.30 GB above the loaded int8 engine)."""
    v = cfg.visual
    return 2 * v.heads * v.n_patches ** 2 * 4 + 2 * v.n_patches * v.mlp_width * 4


def _logits_bytes_per_token(cfg: QwenVLConfig, s: _Storage) -> float:
    """Logits of one position: the decoder writes each kept position's logits into a host fp32
    buffer (runtime/engines.DecoderEngine.forward) from the head's own output buffer (the
    graph's last node is a Cast from the activation dtype, or an Identity)."""
    return cfg.vocab_size * (4 + s.act)


def head_dtype(plan: str, requested: str | None) -> str:
    """The LM head a plan is exported with: ``--lm-head`` for the quantised plans (int8 | int4 |
    fp16, exporters/pipeline.py passes it on), else the plan row's."""
    spec = PLANS[plan]
    return requested if requested and spec.quantized else spec.lm_head


def plan_bits(plan: PrecisionPlan, target: str = "gpu") -> dict[str, int]:
    """Bits per weight of each engine part (and of the KV cache) of ``plan`` on ``target``."""
    return {"vision": DTYPE_BITS[plan.vision_dtype(target)], "linear": plan.linear_bits,
            "lm_head": DTYPE_BITS[plan.lm_head], "embed": DTYPE_BITS[plan.embed],
            "small": DTYPE_BITS[plan.small], "kv": DTYPE_BITS[plan.target(target).kv_dtype]}


def _max_context(free: float, kv_per_token: float, cap: int) -> int:
    return max(0, min(cap, int(free // kv_per_token))) if free > 0 else 0


def vision_load_estimate(vision_bytes: float) -> tuple[float | None, str]:
    """Estimated seconds to reload the vision engine (low-memory mode), from the measured
    seconds per GB in :data:`VISION_LOAD_S_PER_GB`; ``(None, "")`` when not measured."""
    return _load_estimate(vision_bytes, VISION_LOAD_S_PER_GB, VISION_LOAD_SOURCE)


def _load_estimate(nbytes: float, s_per_gb: float | None, source: str
                   ) -> tuple[float | None, str]:
    if s_per_gb is None:
        return None, ""
    return nbytes / GB * s_per_gb, f"estimate: {nbytes / GB:.2f} GB x {s_per_gb:.2f} s/GB, {source}"


def plan_memory(cfg: QwenVLConfig, plan: str = "int4", device: str = "desktop",
                context: int | None = None, kv_bits: int | None = None,
                target: str = "gpu", group_size: int | None = None,
                lm_head: str | None = None, logits_to_keep: bool = True) -> MemoryPlan:
    """Bytes of each engine for ``plan`` on ``device`` and the largest context that fits.

    ``target``: the executor whose activation / KV dtypes count (e.g. fp32 scales and KV for the
    CPU-tuned int4 decoder); ``kv_bits`` overrides the KV width; ``group_size`` the plan row's
    int4 block size (``export.py --group-size``); ``lm_head`` its head dtype (``--lm-head``);
    ``logits_to_keep``: the decoder has that input (every engine this exporter writes), so the
    prefill holds one position's logits; False for an engine exported before (every
    position's: ~0.9 MB per prompt token at full size)."""
    if plan not in PLANS:
        raise ValueError(f"unknown plan '{plan}': choose one of {', '.join(PLANS)}")
    if device not in PROFILES:
        raise ValueError(f"unknown device profile '{device}': choose one of {', '.join(PROFILES)}")
    if context is not None and not 0 < context <= cfg.seq_length:
        raise ValueError(f"--context {context}: the model addresses 1..{cfg.seq_length} tokens "
                         "(config.json seq_length; longer contexts need dynamic NTK / logN "
                         "scaling, not implemented): choose a context within it")
    spec = PLANS[plan]
    s = _storage(spec, target, group_size, lm_head, kv_bits)
    prof = PROFILES[device]
    context = context or cfg.seq_length
    vision = _vision_bytes(cfg, s.vision)
    p = _decoder_parts(cfg, s)
    kv = 2 * cfg.num_hidden_layers * cfg.hidden_size * s.kv
    logits = _logits_bytes_per_token(cfg, s)
    # a prompt that fills the context, prefilled at once: one row of logits, or one per token
    per_token = s.kv_buffers * kv + (0.0 if logits_to_keep else logits)
    decoder = sum(p.values())
    decoder_fixed = decoder + (logits if logits_to_keep else 0.0)
    usable = prof.usable_bytes - RUNTIME_OVERHEAD
    max_res = _max_context(usable - vision - decoder_fixed, per_token, cfg.seq_length)
    # Sequential mode also needs the vision engine to fit on its own while encoding.
    max_seq = (_max_context(usable - decoder_fixed, per_token, cfg.seq_length)
               if usable >= vision else 0)
    mode = ("resident" if max_res >= context else
            "sequential" if max_seq >= context else "does not fit")
    load_s, load_note = vision_load_estimate(vision)
    dec_s, dec_note = _load_estimate(decoder, DECODER_LOAD_S_PER_GB, DECODER_LOAD_SOURCE)
    cast_vision, cast_decoder = _cpu_cast_bytes(cfg, s, p, vision)
    return MemoryPlan(plan=plan, device=device, usable_bytes=prof.usable_bytes, vision_bytes=vision,
                      decoder_linear_bytes=p["linear"], lm_head_bytes=p["lm_head"],
                      embed_bytes=p["embed"], other_bytes=p["other"], kv_bytes_per_token=kv,
                      bytes_read_per_token=p["linear"] + p["lm_head"] + p["other"],
                      overhead_bytes=RUNTIME_OVERHEAD, context=context,
                      max_context_resident=max_res, max_context_sequential=max_seq,
                      fits=mode != "does not fit", mode=mode,
                      target=target if target in spec.targets else "gpu",
                      group_size=s.group_size, lm_head=lm_head or spec.lm_head,
                      kv_buffers=s.kv_buffers,
                      logits_bytes_per_token=logits, logits_last_only=logits_to_keep,
                      cpu_cast_vision_bytes=cast_vision,
                      cpu_cast_decoder_bytes=cast_decoder,
                      embed_row_bytes=table_bytes(1, cfg.hidden_size, s.embed),
                      cpu_embed_mapped=not (s.act == 2 and s.embed == "fp16"),
                      cpu_load_transient_bytes=_cpu_load_transient(s, p),
                      cpu_prepack_bytes=_cpu_prepack_bytes(cfg, s),
                      embed_read_bytes_per_token=READAHEAD_BYTES * (1 if s.embed in ("fp16", "fp32")
                                                                    else 2),
                      cpu_vision_act_bytes=_vision_act_bytes(cfg),
                      vision_load_s=load_s, vision_load_note=load_note,
                      decoder_load_s=dec_s, decoder_load_note=dec_note, kv_dtype=s.kv_dtype,
                      kv_scale_bytes=kv_scale_bytes(cfg, s.kv_dtype))
