"""The staged drift check: an exported bundle against the PyTorch reference, stage by stage.

On the *validation* split of a calibration manifest (never the calibration items):

1. ``vision`` — the bundle's vision engine vs the reference ``transformer.visual`` in fp32 on the
   same preprocessed pixels: cosine, relative L2, max-abs (absolute and relative), NaN/Inf.
2. ``decoder`` — the decoder engine vs the reference decoder, both fed the *reference* image
   features so that vision drift cannot leak in (it is measured in stage 1; the end-to-end
   numbers are reported as diagnostics): teacher-forced on the reference answer (the item's
   answer, else the reference model's greedy answer), per answer token KL(ref || engine), top-1 /
   top-5 agreement, perplexity ratio; and greedy generation, first divergent token.
3. ``task`` — the whole bundle through ``runtime.Pipeline`` (engine vision + engine decoder,
   greedy) vs the reference model's greedy answers: answer agreement, grounding IoU and IoU@0.5
   vs the reference's boxes and vs ground truth, OCR exact match / CER vs the true text and vs
   the reference's text. Numbers vs ground truth are judged as the *drop* from the reference's.

Localisation: each stage isolates one engine, so the first failing stage names the culprit
(a broken ViT fails ``vision``, a broken decoder fails ``decoder``, the wrong checkpoint fails
both). Thresholds: ``validate/thresholds.py``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from .compare import Context, Prepared, encode_answer, parse_boxes
from .thresholds import (DESCRIPTIONS, REFERENCE_FLOOR, REFERENCE_FLOOR_MIN_ITEMS, STAGES,
                         Threshold, bound_text, plan_name, target_name, thresholds_for)

log = logging.getLogger(__name__)

__all__ = ["INCONCLUSIVE", "Metric", "NA_NO_BOXES", "Report", "StageResult", "decoder_stage",
           "encode_answer", "judge", "parse_boxes", "run_validation", "task_stage",
           "vision_stage"]

NA_NO_BOXES = "n/a (no boxes in reference answers)"
#: Verdict of a stage (and report) with a gate that could not be judged: never a pass.
INCONCLUSIVE = "INCONCLUSIVE"


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class Metric:
    stage: str
    name: str
    value: float | None
    verdict: str  # PASS | FAIL | INFO | N/A
    op: str
    threshold: float | None
    n: int = 0  # items (or tokens / boxes) the value is computed over
    note: str = ""
    description: str = ""

    def line(self) -> str:
        v = "-" if self.value is None else f"{self.value:.6g}"
        bound = "" if self.op in ("info",) or self.threshold is None else \
            f" (need {bound_text(self.op, self.threshold)})"
        note = f" - {self.note}" if self.note else ""
        return f"[{self.verdict:4}] {self.stage}.{self.name} = {v}{bound}, n={self.n}{note}"


@dataclass
class StageResult:
    name: str
    metrics: list[Metric] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)  # per-item records
    seconds: float = 0.0
    error: str | None = None
    #: why a gate of this stage could not be judged (the stage is then INCONCLUSIVE, not PASS)
    inconclusive: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.error:
            return "FAIL"
        vs = {m.verdict for m in self.metrics}
        if "FAIL" in vs:
            return "FAIL"
        if self.inconclusive:
            return INCONCLUSIVE
        return "PASS" if "PASS" in vs else "N/A"

    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "seconds": round(self.seconds, 3),
                "error": self.error, "inconclusive": self.inconclusive,
                "metrics": [asdict(m) for m in self.metrics],
                "items": self.items}


@dataclass
class Report:
    plan: str
    stages: dict[str, StageResult]
    meta: dict[str, Any] = field(default_factory=dict)
    items: list[Any] = field(default_factory=list, repr=False)  # CalibItems (for the HTML)
    images: dict[str, Any] = field(default_factory=dict, repr=False)  # id -> PIL image
    target: str = "gpu"  # whose bounds judged it (quant/plans.py targets: gpu | cpu)

    @property
    def gates(self) -> dict[tuple[str, str], Threshold]:
        return thresholds_for(self.plan, self.target)

    @property
    def verdict(self) -> str:
        """FAIL if a gate failed, else INCONCLUSIVE if a gate could not be judged, else PASS."""
        vs = {s.verdict for s in self.stages.values()}
        return "FAIL" if "FAIL" in vs else INCONCLUSIVE if INCONCLUSIVE in vs else "PASS"

    def inconclusive(self) -> list[str]:
        """``stage: reason`` for every gate that could not be judged."""
        return [f"{n}: {r}" for n, s in self.stages.items() for r in s.inconclusive]

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    @property
    def first_failure(self) -> str | None:
        return next((n for n in STAGES if n in self.stages and self.stages[n].verdict == "FAIL"),
                    None)

    def failures(self) -> list[Metric]:
        return [m for s in self.stages.values() for m in s.metrics if m.verdict == "FAIL"]

    def summary_line(self) -> str:
        """One line: verdict, each stage's verdict, the failed metrics and stage errors."""
        parts = [f"{n} {s.verdict}" for n, s in self.stages.items()]
        tail = ""
        if self.failures():
            tail = "; failed: " + ", ".join(self.failed()[:6])
        errs = [f"{n}: {s.error}" for n, s in self.stages.items() if s.error]
        if errs:
            tail += "; errors: " + "; ".join(errs)
        if self.inconclusive():
            tail += "; inconclusive: " + "; ".join(self.inconclusive())
        return (f"drift {self.verdict} (plan {self.plan}, {self.target} target bounds): "
                + ", ".join(parts) + tail)

    def failed(self) -> list[str]:
        """``stage.metric=value (need op bound)`` for every failed metric."""
        return [f"{m.stage}.{m.name}={m.value:.4g} (need {bound_text(m.op, m.threshold)})"
                if m.value is not None and m.threshold is not None else f"{m.stage}.{m.name}"
                for m in self.failures()]

    def summary(self) -> dict[str, Any]:
        """Compact dict for a bundle manifest: verdict, stage verdicts, failed metrics, and every
        judged metric's value (``stage.metric``)."""
        from .report import _clean

        return _clean({
            "verdict": self.verdict, "plan": self.plan, "target": self.target,
            "first_failure": self.first_failure,
            "stages": {n: s.verdict for n, s in self.stages.items()},
            "failed": self.failed() + [f"{n}: {s.error}" for n, s in self.stages.items()
                                       if s.error],
            "inconclusive": self.inconclusive(),
            "metrics": {f"{m.stage}.{m.name}": m.value for s in self.stages.values()
                        for m in s.metrics if m.verdict in ("PASS", "FAIL")},
            "n_items": self.meta.get("n_items"), "line": self.summary_line(),
        })

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "plan": self.plan, "target": self.target,
                "first_failure": self.first_failure,
                "summary": self.summary_line(), "failed": self.failed(),
                "inconclusive": self.inconclusive(), "meta": self.meta,
                "stages": {n: s.to_dict() for n, s in self.stages.items()}}


