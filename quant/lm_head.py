"""The LM head of the int4 plans: symmetric int8 per output channel (or int4 / fp16 on request).

The head is 151936 x 4096 (1.2 GB in fp16); int8 halves the bytes every decode step reads
(docs/DESIGN.md §5, §7), int4 in groups of :data:`INT4_GROUP` quarters them (size vs KL:
bench/RESULTS.md "LM head int8 vs int4"). Quantisation is per output row, so it is done in row
chunks (an fp32 copy of the whole head would be 2.5 GB); the result is identical to quantising the
whole matrix at once. ``dequantized`` is what the engine effectively multiplies by, for the
fake-quant reference (equal to ``quant.fake_quant.lm_head_weight``).

The int4 head comes by round-to-nearest (``head_weights``) or by GPTQ (``gptq_head``): the head is
a Linear whose input is the final normed hidden state, so its Hessian is collected from the same
image-conditioned calibration prompts as the decoder's Linears, after the quantised decoder
(``head_hessian``). GPTQ's result is a GPTQ v1 Linear (``GPTQTensors``, no bias) that the exporter
turns into MatMulNBits like the decoder's and the fake-quant reference dequantises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from .packing import (GPTQTensors, MatMulNBitsWeights, dequantize_matmul_nbits, pack_gptq,
                      pack_matmul_nbits, quantize_int8_per_channel, rtn_quantize)
from .plans import PLANS

HEAD_MODES = ("int8", "int4", "fp16", "fp32")
#: Name of a quantised (GPTQ) int4 head among the GPTQ tensors (``quant_tensors``) and in a GPTQ
#: checkpoint (``lm_head.qweight`` ..., as GPTQModel stores a quantised head).
HEAD_KEY = "lm_head"
#: int4 head block (MatMulNBits block_size): per-row scales at 4 bits lose too much.
INT4_GROUP = 32
# precision plan -> LM-head mode (the plan table, quant/plans.py)
PLAN_HEAD = {name: plan.lm_head for name, plan in PLANS.items()}


@dataclass
class LMHead:
    mode: str  # int8 | int4 | fp16 | fp32
    weights: MatMulNBitsWeights | None  # MatMulNBits initializers (None unless int8 / int4)
    dequantized: torch.Tensor  # float32 [vocab, hidden]: the weight the engine effectively uses


def head_mode_for_plan(plan: str, fp16_head: bool = False) -> str:
    """``int4`` / ``edge`` use the int8 head unless ``fp16_head``; ``fp16`` keeps an fp16 head."""
    try:
        mode = PLAN_HEAD[plan]
    except KeyError:
        raise ValueError(f"unknown precision plan '{plan}': use one of {', '.join(PLAN_HEAD)}") from None
    return "fp16" if fp16_head and mode == "int8" else mode


def _quantize_rows(w: np.ndarray, mode: str, group: int = INT4_GROUP) -> MatMulNBitsWeights:
    if mode == "int8":
        return quantize_int8_per_channel(w)
    group = group if w.shape[1] % group == 0 else w.shape[1]
    codes, scales, zeros = rtn_quantize(w, group, sym=True, bits=4)
    return pack_matmul_nbits(codes, scales, zeros, group, bits=4)


def _concat(parts: list[MatMulNBitsWeights]) -> MatMulNBitsWeights:
    first = parts[0]
    if len(parts) == 1:
        return first
    return MatMulNBitsWeights(
        B=np.concatenate([p.B for p in parts]), scales=np.concatenate([p.scales for p in parts]),
        zero_points=None, perm=None, K=first.K, N=sum(p.N for p in parts),
        block_size=first.block_size, bits=first.bits)


def head_weights(weight: torch.Tensor | np.ndarray, mode: str = "int8",
                 chunk_rows: int = 8192, group: int = INT4_GROUP) -> MatMulNBitsWeights:
    """MatMulNBits initializers of the ``int8`` / ``int4`` (round-to-nearest, ``group`` values
    per scale) head, quantised in row chunks."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"lm_head mode '{mode}' is not quantised: use int8 or int4")
    w = torch.as_tensor(weight).detach()
    if w.dim() != 2:
        raise ValueError(f"the LM head must be 2-D [vocab, hidden], got {tuple(w.shape)}")
    parts = [_quantize_rows(w[i:i + chunk_rows].float().numpy(), mode, group)
             for i in range(0, w.shape[0], chunk_rows)]
    if any(p.zero_points is not None for p in parts):  # symmetric: the default zero point
        raise AssertionError("LM head quantisation produced zero points")
    return _concat(parts)


