"""An onnxruntime session for a vision engine, and running pixels through it by the engine's
input/output names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.contract import IMAGE_EMBEDS, PIXEL_VALUES
from runtime.engines import open_session

from .graph_summary import onnx_metadata
from .vision_errors import VisionExportError

PIXELS = PIXEL_VALUES  # the vision engine's I/O names (runtime/contract.py)
EMBEDS = IMAGE_EMBEDS


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
    """onnxruntime session for a vision engine (through the one factory,
    :func:`runtime.engines.open_session`; this adds the vision engine's policy).

    On the CPU provider an fp16 ViT segfaults at the default ORT_ENABLE_ALL (a Conv ->
    LayerNorm fusion), so fp16 graphs whose first provider is the CPU get
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
    if optimization_level is None:
        cpu_first = providers[0] == "CPUExecutionProvider"
        optimization_level = "extended" if fp16 and cpu_first else "all"
    # x86 CPUs run the fp16 MatMuls through fp32 casts of the weights; with the arena those
    # buffers stay allocated (ViT-bigG: 19 GB peak instead of ~6; measured, 4-layer: 2.5 GB
    # vs 1.7 GB), so give them back after each run.
    arena = not (fp16 and providers[0] == "CPUExecutionProvider")
    if not fp16 and "CUDAExecutionProvider" in providers:
        # An fp32 engine is checked at fp32 tolerances: no TF32 matmuls behind our back.
        providers = [(p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
                     for p in providers]
    return open_session(Path(onnx_path), providers, threads, optimization_level, mem_arena=arena)


def run_session(session, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
    """Run ``pixels [N,3,S,S]`` through a vision session, ``batch_size`` images at a time."""
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    bs = batch_size or len(pixels)
    outs = [session.run([EMBEDS], {PIXELS: pixels[i:i + bs]})[0]
            for i in range(0, len(pixels), bs)]
    return np.concatenate(outs)
