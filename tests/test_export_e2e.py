"""export.py end to end on a tiny nano checkpoint: bundle, resume after an interruption, memory plan."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from exporters import pipeline
from exporters.memory_plan import plan_memory
from exporters.pipeline import ExportOptions, run_export
from models.config import qwen_vl_chat_config
from runtime.bundle import verify_bundle

ROOT = Path(__file__).resolve().parents[1]


def _opts(ckpt, out, **kw) -> ExportOptions:
    base = dict(checkpoint=ckpt, out=out, n_calib=8, n_val=3, demo=False)
    base.update(kw)
    return ExportOptions(**base)


def test_fp32_flow_writes_a_verified_bundle_that_passes(nano_ckpt, tmp_path, monkeypatch):
    rep = run_export(_opts(nano_ckpt, tmp_path / "b32", plan="fp32"))
    assert rep.verdict == "PASS", rep.validation
    man = verify_bundle(rep.bundle)
    names = set(man.files)
    assert {"vision.onnx", "decoder.onnx", "tokenizer/qwen.tiktoken", "report/drift.json",
            "report/drift.html"} <= names
    drift = json.loads((rep.bundle / "report" / "drift.json").read_text())
    assert drift["verdict"] == "PASS"
    assert not list(tmp_path.glob(".b32.tmp-*"))  # no temporary sibling left behind
    # a rerun from the same checkpoint replaces its own bundle (every stage cached)
    again = run_export(_opts(nano_ckpt, tmp_path / "b32", plan="fp32"))
    assert all(s.cached for s in again.stages) and verify_bundle(again.bundle).files == man.files
    assert not list(tmp_path.glob(".b32.*"))
    assert man.target == "gpu" and drift["target"] == "gpu"
    # a changed bound re-runs the drift report (its cached stage is keyed on the bounds)
    from dataclasses import replace

    from validate import thresholds

    old = thresholds.thresholds_for("fp32")["decoder", "kl_mean"].value
    rows = [replace(t, value=t.value * 2) if (t.stage, t.metric) == ("decoder", "kl_mean")
            else t for t in thresholds.PLANS["fp32"]]
    monkeypatch.setitem(thresholds.PLANS, "fp32", rows)
    third = run_export(_opts(nano_ckpt, tmp_path / "b32", plan="fp32"))
    cached = {s.name: s.cached for s in third.stages}
    assert not cached["validate"] and cached["candidate"] and cached["decoder"], cached
    bound = next(m for m in json.loads((third.bundle / "report" / "drift.json").read_text())
                 ["stages"]["decoder"]["metrics"] if m["name"] == "kl_mean")["threshold"]
    assert bound == 2 * old, (bound, old)


def test_interrupted_run_leaves_no_bundle_and_resumes(nano_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b4"
    real = pipeline._export_decoder

    def boom(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the decoder export

    monkeypatch.setattr(pipeline, "_export_decoder", boom)
    with pytest.raises(KeyboardInterrupt):
        run_export(_opts(nano_ckpt, out, plan="int4", allow_drift=True))
    assert not out.exists()
    work = out.parent / f"{out.name}.work"
    assert (work / "quant" / "stage.json").is_file() and (work / "vision" / "stage.json").is_file()
    assert not (work / "decoder").exists() and not list(work.glob(".decoder.tmp-*"))

    monkeypatch.setattr(pipeline, "_export_decoder", real)
    rep = run_export(_opts(nano_ckpt, out, plan="int4", allow_drift=True))
    cached = {s.name: s.cached for s in rep.stages}
    assert cached["quant"] and cached["vision"] and not cached["decoder"]
    man = verify_bundle(rep.bundle)
    assert man.precision == "int4"
    # Random weights quantise badly: int4 top-1 agreement 0.75 < 0.85, so the drift report FAILs
    # and --allow-drift still writes the (verified) bundle.
    assert rep.verdict == "FAIL", rep.validation


def test_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    import export

    assert export.main(["--checkpoint", str(tmp_path / "missing"), "--out",
                        str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0]


def test_memory_plan_matches_design_arithmetic():
    """docs/DESIGN.md §5: ViT fp16 3.9 GB (int8 1.9), int4 Linears 3.4 GB, head 0.6, KV 524 KB."""
    cfg = qwen_vl_chat_config()
    p = plan_memory(cfg, "int4", "agx-orin-32gb")
    assert p.kv_bytes_per_token == 524_288
    assert abs(p.vision_bytes / 3.871e9 - 1) < 0.02  # 1.9356 B params x 2 bytes
    assert abs(p.decoder_linear_bytes / 3.4e9 - 1) < 0.02
    assert abs(p.lm_head_bytes / 0.6e9 - 1) < 0.05  # "0.6 GB" is itself rounded (0.62 GB)
    assert abs(plan_memory(cfg, "edge", "agx-orin-32gb").vision_bytes / 1.9e9 - 1) < 0.03
    assert abs(p.bytes_read_per_token / 3.9e9 - 1) < 0.02  # DESIGN.md §7: ~3.9 GB/token
    assert p.fits and p.max_context_resident == 2048
    assert not plan_memory(cfg, "int4", "orin-nano-8gb").fits


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmd = [ln for ln in ci.splitlines() if "pytest" in ln and not ln.startswith("#")]
    assert len(cmd) == 1 and cmd[0].strip() in readme
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "constraints.txt").read_text(), re.M)


def test_inconclusive_drift_report_fails_unless_accepted(nano_ckpt, tmp_path, capsys):
    """Random nano weights emit no boxes: the grounding gates cannot be judged, so export.py
    exits 1 with one line and writes no bundle; --accept-inconclusive writes it, and its
    manifest says INCONCLUSIVE and why (before: PASS with grounding 0/n vs truth)."""
    import export
    from calib_data import build
    from calib_data.manifest import write_manifest

    items = [build.synth_item("calib", j) for j in range(2)]
    items += [it for it in (build.synth_item("validation", j) for j in range(3))
              if it.task == "grounding"][:1]
    man = write_manifest(tmp_path / "m.jsonl", items)
    out = tmp_path / "b"
    args = ["--checkpoint", str(nano_ckpt), "--plan", "fp32", "--calib", str(man), "--out",
            str(out), "--no-demo"]
    assert export.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation INCONCLUSIVE (" in err[0]
    assert "none of the 1 grounding items with a box" in err[0]
    assert "--accept-inconclusive" in err[0] and not out.exists()
    assert export.main([*args, "--accept-inconclusive"]) == 0  # the cached stages are reused
    v = verify_bundle(out).data["validation"]
    assert v["verdict"] == "INCONCLUSIVE" and "grounding" in v["inconclusive"][0]
