"""The precision-plan table: what every plan stores in which dtype, in this file only.

The exporters (vision / decoder precision, ``export.py --plan``), the memory planner, the LM-head
quantiser and the drift thresholds all read these rows, so adding a plan is one ``PrecisionPlan``
row here plus its row in ``validate/thresholds.py`` (which refuses to import without it).
Torch-free on purpose: ``validate`` and ``exporters.memory_plan`` import it without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

#: GPTQ / MatMulNBits block size of the int4 plans (GPTQ ``QuantConfig``, ``export.py
#: --group-size``, round-to-nearest stand-ins and the memory planner default to it).
DEFAULT_GROUP_SIZE = 128

#: Bits per element of each storage dtype named in the table.
DTYPE_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}


def kv_layout(attention: str) -> str:
    """KV layout of a decoder built with ``attention``: GroupQueryAttention reads and writes one
    shared past/present buffer, the others write present into a second buffer."""
    return "shared" if attention == "gqa" else "concat"


@dataclass(frozen=True)
class TargetSettings:
    """How the decoder is built for one kind of executor (``export.py --target``)."""

    act_dtype: str  # decoder activations
    kv_dtype: str  # KV cache: the activation dtype, or int8 (GroupQueryAttention only)
    accuracy_level: int = 0  # MatMulNBits compute precision (0 = exact, 4 = int8 activations)
    # mha: MultiHeadAttention, present = concat(past, new) in a second buffer every step;
    # gqa: GroupQueryAttention on one shared past/present buffer (KV dtype = activation dtype,
    # or int8 codes with static per-channel scales calibrated on the calib split:
    # quant/kv_scales.py)
    attention: str = "mha"
    # gqa only: the attention mask enters as an additive bias (padding and dropped tokens
    # masked). onnxruntime's CUDA GroupQueryAttention rejects a bias ("attention_bias is not
    # supported in GroupQueryAttention cuda kernel"), so a CUDA target builds without it and its
    # engine takes unpadded rows only (runtime/contract.py, ``padding``)
    attention_bias: bool = True
    # the vision engine's dtype on this target when it is not the plan row's (None: the row's)
    vision: str | None = None

    def __post_init__(self) -> None:
        if self.kv_dtype == "int8" and self.attention != "gqa":
            raise ValueError(f"an int8 KV cache needs attention 'gqa' (onnxruntime's "
                             f"GroupQueryAttention quantises its cache; '{self.attention}' takes "
                             "float caches only): set attention='gqa' or a float kv_dtype")
        if self.kv_dtype not in ("fp32", "fp16", "int8"):
            raise ValueError(f"kv_dtype must be fp32, fp16 or int8, not '{self.kv_dtype}'")

    @property
    def int8_kv(self) -> bool:
        """The KV cache holds int8 codes (what the same-precision reference mirrors)."""
        return self.kv_dtype == "int8"

    @property
    def kv_layout(self) -> str:
        """The decoder's KV layout (runtime/contract.py): ``shared`` for GroupQueryAttention."""
        return kv_layout(self.attention)

    @property
    def int8_activations(self) -> bool:
        """MatMulNBits quantises its inputs to int8 (what the same-precision reference mirrors)."""
        return self.accuracy_level == 4

    def decoder_kwargs(self) -> dict[str, object]:
        """The ``exporters.decoder.export_decoder`` arguments of this target."""
        return {"act_dtype": self.act_dtype, "accuracy_level": self.accuracy_level,
                "kv_dtype": self.kv_dtype, "attention": self.attention,
                "attention_bias": self.attention_bias}


@dataclass(frozen=True)
class PrecisionPlan:
    """One precision plan: the dtype of every engine part and how each target runs it."""

    name: str
    vision: str  # vision engine weights/matmuls (fp32 | fp16 | int8)
    linear_bits: int  # the five decoder Linears per layer (32 | 16 | 4)
    lm_head: str  # fp32 | fp16 | int8 (per output channel)
    embed: str  # embedding table (fp32 | fp16 | int8 rows + fp16 row scales: quant/embedding.py)
    small: str  # norms and biases
    targets: dict[str, TargetSettings]  # "gpu" (the default) and "cpu"
    group_size: int | None = None  # int4 Linears only
    exportable: bool = True  # False: planned and judged, but no exporter builds it yet
    note: str = field(default="", compare=False)

    def vision_dtype(self, target: str = "gpu") -> str:
        """The vision engine's dtype on ``target``: its override, else the row's."""
        t = self.targets.get(target, self.targets["gpu"])
        return t.vision or self.vision

    def target(self, name: str = "gpu") -> TargetSettings:
        try:
            return self.targets[name]
        except KeyError:
            raise ValueError(f"plan '{self.name}' has no target '{name}': use one of "
                             f"{', '.join(self.targets)}") from None

    @property
    def act_dtype(self) -> str:
        """Decoder activations of the default (gpu) target."""
        return self.target("gpu").act_dtype

    @property
    def kv_dtype(self) -> str:
        return self.target("gpu").kv_dtype

    @property
    def act_dtypes(self) -> tuple[str, ...]:
        """Every decoder activation dtype some target of this plan uses."""
        return tuple(dict.fromkeys(t.act_dtype for t in self.targets.values()))

    @property
    def quantized(self) -> bool:
        """Decoder Linears from GPTQ codes (MatMulNBits)."""
        return self.linear_bits < 16


def _same(act: str, kv: str) -> dict[str, TargetSettings]:
    t = TargetSettings(act, kv)
    return {"gpu": t, "cpu": t}


