"""The whole flow behind ``export.py``: checkpoint -> (GPTQ) -> engines -> validation -> bundle.

Each heavy step is a cached stage (exporters/stages.py) in a work directory beside the bundle, so a
rerun after a failure or an interruption resumes where it stopped. The bundle itself appears only
when everything, validation included, has finished: it is assembled in a temporary sibling and
renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.checkpoint import CheckpointReader
from models.config import QwenVLConfig
from quant.plans import (DEFAULT_GROUP_SIZE, PLANS, QUANTIZED_VISION, exportable_plans,
                         traced_vision)
from runtime.contract import DECODER_IO_VERSION
from runtime.errors import EXIT_FAILED_CHECK, EdgeError
from runtime.files import sha256_file

from .memory_plan import MemoryPlan, head_dtype, plan_memory
from .stages import StageResult, run_stage, stage_dir_only, stage_key

log = logging.getLogger(__name__)

DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "calib_data" / "manifest.jsonl"
#: The int4 decoder for onnxruntime on CPU (``export.py --target cpu``): the int4 plan's ``cpu``
#: target in quant/plans.py, where the measurements behind it are cited.
CPU_FAST = PLANS["int4"].target("cpu").decoder_kwargs()
KV_SCALES_FILE = "kv_scales.npz"  # the kv_scales stage's output (quant.kv_scales.KVScales)


class ExportError(EdgeError, RuntimeError):
    """A failure the user can act on; export.py prints it as one line."""


@dataclass
class ExportOptions:
    checkpoint: Path | None = None  # None: the bundled nano checkpoint
    plan: str = "int4"  # fp32 | fp16 | int4 | edge
    calib: Path | None = None  # manifest JSONL/JSON, or a folder of images
    out: Path = Path("out/bundle")
    work_dir: Path | None = None  # default: <out>.work beside the bundle
    device_profile: str = "desktop"
    context: int | None = None
    force: bool = False  # go on when the memory plan does not fit
    allow_drift: bool = False  # write the bundle and exit 0 even when validation FAILs
    overwrite: bool = False  # replace an existing bundle of this toolkit from another source
    accept_inconclusive: bool = False  # write the bundle when a drift gate could not be judged
    skip_validation: bool = False
    n_calib: int | None = None
    n_val: int | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    desc_act: bool = False
    damp_percent: float = 0.01
    lm_head: str | None = None  # int8 | int4 | fp16 (quantised plans); None: the plan row's
    # how an int4 head is quantised when GPTQ runs: gptq (on the head's calibration Hessian) | rtn
    head_method: str = "gptq"
    cpu: bool = False  # decoder tuned for onnxruntime on CPU (the plan's "cpu" target)
    demo: bool = True
    demo_prompt: str | None = None

    @property
    def target(self) -> str:
        return "cpu" if self.cpu else "gpu"

    @property
    def head(self) -> str:
        """The LM head dtype exported: ``lm_head`` for the quantised plans, else the plan row's."""
        return head_dtype(self.plan, self.lm_head)

    def gptq_head(self) -> bool:
        """GPTQ quantises the LM head too: an int4 head of a plan whose decoder GPTQ runs."""
        return self.head == "int4" and self.head_method == "gptq"

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


@dataclass
class LoadedCheckpoint:
    """A checkpoint directory with its ``config.json`` parsed once; the stages get this, not a
    path, so nothing below re-reads the config."""

    path: Path
    cfg: QwenVLConfig

    @classmethod
    def open(cls, path: Path | None) -> "LoadedCheckpoint":
        ckpt = resolve_checkpoint(path)
        return cls(ckpt, QwenVLConfig.from_pretrained(ckpt))

    @property
    def quantized(self) -> bool:
        """An already GPTQ-quantised checkpoint (e.g. Qwen-VL-Chat-Int4)."""
        return bool(self.cfg.quantization_config)

    def digest(self) -> str:
        """Weights fingerprint + config hash: the stage keys' identity of this checkpoint."""
        return CheckpointReader(self.path).fingerprint() + ":" + sha256_file(self.path /
                                                                             "config.json")

    def tokenizer_file(self) -> dict[str, Path]:
        tok = self.path / "qwen.tiktoken"
        if not tok.is_file():
            raise ExportError(f"{self.path} has no qwen.tiktoken: copy the tokenizer file from the "
                              "Hugging Face repo into the checkpoint directory")
        return {"tokenizer/qwen.tiktoken": tok}


