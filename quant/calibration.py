"""GPTQ calibration inputs from image-conditioned prompts, built exactly as at deployment.

Each item is an image (or several) + a prompt + an optional reference answer. The image goes
through the runtime's preprocessing (``runtime.image``) and the vision tower; the prompt through
the runtime's ChatML builder (``runtime.prompt.build_chat_ids``, one ``<img>`` + ``n_queries``
slots + ``</img>`` span per image); the reference answer (if any) is appended as the assistant
turn. The decoder input is then ``model.embed(ids, image_embeds)``: the same embeddings the
deployed decoder sees, image features spliced into the slots. Text-only calibration is refused:
a quantiser that never saw image features would calibrate the decoder for the wrong inputs
(the image slots are ~80 % of a typical prompt's tokens).

The calibration *set* (manifest, images, split) lives in ``calib_data/``; this module turns
``CalibItem`` lists into the hidden states ``quant.gptq.quantize_decoder`` consumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from runtime.errors import EdgeError

log = logging.getLogger(__name__)

DEFAULT_MIN_ITEMS = 8  # nano / tests; real runs want 64-256 items

ImageLike = Union[str, Path, bytes, np.ndarray, Any]  # Any: PIL.Image.Image


class CalibrationError(EdgeError, ValueError):
    """A calibration set that cannot be used, with the reason in one line."""


@dataclass
class CalibItem:
    """One calibration example: image(s) + prompt (+ the reference answer, teacher-forced)."""

    image: ImageLike | Sequence[ImageLike] | None
    prompt: Any  # str, or runtime.prompt parts (str / Ref / Box)
    answer: str | None = None

    def images(self) -> list[ImageLike]:
        if self.image is None:
            return []
        if isinstance(self.image, (list, tuple)):
            return [im for im in self.image if im is not None]
        return [self.image]


def check_items(items: Sequence[CalibItem], min_items: int = DEFAULT_MIN_ITEMS) -> None:
    """Refuse text-only items and too-small sets before any expensive work."""
    items = list(items)
    for i, it in enumerate(items):
        if not isinstance(it, CalibItem):
            raise CalibrationError(f"calibration item {i} is a {type(it).__name__}, not a CalibItem"
                                   "(image, prompt, answer)")
        if not it.images():
            raise CalibrationError(
                f"calibration item {i} has no image: text-only calibration is refused (the decoder "
                "must be calibrated on image features, as at deployment); give every item an image")
    if len(items) < min_items:
        raise CalibrationError(f"calibration needs at least {min_items} image+prompt items, got "
                               f"{len(items)}: add items (or lower min_items)")


def item_ids(tok, item: CalibItem, n_slots: int) -> list[int]:
    """ChatML ids of one item: the prompt with its image span(s), then the answer + <|im_end|>."""
    from runtime.prompt import build_chat_ids
    from runtime.tokenizer import GROUNDING_ST

    ids = build_chat_ids(tok, item.prompt, n_images=len(item.images()), n_slots=n_slots)
    if item.answer:
        ids = ids + tok.encode(item.answer, allowed_special=GROUNDING_ST) + [tok.im_end_id]
    return ids


@torch.no_grad()
def build_calibration(model, items: Sequence[CalibItem], tokenizer, *,
                      min_items: int = DEFAULT_MIN_ITEMS,
                      vision_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      ) -> list[torch.Tensor]:
    """-> one ``inputs_embeds`` [1, T, hidden] (float32) per item, for ``quantize_decoder``.

    ``model``: the reference ``QWenLMHeadModel`` (only ``wte`` and, without ``vision_fn``, the
    vision tower are used). ``tokenizer``: ``runtime.tokenizer.QwenTokenizer``, or the checkpoint
    (or tokenizer) directory holding ``qwen.tiktoken``. ``vision_fn``: pixels [N,3,S,S] ->
    features [N, n_queries, hidden] instead of ``model.encode_images`` (a vision engine, or
    cached features).
    """
    from runtime.image import load_image, preprocess_batch

    check_items(items, min_items)
    if isinstance(tokenizer, (str, Path)):
        from runtime.tokenizer import QwenTokenizer

        try:
            tokenizer = QwenTokenizer.from_dir(tokenizer)
        except (OSError, ValueError) as e:
            raise CalibrationError(f"cannot load the tokenizer: {e}") from None
    cfg = model.cfg
    if tokenizer.img_start_id != cfg.image_start_id:
        raise CalibrationError(f"the tokenizer's <img> id {tokenizer.img_start_id} differs from the "
                               f"model's image_start_id {cfg.image_start_id}: use the tokenizer of "
                               "this checkpoint")
    encode = vision_fn or model.encode_images
    out = []
    n_tok = 0
    for i, item in enumerate(items):
        ids = item_ids(tokenizer, item, cfg.visual.n_queries)
        if len(ids) > cfg.seq_length:
            raise CalibrationError(f"calibration item {i} is {len(ids)} tokens, longer than "
                                   f"seq_length {cfg.seq_length}: shorten its prompt/answer")
        try:
            images = [load_image(im) for im in item.images()]
        except ValueError as e:
            raise CalibrationError(f"calibration item {i}: {e}") from None
        pixels = torch.from_numpy(preprocess_batch(images, cfg.visual.image_size))
        feats = encode(pixels.to(model.dtype))
        ids_t = torch.tensor([ids], dtype=torch.long)
        out.append(model.embed(ids_t, feats).float())
        n_tok += len(ids)
    log.info("calibration: %d items, %d tokens (%d image slots)", len(out), n_tok,
             sum(len(it.images()) for it in items) * cfg.visual.n_queries)
    return out


__all__ = ["CalibItem", "CalibrationError", "build_calibration", "check_items", "item_ids",
           "DEFAULT_MIN_ITEMS"]
