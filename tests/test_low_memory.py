"""One engine resident at a time (the planner's "sequential" mode) and the planner's truth check.

The low-memory runtime answers exactly the tokens of the resident one, really drops the vision
session after every encode (weakref), is chosen from the manifest's memory plan and can be forced
either way (API, ``python -m runtime``, ``runtime.serve``). The planner honours the target's KV
and scale dtypes, the group size and the LM head it is given; ``bench.memory`` compares its
figures with nano bundles' files and the runtime's RSS (shape only: the ±2 % / ±10 % targets are
judged on full-size bundles in bench/RESULTS.md, not here).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_bundle

N_NEW = 6


@pytest.fixture(scope="session")
def fp16_bundle(tmp_path_factory, nano_ckpt, nano_model) -> Path:
    return shared_bundle(tmp_path_factory, "lowmem-fp16", nano_ckpt, nano_model, plan="fp16",
                         vision_precision="fp16", vision_onnx=None)


@pytest.fixture(scope="session")
def int4_cpu_bundle(tmp_path_factory, nano_ckpt, nano_model, fp16_bundle) -> Path:
    """The int4 plan's cpu target (fp32 scales and KV), fp16 vision as the plan says."""
    from exporters.pipeline import CPU_FAST

    return shared_bundle(tmp_path_factory, "lowmem-int4-cpu", nano_ckpt, nano_model, plan="int4",
                         vision_precision="fp16", vision_onnx=fp16_bundle / "vision.onnx",
                         decoder_kwargs=CPU_FAST)


def _pipelines(bundle: Path):
    from runtime import Pipeline

    resident = Pipeline.from_bundle(bundle, device="cpu", threads=1, low_memory=False)
    low = Pipeline.from_bundle(bundle, device="cpu", threads=1, low_memory=True)
    return resident, low


def _watch_vision(pipe) -> list:
    """Weak references to every vision session ``pipe`` loads from now on."""
    refs, load = [], pipe._vision.loader

    def loader():
        eng = load()
        refs.append(weakref.ref(eng.session))
        return eng

    pipe._vision.loader = loader
    return refs


def _greedy(pipe, images, prompt="What is this?", history=None):
    return pipe.chat(prompt, images=images, history=history, max_new_tokens=N_NEW,
                     min_new_tokens=N_NEW, temperature=0).result()


def test_low_memory_answers_the_resident_tokens_and_drops_the_vision_session(fp32_bundle,
                                                                             images):
    resident, low = _pipelines(fp32_bundle)
    assert resident._vision.loaded and resident._decoder.loaded
    assert not low._vision.loaded and not low._decoder.loaded  # nothing loaded before a request
    refs = _watch_vision(low)
    for imgs in ([images[0]], images):
        want, got = _greedy(resident, imgs), _greedy(low, imgs)
        assert got.token_ids == want.token_ids and len(got.token_ids) == N_NEW
        assert low._vision.engine is None and "vision_load_s" in got.timings
        gc.collect()
        assert refs and all(r() is None for r in refs)  # no reference left anywhere
    assert len(refs) == 2  # reloaded for every request with images
    # without the CPU arena, so that the run's buffers go back with the session
    assert not low.vision.session.get_session_options().enable_cpu_mem_arena
    assert resident.vision.session.get_session_options().enable_cpu_mem_arena
    low._vision.release()  # (the property loaded it a third time)
    # a request with images releases the decoder an earlier request left before the vision
    # engine loads (one engine resident at a time), and reloads it for its decode
    assert "decoder_load_s" in got.timings and low._decoder.loads == 2
    text = _greedy(low, [], "Hello")  # no image: no vision load, the decoder stays
    assert text.token_ids == _greedy(resident, [], "Hello").token_ids and len(refs) == 3
    assert low._decoder.loads == 2


def test_low_memory_never_holds_both_engines(fp32_bundle, images):
    _, low = _pipelines(fp32_bundle)
    seen, load = [], low._vision.loader

    def loader():
        seen.append(low._decoder.loaded)  # the decoder's state when the vision engine loads
        return load()

    low._vision.loader = loader
    for _ in range(2):
        _greedy(low, [images[0]])
        assert low._decoder.loaded and not low._vision.loaded
    assert seen == [False, False]


