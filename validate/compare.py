"""Validation's wiring: the reference and the bundle as two runners, and the per-item inputs.

Validation compares runners (``models.runner.TorchRunner`` vs ``runtime.runner.OrtRunner``); it
does not re-implement the runtime: prompt-table ids come from the engine contract inside the
onnxruntime runner, greedy answers from the runtime's one decode loop (``runtime.runner.greedy``),
the task stage's answers from ``runtime.Pipeline`` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .thresholds import thresholds_for

log = logging.getLogger(__name__)


def encode_answer(tok, text: str) -> list[int]:
    """Reference-answer text -> ids. Answers are model output, so ``<ref>``/``<box>``/``<quad>``
    tags are their special ids (as the runtime encodes assistant turns); everything else, other
    tag-like text included, is plain text."""
    from runtime.tokenizer import GROUNDING_ST

    return list(tok.encode(text, allowed_special=GROUNDING_ST))


def parse_boxes(text: str, size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Boxes of a grounding answer in original-image pixels (``runtime.grounding``)."""
    from runtime.grounding import parse_grounding

    return [tuple(float(v) for v in g.pixels) for g in parse_grounding(text or "", [tuple(size)])
            if g.pixels is not None]


@dataclass
class Prepared:
    """Everything per item that several stages use."""

    item: Any
    image: Any
    pixels: np.ndarray  # [3,S,S]
    prompt_ids: list[int]
    ref_feat: np.ndarray | None = None  # [nq, hidden] float32
    eng_feat: np.ndarray | None = None
    ref_gen: list[int] | None = None  # reference greedy answer ids (no stop token)
    ref_stopped: bool = False
    ref_text: str | None = None
    eng_text: str | None = None