def _source(ckpt: Path) -> dict[str, Any]:
    """The manifest's ``source`` for ``ckpt`` (what decides whether --out may be replaced)."""
    return {"checkpoint": str(ckpt), "index_sha256": CheckpointReader(ckpt).sha256_of_index()}


STAGES = ("data", "quant", "kv_scales", "vision", "decoder", "candidate", "validate", "bundle")


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
    ckpt = LoadedCheckpoint.open(opts.checkpoint)
    check_out(opts, ckpt.path)
    try:
        return _run(opts, ckpt)
    finally:
        _drop_if_empty(opts.resolved_work_dir())


def _run(opts: ExportOptions, ckpt: LoadedCheckpoint) -> ExportReport:
    from tqdm import tqdm

    if opts.plan not in exportable_plans():
        raise ExportError(f"plan '{opts.plan}' cannot be exported: use one of "
                          f"{', '.join(exportable_plans())}")
    if ckpt.quantized and not PLANS[opts.plan].quantized:
        raise ExportError(f"{ckpt.path} is already GPTQ-quantised: only a quantised plan "
                          f"({', '.join(n for n in exportable_plans() if PLANS[n].quantized)}) "
                          "can use it")
    if PLANS[opts.plan].quantized and not ckpt.quantized:  # before the calibration pass
        _quant_config(opts).validate((ckpt.cfg.hidden_size, ckpt.cfg.ffn_dim))
    report = ExportReport(bundle=None, memory=_memory_plan(ckpt.cfg, opts))
    work = opts.resolved_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(STAGES), desc="export", unit="stage", disable=None) as bar:
        flow = _Flow(opts, ckpt, ckpt.digest(), work, report, bar)
        calib_items, val_items, data_key = flow.data()
        gptq_dir = flow.quant(calib_items, data_key)
        kv_scales = flow.kv_scales(calib_items, data_key, gptq_dir)
        files = flow.engines(calib_items, gptq_dir, kv_scales)
        candidate = flow.candidate(files)
        report_files = flow.validate(candidate, val_items, data_key, gptq_dir, kv_scales)
        report.bundle = flow.bundle(files, report_files)
    if opts.demo:
        report.demo = run_demo(report.bundle, opts.demo_prompt)
    return report


def _memory_plan(cfg: QwenVLConfig, opts: ExportOptions) -> MemoryPlan:
    mem = plan_memory(cfg, opts.plan, opts.device_profile, opts.context, target=opts.target,
                      group_size=opts.group_size, lm_head=opts.head)
    for line in mem.lines():
        log.info("%s", line)
    if not mem.fits and not opts.force:
        raise ExportError(f"plan '{opts.plan}' does not fit {opts.device_profile} "
                          f"({mem.usable_bytes / 1e9:.1f} GB usable): choose a smaller plan or "
                          "profile, or pass --force to build anyway")
    return mem


