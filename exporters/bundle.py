"""Writing a bundle (docs/DESIGN.md §4): files, checksums, ``manifest.json``, renamed into place.

``write_bundle`` copies (or moves) the files into a temporary sibling directory, hashes each one,
writes ``manifest.json`` last and renames the directory onto ``out_dir`` only when everything
succeeded, so a crash never leaves a half bundle behind a valid-looking name. Verification lives in
``runtime/bundle.py`` (the runtime must not import the exporters); it is re-exported here.

``manifest_fields`` builds the model facts, generation defaults, versions and source identity
from a checkpoint; ``engine_io`` reads the input/output names, dtypes and shapes of an ONNX file.

Manifest keys (format_version 1)::

    format_version   int (runtime.bundle.FORMAT_VERSION)
    toolkit          "qwenvl-edge": marks a directory this toolkit wrote (and may replace)
    created, versions {toolkit, python, torch, onnx, onnxruntime, numpy, tiktoken}
    source           {checkpoint, index_sha256}
    precision        plan name (fp32 | fp16 | int4 | edge)
    target           what the decoder was built for: gpu | cpu (``export.py --target``; absent:
                     gpu). The drift report applies that target's bounds
    model            {vocab_size, n_vocab, n_queries, image_size, hidden, layers, heads, head_dim,
                      max_context, special_ids {eod, im_start, im_end, img_start, img_end,
                      img_pad, ref_start, ref_end, box_start, box_end}}   (required)
    chat_format      chatml | raw
    generation       defaults from generation_config.json (do_sample, top_p, top_k, ...)
    engines          {vision: {file, inputs, outputs}, decoder: {...},
                      tensorrt: [{engine: "vision", file, tensorrt_version, gpu}]}  (optional)
    files            {name: {sha256, size}}   (written here; every file of the bundle)
    validation       summary from validate/ (optional)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.bundle import (FORMAT_VERSION, MANIFEST, TOOLKIT, BundleError, Manifest,
                            read_manifest, verify_bundle, versions)
from runtime.files import atomic_dir, atomic_write_text, sha256_file

__all__ = ["BundleError", "Manifest", "check_out_dir", "engine_io", "manifest_fields",
           "model_facts", "read_manifest", "replace_reason", "verify_bundle", "versions",
           "write_bundle"]

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
                9: "bool", 10: "float16", 11: "float64", 16: "bfloat16"}


def model_facts(cfg: Any, tokenizer_specials: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The facts the runtime needs, from a ``models.config.QwenVLConfig``."""
    img_start, eod = cfg.image_start_id, cfg.eod_id
    special = {"eod": eod, "im_start": eod + 1, "im_end": eod + 2, "img_start": img_start,
               "img_end": img_start + 1, "img_pad": img_start + 2, "ref_start": img_start - 6,
               "ref_end": img_start - 5, "box_start": img_start - 4, "box_end": img_start - 3}
    special.update(dict(tokenizer_specials or {}))
    return {
        "vocab_size": cfg.vocab_size,
        "n_vocab": cfg.n_vocab,  # real tokens; rows above are padding
        "n_queries": cfg.visual.n_queries,
        "image_size": cfg.visual.image_size,
        "hidden": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "heads": cfg.num_attention_heads,
        "head_dim": cfg.head_dim,
        "max_context": cfg.seq_length,
        "special_ids": special,
    }


def manifest_fields(checkpoint: str | Path, precision: str, checkpoint_id: str | None = None,
                    engines: Mapping[str, Any] | None = None, cfg: Any = None,
                    **extra: Any) -> dict[str, Any]:
    """Manifest fields for a bundle exported from ``checkpoint`` (a HF checkpoint directory).

    ``cfg``: its ``QwenVLConfig`` when the caller parsed it already (else read here)."""
    from models.checkpoint import CheckpointReader
    from models.config import QwenVLConfig

    ckpt = Path(checkpoint)
    cfg = cfg or QwenVLConfig.from_pretrained(ckpt)
    gen_file = ckpt / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    generation = {k: gen[k] for k in ("do_sample", "top_p", "top_k", "temperature",
                                      "repetition_penalty", "max_new_tokens", "max_window_size")
                  if k in gen}
    try:
        index_sha = CheckpointReader(ckpt).sha256_of_index()
    except Exception:  # noqa: BLE001 - a checkpoint without weights (tests)
        index_sha = None
    fields: dict[str, Any] = {
        "source": {"checkpoint": checkpoint_id or ckpt.name, "index_sha256": index_sha},
        "precision": precision,
        "model": model_facts(cfg),
        "chat_format": gen.get("chat_format", "chatml"),
        "generation": generation,
    }
    if engines is not None:
        fields["engines"] = dict(engines)
    fields.update(extra)
    return fields


def engine_io(onnx_path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Input/output names, dtypes and shapes (ints or symbolic names) of an ONNX file."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)

    def describe(vi) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in t.shape.dim]
        return {"name": vi.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)),
                "shape": dims}

    inits = {i.name for i in m.graph.initializer}
    return {"inputs": [describe(i) for i in m.graph.input if i.name not in inits],
            "outputs": [describe(o) for o in m.graph.output]}


