"""Fake-quant PyTorch reference for the int4 decoder plan, and RTN stand-ins for GPTQ tensors.

``fake_quant_model`` puts the *dequantised* GPTQ weights back into a copy of the reference model,
rounding every other tensor the int4 ONNX plan stores in fp16 (embedding table, norm weights,
biases) and applying the LM-head treatment (int8 per channel / fp16). An int4 engine run with fp32
activations must then match this model to float rounding; any larger gap is an exporter bug, not
quantisation error.

``int8_activations`` adds what ``MatMulNBits`` does with ``accuracy_level`` 4 (the int4 plan's
``cpu`` target): each input row is quantised to int8, symmetric, per weight block along K
(scale = amax / 127 in float32, round half to even), before the product. With it the fake-quant
model matches such an engine to float rounding too (checked against onnxruntime's kernel in
tests/test_gptq.py), so the drift report can judge that target's exporter error as tightly.

``rtn_gptq_tensors`` makes GPTQ-layout tensors by round-to-nearest (optionally with an act-order
``g_idx``) for tests and for timing runs on random weights, where real GPTQ adds nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from .packing import (GPTQTensors, PackingError, dequantize, dequantize_matmul_nbits, pack_gptq,
                      quantize_int8_per_channel, rtn_quantize)
from .plans import DEFAULT_GROUP_SIZE

LINEAR_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")


def quantized_linear_names(num_layers: int) -> list[str]:
    """Module names of the Linears the int4 plan quantises, in graph order."""
    return [f"transformer.h.{i}.{s}" for i in range(num_layers) for s in LINEAR_SUFFIXES]


def _fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float16).to(t.dtype)


def lm_head_weight(w: torch.Tensor, mode: str) -> torch.Tensor:
    """The LM-head weight the engine effectively uses: ``int8`` | ``fp16`` | ``fp32``."""
    if mode == "int8":
        q = quantize_int8_per_channel(w.detach().float().numpy())
        return torch.from_numpy(dequantize_matmul_nbits(q)).to(w.dtype)
    if mode == "fp16":
        return _fp16_round(w)
    if mode == "fp32":
        return w.detach().clone()
    raise ValueError(f"unknown lm_head mode '{mode}': use int8, fp16 or fp32")


def check_gptq_shape(name: str, t: GPTQTensors, out_features: int, in_features: int) -> None:
    if (t.out_features, t.in_features) != (out_features, in_features):
        raise PackingError(
            f"quant tensor {name} is [{t.out_features} x {t.in_features}] (out x in) but the model's "
            f"Linear is [{out_features} x {in_features}]: the GPTQ tensors are for another model")
    if t.qweight.shape != (in_features * t.bits // 32, out_features):
        raise PackingError(f"quant tensor {name}: qweight has shape {t.qweight.shape}, expected "
                           f"{(in_features * t.bits // 32, out_features)}")


def int8_block_quant(x: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """``x`` [..., K] as ``MatMulNBits`` accuracy level 4 sees it: int8 codes per block, dequantised.

    ``groups``: the column order that makes the blocks contiguous (a GPTQ ``g_idx`` argsort) and
    the block count as ``groups.shape[0]``; None for one block over all of K (the int8 LM head).
    Float32 throughout, as the kernel computes it (no transcendental: the same on every CPU).
    """
    xf = x.float()
    k = xf.shape[-1]
    if groups is None:
        xb = xf.unsqueeze(-2)
    else:
        xb = xf.index_select(-1, groups.flatten()).reshape(*xf.shape[:-1], *groups.shape)
    scale = xb.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(xb * inv) * scale  # torch.round: half to even, as the kernel's cvtps
    if groups is None:
        return q.squeeze(-2).to(x.dtype)
    out = torch.empty_like(xf)
    out.index_copy_(-1, groups.flatten(), q.reshape(*xf.shape[:-1], k))
    return out.to(x.dtype)


def _block_order(g_idx: np.ndarray) -> torch.Tensor:
    """[n_blocks, block] column indices of each MatMulNBits block (act-order: permuted)."""
    g = np.asarray(g_idx, dtype=np.int64)
    n_blocks = int(g.max()) + 1
    if np.any(np.bincount(g, minlength=n_blocks) != g.size // n_blocks):
        raise PackingError("GPTQ groups of unequal size: MatMulNBits cannot run this Linear")
    order = np.argsort(g, kind="stable")  # the exporter's permutation (packing.gptq_to_matmul_nbits)
    return torch.from_numpy(order.reshape(n_blocks, -1))


def int8_activations(model: nn.Module, g_idx: Mapping[str, np.ndarray],
                     lm_head: bool = True) -> nn.Module:
    """Quantise the inputs of the quantised Linears (and of an int8 LM head) as ``MatMulNBits``
    accuracy level 4 does, in place (forward pre-hooks); ``g_idx``: each Linear's GPTQ groups."""
    def hook(groups):
        return lambda _mod, args: (int8_block_quant(args[0], groups), *args[1:])

    for name, g in g_idx.items():
        model.get_submodule(name).register_forward_pre_hook(hook(_block_order(g)))
    if lm_head:
        model.lm_head.register_forward_pre_hook(hook(None))
    model.int8_activations = True
    return model


