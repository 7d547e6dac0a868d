"""onnxruntime-genai's int4 model of the same decoder: the baseline of ``bench.decoder``.

onnxruntime-genai's model builder does not know Qwen-VL (``QWenLMHeadModel``, remote code), but
the Qwen-VL decoder is exactly a Qwen2 decoder with ``num_key_value_heads == num_attention_heads``
(RMSNorm, q/k/v bias, SwiGLU, RoPE base 10000, untied head), so the baseline is the builder's
own Qwen2 path on the *same weights*, renamed:

    c_attn -> q_proj/k_proj/v_proj (split rows)   attn.c_proj -> o_proj
    mlp.w2 -> gate_proj   mlp.w1 -> up_proj        mlp.c_proj  -> down_proj
    ln_1/ln_2/ln_f -> input_layernorm/post_attention_layernorm/norm   wte -> embed_tokens

Runs in a side virtual environment (``onnxruntime-genai``, ``transformers``, ``torch``; none of
them is a project dependency; the 0.18 builder also imports ``onnx_ir``)::

    python -m venv <venv>
    <venv>/bin/pip install -c constraints.txt torch onnxruntime-genai==0.18.0 transformers onnx-ir onnxscript safetensors
    G=<venv>/bin/python
    $G -m bench.genai_baseline convert --checkpoint <checkpoint> --out <qwen2> --layers 2 --vocab 8192
    $G -m bench.genai_baseline build --hf <qwen2> --out <genai-L2>
    $G -m bench.genai_expand --model <genai-L2> --out <genai-L32> --layers 32 --vocab 151936 --check
    $G -m bench.genai_baseline time --model <genai-L32> --threads 2 --prompt-tokens 288 --new-tokens 128

The builder loads the whole model through transformers (15 GB for two full-width layers), so it
builds a few layers and a small vocabulary and ``bench.genai_expand`` grows its graph to the
full depth and vocabulary (``bench.decoder --genai-python`` does all of this). ``build`` asks the
builder for what our int4 plan does: int4 block 128 symmetric, int8 LM head, accuracy level 4
on CPU. ``time`` writes the thread count into ``genai_config.json`` (onnxruntime-genai 0.18 runs
on one thread when it finds none there) and prints one JSON record: prefill, per-token decode,
threads, CPU utilisation (process CPU time / wall time), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from models.config import QwenVLConfig
from runtime.errors import cli_main
from runtime.files import atomic_dir

log = logging.getLogger("bench.genai_baseline")


def qwen2_name(name: str) -> list[tuple[str, slice | None]]:
    """Qwen2 tensor name(s) of a Qwen-VL decoder tensor (with the row slice for c_attn);
    [] for vision tensors."""
    if name.startswith("transformer.visual."):
        return []
    fixed = {"transformer.wte.weight": "model.embed_tokens.weight",
             "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
    if name in fixed:
        return [(fixed[name], None)]
    _, _, i, rest = name.split(".", 3)
    pre = f"model.layers.{i}."
    if rest.startswith("attn.c_attn."):
        kind = rest.rsplit(".", 1)[1]
        return [(f"{pre}self_attn.{p}_proj.{kind}", None) for p in "qkv"]  # split by the caller
    simple = {"attn.c_proj.weight": "self_attn.o_proj.weight",
              "mlp.w2.weight": "mlp.gate_proj.weight", "mlp.w1.weight": "mlp.up_proj.weight",
              "mlp.c_proj.weight": "mlp.down_proj.weight", "ln_1.weight": "input_layernorm.weight",
              "ln_2.weight": "post_attention_layernorm.weight"}
    return [(pre + simple[rest], None)]


def qwen2_config(cfg: dict, layers: int | None = None, vocab: int | None = None) -> dict:
    """Qwen2 ``config.json`` of a Qwen-VL ``config.json`` (``vocab``: keep the first rows)."""
    vocab = min(vocab or cfg["vocab_size"], cfg["vocab_size"])
    # <|endoftext|>, or the last kept row when the build keeps fewer rows than that id
    eos = min(QwenVLConfig.from_dict(cfg).eod_id, vocab - 1)
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": cfg["hidden_size"], "intermediate_size": cfg["intermediate_size"] // 2,
        "num_hidden_layers": layers or cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_attention_heads"], "vocab_size": vocab,
        "max_position_embeddings": cfg.get("max_position_embeddings", 8192),
        "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-6),
        "rope_theta": cfg.get("rotary_emb_base", 10000.0), "tie_word_embeddings": False,
        "hidden_act": "silu", "use_sliding_window": False, "attention_dropout": 0.0,
        "torch_dtype": "bfloat16", "bos_token_id": eos, "eos_token_id": eos,
    }


def write_tokenizer(out: Path) -> None:
    """A placeholder tokenizer: the builder insists on loading one, the benchmark feeds ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|endoftext|>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "unk_token": "<unk>", "model_max_length": 8192}))


