"""What nano training and evaluation both need: the runtime's prompt and pixels of a scene.

One place, so the evaluation asks exactly the questions training taught, and neither module
imports the other for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from calib_data import synth
from runtime.prompt import N_SLOTS

if TYPE_CHECKING:
    import torch

#: The system prompt of every training and evaluation conversation (Qwen-VL-Chat's default).
SYSTEM = "You are a helpful assistant."


def prompt_ids(tok, ex: synth.Example, n_slots: int = N_SLOTS) -> list[int]:
    """The runtime's prompt for an example (``runtime.prompt.build_chat_ids``)."""
    from runtime.prompt import build_chat_ids
    return build_chat_ids(tok, synth.prompt_parts(ex.prompt), n_images=1, history=None,
                          system=SYSTEM, n_slots=n_slots)


def pixels_of(img, image_size: int) -> torch.Tensor:
    """The runtime's preprocessing of one PIL image, as a [3, S, S] float32 tensor (torch is
    imported here, so ``evaluate_nano --bundle`` runs without it)."""
    import torch

    from runtime.image import preprocess
    return torch.from_numpy(np.ascontiguousarray(preprocess(img, image_size)))
