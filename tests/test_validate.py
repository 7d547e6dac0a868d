"""validate/: drift metrics, thresholds, and the staged report on nano bundles with injected faults.

One faithful fp32 bundle is exported per module; the faults are injected into copies of its ONNX
files (a zeroed or scaled decoder layer, a transposed vision projection) or by validating it
against a checkpoint of another seed (an engine built from the wrong checkpoint). Each fault must
FAIL at the right stage; the faithful bundle must PASS every stage.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import bundle_variant

from validate import metrics as M
from validate.thresholds import PLANS, fingerprint, plan_name, table_markdown, thresholds_for

MAX_NEW = 10


# ---------------------------------------------------------------------------------------------
# metrics (pure numpy)
# ---------------------------------------------------------------------------------------------

def test_tensor_metrics():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert M.cosine(a, a) == pytest.approx(1.0)
    assert M.cosine(a, -a) == pytest.approx(-1.0)
    assert M.rel_l2(a, a * 1.01) == pytest.approx(0.01, rel=1e-6)
    assert M.max_abs(a, a + 0.5) == pytest.approx(0.5)
    assert M.max_abs_rel(a, a + 0.5) == pytest.approx(0.5 / 11)
    b = a.copy()
    b[0, 0], b[1, 1] = np.nan, np.inf
    assert M.nonfinite_count(b) == 2
    assert math.isnan(M.cosine(a, b)) and math.isnan(M.rel_l2(a, b))
    d = M.tensor_drift(a, b)
    assert d["nonfinite"] == 2 and math.isnan(d["max_abs"])


def test_row_cosine_and_the_export_check_share_the_edge_convention():
    """``row_cosine`` applies ``cosine``'s edge rules per row, and the export-time vision check
    (exporters/vision_check.py) reports exactly these functions' numbers."""
    from exporters.vision_check import feature_metrics

    a = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    b = a.copy()
    b[1] = -b[1]
    np.testing.assert_allclose(M.row_cosine(a, b), [1.0, -1.0, 1.0], rtol=1e-12)
    z = np.zeros_like(a)
    assert list(M.row_cosine(z, z)) == [1.0, 1.0, 1.0]  # all-zero agrees with all-zero only
    assert list(M.row_cosine(z, a)) == [0.0, 0.0, 0.0]
    c = a.copy()
    c[2, 0] = np.nan
    r = M.row_cosine(a, c)
    assert r[0] == pytest.approx(1.0) and math.isnan(r[2])
    m = feature_metrics("x", b, a)
    assert (m.cosine, m.rel_l2, m.max_abs, m.max_abs_rel) == (
        M.cosine(a, b), M.rel_l2(a, b), M.max_abs(a, b), M.max_abs_rel(a, b))
    assert m.min_token_cosine == pytest.approx(-1.0) and m.nan == m.inf == 0
    assert feature_metrics("zero", z, z).check(_tolerances()) == []
    bad = feature_metrics("nan", c, a)
    assert bad.nan == 1 and math.isnan(bad.cosine) and bad.check(_tolerances())


def _tolerances():
    from exporters.vision_check import VisionTolerances

    return VisionTolerances.for_precision("fp32")


def test_kl_topk_perplexity():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(5, 50)) * 3
    q = p + rng.normal(size=(5, 50)) * 0.1
    kl = M.kl_divergence(p, q)
    lp = p - np.log(np.exp(p).sum(-1, keepdims=True))
    lq = q - np.log(np.exp(q).sum(-1, keepdims=True))
    ref = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(kl, ref, rtol=1e-9, atol=1e-12)
    assert (M.kl_divergence(p, p) == 0).all()
    # huge fp16-range logits and masked (-inf) tokens stay finite
    big = np.array([[6e4, 0.0, -np.inf], [1.0, 2.0, 3.0]])
    assert np.isfinite(M.kl_divergence(big, big)).all()
    # the engine ruling out a token the reference allows: infinite KL; NaN logits: NaN
    assert np.isinf(M.kl_divergence([[0.0, 0.0]], [[0.0, -np.inf]])[0])
    assert np.isnan(M.kl_divergence([[0.0, 1.0]], [[np.nan, 1.0]])[0])
    t1 = M.topk_agreement([[0, 5, 1], [3, 0, 1]], [[0, 4, 5], [3, 1, 0]], 1)
    assert t1.tolist() == [0.0, 1.0]
    assert M.topk_agreement([[0, 5, 1]], [[0, 4, 5]], 2).tolist() == [1.0]
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    expected = math.exp(-(math.log(.5) + math.log(.8)) / 2)
    assert M.perplexity(logits, [0, 2]) == pytest.approx(expected)
    assert M.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert M.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert M.first_divergence([1, 2], [1, 2, 3]) == 2


