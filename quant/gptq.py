"""GPTQ (Frantar et al. 2022) over the Qwen-VL decoder, one block at a time, on CPU.

Our own implementation (~120 lines of maths in ``gptq_quantize_weight``), not gptqmodel's internal
``GPTQ`` class: gptqmodel 7.6.0 adds ~40 packages / +500 MB (transformers, datasets, pandas,
pyarrow, torchao ...) and its low-level API is internal. The maths is checked in
``tests/test_gptq.py`` against an independent float64 re-implementation of the paper's algorithm
(always run) and against gptqmodel when it happens to be installed (skipped otherwise).

Algorithm, per Linear with weight W [N, K] and calibration inputs X [n, K]:

* ``H = 2/n * X^T X`` (running average), dead inputs (``H_ii == 0``) get ``H_ii = 1, W[:, i] = 0``;
* act-order (``desc_act``): columns sorted by ``diag(H)`` descending; groups are consecutive in that
  order and ``g_idx`` maps each input column to its group (AutoGPTQ semantics);
* ``H += damp_percent * mean(diag H) * I`` (damping grows x10 if the Cholesky fails), then the
  upper Cholesky factor ``U`` of ``H^-1``;
* columns quantised left to right in lazy batches of 128; each column's rounding error divided by
  ``U_jj`` is propagated to the not-yet-quantised columns (``W[:, j:] -= err * U[j, j:]``);
* the scale/zero of a group is computed when its first column is reached, from the *updated*
  weights of the whole group (the paper's rule; AutoGPTQ does the same when group_size equals the
  lazy batch, as in the default g128);
* scales are rounded to fp16 *before* use, so the codes, the fake-quant weights and what the
  checkpoint stores are exactly consistent (``dequantize(pack_gptq(...)) == Q`` bitwise).

Block-sequential driver (``quantize_decoder``): the hidden states entering block 0 (from
image-conditioned prompts, ``quant.calibration``) are pushed through the decoder one block at a
time. Within a block the Linears are quantised in true-sequential order (``attn.c_attn`` ->
``attn.c_proj`` -> ``mlp.w1``/``mlp.w2`` -> ``mlp.c_proj``): each stage's inputs are collected
with the earlier stages already fake-quantised; the forward is cut short as soon as the stage's
inputs are seen. A final pass through the fake-quantised block measures each Linear's output error
``||X W^T - X Q^T||^2`` (exact, on all calibration tokens) and yields the next block's inputs.
Memory: one block (fp32) + its Hessians + the calibration hidden states; blocks can come from a
lazy loader (``CheckpointBlocks``) so the full-size 7B decoder never has to be in memory.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from models.config import QwenVLConfig
from runtime.errors import EdgeError
from models.qwen_vl import QWenBlock, QWenLMHeadModel, rotary_cos_sin

from .fake_quant import LINEAR_SUFFIXES
from .packing import GPTQTensors, pack_gptq
from .plans import DEFAULT_GROUP_SIZE

log = logging.getLogger(__name__)

# True-sequential stages inside one decoder block (module names relative to the block).
STAGES: tuple[tuple[str, ...], ...] = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"),
                                       ("mlp.c_proj",))
assert sorted(s for st in STAGES for s in st) == sorted(LINEAR_SUFFIXES)


class QuantError(EdgeError, ValueError):
    """A quantisation request or result that cannot be represented."""


@dataclass
class QuantConfig:
    """GPTQ settings; field names follow ``quantize_config.json``."""

    bits: int = 4
    group_size: int = DEFAULT_GROUP_SIZE
    sym: bool = True
    desc_act: bool = False
    damp_percent: float = 0.01
    true_sequential: bool = True
    static_groups: bool = False
    block_cols: int = 128  # lazy-batch width of the column loop (not stored in the checkpoint)

    def validate(self, in_features: Iterable[int] = ()) -> None:
        problems = []
        if self.bits != 4:
            problems.append(f"bits={self.bits} (only 4-bit is supported: the engines use int4 "
                            "MatMulNBits)")
        gs = self.group_size
        if not isinstance(gs, int) or gs < 16 or gs & (gs - 1):
            problems.append(f"group_size={gs} (must be a power of two >= 16: MatMulNBits block "
                            "sizes; -1 / per-channel is not supported)")
        else:
            bad = sorted({k for k in in_features if k % gs})
            if bad:
                problems.append(f"group_size={gs} does not divide in_features {bad}")
        if not 0 < float(self.damp_percent) < 1:
            problems.append(f"damp_percent={self.damp_percent} (must lie in (0, 1))")
        if self.static_groups:
            problems.append("static_groups=true is not supported")
        if problems:
            raise QuantError("unsupported GPTQ config: " + "; ".join(problems))

    def quantize_config(self) -> dict:
        """The ``quantize_config.json`` content (AutoGPTQ / GPTQModel v1 layout)."""
        return {"bits": self.bits, "group_size": self.group_size,
                "damp_percent": self.damp_percent, "desc_act": self.desc_act,
                "static_groups": False, "sym": self.sym, "true_sequential": self.true_sequential,
                "model_name_or_path": None, "model_file_base_name": "model",
                "quant_method": "gptq", "checkpoint_format": "gptq"}


@dataclass
class LayerLoss:
    """Quantisation loss of one Linear on the calibration tokens."""

    name: str
    loss: float  # sum over tokens of ||x W^T - x Q^T||^2 (the GPTQ objective, bias excluded)
    rel_loss: float  # loss / sum ||x W^T||^2
    n_tokens: int
    damp: float  # damping actually added (absolute)
    seconds: float  # GPTQ maths time for this Linear

    @property
    def per_token(self) -> float:
        return self.loss / max(1, self.n_tokens)


@dataclass
class QuantResult:
    tensors: dict[str, GPTQTensors]  # "transformer.h.0.attn.c_attn" -> GPTQ v1 tensors
    losses: list[LayerLoss]
    config: QuantConfig
    n_tokens: int = 0
    n_items: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    #: hidden states leaving the last quantised block, one per calibration item (only with
    #: ``quantize_decoder(keep_outputs=True)``): the LM head's calibration inputs before ``ln_f``
    outputs: list[torch.Tensor] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        rel = np.array([x.rel_loss for x in self.losses]) if self.losses else np.zeros(1)
        return {"config": asdict(self.config), "n_items": self.n_items, "n_tokens": self.n_tokens,
                "seconds": round(self.seconds, 2), "rel_loss_mean": float(rel.mean()),
                "rel_loss_max": float(rel.max()),
                "worst": max(self.losses, key=lambda x: x.rel_loss).name if self.losses else None}


# ---------------------------------------------------------------------------------------------
# The GPTQ maths for one weight matrix
# ---------------------------------------------------------------------------------------------

@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # int32 [N, K], original column order, 0..2^bits-1
    scales: torch.Tensor  # float32 [N, G] (fp16-representable)
    zeros: torch.Tensor  # int32 [N, G] real zero points
    g_idx: torch.Tensor  # int32 [K]
    dequant: torch.Tensor  # float32 [N, K] = (codes - zeros[:, g_idx]) * scales[:, g_idx]
    damp: float

    def pack(self, bias: np.ndarray | None = None) -> GPTQTensors:
        return pack_gptq(self.codes.numpy(), self.scales.numpy(), self.zeros.numpy(),
                         self.g_idx.numpy(), bias=bias)


def group_params(w: torch.Tensor, bits: int, sym: bool,
                 round_fp16: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (rounded to fp16) and integer zero point per row of ``w`` [N, g] (min/max grid).

    ``round_fp16=False`` keeps fp32 scales (AutoGPTQ/gptqmodel's loop; only for cross-checks: the
    checkpoint stores fp16, so the fake-quant weights would then differ from the stored ones).
    """
    maxq = (1 << bits) - 1
    if sym:
        amax = w.abs().amax(dim=1)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo = torch.clamp(w.amin(dim=1), max=0)
        hi = torch.clamp(w.amax(dim=1), min=0)
        scale = (hi - lo) / maxq
    flat = scale == 0
    scale = torch.where(flat, torch.ones_like(scale), scale)
    if not round_fp16:
        if not sym:
            zero = torch.clamp(torch.round(-lo / scale), 1, maxq)
        return scale, zero
    # What the checkpoint stores: fp16. Tiny scales would underflow fp16, huge ones overflow.
    scale16 = scale.clamp(min=2.0 ** -24).to(torch.float16)
    if torch.isinf(scale16).any():
        raise QuantError("a weight group's scale overflows fp16 (|w| > ~4.9e5): the weights are "
                         "corrupt or not a trained model")
    scale = scale16.to(w.dtype)
    if not sym:
        # GPTQ v1 stores zero-1 in 4 bits, so a zero point of 0 is not representable.
        zero = torch.clamp(torch.round(-lo / scale), 1, maxq)
    return scale, zero


