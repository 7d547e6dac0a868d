#!/usr/bin/env python3
"""qwenvl-edge: turn a Qwen-VL checkpoint into a validated edge bundle.

With no arguments it runs the whole flow on the bundled nano checkpoint: calibration set ->
GPTQ int4 -> vision and decoder ONNX engines -> staged drift report -> bundle -> one demo answer.
All logic lives in exporters/pipeline.py; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EPILOG = """\
examples:
  python export.py                                   # nano checkpoint, int4 plan, ./out/bundle
  python export.py --checkpoint ~/Qwen-VL-Chat --plan int4 --device-profile agx-orin-32gb
  python export.py --checkpoint ~/Qwen-VL-Chat-Int4  # official GPTQ checkpoint: GPTQ is skipped
  python export.py --plan fp16 --calib my_items.jsonl --out out/fp16
  python export.py --plan-only --checkpoint ~/Qwen-VL-Chat --device-profile orin-nx-16gb

then run the bundle (no torch needed):
  python -m runtime --bundle out/bundle --image photo.jpg --prompt "What is in the picture?"

stages are cached in <out>.work/: rerunning after a failure resumes where it stopped.
exit codes: 0 ok, 1 validation FAILED (bundle not written unless --allow-drift) or INCONCLUSIVE (a
drift gate could not be judged: not written unless --accept-inconclusive), 2 usage or input error.
"""


def build_parser() -> argparse.ArgumentParser:
    from exporters.memory_plan import PROFILES
    from quant.plans import DEFAULT_GROUP_SIZE, exportable_plans
    from runtime.__main__ import positive_int

    p = argparse.ArgumentParser(
        prog="export.py", description=__doc__.split("\n\n")[0] + ".",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="Hugging Face checkpoint directory (Qwen/Qwen-VL, Qwen-VL-Chat or "
                        "Qwen-VL-Chat-Int4). Default: the bundled nano checkpoint")
    p.add_argument("--plan", choices=exportable_plans(), default="int4",
                   help="precision plan (default int4: GPTQ int4 decoder, int8 LM head, fp16 vision "
                        "with fp32 norms)")
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration/validation items: a manifest .jsonl/.json or a folder of "
                        "images (default: calib_data/manifest.jsonl)")
    p.add_argument("--out", type=Path, default=Path("out/bundle"),
                   help="bundle directory to write (default out/bundle). An existing --out is "
                        "replaced only when it is a bundle of this toolkit from the same "
                        "checkpoint (or with --overwrite); anything else is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle of this toolkit made from another checkpoint")
    p.add_argument("--device-profile", choices=sorted(PROFILES), default="desktop",
                   help="target device for the memory plan (default desktop)")
    p.add_argument("--context", type=int, default=None,
                   help="context length the plan must hold (default: the model's 2048)")
    p.add_argument("--force", action="store_true",
                   help="build even when the memory plan says it does not fit")
    p.add_argument("--plan-only", action="store_true", help="print the memory plan and stop")
    p.add_argument("--allow-drift", action="store_true",
                   help="write the bundle and exit 0 even when validation FAILs")
    p.add_argument("--accept-inconclusive", action="store_true",
                   help="write the bundle when a drift gate could not be judged (e.g. the "
                        "reference model emits no boxes); the report still says INCONCLUSIVE")
    p.add_argument("--skip-validation", action="store_true", help="do not run the drift report")
    p.add_argument("--n-calib", type=positive_int, default=None,
                   help="use at most N calibration items")
    p.add_argument("--n-val", type=positive_int, default=None,
                   help="use at most N validation items")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                   help=f"GPTQ group size (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--act-order", action="store_true", help="GPTQ with act-order (desc_act)")
    p.add_argument("--lm-head", choices=["int8", "int4", "fp16"], default=None,
                   help="LM head precision in the int4 and edge plans (default: the plan's, int8; "
                        "int4: groups of 32, see bench/RESULTS.md for its size and KL)")
    p.add_argument("--lm-head-method", choices=["gptq", "rtn"], default="gptq",
                   help="how an int4 LM head is quantised: gptq (default; on the Hessian of its "
                        "inputs over the calibration split, cached with the decoder's GPTQ) or "
                        "rtn (round-to-nearest); a GPTQ-quantised checkpoint gets rtn")
    p.add_argument("--target", choices=["gpu", "cpu"], default="gpu",
                   help="what runs the int4 decoder: gpu (fp16 activations, exact MatMulNBits) or "
                        "cpu (fp32 activations and KV cache, int8-quantised MatMulNBits inputs: "
                        "3.6x faster decode than the gpu settings on onnxruntime CPU, "
                        "bench/RESULTS.md; slightly less exact)")
    p.add_argument("--no-demo", action="store_true", help="skip the demo answer at the end")
    p.add_argument("--demo-prompt", default=None, help="question for the demo answer")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname).1s %(name)s: %(message)s")
    from exporters.pipeline import ExportOptions, report_json, run_export
    from runtime.errors import EdgeError, report

    try:
        if args.plan_only:
            from exporters.memory_plan import head_dtype, plan_memory
            from exporters.pipeline import resolve_checkpoint
            from models.config import QwenVLConfig

            cfg = QwenVLConfig.from_pretrained(resolve_checkpoint(args.checkpoint))
            mem = plan_memory(cfg, args.plan, args.device_profile, args.context,
                              target=args.target, group_size=args.group_size,
                              lm_head=head_dtype(args.plan, args.lm_head))
            print("\n".join(mem.lines()))
            return 0 if mem.fits else 1
        opts = ExportOptions(
            checkpoint=args.checkpoint, plan=args.plan, calib=args.calib, out=args.out,
            device_profile=args.device_profile, context=args.context, force=args.force,
            allow_drift=args.allow_drift, overwrite=args.overwrite,
            accept_inconclusive=args.accept_inconclusive,
            skip_validation=args.skip_validation,
            n_calib=args.n_calib, n_val=args.n_val, group_size=args.group_size,
            desc_act=args.act_order, lm_head=args.lm_head, head_method=args.lm_head_method,
            cpu=args.target == "cpu",
            demo=not args.no_demo,
            demo_prompt=args.demo_prompt)
        rep = run_export(opts)
    except (EdgeError, ValueError, FileNotFoundError, FileExistsError) as e:
        if args.verbose:
            raise
        return report(e)
    except KeyboardInterrupt:
        print("export.py: interrupted; finished stages are cached, rerun to resume",
              file=sys.stderr)
        return 130
    print(f"bundle: {rep.bundle}  validation: {rep.verdict}")
    if args.json:
        print(report_json(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
