"""The edge plan's cpu-target KV cache, drift by variant: fp32, int8 per channel, int8 per tensor
(GroupQueryAttention's quantised cache, static scales amax / 127 over the calibration split).

    python -m bench.kv_cache --gptq <out>.work/quant/gptq        # nano, export.py's GPTQ

Every variant is an edge-plan bundle for ``--target cpu`` (fp32 activations, MatMulNBits
accuracy level 4, GroupQueryAttention) on the same GPTQ codes, differing only in its KV cache.
The scales are calibrated as ``export.py`` does (quant/kv_scales.py: the calibration items with
their images, teacher-forced, through the GPTQ model) and each decoder is judged teacher-forced
on the manifest's validation items (``validate``'s decoder stage) against the fp32 reference
(KL mean / p95, top-1, top-5, ppl ratio) and, for the int8 variants, against the same-precision
reference with the int8-KV mirror (``fq_*``: the exporter's own error). Prints one JSON record
(each variant also to stderr as it finishes); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from bench.common import host

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "calib_data" / "manifest.jsonl"
VARIANTS = ("fp32", "channel", "tensor")  # fp32 KV, int8 per channel, int8 per tensor
# (``channel@0.9``: scales from 0.9 x amax, the largest values saturating)
METRICS = ("kl_mean", "kl_p95", "top1", "top5", "ppl_ratio", "fq_kl_mean", "fq_kl_p95",
           "fq_top1", "fq_ppl_ratio")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.kv_cache", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="fp32 checkpoint (default: the bundled nano)")
    p.add_argument("--gptq", type=Path, required=True,
                   help="its GPTQ checkpoint (export.py's <out>.work/quant/gptq)")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--max-items", type=int, default=None, help="validation items (default all)")
    p.add_argument("--n-calib", type=int, default=None, help="calibration items (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   help="fp32 | channel | tensor, the int8 ones optionally @CLIP (fraction of "
                        "amax, e.g. channel@0.9)")
    return p


def _calibration(gptq: Path, ckpt: Path, manifest: Path, cache: Path, n: int | None):
    """The GPTQ model and its calibration inputs (``export.py``'s calib split and plumbing)."""
    from calib_data.manifest import load_manifest, materialise
    from quant.calibration import CalibItem, build_calibration
    from quant.checkpoint import load_gptq_model

    model = load_gptq_model(gptq, "fp32").eval()
    items = [it for it in load_manifest(manifest) if it.split == "calib"][:n]
    calib = [CalibItem(image=materialise(it, cache), prompt=it.query_parts(), answer=it.answer)
             for it in items]
    return model, build_calibration(model, calib, ckpt, min_items=min(len(calib), 8))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from calib_data.manifest import load_manifest
    from exporters.pipeline import build_bundle, resolve_checkpoint
    from models.checkpoint import load_model
    from quant.checkpoint import load_gptq_checkpoint
    from quant.kv_scales import calibrate_kv_scales
    from validate.compare import same_precision_reference
    from validate.stages import run_validation

    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_model(ckpt, "fp32")
    quant = load_gptq_checkpoint(args.gptq)[1]
    items = load_manifest(args.manifest)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        gmodel, batches = _calibration(args.gptq, ckpt, args.manifest, Path(tmp) / "images",
                                       args.n_calib)
        vision = None
        for variant in args.variants:
            out = Path(tmp) / variant
            kw: dict = {"kv_dtype": "fp32"}
            fq = None
            if variant != "fp32":
                gran, _, clip = variant.partition("@")
                scales = calibrate_kv_scales(gmodel, batches, gran, float(clip or 1.0))
                kw = {"kv_dtype": "int8", "kv_scales": scales}
                fq = same_precision_reference(model, "edge", args.gptq, target="cpu",
                                              kv_scales=scales)
            # the GPTQ model's norms and tables (fp16 as stored), as export.py's decoder
            build_bundle(ckpt, out, plan="edge", model=gmodel, quant_tensors=quant,
                         vision_onnx=vision, target="cpu", decoder_kwargs=kw)
            vision = vision or out / "vision.onnx"
            rep = run_validation(out, model, items, "edge", stages=("decoder",),
                                 max_items=args.max_items, threads=args.threads, plots=False,
                                 fake_quant_model=fq, target="cpu" if fq is not None else "gpu")
            m = rep.summary()["metrics"]
            rows.append({"kv": variant, "items": rep.summary().get("n_items"),
                         **{k: m.get(f"decoder.{k}") for k in METRICS}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps({"bench": "kv_cache", "host": host(load_avg=list(os.getloadavg())),
                      "checkpoint": str(args.checkpoint or "nano"), "variants": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
