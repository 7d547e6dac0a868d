"""Registry of supported checkpoint families: ``config.json`` -> PyTorch reference class.

Adding a Qwen-VL variant means one model file, one line in ``MODELS`` and one tiny test config
(the llama.cpp converter pattern).
"""

from __future__ import annotations

from torch import nn

from .config import ConfigError, QwenVLConfig
from .qwen_vl import QWenLMHeadModel

# model_type -> (architecture names as they appear in config.json, reference class)
MODELS: dict[str, tuple[tuple[str, ...], type[nn.Module]]] = {
    "qwen": (("QWenLMHeadModel",), QWenLMHeadModel),
}


def model_class(cfg: QwenVLConfig) -> type[nn.Module]:
    model_type = cfg.extra.get("model_type", "qwen")
    try:
        archs, cls = MODELS[model_type]
    except KeyError:
        raise ConfigError(f"model_type '{model_type}' is not supported; supported: "
                          f"{', '.join(MODELS)}") from None
    declared = cfg.extra.get("architectures") or archs
    if not set(declared) & set(archs):
        raise ConfigError(f"architecture {declared} is not supported for model_type "
                          f"'{model_type}' (expected one of {list(archs)})")
    return cls
