"""What every benchmark record needs: the machine, timing statistics, peak memory and the
memory-bandwidth ceiling measured in the same run.

Batch-1 decode reads every weight once per token, so ``bandwidth / bytes_read_per_token`` is a
hard ceiling on tokens/s; each decode figure is reported as a fraction of it. The bandwidth is
measured here, in the same process and run as the figure it divides, never taken from a
datasheet. Only numpy and the standard library at import time: the benchmarks also run in the
side virtual environment of the onnxruntime-genai baseline.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host(**extra: Any) -> dict[str, Any]:
    """The machine and software of this run (``extra`` adds e.g. the GPU name)."""
    import onnxruntime as ort

    rec = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
           "numpy": np.__version__, "onnxruntime": ort.__version__,
           "date": time.strftime("%Y-%m-%d")}
    rec.update(extra)
    return rec


def stats(times_s: list[float]) -> dict[str, float]:
    """Median / p90 / min / mean in milliseconds."""
    ms = sorted(t * 1000 for t in times_s)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(p90, 3),
            "min_ms": round(ms[0], 3), "mean_ms": round(statistics.fmean(ms), 3),
            "iters": len(ms)}


def timed(fn: Callable[[], Any], warmup: int, iters: int) -> tuple[list[float], Any]:
    """Wall time of ``iters`` calls after ``warmup`` untimed ones, and the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times, out


def run_child(cmd: list[str], what: str, record: bool = False,
              cwd: Path | None = None) -> dict | None:
    """Run a contender or a build step (from ``cwd``, the repository root, importable); with
    ``record``, return the JSON record it printed last (its stdout is captured), else pass its
    output to stderr (the caller's stdout carries only its own record)."""
    logging.getLogger("bench").info("%s: %s", what, " ".join(cmd))
    root = Path(cwd or Path(__file__).resolve().parents[1])
    r = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, text=True,
                       stdout=subprocess.PIPE if record else sys.stderr,
                       stderr=subprocess.PIPE if record else None)
    if r.returncode != 0:
        tail = f": {r.stderr.strip()[-2000:]}" if record else ""
        raise SystemExit(f"{what} failed (exit {r.returncode}){tail}")
    return json.loads(r.stdout.strip().splitlines()[-1]) if record else None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (``VmHWM``: unlike ``ru_maxrss`` it is not
    inherited from the parent across fork + exec, so a contender's figure is its own)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_rss_and_reset_mib() -> float:
    """``VmHWM`` (MiB) so far, then reset it to the current RSS (``/proc/self/clear_refs``,
    Linux): the peak of one phase of a run (loading, prefill, decode), not of the whole run."""
    peak = peak_rss_mib()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak


def host_read_bandwidth_gbs(mib: int = 1024, repeats: int = 5,
                            threads: int | None = None) -> dict[str, float]:
    """DRAM bandwidth as decode uses it, best of ``repeats`` over a buffer far larger than the
    caches, with ``threads`` threads (default: every core; numpy releases the GIL) each on its
    own slice. ``read_gbs``: a streaming read (a sum), which is what reading weights is;
    ``copy_gbs``: ``np.copyto`` counting read + write bytes (the usual "copy bandwidth")."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    n = (mib << 20) // 4
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    parts = [slice(i * n // threads, (i + 1) * n // threads) for i in range(threads)]
    copy = read = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(lambda s: np.copyto(b[s], a[s]), parts))
            copy = min(copy, time.perf_counter() - t)
            t = time.perf_counter()
            list(pool.map(lambda s: a[s].sum(dtype=np.float32), parts))
            read = min(read, time.perf_counter() - t)
    return {"read_gbs": round(a.nbytes / read / 1e9, 2),
            "copy_gbs": round(2 * a.nbytes / copy / 1e9, 2), "buffer_mib": mib,
            "threads": threads}


def ceiling(bandwidth_gbs: float, bytes_per_token: float) -> float:
    """Tokens/s a batch-1 decode cannot exceed when it must read ``bytes_per_token``."""
    return bandwidth_gbs * 1e9 / bytes_per_token


def cuda_copy_bandwidth_gbs(mib: int = 2048, repeats: int = 10) -> dict[str, float]:
    """Device-to-device copy bandwidth of GPU 0 with torch (read + write bytes counted; a GPU
    GEMV reads at about this rate). Untested here: no GPU was lent to this project so far."""
    import torch

    a = torch.empty(mib << 20, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    s = start.elapsed_time(end) / 1000 / repeats
    copy = 2 * a.numel() / s / 1e9
    # a copy reads and writes: its read rate is half the total, the figure decode is bound by
    return {"read_gbs": round(copy / 2, 1), "copy_gbs": round(copy, 1), "buffer_mib": mib,
            "device": torch.cuda.get_device_name(0)}
