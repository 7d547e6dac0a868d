"""GroupQueryAttention decoder (``attention="gqa"``, the ``shared`` KV layout) on the nano
checkpoint: exact against the reference in fp32, and the same tokens as the MultiHeadAttention
engine when the runtime drives both (one shared past/present buffer vs ping-pong buffers),
including padded batches, dropped tokens and multi-token chunks on top of a cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters.decoder import DecoderExportError, export_decoder, run_decoder
from quant.fake_quant import rtn_gptq_tensors
from quant.plans import PLANS
from runtime.contract import ContractError, DecoderIO
from runtime.engines import DecoderEngine, decoder_contract, open_session

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def cfg(nano_model):
    return nano_model.cfg


@pytest.fixture(scope="module")
def fp32_pair(nano_model, tmp_path_factory):
    """fp32 engines, MultiHeadAttention and GroupQueryAttention."""
    d = tmp_path_factory.mktemp("gqa-fp32")
    return {a: export_decoder(nano_model, d / a / "decoder.onnx", plan="fp32", attention=a)
            for a in ("mha", "gqa")}


@pytest.fixture(scope="module")
def cpu_pair(nano_model, tmp_path_factory):
    """The int4 ``--target cpu`` engine (fp32 activations/KV, accuracy level 4) with each
    attention; same RTN codes."""
    d = tmp_path_factory.mktemp("gqa-int4")
    qt = rtn_gptq_tensors(nano_model, 128, True, False)
    kw = PLANS["int4"].target("cpu").decoder_kwargs()
    return {a: export_decoder(nano_model, d / a / "decoder.onnx", plan="int4", quant_tensors=qt,
                              **{**kw, "attention": a})
            for a in ("mha", "gqa")}


def _ids(cfg, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, cfg.image_start_id, n).tolist()


def test_gqa_graph_and_contract(fp32_pair, cfg):
    res = fp32_pair["gqa"]
    assert res.op_counts["com.microsoft::GroupQueryAttention"] == cfg.num_hidden_layers
    assert "com.microsoft::MultiHeadAttention" not in res.op_counts
    assert res.metadata["kv_layout"] == "shared"
    assert fp32_pair["mha"].metadata["kv_layout"] == "concat"
    c = decoder_contract(open_session(res.onnx_path, CPU))
    assert c.shared_kv and c.kv_dtype == "float32"
    assert not decoder_contract(open_session(fp32_pair["mha"].onnx_path, CPU)).shared_kv
    past = next(i for i in res.inputs if i.name == "past_key_values.0.key")
    assert past.shape[2] == "kv_capacity"


def test_gqa_fp32_matches_reference(fp32_pair, nano_model, cfg):
    """Fed past of length P (no shared buffer), the GQA graph is the reference to float rounding,
    its present included."""
    sess = open_session(fp32_pair["gqa"].onnx_path, CPU, 2)
    ids = _ids(cfg, 13, 0)
    logits, past = run_decoder(sess, [ids])
    with torch.no_grad():
        ref = nano_model(torch.tensor([ids]))
        assert np.abs(logits - ref.logits.numpy()).max() < 1e-4
        tok = int(np.argmax(logits[0, -1]))
        logits, past = run_decoder(sess, [[tok]], None, None, past)
        ref = nano_model(torch.tensor([[tok]]), past=ref.past)
    assert np.abs(logits - ref.logits.numpy()).max() < 1e-4
    for (k, v), (rk, rv) in zip(past, ref.past):
        np.testing.assert_allclose(k, rk.permute(0, 2, 1, 3).numpy(), atol=1e-4)
        np.testing.assert_allclose(v, rv.permute(0, 2, 1, 3).numpy(), atol=1e-4)


def _greedy(engine: DecoderEngine, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    cache = engine.new_cache(1, len(ids) + n + 1)
    logits = [engine.forward(cache, np.array([ids]))[0]]
    toks = []
    for _ in range(n):
        toks.append(int(np.argmax(logits[-1])))
        logits.append(engine.forward(cache, np.array([[toks[-1]]]))[0])
    return toks, np.stack(logits)


def test_cpu_target_gqa_greedy_equals_mha(cpu_pair, cfg):
    """The runtime's shared buffer gives the MultiHeadAttention engine's tokens and, to float
    noise, its logits; its cache holds the same keys; nothing is reallocated."""
    mha, gqa = (DecoderEngine(cpu_pair[a].onnx_path, CPU, 2) for a in ("mha", "gqa"))
    ids = _ids(cfg, 17, 1)
    toks_m, logits_m = _greedy(mha, ids, 12)
    toks_g, logits_g = _greedy(gqa, ids, 12)
    err = float(np.abs(logits_m - logits_g).max())
    print(f"\n[gqa int4 cpu target] max |logit gqa - mha| over prefill + 12 steps: {err:.2e}")
    assert toks_g == toks_m
    assert err < 1e-3
    cm, cg = mha.new_cache(1, 40), gqa.new_cache(1, 40)
    assert len(cg.sets) == 1 and len(cm.sets) == 2 and cg.nbytes * 2 == cm.nbytes
    ptrs = [(k.ptr, v.ptr) for k, v in cg.sets[0]]
    for e, c in ((mha, cm), (gqa, cg)):
        e.forward(c, np.array([ids]))
        e.forward(c, np.array([[5]]))
    assert [(k.ptr, v.ptr) for k, v in cg.sets[0]] == ptrs
    for i in range(gqa.layers):
        for a, b in zip(cm.layer(i), cg.layer(i)):
            assert a.shape == b.shape == (1, cfg.num_attention_heads, len(ids) + 1,
                                          cfg.head_dim)
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_gqa_padded_batch_dropped_tokens_and_chunks(fp32_pair, cfg):
    """Left padding, a token dropped from attention (``mask_out``) and a two-token chunk of a
    padded batch on top of its cache: the GQA engine (mask -> attention bias, rows written at
    the mask's columns) gives the MHA engine's logits."""
    mha, gqa = (DecoderEngine(fp32_pair[a].onnx_path, CPU, 2) for a in ("mha", "gqa"))
    a, b = _ids(cfg, 9, 2), _ids(cfg, 5, 3)
    pad = len(a) - len(b)
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])
    out = {}
    for name, e in (("mha", mha), ("gqa", gqa)):
        c = e.new_cache(2, 20)
        got = [e.forward(c, ids, mask)]
        e.mask_out(c, 2, 3)  # drop the third token of every row
        got.append(e.forward(c, np.array([[7], [8]])))
        got.append(e.forward(c, np.array([[9, 10], [11, 12]]), last_only=False)[:, -1])
        got.append(e.forward(c, np.array([[13], [14]])))
        out[name] = np.stack(got)
    assert np.isfinite(out["gqa"]).all()
    np.testing.assert_allclose(out["gqa"], out["mha"], atol=1e-4)


def test_gqa_needs_kv_in_the_activation_dtype(nano_model, tmp_path):
    with pytest.raises(DecoderExportError, match="kv_dtype='fp32'"):
        export_decoder(nano_model, tmp_path / "d.onnx", plan="fp32", kv_dtype="fp16",
                       attention="gqa")
    assert not (tmp_path / "d.onnx").exists()


def test_contract_kv_layout(cfg):
    io = DecoderIO.from_config(cfg, "fp32", "shared")
    specs = {n: shape for n, _, shape in io.input_specs() + io.output_specs()}
    assert specs["past_key_values.0.key"][2] == specs["present.0.value"][2] == "kv_capacity"
    assert DecoderIO.from_config(cfg, "fp32").input_specs()[3][2][2] == "past_sequence_length"
    with pytest.raises(ContractError, match="KV layout"):
        DecoderIO.from_config(cfg, "fp32", "ring")
