"""The OpenAI-compatible server under load on loopback: requests/s and time to first token at 1,
4 and 16 concurrent streaming clients, the server's overhead against calling ``Pipeline`` in
process at 1 client, the server's RSS growth, and the runtime's batch path against threads.
Prints one JSON record.

    python -m bench.serve                          # builds an int4 bundle of the shipped nano
    python -m bench.serve --bundle out/qwen-vl-int4 --requests 40 --clients 1 4 16

Every request is the same (one photo, one question, ``--new-tokens`` tokens exactly: greedy with
``min_tokens``), so the figures compare like with like. The server runs as ``python -m
runtime.serve`` in a subprocess with ``--parallel``/``--queue``; the in-process baseline runs
before it starts, with the same bundle and threads, so the two never share the CPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import cpu_name, host, stats

REPO = Path(__file__).resolve().parents[1]


def png_bytes(image: Any) -> bytes:
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.open(image) \
        if isinstance(image, (str, Path)) else Image.fromarray(image)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def in_process(bundle: Path, threads: int | None, png: bytes, prompt: str, n_new: int,
               iters: int) -> dict[str, Any]:
    """Pipeline.chat at 1 client (TTFT, total) and 4 requests as threads vs ``chat_batch``."""
    from runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, device="cpu", threads=threads)
    kw = dict(temperature=0, max_new_tokens=n_new, min_new_tokens=n_new)
    ttft, total = [], []
    for i in range(iters + 1):
        t = time.perf_counter()
        stream = pipe.chat(prompt, images=[png], **kw)
        next(iter(stream))
        first = time.perf_counter() - t
        stream.result()
        if i:  # the first call warms onnxruntime up
            ttft.append(first)
            total.append(time.perf_counter() - t)
    t = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: pipe.chat(prompt, images=[png], **kw).result(), range(4)))
    threads_s = time.perf_counter() - t
    t = time.perf_counter()
    pipe.chat_batch([{"prompt": prompt, "images": [png]}] * 4, **kw)
    batch_s = time.perf_counter() - t
    return {"ttft": stats(ttft), "total": stats(total),
            "four_requests": {"threads_s": round(threads_s, 4), "chat_batch_s": round(batch_s, 4),
                              "batch_speedup": round(threads_s / batch_s, 3)}}


def start_server(bundle: Path, threads: int | None, parallel: int, queue: int) -> tuple[Any, str]:
    cmd = [sys.executable, "-m", "runtime.serve", "--bundle", str(bundle), "--port", "0",
           "--parallel", str(parallel), "--queue", str(queue), "--model-name", "bench",
           "--log-level", "warning"] + (["--threads", str(threads)] if threads else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env, cwd=str(REPO))
    line = ""
    while "serving" not in line:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    base = "http://" + re.search(r"http://([\d.]+:\d+)", line).group(1)
    import httpx
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the server never became healthy")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_request(http: Any, body: dict[str, Any]) -> tuple[str, float, float]:
    """(outcome, TTFT, total) of one streaming request as the client sees them."""
    t = time.perf_counter()
    first = None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return str(r.status_code), 0.0, time.perf_counter() - t
        for line in r.iter_lines():
            if first is None and '"content": "' in line and '"content": ""' not in line:
                first = time.perf_counter() - t
            if line == "data: [DONE]":
                return "ok", first or 0.0, time.perf_counter() - t
    return "incomplete", first or 0.0, time.perf_counter() - t


def load(base: str, body: dict[str, Any], clients: int, requests: int) -> dict[str, Any]:
    """``clients`` threads sharing ``requests`` streaming requests; req/s and TTFT p50/p99."""
    import httpx

    todo = iter(range(requests))
    lock = threading.Lock()

    def client(_: int) -> list[tuple[str, float, float]]:
        out = []
        with httpx.Client(base_url=base, timeout=300) as http:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return out
                out.append(one_request(http, body))

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t
    ok = [r for r in runs if r[0] == "ok"]
    ttft = sorted(r[1] * 1000 for r in ok)

    def pct(p: float) -> float:
        return round(ttft[min(len(ttft) - 1, int(round(p * (len(ttft) - 1))))], 2) if ttft else 0

    rejected = sum(1 for r in runs if r[0] == "429")
    return {"clients": clients, "requests": len(runs), "ok": len(ok), "rejected_429": rejected,
            "failed": len(runs) - len(ok) - rejected, "req_per_s": round(len(ok) / wall, 2),
            "ttft_p50_ms": pct(0.5), "ttft_p99_ms": pct(0.99),
            "total": stats([r[2] for r in ok]) if ok else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: build a nano int4 one)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per client count")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iters", type=int, default=10, help="in-process calls at 1 client")
    ap.add_argument("--parallel", type=int, default=4, help="the server's --parallel")
    ap.add_argument("--queue", type=int, default=16, help="the server's --queue")
    ap.add_argument("--image", default="astronaut", help="a scikit-image sample or a path")
    ap.add_argument("--prompt", default="What is in the picture? Answer in one short sentence.")
    args = ap.parse_args(argv)
    image = args.image
    if not Path(image).exists():
        import skimage.data
        image = getattr(skimage.data, image)()
    png = png_bytes(image)
    tmp = None
    bundle = args.bundle
    if bundle is None:
        from exporters.bundle import build_bundle
        from models.nano import default_checkpoint
        tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
        bundle = build_bundle(default_checkpoint(), Path(tmp.name) / "nano-int4", plan="int4")
    base_line = in_process(bundle, args.threads, png, args.prompt, args.new_tokens, args.iters)
    proc, base = start_server(bundle, args.threads, args.parallel, args.queue)
    try:
        record = serve_runs(proc, base, png, args, base_line)
    finally:
        proc.terminate()
        proc.wait(30)
    record.update({"bundle": str(bundle) if tmp is None else "shipped nano, int4 (built)",
                   "host": host(load_avg=[round(x, 2) for x in os.getloadavg()])})
    print(json.dumps(record))
    if tmp is not None:
        tmp.cleanup()
    return 0


def serve_runs(proc: Any, base: str, png: bytes, args: argparse.Namespace,
               base_line: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, then each client count; overhead at 1 client against the in-process figures."""
    import httpx

    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"model": "bench", "stream": True, "temperature": 0, "max_tokens": args.new_tokens,
            "min_tokens": args.new_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": args.prompt}]}]}
    load(base, body, max(args.clients), max(args.clients))  # warm-up: every client once
    rss_warm = rss_kib(proc.pid)
    runs = [load(base, body, c, args.requests) for c in args.clients]
    rss_after = rss_kib(proc.pid)
    one = next((r for r in runs if r["clients"] == 1), None)
    overhead = None
    if one and one["total"]:
        ip_ttft, ip_total = base_line["ttft"]["median_ms"], base_line["total"]["median_ms"]
        overhead = {"ttft_ms": round(one["ttft_p50_ms"] - ip_ttft, 3),
                    "total_ms": round(one["total"]["median_ms"] - ip_total, 3),
                    "total_pct": round(100 * (one["total"]["median_ms"] / ip_total - 1), 2)}
    metrics = httpx.get(f"{base}/metrics").text
    return {"bench": "serve", "new_tokens": args.new_tokens, "threads": args.threads,
            "parallel": args.parallel, "queue": args.queue, "in_process": base_line,
            "loopback": runs, "overhead_1_client": overhead,
            "server_rss_kib": {"after_warmup": rss_warm, "after_runs": rss_after,
                               "growth_pct": round(100 * (rss_after / rss_warm - 1), 2)},
            "rejected_429": sum(r["rejected_429"] for r in runs),
            "failed": sum(r["failed"] for r in runs),
            "server_generated_tokens": _metric(metrics, "qwenvl_generated_tokens_total")}


def _metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


if __name__ == "__main__":
    sys.exit(main())
