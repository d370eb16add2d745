"""Initial weights for a run (`--weights`): an official .npz checkpoint or another keras-vit
.keras model (its encoder, e.g. from pre-training), copied where names and shapes match (the input
kernel adapted to other channels, as for a checkpoint; a model.quantize()d layer's kernel read back
in float)."""
from __future__ import annotations

import os
from typing import Dict, List

import keras

from keras_vit.errors import TrainError, first_line
from keras_vit.model import VisionTransformer
from keras_vit.saving import check_model_file
from keras_vit.vit import resize_model
from keras_vit.weights import adapt_input_conv, load_npz
from keras_vit.weights.io import dequantized_kernels


def load_initial_weights(model: keras.Model, path: str) -> Dict[str, List[str]]:
    """Initialise `model` from a checkpoint: a .npz (or a published checkpoint name) goes to
    keras_vit.weights.load_npz; a .keras is copied variable by variable where the paths (keras_vit
    layer names) and shapes match, so encoders from other heads (pre-training) load too and a head
    of another size keeps its initialisation; a model.quantize()d Dense gives the float kernel it
    computes with, never its integer codes. Returns {"loaded": [...], "skipped": [...]}."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        load_npz(model, path)  # raises on any misfit; a head of another size stays initialised
        return {"loaded": [v.path for v in model.weights], "skipped": [], "npz": True}
    try:  # any Keras model whose layers carry keras-vit's names: a pre-training model with its own head too
        source = keras.saving.load_model(check_model_file(path), compile=False)
    except Exception as exc:  # noqa: BLE001 - damaged, missing, unreadable: the line says which
        raise TrainError(f"--weights: {first_line(exc)}") from None
    source = _resized_source(source, model)
    by_path = {v.path: v for v in source.weights}
    floats = dequantized_kernels(source)
    loaded, skipped = [], []
    for var in model.weights:
        src = by_path.get(var.path)
        if var.path in floats:
            value = floats[var.path] if floats[var.path].shape == tuple(var.shape) else None
        else:  # an integer variable is a quantized kernel that could not be read back: never its raw codes
            value = None if src is None or not _is_float(src) else _input_kernel(var, src)
        # A head of the same size loads too: a linear probe's head carries on into full fine-tuning.
        if value is None:
            skipped.append(var.path)
            continue
        var.assign(keras.ops.cast(value, var.dtype))
        loaded.append(var.path)
    if not loaded:
        raise TrainError(f"no weights of {path!r} fit this model (no layer with the same name and shape)")
    return {"loaded": loaded, "skipped": skipped}


def _is_float(var) -> bool:
    return "float" in str(var.dtype)


_INPUT_KERNELS = ("embedding/kernel_conv/kernel", "resnet/conv_root/kernel")


def _input_kernel(var, src):
    """The source variable's value for `var`: itself when the shapes match, the input convolution's
    kernel adapted to the model's channels (timm's adapt_input_conv, as checkpoints get) when only
    they differ, else None (not loaded)."""
    have, want = tuple(src.shape), tuple(var.shape)
    if have == want:
        return src.value
    if var.path in _INPUT_KERNELS and len(have) == 4 and have[:2] == want[:2] and have[3] == want[3]:
        return adapt_input_conv(keras.ops.convert_to_numpy(src.value), want[2])
    return None


def _resized_source(source: keras.Model, target: keras.Model) -> keras.Model:
    """The source resized to the target's image size when both are keras-vit models at
    different resolutions (position embeddings resampled)."""
    if not (isinstance(source, VisionTransformer) and isinstance(target, VisionTransformer)):
        return source
    if source.vit_config.image_size == target.vit_config.image_size:
        return source
    return resize_model(source, image_size=target.vit_config.image_size)
