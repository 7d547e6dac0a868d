"""The public runtime: ``Pipeline.from_bundle(dir).chat(prompt, images=[...])``.

Images -> preprocess -> vision engine -> features spliced into the prompt (prompt-table ids) ->
decoder prefill -> KV decode loop -> streamed text -> grounding boxes in original-image pixels.
Imports only numpy, onnxruntime, tiktoken, Pillow and this package.

* :meth:`Pipeline.chat` returns a :class:`ChatStream`: iterate it for text pieces, call
  ``.result()`` for the :class:`ChatResult` (text, token ids, boxes, timings). Bad input (prompt
  longer than the context, unreadable image, bad settings) raises at the call, before any engine
  runs; the pipeline stays usable.
* Multi-turn: ``conv = pipeline.conversation()``; ``conv.chat(...)`` (or ``pipeline.chat(...,
  history=conv)``) keeps the KV cache of the previous turns and prefills only the new tokens.
  A plain list of :class:`~runtime.prompt.Turn` as ``history`` recomputes everything.
* :meth:`Pipeline.chat_batch` runs independent requests as one left-padded batch (an ``unpadded``
  decoder, runtime/contract.py, refuses prompts of different lengths with one line).
* Threads: engine runs are serialised by one lock, taken per engine call (vision, prefill, each
  decode step), so concurrent streams interleave step by step and an abandoned stream never
  blocks the others. Each stream owns its KV cache.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import bundle as _bundle
from .bundle import BundleError, Manifest
from .errors import ContextLengthError, EdgeError
from .contract import ContractError, PromptTable
from .engines import (CUDA, TRT_EP, DecoderEngine, EngineError, EngineSlot, Features, KVCache,
                      TrtVisionEngine, VisionEngine, ort_providers, pick_providers)
from .generate import (DecodeState, GenerationConfig, GenerationError, Sampler, TextStream,
                       decode_tokens, next_token)
from .grounding import GroundedBox, parse_grounding
from .image import DEFAULT_MAX_PIXELS, ImageSource, load_image, preprocess
from .prompt import DEFAULT_SYSTEM, PromptError, Query, Turn, build_chat_ids, build_raw_ids
from .tokenizer import QwenTokenizer, StreamDecoder

log = logging.getLogger(__name__)


class ConversationBusyError(EdgeError, RuntimeError):
    """A conversation used by two streams at once."""


@dataclass
class ChatResult:
    """A finished reply.

    ``text``: the reply (special tokens it contains, e.g. grounding tags, as text; stop strings
    cut off). ``token_ids``: the generated ids without the stop id. ``boxes``: grounding boxes,
    ``pixels`` in the original pixels of the last image of the conversation. ``timings`` (s):
    ``preprocess_s`` (load + resize), ``vision_s``, ``prefill_s`` (+ ``prefill_tokens``),
    ``ttft_s`` (call to first token), ``decode_s`` (wall time between consecutive tokens as the
    consumer sees them), ``decode_ms_per_token`` (their mean), ``decode_engine_s`` (decoder runs
    alone), ``new_tokens``; in low-memory mode also ``vision_load_s`` / ``decoder_load_s`` when
    the engine was loaded for this reply (not counted in ``vision_s``).
    """

    text: str
    token_ids: list[int]
    boxes: list[GroundedBox]
    timings: dict[str, Any]
    finish_reason: str = "stop"  # stop | length | stop_string
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose KV came from the conversation's cache
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["boxes"] = [asdict(b) for b in self.boxes]
        return d


@dataclass
class ChatRequest:
    """One request of :meth:`Pipeline.chat_batch` (``generation``: per-request overrides)."""

    prompt: Query
    images: Sequence[ImageSource] = ()
    history: Sequence[Turn] = ()
    system: str | None = None
    generation: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Prepared:
    ids: list[int]  # full prompt ids from scratch (raw ids, <imgpad> in image slots)
    turns: list[Turn]
    n_new_images: int
    pixels: np.ndarray  # [n_new, 3, S, S]
    sizes: list[tuple[int, int]]  # (W, H) of the new images
    gen: GenerationConfig
    timings: dict[str, Any]


class Conversation:
    """A multi-turn chat that keeps its KV cache between turns (one turn at a time)."""

    def __init__(self, pipeline: "Pipeline", system: str | None = None):
        self.pipeline = pipeline
        self.system = pipeline.default_system if system is None else system
        self.turns: list[Turn] = []
        self.image_sizes: list[tuple[int, int]] = []
        self.features: list[Features] = []  # one per image, conversation order
        self.cache: KVCache | None = None
        self.cache_ids: list[int] = []  # id at each physical cache slot (-1: dropped)
        self._busy = threading.Lock()

    def chat(self, prompt: Query, images: Sequence[ImageSource] = (), **kwargs: Any) -> "ChatStream":
        return self.pipeline.chat(prompt, images, history=self, **kwargs)

    @property
    def cached_tokens(self) -> int:
        return sum(1 for i in self.cache_ids if i >= 0)

    def _hold(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise ConversationBusyError("this Conversation is generating a reply: finish or close "
                                        "that stream first")

    def reset(self) -> None:
        """Forget every turn (the KV buffers are kept for the next turn)."""
        self._hold()
        try:
            self.turns, self.image_sizes, self.features, self.cache_ids = [], [], [], []
            if self.cache is not None:
                self.cache.reset()
        finally:
            self._busy.release()

    def close(self) -> None:
        """Give the KV buffers back to the pipeline's pool (the turns are kept; a later turn
        recomputes them)."""
        self._hold()
        try:
            if self.cache is not None:
                self.pipeline._release(self.cache)
            self.cache, self.cache_ids = None, []
        finally:
            self._busy.release()


class ChatStream:
    """Iterate for text pieces (they join to ``result().text``); ``result()`` finishes the reply."""

    def __init__(self, gen: Generator[str, None, ChatResult]):
        self._gen = gen
        self._result: ChatResult | None = None
        self._pieces: list[str] = []

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        try:
            piece = next(self._gen)
        except StopIteration as stop:
            if stop.value is not None:
                self._result = stop.value
            raise
        self._pieces.append(piece)
        return piece

    def result(self) -> ChatResult:
        for _ in self:
            pass
        if self._result is None:
            raise RuntimeError("this stream was closed before it finished: no result")
        return self._result

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return "".join(self._pieces)

    def close(self) -> None:
        """Stop generating (the KV cache is released)."""
        self._gen.close()

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _image_list(images: Any) -> list[ImageSource]:
    """``images`` as a list; one image (a path, bytes, a PIL image, an array) is refused with the
    fix instead of being iterated (a path string would become one "image" per character)."""
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray, np.ndarray)) or hasattr(images, "getpixel"):
        raise PromptError(f"images must be a list of images, got one {type(images).__name__}: "
                          f"pass images=[...] (e.g. images=[{_short(images)}])")
    try:
        return list(images)
    except TypeError:
        raise PromptError(f"images must be a list of images, got {type(images).__name__}") from None


def _short(x: Any) -> str:
    return repr(str(x)) if isinstance(x, (str, Path)) else "image"


#: Memory-plan modes (exporters/memory_plan.py, recorded in the manifest) in which both engines do
#: not fit together on the bundle's device profile.
LOW_MEMORY_MODES = ("sequential", "does not fit")


def plan_wants_low_memory(man: Manifest) -> bool:
    """True when the manifest's memory plan says both engines do not fit together on the
    bundle's device profile (a bundle without a plan, e.g. from ``build_bundle``: False)."""
    plan = man.data.get("memory_plan")
    return isinstance(plan, dict) and plan.get("mode") in LOW_MEMORY_MODES


