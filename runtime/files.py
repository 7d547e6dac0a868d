"""One helper per file chore: sha256 of a file, atomic writes of a file or of a whole directory.

Outputs are written atomically so a crash never leaves a half-written file behind a valid name:
the bytes go to a temporary sibling (same filesystem), are fsynced, and ``os.replace`` renames
them onto the target. Files get the mode a plain ``open(path, "w")`` would give (``0o666`` less
the umask) unless ``mode`` says otherwise; ``mkstemp``'s 0600 would hide bundle files from other
users. Standard library only: the runtime and every other package import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHUNK = 1 << 22  # hashing reads 4 MiB at a time (the digest does not depend on it)


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks (files of many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask_mode(mode: int = 0o666) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (tmp sibling + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8",
                      mode: int | None = None) -> Path:
    """``atomic_write_bytes`` of ``text`` (no newline translation: what you pass is written)."""
    return atomic_write_bytes(path, text.encode(encoding), mode)


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, **dumps: Any) -> Path:
    """``obj`` as JSON plus a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n")


@contextmanager
def atomic_dir(target: str | Path,
               may_replace: Callable[[Path], str | None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it onto ``target`` only if the block succeeds.

    An existing ``target`` is replaced only when it is a directory and ``may_replace(target)``
    returns None (default: only an empty directory); otherwise ``FileExistsError`` with the
    reason is raised before the block runs, so nothing the caller did not write is destroyed.
    Temporary names carry the writer's pid (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>``) so
    that :func:`clean_leftovers` can tell a crashed writer's debris from a live one's.
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target} exists and is not a directory: choose another path")
    if target.is_dir():
        why = (may_replace or _only_if_empty)(target)
        if why:
            raise FileExistsError(why)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes 0700; the result should look like a mkdir
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _only_if_empty(target: Path) -> str | None:
    if any(target.iterdir()):
        return f"{target} is a non-empty directory that this toolkit did not write: choose another path"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def clean_leftovers(parent: Path, name: str, legacy_age_s: float = 3600.0) -> list[Path]:
    """Remove what a killed :func:`atomic_dir` writer of ``parent/name`` left behind.

    Only directories named ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>`` whose process is gone
    are removed (a concurrent writer's are kept); ``.<name>.tmp-<random>`` from older versions
    only once they are ``legacy_age_s`` old. Nothing else is ever touched.
    """
    pat = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(?:(\d+)(?:-[A-Za-z0-9_]+)?|([A-Za-z0-9_]+))")
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = pat.fullmatch(p.name)
        if not m or p.is_symlink() or not p.is_dir():
            continue
        if m.group(2) is not None:
            stale = not _pid_alive(int(m.group(2)))
        else:
            stale = time.time() - p.stat().st_mtime > legacy_age_s
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.info("removed %s left behind by an interrupted run", p)
    return removed


@contextmanager
def staging_dir(beside: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``beside`` (same filesystem, so the files written into it
    can be ``os.replace``-d into place one by one), removed afterwards whatever happened."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.tmp-{os.getpid()}-", dir=beside.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "clean_leftovers", "sha256_file", "staging_dir"]
