"""PyTorch reference of Qwen-VL, HF checkpoint I/O and tiny-checkpoint generation."""

from .checkpoint import CheckpointError, CheckpointReader, load_model, save_checkpoint
from .config import ConfigError, QwenVLConfig, VisualConfig, qwen_vl_chat_config
from .qwen_vl import ContextLengthError, QWenLMHeadModel

__all__ = [
    "CheckpointError", "CheckpointReader", "ConfigError", "ContextLengthError", "QWenLMHeadModel",
    "QwenVLConfig", "VisualConfig", "load_model", "qwen_vl_chat_config", "save_checkpoint",
]
