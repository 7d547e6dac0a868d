"""One error base: every toolkit error is an EdgeError, and every CLI turns one into one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runtime.errors import EXIT_BAD_INPUT, EXIT_FAILED_CHECK, ContextLengthError, EdgeError, report

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "models", "quant", "exporters", "validate", "calib_data", "bench")


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every ``class ...Error`` / ``TensorRTUnavailable`` in the packages."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and (
                        node.name.endswith("Error") or node.name == "TensorRTUnavailable"):
                    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                    found.append((mod, node.name))
    return found


def test_every_error_class_derives_from_the_one_base():
    import importlib

    classes = _error_classes()
    assert len(classes) >= 20  # 21 before the base existed, one ContextLengthError merged
    for mod, name in classes:
        cls = getattr(importlib.import_module(mod), name)
        assert issubclass(cls, EdgeError), f"{mod}.{name} does not derive from EdgeError"
    names = [n for _, n in classes]
    assert len(names) == len(set(names)), f"an error class is defined twice: {sorted(names)}"


def test_builtin_bases_still_catch():
    from calib_data.manifest import ManifestError
    from exporters.vision import VisionCheckError
    from models.checkpoint import CheckpointError
    from runtime.bundle import BundleError

    assert issubclass(BundleError, ValueError) and issubclass(CheckpointError, ValueError)
    assert issubclass(ManifestError, ValueError) and issubclass(VisionCheckError, RuntimeError)
    assert issubclass(ContextLengthError, ValueError)


def test_context_length_error_is_one_class():
    import models
    import runtime
    from models.qwen_vl import ContextLengthError as from_models
    from runtime.pipeline import ContextLengthError as from_pipeline

    assert from_models is from_pipeline is runtime.ContextLengthError is models.ContextLengthError


def test_report_is_one_line_with_the_class_exit_code(capsys):
    from exporters.pipeline import ExportError
    from exporters.vision import VisionCheckError

    assert report(EdgeError("bad\ninput  here")) == EXIT_BAD_INPUT == 2
    assert capsys.readouterr().err == "error: bad input here\n"
    assert report(VisionCheckError("check failed", [])) == EXIT_FAILED_CHECK == 1
    assert report(ExportError("validation FAILED", exit_code=EXIT_FAILED_CHECK)) == 1
    assert report(ExportError("no such plan")) == 2


def test_failed_vision_check_is_one_line_and_exit_1(nano_ckpt, tmp_path, monkeypatch, capsys):
    """A failed export-time vision check used to reach the user as a traceback."""
    import export
    from exporters import vision

    def fail(self, tol):
        self.failures = ["cosine forced below tolerance by the test"]
        return self.failures

    monkeypatch.setattr(vision.VisionMetrics, "check", fail)
    rc = export.main(["--checkpoint", str(nano_ckpt), "--plan", "fp32", "--out",
                      str(tmp_path / "b"), "--n-calib", "2", "--n-val", "1", "--skip-validation",
                      "--no-demo"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("error: vision engine check FAILED"), err
    assert "cosine forced below tolerance" in err[0]
    assert not (tmp_path / "b").exists()


def test_verbose_reraises(nano_ckpt, tmp_path):
    import export
    from exporters.pipeline import ExportError

    with pytest.raises(ExportError, match="checkpoint not found"):
        export.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                     "-v"])


def test_cli_main_wrapper(capsys):
    from runtime.errors import cli_main

    @cli_main
    def main(argv=None) -> int:
        raise ContextLengthError("prompt of 3000 tokens is over the model's context of 2048")

    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: prompt of 3000 tokens")
    with pytest.raises(ContextLengthError):
        main(["-v"])
