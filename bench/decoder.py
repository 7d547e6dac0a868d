"""Batch-1 int4 decode: our engine vs onnxruntime-genai's int4 model of the same decoder vs our
PyTorch eager reference, same shapes, same thread count, same run, each as a fraction of the
memory bandwidth ceiling measured in the same run. Prints one JSON record.

    python -m bench.decoder                                   # nano smoke run (seconds)
    python -m bench.decoder --checkpoint <full-size> --work <work> --genai-python <venv>/bin/python \\
        --threads 2 --rounds 3 --profile

What runs, each contender in its own process (so peak memory is its own), all with the same
explicit ``--threads`` (default: every core), recorded with each run's CPU utilisation (process
CPU time / wall time: about the thread count when every thread works, ~1 when a run silently
fell back to one thread):

- ``ours``: the int4 decoder ``export.py`` writes for the device (CPU: ``--target cpu``, i.e.
  MatMulNBits int4 g128 symmetric, int8 head, fp32 activations and KV, accuracy level 4; CUDA:
  the default fp16 plan; RTN codes stand in for GPTQ, which changes the values and not the
  speed), driven exactly as the runtime drives it (``runtime.engines``: preallocated KV, I/O
  binding). Exported into ``--work`` once and reused. ``--attention gqa mha`` makes each
  attention variant a contender of its own (the first is ``ours``, the others ``ours_<name>``),
  alternating with the rest; ``ours_over_<name>`` is that variant's decode time / ours per
  round (> 1: ours is faster), ``prefill_ours_over_<name>`` the same for the prefill.
- ``genai`` (with ``--genai-python``): onnxruntime-genai's builder on the same weights renamed to
  Qwen2 (``bench.genai_baseline``), asked for the same choices, at ``--genai-build-layers``
  layers and ``--genai-build-vocab`` rows (its builder holds the whole model in memory: ~15 GB
  for two full-width layers), grown to the full depth and vocabulary by ``bench.genai_expand``
  (the builder's own layer subgraph copied per layer, fresh weights of the same shapes and
  dtypes, logits checked finite), timed with genai's own generator. Cached in ``--work``.
- ``eager``: ``models.qwen_vl`` in ``--eager-dtype`` with its KV cache (``--eager-tokens`` steps),
  once, after the others.

Ours and genai run alternately, ``--rounds`` times each, odd rounds in reverse order (A B, B A,
...: a box that favours whichever process runs second shows up as spread); ``ours_over_genai`` is
genai's decode time / ours per round (> 1: ours is faster) with its median, min and max,
``prefill_ours_over_genai`` the same for the prefill, and
``ours``/``genai`` are each contender's median run. The prompt is ``--prompt-tokens`` long with
``--image-tokens`` image rows (random features); genai, text-only, gets the same number of
random ids. ``--layers`` keeps the first N decoder blocks of the checkpoint for every contender.
Bytes read per token = the engine's initializers except the embedding table (gathered, not
read) + the KV cache at the mean context. ``ours`` records the peak RSS of each phase (load,
prefill, decode: ``VmHWM`` reset between them) and how many logits rows its prefill returned
(1 on a decoder with ``logits_to_keep``, the prompt length on one exported before it).
``--profile`` adds onnxruntime's per-operator profile of our decode step (first round, in a
session of its own after the timed one is dropped): where the next millisecond is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (ceiling, cuda_copy_bandwidth_gbs, host, host_read_bandwidth_gbs,
                          peak_rss_and_reset_mib, peak_rss_mib, run_child, stats)
from runtime.errors import cli_main

log = logging.getLogger("bench.decoder")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

def layer_config(checkpoint: Path, layers: int | None):
    from models.config import QwenVLConfig

    cfg = QwenVLConfig.from_pretrained(checkpoint)
    if layers and layers < cfg.num_hidden_layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    return cfg


def export_ours(checkpoint: Path, out: Path, layers: int | None, device: str = "cpu",
                **overrides) -> Path:
    """The int4 decoder ``export.py`` writes for ``device`` (``--target cpu``, or its GPU
    default) with RTN codes, cached in ``out``; ``overrides`` change ``export_decoder``
    arguments (e.g. ``kv_dtype``) for experiments."""
    onnx_path = out / "decoder.onnx"
    if onnx_path.exists():
        return onnx_path
    from exporters.decoder import WeightSource, export_decoder
    from exporters.pipeline import CPU_FAST
    from models.checkpoint import CheckpointReader
    from quant.fake_quant import RTNTensors
    from quant.plans import PLANS

    cfg = layer_config(checkpoint, layers)
    reader = CheckpointReader(checkpoint)
    src = WeightSource(cfg, reader.get, reader.__contains__)
    qt = RTNTensors(src.get, cfg.num_hidden_layers, group_size=PLANS["int4"].group_size, sym=True)
    out.mkdir(parents=True, exist_ok=True)
    base = CPU_FAST if device == "cpu" else {}
    export_decoder(src, onnx_path, plan="int4", quant_tensors=qt, **{**base, **overrides})
    return onnx_path


#: The int8-KV timing engine's one scale for every channel: calibrating real scales needs the
#: full-width model in fp32 (quant/kv_scales.py); the kernel's work does not depend on them.
TIMING_KV_SCALE = 0.05


def timing_kv_scales(cfg):
    """Constant int8-KV scales of ``cfg``'s shape (timing engines only, see --kv-dtype)."""
    from quant.kv_scales import KVScales

    full = np.full((cfg.num_hidden_layers, cfg.hidden_size), TIMING_KV_SCALE, np.float32)
    return KVScales(full, full.copy())


