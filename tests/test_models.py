"""Foundation: config, real tensor layout, checkpoint I/O, the reference model's behaviour."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from models.checkpoint import (CheckpointError, CheckpointReader, expected_shapes, load_model,
                               save_checkpoint)
from models.config import ConfigError, QwenVLConfig, qwen_vl_chat_config
from models.nano import NanoSpec, make_nano_checkpoint, nano_config, write_random_checkpoint
from models.qwen_vl import ContextLengthError

# A sample of the real Qwen-VL-Chat tensor names and shapes (its safetensors index).
REAL_TENSORS = {
    "transformer.wte.weight": (151936, 4096),
    "transformer.h.0.attn.c_attn.weight": (12288, 4096),
    "transformer.h.0.attn.c_attn.bias": (12288,),
    "transformer.h.31.attn.c_proj.weight": (4096, 4096),
    "transformer.h.7.mlp.w1.weight": (11008, 4096),
    "transformer.h.7.mlp.w2.weight": (11008, 4096),
    "transformer.h.7.mlp.c_proj.weight": (4096, 11008),
    "transformer.h.3.ln_1.weight": (4096,),
    "transformer.ln_f.weight": (4096,),
    "lm_head.weight": (151936, 4096),
    "transformer.visual.conv1.weight": (1664, 3, 14, 14),
    "transformer.visual.positional_embedding": (256, 1664),
    "transformer.visual.ln_pre.bias": (1664,),
    "transformer.visual.transformer.resblocks.47.attn.in_proj.weight": (4992, 1664),
    "transformer.visual.transformer.resblocks.0.attn.in_proj.bias": (4992,),
    "transformer.visual.transformer.resblocks.0.attn.out_proj.weight": (1664, 1664),
    "transformer.visual.transformer.resblocks.0.mlp.c_fc.weight": (8192, 1664),
    "transformer.visual.transformer.resblocks.0.mlp.c_proj.bias": (1664,),
    "transformer.visual.attn_pool.query": (256, 4096),
    "transformer.visual.attn_pool.pos_embed": (256, 4096),
    "transformer.visual.attn_pool.kv_proj.weight": (4096, 1664),
    "transformer.visual.attn_pool.attn.in_proj_weight": (12288, 4096),
    "transformer.visual.attn_pool.attn.in_proj_bias": (12288,),
    "transformer.visual.attn_pool.attn.out_proj.weight": (4096, 4096),
    "transformer.visual.attn_pool.ln_q.weight": (4096,),
    "transformer.visual.attn_pool.ln_kv.bias": (4096,),
    "transformer.visual.ln_post.weight": (4096,),
    "transformer.visual.proj": (4096, 4096),
}


def test_full_size_layout_without_allocating():
    shapes = expected_shapes(qwen_vl_chat_config())
    assert len(shapes) == 853
    assert sum(1 for k in shapes if k.startswith("transformer.visual.")) == 594
    assert sum(math.prod(s) for s in shapes.values()) == 9_656_935_168
    # x 2 bytes = the bf16 checkpoint's total_size in pytorch_model.bin.index.json
    assert 2 * sum(math.prod(s) for s in shapes.values()) == 19_313_870_336
    for name, shape in REAL_TENSORS.items():
        assert shapes[name] == shape, name
    assert not any("inv_freq" in k or "masked_bias" in k for k in shapes)


def test_config_round_trip_keeps_real_keys():
    cfg = qwen_vl_chat_config()
    d = cfg.to_dict()
    assert d["model_type"] == "qwen" and d["architectures"] == ["QWenLMHeadModel"]
    assert d["visual"] == {"heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
                           "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664}
    assert "n_queries" not in d["visual"]  # absent from the published config
    again = QwenVLConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert again.visual.mlp_width == 8192 and again.ffn_dim == 11008 and again.head_dim == 128


def test_nano_round_trip_is_deterministic(tmp_path, nano_ckpt):
    again = make_nano_checkpoint(tmp_path / "again", seed=0)
    a, b = CheckpointReader(nano_ckpt), CheckpointReader(again)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert torch.equal(a.get(name), b.get(name)), name
    other = CheckpointReader(make_nano_checkpoint(tmp_path / "seed1", seed=1))
    assert not torch.equal(other.get("lm_head.weight"), a.get("lm_head.weight"))
    files = {p.name for p in nano_ckpt.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken",
            "model.safetensors.index.json"} <= files
    cfg = json.loads((nano_ckpt / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["visual"]["n_queries"] == 16


def test_nano_names_match_the_real_layout(nano_ckpt):
    full = set(expected_shapes(qwen_vl_chat_config()))
    nano = set(CheckpointReader(nano_ckpt).names())
    # Same names up to the layer count: every nano name exists in the full-size model.
    assert nano <= full


def test_bin_shards_load_like_safetensors(tmp_path, nano_ckpt, nano_model):
    cfg = QwenVLConfig.from_pretrained(nano_ckpt)
    out = save_checkpoint(nano_model, cfg, tmp_path / "bin", dtype="fp32", fmt="bin",
                          max_shard_bytes=400_000)
    assert (out / "pytorch_model.bin.index.json").is_file()
    shards = sorted(out.glob("pytorch_model-*.bin"))
    assert len(shards) > 1 and shards[0].name.endswith(f"-of-{len(shards):05d}.bin")
    m2 = load_model(out, "fp32")
    for (k, v), (k2, v2) in zip(nano_model.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_reference_generates_and_kv_cache_matches_full_forward(nano_model):
    cfg = nano_model.cfg
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, cfg.visual.image_size, cfg.visual.image_size)
    ids = [5, 6, 7, cfg.image_start_id] + [cfg.image_pad_id] * cfg.visual.n_queries + [
        cfg.image_end_id, 8, 9]
    out = nano_model.generate(ids, pixels=pixels, max_new_tokens=8)
    assert len(out) == 8 and out == nano_model.generate(ids, pixels=pixels, max_new_tokens=8)
    follow = [10, 11, 12, 13]  # plain text ids (a random model may emit <img> itself)
    full = nano_model(torch.tensor([ids + follow]), pixels=pixels).logits[0]
    step = nano_model(torch.tensor([ids]), pixels=pixels)
    for i, tok in enumerate(follow):
        torch.testing.assert_close(step.logits[0, -1], full[len(ids) - 1 + i], atol=2e-5, rtol=0)
        step = nano_model(torch.tensor([[tok]]), past=step.past)
    # The image changes the answer's logits (features really are spliced in).
    other = nano_model(torch.tensor([ids]), pixels=pixels * -1).logits[0, -1]
    assert not torch.allclose(other, full[len(ids) - 1])


def test_sampling_is_seeded_and_stops(nano_model):
    ids = [5, 6, 7]
    a = nano_model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, seed=3)
    b = nano_model.generate(ids, max_new_tokens=6, do_sample=True, top_p=0.9, seed=3)
    assert a == b
    greedy = nano_model.generate(ids, max_new_tokens=6)
    stopped = nano_model.generate(ids, max_new_tokens=6, stop_ids=(greedy[2],))
    assert stopped == greedy[:greedy.index(greedy[2])]


def test_half_precisions_load(nano_ckpt, nano_model):
    ids = torch.tensor([[5, 6, 7, 8]])
    ref = nano_model(ids).logits.float()
    for dt in ("bf16", "fp16"):
        m = load_model(nano_ckpt, dt)
        assert m.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
        got = m(ids).logits.float()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
        assert cos > 0.99, (dt, cos)


def test_errors_are_one_clear_line(tmp_path, nano_ckpt):
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_model(tmp_path / "nope")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' checkpoint, not Qwen-VL"):
        load_model(other)
    # A tensor of the wrong shape is named.
    bad = tmp_path / "bad"
    shutil.copytree(nano_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["visual"]["width"] = 32
    cfg["visual"]["heads"] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor transformer\.visual\.\S+ has shape"):
        load_model(bad)
    # A missing shard and a corrupt shard.
    broken = tmp_path / "broken"
    shutil.copytree(nano_ckpt, broken)
    shard = next(broken.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt|cannot read"):
        load_model(broken)
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        load_model(broken)
    quant = tmp_path / "quant"
    shutil.copytree(nano_ckpt, quant)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quant / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gptq checkpoint"):
        load_model(quant)


def test_unsupported_options_refused(nano_model):
    cfg = nano_model.cfg
    with pytest.raises(ContextLengthError, match="exceeds seq_length"):
        nano_model(torch.zeros(1, cfg.seq_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="image span"):
        nano_model(torch.tensor([[cfg.image_start_id, 1, 2, cfg.image_end_id]]),
                   image_embeds=torch.zeros(1, cfg.visual.n_queries, cfg.hidden_size))
    bad = nano_config(NanoSpec(), 256).to_dict()
    bad["kv_channels"] = 7
    with pytest.raises(ConfigError, match="kv_channels"):
        QwenVLConfig.from_dict(bad)


def test_random_checkpoint_streams_in_shards(tmp_path):
    cfg = nano_config(NanoSpec(hidden_size=256, num_hidden_layers=3), 256)
    out = write_random_checkpoint(tmp_path / "rand", cfg, max_shard_bytes=1_000_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    total = sum(math.prod(s) for s in expected_shapes(cfg).values()) * 2
    assert index["metadata"]["total_size"] == total
    m = load_model(out, "fp32")
    assert sum(p.numel() for p in m.parameters()) * 2 == total


def test_fingerprint_sees_retrained_weights_with_the_same_index(tmp_path, nano_ckpt, nano_model):
    """Export caches are keyed on the checkpoint fingerprint: new weights under the same tensor
    and shard names (a retrained model) must not reuse the old engines."""
    import os
    import shutil

    from models.checkpoint import CheckpointReader

    ck = tmp_path / "ck"
    shutil.copytree(nano_ckpt, ck)
    before = CheckpointReader(ck).fingerprint()
    index_before = CheckpointReader(ck).sha256_of_index()
    assert CheckpointReader(ck).fingerprint() == before  # stable while nothing changes
    cfg = QwenVLConfig.from_pretrained(ck)
    retrained = save_checkpoint(nano_model, cfg, tmp_path / "new", dtype="fp32")
    for f in retrained.glob("model*.safetensors"):
        shutil.copy(f, ck / f.name)
        os.utime(ck / f.name, ns=(1, 1))  # a different mtime, as any rewrite gives
    assert CheckpointReader(ck).sha256_of_index() == index_before
    assert CheckpointReader(ck).fingerprint() != before
