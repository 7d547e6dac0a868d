"""Grounding output: parse ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` and map boxes to pixels.

Why tolerant: the text is model output (quantised models, truncated generations), so anything
that cannot be read is skipped, never raised. Conventions (the original's): integer coordinates on a
0..1000 grid relative to the ORIGINAL image; pixels as HF ``draw_bbox_on_latest_picture``:
``int(x / 1000 * W)`` on the LAST image, clamped into the image.

Association: every box directly following a ``<ref>`` (only whitespace or other boxes between)
gets that phrase. HF ``to_list_format`` gives it only to the first box after a ref; the spec says
one ref can own several boxes, so we keep it for all of them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GRID = 1000
_TAG = re.compile(r"<(/?)(ref|box|quad)>")
_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?")
# a complete box body, used only when the text ends inside an unclosed <box> (truncated output)
_FULL_BOX = re.compile(r"\s*\(?\s*[-+]?[\d.]+\s*,\s*[-+]?[\d.]+\s*\)\s*,\s*\(\s*[-+]?[\d.]+"
                       r"\s*,\s*[-+]?[\d.]+\s*\)\s*$")


@dataclass
class GroundedBox:
    ref: str | None
    box: tuple[int, int, int, int]  # 0..1000 grid as emitted (clamped, corners ordered)
    pixels: tuple[int, int, int, int] | None  # in the last image's original pixels
    image_index: int  # index of the image ``pixels`` refer to (-1: no image size given)


def _parse_box(body: str, at_end: bool) -> tuple[int, int, int, int] | None:
    if at_end and not _FULL_BOX.match(body):
        return None  # generation stopped mid-box: the last number may be cut short
    nums = _NUM.findall(body)
    if len(nums) != 4:
        return None
    if _NUM.sub("", body).strip(" \t\r\n(),"):  # anything but numbers, parentheses, commas
        return None
    try:
        v = [min(GRID, max(0, int(round(float(n))))) for n in nums]
    except ValueError:  # pragma: no cover - the regex admits only numbers
        return None
    x1, y1, x2, y2 = v
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def to_pixels(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grid box -> pixel box on an image of ``size`` = (W, H), clamped into the image."""
    w, h = int(size[0]), int(size[1])
    x1, y1, x2, y2 = box

    def px(v: int, n: int) -> int:
        return min(max(int(v / GRID * n), 0), max(n - 1, 0))

    return (px(x1, w), px(y1, h), px(x2, w), px(y2, h))


def parse_grounding(text: str, image_sizes: Sequence[tuple[int, int]] = ()) -> list[GroundedBox]:
    """All boxes in ``text`` with their refs; ``pixels`` on the last of ``image_sizes`` (W, H)."""
    if not isinstance(text, str) or not text:
        return []
    sizes = list(image_sizes or ())
    size = sizes[-1] if sizes else None
    index = len(sizes) - 1
    out: list[GroundedBox] = []
    ref: str | None = None  # the phrase boxes attach to
    mode: str | None = None  # inside "ref" | "box" | "quad"
    start = 0  # where the open element's body (or the plain text) starts

    def close(end: int, at_end: bool = False) -> None:
        nonlocal ref
        body = text[start:end]
        if mode == "ref":
            ref = body.strip() if not at_end else ref
        elif mode == "box":
            b = _parse_box(body, at_end)
            if b is not None:
                out.append(GroundedBox(ref, b, to_pixels(b, size) if size else None, index))
        elif mode is None and body.strip():
            ref = None  # real text between a ref and a box breaks the association

    for m in _TAG.finditer(text):
        closing, name = m.group(1) == "/", m.group(2)
        if closing:  # closes the open element; a stray one is just a boundary
            close(m.start())
            mode = None
        else:
            close(m.start())  # an unclosed element ends at the next opening tag
            mode = name
        start = m.end()
    close(len(text), at_end=True)
    return out


def draw_boxes(img: Any, boxes: Sequence[GroundedBox], width: int = 3) -> Any:
    """A copy of ``img`` (RGB) with each box and its ref drawn; boxes mapped to THIS image's size.

    Colours cycle; the label font is Pillow's built-in one (no system font files needed).
    """
    from PIL import Image, ImageDraw, ImageFont

    if not isinstance(img, Image.Image):
        from .image import load_image
        img = load_image(img)
    out = img.convert("RGB") if img.mode != "RGB" else img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    size = max(10, min(w, h) // 30)
    try:
        font: Any = ImageFont.load_default(size=size)
    except Exception:  # Pillow built without FreeType: bitmap font, fixed size
        font = ImageFont.load_default()
    for i, b in enumerate(boxes):
        colour = _COLOURS[i % len(_COLOURS)]
        x1, y1, x2, y2 = to_pixels(b.box, (w, h))
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=max(1, int(width)))
        if b.ref:
            l, t, r, bt = draw.textbbox((0, 0), b.ref, font=font)
            tw, th = r - l, bt - t
            ty = y1 - th - 4 if y1 - th - 4 >= 0 else min(y1 + 2, max(h - th - 4, 0))
            draw.rectangle((x1, ty, x1 + tw + 4, ty + th + 4), fill=colour)
            draw.text((x1 + 2 - l, ty + 2 - t), b.ref, fill=(255, 255, 255), font=font)
    return out


_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (128, 128, 0), (0, 0, 128), (170, 110, 40))
