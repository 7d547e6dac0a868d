"""Latency of the vision engine next to PyTorch eager, same input, same run; prints one JSON record.

    python -m bench.vision                                   # nano checkpoint, fp32, ORT CPU
    python -m bench.vision --precision fp16 --batch 2
    python -m bench.vision --full-size <checkpoint> --onnx out/vision.onnx --iters 2

Without ``--onnx`` the engine is exported (and checked) into a temporary directory first. The
input is real photographs preprocessed like the runtime. PyTorch runs the fp32 reference (or
``--torch-dtype``) eagerly; onnxruntime runs the engine on ``--providers`` (CUDA when present).
Figures only: nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import cpu_name, peak_rss_mib, stats, timed
from runtime.errors import cli_main

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.vision", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint directory (default: the nano checkpoint)")
    ap.add_argument("--full-size", metavar="DIR",
                    help="a random full-size checkpoint directory (models.nano."
                         "write_random_checkpoint); same as --checkpoint DIR")
    ap.add_argument("--onnx", help="an exported vision.onnx to time (default: export one now)")
    ap.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                    help="engine precision when exporting (default fp32)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--providers", nargs="+", help="onnxruntime providers (default: CUDA if "
                                                   "available, then CPU)")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for both (0: default)")
    ap.add_argument("--torch-dtype", choices=("fp32", "bf16", "fp16"),
                    help="PyTorch eager dtype (default fp32 on CPU, fp16 on CUDA)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="PyTorch device (default: cuda if "
                                                              "available)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _export(args: argparse.Namespace, ckpt: str, names: list[str]):
    """Export (and check) an engine into a temporary directory unless ``--onnx`` names one."""
    from exporters.vision import export_vision

    tmp = None
    export_info = None
    onnx_path = args.onnx
    if onnx_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-vision-")
        t = time.perf_counter()
        res = export_vision(ckpt, Path(tmp.name) / "vision.onnx", args.precision,
                            check_images=names[:1], write_trt_script=False)
        onnx_path = str(res.onnx_path)
        export_info = {"seconds": round(time.perf_counter() - t, 2),
                       "check_cosine": res.metrics[0].cosine}
        gc.collect()
    return tmp, export_info, onnx_path


def _time_torch(args: argparse.Namespace, ckpt: str, tdtype: str, device: str, pixels: np.ndarray):
    """Time PyTorch eager, then drop it so the two never hold the weights together."""
    import torch

    from models.checkpoint import load_model

    model = load_model(ckpt, tdtype, prefixes=["transformer.visual."])
    visual = model.transformer.visual.to(device)
    visual.freeze_position_tables()
    x = torch.as_tensor(pixels, device=device)

    def torch_run():
        with torch.inference_mode():
            y = visual(x)
            if device == "cuda":
                torch.cuda.synchronize()
            return y

    t_times, t_out = timed(torch_run, args.warmup, args.iters)
    t_out = t_out.float().cpu().numpy()
    del model, visual, x
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return t_times, t_out


def _record(args: argparse.Namespace, ckpt: str, device: str, tdtype: str, engine: dict,
            shapes: dict, names: list[str], ort_run: dict, o_times: list[float],
            t_times: list[float], agree: list) -> dict:
    """The JSON record: machine, versions, engine, both timings and their agreement."""
    import onnxruntime as ort
    import torch

    ort_stats = stats(o_times)
    torch_stats = stats(t_times)
    return {
        "bench": "vision",
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(),
                   "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
        "checkpoint": str(ckpt),
        "engine": engine,
        "shapes": shapes,
        "images": names,
        "ort": {**ort_run, **ort_stats},
        "torch_eager": {"device": device, "dtype": tdtype, "threads": torch.get_num_threads(),
                        **torch_stats},
        "torch_over_ort": round(torch_stats["median_ms"] / ort_stats["median_ms"], 3),
        "agreement": {"min_cosine": min(m.cosine for m in agree),
                      "max_rel_l2": max(m.rel_l2 for m in agree),
                      "max_abs": max(m.max_abs for m in agree)},
        "peak_rss_mib": peak_rss_mib(),
    }


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    import torch

    from exporters.vision import check_pixels, feature_metrics, make_session, run_session
    from models.config import QwenVLConfig

    if args.batch < 1 or args.iters < 1:
        ap.error("--batch and --iters must be >= 1")
    ckpt = args.full_size or args.checkpoint
    if ckpt is None:
        from models.nano import default_checkpoint

        ckpt = str(default_checkpoint())
    cfg = QwenVLConfig.from_pretrained(ckpt)
    S = cfg.visual.image_size
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tdtype = args.torch_dtype or ("fp16" if device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [PHOTOS[i % len(PHOTOS)] for i in range(args.batch)]
    _, pixels = check_pixels(names, S)

    tmp, export_info, onnx_path = _export(args, ckpt, names)
    from exporters.vision import onnx_metadata

    meta = onnx_metadata(onnx_path)
    t_times, t_out = _time_torch(args, ckpt, tdtype, device, pixels)

    t = time.perf_counter()
    sess = make_session(onnx_path, args.providers, threads=args.threads or None)
    session_s = time.perf_counter() - t
    o_times, o_out = timed(lambda: run_session(sess, pixels), args.warmup, args.iters)
    agree = [feature_metrics(n, o, r) for n, o, r in zip(names, o_out, t_out)]

    engine = {"onnx": str(onnx_path) if args.onnx else "(exported for this run)",
              "precision": meta.get("precision", args.precision),
              "fp32_islands": meta.get("fp32_islands"), "export": export_info}
    shapes = {"input": list(pixels.shape), "output": list(o_out.shape)}
    ort_run = {"providers": sess.get_providers(), "session_create_s": round(session_s, 2),
               "threads": args.threads or "default"}
    record = _record(args, ckpt, device, tdtype, engine, shapes, names, ort_run, o_times, t_times,
                     agree)
    print(json.dumps(record))
    if tmp is not None:
        del sess
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
