"""LoRA factors in a file of their own, apart from the model: what keeps a QLoRA model exact across a save.

`model.save` merges each LoRA-enabled Dense layer's factors into its kernel (Keras' `Dense.save_own_variables`):
exact in float, but a quantized layer is quantized again after the merge, so a QLoRA model reloads with moved
logits and without its factors. Saved apart (as keras-hub's `Backbone.save_lora_weights` does), the base model
saved before `enable_lora` and the factors together give the trained model back to the bit.

    keras_vit.save_lora_weights(model, "adapters.lora.npz")    # every LoRA-enabled layer's A, B, rank, alpha
    keras_vit.load_lora_weights(base, "adapters.lora.npz")     # enables LoRA where the file has it, then loads
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import keras
import numpy as np

from keras_vit.errors import UserInputError
from keras_vit.files import PathLike, atomic_path

SUFFIX = ".lora.npz"
_META = "__lora__"  # the JSON entry: {layer path: [rank, alpha]}


def _lora_layers(model) -> List:
    return [layer for layer in model._flatten_layers(include_self=False) if getattr(layer, "lora_enabled", False)]


def _factor_shapes(layer, rank: int) -> tuple:
    """The shapes of the rank-`rank` LoRA factors (A, B) Keras gives `layer`: A (kernel's input axes..., rank),
    B (rank, outputs). A Dense layer's input size is read from its input spec (an int4 kernel is packed)."""
    if getattr(layer, "lora_enabled", False):
        return tuple(layer.lora_kernel_a.shape), tuple(layer.lora_kernel_b.shape)
    if isinstance(layer, keras.layers.Dense):
        spec = layer.input_spec
        inputs = spec.axes[-1] if spec is not None and spec.axes and -1 in spec.axes else layer._kernel.shape[0]
        kernel = (int(inputs), int(layer.units))
    else:  # convolutions: (kernel size..., input channels, filters)
        kernel = tuple(int(d) for d in layer._kernel.shape)
    return kernel[:-1] + (rank,), (rank, kernel[-1])


def save_lora_weights(model, path: PathLike) -> str:
    """Write the LoRA factors (lora_kernel_a, lora_kernel_b), rank and alpha of every LoRA-enabled layer of
    `model` to `path` (a `.lora.npz` file, keyed by the layers' paths in the model); returns the path."""
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise UserInputError(f"a LoRA weights file must end in {SUFFIX}, got {path!r}")
    layers = _lora_layers(model)
    if not layers:
        raise UserInputError(f"model {model.name!r} has no LoRA-enabled layer: call layer.enable_lora(rank) first")
    arrays: Dict[str, np.ndarray] = {}
    meta = {}
    for layer in layers:
        arrays[f"{layer.path}/lora_kernel_a"] = keras.ops.convert_to_numpy(layer.lora_kernel_a)
        arrays[f"{layer.path}/lora_kernel_b"] = keras.ops.convert_to_numpy(layer.lora_kernel_b)
        meta[layer.path] = [int(layer.lora_rank), float(layer.lora_alpha)]
    arrays[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)
    return path


def load_lora_weights(model, path: PathLike) -> None:
    """Load a `save_lora_weights` file into `model`: LoRA is enabled (the file's rank and alpha) on each layer it
    names that has none yet, then its factors are assigned. Every layer is checked before any is changed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserInputError(f"LoRA weights file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META]).decode())
            arrays = {name: data[name] for name in data.files if name != _META}
    except (OSError, ValueError, KeyError) as exc:
        raise UserInputError(f"{path!r} is not a LoRA weights file (save_lora_weights writes one): {exc}") from None
    layers = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
    missing = sorted(set(meta) - set(layers))
    if missing:
        raise UserInputError(f"{path!r} has LoRA factors for layers model {model.name!r} does not have: "
                             f"{', '.join(missing)}")
    for layer_path, (rank, alpha) in sorted(meta.items()):
        layer = layers[layer_path]
        if not hasattr(layer, "enable_lora"):
            raise UserInputError(f"layer {layer_path!r} ({type(layer).__name__}) cannot take LoRA factors")
        if getattr(layer, "lora_enabled", False) and (layer.lora_rank, float(layer.lora_alpha)) != (rank, alpha):
            raise UserInputError(f"layer {layer_path!r} has LoRA rank {layer.lora_rank}, alpha "
                                 f"{float(layer.lora_alpha):g}; {path!r} has rank {rank}, alpha {alpha:g}")
        a, b = arrays.get(f"{layer_path}/lora_kernel_a"), arrays.get(f"{layer_path}/lora_kernel_b")
        if a is None or b is None:
            raise UserInputError(f"{path!r} names layer {layer_path!r} but lacks its lora_kernel_a / lora_kernel_b")
        want = _factor_shapes(layer, rank)
        if (a.shape, b.shape) != want:
            raise UserInputError(f"layer {layer_path!r} takes rank-{rank} factors {want[0]} x {want[1]}; {path!r} "
                                 f"has {a.shape} x {b.shape}")
    for layer_path, (rank, alpha) in sorted(meta.items()):
        layer = layers[layer_path]
        if not getattr(layer, "lora_enabled", False):
            layer.enable_lora(rank, lora_alpha=alpha)
        layer.lora_kernel_a.assign(arrays[f"{layer_path}/lora_kernel_a"])
        layer.lora_kernel_b.assign(arrays[f"{layer_path}/lora_kernel_b"])
