"""The decode loop: sampling with numpy, stop ids and stop strings, streaming text.

* :class:`GenerationConfig` — max_new_tokens, temperature (0 = greedy), top_p, top_k,
  repetition_penalty, seed, stop strings.
* :class:`Sampler` — one row's sampler: HF-order logits processing (repetition penalty,
  temperature, top-k, top-p) on a numpy ``[V]`` vector with a seeded ``np.random.Generator``.
  Greedy decoding is a bare ``argmax``. Ids past the real vocabulary (the padding rows of the
  embedding/LM head) are never produced, nor the ``suppress`` ids (the pipeline suppresses the
  image tags ``<img>``, ``</img>``, ``<imgpad>``: a reply must never open an image span, which
  would break the prompt of the next turn).
* :class:`TextStream` — incremental detokenisation (UTF-8 safe) that holds back just enough text to
  catch a stop string spanning several tokens; the pieces it yields join to the final text.
* :func:`next_token` — one row's step (sample, stop on a stop id, record);
  :func:`decode_tokens` — the KV loop for one row built on it; a batch
  (``Pipeline.chat_batch``) runs ``next_token`` per row.
  The sampler is injected (mlx-lm's ``generate_step``), so the PyTorch reference decodes with the
  same loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import EdgeError


class GenerationError(EdgeError, ValueError):
    """Generation settings that make no sense (negative top_k, top_p outside (0, 1], ...)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (not part of the returned text)
    min_new_tokens: int = 0  # stop ids are ignored before this many tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def validate(self) -> "GenerationConfig":
        if int(self.max_new_tokens) < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")
        if self.temperature < 0 or not np.isfinite(self.temperature):
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 = off), not "
                                  f"{self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if any(not isinstance(s, str) for s in self.stop):
            raise GenerationError("stop must be a list of strings")
        return self

    @classmethod
    def from_defaults(cls, defaults: dict[str, Any], **overrides: Any) -> "GenerationConfig":
        """Bundle defaults (generation_config.json) overridden by the non-None ``overrides``."""
        base = cls()
        d = defaults or {}
        if "max_new_tokens" in d:
            base.max_new_tokens = int(d["max_new_tokens"])
        if d.get("do_sample") is False:
            base.temperature = 0.0
        elif "temperature" in d:
            base.temperature = float(d["temperature"])
        if "top_p" in d and d["top_p"] is not None:
            base.top_p = float(d["top_p"]) or 1.0
        if "top_k" in d and d["top_k"] is not None:
            base.top_k = int(d["top_k"])
        if "repetition_penalty" in d and d["repetition_penalty"] is not None:
            base.repetition_penalty = float(d["repetition_penalty"])
        given = {k: v for k, v in overrides.items() if v is not None}
        if "stop" in given and isinstance(given["stop"], str):
            given["stop"] = (given["stop"],)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        return replace(base, **given).validate()


class Sampler:
    """Next-token choice for one row. ``n_vocab``: real vocabulary size (ids above are padding)."""

    _CANDIDATES = 1024  # top-p works on the top candidates when they hold enough mass

    def __init__(self, cfg: GenerationConfig, n_vocab: int, context_ids: Sequence[int] = (),
                 suppress: Sequence[int] = ()):
        self.cfg = cfg
        self.n_vocab = int(n_vocab)
        self.suppress = np.asarray(sorted(set(int(i) for i in suppress if 0 <= i < n_vocab)),
                                   np.int64)
        self._suppress_set = frozenset(self.suppress.tolist())
        self.rng = np.random.default_rng(cfg.seed)
        self.penalty = cfg.repetition_penalty != 1.0
        self._fast = cfg.greedy and not self.penalty
        self.seen = np.zeros(self.n_vocab, bool) if self.penalty else None
        if self.penalty:
            ids = np.asarray(list(context_ids), np.int64)
            self.seen[ids[(ids >= 0) & (ids < self.n_vocab)]] = True

    def observe(self, tok: int) -> None:
        if self.seen is not None and 0 <= tok < self.n_vocab:
            self.seen[tok] = True

    def __call__(self, logits: np.ndarray) -> int:
        x = logits[:self.n_vocab]
        if self._fast:  # plain greedy: one argmax (the per-token hot path)
            tok = int(x.argmax())
            if tok not in self._suppress_set:
                return tok
        cfg = self.cfg
        if self.penalty:
            x = x.astype(np.float32, copy=True)
            s = x[self.seen]
            x[self.seen] = np.where(s < 0, s * cfg.repetition_penalty, s / cfg.repetition_penalty)
        if cfg.greedy:
            tok = int(x.argmax())
            if tok not in self._suppress_set:
                return tok
            x = x.astype(np.float32, copy=True)
            x[self.suppress] = -np.inf
            return int(np.argmax(x))
        x = x.astype(np.float64) / cfg.temperature
        if self.suppress.size:
            x[self.suppress] = -np.inf
        idx = None
        if cfg.top_k and cfg.top_k < x.size:
            idx = np.argpartition(x, -cfg.top_k)[-cfg.top_k:]
        m = x.max()
        if idx is not None:
            cand = idx
            z = np.exp(x[idx] - m)
            total = z.sum()
        else:
            e = np.exp(x - m)
            total = e.sum()
            if cfg.top_p < 1.0 and x.size > self._CANDIDATES:
                cand = np.argpartition(x, -self._CANDIDATES)[-self._CANDIDATES:]
                z = e[cand]
                if z.sum() / total < cfg.top_p:  # the tail matters: use everything
                    cand, z = np.arange(x.size), e
            else:
                cand, z = np.arange(x.size), e
        p = z / total
        if cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            ps = p[order]
            keep = np.cumsum(ps) - ps < cfg.top_p  # HF: keep the token that crosses top_p
            cand, p = cand[order][keep], ps[keep]
        p = p / p.sum()
        r = self.rng.random()
        j = int(np.searchsorted(np.cumsum(p), r, side="right"))
        return int(cand[min(j, len(cand) - 1)])


