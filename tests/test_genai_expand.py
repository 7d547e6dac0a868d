"""bench.genai_expand on onnxruntime-genai 0.18 builder output at nano size
(tests/golden/genai_nano, built from the nano checkpoint; see its README). The builder itself is
not needed: its output is committed, and the expanded model runs on plain onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bench.genai_expand import (ExpandError, check_logits, expand, renamer, signature,
                                source_bytes)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "genai_nano"


def _tensors(model_dir: Path) -> dict[str, tuple[list[int], int, bytes]]:
    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return {t.name: (list(t.dims), t.data_type, bytes(source_bytes(t, model_dir)))
            for t in m.graph.initializer}


def test_renamer_maps_all_indices_at_once() -> None:
    rn = renamer({1: 5, 0: 4})
    for name, want in [
            ("/model/layers.1/attn/GroupQueryAttention",
             "/model/layers.5/attn/GroupQueryAttention"),
            ("/model/layers.0/mlp/down_proj/MatMul/output_0",
             "/model/layers.4/mlp/down_proj/MatMul/output_0"),
            ("model.layers.1.attn.qkv_proj.MatMul.weight_Q4",
             "model.layers.5.attn.qkv_proj.MatMul.weight_Q4"),
            ("past_key_values.1.key", "past_key_values.5.key"),
            ("present.0.value", "present.4.value"),
            ("cos_cache", "cos_cache"), ("/model/layers.12/x", "/model/layers.12/x")]:
        assert rn(name) == want


def test_expanded_graph_is_the_builders_graph(tmp_path: Path) -> None:
    """2 built layers expanded to 3 == the builder's own 3-layer graph, byte for byte (nodes,
    names, KV I/O, initializer names/shapes/dtypes and their offsets in the data file)."""
    out = expand(GOLDEN / "L2", tmp_path / "x3", layers=3)
    built = GOLDEN / "L3" / "model.onnx"
    assert signature(out / "model.onnx") == signature(built)
    assert (out / "model.onnx").read_bytes() == built.read_bytes()
    m = onnx.load(str(built), load_external_data=False)
    ends = [int(e["offset"]) + int(e["length"]) for e in
            ({x.key: x.value for x in t.external_data} for t in m.graph.initializer)]
    assert (out / "model.onnx.data").stat().st_size == max(ends)
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg == json.loads((GOLDEN / "L3" / "genai_config.json").read_text())


def test_expand_depth_and_vocab(tmp_path: Path) -> None:
    out = expand(GOLDEN / "L2", tmp_path / "x5", layers=5, vocab=1000)
    src, new = _tensors(GOLDEN / "L2"), _tensors(out)
    sig = signature(out / "model.onnx")
    assert sig["ops"].count("GroupQueryAttention") == 5
    assert [n for n in sig["inputs"] if n.startswith("past_key_values")] == \
        [f"past_key_values.{i}.{w}" for w in ("key", "value") for i in range(5)]
    assert [o for o in sig["outputs"] if o.startswith("present")] == \
        [f"present.{i}.{w}" for w in ("key", "value") for i in range(5)]
    # built layers and shared tensors are copied; the final norm moves to index 5
    for name in ("model.layers.0.attn.qkv_proj.MatMul.weight_Q4", "cos_cache",
                 "model.layers.1.mlp.down_proj.MatMul.weight_scales"):
        assert new[name] == src[name]
    assert new["model.layers.5.final_norm_layernorm.weight"] == \
        src["model.layers.2.final_norm_layernorm.weight"]
    # new layers: the template's shapes and dtypes, fresh values drawn from its values
    for i in (2, 3, 4):
        for part in ("attn.qkv_proj.MatMul.weight_Q4", "mlp.up_proj.MatMul.weight_scales",
                     "post_attention_layernorm.weight"):
            dims, dtype, data = new[f"model.layers.{i}.{part}"]
            tdims, tdtype, tdata = src[f"model.layers.1.{part}"]
            assert (dims, dtype, len(data)) == (tdims, tdtype, len(tdata))
            assert data != tdata
            assert set(np.frombuffer(data, np.uint8)) <= set(np.frombuffer(tdata, np.uint8))
    assert new["model.embed_tokens.weight"][0] == [1000, 128]
    assert new["lm_head.MatMul.weight_Q8"][0][0] == 1000
    assert new["lm_head.MatMul.weight_scales"][0][0] == 1000
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert (cfg["vocab_size"], cfg["decoder"]["num_hidden_layers"]) == (1000, 5)
    res = check_logits(out, tokens=6, threads=1)
    assert res["shape"] == [1, 6, 1000] and res["finite"] and res["max_abs"] > 0


def test_expand_is_deterministic_and_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    a = expand(GOLDEN / "L2", tmp_path / "a", layers=4)
    b = expand(GOLDEN / "L2", tmp_path / "b", layers=4)
    assert (a / "model.onnx.data").read_bytes() == (b / "model.onnx.data").read_bytes()
    with pytest.raises(ExpandError, match="cannot shrink"):
        expand(GOLDEN / "L2", tmp_path / "c", layers=1)
    r = subprocess.run([sys.executable, "-m", "bench.genai_expand", "--model", str(GOLDEN / "L2"),
                        "--out", str(a), "--layers", "4"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "exists" in r.stderr


def test_cli_checks_logits(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.genai_expand", "--model", str(GOLDEN / "L2"),
                        "--out", str(tmp_path / "x"), "--layers", "3", "--vocab", "300",
                        "--check"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["finite"] and res["shape"] == [1, 8, 300]


def test_genai_threads_written_explicitly(tmp_path: Path) -> None:
    """onnxruntime-genai 0.18 runs on one thread when genai_config.json names none."""
    from bench.genai_baseline import set_threads

    (tmp_path / "genai_config.json").write_bytes((GOLDEN / "L2" / "genai_config.json").read_bytes())
    assert "intra_op_num_threads" not in (tmp_path / "genai_config.json").read_text()
    set_threads(tmp_path, 2)
    cfg = json.loads((tmp_path / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    assert cfg["model"]["decoder"]["session_options"]["log_id"] == "onnxruntime-genai"


def test_ratio_spread_and_median_run() -> None:
    from bench.decoder import median_run, spread

    assert spread([1.2, 0.9, 1.0]) == {"median": 1.0, "min": 0.9, "max": 1.2,
                                       "per_round": [1.2, 0.9, 1.0]}
    runs = [{"decode": {"median_ms": m}, "i": i} for i, m in enumerate([30.0, 10.0, 20.0, 40.0])]
    assert median_run(runs)["i"] == 2 and median_run(runs[:3])["i"] == 2


def test_genai_build_passes_prune_lm_head_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    """Both contenders compute the prefill's logits at the last position only when compared so."""
    import bench.genai_baseline as gb

    cmds = []
    monkeypatch.setattr(gb.subprocess, "run", lambda cmd, check: cmds.append(cmd))
    gb.build(tmp_path / "hf", tmp_path / "out", tmp_path / "cache")
    gb.build(tmp_path / "hf", tmp_path / "out", tmp_path / "cache", prune_lm_head=True)
    assert "prune_lm_head=true" not in cmds[0] and "prune_lm_head=true" in cmds[1]
    assert "accuracy_level=4" in cmds[0] and "accuracy_level=4" in cmds[1]
