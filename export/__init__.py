"""keras_vit.export: ONNX, TFLite and SavedModel export with accuracy verification.

    from keras_vit.export import to_onnx, to_tflite, verify
    to_onnx(model, "model.onnx"); verify(model, "model.onnx")   # report dict + model.onnx.report.json
    export_verified(model, "model.onnx")   # both; a failed file never replaces model.onnx (model.failed.onnx)

TensorFlow, tf2onnx, onnxruntime and LiteRT are imported only when a function runs.
"""
from __future__ import annotations

from keras_vit.export._common import ExportError
from keras_vit.export.onnx import to_onnx
from keras_vit.export.saved_model import to_saved_model
from keras_vit.export.tflite import to_tflite
from keras_vit.export.verified import export_verified, failed_path
from keras_vit.export.verify import THRESHOLDS, Runner, format_table, report_path, verify

__all__ = ["ExportError", "Runner", "THRESHOLDS", "export_verified", "failed_path", "format_table", "report_path",
           "to_onnx", "to_saved_model", "to_tflite", "verify"]
