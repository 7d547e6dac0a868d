"""Vision engine: ViT-bigG + the cross-attention resampler + ``ln_post`` / ``proj`` -> ONNX.

Engine contract (the runtime and the bundle are built against it):

* input  ``pixel_values``  float32 ``[N, 3, S, S]``, N dynamic, S = ``visual.image_size``;
* output ``image_embeds``  float32 ``[N, n_queries, output_dim]``.

Two precisions. ``fp32`` is the reference operation for operation. ``fp16`` casts to fp16 right
after the input and back to fp32 at the output (the I/O stays float32), runs the matmuls / conv /
GELU in fp16, and keeps three *fp32 islands* inside the graph: LayerNorm statistics (every
LayerNormalization node takes and returns float32), the softmax (on fp32 scores) and the residual
stream (the sums ``x + attn(...)`` / ``x + mlp(...)`` are fp32; the resampler's ``kv_proj``, which
reads that stream with no LayerNorm in between, gets it pre-scaled by an exact power of two).
Those are where fp16 ViTs break (spec §7.2: embeddings collapse or overflow). A strongly typed
TensorRT build honours the Casts (exporters/tensorrt.py).

The graph is produced by an export-only twin of the reference (:class:`VisionGraph`) that reads
the reference's weights (shared, not copied, in fp32), with the two bicubic position tables
precomputed and the weight-only query path of the resampler (``ln_q(query) + pos_embed`` then the
q projection) folded into one constant. Every export is checked on real photographs preprocessed
exactly like the runtime does, against the PyTorch fp32 reference, and nothing is written when a
tolerance is exceeded (:class:`VisionCheckError`, with the numbers).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quant.plans import vision_precisions
from runtime.errors import EXIT_FAILED_CHECK, EdgeError
from runtime.files import staging_dir

log = logging.getLogger(__name__)

PIXELS = "pixel_values"
EMBEDS = "image_embeds"
DEFAULT_OPSET = 18  # lowest the dynamo exporter writes; LayerNormalization (17+) is native
MAX_IR_VERSION = 10  # onnxruntime 1.31 (GPU machine) rejects the newer IR onnx 1.23 writes
LARGE_MODEL_BYTES = 2 << 30  # protobuf limit: above it the weights go to <stem>.onnx.data
PRECISIONS = vision_precisions()  # ("fp32", "fp16"): those of the exportable plans
DEFAULT_CHECK_IMAGES = ("astronaut", "chelsea", "coffee")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
META_PREFIX = "qwenvl_edge."
KV_PRESCALE = 32.0  # power of two: see VisionGraph.kv_prescale


class VisionExportError(EdgeError, RuntimeError):
    """The vision tower could not be exported."""


class VisionCheckError(VisionExportError):
    """The exported graph disagrees with PyTorch fp32 beyond tolerance; nothing was written."""

    exit_code = EXIT_FAILED_CHECK

    def __init__(self, message: str, metrics: list["VisionMetrics"]):
        super().__init__(message)
        self.metrics = metrics


# ---------------------------------------------------------------------------------------------
# Tolerances and metrics
# ---------------------------------------------------------------------------------------------

@dataclass
class VisionTolerances:
    """What an exported vision engine must meet against PyTorch fp32, per image.

    ``max_abs`` is in output units (None: not checked); ``max_abs_rel`` is the max-abs error
    divided by the reference's peak |value| (scale-free, so one default fits nano and full-size
    towers). NaN/Inf anywhere in the engine output always fails (``max_nonfinite`` = 0).
    """

    min_cosine: float
    max_rel_l2: float
    max_abs_rel: float | None = None
    max_abs: float | None = None
    max_nonfinite: int = 0

    @classmethod
    def for_precision(cls, precision: str) -> "VisionTolerances":
        if precision == "fp32":
            return cls(min_cosine=0.99999, max_rel_l2=1e-3, max_abs_rel=1e-3)
        if precision == "fp16":
            return cls(min_cosine=0.9995, max_rel_l2=0.03, max_abs_rel=0.05)
        raise ValueError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VisionMetrics:
    """Engine output vs the PyTorch fp32 reference for one image."""

    name: str
    cosine: float  # over the whole [n_queries, dim] feature block
    min_token_cosine: float  # worst of the n_queries feature vectors
    rel_l2: float  # ||engine - ref|| / ||ref||
    max_abs: float
    ref_peak: float  # max |ref|
    nan: int
    inf: int
    failures: list[str] = field(default_factory=list)

    @property
    def max_abs_rel(self) -> float:
        return self.max_abs / self.ref_peak if self.ref_peak > 0 else float("inf")

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self, tol: VisionTolerances) -> list[str]:
        """Fill and return ``failures`` (NaN metrics fail every comparison)."""
        f = []
        if self.nan + self.inf > tol.max_nonfinite:
            f.append(f"{self.nan} NaN + {self.inf} Inf values (allowed {tol.max_nonfinite})")
        if not self.cosine >= tol.min_cosine:
            f.append(f"cosine {self.cosine:.6f} < {tol.min_cosine}")
        if not self.rel_l2 <= tol.max_rel_l2:
            f.append(f"rel L2 {self.rel_l2:.3g} > {tol.max_rel_l2:g}")
        if tol.max_abs_rel is not None and not self.max_abs_rel <= tol.max_abs_rel:
            f.append(f"max-abs {self.max_abs:.3g} = {self.max_abs_rel:.3g} of peak "
                     f"{self.ref_peak:.3g} > {tol.max_abs_rel:g}")
        if tol.max_abs is not None and not self.max_abs <= tol.max_abs:
            f.append(f"max-abs {self.max_abs:.3g} > {tol.max_abs:g}")
        self.failures = f
        return f

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_abs_rel"] = self.max_abs_rel
        d["passed"] = self.passed
        return d

    def line(self) -> str:
        return (f"{self.name}: cosine {self.cosine:.7f} (worst token {self.min_token_cosine:.6f}), "
                f"rel L2 {self.rel_l2:.3g}, max-abs {self.max_abs:.3g} (peak {self.ref_peak:.3g}), "
                f"NaN {self.nan}, Inf {self.inf}")


def feature_metrics(name: str, engine: np.ndarray, ref: np.ndarray) -> VisionMetrics:
    """Metrics of one image's features ``[n_queries, dim]`` (computed in float64)."""
    e = np.asarray(engine, dtype=np.float64).reshape(ref.shape[-2], -1)
    r = np.asarray(ref, dtype=np.float64).reshape(e.shape)
    nan = int(np.isnan(e).sum())
    inf = int(np.isinf(e).sum())
    with np.errstate(all="ignore"):
        diff = e - r
        rn = np.linalg.norm(r)
        cos = float(np.sum(e * r) / (np.linalg.norm(e) * rn)) if rn > 0 else float("nan")
        tok = np.sum(e * r, -1) / (np.linalg.norm(e, axis=-1) * np.linalg.norm(r, axis=-1))
        min_tok = float(np.min(tok)) if not np.isnan(tok).any() else float("nan")
        rel = float(np.linalg.norm(diff) / rn) if rn > 0 else float("nan")
        mab = float(np.max(np.abs(diff))) if not (nan or inf) else float("nan")
    return VisionMetrics(name=name, cosine=cos, min_token_cosine=min_tok, rel_l2=rel, max_abs=mab,
                         ref_peak=float(np.max(np.abs(r))), nan=nan, inf=inf)


