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


# ---- GroupQueryAttention without the attention bias (the gpu target: CUDA rejects a bias) ----

@pytest.fixture(scope="module")
def unpadded(nano_model, tmp_path_factory):
    """The edge plan's gpu-target decoder settings (fp16 activations and KV, GroupQueryAttention
    without the bias) on the int4 RTN codes, beside the same codes with MultiHeadAttention."""
    d = tmp_path_factory.mktemp("gqa-nobias")
    qt = rtn_gptq_tensors(nano_model, 128, True, False)
    kw = PLANS["edge"].target("gpu").decoder_kwargs()
    assert kw["attention"] == "gqa" and kw["attention_bias"] is False
    # the row's int8 cache needs calibrated scales (tests/test_kv8.py, test_edge.py): this
    # fixture isolates the bias-free attention on an fp16 cache
    kw["kv_dtype"] = "fp16"
    assert kw["act_dtype"] == "fp16"
    out = {"qt": qt}
    for name, over in (("gqa", {}), ("mha", {"attention": "mha", "attention_bias": True})):
        out[name] = export_decoder(nano_model, d / name / "decoder.onnx", plan="int4",
                                   quant_tensors=qt, **{**kw, **over})
    return out


def test_unpadded_graph_has_no_bias_and_says_so(unpadded):
    res = unpadded["gqa"]
    import onnx

    m = onnx.load(str(res.onnx_path), load_external_data=False)
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == res.op_counts["com.microsoft::GroupQueryAttention"] > 0
    assert all(len(n.input) < 11 or n.input[10] == "" for n in gqa)  # input 10: attention_bias
    assert res.metadata["padding"] == "unpadded" and res.metadata["kv_layout"] == "shared"
    c = decoder_contract(open_session(res.onnx_path, CPU))
    assert not c.masks_keys and c.shared_kv and c.kv_dtype == "float16"
    assert decoder_contract(open_session(unpadded["mha"].onnx_path, CPU)).masks_keys


def test_unpadded_fp16_matches_reference(unpadded, nano_model, cfg):
    """onnxruntime's CPU GroupQueryAttention with fp16 activations and no bias, driven as the
    runtime drives it (one shared fp16 buffer): the fake-quant reference to fp16 rounding, and
    the MultiHeadAttention engine's greedy tokens."""
    from quant.fake_quant import fake_quant_model

    fq = fake_quant_model(nano_model, unpadded["qt"], lm_head="int8")
    ids = _ids(cfg, 15, 4)
    eng = DecoderEngine(unpadded["gqa"].onnx_path, CPU, 2)
    toks, logits = _greedy(eng, ids, 8)
    cache = eng.new_cache(1, 40)
    got = [eng.forward(cache, np.array([ids]), last_only=False)[0]]
    with torch.no_grad():
        out = fq(torch.tensor([ids]))
        ref = [out.logits[0].numpy()]
        for tok in toks:
            got.append(eng.forward(cache, np.array([[tok]])).copy())
            out = fq(torch.tensor([[tok]]), past=out.past)
            ref.append(out.logits[0].numpy())
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    toks_m, _ = _greedy(DecoderEngine(unpadded["mha"].onnx_path, CPU, 2), ids, 8)
    print(f"\n[gqa fp16 no bias, CPU kernel] max |logit - fake-quant| over prefill + 8 steps: "
          f"{err:.2e}")
    assert err < 3e-2  # the fp16 MultiHeadAttention engine's bound (test_decoder_export)
    assert toks == toks_m


def test_unpadded_engine_refuses_padding_and_rewinds(unpadded, cfg):
    """Left padding and masking a cached token are refused (one line, exit 2); a batch row may
    end in pads (a finished row); dropping a tail rewinds the cache, which then equals a fresh
    prefill of what it keeps."""
    eng = DecoderEngine(unpadded["gqa"].onnx_path, CPU, 2)
    a, b = _ids(cfg, 9, 5), _ids(cfg, 6, 6)
    c = eng.new_cache(2, 20)
    padded = np.array([a, [0] * 3 + b])
    with pytest.raises(ContractError, match="unpadded rows only") as err:
        eng.forward(c, padded, np.array([[1] * 9, [0] * 3 + [1] * 6]))
    assert err.value.exit_code == 2 and c.length == 0 and not c.mask.any()
    eng.forward(c, np.array([a, a[:6] + b[:3]]))  # equal lengths: fine
    eng.forward(c, np.array([[5], [0]]), np.array([[1], [0]]))  # row 1 finished: a trailing pad
    with pytest.raises(ContractError, match="unpadded rows only"):
        eng.forward(c, np.array([[6], [7]]))  # a real token after row 1's pad
    with pytest.raises(ContractError, match="cannot mask"):
        eng.mask_out(c, 2, 3)
    one = eng.new_cache(1, 30)
    eng.forward(one, np.array([a + b]))
    eng.truncate(one, len(a))
    got = eng.forward(one, np.array([b[::-1]]))
    fresh = eng.forward(eng.new_cache(1, 30), np.array([a + b[::-1]]))
    np.testing.assert_allclose(got, fresh, atol=1e-3)
