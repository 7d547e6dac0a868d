"""runtime.grounding: tolerant parsing of <ref>/<box> output, pixel mapping, drawing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runtime.grounding import GroundedBox, draw_boxes, parse_grounding, to_pixels


def _boxes(text: str, sizes=()) -> list[tuple]:
    return [(b.ref, b.box) for b in parse_grounding(text, sizes)]


def test_single_box():
    (b,) = parse_grounding("<ref>the red circle</ref><box>(536,509),(588,602)</box>")
    assert b == GroundedBox("the red circle", (536, 509, 588, 602), None, -1)


def test_paper_example_multiple_refs():
    text = ("<ref> Woman</ref><box>(451,379),(731,806)</box> and<ref> her dog</ref>"
            "<box>(219,424),(576,896)</box> playing on the beach<|endoftext|>")
    assert _boxes(text) == [("Woman", (451, 379, 731, 806)), ("her dog", (219, 424, 576, 896))]


def test_one_ref_two_boxes_and_ref_scope():
    text = ("<ref>cars</ref><box>(1,2),(3,4)</box> <box>(5,6),(7,8)</box>"
            " and also <box>(9,9),(10,10)</box><box>(0,0),(1,1)</box>")
    assert _boxes(text) == [("cars", (1, 2, 3, 4)), ("cars", (5, 6, 7, 8)),
                            (None, (9, 9, 10, 10)), (None, (0, 0, 1, 1))]
    assert _boxes("<box>(10,20),(30,40)</box>") == [(None, (10, 20, 30, 40))]


@pytest.mark.parametrize("text,want", [
    ("<ref>a</ref><box>(10,20),(30,40)", [("a", (10, 20, 30, 40))]),  # ends without </box>
    ("<ref>a</ref><box>(10,20),(30,40)<ref>b</ref><box>(1,1),(2,2)</box>",
     [("a", (10, 20, 30, 40)), ("b", (1, 1, 2, 2))]),  # missing </box> mid-text
    ("<ref>a</ref><box>( 10 , 20 ) , ( 30 , 40 )</box>", [("a", (10, 20, 30, 40))]),
    ("<ref>a</ref><box>(10,20),(30,40</box>", [("a", (10, 20, 30, 40))]),  # missing ")"
    ("<ref>a</ref><box>10,20,30,40</box>", [("a", (10, 20, 30, 40))]),
    ("<ref>a</ref><box>(x,20),(30,40)</box>", []),  # non-numeric
    ("<ref>a</ref><box>(10,20),(3O,40)</box>", []),  # letter O, not zero
    ("<ref>a</ref><box>(10,20),(30)</box>", []),  # too few numbers
    ("<ref>a</ref><box>(10,20),(30,40),(5,5)</box>", []),  # too many
    ("<ref>a</ref><box>(10,20),(30,4", []),  # generation cut off mid-box
    ("<ref>a</ref><box>(10,20),(30,40", []),  # cut off: last number may be incomplete
    ("<ref>a</re", []),
    ("<ref>dog<box>(1,2),(3,4)</box>", [("dog", (1, 2, 3, 4))]),  # missing </ref>
    ("</box></ref><box></box><box>", []),
    ("no grounding at all", []),
    ("", []),
])
def test_malformed_never_raises(text, want):
    assert _boxes(text, [(100, 100)]) == want


def test_clamp_and_order():
    assert _boxes("<box>(1200,-5),(-30,400)</box>") == [(None, (0, 0, 1000, 400))]
    assert _boxes("<box>(600,700),(100,200)</box>") == [(None, (100, 200, 600, 700))]
    assert _boxes("<box>(10.6,20),(30,40)</box>") == [(None, (11, 20, 30, 40))]


def test_pixels_on_last_non_square_image():
    text = "<ref>x</ref><box>(250,500),(1000,1000)</box>"
    (b,) = parse_grounding(text, [(10, 10), (640, 480)])
    assert b.image_index == 1
    assert b.pixels == (int(250 / 1000 * 640), int(500 / 1000 * 480), 639, 479)
    assert b.pixels == (160, 240, 639, 479)
    assert to_pixels((0, 0, 999, 999), (333, 77)) == (0, 0, int(999 / 1000 * 333),
                                                      int(999 / 1000 * 77))
    (b,) = parse_grounding(text)
    assert b.pixels is None and b.image_index == -1


def test_draw_boxes():
    img = Image.new("RGB", (320, 200), (255, 255, 255))
    boxes = parse_grounding("<ref>the red circle</ref><box>(100,200),(500,800)</box>"
                            "<box>(600,100),(900,900)</box>", [img.size])
    out = draw_boxes(img, boxes)
    assert out is not img and out.size == img.size and out.mode == "RGB"
    assert np.asarray(img).min() == 255  # input untouched
    a = np.asarray(out)
    x1, y1, x2, y2 = boxes[1].pixels
    assert (a[y1:y2, x1] != 255).any()  # left edge drawn
    assert (a != 255).any(axis=2).sum() > 200
    assert draw_boxes(Image.new("L", (50, 40)), []).mode == "RGB"
    tiny = draw_boxes(Image.new("RGB", (8, 8)), boxes)  # labels near edges must not fail
    assert tiny.size == (8, 8)
