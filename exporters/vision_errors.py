"""The vision exporter's errors, in one place for the graph, the check and the orchestration."""

from __future__ import annotations

from runtime.errors import EXIT_FAILED_CHECK, EdgeError


class VisionExportError(EdgeError, RuntimeError):
    """The vision tower could not be exported."""


class VisionCheckError(VisionExportError):
    """The exported graph disagrees with PyTorch fp32 beyond tolerance; nothing was written."""

    exit_code = EXIT_FAILED_CHECK

    def __init__(self, message: str, metrics: list["VisionMetrics"]):
        super().__init__(message)
        self.metrics = metrics