@torch.no_grad()
def fake_quant_model(model: nn.Module, quant_tensors: Mapping[str, GPTQTensors],
                     lm_head: str = "int8", fp16_rest: bool = True,
                     int8_acts: bool = False) -> nn.Module:
    """A copy of ``model`` whose quantised Linears hold the dequantised GPTQ weights.

    ``lm_head``: ``int8`` (per-channel, what the int4 plan ships by default), ``fp16`` or ``fp32``.
    ``fp16_rest``: round the embedding table, the RMSNorm weights and the biases of the quantised
    Linears to fp16, as the int4 ONNX plan stores them. ``int8_acts``: quantise the Linears'
    inputs as the ``cpu`` target's MatMulNBits does (``int8_activations``).
    """
    fq = copy.deepcopy(model).float().eval()
    cfg = fq.cfg
    names = quantized_linear_names(cfg.num_hidden_layers)
    missing = [n for n in names if n not in quant_tensors]
    if missing:
        raise PackingError(f"quant_tensors lacks {len(missing)} Linear(s), first {missing[0]}")
    for name in names:
        mod = fq.get_submodule(name)
        t = quant_tensors[name]
        check_gptq_shape(name, t, mod.out_features, mod.in_features)
        mod.weight.data = torch.from_numpy(dequantize(t))
        if t.bias is not None:
            if mod.bias is None:
                raise PackingError(f"quant tensor {name} has a bias but the model's Linear has none")
            mod.bias.data = torch.from_numpy(t.bias.astype(np.float32))
        elif mod.bias is not None and fp16_rest:
            mod.bias.data = _fp16_round(mod.bias)
    fq.lm_head.weight.data = lm_head_weight(fq.lm_head.weight, lm_head)
    if fp16_rest:
        tr = fq.transformer
        tr.wte.weight.data = _fp16_round(tr.wte.weight)
        for blk in tr.h:
            blk.ln_1.weight.data = _fp16_round(blk.ln_1.weight)
            blk.ln_2.weight.data = _fp16_round(blk.ln_2.weight)
        tr.ln_f.weight.data = _fp16_round(tr.ln_f.weight)
    if int8_acts:
        int8_activations(fq, {n: quant_tensors[n].g_idx for n in names}, lm_head == "int8")
    return fq


def rtn_gptq(w: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True,
             act_order: bool = False, bias: np.ndarray | None = None, seed: int = 0) -> GPTQTensors:
    """Round-to-nearest GPTQ-v1 tensors for one weight [N, K].

    ``act_order``: a random column permutation defines the groups (g_idx non-trivial), as
    desc_act=True GPTQ produces; exercises the exporter's permutation path.
    """
    n, k = w.shape
    if not act_order:
        codes, scales, zeros = rtn_quantize(w, group_size, sym)
        g_idx = np.arange(k) // group_size
    else:
        perm = np.random.default_rng(seed).permutation(k)
        codes_p, scales, zeros = rtn_quantize(w[:, perm], group_size, sym)
        codes = np.empty_like(codes_p)
        codes[:, perm] = codes_p
        g_idx = np.empty(k, dtype=np.int64)
        g_idx[perm] = np.arange(k) // group_size
    return pack_gptq(codes, scales, zeros, g_idx, bias=bias)


class RTNTensors(Mapping):
    """Lazy ``{module_name: GPTQTensors}`` by RTN, computed per Linear on access (full-size use).

    ``get_tensor(name)`` returns a checkpoint tensor (``...weight``/``...bias``); nothing is cached,
    so the exporter can stream a 7B decoder with one Linear in memory at a time.
    """

    def __init__(self, get_tensor: Callable[[str], torch.Tensor], num_layers: int,
                 group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True, act_order: bool = False,
                 has_bias: Callable[[str], bool] | None = None):
        self.get_tensor = get_tensor
        self.names = quantized_linear_names(num_layers)
        self._set = set(self.names)
        self.group_size, self.sym, self.act_order = group_size, sym, act_order
        self.has_bias = has_bias or (lambda n: n.endswith("attn.c_attn"))

    def __getitem__(self, name: str) -> GPTQTensors:
        if name not in self._set:
            raise KeyError(name)
        w = self.get_tensor(name + ".weight").float().numpy()
        bias = None
        if self.has_bias(name):
            bias = self.get_tensor(name + ".bias").float().numpy().astype(np.float16)
        seed = int.from_bytes(name.encode()[-4:], "little")
        return rtn_gptq(w, self.group_size, self.sym, self.act_order, bias, seed)

    def __contains__(self, name: object) -> bool:  # Mapping's default would quantise
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def rtn_gptq_tensors(model: nn.Module, group_size: int = DEFAULT_GROUP_SIZE, sym: bool = True,
                     act_order: bool = False) -> dict[str, GPTQTensors]:
    """Eager RTN tensors for every quantised Linear of a (small) model."""
    params = dict(model.named_parameters())
    lazy = RTNTensors(lambda n: params[n].detach(), model.cfg.num_hidden_layers, group_size, sym,
                      act_order, has_bias=lambda n: n + ".bias" in params)
    return {name: lazy[name] for name in lazy}
