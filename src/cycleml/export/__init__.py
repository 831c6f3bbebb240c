"""Export a trained network to a verified ONNX model bundle (needs torch and onnx).

The names below are imported on first use, so that `cycleml export --help` and config
errors do not wait for torch and ONNX to load.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExportSettings": "cycleml.export.exporter",
    "export_bundle": "cycleml.export.exporter",
    "ExportVerificationError": "cycleml.export.verify",
    "ParityReport": "cycleml.export.verify",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cycleml.export' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
