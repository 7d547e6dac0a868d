"""Torch-free Qwen-VL runtime: load a bundle, chat with images, stream text, get grounding boxes.

    from runtime import Pipeline
    pipe = Pipeline.from_bundle("bundle/", device="auto")
    stream = pipe.chat("Where is the cat?", images=["cat.jpg"])
    for piece in stream:
        print(piece, end="", flush=True)
    result = stream.result()          # text, token_ids, boxes (original pixels), timings

Needs numpy, onnxruntime (or onnxruntime-gpu), tiktoken and Pillow only. Kept import-free on
purpose: ``import runtime.tokenizer`` does not pull in onnxruntime; the names below are loaded on
first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "Pipeline": "pipeline", "ChatResult": "pipeline", "ChatStream": "pipeline",
    "ChatRequest": "pipeline", "Conversation": "pipeline", "ContextLengthError": "pipeline",
    "ConversationBusyError": "pipeline",
    "BundleError": "bundle", "Manifest": "bundle", "verify_bundle": "bundle",
    "EdgeError": "errors", "EngineError": "engines", "ContractError": "contract",
    "GenerationConfig": "generate", "GenerationError": "generate",
    "ImageError": "image",
    "PromptError": "prompt", "Turn": "prompt", "Ref": "prompt", "Box": "prompt",
    "GroundedBox": "grounding",
    "TokenizerError": "tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'runtime' has no attribute '{name}'")
    value = getattr(import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
