"""``python -m runtime.serve``: the official ``openai`` client and raw HTTP against real servers.

Two servers on loopback with ephemeral ports, both on the session's fp32 nano bundle: ``server``
is the CLI in a subprocess (what users run; its memory is measured on its own), ``small`` is the
same app on uvicorn in this process with one slot and a one-place queue (429s, disconnects,
timeouts, and forced grounding replies). Replies are checked against in-process ``Pipeline``
calls with the same settings, token for token.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = "nano"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_healthy(base: str, proc: subprocess.Popen | None = None, limit_s: float = 120) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server never became healthy")


@pytest.fixture(scope="module")
def server(fp32_bundle):
    """The CLI in a subprocess: 4 slots, 8 waiting, 1 MiB bodies."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--bundle", str(fp32_bundle),
                             "--port", "0", "--threads", "1", "--model-name", MODEL,
                             "--parallel", "4", "--queue", "8", "--max-body-mb", "1",
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(ROOT))
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited before it listened"
        base = "http://" + re.search(r"http://([\d.]+:\d+)", line).group(1)
        wait_healthy(base, proc)
        yield base, proc
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def expected(pipe, query, images=(), history=(), **kw):
    kw.setdefault("temperature", 0)
    return pipe.chat(query, images=list(images), history=list(history), **kw).result()


# ---------------------------------------------------------------------------------------------
# The official client
# ---------------------------------------------------------------------------------------------

def test_models_health_and_metrics(server, client):
    base, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    text = httpx.get(f"{base}/metrics").text
    for name in ("qwenvl_requests_total", "qwenvl_queue_depth", "qwenvl_generated_tokens_total",
                 "qwenvl_time_to_first_token_seconds_bucket"):
        assert name in text


def test_plain_chat_equals_the_pipeline(client, pipe, server):
    r = client.chat.completions.create(model=MODEL, max_tokens=12, temperature=0,
                                       messages=[{"role": "user", "content": "Say hi"}])
    want = expected(pipe, "Say hi", max_new_tokens=12)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens,
                                                                  len(want.token_ids))
    assert r.choices[0].model_extra["boxes"] == []
    # sampling settings and the system message reach the pipeline
    kw = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=10, stop=["zz"])
    r = client.chat.completions.create(model=MODEL, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Robots?"}], **kw)
    want = expected(pipe, "Robots?", system="Be brief.", temperature=0.8, top_p=0.9, seed=7,
                    max_new_tokens=10, stop=["zz"])
    assert r.choices[0].message.content == want.text
    metrics = httpx.get(f"{server[0]}/metrics").text
    assert re.search(r'qwenvl_requests_total\{outcome="ok"\} [1-9]', metrics)


def test_streaming_chunks_join_to_the_reply(client, pipe):
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me about robots."}])
    chunks = list(stream)
    want = expected(pipe, "Tell me about robots.", max_new_tokens=16)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].model_extra["boxes"] == []
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1


def test_image_as_data_url(client, pipe, images):
    r = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[0])}},
                                     {"type": "text", "text": "What is in the picture?"}]}])
    want = expected(pipe, "What is in the picture?", [images[0]], max_new_tokens=10)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens  # the image span is in the prompt


def test_multi_turn_with_an_image_in_an_earlier_turn(client, pipe, images):
    from runtime.prompt import Turn

    first = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                     {"type": "image_url", "image_url": {"url": data_url(images[1])}}]}])
    answer = first.choices[0].message.content
    r = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                     {"type": "image_url", "image_url": {"url": data_url(images[1])}}]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "And the colours?"}])
    want = expected(pipe, "And the colours?", [images[1]], [Turn("Describe it.", answer, 1)],
                    max_new_tokens=8)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens


def test_typed_grounding_tags_are_special(client, pipe):
    from runtime.prompt import Ref

    r = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "user", "content": "Find <ref>the red circle</ref>"}])
    want = expected(pipe, ["Find ", Ref("the red circle")], max_new_tokens=6)
    assert r.usage.prompt_tokens == want.prompt_tokens
    assert r.choices[0].message.content == want.text


# ---------------------------------------------------------------------------------------------
# Raw HTTP: every bad request is a one-line 4xx and the server keeps answering
# ---------------------------------------------------------------------------------------------

def post(base, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{base}/v1/chat/completions", content=data,
                      headers={"Content-Type": "application/json"}, timeout=60, **kw)


