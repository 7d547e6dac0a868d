"""Cached pipeline stages: a rerun after a failure does not redo what already finished.

Each stage writes into its own folder under the work directory and, only when it completed,
a ``stage.json`` stamp holding the key of its inputs. A stage whose stamp key matches is skipped;
anything else is rebuilt from scratch (the folder is replaced atomically).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.files import atomic_dir

log = logging.getLogger(__name__)


def stage_key(**inputs: Any) -> str:
    """Stable hash of a stage's inputs (paths, options, upstream stage keys)."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    path: Path
    key: str
    cached: bool
    seconds: float
    info: dict[str, Any]


def run_stage(work_dir: Path, name: str, key: str,
              build: Callable[[Path], dict[str, Any] | None]) -> StageResult:
    """Run ``build(tmp_dir)`` unless ``work_dir/name`` holds a stamp with the same ``key``."""
    target = work_dir / name
    stamp = target / "stage.json"
    if stamp.is_file():
        try:
            meta = json.loads(stamp.read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("key") == key:
            log.info("stage %s: cached (%s)", name, target)
            return StageResult(name, target, key, True, 0.0, meta.get("info", {}))
    t0 = time.perf_counter()
    with atomic_dir(target, stage_dir_only) as tmp:
        info = build(tmp) or {}
        (tmp / "stage.json").write_text(json.dumps({"key": key, "info": info}, indent=2,
                                                   default=str) + "\n")
    dt = time.perf_counter() - t0
    log.info("stage %s: done in %.1f s", name, dt)
    return StageResult(name, target, key, False, dt, info)


def stage_dir_only(target: Path) -> str | None:
    """A stage folder is replaced only when a stage wrote it (it holds stage.json) or is empty."""
    if (target / "stage.json").is_file() or not any(target.iterdir()):
        return None
    return (f"{target} is not a stage folder of this toolkit (no stage.json): move it away or "
            "choose another --out")
