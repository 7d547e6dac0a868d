"""Two decoder engines in one process, their decode steps alternating (A B B A A B ...): a ratio
that a shared machine disturbs alike for both, where separate processes (``bench.decoder``)
can land ±10 % apart on a busy box. Driven as the runtime drives them (``DecoderEngine``:
preallocated KV, I/O binding). Prints one JSON record.

    python -m bench.decoder_pair --a <ours-L8-gqa>/decoder.onnx --b <ours-L8-mha>/decoder.onnx \\
        --threads 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import host, peak_rss_mib
from runtime.errors import cli_main


def paired_round(engines: list, ids: np.ndarray, n_new: int) -> dict:
    """One prefill per engine, then ``n_new`` decode steps each, alternating which goes first."""
    caches = [e.new_cache(1, ids.shape[1] + n_new + 1) for e in engines]
    prefill, toks = [], []
    for e, c in zip(engines, caches):
        t = time.perf_counter()
        toks.append(np.argmax(e.forward(c, ids), axis=-1))
        prefill.append(time.perf_counter() - t)
    steps: list[list[float]] = [[], []]
    for s in range(n_new):
        for i in ((0, 1) if s % 2 == 0 else (1, 0)):
            t = time.perf_counter()
            toks[i] = np.argmax(engines[i].forward(caches[i], toks[i][:, None]), axis=-1)
            steps[i].append(time.perf_counter() - t)
    a, b = np.array(steps[0]), np.array(steps[1])
    return {"load_avg": round(os.getloadavg()[0], 2),
            "prefill_s": [round(x, 3) for x in prefill],
            "decode_median_ms": [round(1e3 * float(np.median(a)), 3),
                                 round(1e3 * float(np.median(b)), 3)],
            "b_over_a": round(float(np.median(b / a)), 3)}  # > 1: engine a is faster


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.decoder_pair",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="first decoder.onnx")
    ap.add_argument("--b", type=Path, required=True, help="second decoder.onnx (same vocabulary)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=288)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    from bench.decoder import decoder_facts
    from runtime.engines import DecoderEngine, pick_providers

    args = build_parser().parse_args(argv)
    vocab, _ = decoder_facts(args.a)
    engines = [DecoderEngine(p, pick_providers("cpu"), args.threads, vocab)
               for p in (args.a, args.b)]
    ids = np.random.default_rng(0).integers(0, min(vocab, 150000), (1, args.prompt_tokens))
    rounds = [paired_round(engines, ids, args.new_tokens) for _ in range(args.rounds)]
    print(json.dumps({"bench": "decoder_pair", "host": host(), "threads": args.threads,
                      "a": str(args.a), "b": str(args.b),
                      "kv_layouts": [e.contract.kv_layout for e in engines],
                      "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                      "rounds": rounds,
                      "b_over_a_median": round(float(np.median([r["b_over_a"]
                                                                for r in rounds])), 3),
                      "peak_rss_mib": peak_rss_mib()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
