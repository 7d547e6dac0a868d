"""A GPTQ-format Int4 checkpoint with round-to-nearest codes, for full-size benchmarks.

    python -m bench.rtn_checkpoint --checkpoint <full-size> --out <full-size-int4>
    python export.py --checkpoint <full-size-int4> --plan int4 --target cpu \\
        --skip-validation --no-demo --out <bundle>

GPTQ over the full-size decoder costs ~80 min on the CPU box; for sizes, memory and speed the codes'
values do not matter, only their layout. ``export.py`` recognises the result as an already
quantised checkpoint (``quantization_config`` in config.json, as Qwen-VL-Chat-Int4) and imports the
codes instead of running GPTQ. Streams one tensor at a time (``quant.checkpoint``); accuracy is
never judged on it. A source without ``qwen.tiktoken`` (``models.nano.write_random_checkpoint``
writes none) gets a stand-in with the full vocabulary's ids: the nano BPE padded with filler
tokens to the config's ``eod_id`` ranks, so that the Qwen special ids match the config and
``export.py`` and the runtime run (random weights answer noise either way).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from quant.plans import DEFAULT_GROUP_SIZE

    ap = argparse.ArgumentParser(prog="python -m bench.rtn_checkpoint",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--checkpoint", type=Path, required=True, help="bf16/fp16 source checkpoint")
    ap.add_argument("--out", type=Path, required=True, help="directory to write")
    ap.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                    help=f"int4 block size (default {DEFAULT_GROUP_SIZE})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s")

    from models.checkpoint import CheckpointReader
    from models.config import QwenVLConfig
    from quant.checkpoint import save_gptq_checkpoint
    from quant.fake_quant import RTNTensors
    from quant.gptq import QuantConfig

    cfg = QwenVLConfig.from_pretrained(args.checkpoint)
    reader = CheckpointReader(args.checkpoint)
    codes = RTNTensors(reader.get, cfg.num_hidden_layers, group_size=args.group_size, sym=True)
    save_gptq_checkpoint(args.checkpoint, codes, QuantConfig(group_size=args.group_size), args.out)
    if not (args.out / "qwen.tiktoken").is_file():
        stand_in_tokenizer(args.out / "qwen.tiktoken", cfg.eod_id)
    print(args.out)
    return 0


def stand_in_tokenizer(path: Path, n_bpe: int) -> Path:
    """A ``qwen.tiktoken`` of ``n_bpe`` ranks: the nano BPE, then unique filler tokens."""
    from models.nano_vocab import nano_ranks
    from runtime.tokenizer import write_tiktoken_file

    ranks = dict(nano_ranks())
    i = 0
    while len(ranks) < n_bpe:
        ranks.setdefault(b"\x00filler%d" % i, len(ranks))
        i += 1
    return write_tiktoken_file(ranks, path)


if __name__ == "__main__":
    sys.exit(main())
