"""The export-only twin of the reference ViT (:class:`VisionGraph`): what ``torch.onnx`` traces.

It reads the reference's weights (shared, not copied, in fp32), with the two bicubic position
tables precomputed and the weight-only query path of the resampler (``ln_q(query) + pos_embed``
then the q projection) folded into one constant. ``fp16`` keeps three fp32 islands: LayerNorm,
softmax and the residual stream (see exporters/vision.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math

import torch
import torch.nn.functional as F
from torch import nn

from quant.plans import vision_precisions

PRECISIONS = vision_precisions()  # ("fp32", "fp16"): those of the exportable plans
KV_PRESCALE = 32.0  # power of two: see VisionGraph.kv_prescale


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _Ln(nn.Module):
    """LayerNorm parameters kept in fp32 whatever the compute dtype."""

    def __init__(self, ln: nn.LayerNorm, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", ln.weight.detach().to(dtype))
        self.register_buffer("bias", ln.bias.detach().to(dtype))
        self.eps = ln.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.weight.numel(),), self.weight, self.bias, self.eps)


class _Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _Block(nn.Module):
    """One pre-LN ViT block; ``in_proj`` keeps the original per-head [q|k|v] row interleave."""

    def __init__(self, blk: nn.Module, heads: int, cdt: torch.dtype, ndt: torch.dtype):
        super().__init__()
        self.heads, self.cdt, self.ndt = heads, cdt, ndt
        self.ln_1 = _Ln(blk.ln_1, ndt)
        self.in_proj = _Linear(blk.attn.in_proj.weight, blk.attn.in_proj.bias, cdt)
        self.out_proj = _Linear(blk.attn.out_proj.weight, blk.attn.out_proj.bias, cdt)
        self.ln_2 = _Ln(blk.ln_2, ndt)
        self.c_fc = _Linear(blk.mlp.c_fc.weight, blk.mlp.c_fc.bias, cdt)
        self.c_proj = _Linear(blk.mlp.c_proj.weight, blk.mlp.c_proj.bias, cdt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: residual stream, dtype ndt
        n, length, width = x.shape
        hd = width // self.heads
        h = self.ln_1(x).to(self.cdt)
        qkv = self.in_proj(h).view(n, length, self.heads, 3 * hd)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(hd, dim=-1))
        q = q / math.sqrt(hd)
        attn = torch.softmax((q @ k.transpose(-1, -2)).to(self.ndt), dim=-1).to(self.cdt)
        a = self.out_proj((attn @ v).transpose(1, 2).reshape(n, length, width))
        x = x + a.to(self.ndt)
        m = self.c_proj(F.gelu(self.c_fc(self.ln_2(x).to(self.cdt))))
        return x + m.to(self.ndt)


class VisionGraph(nn.Module):
    """Export-only twin of ``VisionTransformer``: pixels fp32 -> features fp32.

    ``precision="fp32"``: the reference's operations on the reference's own tensors (no copy).
    ``precision="fp16"``: fp16 weights and matmuls, fp32 LayerNorm / softmax / residual stream.
    ``fp32_islands=False`` (fp16 only) drops the islands: the naive ``model.half()`` graph, kept
    only to demonstrate, in tests and reports, what the islands prevent.
    ``consume=True`` replaces each block of ``visual`` by ``nn.Identity`` once copied, so an fp16
    twin of the full-size tower never coexists with the whole fp32 one (peak RSS ~8 GB, not 12).
    """

    def __init__(self, visual: nn.Module, precision: str = "fp32", fp32_islands: bool = True,
                 consume: bool = False):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
        cfg = visual.cfg
        cdt = torch.float16 if precision == "fp16" else torch.float32
        ndt = torch.float32 if fp32_islands else cdt
        self.cdt, self.ndt = cdt, ndt
        self.precision, self.fp32_islands = precision, fp32_islands
        if visual._patch_pos is None or visual.attn_pool._key_pos is None:
            visual.freeze_position_tables()
        self.register_buffer("conv_w", visual.conv1.weight.detach().to(cdt))
        self.patch = cfg.patch_size
        # Position tables: bicubic 16x16 -> grid in fp32 (reference), then the residual dtype.
        self.register_buffer("patch_pos", visual._patch_pos.detach().to(ndt))
        self.ln_pre = _Ln(visual.ln_pre, ndt)
        blocks = visual.transformer.resblocks
        self.blocks = nn.ModuleList()
        for i in range(len(blocks)):
            self.blocks.append(_Block(blocks[i], cfg.heads, cdt, ndt))
            if consume:
                blocks[i] = nn.Identity()
                if i % 8 == 7:
                    _release_memory()
        pool = visual.attn_pool
        self.pool_heads = pool.num_heads
        self.kv_proj = _Linear(pool.kv_proj.weight, None, cdt)
        # kv_proj is the one matmul that reads the raw fp32 residual stream (the ViT has no final
        # LayerNorm). It has no bias, so kv_proj(x) = kv_proj(x / s) * s exactly for s = 2^k: the
        # fp16 input then overflows only past 65504 * s instead of 65504.
        self.kv_prescale = KV_PRESCALE if precision == "fp16" and fp32_islands else 1.0
        self.ln_kv = _Ln(pool.ln_kv, ndt)
        self.register_buffer("key_pos", pool._key_pos.detach().to(ndt))
        dim = pool.query.size(-1)
        hd = dim // self.pool_heads
        wq, wk, wv = pool.attn.in_proj_weight.detach().chunk(3)
        bq, bk, bv = pool.attn.in_proj_bias.detach().chunk(3)
        with torch.no_grad():  # weight-only query path, in fp32 exactly as the reference
            q = pool.ln_q(pool.query.float()) + pool.pos_embed.float()
            q = F.linear(q, wq.float(), bq.float()) * math.sqrt(1.0 / float(hd))
        self.register_buffer("q_heads", q.view(1, -1, self.pool_heads, hd).transpose(1, 2)
                             .contiguous().to(cdt))  # [1, H, n_queries, hd]
        self.k_proj = _Linear(wk, bk, cdt)
        self.v_proj = _Linear(wv, bv, cdt)
        self.pool_out = _Linear(pool.attn.out_proj.weight, pool.attn.out_proj.bias, cdt)
        self.ln_post = _Ln(visual.ln_post, ndt)
        self.register_buffer("proj", visual.proj.detach().to(cdt))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(pixels.to(self.cdt), self.conv_w, stride=self.patch)  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # token = row * g + col
        x = self.ln_pre(x.to(self.ndt) + self.patch_pos)  # residual stream starts here
        for blk in self.blocks:
            x = blk(x)
        n, length, _ = x.shape
        if self.kv_prescale != 1.0:
            kv = self.kv_proj((x * (1.0 / self.kv_prescale)).to(self.cdt)).to(self.ndt)
            kv = self.ln_kv(kv * self.kv_prescale)
        else:
            kv = self.ln_kv(self.kv_proj(x.to(self.cdt)).to(self.ndt))
        k = (kv + self.key_pos).to(self.cdt)
        h, hd = self.pool_heads, self.q_heads.size(-1)
        k = self.k_proj(k).view(n, length, h, hd).transpose(1, 2)
        v = self.v_proj(kv.to(self.cdt)).view(n, length, h, hd).transpose(1, 2)
        w = torch.softmax((self.q_heads @ k.transpose(-1, -2)).to(self.ndt), dim=-1).to(self.cdt)
        out = (w @ v).transpose(1, 2).reshape(n, self.q_heads.size(2), h * hd)
        out = self.pool_out(out)
        out = self.ln_post(out.to(self.ndt)).to(self.cdt)
        return (out @ self.proj).to(torch.float32)
