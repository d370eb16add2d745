"""keras_vit.export: ONNX and TFLite export with accuracy verification (see the export issue)."""
