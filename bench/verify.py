"""Bundle start-up cost of checksum verification: the first ``verify_bundle`` (sha256 of every
file) vs a repeat one (the verified stamp vouches for unchanged files), and the repeat
``Pipeline.from_bundle``. Prints one JSON record; asserts nothing.

    python -m bench.verify                        # nano fp32 bundle (needs torch)
    python -m bench.verify --bundle DIR --pad-gb 8 --work DIR

``--pad-gb`` copies the bundle into ``--work`` with one more listed file of that many GB of
random bytes, so a full-size bundle's hashing cost is measured without exporting one. Each
measurement runs in a fresh process (no state shared but the page cache and the stamp); the
stamp lives in a temporary ``QWENVL_EDGE_CACHE``. ``first_verify_s`` reads from the page cache
when the file was just written (``page_cache`` says whether it was dropped: root only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
t = time.perf_counter()
if sys.argv[2] == "verify":
    from runtime.bundle import verify_bundle
    verify_bundle(sys.argv[1])
else:
    from runtime import Pipeline
    Pipeline.from_bundle(sys.argv[1], device="cpu", threads=1)
print(time.perf_counter() - t)
"""


def padded_copy(bundle: Path, work: Path, gb: float) -> Path:
    """``bundle`` plus ``pad.bin`` (``gb`` GB of random bytes) listed in its manifest."""
    from exporters.bundle import read_manifest, write_bundle

    work.mkdir(parents=True, exist_ok=True)
    pad = work / "pad.bin"
    chunk = os.urandom(1 << 24)
    with open(pad, "wb") as f:
        for _ in range(int(gb * 1e9) // len(chunk)):
            f.write(chunk)
    man = read_manifest(bundle)
    src = work / "src"
    files = {}
    for name in man.files:  # small copies, so that everything can be moved (not copied) below
        files[name] = src / name
        files[name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle / name, files[name])
    fields = {k: v for k, v in man.data.items()
              if k not in ("format_version", "toolkit", "created", "versions", "files")}
    out = write_bundle(work / "bundle", {**files, "pad.bin": pad}, fields, move=True)
    shutil.rmtree(src)
    return out


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(bundle: Path, what: str, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), what], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle directory (default: build a nano one)")
    ap.add_argument("--pad-gb", type=float, default=0.0, help="add a listed file of this size")
    ap.add_argument("--work", type=Path, help="where the padded copy goes (default: a temp dir)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before the first verification (root only)")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="bench-verify-")
    bundle = args.bundle
    if bundle is None:
        from bench.decode import build_nano_bundle
        bundle = build_nano_bundle(Path(tmp.name) / "nano-fp32", "fp32")
    if args.pad_gb > 0:
        bundle = padded_copy(bundle, args.work or Path(tmp.name) / "padded", args.pad_gb)
    env = {**os.environ, "QWENVL_EDGE_CACHE": str(Path(tmp.name) / "cache")}
    dropped = _drop_caches() if args.drop_caches else False
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    t0 = time.perf_counter()
    first = timed(bundle, "verify", env)
    repeat = [timed(bundle, "verify", env) for _ in range(3)]
    start = [timed(bundle, "pipeline", env) for _ in range(3)]
    rec = {"bench": "verify", "bundle_bytes": size, "first_verify_s": round(first, 3),
           "first_verify_mb_s": round(size / 1e6 / first, 1),
           "repeat_verify_s": sorted(round(r, 4) for r in repeat),
           "repeat_pipeline_start_s": sorted(round(s, 3) for s in start),
           "page_cache_dropped": dropped, "wall_s": round(time.perf_counter() - t0, 1),
           "host": platform.node(), "cpus": os.cpu_count()}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
