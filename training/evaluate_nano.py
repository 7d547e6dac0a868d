"""What the trained nano Qwen-VL can do, measured on held-out synthetic scenes.

Greedy generation on the validation seed range of ``calib_data/synth.py`` (``[1e9, 2e9)``, never
used in training), by the PyTorch reference (``QWenLMHeadModel.generate``, fp32 by default) or by
an exported bundle through ``runtime.Pipeline`` (``--bundle``: the same questions and prompts, so
the two results side by side are the bundle's task drift on 2 x n items):

- grounding: ``<ref>the red circle</ref>`` and ``Where is the red circle?`` prompts; the answer is
  parsed with ``runtime.grounding.parse_grounding`` (boxes mapped to original pixels), scored by
  IoU against the drawn box: hit rate at IoU >= 0.5 and mean IoU (a missing box scores 0);
- OCR: ``What does the sign say?``; exact match and character error rate (Levenshtein distance /
  reference length, capped at 1 per item) of the stripped answer.

Each held-out scene gives one grounding question (shape chosen by the seed, prompt forms
alternating) and the OCR question, so ``--n 200`` scores 200 boxes and 200 readings.

    python -m training.evaluate_nano [--ckpt DIR] [--n 200] [--dtype fp32]
    python -m training.evaluate_nano --bundle out/bundle [--n 200]   # the same questions, int4 engines

prints one JSON object. ``iou`` and ``cer`` are small and importable (the validation stage reuses
them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from runtime.errors import cli_main
from validate.metrics import levenshtein

from .common import pixels_of, prompt_ids

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (any consistent units)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1]) + \
        max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def cer(ref: str, hyp: str) -> float:
    """Character error rate: edit distance / len(ref) (1.0 per char for an empty reference)."""
    if not ref:
        return float(len(hyp) > 0)
    return levenshtein(ref, hyp) / len(ref)


# ---------------------------------------------------------------------------------------------

def image_features(model, img):
    """Vision features [1, n_queries, hidden] of one PIL image (reference preprocessing)."""
    import torch

    pix = pixels_of(img, model.cfg.visual.image_size)[None].to(model.dtype)
    with torch.no_grad():
        return model.encode_images(pix)


def answer(model, tok, ex, max_new_tokens: int = 32, image_embeds=None) -> str:
    """Greedy answer of the reference model to one synthetic example (special tags kept).

    Stops at ``<|im_end|>`` / ``<|im_start|>`` / ``<|endoftext|>`` as the Chat model does."""
    if image_embeds is None:
        image_embeds = image_features(model, ex.image)
    ids = prompt_ids(tok, ex, model.cfg.visual.n_queries)
    stop = (tok.im_end_id, tok.im_start_id, tok.eod_id)
    new = model.generate(ids, image_embeds=image_embeds, max_new_tokens=max_new_tokens,
                         stop_ids=stop)
    return tok.decode(new)


def predicted_box(text: str, size: tuple[int, int]) -> Box | None:
    """The first box of a grounding answer, in original-image pixels (``runtime.grounding``)."""
    from runtime.grounding import parse_grounding

    found = parse_grounding(text, [size])
    return tuple(float(v) for v in found[0].pixels) if found else None  # type: ignore[return-value]


#: Answers the questions of one scene (all on the same image), in order.
Answerer = Callable[[list[Any]], list[str]]


def torch_answerer(model, tok, max_new_tokens: int = 32) -> Answerer:
    """The PyTorch reference: the vision tower runs once per scene."""
    def run(examples: list[Any]) -> list[str]:
        feats = image_features(model, examples[0].image)
        return [answer(model, tok, ex, max_new_tokens, image_embeds=feats) for ex in examples]
    return run


def bundle_answerer(bundle: str | Path, device: str = "cpu", threads: int | None = None,
                    max_new_tokens: int = 32) -> Answerer:
    """An exported bundle through the public runtime (``runtime.Pipeline``: engine vision +
    engine decoder, greedy), with the same ChatML prompt as the reference."""
    from calib_data import synth
    from runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, device=device, threads=threads)

    def run(examples: list[Any]) -> list[str]:
        return [pipe.chat(synth.prompt_parts(ex.prompt), images=[ex.image],
                          max_new_tokens=max_new_tokens, temperature=0.0,
                          repetition_penalty=1.0).result().text for ex in examples]
    return run


def evaluate(model, tok, n: int = 100, start: int = 0, worst: int = 5) -> dict[str, Any]:
    """``evaluate_with`` the PyTorch reference ``model``."""
    return evaluate_with(torch_answerer(model, tok), n, start, worst)


def evaluate_with(answerer: Answerer, n: int = 100, start: int = 0,
                  worst: int = 5) -> dict[str, Any]:
    """Greedy evaluation on ``n`` held-out scenes: one grounding and one OCR question each.

    Scenes ``split_seed("val", start + i)``; the grounded shape is chosen by the seed and the
    prompt form alternates (even i: ``<ref>the red circle</ref>``, odd i: ``Where is ...?``).
    The same questions whichever ``answerer`` (reference or bundle) answers them."""
    from calib_data import synth

    t0 = time.time()
    ious: list[float] = []
    per_form: dict[str, list[float]] = {}
    fails, ocr_fails, cers = [], [], []
    exact = 0
    for i in tqdm(range(n), desc="evaluate", unit="scene", disable=n < 20, leave=False):
        seed = synth.split_seed("val", start + i)
        g = synth.make_example(seed, "grounding", form=synth.GROUNDING_FORMS[i % 2])
        o = synth.make_example(seed, "ocr")
        text, read = answerer([g, o])
        box = predicted_box(text, g.size)
        v = iou(box, g.truth["box"]) if box is not None else 0.0
        ious.append(v)
        per_form.setdefault(g.form, []).append(v)
        fails.append((v, seed, g.answer, text))
        read = read.strip()
        c = min(1.0, cer(o.answer, read))
        cers.append(c)
        exact += read == o.answer
        ocr_fails.append((c, seed, o.answer, read))
    out: dict[str, Any] = {"split": "val", "first_seed": synth.split_seed("val", start), "n": n}
    if n:
        out["grounding"] = {
            "n": n, "iou@0.5": sum(v >= 0.5 for v in ious) / n, "mean_iou": sum(ious) / n,
            "by_form": {f: {"n": len(v), "iou@0.5": sum(x >= 0.5 for x in v) / len(v),
                            "mean_iou": sum(v) / len(v)} for f, v in per_form.items()},
            "worst": [{"iou": round(v, 3), "seed": s, "truth": t, "answer": a}
                      for v, s, t, a in sorted(fails)[:worst]]}
        out["ocr"] = {
            "n": n, "exact_match": exact / n, "cer": sum(cers) / n,
            "worst": [{"cer": round(c, 3), "seed": s, "truth": t, "answer": a}
                      for c, s, t, a in sorted(ocr_fails, key=lambda f: -f[0])[:worst]]}
    out["time_s"] = round(time.time() - t0, 1)
    return out


def load_tokenizer(ckpt: str | Path):
    from runtime.tokenizer import QwenTokenizer
    return QwenTokenizer.from_dir(ckpt)


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m training.evaluate_nano",
        description="Greedy grounding/OCR evaluation of a nano Qwen-VL on the held-out synthetic "
                    "validation split, with the PyTorch reference (--ckpt) or an exported bundle "
                    "through the runtime (--bundle); prints JSON.")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: the shipped one)")
    ap.add_argument("--bundle", type=Path, default=None,
                    help="evaluate this exported bundle (python export.py --out DIR) instead of "
                         "the PyTorch checkpoint: the same questions, for int4-vs-fp32 task drift")
    ap.add_argument("--n", type=int, default=200,
                    help="held-out scenes (one grounding and one OCR question each)")
    ap.add_argument("--start", type=int, default=0, help="first validation index")
    ap.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (reference only)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="where the bundle's engines run (bundle only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.bundle is not None:
        from runtime.errors import report

        try:
            answerer = bundle_answerer(args.bundle, device=args.device, threads=args.threads)
        except FileNotFoundError as e:  # the EdgeErrors end in cli_main
            return report(e)
        res = evaluate_with(answerer, n=args.n, start=args.start)
        res["bundle"] = str(args.bundle)
    else:
        import torch

        from models.checkpoint import load_model
        from models.nano import default_checkpoint

        torch.set_num_threads(args.threads)
        ckpt = Path(args.ckpt) if args.ckpt else default_checkpoint()
        model = load_model(ckpt, args.dtype)
        res = evaluate(model, load_tokenizer(ckpt), n=args.n, start=args.start)
        res["checkpoint"] = str(ckpt)
        res["dtype"] = args.dtype
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
