"""LoRA on a keras-vit model (`enable_lora`: the attention's query and value projections, as peft and keras-hub
do for ViTs), and its factors in a file of their own, apart from the model: what keeps a QLoRA model exact
across a save.

`model.save` merges each LoRA-enabled Dense layer's factors into its kernel (Keras' `Dense.save_own_variables`):
exact in float, but a quantized layer is quantized again after the merge, so a QLoRA model reloads with moved
logits and without its factors. Saved apart (as keras-hub's `Backbone.save_lora_weights` does), the base model
saved before `enable_lora` and the factors together give the trained model back to the bit.

    keras_vit.enable_lora(model, rank=8)                       # query and value of every attention layer
    keras_vit.save_lora_weights(model, "adapters.lora.npz")    # every LoRA-enabled layer's A, B, rank, alpha
    keras_vit.load_lora_weights(base, "adapters.lora.npz")     # enables LoRA where the file has it, then loads
"""
from __future__ import annotations

import json
import numbers
import os
import warnings
import zipfile
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np

from keras_vit.errors import UserInputError
from keras_vit.files import PathLike, atomic_path
from keras_vit.layers.attention import ATTENTION_PROJECTIONS, LORA_TARGETS, MultiHeadSelfAttention

SUFFIX = ".lora.npz"
_META = "__lora__"  # the JSON entry: {layer path: [rank, alpha]}, [rank, alpha, targets] for attention
MLP = "mlp"  # enable_lora's name for the MLP's two Dense layers (Keras' own Dense.enable_lora)


def enable_lora(model, rank: int, alpha: Optional[float] = None, targets: Sequence[str] = LORA_TARGETS) -> int:
    """LoRA of `rank` (scale alpha / rank; alpha defaults to rank) on every encoder block of `model`:
    `targets` among "query", "key", "value" (the attention projections; default query and value, peft's
    and keras-hub's ViT targets) and "mlp" (the MLP's Dense layers). The targeted kernels are frozen;
    the rest of the model stays as trainable as it was (freeze it for LoRA alone). Returns the layers
    changed. Call it before `compile`."""
    targets = check_lora(rank, alpha, targets)
    rank, alpha = int(rank), None if alpha is None else float(alpha)
    attention = tuple(t for t in targets if t != MLP)
    chosen = []
    for layer in model._flatten_layers(include_self=False):
        if attention and isinstance(layer, MultiHeadSelfAttention) and "encoderblock_" in layer.path:
            chosen.append((layer, dict(targets=attention)))
        elif MLP in targets and isinstance(layer, keras.layers.Dense) and "/MlpBlock_3/" in layer.path:
            chosen.append((layer, {}))
    if not chosen:
        raise UserInputError(f"model {model.name!r} has no encoder block to put LoRA on")
    _check_quantization(layer for layer, _ in chosen)
    enabled = [layer.path for layer, _ in chosen if getattr(layer, "lora_enabled", False)]
    if enabled:
        raise UserInputError(f"LoRA is already enabled on {enabled[0]!r} (and {len(enabled) - 1} more); once per layer")
    for layer, options in chosen:
        shapes = list(_factor_shapes(layer, rank, options.get("targets", ())).values())  # A, B per target
        widest = min(min(int(np.prod(a[:-1])), b[-1]) for a, b in zip(shapes[::2], shapes[1::2]))
        if rank > widest:  # a larger rank adds nothing a full-rank update lacks, and can exhaust the memory
            raise UserInputError(f"LoRA rank {rank} is larger than {layer.path!r} can use: at most min(inputs, "
                                 f"outputs) = {widest}")
    for layer, options in chosen:
        layer.enable_lora(rank, lora_alpha=alpha, **options)
    _functions_changed(model)
    return len(chosen)


def _check_quantization(layers) -> None:
    """Keras' float8 and GPTQ Dense layers cannot call with LoRA: refused before any layer changes."""
    unfit = [layer for layer in layers if getattr(layer, "quantization_mode", None) in ("float8", "gptq")]
    if unfit:
        raise UserInputError(f"LoRA does not combine with {unfit[0].quantization_mode} quantization "
                             f"({unfit[0].path!r}); LoRA takes int8, int4 or float layers")


def _functions_changed(model) -> None:
    """The model's layers now compute otherwise: its traced predict / evaluate / train functions are dropped (as
    keras' Model.quantize does; they ran the graph without LoRA). An optimizer already built holds the old
    trainable variables: compile again before fitting."""
    model.train_function = model.test_function = model.predict_function = None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        warnings.warn(f"model {model.name!r} was compiled and trained before LoRA was enabled: call "
                      "model.compile(...) again before fit (its optimizer holds the variables LoRA froze)",
                      stacklevel=3)


def check_lora(rank, alpha=None, targets: Sequence[str] = LORA_TARGETS, error: type = UserInputError) -> tuple:
    """`targets` as a tuple, after checking the rank (a positive integer), alpha (None or a positive number) and
    targets (distinct names among query, key, value, mlp; one string is one name); `error` names a bad one."""
    allowed = ATTENTION_PROJECTIONS + (MLP,)
    names = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple)) else None
    if not names or any(t not in allowed for t in names) or len(set(names)) != len(names):
        raise error(f"LoRA targets must be distinct names among {', '.join(allowed)}; got {targets!r}")
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
        raise error(f"LoRA rank must be a positive integer, got {rank!r}")
    if alpha is not None and (not isinstance(alpha, numbers.Real) or isinstance(alpha, bool)
                              or not 0 < alpha < float("inf")):
        raise error(f"LoRA alpha must be a positive number, got {alpha!r}")
    return tuple(names)


