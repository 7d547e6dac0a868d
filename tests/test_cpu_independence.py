"""Regenerated checkpoints have the same bytes whatever SIMD the CPU has.

numpy's float32 transcendental kernels give different last bits with and without AVX-512, so any
table a generator computes that way depends on the machine. Here the nano generator runs in two
subprocesses, once with numpy's AVX-512 dispatch enabled and once with it disabled
(``NPY_DISABLE_CPU_FEATURES``), and every byte it writes must agree. On a CPU without AVX-512 both
runs take the same path and agree trivially; the test still checks the generator is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Writes the default nano checkpoint and one with the golden test's shapes (a 16x16 grid of
# 128-wide position rows, where the float32 formula differs under AVX-512), plus bare tables;
# prints {name: sha256} as JSON.
_GENERATE = r"""
import hashlib, json, sys, tempfile
from pathlib import Path
from models.nano import NanoSpec, make_nano_checkpoint
from models.qwen_vl import sincos_pos_embed_2d

def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()

out = {}
big = NanoSpec(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, ffn_dim=256,
               vis_width=64, vis_layers=1, vis_heads=4, image_size=64, patch_size=2,
               n_queries=256)
with tempfile.TemporaryDirectory() as tmp:
    for name, spec, dtype in (("default", None, "bf16"), ("grid16", big, "fp32")):
        ck = make_nano_checkpoint(Path(tmp) / name, seed=0, spec=spec, dtype=dtype)
        for f in sorted(ck.iterdir()):
            out[f"{name}/{f.name}"] = digest(f)
for dim, grid in ((128, 16), (4096, 16), (32, 52)):
    t = sincos_pos_embed_2d(dim, grid).numpy()
    out[f"table{dim}x{grid}"] = hashlib.sha256(t.tobytes()).hexdigest()
json.dump(out, sys.stdout)
"""


def _avx512_features() -> list[str]:
    """numpy's dispatchable AVX-512 targets this CPU has (empty on CPUs without AVX-512)."""
    core = getattr(np, "_core", None) or np.core
    umath = core._multiarray_umath
    have = umath.__cpu_features__
    return [f for f in umath.__cpu_dispatch__ if f.startswith("AVX512") and have.get(f)]


def _generate(extra_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NPY_DISABLE_CPU_FEATURES"}
    env.update(extra_env, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _GENERATE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_generated_checkpoint_bytes_do_not_depend_on_avx512():
    with_simd = _generate({})
    without = _generate({"NPY_DISABLE_CPU_FEATURES": " ".join(_avx512_features())})
    assert len(with_simd) > 10 and any(k.endswith(".safetensors") for k in with_simd)
    differ = sorted(k for k in with_simd if with_simd[k] != without.get(k))
    assert with_simd.keys() == without.keys() and not differ, (
        f"bytes depend on numpy's AVX-512 dispatch: {differ}; compute such tables in float64 "
        "and round once to float32")


def test_position_table_is_float64_rounded():
    """The table is the float64 formula rounded once; the frozen float32 one is within 4e-7."""
    from models.qwen_vl import sincos_pos_embed_2d

    t = sincos_pos_embed_2d(128, 16).numpy()
    assert t.dtype == np.float32 and t.shape == (256, 128)
    pos = np.arange(16, dtype=np.float64)
    omega = 1.0 / 10000.0 ** (np.arange(32, dtype=np.float64) / 32.0)
    col = np.outer(np.tile(pos, 16), omega)  # row-major grid: column index varies fastest
    row = np.outer(np.repeat(pos, 16), omega)
    ref = np.concatenate([np.sin(col), np.cos(col), np.sin(row), np.cos(row)], axis=1)
    assert np.array_equal(t, ref.astype(np.float32))
    frozen = np.load(ROOT / "tests" / "golden" / "attn_pool_pos_embed_256x128.npy")
    assert np.abs(frozen - t).max() < 4e-7  # measured 3.4e-7: float32 rounding of pos * omega
    assert hashlib.sha256(frozen.tobytes()).hexdigest() != hashlib.sha256(t.tobytes()).hexdigest()
