"""Hugging Face checkpoint I/O in the exact published layout.

Reads ``model.safetensors.index.json`` + shards, a single ``model.safetensors``,
``pytorch_model.bin.index.json`` + ``.bin`` shards (``torch.load(weights_only=True)``, never plain
pickle) or a single ``pytorch_model.bin``. Tensors are read one at a time, so a 19 GB checkpoint
can feed a model part by part. Writing is atomic: a temporary sibling directory renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from runtime.errors import EdgeError
from runtime.files import atomic_dir, sha256_file

from .config import QwenVLConfig

log = logging.getLogger(__name__)

# Non-persistent tensors the original class tells HF loading to ignore.
IGNORED_SUFFIXES = (".attn.masked_bias", ".attn.bias", ".rotary_emb.inv_freq")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(EdgeError, ValueError):
    """A checkpoint whose files or tensors do not match what the config describes."""


class NonFiniteWeightError(CheckpointError):
    """A weight holding NaN or Inf (found as the tensor is first read)."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype '{name}': use one of fp32, fp16, bf16") from None


class CheckpointReader:
    """Lazy tensor access over any of the four HF weight layouts."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self._map: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.index_file: Path | None = None
        for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                                   ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            index = self.path / index_name
            if index.is_file():
                self.index_file = index
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError) as e:
                    raise CheckpointError(f"corrupt index {index}: {e}") from None
                self._map = {k: self.path / v for k, v in weight_map.items()}
                break
            if (self.path / single).is_file():
                self.index_file = self.path / single
                self._map = {k: self.path / single for k in self._names_in(self.path / single)}
                break
        else:
            raise CheckpointError(
                f"no weights in {self.path}: expected model.safetensors(.index.json) or "
                "pytorch_model.bin(.index.json)")
        missing = sorted({str(p.name) for p in self._map.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"checkpoint {self.path} is incomplete: missing shard(s) "
                                  f"{', '.join(missing)}; download them again")

    @property
    def is_safetensors(self) -> bool:
        return self.index_file is not None and "safetensors" in self.index_file.name

    def names(self) -> list[str]:
        return list(self._map)

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def _names_in(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        return list(self._load_bin(file))

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != file:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
                raise CheckpointError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
            self._bin_cache = (file, sd)
        return self._bin_cache[1]

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``; a floating tensor holding NaN/Inf is refused here, as it is first
        read, rather than hours later inside GPTQ or the drift report."""
        file = self._map.get(name)
        if file is None:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.path}")
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(file), framework="pt") as f:
                    t = f.get_tensor(name)
            else:
                t = self._load_bin(file)[name]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - corrupt shard
            raise CheckpointError(f"cannot read tensor {name} from {file.name}: "
                                  f"{str(e).splitlines()[0]}; the shard is corrupt") from None
        check_finite(name, t, file.name)
        return t

    def sha256_of_index(self) -> str:
        assert self.index_file is not None
        return sha256_file(self.index_file)

    def fingerprint(self) -> str:
        """Changes whenever the weights may have: the index's sha256 plus each shard's name, size
        and modification time. Why not the index alone: retrained weights keep the same tensor
        names and shard names, so the index (and often the shard size) is unchanged; why not a
        content hash: hashing 19 GB of shards on every export costs about a minute."""
        h = hashlib.sha256(self.sha256_of_index().encode())
        for shard in sorted(set(self._map.values())):
            st = shard.stat()
            h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


