"""TFLite export: every model family runs in LiteRT (XNNPACK) and matches Keras; fp16,
dynamic-range and full-integer int8 exports of a digits model keep its predictions."""
from __future__ import annotations

import os

import ai_edge_litert  # noqa: F401 - a required dependency: a failed import fails the suite, it is not skipped
import numpy as np
import pytest
from export_helpers import DIGIT_NAMES, FAMILIES, full_ti16, small_model

from keras_vit.export import ExportError, to_tflite, verify
from keras_vit.export.tflite import labels_path, read_metadata


def _signature(path):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    return interpreter, interpreter.get_signature_list()


# The hybrid's quick-loop export check is ONNX's (test_export_onnx.py); its TFLite one is slow.
@pytest.mark.parametrize("family", list(FAMILIES) + [pytest.param("hybrid", marks=pytest.mark.slow)])
def test_family_exports_and_matches_keras_at_batch_1_and_7(family, tmp_path):
    model = small_model(family)
    path = to_tflite(model, tmp_path / "m.tflite", class_names=DIGIT_NAMES)
    interpreter, signatures = _signature(path)
    assert signatures == {"serving_default": {"inputs": ["images"], "outputs": ["logits"]}}
    assert list(interpreter.get_input_details()[0]["shape_signature"]) == [-1, 32, 32, 3]
    meta = read_metadata(path)
    assert meta["precision"] == "fp32" and meta["image_size"] == "32x32" and meta["variant"]
    assert open(labels_path(path)).read().split() == DIGIT_NAMES
    if family == "gap":  # a model without names exported over it: no labels file left from the earlier one
        to_tflite(small_model(family, seed=1), tmp_path / "m.tflite")
        assert not os.path.exists(labels_path(path))
        path = to_tflite(model, tmp_path / "m.tflite", class_names=DIGIT_NAMES)
    for batch in (1, 7):
        report = verify(model, path, images="default", num_images=7, batch_size=batch, write_report=False)
        assert report["passed"], report["failures"]
        assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
        assert "XNNPACK" in report["runtime"]


@pytest.mark.parametrize("quantize,min_top1", [("fp16", 0.99), ("dynamic", 0.97), ("int8", 0.97)])
def test_quantized_exports_of_trained_digits_model(trained_digits, quantize, min_top1, tmp_path):
    model, _ = trained_digits
    calibration = "digits" if quantize == "int8" else None
    path = to_tflite(model, tmp_path / f"m.{quantize}.tflite", quantize=quantize,
                     representative_images=calibration, class_names=DIGIT_NAMES)
    interpreter, _ = _signature(path)
    assert interpreter.get_input_details()[0]["dtype"] == np.float32  # same images -> logits contract
    types = {d["dtype"] for d in interpreter.get_tensor_details()}
    if quantize == "int8":
        assert np.int8 in types and read_metadata(path)["calibration_images"] == "300"
    report = verify(model, path, images="digits", num_images=360, batch_size=60)
    assert report["precision"] == quantize
    assert report["top1_agreement"] >= min_top1, report["failures"]
    assert report["passed"]


def test_bad_options(tmp_path):
    model = small_model("none")
    with pytest.raises(ExportError, match="int8 export needs calibration data"):
        to_tflite(model, tmp_path / "m.tflite", quantize="int8")
    with pytest.raises(ExportError, match="quantize must be one of"):
        to_tflite(model, tmp_path / "m.tflite", quantize="int4")
    with pytest.raises(ExportError, match="must end with .tflite"):
        to_tflite(model, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        to_tflite(tmp_path / "missing.keras", tmp_path / "m.tflite")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_full_ti16_at_224_matches_keras(tmp_path):
    """The real Ti/16 (12 blocks, 224px, 1000 classes) on photos, batch 1 and 7."""
    model = full_ti16()
    path = to_tflite(model, tmp_path / "ti16.tflite")
    for batch in (1, 7):
        report = verify(model, path, images="photos", num_images=14, batch_size=batch)
        assert report["passed"], report["failures"]