@contextmanager
def _num_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _tri_inv_lower(lower: torch.Tensor, leaf: int = 512) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2x2 block recursion: GEMM-bound, ~1.5x faster on
    CPU than ``solve_triangular(L, I)`` (which does not exploit the identity right-hand side)."""
    k = lower.shape[0]
    if k <= leaf:
        eye = torch.eye(k, dtype=lower.dtype)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    m = k // 2
    a = _tri_inv_lower(lower[:m, :m], leaf)
    b = _tri_inv_lower(lower[m:, m:], leaf)
    out = torch.zeros_like(lower)
    out[:m, :m] = a
    out[m:, m:] = b
    out[m:, :m] = -(b @ (lower[m:, :m] @ a))
    return out


def _inverse_cholesky(h: torch.Tensor, damp_percent: float, name: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (``H^-1 = U^T U``); damping grows x10 until
    it factorises.

    Computed without forming the inverse: with J the order-reversing permutation and
    ``J H J = L L^T``, ``U = J L^-1 J`` (upper, positive diagonal, hence *the* Cholesky factor).
    One Cholesky + one triangular inverse; ``torch.cholesky_inverse`` is ~30x slower on CPU.
    """
    mean_diag = float(h.diagonal().mean())
    pct = damp_percent
    for attempt in range(6):
        damp = pct * mean_diag
        hf = h.flip((0, 1))
        hf.diagonal().add_(damp)
        chol, info = torch.linalg.cholesky_ex(hf)
        del hf
        if int(info) == 0:
            u = _tri_inv_lower(chol).flip((0, 1))
            del chol
            if attempt:
                log.warning("%s: Hessian needed damp_percent %.3g to factorise", name, pct)
            return u, damp
        pct = min(pct * 10, 1.0)
    raise QuantError(f"{name}: the Hessian is not positive definite even with damp_percent 1.0 "
                     "(NaN/Inf in the calibration activations?)")


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
                         name: str = "linear", compute_dtype: torch.dtype = torch.float32,
                         round_scales_fp16: bool = True) -> QuantizedWeight:
    """GPTQ one weight [N, K] given the Hessian [K, K] of its inputs (``2/n X^T X``).

    ``compute_dtype`` float64 and ``round_scales_fp16=False`` exist for cross-checks only.
    """
    # Small matrices: intra-op threads cost more in synchronisation than they save.
    small = weight.shape[0] * weight.shape[1] < (1 << 22)
    with _num_threads(1 if small else torch.get_num_threads()):
        return _gptq(weight, hessian, config, name, compute_dtype, round_scales_fp16)


