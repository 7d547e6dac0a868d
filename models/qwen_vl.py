"""PyTorch reference of Qwen-VL / Qwen-VL-Chat, numerically faithful to the original remote code.

Every engine is judged against this file, so it follows the original ``modeling_qwen.py`` +
``visual.py`` operation for operation (``Qwen/Qwen-VL-Chat`` remote code): per-head interleaved ViT
``in_proj``, SiLU on ``w2``, rotate-half RoPE in fp32, RMSNorm statistics in fp32, the bicubic
16x16 -> grid resize of the position tables in fp32, ``x @ proj``. Module and parameter names are the
real checkpoint's tensor names. What it deliberately does *not* do: open images named inside the
prompt (images enter only as tensors), NTK / logN scaling (contexts past ``seq_length`` are
refused instead).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import ContextLengthError

from .config import QwenVLConfig, VisualConfig


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------

def resize_pos_table(table: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """``get_abs_pos``: bicubic resize of a square position table, in fp32, cast back."""
    src = int(math.sqrt(table.size(0)))
    tgt = int(math.sqrt(tgt_len))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE 2-D sin-cos table; first half of channels from the column, second from the row.

    Computed in float64 and rounded once to float32, so the table (and every checkpoint that
    stores it) has the same bytes on every CPU: numpy's float32 ``sin``/``cos``/``power`` kernels
    give different last bits with and without AVX-512. The original ``visual.py`` computes it in
    float32; the two differ by at most 3.4e-7 (16x16 grid), and loaded checkpoints carry their
    own table.
    """
    import numpy as np

    def one_d(dim: int, pos: "np.ndarray") -> "np.ndarray":
        omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(grid_size, dtype=np.float64)
    grid = np.stack(np.meshgrid(g, g), axis=0)  # [0]: column index, [1]: row index
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb.astype(np.float32))


class VisualAttention(nn.Module):
    """ViT self-attention; ``in_proj`` rows are interleaved per head as [q|k|v] (Megatron)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, L, W]
        n, length, width = x.shape
        qkv = self.in_proj(x).view(n, length, self.heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # [N, L, H, hd] each
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [N, H, L, hd]
        q = q / math.sqrt(self.head_dim)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, length, width)  # head-major merge
        return self.out_proj(out)


class VisualMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.gelu = nn.GELU()  # exact erf GELU, as nn.GELU() in the original
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class VisualBlock(nn.Module):
    def __init__(self, cfg: VisualConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = VisualAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = VisualMLP(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualTransformerStack(nn.Module):
    """Holds ``resblocks`` so the tensor names read ``visual.transformer.resblocks.N``."""

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(cfg) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x)
        return x


class Resampler(nn.Module):
    """``attn_pool``: one cross-attention from n_queries learned queries to the ViT tokens."""

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        dim = cfg.output_dim
        self.n_queries = cfg.n_queries
        self.num_heads = cfg.pool_heads
        grid = int(math.sqrt(cfg.n_queries))
        # Stored in the checkpoint (a frozen Parameter): loaded, not recomputed.
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, grid), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(cfg.n_queries, dim))
        self.kv_proj = nn.Linear(cfg.width, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, self.num_heads)  # parameter storage / names
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dim, eps=1e-6)
        self.register_buffer("_key_pos", None, persistent=False)

    def key_pos(self, n_tokens: int) -> torch.Tensor:
        if self._key_pos is not None and self._key_pos.size(0) == n_tokens:
            return self._key_pos
        return resize_pos_table(self.pos_embed, n_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, L, W]
        n, length, _ = x.shape
        x = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).unsqueeze(0) + self.pos_embed.unsqueeze(0)  # query: 16x16 table
        k = x + self.key_pos(length).unsqueeze(0)
        q = q.expand(n, -1, -1)
        return self._mha(q, k, x)

    def _mha(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``F.multi_head_attention_forward`` with ``[Q;K;V]`` packed ``in_proj_weight``."""
        attn = self.attn
        dim = q.size(-1)
        hd = dim // self.num_heads
        wq, wk, wv = attn.in_proj_weight.chunk(3)
        bq, bk, bv = attn.in_proj_bias.chunk(3)
        n, lq, lk = q.size(0), q.size(1), k.size(1)
        q = F.linear(q, wq, bq).view(n, lq, self.num_heads, hd).transpose(1, 2)
        k = F.linear(k, wk, bk).view(n, lk, self.num_heads, hd).transpose(1, 2)
        v = F.linear(v, wv, bv).view(n, lk, self.num_heads, hd).transpose(1, 2)
        q = q * math.sqrt(1.0 / float(hd))
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(n, lq, dim)
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class VisionTransformer(nn.Module):
    """``transformer.visual``: pixels [N,3,S,S] -> image features [N, n_queries, output_dim]."""

    def __init__(self, cfg: VisualConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                               bias=False)
        # 256 rows (16x16, the 224-px stage-1 grid) whatever the image size, as in the original.
        self.positional_embedding = nn.Parameter(torch.zeros(256, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=1e-6)
        self.transformer = VisualTransformerStack(cfg)
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(cfg.output_dim, cfg.output_dim))
        self.register_buffer("_patch_pos", None, persistent=False)

    def patch_pos(self, n_tokens: int) -> torch.Tensor:
        if self._patch_pos is not None and self._patch_pos.size(0) == n_tokens:
            return self._patch_pos
        return resize_pos_table(self.positional_embedding, n_tokens)

    def freeze_position_tables(self) -> None:
        """Precompute both interpolated tables once (exporters bake them in as constants)."""
        n = self.cfg.n_patches
        self._patch_pos = resize_pos_table(self.positional_embedding.detach(), n)
        self.attn_pool._key_pos = resize_pos_table(self.attn_pool.pos_embed.detach(), n)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels.to(self.conv1.weight.dtype))  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, W], token = row * g + col
        x = x + self.patch_pos(x.size(1))
        x = self.ln_pre(x)
        x = self.transformer(x)
        x = self.attn_pool(x)
        x = self.ln_post(x)
        return x @ self.proj


