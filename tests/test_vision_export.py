"""Vision engine export (issue 4): fp32 / fp16-with-fp32-islands ONNX, checked on real photos.

Nano tower (56 px, 16 patches, 2 layers): each export takes seconds. Exports are shared per module.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import tensorrt as trt_mod
from exporters.vision import (EMBEDS, PIXELS, VisionCheckError, VisionTolerances, check_pixels,
                              compare_vision, export_vision, graph_summary, make_session,
                              onnx_metadata, reference_features, run_session)

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def visual(nano_ckpt):
    from models.checkpoint import load_model

    v = load_model(nano_ckpt, "fp32", prefixes=["transformer.visual."]).transformer.visual
    v.freeze_position_tables()
    return v


@pytest.fixture(scope="module")
def fp32_export(nano_ckpt, tmp_path_factory):
    # From the checkpoint directory: also covers loading only transformer.visual.*
    return export_vision(nano_ckpt, tmp_path_factory.mktemp("v32") / "vision.onnx", "fp32")


@pytest.fixture(scope="module")
def fp16_export(visual, tmp_path_factory):
    return export_vision(visual, tmp_path_factory.mktemp("v16") / "vision.onnx", "fp16")


@pytest.fixture(scope="module")
def photos(visual):
    return check_pixels(["astronaut", "chelsea", "coffee"], visual.cfg.image_size)


def _block_layout(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The classic exporter bug: per-head [h][q|k|v] rows read as MultiheadAttention's [Q;K;V]."""
    hd = t.shape[0] // (3 * heads)
    return t.reshape(heads, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


@pytest.fixture(scope="module")
def misperm_failure(visual, fp32_export, tmp_path_factory):
    """Export a tower with mis-permuted q/k/v over an existing good engine; keep what happened."""
    bad = copy.deepcopy(visual)
    with torch.no_grad():
        for blk in bad.transformer.resblocks:
            for t in (blk.attn.in_proj.weight, blk.attn.in_proj.bias):
                t.copy_(_block_layout(t, bad.cfg.heads))
    out_dir = tmp_path_factory.mktemp("misperm")
    target = out_dir / "vision.onnx"
    shutil.copy(fp32_export.onnx_path, target)  # a previous, good engine must survive
    before = target.read_bytes()
    with pytest.raises(VisionCheckError) as ei:
        export_vision(bad, target, "fp32", reference=visual)
    return ei.value, out_dir, before


# ---- fp32 -----------------------------------------------------------------------------------

def test_fp32_export_matches_pytorch_tightly(fp32_export):
    r = fp32_export
    assert r.passed and len(r.metrics) == 3
    assert [m.name for m in r.metrics] == ["astronaut", "chelsea", "coffee"]
    for m in r.metrics:
        assert m.cosine >= 0.999999, m.line()
        assert m.rel_l2 < 1e-5 and m.max_abs_rel < 1e-5, m.line()
        assert m.nan == 0 and m.inf == 0
    assert r.batch_consistency_max_abs is not None and r.batch_consistency_max_abs < 1e-5


def test_engine_contract_and_graph(fp32_export, visual):
    cfg = visual.cfg
    g = graph_summary(fp32_export.onnx_path)
    assert g["inputs"] == [{"name": PIXELS, "dtype": "float32",
                            "shape": ["batch", 3, cfg.image_size, cfg.image_size]}]
    assert g["outputs"] == [{"name": EMBEDS, "dtype": "float32",
                             "shape": ["batch", cfg.n_queries, cfg.output_dim]}]
    assert g["ir_version"] <= 10 and g["opsets"] == {"ai.onnx": 18}
    # Position tables precomputed and the query path folded: no Resize, no Expand/Shape chains.
    for op in ("Resize", "Expand", "Shape", "ConstantOfShape", "Cast"):
        assert op not in g["op_counts"], g["op_counts"]
    assert g["op_counts"]["LayerNormalization"] == 2 * cfg.layers + 3  # ln_pre, blocks, kv, post
    assert not g["external_data"] and not Path(str(fp32_export.onnx_path) + ".data").exists()
    meta = onnx_metadata(fp32_export.onnx_path)
    assert meta["precision"] == "fp32" and meta["n_queries"] == str(cfg.n_queries)
    assert not list(fp32_export.onnx_path.parent.glob(".vision.onnx.tmp-*"))


# ---- fp16 -----------------------------------------------------------------------------------

def test_fp16_export_on_real_photos(fp16_export):
    r = fp16_export
    assert r.passed
    for m in r.metrics:
        assert m.cosine >= 0.9995, m.line()
        assert m.nan == 0 and m.inf == 0


def test_fp16_graph_keeps_fp32_islands(fp16_export):
    g = fp16_export.graph
    # I/O stays float32 (cast after the input, back before the output).
    assert g["inputs"][0]["dtype"] == "float32" and g["outputs"][0]["dtype"] == "float32"
    assert g["op_counts"]["Cast"] > 0
    # The islands are real: every LayerNormalization and Softmax takes float32 ...
    assert set(g["layernorm_input_dtypes"]) == {"float32"}
    assert set(g["softmax_input_dtypes"]) == {"float32"}
    # ... while the matmuls and the weights are fp16.
    assert set(g["matmul_input_dtypes"]) == {"float16"}
    w = g["weight_dtypes"]
    assert w["float16"] > 20 * w.get("float32", 0)


def test_ort_session_helper_picks_extended_for_fp16_on_cpu(fp16_export, fp32_export):
    import onnxruntime as ort

    s16 = make_session(fp16_export.onnx_path, ["CPUExecutionProvider"])
    s32 = make_session(fp32_export.onnx_path, ["CPUExecutionProvider"])
    lv = ort.GraphOptimizationLevel
    assert s16.get_session_options().graph_optimization_level == lv.ORT_ENABLE_EXTENDED
    assert s32.get_session_options().graph_optimization_level == lv.ORT_ENABLE_ALL
    assert not s16.get_session_options().enable_cpu_mem_arena  # fp32 weight casts given back


# ---- dynamic batch --------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["fp32", "fp16"])
def test_dynamic_batch_1_and_3(which, fp32_export, fp16_export, visual, photos):
    res = fp32_export if which == "fp32" else fp16_export
    names, px = photos
    ref = reference_features(visual, px)
    sess = make_session(res.onnx_path)
    out3 = run_session(sess, px)
    out1 = np.concatenate([run_session(sess, px[i:i + 1]) for i in range(3)])
    cfg = visual.cfg
    assert out3.shape == (3, cfg.n_queries, cfg.output_dim) and out3.dtype == np.float32
    assert run_session(sess, px[:1]).shape == (1, cfg.n_queries, cfg.output_dim)
    np.testing.assert_allclose(out1, out3, atol=1e-5 if which == "fp32" else 2e-3, rtol=0)
    tol = VisionTolerances.for_precision(which)
    metrics = compare_vision(res.onnx_path, ref, px, names=names, tolerances=tol, batch_size=1,
                             session=sess)
    assert [m.passed for m in metrics] == [True] * 3, [m.line() for m in metrics]


# ---- faults the check must catch ------------------------------------------------------------

def test_check_fails_on_misplaced_qkv_split(misperm_failure):
    err, _, _ = misperm_failure
    msg = str(err)
    assert "FAILED" in msg and "not written" in msg
    assert "cosine 0." in msg and "rel L2" in msg  # the numbers are in the message
    assert len(err.metrics) == 3 and not any(m.passed for m in err.metrics)
    assert all(m.cosine < 0.99 for m in err.metrics)


def test_no_file_written_on_failure(misperm_failure):
    _, out_dir, before = misperm_failure
    assert (out_dir / "vision.onnx").read_bytes() == before  # the old engine is untouched
    assert sorted(p.name for p in out_dir.iterdir()) == ["vision.onnx"]  # no temp, no .data


def test_fp16_without_islands_overflows_and_check_fails(visual, tmp_path):
    # A tower whose residual stream runs past fp16's 65504 (large ln_pre gain): the naive fp16
    # graph turns it into Inf -> NaN; the fp32 islands carry it.
    big = copy.deepcopy(visual)
    with torch.no_grad():
        big.ln_pre.weight.mul_(3e4)
        big.ln_pre.bias.mul_(3e4)
    naive = tmp_path / "naive" / "vision.onnx"
    with pytest.raises(VisionCheckError) as ei:
        export_vision(big, naive, "fp16", fp32_islands=False, write_trt_script=False)
    msg = str(ei.value)
    assert "NaN" in msg and "FAILED" in msg
    assert all(m.nan + m.inf > 0 for m in ei.value.metrics)
    assert not naive.exists() and list(naive.parent.iterdir()) == []
    ok = export_vision(big, tmp_path / "islands" / "vision.onnx", "fp16", write_trt_script=False)
    assert all(m.cosine >= 0.9995 for m in ok.metrics), [m.line() for m in ok.metrics]


def test_tolerances_per_precision():
    t32, t16 = VisionTolerances.for_precision("fp32"), VisionTolerances.for_precision("fp16")
    assert t32.min_cosine >= 0.99999 and t16.min_cosine == 0.9995
    with pytest.raises(ValueError):
        VisionTolerances.for_precision("int3")


def test_check_images_use_the_runtime_preprocessing(visual):
    names, px = check_pixels(["astronaut", "rocket"], visual.cfg.image_size)
    assert names == ["astronaut", "rocket"] and px.dtype == np.float32
    assert px.shape == (2, 3, visual.cfg.image_size, visual.cfg.image_size)
    import skimage.data

    from runtime import image

    np.testing.assert_array_equal(
        px[0], np.asarray(image.preprocess(skimage.data.astronaut(), visual.cfg.image_size)))


# ---- TensorRT -------------------------------------------------------------------------------

def _decode(d: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(d["array"])), allow_pickle=False)


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_trt_commands_written_and_runnable(fp16_export, visual, photos, tmp_path):
    src = fp16_export.onnx_path.parent
    files = {p.name for p in fp16_export.files}
    assert {"vision.onnx", trt_mod.SCRIPT_NAME, trt_mod.CHECK_INPUTS,
            trt_mod.CHECK_REFERENCE} <= files
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    script = bundle / trt_mod.SCRIPT_NAME
    assert os.access(script, os.X_OK)
    text = " ".join(script.read_text().replace("\\\n", " ").split())  # one line per command
    S = visual.cfg.image_size
    for flag in ("--stronglyTyped", f"--minShapes={PIXELS}:1x3x{S}x{S}",
                 f"--optShapes={PIXELS}:1x3x{S}x{S}", f"--maxShapes={PIXELS}:4x3x{S}x{S}",
                 "--timingCacheFile=", "--saveEngine=", "--onnx=vision.onnx",
                 "--trt --onnxrt", "--strongly-typed", f"--trt-max-shapes '{PIXELS}:[4,3,{S},{S}]'",
                 "--load-inputs vision_check_inputs.json",
                 "--load-outputs vision_reference_outputs.json",
                 "--cosine-similarity-threshold 0.9995", "--graph-optimization-level"):
        assert flag in text, flag
    subprocess.run(["bash", "-n", str(script)], check=True)

    # Run it for real with stand-ins for trtexec / polygraphy that record their arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    _stub(bin_dir / "trtexec", f'if [ "${{1:-}}" = --help ]; then echo "&&&& RUNNING '
          f'TensorRT.trtexec [TensorRT v100300] [b26]"; exit 0; fi\necho "trtexec $*" >> {log}\n')
    _stub(bin_dir / "polygraphy", f'echo "polygraphy $*" >> {log}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "GPU_NAME": "NVIDIA Jetson AGX Orin (64GB)", "TRTEXEC": str(bin_dir / "trtexec"),
           "POLYGRAPHY": str(bin_dir / "polygraphy")}
    env.pop("TRT_VERSION", None)
    proc = subprocess.run([str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    engine_dir = trt_mod.engine_dir_name("NVIDIA Jetson AGX Orin (64GB)", "10.3.0")
    assert engine_dir == "engines/nvidia-jetson-agx-orin-64gb-trt10.3.0"
    assert calls[0].startswith("trtexec --onnx=vision.onnx --stronglyTyped")
    assert f"--saveEngine={engine_dir}/vision.plan" in calls[0]
    assert f"--timingCacheFile={engine_dir}/timing.cache" in calls[0]
    assert (bundle / engine_dir).is_dir()
    assert calls[1].startswith("polygraphy run vision.onnx --trt --onnxrt --strongly-typed")
    assert calls[2].startswith(f"polygraphy run {engine_dir}/vision.plan --model-type engine")
    assert len(calls) == 3
    assert not any("--fp16" in c for c in calls)  # strongly typed: the graph's dtypes rule

    # The check data are the real photos and the PyTorch fp32 features, in polygraphy's format.
    _, px = photos
    feeds = json.loads((bundle / trt_mod.CHECK_INPUTS).read_text())
    np.testing.assert_array_equal(_decode(feeds[0][PIXELS]), px)
    rr = json.loads((bundle / trt_mod.CHECK_REFERENCE).read_text())
    assert rr["polygraphy_class"] == "RunResults" and rr["lst"][0][0] == "pytorch-fp32"
    ref = _decode(rr["lst"][0][1][0]["outputs"][EMBEDS]["values"])
    np.testing.assert_allclose(ref, reference_features(visual, px), rtol=0, atol=1e-6)

    # Without check data (e.g. rewritten by the bundle stage): random inputs, no stale files,
    # the precision read from the model's metadata.
    script2 = trt_mod.write_trt_commands(bundle / "vision.onnx", bundle, max_batch=8)
    assert script2 == script and trt_mod.trt_command_files(bundle) == [script]
    text2 = " ".join(script2.read_text().replace("\\\n", " ").split())
    assert f"--maxShapes={PIXELS}:8x3x{S}x{S}" in text2 and "--input-shapes" in text2
    assert "--cosine-similarity-threshold 0.9995" in text2 and "--load-outputs" not in text2


@pytest.mark.skipif(importlib.util.find_spec("polygraphy") is None,
                    reason="polygraphy is not installed (optional); the command file is tested")
def test_polygraphy_onnxrt_matches_saved_reference(fp16_export, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(fp16_export.onnx_path.parent, bundle)
    main = ("import sys; from polygraphy.tools import main; sys.argv[0] = 'polygraphy'; "
            "sys.exit(main())")
    cmd = [sys.executable, "-c", main, "run", "vision.onnx", "--onnxrt",
           "--providers", "cpu", "--graph-optimization-level", "ORT_ENABLE_EXTENDED",
           "--load-inputs", trt_mod.CHECK_INPUTS, "--load-outputs", trt_mod.CHECK_REFERENCE,
           "--compare", "simple", "cosine_similarity", "--cosine-similarity-threshold", "0.9995",
           "--check-error-stat", "max", "--atol", "0.2", "--rtol", "0"]
    proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_build_engine_without_tensorrt_says_what_to_do(fp16_export, tmp_path):
    if HAS_TRT:
        pytest.skip("tensorrt is importable here")
    with pytest.raises(trt_mod.TensorRTUnavailable, match=trt_mod.SCRIPT_NAME):
        trt_mod.build_engine(fp16_export.onnx_path, tmp_path)


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT is not installable on this machine (no wheel); "
                                        "the command file is tested instead")
def test_build_engine_strongly_typed(fp16_export, tmp_path):
    build = trt_mod.build_engine(fp16_export.onnx_path, tmp_path, 1, 1, 3)
    assert build.plan.is_file() and build.plan.stat().st_size > 0
    assert build.plan.parent.name == f"{trt_mod.slug(build.gpu)}-trt{build.trt_version}"
    assert build.timing_cache.is_file()
    meta = json.loads(build.metadata.read_text())
    assert meta["strongly_typed"] and meta["profile"]["max"][0] == 3