def _external_data(onnx_path: Path) -> list[str]:
    """Locations (relative to the model) of the external-data files an ONNX model references."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    try:
        from onnx.external_data_helper import _get_all_tensors
        tensors = list(_get_all_tensors(m))
    except ImportError:  # pragma: no cover - other onnx versions
        tensors = list(m.graph.initializer)
    locs = []
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for kv in t.external_data:
                if kv.key == "location" and kv.value not in locs:
                    locs.append(kv.value)
    return locs


def write_bundle(out_dir: str | Path, files: Mapping[str, str | Path],
                 manifest_fields: Mapping[str, Any], move: bool = False,
                 overwrite: bool = False) -> Path:
    """Write a bundle atomically and return its path.

    ``files``: ``{name inside the bundle: source path}``; the external-data files an ``.onnx``
    references are added automatically (next to it, under the name the model records).
    An existing ``out_dir`` is replaced only when :func:`replace_reason` allows it (a bundle of
    this toolkit from the same source, or any bundle of this toolkit with ``overwrite``).
    ``manifest_fields``: merged into the manifest (``model`` facts are required by the runtime);
    ``engines`` I/O is filled from the ONNX files when not given. ``move`` moves instead of copying.
    """
    out = Path(out_dir)
    plan: dict[str, Path] = {}
    for name, src in files.items():
        src = Path(src)
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"bundle file name '{name}' must be relative and inside the bundle")
        if not src.is_file():
            raise BundleError(f"cannot bundle {name}: source file {src} does not exist")
        plan[name] = src
        if name.endswith(".onnx"):
            for loc in _external_data(src):
                data_name = str(Path(name).parent / loc) if Path(name).parent != Path(".") else loc
                data_src = src.parent / loc
                if data_name not in plan and data_name not in files:
                    if not data_src.is_file():
                        raise BundleError(f"cannot bundle {name}: its external data {data_src} is "
                                          "missing")
                    plan[data_name] = data_src
    fields = dict(manifest_fields)
    engines = dict(fields.pop("engines", {}) or {})
    for eng in ("vision", "decoder"):
        if eng not in engines and f"{eng}.onnx" in plan:
            engines[eng] = {"file": f"{eng}.onnx", **engine_io(plan[f"{eng}.onnx"])}
    source = fields.get("source")
    try:
        with atomic_dir(out, lambda t: replace_reason(t, source, overwrite)) as tmp:
            _fill(tmp, plan, fields, engines, move)
    except FileExistsError as e:
        raise BundleError(str(e)) from None
    return out


def _fill(tmp: Path, plan: Mapping[str, Path], fields: Mapping[str, Any],
          engines: Mapping[str, Any], move: bool) -> None:
    """Copy (or move) the files into ``tmp``, hash them, write ``manifest.json`` last."""
    listed: dict[str, dict[str, Any]] = {}
    for name, src in plan.items():
        dst = tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if move:
            shutil.move(str(src), dst)
        else:
            shutil.copyfile(src, dst)
        listed[name] = {"sha256": sha256_file(dst), "size": dst.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "toolkit": TOOLKIT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        **fields,
        "engines": engines,
        "files": dict(sorted(listed.items())),
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------
# what --out may replace
# ---------------------------------------------------------------------------------------------

def _own_manifest(target: Path) -> dict[str, Any] | None:
    """The manifest of ``target`` when this toolkit wrote it, else None."""
    try:
        data = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    legacy = isinstance(data.get("versions"), dict) and "toolkit" in data["versions"] \
        and "toolkit" not in data  # written before the top-level marker existed
    return data if data.get("toolkit") == TOOLKIT or legacy else None


def replace_reason(target: Path, source: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> str | None:
    """None when the existing directory ``target`` may be replaced by a new bundle, else why not.

    Replaceable: an empty directory, or a bundle this toolkit wrote (its manifest says
    ``toolkit: qwenvl-edge``) that holds nothing but its listed files, either from the same
    source checkpoint (name and index sha256) or with ``overwrite``. Anything else is refused.
    """
    if not any(target.iterdir()):
        return None
    data = _own_manifest(target)
    if data is None:
        return (f"{target} exists and is not a bundle written by {TOOLKIT} (no manifest.json "
                "of this toolkit): choose another --out; nothing was changed")
    listed = {os.path.normpath(n) for n in data["files"]} | {MANIFEST}
    for f in sorted(target.rglob("*")):
        rel = os.path.normpath(f.relative_to(target))
        if f.is_symlink() or (not f.is_dir() and rel not in listed):
            return (f"{target} holds {rel}, which {TOOLKIT} did not write: move it out of the "
                    "bundle or choose another --out; nothing was changed")
    old = data.get("source") if isinstance(data.get("source"), dict) else {}
    same = bool(source) and bool(old.get("index_sha256")) and all(
        old.get(k) == source.get(k) for k in ("checkpoint", "index_sha256"))
    if not same and not overwrite:
        return (f"{target} holds a bundle of another checkpoint ({old.get('checkpoint')}): pass "
                "--overwrite to replace it, or choose another --out")
    return None


def check_out_dir(out: Path, source: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> None:
    """Refuse an ``--out`` that cannot or must not be written, before any work is done."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"--out {out} is a file, not a bundle directory: choose another --out; "
                          "nothing was changed")
    if out.is_dir():
        why = replace_reason(out, source, overwrite)
        if why:
            raise BundleError(why)
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise BundleError(f"--out {out}: {anc} is not a directory: choose another --out")
    import tempfile

    try:  # the only reliable test (access() ignores read-only mounts for some callers)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=anc))
    except OSError as e:
        raise BundleError(f"--out {out} cannot be written ({anc}: {e.strerror}): choose a "
                          "writable directory") from None