# ---------------------------------------------------------------------------------------------
# Language decoder
# ---------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rotary_cos_sin(positions: torch.Tensor, dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, dim] in fp32 for the given absolute positions (rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t: [B, S, H, D]; cos/sin: [S, D]. Computed in fp32, cast back (as the original)."""
    tf = t.float()
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    x1, x2 = tf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (tf * cos + rotated * sin).type_as(t)


KV = tuple[torch.Tensor, torch.Tensor]  # key, value: [B, T, H, D], keys after RoPE


class QWenAttention(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=not cfg.no_bias)
        # (key, value) [B, S, H, D] -> (key, value): applied to the new rows (keys after RoPE)
        # before they join the cache; None in the reference. The int8-KV mirror and its scale
        # calibration (quant/kv_scales.py) set it.
        self.kv_hook: Callable[[torch.Tensor, torch.Tensor], KV] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        b, s, hidden = x.shape
        q, k, v = self.c_attn(x).split(hidden, dim=-1)  # [Q | K | V] blocks
        q = apply_rotary(q.view(b, s, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(b, s, self.heads, self.head_dim), cos, sin)
        v = v.view(b, s, self.heads, self.head_dim)
        if self.kv_hook is not None:
            k, v = self.kv_hook(k, v)
        if past is not None:
            k = torch.cat([past[0], k], dim=1)
            v = torch.cat([past[1], v], dim=1)
        present = (k, v)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # [B, H, S, D]
        scores = q @ k.transpose(-1, -2)
        scores = scores / torch.full([], v.size(-1) ** 0.5, dtype=scores.dtype)
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1).type(v.dtype)
        out = (attn @ v).permute(0, 2, 1, 3).reshape(b, s, hidden)
        return self.c_proj(out), present


class QWenMLP(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        bias = not cfg.no_bias
        self.w1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=bias)  # up
        self.w2 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, bias=bias)  # gate (SiLU)
        self.c_proj = nn.Linear(cfg.ffn_dim, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mlp = QWenMLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.attn(self.ln_1(x), cos, sin, mask, past)
        h = x + a
        return h + self.mlp(self.ln_2(h)), present


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, S, vocab]
    past: list[KV]
    hidden: torch.Tensor | None = None  # final hidden state before ln_f when asked for