def test_box_and_text_metrics():
    assert M.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert M.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert M.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert M.iou((10, 10, 0, 0), (0, 0, 10, 10)) == 1.0  # corner order does not matter
    assert M.best_iou((0, 0, 10, 10), []) == 0.0
    assert M.hit_rate([0.2, 0.5, 0.9]) == pytest.approx(2 / 3)
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.cer("STOP", "ST0P") == 0.25
    assert M.cer("STOP", " STOP ") == 0.0 and M.cer("", "") == 0.0
    assert M.exact_match("Hello  world", "Hello world\n") and not M.exact_match("a", "A")


def test_thresholds_tables():
    judged = {p: {(t.stage, t.metric) for t in PLANS[p] if t.op != "info"} for p in PLANS}
    for p in PLANS:
        assert {("vision", "cosine_min"), ("decoder", "kl_mean"), ("decoder", "top1"),
                ("task", "grounding_hit_ref")} <= judged[p]
        for t in PLANS[p]:
            assert t.why and t.op in (">=", "<=", "within", "info")
    # tighter precision -> tighter bounds
    th = {p: thresholds_for(p) for p in PLANS}
    assert th["fp32"]["decoder", "kl_mean"].value < th["fp16"]["decoder", "kl_mean"].value \
        < th["int4"]["decoder", "kl_mean"].value <= th["edge"]["decoder", "kl_mean"].value
    assert th["fp32"]["vision", "cosine_min"].value > th["edge"]["vision", "cosine_min"].value
    assert plan_name("float16") == "fp16"
    with pytest.raises(KeyError, match="no drift thresholds"):
        plan_name("int3")
    assert "| decoder | kl_mean |" in table_markdown()
    t = th["fp32"]["vision", "cosine_min"]
    assert t.judge(1.0) == "PASS" and t.judge(0.5) == "FAIL" and t.judge(float("nan")) == "FAIL"


# ---------------------------------------------------------------------------------------------
# bundles with injected faults
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faithful_bundle(tmp_path_factory, nano_ckpt, nano_model) -> Path:
    from PIL import Image

    from exporters.bundle import manifest_fields, write_bundle
    from exporters.decoder import export_decoder
    from exporters.vision import export_vision

    import torch

    d = tmp_path_factory.mktemp("validate")
    check = [("grey", np.asarray(Image.new("RGB", (64, 48), (90, 120, 200))))]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: oversubscribed threads only cost time on 2 cores
    try:
        export_vision(nano_model, d / "v" / "vision.onnx", "fp32", check_images=check,
                      write_trt_script=False)
    finally:
        torch.set_num_threads(n)
    export_decoder(nano_model, d / "dec" / "decoder.onnx", plan="fp32")
    return write_bundle(d / "bundle", {"vision.onnx": d / "v" / "vision.onnx",
                                       "decoder.onnx": d / "dec" / "decoder.onnx",
                                       "tokenizer/qwen.tiktoken": nano_ckpt / "qwen.tiktoken"},
                        manifest_fields(nano_ckpt, "fp32"))


