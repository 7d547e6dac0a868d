"""Static int8 KV-cache scales, calibrated on the calibration split, and the PyTorch mirror of
the int8 cache onnxruntime's GroupQueryAttention keeps (the ``edge`` plan's ``cpu`` target).

What the CPU kernel does with ``kv_cache_bit_width=8`` (onnxruntime 1.32, measured on tiny graphs;
``tests/test_kv8.py`` checks it against :func:`fake_quant_kv`):

* ``PER_CHANNEL`` scales have ``kv_num_heads * head_dim`` elements, channel ``h * D + d`` (any
  shape of that size, e.g. ``[1, H, 1, D]`` or ``[H * D]``; ``[1, H, 1, 1]`` is refused),
  ``PER_TENSOR`` one element;
* a new key (after RoPE: our graph rotates before the attention node) or value is stored as
  ``round(x * (1 / scale))``: multiplied by the float32 reciprocal of the scale (a true
  division differs on ~13 % of near-tie values; the reciprocal on none of 102,400 tested), ties
  to even, saturated to ``[-128, 127]``;
* attention reads every row of the cache as ``code * scale``, the rows written by this very call
  included, in the prefill too: no row is ever read in float.

So the mirror rounds each new key and value that way before the reference's attention sees it
(``QWenAttention.kv_hook``), and the same-precision reference of the drift report computes what
the engine computes. Scales are ``amax / 127`` per channel over the teacher-forced calibration
prompts (image features spliced in, as GPTQ calibrates), run through the model the decoder is
built from (the GPTQ checkpoint's dequantised weights for the int4 plans, so an imported
Qwen-VL-Chat-Int4 is calibrated on itself).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.errors import EdgeError
from runtime.files import atomic_write_bytes

log = logging.getLogger(__name__)

GRANULARITIES = {"channel": "PER_CHANNEL", "tensor": "PER_TENSOR"}  # ours -> the kernel's name
QMIN, QMAX = -128, 127
_MIN_AMAX = 1e-6  # a channel that never fired still gets a finite, non-zero scale


class KVScaleError(EdgeError, ValueError):
    """Scales that do not fit the model or cannot be read."""


@dataclass(frozen=True)
class KVScales:
    """Per-layer fp32 scales: ``key`` and ``value`` ``[L, C]``, ``C = H * D`` (channel) or 1."""

    key: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        k, v = np.asarray(self.key), np.asarray(self.value)
        if k.shape != v.shape or k.ndim != 2 or not (np.all(np.isfinite(k)) and np.all(k > 0)
                                                     and np.all(np.isfinite(v)) and np.all(v > 0)):
            raise KVScaleError(f"KV scales must be two positive finite [layers, channels] arrays "
                               f"of one shape, got {k.shape} and {v.shape}")

    @property
    def layers(self) -> int:
        return int(self.key.shape[0])

    @property
    def quant_type(self) -> str:
        """GroupQueryAttention's ``k_quant_type`` / ``v_quant_type``."""
        return "PER_TENSOR" if self.key.shape[1] == 1 else "PER_CHANNEL"

    @property
    def nbytes(self) -> int:
        return int(self.key.nbytes + self.value.nbytes)

    def check(self, layers: int, heads: int, head_dim: int) -> None:
        """Refuse scales of another model shape."""
        if self.layers != layers or self.key.shape[1] not in (1, heads * head_dim):
            raise KVScaleError(f"KV scales {self.key.shape} do not fit {layers} layers x "
                               f"{heads * head_dim} channels: calibrate them on this model")

    def save(self, path: str | Path) -> Path:
        buf = io.BytesIO()
        np.savez(buf, key=self.key.astype(np.float32), value=self.value.astype(np.float32))
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "KVScales":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["key"].astype(np.float32), z["value"].astype(np.float32))
        except (OSError, KeyError, ValueError) as e:
            raise KVScaleError(f"cannot read KV scales {path}: {e}: rerun the export") from None


def scale_names(layer: int) -> tuple[str, str]:
    """Initializer names of layer ``layer``'s key and value scales in the decoder graph."""
    p = f"transformer.h.{layer}.attn"
    return f"{p}.k_scale", f"{p}.v_scale"


