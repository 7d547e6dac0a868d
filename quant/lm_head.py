"""The LM head of the int4 plans: symmetric int8 per output channel (or int4 / fp16 on request).

The head is 151936 x 4096 (1.2 GB in fp16); int8 halves the bytes every decode step reads
(docs/DESIGN.md §5, §7), int4 in groups of :data:`INT4_GROUP` quarters them (size vs KL:
bench/RESULTS.md "LM head int8 vs int4"). Quantisation is per output row, so it is done in row
chunks (an fp32 copy of the whole head would be 2.5 GB); the result is identical to quantising the
whole matrix at once. ``dequantized`` is what the engine effectively multiplies by, for the
fake-quant reference (equal to ``quant.fake_quant.lm_head_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import (MatMulNBitsWeights, dequantize_matmul_nbits, pack_matmul_nbits,
                      quantize_int8_per_channel, rtn_quantize)
from .plans import PLANS

HEAD_MODES = ("int8", "int4", "fp16", "fp32")
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


def _quantize_rows(w: np.ndarray, mode: str) -> MatMulNBitsWeights:
    if mode == "int8":
        return quantize_int8_per_channel(w)
    group = INT4_GROUP if w.shape[1] % INT4_GROUP == 0 else w.shape[1]
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
                 chunk_rows: int = 8192) -> MatMulNBitsWeights:
    """MatMulNBits initializers of the ``int8`` / ``int4`` head, quantised in row chunks."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"lm_head mode '{mode}' is not quantised: use int8 or int4")
    w = torch.as_tensor(weight).detach()
    if w.dim() != 2:
        raise ValueError(f"the LM head must be 2-D [vocab, hidden], got {tuple(w.shape)}")
    parts = [_quantize_rows(w[i:i + chunk_rows].float().numpy(), mode)
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


__all__ = ["HEAD_MODES", "INT4_GROUP", "LMHead", "PLAN_HEAD", "head_mode_for_plan",
           "head_weights", "quantize_lm_head"]
