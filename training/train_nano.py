"""Train the shipped nano Qwen-VL on synthetic grounding / caption / OCR scenes, on CPU.

The model is the real Qwen-VL architecture (``models/qwen_vl.py``: same modules, same tensor
names, loadable by the original remote code) at toy dimensions (``TRAINED_SPEC``): 448-px input,
14-px patches (the real 32x32 grid), 256 resampler queries, ViT width 64 x 3 layers, decoder
hidden 128 x 4 layers. The data are
drawn on the fly by ``calib_data/synth.py`` from integer seeds: step ``s`` uses the training
seeds ``s*n .. s*n+n-1`` of ``[0, 1e9)``; the held-out validation split is ``[1e9, 2e9)``, which
training never sees (validation losses use its first scenes, the final greedy evaluation
``training/evaluate_nano.py`` the next ones).

Each training sequence is exactly what the runtime builds at inference (``runtime.prompt``: ChatML
of Qwen-VL-Chat with the default system prompt, ``Picture 1:<img>`` + 256 slots + ``</img>\n`` +
question), followed by the answer and ``<|im_end|>``; the loss covers the answer tokens and
``<|im_end|>`` only. Every scene has 1-3 shapes and a sign, and all its questions (each shape in
both grounding forms, the caption, the sign) are packed in one row behind a single copy of the
image prefix with a block attention mask and per-branch positions: exactly the single-question
sequences, but the vision tower and the 270-token prefix run once per image.

Loss: per-task mean token cross-entropy mixed by ``TASK_WEIGHTS`` (so the 1-3 token OCR answers
are not swamped by ~25-token boxes), plus ``--aux-weight`` x training-only per-cell probes on the
image features (``AuxHeads``: what covers each of the 16x16 cells, its box, the hundreds and tens
digits of that box on the 0..1000 grid, the sign's word and the character under the cell). The
probes are discarded; the saved model is plain Qwen-VL. The resampler's routing (query,
``ln_q``/``ln_kv``, q/k projections) stays at its local-pooling init (``freeze_pool_routing``).

The shipped checkpoint, in eight phases (recorded under ``provenance`` in its
``training_report.json``, as run, under this module's earlier name ``models.train_nano``;
S, S3 ... S8 are state directories):

    python -m training.train_nano --out run6 --state-dir S --steps 7000 --minutes 62 \
        --eval-every 500 --val-steps 3 --ckpt-every 250 --eval-n 100     # stopped after step 1750
    python -m training.train_nano --out run7 --state-dir S --resume --steps 7000 --minutes 84 \
        --single-object-steps 2750 --eval-every 250 --val-steps 3 --ckpt-every 250 --eval-n 100
    python -m training.train_nano --out run10 --state-dir S3 \
        --init-from S/state.pt --lr 1e-3 --warmup 50 --steps 6000 --minutes 52 \
        --eval-every 500 --val-steps 3 --ckpt-every 250 --eval-n 100
    python -m training.train_nano --out run11 --state-dir S4 \
        --init-from S3/state.pt --freeze-vision --aux-weight 0 --lr 5e-4 --warmup 50 \
        --steps 5000 --minutes 24 --eval-every 500 --val-steps 3 --ckpt-every 250 --eval-n 100
    python -m training.train_nano --out run12 --state-dir S5 \
        --init-from S4/state.pt --freeze-vision --aux-weight 0 --layers 4 --data-offset 10000 \
        --lr 5e-4 --warmup 50 --steps 20000 --minutes 85 --eval-every 1000 --val-steps 3 \
        --ckpt-every 250 --eval-n 100 --threads 1
    python -m training.train_nano --out run14 --state-dir S6 \
        --init-from S5/state.pt --freeze-vision --aux-weight 0 --layers 4 --data-offset 40000 \
        --lr 3e-4 --warmup 50 --steps 30000 --minutes 110 --eval-every 1000 --val-steps 3 \
        --ckpt-every 250 --eval-n 100 --threads 1
    python -m training.train_nano --out run16 --state-dir S7 \
        --init-from S6/state.pt --freeze-vision --aux-weight 0 --layers 4 --data-offset 60000 \
        --lr 1.5e-4 --warmup 20 --steps 30000 --minutes 21 --eval-every 1000 --val-steps 3 \
        --ckpt-every 250 --eval-n 100 --threads 2
    python -m training.train_nano --out models/nano/qwen-vl-nano --state-dir S8 \
        --init-from S7/state.pt --freeze-vision --aux-weight 0 --layers 4 --data-offset 120000 \
        --lr 3e-4 --warmup 50 --steps 30000 --minutes 88 --eval-every 1000 --val-steps 3 \
        --ckpt-every 250 --eval-n 100 --threads 1

(phases 1-2 predate the routing freeze and the digit probe; phase 3 starts from phase 2's
step-6750 state, phase 4 (decoder only) from phase 3's step-4750 state, phase 5 (decoder only,
unseen scenes) from phase 4's step-3000 state, phase 6 from phase 5's step-7250 state, phase 7
from phase 6's step-9000 state, phase 8 from phase 7's step-2500 state; phases 5, 6 and 8 ran
with one thread beside a second run.
A single from-scratch run with today's defaults is a variant that was not run to the end.)

``--minutes`` makes the cosine schedule follow wall-clock time (the run ends when the budget is
spent; ``training_report.json`` records the steps reached); with ``--minutes 0`` the schedule is
a pure function of ``--steps`` and the run is deterministic. Resumable: model, probe and optimiser
state go to ``--state-dir`` every ``--ckpt-every`` steps and ``--resume`` continues from there
(same data order). ``--init-from`` warm-starts the weights of another run (fresh optimiser and
schedule; into more decoder layers with ``deepen``, which starts the new layers as exact no-ops);
``--data-offset`` then points it at scenes the earlier phases never drew. AdamW, linear warm-up
then cosine decay, gradient clipping at ``--clip``.
The final weights are saved in fp32 (``save_checkpoint``: the real HF layout, plus
``qwen.tiktoken``, ``generation_config.json``, ``tokenizer_config.json``) with
``training_report.json`` (command, time, losses, held-out figures).

Attention during training uses ``F.scaled_dot_product_attention`` (mathematically the same
operation as the reference's explicit softmax, several times faster on CPU for the 1024-token
ViT); all evaluation runs the unmodified reference model.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from calib_data import synth
from runtime.errors import cli_main
from runtime.files import atomic_write_bytes
from runtime.prompt import N_SLOTS

from models.checkpoint import save_checkpoint
from models.config import QwenVLConfig
from models.nano import NanoSpec, nano_config, side_files
from models.qwen_vl import QWenLMHeadModel, rotary_cos_sin, sincos_pos_embed_2d

from .common import SYSTEM, pixels_of, prompt_ids

#: Dimensions of the shipped trained checkpoint.
TRAINED_SPEC = NanoSpec(
    hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=384,
    vis_width=64, vis_layers=3, vis_heads=2, vis_mlp_ratio=2.0,
    image_size=448, patch_size=14, n_queries=256, n_merges=600, seq_length=2048)

IGNORE = -100


# ---------------------------------------------------------------------------------------------
# Vocabulary and encoding
# ---------------------------------------------------------------------------------------------

def vocab_corpus() -> str:
    """Text the BPE is trained on: every word the prompts and answers can contain (each becomes
    a single token), the ChatML roles and the system prompt, plus the generic nano corpus."""
    lines = [SYSTEM, "system", "user", "assistant", "Picture 1:", synth.OCR_PROMPT,
             synth.CAPTION_PROMPT]
    for c in synth.COLORS:
        for s in synth.SHAPES:
            for art in ("a", "an", "the"):
                lines.append(f"{art} {c} {s}")
            lines.append(f"Where is the {c} {s}?")
    lines += [f"{w} " + w + f" and a sign that says {w}" for w in synth.OCR_WORDS]
    lines.append("(0,1),(2,3) 456789, and ")
    text = "\n".join(lines)
    try:
        from models.nano_vocab import NANO_CORPUS
        text = NANO_CORPUS + "\n" + text
    except ImportError:  # pragma: no cover
        pass
    # repeat the task text so its merges win over the generic corpus
    return text + ("\n" + "\n".join(lines)) * 20


def make_tokenizer(n_merges: int):
    from runtime.tokenizer import QwenTokenizer

    from models.nano_vocab import train_bpe
    ranks = train_bpe(vocab_corpus(), n_merges)
    return QwenTokenizer.from_ranks(ranks), ranks


def answer_ids(tok, ex: synth.Example) -> list[int]:
    """The reference answer as the model must generate it, ``<|im_end|>`` included (grounding
    tags are special tokens, as ``runtime.prompt`` encodes assistant turns)."""
    from runtime.tokenizer import GROUNDING_ST
    return tok.encode(ex.answer, allowed_special=GROUNDING_ST) + [tok.im_end_id]


def encode_example(tok, ex: synth.Example, n_slots: int = N_SLOTS) -> tuple[list[int], list[int]]:
    """(input ids, next-token targets) of one example: targets are IGNORE except where the next
    token belongs to the answer (answer tokens and the final ``<|im_end|>``)."""
    p = prompt_ids(tok, ex, n_slots)
    a = answer_ids(tok, ex)
    ids = p + a
    return ids, [IGNORE] * (len(p) - 1) + a + [IGNORE]


# ---------------------------------------------------------------------------------------------
# Data: deterministic batches from seeds
# ---------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    images_per_step: int = 4
    caption_rate: float = 1.0  # chance that a scene also trains its caption
    single_object_steps: int = 0  # curriculum: steps before this one show exactly one shape
    data_offset: int = 0  # step s trains on the scenes of step s + data_offset (warm starts)


def image_examples(seed: int, dc: DataConfig, n_objects: int | None = None) -> list[synth.Example]:
    """Every question trained on one image: each shape in both prompt forms, the OCR question and
    (at ``caption_rate``) the caption."""
    rng = random.Random(f"train-mix:{seed}")
    return synth.scene_examples(seed, with_caption=rng.random() < dc.caption_rate,
                                n_objects=n_objects)


def step_items(step: int, dc: DataConfig, split: str = "train") -> list[int]:
    """The scene seeds of one step: ``step * n .. step * n + n - 1`` of the split's range."""
    n = dc.images_per_step
    return [synth.split_seed(split, step * n + i) for i in range(n)]


