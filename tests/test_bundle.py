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


def test_register_trt_plan_lists_it_and_the_runtime_selects_it(fp32_bundle, tmp_path, capsys,
                                                                monkeypatch):
    """`python -m exporters.tensorrt register` with a stand-in plan (TensorRT is absent here)."""
    from exporters.tensorrt import engine_dir_name, main
    from runtime.bundle import select_trt_plan, verify_bundle

    monkeypatch.delenv("TRT_VERSION", raising=False)
    b = _copy(fp32_bundle, tmp_path / "b")
    before = json.loads((b / "manifest.json").read_text())
    rel = f"{engine_dir_name('GPU X', '10.3.0')}/vision.plan"
    (b / rel).parent.mkdir(parents=True)
    (b / rel).write_bytes(b"stand-in TensorRT plan")
    (b / rel).with_name("timing.cache").write_bytes(b"cache")
    assert main(["register", "--bundle", str(b), "--plan", rel, "--tensorrt-version", "10.3.0.26",
                 "--gpu", "GPU X"]) == 0
    man = verify_bundle(b)  # the plan and its timing cache are listed with their hashes
    assert man.trt_plans() == [{"engine": "vision", "file": rel, "tensorrt_version": "10.3.0",
                                "gpu": "GPU X"}]
    assert {rel, rel.replace("vision.plan", "timing.cache")} <= set(man.files)
    after = dict(man.data)
    assert {k: v for k, v in after.items() if k not in ("engines", "files")} == \
        {k: v for k, v in before.items() if k not in ("engines", "files")}
    assert {k: v for k, v in after["engines"].items() if k != "tensorrt"} == before["engines"]
    assert all(after["files"][k] == v for k, v in before["files"].items())
    # tensorrt.__version__ carries a build number; the plan matches on major.minor.patch.
    assert select_trt_plan(man, "vision", "10.3.0.26", "GPU X") == b / rel
    assert select_trt_plan(man, "vision", "10.3.0", None) == b / rel
    assert select_trt_plan(man, "vision", "10.4.1", "GPU X") is None
    assert select_trt_plan(man, "vision", "10.3.0", "GPU Y") is None
    assert select_trt_plan(man, "vision", None, "GPU X") is None

    # Registering again replaces the entry; a plan from outside is copied in, facts from its
    # build sidecar (what build_engine writes).
    outside = tmp_path / "built" / "vision.plan"
    outside.parent.mkdir()
    outside.write_bytes(b"another stand-in plan")
    outside.with_name("vision.plan.json").write_text(json.dumps({"tensorrt": "10.7.0.1",
                                                                 "gpu": "Orin"}))
    assert main(["register", "--bundle", str(b), "--plan", rel, "--tensorrt-version", "10.3.0",
                 "--gpu", "GPU X"]) == 0
    assert main(["register", "--bundle", str(b), "--plan", str(outside)]) == 0
    man = verify_bundle(b)
    copied = f"{engine_dir_name('Orin', '10.7.0')}/vision.plan"
    assert [p["file"] for p in man.trt_plans()] == [rel, copied]
    assert (b / copied).read_bytes() == outside.read_bytes()
    assert select_trt_plan(man, "vision", "10.7.0.1", "Orin") == b / copied
    assert not list(b.glob(".manifest.json.*.tmp"))
    capsys.readouterr()

    # Failures: one line, exit 2, the manifest untouched.
    text = (b / "manifest.json").read_text()
    (tmp_path / "bare.plan").write_bytes(b"x")
    for argv, msg in (
            (["--plan", "engines/none/vision.plan", "--tensorrt-version", "10.3.0"], "not found"),
            (["--plan", str(tmp_path / "bare.plan")], "pass --tensorrt-version")):
        assert main(["register", "--bundle", str(b), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    (b / rel).write_bytes(b"stand-in TensorRT plaN")  # same size, other bytes
    assert main(["register", "--bundle", str(b), "--plan", copied]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert (b / "manifest.json").read_text() == text


def test_runtime_points_to_the_commands_that_exist(fp32_bundle):
    from runtime.bundle import BundleError, read_manifest, select_trt_plan

    with pytest.raises(BundleError, match="exporters.tensorrt register") as e:
        select_trt_plan(read_manifest(fp32_bundle), "vision", "10.3.0", "GPU X", required=True)
    assert "export.py tensorrt" not in str(e.value)
