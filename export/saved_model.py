"""Keras-vit model -> a TF-Serving-ready SavedModel folder (Keras' ExportArchive).

Signatures: `serving_default` takes `images` (float32, or uint8 with input_dtype="uint8"; NHWC
pixels in [0, 255], dynamic batch; any height and width with dynamic_size=True) and returns
`logits` (`features` for an include_top=False model); `serving_float32` / `serving_uint8` take
either dtype explicitly; `metadata` returns the keras-vit metadata as one JSON string. The same
JSON and the class names are files in the folder's assets/ (keras_vit.json, labels.txt).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from keras_vit.export._common import (
    ExportError,
    PathLike,
    check_class_names,
    check_not_keras_quantized,
    check_parent,
    check_tensorflow_backend,
    metadata,
    output_name,
    resolve_model,
)
from keras_vit.files import atomic_dir, shown_path, utf8_path

SIGNATURE = "serving_default"
INPUT_DTYPES = ("float32", "uint8")
METADATA_FILE = "keras_vit.json"
LABELS_FILE = "labels.txt"


def to_saved_model(model, path: PathLike, class_names: Optional[Sequence[str]] = None,
                   input_dtype: str = "float32", dynamic_size: bool = False,
                   interpolation: Optional[str] = None) -> str:
    """Export a keras-vit model (or its .keras path) as a SavedModel folder at `path`; returns it.

    `input_dtype` is the dtype serving_default takes (float32 or uint8 pixels in [0, 255]);
    `dynamic_size` and `interpolation` as in `to_onnx`. The folder is written beside `path`
    under a temporary name and renamed into place when complete.
    """
    import tensorflow as tf
    from keras.export import ExportArchive

    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input_dtype must be one of {', '.join(INPUT_DTYPES)}; got {input_dtype!r}")
    model, cfg = resolve_model(model)
    check_tensorflow_backend("SavedModel")
    if interpolation is not None and not dynamic_size and not cfg.dynamic_size:
        raise ExportError("interpolation applies with dynamic_size=True only")
    # a SavedModel keeps float32 weights (its metadata says fp32): a model quantized in Keras is refused, as by the others
    check_not_keras_quantized(model, "A SavedModel")
    if dynamic_size or cfg.dynamic_size:
        from keras_vit.vit import dynamic_model

        model = dynamic_model(model, interpolation)
        cfg = model.vit_config
    if input_dtype == "uint8" and not cfg.include_preprocessing:
        raise ExportError("input_dtype uint8 needs a model that takes [0, 255] pixels; this one was built with "
                          "include_preprocessing=False and takes normalised floats: use float32")
    names = check_class_names(class_names, cfg.num_classes, model)
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not utf8_path(folder):
        raise ExportError(f"the SavedModel's folder {shown_path(folder)!r} is not a UTF-8 path, and TensorFlow writes to "
                          "UTF-8 paths only; choose another folder")
    path = check_folder(path)

    meta = metadata(cfg, names, "fp32", "saved_model", dynamic_size=cfg.dynamic_size)
    meta["input"] = meta["input"].replace("images: float32", f"images: {input_dtype}")
    meta["signatures"] = json.dumps({SIGNATURE: input_dtype, "serving_float32": "float32",
                                     "serving_uint8": "uint8", "metadata": "string"})
    text = json.dumps(meta, sort_keys=True)
    h, w = (None, None) if cfg.dynamic_size else cfg.image_size
    output = output_name(cfg)

    def spec(dtype):
        return tf.TensorSpec((None, h, w, cfg.channels), dtype, name="images")

    def serve(images):
        return {output: model(tf.cast(images, tf.float32), training=False)}

    archive = ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve, input_signature=[spec(input_dtype)])
    archive.add_endpoint("serving_float32", serve, input_signature=[spec(tf.float32)])
    archive.add_endpoint("serving_uint8", serve, input_signature=[spec(tf.uint8)])
    archive.add_endpoint("metadata", lambda: {"metadata": tf.constant(text)}, input_signature=[])
    with atomic_dir(path) as tmp:
        try:
            archive.write_out(tmp, verbose=False)
        except Exception as exc:  # noqa: BLE001 - writer failures become one line naming the cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"could not write the SavedModel: {first}") from exc
        assets = os.path.join(tmp, "assets")
        os.makedirs(assets, exist_ok=True)
        with open(os.path.join(assets, METADATA_FILE), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if names is not None:
            with open(os.path.join(assets, LABELS_FILE), "w", encoding="utf-8") as f:
                f.write("\n".join(names) + "\n")
    return path


def read_metadata(path: PathLike) -> dict:
    """The keras-vit metadata of a SavedModel folder (from assets/keras_vit.json; {} if none)."""
    meta_path = os.path.join(os.fspath(path), "assets", METADATA_FILE)
    if not os.path.isfile(meta_path):
        return {}
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)


def check_folder(path: PathLike) -> str:
    """The SavedModel folder's absolute path; ExportError for a file, a folder of something else,
    a file name of another format, or a parent we cannot write to."""
    path = os.path.abspath(os.fspath(path))
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".onnx", ".tflite", ".keras", ".h5", ".pb", ".zip"):
        raise ExportError(f"output path {path!r} ends with {suffix}, a file's suffix; a SavedModel is a folder: "
                          "give a folder name such as model.saved_model")
    if os.path.isfile(path):
        raise ExportError(f"output path {path!r} is a file; a SavedModel is a folder")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise ExportError(f"output folder {path!r} exists and is not a SavedModel; choose another path")
    check_parent(path)
    return path
