"""The comparator: an exported vision engine against the PyTorch fp32 reference, per image, with
tolerances per precision. The numbers come from ``validate.metrics`` (the drift report's own)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from validate import metrics as M

from .vision_errors import VisionCheckError
from .vision_graph import PRECISIONS
from .vision_session import make_session, run_session


@dataclass
class VisionTolerances:
    """What an exported vision engine must meet against PyTorch fp32, per image.

    ``max_abs`` is in output units (None: not checked); ``max_abs_rel`` is the max-abs error
    divided by the reference's peak |value| (scale-free, so one default fits nano and full-size
    towers). NaN/Inf anywhere in the engine output always fails (``max_nonfinite`` = 0).
    """

    min_cosine: float
    max_rel_l2: float
    max_abs_rel: float | None = None
    max_abs: float | None = None
    max_nonfinite: int = 0

    @classmethod
    def for_precision(cls, precision: str) -> "VisionTolerances":
        if precision == "fp32":
            return cls(min_cosine=0.99999, max_rel_l2=1e-3, max_abs_rel=1e-3)
        if precision == "fp16":
            return cls(min_cosine=0.9995, max_rel_l2=0.03, max_abs_rel=0.05)
        if precision == "int8":  # the edge plan's vision drift bounds, said once there
            from validate.thresholds import thresholds_for

            t = thresholds_for("edge")
            return cls(min_cosine=t["vision", "cosine_min"].value,
                       max_rel_l2=t["vision", "rel_l2_max"].value,
                       max_abs_rel=t["vision", "max_abs_rel_max"].value)
        raise ValueError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class VisionMetrics:
    """Engine output vs the PyTorch fp32 reference for one image."""

    name: str
    cosine: float  # over the whole [n_queries, dim] feature block
    min_token_cosine: float  # worst of the n_queries feature vectors
    rel_l2: float  # ||engine - ref|| / ||ref||
    max_abs: float
    ref_peak: float  # max |ref|
    max_abs_rel: float  # max_abs / ref_peak
    nan: int
    inf: int
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self, tol: VisionTolerances) -> list[str]:
        """Fill and return ``failures`` (NaN metrics fail every comparison)."""
        f = []
        if self.nan + self.inf > tol.max_nonfinite:
            f.append(f"{self.nan} NaN + {self.inf} Inf values (allowed {tol.max_nonfinite})")
        if not self.cosine >= tol.min_cosine:
            f.append(f"cosine {self.cosine:.6f} < {tol.min_cosine}")
        if not self.rel_l2 <= tol.max_rel_l2:
            f.append(f"rel L2 {self.rel_l2:.3g} > {tol.max_rel_l2:g}")
        if tol.max_abs_rel is not None and not self.max_abs_rel <= tol.max_abs_rel:
            f.append(f"max-abs {self.max_abs:.3g} = {self.max_abs_rel:.3g} of peak "
                     f"{self.ref_peak:.3g} > {tol.max_abs_rel:g}")
        if tol.max_abs is not None and not self.max_abs <= tol.max_abs:
            f.append(f"max-abs {self.max_abs:.3g} > {tol.max_abs:g}")
        self.failures = f
        return f

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passed"] = self.passed
        return d

    def line(self) -> str:
        return (f"{self.name}: cosine {self.cosine:.7f} (worst token {self.min_token_cosine:.6f}), "
                f"rel L2 {self.rel_l2:.3g}, max-abs {self.max_abs:.3g} (peak {self.ref_peak:.3g}), "
                f"NaN {self.nan}, Inf {self.inf}")


def feature_metrics(name: str, engine: np.ndarray, ref: np.ndarray) -> VisionMetrics:
    """Metrics of one image's features ``[n_queries, dim]``, by ``validate.metrics`` (the drift
    report's functions, so export-time check and drift report share one edge convention:
    float64, NaN once anything is non-finite, all-zero vectors agree only with all-zero ones)."""
    e = np.asarray(engine, dtype=np.float64).reshape(ref.shape[-2], -1)
    r = np.asarray(ref, dtype=np.float64).reshape(e.shape)
    tokens = M.row_cosine(r, e)
    return VisionMetrics(name=name, cosine=M.cosine(r, e),
                         min_token_cosine=float(np.min(tokens)) if tokens.size else float("nan"),
                         rel_l2=M.rel_l2(r, e), max_abs=M.max_abs(r, e),
                         ref_peak=float(np.max(np.abs(r))), max_abs_rel=M.max_abs_rel(r, e),
                         nan=int(np.isnan(e).sum()), inf=int(np.isinf(e).sum()))


@torch.no_grad()
def reference_features(visual: nn.Module, pixels: np.ndarray | torch.Tensor,
                       batch_size: int = 1) -> np.ndarray:
    """PyTorch fp32 reference features, ``batch_size`` images at a time (memory-friendly)."""
    px = torch.as_tensor(np.asarray(pixels, dtype=np.float32))
    return np.concatenate([visual(px[i:i + batch_size]).float().numpy()
                           for i in range(0, len(px), batch_size)])


def compare_vision(onnx_path: str | Path, torch_visual: nn.Module | np.ndarray,
                   pixels: np.ndarray, providers: Sequence[str] | None = None,
                   names: Sequence[str] | None = None, tolerances: VisionTolerances | None = None,
                   batch_size: int | None = None, session=None) -> list[VisionMetrics]:
    """Per-image metrics of an ONNX vision engine against PyTorch fp32.

    ``torch_visual`` is the fp32 reference module, or its features already computed
    (``[N, n_queries, dim]``). With ``tolerances`` each metric's ``failures`` is filled in.
    """
    if isinstance(torch_visual, nn.Module):
        ref = reference_features(torch_visual, pixels)
    else:
        ref = np.asarray(torch_visual, dtype=np.float32)
    sess = session or make_session(onnx_path, providers)
    out = run_session(sess, pixels, batch_size)
    return metrics_from_outputs(out, ref, names, tolerances, str(onnx_path))


def metrics_from_outputs(out: np.ndarray, ref: np.ndarray, names: Sequence[str] | None = None,
                         tolerances: VisionTolerances | None = None,
                         what: str = "engine") -> list[VisionMetrics]:
    """Per-image metrics of engine outputs against reference features (same shape)."""
    if out.shape != ref.shape:
        raise VisionCheckError(f"{what}: output {out.shape} != reference {ref.shape}", [])
    names = list(names) if names is not None else [f"image{i}" for i in range(len(ref))]
    metrics = [feature_metrics(nm, o, r) for nm, o, r in zip(names, out, ref)]
    if tolerances is not None:
        for m in metrics:
            m.check(tolerances)
    return metrics
