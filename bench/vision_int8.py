"""int8 (static QDQ) vs fp32 vision engine: cosine per layer and per variant, and CPU speed, in
the same run; prints one JSON record.

    python -m bench.vision_int8                                   # nano: export fp32, then all
    python -m bench.vision_int8 --onnx <vision.onnx> --max-calib 16 --methods minmax

Calibration uses the manifest's calib split only (``quant.vision_int8.calibration_images``); the
cosines are measured on the validation split's photographs (never calibrated on). Rows:

* ``sensitivity``: only one layer (label, see quant/vision_int8.py) int8, the rest fp32, for
  each label; then ``ladder``: everything int8 except ``--exclude`` and the k most sensitive
  labels, k = 0, 1, ... until every photo's cosine reaches ``--target``: those stay float in
  the variants and the ``chosen`` engine;
* ``variants``: per calibration method x per-channel on/off, the rest int8; the best is timed;
* ``speed``: fp32 vs the chosen int8 engine on the CPU, runs interleaved (a busy machine slows
  both alike), with the load average before and after. Figures only: nothing is asserted.

``--int8 <engine>`` measures a given int8 engine (e.g. a bundle's ``vision.onnx``) against
``--onnx`` instead of quantizing variants: its per-photo cosines and the speed rows.
``--calib-counts 4 8 16`` quantizes the default configuration once per number of calib
pictures (spread over the split) and gives each one's cosines: how many are needed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import host, peak_rss_mib, stats

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "calib_data" / "manifest.jsonl"


def _cosines(out: np.ndarray, ref: np.ndarray, names: list[str]) -> dict[str, Any]:
    from exporters.vision import feature_metrics

    cos = [feature_metrics(n, o, r).cosine for n, o, r in zip(names, out, ref)]
    return {"min_cosine": round(min(cos), 6), "mean_cosine": round(float(np.mean(cos)), 6),
            "per_image": {n: round(c, 6) for n, c in zip(names, cos)}}


class Runner:
    """Quantize a variant into a scratch folder and measure it against the fp32 features."""

    def __init__(self, fp32: str, calib, evals, work: Path, threads: int | None,
                 cache_dir: str | None = None):
        from exporters.vision import make_session, run_session

        self.fp32, self.calib, self.evals = fp32, calib, evals
        self.work, self.threads = work, threads
        self.ranges = Path(cache_dir) if cache_dir else work / "ranges"
        self.ref = run_session(make_session(fp32, ["CPUExecutionProvider"], threads=threads),
                               evals.pixels, 1)
        self.n = 0

    def measure(self, config, keep: Path | None = None) -> dict[str, Any]:
        """Cosines of ``config``'s engine; it is written to ``keep`` and left there if given
        (a full-size engine takes minutes to quantize: the best variant is not redone)."""
        from exporters.vision import make_session, run_session
        from quant.vision_int8 import quantize_vision

        self.n += 1
        path = keep or self.work / f"v{self.n}" / "vision.onnx"
        t = time.perf_counter()
        res = quantize_vision(self.fp32, path, self.calib, config, cache_dir=self.ranges)
        sess = make_session(path, ["CPUExecutionProvider"], threads=self.threads)
        rec = _cosines(run_session(sess, self.evals.pixels, 1), self.ref, self.evals.names)
        rec.update(int8_nodes=len(res.quantized), seconds=round(time.perf_counter() - t, 1))
        del sess
        if keep is None:
            _remove(path)
        return rec


def _remove(path: Path) -> None:
    """Delete an engine this bench wrote (``vision.onnx`` and its ``.data``) and its folder."""
    for f in path.parent.iterdir():
        f.unlink()
    path.parent.rmdir()


def _move(src: Path, dst: Path) -> None:
    """Move an engine (and its external ``.data``, referenced by file name) to ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for f in src.parent.iterdir():
        os.replace(f, dst.parent / f.name.replace(src.name, dst.name, 1))
    src.parent.rmdir()


def _variants(run: Runner, base, methods: list[str], per_channel: list[bool],
              best_path: Path) -> list[dict]:
    """Every calibration method x per-channel on/off, with ``base``'s float layers; the engine
    with the best worst-photo cosine is left at ``best_path``."""
    rows: list[dict] = []
    cand = best_path.parent.parent / "candidate" / best_path.name
    for m in methods:
        for pc in per_channel:
            rec = run.measure(_replace(base, method=m, per_channel=pc), keep=cand)
            if not rows or rec["min_cosine"] > max(r["min_cosine"] for r in rows):
                if best_path.exists():
                    _remove(best_path)
                _move(cand, best_path)
            else:
                _remove(cand)
            rows.append({"method": m, "per_channel": pc, "float_labels": list(base.exclude), **rec})
            logging.info("int8 %s per_channel=%s: %s", m, pc, rec["min_cosine"])
    return rows


