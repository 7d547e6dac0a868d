"""The shipped trained nano checkpoint really grounds and reads (held-out synthetic scenes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "nano" / "qwen-vl-nano"

# Floors a little under the figures measured on 200 held-out scenes (training_report.json);
# 10 scenes are few, so each floor leaves room for ~2 misses more than the measured rate.
GROUNDING_HIT_FLOOR = 0.6
OCR_EXACT_FLOOR = 0.6


@pytest.fixture(scope="module")
def trained():
    import torch

    from models.checkpoint import load_model
    from models.evaluate_nano import load_tokenizer

    torch.set_num_threads(2)
    return load_model(SHIPPED, "fp32"), load_tokenizer(SHIPPED)


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
    assert rep["eval"]["grounding"]["iou@0.5"] >= 0.8 and rep["eval"]["ocr"]["exact_match"] >= 0.8


def test_heldout_grounding_and_ocr(trained):
    from models.evaluate_nano import evaluate

    model, tok = trained
    t0 = time.time()
    res = evaluate(model, tok, n=10, start=0)
    g, o = res["grounding"], res["ocr"]
    assert g["iou@0.5"] >= GROUNDING_HIT_FLOOR, g
    assert o["exact_match"] >= OCR_EXACT_FLOOR, o
    assert g["mean_iou"] >= GROUNDING_HIT_FLOOR - 0.1, g
    assert o["cer"] <= 1 - OCR_EXACT_FLOOR, o
    assert time.time() - t0 < 60


def test_answer_format_round_trips(trained):
    """A grounding answer is `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` that the runtime
    parses, with the phrase of the question."""
    from calib_data import synth
    from models.evaluate_nano import answer
    from runtime.grounding import parse_grounding

    model, tok = trained
    ex = synth.make_example(synth.split_seed("val", 1), "grounding", form="chat")
    text = answer(model, tok, ex)
    found = parse_grounding(text, [ex.size])
    assert found and found[0].ref == ex.truth["phrase"], text


def test_metrics():
    from models.evaluate_nano import cer, iou

    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    assert cer("STOP", "STOP") == 0.0
    assert cer("STOP", "SHOP") == 0.25
    assert cer("42", "") == 1.0
    assert cer("", "") == 0.0
