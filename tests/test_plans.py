"""The precision-plan table (quant/plans.py) is the one source every consumer reads."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from quant.plans import DEFAULT_GROUP_SIZE, PLANS, PrecisionPlan, exportable_plans, get_plan


def test_every_plan_has_thresholds_and_a_head_mode():
    from quant.lm_head import PLAN_HEAD, head_mode_for_plan
    from validate.thresholds import PLANS as THRESHOLDS

    assert list(THRESHOLDS) == list(PLANS)
    for name, plan in PLANS.items():
        assert PLAN_HEAD[name] == plan.lm_head == head_mode_for_plan(name)


def test_export_offers_only_exportable_plans():
    import export

    opt = next(a for a in export.build_parser()._actions if "--plan" in a.option_strings)
    assert tuple(opt.choices) == exportable_plans() == ("fp32", "fp16", "int4", "edge")
    assert export.build_parser().parse_args(["--plan", "edge", "--target", "cpu"]).plan == "edge"
    with pytest.raises(SystemExit):
        export.build_parser().parse_args(["--plan", "int3"])


def test_unexportable_plan_is_refused_with_one_line(nano_ckpt, tmp_path, monkeypatch):
    from exporters import pipeline
    from exporters.pipeline import ExportError, ExportOptions, run_export

    monkeypatch.setitem(pipeline.PLANS, "edge", dataclasses.replace(PLANS["edge"],
                                                                    exportable=False))
    monkeypatch.setattr(pipeline, "exportable_plans", lambda: ("fp32", "fp16", "int4"))
    with pytest.raises(ExportError, match="plan 'edge' cannot be exported: use one of fp32"):
        run_export(ExportOptions(checkpoint=nano_ckpt, plan="edge", out=tmp_path / "b"))


def test_edge_plan_row_describes_what_is_built():
    """int8 vision and embedding rows, the int4 decoder's targets; the cpu target's KV int8
    (GroupQueryAttention), the gpu target's the int4 plan's fp16."""
    from exporters.memory_plan import plan_memory
    from models.config import qwen_vl_chat_config
    from quant.embedding import table_bytes
    from quant.plans import traced_vision, vision_precisions

    edge, int4 = PLANS["edge"], PLANS["int4"]
    assert (edge.vision, edge.embed, edge.lm_head, edge.linear_bits) == ("int8", "int4", "int4", 4)
    assert edge.exportable
    assert edge.target("cpu") == dataclasses.replace(int4.target("cpu"), kv_dtype="int8",
                                                     vision=None)
    # the vision engine per target: int8 on both for edge; int4 ships fp16 to a GPU and fp32 to
    # a CPU (onnxruntime's CPU runs fp16 through fp32 copies, slower and larger)
    assert [edge.vision_dtype(t) for t in ("gpu", "cpu")] == ["int8", "int8"]
    assert [int4.vision_dtype(t) for t in ("gpu", "cpu")] == ["fp16", "fp32"]
    assert plan_memory(qwen_vl_chat_config(), "int4", target="cpu").cpu_cast_vision_bytes == 0
    # the Jetson target: GroupQueryAttention on one int8 KV buffer, without the bias that
    # onnxruntime's CUDA kernel rejects (an unpadded engine)
    gpu = edge.target("gpu")
    assert (gpu.act_dtype, gpu.kv_dtype, gpu.attention, gpu.attention_bias) == (
        "fp16", "int8", "gqa", False)
    assert gpu.kv_layout == "shared" and int4.target("gpu").attention_bias
    assert traced_vision("int8") == "fp32" and "int8" not in vision_precisions()
    cfg = qwen_vl_chat_config()
    e, i = plan_memory(cfg, "edge", "agx-orin-32gb"), plan_memory(cfg, "int4", "agx-orin-32gb")
    assert e.kv_bytes_per_token == i.kv_bytes_per_token / 2  # int8 vs fp16
    ec, ic = plan_memory(cfg, "edge", target="cpu"), plan_memory(cfg, "int4", target="cpu")
    assert ec.kv_bytes_per_token == ic.kv_bytes_per_token / 4 == 2 * 32 * 4096  # 1 byte a value
    assert ec.other_bytes - ic.other_bytes == ec.kv_scale_bytes == 2 * 32 * 4096 * 4
    assert e.decoder_linear_bytes == i.decoder_linear_bytes
    assert e.embed_bytes == table_bytes(cfg.vocab_size, cfg.hidden_size, "int4")
    # 4 bits a value + one fp16 scale per block of 32
    assert e.embed_bytes == pytest.approx(i.embed_bytes * (4 + 16 / 32) / 16, rel=1e-3)
    assert e.lm_head_bytes == pytest.approx(e.embed_bytes, rel=1e-3)  # int4, groups of 32


def test_targets_of_the_plans():
    from exporters.memory_plan import plan_memory
    from exporters.pipeline import CPU_FAST
    from models.config import qwen_vl_chat_config

    assert CPU_FAST == {"act_dtype": "fp32", "accuracy_level": 4, "kv_dtype": "fp32",
                        "attention": "gqa", "attention_bias": True}
    assert PLANS["int4"].act_dtypes == ("fp16", "fp32")
    assert PLANS["fp32"].target("cpu") == PLANS["fp32"].target("gpu")
    cfg = qwen_vl_chat_config()
    assert (plan_memory(cfg, "int4", target="cpu").kv_bytes_per_token
            == 2 * plan_memory(cfg, "int4").kv_bytes_per_token
            == plan_memory(cfg, "int4", kv_bits=32).kv_bytes_per_token)
    with pytest.raises(ValueError, match="no target 'npu'"):
        PLANS["int4"].target("npu")
    with pytest.raises(ValueError, match="unknown precision plan 'int3'"):
        get_plan("int3")


def test_group_size_has_one_default():
    import export
    from exporters.decoder import export_decoder
    from exporters.pipeline import ExportOptions
    from quant.fake_quant import RTNTensors, rtn_gptq, rtn_gptq_tensors
    from quant.gptq import QuantConfig
    from quant.packing import rtn_quantize

    assert PLANS["int4"].group_size == DEFAULT_GROUP_SIZE
    assert QuantConfig().group_size == ExportOptions().group_size == DEFAULT_GROUP_SIZE
    assert export.build_parser().parse_args([]).group_size == DEFAULT_GROUP_SIZE
    for fn in (export_decoder, rtn_gptq, rtn_gptq_tensors, rtn_quantize, RTNTensors.__init__):
        assert inspect.signature(fn).parameters["group_size"].default == DEFAULT_GROUP_SIZE


def test_memory_plan_reads_the_group_size(monkeypatch):
    """A plan row with another group size changes the planned scale bytes (nothing hard-coded)."""
    from exporters import memory_plan
    from models.config import qwen_vl_chat_config

    cfg = qwen_vl_chat_config()
    base = memory_plan.plan_memory(cfg, "int4")
    row = dataclasses.replace(PLANS["int4"], group_size=64)
    monkeypatch.setitem(memory_plan.PLANS, "int4", row)
    finer = memory_plan.plan_memory(cfg, "int4")
    assert finer.decoder_linear_bytes > base.decoder_linear_bytes
    codes = base.decoder_linear_bytes * 4 / (4 + 16 / DEFAULT_GROUP_SIZE)  # bytes of the codes
    assert finer.decoder_linear_bytes == pytest.approx(codes * (4 + 16 / 64) / 4)


def test_plan_rows_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PLANS["int4"].lm_head = "fp16"  # type: ignore[misc]
    assert all(isinstance(p, PrecisionPlan) and p.name == n for n, p in PLANS.items())
