"""Deterministic synthetic scenes with known answers: coloured shapes (grounding, captions) and signs
with rendered text (OCR), drawn with Pillow.

The trained nano checkpoint (``models/train_nano.py``) learns from these scenes, and the
calibration/validation manifests of ``calib_data/`` are built on top of them, so this API is
kept stable:

- ``draw_grounding_scene(seed, size=None, n_objects=None) -> (image, [SceneObject])``
- ``draw_ocr_scene(seed, size=None) -> (image, text)``   (``ocr_scene`` also returns the text box)
- ``grid_box(box_px, W, H)`` / ``pixel_box(box_grid, W, H)``: pixels <-> Qwen's 0..1000 grid
- ``caption(objects)``, ``ref_phrase(obj)``
- ``make_example(seed, task, form=None, index=None) -> Example`` for tasks ``"grounding"``,
  ``"caption"`` and ``"ocr"``.

Determinism: every scene is a pure function of ``(task, seed)`` (``random.Random("<kind>:<seed>")``;
string seeds are hashed with SHA-512 by ``random``, so they do not depend on ``PYTHONHASHSEED``).
Pixels are identical for identical Pillow/FreeType versions; text rendering may differ by a few
pixels across FreeType versions, the answers never do.

Seed ranges (``SPLITS``): training draws seeds from ``[0, 1e9)``, the held-out validation split
from ``[1e9, 2e9)`` and calibration from ``[2e9, 3e9)``; the ranges never overlap, so a model
trained on the train range has never seen a validation scene.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the *original* image (before the 448x448 squash of
the preprocessing), ``x1, y1`` the first covered column/row and ``x2, y2`` one past the last
(``PIL.Image.getbbox`` convention). Images have varied sizes and aspect ratios (320..640 px a side).
"""

from __future__ import annotations

import colorsys
import importlib.util
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter, ImageFont

# ---------------------------------------------------------------------------------------------
# Vocabulary of the scenes
# ---------------------------------------------------------------------------------------------

#: Object colours: saturated hues, far from each other and from the (neutral) backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

#: Words drawn on the OCR signs (one BPE token each in the trained vocabulary).
OCR_WORDS: tuple[str, ...] = (
    "STOP", "EXIT", "OPEN", "CLOSED", "SALE", "PUSH", "PULL", "HOTEL", "TAXI", "BUS", "PARK",
    "CAFE", "BAR", "POLICE", "DANGER", "ENTER", "SLOW", "YIELD", "FIRE", "WAIT", "GO", "NORTH",
    "SOUTH", "EAST", "WEST", "BANK", "SHOP", "FOOD", "BOOKS", "MUSIC", "PHONE", "LIFT",
)
#: Fraction of OCR signs that show a number (1..3 digits) instead of a word.
OCR_NUMBER_RATE = 0.3
OCR_PROMPT = "What does the sign say?"
CAPTION_PROMPT = "Describe the image."

SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "val": (1_000_000_000, 2_000_000_000),
    "calib": (2_000_000_000, 3_000_000_000),
}
TASKS = ("grounding", "caption", "ocr")
GROUNDING_FORMS = ("ref", "chat")
SIZE_RANGE = (320, 640)  # image width and height, drawn independently
OBJECT_FRAC = (0.22, 0.38)  # object side as a fraction of min(W, H)


def split_seed(split: str, i: int) -> int:
    """The ``i``-th seed of a split (``split_seed("val", 0) == 1_000_000_000``)."""
    lo, hi = SPLITS[split]
    if not 0 <= i < hi - lo:
        raise ValueError(f"index {i} outside split {split!r}")
    return lo + i


# ---------------------------------------------------------------------------------------------
# Grid mapping
# ---------------------------------------------------------------------------------------------

def _to_grid(v: float, size: int) -> int:
    # round half up of v / size * 1000, clamped to Qwen's [0, 1000) range
    return max(0, min(999, int(math.floor(v * 1000.0 / size + 0.5))))


def grid_box(box_px: tuple[float, float, float, float], W: int, H: int) -> tuple[int, int, int, int]:
    """Pixel box -> Qwen 0..999 grid: ``round(x / W * 1000)``, clamped to [0, 999].

    The inverse used by the runtime (and by ``pixel_box``) is ``x_px = int(x / 1000 * W)``
    (``draw_bbox_on_latest_picture`` in the original tokenizer); a round trip moves a coordinate by
    at most 1 pixel for images up to 1000 px.
    """
    x1, y1, x2, y2 = box_px
    return _to_grid(x1, W), _to_grid(y1, H), _to_grid(x2, W), _to_grid(y2, H)