def weights_read_per_token(onnx_path: Path) -> int:
    """Bytes of initializers a decode step reads: all but Gather tables (the embedding)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    gathered = {n.input[0] for n in m.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    total = 0
    for t in m.graph.initializer:
        if t.name in gathered:
            continue
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


# ---------------------------------------------------------------------------------------------
# Contenders (each runs in its own process: python -m bench.decoder --run <name> ...)
# ---------------------------------------------------------------------------------------------

def _prompt(vocab: int, start_id: int, n: int, n_img: int, seed: int = 0) -> list[int]:
    """Random text ids (below ``<|endoftext|>``, the first special) around ``n_img`` slots."""
    from models.config import IMG_START_INDEX

    rng = np.random.default_rng(seed)
    text_ids = min(vocab, start_id - IMG_START_INDEX)
    text = [int(t) for t in rng.integers(0, text_ids, n - n_img - (2 if n_img else 0))]
    if not n_img:
        return text
    return text[:5] + [start_id] + [-1] * n_img + [start_id + 1] + text[5:]


def run_ours(onnx_path: Path, start_id: int, n_prompt: int, n_img: int, n_new: int,
             threads: int | None, device: str, profile: bool) -> dict:
    from runtime.contract import PromptTable
    from runtime.engines import DecoderEngine, Features, pick_providers

    meta_vocab, hidden = decoder_facts(onnx_path)
    t = time.perf_counter()
    eng = DecoderEngine(onnx_path, pick_providers(device), threads, meta_vocab)
    load_s = time.perf_counter() - t
    ids = _prompt(meta_vocab, start_id, n_prompt, n_img)
    slots = [i for i, x in enumerate(ids) if x == -1]
    table, _ = PromptTable(meta_vocab, start_id, start_id + 1, start_id + 2,
                           len(slots)).table_ids(ids)  # the image slots address feature rows
    feats = Features((len(slots), hidden),
                     (np.random.default_rng(1).standard_normal((len(slots), hidden)) * 0.02)
                     .astype(np.float32)) if slots else None
    cache = eng.new_cache(1, n_prompt + n_new + 1)
    phases = {"load": peak_rss_and_reset_mib()}  # each phase's own peak (VmHWM reset)
    t, c = time.perf_counter(), time.process_time()
    logits = eng.forward(cache, table[None], features=feats)
    prefill_s, prefill_cpu = time.perf_counter() - t, time.process_time() - c
    phases["prefill"] = peak_rss_and_reset_mib()
    tok = np.argmax(logits, axis=-1)
    steps = []
    c = time.process_time()
    for _ in range(n_new):
        t = time.perf_counter()
        logits = eng.forward(cache, tok[:, None])
        tok = np.argmax(logits, axis=-1)
        steps.append(time.perf_counter() - t)
    phases["decode"] = peak_rss_and_reset_mib()
    rec = {"engine": "ours", "model": str(onnx_path), "providers": eng.session.get_providers(),
           "threads": threads, "prompt_tokens": n_prompt, "image_rows": len(slots),
           "new_tokens": len(steps), "session_load_s": round(load_s, 2),
           "prefill_s": round(prefill_s, 3),
           "decode": stats(steps[1:] if len(steps) > 1 else steps),
           "cpu_util": cpu_util(prefill_cpu, prefill_s, time.process_time() - c, sum(steps)),
           "logits_finite": bool(np.isfinite(logits).all()),
           "kv_bytes_per_token": eng.kv_bytes_per_token, "kv_layout": eng.contract.kv_layout,
           "kv_cache_bytes": cache.nbytes, "peak_rss_mib": max(phases.values()),
           "phase_peak_rss_mib": phases,
           "prefill_logits_rows": eng.contract.logits_rows(len(table), 1)}
    rec["tok_s"] = round(1000 / rec["decode"]["median_ms"], 3)
    if profile:  # alone: beside the timed session the box paged the mmapped table (Gather ms)
        del cache, eng, logits
        from runtime.engines import return_freed_memory

        return_freed_memory()
        rec["profile"] = profile_ours(onnx_path, table, feats, threads, device)
    return rec


def cpu_util(prefill_cpu: float, prefill_s: float, decode_cpu: float, decode_s: float) -> dict:
    """Process CPU time / wall time per phase: about the thread count when every intra-op
    thread works, ~1 when a run silently fell back to one thread."""
    return {"prefill": round(prefill_cpu / max(prefill_s, 1e-9), 2),
            "decode": round(decode_cpu / max(decode_s, 1e-9), 2)}


def decoder_facts(onnx_path: Path) -> tuple[int, int]:
    """(vocab size, hidden size) from a decoder engine's metadata (weights not loaded)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    return int(meta["vocab_size"]), int(meta["hidden_size"])


