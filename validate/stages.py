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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from .thresholds import DESCRIPTIONS, STAGES, plan_name, thresholds_for

log = logging.getLogger(__name__)

NA_NO_BOXES = "n/a (no boxes in reference answers)"


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
            f" (need {self.op} {self.threshold:g})"
        note = f" - {self.note}" if self.note else ""
        return f"[{self.verdict:4}] {self.stage}.{self.name} = {v}{bound}, n={self.n}{note}"


@dataclass
class StageResult:
    name: str
    metrics: list[Metric] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)  # per-item records
    seconds: float = 0.0
    error: str | None = None

    @property
    def verdict(self) -> str:
        if self.error:
            return "FAIL"
        vs = {m.verdict for m in self.metrics}
        if "FAIL" in vs:
            return "FAIL"
        return "PASS" if "PASS" in vs else "N/A"

    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "verdict": self.verdict, "seconds": round(self.seconds, 3),
                "error": self.error, "metrics": [asdict(m) for m in self.metrics],
                "items": self.items}


@dataclass
class Report:
    plan: str
    stages: dict[str, StageResult]
    meta: dict[str, Any] = field(default_factory=dict)
    items: list[Any] = field(default_factory=list, repr=False)  # CalibItems (for the HTML)
    images: dict[str, Any] = field(default_factory=dict, repr=False)  # id -> PIL image

    @property
    def verdict(self) -> str:
        return "FAIL" if any(s.verdict == "FAIL" for s in self.stages.values()) else "PASS"

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
        return f"drift {self.verdict} (plan {self.plan}): " + ", ".join(parts) + tail

    def failed(self) -> list[str]:
        """``stage.metric=value (need op bound)`` for every failed metric."""
        return [f"{m.stage}.{m.name}={m.value:.4g} (need {m.op} {m.threshold:g})"
                if m.value is not None and m.threshold is not None else f"{m.stage}.{m.name}"
                for m in self.failures()]

    def summary(self) -> dict[str, Any]:
        """Compact dict for a bundle manifest: verdict, stage verdicts, failed metrics, and every
        judged metric's value (``stage.metric``)."""
        from .report import _clean

        return _clean({
            "verdict": self.verdict, "plan": self.plan, "first_failure": self.first_failure,
            "stages": {n: s.verdict for n, s in self.stages.items()},
            "failed": self.failed() + [f"{n}: {s.error}" for n, s in self.stages.items()
                                       if s.error],
            "metrics": {f"{m.stage}.{m.name}": m.value for s in self.stages.values()
                        for m in s.metrics if m.verdict in ("PASS", "FAIL")},
            "n_items": self.meta.get("n_items"), "line": self.summary_line(),
        })

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "plan": self.plan, "first_failure": self.first_failure,
                "summary": self.summary_line(), "failed": self.failed(), "meta": self.meta,
                "stages": {n: s.to_dict() for n, s in self.stages.items()}}


def judge(stage: str, name: str, value: float | None, plan: str, n: int = 0,
          note: str = "", na: str | None = None) -> Metric:
    """A Metric with its verdict from the plan's table (``na`` forces N/A with that reason)."""
    t = thresholds_for(plan).get((stage, name))
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
# Adapters over the runtime (tokenizer, preprocessing, prompt, grounding, pipeline)
# ---------------------------------------------------------------------------------------------

def encode_answer(tok, text: str) -> list[int]:
    """Reference-answer text -> ids. Answers are model output, so ``<ref>``/``<box>``/``<quad>``
    tags are their special ids (as the runtime encodes assistant turns); everything else, other
    tag-like text included, is plain text."""
    from runtime.tokenizer import GROUNDING_ST

    return list(tok.encode(text, allowed_special=GROUNDING_ST))


