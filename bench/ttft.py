"""Time to first token, split into preprocess / vision / prefill, as a user of the runtime sees
it (``Pipeline.chat`` with one real photo and a short question). Prints one JSON record.

    python -m bench.ttft                                 # builds an int4 bundle of the shipped nano
    python -m bench.ttft --bundle out/qwen-vl-int4 --device cuda --iters 20
    python -m bench.ttft --vision V.onnx --decoder D.onnx --iters 1   # engines without a bundle
    python -m bench.ttft --plans fp16 int4 edge --targets cpu gpu --threads 1 2 --chunks 64 128
    python -m bench.ttft --bundles B1 B2 --threads 2 --rounds 3       # per plan, alternating

``--vision/--decoder`` times the same three stages on bare engines (full-size engines exported
separately, no tokenizer needed): the prompt is the runtime's layout of ``--prompt-tokens``
tokens around the image's 256 rows. The first call is a warm-up and is reported apart
(``cold``): it includes onnxruntime's first-run allocations.

``--plans`` / ``--bundles`` is the per-plan mode (``bench/ttft_plans.py``): vision, prefill and
TTFT of every plan's engines at every ``--threads`` count and prefill chunking, contenders
alternating in their own processes, with CPU utilisation and the load average recorded.
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

import numpy as np

from bench.common import host, peak_rss_mib, stats
from bench.ttft_plans import prompt_table
from runtime.errors import cli_main


def split_stats(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k.removesuffix("_s"): stats([r[k] for r in runs]) for k in runs[0]}


def bundle_runs(bundle: Path, device: str, threads: int | None, image, prompt: str,
                iters: int) -> tuple[list[dict[str, float]], dict]:
    from runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, device=device, threads=threads)
    runs, n_prompt = [], 0
    for _ in range(iters + 1):
        r = pipe.chat(prompt, images=[image], temperature=0, max_new_tokens=1).result()
        t = r.timings
        runs.append({k: t[k] for k in ("preprocess_s", "vision_s", "prefill_s", "ttft_s")})
        n_prompt = r.prompt_tokens
    info = {"bundle": str(bundle), "precision": pipe.manifest.precision,
            "providers": pipe.providers, "prompt_tokens": n_prompt}
    return runs, info


def engine_runs(vision: Path, decoder: Path, device: str, threads: int | None, image,
                prompt_tokens: int, iters: int) -> tuple[list[dict[str, float]], dict]:
    from bench.decoder import decoder_facts
    from models.config import QwenVLConfig
    from runtime.engines import DecoderEngine, VisionEngine, pick_providers
    from runtime.image import load_image, preprocess

    providers = pick_providers(device)
    ve = VisionEngine(vision, providers, threads)
    vocab, _ = decoder_facts(decoder)
    de = DecoderEngine(decoder, providers, threads, vocab)
    full = QwenVLConfig()  # engines without a bundle: the published Qwen-VL's facts
    n_rows = ve.n_queries or full.visual.n_queries
    size = int(ve.session.get_inputs()[0].shape[-1])
    table = prompt_table(vocab, n_rows, prompt_tokens, full.eod_id)
    runs = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        px = preprocess(load_image(image), size)[None]
        t1 = time.perf_counter()
        feats = ve.encode(px)
        t2 = time.perf_counter()
        cache = de.new_cache(1, len(table) + 1)
        int(np.argmax(de.forward(cache, table[None], features=feats)))
        t3 = time.perf_counter()
        runs.append({"preprocess_s": t1 - t0, "vision_s": t2 - t1, "prefill_s": t3 - t2,
                     "ttft_s": t3 - t0})
    return runs, {"vision": str(vision), "decoder": str(decoder), "providers": providers,
                  "prompt_tokens": int(len(table))}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: build a nano int4 one)")
    ap.add_argument("--vision", type=Path, help="vision engine .onnx (with --decoder: no bundle)")
    ap.add_argument("--decoder", type=Path, help="decoder engine .onnx (with --vision)")
    ap.add_argument("--prompt-tokens", type=int, default=288,
                    help="prompt length of the engine and per-plan modes (256 image rows + text)")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, nargs="+", default=[0],
                    help="intra-op threads (0: all cores); several only in the per-plan mode")
    ap.add_argument("--iters", type=int, default=5, help="timed calls after one warm-up (per "
                                                         "round in the per-plan mode)")
    ap.add_argument("--image", default="astronaut",
                    help="a scikit-image sample name or an image path")
    ap.add_argument("--prompt", default="What is in the picture? Answer in one short sentence.")
    g = ap.add_argument_group("per-plan mode")
    g.add_argument("--plans", nargs="+", choices=("fp32", "fp16", "int4", "edge"),
                   help="export these plans' engines from --checkpoint into --work and time them")
    g.add_argument("--targets", nargs="+", default=["cpu"], choices=("cpu", "gpu"),
                   help="decoder targets of --plans (export.py --target)")
    g.add_argument("--checkpoint", type=Path, help="checkpoint of --plans (default: shipped nano)")
    g.add_argument("--work", type=Path, help="where --plans engines are exported and reused "
                                             "(default: a temporary directory)")
    g.add_argument("--calib-images", type=int, default=8,
                   help="calibration pictures of the edge plan's int8 vision engine")
    g.add_argument("--bundles", type=Path, nargs="+", help="time these bundles' engines instead")
    g.add_argument("--chunks", type=int, nargs="*", default=[],
                   help="prefill chunk sizes timed beside the one-shot prefill")
    g.add_argument("--rounds", type=int, default=2, help="alternating rounds of every contender")
    g.add_argument("--run-plan", help=argparse.SUPPRESS)  # one contender, in its own process
    return ap


def _per_plan(args: argparse.Namespace) -> dict:
    from bench import ttft_plans as tp

    args.threads = [t or (os.cpu_count() or 1) for t in args.threads]  # explicit, recorded
    if args.bundles:
        return tp.per_plan_record([tp.bundle_engines(b) for b in args.bundles], args)
    with tempfile.TemporaryDirectory(prefix="bench-ttft-plans-") as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            from models.nano import default_checkpoint

            ckpt = default_checkpoint()
        engines = tp.export_plan_engines(Path(ckpt), args.work or Path(tmp), args.plans,
                                         args.targets, args.calib_images)
        return tp.per_plan_record(engines, args)


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.run_plan:
        from bench.ttft_plans import run_contender

        print(json.dumps(run_contender(json.loads(args.run_plan))))
        return 0
    if args.plans or args.bundles:
        if args.plans and args.bundles:
            ap.error("--plans exports engines, --bundles names them: one or the other")
        if args.iters < 1 or args.rounds < 1 or any(c < 0 for c in args.chunks):
            ap.error("--iters and --rounds must be >= 1, --chunks >= 0")
        print(json.dumps(_per_plan(args)))
        return 0
    if len(args.threads) > 1:
        ap.error("several --threads only in the per-plan mode (--plans or --bundles)")
    image = args.image
    if not Path(image).exists():
        import skimage.data

        image = getattr(skimage.data, image)()
    threads = args.threads[0] or None
    tmp = None
    if args.vision or args.decoder:
        if not (args.vision and args.decoder):
            ap.error("--vision and --decoder go together")
        runs, info = engine_runs(args.vision, args.decoder, args.device, threads, image,
                                 args.prompt_tokens, args.iters)
    else:
        bundle = args.bundle
        if bundle is None:
            from exporters.pipeline import build_bundle
            from models.nano import default_checkpoint

            tmp = tempfile.TemporaryDirectory(prefix="bench-ttft-")
            bundle = build_bundle(default_checkpoint(), Path(tmp.name) / "nano-int4", plan="int4")
        runs, info = bundle_runs(bundle, args.device, threads, image, args.prompt, args.iters)
    record = {"bench": "ttft", "host": host(), **info, "threads": threads or "all",
              "cold_ms": {k.removesuffix("_s"): round(v * 1000, 3) for k, v in runs[0].items()},
              "warm": split_stats(runs[1:]), "peak_rss_mib": peak_rss_mib()}
    print(json.dumps(record))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
