"""The edge plan's compact decoder parts, size vs drift: embedding table (fp16 / int8 rows / int4
blocks) and LM head (int8 per row / int4 groups by round-to-nearest or GPTQ / fp16), on the same
int4 decoder Linears.

    python -m bench.edge_decoder --gptq <out>.work/quant/gptq          # nano, export.py's GPTQ
    python -m bench.edge_decoder                                      # nano, round-to-nearest
    python -m bench.edge_decoder --gptq <gptq> --variants int8:int4/32 int8:gptq/32 int4/16:int8
    python -m bench.edge_decoder --checkpoint <full-size> --time-head-rows 8192   # GPTQ cost only

A variant is ``EMBED:HEAD``. EMBED: ``fp16`` | ``int8`` | ``int4[/BLOCK][+mse]`` (int4 rows,
BLOCK values per fp16 scale, default 32; ``+mse``: the per-block clipped scale of least squared
error). HEAD: ``int8`` | ``fp16`` | ``int4[/GROUP]`` (round-to-nearest, default 32) |
``gptq[/GROUP]`` | ``gptq-act[/GROUP]`` (GPTQ int4, act-order: its Hessian is that of the final
normed hidden states of the calibration split's image-conditioned prompts through the GPTQ
decoder, ``quant.lm_head.head_hessian``).

Each variant is a bundle of the edge plan (gpu target: fp16 activations and KV) differing only in
``embed`` / ``lm_head``; its decoder is judged teacher-forced against the fp32 PyTorch reference
on the manifest's validation items (``validate``'s decoder stage: KL mean / p95, top-1, top-5;
``--full-report``: every stage and gate of the edge plan), and the bytes of its table / head are
read off the ONNX initializers. The full-size bytes are
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
import time
from dataclasses import dataclass
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
                   metavar="EMBED:HEAD", help="variants to build (default: "
                   + " ".join(f"{e}:{h}" for e, h in VARIANTS) + "; EMBED int4[/BLOCK][+mse], "
                   "HEAD int4[/GROUP] | gptq[-act][/GROUP])")
    p.add_argument("--n-calib", type=int, default=None,
                   help="calibration items for the GPTQ head's Hessian (default all)")
    p.add_argument("--time-head-rows", type=int, default=None, metavar="N",
                   help="only time GPTQ of the first N rows of the checkpoint's head (read alone, "
                        "not the model) on a synthetic Hessian, then stop: time and memory do "
                        "not depend on the Hessian's values")
    p.add_argument("--head-group", type=int, default=None, help="group of --time-head-rows "
                   "(default quant.lm_head.INT4_GROUP)")
    p.add_argument("--act-order", action="store_true", help="act-order for --time-head-rows")
    p.add_argument("--full-report", action="store_true",
                   help="judge every stage of the edge plan's drift report (decoder, its "
                        "exporter-error rows against a same-precision reference holding the "
                        "variant's head and table, grounding / OCR), not only the decoder's "
                        "drift rows; needs --gptq")
    return p


def time_head(ckpt: Path, rows: int, group: int | None, act_order: bool) -> dict:
    """Seconds and peak RSS of GPTQ of ``rows`` head rows (slices of 8192 sharing one factor),
    on the Hessian of seeded low-rank + noise activations (4096 tokens)."""
    import torch

    from bench.common import peak_rss_mib
    from models.checkpoint import CheckpointReader
    from quant.gptq import Hessian
    from quant.lm_head import INT4_GROUP, gptq_head

    t0 = time.perf_counter()
    full = CheckpointReader(ckpt).get("lm_head.weight")
    w = full[:rows].clone()
    del full
    load_s = time.perf_counter() - t0
    k = w.shape[1]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 64, generator=g) @ torch.randn(64, k, generator=g)
         + 0.3 * torch.randn(4096, k, generator=g))
    hess = Hessian(k)
    hess.add(x)
    del x
    load_peak = peak_rss_mib()
    rss0 = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak (VmHWM) here
    t0 = time.perf_counter()
    head = gptq_head(w, hess.h, group or INT4_GROUP, desc_act=act_order, progress=True)
    return {"rows": int(w.shape[0]), "hidden": k, "group": group or INT4_GROUP,
            "act_order": act_order, "load_s": round(load_s, 2),
            "gptq_s": round(time.perf_counter() - t0, 2), "threads": torch.get_num_threads(),
            "peak_rss_mib_load": round(load_peak), "rss_mib_before_gptq": round(rss0),
            "peak_rss_mib_gptq": round(_rss_mib("VmHWM")),
            "packed_bytes": int(head.qweight.nbytes + head.qzeros.nbytes + head.scales.nbytes)}


def _rss_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc/self/status, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass(frozen=True)
class Variant:
    """One ``EMBED:HEAD`` spec, parsed."""

    embed: str  # fp16 | int8 | int4
    block: int | None  # int4 rows: values per scale (None: quant.embedding.INT4_BLOCK)
    mse: bool  # int4 rows: MSE-clipped block scales
    head: str  # int8 | fp16 | int4
    method: str  # rtn | gptq (int4 head)
    group: int  # int4 head: values per scale
    act_order: bool

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        from quant.lm_head import INT4_GROUP

        try:
            e, h = spec.split(":")
            e, mse = (e[:-4], True) if e.endswith("+mse") else (e, False)
            e, _, blk = e.partition("/")
            h, _, grp = h.partition("/")
            method = "gptq" if h.startswith("gptq") else "rtn"
            act = h == "gptq-act"
            head = "int4" if method == "gptq" else h
            if e not in ("fp16", "int8", "int4") or h not in ("int8", "fp16", "int4", "gptq",
                                                              "gptq-act"):
                raise ValueError
            if (blk or mse) and e != "int4" or grp and head != "int4":
                raise ValueError
            return cls(e, int(blk) if blk else None, mse, head, method,
                       int(grp) if grp else INT4_GROUP, act)
        except ValueError:
            raise SystemExit(f"bad variant '{spec}': EMBED:HEAD, e.g. int8:int8, int4/16+mse:int8,"
                             " int8:int4/64, int8:gptq-act/32") from None

    @property
    def embed_label(self) -> str:
        if self.embed != "int4":
            return self.embed
        from quant.embedding import INT4_BLOCK

        return f"int4/{self.block or INT4_BLOCK}" + ("+mse" if self.mse else "")

    @property
    def head_label(self) -> str:
        if self.head != "int4":
            return self.head
        name = {"rtn": "int4", "gptq": "gptq-act" if self.act_order else "gptq"}[self.method]
        return f"{name}/{self.group}"


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


def full_size_bytes(variants: list[Variant] = ()) -> dict[str, dict[str, int]]:
    """Table and head bytes of the full-size model by dtype (formulas, not files); an int4
    head with act-order adds its int64 input permutation."""
    from models.config import qwen_vl_chat_config
    from quant.embedding import table_bytes
    from quant.lm_head import INT4_GROUP

    cfg = qwen_vl_chat_config()
    v, h = cfg.vocab_size, cfg.hidden_size
    head = {"fp16": v * h * 2, "int8": v * h + v * 2,  # gpu target: fp16 MatMulNBits scales
            "int4": v * h // 2 + v * (h // INT4_GROUP) * 2}
    embed = {m: table_bytes(v, h, m) for m in ("fp16", "int8", "int4")}
    for x in variants:
        if x.head == "int4":
            head[x.head_label] = v * h // 2 + v * (h // x.group) * 2 + 8 * h * x.act_order
        if x.embed == "int4":
            embed[x.embed_label] = table_bytes(v, h, "int4", x.block)
    return {"embed": embed, "lm_head": head}


def _head_hessian(ckpt: Path, model, gptq: Path | None, manifest: Path, n_calib: int | None):
    """The LM head's input Hessian on the calibration split, after the (GPTQ) int4 decoder."""
    from calib_data.manifest import load_manifest, materialise
    from quant.calibration import CalibItem, build_calibration
    from quant.lm_head import decoder_outputs, head_hessian

    items = [it for it in load_manifest(manifest) if it.split == "calib"][:n_calib]
    with tempfile.TemporaryDirectory(prefix="bench-edge-img-") as tmp:
        calib = [CalibItem(image=materialise(it, tmp), prompt=it.query_parts(), answer=it.answer)
                 for it in items]
        batches = build_calibration(model, calib, ckpt)
    if gptq is not None:
        from quant.checkpoint import load_gptq_model

        qmodel = load_gptq_model(gptq, "fp32").eval()
    else:
        from quant.fake_quant import fake_quant_model, rtn_gptq_tensors

        qmodel = fake_quant_model(model, rtn_gptq_tensors(model, group_size=_rtn_group(model)))
    return head_hessian(qmodel.transformer.ln_f, decoder_outputs(qmodel, batches)), len(items)