def test_a_conversation_survives_the_decoder_reload(fp32_bundle, images):
    resident, low = _pipelines(fp32_bundle)
    convs = [p.conversation() for p in (resident, low)]
    turns = [("What is this?", [images[0]]), ("And this one?", [images[1]]), ("Why?", [])]
    for prompt, imgs in turns:  # the second turn's image releases the decoder mid-conversation
        want, got = (c.chat(prompt, images=imgs, max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                            temperature=0).result() for c in convs)
        assert got.token_ids == want.token_ids and got.reused_tokens == want.reused_tokens
    assert low._decoder.loads == 2
    gc.collect()
    assert low._caches and all(c.engine is low._decoder.engine for c in low._caches)  # no stale


def test_low_memory_conversation_and_batch_equal_resident(int4_cpu_bundle, images):
    resident, low = _pipelines(int4_cpu_bundle)
    refs = _watch_vision(low)
    convs = [p.conversation() for p in (resident, low)]
    for imgs, prompt in (([images[0]], "What is this?"), ([images[1]], "And this one?")):
        a, b = (_greedy(p, imgs, prompt, history=c) for p, c in zip((resident, low), convs))
        assert a.token_ids == b.token_ids and a.reused_tokens == b.reused_tokens
    reqs = [{"prompt": "What is this?", "images": [im]} for im in images]
    a, b = (p.chat_batch(reqs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, temperature=0)
            for p in (resident, low))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert "vision_load_s" in b[0].timings and low._vision.engine is None
    gc.collect()
    assert len(refs) == 3 and all(r() is None for r in refs)


def _with_plan(src: Path, dst: Path, mode: str) -> Path:
    """A copy of bundle ``src`` whose manifest records a memory plan in ``mode``."""
    from exporters.bundle import read_manifest, write_bundle

    man = read_manifest(src)
    fields = {k: v for k, v in man.data.items()
              if k not in ("files", "format_version", "toolkit", "created", "versions")}
    fields["memory_plan"] = {"mode": mode, "device": "orin-nano-8gb"}
    files = {n: src / n for n in man.files if not n.endswith(".data")}
    return write_bundle(dst, files, fields)


def test_low_memory_is_chosen_from_the_manifest_plan_and_overridable(fp32_bundle, tmp_path):
    from runtime import Pipeline
    from runtime.bundle import read_manifest
    from runtime.pipeline import plan_wants_low_memory

    seq = _with_plan(fp32_bundle, tmp_path / "seq", "sequential")
    res = _with_plan(fp32_bundle, tmp_path / "res", "resident")
    assert plan_wants_low_memory(read_manifest(seq))
    assert not plan_wants_low_memory(read_manifest(res))
    assert not plan_wants_low_memory(read_manifest(fp32_bundle))  # no plan: resident
    assert Pipeline.from_bundle(seq, device="cpu").low_memory
    assert not Pipeline.from_bundle(seq, device="cpu", low_memory=False).low_memory
    assert not Pipeline.from_bundle(res, device="cpu").low_memory
    assert Pipeline.from_bundle(res, device="cpu", low_memory=True).low_memory


