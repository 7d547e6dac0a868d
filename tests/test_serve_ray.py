"""``python -m runtime.serve_ray``: the same server as 2 Ray Serve replicas on one machine.

Needs the ``ray`` extra (not in CI's ``test`` extra: Ray is large and slow to start); without
it these tests are skipped with that reason. Run them with::

    pip install -c constraints.txt -e ".[ray,test]" && python -m pytest -m ray tests/test_serve_ray.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.ray
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (the optional 'ray' extra): "
                                        "pip install -e '.[ray]' to run these tests")

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(fp32_bundle):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve_ray", "--bundle",
                             str(fp32_bundle), "--replicas", "2", "--replica-cpus", "0.5",
                             "--port", str(port), "--threads", "1", "--model-name", "nano",
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=str(ROOT))
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < end, "Ray Serve never became healthy"
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_two_replicas_answer_like_the_pipeline(ray_server, pipe):
    client = openai.OpenAI(base_url=ray_server + "/v1", api_key="none", max_retries=0,
                           timeout=120)
    prompts = [f"Tell me about robot {i}." for i in range(8)]
    want = [pipe.chat(p, temperature=0, max_new_tokens=10).result().text for p in prompts]

    def ask(p):
        r = client.chat.completions.create(model="nano", max_tokens=10, temperature=0,
                                           messages=[{"role": "user", "content": p}])
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, prompts)) == want
    stream = client.chat.completions.create(model="nano", max_tokens=10, temperature=0,
                                            stream=True,
                                            messages=[{"role": "user", "content": prompts[0]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[0]
    # both replicas are up, each its own process with its own engines
    pids = {httpx.get(f"{ray_server}/health", timeout=10).json()["pid"] for _ in range(40)}
    assert len(pids) == 2, pids
