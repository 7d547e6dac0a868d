"""Drift metrics, pure numpy: one function per number the drift report prints.

Conventions (each metric's docstring repeats the one it uses):

* ``ref`` is always the reference (PyTorch) side, ``eng`` the exported engine; relative metrics are
  normalised by the reference.
* Vision features are ``[n_queries, hidden]`` per image, compared in float64. Edges: a
  non-finite value on either side makes cosine / rel-L2 / max-abs NaN (the count is
  ``nonfinite_count``); an all-zero vector has cosine 1 with another all-zero one and 0 with
  anything else, an all-zero reference gives rel-L2 / max-abs-rel 0 when the engine matches it and
  inf otherwise. The export-time vision check (``exporters/vision_check.py``) uses these same
  functions, so its figures and the drift report's agree.
* Logits are ``[S, V]`` (one row per position); distributions are computed in float64 with a
  max-shifted log-softmax, so fp16 logits of +-6e4 or a -inf mask never overflow.
* Text metrics work on Python strings; OCR comparison normalises whitespace only (case and
  punctuation count, as in exact-match OCR benchmarks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Tensors (vision stage)
# ---------------------------------------------------------------------------------------------


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def nonfinite_count(x) -> int:
    """Number of NaN or +-Inf entries."""
    return int(np.size(x) - np.count_nonzero(np.isfinite(np.asarray(x))))


def cosine(ref, eng) -> float:
    """Cosine similarity of the two tensors flattened; NaN if either is non-finite or zero."""
    a, b = _f64(ref).ravel(), _f64(eng).ravel()
    if a.shape != b.shape:
        raise ValueError(f"cosine: shapes differ {np.shape(ref)} vs {np.shape(eng)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


def row_cosine(ref, eng) -> np.ndarray:
    """Cosine of each row (last axis), with :func:`cosine`'s edge rules applied per row."""
    a, b = _f64(ref), _f64(eng)
    if a.shape != b.shape:
        raise ValueError(f"row_cosine: shapes differ {np.shape(ref)} vs {np.shape(eng)}")
    a, b = a.reshape(-1, a.shape[-1] if a.ndim else 1), b.reshape(-1, b.shape[-1] if b.ndim else 1)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(all="ignore"):
        cos = np.sum(b * a, -1) / (nb * na)
    zero = (na == 0.0) | (nb == 0.0)
    cos = np.where(zero, np.where(na == nb, 1.0, 0.0), cos)
    finite = np.isfinite(a).all(-1) & np.isfinite(b).all(-1)
    return np.where(finite, cos, np.nan)


def rel_l2(ref, eng) -> float:
    """``||eng - ref|| / ||ref||`` (inf when ref is zero and eng is not; NaN when non-finite)."""
    a, b = _f64(ref).ravel(), _f64(eng).ravel()
    if a.shape != b.shape:
        raise ValueError(f"rel_l2: shapes differ {np.shape(ref)} vs {np.shape(eng)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    num, den = np.linalg.norm(b - a), np.linalg.norm(a)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(num / den)


def max_abs(ref, eng) -> float:
    """Largest elementwise ``|eng - ref|`` (NaN when either side is non-finite)."""
    a, b = _f64(ref), _f64(eng)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.max(np.abs(b - a))) if a.size else 0.0


def max_abs_rel(ref, eng) -> float:
    """``max|eng - ref| / max|ref|``: max-abs made scale-free, so one threshold fits any model."""
    m = max_abs(ref, eng)
    scale = float(np.max(np.abs(_f64(ref)))) if np.size(ref) else 0.0
    if math.isnan(m):
        return m
    return m / scale if scale > 0 else (0.0 if m == 0 else float("inf"))


def tensor_drift(ref, eng) -> dict[str, float]:
    """All vision-stage numbers for one image's features ``[n_queries, hidden]``."""
    return {
        "cosine": cosine(ref, eng),
        "rel_l2": rel_l2(ref, eng),
        "max_abs": max_abs(ref, eng),
        "max_abs_rel": max_abs_rel(ref, eng),
        "nonfinite": nonfinite_count(eng),
    }


# ---------------------------------------------------------------------------------------------
# Distributions (decoder stage)
# ---------------------------------------------------------------------------------------------


def log_softmax(logits) -> np.ndarray:
    """Stable float64 log-softmax over the last axis; rows may contain -inf (masked tokens)."""
    x = _f64(logits)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    z = x - m
    with np.errstate(divide="ignore", under="ignore"):
        lse = np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    return z - lse


