"""Command line: ``python -m runtime --bundle DIR --image PATH --prompt TEXT [--draw out.png]``.

Streams the reply to stdout as it is generated; ``--json`` prints one JSON record instead (text,
token ids, boxes in original-image pixels, timings). Any error is one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (so `--threads -3` is refused, not silently used)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime",
        description="Chat with a Qwen-VL bundle (numpy + onnxruntime; no torch). The reply streams "
                    "to stdout; grounding boxes are reported in the original image's pixels.",
        epilog="examples:\n"
               "  python -m runtime --bundle bundle/ --image cat.jpg --prompt 'What is this?'\n"
               "  python -m runtime --bundle bundle/ --image cat.jpg --ref 'the cat' "
               "--draw boxes.png --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, metavar="DIR",
                   help="bundle directory (holds manifest.json)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file; repeat for several images (Picture 1, Picture 2, ...)")
    p.add_argument("--prompt", default="", metavar="TEXT",
                   help="the question or instruction; <ref>..</ref> and <box>..</box> typed "
                        "in it are grounding tags as in the original, <img> and <|im_start|> "
                        "stay plain text")
    p.add_argument("--ref", metavar="PHRASE",
                   help="ask for the box of PHRASE (appends <ref>PHRASE</ref> to the prompt)")
    p.add_argument("--system", metavar="TEXT", help="system message (default: the model's)")
    p.add_argument("--draw", metavar="OUT.png",
                   help="draw the boxes on the last image and save it here")
    p.add_argument("--json", action="store_true",
                   help="print one JSON record (text, token_ids, boxes, timings) instead of "
                        "streaming")
    g = p.add_argument_group("generation (defaults from the bundle)")
    g.add_argument("--max-new-tokens", type=positive_int, metavar="N")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    g.add_argument("--top-p", type=float, metavar="P")
    g.add_argument("--top-k", type=int, metavar="K")
    g.add_argument("--repetition-penalty", type=float, metavar="R")
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string (repeatable); not included in the output")
    e = p.add_argument_group("engines")
    e.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"),
                   help="auto: CUDA when onnxruntime-gpu has it, else CPU (default: auto)")
    e.add_argument("--threads", type=positive_int, metavar="N",
                   help="onnxruntime CPU threads (default: all cores)")
    e.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the bundle files (sizes are still checked)")
    add_low_memory_flag(e)
    return p


def add_low_memory_flag(group: argparse._ActionsContainer) -> None:
    """``--low-memory`` / ``--no-low-memory`` (default: what the bundle's memory plan says)."""
    group.add_argument("--low-memory", action=argparse.BooleanOptionalAction, default=None,
                       help="one engine resident at a time: load the vision engine, encode, "
                            "release it, then decode (reloaded for every request with images; "
                            "the plan of `export.py --plan-only` prints the cost). Default: on "
                            "when the bundle's memory plan says both engines do not fit together "
                            "on its device profile")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import EdgeError, report
    from .pipeline import Pipeline
    from .prompt import PromptError, Ref

    expected = (EdgeError, OSError, ValueError)
    try:
        if not args.prompt and not args.ref:
            raise PromptError("nothing to ask: pass --prompt TEXT and/or --ref PHRASE")
        if args.draw and not args.image:
            raise PromptError("--draw needs an --image to draw on")
        pipe = Pipeline.from_bundle(args.bundle, device=args.device, threads=args.threads,
                                    verify=not args.no_verify, low_memory=args.low_memory)
        query: Any = args.prompt
        if args.ref:
            query = ([args.prompt] if args.prompt else []) + [Ref(args.ref)]
        stream = pipe.chat(query, images=args.image, system=args.system,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, top_k=args.top_k,
                           repetition_penalty=args.repetition_penalty, seed=args.seed,
                           stop=args.stop)
        if args.json:
            result = stream.result()
        else:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            result = stream.result()
        drawn = None
        if args.draw:
            from .grounding import draw_boxes
            from .image import load_image
            img = load_image(args.image[-1], pipe.max_pixels)
            draw_boxes(img, result.boxes).save(args.draw)
            drawn = args.draw
        if args.json:
            record = result.to_dict()
            record["drawn"] = drawn
            print(json.dumps(record, ensure_ascii=False))
        else:
            for b in result.boxes:
                print(f"box {b.ref or '-'}: pixels {b.pixels} (grid {b.box})", file=sys.stderr)
            if drawn:
                print(f"wrote {drawn} ({len(result.boxes)} box(es))", file=sys.stderr)
        return 0
    except expected as e:
        return report(e)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
