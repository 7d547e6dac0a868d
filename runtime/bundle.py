"""Reading and verifying a bundle (docs/DESIGN.md §4); ``exporters/bundle.py`` writes.

A bundle is a directory::

    manifest.json                 format_version, versions, source, precision, model facts,
                                  generation defaults, engine I/O, files {name: {sha256, size}}
    vision.onnx(+.data)  decoder.onnx(+.data)  tokenizer/qwen.tiktoken
    engines/<gpu>-trt<ver>/vision.plan   (optional, built on the target device)
    report/...                    (optional)

``verify_bundle`` checks the format version, that every listed file exists with the recorded size
and sha256, and that the engines and tokenizer the runtime needs are listed. Every refusal is one
line that names the file and says what to do. Standard library only (the runtime must not import
torch, onnx or the exporters).

Every path the runtime opens comes from :meth:`Manifest.file`, the one resolver: the name must be
relative, stay inside the bundle (no ``..``, no symlink leading out) and be listed in ``files``,
so the checksums cover it. A full sha256 pass over a multi-GB bundle takes seconds on every
start; after one, a *verified stamp* (``$QWENVL_EDGE_CACHE/verified/<hash of the bundle path>.json``)
records each file's size, mtime_ns, ctime_ns, inode and device with the sha256 it matched, and a
repeat start re-hashes only files whose record changed (any write, copy or replacement changes
ctime or the inode, which no user can set back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EdgeError
from .files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # what this toolkit writes
MIN_FORMAT_VERSION = 1  # the oldest the runtime still reads
REQUIRED_FILES = ("vision.onnx", "decoder.onnx", "tokenizer/qwen.tiktoken")
MODEL_KEYS = ("vocab_size", "n_queries", "image_size", "hidden", "layers", "heads", "head_dim",
              "max_context", "special_ids")


TOOLKIT = "qwenvl-edge"


class BundleError(EdgeError, ValueError):
    """A bundle that cannot be loaded; the message names the file and the fix."""


def toolkit_version() -> str:
    try:
        from importlib.metadata import version
        return version(TOOLKIT)
    except Exception:  # noqa: BLE001 - not installed (run from a checkout)
        return "0.1.0"


def _module_version(mod: str) -> str | None:
    """``mod.__version__`` if the process already imported it, else the installed distribution's
    version: reading the version must not import torch or onnx into the runtime."""
    loaded = sys.modules.get(mod)
    if loaded is not None:
        return getattr(loaded, "__version__", None)
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001 - not installed
        return None


def versions() -> dict[str, str | None]:
    """Versions of the tools used to export or validate (recorded in the manifest and the drift
    report). Here, beside the reader, so validation records them without importing the exporters."""
    out: dict[str, str | None] = {"toolkit": toolkit_version(), "python": platform.python_version()}
    for mod in ("torch", "onnx", "onnxruntime", "numpy", "tiktoken"):
        out[mod] = _module_version(mod)
    return out


@dataclass
class Manifest:
    """``manifest.json`` of a verified bundle (the raw dict plus typed accessors)."""

    path: Path  # the bundle directory
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def format_version(self) -> int:
        return int(self.data["format_version"])

    @property
    def model(self) -> dict[str, Any]:
        return self.data.get("model", {})

    @property
    def special_ids(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.model.get("special_ids", {}).items()}

    @property
    def generation(self) -> dict[str, Any]:
        return self.data.get("generation", {})

    @property
    def precision(self) -> str:
        return str(self.data.get("precision", "unknown"))

    @property
    def target(self) -> str:
        """What the decoder was built for (``export.py --target``); bundles without it: gpu."""
        return str(self.data.get("target", "gpu"))

    @property
    def engines(self) -> dict[str, Any]:
        return self.data.get("engines", {})

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data.get("files", {})

    @property
    def max_context(self) -> int:
        return int(self.model.get("max_context", 2048))

    def file(self, name: str) -> Path:
        """The path of bundle file ``name``, the only way the runtime reaches one (see module doc)."""
        return resolve(self.path, name, self.files)

    def trt_plans(self) -> list[dict[str, Any]]:
        return list(self.engines.get("tensorrt", []))


def resolve(bundle: Path, name: Any, files: dict[str, Any]) -> Path:
    """``bundle/name`` if ``name`` is relative, inside the bundle and listed in ``files``."""
    where = bundle / MANIFEST
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: file name {name!r} is not a non-empty string: the manifest "
                          "was tampered with; re-copy the bundle")
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise BundleError(f"{where}: file name '{name}' points outside the bundle; the manifest "
                          "was tampered with: re-copy the bundle")
    listed = {os.path.normpath(n) for n in files}
    if os.path.normpath(name) not in listed:
        raise BundleError(f"{where}: '{name}' is not listed in files (no checksum covers it); "
                          "the manifest was tampered with: re-copy or re-export the bundle")
    root = os.path.realpath(bundle)
    real = os.path.realpath(bundle / p)
    if os.path.commonpath([root, real]) != root:
        raise BundleError(f"{bundle / p} is a link to {real}, outside the bundle: replace it with "
                          "the file itself (re-copy the bundle)")
    return bundle / p


def read_manifest(path: str | Path) -> Manifest:
    """Parse ``manifest.json`` and check its format version (no file hashing)."""
    bundle = Path(path)
    if not bundle.is_dir():
        raise BundleError(f"bundle directory not found: {bundle}: pass the directory written by "
                          "`python export.py` (it holds manifest.json)")
    mf = bundle / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{mf} is missing: this is not a complete bundle; re-copy it or re-export "
                          "with `python export.py`")
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("top level is not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{mf} is unreadable ({str(e).splitlines()[0]}): re-copy the bundle or "
                          "re-export it") from None
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{mf} has no integer format_version: re-export the bundle with this "
                          "toolkit version")
    if version > FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {version} is newer than this runtime "
                          f"supports ({FORMAT_VERSION}): upgrade qwenvl-edge")
    if version < MIN_FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {version} is too old (this runtime reads "
                          f"{MIN_FORMAT_VERSION}..{FORMAT_VERSION}): re-export the bundle with this "
                          "toolkit version")
    if not isinstance(data.get("files"), dict) or not data["files"]:
        raise BundleError(f"{mf} lists no files: re-export the bundle with this toolkit version")
    model = data.get("model")
    if not isinstance(model, dict) or [k for k in MODEL_KEYS if k not in model]:
        missing = [k for k in MODEL_KEYS if not isinstance(model, dict) or k not in model]
        raise BundleError(f"{mf} lacks model facts {missing}: re-export the bundle with this "
                          "toolkit version")
    _check_model_types(model, mf)
    return Manifest(bundle, data)


def _check_model_types(model: dict[str, Any], mf: Path) -> None:
    """Integer model facts must be integers: name the field rather than fail in int() later."""
    ints = [(f"model.{k}", model[k]) for k in MODEL_KEYS + ("n_vocab",)
            if k in model and k != "special_ids"]
    special = model["special_ids"]
    if not isinstance(special, dict):
        raise BundleError(f"{mf}: model.special_ids must be an object of integers, not "
                          f"{special!r}: re-export the bundle")
    ints += [(f"model.special_ids.{k}", v) for k, v in special.items()]
    for where, v in ints:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BundleError(f"{mf}: {where} must be a non-negative integer, not {v!r}: "
                              "re-export the bundle")


def verify_bundle(path: str | Path, checksums: bool = True, stamp: bool = True) -> Manifest:
    """Read the manifest and check every listed file (presence, size, sha256).

    ``checksums=False`` checks presence and size only (a quick check for trusted storage).
    ``stamp``: skip re-hashing files the verified stamp shows unchanged since they last matched
    (module doc); False hashes everything and leaves the stamp alone.
    """
    man = read_manifest(path)
    bundle = man.path
    for name in REQUIRED_FILES:
        if name not in man.files:
            raise BundleError(f"{bundle / MANIFEST} does not list {name}: the bundle is incomplete; "
                              "re-export it")
    for eng in ("vision", "decoder"):
        man.file(man.engines.get(eng, {}).get("file", f"{eng}.onnx"))  # listed, inside
    seen = _read_stamp(bundle) if checksums and stamp else {}
    now: dict[str, list[Any]] = {}
    for name, info in man.files.items():
        f = man.file(name)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise BundleError(f"{bundle / MANIFEST}: entry for {name} has no sha256: re-export the "
                              "bundle")
        if not f.is_file():
            raise BundleError(f"file {f} is missing from the bundle: re-copy the bundle (the "
                              "manifest lists it)")
        st = f.stat()
        size = _int_field(info, "size", f"files.{name}", bundle) if "size" in info else None
        if size is not None and st.st_size != size:
            raise BundleError(f"file {f} was altered or truncated ({st.st_size} bytes, the "
                              f"manifest says {size}): re-copy the bundle")
        if checksums:
            key = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev,
                   info["sha256"]]
            if seen.get(name) != key and sha256_file(f) != info["sha256"]:
                raise BundleError(f"file {f} was altered or truncated (sha256 mismatch): re-copy "
                                  "the bundle")
            now[name] = key
    if checksums and stamp and now != seen:
        _write_stamp(bundle, now)
    listed = {os.path.normpath(n) for n in man.files}
    for f in bundle.rglob("*"):
        rel = os.path.normpath(f.relative_to(bundle))
        if f.is_file() and rel != MANIFEST and rel not in listed and not rel.startswith("report"):
            log.warning("bundle %s holds an unlisted file %s: it is ignored", bundle, rel)
    return man


def _int_field(d: dict[str, Any], key: str, where: str, bundle: Path) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise BundleError(f"{bundle / MANIFEST}: {where}.{key} must be an integer, not {v!r}: "
                          "re-export the bundle")
    return v


def cache_dir() -> Path:
    """Where the runtime keeps derived state (verified stamps, TensorRT engine caches)."""
    return Path(os.environ.get("QWENVL_EDGE_CACHE", Path.home() / ".cache" / "qwenvl-edge"))


def _stamp_path(bundle: Path) -> Path:
    key = hashlib.sha256(os.path.realpath(bundle).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def _read_stamp(bundle: Path) -> dict[str, list[Any]]:
    try:
        data = json.loads(_stamp_path(bundle).read_text(encoding="utf-8"))
        return dict(data["files"]) if data.get("bundle") == os.path.realpath(bundle) else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_stamp(bundle: Path, files: dict[str, list[Any]]) -> None:
    """Best effort: a read-only cache only costs the next start a full sha256 pass."""
    target = _stamp_path(bundle)
    try:
        atomic_write_text(target, json.dumps({"bundle": os.path.realpath(bundle), "files": files}))
    except OSError as e:
        log.debug("could not write the verified stamp %s: %s", target, e)


# ---------------------------------------------------------------------------------------------
# TensorRT plans
# ---------------------------------------------------------------------------------------------

def gpu_name() -> str | None:
    """Name of GPU 0 via nvidia-smi (no CUDA bindings needed); None when there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.strip().splitlines()
    return first[0].strip() if first else None