def judge(stage: str, name: str, value: float | None,
          gates: str | Mapping[tuple[str, str], Threshold], n: int = 0, note: str = "",
          na: str | None = None) -> Metric:
    """A Metric with its verdict from ``gates`` (a ``thresholds_for`` table, or a plan name for its
    default target's); ``na`` forces N/A with that reason."""
    if isinstance(gates, str):
        gates = thresholds_for(gates)
    t = gates.get((stage, name))
    if t is not None:
        t, raised = t.for_items(n)
        note = "; ".join(x for x in (note, raised) if x)
    desc = DESCRIPTIONS.get((stage, name), "")
    if t is None:
        return Metric(stage, name, value, "INFO", "info", None, n, note, desc)
    if na is not None:
        verdict = "INFO" if t.op == "info" else "N/A"
        return Metric(stage, name, None, verdict, t.op, t.value, n, na, desc)
    if value is not None and not isinstance(value, (int, float)):
        value = float(value)
    return Metric(stage, name, None if value is None else float(value), t.judge(value), t.op,
                  t.value, n, note, desc)


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def vision_stage(ctx: Context, prepared: list[Prepared]) -> StageResult:
    st = StageResult("vision")
    seen: dict[str, dict[str, Any]] = {}
    for p in prepared:
        key = p.item.sha256 or p.item.id
        if key in seen:
            continue
        d = M.tensor_drift(p.ref_feat, p.eng_feat)
        rec = {"id": p.item.id, "image": p.item.describe_image(), **d}
        seen[key] = rec
        st.items.append(rec)
    cos = [r["cosine"] for r in st.items]
    gates, n = ctx.gates, len(st.items)

    def worst(vals, fn):
        v = np.asarray(vals, dtype=np.float64)
        return float("nan") if np.isnan(v).any() else float(fn(v))

    st.metrics = [
        judge("vision", "cosine_min", worst(cos, np.min), gates, n),
        judge("vision", "cosine_mean", worst(cos, np.mean), gates, n),
        judge("vision", "rel_l2_max", worst([r["rel_l2"] for r in st.items], np.max), gates, n),
        judge("vision", "max_abs_rel_max", worst([r["max_abs_rel"] for r in st.items], np.max),
              gates, n),
        judge("vision", "max_abs", worst([r["max_abs"] for r in st.items], np.max), gates, n),
        judge("vision", "nonfinite", float(sum(r["nonfinite"] for r in st.items)), gates, n),
    ]
    return st