def profile_ours(onnx_path: Path, table: np.ndarray, feats, threads: int | None, device: str,
                 steps: int = 8) -> dict:
    """onnxruntime's node profile of ``steps`` decode steps, driven as the runtime drives them
    (``DecoderEngine``: preallocated KV bound by pointer, the shared buffer of a ``shared``
    layout): share of time per operator type."""
    from runtime.engines import DecoderEngine, pick_providers

    prof_dir = Path(tempfile.mkdtemp(prefix="bench-decoder-profile-"))  # private, not a fixed path
    vocab, _ = decoder_facts(onnx_path)
    eng = DecoderEngine(onnx_path, pick_providers(device), threads, vocab,
                        profile_prefix=str(prof_dir / "profile"))
    cache = eng.new_cache(1, len(table) + steps + 1)
    tok = np.argmax(eng.forward(cache, table[None], features=feats), axis=-1)
    for _ in range(steps):
        tok = np.argmax(eng.forward(cache, tok[:, None]), axis=-1)
    path = eng.session.end_profiling()
    events = json.loads(Path(path).read_text())
    Path(path).unlink(missing_ok=True)
    prof_dir.rmdir()
    return profile_summary(events)


def profile_summary(events: list[dict]) -> dict:
    """Per-operator time of the decode runs (all runs but the first, the prefill) of an
    onnxruntime profile: the share of the summed kernel time, and the median over steps of each
    operator's time per step (robust to a preempted step on a shared machine, which lands a
    whole scheduler slice on whichever node was running)."""
    decode_runs = [e for e in events if e.get("name") == "model_run"][1:]
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_step: list[dict[str, float]] = []
    for r in decode_runs:
        step: dict[str, float] = {}
        for e in nodes:
            if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                op = e.get("args", {}).get("op_name", "?")
                step[op] = step.get(op, 0.0) + e["dur"]
        per_step.append(step)
    by_op = {op: sum(s.get(op, 0.0) for s in per_step) for s in per_step for op in s}
    total_nodes = sum(by_op.values())
    total_runs = sum(e["dur"] for e in decode_runs)
    order = sorted(by_op, key=lambda op: -by_op[op])
    return {"steps": len(decode_runs),
            "run_ms_per_step": round(total_runs / max(1, len(decode_runs)) / 1000, 3),
            "kernels_ms_per_step": round(total_nodes / max(1, len(decode_runs)) / 1000, 3),
            "share_by_op": {k: round(by_op[k] / total_nodes, 4) for k in order},
            "median_ms_per_step_by_op": {
                k: round(float(np.median([s.get(k, 0.0) for s in per_step])) / 1000, 3)
                for k in order}}


