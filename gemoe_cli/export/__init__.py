"""ONNX export of adaptive MoE models: custom ops, the export-time routing path, validation, generation.

Importing this package imports torch; the CLI imports it only when `gemoe export` runs.
"""

from gemoe_cli.export.onnx_export import ExportResult, export_graph, export_onnx, read_metadata
from gemoe_cli.export.patching import RoutingSpec
from gemoe_cli.export.validate import DEFAULT_ATOL, ValidationCase, ValidationReport, validate_export

__all__ = [
    "DEFAULT_ATOL",
    "ExportResult",
    "RoutingSpec",
    "ValidationCase",
    "ValidationReport",
    "export_graph",
    "export_onnx",
    "read_metadata",
    "validate_export",
]