def _sensitivity(run: Runner, base, labels: list[str], target: float) -> tuple[list, list, list]:
    """Single-layer rows, then the exclusion ladder; returns (rows, ladder, chosen exclude)."""
    from quant.vision_int8 import VisionQuantError

    rows = []
    for lab in labels:
        cfg = _replace(base, only=(lab,), exclude=())
        rows.append({"label": lab, **run.measure(cfg)})
        logging.info("only %s int8: %s", lab, rows[-1]["min_cosine"])
    order = [r["label"] for r in sorted(rows, key=lambda r: r["min_cosine"])]
    ladder, chosen = [], None
    for k in range(len(order) + 1):
        floats = list(base.exclude) + order[:k]
        try:
            rec = run.measure(_replace(base, exclude=tuple(floats)))
        except VisionQuantError:  # nothing left to quantize
            break
        ladder.append({"float_labels": floats, **rec})
        logging.info("int8 except %s: %s", floats, rec["min_cosine"])
        if rec["min_cosine"] >= target:
            chosen = floats
            break
    return rows, ladder, chosen if chosen is not None else ladder[-1]["float_labels"]


def _replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def _speed(fp32: str, int8: str, pixels: np.ndarray, warmup: int, iters: int,
           threads: int | None) -> dict[str, Any]:
    """Median latency of both engines on the same input, their runs interleaved."""
    from exporters.vision import make_session, run_session

    sessions = {"fp32": make_session(fp32, ["CPUExecutionProvider"], threads=threads),
                "int8": make_session(int8, ["CPUExecutionProvider"], threads=threads)}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(warmup + iters):
        for k, s in sessions.items():
            t = time.perf_counter()
            run_session(s, pixels)
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    out = {k: stats(v) for k, v in times.items()}
    out["int8_speedup"] = round(out["fp32"]["median_ms"] / out["int8"]["median_ms"], 3)
    out["batch"] = len(pixels)
    out["threads"] = threads or "default"
    return out


def _engine_bytes(path: Path) -> int:
    """The graph plus its external weights (``<name>.data``, written above 2 GB)."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _fp32_onnx(args, tmp: Path) -> tuple[str, int]:
    """(fp32 vision.onnx, image size): the given one, or the checkpoint's exported now."""
    from exporters.vision import onnx_metadata

    if args.onnx:
        return args.onnx, int(onnx_metadata(args.onnx)["image_size"])
    from exporters.vision import export_vision
    from models.nano import default_checkpoint

    ckpt = args.checkpoint or str(default_checkpoint())
    res = export_vision(ckpt, tmp / "fp32" / "vision.onnx", "fp32", write_trt_script=False)
    return str(res.onnx_path), res.image_size


def _measure_all(run: Runner, args, pcs: list[bool], int8: Path) -> dict[str, Any]:
    """Sensitivity rows and ladder (unless ``--no-sensitivity``), the method x per-channel
    variants with the ladder's (or ``--exclude``'s) float layers, and the best of them written
    to ``int8`` for the speed run."""
    import onnx

    from quant.vision_int8 import Int8Config, matches, select_nodes

    rec: dict[str, Any] = {}
    base = Int8Config(method=args.sensitivity_method, per_channel=pcs[0],
                      exclude=tuple(args.exclude or ()))  # not the default: measured here
    if not args.no_sensitivity:
        model = onnx.load(run.fp32, load_external_data=False)
        labels = sorted(set(select_nodes(model, base)[0].values()),
                        key=lambda s: [int(t) if t.isdigit() else t for t in s.split(".")])
        if args.labels:
            labels = [lab for lab in labels if matches(lab, args.labels)]
        rows, ladder, picked = _sensitivity(run, base, labels, args.target)
        rec["sensitivity"], rec["ladder"] = rows, ladder
        base = _replace(base, exclude=tuple(picked))
    rec["variants"] = _variants(run, base, args.methods, pcs, int8)
    best = max(rec["variants"], key=lambda r: r["min_cosine"])  # the first of equals, as kept
    chosen = _replace(base, method=best["method"], per_channel=best["per_channel"])
    rec["chosen"] = {"config": chosen.to_dict(), **{k: best[k] for k in (
        "min_cosine", "mean_cosine", "per_image", "int8_nodes")}}
    return rec


def _calib_counts(run: Runner, args, size: int, counts: list[int]) -> list[dict[str, Any]]:
    """Cosines of the default configuration calibrated on n pictures, for each n."""
    from quant.vision_int8 import Int8Config, calibration_images

    rows = []
    for n in counts:
        run.calib = calibration_images(args.manifest, size, n)
        rec = run.measure(Int8Config())
        rows.append({"pictures": len(run.calib.names), **rec})
        logging.info("%d calib pictures: %s", len(run.calib.names), rec["min_cosine"])
    return rows