@dataclass
class _DecoderTallies:
    """Per-token arrays of the decoder stage, one entry per item."""

    kls: list = field(default_factory=list)
    top1: list = field(default_factory=list)
    top5: list = field(default_factory=list)
    nll_ref: list = field(default_factory=list)
    nll_eng: list = field(default_factory=list)
    e2e_kl: list = field(default_factory=list)
    e2e_top1: list = field(default_factory=list)
    fq_kl: list = field(default_factory=list)
    fq_top1: list = field(default_factory=list)
    nll_fq: list = field(default_factory=list)
    nonfinite: int = 0
    identical: list = field(default_factory=list)
    first_div: list = field(default_factory=list)


def _teacher_target(ctx: Context, p: Prepared) -> tuple[list[int], str]:
    """The answer ids to teacher-force: the item's answer, else the reference's greedy one."""
    if p.item.answer:
        return encode_answer(ctx.tok, p.item.answer) + [ctx.im_end], "manifest answer"
    return list(p.ref_gen) + ([ctx.im_end] if p.ref_stopped else []), "reference greedy answer"


def _decoder_item(ctx: Context, p: Prepared, ans: list[int], target: str,
                  tl: _DecoderTallies) -> dict[str, Any]:
    """Reference vs engine on one teacher-forced item (engine fed the reference's features)."""
    ids = p.prompt_ids + ans
    P, A = len(p.prompt_ids), len(ans)
    sl = slice(P - 1, P - 1 + A)
    ref = ctx.logits(ctx.ref, ids, p.ref_feat, sl)
    eng = ctx.logits(ctx.eng, ids, p.ref_feat, sl)
    tl.nonfinite += M.nonfinite_count(eng)
    kl = M.kl_divergence(ref, eng)
    t1 = M.topk_agreement(ref, eng, 1)
    nr, ne = M.token_nll(ref, ans), M.token_nll(eng, ans)
    tl.kls.append(kl), tl.top1.append(t1), tl.top5.append(M.topk_agreement(ref, eng, 5))
    tl.nll_ref.append(nr), tl.nll_eng.append(ne)
    rec: dict[str, Any] = {
        "id": p.item.id, "task": p.item.task, "target": target, "n_tokens": A,
        "kl": [float(x) for x in kl], "top1": [int(x) for x in t1],
        "kl_mean": M.nanmean(kl), "top1_mean": float(np.mean(t1)),
        "ppl_ref": float(np.exp(np.mean(nr))), "ppl_eng": float(np.exp(np.mean(ne)))}
    if p.eng_feat is not None:
        e2e = ctx.logits(ctx.eng, ids, p.eng_feat, sl)
        tl.e2e_kl.append(M.kl_divergence(ref, e2e))
        tl.e2e_top1.append(M.topk_agreement(ref, e2e, 1))
        rec["e2e_kl_mean"] = M.nanmean(tl.e2e_kl[-1])
    if ctx.fq is not None:
        fq = ctx.logits(ctx.fq, ids, p.ref_feat, sl)
        tl.fq_kl.append(M.kl_divergence(fq, eng))
        tl.fq_top1.append(M.topk_agreement(fq, eng, 1))
        tl.nll_fq.append(M.token_nll(fq, ans))
        rec["fq_kl_mean"] = M.nanmean(tl.fq_kl[-1])
    eng_gen, _ = ctx.greedy(ctx.eng, p.prompt_ids, p.ref_feat)
    fd = M.first_divergence(p.ref_gen, eng_gen)
    tl.identical.append(fd is None)
    tl.first_div.append(len(p.ref_gen) if fd is None else fd)
    rec.update({"first_divergence": fd, "ref_gen_len": len(p.ref_gen),
                "eng_gen_len": len(eng_gen)})
    return rec


