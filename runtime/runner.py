"""Runners, as Polygraphy has them: one small interface over a model that validation compares.

A :class:`Runner` encodes images, prefills a prompt and steps one token at a time with its own
KV cache; :class:`OrtRunner` is the bundle's engines (this package), ``models.runner.TorchRunner``
the PyTorch reference. Both take the prompt ids with their image slots (``<imgpad>`` between
``<img>`` and ``</img>``) and the image features ``[N, n_queries, hidden]``; the onnxruntime runner
turns the slots into prompt-table ids by the engine contract. Decoding with either goes through
the one decode loop, :func:`greedy` (:func:`runtime.generate.decode_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import numpy as np

from .bundle import Manifest
from .contract import PromptTable
from .engines import DecoderEngine, Features, KVCache, VisionEngine, pick_providers
from .generate import DecodeState, GenerationConfig, Sampler, decode_tokens


class Runner(Protocol):
    """What validation needs of a model: features, prefill logits, one-token steps."""

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """``[N, 3, S, S]`` float32 pixels -> ``[N, n_queries, hidden]`` float32 features."""

    def prefill(self, ids: Sequence[int], features: np.ndarray | None,
                extra: int = 0) -> np.ndarray:
        """Start a new sequence (room for ``extra`` more tokens); returns the float32 logits of
        every prompt position ``[len(ids), V]``."""

    def step(self, token: int) -> np.ndarray:
        """Feed one token; returns its float32 logits ``[V]``."""

    def reset(self) -> None:
        """Drop the sequence (its KV cache)."""


class OrtRunner:
    """The bundle's vision and decoder engines behind :class:`Runner`."""

    def __init__(self, vision: VisionEngine | Callable[[], VisionEngine] | None,
                 decoder: DecoderEngine | Callable[[], DecoderEngine], table: PromptTable):
        """``vision`` / ``decoder``: engines, or callables that open them on first use (so a
        file that does not load fails only what needs it: validation localises by engine)."""
        self._vision, self._decoder, self.table = vision, decoder, table
        self._cache: KVCache | None = None
        self._step = np.zeros((1, 1), np.int64)

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "cpu",
                    threads: int | None = None) -> "OrtRunner":
        from .bundle import verify_bundle

        return cls.from_manifest(verify_bundle(path), device, threads)

    @classmethod
    def from_manifest(cls, man: Manifest, device: str = "cpu",
                      threads: int | None = None) -> "OrtRunner":
        """The ONNX engines of a verified bundle (as ``Pipeline.from_bundle`` opens them)."""
        providers = pick_providers(device)
        m = man.model
        vision = partial(VisionEngine, man.file(man.engines.get("vision", {}).get(
            "file", "vision.onnx")), providers, threads)
        decoder = partial(DecoderEngine, man.file(man.engines.get("decoder", {}).get(
            "file", "decoder.onnx")), providers, threads, vocab_size=int(m["vocab_size"]))
        return cls(vision, decoder, PromptTable.from_manifest(m))

    @property
    def vision(self) -> VisionEngine | None:
        if callable(self._vision):
            self._vision = self._vision()
        return self._vision

    @property
    def decoder(self) -> DecoderEngine:
        if callable(self._decoder):
            self._decoder = self._decoder()
        return self._decoder

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return np.array(self.vision.encode(pixels).numpy(), dtype=np.float32)

    def prefill(self, ids: Sequence[int], features: np.ndarray | None,
                extra: int = 0) -> np.ndarray:
        table_ids, _ = self.table.table_ids(ids)
        self._cache = self.decoder.new_cache(1, len(ids) + extra + 1)
        feats = None
        if features is not None:
            f = np.ascontiguousarray(features, dtype=np.float32)
            feats = Features(f.shape, f)
        return self.decoder.forward(self._cache, table_ids[None], features=feats,
                                    last_only=False)[0]

    def step(self, token: int) -> np.ndarray:
        self._step[0, 0] = token
        return self.decoder.forward(self._cache, self._step)[0]

    def reset(self) -> None:
        self._cache = None


def greedy(runner: Runner, ids: Sequence[int], features: np.ndarray | None, max_new_tokens: int,
           n_vocab: int, stop_ids: Sequence[int] = (),
           suppress: Sequence[int] = ()) -> tuple[list[int], bool]:
    """Greedy answer of ``runner`` over the real vocabulary, as the runtime samples it (the
    ``suppress`` ids never win). Returns the new ids (no stop id) and whether a stop id ended it."""
    logits = runner.prefill(ids, features, max_new_tokens)[-1]
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    state = DecodeState()
    for _ in decode_tokens(runner.step, logits, Sampler(gen, n_vocab, (), suppress),
                           frozenset(stop_ids), gen, state):
        pass
    runner.reset()
    return list(state.tokens), state.finish_reason == "stop"
