"""TensorRT for the vision engine: a strongly typed build, and the commands to do it on the target.

TensorRT cannot be installed where the toolkit is developed (no wheel) and engines are specific to
one GPU and one TensorRT version anyway, so there are two paths:

* :func:`build_engine` - when ``tensorrt`` is importable: parse ``vision.onnx`` into a
  **strongly typed** network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: every tensor keeps
  the dtype the graph gives it, so the fp32 LayerNorm / softmax / residual islands of the fp16
  graph are honoured instead of being overridden the way ``--fp16`` does), one optimisation
  profile over the batch, a timing cache, written to ``engines/<gpu>-trt<version>/vision.plan``
  with a JSON sidecar.
* :func:`write_trt_commands` - always: ``build_vision_trt.sh`` in the bundle, with the equivalent
  ``trtexec --stronglyTyped ...`` build and ``polygraphy run ... --trt --onnxrt`` comparisons on
  the real check photos (TensorRT vs onnxruntime, and TensorRT vs the saved PyTorch fp32 features),
  so a user can build and check on the Jetson itself.
* :func:`register_plan` - ``python -m exporters.tensorrt register --bundle B --plan P`` on the
  target: lists the plan in ``manifest.json`` (``files`` + ``engines.tensorrt`` with its TensorRT
  version and GPU); the runtime uses only listed plans whose version and GPU match.
  ``python -m exporters.tensorrt build --bundle B`` builds with the Python API and registers.

Engine directory naming:
``engines/<slug(gpu name)>-trt<major.minor.patch>`` where slug = lower case, every run of characters outside ``[a-z0-9]`` replaced by one ``-``,
trimmed; the GPU name comes from ``$GPU_NAME``, else ``nvidia-smi``, else the Jetson's
``/proc/device-tree/model``.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import EdgeError
from runtime.files import atomic_write_bytes, sha256_file
from runtime.contract import IMAGE_EMBEDS as EMBEDS
from runtime.contract import PIXEL_VALUES as PIXELS

log = logging.getLogger(__name__)

SCRIPT_NAME = "build_vision_trt.sh"
CHECK_INPUTS = "vision_check_inputs.json"  # polygraphy --load-inputs format
CHECK_REFERENCE = "vision_reference_outputs.json"  # polygraphy --load-outputs format (PyTorch fp32)
POLYGRAPHY_VERSION = "0.53.6"


class TensorRTUnavailable(EdgeError, RuntimeError):
    """``tensorrt`` is not importable here."""


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown-gpu"


def gpu_name() -> str:
    """Name of the GPU this process would build for (see the module docstring for the order)."""
    env = os.environ.get("GPU_NAME")
    if env:
        return env
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        name = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 else ""
        if name:
            return name
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    model = Path("/proc/device-tree/model")
    if model.is_file():
        name = model.read_bytes().replace(b"\0", b"").decode(errors="replace").strip()
        if name:
            return name
    return "unknown-gpu"


def trt_version() -> str:
    """``major.minor.patch`` of the importable TensorRT (``$TRT_VERSION`` overrides)."""
    env = os.environ.get("TRT_VERSION")
    if env:
        return env
    if not tensorrt_available():
        raise TensorRTUnavailable("tensorrt is not importable: pass a version or set TRT_VERSION")
    import tensorrt as trt  # type: ignore[import-not-found]

    return ".".join(trt.__version__.split(".")[:3])


def engine_dir_name(gpu: str | None = None, version: str | None = None) -> str:
    """``engines/<gpu-slug>-trt<version>`` (relative to the bundle)."""
    return f"engines/{slug(gpu or gpu_name())}-trt{version or trt_version()}"


def engine_path(bundle_dir: str | Path, gpu: str | None = None, version: str | None = None) -> Path:
    return Path(bundle_dir) / engine_dir_name(gpu, version) / "vision.plan"


def _onnx_input_size(onnx_path: Path) -> int:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    for v in m.graph.input:
        if v.name == PIXELS:
            return int(v.type.tensor_type.shape.dim[-1].dim_value)
    raise ValueError(f"{onnx_path} has no input '{PIXELS}'")


def _shape(batch: int, image_size: int, sep: str = "x") -> str:
    return sep.join(str(d) for d in (batch, 3, image_size, image_size))


# ---------------------------------------------------------------------------------------------
# Building with the TensorRT Python API
# ---------------------------------------------------------------------------------------------

@dataclass
class EngineBuild:
    plan: Path
    metadata: Path
    timing_cache: Path
    gpu: str
    trt_version: str
    seconds: float


def build_engine(onnx_path: str | Path, out_dir: str | Path, min_batch: int = 1,
                 opt_batch: int = 1, max_batch: int = 4, timing_cache: str | Path | None = None,
                 workspace_gib: float | None = None) -> EngineBuild:
    """Build a strongly typed TensorRT engine from ``vision.onnx`` into ``out_dir/engines/...``.

    Raises :class:`TensorRTUnavailable` when ``tensorrt`` cannot be imported.
    """
    if not tensorrt_available():
        raise TensorRTUnavailable(
            "tensorrt is not importable on this machine: copy the bundle to the target and run "
            f"{SCRIPT_NAME} there (trtexec --stronglyTyped)")
    import tensorrt as trt  # type: ignore[import-not-found]

    if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} has no strongly typed networks "
                                  "(needs 9.1+): the fp32 islands could not be honoured")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                         f"{min_batch}/{opt_batch}/{max_batch}")
    onnx_path = Path(onnx_path)
    image_size = _onnx_input_size(onnx_path)
    version = ".".join(trt.__version__.split(".")[:3])
    gpu = gpu_name()
    plan = engine_path(out_dir, gpu, version)
    plan.parent.mkdir(parents=True, exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else plan.parent / "timing.cache"
    t0 = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, parser = _parse_onnx(trt, logger, onnx_path)
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    profile.set_shape(PIXELS, *((b, 3, image_size, image_size)
                                for b in (min_batch, opt_batch, max_batch)))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info("building the TensorRT engine (strongly typed, batch %d/%d/%d) for %s ...",
             min_batch, opt_batch, max_batch, gpu)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    atomic_write_bytes(plan, bytes(serialized))
    atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    seconds = time.perf_counter() - t0
    meta_path = _write_engine_metadata(plan, trt.__version__, gpu, onnx_path, image_size,
                                       (min_batch, opt_batch, max_batch), seconds)
    log.info("wrote %s in %.0f s", plan, seconds)
    return EngineBuild(plan=plan, metadata=meta_path, timing_cache=cache_path, gpu=gpu,
                       trt_version=version, seconds=seconds)


def _parse_onnx(trt: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any, Any]:
    """A strongly typed (explicit batch before TensorRT 10) network parsed from ``onnx_path``.

    Returns ``(builder, network, parser)``; the parser (and ``logger``) must outlive the build.
    """
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and \
            int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves <stem>.onnx.data next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    return builder, network, parser


def _write_engine_metadata(plan: Path, trt_version: str, gpu: str, onnx_path: Path,
                           image_size: int, batches: tuple[int, int, int],
                           seconds: float) -> Path:
    """Write ``<plan>.json`` (TensorRT version, GPU, profile, source graph hash); returns it."""
    min_batch, opt_batch, max_batch = batches
    meta = {"tensorrt": trt_version, "gpu": gpu, "strongly_typed": True,
            "profile": {"min": [min_batch, 3, image_size, image_size],
                        "opt": [opt_batch, 3, image_size, image_size],
                        "max": [max_batch, 3, image_size, image_size]},
            "onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path),
            "build_seconds": round(seconds, 1)}
    meta_path = plan.with_name(plan.name + ".json")
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return meta_path


# ---------------------------------------------------------------------------------------------
# Commands for the target
# ---------------------------------------------------------------------------------------------

def _np_b64(a: np.ndarray) -> dict[str, str]:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return {"array": base64.b64encode(buf.getvalue()).decode(), "polygraphy_class": "ndarray"}


def polygraphy_inputs_json(batches: Sequence[np.ndarray]) -> str:
    """polygraphy ``--load-inputs`` file: one feed dict per iteration."""
    return json.dumps([{PIXELS: _np_b64(b.astype(np.float32))} for b in batches])


def polygraphy_outputs_json(batches: Sequence[np.ndarray], runner: str = "pytorch-fp32") -> str:
    """polygraphy ``--load-outputs`` file (a RunResults with one runner)."""
    its = [{"outputs": {EMBEDS: {"values": _np_b64(b.astype(np.float32)),
                                 "polygraphy_class": "LazyArray"}},
            "runtime": 0.0, "runner_name": runner, "polygraphy_class": "IterationResult"}
           for b in batches]
    return json.dumps({"lst": [[runner, its]], "polygraphy_class": "RunResults"})


@dataclass
class TrtCommandSettings:
    onnx: str
    image_size: int
    min_batch: int
    opt_batch: int
    max_batch: int
    min_cosine: float
    atol: float


def write_trt_commands(onnx_path: str | Path, out_dir: str | Path, image_size: int | None = None,
                       min_batch: int = 1, opt_batch: int = 1, max_batch: int = 4,
                       precision: str | None = None, check_pixels: np.ndarray | None = None,
                       check_reference: np.ndarray | None = None, tolerances: Any = None,
                       atol: float | None = None, min_cosine: float | None = None) -> Path:
    """Write ``build_vision_trt.sh`` (trtexec build + polygraphy checks) into ``out_dir``.

    With ``check_pixels`` (preprocessed real photos ``[N,3,S,S]``) the polygraphy comparisons
    run on them (``vision_check_inputs.json``); with ``check_reference`` (the PyTorch fp32
    features) a second comparison checks TensorRT against PyTorch
    (``vision_reference_outputs.json``). Returns the script path.
    """
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if image_size is None:
        image_size = _onnx_input_size(onnx_path)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got "
                         f"{min_batch}/{opt_batch}/{max_batch}")
    if precision is None:
        precision = _onnx_precision(onnx_path)
    min_cosine, atol = _check_tolerances(precision, tolerances, check_reference, atol, min_cosine)
    try:
        rel_onnx = os.path.relpath(onnx_path, out_dir)
    except ValueError:
        rel_onnx = str(onnx_path)

    has_inputs, has_ref = _write_check_data(out_dir, check_pixels, check_reference, max_batch)
    settings = TrtCommandSettings(onnx=rel_onnx, image_size=image_size, min_batch=min_batch,
                                  opt_batch=opt_batch, max_batch=max_batch,
                                  min_cosine=min_cosine, atol=atol)
    script = _script_text(settings, precision, has_inputs, has_ref)
    path = out_dir / SCRIPT_NAME
    atomic_write_bytes(path, script.encode(), mode=0o755)
    log.info("wrote %s (trtexec --stronglyTyped build + polygraphy checks)", path)
    return path


def _onnx_precision(onnx_path: Path) -> str:
    """The precision the exporter recorded in the graph's metadata (fp32 when absent)."""
    import onnx

    meta = {m.key: m.value
            for m in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return meta.get("qwenvl_edge.precision", "fp32")


def _check_tolerances(precision: str, tolerances: Any, check_reference: np.ndarray | None,
                      atol: float | None, min_cosine: float | None) -> tuple[float, float]:
    """Tolerances of the export check, translated to polygraphy's flags: (min_cosine, atol)."""
    if tolerances is not None:
        min_cosine = min_cosine if min_cosine is not None else tolerances.min_cosine
    min_cosine = min_cosine if min_cosine is not None else (0.9995 if precision == "fp16"
                                                            else 0.99999)
    if atol is None:
        peak = float(np.max(np.abs(check_reference))) if check_reference is not None else 1.0
        rel = getattr(tolerances, "max_abs_rel", None) or (0.05 if precision == "fp16" else 1e-3)
        atol = float(f"{rel * peak:.3g}")
    return min_cosine, atol


def _write_check_data(out_dir: Path, check_pixels: np.ndarray | None,
                      check_reference: np.ndarray | None, max_batch: int) -> tuple[bool, bool]:
    """Write the polygraphy input/reference files in ``max_batch`` chunks, removing stale ones.

    Returns ``(has_inputs, has_ref)``.
    """
    has_inputs = check_pixels is not None
    has_ref = has_inputs and check_reference is not None
    if has_inputs:
        bs = max_batch
        px = [check_pixels[i:i + bs] for i in range(0, len(check_pixels), bs)]
        atomic_write_bytes(out_dir / CHECK_INPUTS, polygraphy_inputs_json(px).encode())
        if has_ref:
            refs = [check_reference[i:i + bs] for i in range(0, len(check_reference), bs)]
            atomic_write_bytes(out_dir / CHECK_REFERENCE, polygraphy_outputs_json(refs).encode())
    for name, written in ((CHECK_INPUTS, has_inputs), (CHECK_REFERENCE, has_ref)):
        if not written:  # stale data of an earlier export would check the wrong engine
            (out_dir / name).unlink(missing_ok=True)
    return has_inputs, has_ref


def trt_command_files(out_dir: str | Path) -> list[Path]:
    """The files :func:`write_trt_commands` may have written in ``out_dir``."""
    return [p for p in (Path(out_dir) / n for n in (SCRIPT_NAME, CHECK_INPUTS, CHECK_REFERENCE))
            if p.exists()]


def _script_text(s: TrtCommandSettings, precision: str, has_inputs: bool, has_ref: bool) -> str:
    trtexec, poly_ort, poly_ref = _script_commands(s, has_inputs)
    ref_block = f"""
    echo "== the built engine vs the PyTorch fp32 reference features (saved at export time)"
    {poly_ref}""" if has_ref else ""
    return (_script_header(s, precision) + _SCRIPT_ENGINE_DIR
            + _script_steps(trtexec, poly_ort, ref_block))


def _script_commands(s: TrtCommandSettings, has_inputs: bool) -> tuple[str, str, str]:
    """The trtexec build and the two polygraphy comparisons, one flag per continued line."""
    q = shlex.quote
    S = s.image_size
    shapes = [("min", s.min_batch), ("opt", s.opt_batch), ("max", s.max_batch)]
    J = " \\\n        "
    trtexec = J.join(
        ['"$TRTEXEC"', f"--onnx={q(s.onnx)}", "--stronglyTyped"]
        + [f"--{k}Shapes={PIXELS}:{_shape(b, S)}" for k, b in shapes]
        + ['--timingCacheFile="$ENGINE_DIR/timing.cache"', '--saveEngine="$ENGINE_DIR/vision.plan"',
           "--skipInference"])
    def poly_shape(b: int) -> str:
        return q(PIXELS + ":[" + _shape(b, S, ",") + "]")

    trt_flags = ["--strongly-typed"] + [f"--trt-{k}-shapes {poly_shape(b)}" for k, b in shapes]
    trt_flags.append('--load-timing-cache "$ENGINE_DIR/timing.cache"')
    data = [f"--load-inputs {CHECK_INPUTS}"] if has_inputs else [
        f"--input-shapes {poly_shape(s.opt_batch)}", "--seed 0"]
    compare = ["--compare simple cosine_similarity",
               f"--cosine-similarity-threshold {s.min_cosine}",
               f"--check-error-stat max --atol {s.atol:g} --rtol 0"]
    ort = ['--providers $ORT_PROVIDERS', "--graph-optimization-level ORT_ENABLE_EXTENDED"]
    poly_ort = J.join(['"$POLYGRAPHY" run', q(s.onnx), "--trt", "--onnxrt"]
                               + trt_flags + ort + data + compare)
    poly_ref = J.join(['"$POLYGRAPHY" run "$ENGINE_DIR/vision.plan"', "--model-type engine",
                       "--trt"] + data + [f"--load-outputs {CHECK_REFERENCE}"] + compare)
    return trtexec, poly_ort, poly_ref


def _script_header(s: TrtCommandSettings, precision: str) -> str:
    """Shebang, usage comment and shell options of the script."""
    return f"""#!/usr/bin/env bash
# Build and check the TensorRT vision engine ON THE TARGET (Jetson / GPU box); written by
# qwenvl-edge exporters/tensorrt.py next to {s.onnx} ({precision}).
#
#   ./{SCRIPT_NAME}           build, then compare
#   ./{SCRIPT_NAME} build     only build engines/<gpu>-trt<version>/vision.plan
#   then `python3 -m exporters.tensorrt register --bundle . --plan <that plan>` lists it in
#   manifest.json (the runtime uses only listed plans)
#   ./{SCRIPT_NAME} check     only compare (polygraphy {POLYGRAPHY_VERSION}: pip install polygraphy=={POLYGRAPHY_VERSION})
#
# --stronglyTyped: TensorRT keeps every tensor in the dtype of the ONNX graph, so the fp32
# LayerNorm / softmax / residual islands of the fp16 graph stay fp32 (do NOT add --fp16: that
# lets TensorRT run them in fp16, the drift every peer reports). Batch profile
# {s.min_batch}/{s.opt_batch}/{s.max_batch}; rebuild with other --minShapes/--optShapes/--maxShapes for more.
# Environment: TRTEXEC, POLYGRAPHY, GPU_NAME, TRT_VERSION, ORT_PROVIDERS (default "cpu"; with
# onnxruntime-gpu use "cuda cpu").
set -euo pipefail
cd "$(dirname "$0")"
"""


# Finds the GPU name and TensorRT version on the target, hence the engine directory.
_SCRIPT_ENGINE_DIR = f"""
TRTEXEC=${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}
POLYGRAPHY=${{POLYGRAPHY:-polygraphy}}
ORT_PROVIDERS=${{ORT_PROVIDERS:-cpu}}

if [ -z "${{GPU_NAME:-}}" ]; then
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
if [ -z "${{GPU_NAME:-}}" ] && [ -r /proc/device-tree/model ]; then
    GPU_NAME=$(tr -d '\\0' < /proc/device-tree/model)
fi
GPU_NAME=${{GPU_NAME:-unknown-gpu}}
if [ -z "${{TRT_VERSION:-}}" ]; then
    TRT_VERSION=$(python3 -c 'import tensorrt; print(".".join(tensorrt.__version__.split(".")[:3]))' 2>/dev/null || true)
fi
if [ -z "${{TRT_VERSION:-}}" ]; then  # "[TensorRT v100300]" -> 10.3.0
    V=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*TensorRT v\\([0-9][0-9]*\\).*/\\1/p' | head -n 1)
    if [ -n "$V" ]; then TRT_VERSION="$((V / 10000)).$((V / 100 % 100)).$((V % 100))"; fi
fi
if [ -z "${{TRT_VERSION:-}}" ]; then
    echo "cannot tell the TensorRT version: set TRT_VERSION=x.y.z or TRTEXEC=/path/to/trtexec" >&2
    exit 2
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
ENGINE_DIR="engines/${{SLUG:-unknown-gpu}}-trt${{TRT_VERSION}}"
mkdir -p "$ENGINE_DIR"
"""


def _script_steps(trtexec: str, poly_ort: str, ref_block: str) -> str:
    """The ``build`` and ``check`` steps of the script."""
    return f"""STEP=${{1:-all}}

if [ "$STEP" = all ] || [ "$STEP" = build ]; then
    echo "== building $ENGINE_DIR/vision.plan ($GPU_NAME, TensorRT $TRT_VERSION)"
    {trtexec}
    echo "== list it in manifest.json so the runtime uses it:"
    echo "   python3 -m exporters.tensorrt register --bundle . --plan $ENGINE_DIR/vision.plan"
    echo "       --tensorrt-version $TRT_VERSION --gpu '$GPU_NAME'"
fi

if [ "$STEP" = all ] || [ "$STEP" = check ]; then
    echo "== TensorRT (strongly typed) vs onnxruntime on the same graph"
    {poly_ort}{ref_block}
fi
"""




# ---------------------------------------------------------------------------------------------
# Registering a plan in the bundle's manifest (the runtime only uses plans the manifest lists)
# ---------------------------------------------------------------------------------------------

def _major_minor_patch(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


def _plan_facts(plan: Path, tensorrt_version: str | None, gpu: str | None) -> tuple[str, str]:
    """TensorRT version and GPU of a plan: given, else its build sidecar, else this machine."""
    sidecar = plan.with_name(plan.name + ".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    version = tensorrt_version or meta.get("tensorrt") or os.environ.get("TRT_VERSION")
    if not version and tensorrt_available():
        version = trt_version()
    if not version:
        raise ValueError(f"cannot tell which TensorRT built {plan}: pass --tensorrt-version x.y.z "
                         "(trtexec --help prints it)")
    return _major_minor_patch(version), gpu or meta.get("gpu") or gpu_name()


def register_plan(bundle: str | Path, plan: str | Path, tensorrt_version: str | None = None,
                  gpu: str | None = None, engine: str = "vision") -> dict[str, Any]:
    """List a TensorRT plan built on the target in the bundle's ``manifest.json``; return its entry.

    The plan (with the files beside it: build sidecar, timing cache) gets sha256 + size under
    ``files`` and an entry ``{engine, file, tensorrt_version, gpu}`` under ``engines.tensorrt``,
    which ``runtime.bundle.select_trt_plan`` matches against the installed TensorRT and the GPU.
    A plan outside the bundle is copied to ``engines/<gpu>-trt<version>/``. The bundle is
    verified first and the manifest is replaced atomically; registering again replaces the entry.
    """
    from runtime.bundle import MANIFEST, BundleError, verify_bundle

    man = verify_bundle(bundle, stamp=False)  # every file hashed before the manifest changes
    root = man.path.resolve()
    plan = Path(plan)
    if not plan.is_absolute() and not plan.is_file():
        plan = root / plan
    if not plan.is_file():
        raise BundleError(f"TensorRT plan {plan} not found: build it first ({SCRIPT_NAME} build)")
    version, gpu = _plan_facts(plan, tensorrt_version, gpu)
    if root not in plan.resolve().parents:
        dst = engine_path(root, gpu, version).with_name(plan.name)
        atomic_write_bytes(dst, plan.read_bytes())
        plan = dst
    rel = plan.resolve().relative_to(root).as_posix()
    data = dict(man.data)
    files = dict(data["files"])
    beside = (plan, plan.with_name(plan.name + ".json"), plan.with_name("timing.cache"))
    for f in (p for p in beside if p.is_file()):
        files[f.resolve().relative_to(root).as_posix()] = {"sha256": sha256_file(f),
                                                          "size": f.stat().st_size}
    entry = {"engine": engine, "file": rel, "tensorrt_version": version, "gpu": gpu}
    engines = dict(data.get("engines", {}))
    engines["tensorrt"] = [e for e in engines.get("tensorrt", []) if e.get("file") != rel]
    engines["tensorrt"].append(entry)
    data["engines"], data["files"] = engines, dict(sorted(files.items()))
    atomic_write_bytes(root / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())
    log.info("registered %s (TensorRT %s, %s) in %s", rel, version, gpu, root / MANIFEST)
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m exporters.tensorrt {build,register} --bundle B``: one line on failure."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m exporters.tensorrt",
                                 description="Build (where tensorrt imports) and register the "
                                             "TensorRT vision plan of a bundle, on the target.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    reg = sub.add_parser("register", help="list a plan (e.g. from build_vision_trt.sh) in the "
                                          "bundle's manifest so the runtime uses it")
    reg.add_argument("--plan", required=True, type=Path,
                     help="the plan: engines/<gpu>-trt<version>/vision.plan, or a file to copy in")
    reg.add_argument("--tensorrt-version", default=None,
                     help="x.y.z that built it (default: its sidecar, $TRT_VERSION, tensorrt)")
    reg.add_argument("--gpu", default=None, help="GPU name (default: sidecar, $GPU_NAME, "
                                                 "nvidia-smi)")
    build = sub.add_parser("build", help="build_engine on bundle/vision.onnx, then register it")
    build.add_argument("--max-batch", type=int, default=4)
    for p in (reg, build):
        p.add_argument("--bundle", required=True, type=Path, help="bundle directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from runtime.bundle import BundleError

    try:
        if args.cmd == "build":
            built = build_engine(args.bundle / "vision.onnx", args.bundle, max_batch=args.max_batch)
            register_plan(args.bundle, built.plan)
        else:
            register_plan(args.bundle, args.plan, args.tensorrt_version, args.gpu)
    except (BundleError, TensorRTUnavailable, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
