"""int8 KV cache on the GroupQueryAttention decoder: onnxruntime's kernel against the PyTorch
mirror (quant/kv_scales.py) on a tiny graph and on the nano decoder, the contract and runtime
with an int8 cache, the plan-table rules and the planner's bytes."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from exporters.decoder import DecoderExportError, export_decoder, greedy_generate, run_decoder
from quant.kv_scales import (KVScaleError, KVScales, calibrate_kv_scales, fake_quant_kv,
                             int8_kv, read_engine_scales)
from quant.plans import PLANS, TargetSettings
from runtime.contract import ContractError, DecoderIO
from runtime.engines import DecoderEngine, decoder_contract, open_session

CPU = ["CPUExecutionProvider"]
B, H, D, C = 1, 2, 8, 16


def _tiny_gqa(quant_type: str) -> ort.InferenceSession:
    """One GroupQueryAttention node with an int8 cache, inputs in our decoder's order."""
    f, i8, i32 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT32
    scale = [1] if quant_type == "PER_TENSOR" else [H * D]
    vi = helper.make_tensor_value_info
    ins = [vi("q", f, [B, "S", H * D]), vi("k", f, [B, "S", H * D]), vi("v", f, [B, "S", H * D]),
           vi("pk", i8, [B, H, C, D]), vi("pv", i8, [B, H, C, D]), vi("sk", i32, [B]),
           vi("tl", i32, []), vi("ks", f, scale), vi("vs", f, scale), vi("ql", i32, [B])]
    outs = [vi("o", f, None), vi("prk", i8, None), vi("prv", i8, None)]
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "sk", "tl", "", "",
                                                    "", "", "", "ks", "vs", "", "", "ql"],
                            ["o", "prk", "prv"], domain="com.microsoft", num_heads=H,
                            kv_num_heads=H, kv_cache_bit_width=8, k_quant_type=quant_type,
                            v_quant_type=quant_type)
    m = helper.make_model(helper.make_graph([node], "g", ins, outs),
                          opset_imports=[helper.make_opsetid("", 21),
                                         helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return ort.InferenceSession(m.SerializeToString(), providers=CPU)


def _attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, past: int) -> np.ndarray:
    """Causal attention in float64: q [S,H,D] at positions past.., k/v [H,T,D] -> [S,H,D]."""
    s = q.shape[0]
    scores = np.einsum("shd,htd->hst", q, k) / np.sqrt(D)
    t = np.arange(k.shape[1])
    scores = np.where(t[None, None] <= past + np.arange(s)[None, :, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("hst,htd->shd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("quant_type", ["PER_CHANNEL", "PER_TENSOR"])
def test_kernel_matches_mirror(quant_type):
    """Prefill, one decode step and a chunk on top: the kernel stores exactly the mirror's codes
    (x times the float32 reciprocal of the scale, ties to even, saturation at -128/127) and
    attends over the dequantised cache, the rows it has just written included."""
    rng = np.random.default_rng(0)
    n = 1 if quant_type == "PER_TENSOR" else H * D
    ks, vs = (rng.uniform(0.02, 0.2, n).astype(np.float32) for _ in range(2))
    sess = _tiny_gqa(quant_type)
    hd = (lambda t: t.reshape(H, D)) if n > 1 else (lambda t: t.reshape(()))
    pk = np.zeros((B, H, C, D), np.int8)
    pv = pk.copy()
    past = 0
    for step, s in enumerate((6, 1, 3)):
        q, k, v = (rng.normal(size=(B, s, H * D)).astype(np.float32) * w for w in (1, 3, 2))
        if step == 0:  # ties and saturation: exact halves of the scale, and far outside
            k[0, 0] = (np.arange(H * D) - H * D / 2 + 0.5) * np.resize(ks, H * D)
            k[0, 1, :4] = [500, -500, 127.5 * ks[0], -128.5 * ks[0]]
        t = past + s
        o, pk, pv = sess.run(None, {"q": q, "k": k, "v": v, "pk": pk, "pv": pv,
                                    "sk": np.array([t - 1], np.int32),
                                    "tl": np.array(t, np.int32), "ks": ks, "vs": vs,
                                    "ql": np.array([s], np.int32)})
        for x, sc, cache in ((k, ks, pk), (v, vs, pv)):
            scale = torch.from_numpy(sc)
            codes = torch.clamp(torch.round(torch.from_numpy(x[0]).view(s, H, D)
                                            * (1.0 / hd(scale))), -128, 127)
            np.testing.assert_array_equal(cache[0, :, past:t], codes.permute(1, 0, 2).numpy())
        kd = pk[0, :, :t].astype(np.float64) * hd(ks.astype(np.float64))[:, None] if n > 1 \
            else pk[0, :, :t] * float(ks[0])
        vd = pv[0, :, :t].astype(np.float64) * hd(vs.astype(np.float64))[:, None] if n > 1 \
            else pv[0, :, :t] * float(vs[0])
        want = _attend(q[0].reshape(s, H, D).astype(np.float64), kd, vd, past)
        np.testing.assert_allclose(o[0].reshape(s, H, D), want, atol=2e-5)
        # the mirror's dequantised rows are those the kernel attends over
        mk = fake_quant_kv(torch.from_numpy(k[0]).view(s, H, D), hd(torch.from_numpy(ks)))
        np.testing.assert_allclose(mk.permute(1, 0, 2).numpy(), kd[:, past:t], rtol=1e-6)
        past = t


@pytest.fixture(scope="module")
def scales(nano_model):
    from conftest import image_prompt_inputs

    return calibrate_kv_scales(nano_model, image_prompt_inputs(nano_model, 3))


@pytest.fixture(scope="module")
def int8_engine(nano_model, scales, tmp_path_factory):
    d = tmp_path_factory.mktemp("kv8")
    return export_decoder(nano_model, d / "decoder.onnx", plan="fp32", attention="gqa",
                          kv_dtype="int8", kv_scales=scales)


def test_calibrated_scales(scales, nano_model):
    cfg = nano_model.cfg
    assert scales.key.shape == (cfg.num_hidden_layers, cfg.hidden_size)
    assert scales.quant_type == "PER_CHANNEL"
    # amax / 127: the largest calibrated key of layer 0 lands exactly on code 127
    k_max = scales.key[0].max() * 127
    assert k_max > 0.1 and np.all(scales.key > 0)
    per_tensor = calibrate_kv_scales(nano_model, [torch.zeros(1, 3, cfg.hidden_size)], "tensor")
    assert per_tensor.key.shape == (cfg.num_hidden_layers, 1)
    with pytest.raises(KVScaleError, match="positive"):
        KVScales(np.zeros((2, 4), np.float32), np.ones((2, 4), np.float32))


def test_int8_engine_matches_mirror(int8_engine, nano_model, scales):
    """The nano decoder with an int8 cache equals the reference with the mirror to float
    rounding (prefill and decode); the unmirrored reference is visibly further away."""
    sess = open_session(int8_engine.onnx_path, CPU, 1)
    cfg = nano_model.cfg
    ids = np.random.default_rng(3).integers(0, cfg.image_start_id, 15).tolist()
    mirror = int8_kv(copy.deepcopy(nano_model), scales)
    logits, past = run_decoder(sess, [ids])
    tok = int(np.argmax(logits[0, -1]))
    step, _ = run_decoder(sess, [[tok]], None, None, past)
    with torch.no_grad():
        m = mirror(torch.tensor([ids]))
        m2 = mirror(torch.tensor([[tok]]), past=m.past)
        ref = nano_model(torch.tensor([ids])).logits.numpy()
    assert past[0][0].dtype == np.int8
    err = max(np.abs(logits - m.logits.numpy()).max(), np.abs(step - m2.logits.numpy()).max())
    gap = np.abs(logits - ref).max()
    print(f"\n[int8 KV] engine vs mirror {err:.2e}, vs the fp32-KV reference {gap:.2e}")
    assert err < 2e-5 < 10 * err < gap
    np.testing.assert_array_equal(read_engine_scales(int8_engine.onnx_path).key, scales.key)


def test_int8_contract_and_runtime(int8_engine, nano_model):
    """The contract reads int8 from the engine, the runtime allocates one int8 buffer per layer
    (a quarter of fp32's bytes) and its decode loop gives the engine's own greedy tokens."""
    cfg = nano_model.cfg
    c = decoder_contract(open_session(int8_engine.onnx_path, CPU, 1))
    assert c.kv_dtype == "int8" and c.shared_kv and c.quantized_kv
    assert c.kv_bytes_per_token == 2 * cfg.num_hidden_layers * cfg.hidden_size
    assert int8_engine.kv_bytes_per_token == c.kv_bytes_per_token
    eng = DecoderEngine(int8_engine.onnx_path, CPU, 1)
    ids = np.random.default_rng(4).integers(0, cfg.image_start_id, 11).tolist()
    cache = eng.new_cache(1, 40)
    assert cache.sets[0][0][0].dtype == np.int8 and cache.nbytes == 40 * c.kv_bytes_per_token
    logits = eng.forward(cache, np.array([ids]))[0]
    toks = []
    for _ in range(8):
        toks.append(int(np.argmax(logits)))
        logits = eng.forward(cache, np.array([[toks[-1]]]))[0]
    assert toks == greedy_generate(open_session(int8_engine.onnx_path, CPU, 1), ids,
                                   max_new_tokens=8)
    assert cache.layer(0)[0].dtype == np.int8


def test_int8_kv_rules(nano_model, scales, tmp_path):
    with pytest.raises(ValueError, match="needs attention 'gqa'"):
        TargetSettings("fp16", "int8")
    assert TargetSettings("fp32", "int8", accuracy_level=4, attention="gqa").int8_kv
    with pytest.raises(ContractError, match="shared layout"):
        DecoderIO.from_config(nano_model.cfg, "int8", "concat")
    with pytest.raises(DecoderExportError, match="attention='gqa'"):
        export_decoder(nano_model, tmp_path / "a.onnx", plan="fp32", kv_dtype="int8",
                       kv_scales=scales)
    with pytest.raises(DecoderExportError, match="kv_scales"):
        export_decoder(nano_model, tmp_path / "b.onnx", plan="fp32", kv_dtype="int8",
                       attention="gqa")
    bad = KVScales(scales.key[:1], scales.value[:1])
    with pytest.raises(KVScaleError, match="calibrate them on this model"):
        export_decoder(nano_model, tmp_path / "c.onnx", plan="fp32", kv_dtype="int8",
                       attention="gqa", kv_scales=bad)
    assert not list(tmp_path.iterdir())


def test_same_precision_reference_needs_the_kv_mirror(nano_model):
    from validate.stages import _check_same_precision

    plain = copy.deepcopy(nano_model)
    plain.int8_activations = True
    if PLANS["edge"].target("cpu").int8_kv:
        with pytest.raises(ValueError, match="lacks the int8 KV cache"):
            _check_same_precision(plain, "edge", "cpu")
    with pytest.raises(ValueError, match="has the int8 KV cache"):
        _check_same_precision(int8_kv(plain, calibrate_kv_scales(
            nano_model, [torch.zeros(1, 2, nano_model.cfg.hidden_size)])), "int4", "cpu")


def test_engine_scales_read_from_external_data(nano_model, scales, tmp_path, monkeypatch):
    """At full size the scales live in decoder.onnx.data: read by offset, not by loading it."""
    import exporters.decoder as dec

    monkeypatch.setattr(dec, "EXTERNAL_THRESHOLD", 64)
    res = export_decoder(nano_model, tmp_path / "decoder.onnx", plan="fp32", attention="gqa",
                         kv_dtype="int8", kv_scales=scales, check=False)
    got = read_engine_scales(res.onnx_path)
    np.testing.assert_array_equal(got.key, scales.key)
    np.testing.assert_array_equal(got.value, scales.value)
    assert read_engine_scales(export_decoder(nano_model, tmp_path / "f" / "decoder.onnx",
                                             plan="fp32", check=False).onnx_path) is None


def test_planner_counts_one_byte_per_kv_value_and_the_scales(tmp_path, capsys):
    """Full-size shapes: the edge cpu target's KV is 1 byte a value (a quarter of fp32) plus its
    fp32 per-channel scales, and ``--plan-only`` says so."""
    import json

    import export
    from exporters.memory_plan import plan_memory
    from models.config import qwen_vl_chat_config

    cfg = qwen_vl_chat_config()
    int8 = plan_memory(cfg, "int4", target="cpu", kv_bits=8)
    fp32 = plan_memory(cfg, "int4", target="cpu")
    assert int8.kv_bytes_per_token == 2 * 32 * 4096 == fp32.kv_bytes_per_token / 4
    assert int8.kv_scale_bytes == int8.other_bytes - fp32.other_bytes == 2 * 32 * 4096 * 4
    assert int8.kv_bytes(2048) == 2048 * 2 * 32 * 4096  # one shared buffer
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    export.main(["--plan-only", "--checkpoint", str(tmp_path), "--plan", "edge", "--target", "cpu"])
    out = capsys.readouterr().out
    assert "256 KB/token x 1 buffers" in out and "int8 + 1024 KB of scales" in out


@pytest.fixture(scope="module")
def gptq(nano_ckpt, nano_model, tmp_path_factory):
    """An RTN GPTQ checkpoint of the random nano (the layout export.py's quant stage writes)."""
    from quant.checkpoint import save_gptq_checkpoint
    from quant.fake_quant import rtn_gptq_tensors
    from quant.gptq import QuantConfig

    return save_gptq_checkpoint(nano_ckpt, rtn_gptq_tensors(nano_model), QuantConfig(),
                                tmp_path_factory.mktemp("kv8-gptq") / "gptq")


def test_streamed_calibration_equals_the_whole_model(gptq, nano_model):
    """GPTQ checkpoint blocks dequantised one at a time give the in-memory model's scales
    exactly (export.py's kv_scales stage streams, so a 7B checkpoint never sits in memory)."""
    from conftest import image_prompt_inputs
    from quant.checkpoint import GPTQBlocks, load_gptq_model
    from quant.kv_scales import calibrate_kv_blocks

    batches = image_prompt_inputs(nano_model, 2)
    whole = calibrate_kv_scales(load_gptq_model(gptq, "fp32"), batches)
    streamed = calibrate_kv_blocks(GPTQBlocks(gptq), batches)
    np.testing.assert_array_equal(streamed.key, whole.key)
    np.testing.assert_array_equal(streamed.value, whole.value)
    assert not np.array_equal(whole.key, calibrate_kv_scales(nano_model, batches).key)


def test_bench_kv_cache_nano(nano_ckpt, gptq):
    """The KV-variant bench runs on a GPTQ checkpoint and judges int8 caches against the mirror."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "bench.kv_cache", "--checkpoint", str(nano_ckpt),
                        "--gptq", str(gptq), "--max-items", "2", "--n-calib", "2",
                        "--variants", "fp32", "channel@0.9"],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {v["kv"]: v for v in json.loads(r.stdout.splitlines()[-1])["variants"]}
    assert rows["fp32"]["fq_kl_mean"] is None and rows["channel@0.9"]["fq_kl_mean"] >= 0
    assert all(0 < v["top1"] <= 1 and v["kl_mean"] >= 0 for v in rows.values())