def run_eager(checkpoint: Path, layers: int | None, dtype: str, n_prompt: int, n_img: int,
              n_new: int, threads: int | None, device: str) -> dict:
    import torch

    from models.checkpoint import CheckpointReader, build_model, parse_dtype

    if threads:
        torch.set_num_threads(threads)
    dev = "cuda" if device == "cuda" else "cpu"
    cfg = layer_config(checkpoint, layers)
    reader = CheckpointReader(checkpoint)
    t = time.perf_counter()
    model = build_model(cfg, reader.get, parse_dtype(dtype),
                        prefixes=("transformer.wte.", "transformer.h.", "transformer.ln_f.",
                                  "lm_head."))
    del model.transformer.visual  # left on the meta device; features are given
    model.to(dev)
    load_s = time.perf_counter() - t
    ids = _prompt(cfg.vocab_size, cfg.image_start_id, n_prompt, n_img)
    n_slots = ids.count(-1)
    ids = [0 if x == -1 else x for x in ids]
    feats = (torch.randn(1, n_slots, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
             * 0.02).to(dev, parse_dtype(dtype)) if n_slots else None
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        t, c = time.perf_counter(), time.process_time()
        out = model(torch.tensor([ids], device=dev), image_embeds=feats)
        sync()
        prefill_s, prefill_cpu = time.perf_counter() - t, time.process_time() - c
        steps = []
        c = time.process_time()
        for _ in range(n_new):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            out = model(tok, past=out.past)
            out.logits[:, -1].argmax(-1)
            sync()
            steps.append(time.perf_counter() - t)
        decode_cpu = time.process_time() - c
    rec = {"engine": "pytorch-eager", "torch": torch.__version__, "dtype": dtype, "device": dev,
           "threads": torch.get_num_threads(), "prompt_tokens": n_prompt, "image_rows": n_slots,
           "new_tokens": len(steps), "load_s": round(load_s, 2), "prefill_s": round(prefill_s, 3),
           "decode": stats(steps[1:] if len(steps) > 1 else steps),
           "cpu_util": cpu_util(prefill_cpu, prefill_s, decode_cpu, sum(steps)),
           "weights_read_per_token": sum(p.numel() * p.element_size() for n, p in
                                         model.named_parameters()
                                         if n.startswith(("transformer.h.", "transformer.ln_f",
                                                          "lm_head"))),
           "peak_rss_mib": peak_rss_mib()}
    rec["tok_s"] = round(1000 / rec["decode"]["median_ms"], 3)
    return rec


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _run(cmd: list[str], what: str, record: bool = False) -> dict | None:
    """Run a contender or a build step from the repository root (``bench.common.run_child``)."""
    return run_child(cmd, what, record, cwd=REPO)


def _with_ceiling(rec: dict, weights: float, kv: float, bw: dict) -> dict:
    """Add bytes read per token (weights + KV at the mean context) and the ceiling they imply."""
    bytes_per_token = weights + kv
    rec["weights_read_per_token"] = int(weights)
    rec["kv_read_per_token"] = int(kv)
    rec["bytes_read_per_token"] = int(bytes_per_token)
    rec["ceiling_tok_s"] = round(ceiling(bw["read_gbs"], bytes_per_token), 3)
    rec["pct_of_ceiling"] = round(100 * rec["tok_s"] / rec["ceiling_tok_s"], 1)
    return rec


def build_parser() -> argparse.ArgumentParser:
    from models.config import QwenVLConfig

    ap = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", type=Path,
                    help="Qwen-VL checkpoint (default: the shipped nano checkpoint)")
    ap.add_argument("--layers", type=int, default=0,
                    help="keep the first N decoder blocks for every contender (0: all)")
    ap.add_argument("--decoder", type=Path, help="our int4 decoder.onnx (default: export one)")
    ap.add_argument("--work", type=Path, help="where exported engines are cached (default: temp)")
    ap.add_argument("--genai-python", help="python of a venv with onnxruntime-genai: adds the "
                                           "genai baseline (see bench.genai_baseline)")
    ap.add_argument("--no-eager", action="store_true", help="skip the PyTorch eager baseline")
    ap.add_argument("--eager-dtype", default="bf16", help="PyTorch reference dtype")
    ap.add_argument("--eager-tokens", type=int, default=8, help="decode steps of the eager baseline")
    ap.add_argument("--prompt-tokens", type=int, default=288)
    ap.add_argument("--image-tokens", type=int, default=None,
                    help="image rows in the prompt (default: the checkpoint's n_queries)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0,
                    help="intra-op threads of every contender (0: every core); recorded")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating runs of ours and genai (A B A B ...); the ratio's spread")
    ap.add_argument("--genai-prune-lm-head", action="store_true",
                    help="build genai's model with its prune_lm_head option (prefill logits of "
                         "the last position only, as our decoder's runtime asks for)")
    ap.add_argument("--genai-build-layers", type=int, default=2,
                    help="layers genai's builder builds before bench.genai_expand grows them")
    ap.add_argument("--genai-build-vocab", type=int, default=8192,
                    help="vocabulary rows genai's builder builds before the expansion")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--kv-dtype", choices=("fp16", "fp32", "int8"),
                    help="KV dtype of the exported engine (default: export.py --target cpu's); "
                         "int8 (GroupQueryAttention only) is built with constant scales "
                         f"({TIMING_KV_SCALE}): a timing engine, its tokens mean nothing")
    ap.add_argument("--attention", nargs="+", choices=("gqa", "mha", "plain"),
                    help="attention of our engine; several: each is a contender of its own in "
                         "the alternation, the first is 'ours' (default: the target's, see "
                         "quant/plans.py)")
    ap.add_argument("--profile", action="store_true",
                    help="per-operator profile of our decode step (each attention variant)")
    ap.add_argument("--run", choices=("ours", "eager"), help=argparse.SUPPRESS)
    ap.add_argument("--image-start-id", type=int, default=QwenVLConfig().image_start_id,
                    help=argparse.SUPPRESS)
    return ap


