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
