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
Those are where fp16 ViTs break (image embeddings collapse or overflow). A strongly typed
TensorRT build honours the Casts (exporters/tensorrt.py).

The graph is produced by an export-only twin of the reference (:class:`VisionGraph`) that reads
the reference's weights (shared, not copied, in fp32), with the two bicubic position tables
precomputed and the weight-only query path of the resampler (``ln_q(query) + pos_embed`` then the
q projection) folded into one constant. Every export is checked on real photographs preprocessed
exactly like the runtime does, against the PyTorch fp32 reference, and nothing is written when a
tolerance is exceeded (:class:`VisionCheckError`, with the numbers).

This module is the orchestration (load, trace, check, move into place); each job has its module:
``vision_graph`` (the export-only twin), ``check_images`` (the photographs and their pixels),
``vision_check`` (tolerances, metrics, the comparator), ``vision_session`` (onnxruntime session),
``graph_summary`` (what the written graph holds), ``vision_errors``. Their public names are
re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.files import staging_dir

from .check_images import DEFAULT_CHECK_IMAGES, check_pixels
from .graph_summary import META_PREFIX, graph_summary, onnx_metadata, summary_line
from .vision_check import (VisionMetrics, VisionTolerances, compare_vision, feature_metrics,
                           metrics_from_outputs, reference_features)
from .vision_errors import VisionCheckError, VisionExportError
from .vision_graph import KV_PRESCALE, PRECISIONS, VisionGraph, _release_memory
from .vision_session import EMBEDS, PIXELS, make_session, run_session

__all__ = ["DEFAULT_CHECK_IMAGES", "EMBEDS", "KV_PRESCALE", "META_PREFIX", "PIXELS", "PRECISIONS",
           "VisionCheckError", "VisionExportError", "VisionExportResult", "VisionGraph",
           "VisionMetrics", "VisionTolerances", "check_pixels", "compare_vision", "export_vision",
           "feature_metrics", "graph_summary", "make_session", "metrics_from_outputs",
           "onnx_metadata", "reference_features", "resolve_visual", "run_session",
           "summary_line"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # lowest the dynamo exporter writes; LayerNormalization (17+) is native
MAX_IR_VERSION = 10  # onnxruntime 1.31 (GPU machine) rejects the newer IR onnx 1.23 writes
LARGE_MODEL_BYTES = 2 << 30  # protobuf limit: above it the weights go to <stem>.onnx.data


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


def resolve_visual(model_or_checkpoint: Any, cfg: Any = None) -> tuple[nn.Module, bool]:
    """(fp32 ``VisionTransformer``, whether this call owns it) from a path or a module.

    A path may be a GPTQ checkpoint (its tower is read as stored, unquantised): loaded here, the
    tower is owned, so the export frees it block by block instead of holding it next to the
    check session (full size: 7.7 GB of fp32 weights). ``cfg``: the checkpoint's
    ``QwenVLConfig`` when the caller parsed it already."""
    from models.qwen_vl import VisionTransformer

    if isinstance(model_or_checkpoint, (str, Path)):
        from models.checkpoint import load_model
        from models.config import QwenVLConfig

        t = time.perf_counter()
        cfg = cfg or QwenVLConfig.from_pretrained(model_or_checkpoint)
        loader = load_model
        if cfg.quantization_config:  # GPTQ checkpoint: its vision tower is stored unquantised
            from quant.checkpoint import load_gptq_model as loader
        model = loader(model_or_checkpoint, torch.float32, prefixes=["transformer.visual."],
                       cfg=cfg)
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
                  write_trt_script: bool = True, trt_max_batch: int = 4,
                  config: Any = None) -> VisionExportResult:
    """Export the vision engine to ``out_path`` (``.../vision.onnx``), checked before writing.

    ``model_or_checkpoint``: a checkpoint directory (only ``transformer.visual.*`` is read), a
    ``QWenLMHeadModel`` or its ``transformer.visual``; ``config``: the checkpoint's parsed
    ``QwenVLConfig`` (else read from the directory). ``reference``: the fp32 module to check
    against (default: the model itself, in fp32). ``check_images`` default to three
    ``skimage.data`` photographs. The check runs all images as one batch and the first alone
    (dynamic batch), on ``providers`` (default CUDA when present, else CPU). On failure nothing
    is written and :class:`VisionCheckError` says which image broke which tolerance.
    With ``write_trt_script`` the ``trtexec`` / ``polygraphy`` commands (and the check inputs they
    use) are written next to the model (see exporters/tensorrt.py).
    """
    out_path = Path(out_path)
    tolerances = _check_arguments(precision, fp32_islands, opset, out_path, tolerances)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    visual, owned = resolve_visual(model_or_checkpoint, config)
    cfg = visual.cfg
    visual.freeze_position_tables()
    names, pixels = check_pixels(check_images, cfg.image_size)
    timings["load_s"] = time.perf_counter() - t0
    # Reference features first, so the torch weights can be dropped before the ORT session.
    ref = _reference(reference if reference is not None else visual, pixels, cfg, timings)
    with staging_dir(out_path) as tmp_dir:
        tmp_onnx = tmp_dir / out_path.name
        ir_version, summary = _export_graph(visual, owned, tmp_onnx, precision, fp32_islands,
                                            opset, max_batch, pixels, timings)
        del visual
        metrics, batch_dev, used = _check_engine(tmp_onnx, out_path, precision, providers,
                                                 pixels, ref, names, tolerances, timings)
        files = _move_into_place(tmp_dir, tmp_onnx, out_path)
    if write_trt_script:
        from .tensorrt import trt_command_files, write_trt_commands

        write_trt_commands(out_path, out_path.parent, image_size=cfg.image_size,
                           max_batch=trt_max_batch, precision=precision, check_pixels=pixels,
                           check_reference=ref, tolerances=tolerances)
        files += trt_command_files(out_path.parent)
    timings["total_s"] = time.perf_counter() - t0
    summary["file_bytes"] = {p.name: p.stat().st_size for p in files[:2] if p.suffix in
                             (".onnx", ".data")}
    log.info("wrote %s (%s) in %.1f s", out_path, precision, timings["total_s"])
    return VisionExportResult(
        onnx_path=out_path, precision=precision, fp32_islands=fp32_islands, opset=opset,
        ir_version=ir_version, image_size=cfg.image_size, n_queries=cfg.n_queries,
        output_dim=cfg.output_dim, metrics=metrics, tolerances=tolerances, graph=summary,
        files=files, providers=used, batch_consistency_max_abs=batch_dev, timings=timings)


