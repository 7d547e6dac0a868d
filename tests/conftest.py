"""Shared fixtures: nano checkpoints, a tokenizer and bundles are made once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

logging.getLogger("onnxscript").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def nano_ckpt(tmp_path_factory) -> Path:
    """Default tiny nano checkpoint (bf16 on disk, like the real bf16 repos)."""
    from models.nano import make_nano_checkpoint

    return make_nano_checkpoint(tmp_path_factory.mktemp("ckpt") / "nano", seed=0)


@pytest.fixture(scope="session")
def nano_model(nano_ckpt):
    from models.checkpoint import load_model

    return load_model(nano_ckpt, "fp32")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: torch's intra-op threads only add synchronisation (slow on a busy box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The runtime tokenizer on the nano vocabulary (nano BPE + Qwen's special tokens)."""
    from models.nano_vocab import nano_ranks
    from runtime.tokenizer import QwenTokenizer, write_tiktoken_file

    d = tmp_path_factory.mktemp("tok")
    write_tiktoken_file(nano_ranks(), d / "qwen.tiktoken")
    return QwenTokenizer.from_dir(d)


def shared_bundle(tmp_path_factory, name, nano_ckpt, nano_model, **kwargs) -> Path:
    """A bundle of the nano checkpoint built once per session under ``name`` (reused after)."""
    from exporters.pipeline import build_bundle

    base = tmp_path_factory.getbasetemp() / "runtime-bundles"
    out = base / name
    if (out / "manifest.json").is_file():
        return out
    base.mkdir(parents=True, exist_ok=True)
    if name != "fp32":
        kwargs.setdefault("vision_onnx", shared_bundle(tmp_path_factory, "fp32", nano_ckpt,
                                                       nano_model) / "vision.onnx")
    return build_bundle(nano_ckpt, out, model=nano_model, **kwargs)


@pytest.fixture(scope="session")
def fp32_bundle(tmp_path_factory, nano_ckpt, nano_model) -> Path:
    return shared_bundle(tmp_path_factory, "fp32", nano_ckpt, nano_model)


@pytest.fixture(scope="session")
def pipe(fp32_bundle):
    """The runtime Pipeline on the fp32 nano bundle (CPU, one thread)."""
    from runtime import Pipeline

    return Pipeline.from_bundle(fp32_bundle, device="cpu", threads=1)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Two synthetic photos of different sizes (files), with shapes drawn on them."""
    from PIL import ImageDraw

    d = tmp_path_factory.mktemp("rt-images")
    out = []
    for i, (w, h) in enumerate(((80, 60), (45, 70))):
        img = Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8))
        ImageDraw.Draw(img).rectangle((5, 5, w // 2, h // 2), fill=(200, 30 * i, 40))
        p = d / f"img{i}.png"
        img.save(p)
        out.append(p)
    return out


def image_prompt_inputs(model, n_items: int, seed: int = 0, vocab_hi: int = 500) -> list:
    """Block-0 inputs of image prompts (random features stand in for the ViT: speed)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_items):
        text = torch.randint(0, vocab_hi, (30 + 5 * i,), generator=g)
        ids = torch.cat([text[:10], torch.tensor([cfg.image_start_id]),
                         torch.full((cfg.visual.n_queries,), cfg.image_pad_id),
                         torch.tensor([cfg.image_end_id]), text[10:]])[None]
        feats = torch.randn(1, cfg.visual.n_queries, cfg.hidden_size, generator=g)
        with torch.no_grad():
            out.append(model.embed(ids, feats))
    return out


def bundle_variant(src: Path, dst: Path, engine: str, edit) -> Path:
    """A copy of bundle ``src`` whose ``engine``.onnx initializers were changed by ``edit``
    (the fault-injection tests of test_validate and test_drift_faults)."""
    import onnx
    from onnx import numpy_helper

    from exporters.bundle import read_manifest, write_bundle

    work = dst.parent / f".{dst.name}-work"
    work.mkdir(parents=True)
    m = onnx.load(str(src / f"{engine}.onnx"))  # loads external data too
    inits = {i.name: i for i in m.graph.initializer}
    changed = edit({n: numpy_helper.to_array(i) for n, i in inits.items()})
    assert changed, "the fault changed nothing"
    for name, arr in changed.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
    onnx.save(m, str(work / f"{engine}.onnx"))  # nano: one small file
    other = "decoder" if engine == "vision" else "vision"
    man = read_manifest(src).data
    fields = {k: v for k, v in man.items()
              if k not in ("format_version", "created", "versions", "files", "engines")}
    return write_bundle(dst, {f"{engine}.onnx": work / f"{engine}.onnx",
                              f"{other}.onnx": src / f"{other}.onnx",
                              "tokenizer/qwen.tiktoken": src / "tokenizer" / "qwen.tiktoken"},
                        fields)
