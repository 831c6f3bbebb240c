"""Export a trained network to a verified ONNX model bundle (needs torch and onnx)."""

from cycleml.export.exporter import ExportSettings, export_bundle
from cycleml.export.verify import ExportVerificationError, ParityReport

__all__ = ["ExportSettings", "ExportVerificationError", "ParityReport", "export_bundle"]