def _check_arguments(precision: str, fp32_islands: bool, opset: int, out_path: Path,
                     tolerances: VisionTolerances | None) -> VisionTolerances:
    """Refuse impossible settings before any work; returns the tolerances to check against."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if not fp32_islands and precision != "fp16":
        raise ValueError("fp32_islands=False only means something for precision='fp16'")
    if opset < DEFAULT_OPSET:
        raise ValueError(f"opset {opset} < {DEFAULT_OPSET}: the dynamo exporter cannot write it")
    if out_path.suffix != ".onnx":
        raise ValueError(f"{out_path}: the engine file name must end in .onnx")
    return tolerances or VisionTolerances.for_precision(precision)


def _reference(ref_model: nn.Module, pixels: np.ndarray, cfg: Any,
               timings: dict[str, float]) -> np.ndarray:
    t = time.perf_counter()
    ref = reference_features(ref_model, pixels)
    timings["reference_s"] = time.perf_counter() - t
    if ref.shape[1:] != (cfg.n_queries, cfg.output_dim):
        raise VisionExportError(f"reference output {ref.shape} is not [N, {cfg.n_queries}, "
                                f"{cfg.output_dim}]")
    return ref


def _export_graph(visual: nn.Module, owned: bool, dest: Path, precision: str, fp32_islands: bool,
                  opset: int, max_batch: int, pixels: np.ndarray,
                  timings: dict[str, float]) -> tuple[int, dict[str, Any]]:
    """Trace :class:`VisionGraph` to ``dest``; returns (IR version, graph summary). An ``owned``
    tower is consumed block by block while its twin is built."""
    t = time.perf_counter()
    cfg = visual.cfg
    graph = VisionGraph(visual, precision, fp32_islands, consume=owned).eval()
    example = torch.as_tensor(pixels[:1]).repeat(2, 1, 1, 1)  # batch 2: keeps N symbolic
    meta = {"precision": precision, "fp32_islands": str(fp32_islands).lower(),
            "image_size": str(cfg.image_size), "n_queries": str(cfg.n_queries),
            "output_dim": str(cfg.output_dim), "input": PIXELS, "output": EMBEDS}
    log.info("exporting the vision tower (%s%s, opset %d) ...", precision,
             ", fp32 LayerNorm/softmax/residual" if precision == "fp16" and fp32_islands
             else "", opset)
    ir_version, _ = _export_to(graph, example, dest, opset, max_batch, meta)
    del graph, example
    _release_memory()
    timings["export_s"] = time.perf_counter() - t
    summary = graph_summary(dest)
    log.info("vision.onnx: %s", summary_line(summary))
    return ir_version, summary


def _check_engine(onnx_path: Path, out_path: Path, precision: str,
                  providers: Sequence[str] | None, pixels: np.ndarray, ref: np.ndarray,
                  names: list[str], tolerances: VisionTolerances, timings: dict[str, float]
                  ) -> tuple[list[VisionMetrics], float | None, list[str]]:
    """onnxruntime vs the reference: all images as one batch, then the first image alone.
    Returns (metrics, batch deviation, providers used); raises :class:`VisionCheckError`."""
    t = time.perf_counter()
    sess = make_session(onnx_path, providers, fp16=precision == "fp16")
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
    return metrics, batch_dev, used


def _move_into_place(tmp_dir: Path, tmp_onnx: Path, out_path: Path) -> list[Path]:
    """External data first, the .onnx last (its presence = complete). Returns the files."""
    files = []
    data_name = out_path.name + ".data"
    if (tmp_dir / data_name).exists():
        os.replace(tmp_dir / data_name, out_path.with_name(data_name))
        files.append(out_path.with_name(data_name))
    elif out_path.with_name(data_name).exists():
        out_path.with_name(data_name).unlink()  # stale weights of an earlier, larger export
    os.replace(tmp_onnx, out_path)
    files.insert(0, out_path)
    return files
