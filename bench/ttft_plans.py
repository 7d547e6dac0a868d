"""Time to first token per precision plan (issue 20, item 3), the per-plan mode of
``python -m bench.ttft``: vision, prefill and TTFT of each plan's two engines on the same photo
and the same prompt, at explicit thread counts, with the prefill in one shot or in chunks.

    python -m bench.ttft --plans fp16 int4 edge --targets cpu gpu --checkpoint <ckpt> --work <w>
    python -m bench.ttft --bundles <fp16 bundle> <int4 bundle> --threads 1 2 --chunks 0 64 128

A contender is one plan's engines (a bundle's, or exported from ``--checkpoint`` into ``--work``
with round-to-nearest int4 codes standing in for GPTQ, which changes values, not speed) at one
thread count. Each contender runs in its own process per round, contenders alternating
(A B C A B C ...): peak memory is its own, and a slow drift of the shared machine's load falls on
every contender alike. In its process a contender loads both engines the way the runtime does
(``runtime.engines``), warms up once, then times the vision engine and every prefill chunking
(``--chunks``: 0 = the whole prompt in one call, as the runtime does; N = calls of N tokens on the
same KV cache; their order rotates from one iteration to the next), ``--iters`` times, with
process CPU time / wall time per phase (``cpu_util``: about the thread count when every thread
works, lower when the shared machine starved the run; ``per_run_ms`` keeps every run). TTFT of
a chunking = preprocess + vision + that prefill of the same iteration. Every chunked prefill's
last logits are compared with the one-shot ones (``chunk_max_abs_diff``): chunking must not
change the answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import host, peak_rss_mib, run_child, stats

log = logging.getLogger("bench.ttft")
REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "calib_data" / "manifest.jsonl"


@dataclass(frozen=True)
class PlanEngines:
    """One plan's two engines and what they are."""

    label: str  # "int4-cpu"; a plan whose targets build the same decoder: just the plan
    plan: str
    target: str
    vision_precision: str
    vision: str
    decoder: str


def plan_label(plan: str, target: str) -> str:
    from quant.plans import PLANS

    p = PLANS[plan]
    same = len({t for t in p.targets.values()}) == 1
    return plan if same else f"{plan}-{target}"


def plan_targets(plans: list[str], targets: list[str]) -> list[tuple[str, str]]:
    """(plan, target) pairs whose decoders differ (fp16's cpu and gpu targets are one build)."""
    out: dict[str, tuple[str, str]] = {}
    for plan in plans:
        for target in targets:
            out.setdefault(plan_label(plan, target), (plan, target))
    return list(out.values())


def bundle_engines(bundle: Path) -> PlanEngines:
    from runtime.bundle import read_manifest

    man = read_manifest(bundle)
    return PlanEngines(plan_label(man.precision, man.target), man.precision, man.target,
                       str(man.data.get("vision_precision", "?")),
                       str(man.file(man.engines.get("vision", {}).get("file", "vision.onnx"))),
                       str(man.file(man.engines.get("decoder", {}).get("file", "decoder.onnx"))))


# ---------------------------------------------------------------------------------------------
# Engines from a checkpoint (cached in --work; only one tensor / one tower in memory at a time)
# ---------------------------------------------------------------------------------------------

def vision_engine(checkpoint: Path, cfg, work: Path, precision: str, calib_images: int) -> Path:
    """``work/vision-<precision>/vision.onnx``; int8 = the fp32 engine statically quantised on
    ``calib_images`` pictures of the calibration split, as the edge plan's exporter does."""
    dest = work / f"vision-{precision}" / "vision.onnx"
    if dest.exists():
        return dest
    from quant.plans import traced_vision

    if traced_vision(precision) != precision:
        from quant.vision_int8 import calibration_images, quantize_vision

        fp32 = vision_engine(checkpoint, cfg, work, traced_vision(precision), calib_images)
        calib = calibration_images(MANIFEST, cfg.visual.image_size, limit=calib_images)
        quantize_vision(fp32, dest, calib, cache_dir=work / "int8-ranges")
        return dest
    from exporters.vision import export_vision

    export_vision(checkpoint, dest, precision, check_images=["astronaut"],
                  write_trt_script=False, config=cfg)
    return dest


def decoder_engine(checkpoint: Path, cfg, dest: Path, plan: str, target: str) -> Path:
    """The plan's decoder for ``target`` (what ``export.py --plan P --target T`` builds), int4
    codes by round-to-nearest and, for an int8 KV cache, one placeholder scale per channel (the
    export calibrates them; values change the drift, not the speed); cached at ``dest``."""
    if dest.exists():
        return dest
    from exporters.decoder import WeightSource, export_decoder
    from quant.fake_quant import RTNTensors
    from quant.plans import DEFAULT_GROUP_SIZE, PLANS

    p = PLANS[plan]
    src = WeightSource.from_checkpoint(checkpoint, cfg)
    kwargs: dict = {}
    if p.quantized:
        group = p.group_size or DEFAULT_GROUP_SIZE
        while cfg.hidden_size % group or cfg.ffn_dim % group:  # nano widths
            group //= 2
        kwargs = {"quant_tensors": RTNTensors(src.get, cfg.num_hidden_layers, group_size=group),
                  "group_size": group, **p.target(target).decoder_kwargs()}
        if p.target(target).int8_kv:
            from quant.kv_scales import KVScales

            ones = np.full((cfg.num_hidden_layers, cfg.hidden_size), 0.05, np.float32)
            kwargs["kv_scales"] = KVScales(key=ones, value=ones.copy())
    dest.parent.mkdir(parents=True, exist_ok=True)
    export_decoder(src, dest, plan=plan, **kwargs)
    return dest


