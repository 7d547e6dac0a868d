"""GPTQ checkpoints in the AutoGPTQ / GPTQModel v1 layout (that of the official Qwen-VL-Chat-Int4).

Layout (AutoGPTQ's, as ``Qwen/Qwen-VL-Chat-Int4`` publishes it):

* every quantised Linear (``attn.c_attn``, ``attn.c_proj``, ``mlp.w1``, ``mlp.w2``, ``mlp.c_proj``
  of every decoder layer) is stored as ``<name>.qweight`` int32 [K/8, N], ``.qzeros`` int32
  [K/gs, N/8] (zero - 1), ``.scales`` fp16 [K/gs, N], ``.g_idx`` int32 [K] and ``.bias`` fp16 [N]
  (zeros for the Linears that have no bias in the fp model, as AutoGPTQ writes them);
* everything else (``wte``, ``lm_head``, the RMSNorms, all of ``transformer.visual``) in fp16;
* ``config.json`` with ``fp16: true``, ``torch_dtype: float16`` and ``quantization_config``;
  ``quantize_config.json``; sharded safetensors + ``model.safetensors.index.json``; the
  tokenizer / generation / remote-code files copied from the source checkpoint.

``load_gptq_model`` gives the fake-quant PyTorch reference (dequantised weights in a
``QWenLMHeadModel``) that every int4 engine is compared against.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.checkpoint import (IGNORED_SUFFIXES, CheckpointError, CheckpointReader,
                               NonFiniteWeightError, build_model, expected_shapes,
                               only_checkpoint_dirs, parse_dtype, write_shards)
from models.config import ConfigError, QwenVLConfig
from runtime.files import atomic_dir

from .fake_quant import LINEAR_SUFFIXES, quantized_linear_names
from .gptq import QuantConfig, QuantError, QuantResult
from .lm_head import HEAD_KEY, INT4_GROUP
from .packing import GPTQTensors, PackingError, dequantize

log = logging.getLogger(__name__)

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
# Files of a source checkpoint that are *not* copied next to the GPTQ weights.
_WEIGHT_FILES = ("config.json", "quantize_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


class GPTQCheckpointError(CheckpointError):
    """A GPTQ checkpoint we cannot load, with the reason in one line."""


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def gptq_config_dict(cfg: QwenVLConfig, qc: QuantConfig) -> dict[str, Any]:
    """config.json of the quantised checkpoint (Qwen-VL-Chat-Int4 style)."""
    d = cfg.to_dict()
    d.update({"bf16": False, "fp16": True, "fp32": False, "torch_dtype": "float16",
              "quantization_config": qc.quantize_config()})
    return dict(sorted(d.items()))


def _source_tensors(source) -> tuple[QwenVLConfig, Iterator[tuple[str, torch.Tensor]], Path | None]:
    from models.qwen_vl import QWenLMHeadModel

    if isinstance(source, QWenLMHeadModel):
        src_path = getattr(source, "source_path", None)
        sd = source.state_dict()
        return source.cfg, iter(sd.items()), Path(src_path) if src_path else None
    reader = source if isinstance(source, CheckpointReader) else CheckpointReader(source)
    cfg = QwenVLConfig.from_pretrained(reader.path)
    if cfg.quantization_config:
        raise GPTQCheckpointError(f"{reader.path} is already quantised: pass the fp16/bf16 source "
                                  "checkpoint the GPTQ run was made from")
    names = list(expected_shapes(cfg))
    missing = [n for n in names if n not in reader]
    if missing:
        raise GPTQCheckpointError(f"source checkpoint {reader.path} lacks {len(missing)} tensor(s), "
                                  f"first {missing[0]}")
    return cfg, ((n, reader.get(n)) for n in names), reader.path


def save_gptq_checkpoint(source, quant: QuantResult | Mapping[str, GPTQTensors],
                         config: QuantConfig | None, out_dir: str | Path,
                         max_shard_bytes: int = 2 << 30, head: GPTQTensors | None = None) -> Path:
    """Write the GPTQ tensors + the unquantised tensors of ``source`` as a GPTQ v1 checkpoint.

    ``source``: the fp model the GPTQ run used (``QWenLMHeadModel``), or its checkpoint directory /
    ``CheckpointReader`` (streamed one tensor at a time: the full-size model never sits in memory).
    ``quant``: a ``QuantResult`` or ``{"transformer.h.{i}.attn.c_attn": GPTQTensors, ...}`` (e.g.
    RTN tensors from ``quant.fake_quant``); ``config``: the settings written to
    ``quantize_config.json`` (``None``: the ``QuantResult``'s). Tokenizer, generation and
    remote-code files are copied from the source directory when known. ``head``: a GPTQ int4 LM
    head (``quant.lm_head.gptq_head``), stored as ``lm_head.qweight`` / ``qzeros`` / ``scales`` /
    ``g_idx`` (GPTQModel's names for a quantised head) beside the fp16 ``lm_head.weight``, which
    stays for the plans whose head is int8 or fp16; its group size is read back from its scales.
    """
    if isinstance(quant, QuantResult):
        config = config or quant.config
        quant = quant.tensors
    if config is None:
        raise GPTQCheckpointError("save_gptq_checkpoint needs the QuantConfig the tensors were "
                                  "made with")
    cfg, tensors, src_dir = _source_tensors(source)
    qc = config
    qc.validate((cfg.hidden_size, cfg.ffn_dim))
    names = quantized_linear_names(cfg.num_hidden_layers)
    missing = [n for n in names if n not in quant]
    if missing:
        raise GPTQCheckpointError(
            f"the GPTQ tensors cover {len(names) - len(missing)} of {len(names)} Linears (first "
            f"missing {missing[0]}): quantise every decoder layer before saving")
    stream = _gptq_stream(tensors, quant, set(names), expected_shapes(cfg), qc, head)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, only_checkpoint_dirs) as tmp:
        _copy_side_files(src_dir, tmp)
        (tmp / "config.json").write_text(json.dumps(gptq_config_dict(cfg, qc), indent=2) + "\n")
        (tmp / "quantize_config.json").write_text(json.dumps(qc.quantize_config(), indent=2) + "\n")
        write_shards(stream, tmp, max_shard_bytes)
    log.info("wrote GPTQ checkpoint %s (%d quantised Linears)", out_dir, len(names))
    return out_dir


def _gptq_stream(tensors: Iterator[tuple[str, torch.Tensor]], quant: Mapping[str, GPTQTensors],
                 quant_names: set[str], shapes: Mapping[str, tuple[int, ...]], qc: QuantConfig,
                 head: GPTQTensors | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors in source order: GPTQ parts for quantised Linears, fp16 else.

    A generator, so the source is streamed one tensor at a time into the shard writer.
    """
    for name, t in tensors:
        mod, _, leaf = name.rpartition(".")
        if mod in quant_names:
            if leaf == "weight":
                yield from _gptq_parts(mod, quant[mod], shapes, qc)
            elif leaf == "bias":  # GPTQTensors.bias if set, else the source's bias
                b = quant[mod].bias
                yield name, (torch.from_numpy(b.astype(np.float16)) if b is not None
                             else t.detach().to(torch.float16))
            continue
        yield name, t.detach().to(torch.float16)
        if name == f"{HEAD_KEY}.weight" and head is not None:
            n_out, k_in = shapes[name]
            yield from _gptq_parts(HEAD_KEY, head, shapes, replace(
                qc, group_size=k_in // max(1, head.n_groups)), bias=False)


def _gptq_parts(mod: str, g: GPTQTensors, shapes: Mapping[str, tuple[int, ...]], qc: QuantConfig,
                bias: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """One Linear's qweight/qzeros/scales/g_idx (+ zero bias when bias-free), shape-checked."""
    from .fake_quant import check_gptq_shape

    n_out, k_in = shapes[f"{mod}.weight"]
    try:
        check_gptq_shape(mod, g, n_out, k_in)
    except PackingError as e:
        raise GPTQCheckpointError(str(e)) from None
    if g.n_groups != k_in // qc.group_size:
        raise GPTQCheckpointError(
            f"{mod} has {g.n_groups} groups for {k_in} inputs but group_size is "
            f"{qc.group_size}: pass the QuantConfig the tensors were made with")
    yield f"{mod}.qweight", torch.from_numpy(np.ascontiguousarray(g.qweight))
    yield f"{mod}.qzeros", torch.from_numpy(np.ascontiguousarray(g.qzeros))
    yield f"{mod}.scales", torch.from_numpy(g.scales.astype(np.float16))
    yield f"{mod}.g_idx", torch.from_numpy(g.g_idx.astype(np.int32))
    if bias and f"{mod}.bias" not in shapes:  # bias-free Linear: zeros, as AutoGPTQ
        yield f"{mod}.bias", torch.zeros(n_out, dtype=torch.float16)


def _copy_side_files(src_dir: Path | None, tmp: Path) -> None:
    """Copy the tokenizer / generation / remote-code files of the source (not its weights)."""
    if src_dir is not None and src_dir.is_dir():
        for f in sorted(src_dir.iterdir()):
            if (f.is_file() and f.name not in _WEIGHT_FILES
                    and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.startswith(".")):
                shutil.copy2(f, tmp / f.name)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_quant_config(path: str | Path, cfg: QwenVLConfig | None = None) -> QuantConfig:
    """The checkpoint's GPTQ settings, from config.json and/or quantize_config.json, validated."""
    path = Path(path)
    cfg = cfg or QwenVLConfig.from_pretrained(path)
    from_cfg = cfg.quantization_config
    qfile = path / "quantize_config.json"
    from_file = None
    if qfile.is_file():
        try:
            from_file = json.loads(qfile.read_text())
        except (OSError, ValueError) as e:
            raise GPTQCheckpointError(f"cannot read {qfile}: {e}") from None
    if from_cfg is None and from_file is None:
        raise GPTQCheckpointError(
            f"{path} is not a GPTQ checkpoint (no quantization_config in config.json and no "
            "quantize_config.json): load it with models.checkpoint.load_model")
    if from_cfg is not None and from_file is not None:
        for key in ("bits", "group_size", "sym", "desc_act", "quant_method"):
            a, b = from_cfg.get(key), from_file.get(key)
            if a is not None and b is not None and a != b:
                raise GPTQCheckpointError(f"{path}: config.json quantization_config has {key}={a!r} "
                                          f"but quantize_config.json has {key}={b!r}")
    q = {**(from_file or {}), **(from_cfg or {})}
    method = str(q.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise GPTQCheckpointError(f"{path}: quant_method '{method}' is not supported: only GPTQ "
                                  "(AutoGPTQ / GPTQModel v1) checkpoints can be loaded")
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt != "gptq":
        raise GPTQCheckpointError(f"{path}: checkpoint_format '{fmt}' is not supported: only the "
                                  "GPTQ v1 layout ('gptq', zero points stored minus one) is")
    for key in ("bits", "group_size"):
        if not isinstance(q.get(key), int) or isinstance(q.get(key), bool):
            raise GPTQCheckpointError(f"{path}: quantization_config lacks an integer '{key}'")
    qc = QuantConfig(bits=q["bits"], group_size=q["group_size"], sym=bool(q.get("sym", True)),
                     desc_act=bool(q.get("desc_act", False)),
                     damp_percent=float(q.get("damp_percent", 0.01)),
                     true_sequential=bool(q.get("true_sequential", True)))
    try:
        qc.validate((cfg.hidden_size, cfg.ffn_dim))
    except QuantError as e:
        raise GPTQCheckpointError(f"{path}: {e}") from None
    return qc


def _as_np(reader: CheckpointReader, name: str, kinds: tuple[str, ...], what: str) -> np.ndarray:
    try:
        t = reader.get(name)
    except NonFiniteWeightError as e:  # a GPTQ tensor: reported as this layout's error
        raise GPTQCheckpointError(str(e)) from None
    if kinds == ("int",) and t.dtype in (torch.int32, torch.int64):
        return t.numpy()
    if kinds == ("float",) and t.dtype.is_floating_point:
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    raise GPTQCheckpointError(f"tensor {name} has dtype {t.dtype}, expected {what}: the checkpoint "
                              "is corrupt or not in the GPTQ v1 layout")


def read_gptq_linear(reader: CheckpointReader, name: str, n_out: int, k_in: int, qc: QuantConfig,
                     has_bias: bool) -> GPTQTensors:
    """One quantised Linear's tensors, checked against the shapes the config implies."""
    present = {p for p in GPTQ_PARTS if f"{name}.{p}" in reader}
    for part in ("qweight", "qzeros", "scales"):
        if part not in present:
            hint = (" (it holds an unquantised weight)" if f"{name}.weight" in reader else "")
            raise GPTQCheckpointError(f"{reader.path}: layer {name} lacks {name}.{part}{hint}: the "
                                      "checkpoint is incomplete or not quantised with this scope")
    per = 32 // qc.bits
    n_groups = k_in // qc.group_size
    expect = {"qweight": (k_in // per, n_out), "qzeros": (n_groups, n_out // per),
              "scales": (n_groups, n_out), "g_idx": (k_in,), "bias": (n_out,)}
    qweight = _as_np(reader, f"{name}.qweight", ("int",), "int32")
    qzeros = _as_np(reader, f"{name}.qzeros", ("int",), "int32")
    scales = _as_np(reader, f"{name}.scales", ("float",), "float16")
    g_idx = (_as_np(reader, f"{name}.g_idx", ("int",), "int32") if "g_idx" in present
             else np.arange(k_in, dtype=np.int32) // qc.group_size)
    bias = _as_np(reader, f"{name}.bias", ("float",), "float16") if "bias" in present else None
    for part, arr in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales),
                      ("g_idx", g_idx), ("bias", bias)):
        if arr is not None and tuple(arr.shape) != expect[part]:
            raise GPTQCheckpointError(
                f"{reader.path}: {name}.{part} has shape {tuple(arr.shape)}, expected "
                f"{expect[part]} for a [{n_out} x {k_in}] Linear with {qc.bits}-bit group "
                f"{qc.group_size}: the checkpoint does not match its config")
    if not np.isfinite(scales).all():
        raise GPTQCheckpointError(f"{reader.path}: {name}.scales contains NaN/Inf: the tensor is corrupt")
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise GPTQCheckpointError(f"{reader.path}: {name}.g_idx has groups outside 0..{n_groups - 1}: "
                                  "the tensor is corrupt")
    if bias is not None and not np.isfinite(bias).all():
        raise GPTQCheckpointError(f"{reader.path}: {name}.bias contains NaN/Inf: the tensor is corrupt")
    if has_bias and bias is None:
        raise GPTQCheckpointError(f"{reader.path}: layer {name} lacks {name}.bias, which the model has")
    if not has_bias:
        if bias is not None and np.any(bias):
            raise GPTQCheckpointError(
                f"{reader.path}: {name}.bias is non-zero but this Linear has no bias in Qwen-VL "
                "(config no_bias true): the checkpoint is for another model")
        bias = None  # the stored zeros: GPTQTensors.bias is None for bias-free Linears
    return GPTQTensors(qweight=qweight.astype(np.int32, copy=False),
                       qzeros=qzeros.astype(np.int32, copy=False),
                       scales=scales.astype(np.float16), g_idx=g_idx.astype(np.int32, copy=False),
                       bias=None if bias is None else bias.astype(np.float16), bits=qc.bits)


def load_gptq_checkpoint(path: str | Path, cfg: QwenVLConfig | None = None
                         ) -> tuple[QwenVLConfig, dict[str, GPTQTensors], CheckpointReader]:
    """-> (config, ``{"transformer.h.{i}.attn.c_attn": GPTQTensors, ...}``, reader for the rest).

    ``cfg``: the checkpoint's config when the caller parsed it already."""
    path = Path(path)
    try:
        cfg = cfg or QwenVLConfig.from_pretrained(path)
    except ConfigError as e:
        raise GPTQCheckpointError(str(e)) from None
    qc = read_quant_config(path, cfg)
    reader = CheckpointReader(path)
    shapes = expected_shapes(cfg)
    tensors: dict[str, GPTQTensors] = {}
    for name in quantized_linear_names(cfg.num_hidden_layers):
        n_out, k_in = shapes[f"{name}.weight"]
        tensors[name] = read_gptq_linear(reader, name, n_out, k_in, qc, f"{name}.bias" in shapes)
    head = read_gptq_head(reader, cfg, qc)
    if head is not None:
        tensors[HEAD_KEY] = head
    cfg.extra["quantization_config"] = cfg.quantization_config or qc.quantize_config()
    return cfg, tensors, reader


def read_gptq_head(reader: CheckpointReader, cfg: QwenVLConfig, qc: QuantConfig
                   ) -> GPTQTensors | None:
    """The GPTQ int4 LM head (``save_gptq_checkpoint(head=...)``), or None when the checkpoint
    has only the fp16 head; its group size is that of its scales."""
    if f"{HEAD_KEY}.qweight" not in reader:
        return None
    n_groups = _as_np(reader, f"{HEAD_KEY}.scales", ("float",), "float16").shape[0]
    k_in = cfg.hidden_size
    if n_groups < 1 or k_in % n_groups:
        raise GPTQCheckpointError(f"{reader.path}: {HEAD_KEY}.scales has {n_groups} groups for "
                                  f"{k_in} inputs: the tensor is corrupt")
    return read_gptq_linear(reader, HEAD_KEY, cfg.vocab_size, k_in,
                            replace(qc, group_size=k_in // n_groups), has_bias=False)


def load_gptq_model(path: str | Path, dtype: str | torch.dtype = torch.float32,
                    lm_head: str = "fp16", prefixes=None,
                    cfg: QwenVLConfig | None = None, embed: str = "fp16",
                    int8_acts: bool = False) -> nn.Module:
    """The fake-quant reference: a ``QWenLMHeadModel`` holding the dequantised GPTQ weights.

    ``lm_head``: ``fp16`` (as stored), or ``int8`` (the per-channel int8 head the default ``int4``
    plan exports; see ``quant.lm_head``), or ``int4``: the checkpoint's GPTQ head when it has one,
    else round-to-nearest in groups of 32. ``embed``: ``fp16`` (as stored) or the ``int8`` /
    ``int4`` rows the ``edge`` plan gathers (``quant.embedding``). ``prefixes``: load only those
    parameters (the rest stay on the meta device), as ``models.checkpoint.load_model``.
    ``int8_acts``: the Linears' inputs quantised as the ``cpu`` target's MatMulNBits does
    (``quant.fake_quant.int8_activations``).
    """
    dtype = parse_dtype(dtype)
    cfg, tensors, reader = load_gptq_checkpoint(path, cfg)
    if lm_head != "int4":  # the stored fp16 head is this plan's source
        tensors.pop(HEAD_KEY, None)
    shapes = expected_shapes(cfg)
    quant = set(tensors)
    names = set(reader.names())
    needed = [n for n in shapes if n.rpartition(".")[0] not in quant]
    missing = [n for n in needed if n not in names]
    if missing:
        raise GPTQCheckpointError(f"{path}: lacks {len(missing)} unquantised tensor(s), first "
                                  f"{missing[0]}: the checkpoint is incomplete or for another model")
    known = set(needed) | {f"{m}.{p}" for m in quant for p in GPTQ_PARTS}
    known |= {f"{HEAD_KEY}.weight"} | {f"{HEAD_KEY}.{p}" for p in GPTQ_PARTS}
    unexpected = sorted(n for n in names if n not in known and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        log.warning("ignoring %d unexpected tensor(s) in %s, first %s", len(unexpected), path,
                    unexpected[0])

    def get(name: str) -> torch.Tensor:
        mod, _, leaf = name.rpartition(".")
        t = tensors.get(mod)
        if t is None:
            return reader.get(name)
        if leaf == "weight":
            try:
                return torch.from_numpy(dequantize(t))
            except PackingError as e:
                raise GPTQCheckpointError(f"{path}: {mod}: {e}") from None
        return torch.from_numpy(t.bias.astype(np.float32))  # only Linears with a bias ask

    model = build_model(cfg, get, dtype, prefixes)
    _engine_head_and_table(model, tensors, lm_head, embed, int8_acts, dtype)
    model.source_path = str(path)
    model.quant_config = read_quant_config(path, cfg)
    return model


def _engine_head_and_table(model: nn.Module, tensors: Mapping[str, GPTQTensors], lm_head: str,
                           embed: str, int8_acts: bool, dtype: torch.dtype) -> None:
    """The head, the embedding rows and (``int8_acts``) the MatMulNBits input rounding the
    engine applies, on the fake-quant model in place; a GPTQ head is already in it."""
    from .fake_quant import int8_activations
    from .lm_head import quantize_lm_head

    if lm_head != "fp16" and HEAD_KEY not in tensors and not model.lm_head.weight.is_meta:
        head = quantize_lm_head(model.lm_head.weight.detach(), lm_head)
        model.lm_head.weight.data = head.dequantized.to(dtype)
    wte = model.transformer.wte.weight
    if embed != "fp16" and not wte.is_meta:
        from .embedding import embedding_weight

        wte.data = embedding_weight(wte.detach(), embed).to(dtype)
    if int8_acts:
        groups = {m: t.g_idx for m, t in tensors.items()}
        if lm_head == "int4" and HEAD_KEY not in groups:  # round-to-nearest head: groups of 32
            groups[HEAD_KEY] = np.arange(model.cfg.hidden_size) // INT4_GROUP
        int8_activations(model, groups, lm_head == "int8")


class GPTQBlocks:
    """Decoder blocks of a GPTQ checkpoint, dequantised one at a time in fp32 (a
    ``quant.gptq.BlockSource``): calibration passes over a 7B checkpoint (int8-KV scales,
    quant/kv_scales.py) hold one block, never the whole fake-quant model."""

    def __init__(self, path: str | Path, cfg: QwenVLConfig | None = None):
        self.path = Path(path)
        self.cfg = load_gptq_checkpoint(self.path, cfg)[0]

    def num_blocks(self) -> int:
        return self.cfg.num_hidden_layers

    def load(self, i: int) -> nn.Module:
        m = load_gptq_model(self.path, torch.float32, prefixes=[f"transformer.h.{i}."],
                            cfg=self.cfg)
        return m.transformer.h[i].eval()

    def done(self, i: int, block: nn.Module) -> None:
        pass


__all__ = ["GPTQCheckpointError", "save_gptq_checkpoint", "load_gptq_checkpoint",
           "load_gptq_model", "read_quant_config", "read_gptq_linear", "read_gptq_head",
           "gptq_config_dict", "GPTQ_PARTS", "GPTQBlocks", "LINEAR_SUFFIXES"]
