"""OpenAI-compatible HTTP server for a bundle: ``python -m runtime.serve --bundle DIR``.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client); the base runtime does not.
Endpoints: ``POST /v1/chat/completions`` (OpenAI format, ``stream`` as server-sent events, the
``boxes`` grounding extension per choice: see :mod:`runtime.openai_chat`), ``GET /v1/models``,
``GET /health`` (200 once the engines are loaded and warmed up, 503 before) and ``GET /metrics``
(Prometheus text).

Why this shape: the :class:`~runtime.pipeline.Pipeline` already interleaves concurrent streams
step by step under one engine lock, so the server only has to bound the work. ``parallel``
requests generate at once (each in its own thread, each with its own KV cache); up to ``queue``
more wait; beyond that a request gets 429 with ``Retry-After`` at once instead of piling up. A
stream whose client goes away is closed at the next token, which frees its slot and KV cache.
Bad input is a 4xx with one line and touches no other request.
"""

# no "from __future__ import annotations": FastAPI reads the route annotations (Request)

import argparse
import asyncio
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .errors import EdgeError
from .openai_chat import (ChatCall, RequestError, chunk_json, completion_json, error_json,
                          parse_chat, usage_chunk_json)

log = logging.getLogger("runtime.serve")


@dataclass
class ServeConfig:
    """Server settings (the CLI flags). ``timeout_s`` bounds queue wait + generation."""

    model_name: str = "qwen-vl"
    parallel: int = 4
    queue: int = 16
    timeout_s: float = 120.0
    max_body_bytes: int = 20 << 20
    allow_url_prefixes: tuple[str, ...] = ()
    warmup: bool = True


class ApiError(EdgeError):
    """An HTTP error answered as OpenAI's error object (one line)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.headers, self.param = status, headers or {}, param


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """The runtime's bad-input errors (each one-line, each a 400 here)."""
    from .generate import GenerationError
    from .image import ImageError
    from .pipeline import ContextLengthError, ConversationBusyError
    from .prompt import PromptError
    from .tokenizer import TokenizerError
    return (GenerationError, ImageError, ContextLengthError, PromptError, TokenizerError,
            ConversationBusyError)