@dataclass
class _Flow:
    """The stages of one export, in order; each cached in ``work`` (exporters/stages.py)."""

    opts: ExportOptions
    ckpt: LoadedCheckpoint
    digest: str
    work: Path
    report: ExportReport
    bar: Any
    engine_keys: tuple[str, str] = ("", "")  # vision, decoder stage keys

    def _done(self, res: StageResult | None = None) -> None:
        if res is not None:
            self.report.stages.append(res)
        self.bar.update(1)

    def data(self) -> tuple[list, list, str]:
        items = _load_items(self.opts)
        calib = [it for it in items if it.split == "calib"][: self.opts.n_calib]
        val = [it for it in items if it.split == "validation"][: self.opts.n_val]
        if not val and not self.opts.skip_validation:  # found now, not after GPTQ
            raise ExportError(f"{self.opts.calib or DEFAULT_MANIFEST} has no 'validation' items: "
                              "the drift report needs some; add them, or pass "
                              "--skip-validation to build an unchecked bundle")
        self._done()
        return calib, val, stage_key(ids=[(it.id, it.sha256) for it in calib + val])

    def quant(self, calib_items: list, data_key: str) -> Path | None:
        opts = self.opts
        quantized = PLANS[opts.plan].quantized
        if not quantized or self.ckpt.quantized:
            if quantized:
                log.info("checkpoint is GPTQ-quantised already: GPTQ skipped%s",
                         "; the int4 LM head is rounded to nearest (no calibration pass)"
                         if opts.gptq_head() else "")
            self._done()
            return self.ckpt.path if quantized else None
        head = {}
        if opts.gptq_head():  # the GPTQ checkpoint then holds the head too (cached with it)
            from quant.lm_head import INT4_GROUP

            head = {"head": ["gptq", INT4_GROUP]}
        qkey = stage_key(ckpt=self.digest, data=data_key, g=opts.group_size, act=opts.desc_act,
                         damp=opts.damp_percent, **head)
        res = run_stage(self.work, "quant", qkey,
                        lambda tmp: _quantize(self.ckpt, calib_items, opts, tmp))
        self._done(res)
        return res.path / "gptq"

    def kv_scales(self, calib_items: list, data_key: str, gptq_dir: Path | None) -> Path | None:
        """Static int8-KV scales (quant/kv_scales.py) when the target stores an int8 cache:
        calibrated on the calibration split through the model the decoder is built from."""
        opts = self.opts
        if not PLANS[opts.plan].target(opts.target).int8_kv:
            self._done()
            return None
        qkey = next((s.key for s in self.report.stages if s.name == "quant"), "")
        # the GPTQ codes are keyed by the quant stage (an imported Int4 one by the checkpoint)
        key = stage_key(ckpt=self.digest, data=data_key, quant=qkey, kv="amax/127 per channel")
        res = run_stage(self.work, "kv_scales", key,
                        lambda tmp: _calibrate_kv(self.ckpt, gptq_dir, calib_items, tmp))
        self._done(res)
        return res.path / KV_SCALES_FILE

    def engines(self, calib_items: list, gptq_dir: Path | None,
                kv_scales: Path | None = None) -> dict[str, Path]:
        opts, ckpt = self.opts, self.ckpt
        vprec = PLANS[opts.plan].vision_dtype(opts.target)
        vkey = stage_key(ckpt=self.digest, precision=vprec)
        if vprec in QUANTIZED_VISION:  # calibrated: the calibration set and settings count too
            from quant.vision_int8 import Int8Config

            vkey = stage_key(v=vkey, calib=[(it.id, it.sha256) for it in calib_items],
                             int8=Int8Config().to_dict())
        vres = run_stage(self.work, "vision", vkey,
                         lambda tmp: _export_vision(ckpt, vprec, calib_items, tmp))
        self._done(vres)
        qkey = next((s.key for s in self.report.stages if s.name == "quant"), "")
        kvkey = next((s.key for s in self.report.stages if s.name == "kv_scales"), "")
        # the target's decoder settings (attention, bias, dtypes) and the graph's I/O contract
        # key the stage: a changed plan row or contract re-exports a cached decoder
        dkey = stage_key(ckpt=self.digest, plan=opts.plan, quant=qkey, lm_head=opts.head,
                         cpu=opts.cpu, io=DECODER_IO_VERSION,
                         target=PLANS[opts.plan].target(opts.target).decoder_kwargs(),
                         **({"kv": kvkey} if kvkey else {}))
        dres = run_stage(self.work, "decoder", dkey,
                         lambda tmp: _export_decoder(ckpt, gptq_dir, opts, tmp, kv_scales))
        self._done(dres)
        self.engine_keys = (vres.key, dres.key)
        return {**_engine_files(vres.path, "vision.onnx"),
                **_engine_files(dres.path, "decoder.onnx"), **ckpt.tokenizer_file()}

    def candidate(self, files: dict[str, Path]) -> Path | None:
        """The bundle the drift report judges; none with --skip-validation (nothing reads it,
        and at full size it is another 6.7 GB copy of the engines)."""
        if self.opts.skip_validation:
            self._done()
            return None
        cres = run_stage(self.work, "candidate",
                         stage_key(v=self.engine_keys[0], d=self.engine_keys[1]),
                         lambda tmp: _write_candidate(tmp, files, self.ckpt, self.opts))
        self._done(cres)
        return cres.path / "bundle"

    def validate(self, candidate: Path | None, val_items: list, data_key: str,
                 gptq_dir: Path | None, kv_scales: Path | None = None) -> dict[str, Path]:
        """Run the drift report (unless skipped); raises on FAIL without ``--allow-drift`` and on
        INCONCLUSIVE without ``--accept-inconclusive`` (or ``--allow-drift``)."""
        from validate.thresholds import fingerprint

        opts, report = self.opts, self.report
        if opts.skip_validation:
            self._done()
            return {}
        ckey = next(s.key for s in report.stages if s.name == "candidate")
        # keyed on the bounds too: a changed threshold re-judges (and re-runs) the report
        vkey = stage_key(c=ckey, data=data_key, plan=opts.plan, same_precision=True,
                         gates=fingerprint(opts.plan, opts.target))
        valres = run_stage(self.work, "validate", vkey,
                           lambda tmp: _validate(candidate, self.ckpt, val_items, opts, tmp,
                                                 gptq_dir, kv_scales))
        report.validation = valres.info
        report.verdict = valres.info.get("verdict", "n/a")
        self._done(valres)
        if report.verdict == "FAIL" and not opts.allow_drift:
            raise ExportError(
                f"validation FAILED ({', '.join(valres.info.get('failed', [])[:4])}): see "
                f"{self.work / 'validate' / 'report' / 'drift.html'}; the bundle was not written "
                "(pass --allow-drift to write it anyway)", exit_code=EXIT_FAILED_CHECK)
        if report.verdict == "INCONCLUSIVE" and not (opts.accept_inconclusive or opts.allow_drift):
            raise ExportError(
                f"validation INCONCLUSIVE ({'; '.join(valres.info.get('inconclusive', [])[:2])}): "
                f"see {self.work / 'validate' / 'report' / 'drift.html'}; the bundle was not "
                "written (pass --accept-inconclusive to write it anyway)",
                exit_code=EXIT_FAILED_CHECK)
        return {f"report/{p.name}": p for p in sorted((valres.path / "report").glob("*"))
                if p.is_file()}

    def bundle(self, files: dict[str, Path], report_files: dict[str, Path]) -> Path:
        from .bundle import BundleError, manifest_fields, write_bundle

        ckpt, opts = self.ckpt, self.opts
        fields = manifest_fields(ckpt.path, opts.plan, checkpoint_id=str(ckpt.path), cfg=ckpt.cfg,
                                 vision_precision=PLANS[opts.plan].vision_dtype(opts.target),
                                 target=opts.target,
                                 validation=_validation_summary(self.report.validation),
                                 memory_plan={k: v for k, v in asdict(self.report.memory).items()})
        try:
            bundle = write_bundle(opts.out, {**files, **report_files}, fields,
                                  overwrite=opts.overwrite)
        except BundleError as e:  # --out changed while we worked
            raise ExportError(str(e)) from None
        self._done()
        return bundle


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


