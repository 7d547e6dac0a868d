"""Shared fixtures: nano checkpoints are generated once per test session (seconds, not minutes)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

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
