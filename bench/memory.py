"""Does the memory planner tell the truth? Predicted vs actual engine sizes and peak RSS.

    python -m bench.memory --bundle out/bundle                       # both modes, one image
    python -m bench.memory --bundle B1 --bundle B2 --new-tokens 64 --json out.json
    python -m bench.memory --bundle <full-size int4 bundle> --checkpoint <full-size>

For each bundle: the plan ``exporters.memory_plan.plan_memory`` makes for it (the bundle's plan,
with the target, group size and LM head read from its files) next to the bytes of its files, by
engine and decoder part; then the runtime (``runtime.Pipeline``, CPU) answers one image with
``--new-tokens`` greedy tokens in a fresh process per mode (resident, and low-memory: one engine
at a time), and its peak RSS (``VmHWM``) is set beside the predicted peak. Prints a table and one
JSON record; asserts nothing (the targets — sizes within 2 %, RSS within 10 % — are judged by
reading it).

What the predicted peak counts: the planner's engines + KV (``MemoryPlan.peak_bytes``) on top of
the process's measured start-up RSS (Python, numpy, onnxruntime, before any engine), which stands
in for the plan's runtime allowance (a GPU figure: CUDA context, arenas); the runtime allocates KV
buffers for the whole 2048-token budget, but on the CPU only the pages of the tokens used (prompt
+ new tokens) become resident (its host buffers refuse transparent huge pages).
The plan's own figure (allowance, KV at the budget) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import peak_rss_and_reset_mib

GB = 1e9


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.memory",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--bundle", type=Path, action="append", required=True,
                    help="bundle directory (repeat for several)")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="the checkpoint the bundles were exported from (for its config.json; "
                         "default: the manifest's source checkpoint, else the nano one)")
    ap.add_argument("--device-profile", default="desktop",
                    help="device profile of the plan (default desktop; sizes do not depend on it)")
    ap.add_argument("--context", type=int, default=2048, help="context budget (default 2048)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated (default 64)")
    ap.add_argument("--image", type=Path, default=None,
                    help="the photo (default: a synthetic 640x480 scene)")
    ap.add_argument("--modes", default="resident,low-memory",
                    help="runtime modes to measure, comma-separated (resident, low-memory; "
                         "'none': sizes only)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON record here")
    return ap


def decoder_settings(man: Any) -> dict[str, Any]:
    """What the bundle's decoder was built with, read from its ONNX file: the target (fp32
    activations in an int4 decoder = ``cpu``), the int4 group size, the LM-head dtype and
    whether it takes ``logits_to_keep`` (else its prefill returns every position's logits)."""
    import onnx

    from runtime.contract import LOGITS_TO_KEEP

    from quant.plans import PLANS

    m = onnx.load(str(man.file(man.engines.get("decoder", {}).get("file", "decoder.onnx"))),
                  load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    group = next((a.i for n in m.graph.node if n.op_type == "MatMulNBits"
                  and not n.input[1].startswith("lm_head") for a in n.attribute
                  if a.name == "block_size"), None)
    if "lm_head.qweight" in inits:
        bits = next(a.i for n in m.graph.node if n.op_type == "MatMulNBits"
                    and n.input[1] == "lm_head.qweight" for a in n.attribute if a.name == "bits")
        head = f"int{bits}"
    else:
        head = {1: "fp32", 10: "fp16"}[inits["lm_head.weight_t"].data_type]
    spec = PLANS[man.precision]
    target = "gpu"
    norm = inits.get("transformer.ln_f.weight")
    if "cpu" in spec.targets and norm is not None and norm.data_type == 1 and \
            spec.target("gpu").act_dtype != "fp32":
        target = "cpu"
    keep = any(i.name == LOGITS_TO_KEEP for i in m.graph.input)
    return {"target": target, "group_size": group, "lm_head": head, "logits_to_keep": keep}


def _initializer_bytes(t: Any) -> int:
    for kv in t.external_data:
        if kv.key == "length":
            return int(kv.value)
    return len(t.raw_data)


def decoder_parts(path: Path) -> dict[str, int]:
    """Initializer bytes of a decoder ONNX file by the planner's parts."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    parts = dict.fromkeys(("linear", "lm_head", "embed", "other"), 0)
    for t in m.graph.initializer:
        n, b = t.name, _initializer_bytes(t)
        if n.startswith("lm_head."):
            parts["lm_head"] += b
        elif n.startswith("transformer.wte."):  # the table, or its codes and scales
            parts["embed"] += b
        elif n.startswith("transformer.h.") and (".attn.c_" in n or ".mlp." in n) \
                and not n.endswith(".bias"):
            parts["linear"] += b
        else:  # norms, biases, rotary tables, graph constants
            parts["other"] += b
    return parts


def engine_file_bytes(man: Any, engine: str) -> int:
    """Bytes of an engine's files in the bundle (the .onnx and its external data)."""
    name = man.engines.get(engine, {}).get("file", f"{engine}.onnx")
    return sum(int(f["size"]) for n, f in man.files.items() if n == name or
               n.startswith(name + ".") or n.startswith(name.rsplit(".", 1)[0] + ".onnx_data"))


def _config(man: Any, checkpoint: Path | None) -> Any:
    """The config the bundle was exported from: ``--checkpoint``, else the manifest's source
    checkpoint, else the nano one when the manifest's model facts are the nano's."""
    from models.config import QwenVLConfig
    from models.nano import default_checkpoint

    for c in (checkpoint, Path(str(man.data.get("source", {}).get("checkpoint", "")))):
        if c is not None and (c / "config.json").is_file():
            return QwenVLConfig.from_pretrained(c)
    cfg = QwenVLConfig.from_pretrained(default_checkpoint())
    m = man.model
    if (m["vocab_size"], m["hidden"], m["layers"]) != (cfg.vocab_size, cfg.hidden_size,
                                                       cfg.num_hidden_layers):
        raise SystemExit(f"{man.path}: its source checkpoint is not here; pass --checkpoint "
                         "(a directory with the config.json it was exported from)")
    return cfg


def sizes(man: Any, mem: Any) -> list[dict[str, Any]]:
    """Predicted vs actual bytes, per engine and decoder part."""
    dec = decoder_parts(man.file(man.engines.get("decoder", {}).get("file", "decoder.onnx")))
    rows = [("vision engine (files)", mem.vision_bytes, engine_file_bytes(man, "vision")),
            ("decoder engine (files)", mem.decoder_bytes, engine_file_bytes(man, "decoder")),
            ("  decoder linears", mem.decoder_linear_bytes, dec["linear"]),
            ("  lm_head", mem.lm_head_bytes, dec["lm_head"]),
            ("  embedding table", mem.embed_bytes, dec["embed"]),
            ("  norms, biases, rope", mem.other_bytes, dec["other"])]
    return [{"part": p, "predicted_bytes": int(pred), "actual_bytes": int(act),
             "ratio": round(pred / act, 4) if act else None} for p, pred, act in rows]


# ---------------------------------------------------------------------------------------------
# Peak RSS of the runtime (one fresh process per mode)
# ---------------------------------------------------------------------------------------------

def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(bundle: str, mode: str, new_tokens: int, image: str, threads: int | None) -> dict:
    """Runs in the measured process: load the bundle, answer one image, report RSS (MiB) and the
    peak of each phase (loading; vision until the decoder is needed; prefill and decode)."""
    from runtime import Pipeline

    start = _rss_mib("VmRSS")
    t = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, device="cpu", threads=threads, verify=False,
                                low_memory=mode == "low-memory")
    load_s = time.perf_counter() - t
    phases = {"load": peak_rss_and_reset_mib()}
    load_decoder = pipe._load_decoder

    def vision_done(tim: dict) -> None:  # the vision phase ends where the decoder is needed
        phases["vision"] = peak_rss_and_reset_mib()
        load_decoder(tim)

    pipe._load_decoder = vision_done
    res = pipe.chat("Describe the picture.", images=[image], max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, temperature=0).result()
    phases["decode"] = peak_rss_and_reset_mib()
    tim = res.timings
    return {"mode": mode, "rss_start_mib": round(start, 1),
            "peak_rss_mib": max(phases.values()), "phase_peak_rss_mib": phases,
            "rss_end_mib": round(_rss_mib("VmRSS"), 1),
            "load_s": round(load_s, 2), "vision_load_s": tim.get("vision_load_s"),
            "decoder_load_s": tim.get("decoder_load_s"), "vision_s": round(tim["vision_s"], 2),
            "prefill_s": round(tim["prefill_s"], 2), "prefill_tokens": tim["prefill_tokens"],
            "new_tokens": tim["new_tokens"], "tokens_used": res.prompt_tokens + len(res.token_ids),
            "vision_released": not pipe._vision.loaded}


def measure(bundle: Path, mode: str, new_tokens: int, image: Path,
            threads: int | None) -> dict[str, Any]:
    """``child`` in a fresh Python (no weights of this process, no shared arena)."""
    code = ("import json, sys; from bench.memory import child; "
            "print(json.dumps(child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], "
            "None if sys.argv[5] == '-' else int(sys.argv[5]))))")
    cmd = [sys.executable, "-c", code, str(bundle), mode, str(new_tokens), str(image),
           "-" if threads is None else str(threads)]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if out.returncode:
        raise RuntimeError(f"{mode} run of {bundle} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_rows(mem: Any, runs: list[dict[str, Any]], context: int) -> list[dict[str, Any]]:
    """Each measured peak RSS beside the planner's peak: as the plan prints it (its device
    allowance, KV at the budget) and for this CPU process (the measured start-up RSS in place of
    the allowance, KV at the tokens used: untouched KV pages are not resident)."""
    rows = []
    for r in runs:
        seq = r["mode"] == "low-memory"
        start = r["rss_start_mib"] * 2**20
        used, prompt = r["tokens_used"], r["prefill_tokens"]
        cpu = start + mem.peak_bytes(seq, used, prompt, on_cpu=True) - mem.overhead_bytes
        measured = r["peak_rss_mib"] * 2**20
        # the vision phase runs no decoder; the decode phase no vision engine (resident: both
        # stay loaded; low-memory: the decoder is loaded in the decode phase)
        vis = replace(mem, kv_bytes_per_token=0, logits_bytes_per_token=0,
                      cpu_load_transient_bytes=0,
                      **({"decoder_linear_bytes": 0, "lm_head_bytes": 0, "embed_bytes": 0,
                          "other_bytes": 0, "cpu_prepack_bytes": 0,
                          "cpu_cast_decoder_bytes": 0} if seq else {}))
        dec = replace(mem, **({"vision_bytes": 0, "cpu_cast_vision_bytes": 0,
                               "cpu_vision_act_bytes": 0} if seq else
                              {"cpu_load_transient_bytes": 0}))
        phases = {k: start - mem.overhead_bytes + m.peak_bytes(seq, used, prompt, on_cpu=True)
                  for k, m in (("vision", vis), ("decode", dec))}
        rows.append({"mode": r["mode"], "plan_peak_bytes": int(mem.peak_bytes(seq)),
                     "predicted_phase_bytes": {k: int(v) for k, v in phases.items()},
                     "measured_phase_bytes": {k: int(v * 2**20)
                                              for k, v in r["phase_peak_rss_mib"].items()},
                     "context_budget": context, "tokens_used": r["tokens_used"],
                     "process_start_rss_bytes": int(start),
                     "predicted_peak_bytes": int(cpu), "measured_peak_rss_bytes": int(measured),
                     "ratio": round(cpu / measured, 4), "run": r})
    return rows


def bundle_record(bundle: Path, args: argparse.Namespace, image: Path) -> dict[str, Any]:
    from exporters.memory_plan import plan_memory
    from runtime.bundle import verify_bundle

    man = verify_bundle(bundle, checksums=False)
    cfg = _config(man, args.checkpoint)
    settings = decoder_settings(man)
    mem = plan_memory(cfg, man.precision, args.device_profile, args.context, **settings)
    modes = [] if args.modes == "none" else [m.strip() for m in args.modes.split(",")]
    runs = [measure(bundle, m, args.new_tokens, image, args.threads) for m in modes]
    return {"bundle": str(bundle), "plan": man.precision, **settings,
            "device_profile": args.device_profile, "sizes": sizes(man, mem),
            "rss": rss_rows(mem, runs, args.context), "memory_plan": mem.as_dict()}


def table(rec: dict[str, Any]) -> str:
    def g(b: float) -> str:
        return f"{b / GB:8.3f} GB" if b >= 0.05 * GB else f"{b / 1e6:8.2f} MB"

    out = [f"{rec['bundle']}: plan {rec['plan']}, target {rec['target']}, group "
           f"{rec['group_size']}, lm_head {rec['lm_head']}",
           f"  {'part':24s} {'predicted':>11s} {'actual':>11s}  pred/actual"]
    for s in rec["sizes"]:
        out.append(f"  {s['part']:24s} {g(s['predicted_bytes'])} {g(s['actual_bytes'])}  "
                   f"{s['ratio'] if s['ratio'] is not None else '-'}")
    for r in rec["rss"]:
        out.append(f"  peak RSS {r['mode']:11s} predicted {g(r['predicted_peak_bytes'])}, measured "
                   f"{g(r['measured_peak_rss_bytes'])}, pred/measured {r['ratio']} ("
                   f"{r['tokens_used']} tokens; process start {g(r['process_start_rss_bytes'])}; "
                   f"plan: {g(r['plan_peak_bytes'])} at {r['context_budget']} tokens)")
        for ph, pred in r["predicted_phase_bytes"].items():
            out.append(f"    {ph + ' phase':15s} predicted {g(pred)}, measured "
                       f"{g(r['measured_phase_bytes'][ph])}")
    return "\n".join(out)


def _image(path: Path | None, work: Path) -> Path:
    if path is not None:
        return path
    from calib_data.synth import draw_grounding_scene

    img, _ = draw_grounding_scene(3, size=(640, 480))
    out = work / "scene.png"
    img.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from bench.common import host

    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        image = _image(args.image, Path(tmp))
        records = [bundle_record(b, args, image) for b in args.bundle]
    for rec in records:
        print(table(rec))
    result = {"bench": "memory", "host": host(), "new_tokens": args.new_tokens,
              "image": str(args.image or "synthetic 640x480 scene (seed 3)"), "bundles": records}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        from runtime.files import atomic_write_text
        atomic_write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
