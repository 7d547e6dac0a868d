"""Shared fixtures: nano checkpoints are generated once per test session (seconds, not minutes)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

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