# ---------------------------------------------------------------------------------------------
# Check images: real photographs, preprocessed like the runtime
# ---------------------------------------------------------------------------------------------

def _pil_preprocess(img: Any, image_size: int) -> np.ndarray:
    """Spec §3.1 / Appendix 4: PIL bicubic squash to SxS, /255, CLIP mean/std -> [3,S,S]."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img))
    img = img.convert("RGB").resize((image_size, image_size), Image.BICUBIC)
    a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    a = (a - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


def preprocess_fn():
    """The runtime's preprocessing when it is importable (one implementation), else the spec's."""
    try:
        from runtime.image import preprocess  # type: ignore[import-not-found]
    except ImportError:
        log.debug("runtime.image not importable; using the built-in copy of the preprocessing")
        return _pil_preprocess
    return preprocess


def _open_image(item: Any) -> tuple[str, Any]:
    from PIL import Image

    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        name, img = item
        return name, _open_image(img)[1]
    if isinstance(item, (str, Path)):
        s = str(item)
        if not os.path.exists(s):
            import skimage.data

            if hasattr(skimage.data, s):  # a skimage.data photo by name
                return s, getattr(skimage.data, s)()
            raise FileNotFoundError(f"check image not found: {s}")
        try:
            from runtime.image import load_image  # type: ignore[import-not-found]
            return Path(s).name, load_image(s)
        except ImportError:
            with Image.open(s) as im:
                return Path(s).name, im.convert("RGB")
    if isinstance(item, Image.Image):
        return getattr(item, "filename", "") or "image", item
    return "array", np.asarray(item)


def check_pixels(images: Iterable[Any] | None, image_size: int) -> tuple[list[str], np.ndarray]:
    """Names and preprocessed pixels ``[N,3,S,S]`` float32 of the check images.

    ``images`` items: a ``skimage.data`` photo name ("astronaut"), a file path, a PIL image, an
    HxWx3 uint8 array, or a ``(name, image)`` pair. Default: three real photographs.
    """
    items = list(images) if images is not None else list(DEFAULT_CHECK_IMAGES)
    if not items:
        raise ValueError("at least one check image is needed")
    pre = preprocess_fn()
    names, arrays = [], []
    for it in items:
        name, img = _open_image(it)
        a = np.asarray(pre(img, image_size), dtype=np.float32)
        if a.shape != (3, image_size, image_size):
            raise VisionExportError(f"preprocessing gave {a.shape} for {name}, expected "
                                    f"(3, {image_size}, {image_size})")
        names.append(name)
        arrays.append(a)
    return names, np.stack(arrays)


# ---------------------------------------------------------------------------------------------
# The export-only graph
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# onnxruntime sessions
# ---------------------------------------------------------------------------------------------

def onnx_metadata(onnx_path: str | Path) -> dict[str, str]:
    """``qwenvl_edge.*`` metadata of an exported engine (weights not loaded)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key[len(META_PREFIX):]: p.value for p in m.metadata_props
            if p.key.startswith(META_PREFIX)}


