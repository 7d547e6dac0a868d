"""The whole flow behind ``export.py``: checkpoint -> (GPTQ) -> engines -> validation -> bundle.

Each heavy step is a cached stage (exporters/stages.py) in a work directory beside the bundle, so a
rerun after a failure or an interruption resumes where it stopped. The bundle itself appears only
when everything, validation included, has finished: it is assembled in a temporary sibling and
renamed into place.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointReader
from models.config import QwenVLConfig
from quant.plans import DEFAULT_GROUP_SIZE, PLANS, exportable_plans
from runtime.errors import EXIT_FAILED_CHECK, EdgeError
from runtime.files import sha256_file

from .memory_plan import MemoryPlan, plan_memory
from .stages import StageResult, run_stage, stage_dir_only, stage_key

log = logging.getLogger(__name__)

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "calib_data" / "manifest.jsonl"
#: The int4 decoder for onnxruntime on CPU (``export.py --target cpu``): the int4 plan's ``cpu``
#: target in quant/plans.py, where the measurements behind it are cited.
CPU_FAST = PLANS["int4"].target("cpu").decoder_kwargs()


class ExportError(EdgeError, RuntimeError):
    """A failure the user can act on; export.py prints it as one line."""


@dataclass
class ExportOptions:
    checkpoint: Path | None = None  # None: the bundled nano checkpoint
    plan: str = "int4"  # fp32 | fp16 | int4
    calib: Path | None = None  # manifest JSONL/JSON, or a folder of images
    out: Path = Path("out/bundle")
    work_dir: Path | None = None  # default: <out>.work beside the bundle
    device_profile: str = "desktop"
    context: int | None = None
    force: bool = False  # go on when the memory plan does not fit
    allow_drift: bool = False  # write the bundle and exit 0 even when validation FAILs
    overwrite: bool = False  # replace an existing bundle of this toolkit from another source
    skip_validation: bool = False
    n_calib: int | None = None
    n_val: int | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    desc_act: bool = False
    damp_percent: float = 0.01
    lm_head: str = "int8"  # int8 | fp16 (int4 plan)
    cpu: bool = False  # decoder tuned for onnxruntime on CPU (the plan's "cpu" target)
    demo: bool = True
    demo_prompt: str | None = None

    @property
    def target(self) -> str:
        return "cpu" if self.cpu else "gpu"

    def resolved_work_dir(self) -> Path:
        return self.work_dir or self.out.parent / f"{self.out.name}.work"


@dataclass
class ExportReport:
    bundle: Path | None
    memory: MemoryPlan
    stages: list[StageResult] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    verdict: str = "n/a"  # PASS | FAIL | n/a
    demo: dict[str, Any] | None = None


def resolve_checkpoint(path: Path | None) -> Path:
    if path is None:
        from models.nano import default_checkpoint

        return default_checkpoint()
    if not Path(path).exists():
        raise ExportError(f"checkpoint not found: {path}: pass a Qwen-VL checkpoint directory "
                          "(config.json + weights)")
    return Path(path)


def _checkpoint_digest(ckpt: Path) -> str:
    reader = CheckpointReader(ckpt)
    return reader.fingerprint() + ":" + sha256_file(ckpt / "config.json")


def _source(ckpt: Path) -> dict[str, Any]:
    """The manifest's ``source`` for ``ckpt`` (what decides whether --out may be replaced)."""
    return {"checkpoint": str(ckpt), "index_sha256": CheckpointReader(ckpt).sha256_of_index()}


STAGES = ("data", "quant", "vision", "decoder", "candidate", "validate", "bundle")


def check_out(opts: ExportOptions, ckpt: Path) -> None:
    """Refuse an --out (or work dir) that must not or cannot be written, before any work, and
    remove what killed runs left behind there (only names this toolkit creates)."""
    from runtime.files import clean_leftovers

    from .bundle import BundleError, check_out_dir

    work = opts.resolved_work_dir()
    try:
        check_out_dir(opts.out, _source(ckpt), opts.overwrite)
    except BundleError as e:
        raise ExportError(str(e)) from None
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise ExportError(f"work directory {work} is a file: move it away or choose another --out")
    for name in STAGES:
        stage = work / name
        why = (f"{stage} is a file: move it away or choose another --out"
               if stage.is_symlink() or (stage.exists() and not stage.is_dir())
               else stage_dir_only(stage) if stage.is_dir() else None)
        if why:
            raise ExportError(why)
    clean_leftovers(opts.out.parent, opts.out.name)
    for name in STAGES:
        clean_leftovers(work, name)
    _drop_if_empty(work)