@dataclass
class Batch:
    """One row per image: the shared prompt prefix, then one branch per question.

    A branch sees the prefix and itself only (``mask``) and its RoPE positions continue from
    the prefix (``positions``), so every branch is computed exactly as its own sequence
    ``prefix + branch`` would be, while the 258-token image prefix is computed once.
    """

    pixels: torch.Tensor  # [N, 3, S, S]
    ids: torch.Tensor  # [N, T]
    targets: torch.Tensor  # [N, T] next-token targets, IGNORE where unsupervised
    positions: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, 1, T, T] bool, True = may attend
    tasks: torch.Tensor  # [N, T] task index (TASKS) of each target
    n_questions: int
    aux: dict[str, torch.Tensor] | None = None  # per-slot labels (``slot_labels``)


TASK_INDEX = {t: i for i, t in enumerate(synth.TASKS)}


def pack_row(seqs: list[tuple[list[int], list[int], int]]) -> tuple[list[int], list[int], list[int],
                                                                     list[int], list[int]]:
    """Share the longest common prompt prefix of ``seqs`` ((ids, targets, n_prompt) each).

    Returns ids, targets, positions, branch index per token (-1: prefix) and task per token."""
    n_common = min(n for _, _, n in seqs) - 1  # every branch keeps >= 1 prompt token
    first = seqs[0][0]
    p = 0
    while p < n_common and all(s[0][p] == first[p] for s in seqs):
        p += 1
    ids, tgt = list(first[:p]), [IGNORE] * p
    pos, branch = list(range(p)), [-1] * p
    for j, (s_ids, s_tgt, _) in enumerate(seqs):
        ids += s_ids[p:]
        tgt += s_tgt[p:]
        pos += list(range(p, len(s_ids)))
        branch += [j] * (len(s_ids) - p)
    return ids, tgt, pos, branch