def _quant_config(opts: ExportOptions) -> Any:
    """The GPTQ settings of an export (``quant.gptq.QuantConfig``)."""
    from quant.gptq import QuantConfig

    return QuantConfig(bits=4, group_size=opts.group_size, sym=True, desc_act=opts.desc_act,
                       damp_percent=opts.damp_percent)


def _quantize(ckpt: LoadedCheckpoint, items: list, opts: ExportOptions,
              tmp: Path) -> dict[str, Any]:
    from models.checkpoint import load_model
    from quant.calibration import CalibItem, build_calibration
    from quant.checkpoint import save_gptq_checkpoint
    from quant.gptq import quantize_decoder
    from quant.lm_head import INT4_GROUP

    model = load_model(ckpt.path, "fp32", cfg=ckpt.cfg)
    images = _materialise(items, tmp.parent / "images")
    calib = [CalibItem(image=img, prompt=it.query_parts(), answer=it.answer)
             for it, img in zip(items, images)]
    batches = build_calibration(model, calib, ckpt.path)
    qcfg = _quant_config(opts)
    result = quantize_decoder(model, batches, qcfg, keep_outputs=opts.gptq_head())
    head = _gptq_head(model, result, opts) if opts.gptq_head() else None
    save_gptq_checkpoint(model, result, qcfg, tmp / "gptq", head=head)
    return {"layers": len(result.losses),
            "mean_rel_loss": sum(l.rel_loss for l in result.losses) / max(1, len(result.losses)),
            "lm_head": f"gptq int4 g{INT4_GROUP}" if head is not None else None}