def _drop_if_empty(work: Path) -> None:
    try:
        work.rmdir()  # only succeeds when empty
    except OSError:
        pass


def run_export(opts: ExportOptions) -> ExportReport:
    """Run every stage; returns the report (raises ExportError with an actionable message)."""
    ckpt = resolve_checkpoint(opts.checkpoint)
    cfg = QwenVLConfig.from_pretrained(ckpt)
    check_out(opts, ckpt)
    try:
        return _run(opts, ckpt, cfg)
    finally:
        _drop_if_empty(opts.resolved_work_dir())


def _run(opts: ExportOptions, ckpt: Path, cfg: QwenVLConfig) -> ExportReport:
    from tqdm import tqdm

    quantized = bool(cfg.quantization_config)
    if opts.plan not in exportable_plans():
        raise ExportError(f"plan '{opts.plan}' cannot be exported: use one of "
                          f"{', '.join(exportable_plans())}")
    if quantized and not PLANS[opts.plan].quantized:
        raise ExportError(f"{ckpt} is already GPTQ-quantised: only --plan int4 can use it")
    mem = plan_memory(cfg, opts.plan, opts.device_profile, opts.context, target=opts.target)
    for line in mem.lines():
        log.info("%s", line)
    if not mem.fits and not opts.force:
        raise ExportError(f"plan '{opts.plan}' does not fit {opts.device_profile} "
                          f"({mem.usable_bytes / 1e9:.1f} GB usable): choose a smaller plan or "
                          "profile, or pass --force to build anyway")
    report = ExportReport(bundle=None, memory=mem)
    work = opts.resolved_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    digest = _checkpoint_digest(ckpt)
    bar = tqdm(total=len(STAGES), desc="export", unit="stage", disable=None)

    def done(res: StageResult | None = None) -> None:
        if res is not None:
            report.stages.append(res)
        bar.update(1)

    # ---- data -----------------------------------------------------------------------------
    items = _load_items(opts)
    calib_items = [it for it in items if it.split == "calib"][: opts.n_calib]
    val_items = [it for it in items if it.split == "validation"][: opts.n_val]
    data_key = stage_key(ids=[(it.id, it.sha256) for it in calib_items + val_items])
    done()

    # ---- quant ----------------------------------------------------------------------------
    gptq_dir: Path | None = None
    if PLANS[opts.plan].quantized:
        if quantized:
            gptq_dir = ckpt
            log.info("checkpoint is GPTQ-quantised already: GPTQ skipped")
            done()
        else:
            qkey = stage_key(ckpt=digest, data=data_key, g=opts.group_size, act=opts.desc_act,
                             damp=opts.damp_percent)
            res = run_stage(work, "quant", qkey,
                            lambda tmp: _quantize(ckpt, calib_items, opts, tmp))
            gptq_dir = res.path / "gptq"
            done(res)
    else:
        done()

    # ---- engines --------------------------------------------------------------------------
    vprec = PLANS[opts.plan].vision
    vres = run_stage(work, "vision", stage_key(ckpt=digest, precision=vprec),
                     lambda tmp: _export_vision(ckpt, vprec, calib_items, tmp))
    done(vres)
    qkey = next((s.key for s in report.stages if s.name == "quant"), "")
    dkey = stage_key(ckpt=digest, plan=opts.plan, quant=qkey, lm_head=opts.lm_head, cpu=opts.cpu)
    dres = run_stage(work, "decoder", dkey,
                     lambda tmp: _export_decoder(ckpt, gptq_dir, opts, tmp))
    done(dres)

    # ---- candidate bundle, validation, final bundle -----------------------------------------
    files = {**_engine_files(vres.path, "vision.onnx"), **_engine_files(dres.path, "decoder.onnx"),
             "tokenizer/qwen.tiktoken": ckpt / "qwen.tiktoken"}
    if not (ckpt / "qwen.tiktoken").is_file():
        raise ExportError(f"{ckpt} has no qwen.tiktoken: copy the tokenizer file from the "
                          "Hugging Face repo into the checkpoint directory")
    cres = run_stage(work, "candidate", stage_key(v=vres.key, d=dres.key),
                     lambda tmp: _write_candidate(tmp, files, ckpt, opts))
    done(cres)
    candidate = cres.path / "bundle"

    validation: dict[str, Any] | None = None
    report_files: dict[str, Path] = {}
    if not opts.skip_validation:
        vkey = stage_key(c=cres.key, data=data_key, plan=opts.plan)
        valres = run_stage(work, "validate", vkey,
                           lambda tmp: _validate(candidate, ckpt, val_items, opts, tmp))
        validation = valres.info
        report.validation = validation
        report.verdict = validation.get("verdict", "n/a")
        report_files = {f"report/{p.name}": p for p in sorted((valres.path / "report").glob("*"))
                        if p.is_file()}
        done(valres)
    else:
        done()
    if report.verdict == "FAIL" and not opts.allow_drift:
        bar.close()
        raise ExportError(
            f"validation FAILED ({', '.join(validation.get('failed', [])[:4]) if validation else ''}):"
            f" see {work / 'validate' / 'report' / 'drift.html'}; the bundle was not written "
            "(pass --allow-drift to write it anyway)", exit_code=EXIT_FAILED_CHECK)
    from .bundle import BundleError, manifest_fields, write_bundle

    fields = manifest_fields(ckpt, opts.plan, checkpoint_id=str(ckpt),
                             validation=_validation_summary(validation),
                             memory_plan={k: v for k, v in asdict(mem).items()})
    try:
        bundle = write_bundle(opts.out, {**files, **report_files}, fields,
                              overwrite=opts.overwrite)
    except BundleError as e:  # --out changed while we worked
        raise ExportError(str(e)) from None
    report.bundle = bundle
    done()
    bar.close()
    if opts.demo:
        report.demo = run_demo(bundle, opts.demo_prompt)
    return report