@pytest.fixture(scope="module")
def items():
    from calib_data import build

    # grounding, ocr, grounding, caption
    val = [build.synth_item("validation", j) for j in range(4)]
    photo = [it for it in build.photo_items() if it.id == "photo-astronaut-vqa"]
    calib = [build.synth_item("calib", 0)]
    return val + photo + calib


_reports: dict[str, object] = {}


def _validate(key, bundle, model, items, out=None):
    from validate.stages import run_validation

    if key not in _reports:
        _reports[key] = run_validation(bundle, model, items, out_dir=out, max_new_tokens=MAX_NEW,
                                       threads=1)
    return _reports[key]


def _verdicts(report) -> dict[str, str]:
    return {n: s.verdict for n, s in report.stages.items()}


def test_faithful_fp32_bundle_passes_every_stage(faithful_bundle, nano_model, items, tmp_path):
    from validate.stages import NA_NO_BOXES

    r = _validate("faithful", faithful_bundle, nano_model, items, tmp_path / "report")
    # random nano weights emit no boxes and read no text: the grounding gates and the OCR
    # exact-match gate cannot be judged, so the report is INCONCLUSIVE, never a vacuous PASS
    # (the trained nano model's faithful bundles PASS: tests/test_drift_faults.py)
    assert _verdicts(r) == {"vision": "PASS", "decoder": "PASS", "task": "INCONCLUSIVE"}, \
        r.summary_line()
    assert r.verdict == "INCONCLUSIVE" and not r.passed and r.first_failure is None
    assert any("none of the 2 grounding items with a box" in w for w in r.inconclusive())
    assert "inconclusive: task: the reference answered none" in r.summary_line()
    assert r.meta["n_items"] == 5  # the calibration item is never used
    v, d, t = (r.stages[k] for k in ("vision", "decoder", "task"))
    assert v.metric("cosine_min").value > 0.99999
    assert d.metric("kl_mean").value < 1e-6 and d.metric("top1").value == 1.0
    assert d.metric("greedy_identical").value == 1.0
    # the pooled perplexity follows the worst items; the note also gives the typical item
    med = float(np.median([rec["ppl_ref"] for rec in d.items]))
    assert f"per-item median ref {med:.4g}" in d.metric("ppl_ratio").note
    assert t.metric("answer_agreement").value == 1.0
    assert t.metric("ocr_cer_ref").verdict == "PASS"
    # random nano weights emit no boxes: grounding drift is n/a, never a vacuous PASS
    g = t.metric("grounding_hit_ref")
    if not any(rec.get("ref_boxes") for rec in t.items):
        assert g.verdict == "N/A" and g.note == NA_NO_BOXES
    # report files
    out = tmp_path / "report"
    data = json.loads((out / "drift.json").read_text())
    assert data["verdict"] == "INCONCLUSIVE" and data["inconclusive"] == r.inconclusive()
    assert set(data["stages"]) == {"vision", "decoder", "task"}
    assert all("verdict" in m for s in data["stages"].values() for m in s["metrics"])
    page = (out / "drift.html").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "Worst items" in page
    assert "data:image/jpeg;base64," in page  # item thumbnails
    assert "src='http" not in page and 'src="http' not in page  # self-contained
    from PIL import Image
    for name in ("vision_cosine", "kl_hist", "agreement_by_position", "iou_scatter"):
        with Image.open(out / f"{name}.png") as im:
            assert im.size[0] > 300


def test_zeroed_decoder_layer_fails_the_decoder_stage(faithful_bundle, nano_model, items,
                                                      tmp_path_factory):
    def zero_layer(w):
        return {k: np.zeros_like(w[k]) for k in ("transformer.h.1.attn.c_proj.weight_t",
                                                 "transformer.h.1.mlp.c_proj.weight_t")}

    b = bundle_variant(faithful_bundle, tmp_path_factory.mktemp("f") / "zeroed", "decoder", zero_layer)
    r = _validate("zeroed", b, nano_model, items)
    assert r.stages["vision"].verdict == "PASS"
    assert r.stages["decoder"].verdict == "FAIL" and r.first_failure == "decoder", r.summary_line()
    assert r.stages["decoder"].metric("kl_mean").verdict == "FAIL"
    assert not r.passed