N_OBJECT_CLASSES = 2 + len(synth.COLORS) * len(synth.SHAPES)  # background, shapes, sign
N_TEXT_CLASSES = len(synth.OCR_WORDS) + synth.OCR_NUMBER_RANGE[1] + 1
CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def text_class(text: str) -> int:
    if text in synth.OCR_WORDS:
        return synth.OCR_WORDS.index(text)
    return len(synth.OCR_WORDS) + int(text)


def box_digits(grid_box: tuple[int, int, int, int]) -> list[int]:
    """Hundreds and tens digit of each coordinate, (x1 h, x1 t, y1 h, ..., y2 t): the classes the
    answer's box digits are copied from, so the probe makes them linearly readable."""
    return [d for v in grid_box for d in (v // 100, v // 10 % 10)]


def slot_labels(ex: synth.Example, n_queries: int) -> dict[str, torch.Tensor]:
    """Training-only targets for the n_queries image features (a g x g grid over the squashed
    image, row-major like the resampler's 2-D pos_embed): what covers the centre of each cell
    (class), the normalised box of that object or sign, the hundreds and tens digits of the
    shape's box on the 0..1000 grid (``dig``, [n_queries, 8], IGNORE off the shapes), the
    sign's text, and the character under the cell."""
    g = int(math.sqrt(n_queries))
    W, H = ex.image.size
    cls = torch.zeros(n_queries, dtype=torch.long)
    box = torch.zeros(n_queries, 4)
    txt = torch.full((n_queries,), IGNORE, dtype=torch.long)
    chr_ = torch.full((n_queries,), IGNORE, dtype=torch.long)
    dig = torch.full((n_queries, 8), IGNORE, dtype=torch.long)
    chars = [(CHARSET.index(ch), b) for ch, b in ex.truth.get("char_boxes", []) if ch in CHARSET]
    items = [(2 + synth.ordered_index(o), o.box, None,
              torch.tensor(box_digits(synth.grid_box(o.box, W, H)))) for o in ex.truth["objects"]]
    if ex.truth.get("sign_box") is not None:
        items.append((1, ex.truth["sign_box"], text_class(ex.truth["text"]), None))
    for r in range(g):
        y = (r + 0.5) / g * H
        for c in range(g):
            x = (c + 0.5) / g * W
            for k, (x1, y1, x2, y2), t, digits in items:
                if x1 <= x < x2 and y1 <= y < y2:
                    m = r * g + c
                    cls[m] = k
                    box[m] = torch.tensor([x1 / W, y1 / H, x2 / W, y2 / H])
                    if t is not None:
                        txt[m] = t
                    else:
                        dig[m] = digits
                    break
            for k, (x1, y1, x2, y2) in chars:
                if x1 <= x < x2 and y1 <= y < y2:
                    chr_[r * g + c] = k
    return {"cls": cls, "box": box, "txt": txt, "chr": chr_, "dig": dig}


def collate(tok, seeds: list[int], dc: DataConfig, cfg: QwenVLConfig,
            n_objects: int | None = None) -> Batch:
    pix, rows, n_q, aux = [], [], 0, []
    for seed in seeds:
        exs = image_examples(seed, dc, n_objects)
        pix.append(pixels_of(exs[0].image, cfg.visual.image_size))
        ocr = [e for e in exs if e.task == "ocr"]
        lab_ex = ocr[0] if ocr else exs[0]
        lab_ex.truth.setdefault("objects", exs[0].truth.get("objects", []))
        aux.append(slot_labels(lab_ex, cfg.visual.n_queries))
        seqs = []
        for ex in exs:
            ids, tgt = encode_example(tok, ex, cfg.visual.n_queries)
            n_prompt = len(ids) - len(answer_ids(tok, ex))
            seqs.append((ids, tgt, n_prompt))
        row = pack_row(seqs)
        row_tasks = [TASK_INDEX[exs[b].task] if b >= 0 else -1 for b in row[3]]
        rows.append(row + (row_tasks,))
        n_q += len(exs)
    T = max(len(r[0]) for r in rows)
    N = len(rows)
    ids = torch.full((N, T), tok.eod_id, dtype=torch.long)
    targets = torch.full((N, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((N, T), dtype=torch.long)
    tasks = torch.full((N, T), -1, dtype=torch.long)
    mask = torch.zeros((N, 1, T, T), dtype=torch.bool)
    for i, (r_ids, r_tgt, r_pos, r_branch, r_task) in enumerate(rows):
        n = len(r_ids)
        ids[i, :n] = torch.tensor(r_ids)
        targets[i, :n] = torch.tensor(r_tgt)
        positions[i, :n] = torch.tensor(r_pos)
        positions[i, n:] = torch.arange(n, T)
        tasks[i, :n] = torch.tensor(r_task)
        br = torch.tensor(r_branch + [-2] * (T - n))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = (br[:, None] == br[None, :]) | (br[None, :] == -1)  # own branch or the prefix
        m = causal & same
        m[n:, :] = False
        m[torch.arange(n, T), torch.arange(n, T)] = True  # padding sees itself (no NaN rows)
        mask[i, 0] = m
    aux_t = {k: torch.stack([a[k] for a in aux]) for k in aux[0]}
    return Batch(torch.stack(pix), ids, targets, positions, mask, tasks, n_q, aux_t)


# ---------------------------------------------------------------------------------------------
# Model: init and a fast training forward (same math as the reference)
# ---------------------------------------------------------------------------------------------

def init_weights(model: QWenLMHeadModel, seed: int) -> None:
    """GPT-2 style init, plus priors for the vision side that training from scratch at toy width
    needs (without them the resampler averages the whole image into every query, its output
    collapses to an image-independent vector and the decoder learns to ignore the picture):

    - the ViT position table starts as a 2-D sin-cos grid;
    - the resampler pools locally: its query/key projections start at ``POOL_ALPHA * I`` and
      ``ln_q``/``ln_kv`` at gain 0.1, so the scores are dominated by the (frozen) 2-D sin-cos
      ``pos_embed`` of the query against the interpolated one of the keys, and query (i, j)
      gathers the patches of grid cell (i, j). At hidden 128 the sin-cos dot product is 32x
      weaker than at the real 4096, hence the gain.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    n_res = 2 * cfg.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            parent = name.split(".")[-2]
            if name.endswith("attn_pool.pos_embed"):
                continue  # frozen 2-D sin-cos table, as in the original
            if parent in ("ln_q", "ln_kv"):
                p.fill_(0.1 if leaf == "weight" else 0.0)
            elif parent in ("ln_1", "ln_2", "ln_f", "ln_pre", "ln_post"):
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf in ("bias", "in_proj_bias"):
                p.zero_()
            elif name.endswith("visual.positional_embedding"):
                p.copy_(sincos_pos_embed_2d(p.shape[1], 16))
            elif name.endswith("visual.conv1.weight"):
                p.normal_(0, (p[0].numel()) ** -0.5, generator=g)
            elif name.endswith("visual.proj"):
                p.normal_(0, p.shape[0] ** -0.5, generator=g)
            elif name.endswith("attn_pool.query"):
                p.normal_(0, 0.02, generator=g)
            elif name.endswith("attn_pool.attn.in_proj_weight"):
                d = p.shape[1]
                p.normal_(0, 0.02, generator=g)
                p[:d] += POOL_ALPHA * torch.eye(d)
                p[d:2 * d] += POOL_ALPHA * torch.eye(d)
                p[2 * d:].normal_(0, d ** -0.5, generator=g)
            elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")) and "visual" not in name:
                p.normal_(0, 0.02 / math.sqrt(n_res), generator=g)
            else:
                p.normal_(0, 0.02, generator=g)


POOL_ALPHA = 4.0


def _vit_attn(self, x):  # VisualAttention with SDPA
    n, length, width = x.shape
    qkv = self.in_proj(x).view(n, length, self.heads, 3 * self.head_dim)
    q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


def _pool_mha(self, q, k, v):  # Resampler._mha with SDPA
    attn = self.attn
    dim = q.size(-1)
    hd = dim // self.num_heads
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    n, lq, lk = q.size(0), q.size(1), k.size(1)
    q = F.linear(q, wq, bq).view(n, lq, self.num_heads, hd).transpose(1, 2)
    k = F.linear(k, wk, bk).view(n, lk, self.num_heads, hd).transpose(1, 2)
    v = F.linear(v, wv, bv).view(n, lk, self.num_heads, hd).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, lq, dim)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class fast_attention:
    """Context manager: swap the reference's explicit attention for SDPA (training only)."""

    def __enter__(self):
        from models import qwen_vl as Q
        self._saved = (Q.VisualAttention.forward, Q.Resampler._mha)
        Q.VisualAttention.forward = _vit_attn
        Q.Resampler._mha = _pool_mha
        return self

    def __exit__(self, *exc):
        from models import qwen_vl as Q
        Q.VisualAttention.forward, Q.Resampler._mha = self._saved


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` with per-row positions: t [B,S,H,D], cos/sin [B,S,D] (fp32 math)."""
    tf = t.float()
    x1, x2 = tf.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (tf * cos[:, :, None] + rot * sin[:, :, None]).type_as(t)


def train_logits(model: QWenLMHeadModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """Logits at the supervised positions only ([n, vocab]), their targets and task ids ([n]),
    and the image features ([N, n_queries, hidden])."""
    cfg = model.cfg
    feats = model.encode_images(batch.pixels)  # [N, Q, D], one image per row
    x = model.embed(batch.ids, feats)
    b, s, hidden = x.shape
    cos, sin = rotary_cos_sin(batch.positions.reshape(-1), cfg.head_dim, cfg.rotary_emb_base)
    cos, sin = cos.view(b, s, -1), sin.view(b, s, -1)
    for blk in model.transformer.h:
        at = blk.attn
        q, k, v = at.c_attn(blk.ln_1(x)).split(hidden, dim=-1)
        q = _rope(q.view(b, s, at.heads, at.head_dim), cos, sin)
        k = _rope(k.view(b, s, at.heads, at.head_dim), cos, sin)
        v = v.view(b, s, at.heads, at.head_dim)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=batch.mask)
        x = x + at.c_proj(o.transpose(1, 2).reshape(b, s, hidden))
        x = x + blk.mlp(blk.ln_2(x))
    sel = batch.targets != IGNORE
    h = model.transformer.ln_f(x[sel])
    return model.lm_head(h), batch.targets[sel], batch.tasks[sel], feats


class AuxHeads(nn.Module):
    """Training-only linear probes on the image features (discarded at save time, the shipped
    model is plain Qwen-VL). They give the vision tower dense targets from the first step —
    what is in each cell, its box and the digits the answer writes for it, the sign's word —
    so the decoder soon finds informative features to attend to, instead of settling on the
    text prior (a constant answer). The digit probe matters most: a box answer is digits, and a
    cell whose features hold them as linearly separable classes is one the decoder can copy."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.Linear(dim, N_OBJECT_CLASSES)
        self.box = nn.Linear(dim, 4)
        self.txt = nn.Linear(dim, N_TEXT_CLASSES)
        self.chr = nn.Linear(dim, len(CHARSET))
        self.dig = nn.Linear(dim, 8 * 10)

    def loss(self, feats: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        f = feats.float()
        l_cls = F.cross_entropy(self.cls(f).flatten(0, 1), aux["cls"].flatten())
        on = aux["cls"].flatten() > 0
        l_box = F.l1_loss(torch.sigmoid(self.box(f)).flatten(0, 1)[on], aux["box"].flatten(0, 1)[on]) \
            if on.any() else f.sum() * 0
        txt = aux["txt"].flatten()
        l_txt = F.cross_entropy(self.txt(f).flatten(0, 1), txt, ignore_index=IGNORE) \
            if (txt != IGNORE).any() else f.sum() * 0
        ch = aux["chr"].flatten()
        l_chr = F.cross_entropy(self.chr(f).flatten(0, 1), ch, ignore_index=IGNORE) \
            if (ch != IGNORE).any() else f.sum() * 0
        dig = aux["dig"].flatten()
        l_dig = F.cross_entropy(self.dig(f).reshape(-1, 10), dig, ignore_index=IGNORE) \
            if (dig != IGNORE).any() else f.sum() * 0
        return l_cls + 5.0 * l_box + l_txt + l_chr + l_dig


#: Share of the loss per task. Without it the ~25-token box answers would swamp the 1-3 token
#: OCR answers (a scene has 2-6 grounding answers and one sign).
TASK_WEIGHTS = {"grounding": 0.45, "ocr": 0.4, "caption": 0.15}


def balanced_loss(logits: torch.Tensor, targets: torch.Tensor, task: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """Per-task mean token cross-entropy, mixed by ``weights`` (indexed like ``synth.TASKS``)
    and renormalised over the tasks present in the batch."""
    loss = F.cross_entropy(logits.float(), targets, reduction="none")
    n = len(weights)
    sums = torch.zeros(n, dtype=loss.dtype).index_add(0, task, loss)
    counts = torch.zeros(n, dtype=loss.dtype).index_add(0, task, torch.ones_like(loss))
    present = counts > 0
    w = weights * present
    return (w[present] * sums[present] / counts[present]).sum() / w.sum()


def lr_at(step: int, progress: float, lr: float, warmup: int, min_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_frac * lr`` as
    ``progress`` (fraction of the run done) goes from 0 to 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, max(0.0, progress))
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


class StepData(torch.utils.data.IterableDataset):
    """Batches of steps ``start..steps-1`` in order (drawn in a worker process)."""

    def __init__(self, tok, dc: DataConfig, cfg: QwenVLConfig, start: int, steps: int):
        self.tok, self.dc, self.cfg, self.start, self.steps = tok, dc, cfg, start, steps

    def __iter__(self):
        for step in range(self.start, self.steps):
            n_obj = 1 if step < self.dc.single_object_steps else None
            seeds = step_items(step + self.dc.data_offset, self.dc)
            yield collate(self.tok, seeds, self.dc, self.cfg, n_obj)


def batches(tok, dc: DataConfig, cfg: QwenVLConfig, start: int, steps: int, workers: int):
    if workers <= 0:
        return StepData(tok, dc, cfg, start, steps)
    return torch.utils.data.DataLoader(StepData(tok, dc, cfg, start, steps), batch_size=None,
                                       num_workers=1, prefetch_factor=4, persistent_workers=False)


def conv_lr_scale(patch_size: int) -> float:
    """lr multiplier of the patch embedding: ``(14 / patch)^2``. Adam moves every weight by ~lr
    whatever its fan-in, so a 28-px patch filter (2352 inputs) changes its output 4x faster than
    a 14-px one; at full lr its output outgrew the position table ~50x and ``ln_pre`` drowned
    the positions (measured in a 28-px run: local colour no longer decodable after the ViT)."""
    return min(1.0, (14 / patch_size) ** 2)


def routing_parts(model: QWenLMHeadModel) -> list[tuple[nn.Parameter, slice]]:
    """The resampler's *routing*: the tensors (and rows) that decide which image cells each
    query reads: query, ``ln_q``, ``ln_kv`` and the q/k rows of the packed input projection."""
    pool = model.transformer.visual.attn_pool
    qk = slice(0, 2 * pool.attn.in_proj_weight.shape[1])
    every = slice(None)
    return [(pool.query, every), (pool.ln_q.weight, every), (pool.ln_q.bias, every),
            (pool.ln_kv.weight, every), (pool.ln_kv.bias, every),
            (pool.attn.in_proj_weight, qk), (pool.attn.in_proj_bias, qk)]


def freeze_pool_routing(model: QWenLMHeadModel) -> None:
    """Keep the resampler's routing (``routing_parts``) at ``init_weights``'s local-pooling
    values; its values and output projection stay trainable.

    Why: trained freely, the routing drifted from "query (i, j) reads cell (i, j)" (48 % of the
    attention on its own cell at init) to a blur shifted by a few cells (7-11 % on its own cell,
    measured on two runs), so the image features no longer said *where* anything was and box
    digits stayed near chance. The saved weights are ordinary Qwen-VL tensors either way."""
    for prm, rows in routing_parts(model):
        if rows == slice(None):
            prm.requires_grad_(False)
        else:
            keep = torch.ones(prm.shape[0], *([1] * (prm.ndim - 1)))
            keep[rows] = 0.0
            prm.register_hook(lambda g, keep=keep: g * keep)


def decoder_depth(state: dict[str, torch.Tensor]) -> int:
    """Number of decoder layers (``transformer.h.<i>.*``) in a model state dict."""
    return 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.h."))


def deepen(state: dict[str, torch.Tensor], n_new: int) -> dict[str, torch.Tensor]:
    """A decoder state dict with ``n_new`` layers that computes exactly what ``state``'s computes.

    Each old layer ``i`` is followed by ``n_new / n_old - 1`` copies of itself whose two output
    projections (``attn.c_proj``, ``mlp.c_proj``) are zero, so they add nothing to the residual
    stream until trained; their other weights start from the trained layer (not random), so
    their first gradients already point somewhere useful. Why: more sequential decoder compute
    on top of a trained model without losing what it knows (a box answer is several steps of
    arithmetic: which shape, which coordinate, which digit place)."""
    pre = "transformer.h."
    n_old = decoder_depth(state)
    if n_new % n_old:
        raise ValueError(f"cannot deepen {n_old} decoder layers to {n_new}: use a multiple of {n_old}")
    k = n_new // n_old
    out = {key: v for key, v in state.items() if not key.startswith(pre)}
    for key, v in state.items():
        if not key.startswith(pre):
            continue
        i, rest = key[len(pre):].split(".", 1)
        for j in range(k):
            zero = j > 0 and rest.split(".")[-2] == "c_proj"
            out[f"{pre}{int(i) * k + j}.{rest}"] = torch.zeros_like(v) if zero else v.clone()
    return out


def warm_start(model: QWenLMHeadModel, state_path: Path, seed: int) -> dict:
    """Load the model weights of a resumable state (``state.pt``) and put the resampler's
    routing back to ``init_weights``'s local pooling (see ``freeze_pool_routing``); returns the
    state's probe weights. For continuing a run trained before the routing was frozen. A model
    with more decoder layers than the state is filled in by ``deepen``."""
    st = torch.load(state_path, weights_only=False, map_location="cpu")
    weights = st["model"]
    n_state = decoder_depth(weights)
    if n_state != model.cfg.num_hidden_layers:
        weights = deepen(weights, model.cfg.num_hidden_layers)
    model.load_state_dict(weights)
    # the init's random stream depends on the depth: reset the routing to the state's own init
    fresh = QWenLMHeadModel(dataclasses.replace(model.cfg, num_hidden_layers=n_state))
    init_weights(fresh, seed)
    with torch.no_grad():
        for (p, rows), (ref, _) in zip(routing_parts(model), routing_parts(fresh)):
            p[rows] = ref[rows]
    print(f"warm start from {state_path} (step {st['step']}), resampler routing reset", file=sys.stderr)
    return st.get("heads", {})


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """AdamW groups: decay on matrices (not embeddings, position tables, queries or the
    resampler's partly frozen in_proj), the patch embedding at ``conv_lr_scale``."""
    decay, no_decay, conv = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("visual.conv1.weight"):
            conv.append(p)
        elif (p.ndim >= 2 and "wte" not in name and "positional" not in name
              and "query" not in name and "attn_pool.attn.in_proj" not in name):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0},
            {"params": conv, "weight_decay": wd,
             "lr_scale": conv_lr_scale(model.cfg.visual.patch_size)}]


@torch.no_grad()
def val_loss(model, tok, dc: DataConfig, cfg, n_steps: int) -> dict[str, float]:
    """Mean answer-token loss per task on the first ``n_steps`` batches of the val split."""
    was = model.training
    model.eval()
    sums = torch.zeros(len(synth.TASKS))
    counts = torch.zeros(len(synth.TASKS))
    with fast_attention():
        for i in range(n_steps):
            batch = collate(tok, step_items(i, dc, "val"), dc, cfg)
            logits, tgt, task, _ = train_logits(model, batch)
            loss = F.cross_entropy(logits.float(), tgt, reduction="none")
            sums.index_add_(0, task, loss)
            counts.index_add_(0, task, torch.ones_like(loss))
    model.train(was)
    out = {t: round(float(sums[i] / counts[i]), 4) for i, t in enumerate(synth.TASKS) if counts[i]}
    out["all"] = round(float(sums.sum() / counts.sum()), 4)
    return out


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m training.train_nano",
        description="Train the nano Qwen-VL (real architecture, toy size) on synthetic grounding, "
                    "caption and OCR scenes on CPU, then save it in the Hugging Face layout.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="models/nano/qwen-vl-nano", help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=2400, help="optimiser steps")
    ap.add_argument("--minutes", type=float, default=0,
                    help="wall-clock budget: the cosine schedule follows max(step/steps, "
                         "elapsed/minutes) and training stops when either is reached "
                         "(0 = steps only, fully deterministic)")
    ap.add_argument("--workers", type=int, default=1,
                    help="data worker processes (0: draw batches in the training process)")
    ap.add_argument("--seed", type=int, default=0, help="weight-init seed (data seeds come from the step)")
    ap.add_argument("--images-per-step", type=int, default=4,
                    help="scenes per batch (each gives ~6 questions)")
    ap.add_argument("--single-object-steps", type=int, default=0,
                    help="curriculum: training scenes before this step hold exactly one shape "
                         "(learn to read a box before learning which shape a phrase names)")
    ap.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--min-lr-frac", type=float, default=0.05, help="final lr as a fraction of --lr")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--aux-weight", type=float, default=0.5,
                    help="weight of the training-only per-slot losses on the image features "
                         "(AuxHeads; 0 disables)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--eval-every", type=int, default=200, help="validation loss every N steps")
    ap.add_argument("--val-steps", type=int, default=4, help="validation batches per evaluation")
    ap.add_argument("--ckpt-every", type=int, default=200, help="resumable state every N steps")
    ap.add_argument("--state-dir", default=None,
                    help="where resumable states go (default: .cache/train_nano/<out name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest state")
    ap.add_argument("--init-from", default=None, metavar="STATE_PT",
                    help="start from the model weights of another run's state.pt (fresh optimiser "
                         "and schedule; the resampler routing is reset to its initial pooling)")
    ap.add_argument("--data-offset", type=int, default=0,
                    help="step s trains on the scenes of step s + N (a warm start's new scenes)")
    ap.add_argument("--freeze-vision", action="store_true",
                    help="train the decoder only (the vision tower keeps its weights; use with "
                         "--init-from and --aux-weight 0)")
    ap.add_argument("--eval-n", type=int, default=100,
                    help="held-out examples per task for the final greedy evaluation (0: skip)")
    g = ap.add_argument_group("model size (defaults: TRAINED_SPEC, the shipped checkpoint)")
    d = TRAINED_SPEC
    g.add_argument("--hidden-size", type=int, default=d.hidden_size, help="decoder width (x128)")
    g.add_argument("--layers", type=int, default=d.num_hidden_layers, help="decoder layers")
    g.add_argument("--heads", type=int, default=d.num_attention_heads, help="decoder heads")
    g.add_argument("--ffn", type=int, default=d.ffn_dim, help="decoder SwiGLU width")
    g.add_argument("--vis-width", type=int, default=d.vis_width, help="ViT width")
    g.add_argument("--vis-layers", type=int, default=d.vis_layers, help="ViT layers")
    g.add_argument("--vis-heads", type=int, default=d.vis_heads, help="ViT heads")
    g.add_argument("--patch-size", type=int, default=d.patch_size,
                   help="ViT patch side in pixels (448 must be a multiple)")
    g.add_argument("--n-merges", type=int, default=d.n_merges, help="BPE merges of the vocabulary")
    return ap


def _spec(args: argparse.Namespace) -> NanoSpec:
    """TRAINED_SPEC with the model-size options applied."""
    spec = dataclasses.replace(
        TRAINED_SPEC, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, ffn_dim=args.ffn, vis_width=args.vis_width,
        vis_layers=args.vis_layers, vis_heads=args.vis_heads, patch_size=args.patch_size,
        n_merges=args.n_merges)
    if spec.vis_width == spec.hidden_size:
        build_parser().error("--vis-width must differ from --hidden-size "
                             "(the original resampler drops kv_proj then)")
    return spec


def _model_and_optimiser(args: argparse.Namespace, cfg: QwenVLConfig
                         ) -> tuple[QWenLMHeadModel, AuxHeads, torch.optim.AdamW]:
    """The fresh or warm-started model, its training-only heads and one AdamW over both."""
    model = QWenLMHeadModel(cfg)
    init_weights(model, args.seed)
    model.transformer.visual.attn_pool.pos_embed.requires_grad_(False)
    warm_heads = warm_start(model, Path(args.init_from), args.seed) if args.init_from else {}
    freeze_pool_routing(model)
    if args.freeze_vision:
        model.transformer.visual.requires_grad_(False)
    model.train()
    heads = AuxHeads(cfg.hidden_size)
    if warm_heads:
        heads.load_state_dict(warm_heads, strict=False)  # the digit probe may be new
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay) +
                            [{"params": list(heads.parameters()), "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    return model, heads, opt


def _resume(args: argparse.Namespace, state_dir: Path, model: QWenLMHeadModel, heads: AuxHeads,
            opt: torch.optim.Optimizer) -> tuple[int, list[dict], float]:
    """Start step, history and elapsed seconds: the saved state's with --resume, else zeros."""
    start, history, elapsed0 = 0, [], 0.0
    if args.resume and (state_dir / "state.pt").is_file():
        st = torch.load(state_dir / "state.pt", weights_only=False)
        model.load_state_dict(st["model"])
        heads.load_state_dict(st["heads"])
        opt.load_state_dict(st["opt"])
        start, history, elapsed0 = st["step"], st["history"], st["elapsed"]
        print(f"resumed from step {start}", file=sys.stderr)
    return start, history, elapsed0


def _optimise(args: argparse.Namespace, model: QWenLMHeadModel, heads: AuxHeads,
              opt: torch.optim.Optimizer, batch: Batch, weights: torch.Tensor,
              lr: float) -> tuple[torch.Tensor, float]:
    """One optimiser step at ``lr``; returns the loss and the gradient norm before clipping."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    logits, tgt, task, feats = train_logits(model, batch)
    loss = balanced_loss(logits, tgt, task, weights)
    if args.aux_weight:
        loss = loss + args.aux_weight * heads.loss(feats, batch.aux)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip))
    opt.step()
    return loss, gnorm


def _save_state(args: argparse.Namespace, state_dir: Path, model: QWenLMHeadModel,
                heads: AuxHeads, opt: torch.optim.Optimizer, done: int, history: list[dict],
                elapsed: float) -> None:
    """Write the resumable state that --resume reads back, atomically."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "heads": heads.state_dict(),
                "opt": opt.state_dict(), "step": done,
                "history": history, "elapsed": elapsed,
                "args": vars(args)}, buf)
    atomic_write_bytes(state_dir / "state.pt", buf.getvalue())


def _train(args: argparse.Namespace, model: QWenLMHeadModel, heads: AuxHeads,
           opt: torch.optim.Optimizer, tok, dc: DataConfig, cfg: QwenVLConfig, state_dir: Path,
           start: int, history: list[dict], elapsed0: float) -> tuple[int, float | None, float]:
    """The training loop (schedule, validation, states, time budget); returns the last step
    index, the loss EMA and the start time that the elapsed time counts from."""
    from tqdm import tqdm
    weights = torch.tensor([TASK_WEIGHTS[t] for t in synth.TASKS])
    t0 = time.time() - elapsed0
    ema = None
    pbar = tqdm(total=args.steps, initial=start, desc="train", dynamic_ncols=True, mininterval=5)
    step = start - 1
    budget = args.minutes * 60
    data = batches(tok, dc, cfg, start, args.steps, args.workers)
    with fast_attention():
        for step, batch in enumerate(data, start):
            elapsed = time.time() - t0
            progress = max(step / args.steps, elapsed / budget if budget else 0.0)
            lr = lr_at(step, progress, args.lr, args.warmup, args.min_lr_frac)
            loss, gnorm = _optimise(args, model, heads, opt, batch, weights, lr)
            ema = float(loss.detach()) if ema is None else 0.98 * ema + 0.02 * float(loss.detach())
            pbar.update(1)
            pbar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", gn=f"{gnorm:.2f}", refresh=False)
            done = step + 1
            rec = {"step": done, "loss": round(ema, 4), "lr": lr, "time_s": round(time.time() - t0, 1)}
            if done % args.eval_every == 0 or done == args.steps:
                with torch.no_grad():
                    rec["val"] = val_loss(model, tok, dc, cfg, args.val_steps)
                pbar.write(json.dumps(rec))
                history.append(rec)
            if done % args.ckpt_every == 0 and done < args.steps:
                _save_state(args, state_dir, model, heads, opt, done, history, time.time() - t0)
            if budget and time.time() - t0 >= budget:
                pbar.write(f"stopping at step {done}: the {args.minutes:g}-minute budget is spent")
                break
    pbar.close()
    return step, ema, t0


def _report(args: argparse.Namespace, argv: list[str] | None, spec: NanoSpec, n_params: int,
            n_bpe: int, steps: int, dc: DataConfig, train_time: float, ema: float | None,
            final_val: dict[str, float], history: list[dict]) -> dict:
    """training_report.json: the command, the spec, the run's figures and the data it drew from."""
    return {
        "command": "python -m training.train_nano " + " ".join(argv if argv is not None else sys.argv[1:]),
        "spec": asdict(spec), "parameters": n_params, "vocab_bpe": n_bpe,
        "steps": steps, "steps_requested": args.steps, "minutes_budget": args.minutes,
        "images_seen": steps * dc.images_per_step, "images_per_step": dc.images_per_step,
        "seed": args.seed,
        "train_time_s": round(train_time, 1), "final_train_loss_ema": ema,
        "final_val_loss": final_val, "task_weights": TASK_WEIGHTS, "aux_weight": args.aux_weight,
        "history": history,
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": args.threads, "weights_dtype": "float32",
        "data": {"train_seeds": list(synth.SPLITS["train"]), "val_seeds": list(synth.SPLITS["val"]),
                 "colors": list(synth.COLORS), "shapes": list(synth.SHAPES),
                 "object_frac": list(synth.OBJECT_FRAC), "sign_text_frac": list(synth.SIGN_TEXT_FRAC),
                 "ocr_words": list(synth.OCR_WORDS), "ocr_number_rate": synth.OCR_NUMBER_RATE,
                 "ocr_number_range": list(synth.OCR_NUMBER_RANGE), "fonts": list(synth.font_names())},
    }


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats make CPU kernels crawl late in training
    torch.manual_seed(args.seed)
    spec = _spec(args)
    tok, ranks = make_tokenizer(spec.n_merges)
    cfg = nano_config(spec, len(ranks))
    dc = DataConfig(images_per_step=args.images_per_step,
                    single_object_steps=args.single_object_steps, data_offset=args.data_offset)
    model, heads, opt = _model_and_optimiser(args, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    state_dir = Path(args.state_dir or Path(".cache") / "train_nano" / Path(args.out).name)
    state_dir.mkdir(parents=True, exist_ok=True)
    start, history, elapsed0 = _resume(args, state_dir, model, heads, opt)
    print(f"nano Qwen-VL: {n_params / 1e6:.2f} M parameters, vocab {cfg.vocab_size}, "
          f"{args.steps} steps x {dc.images_per_step} images", file=sys.stderr)

    step, ema, t0 = _train(args, model, heads, opt, tok, dc, cfg, state_dir, start, history,
                           elapsed0)
    train_time = time.time() - t0
    model.eval()
    final_val = val_loss(model, tok, dc, cfg, args.val_steps)
    report = _report(args, argv, spec, n_params, len(ranks), step + 1, dc, train_time, ema,
                     final_val, history)
    if args.eval_n:
        from .evaluate_nano import evaluate
        t1 = time.time()
        report["eval"] = evaluate(model, tok, n=args.eval_n)
        report["eval"]["time_s"] = round(time.time() - t1, 1)
        print(json.dumps(report["eval"], indent=2), file=sys.stderr)
    extra = side_files(cfg, ranks)
    extra["training_report.json"] = json.dumps(report, indent=2) + "\n"
    for p in model.parameters():
        p.requires_grad_(False)
    save_checkpoint(model, cfg, args.out, dtype="fp32", extra_files=extra)
    print(f"saved {args.out} ({train_time / 60:.1f} min)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
