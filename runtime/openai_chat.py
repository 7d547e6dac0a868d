"""OpenAI chat-completions format <-> :meth:`Pipeline.chat` arguments and :class:`ChatResult`.

Kept apart from the HTTP server (no web framework imported here) so the translation is one
place, used by ``runtime.serve`` and its Ray Serve deployment alike.

Requests: ``messages`` with ``system``/``developer``, ``user`` and ``assistant`` roles; user
content as a string or a list of ``text`` and ``image_url`` parts. Images must arrive inline as
``data:image/...;base64,`` URLs: the server never fetches or opens a location a client names
unless that location starts with one of the operator's ``allow_url_prefixes``. Qwen-VL puts a
turn's images before its text ("Picture 1: <img>..</img>"), whatever their order in the parts.

Besides OpenAI's ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``
and ``stop``, the extension fields ``top_k``, ``repetition_penalty`` and ``min_tokens`` are
accepted (vLLM's names).

Responses carry one extension field per choice, ``boxes``: the grounding boxes parsed from the
reply, ``{"ref", "box" (0..1000 grid), "pixels" (original pixels of the conversation's last
image, or null), "image_index"}``, so a client never parses ``<box>`` text itself.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import EdgeError
from .prompt import Turn

log = logging.getLogger(__name__)

#: Request fields that ask for something this server does not do (a 400, not a silent ignore).
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs",
                "top_logprobs", "audio", "prediction")
_FINISH = {"stop": "stop", "stop_string": "stop", "length": "length"}
MAX_REMOTE_BYTES = 20 << 20


class RequestError(EdgeError, ValueError):
    """A request the server refuses; ``status`` is its HTTP status, the message one line."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class ChatCall:
    """Everything :meth:`Pipeline.chat` needs for one request, plus the response options."""

    query: str
    images: list[Any]  # bytes (data: URLs) or Paths (allowed file:// URLs), history first
    history: list[Turn]
    system: str | None
    generation: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False


def image_source(url: Any, allow_url_prefixes: tuple[str, ...] = ()) -> Any:
    """Bytes of a ``data:`` URL; a path or fetched bytes only for an allow-listed URL."""
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string", param="messages")
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise RequestError("image data URLs must be base64: data:image/png;base64,<data>",
                               param="messages")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image data URL holds invalid base64", param="messages") from None
    if not any(url.startswith(p) for p in allow_url_prefixes):
        scheme = url.split(":", 1)[0][:16]
        raise RequestError(f"{scheme}: image URLs are refused (this server fetches nothing a "
                           "client names): send the image inline as a data:image/...;base64, URL",
                           status=400, param="messages")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https"):
        return _fetch(url)
    raise RequestError(f"unsupported image URL scheme {parsed.scheme!r}", param="messages")