def test_scaled_decoder_layer_fails_the_decoder_stage(faithful_bundle, nano_model, items,
                                                      tmp_path_factory):
    key = "transformer.h.0.mlp.c_proj.weight_t"
    b = bundle_variant(faithful_bundle, tmp_path_factory.mktemp("f") / "scaled", "decoder",
                 lambda w: {key: w[key] * np.float32(0.9)})  # one layer's MLP output 10 % short
    r = _validate("scaled", b, nano_model, items)
    assert r.stages["vision"].verdict == "PASS"
    assert r.stages["decoder"].verdict == "FAIL" and r.first_failure == "decoder", r.summary_line()


def test_permuted_vision_projection_fails_the_vision_stage(faithful_bundle, nano_model, items,
                                                           tmp_path_factory):
    b = bundle_variant(faithful_bundle, tmp_path_factory.mktemp("f") / "perm", "vision",
                 lambda w: {"proj": w["proj"].T.copy()})  # x @ proj.T instead of x @ proj
    r = _validate("perm", b, nano_model, items)
    assert r.stages["vision"].verdict == "FAIL" and r.first_failure == "vision", r.summary_line()
    assert r.stages["vision"].metric("cosine_min").verdict == "FAIL"
    # the decoder stage runs on the reference image features: it is not blamed
    assert r.stages["decoder"].verdict == "PASS"
    # end to end the wrong features show up as drift
    assert r.stages["decoder"].metric("e2e_kl_mean").value > 1e-3


def test_engine_from_the_wrong_checkpoint_fails(faithful_bundle, items, tmp_path_factory):
    from models.checkpoint import load_model
    from models.nano import make_nano_checkpoint

    ck = make_nano_checkpoint(tmp_path_factory.mktemp("ck") / "seed1", seed=1)
    other = load_model(ck, "fp32")
    r = _validate("wrong", faithful_bundle, other, items)
    assert r.stages["vision"].verdict == "FAIL" and r.first_failure == "vision", r.summary_line()
    assert r.stages["decoder"].verdict == "FAIL"
    assert r.stages["task"].metric("answer_agreement").verdict == "FAIL"


def test_only_validation_items_are_used(faithful_bundle, nano_model, items):
    from validate.stages import run_validation

    with pytest.raises(ValueError, match="no validation items"):
        run_validation(faithful_bundle, nano_model, [it for it in items if it.split == "calib"])


def test_cli_user_jsonl_and_exit_codes(faithful_bundle, nano_ckpt, tmp_path, tmp_path_factory):
    from PIL import Image

    from validate.__main__ import main

    (tmp_path / "img").mkdir()
    for i, c in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (80 + 10 * i, 60), c).save(tmp_path / "img" / f"{i}.png")
    jl = tmp_path / "mine.jsonl"
    jl.write_text(json.dumps({"image": "img/0.png", "prompt": "What colour is it?", "task": "vqa",
                              "split": "validation"}) + "\n"
                  + json.dumps({"image": "img/1.png", "prompt": "Describe the image.",
                                "split": "validation"}) + "\n")
    args = ["--checkpoint", str(nano_ckpt), "--manifest", str(jl), "--max-new-tokens", "6",
            "--threads", "1", "--no-plots"]
    assert main(["--bundle", str(faithful_bundle), "--out", str(tmp_path / "ok"), *args]) == 0
    assert json.loads((tmp_path / "ok" / "drift.json").read_text())["verdict"] == "PASS"
    bad = bundle_variant(faithful_bundle, tmp_path_factory.mktemp("f") / "cli", "vision",
                   lambda w: {"proj": w["proj"] * np.float32(-1)})
    assert main(["--bundle", str(bad), "--out", str(tmp_path / "bad"), *args]) == 1
    assert main(["--bundle", str(bad), "--out", str(tmp_path / "bad2"), "--allow-drift",
                 *args]) == 0
    assert json.loads((tmp_path / "bad2" / "drift.json").read_text())["verdict"] == "FAIL"
    # unusable inputs: exit 2 with the manifest's message
    (tmp_path / "broken.jsonl").write_text(json.dumps({"image": "img/none.png", "prompt": "x"}))
    assert main(["--bundle", str(faithful_bundle), "--manifest", str(tmp_path / "broken.jsonl"),
                 "--checkpoint", str(nano_ckpt), "--out", str(tmp_path / "x")]) == 2
    shutil.rmtree(tmp_path / "img")


