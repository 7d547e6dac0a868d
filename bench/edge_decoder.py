"""The edge plan's compact decoder parts, size vs drift: embedding table (fp16 / int8 rows / int4
blocks) and LM head (int8 per row / int4 groups / fp16), on the same int4 decoder Linears.

    python -m bench.edge_decoder --gptq <out>.work/quant/gptq          # nano, export.py's GPTQ
    python -m bench.edge_decoder                                      # nano, round-to-nearest

Each variant is a bundle of the edge plan (gpu target: fp16 activations and KV) differing only in
``embed`` / ``lm_head``; its decoder is judged teacher-forced against the fp32 PyTorch reference
on the manifest's validation items (``validate``'s decoder stage: KL mean / p95, top-1, top-5),
and the bytes of its table / head are read off the ONNX initializers. The full-size bytes are
computed from the full Qwen-VL-Chat shapes with the same formulas (``quant.embedding``), not
measured. Prints one JSON record (each variant also to stderr as it finishes); asserts nothing.
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
VARIANTS = (("fp16", "int8"), ("int8", "int8"), ("int4", "int8"), ("int8", "int4"),
            ("int8", "fp16"))  # (embed, lm_head); the edge plan is ("int8", "int8")
METRICS = ("kl_mean", "kl_p95", "top1", "top5", "ppl_ratio")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.edge_decoder", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="fp32 checkpoint (default: the bundled nano)")
    p.add_argument("--gptq", type=Path, default=None,
                   help="GPTQ checkpoint of it (export.py's <out>.work/quant/gptq); default RTN")
    p.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST)
    p.add_argument("--max-items", type=int, default=None, help="validation items (default all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=[f"{e}:{h}" for e, h in VARIANTS],
                   metavar="EMBED:HEAD", help="variants to build (default: all five)")
    return p


def _part_bytes(onnx_path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    out = {"embed_bytes": 0, "lm_head_bytes": 0}
    for t in m.graph.initializer:
        part = "embed_bytes" if t.name.startswith("transformer.wte.") else \
            "lm_head_bytes" if t.name.startswith("lm_head.") else None
        if part:
            n = 1
            for d in t.dims:
                n *= d
            out[part] += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return out


def full_size_bytes() -> dict[str, dict[str, int]]:
    """Table and head bytes of the full-size model by dtype (formulas, not files)."""
    from models.config import qwen_vl_chat_config
    from quant.embedding import table_bytes
    from quant.lm_head import INT4_GROUP

    cfg = qwen_vl_chat_config()
    v, h = cfg.vocab_size, cfg.hidden_size
    head = {"fp16": v * h * 2, "int8": v * h + v * 2,  # gpu target: fp16 MatMulNBits scales
            "int4": v * h // 2 + v * (h // INT4_GROUP) * 2}
    return {"embed": {m: table_bytes(v, h, m) for m in ("fp16", "int8", "int4")},
            "lm_head": head}


def _quant_tensors(gptq: Path | None):
    if gptq is None:
        return None  # build_bundle's round-to-nearest stand-in
    from quant.checkpoint import load_gptq_checkpoint

    return load_gptq_checkpoint(gptq)[1]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from calib_data.manifest import load_manifest
    from exporters.pipeline import build_bundle, resolve_checkpoint
    from models.checkpoint import load_model
    from validate.stages import run_validation

    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_model(ckpt, "fp32")
    quant = _quant_tensors(args.gptq)
    items = load_manifest(args.manifest)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        vision = None
        for embed, head in (v.split(":") for v in args.variants):
            out = Path(tmp) / f"{embed}-{head}"
            build_bundle(ckpt, out, plan="edge", model=model, quant_tensors=quant,
                         vision_onnx=vision, decoder_kwargs={"embed": embed, "lm_head": head})
            vision = vision or out / "vision.onnx"
            rep = run_validation(out, model, items, "edge", stages=("decoder",),
                                 max_items=args.max_items, threads=args.threads, plots=False)
            summ = rep.summary()
            m = summ["metrics"]
            rows.append({"embed": embed, "lm_head": head, "items": summ.get("n_items"),
                         **_part_bytes(out / "decoder.onnx"),
                         **{k: m.get(f"decoder.{k}") for k in METRICS}})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    rec = {"bench": "edge_decoder", "host": host(load_avg=list(os.getloadavg())),
           "checkpoint": str(args.checkpoint or "nano"), "gptq": bool(args.gptq),
           "variants": rows,
           "full_size_bytes": full_size_bytes()}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