class Metrics:
    """Prometheus series of one server (own registry: several apps may share a process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qwenvl_requests", "Chat requests by outcome", ["outcome"],
                                registry=r)
        self.queue_depth = Gauge("qwenvl_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("qwenvl_active_requests", "Requests generating now", registry=r)
        self.prompt_tokens = Counter("qwenvl_prompt_tokens", "Prompt tokens", registry=r)
        self.tokens = Counter("qwenvl_generated_tokens", "Generated tokens (rate() = tokens/s)",
                              registry=r)
        self.ttft = Histogram("qwenvl_time_to_first_token_seconds",
                              "Arrival to first token, queue wait included", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tps = Histogram("qwenvl_decode_tokens_per_second", "Per-request decode rate",
                             registry=r, buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500))
        self.duration = Histogram("qwenvl_request_duration_seconds", "Arrival to last byte",
                                  registry=r, buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 120))

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class Admission:
    """``parallel`` slots and a bounded wait list (used on the event loop thread only)."""

    def __init__(self, parallel: int, queue: int, metrics: Metrics):
        self.parallel, self.queue = max(1, int(parallel)), max(0, int(queue))
        self.free = self.parallel
        self.waiters: list[asyncio.Future] = []
        self.metrics = metrics
        self.recent_s = 1.0  # moving mean of request durations, for Retry-After

    def _gauges(self) -> None:
        self.metrics.active.set(self.parallel - self.free)
        self.metrics.queue_depth.set(len(self.waiters))

    def retry_after(self) -> int:
        rounds = (len(self.waiters) + 1) / self.parallel
        return max(1, math.ceil(rounds * self.recent_s))

    async def acquire(self, timeout_s: float) -> None:
        """Take a slot, waiting in line if there is room; 429 if the line is full."""
        if self.free > 0 and not self.waiters:
            self.free -= 1
            self._gauges()
            return
        if len(self.waiters) >= self.queue:
            raise ApiError(429, f"the server is busy ({self.parallel} generating, "
                                f"{len(self.waiters)} waiting): retry later",
                           {"Retry-After": str(self.retry_after())})
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        self._gauges()
        try:
            await asyncio.wait_for(asyncio.shield(fut), max(timeout_s, 0.001))
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if fut.done() and not fut.cancelled():
                self.release(0.0)  # the slot came just as we gave up: pass it on
            else:
                fut.cancel()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise ApiError(504, f"timed out after {timeout_s:.0f} s waiting for a free slot",
                           {"Retry-After": str(self.retry_after())}) from None
        finally:
            if fut in self.waiters:
                self.waiters.remove(fut)
            self._gauges()

    def release(self, duration_s: float) -> None:
        """Hand the slot to the first live waiter, else free it."""
        if duration_s > 0:
            self.recent_s = 0.8 * self.recent_s + 0.2 * duration_s
        while self.waiters:
            fut = self.waiters.pop(0)
            if not fut.done():
                fut.set_result(None)
                self._gauges()
                return
        self.free += 1
        self._gauges()


_STARTED = object()  # the pipeline accepted the request (its input errors come before this)


class Job:
    """One generation on a worker thread, handing pieces to the event loop through a queue.

    Why a thread per request and not a thread per token: one hop per piece keeps the server's
    overhead small, and the pipeline's engine lock already interleaves the threads fairly.
    """

    def __init__(self, pipe: Any, call: ChatCall, deadline: float,
                 loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor, on_done: Any):
        self.pipe, self.call, self.deadline = pipe, call, deadline
        self.loop, self.on_done = loop, on_done
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.started = time.monotonic()
        pool.submit(self._work)

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancel.set()

    def _work(self) -> None:
        stream = None
        c = self.call
        try:
            stream = self.pipe.chat(c.query, images=c.images, history=c.history, system=c.system,
                                    **c.generation)
            self._put(_STARTED)
            for piece in stream:
                if self.cancel.is_set():
                    return
                if time.monotonic() > self.deadline:
                    raise ApiError(504, "the request ran past its timeout")
                self._put(piece)
            self._put(stream.result())
        except BaseException as e:  # noqa: BLE001 - handed to the request's coroutine
            self._put(e)
        finally:
            if stream is not None:
                stream.close()  # frees the KV cache now, not at garbage collection
            try:
                self.loop.call_soon_threadsafe(self.on_done)
            except RuntimeError:
                pass

    async def next(self) -> Any:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class Disconnected(Exception):
    """The client went away before its answer."""


async def _unless_disconnected(request: Any, awaitable: Any) -> Any:
    """Await ``awaitable``; give up (cancel it) when the client disconnects meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.2)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise Disconnected()
    finally:
        if not task.done():
            task.cancel()


async def _read_json(request: Any, limit: int) -> Any:
    """The JSON body, at most ``limit`` bytes (413 beyond, 400 if it is not JSON)."""
    size = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over the server's limit of {limit} bytes: "
                            "send smaller images")
    if size.isdigit() and int(size) > limit:
        raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise too_big
    try:
        return json.loads(buf)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else
                        json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


