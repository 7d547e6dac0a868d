"""Our vision engine against another exporter's vision model of the same tower (issue 20, item
4), on onnxruntime CPU: time per image, cosine vs PyTorch eager, file size, node count. Prints
one JSON record.

    python -m bench.vision_contender                          # nano checkpoint, seconds
    python -m bench.vision_contender --checkpoint <4-layer full-width> --threads 2 --rounds 5

The contender is TensorRT-LLM's Qwen-VL recipe (examples/multimodal, ``build_visual_engine.py``,
qwen-vl): ``torch.onnx.export`` of the Hugging Face model's ``transformer.visual`` through a
wrapper module whose ``forward(images)`` returns ``visual(images)``, opset 17, input ``input``
with a dynamic batch, output ``output``; TensorRT then builds its engine from that ONNX with
trtexec. There is no TensorRT here, so **this re-runs the recipe's ONNX step ourselves**, on our
reference ``models.VisionTransformer`` (which matches the original remote code bit for bit on
nano checkpoints), and runs it on onnxruntime: it is not TensorRT-LLM's engine. Its fp16 form is
that graph converted by onnxruntime's own ``float16`` converter with float32 I/O (the ONNX
counterpart of ``trtexec --fp16``), ours the fp16 engine with fp32 LayerNorm / softmax /
residual islands.

Both sides run through the same session factory and policy (``exporters.vision.make_session``:
an fp16 graph gets the extended optimisation level and no memory arena on CPU), with the same
explicit ``--threads``, one image per call, engines alternating (A B C D A B C D ...) after one
warm-up each; CPU utilisation (process CPU time / wall) is recorded per engine.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from bench.common import host, peak_rss_mib, stats
from runtime.errors import cli_main

log = logging.getLogger("bench.vision_contender")
RECIPE_OPSET = 17  # TensorRT-LLM's export_onnx


def export_contender(visual, dest: Path, example: np.ndarray, precision: str = "fp32") -> Path:
    """The TensorRT-LLM recipe's ONNX step on ``visual`` (fp32 module), written atomically to
    ``dest``; ``fp16``: that graph through onnxruntime's float16 converter, float32 I/O."""
    import onnx
    import torch
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from runtime.files import staging_dir

    class VisualWrapper(torch.nn.Module):  # the recipe's wrapper: forward(images) = visual(images)
        def __init__(self, visual):
            super().__init__()
            self.visual = visual

        def forward(self, images):
            return self.visual(images)

    with staging_dir(dest) as tmp, torch.inference_mode(False), torch.no_grad():
        raw = tmp / "fp32.onnx" if precision == "fp16" else tmp / dest.name
        with warnings.catch_warnings():  # TracerWarnings of the traced shape arithmetic
            warnings.simplefilter("ignore")
            torch.onnx.export(VisualWrapper(visual.eval()), (torch.as_tensor(example),), str(raw),
                              opset_version=RECIPE_OPSET, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}},
                              dynamo=False)
        if precision == "fp16":
            m = convert_float_to_float16(onnx.load(str(raw)), keep_io_types=True)
            onnx.save(m, str(tmp / dest.name))
            raw.unlink()
        os.replace(tmp / dest.name, dest)
    return dest


