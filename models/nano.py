"""Tiny Qwen-VL checkpoints in exactly the published layout, and full-size random ones.

A nano checkpoint has the real tensor names, the real config keys, a small vocabulary in the
``qwen.tiktoken`` format followed by Qwen's 217 special tokens, and deterministic weights from a
seed. Tests, the default ``export.py`` run and the benchmarks all use these, because the real
weights cannot be downloaded here. ``write_random_checkpoint`` streams the full-size Qwen-VL-Chat
shapes shard by shard, never holding more than one shard in memory.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from runtime.files import atomic_dir

from .checkpoint import expected_shapes, only_checkpoint_dirs, parse_dtype, write_shards
from .config import (IMG_START_INDEX, N_SPECIAL_TOKENS, QwenVLConfig, VisualConfig,
                     qwen_vl_chat_config)

log = logging.getLogger(__name__)

NORMS = {"ln_1", "ln_2", "ln_f", "ln_pre", "ln_post", "ln_q", "ln_kv"}


@dataclasses.dataclass
class NanoSpec:
    """Dimensions of a nano model; defaults are small enough for sub-second tests."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    ffn_dim: int = 256
    vis_width: int = 64
    vis_layers: int = 2
    vis_heads: int = 4
    vis_mlp_ratio: float = 2.0
    image_size: int = 56
    patch_size: int = 14
    n_queries: int = 16
    n_merges: int = 512
    seq_length: int = 2048


