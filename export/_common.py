"""Helpers shared by the ONNX and TFLite exporters: the model, its metadata, output paths."""
from __future__ import annotations

import json
import os
import tempfile
from typing import List, Optional, Sequence, Tuple, Union

from keras_vit.errors import UserInputError

PathLike = Union[str, os.PathLike]


class ExportError(UserInputError):
    """A user-facing export problem, phrased as one line (bad model, path, option)."""


def resolve_model(model):
    """(keras model, ViTConfig) from a keras-vit model or a path to its .keras file."""
    from keras_vit.model import get_config
    from keras_vit.saving import load_model

    if isinstance(model, (str, os.PathLike)):
        try:
            model = load_model(model, compile=False)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
    try:
        cfg = get_config(model)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if model.dtype_policy.name != "float32" and not _quantization_modes(model):
        model = float32_model(model, cfg)
    if cfg.output is not None or cfg.feature_layers is not None:
        what = "its tokens (output='tokens')" if cfg.output else f"feature maps of blocks {list(cfg.feature_layers)}"
        raise ExportError(f"export takes a classifier or a pooled-feature model (one (batch, N) output); this "
                          f"model returns {what}: build it without output/feature_layers to export it")
    return model, cfg


def float32_model(model, cfg):
    """A float32 twin of a model trained under a mixed policy (mixed_bfloat16: bfloat16 compute,
    float32 weights): the converters and runtimes take float32 graphs, and verification compares
    the file with what Keras computes in float32 from the same weights."""
    import numpy as np

    from keras_vit.model import build_model
    from keras_vit.vit import structured_as

    twin = build_model(cfg, name=model.name, dtype="float32")
    structured_as(twin, model)  # LoRA factors (Dense.enable_lora) too
    twin.set_weights([np.asarray(w, dtype=np.float32) for w in model.get_weights()])
    twin.class_names = getattr(model, "class_names", None)
    return twin


def _quantization_modes(model) -> List[str]:
    """The modes (int8, int4, ...) of the layers model.quantize() converted."""
    return sorted({layer.dtype_policy.quantization_mode for layer in model._flatten_layers(include_self=False)
                   if layer.dtype_policy.quantization_mode is not None})


def check_not_keras_quantized(model, what: str) -> None:
    """ExportError for a model whose layers model.quantize() converted: the converters take the
    float model and quantize it themselves (quantize="int8" / "dynamic")."""
    modes = _quantization_modes(model)
    if modes:
        raise ExportError(f"{what} takes the float model; this one has layers quantized in Keras "
                          f"(model.quantize: {', '.join(modes)}): export the model before model.quantize(), "
                          "with quantize='int8' or 'dynamic' (--quantize) for an integer file")


