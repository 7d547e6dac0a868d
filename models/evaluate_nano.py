"""What the trained nano Qwen-VL can do, measured on held-out synthetic scenes.

Greedy generation with the PyTorch reference (``QWenLMHeadModel.generate``, fp32 by default) on
the validation seed range of ``calib_data/synth.py`` (``[1e9, 2e9)``, never used in training):

- grounding: ``<ref>the red circle</ref>`` and ``Where is the red circle?`` prompts; the answer is
  parsed with ``runtime.grounding.parse_grounding`` (boxes mapped to original pixels), scored by
  IoU against the drawn box: hit rate at IoU >= 0.5 and mean IoU (a missing box scores 0);
- OCR: ``What does the sign say?``; exact match and character error rate (Levenshtein distance /
  reference length, capped at 1 per item) of the stripped answer.

    python -m models.evaluate_nano [--ckpt DIR] [--n 200] [--dtype fp32]

prints one JSON object. ``iou`` and ``cer`` are small and importable (the validation stage reuses
them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (any consistent units)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + \
        max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def cer(ref: str, hyp: str) -> float:
    """Character error rate: edit distance / len(ref) (1.0 per char for an empty reference)."""
    if not ref:
        return float(len(hyp) > 0)
    return levenshtein(ref, hyp) / len(ref)


# ---------------------------------------------------------------------------------------------

def answer(model, tok, ex, max_new_tokens: int = 32) -> str:
    """Greedy answer of the reference model to one synthetic example (special tags kept)."""
    import torch

    from .train_nano import pixels_of, prompt_ids

    cfg = model.cfg
    ids = prompt_ids(tok, ex, cfg.visual.n_queries)
    pix = pixels_of(ex.image, cfg.visual.image_size)[None].to(model.dtype)
    stop = (tok.special["<|im_end|>"], tok.special["<|im_start|>"], tok.special["<|endoftext|>"])
    with torch.no_grad():
        new = model.generate(ids, pixels=pix, max_new_tokens=max_new_tokens, stop_ids=stop)
    return decode(tok, new)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids)


def predicted_box(text: str, size: tuple[int, int]) -> Box | None:
    """The first box of a grounding answer, in original-image pixels (``runtime.grounding``)."""
    from runtime.grounding import parse_grounding

    found = parse_grounding(text, [size])
    for item in found:
        box = getattr(item, "box", None)
        if box is None and isinstance(item, (tuple, list)):
            box = item[1]
        if box is not None:
            return tuple(float(v) for v in box)  # type: ignore[return-value]
    return None


def evaluate(model, tok, n: int = 100, start: int = 0, n_ocr: int | None = None,
             worst: int = 5) -> dict[str, Any]:
    """Greedy evaluation on ``n`` held-out grounding and ``n_ocr`` (default ``n``) OCR examples.

    Validation seeds ``split_seed("val", start + i)``; grounding alternates the ref and chat
    prompt forms (even i: ref, odd i: chat)."""
    from calib_data import synth

    n_ocr = n if n_ocr is None else n_ocr
    t0 = time.time()
    ious, hits, fails = [], 0, []
    per_form: dict[str, list[float]] = {}
    for i in range(n):
        seed = synth.split_seed("val", start + i)
        ex = synth.make_example(seed, "grounding", form=synth.GROUNDING_FORMS[i % 2])
        text = answer(model, tok, ex)
        box = predicted_box(text, ex.size)
        v = iou(box, ex.truth["box"]) if box is not None else 0.0
        ious.append(v)
        per_form.setdefault(ex.form, []).append(v)
        hits += v >= 0.5
        fails.append((v, seed, ex.answer, text))
    exact, cers, ocr_fails = 0, [], []
    for i in range(n_ocr):
        seed = synth.split_seed("val", start + i)
        ex = synth.make_example(seed, "ocr")
        text = answer(model, tok, ex).strip()
        c = min(1.0, cer(ex.answer, text))
        cers.append(c)
        exact += text == ex.answer
        ocr_fails.append((c, seed, ex.answer, text))
    out: dict[str, Any] = {"split": "val", "first_seed": synth.split_seed("val", start)}
    if n:
        out["grounding"] = {
            "n": n, "iou@0.5": hits / n, "mean_iou": sum(ious) / n,
            "by_form": {f: {"n": len(v), "iou@0.5": sum(x >= 0.5 for x in v) / len(v),
                            "mean_iou": sum(v) / len(v)} for f, v in per_form.items()},
            "worst": [{"iou": round(v, 3), "seed": s, "truth": t, "answer": a}
                      for v, s, t, a in sorted(fails)[:worst]]}
    if n_ocr:
        out["ocr"] = {
            "n": n_ocr, "exact_match": exact / n_ocr, "cer": sum(cers) / n_ocr,
            "worst": [{"cer": round(c, 3), "seed": s, "truth": t, "answer": a}
                      for c, s, t, a in sorted(ocr_fails, reverse=True)[:worst]]}
    out["time_s"] = round(time.time() - t0, 1)
    return out


def load_tokenizer(ckpt: str | Path):
    from runtime.tokenizer import QwenTokenizer
    return QwenTokenizer.from_dir(ckpt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m models.evaluate_nano",
        description="Greedy grounding/OCR evaluation of a nano Qwen-VL checkpoint on the held-out "
                    "synthetic validation split (PyTorch reference); prints JSON.")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--n", type=int, default=200, help="grounding examples (and OCR, unless --n-ocr)")
    ap.add_argument("--n-ocr", type=int, default=None, help="OCR examples (default: --n)")
    ap.add_argument("--start", type=int, default=0, help="first validation index")
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from .checkpoint import load_model
    from .nano import default_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = Path(args.ckpt) if args.ckpt else default_checkpoint()
    model = load_model(ckpt, args.dtype)
    tok = load_tokenizer(ckpt)
    res = evaluate(model, tok, n=args.n, start=args.start, n_ocr=args.n_ocr)
    res["checkpoint"] = str(ckpt)
    res["dtype"] = args.dtype
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