def _pad(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def nano_config(spec: NanoSpec, n_bpe: int) -> QwenVLConfig:
    base = qwen_vl_chat_config()
    vis = VisualConfig(width=spec.vis_width, layers=spec.vis_layers, heads=spec.vis_heads,
                       mlp_ratio=spec.vis_mlp_ratio, image_size=spec.image_size,
                       patch_size=spec.patch_size, output_dim=spec.hidden_size,
                       image_start_id=n_bpe + IMG_START_INDEX, n_queries=spec.n_queries)
    return QwenVLConfig(
        hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        kv_channels=spec.hidden_size // spec.num_attention_heads,
        intermediate_size=2 * spec.ffn_dim, vocab_size=_pad(n_bpe + N_SPECIAL_TOKENS),
        seq_length=spec.seq_length, visual=vis, extra=dict(base.extra))


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def init_tensor(name: str, shape: tuple[int, ...], seed: int, cfg: QwenVLConfig) -> torch.Tensor:
    """Deterministic per-tensor init, independent of iteration order (so shards can stream).

    Scales are chosen so activations stay O(1) and every weight matters: a q/k/v mis-permutation
    or a wrong norm then shows up clearly in the outputs, which a 0.02-std init would hide.
    """
    g = torch.Generator().manual_seed(_seed_for(seed, name))

    def randn(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std

    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("attn_pool.pos_embed"):
        from .qwen_vl import sincos_pos_embed_2d
        return sincos_pos_embed_2d(shape[1], int(math.sqrt(shape[0])))
    if name.split(".")[-2] in NORMS:
        return 1.0 + randn(0.1) if leaf == "weight" else randn(0.02)
    if leaf in ("bias", "in_proj_bias"):
        return randn(0.02)
    if name.endswith("positional_embedding"):
        return randn(shape[1] ** -0.5)
    if name.endswith("visual.proj"):
        return randn(shape[0] ** -0.5)
    if name.endswith("attn_pool.query"):
        return randn(0.02)
    if name == "transformer.wte.weight":
        return randn(1.0)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return randn(fan_in ** -0.5)


def random_state(cfg: QwenVLConfig, seed: int = 0,
                 fixed: Mapping[str, torch.Tensor] | None = None,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in checkpoint order; ``fixed`` supplies given tensors instead of the init."""
    fixed = fixed or {}
    shapes = expected_shapes(cfg)
    unknown = sorted(set(fixed) - set(shapes))
    if unknown:
        raise ValueError(f"fixed tensors not in this checkpoint: {unknown}")
    for name, shape in shapes.items():
        if name in fixed:
            if tuple(fixed[name].shape) != tuple(shape):
                raise ValueError(f"fixed {name} has shape {tuple(fixed[name].shape)}, "
                                 f"the checkpoint needs {tuple(shape)}")
            yield name, fixed[name]
        else:
            yield name, init_tensor(name, shape, seed, cfg)


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def side_files(cfg: QwenVLConfig, ranks: dict[bytes, int] | None) -> dict[str, str]:
    """generation_config.json, tokenizer_config.json (+ qwen.tiktoken) as published."""
    n_bpe = cfg.eod_id
    files = {
        "generation_config.json": _json({
            "chat_format": "chatml", "do_sample": True, "eos_token_id": n_bpe,
            "max_new_tokens": 512, "max_window_size": 6144, "pad_token_id": n_bpe,
            "top_k": 0, "top_p": 0.3, "transformers_version": "4.31.0"}),
        "tokenizer_config.json": _json({
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            "clean_up_tokenization_spaces": True, "model_max_length": 8192,
            "tokenizer_class": "QWenTokenizer"}),
    }
    if ranks is not None:
        files["qwen.tiktoken"] = "".join(
            f"{base64.b64encode(tok).decode()} {rank}\n"
            for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]))
    return files


def make_nano_checkpoint(out_dir: str | Path, seed: int = 0, spec: NanoSpec | None = None,
                         dtype: str | torch.dtype = "bf16", fmt: str = "safetensors",
                         max_shard_bytes: int = 2 << 30,
                         fixed: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a nano checkpoint (config, weights, tokenizer) atomically; deterministic in seed.

    ``fixed`` maps tensor names to stored values that replace the generated ones: the golden test
    uses it to rebuild, on any CPU, the exact checkpoint the original code ran on.
    """
    from .nano_vocab import nano_ranks

    spec = spec or NanoSpec()
    ranks = nano_ranks(spec.n_merges)
    cfg = nano_config(spec, len(ranks))
    dtype = parse_dtype(dtype)
    out = Path(out_dir)
    with atomic_dir(out, only_checkpoint_dirs) as tmp:
        d = cfg.to_dict()
        d["torch_dtype"] = {torch.float32: "float32", torch.float16: "float16",
                            torch.bfloat16: "bfloat16"}[dtype]
        (tmp / "config.json").write_text(_json(d))
        write_shards(((k, v.to(dtype)) for k, v in random_state(cfg, seed, fixed)), tmp,
                     max_shard_bytes, fmt)
        for name, text in side_files(cfg, ranks).items():
            (tmp / name).write_text(text)
    return out


def write_random_checkpoint(out_dir: str | Path, cfg: QwenVLConfig | None = None, seed: int = 0,
                            dtype: str | torch.dtype = "bf16",
                            max_shard_bytes: int = 2 << 30) -> Path:
    """Full-size (default Qwen-VL-Chat) random checkpoint, streamed shard by shard.

    The tokenizer file is not written (the real ``qwen.tiktoken`` is 2.5 MB of data we do not
    ship); engines and benchmarks need only the weights.
    """
    cfg = cfg or qwen_vl_chat_config()
    dtype = parse_dtype(dtype)
    out = Path(out_dir)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(it, **_):  # type: ignore[no-redef]
            return it
    shapes = expected_shapes(cfg)
    with atomic_dir(out, only_checkpoint_dirs) as tmp:
        (tmp / "config.json").write_text(_json(cfg.to_dict()))
        it = ((k, init_tensor(k, s, seed, cfg).to(dtype)) for k, s in shapes.items())
        write_shards(tqdm(it, total=len(shapes), desc="random weights", unit="tensor"), tmp,
                     max_shard_bytes)
        for name, text in side_files(cfg, None).items():
            (tmp / name).write_text(text)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("QWENVL_EDGE_CACHE", Path.home() / ".cache" / "qwenvl-edge"))


def default_checkpoint() -> Path:
    """The checkpoint ``export.py`` uses with no arguments: shipped if present, else generated."""
    shipped = Path(__file__).parent / "nano" / "qwen-vl-nano"
    if (shipped / "config.json").is_file():
        return shipped
    path = cache_root() / "nano-random-seed0"
    if not (path / "config.json").is_file():
        log.info("generating the nano checkpoint in %s", path)
        make_nano_checkpoint(path, seed=0)
    return path
