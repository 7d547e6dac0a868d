"""calib_data/synth.py: deterministic scenes whose answers match the drawn pixels."""

from __future__ import annotations

import numpy as np
import pytest

from calib_data import synth

SEEDS = list(range(12)) + [synth.split_seed("val", i) for i in range(6)]


def test_deterministic():
    for seed in (0, 7, synth.split_seed("val", 3)):
        a, b = synth.draw_scene(seed), synth.draw_scene(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.objects == b.objects and a.text == b.text and a.text_box == b.text_box
        ea, eb = synth.make_example(seed, "grounding"), synth.make_example(seed, "grounding")
        assert (ea.prompt, ea.answer, ea.form) == (eb.prompt, eb.answer, eb.form)
    # different seeds differ
    assert synth.draw_scene(1).image.tobytes() != synth.draw_scene(2).image.tobytes()


def test_views_share_the_scene():
    img_g, objs = synth.draw_grounding_scene(5)
    img_o, text = synth.draw_ocr_scene(5)
    sc = synth.draw_scene(5)
    assert img_g.tobytes() == img_o.tobytes() == sc.image.tobytes()
    assert objs == sc.objects and text == sc.text


def test_sizes_vary_and_objects_are_distinct():
    sizes = set()
    for seed in SEEDS:
        sc = synth.draw_scene(seed)
        W, H = sc.image.size
        sizes.add((W, H))
        assert sc.image.mode == "RGB"
        assert synth.SIZE_RANGE[0] <= W <= synth.SIZE_RANGE[1]
        assert synth.SIZE_RANGE[0] <= H <= synth.SIZE_RANGE[1]
        assert 1 <= len(sc.objects) <= 3
        assert len({o.color for o in sc.objects}) == len(sc.objects)
        assert len({o.shape for o in sc.objects}) == len(sc.objects)
    assert len(sizes) > len(SEEDS) // 2


def _inter(a, b):
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def test_boxes_inside_and_match_drawn_pixels():
    for seed in SEEDS:
        sc = synth.draw_scene(seed)
        W, H = sc.image.size
        px = np.asarray(sc.image)
        boxes = [o.box for o in sc.objects] + [sc.sign_box]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert _inter(a, b) == 0, f"seed {seed}: overlapping {a} {b}"
        for o in sc.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            # the pixels of exactly the object's fill span exactly its box
            ys, xs = np.nonzero(np.all(px == np.array(o.rgb, np.uint8), axis=-1))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == o.box, (seed, o)
            # and it is a sizeable object, not a sliver
            assert min(x2 - x1, y2 - y1) >= 0.1 * min(W, H)


def test_ocr_text_is_drawn_inside_its_box():
    for seed in SEEDS:
        sc = synth.draw_scene(seed)
        assert sc.text and (sc.text in synth.OCR_WORDS or sc.text.isdigit())
        x1, y1, x2, y2 = sc.text_box
        sx1, sy1, sx2, sy2 = sc.sign_box
        assert sx1 <= x1 < x2 <= sx2 and sy1 <= y1 < y2 <= sy2
        a = np.asarray(sc.image.convert("L"), np.float32)
        inside = a[y1:y2, x1:x2]
        # ink and plate contrast inside the text box: the glyphs are really there
        assert inside.max() - inside.min() > 100, seed
        # a blank sign (same plate, no text) differs from the drawn one only near the text
        assert (y2 - y1) >= 0.08 * min(sc.image.size)


def test_char_boxes_tile_the_text():
    for seed in SEEDS[:8]:
        sc = synth.draw_scene(seed)
        assert "".join(c for c, _ in sc.char_boxes) == sc.text
        x1, y1, x2, y2 = sc.text_box
        prev = None
        for _, (a, b, c, d) in sc.char_boxes:
            assert (b, d) == (y1, y2) and a < c
            assert x1 - 3 <= a and c <= x2 + 3
            if prev is not None:
                assert a >= prev - 1  # left to right
            prev = c


def test_ocr_text_pixels_depend_on_text():
    # render the same seed geometry with the text hidden: the difference is the glyphs
    sc = synth.draw_scene(3)
    a = np.asarray(sc.image.convert("L"), np.float32)
    x1, y1, x2, y2 = sc.text_box
    crop = a[y1:y2, x1:x2]
    dark = (crop < crop.mean()).mean()
    assert 0.05 < dark < 0.95  # neither empty plate nor solid ink


@pytest.mark.parametrize("W,H", [(320, 320), (333, 517), (640, 401), (997, 1000), (640, 640)])
def test_grid_round_trip_within_one_pixel(W, H):
    from runtime.grounding import to_pixels

    for x in range(0, W + 1, 7):
        for y in (0, H // 3, H - 1, H):
            g = synth.grid_box((x, y, x, y), W, H)
            assert all(0 <= v <= 999 for v in g)
            back = synth.pixel_box(g, W, H)
            assert abs(back[0] - x) <= 1 and abs(back[1] - y) <= 1, (x, y, g, back)
            # the runtime's mapping agrees (it also clamps into the image)
            rt = to_pixels(g, (W, H))
            assert abs(rt[0] - min(x, W - 1)) <= 1 and abs(rt[1] - min(y, H - 1)) <= 1


def test_grid_box_values():
    assert synth.grid_box((0, 0, 320, 640), 320, 640) == (0, 0, 999, 999)
    assert synth.grid_box((160, 160, 161, 321), 320, 640) == (500, 250, 503, 502)
    assert synth.format_box((5, 10, 500, 999)) == "(5,10),(500,999)"


def test_examples_and_answers():
    sc = synth.draw_scene(4)
    W, H = sc.image.size
    exs = synth.scene_examples(4)
    tasks = [e.task for e in exs]
    assert tasks.count("grounding") == 2 * len(sc.objects)
    assert tasks[-2:] == ["caption", "ocr"]
    for e in exs:
        assert e.image is exs[0].image
        if e.task == "grounding":
            o = e.truth["object"]
            phrase = f"the {o.color} {o.shape}"
            assert e.answer == f"<ref>{phrase}</ref><box>{synth.format_box(synth.grid_box(o.box, W, H))}</box>"
            assert e.prompt == ([("ref", phrase)] if e.form == "ref" else [f"Where is {phrase}?"])
        elif e.task == "ocr":
            assert e.prompt == [synth.OCR_PROMPT] and e.answer == sc.text
        else:
            assert e.answer == synth.caption(sc.objects, sc.text)
    assert {synth.make_example(s, "grounding").form for s in range(20)} == {"ref", "chat"}
    with pytest.raises(ValueError):
        synth.make_example(0, "vqa")


def test_caption_order_and_grammar():
    O = synth.SceneObject
    objs = [O("red", "circle", (300, 0, 400, 100)), O("orange", "star", (0, 0, 100, 100)),
            O("blue", "square", (150, 0, 250, 100))]
    assert synth.caption(objs) == "an orange star, a blue square and a red circle"
    assert synth.caption(objs[:1], "STOP") == "a red circle and a sign that says STOP"
    assert synth.caption(objs[:1]) == "a red circle"


def test_prompt_parts_build_runtime_prompts():
    from runtime.prompt import Ref, build_chat_ids
    from runtime.tokenizer import QwenTokenizer

    from models.nano_vocab import nano_ranks

    tok = QwenTokenizer.from_ranks(nano_ranks(256))
    e = synth.make_example(0, "grounding", form="ref")
    parts = synth.prompt_parts(e.prompt)
    assert parts == [Ref(e.truth["phrase"])]
    ids = build_chat_ids(tok, parts, n_images=1, n_slots=256)
    assert ids.count(tok.ref_start_id) == 1 and ids.count(tok.img_pad_id) == 256


def test_split_ranges_disjoint():
    ranges = sorted(synth.SPLITS.values())
    for (a0, a1), (b0, b1) in zip(ranges, ranges[1:]):
        assert a1 <= b0
    assert synth.split_seed("val", 0) == synth.SPLITS["val"][0]
    with pytest.raises(ValueError):
        synth.split_seed("train", synth.SPLITS["train"][1])


def test_single_object_curriculum_scenes():
    """``n_objects=1`` (the training curriculum) draws one shape; the default is unchanged."""
    seed = synth.split_seed("train", 7)
    one = synth.scene_examples(seed, n_objects=1)
    grounding = [e for e in one if e.task == "grounding"]
    assert len(grounding) == len(synth.GROUNDING_FORMS)
    assert len(grounding[0].truth["objects"]) == 1
    default = synth.scene_examples(seed)
    assert [e.answer for e in default] == [e.answer for e in synth.scene_examples(seed)]
    n = len(synth.draw_scene(seed).objects)
    assert sum(e.task == "grounding" for e in default) == n * len(synth.GROUNDING_FORMS)