class Server:
    """The state behind one app: pipeline, slots, worker threads, metrics."""

    def __init__(self, pipe: Any, cfg: ServeConfig):
        self.pipe, self.cfg = pipe, cfg
        self.metrics = Metrics()
        self.admission: Admission | None = None  # made on the event loop (lifespan)
        self.pool = ThreadPoolExecutor(max(1, cfg.parallel), thread_name_prefix="qwenvl-gen")
        self.ready = threading.Event()
        self.created = int(time.time())
        self.bad_input = _bad_input_types()

    def warm_up(self) -> None:
        """One tiny generation so the first client does not pay onnxruntime's first run."""
        try:
            if self.cfg.warmup:
                self.pipe.chat("hi", max_new_tokens=2, temperature=0).result()
        except Exception:  # noqa: BLE001 - stays not ready (503), with the reason in the log
            log.exception("warm-up failed: /health stays 503")
            return
        self.ready.set()
        log.info("ready: %s", self.cfg.model_name)

    def check(self, body: Any) -> ChatCall:
        if not self.ready.is_set():
            raise ApiError(503, "the engines are still loading: retry shortly",
                           {"Retry-After": "2"})
        call = parse_chat(body, self.cfg.allow_url_prefixes)
        model = body.get("model")
        if model is not None and model != self.cfg.model_name:
            raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists "
                                f"{self.cfg.model_name!r}", param="model")
        return call

    async def start(self, call: ChatCall, t0: float) -> Job:
        """A slot, then the job; the pipeline's input errors raise here (before any reply)."""
        deadline = t0 + self.cfg.timeout_s
        await self.admission.acquire(deadline - time.monotonic())
        job = Job(self.pipe, call, deadline, asyncio.get_running_loop(), self.pool,
                  lambda: self.admission.release(time.monotonic() - t0))
        try:
            first = await job.next()
        except BaseException:
            job.cancel.set()
            raise
        assert first is _STARTED
        return job

    def finished(self, result: Any, t0: float, ttft: float | None) -> None:
        m = self.metrics
        m.requests.labels("ok").inc()
        m.prompt_tokens.inc(result.prompt_tokens)
        m.tokens.inc(len(result.token_ids))
        if ttft is not None:
            m.ttft.observe(ttft)
        rate = result.timings.get("decode_ms_per_token")
        if rate:
            m.tps.observe(1000.0 / rate)
        m.duration.observe(time.monotonic() - t0)

    async def stream(self, job: Job, rid: str, t0: float) -> AsyncIterator[bytes]:
        """Server-sent events in OpenAI's chunk format; the last chunk carries the boxes."""
        created, model = int(time.time()), self.cfg.model_name
        ttft, outcome = None, "disconnected"
        try:
            yield _sse(chunk_json(rid, created, model, {"role": "assistant", "content": ""}))
            while True:
                item = await job.next()
                if isinstance(item, str):
                    ttft = ttft if ttft is not None else time.monotonic() - t0
                    yield _sse(chunk_json(rid, created, model, {"content": item}))
                    continue
                outcome = "ok"
                self.finished(item, t0, ttft)
                yield _sse(chunk_json(rid, created, model, {}, result=item))
                if job.call.include_usage:
                    yield _sse(usage_chunk_json(rid, created, model, item))
                yield _sse(b"[DONE]")
                return
        except ApiError as e:  # the reply has started: the error goes into the stream
            outcome = "timeout" if e.status == 504 else "error"
            yield _sse(error_json(str(e), e.status))
        except Exception as e:  # noqa: BLE001
            outcome = "error"
            log.exception("stream %s failed", rid)
            yield _sse(error_json(f"internal error: {type(e).__name__}", 500))
        finally:
            job.cancel.set()  # a client that went away frees its slot at the next token
            if outcome != "ok":
                self.metrics.requests.labels(outcome).inc()


def _outcome(status: int) -> str:
    return {429: "rejected", 504: "timeout", 503: "not_ready"}.get(status, "bad_request"
                                                                   if status < 500 else "error")


