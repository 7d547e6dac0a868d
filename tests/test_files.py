"""runtime/files.py: the one sha256-of-a-file and the one atomic-write family."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from runtime.files import (atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text,
                           sha256_file, staging_dir)


def test_sha256_does_not_depend_on_the_chunk(tmp_path):
    data = os.urandom(3 * 1024 + 17)
    p = tmp_path / "blob"
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert {sha256_file(p, chunk) for chunk in (1, 7, 1024, 1 << 20)} == {want}
    assert sha256_file(p) == want


def test_atomic_writes(tmp_path):
    umask = os.umask(0o022)
    try:
        p = atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")
        assert p.read_bytes() == b"\x00\x01"
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # like open(), not mkstemp's 0600
        s = atomic_write_bytes(tmp_path / "run.sh", b"#!/bin/sh\n", mode=0o755)
        assert stat.S_IMODE(s.stat().st_mode) == 0o755
    finally:
        os.umask(umask)
    t = atomic_write_text(tmp_path / "t.txt", "é\nx\n")
    assert t.read_bytes() == "é\nx\n".encode()
    j = atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    assert j.read_text() == json.dumps({"b": 1, "a": [1, 2]}, indent=2) + "\n"
    atomic_write_text(t, "replaced")
    assert t.read_text() == "replaced"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["j.json", "run.sh", "sub", "t.txt"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = atomic_write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(p, "ünïcode", encoding="ascii")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["keep.txt"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    assert [x.name for x in target.iterdir()] == ["a"]
    with pytest.raises(FileExistsError, match="non-empty directory"):  # not ours to replace
        with atomic_dir(target):
            pass
    ours = lambda t: None  # noqa: E731 - the caller vouches that it wrote ``target``
    with pytest.raises(RuntimeError):
        with atomic_dir(target, ours) as d:
            (d / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert [x.name for x in target.iterdir()] == ["a"]  # untouched
    with atomic_dir(target, ours) as d:
        (d / "c").write_text("3")
    assert [x.name for x in target.iterdir()] == ["c"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]  # no .tmp / .old left


def test_staging_dir_is_removed(tmp_path):
    with staging_dir(tmp_path / "engine.onnx") as d:
        (d / "x").write_text("1")
        os.replace(d / "x", tmp_path / "engine.onnx")
    assert [x.name for x in tmp_path.iterdir()] == ["engine.onnx"]
