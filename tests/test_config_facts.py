"""Token ids and the image-slot count come from the config / tokenizer, not from literals."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from models.config import (DEFAULT_N_QUERIES, IMG_START_INDEX, N_SPECIAL_TOKENS, QwenVLConfig,
                           VisualConfig)
from runtime.prompt import N_SLOTS
from runtime.tokenizer import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "models", "quant", "exporters", "validate", "calib_data", "bench")


def test_config_special_facts_follow_the_tokenizer():
    assert IMG_START_INDEX == SPECIAL_TOKENS.index("<img>")
    assert N_SPECIAL_TOKENS == len(SPECIAL_TOKENS)
    cfg = QwenVLConfig()  # the published Qwen-VL-Chat
    assert (cfg.eod_id, cfg.image_start_id, cfg.n_vocab) == (151643, 151857, 151860)
    assert N_SLOTS == DEFAULT_N_QUERIES == VisualConfig().n_queries == 256


def test_nano_ids_agree_with_its_tokenizer():
    from models.nano import default_checkpoint
    from runtime.tokenizer import QwenTokenizer

    ckpt = default_checkpoint()
    cfg, tok = QwenVLConfig.from_pretrained(ckpt), QwenTokenizer.from_dir(ckpt)
    assert (cfg.eod_id, cfg.image_start_id, cfg.n_vocab) == (tok.eod_id, tok.img_start_id,
                                                             tok.n_vocab)


def test_no_token_id_literals_outside_the_config():
    """151643 / 151857 live in models/config.py only (as the published defaults)."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in (151643, 151857):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    outside = [f for f in found if not f.startswith("models/config.py:")]
    assert found and not outside, outside


def test_config_imports_without_torch():
    """Benchmarks read config facts in processes whose memory they measure: no torch there."""
    code = "import sys, models.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