class TextStream:
    """Token ids -> text pieces; catches stop strings across token boundaries.

    ``decoder`` is the tokenizer's ``StreamDecoder`` (``feed(id) -> str``, ``flush() -> str``).
    """

    def __init__(self, decoder: Any, stop: Sequence[str] = ()):
        self.decoder = decoder
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, tok: int) -> str:
        if not self.stop:  # hot path: every completed character goes out at once
            piece = self.decoder.feed(tok)
            if piece:
                self.text += piece
                self.emitted += len(piece)
            return piece
        before = len(self.text)
        self.text += self.decoder.feed(tok)
        if self.stop:
            start = max(0, before - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._emit(len(self.text))
            return self._emit(len(self.text) - self.hold)
        return self._emit(len(self.text))

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
            if self.stop:
                hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self.stopped = True
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece


@dataclass
class DecodeState:
    """What the loop did: generated ids, why it stopped, per-token times (seconds)."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"
    step_s: list[float] = field(default_factory=list)


def next_token(logits: np.ndarray, sampler: Callable[[np.ndarray], int],
               stop_ids: frozenset[int] | set[int], cfg: GenerationConfig,
               state: DecodeState) -> int | None:
    """One row's decode step: sample from ``logits`` and record the token in ``state``.

    Returns the token, or None when it is a stop id (past ``min_new_tokens``; it is not recorded
    and ``state.finish_reason`` becomes ``stop``). The caller feeds the token back while
    ``len(state.tokens) < cfg.max_new_tokens``. ``sampler`` is any ``logits -> id`` callable (a
    :class:`Sampler`, or a torch sampler for the reference); an ``observe(tok)`` method, when it
    has one, sees each recorded token (repetition penalty).
    """
    tok = sampler(logits)
    if tok in stop_ids and len(state.tokens) >= cfg.min_new_tokens:
        state.finish_reason = "stop"
        return None
    state.tokens.append(tok)
    observe = getattr(sampler, "observe", None)
    if observe is not None:
        observe(tok)
    return tok


def decode_tokens(forward: Callable[[int], np.ndarray], logits: np.ndarray,
                  sampler: Callable[[np.ndarray], int], stop_ids: frozenset[int] | set[int],
                  cfg: GenerationConfig, state: DecodeState,
                  lock: AbstractContextManager | None = None) -> Iterator[int]:
    """The decode loop of every caller (runtime, validation, exporter checks, the reference).

    Yields new token ids. ``forward(tok)`` feeds one token and returns the next logits ``[V]``.
    The token that hits a stop id is not yielded and not fed; the last yielded token is not fed
    either (its logits would not be used), so the cache ends with the tokens before it.
    ``state.step_s[i]`` is the wall time of the forward that produced token ``i+1``.
    """
    lock = lock or nullcontext()
    n = int(cfg.max_new_tokens)
    step_s, clock = state.step_s, time.perf_counter
    state.finish_reason = "length"
    for step in range(n):
        tok = next_token(logits, sampler, stop_ids, cfg, state)
        if tok is None:
            return
        yield tok
        if step + 1 == n:
            return
        t = clock()
        with lock:
            logits = forward(tok)
        step_s.append(clock() - t)