def user(content, **kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def test_bad_requests_are_one_line_4xx(server, images, tmp_path):
    base, _ = server
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really").decode()
    cases = [
        (b'{"model": "nano", "messages": [', 400, "not valid JSON"),
        (user([{"type": "image_url", "image_url": {"url": corrupt}}]), 400, "image"),
        (user("x" * 10, max_tokens=100000), 400, "context"),
        (user([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]), 400,
         "refused"),
        (user([{"type": "image_url", "image_url": {"url": f"file://{images[0]}"}}]), 400,
         "refused"),
        (user("hi", temperature=-1), 400, "temperature"),
        ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "assistant"),
        (user("hi", n=2), 400, "n=1"),
    ]
    for body, status, words in cases:
        r = post(base, body)
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:200],
                                         r.text)
        msg = r.json()["error"]["message"]
        assert words in msg and "\n" not in msg, msg
    big = user([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (2 << 20)}}])
    r = post(base, big)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert post(base, user("still fine?", max_tokens=3)).status_code == 200


# ---------------------------------------------------------------------------------------------
# Load: 16 clients at once; each reply is right or a 429, nothing hangs, memory stays flat
# ---------------------------------------------------------------------------------------------

LOAD_S = float(os.environ.get("QWENVL_SERVE_LOAD_S", "6"))


def test_loopback_load(server, pipe, images):
    base, proc = server
    img = data_url(images[0])
    prompts = [("Hello", False), ("Tell me about robots.", True), ("Count to five.", False),
               ("What is it?", True)]
    want = [expected(pipe, q, [images[0]] if i else [], max_new_tokens=12).text
            for q, i in prompts]

    def body(k):
        q, with_img = prompts[k % len(prompts)]
        parts = ([{"type": "image_url", "image_url": {"url": img}}] if with_img else []) + \
            [{"type": "text", "text": q}]
        return user(parts, max_tokens=12, temperature=0, stream=k % 2 == 0)

    def one(http, k):
        if k % 2:
            r = http.post("/v1/chat/completions", json=body(k))
            if r.status_code == 200:
                return "ok" if r.json()["choices"][0]["message"]["content"] == want[k % 4] else r.text
        else:
            with http.stream("POST", "/v1/chat/completions", json=body(k)) as r:
                if r.status_code == 200:
                    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                                   for line in r.iter_lines()
                                   if line.startswith("data: {") and '"choices": [{' in line)
                    return "ok" if text == want[k % 4] else text
                r.read()
        if r.status_code == 429 and int(r.headers["Retry-After"]) >= 1:
            return "429"
        return f"{r.status_code} {r.text}"

    def run(worker, until):
        out = []
        with httpx.Client(base_url=base, timeout=30) as http:
            k = worker
            while True:
                out.append(one(http, k))
                k += 16
                if time.monotonic() > until:
                    return out

    with ThreadPoolExecutor(16) as pool:  # warm-up: every client once
        warm = [o for f in [pool.submit(run, w, 0) for w in range(16)] for o in f.result()]
    rss_warm = rss_kib(proc.pid)
    until = time.monotonic() + LOAD_S
    with ThreadPoolExecutor(16) as pool:
        outcomes = [o for f in [pool.submit(run, w, until) for w in range(16)]
                    for o in f.result(timeout=LOAD_S + 120)]
    rss_after = rss_kib(proc.pid)
    bad = [o for o in warm + outcomes if o not in ("ok", "429")]
    assert not bad, bad[:3]
    assert outcomes.count("ok") >= 16, outcomes  # the server did real work, not only 429s
    assert rss_after <= 1.05 * rss_warm, (rss_warm, rss_after)
    metrics = httpx.get(f"{base}/metrics").text
    assert "qwenvl_active_requests 0.0" in metrics and "qwenvl_queue_depth 0.0" in metrics


