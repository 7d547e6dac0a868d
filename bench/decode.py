"""Per-token decode time of the runtime ``Pipeline`` vs a bare ``session.run`` loop, same bundle,
same run, same decoder session: the runtime's own overhead (sampling, detokenising, streaming,
stop checks, locking, KV bookkeeping). Prints one JSON record; asserts nothing.

    python -m bench.decode                       # builds a nano fp32 bundle (needs torch)
    python -m bench.decode --bundle DIR --new-tokens 256 --threads 4

Both loops decode the same prompt (one image + text) for ``--new-tokens`` tokens with stop ids
ignored; the repeats alternate the two loops, and the medians over all steps of all repeats are
reported (robust on a shared machine). ``pipeline`` is the wall time between consecutive tokens
as the consumer of ``chat()`` sees them (engine + sampling + detokenising + streaming);
``bare`` is ``session.run`` with numpy feeds (presents fed back as pasts) + argmax.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import host_read_bandwidth_gbs
from runtime.errors import cli_main
from runtime.contract import ATTENTION_MASK, IMAGE_EMBEDS, INPUT_IDS, LOGITS


def build_nano_bundle(out: Path, plan: str, seed: int = 0) -> Path:
    from exporters.pipeline import build_bundle
    from models.nano import make_nano_checkpoint

    ckpt = make_nano_checkpoint(out.parent / f"nano-ckpt-{seed}", seed=seed)
    return build_bundle(ckpt, out, plan=plan)


def bare_loop(pipe, table_ids: np.ndarray, feats: np.ndarray, n: int) -> list[float]:
    """session.run decode loop; returns the wall time of each step after the prefill (s)."""
    dec = pipe.decoder
    sess = dec.session
    c = dec.contract
    names = [o.name for o in sess.get_outputs()]
    kv = np.zeros(c.kv_shape(1, 0), c.kv_dtype)
    past = {n: kv for i in range(c.layers) for n in c.kv_names(i)[:2]}
    no_img = np.zeros((0, feats.shape[-1]), np.float32)
    out = dict(zip(names, sess.run(None, {
        INPUT_IDS: table_ids[None], IMAGE_EMBEDS: feats,
        ATTENTION_MASK: np.ones((1, len(table_ids)), np.int64), **past,
        **c.logits_feed(1)})))
    total = len(table_ids)
    nv = pipe.n_vocab
    tok = int(np.argmax(out[LOGITS][0, -1, :nv]))
    steps = []
    t0 = time.perf_counter()
    for _ in range(n - 1):
        total += 1
        feed = {INPUT_IDS: np.array([[tok]], np.int64), IMAGE_EMBEDS: no_img,
                ATTENTION_MASK: np.ones((1, total), np.int64), **c.logits_feed(1)}
        for i in range(c.layers):
            pk, pv, ok, ov = c.kv_names(i)
            feed[pk], feed[pv] = out[ok], out[ov]
        out = dict(zip(names, sess.run(None, feed)))
        tok = int(np.argmax(out[LOGITS][0, -1, :nv]))
        t1 = time.perf_counter()
        steps.append(t1 - t0)
        t0 = t1
    return steps


def pipeline_loop(pipe, prompt: str, image, n: int) -> tuple[list[float], list[float]]:
    """Per-token wall times as the consumer of ``chat()`` sees them, and the engine-only ones."""
    stream = pipe.chat(prompt, images=[image], temperature=0, max_new_tokens=n, min_new_tokens=n)
    for _ in stream:
        pass
    r = stream.result()
    assert len(r.token_ids) == n, (len(r.token_ids), r.finish_reason)
    return r.timings["decode_s"], r.timings["decode_engine_s"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: build a nano one)")
    ap.add_argument("--plan", default="fp32", choices=("fp32", "fp16", "int4"),
                    help="plan of the nano bundle built when --bundle is not given")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--prompt-words", type=int, default=60, help="extra words in the prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    return ap


def _measure(pipe, prompt: str, image, table_ids, feats, n: int, repeats: int):
    """Per-step times of the pipeline, its engine share and the bare loop, after a warm-up."""
    pipeline_loop(pipe, prompt, image, min(n, 16))  # warm-up both
    bare_loop(pipe, table_ids, feats, min(n, 16))
    pipe_s, engine_s, bare_s, pipe_runs, bare_runs = [], [], [], [], []
    for _ in range(repeats):  # alternate, so both see the same machine load
        p, e = pipeline_loop(pipe, prompt, image, n)
        b = bare_loop(pipe, table_ids, feats, n)
        pipe_s += p
        engine_s += e
        bare_s += b
        pipe_runs.append(float(np.mean(p)))
        bare_runs.append(float(np.mean(b)))
    return pipe_s, engine_s, bare_s, pipe_runs, bare_runs


def _record(args, bundle, pipe, prompt_tokens: int, n: int, pipe_s, engine_s, bare_s,
            pipe_runs, bare_runs) -> dict:
    """The JSON record: per-token medians, the overhead over the bare loop and the DRAM ceiling."""
    # medians over every step of every repeat: robust to bursts of load from other processes
    p_ms, b_ms, e_ms = (1e3 * float(np.median(x)) for x in (pipe_s, bare_s, engine_s))
    p_q1, b_q1 = (1e3 * float(np.percentile(x, 25)) for x in (pipe_s, bare_s))
    man = pipe.manifest
    weights = sum(v["size"] for k, v in man.files.items() if k.startswith("decoder"))
    ctx = prompt_tokens + n // 2
    bytes_per_token = weights + ctx * pipe.decoder.kv_bytes_per_token
    bw = host_read_bandwidth_gbs()["read_gbs"] if pipe.device == "cpu" else None
    ceiling = bw * 1e9 / bytes_per_token if bw else None
    return {
        "bench": "decode", "bundle": str(bundle), "precision": man.precision,
        "device": pipe.device, "providers": pipe.providers, "threads": args.threads,
        "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "prompt_tokens": prompt_tokens, "new_tokens": n, "repeats": args.repeats,
        "pipeline_ms_per_token": round(p_ms, 4),
        "pipeline_engine_ms_per_token": round(e_ms, 4),
        "bare_session_run_ms_per_token": round(b_ms, 4),
        "overhead_pct": round(100 * (p_ms - b_ms) / b_ms, 2),
        "pipeline_p25_ms_per_token": round(p_q1, 4), "bare_p25_ms_per_token": round(b_q1, 4),
        "overhead_pct_p25": round(100 * (p_q1 - b_q1) / b_q1, 2),
        "pipeline_tok_s": round(1e3 / p_ms, 1), "bare_tok_s": round(1e3 / b_ms, 1),
        "bytes_per_token": bytes_per_token, "memory_bandwidth_gbs": bw and round(bw, 1),
        "ceiling_tok_s": ceiling and round(ceiling, 1),
        "pct_of_ceiling": ceiling and round(100 * 1e3 / p_ms / ceiling, 2),
        "ceiling_note": ("DRAM ceiling = copy bandwidth / (decoder weights + KV read per token); "
                         "weights this small stay in the CPU caches, so it can be exceeded"
                         if bytes_per_token < (64 << 20) else "DRAM ceiling"),
        "run_means_pipeline_ms": [round(1e3 * x, 4) for x in pipe_runs],
        "run_means_bare_ms": [round(1e3 * x, 4) for x in bare_runs],
    }


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    tmp = None
    bundle = args.bundle
    if bundle is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-decode-")
        bundle = build_nano_bundle(Path(tmp.name) / f"nano-{args.plan}", args.plan)

    from runtime import Pipeline
    from runtime.image import load_image, preprocess

    pipe = Pipeline.from_bundle(bundle, device=args.device, threads=args.threads)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 128, 3), np.uint8)
    prompt = "Describe the picture. " + " ".join(["robot"] * args.prompt_words)
    n = args.new_tokens

    # the same prefill for the bare loop: prompt-table ids + the vision features
    prep = pipe._prepare(prompt, [image], None, None, pipe._generation({"max_new_tokens": n}))
    feats = pipe.vision.encode(preprocess(load_image(image), pipe.image_size)[None]).numpy()
    table_ids, _ = pipe.prompt_table.table_ids(prep.ids)
    feats = feats.reshape(-1, feats.shape[-1])

    times = _measure(pipe, prompt, image, table_ids, feats, n, args.repeats)
    print(json.dumps(_record(args, bundle, pipe, len(prep.ids), n, *times)))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