@torch.no_grad()
def quantize_lm_head(weight: torch.Tensor | np.ndarray, mode: str = "int8",
                     chunk_rows: int = 8192) -> LMHead:
    """Quantise the LM head [vocab, hidden] for ``mode`` (``int8`` | ``int4`` | ``fp16`` |
    ``fp32``)."""
    w = torch.as_tensor(weight).detach()
    if mode == "fp32":
        return LMHead(mode, None, w.float().clone())
    if mode == "fp16":
        return LMHead(mode, None, w.to(torch.float16).float())
    if mode not in HEAD_MODES:
        raise ValueError(f"unknown lm_head mode '{mode}': use one of {', '.join(HEAD_MODES)}")
    q = head_weights(w, mode, chunk_rows)
    return LMHead(mode, q, torch.from_numpy(dequantize_matmul_nbits(q)))


@torch.no_grad()
def head_hessian(final_norm: torch.nn.Module, hidden: Iterable[torch.Tensor]) -> torch.Tensor:
    """``2/n X^T X`` of the head's inputs: ``final_norm`` (the model's ``ln_f``) of the hidden
    states leaving the last decoder block (``QuantResult.outputs`` of the quantised decoder, or
    ``decoder_outputs``), over every calibration token."""
    from .gptq import Hessian

    h = None
    for x in hidden:
        y = final_norm(x.float())
        if h is None:
            h = Hessian(y.shape[-1])
        h.add(y)
    if h is None:
        raise ValueError("no calibration hidden states for the LM head's Hessian")
    return h.h


@torch.no_grad()
def decoder_outputs(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The hidden states leaving ``model``'s last decoder block for each block-0 input (what
    ``quantize_decoder(keep_outputs=True)`` keeps, for a model quantised earlier)."""
    from .gptq import block_forward

    out = []
    for x in batches:
        for blk in model.transformer.h:
            x = block_forward(blk, x.float(), model.cfg)
        out.append(x)
    return out


@torch.no_grad()
def gptq_head(weight: torch.Tensor | np.ndarray, hessian: torch.Tensor, group: int = INT4_GROUP,
              desc_act: bool = False, damp_percent: float = 0.01, chunk_rows: int = 8192,
              progress: bool = False) -> GPTQTensors:
    """GPTQ int4 (symmetric, ``group`` inputs per scale, act-order with ``desc_act``) of the head
    ``[vocab, hidden]`` given its input Hessian; slices of ``chunk_rows`` rows share one
    inverse-Hessian factor (``quant.gptq.gptq_quantize_rows``). -> one GPTQ v1 Linear."""
    from .gptq import QuantConfig, gptq_quantize_rows

    w = torch.as_tensor(weight).detach()
    cfg = QuantConfig(bits=4, group_size=group, sym=True, desc_act=desc_act,
                      damp_percent=damp_percent)
    cfg.validate((w.shape[1],))
    chunk_rows = -(-chunk_rows // 8) * 8  # GPTQ v1 packs 8 rows' zero points per int32
    parts = [qw.pack() for qw in gptq_quantize_rows(w, hessian, cfg, "lm_head", chunk_rows,
                                                    progress)]
    return GPTQTensors(qweight=np.concatenate([p.qweight for p in parts], axis=1),
                       qzeros=np.concatenate([p.qzeros for p in parts], axis=1),
                       scales=np.concatenate([p.scales for p in parts], axis=1),
                       g_idx=parts[0].g_idx, bias=None)


def rtn_head(weight: torch.Tensor | np.ndarray, group: int = INT4_GROUP) -> GPTQTensors:
    """The round-to-nearest int4 head (``head_weights``' codes) as a GPTQ v1 Linear, so that
    either method reaches the exporter and the reference by one path."""
    w = torch.as_tensor(weight).detach().float().numpy()
    codes, scales, zeros = rtn_quantize(w, group, sym=True, bits=4)
    return pack_gptq(codes, scales, zeros, np.arange(w.shape[1]) // group)


__all__ = ["HEAD_KEY", "HEAD_MODES", "INT4_GROUP", "LMHead", "PLAN_HEAD", "decoder_outputs",
           "gptq_head", "head_hessian", "head_mode_for_plan", "head_weights", "quantize_lm_head",
           "rtn_head"]