# ---------------------------------------------------------------------------------------------
# One slot, one waiting place: 429 + Retry-After, disconnects, timeouts, grounding boxes
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(pipe):
    """The app on uvicorn in this process (a thread), 1 slot, queue 1, 20 s timeout."""
    import uvicorn

    from runtime.serve import ServeConfig, create_app

    app = create_app(pipe, ServeConfig(MODEL, parallel=1, queue=1, timeout_s=20))
    sock = socket.create_server(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    base = "http://127.0.0.1:%d" % sock.getsockname()[1]
    wait_healthy(base)
    yield base, app
    srv.should_exit = True
    t.join(30)


@pytest.fixture
def slow(pipe, monkeypatch):
    """Each decoder run takes >= 10 ms, so a long reply lasts long enough to be interrupted."""
    forward = pipe.decoder.forward

    def slow_forward(*a, **k):
        time.sleep(0.01)
        return forward(*a, **k)

    monkeypatch.setattr(pipe.decoder, "forward", slow_forward)


def gauge(base, name):
    return float(re.search(rf"^{name} (\S+)$", httpx.get(f"{base}/metrics").text, re.M).group(1))


def long_stream(http, **kw):
    """A streaming request that runs for a long time (min_tokens keeps it going)."""
    return http.stream("POST", "/v1/chat/completions",
                       json=user("Go on and on.", max_tokens=1500, min_tokens=1500, stream=True,
                                 **kw))


def until(cond, limit_s=10.0):
    end = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < end, "condition never held"
        time.sleep(0.02)


def test_queue_full_is_429_with_retry_after_and_disconnect_frees_the_slot(small, slow):
    base, _ = small
    with httpx.Client(base_url=base, timeout=30) as a:
        with long_stream(a) as ra:
            assert ra.status_code == 200
            lines = ra.iter_lines()  # kept: a dropped iterator closes the response
            assert next(lines).startswith("data: ")  # generating: the slot is taken
            until(lambda: gauge(base, "qwenvl_active_requests") == 1)
            waiting = threading.Thread(target=lambda: post(base, user("queued", max_tokens=2)))
            waiting.start()  # takes the one waiting place
            until(lambda: gauge(base, "qwenvl_queue_depth") == 1)
            r = post(base, user("no room", max_tokens=2))
            assert r.status_code == 429, r.text
            assert int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["error"]["message"]
        # the client closed its stream mid-reply: its slot goes to the waiting request
        waiting.join(30)
        assert not waiting.is_alive()
    until(lambda: gauge(base, "qwenvl_active_requests") == 0 and
          gauge(base, "qwenvl_queue_depth") == 0)
    assert post(base, user("after", max_tokens=2)).status_code == 200
    text = httpx.get(f"{base}/metrics").text
    assert re.search(r'qwenvl_requests_total\{outcome="rejected"\} 1\.0', text)
    assert re.search(r'qwenvl_requests_total\{outcome="disconnected"\} 1\.0', text)


def test_non_streaming_disconnect_frees_the_slot(small, slow):
    base, _ = small
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/chat/completions", timeout=1.0,
                   json=user("Go on and on.", max_tokens=1500, min_tokens=1500))
    until(lambda: gauge(base, "qwenvl_active_requests") == 0)
    assert post(base, user("after", max_tokens=2)).status_code == 200


def test_timeout_is_504(small, slow, monkeypatch):
    base, app = small
    monkeypatch.setattr(app.state.server.cfg, "timeout_s", 0.3)
    r = post(base, user("Go on and on.", max_tokens=1500, min_tokens=1500))
    assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
    until(lambda: gauge(base, "qwenvl_active_requests") == 0)


def test_grounding_extension_boxes_in_original_pixels(small, pipe, images, monkeypatch):
    """Force a grounding reply: each choice carries the parsed box in the image's pixels."""
    from runtime import generate

    base, _ = small
    tok = pipe.tokenizer
    forced = ([tok.ref_start_id] + tok.encode("the box") + [tok.ref_end_id, tok.box_start_id]
              + tok.encode("(100,200),(500,1000)") + [tok.box_end_id, tok.im_end_id])
    for stream in (False, True):
        it = iter(forced)
        monkeypatch.setattr(generate.Sampler, "__call__", lambda self, logits: next(it))
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, max_tokens=40, stream=stream, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(images[1])}},
                                         {"type": "text", "text": "Where is <ref>the box</ref>?"}]}])
        if stream:
            chunks = list(r)
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
            boxes = chunks[-1].choices[0].model_extra["boxes"]
        else:
            text, boxes = r.choices[0].message.content, r.choices[0].model_extra["boxes"]
        w, h = Image.open(images[1]).size
        assert text == "<ref>the box</ref><box>(100,200),(500,1000)</box>"
        assert boxes == [{"ref": "the box", "box": [100, 200, 500, 1000],
                          "pixels": [int(0.1 * w), int(0.2 * h), int(0.5 * w), h - 1],
                          "image_index": 0}]
        monkeypatch.undo()


def test_cli_bad_bundle_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--bundle", str(tmp_path / "nope"),
                        "--port", "0"], capture_output=True, text=True, env=env, cwd=str(ROOT),
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