def create_app(pipe: Any, cfg: ServeConfig | None = None) -> Any:
    """The FastAPI app serving ``pipe`` (a loaded :class:`~runtime.pipeline.Pipeline`)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    srv = Server(pipe, cfg or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        srv.admission = Admission(srv.cfg.parallel, srv.cfg.queue, srv.metrics)
        asyncio.get_running_loop().run_in_executor(srv.pool, srv.warm_up)
        yield
        srv.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="qwenvl-edge", lifespan=lifespan)
    app.state.server = srv
    _error_handlers(app, srv)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        t0 = time.monotonic()
        call = srv.check(await _read_json(request, srv.cfg.max_body_bytes))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            job = await _unless_disconnected(request, srv.start(call, t0))
            if call.stream:
                return StreamingResponse(srv.stream(job, rid, t0), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            try:
                result = await _unless_disconnected(request, _last(job))
            finally:
                job.cancel.set()
        except Disconnected:
            srv.metrics.requests.labels("disconnected").inc()
            return Response(status_code=499)
        srv.finished(result, t0, job.started - t0 + result.timings["ttft_s"])
        return JSONResponse(completion_json(result, rid, int(time.time()), srv.cfg.model_name))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": srv.cfg.model_name, "object": "model",
                                            "created": srv.created, "owned_by": "qwenvl-edge"}]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if srv.ready.is_set():
            # pid: which process answered (several replicas sit behind one address on Ray)
            return JSONResponse({"status": "ok", "model": srv.cfg.model_name,
                                 "pid": os.getpid()})
        return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "2"})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(srv.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


def _error_handlers(app: Any, srv: Server) -> None:
    """Every failure as OpenAI's error object with one line; the runtime's input errors: 400."""
    from fastapi import Request
    from fastapi.responses import JSONResponse

    def error(status: int, message: str, headers: dict[str, str] | None = None,
              param: str | None = None) -> JSONResponse:
        srv.metrics.requests.labels(_outcome(status)).inc()
        return JSONResponse(error_json(message, status, param), status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error(e.status, str(e), e.headers, e.param)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return error(e.status, str(e), None, e.param)

    @app.exception_handler(Exception)
    async def other_error(request: Request, e: Exception) -> JSONResponse:
        if isinstance(e, srv.bad_input):
            return error(400, str(e) or type(e).__name__)
        log.exception("request failed")
        return error(500, f"internal error: {type(e).__name__}; see the server log")


async def _last(job: Job) -> Any:
    """The finished result of a non-streaming job (its text pieces are not needed)."""
    while True:
        item = await job.next()
        if not isinstance(item, str):
            return item


def build_parser() -> argparse.ArgumentParser:
    from .__main__ import add_low_memory_flag, positive_int

    p = argparse.ArgumentParser(
        prog="python -m runtime.serve",
        description="Serve a bundle over HTTP with OpenAI's chat-completions API (needs the "
                    "serve extra: pip install 'qwenvl-edge[serve]').",
        epilog="example:\n  python -m runtime.serve --bundle bundle/ --port 8000\n"
               "  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
               "-d '{\"model\": \"bundle\", \"messages\": [{\"role\": \"user\", \"content\": "
               "\"Hi\"}]}'", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="DIR", help="bundle directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; default 8000)")
    p.add_argument("--model-name", metavar="NAME",
                   help="model id clients pass (default: the bundle directory's name)")
    p.add_argument("--parallel", type=positive_int, default=4, metavar="N",
                   help="requests generating at once (default 4)")
    p.add_argument("--queue", type=int, default=16, metavar="N",
                   help="requests waiting for a slot before 429s (default 16)")
    p.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="per-request limit, queue wait included (default 120 s)")
    p.add_argument("--max-body-mb", type=float, default=20.0, metavar="MB",
                   help="largest request body (default 20 MB)")
    p.add_argument("--allow-url-prefix", action="append", default=[], metavar="PREFIX",
                   help="let image URLs starting with PREFIX (http://, https:// or file://) be "
                        "fetched or opened; repeatable. Default: only inline data: URLs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="onnxruntime CPU threads (default: all cores)")
    p.add_argument("--no-verify", action="store_true", help="skip the bundle's sha256 check")
    add_low_memory_flag(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    from pathlib import Path
    name = args.model_name or Path(args.bundle).resolve().name
    for v, flag in ((args.parallel, "--parallel"), (args.timeout, "--timeout"),
                    (args.max_body_mb, "--max-body-mb")):
        if v <= 0:
            raise ValueError(f"{flag} must be > 0")
    if args.queue < 0:
        raise ValueError("--queue must be >= 0")
    return ServeConfig(name, args.parallel, args.queue, args.timeout,
                       int(args.max_body_mb * (1 << 20)), tuple(args.allow_url_prefix))


def load_pipeline(args: argparse.Namespace) -> Any:
    from .pipeline import Pipeline
    return Pipeline.from_bundle(args.bundle, device=args.device, threads=args.threads,
                                verify=not args.no_verify,
                                low_memory=args.low_memory)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s")
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"error: {e.name} is missing: pip install 'qwenvl-edge[serve]'", file=sys.stderr)
        return 2
    from .bundle import BundleError
    from .engines import EngineError
    try:
        cfg = config_from_args(args)
        pipe = load_pipeline(args)
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family)
    except (BundleError, EngineError, OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    # always printed (any --log-level): scripts started with --port 0 read the port here
    print(f"serving {cfg.model_name} on http://{host}:{port}", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, cfg), log_config=None,
                                           log_level=args.log_level, access_log=False,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