def check_finite(name: str, t: torch.Tensor, where: str = "") -> None:
    """Raise NonFiniteWeightError naming ``name`` and its NaN/Inf counts if any value is not finite.

    One float32-accumulated sum (a read of the tensor, no copy) decides; only a non-finite sum
    pays for the exact counts."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if torch.isfinite(t.sum(dtype=torch.float32)):
        return
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    if nan == 0 and inf == 0:
        return  # the sum overflowed; every value is finite
    raise NonFiniteWeightError(
        f"tensor {name} contains NaN/Inf ({nan} NaN, {inf} Inf of {t.numel()} values"
        f"{f' in {where}' if where else ''}): the checkpoint is corrupt (or training diverged); re-download "
        "it or export another one")


# ---------------------------------------------------------------------------------------------
# Model <-> checkpoint
# ---------------------------------------------------------------------------------------------

def expected_shapes(cfg: QwenVLConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint for ``cfg``, computed without allocating weights."""
    from .registry import model_class

    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_model(cfg: QwenVLConfig, tensors: Callable[[str], torch.Tensor],
                dtype: torch.dtype = torch.float32, prefixes: Iterable[str] | None = None) -> nn.Module:
    """Instantiate on the meta device and materialise each parameter from ``tensors(name)``.

    ``prefixes`` restricts loading (e.g. ``["transformer.visual."]``): other parameters stay on
    the meta device, so a 24 GB machine can hold one half of the full-size model.
    """
    from .registry import model_class

    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    wanted = tuple(prefixes) if prefixes is not None else None
    for name, param in list(model.named_parameters()):
        if wanted is not None and not name.startswith(wanted):
            continue
        t = tensors(name)
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, the config expects "
                                  f"{tuple(param.shape)}: the checkpoint does not match its config.json")
        _set_param(model, name, t.to(dtype))
    return model.eval()


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    value = value.contiguous()
    if value.data_ptr() % 64:
        # safetensors hands out views at unaligned offsets; BLAS then sums in another order and
        # single-token matmuls differ from the original code in the last bit. Copy to aligned.
        value = value.clone()
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_model(path: str | Path, dtype: str | torch.dtype = torch.float32,
               prefixes: Iterable[str] | None = None,
               cfg: QwenVLConfig | None = None) -> nn.Module:
    """Load a Qwen-VL checkpoint directory into the PyTorch reference (eval mode).

    ``cfg``: the checkpoint's config when the caller parsed it already (export.py parses it once)."""
    dtype = parse_dtype(dtype)
    cfg = cfg or QwenVLConfig.from_pretrained(path)
    if cfg.quantization_config:
        raise CheckpointError(
            f"{path} is a {cfg.quantization_config.get('quant_method', 'quantized')} checkpoint: "
            "load it with quant.checkpoint.load_gptq_model (or pass it to export.py, which does)")
    reader = CheckpointReader(path)
    expected = expected_shapes(cfg)
    names = set(reader.names())
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensor(s), first {missing[0]}: "
                              "it is incomplete or for another model")
    unexpected = [n for n in names if n not in expected and not n.endswith(IGNORED_SUFFIXES)]
    if unexpected:
        log.warning("ignoring %d unexpected tensor(s) in %s, first %s", len(unexpected), path,
                    unexpected[0])
    model = build_model(cfg, reader.get, dtype, prefixes)
    model.source_path = str(path)
    return model


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path,
                 max_shard_bytes: int = 2 << 30, fmt: str = "safetensors") -> dict:
    """Write (name, tensor) pairs into HF shards + index; holds at most one shard in memory."""
    from safetensors.torch import save_file

    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush(final: bool = False) -> None:
        shard = shards[-1]
        if not shard:
            return
        name = f"{stem}-{len(files) + 1:05d}.{ext}"
        if fmt == "safetensors":
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        else:
            torch.save(shard, out_dir / name)
        files.append(name)
        for k in shard:
            weight_map[k] = name
        shards[-1] = {}
        sizes[-1] = 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            flush()
        shards[-1][name] = t.contiguous()
        sizes[-1] += nbytes
        total += nbytes
    flush(final=True)
    n = len(files)
    renamed = {}
    for i, old in enumerate(files, 1):
        new = f"{stem}-{i:05d}-of-{n:05d}.{ext}"
        os.replace(out_dir / old, out_dir / new)
        renamed[old] = new
    weight_map = {k: renamed[v] for k, v in weight_map.items()}
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_name = f"{stem}.{ext}.index.json"
    (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return index


def save_checkpoint(state: dict[str, torch.Tensor] | nn.Module, cfg: QwenVLConfig,
                    out_dir: str | Path, dtype: str | torch.dtype = torch.bfloat16,
                    fmt: str = "safetensors", max_shard_bytes: int = 2 << 30,
                    extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write config.json + sharded weights (+ extra files such as the tokenizer) atomically."""
    dtype = parse_dtype(dtype)
    sd = state.state_dict() if isinstance(state, nn.Module) else state
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, only_checkpoint_dirs) as tmp:
        d = cfg.to_dict()
        d["torch_dtype"] = {torch.float32: "float32", torch.float16: "float16",
                            torch.bfloat16: "bfloat16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
        write_shards(((k, v.detach().to(dtype)) for k, v in sd.items()), tmp, max_shard_bytes, fmt)
        for name, content in (extra_files or {}).items():
            p = tmp / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return out_dir



def only_checkpoint_dirs(target: Path) -> str | None:
    """save_checkpoint replaces an existing checkpoint (config.json + weights), nothing else."""
    if not any(target.iterdir()) or (target / "config.json").is_file():
        return None
    return (f"{target} is a non-empty directory without config.json (not a checkpoint): "
            "choose another path")
