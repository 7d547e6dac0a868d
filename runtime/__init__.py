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

from .lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
