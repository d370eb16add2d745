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
import warnings
from typing import Dict, Optional, Sequence

import numpy as np

from keras_vit.errors import first_line
from keras_vit.export._common import (
    ExportError,
    PathLike,
    check_class_names,
    check_not_keras_quantized,
    check_output_path,
    check_tensorflow_backend,
    metadata,
    output_name,
    resolve_model,
)
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
              num_calibration_images: int = DEFAULT_CALIBRATION_IMAGES, compare_fp32: bool = True) -> str:
    """Export a keras-vit model (or its .keras path) to TFLite at `path`; returns the path.

    quantize: None (float32), "fp16" (float16 weights), "dynamic" (int8 weights, dynamic-range
    activations) or "int8" (full-integer: int8 weights and activations, calibrated on
    `representative_images`: an array, a tf.data.Dataset, or a source name for
    `keras_vit.export.images.load_images`, e.g. "digits" or "folder:PATH").
    With `compare_fp32` an int8 export also converts the float32 file, times both in LiteRT at
    batch 1 and records the result in the metadata ("int8_vs_fp32"); when int8 is not faster it
    warns, saying so and why (how XNNPACK split each graph, see `compare_latency`).
    """
    if quantize == "none":
        quantize = None
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize must be one of none, fp16, dynamic, int8; got {quantize!r}")
    model, cfg = resolve_model(model)
    check_tensorflow_backend("TFLite")
    check_not_keras_quantized(model, "TFLite export")
    names = check_class_names(class_names, cfg.num_classes, model)
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
        flatbuffer = _convert(model, cfg, work, quantize, calibration)
        speed = None
        if quantize == "int8" and compare_fp32:
            speed = compare_latency(flatbuffer, _convert(model, cfg, work, None, None), calibration[:1])

    meta = metadata(cfg, names, quantize or "fp32", "tflite")
    if calibration is not None:
        meta["calibration_images"] = str(len(calibration))
    if speed is not None:
        meta["int8_vs_fp32"] = json.dumps(speed)
        if not speed["faster"]:
            warnings.warn(speed["note"], stacklevel=2)
    flatbuffer = add_metadata(flatbuffer, METADATA_NAME, json.dumps(meta, sort_keys=True).encode())
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(flatbuffer)
    if names is not None:
        write_text(labels_path(path), "\n".join(names) + "\n")
    elif os.path.lexists(labels_path(path)):  # an earlier file's names would read as this model's
        os.remove(labels_path(path))
    return path


def _convert(model, cfg, work: str, quantize: Optional[str], calibration: Optional[np.ndarray]) -> bytes:
    """The TFLite flatbuffer of `model` at `quantize` (None: float32); int8 is calibrated on
    `calibration`. ExportError with the converter's first line when it fails."""
    import tensorflow as tf

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
        return converter.convert()
    except Exception as exc:  # noqa: BLE001 - converter failures become one line naming the cause
        raise ExportError(f"TFLiteConverter could not convert the model ({quantize or 'fp32'}): "
                          f"{first_line(exc)}") from exc


def undelegated_ops(flatbuffer: bytes) -> Dict[str, int]:
    """{op name: count} of the ops LiteRT runs outside its XNNPACK delegate for this file.

    A DELEGATE node stands for one partition; an original op is outside every partition when
    none of its outputs is a partition's output and one of them is needed outside (a partition's
    input, a model output, or the input of another op outside)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer, num_threads=1)
    interpreter.allocate_tensors()
    graph, ops = interpreter._interpreter, interpreter._get_ops_details()
    delegate_in, delegate_out = set(), set()
    for i, op in enumerate(ops):
        if op["op_name"] == "DELEGATE":
            delegate_in.update(graph.NodeInputs(i))
            delegate_out.update(graph.NodeOutputs(i))
    needed, outside, changed = delegate_in | set(graph.OutputIndices()), set(), True
    while changed:
        changed = False
        for i, op in enumerate(ops):
            outputs = set(graph.NodeOutputs(i))
            if op["op_name"] == "DELEGATE" or i in outside or outputs & delegate_out or not outputs & needed:
                continue
            outside.add(i)
            needed.update(graph.NodeInputs(i))
            changed = True
    counts: Dict[str, int] = {}
    for i in sorted(outside):
        counts[ops[i]["op_name"]] = counts.get(ops[i]["op_name"], 0) + 1
    return counts


def compare_latency(int8: bytes, fp32: bytes, image: np.ndarray, rounds: int = 30) -> dict:
    """Batch-1 median latency of two flatbuffers in LiteRT, called alternately (same load), and
    the note a user reads when int8 is not the faster one."""
    import statistics
    import time

    from ai_edge_litert.interpreter import Interpreter

    runners = {}
    for name, content in (("int8", int8), ("fp32", fp32)):
        runner = Interpreter(model_content=content, num_threads=1).get_signature_runner()
        for _ in range(3):
            runner(images=image)
        runners[name] = runner
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner(images=image)
            times[name].append(1e3 * (time.perf_counter() - t0))
    int8_ms, fp32_ms = (statistics.median(times[n]) for n in ("int8", "fp32"))
    outside8, outside32 = undelegated_ops(int8), undelegated_ops(fp32)
    extra = {op: n for op, n in outside8.items() if n > outside32.get(op, 0)}
    out = {"int8_ms": int8_ms, "fp32_ms": fp32_ms, "ratio": int8_ms / fp32_ms, "faster": int8_ms < fp32_ms,
           "outside_xnnpack": {"int8": outside8, "fp32": outside32}}
    if not out["faster"]:
        listed = ", ".join(f"{n} {op}" for op, n in sorted(extra.items(), key=lambda kv: -kv[1])) or "none"
        out["note"] = (f"full-int8 TFLite is not faster than float32 on this CPU: {int8_ms:.3g} ms against "
                       f"{fp32_ms:.3g} ms at batch 1 ({out['ratio']:.2f}x). XNNPACK does not take these int8 "
                       f"ops, which run in LiteRT's own kernels between the delegated parts: {listed}. "
                       "Use the float32 or dynamic-range file for speed; int8 for size and integer-only hardware.")
    return out


def _converter(model, cfg, work: str):
    """A TFLiteConverter from a SavedModel whose serving signature is images -> {"logits"}
    ({"features"} for an include_top=False model)."""
    import tensorflow as tf
    from keras.export import ExportArchive

    h, w = cfg.image_size
    archive = ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", lambda images: {output_name(cfg): model(images, training=False)},
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

    with open(path, "rb") as f:  # Python's open: any path (TensorFlow's file_io takes UTF-8 ones only)
        obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(f.read()))
    for entry in obj.metadata or []:
        entry_name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if entry_name == name:
            return json.loads(bytes(np.asarray(obj.buffers[entry.buffer].data, dtype=np.uint8)).decode())
    return None
