"""Smoke runs of every benchmark script at nano size, so they never rot. They check that each
prints one well-formed record whose figures are consistent with each other; no speed is asserted
(speed targets live in bench/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(module: str, *args: str, timeout: int = 300) -> dict:
    r = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stdout  # exactly one JSON record on stdout
    return json.loads(lines[0])


def _stat_ok(s: dict) -> None:
    assert 0 < s["min_ms"] <= s["median_ms"] <= s["p90_ms"]
    assert s["iters"] >= 1


def test_bench_decoder_nano(tmp_path: Path) -> None:
    rec = run_bench("bench.decoder", "--threads", "1", "--new-tokens", "12", "--eager-tokens", "3",
                    "--rounds", "2", "--profile", "--work", str(tmp_path),
                    "--attention", "gqa", "mha")
    ours, eager = rec["ours"], rec["eager"]
    # the thread count is explicit and recorded for every contender, with its CPU utilisation
    assert rec["threads"] == ours["threads"] == eager["threads"] == 1
    assert [r["ours"]["threads"] for r in rec["rounds"]] == [1, 1]
    # the second round runs the contenders in reverse order (both orders in the spread)
    assert [r["order"] for r in rec["rounds"]] == ["forward", "reverse"]
    for r in [*rec["rounds"], {"ours": eager}]:
        assert r["ours"]["cpu_util"]["prefill"] > 0 and r["ours"]["cpu_util"]["decode"] > 0
    # ours is the median of its alternating runs (the lower middle one of two)
    assert ours["decode"]["median_ms"] == min(r["ours"]["decode_median_ms"] for r in rec["rounds"])
    assert ours["logits_finite"] and "genai" not in rec["rounds"][0]
    assert rec["bandwidth"]["read_gbs"] > 0
    assert ours["new_tokens"] == 12 and ours["image_rows"] == 256
    assert ours["prompt_tokens"] == rec["shapes"]["prompt_tokens"] == 288
    _stat_ok(ours["decode"])
    _stat_ok(eager["decode"])
    # bytes read per token: less than the engine's files (the embedding table is not read)
    files = sum(p.stat().st_size
                for p in (tmp_path / f"ours-L{rec['shapes']['layers']}-gqa").iterdir())
    assert 0 < ours["weights_read_per_token"] < files
    assert ours["bytes_read_per_token"] == ours["weights_read_per_token"] + ours["kv_read_per_token"]
    assert ours["ceiling_tok_s"] == pytest.approx(
        rec["bandwidth"]["read_gbs"] * 1e9 / ours["bytes_read_per_token"], rel=1e-3)
    assert ours["pct_of_ceiling"] == pytest.approx(
        100 * ours["tok_s"] / ours["ceiling_tok_s"], abs=0.06)
    assert rec["ours_over_eager"] == pytest.approx(ours["tok_s"] / eager["tok_s"], rel=1e-2)
    # the second attention variant alternates with the first, each with its own profile
    mha = rec["ours_mha"]
    assert (ours["attention"], ours["kv_layout"], mha["attention"], mha["kv_layout"]) == (
        "gqa", "shared", "mha", "concat")
    assert ours["kv_cache_bytes"] * 2 == mha["kv_cache_bytes"]  # one buffer, not two
    assert [r["ours_over_mha"] for r in rec["rounds"]] == rec["ours_over_mha"]["per_round"]
    assert rec["rounds"][0]["ours_over_mha"] == pytest.approx(
        rec["rounds"][0]["ours_mha"]["decode_median_ms"]
        / rec["rounds"][0]["ours"]["decode_median_ms"], rel=1e-2)
    for rep, attention_op in ((ours, "GroupQueryAttention"), (mha, "MultiHeadAttention")):
        prof = rep["profile"]
        assert prof["steps"] == 8
        assert sum(prof["share_by_op"].values()) == pytest.approx(1.0, abs=0.01)
        assert "MatMulNBits" in prof["share_by_op"] and attention_op in prof["share_by_op"]
        assert set(prof["median_ms_per_step_by_op"]) == set(prof["share_by_op"])
        assert sum(prof["median_ms_per_step_by_op"].values()) <= prof["run_ms_per_step"] * 1.5


def test_bench_ttft_nano() -> None:
    rec = run_bench("bench.ttft", "--iters", "2", "--threads", "1")
    warm = rec["warm"]
    assert set(warm) == {"preprocess", "vision", "prefill", "ttft"}
    for s in warm.values():
        _stat_ok(s)
    # every call's ttft covers its three stages, so the fastest ttft >= the sum of the fastest stages
    parts = sum(warm[k]["min_ms"] for k in ("preprocess", "vision", "prefill"))
    assert warm["ttft"]["min_ms"] >= parts - 0.01
    assert rec["precision"] == "int4" and rec["prompt_tokens"] > 256


def test_bench_vision_and_decode_nano() -> None:
    vis = run_bench("bench.vision", "--warmup", "0", "--iters", "1")
    assert vis["shapes"]["output"][1] == 256
    assert vis["agreement"]["min_cosine"] > 0.9999
    dec = run_bench("bench.decode", "--new-tokens", "8", "--repeats", "1")
    assert dec["new_tokens"] == 8
    assert dec["pipeline_ms_per_token"] > 0 and dec["bare_session_run_ms_per_token"] > 0


def test_bench_verify_nano(fp32_bundle, tmp_path) -> None:
    rec = run_bench("bench.verify", "--bundle", str(fp32_bundle), "--pad-gb", "0.02", "--work",
                    str(tmp_path / "padded"))
    assert rec["bench"] == "verify" and rec["bundle_bytes"] > 20_000_000
    assert rec["first_verify_s"] > 0 and len(rec["repeat_verify_s"]) == 3
    assert len(rec["repeat_pipeline_start_s"]) == 3


def test_bench_serve_nano(fp32_bundle) -> None:
    rec = run_bench("bench.serve", "--bundle", str(fp32_bundle), "--clients", "1", "2",
                    "--requests", "2", "--iters", "1", "--new-tokens", "4")
    assert rec["bench"] == "serve" and [r["clients"] for r in rec["loopback"]] == [1, 2]
    for r in rec["loopback"]:
        assert r["ok"] == r["requests"] == 2 and r["failed"] == r["rejected_429"] == 0
        assert r["req_per_s"] > 0 and 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        _stat_ok(r["total"])
    _stat_ok(rec["in_process"]["ttft"])
    assert rec["in_process"]["four_requests"]["batch_speedup"] > 0
    assert rec["overhead_1_client"]["total_ms"] == pytest.approx(
        rec["loopback"][0]["total"]["median_ms"] - rec["in_process"]["total"]["median_ms"],
        abs=1e-2)
    rss = rec["server_rss_kib"]
    assert rss["after_warmup"] > 0 and rss["after_runs"] > 0
    # warm-up (2) + 2 + 2 requests of 4 tokens each reached the server's counters
    assert rec["server_generated_tokens"] >= 6 * 4


def test_bench_attention_small() -> None:
    rec = run_bench("bench.attention", "--heads", "2", "--head-dim", "8", "--past", "5", "9",
                    "--pairs", "3", "--threads", "1")
    assert [r["past"] for r in rec["rows"]] == [5, 9]
    for r in rec["rows"]:
        assert r["mha_ms"] > 0 and r["gqa_ms"] > 0 and r["mha_over_gqa"] > 0


def test_bench_decoder_pair_nano(tmp_path: Path) -> None:
    from exporters.decoder import export_decoder
    from models.checkpoint import load_model
    from models.nano import default_checkpoint

    model = load_model(default_checkpoint(), "fp32")
    paths = [export_decoder(model, tmp_path / a / "decoder.onnx", plan="fp32",
                            attention=a).onnx_path for a in ("gqa", "mha")]
    rec = run_bench("bench.decoder_pair", "--a", str(paths[0]), "--b", str(paths[1]),
                    "--threads", "1", "--prompt-tokens", "20", "--new-tokens", "6", "--rounds", "2")
    assert rec["kv_layouts"] == ["shared", "concat"] and len(rec["rounds"]) == 2
    for r in rec["rounds"]:
        assert min(r["decode_median_ms"]) > 0 and r["b_over_a"] > 0


def test_bench_ttft_per_plan_nano(tmp_path_factory, nano_ckpt, nano_model, fp32_bundle) -> None:
    """The per-plan mode: every plan's vision / prefill / TTFT at explicit threads, one-shot and
    chunked prefill (chunks must not change the logits), contenders alternating."""
    from conftest import shared_bundle

    int4_cpu = shared_bundle(tmp_path_factory, "ttft-int4-cpu", nano_ckpt, nano_model,
                             plan="int4", target="cpu")
    rec = run_bench("bench.ttft", "--bundles", str(fp32_bundle), str(int4_cpu), "--threads", "1",
                    "--chunks", "64", "--rounds", "2", "--iters", "1")
    rows = {(r["plan"], r["chunk"]): r for r in rec["table"]}
    assert set(rows) == {(p, c) for p in ("fp32", "int4-cpu") for c in (0, 64)}
    for c in rec["contenders"]:
        assert c["threads"] == 1 and c["rounds"] == 2 and c["prompt_tokens"] == 288
        assert set(c["cpu_util"]) == {"vision", "prefill_0", "prefill_64"}
        assert all(len(v) == 2 and all(x > 0 for x in v) for v in c["cpu_util"].values())
        # chunked prefill (5 calls of <= 64 tokens on one KV cache) gives the one-shot logits
        assert c["chunk_max_abs_diff"]["0"] == 0.0 and c["chunk_max_abs_diff"]["64"] < 1e-3
        for chunk in ("0", "64"):
            _stat_ok(c["ttft"][chunk])
            # every run's TTFT covers its stages: the fastest TTFT >= the fastest parts
            parts = c["vision"]["min_ms"] + c["prefill"][chunk]["min_ms"]
            assert c["ttft"][chunk]["min_ms"] >= parts - 0.01
            assert rows[c["label"], int(chunk)]["ttft_ms"] == c["ttft"][chunk]["median_ms"]
        assert c["files_bytes"]["vision"] > 0 and c["files_bytes"]["decoder"] > 0
        runs = c["per_run_ms"]  # every run kept, so a starved round can be told apart
        assert len(runs["vision"]) == 2 and set(runs["prefill"]) == {"0", "64"}
        assert min(runs["prefill"]["64"]) == pytest.approx(c["prefill"]["64"]["min_ms"], abs=0.1)
    assert len(rec["load_avg_1_5_15"]["start"]) == 3


def test_ttft_plan_engines_nano(tmp_path: Path, nano_ckpt, fp32_bundle) -> None:
    """``--plans`` exports what ``export.py --plan P --target T`` would: the edge plan's int8
    vision engine (from the fp32 one, calibrated) and each target's decoder; fp16's two targets
    are one build."""
    import shutil

    import onnx

    from bench.ttft_plans import export_plan_engines, plan_targets
    from quant.plans import PLANS

    assert plan_targets(["fp16", "int4"], ["cpu", "gpu"]) == [("fp16", "cpu"), ("int4", "cpu"),
                                                              ("int4", "gpu")]
    (tmp_path / "vision-fp32").mkdir()  # the traced fp32 graph, reused: only int8 is new
    shutil.copy(fp32_bundle / "vision.onnx", tmp_path / "vision-fp32" / "vision.onnx")
    engines = export_plan_engines(nano_ckpt, tmp_path, ["edge"], ["cpu", "gpu"], calib_images=2)
    assert [e.label for e in engines] == ["edge-cpu", "edge-gpu"]

    def ops(path: str) -> set[str]:
        return {n.op_type for n in onnx.load(path, load_external_data=False).graph.node}

    assert {e.vision for e in engines} == {str(tmp_path / "vision-int8" / "vision.onnx")}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(engines[0].vision)
    attention_op = {"gqa": "GroupQueryAttention", "mha": "MultiHeadAttention"}
    for e in engines:  # each target's decoder as the plan table builds it
        settings = PLANS["edge"].target(e.target)
        assert {"GatherBlockQuantized", attention_op[settings.attention]} <= ops(e.decoder)
        inputs = onnx.load(e.decoder, load_external_data=False).graph.input
        kv = {v.type.tensor_type.elem_type for v in inputs if v.name.startswith("past")}
        assert kv == {{"fp16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8,
                       "fp32": onnx.TensorProto.FLOAT}[settings.kv_dtype]}


def test_bench_vision_contender_nano(tmp_path: Path) -> None:
    """The TensorRT-LLM recipe's ONNX step (opset 17, wrapper around visual(images)) re-run on
    the nano tower, beside our engine: both agree with PyTorch eager and are timed."""
    import onnx

    rec = run_bench("bench.vision_contender", "--threads", "1", "--rounds", "1",
                    "--work", str(tmp_path))
    assert set(rec["engines"]) == {f"{w}_{p}" for w in ("ours", "trtllm_recipe")
                                   for p in ("fp32", "fp16")}
    for prec, min_cos in (("fp32", 0.99999), ("fp16", 0.9995)):
        ours, theirs = rec["engines"][f"ours_{prec}"], rec["engines"][f"trtllm_recipe_{prec}"]
        assert theirs["opset"] == {"ai.onnx": 17} and ours["opset"] == {"ai.onnx": 18}
        m = onnx.load(str(tmp_path / f"trtllm-recipe-{prec}" / "visual.onnx"),
                      load_external_data=False)
        io = [v.type.tensor_type for v in (m.graph.input[0], m.graph.output[0])]
        assert m.graph.input[0].name == "input" and io[0].shape.dim[0].dim_param  # dynamic batch
        assert io[0].elem_type == io[1].elem_type == onnx.TensorProto.FLOAT  # float32 I/O
        weights = {t.data_type for t in m.graph.initializer if len(t.dims) == 2}
        assert weights == {onnx.TensorProto.FLOAT16 if prec == "fp16" else onnx.TensorProto.FLOAT}
        for e in (ours, theirs):
            assert e["vs_eager"]["cosine"] > min_cos and e["nodes"] > 0 and e["file_bytes"] > 0
            _stat_ok(e["time"])
        assert rec[f"recipe_over_ours_{prec}"] == pytest.approx(
            theirs["time"]["median_ms"] / ours["time"]["median_ms"], rel=1e-2)