class Pipeline:
    """Vision + decoder engines, tokenizer and the generation loop of one bundle."""

    def __init__(self, manifest: Manifest, tokenizer: QwenTokenizer, vision: Any,
                 decoder: DecoderEngine | EngineSlot, providers: list[str],
                 max_pixels: int = DEFAULT_MAX_PIXELS, kv_capacity: int | None = None,
                 low_memory: bool = False):
        """``vision`` / ``decoder``: engines, or :class:`~runtime.engines.EngineSlot` loaders
        (loaded on first use). ``low_memory``: release the vision engine after every encode (it
        needs a loader)."""
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.providers = providers
        self.max_pixels = int(max_pixels)
        m = manifest.model
        self.vocab_size = int(m["vocab_size"])
        self.n_vocab = int(m.get("n_vocab", tokenizer.n_vocab))
        self.n_queries = int(m["n_queries"])
        self.image_size = int(m["image_size"])
        self.max_context = manifest.max_context
        self.kv_capacity = min(int(kv_capacity or self.max_context), self.max_context)
        self.chat_format = str(manifest.data.get("chat_format", "chatml"))
        self.default_system = DEFAULT_SYSTEM
        self.generation_defaults = dict(manifest.generation)
        tok = tokenizer
        special = manifest.special_ids
        mine = {"eod": tok.eod_id, "im_start": tok.im_start_id, "im_end": tok.im_end_id,
                "img_start": tok.img_start_id, "img_end": tok.img_end_id,
                "img_pad": tok.img_pad_id}
        wrong = {k: (v, mine[k]) for k, v in special.items() if k in mine and mine[k] != v}
        if wrong:
            raise BundleError(f"{manifest.file('tokenizer/qwen.tiktoken')} does not match the "
                              f"manifest's special ids {wrong}: re-export the bundle")
        self._vision = self._slot(vision, self._check_vision)
        self._decoder = self._slot(decoder, self._check_decoder)
        if low_memory and self._vision.loader is None:
            raise ValueError("low_memory needs a vision engine the pipeline can reload: use "
                             "Pipeline.from_bundle(..., low_memory=True)")
        self.low_memory = bool(low_memory)
        self.prompt_table = PromptTable(self.vocab_size, tok.img_start_id, tok.img_end_id,
                                        tok.img_pad_id, self.n_queries)
        self.stop_ids = frozenset({tok.eod_id} if self.chat_format == "raw"
                                  else {tok.eod_id, tok.im_start_id, tok.im_end_id})
        self.suppress_ids = (tok.img_start_id, tok.img_end_id, tok.img_pad_id)
        self._lock = threading.Lock()  # serialises engine runs
        self._pool_lock = threading.Lock()
        self._caches: weakref.WeakSet[KVCache] = weakref.WeakSet()
        self._pool: list[KVCache] = []
        self.max_pool = 2

    @staticmethod
    def _slot(engine: Any, check: Any) -> EngineSlot:
        slot = engine if isinstance(engine, EngineSlot) else EngineSlot(engine=engine)
        slot.check = check
        if slot.engine is not None:
            check(slot.engine)
        return slot

    def _check_engine(self, name: str, eng: Any, facts: tuple[tuple[str, int], ...]) -> None:
        for attr, want in facts:
            got = getattr(eng, attr, None)
            if got is not None and got != want:
                raise BundleError(f"{eng.path}: the {name} engine has {attr} {got} but the "
                                  f"manifest says {want}: re-export the bundle")

    def _check_vision(self, eng: Any) -> None:
        self._check_engine("vision", eng, (("n_queries", self.n_queries),
                                           ("hidden", int(self.manifest.model["hidden"]))))

    def _check_decoder(self, eng: DecoderEngine) -> None:
        m = self.manifest.model
        self._check_engine("decoder", eng, (("hidden", int(m["hidden"])),
                                            ("layers", int(m["layers"]))))
        if eng.vocab_size != self.vocab_size:
            raise BundleError(f"{eng.path} has {eng.vocab_size} logits but the manifest says "
                              f"vocab_size {self.vocab_size}: re-export the bundle")

    @property
    def vision(self) -> Any:
        """The vision engine (loaded now if it is not resident)."""
        return self._vision.get()

    @property
    def decoder(self) -> DecoderEngine:
        """The decoder engine (loaded now if it is not resident)."""
        return self._decoder.get()

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "auto", threads: int | None = None,
                    verify: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                    kv_capacity: int | None = None, low_memory: bool | None = None) -> "Pipeline":
        """Verify and load a bundle.

        ``device``: ``auto`` (CUDA when onnxruntime-gpu has it, else CPU), ``cpu``, ``cuda``, or
        ``tensorrt`` (CUDA plus the bundle's TensorRT vision plan, refused if there is none for
        this GPU/TensorRT). ``verify=False`` skips the sha256 pass (sizes are still checked).
        ``threads``: onnxruntime intra-op threads (CPU). ``kv_capacity``: tokens per KV cache
        (default: the model's max context). ``low_memory``: one engine resident at a time — the
        engines load on first use and the vision engine is released after every encode (reloaded
        per request with images); ``None`` (default) turns it on when the bundle's memory plan
        says both engines do not fit together on its device profile (:func:`plan_wants_low_memory`).
        """
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                    or threads < 1):
            raise ValueError(f"threads must be a positive integer (or None for all cores), not "
                             f"{threads!r}")
        man = _bundle.verify_bundle(path, checksums=verify)
        providers = pick_providers(device)
        tok = QwenTokenizer.from_file(man.file("tokenizer/qwen.tiktoken"))
        low = plan_wants_low_memory(man) if low_memory is None else bool(low_memory)
        vision = EngineSlot(partial(cls._open_vision, man, providers, threads, device, low))
        decoder = EngineSlot(partial(DecoderEngine, man.file(man.engines.get("decoder", {}).get(
            "file", "decoder.onnx")), providers, threads, vocab_size=int(man.model["vocab_size"])))
        pipe = cls(man, tok, vision, decoder, providers, max_pixels, kv_capacity, low_memory=low)
        if low:
            log.info("low-memory mode: one engine resident at a time (the vision engine is "
                     "reloaded for every request with images)")
        else:
            pipe._vision.get()
            pipe._decoder.get()
        return pipe

    @classmethod
    def _open_vision(cls, man: Manifest, providers: list[str], threads: int | None,
                     device: str, low_memory: bool = False) -> Any:
        """The bundle's vision engine: its TensorRT plan when that applies, else the ONNX one
        (without onnxruntime's CPU memory arena in low-memory mode, so that a released engine
        gives its run's memory back)."""
        vision = None
        if (providers[0] == CUDA and man.trt_plans()) or device == "tensorrt":
            vision = cls._trt_vision(man, device == "tensorrt", threads)
        if vision is None:
            vision = VisionEngine(man.file(man.engines.get("vision", {}).get("file", "vision.onnx")),
                                  providers, threads, int(man.model["n_queries"]),
                                  int(man.model["hidden"]), mem_arena=not low_memory)
        return vision

    @staticmethod
    def _trt_vision(man: Manifest, required: bool, threads: int | None) -> Any:
        """The bundle's TensorRT plan when it fits this GPU/TensorRT; else, when TensorRT was
        asked for, onnxruntime's TensorRT provider on the ONNX vision engine (engine cache in
        ``$QWENVL_EDGE_CACHE/trt``); else None (the ONNX engine on CUDA/CPU is used)."""
        try:
            import tensorrt as trt  # noqa: PLC0415 - optional
            version = trt.__version__
        except ImportError:
            version = None
        has_ep = TRT_EP in ort_providers()
        plan = _bundle.select_trt_plan(man, "vision", version, _bundle.gpu_name(),
                                       required and not has_ep)
        m = man.model
        if plan is not None:
            try:
                return TrtVisionEngine(plan, int(m["n_queries"]), int(m["hidden"]))
            except EngineError:
                if required and not has_ep:
                    raise
                log.warning("TensorRT plan %s did not load; using the ONNX vision engine", plan)
        if required and has_ep:
            cache = Path(os.environ.get("QWENVL_EDGE_CACHE",
                                        Path.home() / ".cache" / "qwenvl-edge")) / "trt"
            cache.mkdir(parents=True, exist_ok=True)
            opts = {"trt_fp16_enable": man.data.get("vision_precision", "fp16") == "fp16",
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)}
            return VisionEngine(man.file(man.engines.get("vision", {}).get("file", "vision.onnx")),
                                [(TRT_EP, opts), CUDA, "CPUExecutionProvider"], threads,
                                int(m["n_queries"]), int(m["hidden"]))
        return None

    @property
    def device(self) -> str:
        if self._decoder.loaded:
            return self._decoder.engine.device
        return "cuda" if self.providers[0] == CUDA else "cpu"

    def conversation(self, system: str | None = None) -> Conversation:
        return Conversation(self, system)

    # ---- KV cache pool --------------------------------------------------------------------
    def _acquire(self) -> KVCache:
        with self._pool_lock:
            if self._pool:
                c = self._pool.pop()
                c.reset()
                return c
        return self._new_cache(1, self.kv_capacity)

    def _new_cache(self, batch: int, capacity: int) -> KVCache:
        cache = self.decoder.new_cache(batch, capacity)
        self._caches.add(cache)  # weakly: detached when the low-memory mode drops the decoder
        return cache

    def _release(self, cache: KVCache) -> None:
        if cache.batch != 1:
            return
        with self._pool_lock:
            if len(self._pool) < self.max_pool and all(c is not cache for c in self._pool):
                cache.reset()
                self._pool.append(cache)

    # ---- preparing a request (eager: errors raise at the call) ------------------------------
    def _generation(self, overrides: dict[str, Any]) -> GenerationConfig:
        try:
            return GenerationConfig.from_defaults(self.generation_defaults, **overrides)
        except TypeError as e:
            raise GenerationError(f"unknown generation setting: {e}") from None

    def _prepare(self, prompt: Query, images: Sequence[ImageSource] | None,
                 history: Sequence[Turn] | None, system: str | None, gen: GenerationConfig,
                 history_images_given: bool = True) -> _Prepared:
        t0 = time.perf_counter()
        images = _image_list(images)
        turns = list(history or ())
        for t in turns:
            if not isinstance(t, Turn):
                if isinstance(t, (tuple, list)) and len(t) in (2, 3):
                    continue
                raise PromptError(f"history items must be runtime.prompt.Turn(query, response, "
                                  f"n_images), got {type(t).__name__}")
        turns = [t if isinstance(t, Turn) else Turn(*t) for t in turns]
        n_hist = sum(t.n_images for t in turns) if history_images_given else 0
        if len(images) < n_hist:
            raise PromptError(f"the history turns hold {n_hist} image(s) but only {len(images)} "
                              "were given: pass the history's images first, then the new ones")
        n_new = len(images) - n_hist
        sys_text = self.default_system if system is None else system
        if self.chat_format == "raw":
            if turns:
                raise PromptError("this bundle's model is a base model (chat_format raw): it has "
                                  "no multi-turn chat; pass history=None")
            ids = build_raw_ids(self.tokenizer, prompt, n_new, self.n_queries)
        else:
            ids = build_chat_ids(self.tokenizer, prompt, n_new, turns, sys_text, self.n_queries)
        self._check_context(len(ids), gen.max_new_tokens)
        sizes, pixels = [], np.empty((len(images), 3, self.image_size, self.image_size), np.float32)
        for i, src in enumerate(images):
            img = load_image(src, self.max_pixels)
            sizes.append(img.size)
            pixels[i] = preprocess(img, self.image_size)
        timings = {"preprocess_s": time.perf_counter() - t0, "t0": t0}
        return _Prepared(ids, turns, n_new, pixels, sizes, gen, timings)

    def _check_context(self, n_prompt: int, max_new: int) -> None:
        total = n_prompt + int(max_new)
        if total > self.max_context:
            raise ContextLengthError(
                f"prompt of {n_prompt} tokens + max_new_tokens {max_new} = {total} tokens is "
                f"{total - self.max_context} over the model's context of {self.max_context}: "
                "shorten the prompt or history, use fewer images, or lower max_new_tokens")

    # ---- chat -----------------------------------------------------------------------------
    def chat(self, prompt: Query, images: Sequence[ImageSource] | None = None,
             history: Conversation | Sequence[Turn] | None = None, *, system: str | None = None,
             max_new_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, seed: int | None = None,
             stop: Sequence[str] | str | None = None, min_new_tokens: int | None = None) -> ChatStream:
        """Start a reply; returns a :class:`ChatStream` (iterate for text, ``.result()``).

        ``prompt``: text, or a list of text / :class:`~runtime.prompt.Ref` / ``Box`` parts (in
        text, typed grounding tags such as ``<ref>`` are special as in the original; ``<img>``,
        ``<|im_start|>`` and the other structural tags stay plain text).
        ``images``: paths, bytes, PIL images or uint8 arrays for this prompt — with a list
        ``history``, the history turns' images first. ``history``: a :class:`Conversation`
        (KV reuse, updated in place) or a list of ``Turn`` (recomputed). Unset generation
        settings come from the bundle (generation_config.json); ``temperature=0`` is greedy.
        """
        gen = self._generation(dict(max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, top_k=top_k,
                                    repetition_penalty=repetition_penalty, seed=seed, stop=stop,
                                    min_new_tokens=min_new_tokens))
        if isinstance(history, Conversation):
            conv = history
            if conv.pipeline is not self:
                raise ValueError("this Conversation belongs to another Pipeline")
            if system is not None and system != conv.system:
                raise PromptError("a Conversation keeps its system message: pass system= to "
                                  "pipeline.conversation(system=...) instead")
            if conv._busy.locked():
                raise ConversationBusyError("this Conversation is already generating a reply: "
                                            "finish or close that stream first")
            turns, sys_text = list(conv.turns), conv.system
            # the history's images are already in the conversation: images = the new ones
            prep = self._prepare(prompt, images, turns, sys_text, gen, history_images_given=False)
        else:
            conv = None
            prep = self._prepare(prompt, images, history, system, gen)
        return ChatStream(self._run(prompt, prep, conv))

    def _encode(self, pixels: np.ndarray, tim: dict[str, Any]) -> Features | None:
        """Features of ``pixels``; in low-memory mode the decoder is released first, the vision
        engine loaded for this call and released after it (``tim["vision_load_s"]``: the
        reload; the decoder's reload is ``tim["decoder_load_s"]``)."""
        if len(pixels) == 0:
            return None
        slot = self._vision
        with self._lock:
            if self.low_memory:
                self._release_decoder()
            loads = slot.loads
            engine = slot.get()
            if slot.loads != loads:
                tim["vision_load_s"] = slot.load_s
            try:
                return engine.encode(pixels)
            finally:
                del engine
                if self.low_memory:
                    slot.release()

    def _release_decoder(self) -> None:
        """One engine resident at a time: the planner's sequential peak counts the vision engine
        without the decoder, so a decoder an earlier request left goes before the vision engine
        loads. Every KV cache lets go of its session (they keep their tokens and attach to the
        reloaded decoder); callers hold ``_lock``, under which every engine run happens."""
        if not self._decoder.loaded or self._decoder.loader is None:
            return
        for cache in list(self._caches):
            cache.detach()
        self._decoder.release()

    def _load_decoder(self, tim: dict[str, Any]) -> None:
        """Load the decoder if it is not resident (low-memory mode: after the vision engine was
        released), recording ``tim["decoder_load_s"]``."""
        slot = self._decoder
        if not slot.loaded:
            slot.get()
            tim["decoder_load_s"] = slot.load_s

    def _table(self, ids: list[int], start: int, features: list[Features],
               first_row: int = 0) -> tuple[np.ndarray, Features | None]:
        """Prompt-table ids for ``ids[start:]`` (the engine contract's rule) and the features
        they address."""
        try:
            n_spans = len(self.prompt_table.spans(ids))
            if n_spans != len(features):
                raise PromptError(f"the prompt has {n_spans} image span(s) but {len(features)} "
                                  "image(s) were given")
            out, used = self.prompt_table.table_ids(ids, start, first_row)
        except ContractError as e:
            raise PromptError(f"{e}; build prompts with build_chat_ids") from None
        parts = [features[k] for k in used]
        return out, (Features.concat(parts) if parts else None)

    def _run(self, prompt: Query, prep: _Prepared,
             conv: Conversation | None) -> Generator[str, None, ChatResult]:
        tim = prep.timings
        if conv is not None:
            conv._hold()
        cache: KVCache | None = None
        try:
            t = time.perf_counter()
            new_feats = self._encode(prep.pixels, tim)
            tim["vision_s"] = time.perf_counter() - t - tim.get("vision_load_s", 0.0)
            self._load_decoder(tim)
            split = [] if new_feats is None else new_feats.split()
            cache, features, reused = self._cache_for(conv, prep, split)
            cache_ids = conv.cache_ids if conv is not None else []
            logits = self._prefill(cache, cache_ids, prep.ids, reused, features, tim)
            state = DecodeState()
            stream = TextStream(StreamDecoder(self.tokenizer), prep.gen.stop)
            arrivals: list[float] = []
            yield from self._stream(cache, cache_ids, logits, prep, state, stream, arrivals)
            sizes = prep.sizes if conv is None else conv.image_sizes + prep.sizes
            tim["ttft_s"] = (arrivals[0] if arrivals else time.perf_counter()) - tim.pop("t0")
            _decode_timings(tim, arrivals, state.step_s)
            tim["new_tokens"] = len(state.tokens)
            result = ChatResult(stream.text, list(state.tokens), parse_grounding(stream.text, sizes),
                                tim, state.finish_reason, len(prep.ids), reused, list(sizes))
            if conv is not None:
                conv.turns.append(Turn(prompt, list(state.tokens), prep.n_new_images))
                conv.features.extend(split)
                conv.image_sizes.extend(prep.sizes)
            return result
        finally:
            if conv is None:
                if cache is not None:
                    self._release(cache)
            else:
                conv._busy.release()

    def _cache_for(self, conv: Conversation | None, prep: _Prepared,
                   split: list[Features]) -> tuple[KVCache, list[Features], int]:
        """The KV cache of this reply, every image's features in prompt order, and how many
        prompt tokens the cache already holds."""
        if conv is None:
            return self._acquire(), split, 0
        if conv.cache is None:
            conv.cache = self._acquire()
            conv.cache_ids = []
        reused = self._reuse(conv, prep.ids, prep.gen.max_new_tokens)
        return conv.cache, conv.features + split, reused

    def _prefill(self, cache: KVCache, cache_ids: list[int], ids: list[int], reused: int,
                 features: list[Features], tim: dict[str, Any]) -> np.ndarray:
        table_ids, table = self._table(ids, reused, features)
        t = time.perf_counter()
        with self._lock:
            logits = self.decoder.forward(cache, table_ids[None], features=table)[0]
        cache_ids.extend(ids[reused:])
        tim["prefill_s"] = time.perf_counter() - t
        tim["prefill_tokens"] = len(ids) - reused
        return logits

    def _sampler(self, prep: _Prepared) -> Sampler:
        history_ids = prep.ids if prep.gen.repetition_penalty != 1.0 else ()
        return Sampler(prep.gen, self.n_vocab, history_ids, self.suppress_ids)

    def _stream(self, cache: KVCache, cache_ids: list[int], logits: np.ndarray, prep: _Prepared,
                state: DecodeState, stream: TextStream,
                arrivals: list[float]) -> Generator[str, None, None]:
        """Text pieces of the reply: the one decode loop (:func:`decode_tokens`) on ``cache``."""
        tok_arr = np.zeros((1, 1), np.int64)

        def forward(tok: int) -> np.ndarray:
            tok_arr[0, 0] = tok
            # the engine is looked up every step: another request may have released it
            out = self.decoder.forward(cache, tok_arr)[0]
            cache_ids.append(tok)
            return out

        for tok in decode_tokens(forward, logits, self._sampler(prep), self.stop_ids, prep.gen,
                                 state, self._lock):
            arrivals.append(time.perf_counter())
            piece = stream.push(tok)
            if piece:
                yield piece
            if stream.stopped:
                state.finish_reason = "stop_string"
                break
        piece = stream.finish()
        if piece:
            yield piece

    # ---- batch ----------------------------------------------------------------------------
    def chat_batch(self, requests: Sequence[ChatRequest | dict[str, Any] | str],
                   **generation: Any) -> list[ChatResult]:
        """Independent requests as one left-padded batch (one vision call, one prefill, one
        decode step per token for all rows). ``generation``: settings for all requests;
        ``ChatRequest.generation`` overrides them per request. Returns results in order.
        """
        reqs = [ChatRequest(r) if isinstance(r, str) else
                ChatRequest(**r) if isinstance(r, dict) else r for r in requests]
        if not reqs:
            return []
        preps = []
        for r in reqs:
            gen = self._generation({**generation, **(r.generation or {})})
            preps.append(self._prepare(r.prompt, r.images, r.history, r.system, gen))
        t0 = min(p.timings["t0"] for p in preps)
        cache, logits, shared = self._batch_prefill(preps)
        rows = [_Row(self._sampler(p), TextStream(StreamDecoder(self.tokenizer), p.gen.stop),
                     DecodeState()) for p in preps]
        steps = self._batch_decode(cache, logits, preps, rows)
        results = []
        for p, row in zip(preps, rows):
            row.stream.finish()
            text, tokens = row.stream.text, row.state.tokens
            tim = {"preprocess_s": p.timings["preprocess_s"], **shared,
                   "ttft_s": (row.arrivals[0] if row.arrivals else time.perf_counter()) - t0,
                   "new_tokens": len(tokens), "batch": len(preps)}
            _decode_timings(tim, row.arrivals, steps[:max(len(tokens) - 1, 0)])
            results.append(ChatResult(text, tokens, parse_grounding(text, p.sizes), tim,
                                      row.state.finish_reason, len(p.ids), 0, list(p.sizes)))
        return results

    def _batch_prefill(self, preps: list[_Prepared]) -> tuple[KVCache, np.ndarray, dict[str, Any]]:
        """One vision call and one left-padded prefill for all requests."""
        t = time.perf_counter()
        loads: dict[str, Any] = {}
        feats = self._encode(np.concatenate([p.pixels for p in preps]), loads)
        vision_s = time.perf_counter() - t - loads.get("vision_load_s", 0.0)
        self._load_decoder(loads)
        per_image = [] if feats is None else feats.split()
        rows, k = [], 0
        for p in preps:
            n = len(p.pixels)
            rows.append(self._table(p.ids, 0, per_image[k:k + n], k * self.n_queries)[0])
            k += n
        table = Features.concat(per_image) if per_image else None
        width = max(len(r) for r in rows)
        max_new = max(p.gen.max_new_tokens for p in preps)
        input_ids = np.full((len(preps), width), self.tokenizer.eod_id, np.int64)
        mask = np.zeros((len(preps), width), np.int64)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        cache = self._new_cache(len(preps), width + max_new)
        t = time.perf_counter()
        with self._lock:
            logits = self.decoder.forward(cache, input_ids, mask, features=table)
        return cache, logits, {"vision_s": vision_s, "prefill_s": time.perf_counter() - t,
                               "prefill_tokens": int(mask.sum()), **loads}

    def _batch_decode(self, cache: KVCache, logits: np.ndarray, preps: list[_Prepared],
                      rows: list["_Row"]) -> list[float]:
        """Decode steps of the whole batch: each row's token from the decode core
        (:func:`next_token`); a finished row feeds a masked pad. Returns the step times."""
        b = len(preps)
        steps: list[float] = []
        step_ids = np.zeros((b, 1), np.int64)
        step_mask = np.zeros((b, 1), np.int64)
        for _ in range(max(p.gen.max_new_tokens for p in preps)):
            for i, (p, row) in enumerate(zip(preps, rows)):
                step_ids[i, 0], step_mask[i, 0] = self.tokenizer.eod_id, 0
                if row.done:
                    continue
                tok = next_token(logits[i], row.sampler, self.stop_ids, p.gen, row.state)
                if tok is None:
                    row.done = True
                    continue
                row.arrivals.append(time.perf_counter())
                row.stream.push(tok)
                if row.stream.stopped:
                    row.done, row.state.finish_reason = True, "stop_string"
                elif len(row.state.tokens) >= p.gen.max_new_tokens:
                    row.done, row.state.finish_reason = True, "length"
                else:
                    step_ids[i, 0], step_mask[i, 0] = tok, 1
            if all(r.done for r in rows):
                break
            t = time.perf_counter()
            with self._lock:
                logits = self.decoder.forward(cache, step_ids, step_mask)
            steps.append(time.perf_counter() - t)
        return steps

    def _reuse(self, conv: Conversation, ids: list[int], max_new: int) -> int:
        """Prefix of ``ids`` already in ``conv``'s cache; drops cached tokens after it (masked,
        or cut off on an ``unpadded`` engine, which cannot mask)."""
        cache = conv.cache
        live = [(p, t) for p, t in enumerate(conv.cache_ids) if t >= 0]
        k = 0
        for (_, t), want in zip(live, ids):
            if t != want:
                break
            k += 1
        k = min(k, len(ids) - 1)  # at least one token to prefill (its logits start the reply)
        if cache.length + (len(ids) - k) + max_new > cache.capacity or k == 0:
            cache.reset()
            conv.cache_ids.clear()
            return 0
        if k < len(live):
            first_dead = live[k][0]
            if not self.decoder.contract.masks_keys:  # unpadded engine: rewind instead of masking
                self.decoder.truncate(cache, first_dead)
                del conv.cache_ids[first_dead:]
                return k
            self.decoder.mask_out(cache, first_dead)
            for p in range(first_dead, len(conv.cache_ids)):
                conv.cache_ids[p] = -1
        return k


@dataclass
class _Row:
    """One request's decoding inside :meth:`Pipeline.chat_batch`."""

    sampler: Sampler
    stream: TextStream
    state: DecodeState
    arrivals: list[float] = field(default_factory=list)
    done: bool = False


def _decode_timings(tim: dict[str, Any], arrivals: list[float], forward_s: list[float]) -> None:
    """``decode_s``: wall time between consecutive tokens (everything included: engine,
    sampling, detokenising, the consumer); ``decode_engine_s``: the decoder runs alone."""
    gaps = np.diff(arrivals).tolist() if len(arrivals) > 1 else []
    tim["decode_s"] = gaps
    tim["decode_ms_per_token"] = 1e3 * float(np.mean(gaps)) if gaps else None
    tim["decode_engine_s"] = list(forward_s)