def our_engines(args, ckpt: Path, cfg, work: Path) -> tuple[dict[str, Path], bool]:
    """``{attention: decoder.onnx}`` of our variants (``--decoder``: that one file), exported
    into ``work`` once and reused; and whether all of them were there already."""
    if args.decoder is not None:
        return {"given": args.decoder}, True
    from quant.plans import PLANS

    default = PLANS["int4"].target("cpu" if args.device == "cpu" else "gpu").attention
    over: dict = {"kv_dtype": args.kv_dtype} if args.kv_dtype else {}
    if args.kv_dtype == "int8":
        over["kv_scales"] = timing_kv_scales(cfg)
    out, cached = {}, True
    for att in dict.fromkeys(args.attention or [default]):
        d = work / (f"ours-L{cfg.num_hidden_layers}" + ("-gpu" if args.device == "cuda" else "")
                    + (f"-kv{args.kv_dtype}" if args.kv_dtype else "") + f"-{att}")
        cached = cached and (d / "decoder.onnx").exists()
        out[att] = export_ours(ckpt, d, args.layers or None, args.device,
                               **{**over, "attention": att})
    return out, cached


def genai_model(args, ckpt: Path, cfg, work: Path, record: dict) -> Path:
    """onnxruntime-genai's int4 model of ``cfg``'s shapes in ``work`` (cached): built by its
    own builder at ``--genai-build-layers`` layers and ``--genai-build-vocab`` rows (the
    builder cannot hold the full model), then grown to the full depth and vocabulary by
    ``bench.genai_expand``, whose check runs a prompt and fails on non-finite logits."""
    n, vocab = cfg.num_hidden_layers, cfg.vocab_size
    b, bv = min(args.genai_build_layers, n), min(args.genai_build_vocab, vocab)
    tag = "-prune" if args.genai_prune_lm_head else ""
    final = work / f"genai-L{n}{tag}"
    built = final if (b, bv) == (n, vocab) else work / f"genai-build-L{b}-V{bv}{tag}"
    record["genai_model"] = {"built_layers": b, "built_vocab": bv, "layers": n, "vocab": vocab,
                             "expanded": built != final,
                             "prune_lm_head": bool(args.genai_prune_lm_head)}
    gpy = [args.genai_python, "-m", "bench.genai_baseline"]
    if not (built / "genai_config.json").exists() and not (final / "genai_config.json").exists():
        hf = work / f"qwen2-L{b}-V{bv}"
        if not hf.exists():
            _run(gpy + ["convert", "--checkpoint", str(ckpt), "--out", str(hf), "--layers",
                        str(b), "--vocab", str(bv)], "genai convert")
        t = time.perf_counter()
        _run(gpy + ["build", "--hf", str(hf), "--out", str(built), "--cache",
                    str(work / "genai-cache"), "--ep", args.device]
             + (["--prune-lm-head"] if args.genai_prune_lm_head else []), "genai build")
        record["genai_model"]["build_s"] = round(time.perf_counter() - t, 1)
    if not (final / "genai_config.json").exists():
        t = time.perf_counter()
        _run([sys.executable, "-m", "bench.genai_expand", "--model", str(built), "--out",
              str(final), "--layers", str(n), "--vocab", str(vocab), "--check"], "genai expand")
        record["genai_model"]["expand_s"] = round(time.perf_counter() - t, 1)
    return final