@torch.no_grad()
def gptq_quantize_rows(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
                       name: str = "linear", chunk_rows: int = 8192,
                       progress: bool = False) -> Iterator[QuantizedWeight]:
    """GPTQ a tall weight [N, K] in slices of ``chunk_rows`` output rows, one result per slice.

    GPTQ propagates a weight's rounding error along its own row only, so rows are independent
    given the Hessian: the slices share one inverse-Hessian factor (one Cholesky, not one per
    slice) and the temporaries stay the size of a slice (the 151936-row LM head is 2.5 GB in
    fp32). Used for the LM head (``quant.lm_head.gptq_head``).
    """
    n_out = weight.shape[0]
    factor: tuple[torch.Tensor, float] | None = None
    starts = range(0, n_out, chunk_rows)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"GPTQ {name}", unit="slice")
    for a in starts:
        part = weight[a:a + chunk_rows]
        with _num_threads(1 if part.numel() < (1 << 22) else torch.get_num_threads()):
            qw, factor = _gptq_factored(part, hessian, config, f"{name}[{a}:]", torch.float32,
                                        True, factor)
        yield qw


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, name: str,
          compute_dtype: torch.dtype, round_scales_fp16: bool) -> QuantizedWeight:
    return _gptq_factored(weight, hessian, config, name, compute_dtype, round_scales_fp16)[0]