class QWenModel(nn.Module):
    """``transformer``: token embedding, decoder blocks, final norm and the vision tower."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(QWenBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.visual = VisionTransformer(cfg.visual)


def image_spans(input_ids: torch.Tensor, start_id: int) -> list[tuple[int, int, int]]:
    """(row, first, last+1) of the slots strictly between each ``<img>`` and ``</img>`` (the
    engine contract's rule, ``runtime.contract.image_spans``, row by row)."""
    from runtime.contract import ContractError
    from runtime.contract import image_spans as contract_spans

    spans = []
    for row in range(input_ids.size(0)):
        try:
            spans += [(row, a, e) for a, e in
                      contract_spans(input_ids[row].tolist(), start_id, start_id + 1)]
        except ContractError as err:
            raise ValueError(f"row {row}: {err} in input_ids") from None
    return spans


class QWenLMHeadModel(nn.Module):
    """The whole Qwen-VL: ``transformer`` (with ``visual``) + untied ``lm_head``."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.transformer = QWenModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] preprocessed pixels -> [N, n_queries, hidden] features."""
        return self.transformer.visual(pixels)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with image features written over the slots between the tags."""
        h = self.transformer.wte(input_ids)
        spans = image_spans(input_ids, self.cfg.image_start_id)
        if not spans:
            return h
        if image_embeds is None or image_embeds.size(0) != len(spans):
            got = 0 if image_embeds is None else image_embeds.size(0)
            raise ValueError(f"the prompt has {len(spans)} image span(s) but {got} image(s) were given")
        h = h.clone()
        for k, (row, a, b) in enumerate(spans):
            if b - a != image_embeds.size(1):
                raise ValueError(f"image span {k} has {b - a} slots, the vision tower gives "
                                 f"{image_embeds.size(1)} features")
            h[row, a:b] = image_embeds[k].to(h.dtype)
        return h

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, past: list[KV] | None = None,
                attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> DecoderOutput:
        """One decoder pass. Images are used only when there is no past (prefill), as in HF.

        ``attention_mask`` ([B, past+S], 1 = keep) only matters for left-padded batches; RoPE
        positions are 0..T-1 from the cache length whatever the padding (the original's behaviour).
        """
        cfg = self.cfg
        if inputs_embeds is None:
            if pixels is not None and image_embeds is None and past is None:
                image_embeds = self.encode_images(pixels)
            # As in HF, image spans are looked for only at prefill: a decode step that emits
            # <img> is just a token.
            x = (self.embed(input_ids, image_embeds) if past is None
                 else self.transformer.wte(input_ids))
        else:
            x = inputs_embeds
        b, s, _ = x.shape
        past_len = 0 if past is None else past[0][0].size(1)
        total = past_len + s
        if total > cfg.seq_length and (cfg.use_dynamic_ntk or cfg.use_logn_attn):
            raise ContextLengthError(
                f"context of {total} tokens exceeds seq_length {cfg.seq_length}: dynamic NTK / logN "
                "scaling are not implemented; shorten the prompt or lower max_new_tokens")
        positions = torch.arange(past_len, total)
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rotary_emb_base)
        mask = self._mask(b, s, past_len, attention_mask, x.dtype)
        presents: list[KV] = []
        for i, blk in enumerate(self.transformer.h):
            x, present = blk(x, cos, sin, mask, None if past is None else past[i])
            presents.append(present)
        x = self.transformer.ln_f(x)
        return DecoderOutput(logits=self.lm_head(x), past=presents)

    @staticmethod
    def _mask(b: int, s: int, past_len: int, attention_mask: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor | None:
        total = past_len + s
        keep = None
        if s > 1:
            q_pos = torch.arange(past_len, total)[:, None]
            keep = (torch.arange(total)[None, :] <= q_pos)[None, None]  # [1,1,S,T]
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :].bool()  # [B,1,1,T]
            keep = pad if keep is None else keep & pad
        if keep is None:
            return None
        zero = torch.zeros((), dtype=dtype)
        return torch.where(keep, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: list[int] | torch.Tensor, pixels: torch.Tensor | None = None,
                 image_embeds: torch.Tensor | None = None, max_new_tokens: int = 64,
                 stop_ids: tuple[int, ...] = (), do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> list[int]:
        """Reference decoding of one prompt with the KV cache; returns the new ids (no stop id).

        The loop is the runtime's (:func:`runtime.generate.decode_tokens`) over
        :class:`models.runner.TorchRunner`, with :func:`sample_token` as its sampler."""
        from runtime.generate import DecodeState, GenerationConfig, decode_tokens

        from .runner import TorchRunner

        runner = TorchRunner(self)
        logits = runner.prefill(input_ids, image_embeds, pixels=pixels)[-1]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def sampler(row: np.ndarray) -> int:
            return sample_token(torch.from_numpy(row), do_sample, temperature, top_p, top_k, gen)

        cfg = GenerationConfig(max_new_tokens=max_new_tokens)
        return list(decode_tokens(runner.step, logits, sampler, frozenset(stop_ids), cfg,
                                  DecodeState()))


def sample_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                 top_k: int, gen: torch.Generator | None) -> int:
    if not do_sample or temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sp, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(0, idx, sp)
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))
