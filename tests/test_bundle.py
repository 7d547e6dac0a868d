"""Bundles: exporters/bundle.py writes (atomically, with checksums); runtime/bundle.py refuses
anything that does not match, naming the file and the fix; the pipeline keeps working."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest



def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(bundle: Path, fn) -> None:
    p = bundle / "manifest.json"
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def test_manifest_contents(fp32_bundle):
    from runtime.bundle import FORMAT_VERSION, sha256_file, verify_bundle

    man = verify_bundle(fp32_bundle)
    d = man.data
    assert d["format_version"] == FORMAT_VERSION
    for k in ("toolkit", "torch", "onnx", "onnxruntime"):
        assert d["versions"][k]
    assert len(d["source"]["index_sha256"]) == 64 and d["precision"] == "fp32"
    m = man.model
    assert (m["layers"], m["heads"], m["head_dim"], m["max_context"]) == (2, 4, 32, 2048)
    assert m["special_ids"]["img_pad"] == m["special_ids"]["img_start"] + 2
    assert d["generation"]["top_p"] == 0.3
    dec = {i["name"]: i for i in d["engines"]["decoder"]["inputs"]}
    assert dec["past_key_values.1.value"]["dtype"] == "float32"
    assert d["engines"]["vision"]["outputs"][0]["name"] == "image_embeds"
    assert set(man.files) == {"vision.onnx", "decoder.onnx", "decoder.onnx.data",
                              "tokenizer/qwen.tiktoken"}
    for name, info in man.files.items():
        f = fp32_bundle / name
        assert info == {"sha256": sha256_file(f), "size": f.stat().st_size}
    assert not [p for p in fp32_bundle.parent.iterdir() if ".tmp-" in p.name]


def test_write_bundle_is_atomic(tmp_path):
    from exporters.bundle import write_bundle
    from runtime.bundle import BundleError, read_manifest

    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    out = tmp_path / "b"
    fields = {"model": {k: 1 for k in ("vocab_size", "n_queries", "image_size", "hidden",
                                       "layers", "heads", "head_dim", "max_context")}}
    fields["model"]["special_ids"] = {}  # an object of ints (read_manifest checks the types)
    write_bundle(out, {"sub/a.bin": src}, fields)
    assert read_manifest(out).files["sub/a.bin"]["size"] == 3
    before = (out / "manifest.json").read_bytes()
    # a failing write leaves the previous bundle untouched and no temporary directory behind
    with pytest.raises(BundleError, match="missing.bin does not exist"):
        write_bundle(out, {"sub/a.bin": src, "b.bin": tmp_path / "missing.bin"}, fields)
    with pytest.raises(BundleError, match="inside the bundle"):
        write_bundle(out, {"../escape.bin": src}, fields)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b"]


CASES = {
    "no-manifest": (lambda b: (b / "manifest.json").unlink(), r"manifest.json is missing"),
    "garbage-manifest": (lambda b: (b / "manifest.json").write_text("{nope"),
                         r"manifest.json is unreadable .*re-copy"),
    "newer-format": (lambda b: _edit_manifest(b, lambda d: d.update(format_version=99)),
                     r"format version 99 is newer .*upgrade qwenvl-edge"),
    "older-format": (lambda b: _edit_manifest(b, lambda d: d.update(format_version=0)),
                     r"format version 0 is too old .*re-export the bundle with this toolkit"),
    "missing-data": (lambda b: (b / "decoder.onnx.data").unlink(),
                     r"decoder.onnx.data is missing from the bundle: re-copy"),
    "altered": (lambda b: _flip_byte(b / "vision.onnx"),
                r"vision.onnx was altered or truncated \(sha256 mismatch\): re-copy the bundle"),
    "truncated": (lambda b: _truncate(b / "decoder.onnx.data"),
                  r"decoder.onnx.data was altered or truncated \(\d+ bytes, the manifest says"),
    "unlisted-tokenizer": (lambda b: _edit_manifest(
        b, lambda d: d["files"].pop("tokenizer/qwen.tiktoken")),
        r"does not list tokenizer/qwen.tiktoken"),
    "traversal": (lambda b: _edit_manifest(
        b, lambda d: d["files"].update({"../../etc/passwd": {"sha256": "0" * 64}})),
        r"'../../etc/passwd' points outside the bundle"),
    "no-model-facts": (lambda b: _edit_manifest(b, lambda d: d["model"].pop("n_queries")),
                       r"lacks model facts \['n_queries'\]"),
    "special-ids": (lambda b: _edit_manifest(
        b, lambda d: d["model"]["special_ids"].update(im_end=5)),
        r"qwen.tiktoken does not match the manifest's special ids"),
}


def _flip_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def test_bad_bundles_are_refused_and_the_good_one_still_loads(fp32_bundle, tmp_path, images):
    from runtime import BundleError, Pipeline

    for name, (mutate, msg) in CASES.items():
        b = _copy(fp32_bundle, tmp_path / name)
        mutate(b)
        with pytest.raises(BundleError, match=msg) as e:
            Pipeline.from_bundle(b, device="cpu")
        assert "\n" not in str(e.value)
        if name not in ("no-manifest", "special-ids", "traversal"):
            assert str(b) in str(e.value)  # names the file
    p = Pipeline.from_bundle(fp32_bundle, device="cpu", threads=1)
    assert p.chat("ok", images=images[:1], temperature=0, max_new_tokens=3).result().text
    assert Pipeline.from_bundle(fp32_bundle, device="cpu", verify=False).device == "cpu"
    with pytest.raises(BundleError, match="bundle directory not found"):
        Pipeline.from_bundle(tmp_path / "nowhere")


def test_unlisted_file_is_ignored_with_a_warning(fp32_bundle, tmp_path, caplog):
    from runtime.bundle import verify_bundle

    b = _copy(fp32_bundle, tmp_path / "extra")
    (b / "stray.onnx").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="runtime.bundle"):
        verify_bundle(b)
    assert "unlisted file stray.onnx" in caplog.text


def test_tensorrt_plan_selection(fp32_bundle, tmp_path, caplog):
    from runtime import BundleError, EngineError, Pipeline
    from runtime.bundle import read_manifest, select_trt_plan

    b = _copy(fp32_bundle, tmp_path / "trt")
    plan = "engines/GPU-X-trt10.3.0/vision.plan"
    _edit_manifest(b, lambda d: d["engines"].update(tensorrt=[{
        "engine": "vision", "file": plan, "tensorrt_version": "10.3.0", "gpu": "GPU X"}]))
    # a plan is opened only when the manifest's files (checksums) cover it
    _edit_manifest(b, lambda d: d["files"].update({plan: {"sha256": "0" * 64, "size": 0}}))
    man = read_manifest(b)
    assert select_trt_plan(man, "vision", "10.3.0", "GPU X") == b / plan
    with caplog.at_level(logging.WARNING, logger="runtime.bundle"):
        assert select_trt_plan(man, "vision", "10.4.1", "GPU X") is None
        assert select_trt_plan(man, "vision", "10.3.0", "GPU Y") is None
        assert select_trt_plan(man, "vision", None, None) is None
    assert "built with TensorRT 10.3.0 but 10.4.1 is installed: rebuild" in caplog.text
    assert "built for GPU 'GPU X' but this is 'GPU Y'" in caplog.text
    with pytest.raises(BundleError, match="TensorRT 10.3.0 but 10.4.1"):
        select_trt_plan(man, "vision", "10.4.1", "GPU X", required=True)
    with pytest.raises(BundleError, match="lists no TensorRT plan"):
        select_trt_plan(read_manifest(fp32_bundle), "vision", "10.3.0", "GPU X", required=True)
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(EngineError, match="install onnxruntime-gpu"):
            Pipeline.from_bundle(fp32_bundle, device="tensorrt")
        with pytest.raises(EngineError, match="install onnxruntime-gpu"):
            Pipeline.from_bundle(fp32_bundle, device="cuda")
    with pytest.raises(EngineError, match="unknown device 'tpu'"):
        Pipeline.from_bundle(fp32_bundle, device="tpu")