def export_plan_engines(checkpoint: Path, work: Path, plans: list[str], targets: list[str],
                        calib_images: int = 8) -> list[PlanEngines]:
    from models.config import QwenVLConfig
    from quant.plans import PLANS

    cfg = QwenVLConfig.from_pretrained(checkpoint)
    out = []
    for plan, target in plan_targets(plans, targets):
        label = plan_label(plan, target)
        vprec = PLANS[plan].vision_dtype(target)
        t = time.perf_counter()
        vision = vision_engine(checkpoint, cfg, work, vprec, calib_images)
        decoder = decoder_engine(checkpoint, cfg, work / label / "decoder.onnx", plan, target)
        log.info("%s engines ready in %.1f s", label, time.perf_counter() - t)
        out.append(PlanEngines(label, plan, target, vprec, str(vision), str(decoder)))
    return out


# ---------------------------------------------------------------------------------------------
# One contender in its own process (python -m bench.ttft --run-plan '<json>')
# ---------------------------------------------------------------------------------------------

def prompt_table(vocab: int, n_rows: int, prompt_tokens: int, text_ids: int) -> np.ndarray:
    """The runtime's layout: random text ids (below ``text_ids``) around the image's
    ``n_rows`` feature rows (table ids ``vocab + row``)."""
    text = np.random.default_rng(0).integers(0, min(vocab, text_ids), prompt_tokens - n_rows)
    return np.concatenate([text[:5], vocab + np.arange(n_rows), text[5:]]).astype(np.int64)


def _prefill(de, table: np.ndarray, feats, chunk: int) -> np.ndarray:
    """Last-position logits after the whole prompt, in one call (0) or calls of ``chunk``."""
    cache = de.new_cache(1, len(table) + 1)
    step = chunk or len(table)
    for s in range(0, len(table), step):
        logits = de.forward(cache, table[None, s:s + step], features=feats)
    return logits[0]


def _timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def run_contender(spec: dict) -> dict:
    """Load both engines with ``spec['threads']`` threads, warm up once, then ``iters`` times:
    preprocess, vision, and every chunking's prefill. Returns the contender's record."""
    from bench.decoder import decoder_facts
    from models.config import QwenVLConfig
    from runtime.engines import DecoderEngine, VisionEngine, pick_providers
    from runtime.image import load_image, preprocess

    threads, chunks = spec["threads"], spec["chunks"]
    providers = pick_providers(spec["device"])
    t = time.perf_counter()
    ve = VisionEngine(Path(spec["vision"]), providers, threads)
    vocab, _ = decoder_facts(Path(spec["decoder"]))
    de = DecoderEngine(Path(spec["decoder"]), providers, threads, vocab)
    load_s = time.perf_counter() - t
    size = int(ve.session.get_inputs()[0].shape[-1])
    table = prompt_table(vocab, ve.n_queries, spec["prompt_tokens"], QwenVLConfig().eod_id)
    image = _image(spec["image"])
    runs = []
    for i in range(spec["iters"] + 1):  # the first is the warm-up
        px, pre_s, _ = _timed(lambda: preprocess(load_image(image), size)[None])
        feats, vis_s, vis_cpu = _timed(lambda: ve.encode(px))
        run = {"preprocess_s": pre_s, "vision_s": vis_s, "vision_cpu_s": vis_cpu, "prefill": {}}
        order = chunks[i % len(chunks):] + chunks[:i % len(chunks)]  # none always runs first
        for c in (order if i else chunks[:1]):
            logits, s, cpu = _timed(lambda: _prefill(de, table, feats, c))
            run["prefill"][str(c)] = {"s": s, "cpu_s": cpu, "logits": logits}
        runs.append(run)
    return _contender_record(spec, runs[1:], load_s, ve, de, len(table))