def kl_divergence(ref_logits, eng_logits) -> np.ndarray:
    """Per-position ``KL(p_ref || p_eng)`` in nats from raw logits ``[..., V]``.

    Terms where ``p_ref == 0`` contribute 0; where ``p_ref > 0`` but ``p_eng == 0`` the KL is +inf
    (the engine rules out a token the reference allows), and a NaN logit anywhere gives NaN.
    """
    lp, lq = log_softmax(ref_logits), log_softmax(eng_logits)
    if lp.shape != lq.shape:
        raise ValueError(f"kl_divergence: logits shapes differ {lp.shape} vs {lq.shape}")
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (lp - lq), 0.0)
    kl = np.sum(terms, axis=-1)
    r, e = _f64(ref_logits), _f64(eng_logits)
    bad = (np.isnan(r) | np.isposinf(r)).any(-1) | (np.isnan(e) | np.isposinf(e)).any(-1)
    kl = np.where(bad, np.nan, kl)
    return np.where(np.isnan(kl), kl, np.maximum(kl, 0.0))  # clamp -1e-17 rounding to 0


def topk_agreement(ref_logits, eng_logits, k: int = 1) -> np.ndarray:
    """Per position: 1.0 when the reference's top-1 token is among the engine's top-k, else 0.0.

    ``k=1`` is plain argmax agreement (llama.cpp's "same top p"). Ties in the engine's k-th place
    count in its favour (a token tied with the k-th logit is "in the top k").
    """
    r, e = _f64(ref_logits), _f64(eng_logits)
    ref_top = np.argmax(r, axis=-1)
    picked = np.take_along_axis(e, ref_top[..., None], axis=-1)[..., 0]
    if k >= e.shape[-1]:
        return np.ones(picked.shape)
    kth = -np.partition(-e, k - 1, axis=-1)[..., k - 1]
    ok = (picked >= kth) & np.isfinite(picked)
    return ok.astype(np.float64)


def token_nll(logits, targets) -> np.ndarray:
    """Negative log-likelihood (nats) of ``targets[t]`` under ``logits[t]``."""
    lp = log_softmax(logits)
    t = np.asarray(targets, dtype=np.int64)
    if lp.shape[:-1] != t.shape:
        raise ValueError(f"token_nll: {lp.shape[:-1]} positions but {t.shape} targets")
    return -np.take_along_axis(lp, t[..., None], axis=-1)[..., 0]


def perplexity(logits, targets) -> float:
    """``exp(mean NLL)`` of the target tokens (teacher-forced)."""
    nll = token_nll(logits, targets)
    return float(np.exp(np.mean(nll))) if nll.size else float("nan")


def first_divergence(ref_ids: Sequence[int], eng_ids: Sequence[int]) -> int | None:
    """Index of the first token where two generations differ; ``None`` when identical.

    When one is a strict prefix of the other the answer is the shorter length (the point where
    one stopped and the other went on).
    """
    a, b = list(ref_ids), list(eng_ids)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def percentile(values, q: float) -> float:
    v = _f64(values).ravel()
    v = v[~np.isnan(v)]
    return float(np.percentile(v, q)) if v.size else float("nan")


def nanmean(values) -> float:
    v = _f64(values).ravel()
    if v.size == 0:
        return float("nan")
    if np.isnan(v).any():  # a NaN anywhere is a failure, never averaged away
        return float("nan")
    return float(np.mean(v))


# ---------------------------------------------------------------------------------------------
# Boxes and text (task stage)
# ---------------------------------------------------------------------------------------------


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (corners in any order)."""
    ax1, ax2 = sorted((float(a[0]), float(a[2])))
    ay1, ay2 = sorted((float(a[1]), float(a[3])))
    bx1, bx2 = sorted((float(b[0]), float(b[2])))
    by1, by2 = sorted((float(b[1]), float(b[3])))
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union <= 0:
        return 1.0 if (ax1, ay1, ax2, ay2) == (bx1, by1, bx2, by2) else 0.0
    return inter / union


def best_iou(box: Sequence[float] | None, candidates: Sequence[Sequence[float]]) -> float:
    """IoU of ``box`` with its best match among ``candidates`` (0 when either side is empty)."""
    if box is None or not candidates:
        return 0.0
    return max(iou(box, c) for c in candidates)


def hit_rate(ious: Sequence[float], thr: float = 0.5) -> float:
    """Fraction of IoUs at or above ``thr`` (the usual Acc@0.5 of referring grounding)."""
    v = _f64(ious).ravel()
    return float(np.mean(v >= thr)) if v.size else float("nan")


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Edit distance (insert / delete / substitute, each cost 1); O(len(a)*len(b)) time."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def normalize_text(s: str) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, ends stripped."""
    return " ".join(str(s).split())


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate ``levenshtein(ref, hyp) / len(ref)`` on whitespace-normalised text.

    Can exceed 1 (a hypothesis much longer than the reference); an empty reference gives 0 for an
    empty hypothesis and 1 otherwise.
    """
    r, h = normalize_text(reference), normalize_text(hypothesis)
    if not r:
        return 0.0 if not h else 1.0
    return levenshtein(r, h) / len(r)


def exact_match(reference: str, hypothesis: str) -> bool:
    """Equality after whitespace normalisation (case-sensitive)."""
    return normalize_text(reference) == normalize_text(hypothesis)
