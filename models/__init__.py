"""PyTorch reference of Qwen-VL, HF checkpoint I/O and tiny-checkpoint generation.

The names below load on first use, so ``import models.config`` (torch-free) does not pull in
torch: benchmarks and the runtime-side tools read config facts without it.
"""

from __future__ import annotations

from runtime.lazy import lazy_exports

_LAZY = {
    "CheckpointError": "checkpoint", "CheckpointReader": "checkpoint", "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ConfigError": "config", "QwenVLConfig": "config", "VisualConfig": "config",
    "qwen_vl_chat_config": "config",
    "ContextLengthError": "qwen_vl", "QWenLMHeadModel": "qwen_vl",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