# ---------------------------------------------------------------------------------------------
# stage bodies
# ---------------------------------------------------------------------------------------------

def _load_items(opts: ExportOptions) -> list:
    from calib_data.manifest import load_manifest

    source = opts.calib or DEFAULT_MANIFEST
    if not Path(source).exists():
        raise ExportError(f"calibration set not found: {source}: pass --calib FILE.jsonl or a "
                          "folder of images")
    items = load_manifest(source)
    if not any(it.split == "calib" for it in items):
        raise ExportError(f"{source} has no 'calib' items: GPTQ needs image-conditioned "
                          "calibration prompts")
    return items


def _materialise(items: list, cache: Path) -> list:
    from calib_data.manifest import materialise

    return [materialise(it, cache) for it in items]


def _quantize(ckpt: Path, items: list, opts: ExportOptions, tmp: Path) -> dict[str, Any]:
    from models.checkpoint import load_model
    from quant.calibration import CalibItem, build_calibration
    from quant.checkpoint import save_gptq_checkpoint
    from quant.gptq import QuantConfig, quantize_decoder

    model = load_model(ckpt, "fp32")
    images = _materialise(items, tmp.parent / "images")
    calib = [CalibItem(image=img, prompt=it.query_parts(), answer=it.answer)
             for it, img in zip(items, images)]
    batches = build_calibration(model, calib, ckpt)
    qcfg = QuantConfig(bits=4, group_size=opts.group_size, sym=True, desc_act=opts.desc_act,
                       damp_percent=opts.damp_percent)
    result = quantize_decoder(model, batches, qcfg)
    save_gptq_checkpoint(model, result, qcfg, tmp / "gptq")
    return {"layers": len(result.losses),
            "mean_rel_loss": sum(l.rel_loss for l in result.losses) / max(1, len(result.losses))}


def _export_vision(ckpt: Path, precision: str, items: list, tmp: Path) -> dict[str, Any]:
    from .vision import export_vision

    source: Any = ckpt
    if QwenVLConfig.from_pretrained(ckpt).quantization_config:
        from quant.checkpoint import load_gptq_model

        # GPTQ checkpoints keep the vision tower in fp16, unquantised.
        source = load_gptq_model(ckpt, "fp32", prefixes=["transformer.visual."])
    photos = [it for it in items if it.task in ("caption", "vqa")][:3] or items[:3]
    res = export_vision(source, tmp / "vision.onnx", precision=precision,
                        check_images=_materialise(photos, tmp.parent / "images"))
    return res.to_dict()