def _rtn_group(model) -> int:
    from exporters.pipeline import _rtn_quant  # noqa: PLC0415 - the group build_bundle uses

    return _rtn_quant(model, None)["group_size"]


def _head_tensor(x: Variant, model, hessian):
    """The int4 head of ``x`` as a GPTQ v1 Linear (None: the exporter's own head)."""
    from quant.lm_head import gptq_head, rtn_head

    if x.head != "int4":
        return None
    w = model.lm_head.weight
    if x.method == "rtn":
        return rtn_head(w, x.group)
    return gptq_head(w, hessian, x.group, desc_act=x.act_order)


def _same_precision(gptq: Path | None, x: Variant, head_t, table, decoder: Path):
    """The same-precision reference of variant ``x`` (gpu target): the GPTQ checkpoint
    dequantised, with exactly the variant's head and embedding rows (and the int8 KV cache of
    the engine ``decoder``, with its scales, when the target stores one)."""
    import torch

    from quant.kv_scales import int8_kv, read_engine_scales
    from quant.plans import PLANS

    from quant.checkpoint import load_gptq_model
    from quant.packing import dequantize

    if gptq is None:
        raise SystemExit("--full-report needs --gptq (the same-precision reference)")
    same = load_gptq_model(gptq, "fp32", lm_head="fp16" if head_t is not None else x.head,
                           embed="fp16" if table is not None else x.embed).eval()
    if head_t is not None:
        same.lm_head.weight.data = torch.from_numpy(dequantize(head_t))
    if table is not None:
        same.transformer.wte.weight.data = torch.from_numpy(table.dequantized())
    if PLANS["edge"].target("gpu").int8_kv:
        int8_kv(same, read_engine_scales(decoder))
    return same


