"""Injected exporter faults in int4 (gpu and cpu targets) and fp16 bundles of the shipped (trained)
nano model.

Each fault is a plausible exporter bug applied to a copy of a real exported bundle (ONNX
initializers edited, the manifest re-hashed by ``write_bundle``) and put through the drift
report: it must FAIL, at the stage that holds the broken engine (vision faults by a clear
margin). A manifest fault that leaves both engines right must FAIL the task stage alone. The
faithful bundle of each plan and target must PASS (a trained model emits boxes and reads text, so
no gate is left unjudged). Faults smaller than int4 noise are caught by the same-precision
reference (``decoder.fq_*``), not by the fp32 reference's bounds; the table in README's
drift-report section comes from this file (``pytest -s`` prints its rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import bundle_variant

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "nano" / "qwen-vl-nano"
MAX_NEW = 40  # a grounding answer with its box fits
FAULT_MAX_NEW = 8  # faults are judged on vision and decoder: greedy length matters little
LAYER = "transformer.h.1"


@pytest.fixture(scope="module")
def trained():
    from models.checkpoint import load_model

    return load_model(SHIPPED, "fp32")


@pytest.fixture(scope="module")
def items():
    """Synthetic validation items of the shipped manifest: two grounding, two OCR."""
    from calib_data.manifest import load_manifest

    val = [it for it in load_manifest(ROOT / "calib_data" / "manifest.jsonl")
           if it.split == "validation" and it.id.startswith("val-")]
    return ([it for it in val if it.task == "grounding"][:2]
            + [it for it in val if it.task == "ocr"][:2])


@pytest.fixture(scope="module")
def quant(trained):
    """Real GPTQ (g128, as export.py) on 8 calibration items of the shipped manifest."""
    from calib_data.manifest import load_manifest, materialise
    from quant.calibration import CalibItem, build_calibration
    from quant.gptq import QuantConfig, quantize_decoder

    calib = [it for it in load_manifest(ROOT / "calib_data" / "manifest.jsonl")
             if it.split == "calib" and it.id.startswith("calib-")][:8]
    batches = build_calibration(trained, [CalibItem(image=materialise(it),
                                                    prompt=it.query_parts(), answer=it.answer)
                                          for it in calib], SHIPPED)
    return quantize_decoder(trained, batches, QuantConfig(bits=4, group_size=128, sym=True),
                            progress=False).tensors


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, trained, quant):
    """The faithful int4 (default settings: fp16 activations/KV, int8 head), int4 ``cpu`` target
    (fp32 activations and KV, int8-quantised MatMulNBits inputs) and fp16 bundles."""
    import torch

    from exporters.pipeline import build_bundle

    d = tmp_path_factory.mktemp("drift-faults")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp16 = build_bundle(SHIPPED, d / "fp16", plan="fp16", model=trained,
                            vision_precision="fp16")
        int4 = build_bundle(SHIPPED, d / "int4", plan="int4", model=trained, quant_tensors=quant,
                            vision_onnx=fp16 / "vision.onnx", vision_precision="fp16")
        cpu = build_bundle(SHIPPED, d / "int4-cpu", plan="int4", model=trained,
                           quant_tensors=quant, vision_onnx=fp16 / "vision.onnx",
                           vision_precision="fp16", target="cpu")
    finally:
        torch.set_num_threads(n)
    return {"fp16": fp16, "int4": int4, "int4-cpu": cpu}


@pytest.fixture(scope="module")
def same_precision(trained, quant):
    from quant.fake_quant import fake_quant_model
    from validate.compare import same_precision_reference

    return {"fp16": same_precision_reference(trained, "fp16"),
            "int4": fake_quant_model(trained, quant, lm_head="int8"),
            "int4-cpu": fake_quant_model(trained, quant, lm_head="int8", int8_acts=True)}


_reports: dict[tuple[str, str], object] = {}


def _report(plan, fault, bundle, trained, same, items):
    """Faithful bundles run every stage; a fault only the stages up to its engine's (the first
    failure; tests/test_validate.py shows on fp32 that later stages are not blamed)."""
    from validate.stages import run_validation

    if (plan, fault) not in _reports:
        engine = FAULTS[fault][0] if fault in FAULTS else None  # None: run every stage
        kw = dict(max_new_tokens=MAX_NEW) if engine is None else dict(
            max_new_tokens=FAULT_MAX_NEW, stages=("vision",) if engine == "vision"
            else ("vision", "decoder"))
        # the plan from the key, the target (and so its bounds) from the bundle's manifest
        _reports[plan, fault] = run_validation(bundle, trained, items, plan.split("-")[0],
                                               fake_quant_model=same[plan], threads=1,
                                               plots=False, **kw)
    return _reports[plan, fault]


# ---------------------------------------------------------------------------------------------
# faults: (engine, edit(initializers) -> changed initializers); plan-aware where names differ
# ---------------------------------------------------------------------------------------------

def _scaled(name: str, f: float):
    return lambda w: {name: (w[name].astype(np.float32) * f).astype(w[name].dtype)}


def _key_bias_zeroed(w):
    b = w[f"{LAYER}.attn.c_attn.bias"].copy()
    h = b.shape[0] // 3  # q | k | v
    b[h:2 * h] = 0
    return {f"{LAYER}.attn.c_attn.bias": b}


def _rotary_base(w):
    """The rotary tables built with base 20000 instead of the config's 10000."""
    import torch

    from models.qwen_vl import rotary_cos_sin

    cos, half = w["rotary.cos_cache"], w["rotary.cos_cache"].shape[1]
    c0, _ = rotary_cos_sin(torch.arange(cos.shape[0]), 2 * half, 10000.0)
    assert np.allclose(c0[:, :half].numpy(), cos.astype(np.float32), atol=1e-3)  # as exported
    c, s = rotary_cos_sin(torch.arange(cos.shape[0]), 2 * half, 20000.0)
    return {"rotary.cos_cache": c[:, :half].numpy().astype(cos.dtype),
            "rotary.sin_cache": s[:, :half].numpy().astype(cos.dtype)}