def _contender_record(spec: dict, runs: list[dict], load_s: float, ve, de, n_prompt: int) -> dict:
    base = [r["prefill"][str(spec["chunks"][0])]["logits"] for r in runs]
    diff = {k: float(max(np.abs(r["prefill"][k]["logits"] - b).max() for r, b in zip(runs, base)))
            for k in runs[0]["prefill"]}
    vis_wall = sum(r["vision_s"] for r in runs)
    rec = {"label": spec["label"], "threads": spec["threads"], "iters": len(runs),
           "prompt_tokens": n_prompt, "providers": de.session.get_providers(),
           "session_load_s": round(load_s, 2),
           "preprocess_s": [round(r["preprocess_s"], 6) for r in runs],
           "vision_s": [round(r["vision_s"], 6) for r in runs],
           "cpu_util": {"vision": round(sum(r["vision_cpu_s"] for r in runs) / vis_wall, 2)},
           "prefill_s": {}, "chunk_max_abs_diff": {k: round(v, 7) for k, v in diff.items()},
           "argmax": int(np.argmax(base[0])), "peak_rss_mib": peak_rss_mib()}
    for k in runs[0]["prefill"]:
        walls = [r["prefill"][k]["s"] for r in runs]
        rec["prefill_s"][k] = [round(w, 6) for w in walls]
        rec["cpu_util"][f"prefill_{k}"] = round(sum(r["prefill"][k]["cpu_s"] for r in runs)
                                                / sum(walls), 2)
    return rec


def _image(name: str):
    if Path(name).exists():
        return name
    import skimage.data

    return getattr(skimage.data, name)()


# ---------------------------------------------------------------------------------------------
# Driver: alternate the contenders, then one table
# ---------------------------------------------------------------------------------------------

def alternate(engines: list[PlanEngines], threads: list[int], chunks: list[int], rounds: int,
              base_spec: dict) -> dict[tuple[str, int], list[dict]]:
    """``rounds`` rounds of every (plan, threads) contender, each run in its own process."""
    runs: dict[tuple[str, int], list[dict]] = {(e.label, t): [] for e in engines for t in threads}
    for r in range(rounds):
        for e in engines:
            for t in threads:
                spec = {**base_spec, **dataclasses.asdict(e), "threads": t, "chunks": chunks}
                cmd = [sys.executable, "-m", "bench.ttft", "--run-plan", json.dumps(spec)]
                runs[e.label, t].append(run_child(cmd, f"{e.label} x{t} round {r + 1}",
                                                  record=True, cwd=REPO))
    return runs


def summarise(e: PlanEngines, t: int, runs: list[dict], chunks: list[int]) -> dict:
    """One contender over all its rounds: medians of vision, prefill and TTFT per chunking."""
    vision = [v for r in runs for v in r["vision_s"]]
    pre = [v for r in runs for v in r["preprocess_s"]]
    out = {**dataclasses.asdict(e), "threads": t, "rounds": len(runs),
           "vision": stats(vision), "preprocess": stats(pre), "prefill": {}, "ttft": {},
           "cpu_util": {k: [r["cpu_util"][k] for r in runs] for k in runs[0]["cpu_util"]},
           "chunk_max_abs_diff": {k: max(r["chunk_max_abs_diff"][k] for r in runs)
                                  for k in runs[0]["chunk_max_abs_diff"]},
           "session_load_s": [r["session_load_s"] for r in runs],
           "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
           "prompt_tokens": runs[0]["prompt_tokens"], "providers": runs[0]["providers"]}
    out["per_run_ms"] = {"vision": _ms(vision), "prefill": {}}
    for c in map(str, chunks):
        fill = [v for r in runs for v in r["prefill_s"][c]]
        ttft = [p + v + f for r in runs for p, v, f in
                zip(r["preprocess_s"], r["vision_s"], r["prefill_s"][c])]
        out["prefill"][c], out["ttft"][c] = stats(fill), stats(ttft)
        out["per_run_ms"]["prefill"][c] = _ms(fill)
    out["files_bytes"] = {k: _engine_bytes(Path(getattr(e, k))) for k in ("vision", "decoder")}
    return out


def _ms(seconds: list[float]) -> list[float]:
    """Every run in round order (a round's ``--iters`` runs together): a starved round shows."""
    return [round(x * 1000, 1) for x in seconds]


def _engine_bytes(onnx_path: Path) -> int:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def table(summaries: list[dict]) -> list[dict]:
    """One row per (plan, threads, chunking): the medians a reader compares."""
    rows = []
    for s in summaries:
        for c, tt in s["ttft"].items():
            rows.append({"plan": s["label"], "threads": s["threads"], "chunk": int(c),
                         "vision_ms": s["vision"]["median_ms"],
                         "prefill_ms": s["prefill"][c]["median_ms"], "ttft_ms": tt["median_ms"]})
    return rows


def per_plan_record(engines: list[PlanEngines], args) -> dict:
    base = {"device": args.device, "prompt_tokens": args.prompt_tokens, "image": args.image,
            "iters": args.iters}
    chunks = list(dict.fromkeys([0, *args.chunks]))  # one shot first: the reference logits
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    runs = alternate(engines, args.threads, chunks, args.rounds, base)
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    summaries = [summarise(e, t, runs[e.label, t], chunks) for e in engines for t in args.threads]
    return {"bench": "ttft_plans", "host": host(), "load_avg_1_5_15": load,
            "threads": args.threads, "chunks": chunks, "rounds": args.rounds,
            "iters_per_round": args.iters, "prompt_tokens": args.prompt_tokens,
            "image": args.image, "table": table(summaries), "contenders": summaries}