def median_run(runs: list[dict]) -> dict:
    """The run with the median decode time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["decode"]["median_ms"])[(len(runs) - 1) // 2]


def spread(values: list[float]) -> dict:
    vs = sorted(values)
    return {"median": round(float(np.median(vs)), 3), "min": round(vs[0], 3),
            "max": round(vs[-1], 3), "per_round": [round(v, 3) for v in values]}


def summary(rec: dict) -> dict:
    """One run's line in ``rounds``: what varies between runs of the same contender."""
    return {"decode_median_ms": rec["decode"]["median_ms"], "prefill_s": rec["prefill_s"],
            "threads": rec["threads"], "cpu_util": rec["cpu_util"],
            "peak_rss_mib": rec["peak_rss_mib"]}


def check_run(name: str, rec: dict, threads: int) -> None:
    """Stop on non-finite logits; say so when a contender kept fewer cores busy than it was
    given threads (a one-thread run must not hide again)."""
    if not rec["logits_finite"]:
        raise SystemExit(f"{name} produced non-finite logits: its figures would be meaningless")
    if threads > 1 and rec["cpu_util"]["decode"] < 0.6 * threads:
        log.warning("%s decoded at %.2f CPUs busy with %d threads: check its thread setting "
                    "or the machine's load", name, rec["cpu_util"]["decode"], threads)