def decoder_stage(ctx: Context, prepared: list[Prepared]) -> StageResult:
    st = StageResult("decoder")
    tl = _DecoderTallies()
    for p in prepared:
        ans, target = _teacher_target(ctx, p)
        if not ans:
            continue
        st.items.append(_decoder_item(ctx, p, ans, target, tl))
    if not st.items:
        st.error = "no item produced a reference answer to teacher-force"
        return st
    st.metrics = _decoder_metrics(ctx, st.items, tl)
    if not tl.fq_kl and ctx.gates["decoder", "fq_kl_mean"].op != "info":
        st.inconclusive.append(f"no same-precision reference: the {ctx.plan} exporter's own error "
                               "was not judged (python -m validate: pass --gptq)")
    return st


def _decoder_metrics(ctx: Context, items: list[dict], tl: _DecoderTallies) -> list[Metric]:
    gates, cat = ctx.gates, np.concatenate
    kls = cat(tl.kls)
    n_tok = int(sum(len(k) for k in tl.kls))
    nll_ref, nll_eng = np.mean(cat(tl.nll_ref)), np.mean(cat(tl.nll_eng))
    n = len(items)
    out = [
        judge("decoder", "kl_mean", M.nanmean(kls), gates, n_tok, "per answer token"),
        judge("decoder", "kl_p95", M.percentile(kls, 95)
              if not np.isnan(kls).any() else float("nan"), gates, n_tok),
        judge("decoder", "top1", float(np.mean(cat(tl.top1))), gates, n_tok),
        judge("decoder", "top5", float(np.mean(cat(tl.top5))), gates, n_tok),
        judge("decoder", "ppl_ratio", float(np.exp(nll_eng - nll_ref)), gates, n,
              f"pooled ppl ref {math.exp(min(nll_ref, 700)):.4g}, engine "
              f"{math.exp(min(nll_eng, 700)):.4g}; per-item median ref "
              f"{np.median([r['ppl_ref'] for r in items]):.4g}, engine "
              f"{np.median([r['ppl_eng'] for r in items]):.4g} (the pooled value follows "
              "the least likely items, e.g. photos outside a small model's training)"),
        judge("decoder", "nonfinite", float(tl.nonfinite), gates, n_tok),
        judge("decoder", "greedy_identical", float(np.mean(tl.identical)), gates, n,
              f"max_new_tokens {ctx.max_new_tokens}"),
        judge("decoder", "first_divergence_median", float(np.median(tl.first_div)), gates, n,
              "identical generations count as their length"),
    ]
    if tl.e2e_kl:
        out += [judge("decoder", "e2e_kl_mean", M.nanmean(cat(tl.e2e_kl)), gates, n_tok),
                judge("decoder", "e2e_top1", float(np.mean(cat(tl.e2e_top1))), gates, n_tok)]
    if tl.fq_kl:
        fq_kls, nll_fq = cat(tl.fq_kl), np.mean(cat(tl.nll_fq))
        out += [judge("decoder", "fq_kl_mean", M.nanmean(fq_kls), gates, n_tok,
                      "vs the same-precision reference: the exporter's own error"),
                judge("decoder", "fq_kl_p95", M.percentile(fq_kls, 95)
                      if not np.isnan(fq_kls).any() else float("nan"), gates, n_tok),
                judge("decoder", "fq_top1", float(np.mean(cat(tl.fq_top1))), gates, n_tok),
                judge("decoder", "fq_ppl_ratio", float(np.exp(nll_eng - nll_fq)), gates, n)]
    return out