def _is_fp16_graph(onnx_path: str | Path) -> bool:
    meta = onnx_metadata(onnx_path)
    if "precision" in meta:
        return meta["precision"] == "fp16"
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)


def make_session(onnx_path: str | Path, providers: Sequence[str] | None = None,
                 fp16: bool | None = None, threads: int | None = None,
                 optimization_level: str | None = None):
    """onnxruntime session for a vision engine.

    On the CPU provider an fp16 ViT segfaults at the default ORT_ENABLE_ALL (dependencies.md
    §4: a Conv -> LayerNorm fusion), so fp16 graphs whose first provider is the CPU get
    ORT_ENABLE_EXTENDED, and no memory arena. ``providers`` defaults to CUDA (when present),
    then CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    providers = list(providers)
    missing = [p for p in providers if p not in available]
    if missing:
        raise VisionExportError(f"onnxruntime has no {', '.join(missing)} here (available: "
                                f"{', '.join(available)})")
    if fp16 is None:
        fp16 = _is_fp16_graph(onnx_path)
    so = ort.SessionOptions()
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization_level is None:
        cpu_first = providers[0] == "CPUExecutionProvider"
        optimization_level = "extended" if fp16 and cpu_first else "all"
    so.graph_optimization_level = levels[optimization_level]
    if fp16 and providers[0] == "CPUExecutionProvider":
        # x86 CPUs run the fp16 MatMuls through fp32 casts of the weights; with the arena those
        # buffers stay allocated (ViT-bigG: 19 GB peak instead of ~6; measured, 4-layer: 2.5 GB
        # vs 1.7 GB), so give them back after each run.
        so.enable_cpu_mem_arena = False
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not fp16 and "CUDAExecutionProvider" in providers:
        # An fp32 engine is checked at fp32 tolerances: no TF32 matmuls behind our back.
        providers = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
                     for p in providers]
    return ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)


def run_session(session, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Run ``pixels [N,3,S,S]`` through a vision session, ``batch_size`` images at a time."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    bs = batch_size or len(pixels)
    outs = [session.run([EMBEDS], {PIXELS: pixels[i:i + bs]})[0]
            for i in range(0, len(pixels), bs)]
    return np.concatenate(outs)


@torch.no_grad()
def reference_features(visual: nn.Module, pixels: np.ndarray | torch.Tensor,
                       batch_size: int = 1) -> np.ndarray:
    """PyTorch fp32 reference features, ``batch_size`` images at a time (memory-friendly)."""
    px = torch.as_tensor(np.asarray(pixels, dtype=np.float32))
    return np.concatenate([visual(px[i:i + batch_size]).float().numpy()
                           for i in range(0, len(px), batch_size)])


def compare_vision(onnx_path: str | Path, torch_visual: nn.Module | np.ndarray,
                   pixels: np.ndarray, providers: Sequence[str] | None = None,
                   names: Sequence[str] | None = None, tolerances: VisionTolerances | None = None,
                   batch_size: int | None = None, session=None) -> list[VisionMetrics]:
    """Per-image metrics of an ONNX vision engine against PyTorch fp32.

    ``torch_visual`` is the fp32 reference module, or its features already computed
    (``[N, n_queries, dim]``). With ``tolerances`` each metric's ``failures`` is filled in.
    """
    if isinstance(torch_visual, nn.Module):
        ref = reference_features(torch_visual, pixels)
    else:
        ref = np.asarray(torch_visual, dtype=np.float32)
    sess = session or make_session(onnx_path, providers)
    out = run_session(sess, pixels, batch_size)
    return metrics_from_outputs(out, ref, names, tolerances, str(onnx_path))


def metrics_from_outputs(out: np.ndarray, ref: np.ndarray, names: Sequence[str] | None = None,
                         tolerances: VisionTolerances | None = None,
                         what: str = "engine") -> list[VisionMetrics]:
    """Per-image metrics of engine outputs against reference features (same shape)."""
    if out.shape != ref.shape:
        raise VisionCheckError(f"{what}: output {out.shape} != reference {ref.shape}", [])
    names = list(names) if names is not None else [f"image{i}" for i in range(len(ref))]
    metrics = [feature_metrics(nm, o, r) for nm, o, r in zip(names, out, ref)]
    if tolerances is not None:
        for m in metrics:
            m.check(tolerances)
    return metrics


# ---------------------------------------------------------------------------------------------
# Graph summary
# ---------------------------------------------------------------------------------------------

def graph_summary(onnx_path: str | Path) -> dict[str, Any]:
    """Op counts, sizes, I/O and the dtypes LayerNormalization / Softmax run in."""
    import onnx

    path = Path(onnx_path)
    m = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(m)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(g.value_info) + list(g.input) + list(g.output)}
    for t in g.initializer:
        types[t.name] = t.data_type
    dname = {v: onnx.helper.tensor_dtype_to_np_dtype(v).name
             for v in set(types.values()) if v}

    def in_dtypes(op: str) -> dict[str, int]:
        c = Counter(dname.get(types.get(n.input[0], 0), "?") for n in g.node if n.op_type == op)
        return dict(c)

    n_params = 0
    n_bytes = 0
    init_dtypes: Counter = Counter()
    for t in m.graph.initializer:
        numel = int(np.prod(t.dims)) if len(t.dims) else 1
        n_params += numel
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        n_bytes += numel * dt.itemsize
        init_dtypes[dt.name] += numel

    def io(v) -> dict[str, Any]:
        tt = v.type.tensor_type
        return {"name": v.name, "dtype": dname.get(tt.elem_type, str(tt.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]}

    files = {p.name: p.stat().st_size for p in (path, path.with_name(path.name + ".data"))
             if p.exists()}
    return {
        "ir_version": m.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "nodes": len(m.graph.node),
        "op_counts": dict(Counter(n.op_type for n in m.graph.node).most_common()),
        "initializers": len(m.graph.initializer),
        "parameters": n_params,
        "weight_bytes": n_bytes,
        "weight_dtypes": dict(init_dtypes),
        "external_data": any(t.data_location == onnx.TensorProto.EXTERNAL
                             for t in m.graph.initializer),
        "file_bytes": files,
        "inputs": [io(v) for v in m.graph.input],
        "outputs": [io(v) for v in m.graph.output],
        "layernorm_input_dtypes": in_dtypes("LayerNormalization"),
        "softmax_input_dtypes": in_dtypes("Softmax"),
        "matmul_input_dtypes": in_dtypes("MatMul"),
    }


def summary_line(s: dict[str, Any]) -> str:
    ops = ", ".join(f"{k} {v}" for k, v in list(s["op_counts"].items())[:12])
    size = sum(s["file_bytes"].values()) / 2**20
    return (f"{s['nodes']} nodes ({ops}); {s['parameters'] / 1e6:.1f} M parameters "
            f"{dict(s['weight_dtypes'])}; {size:.1f} MiB on disk"
            f"{' (external data)' if s['external_data'] else ''}; IR {s['ir_version']}, "
            f"opset {s['opsets']}; LayerNorm in {s['layernorm_input_dtypes']}, "
            f"Softmax in {s['softmax_input_dtypes']}")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

@dataclass
class VisionExportResult:
    onnx_path: Path
    precision: str
    fp32_islands: bool
    opset: int
    ir_version: int
    image_size: int
    n_queries: int
    output_dim: int
    metrics: list[VisionMetrics]
    tolerances: VisionTolerances
    graph: dict[str, Any]
    files: list[Path]
    providers: list[str]
    batch_consistency_max_abs: float | None
    timings: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(m.passed for m in self.metrics)

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_path": str(self.onnx_path), "precision": self.precision,
            "fp32_islands": self.fp32_islands, "opset": self.opset,
            "ir_version": self.ir_version,
            "input": {"name": PIXELS, "dtype": "float32",
                      "shape": ["N", 3, self.image_size, self.image_size]},
            "output": {"name": EMBEDS, "dtype": "float32",
                       "shape": ["N", self.n_queries, self.output_dim]},
            "metrics": [m.to_dict() for m in self.metrics],
            "tolerances": self.tolerances.to_dict(), "graph": self.graph,
            "files": [str(f) for f in self.files], "providers": self.providers,
            "batch_consistency_max_abs": self.batch_consistency_max_abs,
            "timings": self.timings, "passed": self.passed,
        }


def resolve_visual(model_or_checkpoint: Any) -> tuple[nn.Module, bool]:
    """(fp32 ``VisionTransformer``, whether this call owns it) from a path or a module."""
    from models.qwen_vl import VisionTransformer

    if isinstance(model_or_checkpoint, (str, Path)):
        from models.checkpoint import load_model

        t = time.perf_counter()
        model = load_model(model_or_checkpoint, torch.float32, prefixes=["transformer.visual."])
        log.info("loaded the vision tower of %s in %.1f s", model_or_checkpoint,
                 time.perf_counter() - t)
        return model.transformer.visual, True
    m = model_or_checkpoint
    if not isinstance(m, VisionTransformer):
        m = getattr(getattr(m, "transformer", None), "visual", None)
        if not isinstance(m, VisionTransformer):
            raise TypeError("export_vision takes a checkpoint directory, a QWenLMHeadModel or its "
                            f"transformer.visual, not {type(model_or_checkpoint).__name__}")
    if m.conv1.weight.dtype != torch.float32:
        log.warning("the vision tower is %s: checking against an fp32 copy of it",
                    m.conv1.weight.dtype)
        m = copy.deepcopy(m).float()
        return m.eval(), True
    return m.eval(), False


def _release_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _tqdm_save_callback(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None, contextlib.nullcontext()
    bar = tqdm(desc=desc, unit="B", unit_scale=True, leave=False,
               disable=not log.isEnabledFor(logging.INFO))

    def cb(tensor, info) -> None:
        if bar.total is None:
            bar.total = info.total
        bar.update(int(getattr(tensor, "nbytes", 0) or 0))

    return cb, bar


def _export_to(graph: VisionGraph, example: torch.Tensor, dest: Path, opset: int,
               max_batch: int, metadata: dict[str, str]) -> tuple[int, int]:
    """Dynamo export + IR downgrade + save (external data above 2 GB). Returns (ir, bytes)."""
    import onnx.helper
    import onnx_ir as ir

    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with _quiet_exporter():
        prog = torch.onnx.export(graph, (example,), input_names=[PIXELS], output_names=[EMBEDS],
                                 dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                 optimize=True, verbose=False)
    model = prog.model
    if model.opset_imports.get("", opset) != opset:
        raise VisionExportError(f"the exporter wrote opset {model.opset_imports['']}, not {opset}")
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    ir_version = min(MAX_IR_VERSION, max(onnx.helper.find_min_ir_version_for(opsets), 7))
    model.ir_version = ir_version
    model.producer_name = "qwenvl-edge"
    model.metadata_props.update({META_PREFIX + k: v for k, v in metadata.items()})
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)
    if size > LARGE_MODEL_BYTES:
        cb, bar = _tqdm_save_callback(f"writing {dest.name}.data")
        with bar, _quiet_exporter():
            ir.save(model, dest, external_data=dest.name + ".data", alignment=65536, callback=cb)
    else:
        with _quiet_exporter():
            ir.save(model, dest)
    _drop_ir_tensors(model)
    del prog, model
    return ir_version, size


def _drop_ir_tensors(model) -> None:
    """Let the exported weights go once saved.

    onnxscript's module-level rewrite rules keep the last graph they matched (``_graph``), and
    through it every initializer, which wraps the torch weights: without this the full-size
    fp32 tower (7.7 GB) stays alive next to the onnxruntime session that checks it.
    """
    graph = model.graph
    for value in list(graph.initializers.values()):
        with contextlib.suppress(Exception):
            value.const_value = None
    graph.initializers.clear()
    for ref in gc.get_referrers(graph):
        if isinstance(ref, dict) and ref.get("_graph") is graph:
            for key in ("_graph", "_current_node", "_match"):
                if key in ref:
                    ref[key] = None


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints progress lines and torchvision warnings; route them to DEBUG."""
    import io
    from contextlib import redirect_stdout

    import warnings

    names = ["torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir"]
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    buf = io.StringIO()
    try:
        with redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for n, lv in levels.items():
            logging.getLogger(n).setLevel(lv)
        for line in buf.getvalue().splitlines():
            log.debug("exporter: %s", line)


