"""Build the calibration / validation manifest (``calib_data/manifest.jsonl``).

    python -m calib_data.build --out calib_data/manifest.jsonl [--n-calib 64 --n-val 72 --seed 0]

Two sources, both reproducible without a network:

* Real photographs shipped inside the scikit-image wheel (``skimage/data/*``; read from the
  package directory, never downloaded), with caption / VQA / OCR prompts and short hand-written
  reference answers. Each photo's licence is recorded, as stated in its ``skimage.data``
  docstring (scikit-image 0.26); photos without a clear licence (the Middlebury motorcycle, moon,
  logo, colour wheel) are not used. Each photo belongs to one split.
* Synthetic scenes (``calib_data/synth.py``): coloured shapes with exact boxes for grounding and
  captions, and signs with rendered words and numbers for OCR. Validation seeds come from
  ``synth.SPLITS["val"]``, calibration seeds from ``synth.SPLITS["calib"]``; the ranges never meet,
  and the nano model's training range is a third one.

The manifest holds recipes and hashes only (no pixels), so it stays small enough to commit; the
images are generated or read again when needed (``calib_data.manifest.materialise``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from runtime.errors import cli_main

from .manifest import (CalibItem, check_disjoint, file_sha256, load_manifest,
                       pixel_sha256, render_versions, skimage_data_dir, write_manifest)

log = logging.getLogger(__name__)

SK_SOURCE = "scikit-image {ver}: skimage/data/{file} (skimage.data.{func} docstring)"

# name, file, function, split, licence, [(task, prompt, answer, truth)]
PHOTOS: list[tuple[str, str, str, str, str, list[tuple[str, str, str, dict]]]] = [
    ("astronaut", "astronaut.png", "astronaut", "validation",
     "public domain (NASA Great Images; no known copyright restrictions)",
     [("caption", "Describe the image.",
       "An astronaut in an orange flight suit smiles in front of an American flag and a model of "
       "the space shuttle, with her helmet beside her.", {}),
      ("vqa", "What colour is the suit?", "Orange.", {})]),
    ("chelsea", "chelsea.png", "chelsea", "validation", "CC0-1.0 (Stefan van der Walt)",
     [("caption", "Describe the image.", "A close-up of a tabby cat with green eyes.", {}),
      ("vqa", "What animal is this?", "A cat.", {})]),
    ("coffee", "coffee.png", "coffee", "validation",
     "CC0-1.0 (Rachel Michetti, courtesy of Pikolo Espresso Bar)",
     [("caption", "Describe the image.",
       "A cup of espresso on a red saucer with a spoon, on a wooden table.", {}),
      ("vqa", "What is in the cup?", "Coffee.", {})]),
    ("rocket", "rocket.jpg", "rocket", "validation",
     "public domain (SpaceX photo of the DSCOVR launch, released into the public domain)",
     [("caption", "Describe the image.",
       "A rocket stands on the launch pad at night between lightning towers.", {}),
      ("vqa", "Is it day or night?", "Night.", {})]),
    ("page", "page.png", "page", "validation",
     "no separate licence stated (a scanned page of scikit-image documentation, shipped in the "
     "BSD-3-Clause scikit-image wheel)",
     [("ocr", "What is the title of the page?", "Region-based segmentation",
       {"text": "Region-based segmentation"})]),
    ("camera", "camera.png", "camera", "calib", "CC0-1.0 (Lav Varshney)",
     [("caption", "Describe the image.",
       "A black and white photo of a man in a dark coat looking through a camera on a tripod.", {}),
      ("vqa", "What is the man doing?", "He is taking a photograph.", {})]),
    ("coins", "coins.png", "coins", "calib",
     "no known copyright restrictions (Brooklyn Museum collection)",
     [("caption", "Describe the image.", "Rows of ancient Greek coins on a grey background.", {}),
      ("vqa", "How many coins are there?", "24", {})]),
    ("horse", "horse.png", "horse", "calib", "CC0-1.0 (Andreas Preuss, openclipart)",
     [("caption", "Describe the image.",
       "A black silhouette of a horse on a white background.", {}),
      ("vqa", "What animal is shown?", "A horse.", {})]),
    ("hubble_deep_field", "hubble_deep_field.jpg", "hubble_deep_field", "calib",
     "public domain (NASA / HubbleSite)",
     [("caption", "Describe the image.", "Many small distant galaxies on a black sky.", {})]),
    ("immunohistochemistry", "ihc.png", "immunohistochemistry", "calib",
     "no known copyright restrictions (CMMI)",
     [("caption", "Describe the image.",
       "A microscope image of stained tissue with brown glands and blue cell nuclei.", {})]),
    ("retina", "retina.jpg", "retina", "calib", "CC0-1.0 (Mikael Häggström, Wikimedia Commons)",
     [("caption", "Describe the image.",
       "A photograph of the back of a human eye showing the retina and its blood vessels.", {})]),
    ("clock", "clock_motion.png", "clock", "calib",
     "public domain (Stefan van der Walt)",
     [("caption", "Describe the image.", "A motion-blurred black and white photo of a wall clock.",
       {})]),
    ("text", "text.png", "text", "calib", "public domain (Wikipedia File:Corner.png)",
     [("caption", "Describe the image.", "Handwritten mathematical formulas on lined paper.", {})]),
    ("cell", "cell.png", "cell", "calib", "CC0-1.0 (Paul Müller et al.)",
     [("caption", "Describe the image.", "A bright round cell on a grey background.", {})]),
    ("brick", "brick.png", "brick", "calib", "CC0-1.0 (CC0Textures)",
     [("caption", "Describe the image.", "A grey brick wall seen at an angle.", {})]),
    ("gravel", "gravel.png", "gravel", "calib", "CC0-1.0 (CC0Textures)",
     [("caption", "Describe the image.", "A close-up of grey gravel.", {})]),
]

SYNTH_LICENCE = "generated (calib_data/synth.py), no third-party content"
OCR_LICENCE = ("generated (calib_data/synth.py); font: Pillow's default (Aileron, CC0) or DejaVu "
               "from matplotlib (Bitstream Vera licence)")
# task mix of the synthetic items: 40 % grounding, 40 % OCR, 20 % caption
SYNTH_CYCLE = ("grounding", "ocr", "grounding", "caption", "ocr")
SPLIT_KEYS = {"validation": "val", "calib": "calib"}
SEED_STRIDE = 100_000  # --seed S uses the S-th block of seeds of each split


def photo_items(splits: dict[str, int] | None = None) -> list[CalibItem]:
    """Items for the scikit-image photographs present in the installed wheel."""
    import skimage

    d = skimage_data_dir()
    out: list[CalibItem] = []
    for name, file, func, split, licence, tasks in PHOTOS:
        path = d / file
        if not path.is_file():  # another scikit-image version: skip, never download
            log.warning("skimage/data/%s is not in the installed wheel: photo '%s' skipped",
                        file, name)
            continue
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
        sha = file_sha256(path)
        for task, prompt, answer, truth in tasks:
            out.append(CalibItem(
                id=f"photo-{name}-{task}", image={"skimage": file}, prompt=prompt, task=task,
                split=split, answer=answer, truth=dict(truth), sha256=sha, size=size,
                source=SK_SOURCE.format(ver=skimage.__version__, file=file, func=func),
                licence=licence))
    return out


def synth_item(split: str, j: int, seed_block: int = 0) -> CalibItem:
    """The ``j``-th synthetic item of a split (task from ``SYNTH_CYCLE``, seed from the split's
    range)."""
    from . import synth

    task = SYNTH_CYCLE[j % len(SYNTH_CYCLE)]
    seed = synth.split_seed(SPLIT_KEYS[split], seed_block * SEED_STRIDE + j)
    ex = synth.make_example(seed, task)
    W, H = ex.image.size
    prompt, ref = "", None
    for p in ex.prompt:
        if isinstance(p, tuple) and p[0] == "ref":
            ref = p[1]
        else:
            prompt += str(p)
    truth: dict = {}
    if task == "grounding":
        truth = {"boxes": [{"ref": ex.truth["phrase"], "box": list(ex.truth["box"])}]}
    elif task == "caption":
        truth = {"boxes": [{"ref": synth.ref_phrase(o), "box": list(o.box)}
                           for o in ex.truth["objects"]]}
    elif task == "ocr":
        truth = {"text": ex.truth["text"],
                 "boxes": [{"ref": ex.truth["text"], "box": list(ex.truth["text_box"])}]}
    gen = "ocr" if task == "ocr" else "grounding"
    short = SPLIT_KEYS[split]
    return CalibItem(
        id=f"{short}-{task}-{seed_block:02d}-{j:04d}", image={"generator": gen, "seed": seed},
        prompt=prompt, ref=ref, task=task, split=split, answer=ex.answer, truth=truth,
        sha256=pixel_sha256(ex.image), size=(W, H),
        source=f"calib_data.synth.make_example({seed}, {task!r}) form={ex.form}",
        licence=OCR_LICENCE if task == "ocr" else SYNTH_LICENCE)


def build_items(n_calib: int = 64, n_val: int = 72, seed: int = 0,
                photos: bool = True) -> list[CalibItem]:
    """All items: the photos of each split first (at most half the split, so every task is
    represented in small sets), synthetic scenes after."""
    items: list[CalibItem] = []
    ph = photo_items() if photos else []
    for split, n in (("calib", n_calib), ("validation", n_val)):
        mine = [it for it in ph if it.split == split][:n // 2]
        items += mine
        items += [synth_item(split, j, seed) for j in range(n - len(mine))]
    check_disjoint(items)
    return items


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m calib_data.build",
        description="Build the hashed calibration/validation manifest (JSONL) from scikit-image "
                    "photographs and synthetic grounding/OCR scenes.")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "manifest.jsonl",
                    help="manifest to write (atomically); default calib_data/manifest.jsonl")
    ap.add_argument("--n-calib", type=int, default=64, help="items in the calibration split")
    ap.add_argument("--n-val", type=int, default=72, help="items in the validation split")
    ap.add_argument("--seed", type=int, default=0,
                    help="block of synthetic seeds to use (a different S draws different scenes)")
    ap.add_argument("--no-photos", action="store_true", help="synthetic scenes only")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO,
                        format="%(levelname)s %(message)s")
    if a.n_calib < 0 or a.n_val < 1:
        ap.error("--n-calib must be >= 0 and --n-val >= 1")
    if not 0 <= a.seed < 10_000:
        ap.error("--seed must be in 0..9999")
    # a ManifestError (bad recipe, hash mismatch on the round trip) ends in cli_main: one line
    items = build_items(a.n_calib, a.n_val, a.seed, photos=not a.no_photos)
    write_manifest(a.out, items, seed_block=a.seed,
                   note="recipes and hashes only; images are generated or read from the "
                        "scikit-image wheel by calib_data.manifest.materialise")
    loaded = load_manifest(a.out)  # round trip: parses, hashes match, splits disjoint
    counts = loaded.counts()
    v = render_versions()
    print(f"wrote {a.out}: {len(loaded)} items "
          + "; ".join(f"{sp} " + ", ".join(f"{t} {n}" for t, n in sorted(c.items()))
                      for sp, c in sorted(counts.items()))
          + f" (Pillow {v['pillow']}, FreeType {v['freetype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
