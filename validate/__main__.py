"""``python -m validate``: the staged drift report of a bundle against its source checkpoint.

    python -m validate --bundle out/bundle --checkpoint models/nano/qwen-vl-nano \\
        --manifest calib_data/manifest.jsonl --out out/bundle/report [--allow-drift]

Exit status: 0 PASS (or FAIL with ``--allow-drift``, INCONCLUSIVE with ``--accept-inconclusive``),
1 FAIL or INCONCLUSIVE (a gate could not be judged), 2 the inputs could not be used
(bad manifest, bundle or checkpoint; the message says which and what to do).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .stages import run_validation
from .thresholds import PLANS, STAGES

DEFAULT_MANIFEST = Path(__file__).resolve().parents[1] / "calib_data" / "manifest.jsonl"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m validate",
        description="Staged drift check of an exported bundle (vision, decoder, task) against the "
                    "PyTorch reference of its checkpoint, on the validation split of a "
                    "calibration manifest. Writes drift.json + drift.html (+ PNG plots).")
    ap.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    ap.add_argument("--checkpoint", required=True, type=Path,
                    help="source checkpoint (HF layout) of the bundle; the reference runs in fp32")
    ap.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST,
                    help="manifest JSONL/JSON, a JSONL of {image, prompt} lines, or a folder of "
                         "images (default: calib_data/manifest.jsonl)")
    ap.add_argument("--out", type=Path, default=None,
                    help="report directory (default BUNDLE/report)")
    ap.add_argument("--plan", choices=sorted(PLANS), default=None,
                    help="thresholds to apply (default: the bundle's precision)")
    ap.add_argument("--target", choices=("gpu", "cpu"), default=None,
                    help="whose bounds to apply: what the decoder was built for (default: the "
                         "bundle manifest's target, gpu for bundles that do not record one)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--max-items", type=int, default=None, help="use only the first N items")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length cap")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="onnxruntime device for the engines")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="cache generated manifest images as PNG here")
    ap.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    ap.add_argument("--allow-drift", action="store_true",
                    help="exit 0 even when a metric FAILs (the report still says FAIL)")
    ap.add_argument("--accept-inconclusive", action="store_true",
                    help="exit 0 when a gate could not be judged (the report still says "
                         "INCONCLUSIVE)")
    ap.add_argument("--gptq", type=Path, default=None,
                    help="int4, edge: the GPTQ checkpoint the bundle was built from (its dequantised "
                         "model judges the exporter's own error)")
    ap.add_argument("--lm-head", choices=("int8", "int4", "fp16"), default=None,
                    help="int4, edge: the LM head the bundle ships (default: the one its "
                         "manifest's memory plan names, else the plan row's)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _print_report(report, out: Path) -> None:
    """Every judged metric and stage error, then the summary line and where the report is."""
    for st in report.stages.values():
        for m in st.metrics:
            if m.verdict != "INFO":
                print(m.line())
        if st.error:
            print(f"[FAIL] {st.name}: {st.error}")
    print(f"{report.summary_line()}\nreport: {out / 'drift.html'}")


def _same_precision(a: argparse.Namespace):
    """The dequantised ``--gptq`` model, rounding activations (and an int8 KV cache, with the
    scales the bundle's decoder holds) as the bundle's target does."""
    from quant.kv_scales import read_engine_scales
    from runtime.bundle import read_manifest

    from .compare import same_precision_reference

    man = read_manifest(a.bundle)
    plan = a.plan or man.precision
    return same_precision_reference(None, plan, a.gptq, bundle_head(man.data, plan, a.lm_head),
                                    target=a.target or man.target,
                                    kv_scales=read_engine_scales(a.bundle / "decoder.onnx"))


def bundle_head(manifest: dict, plan: str, requested: str | None) -> str:
    """The LM head to mirror: ``--lm-head``, else what the exporter recorded in the manifest's
    memory plan (the head it shipped), else the plan row's."""
    from quant.plans import PLANS

    if requested:
        return requested
    recorded = (manifest.get("memory_plan") or {}).get("lm_head")
    return recorded or (PLANS[plan].lm_head if plan in PLANS else "int8")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {', '.join(bad)}; use {', '.join(STAGES)}")

    from calib_data.manifest import load_manifest
    from runtime.errors import EdgeError
    from runtime.errors import report as report_error

    try:
        items = load_manifest(a.manifest)
        same = None
        if a.gptq is not None:
            same = _same_precision(a)
        report = run_validation(a.bundle, a.checkpoint, items, a.plan,
                                a.out or a.bundle / "report", fake_quant_model=same, stages=stages,
                                max_items=a.max_items, max_new_tokens=a.max_new_tokens,
                                device=a.device, threads=a.threads, cache_dir=a.cache_dir,
                                plots=not a.no_plots, target=a.target)
    except (EdgeError, FileNotFoundError, KeyError, ValueError) as e:
        if a.verbose:
            raise
        return report_error(e)
    _print_report(report, a.out or a.bundle / "report")
    if report.verdict == "FAIL" and not a.allow_drift:
        return 1
    if report.verdict == "INCONCLUSIVE" and not (a.accept_inconclusive or a.allow_drift):
        print("the report is INCONCLUSIVE: pass --accept-inconclusive to accept it",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