def pixel_box(box_grid: tuple[int, int, int, int], W: int, H: int) -> tuple[int, int, int, int]:
    """0..1000 grid -> pixels, ``int(x / 1000 * W)`` (the runtime's mapping)."""
    x1, y1, x2, y2 = box_grid
    return (int(x1 / 1000 * W), int(y1 / 1000 * H), int(x2 / 1000 * W), int(y2 / 1000 * H))


def format_box(box_grid: tuple[int, int, int, int]) -> str:
    """``(x1,y1),(x2,y2)`` exactly as ``from_list_format`` writes it (``%d``, no spaces)."""
    x1, y1, x2, y2 = box_grid
    return f"({x1:d},{y1:d}),({x2:d},{y2:d})"


# ---------------------------------------------------------------------------------------------
# Drawing helpers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    box: tuple[int, int, int, int]  # pixels, (x1, y1, x2, y2), x2/y2 exclusive
    rgb: tuple[int, int, int] = (0, 0, 0)  # the exact fill drawn (a small jitter of COLORS[color])

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


def _neutral(rng: random.Random, dark: bool | None = None) -> tuple[int, int, int]:
    """A low-saturation colour (grey, beige, slate ...) that no object colour resembles."""
    if dark is None:
        dark = rng.random() < 0.3
    v = rng.uniform(0.12, 0.35) if dark else rng.uniform(0.7, 0.97)
    h, s = rng.random(), rng.uniform(0.0, 0.12)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: random.Random, W: int, H: int) -> Image.Image:
    """Solid, gradient, stripes or speckle, always in neutral tones."""
    kind = rng.choice(("solid", "gradient", "stripes", "speckle"))
    dark = rng.random() < 0.3
    c0 = _neutral(rng, dark)
    if kind == "solid":
        return Image.new("RGB", (W, H), c0)
    if kind == "gradient":
        c1 = _neutral(rng, dark)
        ramp = Image.linear_gradient("L")  # 256x256, 0 at the top
        if rng.random() < 0.5:
            ramp = ramp.rotate(90)
        mask = ramp.resize((W, H))
        return Image.composite(Image.new("RGB", (W, H), c1), Image.new("RGB", (W, H), c0), mask)
    img = Image.new("RGB", (W, H), c0)
    d = ImageDraw.Draw(img)
    if kind == "stripes":
        c1 = _neutral(rng, dark)
        step = rng.randint(16, 48)
        width = rng.randint(2, step // 2)
        if rng.random() < 0.5:
            for x in range(rng.randint(0, step), W, step):
                d.rectangle((x, 0, x + width - 1, H), fill=c1)
        else:
            for y in range(rng.randint(0, step), H, step):
                d.rectangle((0, y, W, y + width - 1), fill=c1)
        return img
    # speckle: small neutral dots, then a light blur
    for _ in range(W * H // 60):
        x, y = rng.randrange(W), rng.randrange(H)
        d.point((x, y), fill=_neutral(rng, dark))
    return img.filter(ImageFilter.BoxBlur(1))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _shape_mask(shape: str, W: int, H: int, cx: float, cy: float, side: float,
                angle: float) -> Image.Image:
    """An 'L' mask (255 inside) of one shape centred on (cx, cy)."""
    mask = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(mask)
    r = side / 2
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "triangle":
        pts = [(cx + r * math.sin(angle + k * 2 * math.pi / 3),
                cy - r * math.cos(angle + k * 2 * math.pi / 3)) for k in range(3)]
        d.polygon(pts, fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.45
            a = angle + k * math.pi / 5
            pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
        d.polygon(pts, fill=255)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _size(rng: random.Random, size: tuple[int, int] | None) -> tuple[int, int]:
    if size is not None:
        return int(size[0]), int(size[1])
    return rng.randint(*SIZE_RANGE), rng.randint(*SIZE_RANGE)


# ---------------------------------------------------------------------------------------------
# Grounding scenes
# ---------------------------------------------------------------------------------------------

def draw_grounding_scene(seed: int, size: tuple[int, int] | None = None,
                         n_objects: int | None = None) -> tuple[Image.Image, list[SceneObject]]:
    """1-3 non-overlapping filled shapes, each a distinct colour *and* shape, on a neutral
    background. Returns the RGB image and the objects with their tight pixel boxes (measured on
    the drawn mask, so they match the pixels exactly)."""
    rng = random.Random(f"grounding:{seed}")
    W, H = _size(rng, size)
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= min(len(COLORS), len(SHAPES)):
        raise ValueError(f"n_objects must be 1..{min(len(COLORS), len(SHAPES))}, got {n}")
    img = _background(rng, W, H)
    colors = rng.sample(list(COLORS), n)
    shapes = rng.sample(list(SHAPES), n)
    objects: list[SceneObject] = []
    placed: list[tuple[int, int, int, int]] = []
    gap = max(4, int(0.02 * min(W, H)))
    for color, shape in zip(colors, shapes):
        for _attempt in range(200):
            side = rng.uniform(*OBJECT_FRAC) * min(W, H)
            cx = rng.uniform(side / 2 + 2, W - side / 2 - 2)
            cy = rng.uniform(side / 2 + 2, H - side / 2 - 2)
            x1, y1, x2, y2 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
            if all(x2 + gap < a or b + gap < x1 or y2 + gap < c or d + gap < y1
                   for a, c, b, d in placed):
                break
        else:  # crowded: retry the whole scene with one object fewer (deterministic)
            return draw_grounding_scene(seed + 7_919 * 1_000_003, (W, H), n - 1) \
                if n > 1 else (img, objects)
        angle = rng.uniform(-0.35, 0.35) if shape in ("triangle", "star") else 0.0
        mask = _shape_mask(shape, W, H, cx, cy, side, angle)
        box = mask.getbbox()
        assert box is not None
        rgb = _jitter(COLORS[color], rng)
        img.paste(rgb, (0, 0, W, H), mask)
        placed.append(box)
        objects.append(SceneObject(color, shape, tuple(box), rgb))  # type: ignore[arg-type]
    return img, objects


def ref_phrase(obj: SceneObject) -> str:
    """The referring expression of an object: ``the red circle``."""
    return f"the {obj.color} {obj.shape}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(objects: list[SceneObject]) -> str:
    """``a red circle``, ``a blue square and an orange circle``, ``a red circle, a blue square and
    a green star``: objects listed left to right (by box centre)."""
    names = [f"{_article(o.color)} {o.color} {o.shape}"
             for o in sorted(objects, key=lambda o: o.box[0] + o.box[2])]
    if not names:
        return "nothing"
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


# ---------------------------------------------------------------------------------------------
# OCR scenes
# ---------------------------------------------------------------------------------------------

def _mpl_font_dir() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"
    return d if d.is_dir() else None


#: Fonts used for the signs: Pillow's built-in (FreeType) default plus the DejaVu faces that
#: ship inside the matplotlib wheel. A missing face is skipped (the default always exists).
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf",
              "DejaVuSans.ttf")


@lru_cache(maxsize=None)
def font_names() -> tuple[str, ...]:
    d = _mpl_font_dir()
    have = tuple(f for f in FONT_FILES if d is not None and (d / f).is_file())
    return ("default",) + have


@lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "default":
        return ImageFont.load_default(size=size)  # type: ignore[return-value]
    d = _mpl_font_dir()
    assert d is not None
    return ImageFont.truetype(str(d / name), size=size)


def _ocr_text(rng: random.Random) -> str:
    if rng.random() < OCR_NUMBER_RATE:
        return str(rng.randint(1, 999))
    return rng.choice(OCR_WORDS)


def ocr_scene(seed: int, size: tuple[int, int] | None = None
              ) -> tuple[Image.Image, str, tuple[int, int, int, int]]:
    """``draw_ocr_scene`` plus the pixel box of the rendered text."""
    rng = random.Random(f"ocr:{seed}")
    W, H = _size(rng, size)
    img = _background(rng, W, H)
    text = _ocr_text(rng)
    font_name = rng.choice(font_names())
    # text height 13-22 % of the shorter side, shrunk until the sign fits in the image
    fsize = int(rng.uniform(0.13, 0.22) * min(W, H) / 0.75)
    while True:
        font = _font(font_name, fsize)
        l, t, r, b = font.getbbox(text)
        tw, th = r - l, b - t
        pad_x, pad_y = int(0.25 * th) + 4, int(0.3 * th) + 4
        if tw + 2 * pad_x <= W - 8 and th + 2 * pad_y <= H - 8 or fsize <= 12:
            break
        fsize = int(fsize * 0.9)
    sw, sh = tw + 2 * pad_x, th + 2 * pad_y
    sx = rng.randint(4, max(4, W - sw - 4))
    sy = rng.randint(4, max(4, H - sh - 4))
    # plate: light with dark text or dark with light text; saturated or neutral
    if rng.random() < 0.5:
        plate = _jitter(rng.choice(list(COLORS.values())), rng, 20) if rng.random() < 0.5 \
            else _neutral(rng, dark=False)
        ink = _neutral(rng, dark=True)
        if sum(plate) < 300:  # a dark saturated plate (blue, purple): white ink instead
            ink = (250, 250, 250)
    else:
        plate = _neutral(rng, dark=True)
        ink = rng.choice([(250, 250, 250), (250, 220, 40), (255, 255, 255)])
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((sx, sy, sx + sw - 1, sy + sh - 1), radius=int(0.2 * sh), fill=plate)
    tx, ty = sx + pad_x - l, sy + pad_y - t
    d.text((tx, ty), text, font=font, fill=ink)
    text_box = (sx + pad_x, sy + pad_y, sx + pad_x + tw, sy + pad_y + th)
    return img, text, text_box


def draw_ocr_scene(seed: int, size: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """A sign (rounded plate) with one short word or number, in one of ``font_names()``, at a
    varied size, colour and position. Returns the RGB image and the text."""
    img, text, _ = ocr_scene(seed, size)
    return img, text


# ---------------------------------------------------------------------------------------------
# Examples (prompt + answer) for training and validation
# ---------------------------------------------------------------------------------------------

@dataclass
class Example:
    """One image-question-answer item.

    ``prompt`` is the user turn after the picture, as a list of parts for
    ``runtime.prompt.build_chat_ids``: plain strings, or ``("ref", phrase)`` for a ``<ref>`` span
    (convert with ``prompt_parts``). ``answer`` is the reference answer text exactly as the
    model should generate it (special tags written out, without ``<|im_end|>``); ``answer_parts``
    is the same answer as parts (``("ref", p)``, ``("box", (x1,y1,x2,y2) on the grid)`` and
    plain strings). ``truth`` holds what the metrics need: pixel boxes, the text, ...
    """

    seed: int
    task: str
    form: str
    image: Image.Image
    prompt: list[Any]
    answer: str
    answer_parts: list[Any]
    truth: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _grounding_example(seed: int, img: Image.Image, objects: list[SceneObject], index: int,
                       form: str) -> Example:
    W, H = img.size
    obj = objects[index]
    phrase = ref_phrase(obj)
    if form == "ref":
        prompt: list[Any] = [("ref", phrase)]
    elif form == "chat":
        prompt = [f"Where is {phrase}?"]
    else:
        raise ValueError(f"unknown grounding form {form!r}: use one of {', '.join(GROUNDING_FORMS)}")
    gbox = grid_box(obj.box, W, H)
    answer = f"<ref>{phrase}</ref><box>{format_box(gbox)}</box>"
    return Example(seed, "grounding", form, img, prompt, answer, [("ref", phrase), ("box", gbox)],
                   {"box": obj.box, "grid_box": gbox, "object": obj, "objects": objects,
                    "phrase": phrase, "index": index})


def _caption_example(seed: int, img: Image.Image, objects: list[SceneObject]) -> Example:
    text = caption(objects)
    return Example(seed, "caption", "chat", img, [CAPTION_PROMPT], text, [text],
                   {"objects": objects, "caption": text})


def make_example(seed: int, task: str, form: str | None = None, index: int | None = None) -> Example:
    """The example of ``task`` for ``seed``.

    - ``grounding``: the ``index``-th object (default: chosen by the seed) of
      ``draw_grounding_scene(seed)``; ``form`` ``"ref"`` asks ``<ref>the red circle</ref>``,
      ``"chat"`` asks ``Where is the red circle?`` (default: chosen by the seed); the answer is
      ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>`` on the 0..1000 grid.
    - ``caption``: ``Describe the image.`` -> ``caption(objects)`` of the same scene.
    - ``ocr``: ``What does the sign say?`` -> the text of ``draw_ocr_scene(seed)``.
    """
    rng = random.Random(f"example:{task}:{seed}")
    if task in ("grounding", "caption"):
        img, objects = draw_grounding_scene(seed)
        if task == "caption":
            return _caption_example(seed, img, objects)
        if index is None:
            index = rng.randrange(len(objects))
        return _grounding_example(seed, img, objects, index, form or rng.choice(GROUNDING_FORMS))
    if task == "ocr":
        img, text, text_box = ocr_scene(seed)
        return Example(seed, task, "chat", img, [OCR_PROMPT], text, [text],
                       {"text": text, "text_box": text_box})
    raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")


def scene_examples(seed: int, forms: tuple[str, ...] = GROUNDING_FORMS,
                   with_caption: bool = True) -> list[Example]:
    """Every question about one grounding scene, drawing it once: one grounding example per
    object and per form in ``forms``, then (optionally) the caption. All share one image."""
    img, objects = draw_grounding_scene(seed)
    out = [_grounding_example(seed, img, objects, i, f)
           for i in range(len(objects)) for f in forms]
    if with_caption:
        out.append(_caption_example(seed, img, objects))
    return out


def prompt_parts(parts: list[Any]) -> list[Any]:
    """Example parts -> ``runtime.prompt`` parts (``Ref``/``Box`` objects, strings kept)."""
    from runtime.prompt import Box, Ref

    out: list[Any] = []
    for p in parts:
        if isinstance(p, tuple) and p[0] == "ref":
            out.append(Ref(p[1]))
        elif isinstance(p, tuple) and p[0] == "box":
            out.append(Box(*p[1]))
        else:
            out.append(p)
    return out