def _gptq_head(model: Any, result: Any, opts: ExportOptions) -> Any:
    """GPTQ int4 LM head on the Hessian of its inputs: the calibration prompts' hidden states
    after the GPTQ decoder (``result.outputs``) and the final norm (quant/lm_head.py)."""
    from quant.lm_head import INT4_GROUP, gptq_head, head_hessian

    hessian = head_hessian(model.transformer.ln_f, result.outputs)
    result.outputs = []
    return gptq_head(model.lm_head.weight, hessian, INT4_GROUP, desc_act=opts.desc_act,
                     damp_percent=opts.damp_percent, progress=True)


def _calibrate_kv(ckpt: LoadedCheckpoint, gptq_dir: Path | None, items: list,
                  tmp: Path) -> dict[str, Any]:
    """int8-KV scales from the calibration items (image-conditioned, teacher-forced answers),
    run through the model the decoder is built from: the GPTQ checkpoint's dequantised weights
    for a quantised plan (an imported Int4 checkpoint included), else the reference; the
    vision tower and embedding table make the inputs, then one decoder block at a time."""
    from quant.calibration import CalibItem, build_calibration
    from quant.gptq import CheckpointBlocks
    from quant.kv_scales import calibrate_kv_blocks, scales_info

    front = ["transformer.visual.", "transformer.wte."]  # what the calibration inputs need
    if gptq_dir is not None:
        from quant.checkpoint import GPTQBlocks, load_gptq_model

        cfg = ckpt.cfg if gptq_dir == ckpt.path else None
        model = load_gptq_model(gptq_dir, "fp32", prefixes=front, cfg=cfg).eval()
        blocks: Any = GPTQBlocks(gptq_dir, cfg)
    else:
        model, blocks = _reference_model(ckpt, front), CheckpointBlocks(ckpt.path, ckpt.cfg)
    images = _materialise(items, tmp.parent / "images")
    calib = [CalibItem(image=img, prompt=it.query_parts(), answer=it.answer)
             for it, img in zip(items, images)]
    batches = build_calibration(model, calib, ckpt.path)
    del model  # one decoder block at a time from here on
    scales = calibrate_kv_blocks(blocks, batches)
    scales.save(tmp / KV_SCALES_FILE)
    return {"items": len(calib), **scales_info(scales)}