@dataclass
class _TaskTallies:
    agree: list = field(default_factory=list)
    g_iou_ref: list = field(default_factory=list)
    g_truth_eng: list = field(default_factory=list)
    g_truth_ref: list = field(default_factory=list)
    g_items: int = 0
    g_with_ref_boxes: int = 0
    ocr_cer_ref: list = field(default_factory=list)
    ocr_cer_truth: list = field(default_factory=list)
    ocr_em_eng: list = field(default_factory=list)
    ocr_em_ref: list = field(default_factory=list)


def _grounding_item(p: Prepared, rec: dict[str, Any], tl: _TaskTallies) -> None:
    it = p.item
    tl.g_items += 1
    size = p.image.size
    rb, eb = parse_boxes(p.ref_text, size), parse_boxes(p.eng_text, size)
    rec.update({"ref_boxes": [list(b) for b in rb], "eng_boxes": [list(b) for b in eb],
                "truth_boxes": [list(b) for b in it.truth_boxes()]})
    if rb:
        tl.g_with_ref_boxes += 1
        ious = [M.best_iou(b, eb) for b in rb]
        tl.g_iou_ref += ious
        rec["iou_ref"] = float(np.mean(ious))
    truth = it.truth_boxes()
    if truth:
        t = truth[0]  # the referred object
        rec["iou_truth_eng"] = M.best_iou(t, eb)
        rec["iou_truth_ref"] = M.best_iou(t, rb)
        tl.g_truth_eng.append(rec["iou_truth_eng"])
        tl.g_truth_ref.append(rec["iou_truth_ref"])


def _ocr_item(p: Prepared, rec: dict[str, Any], tl: _TaskTallies) -> None:
    it = p.item
    c = M.cer(p.ref_text, p.eng_text)
    # capped at 1 per item: a wholly different answer counts as every character wrong
    # once, however long the other text runs on (the report ranks items the same way)
    tl.ocr_cer_ref.append(min(c, 1.0))
    rec["cer_ref"] = c
    if "text" in it.truth:
        truth = it.truth["text"]
        rec["cer_truth"] = M.cer(truth, p.eng_text)
        tl.ocr_cer_truth.append(rec["cer_truth"])
        tl.ocr_em_eng.append(M.exact_match(truth, p.eng_text))
        tl.ocr_em_ref.append(M.exact_match(truth, p.ref_text))


def task_stage(ctx: Context, prepared: list[Prepared]) -> StageResult:
    st = StageResult("task")
    tl = _TaskTallies()
    for p in prepared:
        it = p.item
        p.eng_text = ctx.pipeline_answer(p)
        same = M.exact_match(p.ref_text, p.eng_text)
        tl.agree.append(same)
        rec: dict[str, Any] = {"id": it.id, "task": it.task, "ref_text": p.ref_text,
                               "eng_text": p.eng_text, "agree": bool(same),
                               "size": list(p.image.size)}
        if it.task == "grounding":
            _grounding_item(p, rec, tl)
        if it.task == "ocr":
            _ocr_item(p, rec, tl)
        st.items.append(rec)
    st.metrics.append(judge("task", "answer_agreement", float(np.mean(tl.agree)), ctx.gates,
                            len(st.items)))
    st.metrics += _grounding_metrics(ctx.gates, tl) + _ocr_metrics(ctx.gates, tl)
    st.inconclusive = _task_inconclusive(tl)
    for why in st.inconclusive:
        log.warning("drift report INCONCLUSIVE: %s", why)
    return st


def _task_inconclusive(tl: _TaskTallies) -> list[str]:
    """Why task gates could not be judged: the reference gave nothing to compare with, or it
    scores so far below the manifest's truth that it cannot be the model the items were made
    for (a wrong or broken checkpoint: drift from it proves nothing)."""
    out = []
    if tl.g_items and not tl.g_with_ref_boxes:
        out.append(f"the reference answered none of the {tl.g_items} grounding items with a box:"
                   " the grounding gates could not be judged")
    broken = "far below what the manifest's items expect: wrong or broken checkpoint?"
    n = len(tl.g_truth_ref)
    if n >= REFERENCE_FLOOR_MIN_ITEMS and M.hit_rate(tl.g_truth_ref) < REFERENCE_FLOOR:
        hits = sum(v >= 0.5 for v in tl.g_truth_ref)
        out.append(f"the reference finds {hits}/{n} true boxes (IoU >= 0.5), {broken}")
    n = len(tl.ocr_em_ref)
    if n:
        er = float(np.mean(tl.ocr_em_ref))
        if er == 0:
            out.append(f"the reference reads none of the {n} true OCR texts: ocr_em_truth_drop "
                       "could not be judged")
        if n >= REFERENCE_FLOOR_MIN_ITEMS and er < REFERENCE_FLOOR:
            out.append(f"the reference reads {int(round(er * n))}/{n} true OCR texts, {broken}")
    return out