def _convert_shards(checkpoint: Path, shards: list[str], keep: int, vocab: int | None,
                    dest: Path) -> dict[str, str]:
    """Qwen2 shards of the first ``keep`` blocks (and ``vocab`` rows) in ``dest``; returns the
    weight map."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards):
        part: dict[str, torch.Tensor] = {}
        with safe_open(str(checkpoint / shard), "pt") as f:
            for name in f.keys():
                targets = qwen2_name(name)
                if not targets or (name.startswith("transformer.h.") and
                                   int(name.split(".")[2]) >= keep):
                    continue
                t = f.get_tensor(name).to(torch.bfloat16)
                if vocab and name in ("transformer.wte.weight", "lm_head.weight"):
                    t = t[:vocab].contiguous()
                if len(targets) == 3:
                    for (tn, _), piece in zip(targets, t.chunk(3, dim=0)):
                        part[tn] = piece.contiguous()
                else:
                    part[targets[0][0]] = t
        if part:
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(part, str(dest / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        log.info("converted %s (%d tensors)", shard, len(part))
    return weight_map


def convert(checkpoint: Path, out: Path, layers: int | None = None,
            vocab: int | None = None) -> Path:
    """Write the decoder of a Qwen-VL checkpoint as a Qwen2 checkpoint (bf16, one shard per
    source shard), atomically; ``layers`` keeps only the first N blocks, ``vocab`` the first rows
    of the embedding and LM head (``bench.genai_expand`` grows both back after the build)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    index = checkpoint / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    with atomic_dir(out) as tmp:
        weight_map = _convert_shards(checkpoint, shards, layers or cfg["num_hidden_layers"], vocab,
                                     tmp)
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
        qcfg = qwen2_config(cfg, layers, vocab)
        (tmp / "config.json").write_text(json.dumps(qcfg, indent=1))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": qcfg["eos_token_id"]}))
        write_tokenizer(tmp)
    return out


def build(hf: Path, out: Path, cache: Path, ep: str = "cpu", prune_lm_head: bool = False) -> Path:
    """The builder's int4 model with our int4 plan's choices (block 128, symmetric, int8 head,
    accuracy level 4 on CPU); ``prune_lm_head``: the builder's option that computes the prefill's
    logits for the last position only (off by default in the builder)."""
    opts = ["block_size=128", "is_symmetric=true", "matmul_mixed_precision=last_matmul:int8",
            "hf_remote=false", "hf_token=false"]
    if ep == "cpu":
        opts.append("accuracy_level=4")
    if prune_lm_head:
        opts.append("prune_lm_head=true")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", "int4", "-e", ep, "-c", str(cache), "--extra_options", *opts]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    return out


def set_threads(model: Path, threads: int) -> None:
    """Write ``threads`` into the model's ``genai_config.json`` (atomically): with no
    ``intra_op_num_threads`` there, onnxruntime-genai 0.18 runs on one thread."""
    cfg_path = model / "genai_config.json"
    gcfg = json.loads(cfg_path.read_text())
    opts = gcfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    tmp = cfg_path.with_name(cfg_path.name + ".tmp")
    tmp.write_text(json.dumps(gcfg, indent=4))
    os.replace(tmp, cfg_path)


