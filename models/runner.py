"""The PyTorch reference behind the runtime's runner interface (``runtime.runner.Runner``).

Validation compares this runner with the bundle's (``runtime.runner.OrtRunner``); both decode
through the runtime's one decode loop. Logits and features come back as float32 numpy arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .qwen_vl import KV, QWenLMHeadModel


class TorchRunner:
    """``QWenLMHeadModel`` with its KV cache: encode_images / prefill / step / reset."""

    def __init__(self, model: "QWenLMHeadModel"):
        self.model = model
        self._past: list["KV"] | None = None

    @torch.no_grad()
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        px = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        return self.model.encode_images(px.to(self.model.dtype)).float().numpy()

    @torch.no_grad()
    def prefill(self, ids: Sequence[int] | torch.Tensor, features: np.ndarray | None,
                extra: int = 0, pixels: torch.Tensor | None = None) -> np.ndarray:
        """Logits of every prompt position ``[len(ids), V]`` (``extra`` is unused: the
        reference's cache grows as it goes). ``pixels`` instead of ``features`` runs the vision
        tower inside the prefill, as the original does."""
        m = self.model
        ids_t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        emb = None if features is None else torch.as_tensor(features).to(m.dtype)
        out = m(ids_t, pixels=pixels, image_embeds=emb)
        self._past = out.past
        return out.logits[0].float().numpy()

    @torch.no_grad()
    def step(self, token: int) -> np.ndarray:
        out = self.model(torch.tensor([[int(token)]]), past=self._past)
        self._past = out.past
        return out.logits[0, -1].float().numpy()

    def reset(self) -> None:
        self._past = None