def _given(run: Runner, int8: str) -> dict[str, Any]:
    """Cosines of an int8 engine this bench did not quantize."""
    from exporters.vision import make_session, run_session

    sess = make_session(int8, ["CPUExecutionProvider"], threads=run.threads)
    rec = _cosines(run_session(sess, run.evals.pixels, 1), run.ref, run.evals.names)
    return {"onnx": int8, **rec}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vision_int8",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--onnx", help="fp32 vision.onnx (default: export --checkpoint's now)")
    ap.add_argument("--checkpoint", help="checkpoint to export when no --onnx (default: nano)")
    ap.add_argument("--int8", help="measure this int8 engine against --onnx (no quantization)")
    ap.add_argument("--calib-counts", nargs="+", type=int, metavar="N",
                    help="default configuration calibrated on N calib pictures, each N")
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST))
    ap.add_argument("--max-calib", type=int, help="at most this many calib-split pictures")
    ap.add_argument("--methods", nargs="+", default=["minmax", "percentile", "entropy"],
                    choices=("minmax", "entropy", "percentile"))
    ap.add_argument("--per-channel", choices=("on", "off", "both"), default="both")
    ap.add_argument("--sensitivity-method", default="minmax",
                    choices=("minmax", "entropy", "percentile"))
    ap.add_argument("--no-sensitivity", action="store_true")
    ap.add_argument("--labels", nargs="+", help="sensitivity rows only for these labels / globs")
    ap.add_argument("--exclude", nargs="*", help="labels kept float in every all-int8 variant "
                                                 "(default: the ladder's choice, else none)")
    ap.add_argument("--cache-dir", help="keep the calibrated ranges here, for later runs (they "
                                        "are keyed by the graph and the calibration pixels)")
    ap.add_argument("--eval-limit", type=int, help="at most this many validation photographs")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.onnx and not Path(args.onnx).is_file():
        ap.error(f"--onnx {args.onnx}: no such file; export one with exporters.vision or omit it")
    if args.int8 and not (args.onnx and Path(args.int8).is_file()):
        ap.error(f"--int8 {args.int8}: needs an existing file and the fp32 engine as --onnx")
    if not Path(args.manifest).exists():
        ap.error(f"--manifest {args.manifest}: not found")
    from calib_data.manifest import ManifestError
    from quant.vision_int8 import VisionQuantError

    try:
        rec = _run(args)
    except (ManifestError, VisionQuantError) as e:
        print(f"bench.vision_int8: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rec))
    return 0


def _run(args) -> dict[str, Any]:
    from quant.vision_int8 import calibration_images, split_images

    threads = args.threads or None
    with tempfile.TemporaryDirectory(prefix="bench-vision-int8-") as tmp_name:
        tmp = Path(tmp_name)
        fp32, size = _fp32_onnx(args, tmp)
        calib = None if args.int8 else calibration_images(args.manifest, size, args.max_calib)
        evals = split_images(args.manifest, "validation", size, args.eval_limit,
                             kinds=("skimage", "file"))
        run = Runner(fp32, calib, evals, tmp, threads, args.cache_dir)
        pcs = {"on": [True], "off": [False], "both": [True, False]}[args.per_channel]
        rec: dict[str, Any] = {"bench": "vision_int8", "host": host(), "fp32_onnx": fp32,
                               "eval": {"split": evals.split, "pictures": evals.names}}
        if calib is not None:
            rec["calib"] = {"split": calib.split, "pictures": len(calib.names),
                            "items": len(calib.all_item_ids())}
        int8 = tmp / "chosen" / "vision.onnx"
        if args.int8:
            int8 = Path(args.int8)
            rec["given"] = _given(run, args.int8)
        elif args.calib_counts:
            rec["calib_counts"] = _calib_counts(run, args, size, args.calib_counts)
            rec["peak_rss_mib"] = peak_rss_mib()
            return rec
        else:
            rec.update(_measure_all(run, args, pcs, int8))
        pixels = np.repeat(evals.pixels[:1], args.batch, axis=0)
        load_before = os.getloadavg()
        rec["speed"] = _speed(fp32, str(int8), pixels, args.warmup, args.iters, threads)
        rec["speed"]["loadavg_before"] = [round(x, 2) for x in load_before]
        rec["speed"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        rec["files_mib"] = {k: round(_engine_bytes(Path(p)) / 2**20, 2)
                            for k, p in (("fp32", fp32), ("int8", int8))}
        rec["peak_rss_mib"] = peak_rss_mib()
    return rec


if __name__ == "__main__":
    sys.exit(main())
