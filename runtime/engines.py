"""The vision and decoder engines behind one small interface (onnxruntime; TensorRT plan optional).

Providers: CUDA when onnxruntime-gpu offers ``CUDAExecutionProvider`` (``device="auto"|"cuda"``),
else the CPU. The vision engine may instead run a prebuilt TensorRT plan when ``tensorrt`` is
importable and the bundle holds a plan for this GPU and TensorRT version.

No wasted copies:

* the KV cache lives in flat buffers allocated once per :class:`KVCache` (numpy on the CPU,
  ``OrtValue`` on the GPU) and never leaves the device. A ``concat``-layout decoder
  (MultiHeadAttention) concatenates ``past [B,H,P,D]`` with the new keys into
  ``present [B,H,P+S,D]``; both are bound by pointer to the front of two ping-pong buffers (past
  from one, present into the other), so a step allocates nothing and copies nothing besides the
  graph's own concatenation. A ``shared``-layout decoder (GroupQueryAttention) gets one buffer
  ``[B,H,capacity,D]`` per layer bound as both past and present and writes only the new keys;
* logits of a decode step go into a preallocated host array; a prefill asks an engine that has
  the ``logits_to_keep`` input for the last position's logits only (``[B, 1, V]``);
* the vision output stays where it was computed (a device ``OrtValue`` on CUDA) and is bound to
  the decoder's ``image_embeds`` input by pointer, reshaped ``[N,Q,H] -> [N*Q,H]`` for free.

Nothing here imports torch or onnx.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import EdgeError
from .contract import (ATTENTION_MASK, IMAGE_EMBEDS, INPUT_IDS, KV_LAYOUT_KEY, LOGITS,
                       LOGITS_TO_KEEP, PADDING_KEY, PIXEL_VALUES, ContractError, DecoderIO)

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
_ORT_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8}


class EngineError(EdgeError, RuntimeError):
    """An engine that cannot be created or run; the message says which file and what to do."""


def ort_providers() -> list[str]:
    return list(ort.get_available_providers())


def pick_providers(device: str = "auto") -> list[str]:
    """onnxruntime providers for ``device`` (``auto`` | ``cpu`` | ``cuda`` | ``tensorrt``)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device in ("cuda", "tensorrt"):
        if CUDA not in available:
            raise EngineError(f"device '{device}' asked for but onnxruntime offers only "
                              f"{', '.join(available)}: install onnxruntime-gpu (and its CUDA "
                              "libraries) or use device='cpu'")
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise EngineError(f"unknown device '{device}': use auto, cpu, cuda or tensorrt")


def session_options(threads: int | None = None, level: str = "all", mem_arena: bool = True,
                    profile_prefix: str | None = None,
                    priority_order: bool = False) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not mem_arena:
        so.enable_cpu_mem_arena = False
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if priority_order:
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return so


def open_session(path: Path, providers: list[Any], threads: int | None = None,
                 level: str = "all", *, mem_arena: bool = True,
                 profile_prefix: str | None = None,
                 priority_order: bool = False) -> ort.InferenceSession:
    """The one onnxruntime session factory (runtime, exporters' checks, validation, benchmarks).

    ``level``: graph optimisation all | extended | basic | disable (or none). ``providers``: names
    or ``(name, options)`` pairs. ``mem_arena=False`` returns CPU buffers after each run (fp16
    graphs on x86, whose fp32 weight casts otherwise stay allocated). ``profile_prefix`` turns on
    onnxruntime's node profiling (benchmarks). ``priority_order``: run each node as soon as its
    inputs exist (in onnxruntime's default order a graph's side outputs ran after its main path,
    so every tensor they read stayed alive: the int8 calibrator's graph, quant/vision_int8.py,
    bench/RESULTS.md). A file that does not load
    raises :class:`EngineError` with one line saying what to do.
    """
    try:
        so = session_options(threads, level, mem_arena, profile_prefix, priority_order)
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EngineError(f"cannot load {path}: {msg}; re-copy or re-export the bundle (or upgrade "
                          f"onnxruntime {ort.__version__})") from None