def _mlp_scaled(w):
    """One MLP weight 5 % too large (int4: its dequantisation scales x1.05)."""
    name = f"{LAYER}.mlp.w2.scales"
    if name not in w:
        name = f"{LAYER}.mlp.w2.weight_t"
    return _scaled(name, 1.05)(w)


def _lm_head_swap(w):
    """Two vocabulary rows of the LM head swapped (a common answer token and its neighbour)."""
    a, b = 11, 12  # frequent byte-level tokens of the nano vocabulary
    out = {}
    for name, axis in (("lm_head.qweight", 0), ("lm_head.scales", 0), ("lm_head.weight_t", 1)):
        if name in w:
            x = np.array(w[name], copy=True)
            idx = [slice(None)] * x.ndim
            ia, ib = list(idx), list(idx)
            ia[axis], ib[axis] = a, b
            x[tuple(ia)], x[tuple(ib)] = w[name][tuple(ib)], w[name][tuple(ia)]
            out[name] = x
    return out


def _proj_rows_zeroed(w):
    """The first 8 output rows of the vision projection lost (a partial copy)."""
    p = w["proj"].copy()
    p[:8] = 0
    return {"proj": p}


def _conv_transposed(w):
    """The patch-embedding kernel with its height and width axes swapped (a layout mix-up)."""
    return {"conv_w": np.ascontiguousarray(w["conv_w"].transpose(0, 1, 3, 2))}


def _key_grid_transposed(w):
    """The resampler's key position table laid out column-major instead of row-major."""
    p = w["key_pos"]
    n = int(round(np.sqrt(p.shape[0])))
    return {"key_pos": np.ascontiguousarray(p.reshape(n, n, -1).transpose(1, 0, 2)
                                            .reshape(p.shape))}


def _chat_format_raw(fields):
    """The manifest says ``raw`` (the base model's prompt format) for a chat checkpoint: the
    engines are right, every prompt the runtime builds is not."""
    return {"chat_format": "raw"}


FAULTS = {
    "final norm weight x0.9": ("decoder", _scaled("transformer.ln_f.weight", 0.9)),
    "layer 1 key bias zeroed": ("decoder", _key_bias_zeroed),
    "rotary base 20000 instead of 10000": ("decoder", _rotary_base),
    "layer 1 MLP w2 weight/scales x1.05": ("decoder", _mlp_scaled),
    "LM head rows 11 and 12 swapped": ("decoder", _lm_head_swap),
    "layer 2 ln_1 weight x1.1": ("decoder", _scaled("transformer.h.2.ln_1.weight", 1.1)),
    "vision projection rows 0-7 zeroed": ("vision", _proj_rows_zeroed),
    "vision patch kernel transposed (kh <-> kw)": ("vision", _conv_transposed),
    "vision resampler key positions transposed (x <-> y)": ("vision", _key_grid_transposed),
    "vision ln_post bias x0": ("vision", _scaled("ln_post.bias", 0.0)),
}
#: Bundle faults only the whole runtime path sees (vision and decoder stages build their own
#: prompts): manifest edits, judged by the task stage
TASK_FAULTS = {"manifest chat_format raw for a chat model": _chat_format_raw}
#: A caught vision fault exceeds a bound by at least this factor (error 1 - cosine, or the
#: value itself): a fault caught by a hair would slip through on other images
VISION_MARGIN = 1.5


