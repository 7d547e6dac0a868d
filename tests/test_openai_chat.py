"""runtime.openai_chat: OpenAI request bodies -> Pipeline.chat arguments (no server needed)."""

from __future__ import annotations

import base64

import pytest

from runtime.openai_chat import RequestError, image_source, parse_chat
from runtime.prompt import Turn

PNG = b"\x89PNG fake bytes"
URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


def img(url=URL, as_dict=True):
    return {"type": "image_url", "image_url": {"url": url} if as_dict else url}


def test_messages_become_history_query_and_images():
    c = parse_chat({"messages": [
        {"role": "system", "content": "S1"}, {"role": "developer", "content": [{"type": "text", "text": "S2"}]},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, img()]},
        {"role": "assistant", "content": "<ref>a</ref><box>(1,2),(3,4)</box>"},
        {"role": "user", "content": "More?"}, {"role": "user", "content": [img(as_dict=False)]}],
        "max_tokens": 5, "temperature": 0, "seed": 3, "stop": "x", "min_tokens": 2,
        "stream": True, "stream_options": {"include_usage": True}})
    assert c.system == "S1\nS2"
    assert c.history == [Turn("What is it?", "<ref>a</ref><box>(1,2),(3,4)</box>", 1)]
    assert c.query == "More?" and c.images == [PNG, PNG]  # history images first
    assert c.generation == {"max_new_tokens": 5, "temperature": 0.0, "seed": 3, "stop": "x",
                            "min_new_tokens": 2}
    assert c.stream and c.include_usage


@pytest.mark.parametrize("body, words", [
    ([], "JSON object"),
    ({"messages": []}, "non-empty"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "follow a user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "last message"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "user", "content": "b"}]}, "before the first user"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "part type"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2.5}, "integer"),
    ({"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}, "number"),
    ({"messages": [{"role": "user", "content": "a"}], "stop": [1]}, "stop"),
    ({"messages": [{"role": "user", "content": "a"}], "tools": [{"x": 1}]}, "tools"),
])
def test_bad_bodies_are_one_line_400s(body, words):
    with pytest.raises(RequestError, match=words) as e:
        parse_chat(body)
    assert e.value.status == 400 and "\n" not in str(e.value)


def test_urls_are_refused_unless_allow_listed(tmp_path):
    p = tmp_path / "x.png"
    p.write_bytes(PNG)
    for url in ("http://example.com/x.png", "https://example.com/x.png", f"file://{p}",
                str(p), "ftp://h/x"):
        with pytest.raises(RequestError, match="refused"):
            image_source(url)
    assert image_source(f"file://{p}", (f"file://{tmp_path}/",)) == p
    with pytest.raises(RequestError, match="base64"):
        image_source("data:image/png;base64,@@@")
    with pytest.raises(RequestError, match="base64"):
        image_source("data:image/png,rawdata")
