"""The one error base of the toolkit: every failure a user can act on derives from ``EdgeError``.

Each area keeps its own subclass (``BundleError``, ``CheckpointError``, ...) with its old builtin
base as a mixin (``class BundleError(EdgeError, ValueError)``), so ``except ValueError`` still
works. Every CLI catches ``EdgeError`` once in its ``main`` and prints one line with
``report``; ``exit_code`` says why it failed: 2 = bad input (the default), 1 = a failed
validation or export-time check. It lives in ``runtime`` because the runtime may import nothing
else of the repo, while everything else may import the runtime's torch-free modules.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

EXIT_BAD_INPUT = 2
EXIT_FAILED_CHECK = 1


class EdgeError(Exception):
    """A failure the user can act on; the message says what to do.

    ``exit_code`` (keyword) overrides the class's code for one instance, e.g. an ``ExportError``
    that reports a failed validation."""

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, *args: object, exit_code: int | None = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class ContextLengthError(EdgeError, ValueError):
    """A prompt (+ the tokens to generate) longer than the context the model implements exactly;
    raised by the PyTorch reference and the runtime alike."""


def report(err: BaseException, stream: TextIO | None = None) -> int:
    """Print ``error: <message>`` (one line) and return the exit code of ``err``."""
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"error: {message}", file=stream or sys.stderr)
    return int(getattr(err, "exit_code", EXIT_BAD_INPUT))


def cli_main(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI's ``main(argv)`` so an ``EdgeError`` ends as one line and its exit code
    (``-v`` / ``--verbose`` on the command line re-raises it, traceback included)."""

    @functools.wraps(main)
    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except EdgeError as e:
            args = sys.argv[1:] if argv is None else list(argv)
            if "-v" in args or "--verbose" in args:
                raise
            return report(e)

    return wrapper


__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED_CHECK", "ContextLengthError", "EdgeError", "cli_main",
           "report"]