# ORT CPU has fast int4/int8 MatMulNBits kernels only with int8 activations (accuracy_level 4) and
# fp32 activations; measured on the full-size decoder (bench/RESULTS.md): fp32 activations +
# accuracy level 4 make decode 3.6x faster than the exact fp16 settings, whose int8 LM head alone
# is ~50x slower on CPU; an fp32 KV cache removes the per-step Cast of the whole past (11 % of a
# step) and is 24 % faster again at 8 full-size layers. GroupQueryAttention on one shared KV
# buffer: its node 1.7-1.8x faster than MultiHeadAttention's at 8 full-size layers (issue 20,
# bench/RESULTS.md), half the KV memory, same tokens. Its vision engine is fp32: onnxruntime's CPU
# executor runs an fp16 one through fp32 copies of its weights (3x the fp16 bytes while it runs:
# 11.7 GB peak at full size) and 2.1x slower than the fp32 engine (75.8 s vs 35.8 s per image at
# full size; bench/RESULTS.md, "Vision engine" and "Memory planner vs measured").
_INT4_TARGETS = {"gpu": TargetSettings("fp16", "fp16"),
                 "cpu": TargetSettings("fp32", "fp32", accuracy_level=4, attention="gqa",
                                       vision="fp32")}

# edge: int8 vision (quant/vision_int8.py), int8 embedding rows with an fp16 scale per row
# (quant/embedding.py), the int4 decoder's cpu target with an int8 KV cache, and on the gpu
# (Jetson) GroupQueryAttention on one shared fp16 KV buffer (half the KV memory of
# MultiHeadAttention's two; the CUDA kernel registers fp16 activations with fp16 or int8 caches)
# built without the attention bias the CUDA kernel rejects: that engine takes unpadded rows only,
# which single requests (Pipeline.chat, the server) are; a left-padded chat_batch is refused.
# Checked on onnxruntime's CPU kernel only: the CUDA kernel has not been run here (no GPU).
# cpu: GroupQueryAttention's quantised cache (``kv_cache_bit_width`` 8, PER_CHANNEL static fp32
# scales, amax / 127 over the calibration split; quant/kv_scales.py mirrors the kernel), a
# quarter of the fp32 cache's bytes; measured on the shipped nano (bench/RESULTS.md, "KV cache").
# The gpu target stores the same int8 cache with fp16 activations (the (fp16, int8) kernel the
# CUDA provider registers; here run and judged on the CPU kernel only).
_EDGE_TARGETS = {"gpu": TargetSettings("fp16", "int8", attention="gqa", attention_bias=False),
                 "cpu": replace(_INT4_TARGETS["cpu"], kv_dtype="int8", vision=None)}

PLANS: dict[str, PrecisionPlan] = {p.name: p for p in (
    PrecisionPlan("fp32", vision="fp32", linear_bits=32, lm_head="fp32", embed="fp32",
                  small="fp32", targets=_same("fp32", "fp32"),
                  note="the reference, operation for operation"),
    PrecisionPlan("fp16", vision="fp16", linear_bits=16, lm_head="fp16", embed="fp16",
                  small="fp16", targets=_same("fp16", "fp16"),
                  note="fp16 with fp32 norm statistics and softmax"),
    PrecisionPlan("int4", vision="fp16", linear_bits=4, lm_head="int8", embed="fp16",
                  small="fp16", targets=_INT4_TARGETS, group_size=DEFAULT_GROUP_SIZE,
                  note="GPTQ int4 decoder, int8 LM head, fp16 vision"),
    # edge's head and table are int4 so that the Orin Nano 8 GB holds a 2048-token context
    # (exporters/memory_plan.py: 5.18 of 5.2 GB with the int8 KV): the head GPTQ'd in groups of
    # 32 (round-to-nearest int4 fails the ppl gate, 0.937), the rows in blocks of 32; on the
    # nano both together PASS every edge gate (bench/RESULTS.md, "GPTQ int4 LM head").
    PrecisionPlan("edge", vision="int8", linear_bits=4, lm_head="int4", embed="int4",
                  small="fp16", targets=_EDGE_TARGETS, group_size=DEFAULT_GROUP_SIZE,
                  note="int8 vision, GPTQ int4 decoder, GPTQ int4 LM head, int4 embedding rows"),
)}


def get_plan(name: str) -> PrecisionPlan:
    try:
        return PLANS[name]
    except KeyError:
        raise ValueError(f"unknown precision plan '{name}': use one of "
                         f"{', '.join(PLANS)}") from None


def exportable_plans() -> tuple[str, ...]:
    """Plan names ``export.py --plan`` offers."""
    return tuple(n for n, p in PLANS.items() if p.exportable)


#: Vision precisions produced by quantising a traced graph, and the precision traced for them.
QUANTIZED_VISION = {"int8": "fp32"}  # static QDQ int8 (quant/vision_int8.py) reads the fp32 graph


def traced_vision(precision: str) -> str:
    """The precision the vision graph is traced in for an engine of ``precision``."""
    return QUANTIZED_VISION.get(precision, precision)


def vision_precisions() -> tuple[str, ...]:
    """Vision graphs the exporter traces (those the exportable plans need, int8 via fp32)."""
    return tuple(dict.fromkeys(traced_vision(PLANS[n].vision_dtype(t)) for n in exportable_plans()
                               for t in PLANS[n].targets))


__all__ = ["DEFAULT_GROUP_SIZE", "DTYPE_BITS", "PLANS", "PrecisionPlan", "QUANTIZED_VISION",
           "TargetSettings", "exportable_plans", "get_plan", "kv_layout", "traced_vision",
           "vision_precisions"]