def export_vision(model_or_checkpoint: Any, out_path: str | Path, precision: str = "fp32",
                  opset: int = DEFAULT_OPSET, check_images: Iterable[Any] | None = None,
                  tolerances: VisionTolerances | None = None,
                  providers: Sequence[str] | None = None, reference: nn.Module | None = None,
                  fp32_islands: bool = True, max_batch: int = 64,
                  write_trt_script: bool = True, trt_max_batch: int = 4) -> VisionExportResult:
    """Export the vision engine to ``out_path`` (``.../vision.onnx``), checked before writing.

    ``model_or_checkpoint``: a checkpoint directory (only ``transformer.visual.*`` is read), a
    ``QWenLMHeadModel`` or its ``transformer.visual``. ``reference``: the fp32 module to check
    against (default: the model itself, in fp32). ``check_images`` default to three
    ``skimage.data`` photographs. The check runs all images as one batch and the first alone
    (dynamic batch), on ``providers`` (default CUDA when present, else CPU). On failure nothing
    is written and :class:`VisionCheckError` says which image broke which tolerance.
    With ``write_trt_script`` the ``trtexec`` / ``polygraphy`` commands (and the check inputs they
    use) are written next to the model (see exporters/tensorrt.py).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if not fp32_islands and precision != "fp16":
        raise ValueError("fp32_islands=False only means something for precision='fp16'")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} < {DEFAULT_OPSET}: the dynamo exporter cannot write it")
    tolerances = tolerances or VisionTolerances.for_precision(precision)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"{out_path}: the engine file name must end in .onnx")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    visual, owned = resolve_visual(model_or_checkpoint)
    cfg = visual.cfg
    visual.freeze_position_tables()
    ref_model = reference if reference is not None else visual
    names, pixels = check_pixels(check_images, cfg.image_size)
    timings["load_s"] = time.perf_counter() - t0

    # 1. Reference features first, so the torch weights can be dropped before the ORT session.
    t = time.perf_counter()
    ref = reference_features(ref_model, pixels)
    timings["reference_s"] = time.perf_counter() - t
    if ref.shape[1:] != (cfg.n_queries, cfg.output_dim):
        raise VisionExportError(f"reference output {ref.shape} is not [N, {cfg.n_queries}, "
                                f"{cfg.output_dim}]")

    with staging_dir(out_path) as tmp_dir:
        # 2. Export.
        t = time.perf_counter()
        graph = VisionGraph(visual, precision, fp32_islands, consume=owned).eval()
        if owned:
            del visual
        if reference is None:
            del ref_model
        example = torch.as_tensor(pixels[:1]).repeat(2, 1, 1, 1)  # batch 2: keeps N symbolic
        meta = {"precision": precision, "fp32_islands": str(fp32_islands).lower(),
                "image_size": str(cfg.image_size), "n_queries": str(cfg.n_queries),
                "output_dim": str(cfg.output_dim), "input": PIXELS, "output": EMBEDS}
        tmp_onnx = tmp_dir / out_path.name
        log.info("exporting the vision tower (%s%s, opset %d) ...", precision,
                 ", fp32 LayerNorm/softmax/residual" if precision == "fp16" and fp32_islands
                 else "", opset)
        ir_version, _ = _export_to(graph, example, tmp_onnx, opset, max_batch, meta)
        del graph, example
        _release_memory()
        timings["export_s"] = time.perf_counter() - t
        summary = graph_summary(tmp_onnx)
        log.info("vision.onnx: %s", summary_line(summary))

        # 3. Check with onnxruntime: all images as one batch, then the first image alone.
        t = time.perf_counter()
        sess = make_session(tmp_onnx, providers, fp16=precision == "fp16")
        used = sess.get_providers()
        timings["session_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out = run_session(sess, pixels)
        metrics = metrics_from_outputs(out, ref, names, tolerances)
        batch_dev = None
        if len(pixels) > 1:  # dynamic batch: the first image alone must match its batched run
            single = run_session(sess, pixels[:1])
            batch_dev = float(np.max(np.abs(single[0].astype(np.float64) - out[0])))
        timings["check_s"] = time.perf_counter() - t
        del sess
        _release_memory()
        for m in metrics:
            log.info("check %s [%s]: %s", precision, "ok" if m.passed else "FAIL", m.line())
        failed = [m for m in metrics if not m.passed]
        if failed:
            lines = "; ".join(f"{m.name}: " + ", ".join(m.failures) for m in failed)
            raise VisionCheckError(
                f"vision engine check FAILED ({precision}, {len(failed)}/{len(metrics)} images), "
                f"not written to {out_path}: {lines}. All images: "
                + " | ".join(m.line() for m in metrics), metrics)

        # 4. Move into place: external data first, the .onnx last (its presence = complete).
        files = []
        data_name = out_path.name + ".data"
        if (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, out_path.with_name(data_name))
            files.append(out_path.with_name(data_name))
        elif out_path.with_name(data_name).exists():
            out_path.with_name(data_name).unlink()  # stale weights of an earlier, larger export
        os.replace(tmp_onnx, out_path)
        files.insert(0, out_path)

    if write_trt_script:
        from .tensorrt import trt_command_files, write_trt_commands

        write_trt_commands(out_path, out_path.parent, image_size=cfg.image_size,
                           max_batch=trt_max_batch, precision=precision, check_pixels=pixels,
                           check_reference=ref, tolerances=tolerances)
        files += trt_command_files(out_path.parent)
    timings["total_s"] = time.perf_counter() - t0
    summary["file_bytes"] = {p.name: p.stat().st_size for p in files[:2] if p.suffix in
                             (".onnx", ".data")}
    result = VisionExportResult(
        onnx_path=out_path, precision=precision, fp32_islands=fp32_islands, opset=opset,
        ir_version=ir_version, image_size=cfg.image_size, n_queries=cfg.n_queries,
        output_dim=cfg.output_dim, metrics=metrics, tolerances=tolerances, graph=summary,
        files=files, providers=used, batch_consistency_max_abs=batch_dev, timings=timings)
    log.info("wrote %s (%s) in %.1f s", out_path, precision, timings["total_s"])
    return result
