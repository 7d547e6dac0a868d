"""The shipped nano checkpoint: real layout, loads, reads signs, answers in the grounding format.

Held-out figures of the shipped checkpoint (training_report.json, 100 scenes): OCR exact match
93 %, grounding IoU@0.5 97 % (issue 9's targets: >= 80 % each); on 200 further scenes never used
to pick it, 95 % and 96 %. The floors below guard what it reaches, on the first 20 held-out
scenes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "nano" / "qwen-vl-nano"



@pytest.fixture(scope="module")
def trained():
    import torch

    from models.checkpoint import load_model
    from training.evaluate_nano import load_tokenizer

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield load_model(SHIPPED, "fp32"), load_tokenizer(SHIPPED)
    torch.set_num_threads(old)


def test_shipped_layout_and_size():
    from models.nano import default_checkpoint

    assert (SHIPPED / "config.json").is_file(), "the trained nano checkpoint is not shipped"
    assert default_checkpoint() == SHIPPED
    names = {p.name for p in SHIPPED.iterdir()}
    for f in ("config.json", "model.safetensors.index.json", "qwen.tiktoken",
              "generation_config.json", "tokenizer_config.json", "training_report.json"):
        assert f in names, f
    total = sum(p.stat().st_size for p in SHIPPED.iterdir())
    assert total < 20e6
    cfg = json.loads((SHIPPED / "config.json").read_text())
    v = cfg["visual"]
    assert (v["image_size"], v["patch_size"]) == (448, 14) and "n_queries" not in v  # 256 slots
    assert cfg["hidden_size"] % 128 == 0
    rep = json.loads((SHIPPED / "training_report.json").read_text())
    assert rep["steps"] > 0 and "grounding" in rep["eval"] and "ocr" in rep["eval"]


# Measured on these 20 scenes with the shipped checkpoint: OCR 17/20, grounding 20/20 hits,
# mean IoU 0.72. Each floor leaves room for a few misses (other torch builds, BLAS order).
OCR_EXACT_FLOOR = 0.75
GROUNDING_HIT_FLOOR = 0.85
GROUNDING_MEAN_IOU_FLOOR = 0.6


def test_heldout_reading_and_grounding_floors(trained):
    from training.evaluate_nano import evaluate

    model, tok = trained
    res = evaluate(model, tok, n=20, start=0)
    g, o = res["grounding"], res["ocr"]
    assert o["exact_match"] >= OCR_EXACT_FLOOR, o
    assert o["cer"] <= 1 - OCR_EXACT_FLOOR, o
    assert g["iou@0.5"] >= GROUNDING_HIT_FLOOR, g
    assert g["mean_iou"] >= GROUNDING_MEAN_IOU_FLOOR, g


def test_answer_format_round_trips(trained):
    """A grounding answer is `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` that the runtime
    parses, with the phrase of the question."""
    from calib_data import synth
    from training.evaluate_nano import answer
    from runtime.grounding import parse_grounding

    model, tok = trained
    ex = synth.make_example(synth.split_seed("val", 1), "grounding", form="chat")
    text = answer(model, tok, ex)
    found = parse_grounding(text, [ex.size])
    assert found and found[0].ref == ex.truth["phrase"], text


def test_bundle_evaluation_asks_the_same_questions(trained, tmp_path):
    """``evaluate_nano --bundle``: an fp32 bundle of the shipped model, run through the runtime,
    gives the reference's greedy answers on the same held-out questions (so int4-vs-fp32 task
    drift measured this way is the quantization, not a different prompt)."""
    from exporters.pipeline import ExportOptions, run_export
    from training.evaluate_nano import bundle_answerer, evaluate, evaluate_with, main

    model, tok = trained
    rep = run_export(ExportOptions(checkpoint=SHIPPED, out=tmp_path / "b", plan="fp32",
                                   skip_validation=True, demo=False, n_calib=2, n_val=1))
    ref = evaluate(model, tok, n=3, start=5, worst=3)
    eng = evaluate_with(bundle_answerer(rep.bundle, threads=2), n=3, start=5, worst=3)
    for task in ("grounding", "ocr"):
        assert sorted(w["answer"] for w in eng[task]["worst"]) == \
            sorted(w["answer"] for w in ref[task]["worst"]), (eng[task], ref[task])
    assert any(w["answer"].startswith("<ref>") for w in eng["grounding"]["worst"])
    assert main(["--bundle", str(tmp_path / "missing"), "--n", "1"]) == 2
    # export.py's demo: sampled (top-p 0.3) but seeded, so a rerun prints the same answer, and
    # the shipped model's box lands on the object it names
    from exporters.pipeline import run_demo
    from training.evaluate_nano import iou
    first, again = run_demo(rep.bundle), run_demo(rep.bundle)
    assert first["answer"] == again["answer"] and first["boxes"], first
    assert iou(first["boxes"][0]["pixels"], first["truth"]) >= 0.5, first


def test_metrics():
    from training.evaluate_nano import cer, iou

    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert cer("STOP", "STOP") == 0.0
    assert cer("STOP", "SHOP") == 0.25
    assert cer("42", "") == 1.0
    assert cer("", "") == 0.0


def test_training_script_runs_and_resumes(tmp_path):
    """``python -m training.train_nano`` end to end at toy size: the curriculum, a resumable state,
    the resume, and a checkpoint in the real layout that the reference loads."""
    import subprocess
    import sys

    from models.checkpoint import load_model

    out, state = tmp_path / "ckpt", tmp_path / "state"
    base = [sys.executable, "-m", "training.train_nano", "--out", str(out), "--state-dir", str(state),
            "--layers", "1", "--vis-layers", "1", "--vis-width", "32", "--images-per-step", "1",
            "--workers", "0", "--threads", "1", "--eval-n", "0", "--val-steps", "1",
            "--eval-every", "2", "--ckpt-every", "2", "--single-object-steps", "1", "--warmup", "1"]
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(base + ["--steps", "3"], cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (state / "state.pt").is_file()
    r = subprocess.run(base + ["--steps", "4", "--resume"], cwd=repo, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step 2" in r.stderr
    rep = json.loads((out / "training_report.json").read_text())
    assert rep["steps"] == 4 and [h["step"] for h in rep["history"]] == [2, 4]
    model = load_model(out, "fp32")
    assert model.cfg.num_hidden_layers == 1 and model.cfg.visual.width == 32
    # the resampler's routing never trains: it is still init_weights's local pooling
    import torch

    from models.qwen_vl import QWenLMHeadModel
    from training.train_nano import init_weights

    fresh = QWenLMHeadModel(model.cfg)
    init_weights(fresh, 0)
    got, want = model.transformer.visual.attn_pool, fresh.transformer.visual.attn_pool
    d = want.attn.in_proj_weight.shape[1]
    assert torch.equal(got.attn.in_proj_weight[:2 * d], want.attn.in_proj_weight[:2 * d])
    assert torch.equal(got.query, want.query) and torch.equal(got.ln_kv.weight, want.ln_kv.weight)
    assert not torch.equal(got.attn.in_proj_weight[2 * d:], want.attn.in_proj_weight[2 * d:])

    # a decoder-only warm start from that state: fresh schedule, routing reset, the vision
    # tower exactly the state's, a loadable checkpoint
    out2 = tmp_path / "ckpt2"
    r = subprocess.run(base[:4] + [str(out2)] + base[5:] + ["--steps", "2", "--init-from",
                                                           str(state / "state.pt"),
                                                           "--freeze-vision", "--aux-weight", "0"],
                       cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warm start from" in r.stderr and "(step 2)" in r.stderr
    assert json.loads((out2 / "training_report.json").read_text())["steps"] == 2
    warm_model = load_model(out2, "fp32")
    src = torch.load(state / "state.pt", weights_only=False)["model"]
    for name, p in warm_model.transformer.visual.named_parameters():
        assert torch.equal(p, src["transformer.visual." + name]), name
    assert not torch.equal(warm_model.transformer.h[0].mlp.w1.weight,
                           src["transformer.h.0.mlp.w1.weight"])
    warm = warm_model.transformer.visual.attn_pool
    assert torch.equal(warm.attn.in_proj_weight[:2 * d], want.attn.in_proj_weight[:2 * d])
    assert torch.equal(warm.ln_q.weight, want.ln_q.weight)


def test_box_digit_labels():
    """The per-cell digit probe's targets are the hundreds and tens digits the answer writes."""
    from calib_data import synth
    from training.train_nano import box_digits, slot_labels

    assert box_digits((123, 45, 999, 0)) == [1, 2, 0, 4, 9, 9, 0, 0]
    ex = synth.make_example(synth.split_seed("val", 3), "grounding", index=0)
    lab = slot_labels(ex, 256)
    on = lab["cls"] >= 2
    assert on.any()
    W, H = ex.size
    boxes = {tuple(box_digits(synth.grid_box(o.box, W, H))) for o in ex.truth["objects"]}
    assert {tuple(r.tolist()) for r in lab["dig"][on]} <= boxes
    assert (lab["dig"][~on] == -100).all()