def _reference_model(ckpt: LoadedCheckpoint, prefixes: list[str] | None = None) -> Any:
    """The fp32 PyTorch reference; for an official Int4 checkpoint (no fp weights) its
    fake-quant model (its vision tower is stored in fp16, unquantised)."""
    if ckpt.quantized:
        from quant.checkpoint import load_gptq_model

        return load_gptq_model(ckpt.path, "fp32", prefixes=prefixes, cfg=ckpt.cfg)
    from models.checkpoint import load_model

    return load_model(ckpt.path, "fp32", prefixes=prefixes, cfg=ckpt.cfg)


def _export_vision(ckpt: LoadedCheckpoint, precision: str, items: list,
                   tmp: Path) -> dict[str, Any]:
    """The vision engine of ``precision``; an int8 one is the fp32 graph statically quantised
    on the calibration split's images (``items``), then checked against that fp32 graph."""
    from .vision import export_vision

    # A path (GPTQ or not) lets export_vision load the tower and free it while exporting: a
    # module held here would stay alive through the check and the int8 calibration.
    photos = [it for it in items if it.task in ("caption", "vqa")][:3] or items[:3]
    traced = traced_vision(precision)
    dest = tmp / "vision.onnx" if traced == precision else tmp / "traced" / "vision.onnx"
    dest.parent.mkdir(parents=True, exist_ok=True)
    photo_images = _materialise(photos, tmp.parent / "images")
    res = export_vision(ckpt.path, dest, precision=traced, check_images=photo_images,
                        config=ckpt.cfg, write_trt_script=traced == precision)
    if traced == precision:
        return res.to_dict()
    info = _quantize_vision(ckpt, res, photo_images, items, tmp)
    shutil.rmtree(dest.parent)  # the fp32 graph was only the quantiser's input
    return info


def _quantize_vision(ckpt: LoadedCheckpoint, traced: Any, photos: list, items: list,
                     tmp: Path) -> dict[str, Any]:
    """int8 QDQ engine (quant/vision_int8.py) from the traced fp32 graph, calibrated on the
    calibration split only; checked on the export's photos against the fp32 engine (itself
    checked against PyTorch) with the int8 tolerances, and given its TensorRT commands."""
    from quant.vision_int8 import Int8Config, calibration_images, quantize_vision

    from .check_images import check_pixels
    from .tensorrt import trt_command_files, write_trt_commands
    from .vision import (VisionCheckError, VisionTolerances, compare_vision, make_session,
                         run_session)

    image_size = ckpt.cfg.visual.image_size
    calib = calibration_images(items, image_size, Int8Config().pictures)
    out = tmp / "vision.onnx"
    q = quantize_vision(traced.onnx_path, out, calib, cache_dir=tmp / "traced")
    names, pixels = check_pixels(photos, image_size)
    ref = run_session(make_session(traced.onnx_path), pixels)
    tol = VisionTolerances.for_precision("int8")
    metrics = compare_vision(out, ref, pixels, names=names, tolerances=tol)
    for m in metrics:
        log.info("check int8 vs fp32 engine [%s]: %s", "ok" if m.passed else "FAIL", m.line())
    failed = [m for m in metrics if not m.passed]
    if failed:
        out.unlink()
        raise VisionCheckError("int8 vision engine check FAILED: " + "; ".join(
            f"{m.name}: " + ", ".join(m.failures) for m in failed), metrics)
    write_trt_commands(out, tmp, image_size=image_size, precision="int8", check_pixels=pixels,
                       check_reference=ref, tolerances=tol)
    info = traced.to_dict()
    info.update(precision="int8", onnx_path=str(out), traced=str(traced.precision),
                int8=q.to_dict(), int8_metrics=[m.to_dict() for m in metrics],
                int8_tolerances=tol.to_dict(),
                files=[str(out)] + [str(p) for p in trt_command_files(tmp)])
    return info


