"""Deterministic synthetic scenes with known answers, drawn with Pillow: coloured shapes to ground
and caption, and a sign with a rendered word or number to read (OCR).

Every scene holds both: 1-3 shapes *and* one sign, so a single image (one vision-tower pass)
carries grounding, caption and OCR questions. The trained nano checkpoint
(``training/train_nano.py``) learns from these scenes, and the calibration/validation manifests of
``calib_data/`` are built on top of them, so this API is kept stable:

- ``draw_scene(seed, size=None, n_objects=None, sign=True) -> Scene(image, objects, text, ...)``
- ``draw_grounding_scene(seed, size=None, n_objects=None) -> (image, [SceneObject])``
- ``draw_ocr_scene(seed, size=None) -> (image, text)``   (``ocr_scene`` also returns the text box)
  -- both views of ``draw_scene(seed)``: the same seed gives the same picture.
- ``grid_box(box_px, W, H)`` / ``pixel_box(box_grid, W, H)``: pixels <-> Qwen's 0..1000 grid
- ``caption(objects, text=None)``, ``ref_phrase(obj)``
- ``make_example(seed, task, form=None, index=None) -> Example`` for tasks ``"grounding"``
  (forms ``"ref"``: ``<ref>the red circle</ref>`` and ``"chat"``: ``Where is the red circle?``),
  ``"caption"`` and ``"ocr"``; ``scene_examples(seed)`` gives all of them for one scene.

Determinism: every scene is a pure function of ``seed`` (``random.Random(f"scene:{seed}")``;
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
OCR_NUMBER_RATE = 0.25
OCR_NUMBER_RANGE = (1, 99)
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
OBJECT_FRAC = (0.22, 0.36)  # object side as a fraction of min(W, H)
SIGN_TEXT_FRAC = (0.12, 0.18)  # glyph height of the sign text as a fraction of min(W, H)


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
# Fonts and sign text
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


def _sign_text(rng: random.Random) -> str:
    if rng.random() < OCR_NUMBER_RATE:
        return str(rng.randint(*OCR_NUMBER_RANGE))
    return rng.choice(OCR_WORDS)


def _overlaps(box: tuple[float, float, float, float], placed: list[tuple[int, int, int, int]],
              gap: float) -> bool:
    x1, y1, x2, y2 = box
    return any(not (x2 + gap < a or b + gap < x1 or y2 + gap < c or d + gap < y1)
               for a, c, b, d in placed)


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------

@dataclass
class Scene:
    """One synthetic picture: shapes to ground and (optionally) a sign to read."""

    image: Image.Image
    objects: list[SceneObject]
    text: str | None  # the sign's text (None: no sign)
    text_box: tuple[int, int, int, int] | None  # pixel box of the rendered text
    sign_box: tuple[int, int, int, int] | None  # pixel box of the sign plate
    char_boxes: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    # (character, pixel box: its advance-width column span x the text's rows), left to right


def _draw_sign(img: Image.Image, rng: random.Random) -> tuple[
        str, tuple[int, int, int, int], tuple[int, int, int, int],
        list[tuple[str, tuple[int, int, int, int]]]]:
    W, H = img.size
    text = _sign_text(rng)
    font_name = rng.choice(font_names())
    # glyph height SIGN_TEXT_FRAC of the shorter side, shrunk until the sign fits
    fsize = int(rng.uniform(*SIGN_TEXT_FRAC) * min(W, H) / 0.72)
    while True:
        font = _font(font_name, fsize)
        l, t, r, b = font.getbbox(text)
        tw, th = r - l, b - t
        pad_x, pad_y = int(0.3 * th) + 4, int(0.3 * th) + 4
        if (tw + 2 * pad_x <= 0.8 * W and th + 2 * pad_y <= 0.5 * H) or fsize <= 12:
            break
        fsize = int(fsize * 0.9)
    sw, sh = tw + 2 * pad_x, th + 2 * pad_y
    sx = rng.randint(4, max(4, W - sw - 4))
    sy = rng.randint(4, max(4, H - sh - 4))
    # neutral plates only (never an object colour): light plate + dark ink or the reverse
    if rng.random() < 0.5:
        plate, ink = _neutral(rng, dark=False), _neutral(rng, dark=True)
        ink = tuple(int(c * 0.4) for c in ink)  # type: ignore[assignment]
    else:
        plate, ink = _neutral(rng, dark=True), (250, 250, 250)
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((sx, sy, sx + sw - 1, sy + sh - 1), radius=int(0.2 * sh), fill=plate,
                        outline=ink if rng.random() < 0.3 else None, width=2)
    ox, oy = sx + pad_x - l, sy + pad_y - t
    d.text((ox, oy), text, font=font, fill=ink)
    ty1, ty2 = sy + pad_y, sy + pad_y + th
    chars = []
    for i, ch in enumerate(text):
        a, b = font.getlength(text[:i]), font.getlength(text[:i + 1])
        chars.append((ch, (int(ox + a), ty1, max(int(ox + a) + 1, int(ox + b)), ty2)))
    return text, (sx + pad_x, ty1, sx + pad_x + tw, ty2), (sx, sy, sx + sw, sy + sh), chars


def draw_scene(seed: int, size: tuple[int, int] | None = None, n_objects: int | None = None,
               sign: bool = True) -> Scene:
    """The scene of ``seed``: a neutral background, a sign with one word or number (unless
    ``sign=False``) and 1-3 non-overlapping filled shapes, each of a distinct colour *and* a
    distinct shape (so ``the red circle`` is unambiguous). Boxes are measured on the drawn masks,
    so they match the pixels exactly. A crowded image may hold fewer shapes than drawn for
    (never fewer than one)."""
    rng = random.Random(f"scene:{seed}")
    W, H = _size(rng, size)
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    if not 1 <= n <= min(len(COLORS), len(SHAPES)):
        raise ValueError(f"n_objects must be 1..{min(len(COLORS), len(SHAPES))}, got {n}")
    img = _background(rng, W, H)
    gap = max(4, int(0.02 * min(W, H)))
    placed: list[tuple[int, int, int, int]] = []
    text = text_box = sign_box = None
    chars: list[tuple[str, tuple[int, int, int, int]]] = []
    if sign:
        text, text_box, sign_box, chars = _draw_sign(img, rng)
        placed.append(sign_box)
    colors = rng.sample(list(COLORS), n)
    shapes = rng.sample(list(SHAPES), n)
    objects: list[SceneObject] = []
    for k, (color, shape) in enumerate(zip(colors, shapes)):
        frac = OBJECT_FRAC
        for attempt in range(300):
            if attempt == 150:  # crowded: allow smaller shapes
                frac = (OBJECT_FRAC[0] * 0.7, OBJECT_FRAC[0])
            side = rng.uniform(*frac) * min(W, H)
            cx = rng.uniform(side / 2 + 2, W - side / 2 - 2)
            cy = rng.uniform(side / 2 + 2, H - side / 2 - 2)
            if not _overlaps((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2),
                             placed, gap):
                break
        else:
            if objects:
                break  # no room for more shapes
            raise RuntimeError(f"scene {seed}: no room for a shape")  # pragma: no cover
        angle = rng.uniform(-0.35, 0.35) if shape in ("triangle", "star") else 0.0
        mask = _shape_mask(shape, W, H, cx, cy, side, angle)
        box = mask.getbbox()
        assert box is not None
        rgb = _jitter(COLORS[color], rng)
        img.paste(rgb, (0, 0, W, H), mask)
        placed.append(box)
        objects.append(SceneObject(color, shape, tuple(box), rgb))  # type: ignore[arg-type]
    return Scene(img, objects, text, text_box, sign_box, chars)


def draw_grounding_scene(seed: int, size: tuple[int, int] | None = None,
                         n_objects: int | None = None) -> tuple[Image.Image, list[SceneObject]]:
    """``draw_scene(seed)``'s image and shapes (1-3, distinct colour and shape, pixel boxes)."""
    sc = draw_scene(seed, size, n_objects)
    return sc.image, sc.objects