def test_task_metrics_with_boxes_and_report_drawing(tmp_path):
    """Grounding / OCR task metrics and the worst-item drawings, on scripted answers (the random
    nano model emits no boxes; the trained one does)."""
    from types import SimpleNamespace

    from calib_data import build
    from calib_data.manifest import materialise
    from validate.report import write_report
    from validate.compare import Prepared
    from validate.stages import Report, task_stage

    g0, o1, g2 = (build.synth_item("validation", j) for j in range(3))
    prepared = []
    for it in (g0, o1, g2):
        img = materialise(it)
        prepared.append(Prepared(it, img, np.zeros(1), [], ref_text=it.answer))
    # engine: g0's box moved right by 12 % of the width, g2 without a box, OCR text one char off
    x1, y1, x2, y2 = map(int, g0.answer.split("<box>")[1].strip("()</box>").replace("),(", ",")
                         .split(","))
    moved = f"({x1 + 120},{y1}),({x2 + 120},{y2})"
    eng = {g0.id: g0.answer.replace(f"({x1},{y1}),({x2},{y2})", moved),
           o1.id: o1.answer[:-1] + "#", g2.id: "I do not know."}
    ctx = SimpleNamespace(plan="int4", gates=thresholds_for("int4"),
                          pipeline_answer=lambda p: eng[p.item.id])
    st = task_stage(ctx, prepared)
    m = {x.name: x for x in st.metrics}
    assert m["answer_agreement"].value == 0.0
    assert 0.0 < m["grounding_iou_ref_mean"].value < 0.5  # one shifted box, one missing
    assert m["grounding_hit_ref"].value <= 0.5 and m["grounding_hit_ref"].verdict == "FAIL"
    assert m["grounding_hit_truth_ref"].value == 1.0  # the scripted reference is the truth
    assert m["grounding_hit_truth_drop"].value >= 0.5
    assert m["ocr_cer_ref"].value == pytest.approx(1 / len(o1.answer))
    assert m["ocr_em_truth_drop"].value == 1.0 and m["ocr_em_truth_drop"].verdict == "FAIL"
    # an OCR answer that runs on with garbage counts as one whole wrong answer (CER capped at 1)
    eng[o1.id] = o1.answer + " and then a great deal of unrelated text" * 3
    capped = {x.name: x for x in task_stage(ctx, prepared).metrics}["ocr_cer_ref"]
    assert capped.value == 1.0 and capped.verdict == "FAIL"
    rec = next(r for r in st.items if r["id"] == g0.id)
    assert rec["ref_boxes"] and rec["eng_boxes"] and rec["truth_boxes"]
    report = Report("int4", {"task": st}, {"n_items": 3}, [p.item for p in prepared],
                    {p.item.id: p.image for p in prepared})
    assert report.verdict == "FAIL" and report.first_failure == "task"
    summary = report.summary()
    assert summary["verdict"] == "FAIL" and "task.grounding_hit_ref" in summary["metrics"]
    html = write_report(report, tmp_path).read_text()
    assert html.count("data:image/jpeg;base64,") == 3
    from PIL import Image
    with Image.open(tmp_path / "iou_scatter.png") as im:
        assert im.size[0] > 300