def _export_decoder(ckpt: LoadedCheckpoint, gptq_dir: Path | None, opts: ExportOptions,
                    tmp: Path, kv_scales: Path | None = None) -> dict[str, Any]:
    from .decoder import WeightSource, export_decoder

    plan = PLANS[opts.plan]
    extra: dict[str, Any] = {}
    if kv_scales is not None:
        from quant.kv_scales import KVScales

        extra["kv_scales"] = KVScales.load(kv_scales)
    if plan.quantized:
        from quant.checkpoint import load_gptq_checkpoint

        # Everything comes from the GPTQ checkpoint (fp16 embeddings/norms as stored there), so
        # the engine equals the fake-quant reference load_gptq_model() builds from the same files.
        gcfg, tensors, _ = load_gptq_checkpoint(gptq_dir,
                                                ckpt.cfg if gptq_dir == ckpt.path else None)
        res = export_decoder(WeightSource.from_checkpoint(gptq_dir, gcfg), tmp / "decoder.onnx",
                             plan=opts.plan, quant_tensors=tensors, group_size=opts.group_size,
                             lm_head=opts.head, **plan.target(opts.target).decoder_kwargs(),
                             **extra)
    else:
        res = export_decoder(WeightSource.from_checkpoint(ckpt.path, ckpt.cfg),
                             tmp / "decoder.onnx", plan=opts.plan)
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


def _write_candidate(tmp: Path, files: dict[str, Path], ckpt: LoadedCheckpoint,
                     opts: ExportOptions) -> dict[str, Any]:
    from .bundle import manifest_fields, write_bundle

    write_bundle(tmp / "bundle", files, manifest_fields(
        ckpt.path, opts.plan, checkpoint_id=str(ckpt.path), cfg=ckpt.cfg,
        vision_precision=PLANS[opts.plan].vision_dtype(opts.target), target=opts.target))
    return {}


def _validate(bundle: Path, ckpt: LoadedCheckpoint, items: list, opts: ExportOptions,
              tmp: Path, gptq_dir: Path | None, kv_scales: Path | None = None) -> dict[str, Any]:
    """The drift report of the candidate bundle, against the fp32 reference *and* the
    same-precision reference (the GPTQ codes dequantised, or fp16-rounded weights), so that
    quantisation loss and exporter error are judged apart."""
    from validate.compare import same_precision_reference
    from validate.stages import run_validation

    reference = _reference_model(ckpt)
    scales = None
    if kv_scales is not None:
        from quant.kv_scales import KVScales

        scales = KVScales.load(kv_scales)
    same = same_precision_reference(reference, opts.plan, gptq_dir, opts.head,
                                    ckpt.cfg if gptq_dir == ckpt.path else None, opts.target,
                                    kv_scales=scales)
    rep = run_validation(bundle, reference, items, opts.plan, tmp / "report",
                         cache_dir=tmp.parent / "images", fake_quant_model=same,
                         target=opts.target)
    return rep.summary() if hasattr(rep, "summary") else dict(rep)


