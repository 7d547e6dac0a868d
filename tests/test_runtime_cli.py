"""``python -m runtime``: streaming to the terminal, --json, --draw, one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image


ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "runtime", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=str(ROOT), timeout=120)


def test_help():
    out = cli("--help")
    assert out.returncode == 0
    for flag in ("--bundle", "--image", "--prompt", "--draw", "--json", "--max-new-tokens",
                 "--ref", "--device"):
        assert flag in out.stdout


def test_streams_the_same_text_as_the_pipeline(fp32_bundle, images):
    from runtime import Pipeline

    out = cli("--bundle", fp32_bundle, "--image", images[0], "--prompt", "What is it?",
              "--max-new-tokens", 8, "--temperature", 0, "--threads", 1)
    assert out.returncode == 0, out.stderr
    ref = Pipeline.from_bundle(fp32_bundle, device="cpu", threads=1).chat(
        "What is it?", images=[images[0]], temperature=0, max_new_tokens=8).result()
    assert out.stdout == ref.text + "\n"


def test_json_and_draw(fp32_bundle, images, tmp_path, capsys):
    from runtime.__main__ import main

    png = tmp_path / "boxes.png"
    rc = main(["--bundle", str(fp32_bundle), "--image", str(images[0]), "--image", str(images[1]),
               "--prompt", "Find it:", "--ref", "the red square", "--max-new-tokens", "6",
               "--temperature", "0", "--json", "--draw", str(png), "--threads", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rec = json.loads(cap.out)
    assert set(rec) >= {"text", "token_ids", "boxes", "timings", "finish_reason", "drawn"}
    assert rec["image_sizes"] == [list(Image.open(p).size) for p in images[:2]]
    assert rec["drawn"] == str(png)
    assert Image.open(png).size == Image.open(images[1]).size  # drawn on the last image


def test_errors_are_one_line_and_exit_2(fp32_bundle, images, tmp_path, capsys):
    from runtime.__main__ import main

    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    cases = [
        (["--bundle", str(tmp_path / "none"), "--prompt", "x"], "bundle directory not found"),
        (["--bundle", str(fp32_bundle), "--image", str(notes), "--prompt", "x"], "not an image"),
        (["--bundle", str(fp32_bundle), "--prompt", "word " * 2500], "over the model's context"),
        (["--bundle", str(fp32_bundle)], "nothing to ask"),
        (["--bundle", str(fp32_bundle), "--prompt", "x", "--draw", "o.png"], "--draw needs"),
        (["--bundle", str(fp32_bundle), "--prompt", "x", "--top-p", "2"], "top_p must be"),
    ]
    for argv, msg in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    out = cli("--bundle", fp32_bundle, "--image", tmp_path / "missing.png", "--prompt", "x")
    assert out.returncode == 2 and out.stderr.strip().startswith("error: image file not found")


def test_typed_ref_tags_equal_the_ref_flag(fp32_bundle, images, capsys):
    """``--prompt "<ref>..</ref>"`` (the original model's habit) is the same prompt as ``--ref``."""
    from runtime.__main__ import main

    common = ["--bundle", str(fp32_bundle), "--image", str(images[0]), "--max-new-tokens", "6",
              "--temperature", "0", "--json", "--threads", "1"]
    recs = []
    for query in (["--prompt", "<ref>the red square</ref>"], ["--ref", "the red square"]):
        rc = main(common + query)
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        recs.append(json.loads(cap.out))
    typed, flag = recs
    assert typed["prompt_tokens"] == flag["prompt_tokens"]
    assert typed["token_ids"] == flag["token_ids"] and typed["text"] == flag["text"]