@dataclass
class IOInfo:
    name: str
    dtype: Any  # numpy dtype
    shape: list


def _io(args) -> dict[str, IOInfo]:
    return {a.name: IOInfo(a.name, _ORT_NP.get(a.type, np.float32), list(a.shape)) for a in args}


def decoder_contract(session: ort.InferenceSession, vocab_size: int | None = None) -> DecoderIO:
    """The decoder contract a session's inputs/outputs and KV-layout metadata state (raises
    ContractError if none)."""
    meta = session.get_modelmeta().custom_metadata_map
    return DecoderIO.from_io({a.name: (_ORT_NP.get(a.type, np.float32), a.shape)
                              for a in session.get_inputs()},
                             {a.name: (_ORT_NP.get(a.type, np.float32), a.shape)
                              for a in session.get_outputs()}, vocab_size,
                             meta.get(KV_LAYOUT_KEY, "concat"), meta.get(PADDING_KEY, "masked"))


def host_buffer(n: int, dtype) -> np.ndarray:
    """``n`` zeroed elements of fresh anonymous memory that refuses transparent huge pages.

    A KV buffer is written from the start of each head's slab (``[B, H, capacity, D]``), so
    with 4 KiB pages only the tokens used become resident. numpy asks for huge pages on large
    arrays, and one 2 MiB page spans several heads' slabs: the whole capacity became resident
    (full size, fp32 KV: 2.04 GB at 350 of 2048 tokens, bench/RESULTS.md) or not, depending on
    what the kernel had free."""
    dtype = np.dtype(dtype)
    buf = mmap.mmap(-1, max(int(n), 1) * dtype.itemsize)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere there is nothing to refuse
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, dtype)  # the array keeps the mapping alive


class DeviceBuffer:
    """A flat preallocated buffer on the engine's device (host memory without huge pages on
    CPU, an OrtValue on CUDA)."""

    def __init__(self, n: int, dtype, device: str):
        self.n, self.dtype, self.device = int(n), np.dtype(dtype), device
        if device == "cpu":
            self.array = host_buffer(self.n, self.dtype)
            self.ptr = self.array.ctypes.data
            self.ortvalue = None
        else:
            self.array = None
            self.ortvalue = ort.OrtValue.ortvalue_from_shape_and_type(
                [max(self.n, 1)], self.dtype.type, "cuda", 0)
            self.ptr = self.ortvalue.data_ptr()

    def view(self, shape) -> np.ndarray:
        """Host view of the first prod(shape) elements (CPU), or a host copy (CUDA)."""
        n = int(np.prod(shape))
        if self.array is not None:
            return self.array[:n].reshape(shape)
        return self.ortvalue.numpy()[:n].reshape(shape).copy()


