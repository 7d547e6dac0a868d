"""An onnxruntime session for a vision engine, and running pixels through it by the engine's
input/output names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .graph_summary import onnx_metadata
from .vision_errors import VisionExportError

PIXELS = "pixel_values"
EMBEDS = "image_embeds"


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