def read_engine_scales(onnx_path: str | Path) -> KVScales | None:
    """The scales an int8-KV decoder engine holds (``None`` for a float cache), read from its
    initializers (external data by offset, so a 7B engine is not loaded): validation mirrors
    exactly what the engine under judgment stores."""
    import onnx
    from onnx import numpy_helper

    path = Path(onnx_path)
    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}

    def arr(t: onnx.TensorProto) -> np.ndarray:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        ext = {e.key: e.value for e in t.external_data}
        with open(path.parent / ext["location"], "rb") as f:
            f.seek(int(ext.get("offset", 0)))
            raw = f.read(int(ext["length"]))
        return np.frombuffer(raw, np.float32).reshape(list(t.dims)).copy()

    rows = []
    for i in range(sum(1 for n in inits if n.endswith(".attn.k_scale"))):
        kn, vn = scale_names(i)
        if kn not in inits or vn not in inits:
            raise KVScaleError(f"{path} lacks {kn} / {vn}: re-export the decoder")
        rows.append((arr(inits[kn]).reshape(-1), arr(inits[vn]).reshape(-1)))
    if not rows:
        return None
    return KVScales(np.stack([k for k, _ in rows]), np.stack([v for _, v in rows]))


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` as the int8 cache returns it: ``clamp(round(x * (1 / scale)), -128, 127) * scale``
    in float32 (the kernel multiplies by the reciprocal; ties to even); ``scale`` broadcasts
    over ``x``'s last two dims ``[H, D]`` (or is a scalar)."""
    xf = x.float()
    q = torch.clamp(torch.round(xf * (1.0 / scale.float())), QMIN, QMAX)
    return (q * scale).to(x.dtype)


def _layer_scale(row: np.ndarray, heads: int, head_dim: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(row, dtype=np.float32))
    return t.reshape(()) if t.numel() == 1 else t.reshape(heads, head_dim)


def int8_kv(model: nn.Module, scales: KVScales) -> nn.Module:
    """Make ``model`` (a ``QWenLMHeadModel``) keep its KV cache as the int8 engine does, in
    place: every new key (after RoPE) and value is fake-quantised before attention reads it."""
    cfg = model.cfg
    scales.check(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim)
    for i, blk in enumerate(model.transformer.h):
        ks = _layer_scale(scales.key[i], cfg.num_attention_heads, cfg.head_dim)
        vs = _layer_scale(scales.value[i], cfg.num_attention_heads, cfg.head_dim)
        blk.attn.kv_hook = (lambda k, v, ks=ks, vs=vs: (fake_quant_kv(k, ks), fake_quant_kv(v, vs)))
    model.int8_kv = True
    return model


class _AmaxRecorder:
    """``kv_hook`` that records the per-channel max |key| / |value| of one layer."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ka = k.detach().float().abs().flatten(0, 1).amax(0).flatten()  # [B,S,H,D] -> [H*D]
        va = v.detach().float().abs().flatten(0, 1).amax(0).flatten()
        self.k = ka if self.k is None else torch.maximum(self.k, ka)
        self.v = va if self.v is None else torch.maximum(self.v, va)
        return k, v


@torch.no_grad()
def calibrate_kv_blocks(blocks, batches: Iterable[torch.Tensor], granularity: str = "channel",
                        clip: float = 1.0) -> KVScales:
    """Scales ``clip * amax / 127`` of every layer's keys (after RoPE) and values over
    ``batches`` (``inputs_embeds [1, T, hidden]`` from ``quant.calibration.build_calibration``:
    the calibration split, never validation items), one decoder block in memory at a time
    (``blocks``: a ``quant.gptq.BlockSource``, e.g. ``quant.checkpoint.GPTQBlocks``, so a 7B
    checkpoint is calibrated block by block as GPTQ quantises it). ``granularity``: ``channel``
    | ``tensor``; ``clip`` < 1 saturates the largest values for finer steps (bench.kv_cache)."""
    from tqdm import tqdm

    from .gptq import block_forward

    if not 0 < clip <= 1:
        raise KVScaleError(f"clip must be in (0, 1], not {clip}")
    if granularity not in GRANULARITIES:
        raise KVScaleError(f"granularity must be one of {', '.join(GRANULARITIES)}, "
                           f"not '{granularity}'")
    xs = [x.float() for x in batches]
    if not xs:
        raise KVScaleError("KV scales need at least one calibration item")
    k_amax, v_amax = [], []
    for i in tqdm(range(blocks.num_blocks()), desc="KV scales", unit="block", disable=None):
        blk = blocks.load(i)
        rec = _AmaxRecorder()
        blk.attn.kv_hook = rec
        xs = [block_forward(blk, x, blocks.cfg) for x in xs]
        k_amax.append(rec.k)
        v_amax.append(rec.v)
        del blk

    def scale(amax: list[torch.Tensor]) -> np.ndarray:
        a = torch.stack(amax).numpy().astype(np.float64)
        if granularity == "tensor":
            a = a.max(1, keepdims=True)
        return (np.maximum(a * clip, _MIN_AMAX) / QMAX).astype(np.float32)

    out = KVScales(scale(k_amax), scale(v_amax))
    log.info("KV scales (%s, %d items): key amax %.3g..%.3g, value amax %.3g..%.3g", granularity,
             len(xs), out.key.min() * QMAX, out.key.max() * QMAX, out.value.min() * QMAX,
             out.value.max() * QMAX)
    return out


def calibrate_kv_scales(model: nn.Module, batches: Iterable[torch.Tensor],
                        granularity: str = "channel", clip: float = 1.0) -> KVScales:
    """:func:`calibrate_kv_blocks` over the blocks of an in-memory ``QWenLMHeadModel``."""
    from .gptq import ModelBlocks

    return calibrate_kv_blocks(ModelBlocks(model), batches, granularity, clip)


def scales_info(s: KVScales) -> Mapping[str, object]:
    """A short summary for stage records and reports."""
    return {"quant_type": s.quant_type, "layers": s.layers, "channels": int(s.key.shape[1]),
            "key_amax_max": float(s.key.max() * QMAX),
            "value_amax_max": float(s.value.max() * QMAX)}


__all__ = ["GRANULARITIES", "KVScaleError", "KVScales", "calibrate_kv_blocks",
           "calibrate_kv_scales", "fake_quant_kv",
           "int8_kv", "read_engine_scales", "scale_names", "scales_info"]