#: faults the fp32-reference bounds of the int4 and fp16 plans cannot see (issue 18)
SUBTLE = ("final norm weight x0.9", "layer 1 key bias zeroed", "layer 1 MLP w2 weight/scales x1.05")


#: (plan key, fault): the int4 cpu target shares the vision engine with the gpu target, so only
#: its decoder faults are run
CASES = [(plan, fault) for plan in ("int4", "fp16", "int4-cpu") for fault in FAULTS
         if plan != "int4-cpu" or FAULTS[fault][0] == "decoder"]


@pytest.mark.parametrize("plan", ["int4", "fp16", "int4-cpu"])
def test_faithful_bundle_passes(plan, bundles, trained, same_precision, items):
    r = _report(plan, "faithful", bundles[plan], trained, same_precision, items)
    assert r.target == ("cpu" if plan == "int4-cpu" else "gpu")
    print(f"\n{plan} faithful: {r.summary_line()}\n" + "\n".join(
        m.line() for s in r.stages.values() for m in s.metrics))
    assert r.verdict == "PASS", r.summary_line()
    fq = r.stages["decoder"].metric("fq_kl_mean")
    assert fq.verdict == "PASS" and fq.value < fq.threshold


@pytest.mark.parametrize("plan,fault", CASES)
def test_injected_fault_fails_at_its_stage(plan, fault, bundles, trained, same_precision, items,
                                           tmp_path_factory):
    engine, edit = FAULTS[fault]
    b = bundle_variant(bundles[plan], tmp_path_factory.mktemp("fault") / "bundle", engine, edit)
    r = _report(plan, fault, b, trained, same_precision, items)
    print(f"\n| {fault} | {plan} | {r.verdict} | {r.first_failure} | {', '.join(r.failed())} |")
    assert r.verdict == "FAIL" and r.first_failure == engine, r.summary_line()
    if fault in SUBTLE:  # under int4/fp16 noise: only the same-precision reference sees them
        assert {m.name for m in r.failures()} <= {"fq_kl_mean", "fq_kl_p95", "fq_top1",
                                                  "fq_ppl_ratio"}, r.summary_line()
    if engine == "vision":
        assert max(_margin(m) for m in r.failures()) >= VISION_MARGIN, r.summary_line()


def _margin(m) -> float:
    """How many times its bound a failed metric's error is (cosine: 1 - value)."""
    if m.op == ">=":
        return (1 - m.value) / max(1 - m.threshold, 1e-12)
    return m.value / max(m.threshold, 1e-12)


def _manifest_variant(src: Path, dst: Path, edit) -> Path:
    """A copy of bundle ``src`` whose manifest fields were changed by ``edit`` (files as they are)."""
    from exporters.bundle import read_manifest, write_bundle

    man = read_manifest(src)
    fields = {k: v for k, v in man.data.items()
              if k not in ("format_version", "created", "versions", "files", "engines")}
    changed = edit(fields)
    assert any(fields.get(k) != v for k, v in changed.items()), "the fault changed nothing"
    return write_bundle(dst, {n: src / n for n in man.files}, {**fields, **changed})


@pytest.mark.parametrize("fault", list(TASK_FAULTS))
def test_bundle_fault_fails_only_the_task_stage(fault, bundles, trained, same_precision, items,
                                                tmp_path_factory):
    b = _manifest_variant(bundles["int4"], tmp_path_factory.mktemp("fault") / "bundle",
                          TASK_FAULTS[fault])
    r = _report("int4", fault, b, trained, same_precision, items)
    print(f"\n| {fault} | int4 | {r.verdict} | {r.first_failure} | {', '.join(r.failed())} |")
    assert r.stages["vision"].verdict == "PASS" and r.stages["decoder"].verdict == "PASS"
    assert r.verdict == "FAIL" and r.first_failure == "task", r.summary_line()


def test_same_precision_reference_must_round_as_the_target_does(bundles, trained,
                                                                 same_precision, items):
    """The cpu target's bounds with a reference lacking its int8 inputs would fail a faithful
    bundle for the wrong reason (and the reverse hide the int8 rounding): refused up front."""
    from validate.stages import run_validation

    for plan, other in (("int4-cpu", "int4"), ("int4", "int4-cpu")):
        with pytest.raises(ValueError, match="int8 activations"):
            run_validation(bundles[plan], trained, items, "int4",
                           fake_quant_model=same_precision[other])