def lora_factors(model) -> List[keras.Variable]:
    """Every LoRA factor of `model` (Keras' Dense / Conv layers' and the attention's)."""
    return [v for layer in _lora_layers(model) for v in _factors(layer).values()]


def _lora_layers(model) -> List:
    return [layer for layer in model._flatten_layers(include_self=False) if getattr(layer, "lora_enabled", False)]


def _factors(layer) -> Dict[str, keras.Variable]:
    """{name: variable} of a LoRA-enabled layer's factors (Keras' lora_kernel_a / _b, or the attention's)."""
    if hasattr(layer, "lora_factors"):
        return layer.lora_factors()
    return {"lora_kernel_a": layer.lora_kernel_a, "lora_kernel_b": layer.lora_kernel_b}


def _factor_shapes(layer, rank: int, targets: Sequence[str] = ()) -> Dict[str, tuple]:
    """{factor name: shape} of the rank-`rank` LoRA factors `layer` takes: Keras' A (kernel's input axes...,
    rank) and B (rank, outputs), or the attention's (D, rank) and (rank, D) per target. A Dense layer's input
    size is read from its input spec (an int4 kernel is packed)."""
    if getattr(layer, "lora_enabled", False):
        return {name: tuple(v.shape) for name, v in _factors(layer).items()}
    if isinstance(layer, MultiHeadSelfAttention):
        d = int(layer.query_kernel.shape[0])
        flat = int(layer.num_heads * layer.head_dim)
        return {f"{t}_lora_{ab}": shape for t in targets for ab, shape in (("a", (d, rank)), ("b", (rank, flat)))}
    if isinstance(layer, keras.layers.Dense):
        spec = layer.input_spec
        inputs = spec.axes[-1] if spec is not None and spec.axes and -1 in spec.axes else layer._kernel.shape[0]
        kernel = (int(inputs), int(layer.units))
    else:  # convolutions: (kernel size..., input channels, filters)
        kernel = tuple(int(d) for d in layer._kernel.shape)
    return {"lora_kernel_a": kernel[:-1] + (rank,), "lora_kernel_b": (rank, kernel[-1])}


def save_lora_weights(model, path: PathLike) -> str:
    """Write the LoRA factors (lora_kernel_a, lora_kernel_b), rank and alpha of every LoRA-enabled layer of
    `model` to `path` (a `.lora.npz` file, keyed by the layers' paths in the model); returns the path."""
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise UserInputError(f"a LoRA weights file must end in {SUFFIX}, got {path!r}")
    layers = _lora_layers(model)
    if not layers:
        raise UserInputError(f"model {model.name!r} has no LoRA-enabled layer: call layer.enable_lora(rank) first")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserInputError(f"cannot write {path!r}: folder {folder!r} does not exist")
    arrays: Dict[str, np.ndarray] = {}
    meta = {}
    for layer in layers:
        for name, factor in _factors(layer).items():
            arrays[f"{layer.path}/{name}"] = keras.ops.convert_to_numpy(factor)
        meta[layer.path] = [int(layer.lora_rank), float(layer.lora_alpha)] + (
            [list(layer.lora_targets)] if isinstance(layer, MultiHeadSelfAttention) else [])
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
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # cut short, empty, not a zip
        raise UserInputError(f"{path!r} is not a LoRA weights file (save_lora_weights writes one): "
                             f"{exc or type(exc).__name__}") from None
    layers = {layer.path: layer for layer in model._flatten_layers(include_self=False)}
    missing = sorted(set(meta) - set(layers))
    if missing:
        raise UserInputError(f"{path!r} has LoRA factors for layers model {model.name!r} does not have: "
                             f"{', '.join(missing)}")
    _check_quantization(layers[layer_path] for layer_path in meta)
    for layer_path, (rank, alpha, *rest) in sorted(meta.items()):
        layer = layers[layer_path]
        targets = tuple(rest[0]) if rest else ()
        if not hasattr(layer, "enable_lora") or isinstance(layer, MultiHeadSelfAttention) != bool(targets):
            raise UserInputError(f"layer {layer_path!r} ({type(layer).__name__}) cannot take the LoRA factors "
                                 f"{path!r} has for it")
        if getattr(layer, "lora_enabled", False) and (layer.lora_rank, float(layer.lora_alpha)) != (rank, alpha):
            raise UserInputError(f"layer {layer_path!r} has LoRA rank {layer.lora_rank}, alpha "
                                 f"{float(layer.lora_alpha):g}; {path!r} has rank {rank}, alpha {alpha:g}")
        if targets and getattr(layer, "lora_enabled", False) and tuple(layer.lora_targets) != targets:
            raise UserInputError(f"layer {layer_path!r} has LoRA on {', '.join(layer.lora_targets)}; {path!r} "
                                 f"has it on {', '.join(targets)}")
        want = _factor_shapes(layer, rank, targets)
        got = {name: arrays.get(f"{layer_path}/{name}") for name in want}
        if any(v is None for v in got.values()):
            raise UserInputError(f"{path!r} names layer {layer_path!r} but lacks its {' / '.join(want)}")
        if {name: v.shape for name, v in got.items()} != want:
            raise UserInputError(f"layer {layer_path!r} takes rank-{rank} factors "
                                 f"{' x '.join(str(s) for s in want.values())}; {path!r} has "
                                 f"{' x '.join(str(v.shape) for v in got.values())}")
    for layer_path, (rank, alpha, *rest) in sorted(meta.items()):
        layer = layers[layer_path]
        if not getattr(layer, "lora_enabled", False):
            layer.enable_lora(rank, lora_alpha=alpha, **({"targets": tuple(rest[0])} if rest else {}))
        for name, factor in _factors(layer).items():
            factor.assign(arrays[f"{layer_path}/{name}"])
    _functions_changed(model)
