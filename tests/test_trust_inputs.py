"""Bad inputs are named before hours of work (issue 18, item 4): NaN/Inf weights, incomplete or
mistyped config.json, bytes prompts, a single image passed as `images`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import export


def _ckpt_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _poison(ckpt: Path, name: str, nan: int, inf: int) -> None:
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = ckpt / index[name]
    sd = load_file(str(shard))
    flat = sd[name].view(-1)
    flat[:nan] = float("nan")
    flat[nan:nan + inf] = float("inf")
    save_file(sd, str(shard), metadata={"format": "pt"})


def test_nan_weight_is_named_before_gptq(nano_ckpt, tmp_path, capsys, monkeypatch):
    import quant.gptq

    def boom(*a, **k):
        raise AssertionError("GPTQ started on a checkpoint with NaN weights")

    monkeypatch.setattr(quant.gptq, "quantize_decoder", boom)
    ckpt = _ckpt_copy(nano_ckpt, tmp_path / "ckpt")
    _poison(ckpt, "transformer.h.1.mlp.c_proj.weight", nan=3, inf=1)
    code = export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--no-demo",
                        "--n-calib", "2", "--n-val", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "transformer.h.1.mlp.c_proj.weight" in err[0] and "contains NaN/Inf (3 NaN, 1 Inf of" in err[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, field", [(["--group-size", "7"], "group_size=7"),
                                         (["--group-size", "256"], "does not divide")])
def test_gptq_settings_are_refused_before_calibration(nano_ckpt, tmp_path, capsys, monkeypatch,
                                                      args, field):
    """A group size MatMulNBits cannot run (or one not dividing the model's widths) used to be
    refused only when GPTQ started, after the calibration pass through the whole model."""
    from exporters import pipeline

    def boom(*a, **k):
        raise AssertionError("work started before the GPTQ settings were checked")

    monkeypatch.setattr(pipeline, "_load_items", boom)
    code = export.main(["--checkpoint", str(nano_ckpt), "--out", str(tmp_path / "b"),
                        "--no-demo", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0], err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.work").exists()


@pytest.mark.parametrize("extra", [["--plan-only"], []])
@pytest.mark.parametrize("context", ["100000", "0"])
def test_context_beyond_the_model_is_refused(nano_ckpt, tmp_path, capsys, monkeypatch, extra,
                                             context):
    """``--context 100000`` was reported as "does not fit desktop ... pass --force", and --force
    built a bundle for a context the model cannot address."""
    from exporters import pipeline

    monkeypatch.setattr(pipeline, "_load_items", lambda *a: pytest.fail("work started"))
    code = export.main(["--checkpoint", str(nano_ckpt), "--out", str(tmp_path / "b"),
                        "--no-demo", "--context", context, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "2048" in err[0] and context in err[0], err


def test_manifest_without_validation_items_is_refused_before_gptq(nano_ckpt, tmp_path, capsys,
                                                                  monkeypatch):
    """It used to be refused by the drift report, after GPTQ and both engine exports."""
    from exporters import pipeline

    monkeypatch.setattr(pipeline, "_quantize", lambda *a: pytest.fail("GPTQ started"))
    root = Path(__file__).resolve().parents[1] / "calib_data" / "manifest.jsonl"
    lines = root.read_text().splitlines()
    calib_only = tmp_path / "calib_data" / "manifest.jsonl"  # beside the shipped one's images
    calib_only.parent.mkdir()
    calib_only.write_text("\n".join([lines[0]] + [ln for ln in lines[1:]
                                                  if json.loads(ln)["split"] == "calib"]))
    code = export.main(["--checkpoint", str(nano_ckpt), "--out", str(tmp_path / "b"),
                        "--no-demo", "--calib", str(calib_only), "--n-calib", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no 'validation' items" in err[0], err
    with pytest.raises(SystemExit):  # and a negative count is not a Python slice
        export.main(["--n-val", "-1", "--out", str(tmp_path / "b")])
    assert "--n-val: must be at least 1" in capsys.readouterr().err


def test_reader_names_non_finite_tensors(nano_ckpt, tmp_path):
    from models.checkpoint import CheckpointError, CheckpointReader, check_finite, load_model

    ckpt = _ckpt_copy(nano_ckpt, tmp_path / "ckpt")
    _poison(ckpt, "transformer.wte.weight", nan=0, inf=2)
    with pytest.raises(CheckpointError, match=r"transformer\.wte\.weight contains NaN/Inf \(0 NaN, 2 Inf of \d+ values in model"):
        load_model(ckpt)
    assert torch.isfinite(CheckpointReader(ckpt).get("transformer.ln_f.weight")).all()
    check_finite("big", torch.full((4,), 3e38))  # the sum overflows, the values are finite
    check_finite("ids", torch.tensor([1, 2]))


def _config_copy(nano_ckpt: Path, dst: Path, edit) -> Path:
    ckpt = _ckpt_copy(nano_ckpt, dst)
    d = json.loads((ckpt / "config.json").read_text())
    edit(d)
    (ckpt / "config.json").write_text(json.dumps(d))
    return ckpt


CONFIG_CASES = {
    "missing-heads": (lambda d: d.pop("num_attention_heads"), r"lacks num_attention_heads"),
    "missing-visual-width": (lambda d: d["visual"].pop("width"), r"lacks visual\.width"),
    "heads-string": (lambda d: d.update(num_attention_heads="4"),
                     r"num_attention_heads must be a positive integer, not '4'"),
    "layers-zero": (lambda d: d.update(num_hidden_layers=0),
                    r"num_hidden_layers must be a positive integer, not 0"),
    "eps-string": (lambda d: d.update(layer_norm_epsilon="1e-6"),
                   r"layer_norm_epsilon must be a number"),
    "visual-patch-float": (lambda d: d["visual"].update(patch_size=14.0),
                           r"visual\.patch_size must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_field_is_named(nano_ckpt, tmp_path, capsys, case):
    edit, pattern = CONFIG_CASES[case]
    ckpt = _config_copy(nano_ckpt, tmp_path / "ckpt", edit)
    code = export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--no-demo"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    import re
    assert re.search(pattern, err[0]), err[0]


def test_chat_refuses_bytes_prompt_and_single_image(fp32_bundle, tmp_path):
    from PIL import Image

    from runtime import Pipeline
    from runtime.prompt import PromptError

    pipe = Pipeline.from_bundle(fp32_bundle, device="cpu", threads=1)
    with pytest.raises(PromptError, match="prompt is bytes, not text: decode it first"):
        pipe.chat(b"What is this?")
    p = tmp_path / "path.png"
    Image.new("RGB", (8, 8)).save(p)
    with pytest.raises(PromptError, match=r"images must be a list of images, got one str.*"
                                          r"images=\['.*path.png'\]"):
        pipe.chat("What is this?", images=str(p))
    with pytest.raises(PromptError, match="got one PosixPath|got one WindowsPath"):
        pipe.chat("What is this?", images=p)
    with pytest.raises(PromptError, match="got one"):
        pipe.chat("What is this?", images=Image.new("RGB", (8, 8)))
    with pytest.raises(PromptError, match="got int"):
        pipe.chat("What is this?", images=3)