def test_cli_and_server_flags(fp32_bundle, images, capsys):
    from runtime import __main__ as cli
    from runtime import serve

    for parser in (cli.build_parser(), serve.build_parser()):
        base = ["--bundle", str(fp32_bundle)]
        assert parser.parse_args(base).low_memory is None
        assert parser.parse_args(base + ["--low-memory"]).low_memory is True
        assert parser.parse_args(base + ["--no-low-memory"]).low_memory is False
    out = []
    for flag in ("--low-memory", "--no-low-memory"):
        assert cli.main(["--bundle", str(fp32_bundle), "--image", str(images[0]), "--prompt", "Hi",
                         "--json", "--device", "cpu", "--threads", "1", "--temperature", "0",
                         "--max-new-tokens", str(N_NEW), flag]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert out[0]["token_ids"] == out[1]["token_ids"]
    assert "vision_load_s" in out[0]["timings"] and "vision_load_s" not in out[1]["timings"]


# ---- the planner ---------------------------------------------------------------------------

def _plan_only(capsys, *args: str) -> str:
    import export

    export.main(["--plan-only", *args])
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def full_config(tmp_path_factory) -> Path:
    """Only config.json of the full-size Qwen-VL-Chat (``--plan-only`` reads nothing else)."""
    from models.config import qwen_vl_chat_config

    d = tmp_path_factory.mktemp("full-config")
    (d / "config.json").write_text(json.dumps(qwen_vl_chat_config().to_dict()))
    return d


def test_plan_only_honours_target_group_size_and_head(full_config, capsys):
    ck = ["--checkpoint", str(full_config)]
    gpu = _plan_only(capsys, *ck)
    cpu = _plan_only(capsys, *ck, "--target", "cpu")
    assert "512 KB/token" in gpu and "1024 KB/token" in cpu  # cpu: fp32 KV
    assert "target cpu" in cpu and "group size 128" in gpu
    g64 = _plan_only(capsys, *ck, "--group-size", "64")
    assert "group size 64" in g64 and _line(g64, "decoder linears") > _line(gpu, "decoder linears")
    fp16_head = _plan_only(capsys, *ck, "--lm-head", "fp16")
    assert _line(fp16_head, "lm_head") == pytest.approx(2 * _line(gpu, "lm_head"), rel=0.01)
    int4_head = _plan_only(capsys, *ck, "--lm-head", "int4")  # codes + fp16 scale per 32
    assert _line(int4_head, "lm_head") == pytest.approx(151936 * 4096 * (0.5 + 2 / 32), rel=0.01)
    assert _line(_plan_only(capsys, *ck, "--plan", "fp16", "--lm-head", "int4"),
                 "lm_head") == pytest.approx(151936 * 4096 * 2, rel=0.01)  # fp16 plan: its own


def _line(text: str, key: str) -> float:
    row = next(ln for ln in text.splitlines() if ln.strip().startswith(key))
    value, unit = row.split()[-2:]
    return float(value) * {"GB": 1e9, "MB": 1e6}[unit]


def test_planner_counts_scales_in_the_activation_dtype_and_int8_embedding_rows(monkeypatch):
    from exporters import memory_plan
    from models.config import qwen_vl_chat_config
    from quant.plans import PLANS

    cfg = qwen_vl_chat_config()
    gpu, cpu = (memory_plan.plan_memory(cfg, "int4", target=t) for t in ("gpu", "cpu"))
    rows = cfg.vocab_size
    # int4 scales and the int8 head's row scales: fp16 for the gpu target, fp32 for cpu
    groups = sum(s[0] * s[1] / 128 for n, s in memory_plan.expected_shapes(cfg).items()
                 if n.endswith(memory_plan.QUANT_SUFFIXES) and not n.startswith("transformer.vis"))
    assert cpu.decoder_linear_bytes - gpu.decoder_linear_bytes == pytest.approx(2 * groups)
    assert cpu.lm_head_bytes - gpu.lm_head_bytes == 2 * rows
    # fp32 KV per token on cpu; one shared GQA buffer instead of MHA's two ping-pong buffers
    assert cpu.kv_bytes_per_token == 2 * gpu.kv_bytes_per_token
    assert cpu.kv_bytes() == 2 * gpu.kv_bytes() / 2
    row = dataclasses.replace(PLANS["int4"], embed="int8")
    monkeypatch.setitem(memory_plan.PLANS, "int4", row)
    int8 = memory_plan.plan_memory(cfg, "int4")
    assert int8.embed_bytes == rows * cfg.hidden_size + rows * 2  # + one fp16 scale per row
    row = dataclasses.replace(PLANS["int4"], embed="int4")  # blocks of 32 (quant/embedding.py)
    monkeypatch.setitem(memory_plan.PLANS, "int4", row)
    int4 = memory_plan.plan_memory(cfg, "int4")
    assert int4.embed_bytes == rows * cfg.hidden_size / 2 + rows * cfg.hidden_size / 32 * 2


def test_sequential_peak_is_the_larger_engine():
    from exporters.memory_plan import plan_memory
    from models.config import qwen_vl_chat_config

    cfg = qwen_vl_chat_config()
    p = plan_memory(cfg, "int4", "orin-nano-8gb")
    kv = 2 * p.kv_bytes_per_token * p.context  # two ping-pong KV buffers
    logits = cfg.vocab_size * (4 + 2)  # the last position: fp16 head output + fp32 host copy
    decoder = p.decoder_bytes + kv + logits
    assert p.peak_bytes(False) == pytest.approx(p.overhead_bytes + p.vision_bytes + decoder)
    assert p.peak_bytes(True) == pytest.approx(p.overhead_bytes + max(p.vision_bytes, decoder))
    # a decoder exported before logits_to_keep returns every prompt position's logits
    old = plan_memory(cfg, "int4", "orin-nano-8gb", logits_to_keep=False)
    assert old.peak_bytes(True) == pytest.approx(p.peak_bytes(True) + logits * (p.context - 1))
    assert "0.91 MB (the last position only" in "\n".join(p.lines())
    assert "890 KB/prompt token (  1.87 GB for a 2048-token prompt)" in "\n".join(old.lines())
    e, e_old = (plan_memory(cfg, "edge", "orin-nano-8gb", logits_to_keep=k) for k in (True, False))
    free = e.usable_bytes - e.overhead_bytes - e.decoder_bytes
    kv = e.kv_buffers * e.kv_bytes_per_token  # one shared buffer: GroupQueryAttention on gpu
    assert e.kv_buffers == 1 and e.kv_bytes_per_token == 2 * 32 * 4096  # int8
    # the Orin Nano holds the model's whole 2048-token context (2124 by the bytes), which the
    # same decoder without logits_to_keep could not (its prompt's logits: 475 tokens)
    assert e.max_context_sequential == min(2048, int((free - logits) // kv)) == 2048
    assert int((free - logits) // kv) == 2124 and e.fits and e.mode == "sequential"
    assert e_old.max_context_sequential == int(free // (kv + logits)) == 475
    # onnxruntime CPU runs an fp16 vision engine (the int4 gpu target's) through fp32 copies
    gpu = plan_memory(cfg, "int4")
    assert gpu.cpu_cast_vision_bytes == pytest.approx(2 * gpu.vision_bytes)
    assert gpu.peak_bytes(True, 100, on_cpu=True) == pytest.approx(
        gpu.overhead_bytes + 3 * gpu.vision_bytes + gpu.cpu_vision_act_bytes)
    # so the cpu target ships an fp32 one: 2x the fp16 file, no copies
    cpu = plan_memory(cfg, "int4", target="cpu")
    assert cpu.cpu_cast_vision_bytes == 0
    assert cpu.vision_bytes == pytest.approx(2 * gpu.vision_bytes, rel=0.01)
    # the encode's activations: one layer's scores + probabilities and its MLP's two tensors
    v = cfg.visual
    assert cpu.cpu_vision_act_bytes == 2 * 16 * 1024 ** 2 * 4 + 2 * 1024 * v.mlp_width * 4
    # MatMulNBits' CPU prepack (accuracy level 4): 8 B per 4-bit block of 128 (50.59 M blocks
    # in the 32 layers' Linears) + one fp32 per 64 weights of the int8 head's rows
    assert cpu.cpu_prepack_bytes == 50_593_792 * 8 + 151936 * 64 * 4
    # a gathered row of the mmapped fp16 table costs the readahead window; KV pages are
    # resident for the 100 tokens used only (runtime/engines.host_buffer: no huge pages)
    weights = (cpu.decoder_bytes - cpu.embed_bytes + 100 * 128 * 1024
               + cpu.cpu_prepack_bytes)
    assert cpu.kv_buffers == 1
    dec_run = weights + cpu.kv_bytes(100) + cpu.logits_bytes_per_token
    # both resident: loading the decoder beside the vision engine (the head twice) or running
    assert cpu.peak_bytes(False, 100, on_cpu=True) == pytest.approx(cpu.overhead_bytes + max(
        cpu.vision_bytes + weights + cpu.lm_head_bytes,
        cpu.vision_bytes + cpu.cpu_vision_act_bytes + dec_run))
    # one engine at a time: the decoder side, loading (the int8 head held twice) or running
    assert cpu.peak_bytes(True, 100, on_cpu=True) == pytest.approx(cpu.overhead_bytes + max(
        cpu.vision_bytes + cpu.cpu_vision_act_bytes, weights + cpu.lm_head_bytes, dec_run))
    # the fp16 plan on CPU: the optimised graph holds every fp16 weight in fp32 (2x the file,
    # the table included: not memory-mapped), the largest made twice while loading
    f16 = plan_memory(cfg, "fp16")
    assert not f16.cpu_embed_mapped and f16.cpu_prepack_bytes == 0
    assert f16.cpu_cast_decoder_bytes == pytest.approx(
        f16.decoder_linear_bytes + f16.lm_head_bytes + f16.embed_bytes)
    assert f16.cpu_load_transient_bytes == 2 * f16.lm_head_bytes
    assert f16.peak_bytes(True, 100, on_cpu=True) == pytest.approx(
        f16.overhead_bytes + f16.decoder_bytes + f16.cpu_cast_decoder_bytes
        + 2 * f16.lm_head_bytes)  # loading is the larger side: the 100 tokens' KV is smaller
    edge = plan_memory(cfg, "edge", target="cpu")  # int4 rows: codes and scales, two windows
    assert edge.embed_read_bytes_per_token == 2 * 128 * 1024
    assert plan_memory(cfg, "edge").cpu_prepack_bytes == 0  # gpu target: accuracy level 0


# ---- bench.memory ----------------------------------------------------------------------------

def test_bench_memory_compares_sizes_and_rss(fp16_bundle, int4_cpu_bundle, nano_ckpt, tmp_path,
                                             capsys):
    from bench import memory

    out = tmp_path / "memory.json"
    assert memory.main(["--bundle", str(fp16_bundle), "--bundle", str(int4_cpu_bundle),
                        "--checkpoint", str(nano_ckpt), "--new-tokens", "4", "--threads", "1",
                        "--json", str(out)]) == 0
    assert "pred/actual" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert [b["plan"] for b in rec["bundles"]] == ["fp16", "int4"]
    assert rec["bundles"][1]["target"] == "cpu" and rec["bundles"][1]["lm_head"] == "int8"
    for b in rec["bundles"]:
        parts = {s["part"].strip(): s for s in b["sizes"]}
        assert {"vision engine (files)", "decoder engine (files)", "decoder linears", "lm_head",
                "embedding table"} <= set(parts)
        for s in parts.values():
            assert s["predicted_bytes"] > 0 and s["actual_bytes"] > 0
        for part in ("decoder linears", "lm_head", "embedding table"):  # exact layout arithmetic
            assert parts[part]["predicted_bytes"] == parts[part]["actual_bytes"], part
        assert [r["mode"] for r in b["rss"]] == ["resident", "low-memory"]
        for r in b["rss"]:
            assert r["measured_peak_rss_bytes"] > r["process_start_rss_bytes"] > 0
            assert r["run"]["new_tokens"] == 4
        assert b["rss"][1]["run"]["vision_released"] and b["rss"][1]["run"]["vision_load_s"]


def test_rtn_checkpoint_is_an_int4_checkpoint_export_imports(nano_ckpt, tmp_path):
    """bench.rtn_checkpoint (the full-size stand-in for GPTQ) writes what export.py recognises
    as an already quantised checkpoint, with the codes of every Linear."""
    from bench import rtn_checkpoint
    from exporters.pipeline import LoadedCheckpoint
    from quant.checkpoint import load_gptq_checkpoint, read_quant_config

    out = tmp_path / "int4"
    assert rtn_checkpoint.main(["--checkpoint", str(nano_ckpt), "--out", str(out),
                                "--group-size", "64"]) == 0
    ckpt = LoadedCheckpoint.open(out)
    assert ckpt.quantized
    cfg, tensors, _ = load_gptq_checkpoint(out)
    assert read_quant_config(out).group_size == 64
    assert len(tensors) == 5 * cfg.num_hidden_layers


def test_gptq_checkpoint_vision_tower_is_loaded_and_owned_from_its_path(nano_ckpt, tmp_path):
    """export.py hands the vision exporter the path of an int4 checkpoint too, so the exporter
    owns the tower and frees it while exporting (a module held by the caller stayed alive
    through the check session and the int8 calibration: 7.7 GB more at full size)."""
    import torch

    from bench import rtn_checkpoint
    from exporters.vision import resolve_visual
    from quant.checkpoint import load_gptq_model

    out = tmp_path / "int4"
    assert rtn_checkpoint.main(["--checkpoint", str(nano_ckpt), "--out", str(out),
                                "--group-size", "64"]) == 0
    visual, owned = resolve_visual(out)
    ref = load_gptq_model(out, "fp32", prefixes=["transformer.visual."]).transformer.visual
    assert owned
    got, want = visual.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k]) for k in got)


def test_stand_in_tokenizer_has_the_configs_special_ids(tmp_path):
    from bench.rtn_checkpoint import stand_in_tokenizer
    from models.config import qwen_vl_chat_config
    from runtime.tokenizer import QwenTokenizer

    cfg = qwen_vl_chat_config()
    tok = QwenTokenizer.from_file(stand_in_tokenizer(tmp_path / "qwen.tiktoken", cfg.eod_id))
    assert (tok.eod_id, tok.img_start_id) == (cfg.eod_id, cfg.image_start_id)
    assert tok.decode(tok.encode("a photo")) == "a photo"


def test_planner_counts_the_kv_buffers_of_the_targets_layout():
    """GroupQueryAttention (the int4 cpu target) keeps one shared KV buffer, MultiHeadAttention two
    ping-pong buffers (runtime/engines.KVCache): the planner holds as many."""
    from exporters.memory_plan import plan_memory
    from models.config import qwen_vl_chat_config
    from quant.plans import PLANS

    cfg = qwen_vl_chat_config()
    assert PLANS["int4"].target("cpu").kv_layout == "shared"
    cpu = plan_memory(cfg, "int4", target="cpu", context=512)
    gpu = plan_memory(cfg, "int4", target="gpu", context=512)
    assert (cpu.kv_buffers, gpu.kv_buffers) == (1, 2)
    assert cpu.kv_bytes() == cpu.kv_bytes_per_token * 512
    assert gpu.kv_bytes() == 2 * gpu.kv_bytes_per_token * 512


# ---- host KV buffers ---------------------------------------------------------------------

def _resident_bytes(addr: int, nbytes: int) -> int | None:
    """Rss of the mappings over ``[addr, addr + nbytes)`` (Linux /proc/self/smaps, pro rata
    where a mapping sticks out), else None."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    total, share = 0.0, 0.0
    for line in smaps.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            share = max(0, min(hi, addr + nbytes) - max(lo, addr)) / (hi - lo)
        elif share and head == "Rss:":
            total += int(line.split()[1]) * 1024 * share
    return int(total)


def test_host_kv_buffer_is_resident_only_where_written():
    """A KV buffer written at the start of each head's slab holds only those pages: numpy's
    huge-page advice made the whole capacity resident (a 2 MiB page spans several slabs)."""
    from runtime.engines import DeviceBuffer

    slab = 1 << 20  # one head's slab of a 2048-token fp32 buffer (2048 x 128 x 4 bytes)
    buf = DeviceBuffer(64 * slab, np.uint8, "cpu")
    assert buf.array.flags.writeable and buf.array.dtype == np.uint8
    view = buf.view((64, slab))
    view[:, :512] = 7  # one token's row at the start of every slab
    rss = _resident_bytes(buf.ptr, buf.array.nbytes)  # before any read: reads map pages too
    assert (view[:, :512] == 7).all() and not view[:, 512:1024].any()  # fresh memory is zero
    if rss is None:
        pytest.skip("no /proc/self/smaps on this OS: residency cannot be read")
    # numpy's np.empty: 65 MB resident here (huge pages); these 64 touched pages: 0.26 MB
    assert rss <= 64 * 4096 * 2, f"{rss} B resident for 64 touched pages"