def ocr_scene(seed: int, size: tuple[int, int] | None = None
              ) -> tuple[Image.Image, str, tuple[int, int, int, int]]:
    """``draw_ocr_scene`` plus the pixel box of the rendered text."""
    sc = draw_scene(seed, size)
    assert sc.text is not None and sc.text_box is not None
    return sc.image, sc.text, sc.text_box


def draw_ocr_scene(seed: int, size: tuple[int, int] | None = None) -> tuple[Image.Image, str]:
    """``draw_scene(seed)``'s image and the text of its sign: one word of ``OCR_WORDS`` or a
    number, in one of ``font_names()``, at a varied size, colour and position."""
    img, text, _ = ocr_scene(seed, size)
    return img, text


def ordered_index(obj: SceneObject) -> int:
    """Index of the object's (colour, shape) pair in ``COLORS`` x ``SHAPES`` (0..23)."""
    return list(COLORS).index(obj.color) * len(SHAPES) + SHAPES.index(obj.shape)


def ref_phrase(obj: SceneObject) -> str:
    """The referring expression of an object: ``the red circle``."""
    return f"the {obj.color} {obj.shape}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(objects: list[SceneObject], text: str | None = None) -> str:
    """``a red circle``, ``a blue square and an orange circle``, ``a red circle, a blue square and
    a sign that says STOP``: shapes left to right (by box centre), then the sign if any."""
    names = [f"{_article(o.color)} {o.color} {o.shape}"
             for o in sorted(objects, key=lambda o: o.box[0] + o.box[2])]
    if text is not None:
        names.append(f"a sign that says {text}")
    if not names:
        return "nothing"
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


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