def parse_boxes(text: str, size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Boxes of a grounding answer in original-image pixels (``runtime.grounding``)."""
    from runtime.grounding import parse_grounding

    return [tuple(float(v) for v in g.pixels) for g in parse_grounding(text or "", [tuple(size)])
            if g.pixels is not None]


@dataclass
class _Prepared:
    """Everything per item that several stages use."""

    item: Any
    image: Any
    pixels: np.ndarray  # [3,S,S]
    prompt_ids: list[int]
    ref_feat: np.ndarray | None = None  # [nq, hidden] float32
    eng_feat: np.ndarray | None = None
    ref_gen: list[int] | None = None  # reference greedy answer ids (no stop token)
    ref_stopped: bool = False
    ref_text: str | None = None
    eng_text: str | None = None


class _Context:
    """Bundle engines, reference model, tokenizer and the per-item preparation."""

    def __init__(self, bundle_dir: Path, model, plan: str, tokenizer=None, device: str = "cpu",
                 threads: int | None = None, max_new_tokens: int = 32,
                 cache_dir: Path | None = None, fake_quant_model=None):
        from runtime.bundle import verify_bundle

        self.bundle_dir = Path(bundle_dir)
        self.man = verify_bundle(self.bundle_dir)
        self.model = model
        self.fq_model = fake_quant_model
        self.plan = plan
        self.device = device
        self.threads = threads
        self.max_new_tokens = max_new_tokens
        self.cache_dir = cache_dir
        cfg = model.cfg
        facts = self.man.model
        self.vocab_size = int(facts.get("vocab_size", cfg.vocab_size))
        if self.vocab_size != cfg.vocab_size or int(facts.get("hidden", cfg.hidden_size)) != \
                cfg.hidden_size:
            log.warning("bundle model facts (vocab %s, hidden %s) differ from the reference "
                        "(vocab %s, hidden %s)", facts.get("vocab_size"), facts.get("hidden"),
                        cfg.vocab_size, cfg.hidden_size)
        self.n_vocab = int(facts.get("n_vocab", cfg.image_start_id + 3))
        self.image_size = cfg.visual.image_size
        self.n_queries = cfg.visual.n_queries
        self.image_start_id = cfg.image_start_id
        self.tok = tokenizer or self._tokenizer()
        self.n_vocab = int(getattr(self.tok, "n_vocab", self.n_vocab))
        sp = self.tok.special
        self.im_end = int(sp["<|im_end|>"])
        self.stop_ids = (self.im_end, int(sp["<|im_start|>"]), int(sp["<|endoftext|>"]))
        # never generated (as in runtime.Pipeline): an image tag in an answer has no features
        self.suppress_ids = [int(sp[t]) for t in ("<img>", "</img>", "<imgpad>") if t in sp]
        self._vision = None
        self._decoder = None

    # -- resources ---------------------------------------------------------------------------
    def _tokenizer(self):
        from runtime.tokenizer import QwenTokenizer

        d = self.bundle_dir / "tokenizer"
        return QwenTokenizer.from_dir(d if d.is_dir() else self.bundle_dir)

    def providers(self) -> list[str]:
        from runtime.engines import pick_providers

        return pick_providers(self.device)

    @property
    def vision(self):
        """The bundle's vision engine, as the runtime runs it (``runtime.engines``)."""
        if self._vision is None:
            from runtime.engines import VisionEngine

            self._vision = VisionEngine(self.bundle_dir / "vision.onnx", self.providers(),
                                        self.threads)
        return self._vision

    @property
    def decoder(self):
        """The bundle's decoder engine, as the runtime runs it (KV cache, IO binding)."""
        if self._decoder is None:
            from runtime.engines import DecoderEngine

            self._decoder = DecoderEngine(self.bundle_dir / "decoder.onnx", self.providers(),
                                          self.threads, vocab_size=self.vocab_size)
        return self._decoder

    # -- per item ------------------------------------------------------------------------------
    def prepare(self, item) -> _Prepared:
        from calib_data.manifest import materialise
        from runtime.image import preprocess
        from runtime.prompt import build_chat_ids

        img = materialise(item, self.cache_dir)
        px = np.asarray(preprocess(img, self.image_size), dtype=np.float32)
        ids = list(build_chat_ids(self.tok, item.query_parts(), n_images=1,
                                  n_slots=self.n_queries))
        return _Prepared(item, img, px, ids)

    def ref_features(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            px = torch.from_numpy(np.ascontiguousarray(pixels[None]))
            return self.model.encode_images(px.to(self.model.dtype))[0].float().numpy()

    def eng_features(self, pixels: np.ndarray) -> np.ndarray:
        return np.array(self.vision.encode(pixels[None]).numpy()[0], dtype=np.float32)

    def table_ids(self, ids: Sequence[int]) -> np.ndarray:
        """Prompt-table ids: the slots between ``<img>`` and ``</img>`` become
        ``vocab_size + row`` of the flattened image features (the decoder's IO contract)."""
        out = np.asarray(ids, dtype=np.int64).copy()
        row, inside = 0, False
        for i, t in enumerate(out):
            if t == self.image_start_id:
                inside = True
            elif t == self.image_start_id + 1:
                inside = False
            elif inside:
                out[i] = self.vocab_size + row
                row += 1
        return out

    def _engine_prefill(self, ids: Sequence[int], feat: np.ndarray, extra: int = 0):
        from runtime.engines import Features

        cache = self.decoder.new_cache(1, len(ids) + extra + 1)
        f = np.ascontiguousarray(feat[None], dtype=np.float32)
        logits = self.decoder.forward(cache, self.table_ids(ids)[None],
                                      features=Features(f.shape, f), last_only=False)
        return cache, logits[0]

    def ref_logits(self, ids: Sequence[int], feat: np.ndarray, rows: slice,
                   model=None) -> np.ndarray:
        """Reference logits ``[len(rows), n_vocab]`` float32 of the positions ``rows``."""
        import torch

        model = model or self.model
        with torch.no_grad():
            out = model(torch.tensor([list(ids)]),
                        image_embeds=torch.from_numpy(feat[None]).to(model.dtype))
        return out.logits[0, rows, :self.n_vocab].float().numpy()

    def eng_logits(self, ids: Sequence[int], feat: np.ndarray, rows: slice) -> np.ndarray:
        _, logits = self._engine_prefill(ids, feat)
        return np.array(logits[rows, :self.n_vocab], dtype=np.float32)

    def ref_greedy(self, ids: Sequence[int], feat: np.ndarray) -> tuple[list[int], bool]:
        """Greedy reference answer over the real vocabulary (as the runtime samples)."""
        import torch

        m = self.model
        new: list[int] = []
        with torch.no_grad():
            emb = torch.from_numpy(feat[None]).to(m.dtype)
            out = m(torch.tensor([list(ids)]), image_embeds=emb)
            for _ in range(self.max_new_tokens):
                tok = self._argmax(out.logits[0, -1, :self.n_vocab].float().numpy())
                if tok in self.stop_ids:
                    return new, True
                new.append(tok)
                out = m(torch.tensor([[tok]]), past=out.past)
        return new, False

    def _argmax(self, row: np.ndarray) -> int:
        row = np.array(row, dtype=np.float32, copy=True)
        row[self.suppress_ids] = -np.inf
        return int(np.argmax(row))

    def eng_greedy(self, ids: Sequence[int], feat: np.ndarray) -> list[int]:
        cache, logits = self._engine_prefill(ids, feat, self.max_new_tokens)
        row = logits[-1]
        new: list[int] = []
        step = np.zeros((1, 1), np.int64)
        for _ in range(self.max_new_tokens):
            tok = self._argmax(row[:self.n_vocab])
            if tok in self.stop_ids:
                break
            new.append(tok)
            step[0, 0] = tok
            row = self.decoder.forward(cache, step)[0]
        return new

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def pipeline_answer(self, p: _Prepared) -> str:
        """The bundle's answer through the public runtime (engine vision + decoder, greedy)."""
        pipe = self.pipeline()
        if pipe is None:  # runtime.Pipeline missing: the same computation with the raw engines
            feat = p.eng_feat if p.eng_feat is not None else self.eng_features(p.pixels)
            return self.decode(self.eng_greedy(p.prompt_ids, feat))
        res = pipe.chat(p.item.query_parts(), images=[p.image], max_new_tokens=self.max_new_tokens,
                        temperature=0.0, repetition_penalty=1.0).result()
        return res.text

    _pipe: Any = None
    _pipe_error: str | None = None

    def pipeline(self):
        if self._pipe is None and self._pipe_error is None:
            try:
                from runtime import Pipeline
            except ImportError as e:
                self._pipe_error = f"runtime.Pipeline unavailable ({e}); used the raw engines"
                log.warning("%s", self._pipe_error)
                return None
            self._pipe = Pipeline.from_bundle(self.bundle_dir, device=self.device,
                                              threads=self.threads, verify=False)
        return self._pipe


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def vision_stage(ctx: _Context, prepared: list[_Prepared]) -> StageResult:
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
    plan, n = ctx.plan, len(st.items)

    def worst(vals, fn):
        v = np.asarray(vals, dtype=np.float64)
        return float("nan") if np.isnan(v).any() else float(fn(v))

    st.metrics = [
        judge("vision", "cosine_min", worst(cos, np.min), plan, n),
        judge("vision", "cosine_mean", worst(cos, np.mean), plan, n),
        judge("vision", "rel_l2_max", worst([r["rel_l2"] for r in st.items], np.max), plan, n),
        judge("vision", "max_abs_rel_max", worst([r["max_abs_rel"] for r in st.items], np.max),
              plan, n),
        judge("vision", "max_abs", worst([r["max_abs"] for r in st.items], np.max), plan, n),
        judge("vision", "nonfinite", float(sum(r["nonfinite"] for r in st.items)), plan, n),
    ]
    return st


def decoder_stage(ctx: _Context, prepared: list[_Prepared]) -> StageResult:
    st = StageResult("decoder")
    kls, top1, top5, nll_ref, nll_eng = [], [], [], [], []
    e2e_kl, e2e_top1, fq_kl, fq_top1 = [], [], [], []
    nonfinite = 0
    identical, first_div = [], []
    for p in prepared:
        if p.item.answer:
            ans = encode_answer(ctx.tok, p.item.answer) + [ctx.im_end]
            target = "manifest answer"
        else:
            ans = list(p.ref_gen) + ([ctx.im_end] if p.ref_stopped else [])
            target = "reference greedy answer"
        if not ans:
            continue
        ids = p.prompt_ids + ans
        P, A = len(p.prompt_ids), len(ans)
        sl = slice(P - 1, P - 1 + A)
        ref = ctx.ref_logits(ids, p.ref_feat, sl)
        eng = ctx.eng_logits(ids, p.ref_feat, sl)
        nonfinite += M.nonfinite_count(eng)
        kl = M.kl_divergence(ref, eng)
        t1 = M.topk_agreement(ref, eng, 1)
        t5 = M.topk_agreement(ref, eng, 5)
        nr, ne = M.token_nll(ref, ans), M.token_nll(eng, ans)
        kls.append(kl), top1.append(t1), top5.append(t5), nll_ref.append(nr), nll_eng.append(ne)
        rec: dict[str, Any] = {
            "id": p.item.id, "task": p.item.task, "target": target, "n_tokens": A,
            "kl": [float(x) for x in kl], "top1": [int(x) for x in t1],
            "kl_mean": M.nanmean(kl), "top1_mean": float(np.mean(t1)),
            "ppl_ref": float(np.exp(np.mean(nr))), "ppl_eng": float(np.exp(np.mean(ne)))}
        if p.eng_feat is not None:
            e2e = ctx.eng_logits(ids, p.eng_feat, sl)
            e2e_kl.append(M.kl_divergence(ref, e2e))
            e2e_top1.append(M.topk_agreement(ref, e2e, 1))
            rec["e2e_kl_mean"] = M.nanmean(e2e_kl[-1])
        if ctx.fq_model is not None:
            fq = ctx.ref_logits(ids, p.ref_feat, sl, ctx.fq_model)
            fq_kl.append(M.kl_divergence(fq, eng))
            fq_top1.append(M.topk_agreement(fq, eng, 1))
            rec["fq_kl_mean"] = M.nanmean(fq_kl[-1])
        eng_gen = ctx.eng_greedy(p.prompt_ids, p.ref_feat)
        fd = M.first_divergence(p.ref_gen, eng_gen)
        identical.append(fd is None)
        first_div.append(len(p.ref_gen) if fd is None else fd)
        rec.update({"first_divergence": fd, "ref_gen_len": len(p.ref_gen),
                    "eng_gen_len": len(eng_gen)})
        st.items.append(rec)
    plan = ctx.plan
    if not st.items:
        st.error = "no item produced a reference answer to teacher-force"
        return st
    cat = np.concatenate
    n_tok = int(sum(len(k) for k in kls))
    ppl_ratio = float(np.exp(np.mean(cat(nll_eng)) - np.mean(cat(nll_ref))))
    n = len(st.items)
    st.metrics = [
        judge("decoder", "kl_mean", M.nanmean(cat(kls)), plan, n_tok, "per answer token"),
        judge("decoder", "kl_p95", M.percentile(cat(kls), 95)
              if not np.isnan(cat(kls)).any() else float("nan"), plan, n_tok),
        judge("decoder", "top1", float(np.mean(cat(top1))), plan, n_tok),
        judge("decoder", "top5", float(np.mean(cat(top5))), plan, n_tok),
        judge("decoder", "ppl_ratio", ppl_ratio, plan, n,
              f"pooled ppl ref {math.exp(min(np.mean(cat(nll_ref)), 700)):.4g}, engine "
              f"{math.exp(min(np.mean(cat(nll_eng)), 700)):.4g}; per-item median ref "
              f"{np.median([r['ppl_ref'] for r in st.items]):.4g}, engine "
              f"{np.median([r['ppl_eng'] for r in st.items]):.4g} (the pooled value follows "
              "the least likely items, e.g. photos outside a small model's training)"),
        judge("decoder", "nonfinite", float(nonfinite), plan, n_tok),
        judge("decoder", "greedy_identical", float(np.mean(identical)), plan, n,
              f"max_new_tokens {ctx.max_new_tokens}"),
        judge("decoder", "first_divergence_median", float(np.median(first_div)), plan, n,
              "identical generations count as their length"),
    ]
    if e2e_kl:
        st.metrics += [
            judge("decoder", "e2e_kl_mean", M.nanmean(cat(e2e_kl)), plan, n_tok),
            judge("decoder", "e2e_top1", float(np.mean(cat(e2e_top1))), plan, n_tok)]
    if fq_kl:
        st.metrics += [
            judge("decoder", "fq_kl_mean", M.nanmean(cat(fq_kl)), plan, n_tok),
            judge("decoder", "fq_top1", float(np.mean(cat(fq_top1))), plan, n_tok)]
    return st


def task_stage(ctx: _Context, prepared: list[_Prepared]) -> StageResult:
    st = StageResult("task")
    plan = ctx.plan
    agree = []
    g_iou_ref, g_truth_eng, g_truth_ref, g_items, g_with_ref_boxes = [], [], [], 0, 0
    ocr_cer_ref, ocr_cer_truth, ocr_em_eng, ocr_em_ref = [], [], [], []
    for p in prepared:
        it = p.item
        p.eng_text = ctx.pipeline_answer(p)
        same = M.exact_match(p.ref_text, p.eng_text)
        agree.append(same)
        rec: dict[str, Any] = {"id": it.id, "task": it.task, "ref_text": p.ref_text,
                               "eng_text": p.eng_text, "agree": bool(same),
                               "size": list(p.image.size)}
        if it.task == "grounding":
            g_items += 1
            size = p.image.size
            rb, eb = parse_boxes(p.ref_text, size), parse_boxes(p.eng_text, size)
            rec.update({"ref_boxes": [list(b) for b in rb], "eng_boxes": [list(b) for b in eb],
                        "truth_boxes": [list(b) for b in it.truth_boxes()]})
            if rb:
                g_with_ref_boxes += 1
                ious = [M.best_iou(b, eb) for b in rb]
                g_iou_ref += ious
                rec["iou_ref"] = float(np.mean(ious))
            truth = it.truth_boxes()
            if truth:
                t = truth[0]  # the referred object
                rec["iou_truth_eng"] = M.best_iou(t, eb)
                rec["iou_truth_ref"] = M.best_iou(t, rb)
                g_truth_eng.append(rec["iou_truth_eng"])
                g_truth_ref.append(rec["iou_truth_ref"])
        if it.task == "ocr":
            c = M.cer(p.ref_text, p.eng_text)
            # capped at 1 per item: a wholly different answer counts as every character wrong
            # once, however long the other text runs on (the report ranks items the same way)
            ocr_cer_ref.append(min(c, 1.0))
            rec["cer_ref"] = c
            if "text" in it.truth:
                truth = it.truth["text"]
                rec["cer_truth"] = M.cer(truth, p.eng_text)
                ocr_cer_truth.append(rec["cer_truth"])
                ocr_em_eng.append(M.exact_match(truth, p.eng_text))
                ocr_em_ref.append(M.exact_match(truth, p.ref_text))
        st.items.append(rec)
    n = len(st.items)
    st.metrics.append(judge("task", "answer_agreement", float(np.mean(agree)), plan, n))
    if g_items == 0:
        na = "n/a (no grounding items in the validation split)"
        for k in ("grounding_iou_ref_mean", "grounding_hit_ref", "grounding_hit_truth_drop"):
            st.metrics.append(judge("task", k, None, plan, 0, na=na))
    elif g_with_ref_boxes == 0:
        for k in ("grounding_iou_ref_mean", "grounding_hit_ref", "grounding_hit_truth_drop"):
            st.metrics.append(judge("task", k, None, plan, g_items, na=NA_NO_BOXES))
        if g_truth_eng:
            st.metrics.append(judge("task", "grounding_hit_truth", M.hit_rate(g_truth_eng), plan,
                                    len(g_truth_eng)))
    else:
        st.metrics += [
            judge("task", "grounding_iou_ref_mean", float(np.mean(g_iou_ref)), plan,
                  len(g_iou_ref), f"{g_with_ref_boxes}/{g_items} reference answers had boxes"),
            judge("task", "grounding_hit_ref", M.hit_rate(g_iou_ref), plan, len(g_iou_ref))]
        if g_truth_eng:
            he, hr = M.hit_rate(g_truth_eng), M.hit_rate(g_truth_ref)
            st.metrics += [
                judge("task", "grounding_hit_truth_drop", hr - he, plan, len(g_truth_eng)),
                judge("task", "grounding_iou_truth_mean", float(np.mean(g_truth_eng)), plan,
                      len(g_truth_eng)),
                judge("task", "grounding_hit_truth", he, plan, len(g_truth_eng)),
                judge("task", "grounding_hit_truth_ref", hr, plan, len(g_truth_eng))]
        else:
            st.metrics.append(judge("task", "grounding_hit_truth_drop", None, plan, 0,
                                    na="n/a (no ground-truth boxes)"))
    if not ocr_cer_ref:
        na = "n/a (no OCR items in the validation split)"
        st.metrics += [judge("task", "ocr_cer_ref", None, plan, 0, na=na),
                       judge("task", "ocr_em_truth_drop", None, plan, 0, na=na)]
    else:
        st.metrics.append(judge("task", "ocr_cer_ref", float(np.mean(ocr_cer_ref)), plan,
                                len(ocr_cer_ref)))
        if ocr_em_eng:
            er, ee = float(np.mean(ocr_em_ref)), float(np.mean(ocr_em_eng))
            na = None if er > 0 else "n/a (the reference reads none of the true texts)"
            st.metrics += [
                judge("task", "ocr_em_truth_drop", er - ee, plan, len(ocr_em_eng), na=na),
                judge("task", "ocr_em_truth", ee, plan, len(ocr_em_eng)),
                judge("task", "ocr_em_truth_ref", er, plan, len(ocr_em_eng)),
                judge("task", "ocr_cer_truth", float(np.mean(ocr_cer_truth)), plan,
                      len(ocr_cer_truth))]
        else:
            st.metrics.append(judge("task", "ocr_em_truth_drop", None, plan, 0,
                                    na="n/a (no true texts)"))
    if ctx._pipe_error:
        st.metrics[0].note = ctx._pipe_error
    return st


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
                   cache_dir: str | Path | None = None, plots: bool = True) -> Report:
    """Run the staged drift check of ``bundle_dir`` and (with ``out_dir``) write the report.

    ``reference_model``: the PyTorch reference (``QWenLMHeadModel``, fp32 for exact numbers) or a
    checkpoint directory (loaded in fp32). For an int4 bundle pass the *unquantised* model: the
    report measures what the bundle lost; ``fake_quant_model`` (the dequantised-GPTQ reference)
    adds exporter-only diagnostics (``fq_*``). ``items``: a manifest path or ``CalibItem`` list;
    only the validation split is used. ``plan``: thresholds to apply (default: the bundle's
    precision). Writes ``drift.json`` and ``drift.html`` (+ PNG plots) under ``out_dir``.
    ``threads``: intra-op threads of onnxruntime *and* the PyTorch reference during the run
    (restored afterwards); on a busy machine 1 can be far faster than oversubscribed threads.
    """
    t_all = time.perf_counter()
    from runtime.bundle import read_manifest

    bundle_dir = Path(bundle_dir)
    plan = plan_name(plan if plan is not None else read_manifest(bundle_dir).precision)
    model = _load_reference(reference_model)
    model.eval()
    val = _validation_items(items)
    if max_items is not None:
        val = val[:max_items]
    stages = [s for s in STAGES if s in set(stages)]
    import torch

    torch_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(bundle_dir, model, val, plan, out_dir, tokenizer, fake_quant_model, stages,
                    max_new_tokens, device, threads, cache_dir, plots, t_all)
    finally:
        torch.set_num_threads(torch_threads)


def _run(bundle_dir, model, val, plan, out_dir, tokenizer, fake_quant_model, stages,
         max_new_tokens, device, threads, cache_dir, plots, t_all) -> Report:
    ctx = _Context(bundle_dir, model, plan, tokenizer, device, threads, max_new_tokens,
                   Path(cache_dir) if cache_dir else None, fake_quant_model)
    t = time.perf_counter()
    prepared = [ctx.prepare(it) for it in val]
    ref_cache: dict[str, np.ndarray] = {}  # items sharing an image share its features
    for p in prepared:
        key = p.item.sha256 or p.item.id
        if key not in ref_cache:
            ref_cache[key] = ctx.ref_features(p.pixels)
        p.ref_feat = ref_cache[key]
    prep_s = time.perf_counter() - t
    results: dict[str, StageResult] = {}

    def run(name, fn):
        t0 = time.perf_counter()
        try:
            res = fn(ctx, prepared)
        except Exception as e:  # noqa: BLE001 - a crashing engine is a failed stage + reason
            log.error("%s stage crashed:\n%s", name, traceback.format_exc())
            res = StageResult(name, error=f"{type(e).__name__}: {e}")
        res.seconds = time.perf_counter() - t0
        results[name] = res
        log.info("%s stage: %s (%.1f s)", name, res.verdict, res.seconds)

    # Engine vision features are needed by vision, decoder (e2e diagnostics) and the fallback of
    # the task stage; an engine that cannot run fails the vision stage and nothing else.
    vis_error = None
    t_vis = time.perf_counter()
    if {"vision", "decoder", "task"} & set(stages):
        try:
            eng_cache: dict[str, np.ndarray] = {}
            for p in prepared:
                key = p.item.sha256 or p.item.id
                if key not in eng_cache:
                    eng_cache[key] = ctx.eng_features(p.pixels)
                p.eng_feat = eng_cache[key]
        except Exception as e:  # noqa: BLE001
            vis_error = f"{type(e).__name__}: {e}"
            for p in prepared:
                p.eng_feat = None
    if "vision" in stages:
        if vis_error:
            results["vision"] = StageResult("vision", error=vis_error)
        else:
            run("vision", vision_stage)
        results["vision"].seconds = time.perf_counter() - t_vis  # engine run included
    if {"decoder", "task"} & set(stages):
        t = time.perf_counter()
        for p in prepared:
            p.ref_gen, p.ref_stopped = ctx.ref_greedy(p.prompt_ids, p.ref_feat)
            p.ref_text = ctx.decode(p.ref_gen)
        prep_s += time.perf_counter() - t
    if "decoder" in stages:
        run("decoder", decoder_stage)
    if "task" in stages:
        run("task", task_stage)
    import platform

    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(bundle_dir), "bundle_precision": ctx.man.precision,
        "source": ctx.man.data.get("source"),
        "reference": f"PyTorch {type(model).__name__} ({str(model.dtype).replace('torch.', '')})",
        "fake_quant_reference": fake_quant_model is not None,
        "n_items": len(prepared), "n_images": len({p.item.sha256 or p.item.id for p in prepared}),
        "tasks": {t: sum(p.item.task == t for p in prepared) for t in
                  sorted({p.item.task for p in prepared})},
        "max_new_tokens": max_new_tokens, "device": device, "providers": ctx.providers(),
        "prepare_seconds": round(prep_s, 3),
        "seconds": round(time.perf_counter() - t_all, 3), "python": platform.python_version(),
    }
    try:
        from runtime.bundle import versions
        meta["versions"] = versions()
    except Exception:  # noqa: BLE001
        pass
    report = Report(plan, results, meta, [p.item for p in prepared],
                    {p.item.id: p.image for p in prepared})
    if out_dir is not None:
        from .report import write_report

        write_report(report, out_dir, plots=plots)
    log.info("%s", report.summary_line())
    return report