# How a plan gets into a bundle: built on the device by the script the bundle ships, then listed
# in the manifest (or both at once where the tensorrt Python package imports).
BUILD_HINT = ("`./build_vision_trt.sh build` in the bundle, then `python -m exporters.tensorrt "
              "register --bundle <bundle> --plan <plan>`; or `python -m exporters.tensorrt build "
              "--bundle <bundle>`")


def _mmp(version: object) -> str:
    """``major.minor.patch``: tensorrt.__version__ has a build number (10.3.0.26) plans omit."""
    return ".".join(str(version).split(".")[:3])


def select_trt_plan(man: Manifest, engine: str, trt_version: str | None, gpu: str | None,
                    required: bool = False) -> Path | None:
    """The plan for ``engine`` built with this TensorRT version on this GPU, or None.

    A plan built for another TensorRT version or GPU is skipped with a warning (the ONNX engine is
    used instead) — or refused when ``required`` (the user explicitly asked for TensorRT).
    """
    plans = [p for p in man.trt_plans() if p.get("engine", "vision") == engine]
    reasons = []
    for p in plans:
        try:
            f = man.file(p.get("file"))
        except BundleError as e:
            reasons.append(str(e))
            continue
        want_v, want_gpu = _mmp(p.get("tensorrt_version", "")), str(p.get("gpu", ""))
        if trt_version is None:
            reasons.append(f"{f}: TensorRT is not installed (the plan needs TensorRT {want_v}); "
                           "install it or use the ONNX engine")
        elif want_v != _mmp(trt_version):
            reasons.append(f"{f} was built with TensorRT {want_v} but {trt_version} is installed: "
                           f"rebuild the plan on this device ({BUILD_HINT})")
        elif want_gpu and gpu and want_gpu != gpu:
            reasons.append(f"{f} was built for GPU '{want_gpu}' but this is '{gpu}': rebuild the "
                           f"plan on this device ({BUILD_HINT})")
        else:
            return f
    if not plans:
        reasons.append(f"{man.path / MANIFEST} lists no TensorRT plan for the {engine} engine: "
                       f"build one on this device ({BUILD_HINT})")
    if required:
        raise BundleError(reasons[0])
    for r in reasons if plans else []:
        log.warning("skipping TensorRT plan, using ONNX instead: %s", r)
    return None