def _grounding_metrics(gates: Mapping, tl: _TaskTallies) -> list[Metric]:
    keys = ("grounding_iou_ref_mean", "grounding_hit_ref", "grounding_hit_truth_drop")
    if tl.g_items == 0:
        na = "n/a (no grounding items in the validation split)"
        return [judge("task", k, None, gates, 0, na=na) for k in keys]
    if tl.g_with_ref_boxes == 0:
        out = [judge("task", k, None, gates, tl.g_items, na=NA_NO_BOXES) for k in keys]
        if tl.g_truth_eng:
            out.append(judge("task", "grounding_hit_truth", M.hit_rate(tl.g_truth_eng), gates,
                             len(tl.g_truth_eng)))
        return out
    out = [judge("task", "grounding_iou_ref_mean", float(np.mean(tl.g_iou_ref)), gates,
                 len(tl.g_iou_ref),
                 f"{tl.g_with_ref_boxes}/{tl.g_items} reference answers had boxes"),
           judge("task", "grounding_hit_ref", M.hit_rate(tl.g_iou_ref), gates, len(tl.g_iou_ref))]
    if not tl.g_truth_eng:
        return out + [judge("task", "grounding_hit_truth_drop", None, gates, 0,
                            na="n/a (no ground-truth boxes)")]
    he, hr, n = M.hit_rate(tl.g_truth_eng), M.hit_rate(tl.g_truth_ref), len(tl.g_truth_eng)
    return out + [
        judge("task", "grounding_hit_truth_drop", hr - he, gates, n),
        judge("task", "grounding_iou_truth_mean", float(np.mean(tl.g_truth_eng)), gates, n),
        judge("task", "grounding_hit_truth", he, gates, n),
        judge("task", "grounding_hit_truth_ref", hr, gates, n)]


def _ocr_metrics(gates: Mapping, tl: _TaskTallies) -> list[Metric]:
    if not tl.ocr_cer_ref:
        na = "n/a (no OCR items in the validation split)"
        return [judge("task", "ocr_cer_ref", None, gates, 0, na=na),
                judge("task", "ocr_em_truth_drop", None, gates, 0, na=na)]
    out = [judge("task", "ocr_cer_ref", float(np.mean(tl.ocr_cer_ref)), gates,
                 len(tl.ocr_cer_ref))]
    if not tl.ocr_em_eng:
        return out + [judge("task", "ocr_em_truth_drop", None, gates, 0, na="n/a (no true texts)")]
    er, ee, n = float(np.mean(tl.ocr_em_ref)), float(np.mean(tl.ocr_em_eng)), len(tl.ocr_em_eng)
    na = None if er > 0 else "n/a (the reference reads none of the true texts)"
    return out + [
        judge("task", "ocr_em_truth_drop", er - ee, gates, n, na=na),
        judge("task", "ocr_em_truth", ee, gates, n),
        judge("task", "ocr_em_truth_ref", er, gates, n),
        judge("task", "ocr_cer_truth", float(np.mean(tl.ocr_cer_truth)), gates,
              len(tl.ocr_cer_truth))]


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _load_reference(reference_model):
    if isinstance(reference_model, (str, Path)):
        from models.checkpoint import load_model

        return load_model(reference_model, "fp32")
    return reference_model


def _validation_items(items) -> list[Any]:
    from calib_data.manifest import load_manifest

    if isinstance(items, (str, Path)):
        items = load_manifest(items)
    items = list(items)
    val = [it for it in items if it.split == "validation"]
    if not val:
        raise ValueError("the manifest has no validation items (split 'validation'); the drift "
                         "report never runs on calibration items")
    return val