class Features:
    """Vision features for the decoder, shape [N, Q, H]: a host array, or a slice of a device
    buffer (``offset`` elements in) that the decoder binds by pointer."""

    def __init__(self, shape: tuple[int, ...], array: np.ndarray | None = None,
                 buffer: DeviceBuffer | None = None, offset: int = 0):
        self.shape = tuple(int(s) for s in shape)
        self.array, self.buffer, self.offset = array, buffer, int(offset)

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1] if len(self.shape) == 3 else self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def ptr(self) -> int:
        return self.buffer.ptr + self.offset * self.buffer.dtype.itemsize

    def numpy(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        flat = self.buffer.view((self.offset + self.size,))
        return flat[self.offset:].reshape(self.shape)

    def split(self) -> list["Features"]:
        """One Features per image (views: no copy on the host or on the device)."""
        if self.shape[0] == 1:
            return [self]
        one = self.shape[1:]
        if self.array is not None:
            return [Features((1,) + one, self.array[i:i + 1]) for i in range(self.shape[0])]
        step = int(np.prod(one))
        return [Features((1,) + one, buffer=self.buffer, offset=self.offset + i * step)
                for i in range(self.shape[0])]

    @staticmethod
    def concat(parts: list["Features"]) -> "Features":
        """Concatenate along images: a view when the parts are consecutive slices of one device
        buffer (a fresh multi-image request), else a host concatenation."""
        if len(parts) == 1:
            return parts[0]
        shape = (sum(p.shape[0] for p in parts),) + parts[0].shape[1:]
        first = parts[0]
        if first.buffer is not None and all(
                p.buffer is first.buffer and p.offset == q.offset + q.size
                for q, p in zip(parts, parts[1:])):
            return Features(shape, buffer=first.buffer, offset=first.offset)
        if first.array is not None and first.array.base is not None and all(
                p.array is not None and p.array.base is first.array.base
                and _addr(p.array) == _addr(q.array) + q.array.nbytes
                for q, p in zip(parts, parts[1:])):  # consecutive views of one host array
            start = _addr(first.array)
            base = first.array.base
            if isinstance(base, np.ndarray) and base.flags.c_contiguous:
                flat = base.reshape(-1)
                i0 = (start - _addr(flat)) // flat.itemsize
                return Features(shape, flat[i0:i0 + int(np.prod(shape))].reshape(shape))
        return Features(shape, np.concatenate([p.numpy() for p in parts]))


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


# ---------------------------------------------------------------------------------------------
# Vision
# ---------------------------------------------------------------------------------------------

class VisionEngine:
    """pixels float32 [N,3,S,S] -> :class:`Features` [N, Q, hidden]."""

    input_name = PIXEL_VALUES
    output_name = IMAGE_EMBEDS
    kind = "onnxruntime"

    def __init__(self, path: Path, providers: list[Any], threads: int | None = None,
                 n_queries: int | None = None, hidden: int | None = None,
                 mem_arena: bool = True):
        """``mem_arena=False``: return the CPU buffers of a run when it ends (the low-memory
        mode: with the arena, the fp32 copies an fp16 graph makes on the CPU stay allocated and
        are not all returned to the OS when the session is dropped; bench/RESULTS.md)."""
        self.path = Path(path)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.device = "cuda" if names[0] in (CUDA, TRT_EP) else "cpu"
        # fp16 ViT graphs crash ORT's CPU fusions at ORT_ENABLE_ALL (a Conv -> LayerNorm fusion)
        self.session = open_session(self.path, providers, threads,
                                    "all" if self.device == "cuda" else "extended",
                                    mem_arena=mem_arena)
        ins, outs = _io(self.session.get_inputs()), _io(self.session.get_outputs())
        if self.input_name not in ins or self.output_name not in outs:
            raise EngineError(f"{self.path} is not a vision engine (expects input "
                              f"'{self.input_name}' and output '{self.output_name}', has "
                              f"{list(ins)} -> {list(outs)}): re-export the bundle")
        self.in_dtype = ins[self.input_name].dtype
        shape = outs[self.output_name].shape
        self.n_queries = shape[1] if isinstance(shape[1], int) else n_queries
        self.hidden = shape[2] if isinstance(shape[2], int) else hidden

    def encode(self, pixels: np.ndarray) -> Features:
        pixels = np.ascontiguousarray(pixels, dtype=self.in_dtype)
        if self.device == "cpu":
            out = self.session.run([self.output_name], {self.input_name: pixels})[0]
            return Features(out.shape, np.asarray(out, np.float32))
        # CUDA: output stays on the device, in a buffer the decoder reads by pointer
        n = pixels.shape[0]
        shape = (n, self.n_queries, self.hidden)
        buf = DeviceBuffer(int(np.prod(shape)), np.float32, "cuda")
        io = self.session.io_binding()
        io.bind_cpu_input(self.input_name, pixels)
        io.bind_output(self.output_name, "cuda", 0, np.float32, list(shape), buf.ptr)
        self.session.run_with_iobinding(io)
        return Features(shape, buffer=buf)


class TrtVisionEngine:
    """A prebuilt TensorRT plan for the vision engine (needs ``tensorrt`` and onnxruntime-gpu,
    whose CUDA allocator provides the device buffers). Untested here: no GPU with TensorRT."""

    kind = "tensorrt"

    def __init__(self, plan: Path, n_queries: int, hidden: int):
        import tensorrt as trt  # noqa: PLC0415 - optional

        self.path, self.device = Path(plan), "cuda"
        self.n_queries, self.hidden = n_queries, hidden
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineError(f"TensorRT could not load {self.path} (built for another GPU or "
                              "TensorRT version?): rebuild it on this device")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names
                               if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names
                                if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.in_dtype = np.float16 if engine.get_tensor_dtype(self.input_name) == trt.float16 \
            else np.float32

    def encode(self, pixels: np.ndarray) -> Features:
        pixels = np.ascontiguousarray(pixels, dtype=self.in_dtype)
        n = pixels.shape[0]
        dev_in = ort.OrtValue.ortvalue_from_numpy(pixels, "cuda", 0)
        shape = (n, self.n_queries, self.hidden)
        out = DeviceBuffer(int(np.prod(shape)), np.float32, "cuda")
        self.context.set_input_shape(self.input_name, tuple(pixels.shape))
        self.context.set_tensor_address(self.input_name, dev_in.data_ptr())
        self.context.set_tensor_address(self.output_name, out.ptr)
        if not self.context.execute_async_v3(0):
            raise EngineError(f"TensorRT execution of {self.path} failed")
        out.ortvalue.numpy()  # synchronises the default stream before the decoder reads it
        return Features(shape, buffer=out)


# ---------------------------------------------------------------------------------------------
# Decoder
# ---------------------------------------------------------------------------------------------

_FLOAT, _FLOAT16, _INT64, _INT8 = 1, 10, 7, 3  # ONNX TensorProto element types
_ONNX_TYPES = {np.dtype(np.float32): _FLOAT, np.dtype(np.float16): _FLOAT16,
               np.dtype(np.int64): _INT64, np.dtype(np.int8): _INT8}


class Binding:
    """An ``IOBinding`` that binds by pointer with cached device objects.

    The public ``IOBinding.bind_input`` builds an ``OrtDevice`` on every call (~15 us); a decode
    step binds 4 tensors per layer, so the cached-device path (~2 us a bind) matters. Falls back
    to the public API when the private one is not there.
    """

    def __init__(self, session: ort.InferenceSession, device: str):
        self.io = session.io_binding()
        self.device = device
        self.keep: list[Any] = []
        self.raw = getattr(self.io, "_iobinding", None)
        try:
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice
            self._cpu = OrtDevice.make("cpu", 0)._get_c_device()
            self._dev = OrtDevice.make(device, 0)._get_c_device()
        except Exception:  # noqa: BLE001 - another onnxruntime layout
            self.raw = None

    def input(self, name: str, on_device: bool, etype: int, shape: list, ptr: int) -> None:
        if self.raw is not None:
            self.raw.bind_input(name, self._dev if on_device else self._cpu, etype, shape, ptr)
        else:
            self.io.bind_input(name, self.device if on_device else "cpu", 0, etype, shape, ptr)

    def output(self, name: str, on_device: bool, etype: int, shape: list, ptr: int) -> None:
        if self.raw is not None:
            self.raw.bind_output(name, self._dev if on_device else self._cpu, etype, shape, ptr)
        else:
            self.io.bind_output(name, self.device if on_device else "cpu", 0, etype, shape, ptr)


class KVCache:
    """KV cache of one request (or one batch) for up to ``capacity`` tokens per row.

    ``concat`` layout: two ping-pong sets of flat buffers per layer (key, value); ``cur`` is the
    set holding the valid past of ``length`` tokens laid out ``[B, H, length, D]`` at the front.
    ``shared`` layout: one set, ``[B, H, capacity, D]``, its first ``length`` rows valid. ``mask``
    is the host attention mask ``[B, capacity]`` (1 = real token; 0 = padding or a dropped token).
    """

    def __init__(self, engine: "DecoderEngine", batch: int, capacity: int):
        self.batch, self.capacity = int(batch), int(capacity)
        self.contract = engine.contract
        n = engine.contract.kv_elements(self.batch, self.capacity)
        self.shared = engine.contract.shared_kv
        self.sets = [[(DeviceBuffer(n, engine.kv_dtype, engine.device),
                       DeviceBuffer(n, engine.kv_dtype, engine.device))
                      for _ in range(engine.layers)] for _ in range(1 if self.shared else 2)]
        self.cur = 0
        self.length = 0
        self.kv_bound = False  # shared layout: KV bound into ``binding`` already
        self.mask = np.zeros((self.batch, self.capacity), np.int64)
        self.engine: DecoderEngine | None = None
        self.binding: Binding | None = None
        self.attach(engine)
        self._mask_ptr = self.mask.ctypes.data
        self._ids1 = np.zeros((self.batch, 1), np.int64)
        self._ids1_ptr = self._ids1.ctypes.data
        self._logits1 = np.empty((self.batch, 1, engine.vocab_size), np.float32)
        self._logits1_ptr = self._logits1.ctypes.data

    def attach(self, engine: "DecoderEngine") -> None:
        """Bind this cache to ``engine``'s session (a reloaded decoder: the low-memory mode);
        the cached tokens are kept, they do not depend on the session."""
        if engine is self.engine:
            return
        if engine.contract != self.contract:
            raise EngineError(f"{engine.path} has another KV contract than the engine this "
                              "cache was made for: start a new conversation")
        self.engine, self.binding, self.kv_bound = engine, Binding(engine.session,
                                                                   engine.device), False

    def detach(self) -> None:
        """Drop the references to the engine's session (so that a released decoder's memory
        goes back); the next ``forward`` attaches the cache again."""
        self.engine, self.binding, self.kv_bound = None, None, False

    @property
    def nbytes(self) -> int:
        per_set = self.capacity * self.batch * self.contract.kv_bytes_per_token
        return len(self.sets) * per_set

    def reset(self) -> None:
        self.length = 0
        self.mask[:] = 0

    def layer(self, i: int, which: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """Host copy/view of layer ``i``'s (key, value) ``[B,H,length,D]`` (tests, debugging)."""
        c = self.contract
        k, v = self.sets[self.cur if which < 0 else which][i]
        if self.shared:
            full = tuple(c.kv_shape(self.batch, self.capacity))
            return k.view(full)[:, :, :self.length], v.view(full)[:, :, :self.length]
        shape = tuple(c.kv_shape(self.batch, self.length))
        return k.view(shape), v.view(shape)


class DecoderEngine:
    """input ids (+ image features) + KV cache -> logits; the KV cache stays on the device."""

    kind = "onnxruntime"

    def __init__(self, path: Path, providers: list[str], threads: int | None = None,
                 vocab_size: int | None = None, *, profile_prefix: str | None = None):
        self.path = Path(path)
        self.device = "cuda" if providers[0] == CUDA else "cpu"
        self.session = open_session(self.path, providers, threads, "all",
                                    profile_prefix=profile_prefix)
        self.inputs = _io(self.session.get_inputs())
        self.outputs = _io(self.session.get_outputs())
        try:
            self.contract = decoder_contract(self.session, vocab_size)
        except ContractError as e:
            raise EngineError(f"{self.path} is {e}: re-export the bundle") from None
        c = self.contract
        self.layers, self.heads, self.head_dim = c.layers, c.heads, c.head_dim
        self.kv_dtype = np.dtype(c.kv_dtype).type
        self.has_images = IMAGE_EMBEDS in self.inputs
        self.hidden = c.hidden
        self.vocab_size = c.vocab_size
        if self.vocab_size is None:
            raise EngineError(f"{self.path}: the logits vocabulary size is symbolic and the "
                              "manifest does not give vocab_size: re-export the bundle")
        self._names = [c.kv_names(i) for i in range(self.layers)]
        self._no_images = np.zeros((1, self.hidden or 1), np.float32)  # bound as [0, hidden]
        self._no_images_ptr = self._no_images.ctypes.data
        self._kv_type = _ONNX_TYPES[np.dtype(self.kv_dtype)]
        self.kv_bytes_per_token = c.kv_bytes_per_token
        # logits_to_keep values bound by pointer: 1 (the last position) and 0 (all)
        self._keep = np.array([1, 0], np.int64)
        self._keep_last_ptr = self._keep.ctypes.data
        self._keep_all_ptr = self._keep_last_ptr + self._keep.itemsize

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self, batch, capacity)

    def forward(self, cache: KVCache, input_ids: np.ndarray, new_mask: np.ndarray | None = None,
                features: Features | None = None, last_only: bool = True) -> np.ndarray:
        """Run ``input_ids [B,S]`` on top of ``cache`` and append them to it.

        ``new_mask [B,S]`` marks real tokens (default all 1). Returns the logits of the last
        position ``[B, V]`` (``last_only``: an engine with ``logits_to_keep`` computes only that
        row) or of all positions ``[B, S, V]``.
        """
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = ids.shape
        cache.attach(self)
        p = cache.length
        t = p + s
        if b != cache.batch:
            raise EngineError(f"batch {b} does not match the KV cache's batch {cache.batch}")
        if t > cache.capacity:
            raise EngineError(f"context of {t} tokens exceeds the KV cache capacity "
                              f"{cache.capacity}")
        cache.mask[:, p:t] = 1 if new_mask is None else new_mask
        if not self.contract.masks_keys:
            try:
                self.contract.check_mask(cache.mask[:, :t], p)
            except ContractError:
                cache.mask[:, p:t] = 0
                raise
        bind = cache.binding
        # pointers of the persistent host arrays are cached (``ndarray.ctypes`` costs ~4 us)
        if s == 1:
            np.copyto(cache._ids1, ids)
            ids_ptr = cache._ids1_ptr
        else:
            ids_ptr = ids.ctypes.data
        if b == 1:  # a prefix of the one mask row is contiguous
            mask, mask_ptr = None, cache._mask_ptr
        else:
            mask = np.ascontiguousarray(cache.mask[:, :t])
            mask_ptr = mask.ctypes.data
        bind.keep = [ids, mask]  # bound by pointer: must outlive the run
        bind.input(INPUT_IDS, False, _INT64, [b, s], ids_ptr)
        bind.input(ATTENTION_MASK, False, _INT64, [b, t], mask_ptr)
        if self.has_images:
            self._bind_images(bind, features)
        self._bind_kv(cache, b, p, t)
        vocab = self.vocab_size
        rows = self.contract.logits_rows(s, 1 if last_only else 0)
        if self.contract.logits_to_keep:
            bind.input(LOGITS_TO_KEEP, False, _INT64, [1],
                       self._keep_last_ptr if last_only else self._keep_all_ptr)
        if s == 1:
            logits, logits_ptr = cache._logits1, cache._logits1_ptr
        else:  # a fresh array: prefill logits stay valid after the next step
            logits = np.empty((b, rows, vocab), np.float32)
            logits_ptr = logits.ctypes.data
        bind.output(LOGITS, False, _FLOAT, [b, rows, vocab], logits_ptr)
        self.session.run_with_iobinding(bind.io)
        cache.cur = (cache.cur + 1) % len(cache.sets)
        cache.length = t
        if last_only:
            return logits[:, -1]
        return logits

    def _bind_kv(self, cache: KVCache, b: int, p: int, t: int) -> None:
        """Past and present of every layer: the same buffer at its capacity (``shared``), or
        past from the current set and present into the other (``concat``)."""
        bind, kvt = cache.binding, self._kv_type
        if cache.shared:
            if cache.kv_bound:  # same buffers, same shapes every step: bound once per cache
                return
            cache.kv_bound = True
            shape = self.contract.kv_shape(b, cache.capacity)
            for (pk, pv, ok, ov), (k, v) in zip(self._names, cache.sets[0]):
                bind.input(pk, True, kvt, shape, k.ptr)
                bind.input(pv, True, kvt, shape, v.ptr)
                bind.output(ok, True, kvt, shape, k.ptr)
                bind.output(ov, True, kvt, shape, v.ptr)
            return
        src, dst = cache.sets[cache.cur], cache.sets[1 - cache.cur]
        past_shape = self.contract.kv_shape(b, p)
        pres_shape = self.contract.kv_shape(b, t)
        for (pk, pv, ok, ov), (sk, sv), (dk, dv) in zip(self._names, src, dst):
            bind.input(pk, True, kvt, past_shape, sk.ptr)
            bind.input(pv, True, kvt, past_shape, sv.ptr)
            bind.output(ok, True, kvt, pres_shape, dk.ptr)
            bind.output(ov, True, kvt, pres_shape, dv.ptr)

    def _bind_images(self, bind: Binding, features: Features | None) -> None:
        if features is None:
            bind.input(IMAGE_EMBEDS, False, _FLOAT, [0, self.hidden], self._no_images_ptr)
        elif features.array is not None:
            emb = np.ascontiguousarray(features.array.reshape(features.rows, -1),
                                       dtype=np.float32)
            bind.keep.append(emb)
            bind.input(IMAGE_EMBEDS, False, _FLOAT, list(emb.shape), emb.ctypes.data)
        else:  # device features straight from the vision engine
            bind.input(IMAGE_EMBEDS, True, _FLOAT, [features.rows, self.hidden], features.ptr)

    def mask_out(self, cache: KVCache, start: int, end: int | None = None) -> None:
        """Drop cached tokens ``[start, end)`` from attention (they stay in memory, masked); an
        ``unpadded`` engine cannot mask them (:meth:`truncate` drops a tail)."""
        if not self.contract.masks_keys:
            raise ContractError(f"{self.path.name} takes unpadded rows only (GroupQueryAttention "
                                "without an attention bias) and cannot mask cached tokens: "
                                "drop a tail with truncate() or start a new cache")
        cache.mask[:, start:cache.length if end is None else end] = 0

    def truncate(self, cache: KVCache, length: int) -> None:
        """Keep the first ``length`` cached tokens; the next call writes over the rest (the
        ``shared`` layout's rows do not move when the length changes)."""
        if not cache.shared:
            raise EngineError(f"{self.path.name}: only a shared-layout KV cache can be rewound")
        if not 0 <= length <= cache.length:
            raise EngineError(f"cannot truncate a cache of {cache.length} tokens to {length}")
        cache.mask[:, length:] = 0
        cache.length = int(length)


# ---------------------------------------------------------------------------------------------
# Loading on demand (the low-memory mode: one engine resident at a time)
# ---------------------------------------------------------------------------------------------

class EngineSlot:
    """An engine loaded on first use by ``loader`` and, when ``release`` is called, dropped so
    that its session (and the memory onnxruntime holds for it) is returned.

    ``check(engine)`` runs on every load (the pipeline's manifest checks). ``loads`` counts
    loads and ``load_s`` is the time of the last one (the cost of the low-memory mode).
    ``engine``: an engine already loaded (``loader`` None: it cannot be released).
    """

    def __init__(self, loader: Any = None, check: Any = None, engine: Any = None):
        self.loader, self.check = loader, check
        self.engine = engine
        self.loads = 0 if engine is None else 1
        self.load_s = 0.0
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def get(self) -> Any:
        eng = self.engine
        if eng is not None:
            return eng
        with self._lock:
            if self.engine is None:
                t = time.perf_counter()
                eng = self.loader()
                if self.check is not None:
                    self.check(eng)
                self.engine, self.loads = eng, self.loads + 1
                self.load_s = time.perf_counter() - t
                log.debug("loaded %s in %.2f s", getattr(eng, "path", eng), self.load_s)
            return self.engine

    def release(self) -> None:
        """Drop the engine (the next ``get`` loads it again) and hand the freed heap back to
        the OS; no-op without a loader."""
        with self._lock:
            if self.loader is not None and self.engine is not None:
                self.engine = None
                return_freed_memory()


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``: without it a dropped
    session's buffers stay in the process's resident set); a no-op on other C libraries."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