def _gptq_factored(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, name: str,
                   compute_dtype: torch.dtype, round_scales_fp16: bool,
                   factor: tuple[torch.Tensor, float] | None = None
                   ) -> tuple[QuantizedWeight, tuple[torch.Tensor, float]]:
    """``_gptq`` that reuses (or returns) the inverse-Hessian factor ``(U, damp)``."""
    gs = config.group_size
    n_out, k = weight.shape
    _check_gptq_inputs(hessian, k, gs, name)
    wt, h, perm = _prepare(weight, hessian, config, compute_dtype)
    if factor is None:
        factor = _inverse_cholesky(h, config.damp_percent, name)
    u, damp = factor
    del h
    codes, qt, scales, zeros = _quantize_columns(wt, u, config, compute_dtype, round_scales_fp16)
    del wt
    g_idx = torch.arange(k, dtype=torch.int32) // gs
    if perm is not None:
        inv = torch.argsort(perm)
        codes, qt, g_idx = codes[inv], qt[inv], g_idx[inv]
    return QuantizedWeight(codes=codes.T.contiguous(), scales=scales.T.float().contiguous(),
                           zeros=zeros.T.to(torch.int32).contiguous(), g_idx=g_idx.contiguous(),
                           dequant=qt.T.float().contiguous(), damp=damp), factor


def _check_gptq_inputs(hessian: torch.Tensor, k: int, gs: int, name: str) -> None:
    """Refuse group sizes, Hessian shapes and NaN/Inf activations GPTQ cannot handle."""
    if k % gs:
        raise QuantError(f"{name}: in_features {k} is not a multiple of group_size {gs}")
    if hessian.shape != (k, k):
        raise QuantError(f"{name}: Hessian {tuple(hessian.shape)} does not match in_features {k}")
    if not torch.isfinite(hessian).all():
        raise QuantError(f"{name}: the calibration activations contain NaN/Inf")


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig,
             compute_dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """W^T and H in ``compute_dtype`` with dead inputs zeroed, permuted for ``desc_act``."""
    # Work on W^T [K, N]: a weight column is then a contiguous row, and the per-column
    # error propagation a contiguous rank-1 update (a strided one is ~20x slower).
    wt = weight.detach().to(compute_dtype).T.contiguous()
    h = hessian.to(compute_dtype)
    dead = h.diagonal() == 0
    if dead.any():
        h = h.clone()
        h.diagonal()[dead] = 1
        wt[dead] = 0
    perm = None
    if config.desc_act:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        wt = wt[perm]
        h = h[perm][:, perm]
    return wt, h, perm


