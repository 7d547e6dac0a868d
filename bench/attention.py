"""One decode step of attention alone, bound as the runtime binds it: MultiHeadAttention (past in
one buffer, present written into another: the ``concat`` KV layout) vs GroupQueryAttention (one
buffer bound as past and present, the mask as an additive bias: the ``shared`` layout), at the
decoder's width. Calls alternate A B A B in one process, so a busy machine slows both alike;
the ratio is the median of the per-pair ratios. Prints one JSON record.

    python -m bench.attention --threads 2 --past 288 352 416
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from bench.common import host
from runtime.errors import cli_main


def _session(node, inputs: list, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in node.output]
    m = helper.make_model(helper.make_graph([node], "attention", inputs, outs),
                          opset_imports=[helper.make_opsetid("", 21),
                                         helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def sessions(heads: int, head_dim: int, threads: int):
    """(MultiHeadAttention, GroupQueryAttention) sessions with the decoder exporter's inputs."""
    from onnx import TensorProto as T
    from onnx import helper

    hd = heads * head_dim
    vi = helper.make_tensor_value_info
    qkv = [vi(n, T.FLOAT, ["B", "S", hd]) for n in "qkv"]
    kv = [vi(n, T.FLOAT, ["B", heads, "P", head_dim]) for n in ("pk", "pv")]
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "m", "", "pk", "pv"],
                           ["o", "ok", "ov"], domain="com.microsoft", num_heads=heads,
                           unidirectional=1)
    gqa = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tl", "", "",
                                                   "", "bias", "", "", "", "", "", "qs"],
                           ["o", "ok", "ov"], domain="com.microsoft", num_heads=heads,
                           kv_num_heads=heads)
    return (_session(mha, qkv + [vi("m", T.INT32, ["B", "T"])] + kv, threads),
            _session(gqa, qkv + kv + [vi("sk", T.INT32, ["B"]), vi("tl", T.INT32, []),
                                      vi("bias", T.FLOAT, ["B", 1, "S", "T"]),
                                      vi("qs", T.INT32, ["B"])], threads))


def bound_steps(mha, gqa, heads: int, head_dim: int, past: int, capacity: int):
    """Two callables running one decode step (context ``past + 1``) through I/O binding, and
    the arrays they read and write by pointer (keep them alive while the callables run)."""
    shape = (1, heads, capacity, head_dim)
    rng = np.random.default_rng(0)
    bufs = [rng.standard_normal(shape, dtype=np.float32) for _ in range(4)]
    q = rng.standard_normal((1, 1, heads * head_dim), dtype=np.float32)
    out = np.empty_like(q)
    t = past + 1
    f32 = np.float32
    steps, keep = [], [q, out, bufs]
    for sess, extra in ((mha, {"m": np.ones((1, t), np.int32)}),
                        (gqa, {"sk": np.array([t - 1], np.int32), "tl": np.array(t, np.int32),
                               "qs": np.array([1], np.int32),
                               "bias": np.zeros((1, 1, 1, t), f32)})):
        io = sess.io_binding()
        keep.append(extra)
        for name, arr in {"q": q, "k": q, "v": q, **extra}.items():
            io.bind_cpu_input(name, arr)
        io.bind_output("o", "cpu", 0, f32, list(q.shape), out.ctypes.data)
        shared = sess is gqa
        past_shape = list(shape) if shared else [1, heads, past, head_dim]
        pres_shape = list(shape) if shared else [1, heads, t, head_dim]
        dst = bufs[:2] if shared else bufs[2:]  # shared: present is the past buffer
        for name, buf in (("pk", bufs[0]), ("pv", bufs[1])):
            io.bind_input(name, "cpu", 0, f32, past_shape, buf.ctypes.data)
        for name, buf in (("ok", dst[0]), ("ov", dst[1])):
            io.bind_output(name, "cpu", 0, f32, pres_shape, buf.ctypes.data)
        steps.append(lambda s=sess, b=io: s.run_with_iobinding(b))
    return steps, keep


def measure(heads: int, head_dim: int, past: int, threads: int, pairs: int) -> dict:
    mha, gqa = sessions(heads, head_dim, threads)
    (run_m, run_g), _keep = bound_steps(mha, gqa, heads, head_dim, past, past + 2)
    for f in (run_m, run_g, run_m, run_g):  # warm-up
        f()
    tm, tg = [], []
    for _ in range(pairs):
        for f, acc in ((run_m, tm), (run_g, tg)):
            t = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t)
    tm_a, tg_a = np.array(tm), np.array(tg)
    return {"past": past, "load_avg": round(os.getloadavg()[0], 2),
            "mha_ms": round(1e3 * float(np.median(tm_a)), 3),
            "gqa_ms": round(1e3 * float(np.median(tg_a)), 3),
            "mha_over_gqa": round(float(np.median(tm_a / tg_a)), 3)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.attention",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--heads", type=int, default=32, help="attention heads (Qwen-VL-Chat: 32)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--past", type=int, nargs="+", default=[288, 352, 416],
                    help="cached tokens before the step (288: the benchmark prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=60, help="alternating MHA/GQA calls per size")
    return ap


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = [measure(args.heads, args.head_dim, p, args.threads, args.pairs) for p in args.past]
    print(json.dumps({"bench": "attention", "host": host(), "threads": args.threads,
                      "heads": args.heads, "head_dim": args.head_dim, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