def run_validation(bundle_dir: str | Path, reference_model, items, plan=None,
                   out_dir: str | Path | None = None, *, tokenizer=None, fake_quant_model=None,
                   stages: Iterable[str] = STAGES, max_items: int | None = None,
                   max_new_tokens: int = 32, device: str = "cpu", threads: int | None = None,
                   cache_dir: str | Path | None = None, plots: bool = True,
                   target: str | None = None) -> Report:
    """Run the staged drift check of ``bundle_dir`` and (with ``out_dir``) write the report.

    ``reference_model``: the PyTorch reference (``QWenLMHeadModel``, fp32 for exact numbers) or a
    checkpoint directory (loaded in fp32). For an int4 bundle pass the *unquantised* model: the
    report measures what the bundle lost; ``fake_quant_model`` is the same-precision reference
    (``compare.same_precision_reference``: the dequantised GPTQ model for int4, built here for
    fp16) that the ``fq_*`` rows judge the exporter's own error against; without it an int4
    report is INCONCLUSIVE. ``items``: a manifest path or ``CalibItem`` list;
    only the validation split is used. ``plan``: thresholds to apply (default: the bundle's
    precision). ``target``: whose bounds (quant/plans.py targets; default: the bundle manifest's
    ``target``, else ``gpu``); its same-precision reference must compute as that target does
    (``compare.same_precision_reference(..., target=)``). Writes ``drift.json`` and
    ``drift.html`` (+ PNG plots) under ``out_dir``.
    ``threads``: intra-op threads of onnxruntime *and* the PyTorch reference during the run
    (restored afterwards); on a busy machine 1 can be far faster than oversubscribed threads.
    """
    t_all = time.perf_counter()
    from runtime.bundle import read_manifest

    bundle_dir = Path(bundle_dir)
    man = read_manifest(bundle_dir)
    plan = plan_name(plan if plan is not None else man.precision)
    target = target_name(plan, target or man.target)
    _check_same_precision(fake_quant_model, plan, target)
    model = _load_reference(reference_model)
    model.eval()
    if fake_quant_model is None and plan == "fp16":
        from .compare import same_precision_reference

        fake_quant_model = same_precision_reference(model, plan)
    val = _validation_items(items)
    if max_items is not None:
        val = val[:max_items]
    run = _Run(bundle_dir, model, val, plan, target, out_dir, tokenizer, fake_quant_model,
               [s for s in STAGES if s in set(stages)], max_new_tokens, device, threads,
               Path(cache_dir) if cache_dir else None, plots, t_all)
    import torch

    torch_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(run)
    finally:
        torch.set_num_threads(torch_threads)


def _check_same_precision(fq_model, plan: str, target: str) -> None:
    """A same-precision reference that does not round activations (or the KV cache) as the
    target does would fail (or pass) the exporter-error rows for the wrong reason."""
    from quant.plans import PLANS as PRECISION_PLANS

    t = PRECISION_PLANS[plan].target(target)
    for what, want, attr in (("int8 activations", t.int8_activations, "int8_activations"),
                             ("int8 KV cache", t.int8_kv, "int8_kv")):
        if fq_model is not None and bool(getattr(fq_model, attr, False)) != want:
            raise ValueError(
                f"the same-precision reference {'lacks' if want else 'has'} the {what} of "
                f"the {plan} plan's {target} target: build it with "
                f"validate.compare.same_precision_reference(..., target='{target}')")


@dataclass
class _Run:
    """One validation run's settings (``run_validation``'s arguments, resolved)."""

    bundle_dir: Path
    model: Any
    items: list[Any]
    plan: str
    target: str
    out_dir: str | Path | None
    tokenizer: Any
    fake_quant_model: Any
    stages: list[str]
    max_new_tokens: int
    device: str
    threads: int | None
    cache_dir: Path | None
    plots: bool
    t_all: float