def _caption_example(seed: int, sc: Scene) -> Example:
    text = caption(sc.objects, sc.text)
    return Example(seed, "caption", "chat", sc.image, [CAPTION_PROMPT], text, [text],
                   {"objects": sc.objects, "caption": text, "text": sc.text})


def _ocr_example(seed: int, sc: Scene) -> Example:
    assert sc.text is not None
    return Example(seed, "ocr", "chat", sc.image, [OCR_PROMPT], sc.text, [sc.text],
                   {"text": sc.text, "text_box": sc.text_box, "sign_box": sc.sign_box,
                    "char_boxes": sc.char_boxes, "objects": sc.objects})


def make_example(seed: int, task: str, form: str | None = None, index: int | None = None) -> Example:
    """The example of ``task`` about ``draw_scene(seed)`` (all tasks of a seed share the image).

    - ``grounding``: the ``index``-th shape (default: chosen by the seed); ``form`` ``"ref"``
      asks ``<ref>the red circle</ref>``, ``"chat"`` asks ``Where is the red circle?`` (default:
      chosen by the seed); the answer is ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``
      on the 0..1000 grid.
    - ``caption``: ``Describe the image.`` -> ``caption(objects, text)``.
    - ``ocr``: ``What does the sign say?`` -> the sign's text.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    rng = random.Random(f"example:{task}:{seed}")
    sc = draw_scene(seed)
    if task == "caption":
        return _caption_example(seed, sc)
    if task == "ocr":
        return _ocr_example(seed, sc)
    if index is None:
        index = rng.randrange(len(sc.objects))
    return _grounding_example(seed, sc.image, sc.objects, index,
                              form or rng.choice(GROUNDING_FORMS))


def scene_examples(seed: int, forms: tuple[str, ...] = GROUNDING_FORMS, with_caption: bool = True,
                   with_ocr: bool = True, n_objects: int | None = None) -> list[Example]:
    """Every question about ``draw_scene(seed)``, drawing it once: one grounding example per
    shape and per form in ``forms``, then the caption and the OCR question. One shared image.
    ``n_objects`` fixes the number of shapes (training curricula); default: 1-3 by the seed."""
    sc = draw_scene(seed, n_objects=n_objects)
    out = [_grounding_example(seed, sc.image, sc.objects, i, f)
           for i in range(len(sc.objects)) for f in forms]
    if with_caption:
        out.append(_caption_example(seed, sc))
    if with_ocr:
        out.append(_ocr_example(seed, sc))
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