def test_rate_drop_gates_never_judge_finer_than_one_item():
    """5 points on 10 items would fail on any one flipped item; the gate is one item there and
    the plan's threshold once enough items are measured."""
    from validate.stages import judge

    ten = judge("task", "grounding_hit_truth_drop", 0.1, "int4", n=10)
    assert ten.verdict == "PASS" and "1/10" in ten.note
    assert judge("task", "grounding_hit_truth_drop", 0.2, "int4", n=10).verdict == "FAIL"
    assert judge("task", "grounding_hit_truth_drop", 0.1, "int4", n=100).verdict == "FAIL"
    assert judge("task", "ocr_em_truth_drop", 0.1, "int4", n=100).verdict == "FAIL"
    assert judge("task", "grounding_iou_ref_mean", 0.0, "int4", n=10).verdict == "FAIL"
    # on fewer than 10 items one item is worth more than 10 points: no allowance
    assert judge("task", "grounding_hit_truth_drop", 0.2, "int4", n=5).verdict == "FAIL"
    assert judge("task", "ocr_em_truth_drop", 1.0, "int4", n=1).verdict == "FAIL"
    # the allowance is declared on the rows, and only the two rate drops carry it
    for plan, rows in PLANS.items():
        assert {t.metric for t in rows if t.per_item} == {"grounding_hit_truth_drop",
                                                           "ocr_em_truth_drop"}, plan


def test_ppl_ratio_is_judged_both_ways():
    """Answers becoming much *more* likely is a bug too (a final norm x0.9 gave ratio 0.69)."""
    from validate.stages import judge

    for plan in PLANS:
        for name in ("ppl_ratio",) + (("fq_ppl_ratio",) if plan != "fp32" else ()):
            t = thresholds_for(plan)["decoder", name]
            assert t.op == "within" and t.judge(1.0) == "PASS", (plan, name)
            lo, hi = 1.0 / t.value, t.value
            assert t.judge(lo * 1.0001) == "PASS" and t.judge(hi * 0.9999) == "PASS"
            assert t.judge(lo * 0.999) == "FAIL" and t.judge(hi * 1.001) == "FAIL", (plan, name)
    m = judge("decoder", "ppl_ratio", 0.69, "int4", n=5)
    assert m.verdict == "FAIL" and "need within 0.9524..1.05" in m.line()


def test_same_precision_rows_per_plan():
    """Exporter error is judged against the same-precision reference with fp16-level bounds in
    every reduced-precision plan; fp32's decoder rows already are that judgement."""
    for plan in ("fp16", "int4", "edge"):
        th = thresholds_for(plan)
        assert th["decoder", "fq_kl_mean"].op == "<="
        assert th["decoder", "fq_kl_mean"].value < th["decoder", "kl_mean"].value
    assert thresholds_for("int4")["decoder", "fq_kl_mean"].value \
        <= thresholds_for("fp16")["decoder", "kl_mean"].value
    assert thresholds_for("fp32")["decoder", "fq_kl_mean"].op == "info"


def test_thresholds_per_target(monkeypatch):
    """The int4 and edge cpu targets (int8-quantised MatMulNBits inputs) have their own
    exporter-error rows;
    its other rows, and the targets of other plans, are the plan's. The fingerprint that keys
    export.py's cached drift report follows every bound."""
    from validate import thresholds

    gpu, cpu = thresholds_for("int4"), thresholds_for("int4", "cpu")
    assert gpu == thresholds_for("int4", None)
    fq = {k for k in gpu if k[1].startswith("fq_")}
    assert len(fq) == 4 and all(cpu[k].value != gpu[k].value for k in fq)
    assert all(cpu[k] == gpu[k] for k in gpu if k not in fq)
    assert cpu["decoder", "fq_kl_mean"].value < cpu["decoder", "kl_mean"].value
    assert thresholds_for("fp16", "cpu") == thresholds_for("fp16")
    assert thresholds_for("edge", "cpu")["decoder", "fq_kl_mean"] == cpu["decoder", "fq_kl_mean"]
    with pytest.raises(ValueError, match="no target 'tpu'"):
        thresholds_for("edge", "tpu")
    assert table_markdown().splitlines()[0].endswith("| int4 (cpu) | edge (cpu) |")
    prints = {fingerprint(p) for p in PLANS} | {fingerprint(p, "cpu") for p in ("int4", "edge")}
    assert len(prints) == len(PLANS) + 2
    before = fingerprint("int4", "cpu")
    monkeypatch.setattr(thresholds, "REFERENCE_FLOOR", 0.2)
    assert fingerprint("int4", "cpu") != before and fingerprint("int4") not in prints