def _run(run: _Run) -> Report:
    ctx = Context(run.bundle_dir, run.model, run.plan, run.tokenizer, run.device, run.threads,
                  run.max_new_tokens, run.cache_dir, run.fake_quant_model, run.target)
    t = time.perf_counter()
    prepared = [ctx.prepare(it) for it in run.items]
    _share_features(prepared, lambda px: ctx.features(ctx.ref, px), "ref_feat")
    prep_s = time.perf_counter() - t
    results: dict[str, StageResult] = {}
    stages = set(run.stages)
    # Engine vision features are needed by vision, decoder (e2e diagnostics) and the fallback of
    # the task stage; an engine that cannot run fails the vision stage and nothing else.
    t_vis = time.perf_counter()
    vis_error = _engine_features(ctx, prepared) if {"vision", "decoder", "task"} & stages \
        else None
    if "vision" in stages:
        if vis_error:
            results["vision"] = StageResult("vision", error=vis_error)
        else:
            _run_stage(results, "vision", vision_stage, ctx, prepared)
        results["vision"].seconds = time.perf_counter() - t_vis  # engine run included
    if {"decoder", "task"} & stages:
        t = time.perf_counter()
        for p in prepared:
            p.ref_gen, p.ref_stopped = ctx.greedy(ctx.ref, p.prompt_ids, p.ref_feat)
            p.ref_text = ctx.decode(p.ref_gen)
        prep_s += time.perf_counter() - t
    if "decoder" in stages:
        _run_stage(results, "decoder", decoder_stage, ctx, prepared)
    if "task" in stages:
        _run_stage(results, "task", task_stage, ctx, prepared)
    report = Report(run.plan, results, _meta(run, ctx, prepared, prep_s),
                    [p.item for p in prepared], {p.item.id: p.image for p in prepared},
                    run.target)
    if run.out_dir is not None:
        from .report import write_report

        write_report(report, run.out_dir, plots=run.plots)
    log.info("%s", report.summary_line())
    return report


def _share_features(prepared: list[Prepared], encode, attr: str) -> None:
    """Set ``attr`` of each item to its image's features (items sharing an image share them)."""
    cache: dict[str, np.ndarray] = {}
    for p in prepared:
        key = p.item.sha256 or p.item.id
        if key not in cache:
            cache[key] = encode(p.pixels)
        setattr(p, attr, cache[key])


def _engine_features(ctx: Context, prepared: list[Prepared]) -> str | None:
    """The bundle's vision features of every item; the error line when the engine fails."""
    try:
        _share_features(prepared, lambda px: ctx.features(ctx.eng, px), "eng_feat")
    except Exception as e:  # noqa: BLE001
        for p in prepared:
            p.eng_feat = None
        return f"{type(e).__name__}: {e}"
    return None


def _run_stage(results: dict[str, StageResult], name: str, fn, ctx: Context,
               prepared: list[Prepared]) -> None:
    t0 = time.perf_counter()
    try:
        res = fn(ctx, prepared)
    except Exception as e:  # noqa: BLE001 - a crashing engine is a failed stage + reason
        log.error("%s stage crashed:\n%s", name, traceback.format_exc())
        res = StageResult(name, error=f"{type(e).__name__}: {e}")
    res.seconds = time.perf_counter() - t0
    results[name] = res
    log.info("%s stage: %s (%.1f s)", name, res.verdict, res.seconds)


def _meta(run: _Run, ctx: Context, prepared: list[Prepared], prep_s: float) -> dict[str, Any]:
    import platform

    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(run.bundle_dir), "bundle_precision": ctx.man.precision,
        "source": ctx.man.data.get("source"),
        "reference": f"PyTorch {type(run.model).__name__} "
                     f"({str(run.model.dtype).replace('torch.', '')})",
        "fake_quant_reference": run.fake_quant_model is not None,
        "n_items": len(prepared), "n_images": len({p.item.sha256 or p.item.id for p in prepared}),
        "tasks": {t: sum(p.item.task == t for p in prepared) for t in
                  sorted({p.item.task for p in prepared})},
        "max_new_tokens": run.max_new_tokens, "device": run.device,
        "providers": ctx.providers(), "prepare_seconds": round(prep_s, 3),
        "seconds": round(time.perf_counter() - run.t_all, 3),
        "python": platform.python_version(),
    }
    try:
        from runtime.bundle import versions
        meta["versions"] = versions()
    except Exception:  # noqa: BLE001
        pass
    return meta
