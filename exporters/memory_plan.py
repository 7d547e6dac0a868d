"""Memory planner: will a precision plan fit a device *before* anything is built?

The number-one class of Jetson complaints is discovering an out-of-memory at build time or at the
first request. The arithmetic is simple and exact enough to decide early: weight bytes per engine
from the config's tensor shapes and the plan's bit widths, KV bytes per token, and a fixed
allowance for the runtime (CUDA context, ORT arenas, activations). Figures for the full-size
Qwen-VL-Chat are in docs/DESIGN.md §5 (ViT fp16 3.9 GB, int8 1.9 GB; int4 decoder 3.4 GB; int8 head
0.6 GB; KV 524 KB/token).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from models.checkpoint import expected_shapes
from models.config import QwenVLConfig
from quant.embedding import table_bytes
from quant.plans import DTYPE_BITS, PLANS, PrecisionPlan

GB = 1e9


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


@dataclass
class MemoryPlan:
    plan: str
    device: str
    usable_bytes: float
    vision_bytes: float
    decoder_linear_bytes: float
    lm_head_bytes: float
    embed_bytes: float
    other_bytes: float  # norms, biases
    kv_bytes_per_token: float
    bytes_read_per_token: float  # decode: every decoder weight once (embedding rows excluded)
    overhead_bytes: float
    context: int  # the context the plan was asked for
    max_context_resident: int  # both engines loaded at once
    max_context_sequential: int  # vision engine released before decoding
    fits: bool
    mode: str  # "resident", "sequential" or "does not fit"

    def as_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        def g(b: float) -> str:
            return f"{b / GB:6.2f} GB" if b >= 0.05 * GB else f"{b / 1e6:6.2f} MB"

        out = [
            f"memory plan '{self.plan}' for {self.device} ({self.usable_bytes / GB:.1f} GB usable):",
            f"  vision engine         {g(self.vision_bytes)}",
            f"  decoder linears       {g(self.decoder_linear_bytes)}",
            f"  lm_head               {g(self.lm_head_bytes)}",
            f"  embedding table       {g(self.embed_bytes)}",
            f"  norms and biases      {g(self.other_bytes)}",
            f"  runtime allowance     {g(self.overhead_bytes)}",
            f"  KV cache              {self.kv_bytes_per_token / 1024:6.0f} KB/token "
            f"({g(self.kv_bytes_per_token * self.context)} at {self.context} tokens)",
            f"  bytes read per token  {g(self.bytes_read_per_token)}",
            f"  largest context: {self.max_context_resident} tokens with both engines resident, "
            f"{self.max_context_sequential} with the vision engine released before decoding",
        ]
        verdict = {"resident": "FITS", "sequential": "FITS only if the vision engine is released "
                   "before decoding", "does not fit": "DOES NOT FIT"}[self.mode]
        out.append(f"  verdict: {verdict} at {self.context} tokens")
        return out


def plan_bits(plan: PrecisionPlan, target: str = "gpu") -> dict[str, int]:
    """Bits per weight of each engine part (and of the KV cache) of ``plan`` on ``target``."""
    return {"vision": DTYPE_BITS[plan.vision], "linear": plan.linear_bits,
            "lm_head": DTYPE_BITS[plan.lm_head], "embed": DTYPE_BITS[plan.embed],
            "small": DTYPE_BITS[plan.small], "kv": DTYPE_BITS[plan.target(target).kv_dtype]}


def plan_memory(cfg: QwenVLConfig, plan: str = "int4", device: str = "desktop",
                context: int | None = None, kv_bits: int | None = None,
                target: str = "gpu") -> MemoryPlan:
    """Bytes of each engine for ``plan`` on ``device`` and the largest context that fits
    (``target``: the executor whose KV dtype counts, e.g. fp32 for the CPU-tuned int4 decoder;
    ``kv_bits`` overrides it)."""
    if plan not in PLANS:
        raise ValueError(f"unknown plan '{plan}': choose one of {', '.join(PLANS)}")
    if device not in PROFILES:
        raise ValueError(f"unknown device profile '{device}': choose one of {', '.join(PROFILES)}")
    if context is not None and not 0 < context <= cfg.seq_length:
        raise ValueError(f"--context {context}: the model addresses 1..{cfg.seq_length} tokens "
                         "(config.json seq_length; longer contexts need dynamic NTK / logN "
                         "scaling, not implemented): choose a context within it")
    spec = PLANS[plan]
    bits = plan_bits(spec, target if target in spec.targets else "gpu")
    prof = PROFILES[device]
    context = context or cfg.seq_length
    vision = linear = head = embed = other = 0.0
    for name, shape in expected_shapes(cfg).items():
        n = math.prod(shape)
        if name.startswith("transformer.visual."):
            # int8 vision keeps fp16 norms/biases/position tables: only 2-D+ weights shrink
            b = bits["vision"] if len(shape) > 1 and "pos" not in name else max(16, bits["vision"])
            vision += n * b / 8
        elif name.endswith(QUANT_SUFFIXES):
            if spec.group_size:  # int4 codes + one fp16 scale per group
                linear += n * bits["linear"] / 8 + n / spec.group_size * 2
            else:
                linear += n * bits["linear"] / 8
        elif name == "lm_head.weight":
            head += n * bits["lm_head"] / 8 + (shape[0] * 4 if bits["lm_head"] == 8 else 0)
        elif name == "transformer.wte.weight":  # codes + fp16 scales (quant/embedding.py)
            embed += table_bytes(shape[0], shape[1], spec.embed)
        else:
            other += n * bits["small"] / 8
    kv = 2 * cfg.num_hidden_layers * cfg.hidden_size * (kv_bits or bits["kv"]) / 8
    decoder = linear + head + embed + other
    read_per_token = linear + head + other
    free_resident = prof.usable_bytes - RUNTIME_OVERHEAD - vision - decoder
    free_sequential = prof.usable_bytes - RUNTIME_OVERHEAD - decoder
    cap = cfg.seq_length
    max_res = max(0, min(cap, int(free_resident // kv))) if free_resident > 0 else 0
    max_seq = max(0, min(cap, int(free_sequential // kv))) if free_sequential > 0 else 0
    # Sequential mode also needs the vision engine to fit on its own while encoding.
    if prof.usable_bytes - RUNTIME_OVERHEAD < vision:
        max_seq = 0
    mode = ("resident" if max_res >= context else
            "sequential" if max_seq >= context else "does not fit")
    return MemoryPlan(plan=plan, device=device, usable_bytes=prof.usable_bytes, vision_bytes=vision,
                      decoder_linear_bytes=linear, lm_head_bytes=head, embed_bytes=embed,
                      other_bytes=other, kv_bytes_per_token=kv, bytes_read_per_token=read_per_token,
                      overhead_bytes=RUNTIME_OVERHEAD, context=context,
                      max_context_resident=max_res, max_context_sequential=max_seq,
                      fits=mode != "does not fit", mode=mode)