def variant_key(i: int, attention: str) -> str:
    """Record key of our ``i``-th attention variant: ``ours`` for the first (the default)."""
    return "ours" if i == 0 else f"ours_{attention}"


def alternate(args, decoders: dict[str, Path], cfg, genai: Path | None, threads: int,
              record: dict) -> tuple[dict[str, list[dict]], list[dict]]:
    """``--rounds`` rounds of each of our attention variants then genai (A B C A B C ...), each
    run in its own process; returns the runs of each contender."""
    sizes = ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
             "--threads", str(threads)]
    genai_cmd = [str(args.genai_python), "-m", "bench.genai_baseline", "time", "--model",
                 str(genai)] + sizes
    ours: dict[str, list[dict]] = {variant_key(i, a): [] for i, a in enumerate(decoders)}
    theirs, rounds = [], []

    def run_ours_variant(r: int, key: str, att: str, decoder: Path) -> None:
        cmd = [sys.executable, "-m", "bench.decoder", "--run", "ours", "--decoder",
               str(decoder), "--image-start-id", str(cfg.image_start_id), "--image-tokens",
               str(args.image_tokens), "--device", args.device] + sizes
        ours[key].append(_run(cmd + (["--profile"] if r == 0 and args.profile else []),
                              f"{key} ({att}) {r + 1}", record=True))
        ours[key][-1]["attention"] = att
        check_run(key, ours[key][-1], threads)
        rounds[-1][key] = summary(ours[key][-1])

    def run_genai(r: int) -> None:
        theirs.append(_run(genai_cmd, f"genai {r + 1}", record=True))
        check_run("genai", theirs[-1], threads)
        rounds[-1]["genai"] = summary(theirs[-1])

    for r in range(args.rounds):
        # odd rounds run the contenders in reverse (A B, B A, ...): a machine that favours
        # whichever process runs second shows up as spread, not as a winner
        steps = [lambda r=r, k=k, a=a, d=d: run_ours_variant(r, k, a, d)
                 for k, (a, d) in zip(ours, decoders.items())]
        if genai is not None:
            steps.append(lambda r=r: run_genai(r))
        rounds.append({"order": "forward" if r % 2 == 0 else "reverse"})
        for step in (steps if r % 2 == 0 else steps[::-1]):
            step()
        base = ours["ours"][-1]
        for key, runs in list(ours.items())[1:]:  # > 1: the default variant is faster
            att = key.split("_", 1)[1]
            rounds[-1][f"ours_over_{att}"] = round(runs[-1]["decode"]["median_ms"] /
                                                   base["decode"]["median_ms"], 3)
            rounds[-1][f"prefill_ours_over_{att}"] = round(runs[-1]["prefill_s"] /
                                                           base["prefill_s"], 3)
        if genai is not None:
            rounds[-1]["ours_over_genai"] = round(theirs[-1]["decode"]["median_ms"] /
                                                  base["decode"]["median_ms"], 3)
            rounds[-1]["prefill_ours_over_genai"] = round(theirs[-1]["prefill_s"] /
                                                          base["prefill_s"], 3)
    record["rounds"] = rounds
    for runs in ours.values():
        if runs[0].get("profile"):
            profile = runs[0].pop("profile")
            median_run(runs)["profile"] = profile
    return ours, theirs


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    threads = args.threads or os.cpu_count() or 1  # explicit for every contender, and recorded
    if args.run == "ours":
        print(json.dumps(run_ours(args.decoder, args.image_start_id, args.prompt_tokens,
                                  args.image_tokens, args.new_tokens, threads, args.device,
                                  args.profile)))
        return 0
    if args.run == "eager":
        print(json.dumps(run_eager(args.checkpoint, args.layers or None, args.eager_dtype,
                                   args.prompt_tokens, args.image_tokens, args.eager_tokens,
                                   threads, args.device)))
        return 0
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    return drive(args, threads)


