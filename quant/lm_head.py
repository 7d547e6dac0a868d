"""The LM head of the int4 plans: symmetric int8 per output channel (or fp16 on request).

The head is 151936 x 4096 (1.2 GB in fp16); int8 halves the bytes every decode step reads
(docs/DESIGN.md §5, §7). Quantisation is per output row, so it is done in row chunks (an
fp32 copy of the whole head would be 2.5 GB) with ``quant.packing.quantize_int8_per_channel``;
the result is identical to quantising the whole matrix at once. ``dequantized`` is what the
engine effectively multiplies by, for the fake-quant reference (equal to
``quant.fake_quant.lm_head_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import MatMulNBitsWeights, dequantize_matmul_nbits, quantize_int8_per_channel
from .plans import PLANS

HEAD_MODES = ("int8", "fp16", "fp32")
# precision plan -> LM-head mode (the plan table, quant/plans.py)
PLAN_HEAD = {name: plan.lm_head for name, plan in PLANS.items()}


@dataclass
class LMHead:
    mode: str  # int8 | fp16 | fp32
    weights: MatMulNBitsWeights | None  # int8 MatMulNBits initializers (None unless int8)
    dequantized: torch.Tensor  # float32 [vocab, hidden]: the weight the engine effectively uses


def head_mode_for_plan(plan: str, fp16_head: bool = False) -> str:
    """``int4`` / ``edge`` use the int8 head unless ``fp16_head``; ``fp16`` keeps an fp16 head."""
    try:
        mode = PLAN_HEAD[plan]
    except KeyError:
        raise ValueError(f"unknown precision plan '{plan}': use one of {', '.join(PLAN_HEAD)}") from None
    return "fp16" if fp16_head and mode == "int8" else mode


def _concat_int8(parts: list[MatMulNBitsWeights]) -> MatMulNBitsWeights:
    first = parts[0]
    return MatMulNBitsWeights(
        B=np.concatenate([p.B for p in parts]), scales=np.concatenate([p.scales for p in parts]),
        zero_points=None, perm=None, K=first.K, N=sum(p.N for p in parts),
        block_size=first.block_size, bits=8)


@torch.no_grad()
def quantize_lm_head(weight: torch.Tensor | np.ndarray, mode: str = "int8",
                     chunk_rows: int = 8192) -> LMHead:
    """Quantise the LM head [vocab, hidden] for ``mode`` (``int8`` | ``fp16`` | ``fp32``)."""
    w = torch.as_tensor(weight).detach()
    if w.dim() != 2:
        raise ValueError(f"the LM head must be 2-D [vocab, hidden], got {tuple(w.shape)}")
    if mode == "fp32":
        return LMHead(mode, None, w.float().clone())
    if mode == "fp16":
        return LMHead(mode, None, w.to(torch.float16).float())
    if mode != "int8":
        raise ValueError(f"unknown lm_head mode '{mode}': use one of {', '.join(HEAD_MODES)}")
    parts = [quantize_int8_per_channel(w[i:i + chunk_rows].float().numpy())
             for i in range(0, w.shape[0], chunk_rows)]
    q = parts[0] if len(parts) == 1 else _concat_int8(parts)
    if q.zero_points is not None:  # symmetric: every zero point is 128 -> omitted
        raise AssertionError("int8 head quantisation produced zero points")
    deq = torch.cat([torch.from_numpy(dequantize_matmul_nbits(p)) for p in parts])
    return LMHead(mode, q, deq)


__all__ = ["LMHead", "HEAD_MODES", "PLAN_HEAD", "head_mode_for_plan", "quantize_lm_head"]
