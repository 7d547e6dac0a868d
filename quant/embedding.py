"""Compact embedding table: int8 (or int4) rows with an fp16 scale per block of each row.

The full-size table is 151936 x 4096, 1.24 GB in fp16, yet one decode step reads one row of it.
Stored as symmetric int8 with one fp16 scale per row it is 0.62 GB (int4 in blocks of 32: 0.35 GB),
and the engine dequantises only the rows it gathers, inside the graph, with onnxruntime's
``com.microsoft::GatherBlockQuantized`` (``data`` uint8 codes offset by the zero point
``2**(bits-1)``, which is the kernel's default and therefore not stored; ``scales`` fp16
``[vocab, hidden / block]``; output fp16). ORT 1.32's CPU kernel runs it for uint8 with
``bits`` 8 and 4 (checked on a tiny graph: output equal to ``(code - zp) * scale``).

The codes are computed against the fp16-rounded scale, so ``dequantized`` (what the fake-quant
reference embeds with) equals the engine's output exactly: ``(code - zp) * scale`` of two fp16
numbers is exact in fp32 and the kernel rounds it to fp16 once, as ``dequantized`` does.
Numpy only (the memory planner reads :func:`table_bytes`); torch only in :func:`embedding_weight`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Embedding storage dtypes (quant/plans.py ``embed``); the quantised ones and their bits.
EMBED_MODES = ("fp32", "fp16", "int8", "int4")
QUANT_BITS = {"int8": 8, "int4": 4}
#: int4 rows need small blocks (one scale per 4096 values at 4 bits loses too much);
#: 32 is the block llama.cpp's Q4_0 and ORT's GatherBlockQuantized examples use.
INT4_BLOCK = 32
SCALE_BYTES = 2  # fp16 scales


#: Clip ratios tried per block by the MSE-optimal scale search
#: (``quantize_embedding(mse_clip=True)``).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))  # 1.0 .. 0.6


def block_size(hidden: int, mode: str, block: int | None = None) -> int:
    """Values per scale: a whole row for int8 (the largest power of two >= 16 dividing it,
    since the kernel needs a power of two), :data:`INT4_BLOCK` for int4 (or ``block``, a power
    of two >= 16 dividing ``hidden``)."""
    if mode == "int4":
        blk = INT4_BLOCK if block is None else block
        if blk < 16 or blk & (blk - 1) or hidden % blk:
            raise ValueError(f"int4 embedding block {blk}: must be a power of two >= 16 "
                             f"dividing the hidden size {hidden}")
        return blk
    if mode != "int8":
        raise ValueError(f"embedding mode '{mode}' is not quantised: use int8 or int4")
    b = hidden & -hidden  # largest power of two dividing hidden
    if b < 16:
        raise ValueError(f"hidden size {hidden} has no power-of-two block >= 16")
    return b


def table_bytes(vocab: int, hidden: int, mode: str, block: int | None = None) -> int:
    """Bytes of the stored table: codes plus fp16 scales (the memory planner's formula)."""
    if mode not in QUANT_BITS:
        return vocab * hidden * {"fp32": 4, "fp16": 2}[mode]
    blk = block_size(hidden, mode, block)
    return vocab * hidden * QUANT_BITS[mode] // 8 + vocab * -(-hidden // blk) * SCALE_BYTES


@dataclass
class QuantizedEmbedding:
    """The initializers of one ``GatherBlockQuantized`` table."""

    mode: str  # int8 | int4
    block_size: int
    data: np.ndarray  # uint8 [vocab, hidden] (int8) or [vocab, hidden / 2] (int4, low nibble first)
    scales: np.ndarray  # float16 [vocab, hidden / block_size]

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.mode]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.scales.nbytes)

    def codes(self) -> np.ndarray:
        """Signed integer codes ``[vocab, hidden]``."""
        if self.bits == 8:
            return self.data.astype(np.int32) - 128
        lo, hi = self.data & 0x0F, self.data >> 4
        return np.stack([lo, hi], -1).reshape(len(self.data), -1).astype(np.int32) - 8

    def dequantized(self) -> np.ndarray:
        """float32 ``[vocab, hidden]``: exactly the engine's (fp16) rows."""
        c = self.codes()
        v, h = c.shape
        deq = c.reshape(v, -1, self.block_size) * self.scales.astype(np.float32)[..., None]
        return deq.reshape(v, h).astype(np.float16).astype(np.float32)


def _block_scales(g: np.ndarray, qmax: int, mse_clip: bool) -> np.ndarray:
    """fp16 scale per block of ``g`` [rows, blocks, block]: ``amax / qmax``, or with
    ``mse_clip`` the clipped ``ratio * amax / qmax`` (ratio in :data:`CLIP_RATIOS`) whose codes
    reconstruct the block with the least squared error."""
    amax = np.abs(g).max(-1)
    best_s = best_err = None
    for ratio in (CLIP_RATIOS if mse_clip else (1.0,)):
        s = (amax * ratio / qmax).astype(np.float16)
        s = np.where(s > 0, s, np.float16(1.0))  # an all-zero block (e.g. padding rows)
        if not mse_clip:
            return s
        s32 = s.astype(np.float32)[..., None]  # float64 error: the same choice on every CPU
        q = np.clip(np.round(g / s32), -qmax, qmax)
        err = np.square(q.astype(np.float64) * s32 - g).sum(-1)
        if best_s is None:
            best_s, best_err = s, err
        else:
            better = err < best_err
            best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    return best_s


def quantize_embedding(w: Any, mode: str = "int8", chunk_rows: int = 8192,
                       block: int | None = None, mse_clip: bool = False) -> QuantizedEmbedding:
    """Symmetric per-block quantisation of an embedding table ``[vocab, hidden]`` (numpy or
    torch, any float dtype), in row chunks (an fp32 copy of the full table is 2.5 GB).
    ``block``: int4 values per scale (default :data:`INT4_BLOCK`); ``mse_clip``: per-block
    clipped scales (``_block_scales``) instead of the block's peak."""
    v, h = w.shape
    blk = block_size(h, mode, block)
    if h % blk:
        raise ValueError(f"hidden size {h} is not a multiple of the {mode} block {blk}")
    qmax = (1 << (QUANT_BITS[mode] - 1)) - 1
    data, scales = [], []
    for a in range(0, v, chunk_rows):
        part = w[a:a + chunk_rows]
        part = part.float().numpy() if hasattr(part, "numpy") else np.asarray(part, np.float32)
        g = part.reshape(len(part), h // blk, blk)
        s = _block_scales(g, qmax, mse_clip)
        q = np.clip(np.round(g / s.astype(np.float32)[..., None]), -qmax, qmax).astype(np.int32)
        q = (q + qmax + 1).reshape(len(part), h).astype(np.uint8)
        data.append(q if mode == "int8" else (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8))
        scales.append(s)
    return QuantizedEmbedding(mode, blk, np.concatenate(data), np.concatenate(scales))


def embedding_weight(w: Any, mode: str):
    """The table the engine effectively embeds with (torch float32), for the fake-quant
    reference: fp16-rounded for ``fp16``, the dequantised codes for ``int8`` / ``int4``."""
    import torch

    t = torch.as_tensor(w).detach()
    if mode == "fp32":
        return t.float().clone()
    if mode == "fp16":
        return t.to(torch.float16).float()
    return torch.from_numpy(quantize_embedding(t, mode).dequantized())


__all__ = ["EMBED_MODES", "INT4_BLOCK", "QuantizedEmbedding", "block_size", "embedding_weight",
           "quantize_embedding", "table_bytes"]
