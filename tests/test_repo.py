"""The repository itself: CI runs the README's test command, and no tracked text names a machine.

``.ci/run`` must run exactly the command the README gives for the tests (so what a new user types
is what CI checks). Tracked text files must not hold absolute paths of the machine they were
written on (``/work/...``, ``/home/<user>``, ``/root/...``, ``/Users/...``) nor fixed temp paths
(``/tmp/<name>``, ``gettempdir() / "<name>"``): docs and code use arguments, temporary
directories and placeholders such as ``<checkpoint>`` instead.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MACHINE_PATH = re.compile(
    r"""(?<![\w.~<>-])(?:/work/|/home/[\w.-]+|/root/|/Users/[\w.-]+|/mnt/[\w.-]+|/scratch/"""
    r"""|/tmp/[\w.-]+|[A-Za-z]:\\Users\\)""")
FIXED_TEMP = re.compile(r"""gettempdir\(\)\)?\s*(?:/|,)\s*['"]""")
NOT_SCANNED = {
    ".gitignore",  # its patterns are relative to the repository root ("/tmp/" is <repo>/tmp)
    "tests/test_repo.py",  # holds examples of what it forbids
}


def readme_test_command() -> str:
    """The single command line in the README's code block after 'run the tests'."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"run the tests[^\n]*\n+```[^\n]*\n(.*?)```", text, re.S | re.I)
    assert m, "README.md has no code block after 'run the tests'"
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]
    assert len(lines) == 1, f"README's test command should be one line, got {lines}"
    return lines[0]


def ci_commands() -> list[str]:
    """The commands .ci/run executes, minus comments, shell options and its cd to the root."""
    out = []
    for ln in (ROOT / ".ci" / "run").read_text().splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("#") or ln.startswith("set ") or ln.startswith("cd "):
            continue
        out.append(ln)
    return out


def test_ci_runs_exactly_the_readme_test_command():
    assert ci_commands() == [readme_test_command()]


def test_readme_test_command_installs_the_test_extra():
    cmd = readme_test_command()
    assert '-e ".[export,test]"' in cmd and "-c constraints.txt" in cmd
    assert cmd.endswith("-m pytest -q")


def _repo_files() -> list[str]:
    """git's tracked files; outside a git checkout, every file but build and cache folders."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout.decode()
        return [n for n in out.split("\0") if n]
    skip = {".git", ".venv", "out", "__pycache__", ".pytest_cache", "build", "dist"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
            and not any(part.endswith((".egg-info", ".work")) for part in p.parts)]


def tracked_text_files() -> list[Path]:
    files = []
    for name in _repo_files():
        p = ROOT / name
        if name in NOT_SCANNED or not p.is_file():
            continue
        head = p.read_bytes()[:8192]
        if b"\0" not in head:  # binary files (npz, png, safetensors) carry no paths to fix
            files.append(p)
    return files


def machine_paths(text: str) -> list[str]:
    hits = [m.group(0) for m in MACHINE_PATH.finditer(text)]
    return hits + [m.group(0) for m in FIXED_TEMP.finditer(text)]


def test_the_path_check_catches_machine_paths():
    for bad in ("see /work/main/out", "--checkpoint /home/alice/ckpt", "w('/tmp/qvl')",
                "Path(tempfile.gettempdir()) / 'prof'", "cd /root/x", r"C:\Users\bob\x"):
        assert machine_paths(bad), bad
    for fine in ("--checkpoint <checkpoint>", "~/Qwen-VL-Chat", "out/bundle", "../../etc/passwd",
                 "#!/usr/bin/env bash", "tempfile.mkdtemp(prefix='x-')", "<tmp>/b"):
        assert not machine_paths(fine), fine


def test_no_tracked_text_file_holds_a_machine_path():
    files = tracked_text_files()
    assert len(files) > 50
    bad = {}
    for p in files:
        hits = machine_paths(p.read_text(errors="replace"))
        if hits:
            bad[str(p.relative_to(ROOT))] = sorted(set(hits))[:5]
    assert not bad, f"absolute machine paths or fixed temp paths (use placeholders): {bad}"


def test_cited_documents_exist():
    """Text cites docs/DESIGN.md sections that exist, and no document that is not shipped."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    sections = set(re.findall(r"^## (\d+)\. ", design, re.M))
    assert {"4", "5", "7"} <= sections
    missing, cited = {}, 0
    for p in tracked_text_files():
        text = p.read_text(errors="replace")
        rel = str(p.relative_to(ROOT))
        for m in re.finditer(r"DESIGN(?:\.md)? §(\d+)((?:, §\d+)*)", text):
            cited += 1
            nums = [m.group(1)] + re.findall(r"\d+", m.group(2))
            missing.update({f"{rel}: §{n}": "no such section" for n in nums if n not in sections})
        for m in re.finditer(r"dependencies\.md|spec §|anchors(?:\.md)? §|qwen_vl_spec", text):
            missing[f"{rel}: {m.group(0)}"] = "not in the repository"
    assert cited >= 5 and not missing, missing