def time_model(model: Path, prompt_tokens: int, new_tokens: int, threads: int,
               seed: int = 0) -> dict:
    """Prefill ``prompt_tokens`` random ids, then greedily decode ``new_tokens`` on ``threads``
    intra-op threads; per-step wall times as the generator loop sees them, and CPU time / wall
    time of each phase (about ``threads`` when every thread is busy)."""
    import numpy as np
    import onnxruntime_genai as og

    from bench.common import peak_rss_mib, stats

    set_threads(model, threads)
    t = time.perf_counter()
    m = og.Model(str(model))
    load_s = time.perf_counter() - t
    vocab = json.loads((model / "genai_config.json").read_text())["model"]["vocab_size"]
    # text ids below <|endoftext|> of the full vocabulary
    ids = np.random.default_rng(seed).integers(2, min(vocab, QwenVLConfig().eod_id), prompt_tokens)
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=prompt_tokens + new_tokens, do_sample=False,
                              min_length=prompt_tokens + new_tokens)
    gen = og.Generator(m, params)
    t, c = time.perf_counter(), time.process_time()
    gen.append_tokens(ids.astype(np.int32))
    prefill_s, prefill_cpu = time.perf_counter() - t, time.process_time() - c
    steps = []
    c0 = time.process_time()
    while not gen.is_done() and len(steps) < new_tokens:
        t = time.perf_counter()
        gen.generate_next_token()
        steps.append(time.perf_counter() - t)
    decode_cpu = time.process_time() - c0
    finite = bool(np.isfinite(gen.get_logits()).all())
    decode = stats(steps[1:] if len(steps) > 1 else steps)
    return {"engine": "onnxruntime-genai", "version": og.__version__, "model": str(model),
            "threads": threads, "prompt_tokens": prompt_tokens, "new_tokens": len(steps),
            "session_load_s": round(load_s, 2), "prefill_s": round(prefill_s, 3),
            "decode": decode, "tok_s": round(1000 / decode["median_ms"], 3),
            "cpu_util": {"prefill": round(prefill_cpu / prefill_s, 2),
                         "decode": round(decode_cpu / max(sum(steps), 1e-9), 2)},
            "logits_finite": finite, "peak_rss_mib": peak_rss_mib()}


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.genai_baseline",
                                 description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="Qwen-VL checkpoint -> Qwen2 checkpoint of its decoder")
    c.add_argument("--checkpoint", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--layers", type=int, help="keep only the first N decoder blocks")
    c.add_argument("--vocab", type=int, help="keep only the first N rows of embedding and head")
    b = sub.add_parser("build", help="run onnxruntime-genai's builder (int4) on it")
    b.add_argument("--hf", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--cache", type=Path, default=Path(".cache/genai-builder"))
    b.add_argument("--ep", default="cpu", choices=("cpu", "cuda"))
    b.add_argument("--prune-lm-head", action="store_true",
                   help="the builder's prune_lm_head: prefill logits of the last position only")
    t = sub.add_parser("time", help="time prefill + greedy decode; prints one JSON record")
    t.add_argument("--model", type=Path, required=True)
    t.add_argument("--prompt-tokens", type=int, default=288)
    t.add_argument("--new-tokens", type=int, default=128)
    t.add_argument("--threads", type=int, default=0,
                   help="intra-op threads, written into genai_config.json (0: every core)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.cmd == "convert":
        convert(args.checkpoint, args.out, args.layers, args.vocab)
    elif args.cmd == "build":
        build(args.hf, args.out, args.cache, args.ep, args.prune_lm_head)
    else:
        print(json.dumps(time_model(args.model, args.prompt_tokens, args.new_tokens,
                                    args.threads or os.cpu_count() or 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
