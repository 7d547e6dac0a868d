"""PyTorch reference of Qwen-VL, HF checkpoint I/O and tiny-checkpoint generation.

The names below load on first use, so ``import models.config`` (torch-free) does not pull in
torch: benchmarks and the runtime-side tools read config facts without it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "CheckpointError": "checkpoint", "CheckpointReader": "checkpoint", "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ConfigError": "config", "QwenVLConfig": "config", "VisualConfig": "config",
    "qwen_vl_chat_config": "config",
    "ContextLengthError": "qwen_vl", "QWenLMHeadModel": "qwen_vl",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'models' has no attribute '{name}'")
    value = getattr(import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