def _scripted_task(answers_ref, answers_eng, n_grounding=2, n_ocr=0):
    from types import SimpleNamespace

    from calib_data import build
    from calib_data.manifest import materialise
    from validate.compare import Prepared
    from validate.stages import task_stage

    its = [build.synth_item("validation", j) for j in range(40)]
    chosen = ([it for it in its if it.task == "grounding"][:n_grounding]
              + [it for it in its if it.task == "ocr"][:n_ocr])
    prepared = [Prepared(it, materialise(it), np.zeros(1), [], ref_text=answers_ref(it))
                for it in chosen]
    ctx = SimpleNamespace(plan="int4", gates=thresholds_for("int4"),
                          pipeline_answer=lambda p: answers_eng(p.item))
    return task_stage(ctx, prepared)


def test_unjudged_grounding_is_inconclusive_not_pass():
    """The reference emits no boxes: the grounding gates are N/A, and the stage says
    INCONCLUSIVE with the reason (before: PASS, with grounding 0/26 vs truth)."""
    from validate.stages import Report

    st = _scripted_task(lambda it: "I see shapes.", lambda it: "I see shapes.")
    assert {m.name: m.verdict for m in st.metrics}["grounding_hit_ref"] == "N/A"
    assert st.verdict == "INCONCLUSIVE"
    assert st.inconclusive == ["the reference answered none of the 2 grounding items with a box:"
                               " the grounding gates could not be judged"]
    rep = Report("int4", {"task": st}, {"n_items": 2})
    assert rep.verdict == "INCONCLUSIVE" and not rep.passed
    assert rep.summary()["inconclusive"] == ["task: " + st.inconclusive[0]]
    # with the reference's boxes the same stage is judged (and passes)
    ok = _scripted_task(lambda it: it.answer, lambda it: it.answer)
    assert ok.verdict == "PASS" and not ok.inconclusive
    # a FAIL elsewhere still makes the report FAIL
    bad = _scripted_task(lambda it: it.answer, lambda it: "no box")
    assert Report("int4", {"task": st, "x": bad}, {}).verdict == "FAIL"


def test_reference_far_below_the_manifest_is_flagged_as_broken():
    """A reference whose boxes miss every true box (and that reads none of the true texts) on
    the manifest's items is a wrong or broken checkpoint: drift from it proves nothing."""
    def far_off(it):
        return "<ref>x</ref><box>(0,0),(10,10)</box>" if it.task == "grounding" else "?"

    st = _scripted_task(far_off, far_off, n_grounding=5, n_ocr=5)
    assert st.verdict == "INCONCLUSIVE"
    why = " ".join(st.inconclusive)
    assert "the reference finds 0/5 true boxes" in why and "wrong or broken checkpoint" in why
    assert "reads 0/5 true OCR texts" in why
    # a sound reference on the same items: nothing flagged
    assert not _scripted_task(lambda it: it.answer, lambda it: it.answer, 5, 5).inconclusive


def test_same_precision_head_follows_the_bundle():
    """``python -m validate --gptq`` mirrors the head the bundle shipped (its manifest's memory
    plan), not a fixed int8, unless ``--lm-head`` says otherwise."""
    from validate.__main__ import bundle_head

    shipped = {"memory_plan": {"lm_head": "int4"}}
    assert bundle_head(shipped, "edge", None) == "int4"
    assert bundle_head(shipped, "edge", "int8") == "int8"
    assert bundle_head({}, "int4", None) == "int8"  # an older manifest: the plan row's head
    assert bundle_head({}, "edge", None) == "int4"
