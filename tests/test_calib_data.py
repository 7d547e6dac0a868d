"""calib_data: the manifest (build, load, hashes, disjoint splits, user data, clear errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from calib_data import build
from calib_data.manifest import (CalibItem, ManifestError, check_disjoint, file_sha256,
                                 load_manifest, materialise, pixel_sha256, skimage_data_dir,
                                 write_manifest)

COMMITTED = Path(__file__).resolve().parents[1] / "calib_data" / "manifest.jsonl"


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "manifest.jsonl"
    assert build.main(["--out", str(out), "--n-calib", "8", "--n-val", "8", "-q"]) == 0
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_build_counts_tasks_and_licences(small_manifest):
    items = load_manifest(small_manifest)
    assert len(items) == 16
    counts = items.counts()
    assert sum(counts["calib"].values()) == 8 and sum(counts["validation"].values()) == 8
    assert {"caption", "grounding", "ocr"} <= set(counts["validation"])
    header = _lines(small_manifest)[0]
    assert header["manifest"] == "qwenvl-edge-calib"
    assert header["created_with"]["pillow"] and header["created_with"]["freetype"]
    for it in items:
        assert it.licence and it.source and it.sha256
        if it.task == "grounding":
            assert it.ref or it.prompt
            assert it.truth["boxes"] and all(len(b["box"]) == 4 for b in it.truth["boxes"])
            assert "<ref>" not in it.prompt
        if it.task == "ocr" and it.kind == "generator":
            assert it.truth["text"] == it.answer
    assert any(it.kind == "skimage" for it in items)  # real photographs in both splits
    assert {it.split for it in items if it.kind == "skimage"} == {"calib", "validation"}


def test_splits_disjoint_and_hashes_match_images(small_manifest):
    items = load_manifest(small_manifest)
    cal = {it.sha256 for it in items.split("calib")}
    val = {it.sha256 for it in items.split("validation")}
    assert cal and val and not cal & val
    for it in items:  # independent recomputation from the materialised image / file
        img = materialise(it, verify=True)
        assert img.mode == "RGB"
        if it.kind == "generator":
            assert pixel_sha256(img) == it.sha256
            assert list(img.size) == list(it.size)
        else:
            assert file_sha256(skimage_data_dir() / it.image["skimage"]) == it.sha256


def test_committed_manifest_is_valid_and_small():
    assert COMMITTED.is_file(), "calib_data/manifest.jsonl is missing: python -m calib_data.build"
    assert COMMITTED.stat().st_size < 200_000  # recipes + hashes, never pixels
    items = load_manifest(COMMITTED)
    assert items.split("validation") and items.split("calib")


def test_photos_come_from_the_wheel_not_the_network(monkeypatch):
    import skimage.data._fetchers as fetchers

    def no_download(*a, **k):  # pragma: no cover - must not be called
        raise AssertionError("pooch download attempted")

    monkeypatch.setattr(fetchers, "_fetch", no_download, raising=False)
    items = build.photo_items()
    assert len({it.image["skimage"] for it in items}) >= 12
    it = next(i for i in items if i.image["skimage"] == "astronaut.png")
    assert materialise(it).size == (512, 512)


def test_check_disjoint_rejects_shared_image():
    a = CalibItem("a", {"generator": "grounding", "seed": 5}, "Describe the image.", split="calib",
                  sha256="1" * 64)
    b = CalibItem("b", {"generator": "grounding", "seed": 5}, "Where?", split="validation",
                  sha256="1" * 64)
    with pytest.raises(ManifestError, match="both splits"):
        check_disjoint([a, b])
    with pytest.raises(ManifestError, match="both splits"):
        write_manifest(Path("/nonexistent/never-written.jsonl"), [a, b])


def _photos(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(["red", "green", "blue", "white", "black"]):
        Image.new("RGB", (40 + i, 30), colour).save(d / f"img{i}.png")


def test_user_jsonl_paths_relative_to_the_file(tmp_path):
    _photos(tmp_path / "data" / "photos")
    jl = tmp_path / "data" / "mine.jsonl"
    rows = [{"image": "photos/img0.png", "prompt": "What colour is this?", "task": "vqa",
             "answer": "Red."},
            {"image": "photos/img1.png", "ref": "the green square", "task": "grounding",
             "truth": {"boxes": [{"ref": "the green square", "box": [0, 0, 41, 30]}]}},
            {"image": {"file": "photos/img2.png"}, "prompt": "Describe it.", "split": "val"},
            {"image": "photos/img3.png", "prompt": "Read the text.", "task": "ocr",
             "truth": {"text": "none"}, "split": "calib"}]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_manifest(jl)
    assert len(items) == 4
    assert all(it.sha256 == file_sha256(tmp_path / "data" / it.image["file"]) for it in items)
    assert items[2].split == "validation" and items[3].split == "calib"
    assert {it.split for it in items} <= {"calib", "validation"}
    assert items[1].ref == "the green square" and items[1].truth_boxes() == [(0, 0, 41, 30)]
    assert materialise(items[0]).getpixel((0, 0)) == (255, 0, 0)
    # every entry without a split: deterministic, both splits used
    items2 = load_manifest(jl)
    assert [i.split for i in items2] == [i.split for i in items]
    # all into one split on request
    assert {i.split for i in load_manifest(jl, default_split="validation")
            if i.id not in (items[3].id, items[2].id)} == {"validation"}


def test_user_folder_gets_caption_prompts_and_auto_split(tmp_path):
    _photos(tmp_path / "pics")
    items = load_manifest(tmp_path / "pics")
    assert len(items) == 5 and all(it.task == "caption" and it.prompt for it in items)
    assert {it.split for it in items} == {"calib", "validation"}
    check_disjoint(items)


def test_bad_entries_each_get_one_clear_line(tmp_path):
    _photos(tmp_path / "p")
    jl = tmp_path / "bad.jsonl"
    rows = [
        {"id": "ok", "image": "p/img0.png", "prompt": "Describe."},
        {"id": "missing", "image": "p/nope.png", "prompt": "Describe."},
        {"id": "task", "image": "p/img1.png", "prompt": "Describe.", "task": "dance"},
        {"id": "split", "image": "p/img2.png", "prompt": "Describe.", "split": "test"},
        {"id": "ok", "image": "p/img3.png", "prompt": "Describe."},
        {"id": "tags", "image": "p/img4.png", "prompt": "<ref>the cat</ref>", "task": "grounding"},
        {"id": "box", "image": "p/img4.png", "prompt": "x",
         "truth": {"boxes": [{"box": [5, 5, 1]}]}},
    ]
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(jl)
    msg = str(e.value)
    lines = msg.splitlines()[1:]
    assert len(lines) == 6, msg
    assert "bad.jsonl:2" in msg and "nope.png not found" in msg
    assert "bad.jsonl:3" in msg and "unknown task 'dance'" in msg
    assert "bad.jsonl:4" in msg and "bad split 'test'" in msg
    assert "bad.jsonl:5" in msg and "duplicate id 'ok'" in msg
    assert "bad.jsonl:6" in msg and "\"ref\"" in msg
    assert "bad.jsonl:7" in msg and "truth box 0" in msg
    # not JSON at all
    (tmp_path / "broken.jsonl").write_text('{"image": "p/img0.png"\n')
    with pytest.raises(ManifestError, match=r"broken.jsonl:1: not valid JSON"):
        load_manifest(tmp_path / "broken.jsonl")
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "absent.jsonl")


def test_changed_image_says_rebuild(tmp_path):
    _photos(tmp_path / "p")
    items = load_manifest(tmp_path / "p")
    m = write_manifest(tmp_path / "p" / "m.jsonl", items)
    assert load_manifest(m)  # unchanged: fine
    Image.new("RGB", (40, 30), "orange").save(tmp_path / "p" / "img0.png")
    with pytest.raises(ManifestError, match=r"img0.png.*changed since the manifest was written: "
                                            r"rebuild it"):
        load_manifest(m)


def test_generated_image_mismatch_names_the_pillow_versions(tmp_path, small_manifest):
    lines = _lines(small_manifest)
    header, item = lines[0], next(d for d in lines[1:] if "generator" in d["image"])
    header["created_with"]["pillow"] = "1.0.0"
    item["sha256"] = "0" * 64
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps(header) + "\n" + json.dumps(item) + "\n")
    with pytest.raises(ManifestError) as e:
        load_manifest(m)
    assert "changed since the manifest was written: rebuild it" in str(e.value)
    assert "Pillow 1.0.0" in str(e.value)


def test_materialise_caches_generated_images(tmp_path, small_manifest):
    it = next(i for i in load_manifest(small_manifest) if i.kind == "generator")
    a = materialise(it, cache_dir=tmp_path, verify=True)
    assert (tmp_path / f"{it.sha256}.png").is_file()
    b = materialise(it, cache_dir=tmp_path, verify=True)
    assert a.tobytes() == b.tobytes()