def drive(args, threads: int) -> int:
    """Export (or reuse) the engines, run the contenders, print the record."""
    from models.nano import default_checkpoint

    ckpt = (args.checkpoint or default_checkpoint()).resolve()
    tmp = tempfile.TemporaryDirectory(prefix="bench-decoder-") if args.work is None else None
    work = Path(tmp.name) if tmp else args.work
    cfg = layer_config(ckpt, args.layers or None)
    if args.image_tokens is None:
        args.image_tokens = cfg.visual.n_queries
    t = time.perf_counter()
    decoders, cached = our_engines(args, ckpt, cfg, work)
    export_s = None if cached else round(time.perf_counter() - t, 1)
    bw = cuda_copy_bandwidth_gbs() if args.device == "cuda" else \
        host_read_bandwidth_gbs()
    record: dict = {
        "bench": "decoder", "host": host(), "load_avg": list(os.getloadavg()), "threads": threads,
        "bandwidth": bw, "checkpoint": str(ckpt),
        "shapes": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                   "heads": cfg.num_attention_heads, "ffn": cfg.ffn_dim, "vocab": cfg.vocab_size,
                   "prompt_tokens": args.prompt_tokens, "image_tokens": args.image_tokens,
                   "new_tokens": args.new_tokens},
        "batch": 1, "export_s": export_s,  # None: the engine was exported by an earlier run
    }
    genai = genai_model(args, ckpt, cfg, work, record) if args.genai_python else None
    ours, theirs = alternate(args, decoders, cfg, genai, threads, record)
    mean_ctx = args.prompt_tokens + args.new_tokens / 2
    for (key, runs), decoder in zip(ours.items(), decoders.values()):
        rep = median_run(runs)
        record[key] = _with_ceiling(rep, weights_read_per_token(decoder),
                                    mean_ctx * rep["kv_bytes_per_token"], bw)
        if key != "ours":
            att = key.split("_", 1)[1]
            record[f"ours_over_{att}"] = spread([r[f"ours_over_{att}"] for r in record["rounds"]])
            record[f"prefill_ours_over_{att}"] = spread([r[f"prefill_ours_over_{att}"]
                                                         for r in record["rounds"]])
    kv_bf16 = 2 * cfg.num_hidden_layers * cfg.hidden_size * 2
    if theirs:
        kv_genai = kv_bf16 * (2 if args.device == "cpu" else 1)  # fp32 KV on CPU
        record["genai"] = _with_ceiling(median_run(theirs), weights_read_per_token(
            genai / "model.onnx"), mean_ctx * kv_genai, bw)
        record["ours_over_genai"] = spread([r["ours_over_genai"] for r in record["rounds"]])
        record["prefill_ours_over_genai"] = spread([r["prefill_ours_over_genai"]
                                                    for r in record["rounds"]])
    if not args.no_eager:
        eager = _run([sys.executable, "-m", "bench.decoder", "--run", "eager", "--checkpoint",
                      str(ckpt), "--layers", str(args.layers), "--eager-dtype", args.eager_dtype,
                      "--prompt-tokens", str(args.prompt_tokens), "--image-tokens",
                      str(args.image_tokens), "--threads", str(threads), "--device", args.device,
                      "--new-tokens", "0", "--eager-tokens", str(args.eager_tokens)],
                     "eager", record=True)
        record["eager"] = _with_ceiling(eager, eager.pop("weights_read_per_token"),
                                        mean_ctx * kv_bf16, bw)
        record["ours_over_eager"] = round(record["ours"]["tok_s"] / eager["tok_s"], 3)
    print(json.dumps(record))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
