"""GPTQ checkpoints: our writer, the official Qwen-VL-Chat-Int4 (AutoGPTQ v1) layout, errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import image_prompt_inputs
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, load_model
from quant.checkpoint import (GPTQCheckpointError, load_gptq_checkpoint, load_gptq_model,
                              save_gptq_checkpoint)
from quant.fake_quant import LINEAR_SUFFIXES, fake_quant_model, quantized_linear_names
from quant.gptq import QuantConfig, quantize_decoder
from quant.packing import dequantize, dequantize_matmul_nbits, gptq_to_matmul_nbits

GS = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def hidden_inputs(model, n_items=4, seed=0):
    return image_prompt_inputs(model, n_items, seed, vocab_hi=500)


def quantise_and_save(model, src, out, desc_act=False, **save_kw):
    fq = copy.deepcopy(model)
    res = quantize_decoder(fq, hidden_inputs(model), QuantConfig(group_size=GS, desc_act=desc_act),
                           inplace=True, progress=False)
    save_gptq_checkpoint(src, res, None, out, **save_kw)
    return res, fq


@pytest.fixture(scope="module")
def ours(nano_ckpt, nano_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("gptq") / "nano-int4"
    res, fq = quantise_and_save(nano_model, nano_ckpt, out, max_shard_bytes=150_000)
    return out, res, fq


def ids_for(cfg, n=12):
    return torch.arange(3, 3 + n)[None] % 500


def test_our_checkpoint_layout(ours, nano_ckpt):
    path, res, _ = ours
    conf = json.loads((path / "config.json").read_text())
    assert conf["fp16"] is True and conf["bf16"] is False and conf["torch_dtype"] == "float16"
    qc = conf["quantization_config"]
    assert qc == json.loads((path / "quantize_config.json").read_text())
    assert qc == {"bits": 4, "group_size": GS, "damp_percent": 0.01, "desc_act": False,
                  "static_groups": False, "sym": True, "true_sequential": True,
                  "model_name_or_path": None, "model_file_base_name": "model",
                  "quant_method": "gptq", "checkpoint_format": "gptq"}
    for f in ("qwen.tiktoken", "tokenizer_config.json", "generation_config.json"):
        assert (path / f).read_bytes() == (nano_ckpt / f).read_bytes()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0].startswith("model-00001-of-")
    names = set(index["weight_map"])
    for lin in quantized_linear_names(2):
        assert f"{lin}.weight" not in names
        for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            assert f"{lin}.{part}" in names  # bias for every quantised Linear, as AutoGPTQ
    dtypes = {}
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for k in f.keys():
                dtypes[k] = f.get_tensor(k).dtype
    for k, dt in dtypes.items():
        part = k.rsplit(".", 1)[1]
        if part in ("qweight", "qzeros", "g_idx"):
            assert dt == torch.int32, k
        else:
            assert dt == torch.float16, k  # scales, biases, wte, lm_head, norms, visual
    assert any(k.startswith("transformer.visual.") for k in dtypes)
    with safe_open(str(path / index["weight_map"]["transformer.h.0.mlp.w1.bias"]), "pt") as f:
        assert not f.get_tensor("transformer.h.0.mlp.w1.bias").any()  # zeros, bias-free Linear


def test_roundtrip_bitwise_and_runs(ours, nano_model):
    path, res, fq = ours
    cfg, tensors, _reader = load_gptq_checkpoint(path)
    assert sorted(tensors) == sorted(res.tensors)
    for name, t in tensors.items():
        r = res.tensors[name]
        for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            np.testing.assert_array_equal(getattr(t, part), getattr(r, part), err_msg=name)
    model = load_gptq_model(path, "fp32")
    for name in quantized_linear_names(cfg.num_hidden_layers):
        w = model.get_submodule(name).weight
        assert torch.equal(w, fq.get_submodule(name).weight), name  # the GPTQ fake-quant weights
        assert np.array_equal(w.numpy(), dequantize(tensors[name]))
    assert torch.equal(model.transformer.h[1].attn.c_attn.bias, fq.transformer.h[1].attn.c_attn.bias)
    ids = ids_for(cfg)
    with torch.no_grad():
        logits = model(ids).logits
        ref = fake_quant_model(nano_model, res.tensors, lm_head="fp16")(ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)  # == the exporter's reference
    with pytest.raises(CheckpointError, match="load_gptq_model"):
        load_model(path)
    int8 = load_gptq_model(path, "fp32", lm_head="int8")
    assert torch.equal(int8.lm_head.weight, fake_quant_model(model, tensors, "int8",
                                                             fp16_rest=False).lm_head.weight)


def test_act_order_roundtrip(nano_ckpt, nano_model, tmp_path):
    res, fq = quantise_and_save(nano_model, nano_ckpt, tmp_path / "act", desc_act=True)
    assert json.loads((tmp_path / "act" / "quantize_config.json").read_text())["desc_act"] is True
    model = load_gptq_model(tmp_path / "act")
    n_nontrivial = 0
    for name, t in load_gptq_checkpoint(tmp_path / "act")[1].items():
        n_nontrivial += not np.array_equal(t.g_idx, np.arange(t.in_features) // GS)
        np.testing.assert_array_equal(t.g_idx, res.tensors[name].g_idx)
        assert torch.equal(model.get_submodule(name).weight, fq.get_submodule(name).weight)
        # the exporter's act-order path (column permutation) dequantises to the same weight
        mm = gptq_to_matmul_nbits(t, GS)
        assert np.array_equal(dequantize_matmul_nbits(mm), dequantize(t))
    assert n_nontrivial == len(res.tensors)


# ---------------------------------------------------------------------------------------------
# The official Qwen-VL-Chat-Int4 layout, written from raw tensors exactly as AutoGPTQ names and
# packs them (independent of quant.packing)
# ---------------------------------------------------------------------------------------------

def autogptq_pack(w: np.ndarray, gs: int):
    """RTN int4 sym, AutoGPTQ v1 tensors: qweight [K/8,N], qzeros [G,N/8] (z-1), scales [G,N]."""
    n, k = w.shape
    g = np.arange(k) // gs
    s = (np.abs(w.reshape(n, k // gs, gs)).max(-1) * 2 / 15).astype(np.float16)  # [N, G]
    sf = s.astype(np.float32)
    q = np.clip(np.round(w / sf[:, g]) + 8, 0, 15).astype(np.uint32)  # [N, K]
    qt = q.T  # [K, N]
    qweight = np.zeros((k // 8, n), np.uint32)
    for i in range(8):  # nibble i of row r holds input 8r+i
        qweight |= qt[i::8] << (4 * i)
    z = np.full((k // gs, n), 8 - 1, np.uint32)  # stored zero - 1
    qzeros = np.zeros((k // gs, n // 8), np.uint32)
    for j in range(8):  # nibble j of column c holds output 8c+j
        qzeros |= z[:, j::8] << (4 * j)
    deq = (q.astype(np.float32) - 8) * sf[:, g]
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
            "scales": np.ascontiguousarray(s.T), "g_idx": g.astype(np.int32)}, deq


OFFICIAL_QCFG = {"bits": 4, "group_size": GS, "damp_percent": 0.01, "desc_act": False,
                 "static_groups": False, "sym": True, "true_sequential": True,
                 "model_name_or_path": None, "model_file_base_name": "model"}


def write_official(path, cfg_dict, tensors, quant_config=OFFICIAL_QCFG, quantize_config=None,
                   n_shards=3):
    path.mkdir(parents=True)
    conf = dict(cfg_dict)
    conf.update({"fp16": True, "bf16": False, "fp32": False, "torch_dtype": "float16"})
    if quant_config is not None:
        conf["quantization_config"] = {"quant_method": "gptq", **quant_config}
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    if quantize_config is not False:
        (path / "quantize_config.json").write_text(json.dumps(quantize_config or quant_config))
    names = list(tensors)
    weight_map = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[s::n_shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def official(nano_model):
    cfg = nano_model.cfg
    quant = set(quantized_linear_names(cfg.num_hidden_layers))
    tensors, deq = {}, {}
    for name, p in nano_model.state_dict().items():
        mod, _, leaf = name.rpartition(".")
        if mod in quant:
            if leaf == "weight":
                raw, deq[mod] = autogptq_pack(p.numpy(), GS)
                for k, v in raw.items():
                    tensors[f"{mod}.{k}"] = torch.from_numpy(v)
                if f"{mod}.bias" not in nano_model.state_dict():
                    tensors[f"{mod}.bias"] = torch.zeros(p.shape[0], dtype=torch.float16)
            else:
                tensors[name] = p.half()
        else:
            tensors[name] = p.half()
    cfg_dict = {k: v for k, v in json.loads(json.dumps(cfg.to_dict())).items()}
    return cfg_dict, tensors, deq


def test_official_int4_layout_loads(official, tmp_path):
    cfg_dict, tensors, deq = official
    path = write_official(tmp_path / "int4", cfg_dict, tensors)
    model = load_gptq_model(path, "fp32")
    for name, w in deq.items():
        assert np.array_equal(model.get_submodule(name).weight.numpy(), w), name
    c_attn = "transformer.h.0.attn.c_attn"
    assert torch.equal(model.get_submodule(c_attn).bias, tensors[f"{c_attn}.bias"].float())
    with torch.no_grad():
        assert torch.isfinite(model(ids_for(model.cfg)).logits).all()
    assert model.quant_config.group_size == GS and not model.quant_config.desc_act
    # quantize_config.json alone (older AutoGPTQ checkpoints), no quantization_config
    path2 = write_official(tmp_path / "int4b", cfg_dict, tensors, quant_config=None,
                           quantize_config=OFFICIAL_QCFG)
    _, t2, _ = load_gptq_checkpoint(path2)
    assert np.array_equal(dequantize(t2[c_attn]), deq[c_attn])


def _mutate(tensors, name, value=None):
    out = dict(tensors)
    if value is None:
        del out[name]
    else:
        out[name] = value
    return out


L = "transformer.h.1.mlp.w2"


def error_cases(tensors):
    qw = tensors[f"{L}.qweight"]
    nan_scales = tensors[f"{L}.scales"].clone()
    nan_scales[0, 3] = float("nan")
    bad_gidx = tensors[f"{L}.g_idx"].clone()
    bad_gidx[-1] = 99
    return {
        "missing qweight": (dict(tensors=_mutate(tensors, f"{L}.qweight")),
                            f"layer {L} lacks {L}.qweight"),
        "missing scales": (dict(tensors=_mutate(tensors, f"{L}.scales")), f"lacks {L}.scales"),
        "qweight shape": (dict(tensors=_mutate(tensors, f"{L}.qweight", qw[:, :-8].contiguous())),
                          rf"{L}.qweight has shape \(16, 248\), expected \(16, 256\)"),
        "config mismatch": (dict(cfg={"intermediate_size": 1024}),
                            r"has shape .* expected .*does not match its config"),
        "bits 3": (dict(qc={"bits": 3}), "bits=3"),
        "awq": (dict(qc={"quant_method": "awq"}), "quant_method 'awq' is not supported"),
        "group 96": (dict(qc={"group_size": 96}), "group_size=96 .*power of two"),
        "group 512": (dict(qc={"group_size": 512}), "group_size=512 does not divide in_features"),
        "per-channel": (dict(qc={"group_size": -1}), "per-channel is not supported"),
        "gptq_v2": (dict(qc={"checkpoint_format": "gptq_v2"}), "checkpoint_format 'gptq_v2'"),
        "nan scales": (dict(tensors=_mutate(tensors, f"{L}.scales", nan_scales)),
                       f"{L}.scales contains NaN/Inf"),
        "g_idx range": (dict(tensors=_mutate(tensors, f"{L}.g_idx", bad_gidx)),
                        f"{L}.g_idx has groups outside 0..1"),
        "qweight dtype": (dict(tensors=_mutate(tensors, f"{L}.qweight", qw.float())),
                          f"{L}.qweight has dtype torch.float32, expected int32"),
        "bias on bias-free": (dict(tensors=_mutate(tensors, f"{L}.bias",
                                                   torch.ones(256, dtype=torch.float16))),
                              f"{L}.bias is non-zero"),
        "not gptq": (dict(no_quant=True), "not a GPTQ checkpoint"),
        "disagree": (dict(qfile={"group_size": 32}),
                     "group_size=64 but quantize_config.json has group_size=32"),
    }


CASES = ["missing qweight", "missing scales", "qweight shape", "config mismatch", "bits 3", "awq",
         "group 96", "group 512", "per-channel", "gptq_v2", "nan scales", "g_idx range",
         "qweight dtype", "bias on bias-free", "not gptq", "disagree"]


@pytest.mark.parametrize("case", CASES)
def test_error_cases(official, tmp_path, case):
    cfg_dict, tensors, _ = official
    spec, message = error_cases(tensors)[case]
    qc = {**OFFICIAL_QCFG, **spec.get("qc", {})}
    qfile = {**qc, **spec["qfile"]} if "qfile" in spec else None
    conf = {**cfg_dict, **spec.get("cfg", {})}
    if spec.get("no_quant"):
        path = write_official(tmp_path / "c", conf, spec.get("tensors", tensors), quant_config=None,
                              quantize_config=False)
    else:
        path = write_official(tmp_path / "c", conf, spec.get("tensors", tensors), quant_config=qc,
                              quantize_config=qfile)
    with pytest.raises(GPTQCheckpointError, match=message) as exc:
        load_gptq_model(path)
    assert "\n" not in str(exc.value)  # one line


def test_corrupt_shard(official, tmp_path):
    cfg_dict, tensors, _ = official
    path = write_official(tmp_path / "c", cfg_dict, tensors)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"][f"{L}.qweight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="corrupt") as exc:
        load_gptq_model(path)
    assert "\n" not in str(exc.value)


def test_save_refuses_partial_result(nano_ckpt, nano_model, tmp_path):
    res = quantize_decoder(nano_model, hidden_inputs(nano_model, 2), QuantConfig(group_size=GS),
                           max_blocks=1, progress=False)
    with pytest.raises(GPTQCheckpointError, match="cover 5 of 10 Linears"):
        save_gptq_checkpoint(nano_ckpt, res, None, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert set(LINEAR_SUFFIXES) == {n.split(".", 3)[3] for n in res.tensors}


def test_save_rtn_tensors(nano_ckpt, nano_model, tmp_path):
    """Any GPTQ-layout tensors can be saved (here RTN ones), with the config they were made with."""
    from quant.fake_quant import rtn_gptq_tensors

    tensors = rtn_gptq_tensors(nano_model, group_size=32)
    with pytest.raises(GPTQCheckpointError, match="has 4 groups for 128 inputs but group_size is 64"):
        save_gptq_checkpoint(nano_ckpt, tensors, QuantConfig(group_size=64), tmp_path / "x")
    save_gptq_checkpoint(nano_ckpt, tensors, QuantConfig(group_size=32), tmp_path / "rtn")
    _, loaded, _ = load_gptq_checkpoint(tmp_path / "rtn")
    for name, t in tensors.items():
        assert np.array_equal(dequantize(loaded[name]), dequantize(t)), name