def _export_decoder(ckpt: Path, gptq_dir: Path | None, opts: ExportOptions,
                    tmp: Path) -> dict[str, Any]:
    from .decoder import WeightSource, export_decoder

    plan = PLANS[opts.plan]
    if plan.quantized:
        from quant.checkpoint import load_gptq_checkpoint

        # Everything comes from the GPTQ checkpoint (fp16 embeddings/norms as stored there), so
        # the engine equals the fake-quant reference load_gptq_model() builds from the same files.
        _, tensors, _ = load_gptq_checkpoint(gptq_dir)
        res = export_decoder(WeightSource.from_checkpoint(gptq_dir), tmp / "decoder.onnx",
                             plan=opts.plan, quant_tensors=tensors, group_size=opts.group_size,
                             lm_head=opts.lm_head, **plan.target(opts.target).decoder_kwargs())
    else:
        res = export_decoder(WeightSource.from_checkpoint(ckpt), tmp / "decoder.onnx",
                             plan=opts.plan)
    return res.to_dict()


def _engine_files(stage_dir: Path, name: str) -> dict[str, Path]:
    """The engine plus what its exporter wrote beside it (TensorRT scripts, check inputs).

    External-data files are added by write_bundle itself; names stay flat so the scripts'
    relative paths keep working inside the bundle.
    """
    out = {name: stage_dir / name}
    for extra in sorted(stage_dir.iterdir()):
        if extra.is_file() and extra.name != "stage.json" and not extra.name.startswith(name):
            out[extra.name] = extra
    return out


def _write_candidate(tmp: Path, files: dict[str, Path], ckpt: Path,
                     opts: ExportOptions) -> dict[str, Any]:
    from .bundle import manifest_fields, write_bundle

    write_bundle(tmp / "bundle", files, manifest_fields(ckpt, opts.plan, checkpoint_id=str(ckpt)))
    return {}


def _validate(bundle: Path, ckpt: Path, items: list, opts: ExportOptions,
              tmp: Path) -> dict[str, Any]:
    from models.checkpoint import load_model
    from validate.stages import run_validation

    if QwenVLConfig.from_pretrained(ckpt).quantization_config:
        from quant.checkpoint import load_gptq_model

        # An official Int4 checkpoint has no fp weights: its fake-quant model is the reference.
        reference = load_gptq_model(ckpt, "fp32")
    else:
        reference = load_model(ckpt, "fp32")
    rep = run_validation(bundle, reference, items, opts.plan, tmp / "report",
                         cache_dir=tmp.parent / "images")
    return rep.summary() if hasattr(rep, "summary") else dict(rep)


def _validation_summary(v: dict[str, Any] | None) -> dict[str, Any] | None:
    if not v:
        return None
    return {k: v[k] for k in ("verdict", "failed", "metrics") if k in v}


def run_demo(bundle: Path, prompt: str | None = None) -> dict[str, Any]:
    """Ask the finished bundle one question about a sample image; stream the answer to stdout.

    Sampled as the checkpoint's generation config says (Qwen-VL-Chat: top-p 0.3), with a fixed
    seed, so that rerunning the export of the same bundle prints the same answer."""
    from calib_data.synth import draw_grounding_scene
    from runtime import Pipeline
    from runtime.grounding import draw_boxes

    image, objects = draw_grounding_scene(7)
    target = objects[0]
    question = prompt or f"Where is the {target.color} {target.shape}?"
    pipe = Pipeline.from_bundle(bundle)
    sys.stdout.write(f"\nQ: {question}\nA: ")
    stream = pipe.chat(question, images=[image], max_new_tokens=48, seed=0)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    res = stream.result()
    sys.stdout.write("\n")
    demo_png = bundle.parent / f"{bundle.name}-demo.png"
    draw_boxes(image, res.boxes).save(demo_png)
    for b in res.boxes:
        sys.stdout.write(f"box: {b.ref!r} -> pixels {b.pixels}\n")
    sys.stdout.write(f"(boxes drawn in {demo_png}; truth for the {target.color} {target.shape}: "
                     f"{tuple(target.box)})\n")
    return {"question": question, "answer": res.text, "boxes": [asdict(b) for b in res.boxes],
            "truth": list(target.box), "image": str(demo_png)}


def report_json(rep: ExportReport) -> str:
    return json.dumps({"bundle": str(rep.bundle), "verdict": rep.verdict,
                       "memory": asdict(rep.memory),
                       "stages": [{"name": s.name, "cached": s.cached, "seconds": round(s.seconds, 2)}
                                  for s in rep.stages],
                       "demo": rep.demo}, indent=2, default=str)
