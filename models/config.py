"""Qwen-VL configuration as it appears in a Hugging Face ``config.json``.

The dataclasses hold only the fields the forward pass uses; every other key of the original file is
kept in ``extra`` so that a checkpoint we rewrite (nano, GPTQ) still carries the real layout
(``auto_map``, ``architectures``, ...). Facts: Qwen/Qwen-VL-Chat's ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import EdgeError


#: Qwen's tokenizer appends 217 special tokens after its BPE ranks, ``<|endoftext|>`` first and
#: ``<img>`` at index 214 (``runtime.tokenizer.SPECIAL_TOKENS``): ``image_start_id`` fixes them
#: all.
N_SPECIAL_TOKENS = 217
IMG_START_INDEX = 214
#: Resampler queries = image slots per image; the real config.json does not write it (the
#: original code defaults it to 256).
DEFAULT_N_QUERIES = 256


class ConfigError(EdgeError, ValueError):
    """A config.json that is missing, unreadable or not a Qwen-VL config."""


@dataclass
class VisualConfig:
    """``config.json["visual"]``: ViT-bigG/14 + the 256-query resampler."""

    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231
    image_size: int = 448
    patch_size: int = 14
    output_dim: int = 4096
    image_start_id: int = 151857
    # Not present in the real config.json; written only when it differs from the default, so
    # the real layout stays byte-for-byte comparable.
    n_queries: int = DEFAULT_N_QUERIES

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def pool_heads(self) -> int:
        # The original resampler hard-codes output_dim // 128 heads.
        return self.output_dim // 128

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.n_queries == DEFAULT_N_QUERIES:
            d.pop("n_queries")
        return d


#: keys that fix tensor shapes: without them the defaults would build a different model
REQUIRED_TOP = ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels",
                "intermediate_size", "vocab_size")
REQUIRED_VISUAL = ("width", "layers", "heads", "mlp_ratio", "image_size", "patch_size",
                   "output_dim", "image_start_id")

_TOP_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels", "intermediate_size",
    "layer_norm_epsilon", "vocab_size", "rotary_emb_base", "rotary_pct", "seq_length",
    "max_position_embeddings", "use_dynamic_ntk", "use_logn_attn", "no_bias",
    "tie_word_embeddings",
)


@dataclass
class QwenVLConfig:
    """Top level of ``config.json`` (model_type ``qwen`` with a ``visual`` block)."""

    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016  # halved by the code: w1/w2 have intermediate_size // 2 rows
    layer_norm_epsilon: float = 1e-6
    vocab_size: int = 151936
    rotary_emb_base: float = 10000.0
    rotary_pct: float = 1.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    no_bias: bool = True
    tie_word_embeddings: bool = False
    visual: VisualConfig = field(default_factory=VisualConfig)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size // 2

    @property
    def image_start_id(self) -> int:
        return self.visual.image_start_id

    @property
    def eod_id(self) -> int:
        """``<|endoftext|>``: the first special token; every id below it is a BPE text token."""
        return self.visual.image_start_id - IMG_START_INDEX

    @property
    def n_vocab(self) -> int:
        """Real tokens (BPE + specials); the embedding rows above them are padding."""
        return self.eod_id + N_SPECIAL_TOKENS

    @property
    def image_end_id(self) -> int:
        return self.visual.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.visual.image_start_id + 2

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self.extra.get("quantization_config")

    def validate(self) -> None:
        """Reject configs the model code cannot represent, with the reason."""
        v = self.visual
        problems = []
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            problems.append("kv_channels * num_attention_heads must equal hidden_size")
        if v.output_dim != self.hidden_size:
            problems.append("visual.output_dim must equal hidden_size")
        if self.hidden_size % 128:
            problems.append("hidden_size must be a multiple of 128 (the resampler uses hidden/128 heads)")
        if v.width % v.heads:
            problems.append("visual.width must be divisible by visual.heads")
        if v.image_size % v.patch_size:
            problems.append("visual.image_size must be a multiple of visual.patch_size")
        if int(v.n_queries ** 0.5) ** 2 != v.n_queries:
            problems.append("visual.n_queries must be a square number")
        if self.rotary_pct != 1.0:
            problems.append("rotary_pct other than 1.0 is not supported")
        if self.tie_word_embeddings:
            problems.append("tied word embeddings are not supported (Qwen-VL has an untied lm_head)")
        if problems:
            raise ConfigError("unsupported Qwen-VL config: " + "; ".join(problems))

    # ---- (de)serialisation -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "QwenVLConfig":
        if d.get("model_type") != "qwen" or not isinstance(d.get("visual"), dict):
            kind = d.get("model_type", "unknown")
            raise ConfigError(
                f"{source} is a '{kind}' checkpoint, not Qwen-VL (expected model_type 'qwen' with a "
                "'visual' block): pass a Qwen/Qwen-VL or Qwen/Qwen-VL-Chat checkpoint directory")
        missing = [k for k in REQUIRED_TOP if k not in d]
        missing += [f"visual.{k}" for k in REQUIRED_VISUAL if k not in d["visual"]]
        if missing:
            raise ConfigError(f"{source} lacks {', '.join(missing)}: the checkpoint's config.json "
                              "is incomplete; restore it from the original checkpoint")
        known_visual = {f.name for f in dataclasses.fields(VisualConfig)}
        vis = {k: d["visual"][k] for k in d["visual"] if k in known_visual}
        top = {k: d[k] for k in _TOP_FIELDS if k in d}
        _check_types(cls, top, "", source)
        _check_types(VisualConfig, vis, "visual.", source)
        extra = {k: v for k, v in d.items() if k not in _TOP_FIELDS and k != "visual"}
        extra["_visual_extra"] = {k: v for k, v in d["visual"].items() if k not in known_visual}
        cfg = cls(**top, visual=VisualConfig(**vis), extra=extra)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        extra = dict(self.extra)
        visual_extra = extra.pop("_visual_extra", {}) or {}
        d: dict[str, Any] = {k: v for k, v in extra.items()}
        for k in _TOP_FIELDS:
            d[k] = getattr(self, k)
        d["visual"] = {**visual_extra, **self.visual.to_dict()}
        d.setdefault("model_type", "qwen")
        return dict(sorted(d.items()))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "QwenVLConfig":
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise ConfigError(f"checkpoint not found: {p}: pass the directory that holds config.json")
        if not f.is_file():
            raise ConfigError(f"no config.json in {p}: pass a Hugging Face checkpoint directory")
        try:
            d = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {f}: {e}") from None
        return cls.from_dict(d, source=str(f))

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _check_types(kind: type, values: dict[str, Any], prefix: str, source: str) -> None:
    """Each value must have its field's type (ints positive): name the key, not a later crash."""
    defaults = {f.name: f.default for f in dataclasses.fields(kind)}
    for k, v in values.items():
        want = defaults.get(k)
        if isinstance(want, bool):
            ok, what = isinstance(v, bool), "true or false"
        elif isinstance(want, int):
            ok, what = isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"
        elif isinstance(want, float):
            ok, what = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        else:
            continue
        if not ok:
            raise ConfigError(f"{source}: {prefix}{k} must be {what}, not {v!r}: fix config.json")


def qwen_vl_chat_config() -> QwenVLConfig:
    """The published Qwen/Qwen-VL-Chat config.json (Hugging Face)."""
    extra = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "emb_dropout_prob": 0.0,
        "bf16": False,
        "fp16": False,
        "fp32": False,
        "initializer_range": 0.02,
        "model_type": "qwen",
        "onnx_safe": None,
        "scale_attn_weights": True,
        "tokenizer_type": "QWenTokenizer",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "use_flash_attn": False,
    }
    return QwenVLConfig(extra=extra)
