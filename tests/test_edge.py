"""The edge plan: int8 vision + int4 decoder with int8 embedding rows, end to end on a nano."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import bundle_variant

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_embedding_rows_dequantise_within_half_a_scale(mode):
    """Every value is within half its block's scale of the fp table (plus the fp16 rounding of
    the row), and onnxruntime's GatherBlockQuantized returns exactly ``dequantized``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quant.embedding import quantize_embedding, table_bytes

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 128)) * rng.uniform(0.01, 2, (300, 1))).astype(np.float32)
    w[7] = 0  # an all-zero row (padding rows of the real table)
    q = quantize_embedding(w, mode, chunk_rows=64)  # chunked == whole
    deq = q.dequantized()
    scale = np.repeat(q.scales.astype(np.float32), q.block_size, axis=1)
    assert np.all(np.abs(deq - w) <= scale / 2 + np.abs(w) * 2.0 ** -11 + 1e-12)
    assert not np.any(deq[7]) and q.nbytes == table_bytes(300, 128, mode)
    whole = quantize_embedding(w, mode, chunk_rows=10 ** 6)
    assert np.array_equal(q.data, whole.data) and np.array_equal(q.scales, whole.scales)

    node = helper.make_node("GatherBlockQuantized", ["data", "ids", "scales"], ["rows"],
                            domain="com.microsoft", bits=q.bits, block_size=q.block_size,
                            gather_axis=0, quantize_axis=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT16, None)],
        initializer=[numpy_helper.from_array(q.data, "data"),
                     numpy_helper.from_array(q.scales, "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, 299, 5, 5])
    assert np.array_equal(sess.run(None, {"ids": ids})[0].astype(np.float32), deq[ids])


def test_edge_decoder_matches_its_same_precision_reference(nano_model, tmp_path):
    """The edge decoder's logits equal the fake-quant model with the same int4 codes, int8 head
    and int8 embedding rows (fp32 activations: only summation order differs), and differ from
    it with the fp16 table."""
    import torch

    from exporters.decoder import export_decoder, run_decoder
    from runtime.engines import open_session
    from quant.embedding import embedding_weight
    from quant.fake_quant import fake_quant_model, rtn_gptq_tensors

    qt = rtn_gptq_tensors(nano_model, group_size=32)
    res = export_decoder(nano_model, tmp_path / "decoder.onnx", plan="edge", quant_tensors=qt,
                         group_size=32, act_dtype="fp32", kv_dtype="fp32", accuracy_level=0,
                         lm_head="int8", embed="int8")  # the int8 head and rows, explicitly
    assert res.op_counts.get("com.microsoft::GatherBlockQuantized") == 1
    assert res.weight_bytes["embedding"] < 0.6 * nano_model.transformer.wte.weight.numel() * 2
    fq = fake_quant_model(nano_model, qt, lm_head="int8")
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp16_table = fq(ids).logits[0].numpy()
        fq.transformer.wte.weight.data = embedding_weight(fq.transformer.wte.weight, "int8")
        ref = fq(ids).logits[0].numpy()
    got = run_decoder(open_session(res.onnx_path, ["CPUExecutionProvider"]), ids.numpy())[0][0]
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert np.abs(got - fp16_table).max() > 10 * np.abs(got - ref).max()


@pytest.fixture(scope="module")
def edge_bundle(nano_ckpt, tmp_path_factory) -> Path:
    """``export.py --plan edge`` on a random nano (validation skipped: random weights are not
    a model to judge drift on; the shipped nano's report is in README)."""
    from exporters.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("edge") / "bundle"
    rep = run_export(ExportOptions(checkpoint=nano_ckpt, plan="edge", out=out, n_calib=8,
                                   skip_validation=True, demo=False))
    return rep.bundle


def test_edge_export_writes_a_bundle_the_runtime_answers_with(edge_bundle, images):
    import onnx

    from runtime import Pipeline
    from runtime.bundle import verify_bundle

    man = verify_bundle(edge_bundle)
    assert man.precision == "edge" and man.data["vision_precision"] == "int8"
    assert not [f for f in man.files if "traced" in f]  # the fp32 graph was only an input
    work = edge_bundle.parent / f"{edge_bundle.name}.work"
    # no drift report, so no candidate bundle (a third copy of the engines at full size)
    assert (work / "vision").is_dir() and not (work / "candidate").exists()
    vision = onnx.load(str(edge_bundle / "vision.onnx"), load_external_data=False)
    ops = {n.op_type for n in vision.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in vision.metadata_props}
    assert meta["qwenvl_edge.precision"] == "int8"
    decoder = onnx.load(str(edge_bundle / "decoder.onnx"), load_external_data=False)
    assert "GatherBlockQuantized" in {n.op_type for n in decoder.graph.node}
    res = Pipeline.from_bundle(edge_bundle, device="cpu", threads=1).chat(
        "What is in the picture?", images=[str(images[0])], max_new_tokens=4,
        temperature=0.0).result()
    assert len(res.token_ids) > 0


def test_broken_int8_vision_scale_fails_at_the_vision_stage(edge_bundle, nano_model, tmp_path):
    """The output projection's per-channel int8 weight scales in reverse channel order (a
    packing bug) FAIL the vision stage of the drift report, which the faithful bundle passes."""
    from calib_data.manifest import load_manifest
    from validate.stages import run_validation

    def reverse_proj_scales(inits):
        return {"proj_scale": inits["proj_scale"][::-1]}

    items = [it for it in load_manifest(ROOT / "calib_data" / "manifest.jsonl")
             if it.split == "validation"][:2]
    broken = bundle_variant(edge_bundle, tmp_path / "broken", "vision", reverse_proj_scales)
    reports = {b.name: run_validation(b, nano_model, items, "edge", stages=("vision",),
                                      threads=1, plots=False) for b in (edge_bundle, broken)}
    assert reports[edge_bundle.name].stages["vision"].verdict == "PASS"
    # measured: cosine 0.980, rel L2 0.21, max-abs 0.29 of the peak (bounds 0.99 / 0.15 / 0.15)
    assert reports["broken"].verdict == "FAIL" and reports["broken"].first_failure == "vision"



def test_bench_edge_decoder_nano():
    """The table/head size-vs-drift bench runs and its sizes follow the formulas."""
    import json
    import subprocess
    import sys

    from quant.embedding import table_bytes

    r = subprocess.run([sys.executable, "-m", "bench.edge_decoder", "--max-items", "2",
                        "--n-calib", "8", "--variants", "fp16:int8", "int8:int8", "int8:int4",
                        "int4/16+mse:gptq/32"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    rows = {(v["embed"], v["lm_head"]): v for v in rec["variants"]}
    assert rows["int8", "int8"]["embed_bytes"] == table_bytes(1088, 128, "int8")  # nano table
    assert rows["int8", "int8"]["embed_bytes"] < rows["fp16", "int8"]["embed_bytes"] / 1.9
    assert rows["int8", "int4/32"]["lm_head_bytes"] < rows["int8", "int8"]["lm_head_bytes"]
    gptq = rows["int4/16+mse", "gptq/32"]  # GPTQ head: the round-to-nearest head's bytes
    assert gptq["lm_head_bytes"] == rows["int8", "int4/32"]["lm_head_bytes"]
    assert gptq["embed_bytes"] == table_bytes(1088, 128, "int4", 16) < table_bytes(1088, 128,
                                                                                     "int8")
    assert rec["head_calib_items"] == 8
    assert all(0 <= v["kl_mean"] and 0 < v["top1"] <= 1 for v in rows.values())
    full = rec["full_size_bytes"]["embed"]
    assert full["int8"] == 151936 * 4096 + 151936 * 2 and full["fp16"] == 151936 * 4096 * 2


def test_edge_cpu_target_keeps_an_int8_kv_calibrated_on_the_calib_split(edge_bundle, nano_ckpt,
                                                                        images):
    """``--plan edge --target cpu``: a kv_scales stage on the calibration items (GPTQ and
    vision stages reused), an int8 cache whose engine holds exactly those scales, a runtime
    that answers with it."""
    import numpy as np

    from exporters.pipeline import KV_SCALES_FILE, ExportOptions, run_export
    from quant.kv_scales import KVScales, read_engine_scales
    from runtime import Pipeline
    from runtime.engines import decoder_contract, open_session

    work = edge_bundle.parent / "bundle.work"
    rep = run_export(ExportOptions(checkpoint=nano_ckpt, plan="edge", cpu=True, n_calib=8,
                                   out=edge_bundle.parent / "cpu", work_dir=work,
                                   skip_validation=True, demo=False))
    stages = {s.name: s for s in rep.stages}
    assert stages["quant"].cached and stages["vision"].cached
    assert stages["kv_scales"].info["items"] == 8
    assert stages["kv_scales"].info["quant_type"] == "PER_CHANNEL"
    stored = KVScales.load(work / "kv_scales" / KV_SCALES_FILE)
    engine = read_engine_scales(rep.bundle / "decoder.onnx")
    np.testing.assert_array_equal(engine.key, stored.key)
    np.testing.assert_array_equal(engine.value, stored.value)
    assert decoder_contract(open_session(rep.bundle / "decoder.onnx", ["CPUExecutionProvider"],
                                         1)).kv_dtype == "int8"
    gpu = read_engine_scales(edge_bundle / "decoder.onnx")  # the gpu target: the same stage's
    np.testing.assert_array_equal(gpu.key, stored.key)  # scales under fp16 activations
    res = Pipeline.from_bundle(rep.bundle, device="cpu", threads=1).chat(
        "What is in the picture?", images=[str(images[0])], max_new_tokens=4,
        temperature=0.0).result()
    assert len(res.token_ids) > 0


def test_int4_head_export_quantises_the_head_with_gptq(edge_bundle, nano_ckpt):
    """``export.py --plan edge --lm-head int4``: the quant stage (cached with the decoder's GPTQ)
    stores a GPTQ head in the GPTQ checkpoint; the engine's head is that head's MatMulNBits form
    (not round-to-nearest), and the same-precision reference multiplies by exactly its weights."""
    import onnx
    import torch
    from onnx import numpy_helper

    from exporters.pipeline import ExportOptions, run_export
    from quant.checkpoint import load_gptq_checkpoint, load_gptq_model
    from quant.lm_head import HEAD_KEY, INT4_GROUP, head_weights
    from quant.packing import dequantize, gptq_to_matmul_nbits

    work = edge_bundle.parent / "bundle.work"  # the edge bundle's stages: vision is reused
    rep = run_export(ExportOptions(checkpoint=nano_ckpt, plan="edge", out=edge_bundle.parent /
                                   "int4-head", work_dir=work, lm_head="int4", n_calib=8,
                                   skip_validation=True, demo=False))
    quant = next(s for s in rep.stages if s.name == "quant")
    assert quant.info["lm_head"] == f"gptq int4 g{INT4_GROUP}"
    assert next(s for s in rep.stages if s.name == "vision").cached
    gptq = work / "quant" / "gptq"
    _, tensors, reader = load_gptq_checkpoint(gptq)
    head = tensors[HEAD_KEY]
    assert head.n_groups == head.in_features // INT4_GROUP
    dec = onnx.load(str(rep.bundle / "decoder.onnx"), load_external_data=True,)
    inits = {t.name: t for t in dec.graph.initializer}
    got = numpy_helper.to_array(inits["lm_head.qweight"])
    assert np.array_equal(got, gptq_to_matmul_nbits(head, INT4_GROUP).B)
    assert not np.array_equal(got, head_weights(reader.get("lm_head.weight"), "int4").B)
    ref = load_gptq_model(gptq, "fp32", lm_head="int4", embed="int8")
    assert torch.equal(ref.lm_head.weight, torch.from_numpy(dequantize(head)))
    int8 = load_gptq_model(gptq, "fp32", lm_head="int8")  # the fp16 head stays the int8's source
    assert not torch.equal(int8.lm_head.weight, ref.lm_head.weight)


def test_gptq_head_decoder_matches_its_same_precision_reference(nano_model, tmp_path):
    """A GPTQ head (act-order: the engine gathers the hidden state first) saved with the GPTQ
    checkpoint: the fp32-activation engine's logits equal its fake-quant reference's."""
    import torch

    from exporters.decoder import WeightSource, export_decoder, run_decoder
    from quant.checkpoint import load_gptq_checkpoint, load_gptq_model, save_gptq_checkpoint
    from quant.fake_quant import rtn_gptq_tensors
    from quant.gptq import QuantConfig
    from quant.lm_head import gptq_head, head_hessian
    from runtime.engines import open_session

    qt = rtn_gptq_tensors(nano_model, group_size=32)
    hidden = [torch.randn(1, 40, 128, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    head = gptq_head(nano_model.lm_head.weight, head_hessian(nano_model.transformer.ln_f, hidden),
                     32, desc_act=True)
    gptq = save_gptq_checkpoint(nano_model, qt, QuantConfig(group_size=32), tmp_path / "gptq",
                                head=head)
    cfg, tensors, _ = load_gptq_checkpoint(gptq)
    res = export_decoder(WeightSource.from_checkpoint(gptq, cfg), tmp_path / "decoder.onnx",
                         plan="edge", quant_tensors=tensors, group_size=32, lm_head="int4",
                         embed="int4", act_dtype="fp32", kv_dtype="fp32", accuracy_level=0)
    ref_model = load_gptq_model(gptq, "fp32", lm_head="int4", embed="int4")  # the edge row
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids).logits[0].numpy()
    got = run_decoder(open_session(res.onnx_path, ["CPUExecutionProvider"]), ids.numpy())[0][0]
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())



@pytest.mark.parametrize("gptq_head_", [False, True])
def test_cpu_reference_rounds_the_int4_heads_inputs_as_the_kernel(nano_model, tmp_path,
                                                                   gptq_head_):
    """MatMulNBits at accuracy level 4 (the cpu target) quantises an int4 head's input to int8
    per head block (in the act-order head's permuted order): the same-precision reference's
    head does the same (before, only an int8 head's input was rounded)."""
    import torch

    from quant.checkpoint import load_gptq_model, save_gptq_checkpoint
    from quant.fake_quant import _block_order, int8_block_quant, rtn_gptq_tensors
    from quant.gptq import QuantConfig
    from quant.lm_head import gptq_head, head_hessian

    head = None
    if gptq_head_:
        hidden = [torch.randn(1, 40, 128, generator=torch.Generator().manual_seed(0))]
        head = gptq_head(nano_model.lm_head.weight,
                         head_hessian(nano_model.transformer.ln_f, hidden), 32, desc_act=True)
    gptq = save_gptq_checkpoint(nano_model, rtn_gptq_tensors(nano_model, group_size=32),
                                QuantConfig(group_size=32), tmp_path / "gptq", head=head)
    ref = load_gptq_model(gptq, "fp32", lm_head="int4", int8_acts=True)
    g_idx = head.g_idx if head is not None else np.arange(128) // 32
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    linear = torch.nn.functional.linear
    want = linear(int8_block_quant(x, _block_order(g_idx)), ref.lm_head.weight)
    with torch.no_grad():
        got = ref.lm_head(x)
    assert torch.equal(got, want)
    assert not torch.equal(got, linear(x, ref.lm_head.weight))
