"""`--out` never destroys what the toolkit did not write (issue 18, item 1).

Every refusal happens before any work (no stage runs), is one line and exits 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import export
from exporters import pipeline
from exporters.pipeline import ExportOptions

MODEL = {"model": {**{k: 1 for k in ("vocab_size", "n_queries", "image_size", "hidden", "layers",
                                     "heads", "head_dim", "max_context")}, "special_ids": {}}}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any stage starts: refusals must come before any work."""
    def boom(*a, **k):
        raise AssertionError("a stage ran although --out should have been refused")

    monkeypatch.setattr(pipeline, "run_stage", boom)


def _refused(capsys, argv: list[str]) -> str:
    code = export.main(["--no-demo", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_user_directory_is_refused_and_kept(tmp_path, capsys, no_work):
    v = tmp_path / "v"
    v.mkdir()
    (v / "thesis.txt").write_text("hi")
    err = _refused(capsys, ["--out", str(v)])
    assert "not a bundle" in err and "--out" in err
    assert (v / "thesis.txt").read_text() == "hi"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no work dir, no temp dirs
    # --overwrite does not make a user directory replaceable
    _refused(capsys, ["--out", str(v), "--overwrite"])
    assert (v / "thesis.txt").read_text() == "hi"


def test_plain_file_is_refused_and_kept(tmp_path, capsys, no_work):
    f = tmp_path / "some_file"
    f.write_text("data")
    err = _refused(capsys, ["--out", str(f)])
    assert "is a file" in err
    assert f.read_text() == "data" and sorted(p.name for p in tmp_path.iterdir()) == ["some_file"]


def test_symlink_out_is_refused(tmp_path, capsys, no_work):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    _refused(capsys, ["--out", str(tmp_path / "link")])


def test_unwritable_out_is_refused_before_work(tmp_path, capsys, no_work):
    err = _refused(capsys, ["--out", "/sys/qwenvl-edge-test/bundle"])
    assert "cannot be written" in err
    parent = tmp_path / "ro"
    parent.mkdir()
    (parent / "x").write_text("")
    err = _refused(capsys, ["--out", str(parent / "x" / "bundle")])  # parent is a file
    assert "not a directory" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_is_refused(tmp_path, capsys, no_work):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        err = _refused(capsys, ["--out", str(parent / "bundle")])
    finally:
        parent.chmod(0o700)
    assert "cannot be written" in err


def _bundle(tmp_path: Path, out: Path, source: dict | None, extra=None, **kw) -> Path:
    from exporters.bundle import write_bundle

    src = tmp_path / "a.bin"
    src.write_bytes(b"abc")
    fields = {**MODEL, **({"source": source} if source else {}), **(extra or {})}
    return write_bundle(out, {"a.bin": src}, fields, **kw)


def test_toolkit_bundle_replaced_only_from_same_source_or_with_overwrite(tmp_path):
    from exporters.bundle import check_out_dir
    from runtime.bundle import BundleError

    one = {"checkpoint": "ckpt-a", "index_sha256": "1" * 64}
    two = {"checkpoint": "ckpt-b", "index_sha256": "2" * 64}
    out = _bundle(tmp_path, tmp_path / "b", one)
    assert json.loads((out / "manifest.json").read_text())["toolkit"] == "qwenvl-edge"
    check_out_dir(out, one)  # same source: allowed
    _bundle(tmp_path, out, one)
    with pytest.raises(BundleError, match="another checkpoint .*--overwrite"):
        check_out_dir(out, two)
    with pytest.raises(BundleError, match="another checkpoint"):
        _bundle(tmp_path, out, two)
    assert json.loads((out / "manifest.json").read_text())["source"] == one
    check_out_dir(out, two, overwrite=True)
    _bundle(tmp_path, out, two, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["source"] == two
    # a user file dropped into a bundle makes it irreplaceable, even with --overwrite
    (out / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="notes.txt, which qwenvl-edge did not write"):
        check_out_dir(out, two, overwrite=True)
    with pytest.raises(BundleError, match="notes.txt"):
        _bundle(tmp_path, out, two, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    # a manifest.json someone else wrote is not ours
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"files": {}, "name": "my app"}))
    with pytest.raises(BundleError, match="not a bundle written by qwenvl-edge"):
        check_out_dir(other, two, overwrite=True)


def test_atomic_dir_never_replaces_foreign_content(tmp_path):
    from models.checkpoint import atomic_dir, save_checkpoint

    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with atomic_dir(tmp_path / "f"):
            pass
    d = tmp_path / "d"
    d.mkdir()
    (d / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError, match="did not write"):
        with atomic_dir(d):
            pass
    with pytest.raises(FileExistsError, match="not a checkpoint"):
        save_checkpoint({}, None, d)  # type: ignore[arg-type] - refused before cfg is used
    assert (d / "mine.txt").read_text() == "x" and (tmp_path / "f").read_text() == "x"


def test_crash_leftovers_are_cleaned_and_nothing_else(tmp_path):
    out = tmp_path / "bundle"
    work = tmp_path / "bundle.work"
    dead = 2 ** 22 + 12345  # above pid_max's default: no such process
    left = [tmp_path / f".bundle.tmp-{dead}-abc123", tmp_path / f".bundle.old-{dead}",
            work / f".vision.tmp-{dead}-x1", work / f".validate.tmp-{dead}-y_2",
            work / f".decoder.old-{dead}"]
    live = [tmp_path / f".bundle.tmp-{os.getpid()}-zz"]  # a concurrent writer's: kept
    keep = [tmp_path / ".bundle.tmpfoo", tmp_path / "my.tmp-1", work / "images",
            work / ".mine.tmp-1-a", tmp_path / ".other.tmp-1-a"]
    for p in left + live + keep:
        p.mkdir(parents=True)
        (p / "f").write_text("x")
    opts = ExportOptions(out=out)
    pipeline.check_out(opts, pipeline.resolve_checkpoint(None))
    assert not [p for p in left if p.exists()]
    assert all(p.exists() for p in live + keep)
    for p in live + keep:
        (p / "f").unlink()
        p.rmdir()
    # an empty work dir left by a failed run is removed too
    pipeline.check_out(opts, pipeline.resolve_checkpoint(None))
    assert not work.exists()


def test_foreign_folder_in_the_work_dir_is_refused_before_work(tmp_path, capsys, no_work):
    work = tmp_path / "b.work"
    (work / "vision").mkdir(parents=True)
    (work / "vision" / "mine.txt").write_text("x")
    err = _refused(capsys, ["--out", str(tmp_path / "b")])
    assert "vision is not a stage folder" in err
    (work / "vision" / "mine.txt").unlink()
    (work / "vision").rmdir()
    (work / "quant").write_text("x")
    err = _refused(capsys, ["--out", str(tmp_path / "b")])
    assert "quant is a file" in err and (work / "quant").read_text() == "x"


def test_bundle_written_before_the_toolkit_marker_is_still_ours(tmp_path):
    from exporters.bundle import check_out_dir
    from runtime.bundle import BundleError

    one = {"checkpoint": "ckpt-a", "index_sha256": "1" * 64}
    out = _bundle(tmp_path, tmp_path / "b", one)
    d = json.loads((out / "manifest.json").read_text())
    del d["toolkit"]  # the layout of bundles exported before this marker existed
    (out / "manifest.json").write_text(json.dumps(d))
    check_out_dir(out, one)
    with pytest.raises(BundleError, match="another checkpoint"):
        check_out_dir(out, {"checkpoint": "ckpt-b", "index_sha256": "2" * 64})