def build_bundle(checkpoint: str | Path, out_dir: str | Path, plan: str = "fp32",
                 model: Any = None, quant_tensors: Mapping[str, Any] | None = None,
                 vision_precision: str = "fp32", vision_onnx: str | Path | None = None,
                 checkpoint_id: str | None = None,
                 decoder_kwargs: Mapping[str, Any] | None = None, target: str = "gpu") -> Path:
    """Both engines of an in-memory model and a bundle, without GPTQ calibration or the drift
    report: the quick path for tests and benchmarks (``run_export`` is the checked one).

    ``model``: the already loaded fp32 reference (else loaded from ``checkpoint``).
    ``quant_tensors``: GPTQ tensors for ``plan="int4"`` (default: round-to-nearest, group 128 or
    the largest power of two dividing the width). ``vision_onnx``: reuse an exported vision
    engine instead of exporting it again. ``decoder_kwargs``: more ``export_decoder`` arguments
    (``act_dtype``, ``kv_dtype``, ``lm_head``, ...). ``target``: the plan's executor settings
    (``export.py --target``), recorded in the manifest.
    """
    import tempfile

    from .bundle import manifest_fields, write_bundle
    from .decoder import export_decoder

    ckpt = LoadedCheckpoint.open(Path(checkpoint))
    out = Path(out_dir)
    if model is None:
        from models.checkpoint import load_model

        model = load_model(ckpt.path, "fp32", cfg=ckpt.cfg)
    with tempfile.TemporaryDirectory(prefix=".bundle-src-", dir=out.parent if out.parent.exists()
                                     else None) as tmp:
        t = Path(tmp)
        kwargs: dict[str, Any] = {}
        if PLANS[plan].quantized:
            kwargs = _rtn_quant(model, quant_tensors)
        kwargs.update(PLANS[plan].target(target).decoder_kwargs())  # as export.py builds it
        kwargs.update(decoder_kwargs or {})
        if kwargs.get("kv_dtype") == "int8" and kwargs.get("kv_scales") is None:
            kwargs["kv_scales"] = _quick_kv_scales(model, ckpt, t)
        export_decoder(model, t / "decoder.onnx", plan=plan, **kwargs)
        if vision_onnx is None:
            from .vision import export_vision
            export_vision(model, t / "vision.onnx", precision=vision_precision,
                          write_trt_script=False)
            vision_onnx = t / "vision.onnx"
        files = {"vision.onnx": Path(vision_onnx), "decoder.onnx": t / "decoder.onnx",
                 **ckpt.tokenizer_file()}
        fields = manifest_fields(ckpt.path, plan, checkpoint_id, cfg=ckpt.cfg,
                                 vision_precision=vision_precision, target=target)
        return write_bundle(out, files, fields)


# model -> {checkpoint: scales}; weak, so a later model never inherits a freed one's scales
_QUICK_KV: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _quick_kv_scales(model: Any, ckpt: LoadedCheckpoint, tmp: Path,
                     n_items: int | None = None) -> Any:
    """int8-KV scales for :func:`build_bundle`: the calibration items (with their images)
    through the in-memory fp32 model, as the export's kv_scales stage does. Every item by
    default: per-channel amax over the first 8 items came out at a third of the 64 items' in
    some channels on the nano, and the clipped cache then lost the task (KL 0.88); over all 64
    they are within 6 % of the export's. Computed once per process and model."""
    from quant.calibration import CalibItem, build_calibration
    from quant.kv_scales import calibrate_kv_scales

    cached = _QUICK_KV.setdefault(model, {})
    if n_items is None and str(ckpt.path) in cached:
        return cached[str(ckpt.path)]
    items = [it for it in _load_items(ExportOptions()) if it.split == "calib"][:n_items]
    images = _materialise(items, tmp / "images")
    calib = [CalibItem(image=img, prompt=it.query_parts(), answer=it.answer)
             for it, img in zip(items, images)]
    scales = calibrate_kv_scales(model, build_calibration(model, calib, ckpt.path,
                                                          min_items=len(calib)))
    if n_items is None:
        cached[str(ckpt.path)] = scales
    return scales


def _rtn_quant(model: Any, quant_tensors: Mapping[str, Any] | None) -> dict[str, Any]:
    """``export_decoder`` int4 arguments: the given GPTQ tensors, else round-to-nearest ones."""
    group = PLANS["int4"].group_size or DEFAULT_GROUP_SIZE
    while model.cfg.hidden_size % group or model.cfg.ffn_dim % group:
        group //= 2
    if quant_tensors is not None:
        t0 = quant_tensors["transformer.h.0.attn.c_attn"]
        group = t0.in_features // t0.n_groups
    else:
        from quant.fake_quant import rtn_gptq_tensors
        quant_tensors = rtn_gptq_tensors(model, group_size=group)
    return {"quant_tensors": quant_tensors, "group_size": group}


def _validation_summary(v: dict[str, Any] | None) -> dict[str, Any] | None:
    if not v:
        return None
    return {k: v[k] for k in ("verdict", "failed", "inconclusive", "metrics") if k in v}


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