def _quantize_columns(wt: torch.Tensor, u: torch.Tensor, config: QuantConfig,
                      compute_dtype: torch.dtype, round_scales_fp16: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ column loop in lazy batches; updates ``wt`` in place. Returns codes, dequant,
    scales, zeros (``[K, N]``, ``[K, N]``, ``[G, N]``, ``[G, N]``)."""
    bits, gs, sym = config.bits, config.group_size, config.sym
    maxq = (1 << bits) - 1
    k, n_out = wt.shape
    # Lazy-batch width aligned with the groups, so a group starting inside a batch lies in it.
    bs = config.block_cols
    bs = gs * max(1, bs // gs) if gs <= bs else gs
    n_groups = k // gs
    scales = torch.empty(n_groups, n_out, dtype=compute_dtype)
    zeros = torch.empty(n_groups, n_out, dtype=compute_dtype)
    codes = torch.empty(k, n_out, dtype=torch.int32)
    qt = torch.empty(k, n_out, dtype=compute_dtype)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        count = i2 - i1
        w1 = wt[i1:i2].clone()
        err1 = torch.empty(count, n_out, dtype=compute_dtype)
        u1 = u[i1:i2, i1:i2]
        scale = zero = None
        # The column loop is a chain of small ops: intra-op threads only add synchronisation
        # (10x slower on a busy 2-core machine). The block update below uses all threads.
        with _num_threads(1):
            for i in range(count):
                col = i1 + i
                if col % gs == 0:
                    g = col // gs
                    src = w1[i:i + gs] if i + gs <= count else wt[col:col + gs]
                    scales[g], zeros[g] = group_params(src.T, bits, sym, round_scales_fp16)
                if scale is None or col % gs == 0:
                    scale, zero = scales[col // gs], zeros[col // gs]
                x = w1[i]
                q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
                codes[col] = q.to(torch.int32)
                qd = (q - zero) * scale
                qt[col] = qd
                e = err1[i]
                torch.sub(x, qd, out=e)
                e.div_(u1[i, i])
                w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1)
        if i2 < k:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1)
    return codes, qt, scales, zeros


class Hessian:
    """Running ``2/n X^T X`` over calibration tokens (AutoGPTQ's normalisation), fp32."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        total = self.n + m
        self.h.mul_(self.n / total)
        self.h.addmm_(x.T, x, alpha=2.0 / total)
        self.n = total


# ---------------------------------------------------------------------------------------------
# Block sources: the decoder in memory, or streamed from a checkpoint
# ---------------------------------------------------------------------------------------------

class BlockSource(Protocol):
    cfg: QwenVLConfig

    def num_blocks(self) -> int: ...

    def load(self, i: int) -> QWenBlock:
        """Decoder block ``i`` as an fp32 module the driver may modify."""

    def done(self, i: int, block: QWenBlock) -> None:
        """Called with the fake-quantised block when block ``i`` is finished."""


class ModelBlocks:
    """Blocks of an in-memory model. ``inplace``: write the fake-quant weights (and the
    fp16-rounded biases) of the quantised Linears back into it."""

    def __init__(self, model: QWenLMHeadModel, inplace: bool = False):
        self.model, self.cfg, self.inplace = model, model.cfg, inplace

    def num_blocks(self) -> int:
        return len(self.model.transformer.h)

    def load(self, i: int) -> QWenBlock:
        return copy.deepcopy(self.model.transformer.h[i]).float().eval()

    @torch.no_grad()
    def done(self, i: int, block: QWenBlock) -> None:
        if not self.inplace:
            return
        dst = self.model.transformer.h[i]
        for suffix in LINEAR_SUFFIXES:
            src, tgt = block.get_submodule(suffix), dst.get_submodule(suffix)
            tgt.weight.copy_(src.weight.to(tgt.weight.dtype))
            if tgt.bias is not None:
                tgt.bias.copy_(src.bias.to(tgt.bias.dtype))


class CheckpointBlocks:
    """Blocks materialised one at a time from a checkpoint (``CheckpointReader.get`` per tensor)."""

    def __init__(self, path_or_reader, cfg: QwenVLConfig | None = None):
        from models.checkpoint import CheckpointReader

        self.reader = (path_or_reader if isinstance(path_or_reader, CheckpointReader)
                       else CheckpointReader(path_or_reader))
        self.cfg = cfg or QwenVLConfig.from_pretrained(self.reader.path)
        if self.cfg.quantization_config:
            raise QuantError(f"{self.reader.path} is already quantised: GPTQ needs the fp16/bf16 "
                             "source checkpoint")

    def num_blocks(self) -> int:
        return self.cfg.num_hidden_layers

    def load(self, i: int) -> QWenBlock:
        from models.checkpoint import CheckpointError

        with torch.device("meta"):
            blk = QWenBlock(self.cfg)
        for pname, param in list(blk.named_parameters()):
            full = f"transformer.h.{i}.{pname}"
            t = self.reader.get(full)
            if tuple(t.shape) != tuple(param.shape):
                raise CheckpointError(f"tensor {full} has shape {tuple(t.shape)}, the config "
                                      f"expects {tuple(param.shape)}")
            mod_name, _, attr = pname.rpartition(".")
            blk.get_submodule(mod_name)._parameters[attr] = nn.Parameter(
                t.to(torch.float32).contiguous(), requires_grad=False)
        return blk.eval()

    def done(self, i: int, block: QWenBlock) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The block-sequential driver
# ---------------------------------------------------------------------------------------------

class _StopForward(Exception):
    pass


def block_forward(block: QWenBlock, x: torch.Tensor, cfg: QwenVLConfig) -> torch.Tensor:
    """One prefill pass of a decoder block (positions 0..T-1, causal mask), as the model does."""
    s = x.shape[1]
    cos, sin = rotary_cos_sin(torch.arange(s), cfg.head_dim, cfg.rotary_emb_base)
    mask = QWenLMHeadModel._mask(x.shape[0], s, 0, None, x.dtype)
    return block(x, cos, sin, mask, None)[0]


def _collect_hessians(block: QWenBlock, names: Sequence[str], inputs: Sequence[torch.Tensor],
                      cfg: QwenVLConfig) -> dict[str, Hessian]:
    """Hessians of ``names``' inputs; Linears fed the same tensor (w1/w2) share one Hessian."""
    hessians: dict[str, Hessian] = {}
    alias: dict[str, str | None] = {}  # Linear -> the Linear whose Hessian it shares
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def pre_hook(name: str):
        def fn(_mod, args):
            x = args[0]
            owner = next((o for o, ox in seen.items() if ox is x), None)
            if name not in hessians:
                alias[name] = owner
                hessians[name] = hessians[owner] if owner is not None else Hessian(x.shape[-1])
            if (owner is None) != (alias[name] is None):
                raise QuantError(f"{name}: its input is shared with another Linear for some "
                                 "calibration items but not for others")
            if owner is None:
                hessians[name].add(x)
            seen[name] = x
            if len(seen) == len(names):
                raise _StopForward
        return fn

    for name in names:
        hooks.append(block.get_submodule(name).register_forward_pre_hook(pre_hook(name)))
    try:
        for x in inputs:
            seen.clear()
            try:
                block_forward(block, x, cfg)
            except _StopForward:
                pass
            if len(seen) != len(names):
                raise QuantError(f"the block forward never reached {sorted(set(names) - set(seen))}")
    finally:
        for hk in hooks:
            hk.remove()
        seen.clear()
    return hessians


@torch.no_grad()
def quantize_decoder(model: QWenLMHeadModel | BlockSource, calib_batches: Sequence[torch.Tensor],
                     config: QuantConfig | None = None, *, inplace: bool = False,
                     max_blocks: int | None = None, progress: bool = True,
                     num_threads: int | None = None, keep_outputs: bool = False) -> QuantResult:
    """GPTQ every quantised Linear of the decoder, block by block.

    ``model``: the reference model (blocks are copied; ``inplace=True`` writes the fake-quant
    weights back into it) or a ``BlockSource`` such as ``CheckpointBlocks`` for models that do not
    fit in memory. ``calib_batches``: hidden states entering block 0, each ``[1, T, hidden]``
    (``quant.calibration.build_calibration``). ``max_blocks``: stop after that many blocks (timing
    runs). ``num_threads``: torch threads for the run (default: 1 for tiny test models, whose
    ops are too small to share, else torch's setting). ``keep_outputs``: keep the hidden states
    leaving the last block in ``QuantResult.outputs`` (the quantised decoder's, for GPTQ of the LM
    head without another pass). Returns the GPTQ tensors keyed ``transformer.h.{i}.{linear}``
    and the per-Linear losses.
    """
    source: BlockSource = ModelBlocks(model, inplace) if isinstance(model, QWenLMHeadModel) else model
    if num_threads is None:
        num_threads = 1 if source.cfg.hidden_size < 1024 else torch.get_num_threads()
    with _num_threads(num_threads):
        result = _quantize_decoder(source, calib_batches, config, max_blocks, progress)
    if not keep_outputs:
        result.outputs = []
    return result


def _quantize_decoder(source: BlockSource, calib_batches: Sequence[torch.Tensor],
                      config: QuantConfig | None, max_blocks: int | None,
                      progress: bool) -> QuantResult:
    config = config or QuantConfig()
    cfg = source.cfg
    config.validate((cfg.hidden_size, cfg.ffn_dim))
    inputs = _checked_inputs(calib_batches, cfg.hidden_size)
    n_tokens = sum(x.shape[0] * x.shape[1] for x in inputs)
    stages = STAGES if config.true_sequential else (tuple(s for st in STAGES for s in st),)
    n_blocks = source.num_blocks() if max_blocks is None else min(max_blocks, source.num_blocks())
    result = QuantResult(tensors={}, losses=[], config=config, n_tokens=n_tokens,
                         n_items=len(inputs))
    timing = result.extra.setdefault("timing", {"load_s": 0.0, "collect_s": 0.0, "gptq_s": 0.0,
                                                 "final_s": 0.0})
    t_start = time.perf_counter()
    bar = _progress_bar(n_blocks, progress)
    for i in bar:
        t0 = time.perf_counter()
        block = source.load(i)
        timing["load_s"] += time.perf_counter() - t0
        deltas, damps, secs = _quantize_block(block, i, stages, inputs, cfg, config, result,
                                              timing)
        err, ref = _final_pass(block, deltas, inputs, cfg, timing)
        _record_losses(result, i, err, ref, damps, secs, n_tokens)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(rel=f"{max(err[s] / max(ref[s], 1e-30) for s in err):.2e}")
        del deltas
        log.debug("GPTQ block %d timing so far: %s", i, {k: round(v, 1) for k, v in timing.items()})
        source.done(i, block)
        del block
    result.seconds = time.perf_counter() - t_start
    result.outputs = inputs  # replaced block by block by _final_pass: the last block's outputs
    s = result.summary()
    log.info("GPTQ done: %d Linears over %d blocks, %d items / %d tokens, mean rel loss %.3e, "
             "worst %s, %.1fs", len(result.tensors), n_blocks, len(inputs), n_tokens,
             s["rel_loss_mean"], s["worst"], result.seconds)
    return result


def _checked_inputs(calib_batches: Sequence[torch.Tensor], hidden_size: int) -> list[torch.Tensor]:
    """Detached fp32 copies of the block-0 inputs, refusing empty or mis-shaped ones."""
    if not calib_batches:
        raise QuantError("no calibration inputs: build them with quant.calibration.build_calibration")
    inputs = []
    for x in calib_batches:
        if x.dim() != 3 or x.shape[-1] != hidden_size:
            raise QuantError(f"calibration inputs must be [B, T, {hidden_size}] hidden states, "
                             f"got {tuple(x.shape)}")
        inputs.append(x.detach().float())
    return inputs


def _progress_bar(n_blocks: int, progress: bool):
    """A tqdm bar over the blocks, or a plain range when tqdm is not installed."""
    try:
        from tqdm import tqdm
        return tqdm(range(n_blocks), desc="GPTQ", unit="block", disable=not progress)
    except ImportError:  # pragma: no cover
        return range(n_blocks)


def _quantize_block(block: nn.Module, i: int, stages, inputs: list[torch.Tensor], cfg,
                    config: QuantConfig, result: QuantResult, timing: dict[str, float]
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float]]:
    """GPTQ block ``i``'s Linears stage by stage, writing the fake-quant weights back.

    Returns the weight deltas (for the exact output error), the dampings and the seconds.
    """
    deltas: dict[str, torch.Tensor] = {}
    damps: dict[str, float] = {}
    secs: dict[str, float] = {}
    for stage in stages:
        t0 = time.perf_counter()
        hessians = _collect_hessians(block, stage, inputs, cfg)
        timing["collect_s"] += time.perf_counter() - t0
        for suffix in stage:
            full = f"transformer.h.{i}.{suffix}"
            lin: nn.Linear = block.get_submodule(suffix)
            t0 = time.perf_counter()
            qw = gptq_quantize_weight(lin.weight, hessians[suffix].h, config, full)
            secs[suffix] = time.perf_counter() - t0
            timing["gptq_s"] += secs[suffix]
            # bias None for bias-free Linears (the checkpoint writer stores zeros for them)
            bias = lin.bias.detach().numpy() if lin.bias is not None else None
            result.tensors[full] = qw.pack(bias=bias)
            deltas[suffix] = lin.weight.detach() - qw.dequant
            damps[suffix] = qw.damp
            lin.weight.data = qw.dequant
            if lin.bias is not None:  # the checkpoint stores biases in fp16
                lin.bias.data = lin.bias.data.half().float()
            del qw
        del hessians
    return deltas, damps, secs


def _final_pass(block: nn.Module, deltas: dict[str, torch.Tensor], inputs: list[torch.Tensor],
                cfg, timing: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Exact output error per Linear, replacing ``inputs`` by the next block's inputs in place."""
    err = {s: 0.0 for s in deltas}
    ref = {s: 0.0 for s in deltas}

    def post_hook(suffix: str):
        def fn(mod, args, out):
            x = args[0]
            d = x @ deltas[suffix].T
            y_q = out if mod.bias is None else out - mod.bias
            err[suffix] += float(d.double().pow(2).sum())
            ref[suffix] += float((y_q + d).double().pow(2).sum())
        return fn

    t0 = time.perf_counter()
    hooks = [block.get_submodule(s).register_forward_hook(post_hook(s)) for s in deltas]
    try:
        for j, x in enumerate(inputs):
            inputs[j] = block_forward(block, x, cfg)
    finally:
        for hk in hooks:
            hk.remove()
    timing["final_s"] += time.perf_counter() - t0
    return err, ref


def _record_losses(result: QuantResult, i: int, err: dict[str, float], ref: dict[str, float],
                   damps: dict[str, float], secs: dict[str, float], n_tokens: int) -> None:
    """Append and log one ``LayerLoss`` per Linear of block ``i``."""
    for suffix in LINEAR_SUFFIXES:
        full = f"transformer.h.{i}.{suffix}"
        ll = LayerLoss(full, err[suffix], err[suffix] / max(ref[suffix], 1e-30), n_tokens,
                       damps[suffix], secs[suffix])
        result.losses.append(ll)
        log.info("GPTQ %-32s loss %.4e (%.3e/token) rel %.3e  damp %.3g  %.2fs", full,
                 ll.loss, ll.per_token, ll.rel_loss, ll.damp, ll.seconds)


def quantize_checkpoint(path: str | Path, calib_batches: Sequence[torch.Tensor],
                        config: QuantConfig | None = None, **kw) -> QuantResult:
    """``quantize_decoder`` streaming the blocks from a checkpoint directory (full-size models)."""
    return quantize_decoder(CheckpointBlocks(path), calib_batches, config, **kw)


def fake_quant_rtn_weight(w: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Round-to-nearest fake-quant of one weight with the same grid (baseline for comparisons)."""
    from .packing import rtn_quantize

    codes, scales, zeros = rtn_quantize(w.detach().float().numpy(), config.group_size, config.sym,
                                        config.bits)
    g = np.arange(w.shape[1]) // config.group_size
    return torch.from_numpy(((codes - zeros[:, g]) * scales[:, g]).astype(np.float32))


__all__ = ["QuantConfig", "QuantResult", "LayerLoss", "QuantError", "QuantizedWeight",
           "gptq_quantize_weight", "gptq_quantize_rows", "group_params", "Hessian",
           "quantize_decoder", "quantize_checkpoint", "ModelBlocks", "CheckpointBlocks",
           "BlockSource", "STAGES", "fake_quant_rtn_weight", "block_forward"]