def _embed_table(x: Variant, model):
    from quant.embedding import quantize_embedding

    if x.embed != "int4" or (x.block is None and not x.mse):
        return None
    return quantize_embedding(model.transformer.wte.weight.detach(), "int4", block=x.block,
                              mse_clip=x.mse)


def _quant_tensors(gptq: Path | None):
    if gptq is None:
        return None  # build_bundle's round-to-nearest stand-in
    from quant.checkpoint import load_gptq_checkpoint

    return load_gptq_checkpoint(gptq)[1]


def _run_variant(x: Variant, out: Path, ctx: dict) -> dict:
    """Build variant ``x``'s edge bundle in ``out`` and judge it; -> its row."""
    from exporters.pipeline import build_bundle
    from quant.lm_head import HEAD_KEY
    from validate.stages import run_validation

    args, model = ctx["args"], ctx["model"]
    t0 = time.perf_counter()
    head_t = _head_tensor(x, model, ctx["hessian"])
    head_s = time.perf_counter() - t0
    qt = ctx["quant"] if head_t is None else {**ctx["quant"], HEAD_KEY: head_t}
    table = _embed_table(x, model)
    build_bundle(ctx["ckpt"], out, plan="edge", model=model, quant_tensors=qt,
                 vision_onnx=ctx.get("vision"), decoder_kwargs={
                     "embed": x.embed, "lm_head": x.head, "embed_table": table})
    ctx["vision"] = ctx.get("vision") or out / "vision.onnx"
    judge: dict = {"stages": ("decoder",)}
    if args.full_report:
        judge = {"fake_quant_model": _same_precision(args.gptq, x, head_t, table,
                                                     out / "decoder.onnx"),
                 "stages": ("vision", "decoder", "task")}
    summ = run_validation(out, model, ctx["items"], "edge", max_items=args.max_items,
                          threads=args.threads, plots=False, **judge).summary()
    m = summ["metrics"]
    row = {"embed": x.embed_label, "lm_head": x.head_label, "items": summ.get("n_items"),
           **_part_bytes(out / "decoder.onnx"), **{k: m.get(f"decoder.{k}") for k in METRICS},
           "head_quant_s": round(head_s, 3)}
    if args.full_report:
        row.update(verdict=summ["verdict"], failed=summ["failed"],
                   inconclusive=summ["inconclusive"],
                   **{k: v for k, v in m.items() if not k.startswith("vision.")})
    return row


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from calib_data.manifest import load_manifest
    from exporters.pipeline import resolve_checkpoint
    from models.checkpoint import load_model

    ckpt = resolve_checkpoint(args.checkpoint)
    if args.time_head_rows:
        print(json.dumps({"bench": "edge_decoder.time_head",
                          "host": host(load_avg=list(os.getloadavg())),
                          "checkpoint": str(args.checkpoint or "nano"),
                          **time_head(ckpt, args.time_head_rows, args.head_group,
                                      args.act_order)}))
        return 0
    model = load_model(ckpt, "fp32")
    quant = _quant_tensors(args.gptq)
    if quant is None:  # build_bundle's round-to-nearest stand-in, made here to add a head to it
        from quant.fake_quant import rtn_gptq_tensors

        quant = rtn_gptq_tensors(model, group_size=_rtn_group(model))
    variants = [Variant.parse(v) for v in args.variants]
    hessian, n_calib = None, 0
    if any(x.method == "gptq" and x.head == "int4" for x in variants):
        hessian, n_calib = _head_hessian(ckpt, model, args.gptq, args.manifest, args.n_calib)
    ctx = {"args": args, "model": model, "ckpt": ckpt, "quant": quant, "hessian": hessian,
           "items": load_manifest(args.manifest)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        for i, x in enumerate(variants):
            rows.append(_run_variant(x, Path(tmp) / f"v{i}", ctx))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    rec = {"bench": "edge_decoder", "host": host(load_avg=list(os.getloadavg())),
           "checkpoint": str(args.checkpoint or "nano"), "gptq": bool(args.gptq),
           "head_calib_items": n_calib, "variants": rows,
           "full_size_bytes": full_size_bytes(variants)}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
