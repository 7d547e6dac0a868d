"""Int4 weight layouts: AutoGPTQ/GPTQModel tensors <-> integer codes <-> ONNX ``MatMulNBits``.

One place owns the bit twiddling so that the quantiser, the checkpoint reader, the exporter and the
fake-quant reference all agree. Layouts (each checked numerically in tests/test_gptq_checkpoint.py):

* GPTQ v1 (AutoGPTQ, the official Qwen-VL-Chat-Int4), for a Linear with N outputs and K inputs:
  ``qweight`` int32 [K/8, N] packed along K (nibble i of row r is input 8r+i); ``qzeros`` int32
  [G, N/8] packed along N, storing *zero - 1*; ``scales`` fp16 [G, N]; ``g_idx`` int32 [K].
  ``W[n,k] = (q[k,n] - zero[g_idx[k], n]) * scale[g_idx[k], n]``.
* ``com.microsoft::MatMulNBits``: ``B`` uint8 [N, n_blocks, block/2] (element 2j in the low nibble),
  ``scales`` [N * n_blocks], optional ``zero_points`` uint8 [N * ceil(n_blocks/2)] (default 8 =
  symmetric). Act-order (a non-trivial ``g_idx``) is expressed by permuting K offline and gathering
  the activation columns at run time, which avoids onnxruntime's g_idx + packed-zero-point bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import EdgeError

from .plans import DEFAULT_GROUP_SIZE


class PackingError(EdgeError, ValueError):
    """Tensors that cannot be represented in the requested layout."""


@dataclass
class GPTQTensors:
    """One quantised Linear in the AutoGPTQ v1 layout (numpy arrays)."""

    qweight: np.ndarray  # int32 [K*bits/32, N]
    qzeros: np.ndarray  # int32 [G, N*bits/32]
    scales: np.ndarray  # float16 [G, N]
    g_idx: np.ndarray  # int32 [K]
    bias: np.ndarray | None = None  # float16 [N]
    bits: int = 4

    @property
    def in_features(self) -> int:
        return int(self.g_idx.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.scales.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[0])


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack along axis 0: [R, C] codes -> int32 [R*bits/32, C]."""
    per = 32 // bits
    r, c = codes.shape
    if r % per:
        raise PackingError(f"{r} rows is not a multiple of {per} for {bits}-bit packing")
    u = codes.astype(np.uint32).reshape(r // per, per, c)
    out = np.zeros((r // per, c), dtype=np.uint32)
    for i in range(per):
        out |= u[:, i, :] << np.uint32(bits * i)
    return out.view(np.int32)


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    u = packed.view(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    parts = [(u >> np.uint32(bits * i)) & mask for i in range(per)]
    return np.stack(parts, axis=1).reshape(u.shape[0] * per, u.shape[1]).astype(np.int32)


def pack_gptq(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray,
              bias: np.ndarray | None = None, bits: int = 4) -> GPTQTensors:
    """codes [N,K] in 0..2^bits-1, scales/zeros [N,G] (real zero points), g_idx [K] -> GPTQ v1."""
    if bits != 4:
        raise PackingError(f"{bits}-bit GPTQ is not supported: use bits=4")
    codes = np.asarray(codes)
    if codes.min() < 0 or codes.max() > 15:
        raise PackingError("int4 codes must lie in 0..15")
    qweight = _pack_rows(codes.T, bits)
    zeros = np.asarray(zeros).astype(np.int64)
    if zeros.min() < 1 or zeros.max() > 16:
        raise PackingError("GPTQ v1 stores zero-1 in 4 bits: zero points must lie in 1..16")
    qzeros = _pack_rows(zeros - 1, bits).T  # pack [N,G] along N, store as [G, N/8]
    return GPTQTensors(qweight=qweight, qzeros=np.ascontiguousarray(qzeros),
                       scales=np.asarray(scales, dtype=np.float16).T.copy(),
                       g_idx=np.asarray(g_idx, dtype=np.int32),
                       bias=None if bias is None else np.asarray(bias, dtype=np.float16), bits=bits)


def unpack_gptq(t: GPTQTensors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> codes [N,K], scales [N,G] float32, zeros [N,G] int (real zero points)."""
    if t.bits != 4:
        raise PackingError(f"{t.bits}-bit GPTQ is not supported")
    codes = _unpack_rows(t.qweight, t.bits).T
    zeros = _unpack_rows(np.ascontiguousarray(t.qzeros.T), t.bits).T + 1  # [G, N] -> real
    n, k = codes.shape
    if k != t.in_features or n != t.out_features:
        raise PackingError(f"qweight unpacks to [{n},{k}] but scales/g_idx say "
                           f"[{t.out_features},{t.in_features}]")
    return codes, t.scales.astype(np.float32).T, zeros.T


def dequantize(t: GPTQTensors) -> np.ndarray:
    """float32 weight [N, K] exactly as the GPTQ kernels compute it."""
    codes, scales, zeros = unpack_gptq(t)
    g = t.g_idx
    return ((codes - zeros[:, g]) * scales[:, g]).astype(np.float32)


def is_trivial_g_idx(g_idx: np.ndarray, group_size: int) -> bool:
    return bool(np.array_equal(g_idx, np.arange(g_idx.shape[0]) // group_size))


def rtn_quantize(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True,
                 bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest baseline: w [N,K] -> codes [N,K], scales [N,G], zeros [N,G]."""
    n, k = w.shape
    if k % group_size:
        raise PackingError(f"in_features {k} is not a multiple of group_size {group_size}")
    maxq = (1 << bits) - 1
    wg = w.reshape(n, k // group_size, group_size).astype(np.float32)
    if sym:
        amax = np.abs(wg).max(-1)
        scales = np.where(amax > 0, 2 * amax / maxq, 1.0)
        zeros = np.full(scales.shape, (maxq + 1) // 2)
    else:
        lo, hi = np.minimum(wg.min(-1), 0), np.maximum(wg.max(-1), 0)
        scales = np.where(hi > lo, (hi - lo) / maxq, 1.0)
        zeros = np.round(-lo / scales)
    scales = scales.astype(np.float16).astype(np.float32)  # what the checkpoint will hold
    codes = np.clip(np.round(wg / scales[..., None]) + zeros[..., None], 0, maxq)
    return codes.reshape(n, k).astype(np.int32), scales, zeros.astype(np.int32)


@dataclass
class MatMulNBitsWeights:
    """Initializers for one ``com.microsoft::MatMulNBits`` node (+ an optional input permutation)."""

    B: np.ndarray  # uint8 [N, n_blocks, block_size/2]
    scales: np.ndarray  # float [N * n_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(n_blocks/2)] or None (= 8, symmetric)
    perm: np.ndarray | None  # int64 [K]: gather activation columns first (act-order)
    K: int
    N: int
    block_size: int
    bits: int = 4
    bias: np.ndarray | None = None


def pack_matmul_nbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                      block_size: int, perm: np.ndarray | None = None,
                      bias: np.ndarray | None = None, bits: int = 4) -> MatMulNBitsWeights:
    """codes [N,K] (blocks of ``block_size`` along K), scales/zeros [N, n_blocks]."""
    n, k = codes.shape
    n_blocks = -(-k // block_size)
    if bits == 4:
        padded = np.zeros((n, n_blocks * block_size), dtype=np.uint8)
        padded[:, :k] = codes
        pairs = padded.reshape(n, n_blocks, block_size // 2, 2)
        b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
        default_zero = 8
    elif bits == 8:
        padded = np.zeros((n, n_blocks * block_size), dtype=np.uint8)
        padded[:, :k] = codes
        b = padded.reshape(n, n_blocks, block_size)
        default_zero = 128
    else:
        raise PackingError(f"MatMulNBits with {bits} bits is not supported here: use 4 or 8")
    zeros = np.asarray(zeros)
    zp = None
    if not np.all(zeros == default_zero):
        if bits == 4:
            zpad = np.full((n, n_blocks + (n_blocks % 2)), 8, dtype=np.uint8)
            zpad[:, :n_blocks] = zeros
            zp = (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
        else:
            zp = zeros.astype(np.uint8).reshape(-1)
    return MatMulNBitsWeights(B=b, scales=np.asarray(scales, np.float32).reshape(-1), zero_points=zp,
                              perm=perm, K=k, N=n, block_size=block_size, bits=bits, bias=bias)


def gptq_to_matmul_nbits(t: GPTQTensors, group_size: int) -> MatMulNBitsWeights:
    """Convert one GPTQ Linear; act-order becomes a column permutation (no ``g_idx`` input)."""
    codes, scales, zeros = unpack_gptq(t)
    g = t.g_idx.astype(np.int64)
    perm = None
    if not is_trivial_g_idx(g, group_size):
        perm = np.argsort(g, kind="stable")
        counts = np.bincount(g, minlength=t.n_groups)
        if not np.all(counts == group_size):
            raise PackingError("act-order g_idx with groups of unequal size cannot be converted "
                               "to MatMulNBits; re-quantise with desc_act=False")
        codes = codes[:, perm]
    bias = None if t.bias is None or not np.any(t.bias) else t.bias.astype(np.float32)
    return pack_matmul_nbits(codes, scales, zeros, group_size, perm=perm, bias=bias)


def dequantize_matmul_nbits(w: MatMulNBitsWeights) -> np.ndarray:
    """float32 [N, K] weight in the *original* column order (undoes ``perm``)."""
    n, nb = w.N, -(-w.K // w.block_size)
    if w.bits == 4:
        lo, hi = w.B & 0x0F, w.B >> 4
        codes = np.stack([lo, hi], axis=-1).reshape(n, nb * w.block_size).astype(np.int32)
        default_zero = 8
    else:
        codes = w.B.reshape(n, nb * w.block_size).astype(np.int32)
        default_zero = 128
    if w.zero_points is None:
        zeros = np.full((n, nb), default_zero, np.int32)
    elif w.bits == 4:
        zp = w.zero_points.reshape(n, -1)
        zeros = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.int32)
    else:
        zeros = w.zero_points.reshape(n, nb).astype(np.int32)
    scales = w.scales.reshape(n, nb)
    blocks = np.arange(nb * w.block_size) // w.block_size
    full = ((codes - zeros[:, blocks]) * scales[:, blocks])[:, : w.K].astype(np.float32)
    if w.perm is not None:
        out = np.empty_like(full)
        out[:, w.perm] = full
        return out
    return full


def quantize_int8_per_channel(w: np.ndarray) -> MatMulNBitsWeights:
    """Symmetric int8 per output channel (one block spanning K), for the LM head."""
    n, k = w.shape
    block = 1 << max(4, int(np.ceil(np.log2(k))))  # MatMulNBits wants a power-of-two block
    amax = np.abs(w).max(axis=1, keepdims=True)
    scales = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    codes = (np.clip(np.round(w / scales), -127, 127) + 128).astype(np.int32)
    return pack_matmul_nbits(codes, scales, np.full((n, 1), 128), block, bits=8)