class Context:
    """The two runners (reference, bundle), the tokenizer and the per-item preparation."""

    def __init__(self, bundle_dir: Path, model, plan: str, tokenizer=None, device: str = "cpu",
                 threads: int | None = None, max_new_tokens: int = 32,
                 cache_dir: Path | None = None, fake_quant_model=None, target: str = "gpu"):
        from models.runner import TorchRunner
        from runtime.bundle import verify_bundle

        self.bundle_dir = Path(bundle_dir)
        self.man = verify_bundle(self.bundle_dir)
        self.model = model
        self.fq_model = fake_quant_model
        self.plan, self.device, self.threads = plan, device, threads
        self.target = target
        self.gates = thresholds_for(plan, target)  # the gates every stage judges with
        self.max_new_tokens = max_new_tokens
        self.cache_dir = cache_dir
        self._check_facts(model.cfg)
        cfg = model.cfg
        self.image_size = cfg.visual.image_size
        self.n_queries = cfg.visual.n_queries
        self.tok = tokenizer or self._tokenizer()
        self.n_vocab = int(getattr(self.tok, "n_vocab", self.man.model.get(
            "n_vocab", cfg.image_start_id + 3)))
        sp = self.tok.special
        self.im_end = int(sp["<|im_end|>"])
        self.stop_ids = (self.im_end, int(sp["<|im_start|>"]), int(sp["<|endoftext|>"]))
        # never generated (as in runtime.Pipeline): an image tag in an answer has no features
        self.suppress_ids = [int(sp[t]) for t in ("<img>", "</img>", "<imgpad>") if t in sp]
        self.ref = TorchRunner(model)
        self.fq = TorchRunner(fake_quant_model) if fake_quant_model is not None else None
        self._eng = None

    def _check_facts(self, cfg) -> None:
        facts = self.man.model
        if int(facts.get("vocab_size", cfg.vocab_size)) != cfg.vocab_size or \
                int(facts.get("hidden", cfg.hidden_size)) != cfg.hidden_size:
            log.warning("bundle model facts (vocab %s, hidden %s) differ from the reference "
                        "(vocab %s, hidden %s)", facts.get("vocab_size"), facts.get("hidden"),
                        cfg.vocab_size, cfg.hidden_size)

    def _tokenizer(self):
        from runtime.tokenizer import QwenTokenizer

        d = self.bundle_dir / "tokenizer"
        return QwenTokenizer.from_dir(d if d.is_dir() else self.bundle_dir)

    def providers(self) -> list[str]:
        from runtime.engines import pick_providers

        return pick_providers(self.device)

    @property
    def eng(self):
        """The bundle's engines as the runtime runs them (opened on first use, so an engine
        that cannot load fails the stage that needs it)."""
        if self._eng is None:
            from runtime.runner import OrtRunner

            self._eng = OrtRunner.from_manifest(self.man, self.device, self.threads)
        return self._eng

    # -- per item ------------------------------------------------------------------------------
    def prepare(self, item) -> Prepared:
        from calib_data.manifest import materialise
        from runtime.image import preprocess
        from runtime.prompt import build_chat_ids

        img = materialise(item, self.cache_dir)
        px = np.asarray(preprocess(img, self.image_size), dtype=np.float32)
        ids = list(build_chat_ids(self.tok, item.query_parts(), n_images=1,
                                  n_slots=self.n_queries))
        return Prepared(item, img, px, ids)

    def features(self, runner, pixels: np.ndarray) -> np.ndarray:
        """``[nq, hidden]`` float32 features of one preprocessed image."""
        return runner.encode_images(pixels[None])[0]

    def logits(self, runner, ids: Sequence[int], feat: np.ndarray, rows: slice) -> np.ndarray:
        """Logits ``[len(rows), n_vocab]`` float32 of the positions ``rows`` of a prefill."""
        out = np.array(runner.prefill(ids, feat[None])[rows, :self.n_vocab], dtype=np.float32)
        runner.reset()
        return out

    def greedy(self, runner, ids: Sequence[int], feat: np.ndarray) -> tuple[list[int], bool]:
        """Greedy answer over the real vocabulary, as the runtime samples (the runtime's loop)."""
        from runtime.runner import greedy

        return greedy(runner, ids, feat[None], self.max_new_tokens, self.n_vocab, self.stop_ids,
                      self.suppress_ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def pipeline_answer(self, p: Prepared) -> str:
        """The bundle's answer through the public runtime (engine vision + decoder, greedy)."""
        from runtime import Pipeline

        if self._pipe is None:
            self._pipe = Pipeline.from_bundle(self.bundle_dir, device=self.device,
                                              threads=self.threads, verify=False)
        res = self._pipe.chat(p.item.query_parts(), images=[p.image],
                              max_new_tokens=self.max_new_tokens, temperature=0.0,
                              repetition_penalty=1.0).result()
        return res.text

    _pipe: Any = None


def same_precision_reference(model, plan: str, gptq_dir: Path | None = None,
                             lm_head: str = "int8", cfg=None, target: str = "gpu",
                             kv_scales=None):
    """The PyTorch model with exactly the engine's weights, run in fp32 (``None`` for fp32).

    ``int4``/``edge``: the GPTQ checkpoint ``gptq_dir`` dequantised (the same int4 codes, the
    norms as stored, the embedding table and LM head as the plan ships them: fp16 or int8 rows,
    ``quant.checkpoint``); for a target whose MatMulNBits quantises its inputs to int8 (``cpu``),
    the model does so too; for a target with an int8 KV cache, the model rounds its keys (after
    RoPE) and values with the engine's static scales ``kv_scales`` (``quant.kv_scales``:
    ``KVScales``, e.g. ``read_engine_scales(<bundle>/decoder.onnx)``) as the kernel does.
    ``fp16``: the reference with every weight rounded to fp16, as the fp16 engine stores them.
    The engine differs from it only by activation rounding, so any larger gap is the exporter's.
    """
    import torch

    from quant.plans import PLANS as PRECISION_PLANS

    from .thresholds import plan_name

    plan = plan_name(plan)
    if plan == "fp32":
        return None
    if plan == "fp16":
        import copy

        same = copy.deepcopy(model).float().eval()
        with torch.no_grad():
            for prm in same.parameters():
                prm.copy_(prm.to(torch.float16).float())
        return same
    if gptq_dir is None:
        raise ValueError(f"the {plan} plan's same-precision reference needs its GPTQ checkpoint")
    from quant.checkpoint import load_gptq_model

    t = PRECISION_PLANS[plan].target(target)
    if t.int8_kv and kv_scales is None:
        raise ValueError(f"the {plan} plan's {target} target keeps an int8 KV cache: its "
                         "same-precision reference needs the engine's scales (kv_scales)")
    fq = load_gptq_model(gptq_dir, "fp32", lm_head=lm_head, cfg=cfg,
                         embed=PRECISION_PLANS[plan].embed, int8_acts=t.int8_activations).eval()
    if t.int8_kv:
        from quant.kv_scales import int8_kv

        int8_kv(fq, kv_scales)
    return fq
