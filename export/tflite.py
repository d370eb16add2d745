"""Keras-vit model -> one .tflite file for LiteRT (tf.lite.TFLiteConverter, built-in ops only).

The file's serving signature takes `images` (float32 NHWC in [0, 255], dynamic batch) and
returns `logits` (float32) at every precision: quantized files quantize and dequantize
inside. Class names and the model description travel in the file's metadata (entry
"keras_vit", JSON) and in a labels file beside it (<name>.labels.txt, one name a line).
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional, Sequence

import numpy as np

from keras_vit.export._common import (ExportError, PathLike, check_class_names,
                                      check_output_path, check_tensorflow_backend, metadata,
                                      resolve_model)
from keras_vit.files import atomic_path, write_text

QUANTIZE = (None, "fp16", "dynamic", "int8")
METADATA_NAME = "keras_vit"
DEFAULT_CALIBRATION_IMAGES = 300


def labels_path(path: PathLike) -> str:
    """Where the labels file of a .tflite file lives."""
    path = os.fspath(path)
    return (path[: -len(".tflite")] if path.endswith(".tflite") else path) + ".labels.txt"


def to_tflite(model, path: PathLike, quantize: Optional[str] = None, representative_images=None,
              class_names: Optional[Sequence[str]] = None,
              num_calibration_images: int = DEFAULT_CALIBRATION_IMAGES) -> str:
    """Export a keras-vit model (or its .keras path) to TFLite at `path`; returns the path.

    quantize: None (float32), "fp16" (float16 weights), "dynamic" (int8 weights, dynamic-range
    activations) or "int8" (full-integer: int8 weights and activations, calibrated on
    `representative_images`: an array, a tf.data.Dataset, or a source name for
    `keras_vit.export.images.load_images`, e.g. "digits" or "folder:PATH").
    """
    import tensorflow as tf

    if quantize not in QUANTIZE:
        raise ExportError(f"quantize must be one of none, fp16, dynamic, int8; got {quantize!r}")
    model, cfg = resolve_model(model)
    check_tensorflow_backend("TFLite")
    names = check_class_names(class_names, cfg.num_classes)
    if quantize == "int8" and representative_images is None:
        raise ExportError("int8 export needs calibration data: pass representative_images "
                          "(an array, a dataset name such as 'digits', or folder:PATH)")
    path = check_output_path(path, ".tflite")
    calibration = None
    if quantize == "int8":
        from keras_vit.export.images import load_images

        calibration = load_images(representative_images, cfg.image_size, cfg.channels,
                                  num_calibration_images, split="train")

    with tempfile.TemporaryDirectory() as work:
        converter = _converter(model, cfg, work)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize == "fp16":
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            # Every op in int8; input and output stay float32 (quantize/dequantize inside), so
            # the file keeps the same `images` -> `logits` contract as the float ones.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        try:
            flatbuffer = converter.convert()
        except Exception as exc:  # noqa: BLE001 - converter failures become one line naming the cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"TFLiteConverter could not convert the model ({quantize or 'fp32'}): {first}") from exc

    meta = metadata(cfg, names, quantize or "fp32", "tflite")
    if calibration is not None:
        meta["calibration_images"] = str(len(calibration))
    flatbuffer = add_metadata(flatbuffer, METADATA_NAME, json.dumps(meta, sort_keys=True).encode())
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(flatbuffer)
    if names is not None:
        write_text(labels_path(path), "\n".join(names) + "\n")
    return path


def _converter(model, cfg, work: str):
    """A TFLiteConverter from a SavedModel whose serving signature is images -> {"logits"}."""
    import tensorflow as tf
    from keras.export import ExportArchive

    h, w = cfg.image_size
    archive = ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", lambda images: {"logits": model(images, training=False)},
        input_signature=[tf.TensorSpec((None, h, w, cfg.channels), tf.float32, name="images")])
    saved = os.path.join(work, "saved_model")
    archive.write_out(saved, verbose=False)
    return tf.lite.TFLiteConverter.from_saved_model(saved)


def add_metadata(flatbuffer: bytes, name: str, data: bytes) -> bytes:
    """Append a named metadata buffer to a TFLite flatbuffer (TensorFlow's flatbuffer_utils)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    obj.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(obj.buffers) - 1
    obj.metadata = (obj.metadata or []) + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def read_metadata(path: PathLike, name: str = METADATA_NAME) -> Optional[dict]:
    """The keras-vit metadata of a .tflite file (None if it has none)."""
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.read_model(os.fspath(path))
    for entry in obj.metadata or []:
        entry_name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if entry_name == name:
            return json.loads(bytes(np.asarray(obj.buffers[entry.buffer].data, dtype=np.uint8)).decode())
    return None