def test_deepen_warm_start_keeps_the_function(tmp_path):
    """``--init-from`` into a model with more decoder layers (``deepen``): the new layers start
    as exact no-ops, the routing is reset to the *state's* init, so the logits do not move;
    and ``--data-offset`` shifts the scenes a step trains on."""
    import dataclasses

    import torch

    from models.nano import nano_config
    from models.qwen_vl import QWenLMHeadModel
    from training import train_nano as T

    torch.manual_seed(0)
    tok, ranks = T.make_tokenizer(T.TRAINED_SPEC.n_merges)
    spec = dataclasses.replace(T.TRAINED_SPEC, num_hidden_layers=2, vis_layers=1, vis_width=32)
    small = QWenLMHeadModel(nano_config(spec, len(ranks)))
    T.init_weights(small, 0)
    with torch.no_grad():  # trained-looking output projections, so a wrong copy shows
        for blk in small.transformer.h:
            blk.attn.c_proj.weight.normal_(0, 0.05)
            blk.mlp.c_proj.weight.normal_(0, 0.05)
    torch.save({"model": small.state_dict(), "step": 7}, tmp_path / "state.pt")
    deep = QWenLMHeadModel(nano_config(dataclasses.replace(spec, num_hidden_layers=4), len(ranks)))
    T.init_weights(deep, 1)
    T.warm_start(deep, tmp_path / "state.pt", 0)
    T.warm_start(small, tmp_path / "state.pt", 0)
    assert torch.count_nonzero(deep.transformer.h[1].mlp.c_proj.weight) == 0
    assert torch.equal(deep.transformer.h[2].attn.c_attn.weight, small.transformer.h[1].attn.c_attn.weight)
    dc = T.DataConfig(images_per_step=1, data_offset=5)
    batch = next(iter(T.StepData(tok, dc, small.cfg, 0, 1)))
    want = T.collate(tok, T.step_items(5, dc), dc, small.cfg)
    assert torch.equal(batch.ids, want.ids) and torch.equal(batch.pixels, want.pixels)
    small.eval(), deep.eval()
    with torch.no_grad():
        a, b = T.train_logits(small, batch)[0], T.train_logits(deep, batch)[0]
    assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 2"):
        T.deepen(small.state_dict(), 3)