def check_tensorflow_backend(what: str) -> None:
    """The converters (tf2onnx, TFLiteConverter) trace TensorFlow graphs."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ExportError(f"{what} export needs the TensorFlow backend (KERAS_BACKEND=tensorflow); "
                          f"this process runs {keras.backend.backend()!r}")


def check_class_names(class_names: Optional[Sequence[str]], num_classes: int, model=None) -> Optional[List[str]]:
    """`class_names` as strings, else the names `model` carries (model.class_names, saved in its
    .keras file) when they count `num_classes`; ExportError for given names of another count."""
    if class_names is None:
        own = getattr(model, "class_names", None)
        return [str(c) for c in own] if own and len(own) == num_classes else None
    names = [str(c) for c in class_names]
    if len(names) != num_classes:
        raise ExportError(f"{len(names)} class names given for a model with {num_classes} classes")
    return names


LAYOUTS = ("nhwc", "nchw")


def check_layout(layout: str) -> str:
    """`layout` lower-cased if it is nhwc or nchw, else ExportError."""
    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    return layout.lower()


def input_description(cfg, dynamic_size: bool = False, layout: str = "nhwc", dtype: str = "float32") -> str:
    """The `images` input in words: dtype, shape (with the layout) and value range."""
    h, w = ("height", "width") if dynamic_size else cfg.image_size
    shape = f"[batch, {cfg.channels}, {h}, {w}]" if layout == "nchw" else f"[batch, {h}, {w}, {cfg.channels}]"
    values = "values in [0, 255]" if cfg.include_preprocessing else "normalised as in training"
    text = f"images: {dtype} {shape} ({layout.upper()}), {values}"
    if dynamic_size:
        sh, sw = cfg.input_stride
        text += f"; height divisible by {sh}, width by {sw}"
    return text


def metadata(cfg, class_names: Optional[Sequence[str]], precision: str, fmt: str,
             dynamic_size: bool = False, layout: str = "nhwc") -> dict:
    """String-valued metadata stored inside the exported file (ONNX metadata_props / TFLite
    metadata / SavedModel assets): the model, its classes and how to feed it (layout, image
    size, value range and the mean/std the model applies inside)."""
    from keras_vit import __version__

    h, w = cfg.image_size
    meta = {
        "producer": "keras-vit",
        "keras_vit_version": __version__,
        "format": fmt,
        "variant": cfg.variant or f"custom (hidden {cfg.hidden_size}, layers {cfg.num_layers}, patch {cfg.patch_size[0]})",
        "image_size": f"{h}x{w}",
        "channels": str(cfg.channels),
        "num_classes": str(cfg.num_classes),
        "precision": precision,
        "input": input_description(cfg, dynamic_size, layout),
        "layout": layout,
        "dynamic_size": "true" if dynamic_size else "false",
        "preprocessing": ("inside: (x - mean) / std on [0, 255] pixels" if cfg.include_preprocessing
                          else "none: feed values normalised as in training"),
        **dict(zip(("mean", "std"), pixel_mean_std(cfg))),
        "output": (f"logits: float32 [batch, {cfg.num_classes}]" if cfg.include_top else
                   f"features (include_top=False): float32 [batch, {cfg.representation_size or cfg.hidden_size}]"),
        "vit_config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    if dynamic_size:
        meta["pos_interpolation"] = cfg.pos_interpolation
        meta["input_stride"] = f"{cfg.input_stride[0]}x{cfg.input_stride[1]}"
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    return meta


def output_name(cfg) -> str:
    """The exported files' one output: `logits` for a classifier, `features` for an include_top=False
    model (its pre-logits vector), so a deployment reading the name is not told features are logits."""
    return "logits" if cfg.include_top else "features"


def pixel_mean_std(cfg) -> Tuple[str, str]:
    """The mean and std (JSON lists, one per channel, on [0, 255] pixels) that the model applies inside:
    127.5 and 127.5 (x / 127.5 - 1) by default, 255 x its pixel_mean / pixel_std (ImageNet's, CLIP's ...)
    where it has them; 0 and 1 for a model without preprocessing."""
    c = cfg.channels
    if not cfg.include_preprocessing:
        return json.dumps([0.0] * c), json.dumps([1.0] * c)
    if cfg.pixel_mean is None:
        return json.dumps([127.5] * c), json.dumps([127.5] * c)
    return (json.dumps([round(255.0 * float(m), 6) for m in cfg.pixel_mean]),
            json.dumps([round(255.0 * float(s), 6) for s in cfg.pixel_std]))


def check_parent(path: str) -> None:
    """Create the folder that will hold `path`; ExportError when that fails or it is not writable."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create output folder {parent!r}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"output folder {parent!r} is not writable")
    try:  # os.access says yes to root even where the file system refuses (read-only, /proc, /sys)
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise ExportError(f"output folder {parent!r} is not writable: {exc.strerror or exc}") from None


def check_output_path(path: PathLike, suffix: str) -> str:
    """Absolute output path; ExportError for a wrong suffix or a folder we cannot write to."""
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(suffix):
        raise ExportError(f"output path {path!r} must end with {suffix}")
    if os.path.isdir(path):
        raise ExportError(f"output path {path!r} is a folder; give a file name ending in {suffix}")
    check_parent(path)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ExportError(f"output file {path!r} exists and is not writable")
    return path