def _fetch(url: str) -> bytes:
    """An allow-listed remote image, size-capped (the operator opted in with a prefix)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - allow-listed prefix
            data = r.read(MAX_REMOTE_BYTES + 1)
    except OSError as e:
        raise RequestError(f"could not fetch the image {url}: {e}", param="messages") from None
    if len(data) > MAX_REMOTE_BYTES:
        raise RequestError(f"the image at {url} is over {MAX_REMOTE_BYTES >> 20} MiB",
                           status=413, param="messages")
    return data


def _text_of(content: Any, role: str) -> str:
    """Text of a system/assistant message (a string or text parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") not in ("text", "refusal"):
                raise RequestError(f"{role} messages may hold only text parts", param="messages")
            out.append(str(p.get("text", p.get("refusal", ""))))
        return "".join(out)
    raise RequestError(f"{role} message content must be a string or a list of parts",
                       param="messages")


def _user_content(content: Any, allow: tuple[str, ...]) -> tuple[str, list[Any]]:
    """(text, images) of one user message."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError("user message content must be a string or a list of parts",
                           param="messages")
    texts, images = [], []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text":
            if not isinstance(p.get("text"), str):
                raise RequestError("a text part needs a string 'text'", param="messages")
            texts.append(p["text"])
        elif kind == "image_url":
            ref = p.get("image_url")
            images.append(image_source(ref.get("url") if isinstance(ref, dict) else ref, allow))
        else:
            raise RequestError(f"unsupported content part type {kind!r}: use 'text' or "
                               "'image_url'", param="messages")
    return "".join(texts), images


def _messages(msgs: Any, allow: tuple[str, ...]) -> tuple[str | None, list[Turn], str, list[Any]]:
    """(system, history turns, query, images in conversation order) from OpenAI messages."""
    if not isinstance(msgs, list) or not msgs:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[list[Any]] = []  # [query, n_images, response | None]
    images: list[Any] = []
    for m in msgs:
        role = m.get("role") if isinstance(m, dict) else None
        if role in ("system", "developer"):
            if turns:
                raise RequestError("system messages must come before the first user message",
                                   param="messages")
            system.append(_text_of(m.get("content"), role))
        elif role == "user":
            text, imgs = _user_content(m.get("content"), allow)
            images.extend(imgs)
            if turns and turns[-1][2] is None:  # consecutive user messages: one turn
                turns[-1][0] = "\n".join(t for t in (turns[-1][0], text) if t)
                turns[-1][1] += len(imgs)
            else:
                turns.append([text, len(imgs), None])
        elif role == "assistant":
            if not turns or turns[-1][2] is not None:
                raise RequestError("an assistant message must follow a user message",
                                   param="messages")
            turns[-1][2] = _text_of(m.get("content"), role)
        else:
            raise RequestError(f"unsupported message role {role!r}: use system, user or "
                               "assistant", param="messages")
    if not turns or turns[-1][2] is not None:
        raise RequestError("the last message must be a user message", param="messages")
    query, _, _ = turns[-1]
    history = [Turn(q, r, n) for q, n, r in turns[:-1]]
    return ("\n".join(system) if system else None), history, query, images


def _number(body: dict[str, Any], name: str, kind: type, lo: float | None = None) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or \
            (kind is int and not float(v).is_integer()) or not math.isfinite(float(v)):
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}",
                           param=name)
    if lo is not None and v < lo:
        raise RequestError(f"'{name}' must be >= {lo}", param=name)
    return kind(v)


def parse_chat(body: Any, allow_url_prefixes: tuple[str, ...] = ()) -> ChatCall:
    """Validate an OpenAI chat-completions body; raise :class:`RequestError` on anything bad."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in _UNSUPPORTED:
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this server", param=name)
    if _number(body, "n", int, 1) not in (None, 1):
        raise RequestError("only n=1 is supported", param="n")
    system, history, query, images = _messages(body.get("messages"), allow_url_prefixes)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    gen = {"max_new_tokens": max_tokens, "temperature": _number(body, "temperature", float, 0),
           "top_p": _number(body, "top_p", float), "seed": _number(body, "seed", int),
           "top_k": _number(body, "top_k", int, 0),
           "min_new_tokens": _number(body, "min_tokens", int, 0),
           "repetition_penalty": _number(body, "repetition_penalty", float), "stop": stop}
    opts = body.get("stream_options") or {}
    return ChatCall(query, images, history, system, {k: v for k, v in gen.items() if v is not None},
                    stream=bool(body.get("stream")),
                    include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")))


def boxes_json(result: Any) -> list[dict[str, Any]]:
    """The grounding extension field of a choice."""
    return [{"ref": b.ref, "box": list(b.box), "pixels": list(b.pixels) if b.pixels else None,
             "image_index": b.image_index} for b in result.boxes]


def usage_json(result: Any) -> dict[str, int]:
    n = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n,
            "total_tokens": result.prompt_tokens + n}


def completion_json(result: Any, rid: str, created: int, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object for a finished :class:`ChatResult`."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": _FINISH.get(result.finish_reason, "stop"),
                         "logprobs": None, "boxes": boxes_json(result)}],
            "usage": usage_json(result)}


def chunk_json(rid: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None = None, result: Any = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``; the last one (``result`` given) has the finish and boxes."""
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}
    if result is not None:
        choice["finish_reason"] = _FINISH.get(result.finish_reason, "stop")
        choice["boxes"] = boxes_json(result)
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def usage_chunk_json(rid: str, created: int, model: str, result: Any) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": usage_json(result)}


def error_json(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
            429: "rate_limit_error", 503: "server_busy", 504: "timeout"}.get(status, "server_error")
    return {"error": {"message": " ".join(message.split()), "type": kind, "param": param,
                      "code": status}}
