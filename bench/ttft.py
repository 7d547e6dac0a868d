"""Time to first token, split into preprocess / vision / prefill, as a user of the runtime sees
it (``Pipeline.chat`` with one real photo and a short question). Prints one JSON record.

    python -m bench.ttft                                 # builds an int4 bundle of the shipped nano
    python -m bench.ttft --bundle out/qwen-vl-int4 --device cuda --iters 20
    python -m bench.ttft --vision V.onnx --decoder D.onnx --iters 1   # engines without a bundle

``--vision/--decoder`` times the same three stages on bare engines (full-size engines exported
separately, no tokenizer needed): the prompt is the runtime's layout of ``--prompt-tokens``
tokens around the image's 256 rows. The first call is a warm-up and is reported apart
(``cold``): it includes onnxruntime's first-run allocations.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import host, peak_rss_mib, stats
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
    text = np.random.default_rng(0).integers(0, min(vocab, full.eod_id), prompt_tokens - n_rows)
    table = np.concatenate([text[:5], vocab + np.arange(n_rows), text[5:]]).astype(np.int64)
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


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: build a nano int4 one)")
    ap.add_argument("--vision", type=Path, help="vision engine .onnx (with --decoder: no bundle)")
    ap.add_argument("--decoder", type=Path, help="decoder engine .onnx (with --vision)")
    ap.add_argument("--prompt-tokens", type=int, default=288,
                    help="prompt length of the --vision/--decoder mode (256 image rows + text)")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    ap.add_argument("--iters", type=int, default=5, help="timed calls after one warm-up")
    ap.add_argument("--image", default="astronaut",
                    help="a scikit-image sample name or an image path")
    ap.add_argument("--prompt", default="What is in the picture? Answer in one short sentence.")
    args = ap.parse_args(argv)

    image = args.image
    if not Path(image).exists():
        import skimage.data

        image = getattr(skimage.data, image)()
    threads = args.threads or None
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
    record = {"bench": "ttft", "host": host(), **info, "threads": args.threads or "all",
              "cold_ms": {k.removesuffix("_s"): round(v * 1000, 3) for k, v in runs[0].items()},
              "warm": split_stats(runs[1:]), "peak_rss_mib": peak_rss_mib()}
    print(json.dumps(record))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