def engine_facts(onnx_path: Path) -> dict:
    """Node count, top op types and the bytes of the engine's files (its own directory)."""
    import onnx
    from collections import Counter

    m = onnx.load(str(onnx_path), load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    return {"nodes": len(m.graph.node), "op_counts": dict(ops.most_common(8)),
            "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
            "file_bytes": sum(p.stat().st_size for p in onnx_path.parent.iterdir() if p.is_file())}


def build_engines(checkpoint: Path, work: Path, precisions: list[str], pixels: np.ndarray
                  ) -> tuple[dict[str, Path], np.ndarray]:
    """Ours (``exporters.vision.export_vision``) and the contender per precision, in their own
    directories under ``work`` (reused when present), and the PyTorch fp32 eager features."""
    from exporters.vision import export_vision, reference_features, resolve_visual

    visual, _ = resolve_visual(checkpoint)
    visual.freeze_position_tables()  # our exporter's input; the reference's output is the same
    t = time.perf_counter()
    ref = reference_features(visual, pixels)
    log.info("PyTorch eager reference in %.1f s", time.perf_counter() - t)
    engines = {}
    for prec in precisions:
        ours = work / f"ours-{prec}" / "vision.onnx"
        if not ours.exists():
            ours.parent.mkdir(parents=True, exist_ok=True)
            export_vision(visual, ours, prec, check_images=["astronaut"], write_trt_script=False)
        theirs = work / f"trtllm-recipe-{prec}" / "visual.onnx"
        if not theirs.exists():
            theirs.parent.mkdir(parents=True, exist_ok=True)
            _fresh_tables(visual)
            t = time.perf_counter()
            export_contender(visual, theirs, pixels[:1], prec)
            log.info("contender %s exported in %.1f s", prec, time.perf_counter() - t)
            visual.freeze_position_tables()
        engines[f"ours_{prec}"], engines[f"trtllm_recipe_{prec}"] = ours, theirs
    del visual
    gc.collect()
    return engines, ref


def _fresh_tables(visual) -> None:
    """The recipe exports the module as loaded: position tables resized inside the graph."""
    visual._patch_pos = None
    visual.attn_pool._key_pos = None


def time_engines(engines: dict[str, Path], pixels: np.ndarray, threads: int, rounds: int
                 ) -> dict[str, dict]:
    """Every engine once per round, alternating, after one warm-up each: wall and CPU times."""
    from exporters.vision import make_session

    sessions, out = {}, {}
    for name, path in engines.items():
        t = time.perf_counter()
        sessions[name] = make_session(path, ["CPUExecutionProvider"], threads=threads)
        out[name] = {"session_s": round(time.perf_counter() - t, 2), "wall": [], "cpu": []}
    feeds = {n: {s.get_inputs()[0].name: pixels} for n, s in sessions.items()}
    for name, s in sessions.items():
        out[name]["output"] = s.run(None, feeds[name])[0]  # warm-up; its output is compared
    for _ in range(rounds):
        for name, s in sessions.items():
            t, c = time.perf_counter(), time.process_time()
            s.run(None, feeds[name])
            out[name]["wall"].append(time.perf_counter() - t)
            out[name]["cpu"].append(time.process_time() - c)
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.vision_contender",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="checkpoint (default: the shipped nano)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16"))
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of every engine")
    ap.add_argument("--image", default="astronaut", help="scikit-image sample name or a path")
    ap.add_argument("--work", type=Path, help="engines are written (and reused) here "
                                              "(default: a temporary directory)")
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from exporters.vision import check_pixels, feature_metrics
    from models.config import QwenVLConfig

    ckpt = args.checkpoint
    if ckpt is None:
        from models.nano import default_checkpoint

        ckpt = default_checkpoint()
    threads = args.threads or os.cpu_count() or 1
    names, pixels = check_pixels([args.image], QwenVLConfig.from_pretrained(ckpt).visual.image_size)
    with tempfile.TemporaryDirectory(prefix="bench-vision-contender-") as tmp:
        engines, ref = build_engines(Path(ckpt), args.work or Path(tmp), args.precisions, pixels)
        load = {"start": [round(x, 2) for x in os.getloadavg()]}
        timed = time_engines(engines, pixels, threads, args.rounds)
        load["end"] = [round(x, 2) for x in os.getloadavg()]
        rec = {"bench": "vision_contender", "host": host(), "checkpoint": str(ckpt),
               "image": names[0], "threads": threads, "rounds": args.rounds,
               "load_avg_1_5_15": load, "engines": {}}
        for name, path in engines.items():
            t = timed[name]
            m = feature_metrics(names[0], t.pop("output")[0], ref[0])
            rec["engines"][name] = {
                **engine_facts(path), "time": stats(t["wall"]), "session_s": t["session_s"],
                "cpu_util": round(sum(t["cpu"]) / sum(t["wall"]), 2),
                "vs_eager": {"cosine": m.cosine, "rel_l2": m.rel_l2, "max_abs": m.max_abs}}
        for prec in args.precisions:
            ours, theirs = rec["engines"][f"ours_{prec}"], rec["engines"][f"trtllm_recipe_{prec}"]
            rec[f"recipe_over_ours_{prec}"] = round(theirs["time"]["median_ms"]
                                                    / ours["time"]["median_ms"], 3)
        rec["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
