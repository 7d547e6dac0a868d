"""The runtime opens only what the manifest's checksums cover (issue 18, item 2), and a repeat
start does not re-hash an unchanged bundle (verified stamp)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENVL_EDGE_CACHE", str(tmp_path / "cache"))


def _copy(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        p = dst / "manifest.json"
        d = json.loads(p.read_text())
        edit(d)
        p.write_text(json.dumps(d))
    return dst


def _engine(d: dict, eng: str, value) -> None:
    d["engines"][eng]["file"] = value


ESCAPES = {
    "vision-absolute": (lambda outside: lambda d: _engine(d, "vision", str(outside)),
                        "points outside the bundle"),
    "vision-dotdot": (lambda outside: lambda d: _engine(d, "vision", "../x/vision.onnx"),
                      "points outside the bundle"),
    "decoder-etc-passwd": (lambda outside: lambda d: _engine(d, "decoder", "/etc/passwd"),
                           "points outside the bundle"),
    "decoder-unlisted": (lambda outside: lambda d: _engine(d, "decoder", "spare.onnx"),
                         "not listed in files"),
    "decoder-not-a-string": (lambda outside: lambda d: _engine(d, "decoder", 7),
                             "not a non-empty string"),
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_engine_paths_outside_the_checksums_are_refused(fp32_bundle, tmp_path, case):
    from runtime import Pipeline
    from runtime.bundle import BundleError

    outside = tmp_path / "x" / "vision.onnx"
    outside.parent.mkdir()
    shutil.copyfile(fp32_bundle / "vision.onnx", outside)
    make, pattern = ESCAPES[case]
    b = _copy(fp32_bundle, tmp_path / "b", make(outside))
    shutil.copyfile(fp32_bundle / "decoder.onnx", b / "spare.onnx")
    with pytest.raises(BundleError, match=pattern):
        Pipeline.from_bundle(b, device="cpu", threads=1)


def test_symlink_out_of_the_bundle_is_refused(fp32_bundle, tmp_path):
    from runtime.bundle import BundleError, verify_bundle

    b = _copy(fp32_bundle, tmp_path / "b")
    real = tmp_path / "elsewhere.tiktoken"
    shutil.move(b / "tokenizer" / "qwen.tiktoken", real)  # same bytes: the checksum matches
    (b / "tokenizer" / "qwen.tiktoken").symlink_to(real)
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(b)


def test_unlisted_trt_plan_is_not_opened(fp32_bundle, tmp_path):
    from runtime.bundle import BundleError, select_trt_plan, verify_bundle

    plan = {"engine": "vision", "file": "engines/gpu-trt10/vision.plan", "tensorrt_version": "10",
            "gpu": "G"}
    b = _copy(fp32_bundle, tmp_path / "b", lambda d: d["engines"].update(tensorrt=[plan]))
    (b / "engines" / "gpu-trt10").mkdir(parents=True)
    (b / "engines" / "gpu-trt10" / "vision.plan").write_bytes(b"not covered")
    man = verify_bundle(b)
    assert select_trt_plan(man, "vision", "10", "G") is None
    with pytest.raises(BundleError, match="not listed in files"):
        select_trt_plan(man, "vision", "10", "G", required=True)


@pytest.mark.parametrize("where,value", [("hidden", "abc"), ("layers", 2.5), ("max_context", None),
                                         ("special_ids", [1, 2])])
def test_manifest_fields_that_are_not_ints_are_named(fp32_bundle, tmp_path, where, value):
    from runtime.bundle import BundleError, verify_bundle

    b = _copy(fp32_bundle, tmp_path / "b", lambda d: d["model"].update({where: value}))
    with pytest.raises(BundleError, match=rf"model\.{where} must be"):
        verify_bundle(b)
    b2 = _copy(fp32_bundle, tmp_path / "b2",
               lambda d: d["files"]["vision.onnx"].update(size="12x"))
    with pytest.raises(BundleError, match=r"files\.vision\.onnx\.size must be an integer"):
        verify_bundle(b2)


def test_repeat_start_skips_hashing_until_a_file_changes(fp32_bundle, tmp_path, monkeypatch):
    import runtime.bundle as rb

    hashed: list[str] = []
    real = rb.sha256_file
    monkeypatch.setattr(rb, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    b = _copy(fp32_bundle, tmp_path / "b")
    n_files = len(rb.read_manifest(b).files)
    rb.verify_bundle(b)
    assert len(hashed) == n_files
    hashed.clear()
    rb.verify_bundle(b)
    assert hashed == []  # repeat start: nothing re-hashed
    # same size, same mtime, different bytes: ctime moved, so it is hashed again and refused
    f = b / "vision.onnx"
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(rb.BundleError, match="vision.onnx was altered"):
        rb.verify_bundle(b)
    assert hashed == ["vision.onnx"]
    # a copy elsewhere (new path, new inodes) is hashed in full
    hashed.clear()
    c = _copy(fp32_bundle, tmp_path / "c")
    rb.verify_bundle(c)
    assert len(hashed) == n_files
    hashed.clear()
    rb.verify_bundle(c, stamp=False)
    assert len(hashed) == n_files


def test_corrupt_or_foreign_stamp_is_ignored(fp32_bundle, tmp_path, monkeypatch):
    import runtime.bundle as rb

    b = _copy(fp32_bundle, tmp_path / "b")
    rb.verify_bundle(b)
    stamp = rb._stamp_path(b)
    stamp.write_text("{broken")
    rb.verify_bundle(b)  # re-hashes and rewrites it
    assert json.loads(stamp.read_text())["bundle"] == os.path.realpath(b)
    d = json.loads(stamp.read_text())
    d["files"]["vision.onnx"][-1] = "0" * 64  # a stamp for other content does not vouch
    stamp.write_text(json.dumps(d))
    f = b / "vision.onnx"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(rb.BundleError, match="altered"):
        rb.verify_bundle(b)


def test_threads_must_be_positive(fp32_bundle, capsys):
    from runtime import Pipeline
    from runtime.__main__ import main

    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Pipeline.from_bundle(fp32_bundle, device="cpu", threads=-3)
    with pytest.raises(SystemExit) as e:
        main(["--bundle", str(fp32_bundle), "--prompt", "hi", "--threads", "-3"])
    assert e.value.code == 2 and "--threads: must be at least 1" in capsys.readouterr().err
