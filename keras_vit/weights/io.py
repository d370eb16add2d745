"""Checkpoint weights in and out of a model: canonical (vision_transformer) names of its variables,
all-or-nothing assignment with the adaptations that are well defined, load_weights / save_npz /
save_safetensors.

Reading checkpoints by name or file lives in `checkpoints`, the layout conversions in `npz_layout`
and `torch_layout` (modules of this package); their public names are re-exported by `keras_vit.weights`.
Loading is all-or-nothing: nothing is assigned unless every key and shape fits.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

import keras
import numpy as np

from keras_vit.config import ViTConfig
from keras_vit.files import atomic_path
from keras_vit.model import get_config
from keras_vit.weights import hf_layout, torch_layout
from keras_vit.weights.checkpoints import (
    ARCHITECTURE_FIELDS,
    HF_PREFIX,
    PUBLISHED,
    Checkpoint,
    PathLike,
    Published,
    check_variant,
    checkpoint_path,
    hub_defaults,
    hub_file,
    is_checkpoint,
    read_checkpoint,
    read_npz,
    read_safetensors,
)
from keras_vit.weights.npz_layout import METADATA_KEY, POSEMB, canonicalize, shape_defaults
from keras_vit.weights.resize import (
    check_method,
    infer_grid,
    relative_table_grid,
    resample_1d,
    resample_position_embeddings,
    resample_relative_embedding,
)

log = logging.getLogger("keras_vit")


def integer_quantized(layer) -> bool:
    """Whether model.quantize() gave this layer integer kernel codes (int8, int4, GPTQ, AWQ); float8
    keeps the float kernel and only scales what it multiplies."""
    return layer.dtype_policy.quantization_mode not in (None, "float8")


def dequantized_kernel(dense: keras.layers.Dense) -> np.ndarray:
    """The float (in, out) kernel a model.quantize()d Dense layer multiplies by, read back by applying
    the layer, activation off, to the identity: Keras undoes its own quantization (scales, zero
    points, int4 packing, LoRA) whatever the mode. A one-hot row quantizes exactly, so int8's per-row
    input quantization adds no error. It runs in float32 whatever the layer's policy (under
    mixed_bfloat16 the bf16 product would round the codes by as much as int8's own step)."""
    activation, policy = dense.activation, dense.dtype_policy
    dense.activation = None
    if policy.compute_dtype != "float32":  # e.g. int8_from_mixed_bfloat16 -> int8_from_float32
        dense.dtype_policy = policy.name.rsplit("_from_", 1)[0] + "_from_float32"
    try:
        eye = np.eye(int(dense.input_spec.axes[-1]), dtype="float32")
        kernel = keras.ops.convert_to_numpy(keras.ops.cast(dense(eye), "float32"))
    finally:
        dense.activation = activation
        if dense.dtype_policy is not policy:
            dense.dtype_policy = policy
    if dense.bias is not None:
        kernel = kernel - keras.ops.convert_to_numpy(keras.ops.cast(dense.bias, "float32"))[None]
    return kernel


def dequantized_kernels(model: keras.Model) -> Dict[str, np.ndarray]:
    """{kernel variable path: float kernel} of the model's Dense layers with integer kernel codes."""
    return {f"{layer.path}/kernel": dequantized_kernel(layer) for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.Dense) and integer_quantized(layer)}


def _kernel(dense: keras.layers.Dense):
    """A Dense layer's kernel as a checkpoint holds it: its variable, or the float kernel of one
    whose kernel model.quantize() made integer codes (never the codes themselves)."""
    return dequantized_kernel(dense) if integer_quantized(dense) else dense.kernel


def model_variables(model: keras.Model) -> Dict[str, keras.Variable]:
    """The model's variables under their canonical (vision_transformer) checkpoint names (a Dense
    kernel that model.quantize() made integer codes: its float value, an array)."""
    cfg = get_config(model)
    out = {}
    if cfg.resnet_layers is not None:
        out.update(model.get_layer("resnet").official_weights())
    emb = model.get_layer("embedding").projection
    out["embedding/kernel"], out["embedding/bias"] = emb.kernel, emb.bias
    if cfg.has_class_token:
        out["cls"] = model.get_layer("cls").cls
    if cfg.distilled:
        out["dist"] = model.get_layer("dist").cls
    if cfg.num_registers:
        out["reg"] = model.get_layer("reg").reg
    if cfg.pre_norm:
        norm = model.get_layer("pre_norm")
        out["Transformer/pre_norm/scale"], out["Transformer/pre_norm/bias"] = norm.gamma, norm.beta
    pe = model.get_layer("posembed_input")
    p = "Transformer/posembed_input/"
    if cfg.pos_embedding == "learned":
        out[POSEMB] = pe.pos_embedding
    elif cfg.pos_embedding == "learned_2d":
        out[p + "row_embedding"], out[p + "col_embedding"] = pe.row_embedding, pe.col_embedding
        if pe.num_prefix_tokens:
            out[p + "prefix_embedding"] = pe.prefix_embedding
    names = {layer.name for layer in model.layers}
    for i in range(cfg.num_layers):
        if f"encoderblock_{i}" not in names:  # a feature_layers model ends at its last returned block
            break
        blk = model.get_layer(f"encoderblock_{i}")
        b = f"Transformer/encoderblock_{i}/"
        att = blk.attention
        a = b + "MultiHeadDotProductAttention_1/"
        for ln, layer in (("LayerNorm_0", blk.norm_1), ("LayerNorm_2", blk.norm_2)):
            out[f"{b}{ln}/scale"], out[f"{b}{ln}/bias"] = layer.gamma, layer.beta
        for n in ("query", "key", "value", "out"):  # a LoRA target: its kernel with the update (an array)
            out[f"{a}{n}/kernel"] = att.merged_kernel(n) if n in att.lora_targets else getattr(att, f"{n}_kernel")
            if n == "out" or att.qkv_bias:
                out[f"{a}{n}/bias"] = getattr(att, f"{n}_bias")
        if att.relative_grid is not None:
            out[a + "relative_embedding"] = att.relative_embedding
        if att.qk_norm:
            for n, norm in (("query_norm", att.query_norm), ("key_norm", att.key_norm)):
                out[f"{a}{n}/scale"], out[f"{a}{n}/bias"] = norm.gamma, norm.beta
        for j, scale in enumerate(blk.layer_scale or ()):
            out[f"{b}LayerScale_{j}/scale"] = scale.scale
        for j, dense in enumerate((blk.mlp.dense_0, blk.mlp.dense_1)):
            out[f"{b}MlpBlock_3/Dense_{j}/kernel"], out[f"{b}MlpBlock_3/Dense_{j}/bias"] = _kernel(dense), dense.bias
    for layer_name, key in (("encoder_norm", "Transformer/encoder_norm"), ("fc_norm", "fc_norm")):
        if layer_name in names:
            norm = model.get_layer(layer_name)
            out[f"{key}/scale"], out[f"{key}/bias"] = norm.gamma, norm.beta
    if cfg.classifier == "map" and "pool" in names:
        out.update(_map_head_variables(model.get_layer("pool")))
    for name in ("pre_logits", "head", "head_dist"):
        if name in names:
            dense = model.get_layer(name)
            out[f"{name}/kernel"], out[f"{name}/bias"] = _kernel(dense), dense.bias
    return out


def _map_head_variables(head) -> Dict[str, keras.Variable]:
    """A MAPHead's variables under big_vision's names (MAPHead_0/...)."""
    m, a = "MAPHead_0/", "MAPHead_0/MultiHeadDotProductAttention_0/"
    out = {m + "probe": head.probe, m + "LayerNorm_0/scale": head.norm.gamma, m + "LayerNorm_0/bias": head.norm.beta}
    for n in ("query", "key", "value", "out"):
        out[f"{a}{n}/kernel"], out[f"{a}{n}/bias"] = getattr(head, f"{n}_kernel"), getattr(head, f"{n}_bias")
    for j, dense in enumerate((head.mlp.dense_0, head.mlp.dense_1)):
        out[f"{m}MlpBlock_0/Dense_{j}/kernel"], out[f"{m}MlpBlock_0/Dense_{j}/bias"] = _kernel(dense), dense.bias
    return out


def model_arrays(model: keras.Model) -> Dict[str, np.ndarray]:
    """The model's weights as numpy arrays under canonical names (what save_npz writes)."""
    # convert_to_numpy: a variable's value or a computed tensor (a LoRA-merged kernel: on PyTorch one that
    # requires grad, whose .numpy() refuses), on every backend
    return {k: np.asarray(keras.ops.convert_to_numpy(v.value if isinstance(v, keras.Variable) else v))
            for k, v in model_variables(model).items()}


def _split_posemb(n: int, model_prefix: int, grid: Tuple[int, int], big_vision: bool) -> int:
    """How many prefix (class and distillation token) slots a checkpoint's n position embeddings have."""
    order = tuple(dict.fromkeys((0, model_prefix, 1) if big_vision else (model_prefix, 0, 1)))
    for p in order:
        if n - p == grid[0] * grid[1]:
            return p
    for p in order:
        r = int(np.sqrt(max(n - p, 0)))
        if n - p > 0 and r * r == n - p:
            return p
    return order[0]


def adapt_input_conv(kernel: np.ndarray, channels: int) -> np.ndarray:
    """A (kh, kw, C, out) input kernel for `channels` input channels, as timm's adapt_input_conv:
    summed over C for one channel (a grey image then gives what its C-fold copy gave), else the
    C channels repeated and scaled by C / channels (an image repeated channels / C times then
    gives what it gave)."""
    kernel = np.asarray(kernel)
    c = kernel.shape[2]
    if channels == c:
        return kernel
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    reps = -(-channels // c)
    return (np.concatenate([kernel] * reps, axis=2)[:, :, :channels] * (c / channels)).astype(kernel.dtype)


def _adapt(values: Dict[str, np.ndarray], target: Mapping[str, keras.Variable], cfg: ViTConfig, method: str,
           big_vision_posemb: bool, source_grid: Optional[Sequence[int]], source: str = "checkpoint") -> None:
    """Make checkpoint arrays fit the model where that is well defined: drop a head of another
    size (and pre-logits the model lacks), adapt the input kernel to the model's channels, add
    the class slot, resample position embeddings (saying so)."""
    for head in ("head", "head_dist"):
        kernel = f"{head}/kernel"
        if kernel in values and values[kernel].ndim == 2 and (
                kernel not in target or tuple(values[kernel].shape) != tuple(target[kernel].shape)):
            if kernel in target:
                (have_in, have), (want_in, want) = values[kernel].shape[-2:], tuple(target[kernel].shape)[-2:]
                if have != want:
                    log.info("%s: %s of %d classes not loaded (the model has %d)", source, head, have, want)
                else:
                    log.info("%s: %s not loaded (it takes %d features, the model's %d)", source, head, have_in, want_in)
            values.pop(kernel), values.pop(f"{head}/bias", None)
    first = "conv_root/kernel" if "conv_root/kernel" in target else "embedding/kernel"
    if first in values and first in target and values[first].ndim == 4:
        have, want = values[first].shape, tuple(target[first].shape)
        if have[2] != want[2] and have[:2] == want[:2] and have[3] == want[3]:
            values[first] = adapt_input_conv(values[first], want[2])
    if "pre_logits/kernel" in values and "pre_logits/kernel" not in target:
        values.pop("pre_logits/kernel"), values.pop("pre_logits/bias", None)
    if cfg.feature_layers is not None or cfg.output is not None:  # features: later layers are not built
        for k in [k for k in values if k.startswith(("MAPHead_0/", "fc_norm/")) and k not in target]:
            values.pop(k)
        later = re.compile(r"^Transformer/(encoder_norm/|encoderblock_(\d+)/)")
        for k in [k for k in values if later.match(k) and k not in target]:
            m = later.match(k)
            if m[2] is None or int(m[2]) < cfg.num_layers:
                values.pop(k)
    _adapt_position_embeddings(values, target, cfg, method, big_vision_posemb, source_grid, source)


def _adapt_position_embeddings(values: Dict[str, np.ndarray], target: Mapping[str, keras.Variable], cfg: ViTConfig,
                               method: str, big_vision_posemb: bool, source_grid: Optional[Sequence[int]],
                               source: str) -> None:
    """Bring the checkpoint's position embeddings (1-D table, learned_2d rows/columns, relative
    tables) to the model's grid: the prefix slots (class, distillation) added where big_vision (or
    timm's no_embed_class) left them out, then resampled. Register tokens have a slot only with
    register_pos_embedding (cfg.num_pos_prefix_tokens counts them then)."""
    grid = cfg.grid_size
    prefix = cfg.num_pos_prefix_tokens
    if POSEMB in values and POSEMB in target:
        pe = values[POSEMB]
        pe = pe[None] if pe.ndim == 2 else pe
        # A known source grid settles the prefix (4x6 + a class token is 25 = 5x5 rows, no class slot),
        # when the table fits it (with the prefix rows, or without them as big_vision writes it).
        fits = [q for q in dict.fromkeys((prefix, 0)) if source_grid is not None
                and pe.shape[1] - q == source_grid[0] * source_grid[1]]
        if source_grid is not None and not fits:  # a damaged table, or a config that is not the checkpoint's
            gh, gw = source_grid
            raise ValueError(f"{source}: its position embeddings have {pe.shape[1]} rows, but its config's image and "
                             f"patch size give a {gh}x{gw} patch grid: {gh * gw} rows"
                             + (f", or {gh * gw + prefix} with the model's {prefix} prefix token(s)" if prefix else ""))
        p = fits[0] if fits else _split_posemb(pe.shape[1], prefix, grid, big_vision_posemb)
        if p == 0 and prefix:  # big_vision adds E_pos before prepending x_class: zero slots
            pe = np.concatenate([np.zeros_like(pe[:, :1])] * prefix + [pe], axis=1)
            p = prefix
        # The source grid, when known, decides: 4x6 -> 6x4 keeps the count but moves every token.
        old = (tuple(source_grid) if fits else tuple(grid)
               if pe.shape[1] - p == grid[0] * grid[1] else infer_grid(pe.shape[1] - p, grid))
        if p == prefix and old != tuple(grid):
            log.warning("%s: position embeddings resampled from a %dx%d to a %dx%d grid (%s) for image_size %dx%d",
                        source, old[0], old[1], grid[0], grid[1], method, *cfg.image_size)
            pe = resample_position_embeddings(pe, grid, p, old_grid=old, method=method)
        values[POSEMB] = pe
    rows = "Transformer/posembed_input/row_embedding"
    if rows in values and rows in target:
        values[rows] = resample_1d(values[rows], grid[0], method)
        cols = "Transformer/posembed_input/col_embedding"
        if cols in values:
            values[cols] = resample_1d(values[cols], grid[1], method)
    for k in [k for k in values if k.endswith("/relative_embedding") and k in target]:
        want = tuple(target[k].shape)
        moved = source_grid is not None and tuple(source_grid) != tuple(grid)  # e.g. 4x6 -> 6x4: same table size
        if (tuple(values[k].shape) != want or moved) and values[k].ndim == 3 and values[k].shape[1:] == want[1:]:
            extra = 1 if cfg.num_prefix_tokens else 0  # one slot for pairs with any prefix token
            old = (tuple(source_grid) if source_grid is not None
                   else relative_table_grid(values[k].shape[0] - extra, grid))
            values[k] = resample_relative_embedding(values[k], grid, cfg.num_prefix_tokens, old_grid=old,
                                                    method=method)


def _listing(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def assign_weights(model: keras.Model, arrays: Mapping[str, np.ndarray], *, method: str = "linear",
                   big_vision_posemb: bool = False, source_grid: Optional[Sequence[int]] = None,
                   source: str = "checkpoint") -> None:
    """Assign canonical-named arrays to the model, all or nothing (ValueError listing every
    missing key, unexpected key and shape mismatch)."""
    check_method(method)
    cfg = get_config(model)
    if any(integer_quantized(layer) for layer in model._flatten_layers(include_self=False)):
        raise ValueError(f"model {model.name!r} has layers quantized in Keras (model.quantize): "
                         "load the weights into the float model, then quantize it")
    if any(getattr(layer, "lora_enabled", False) for layer in model._flatten_layers(include_self=False)):
        raise ValueError(f"model {model.name!r} has LoRA enabled: load the weights into the model first, then "
                         "enable LoRA (or load_lora_weights for the adapters)")
    target = model_variables(model)
    values = dict(arrays)
    _adapt(values, target, cfg, method, big_vision_posemb, source_grid, source)
    # The head is the one part a checkpoint need not give: the model keeps its zero-initialised one. Half of
    # one (a kernel without its bias) is a damaged file, reported as any missing key.
    headless = {f"{head}/{part}" for head in ("head", "head_dist") for part in ("kernel", "bias")
                if f"{head}/kernel" not in values and f"{head}/bias" not in values}
    missing = sorted(set(target) - set(values) - headless)
    unexpected = sorted(set(values) - set(target))
    mismatched = [f"{k} {tuple(values[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in sorted(set(values) & set(target))
                  if tuple(values[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}")
        raise ValueError(f"{source} does not fit model {model.name!r} ({cfg.variant or 'custom'}): " + "; ".join(parts))
    unreadable = sorted(k for k in values if values[k].dtype.kind not in "fiub")  # before any variable changes
    if unreadable:
        raise ValueError(f"{source} holds arrays of no numeric dtype ({_listing(unreadable)}: "
                         f"{values[unreadable[0]].dtype.str}); save the checkpoint with float arrays")
    for k, var in target.items():
        if k in values:
            var.assign(values[k].astype(var.dtype))


def warn_untrained_head(model: keras.Model, arrays: Mapping[str, np.ndarray], source: str) -> None:
    """One log line when a checkpoint leaves the model's head untrained: it has none, one of the model's
    classes on pre-logits the model lacks, or an all-zero one of the model's size (ImageNet-21k pre-training)."""
    if not any(layer.name == "head" for layer in model.layers):
        return
    head = arrays.get("head/kernel")
    if head is None:
        log.warning("%s has no classification head: the model's head is untrained (zeros); "
                    "fine-tune it, or build with include_top=False for features", source)
    elif head.shape[-1] == get_config(model).num_classes and head.shape != tuple(model.get_layer("head").kernel.shape):
        log.warning("%s's head of %d classes takes %d features (its pre-logits, representation_size=%d); this model's "
                    "takes %d: the head is untrained (zeros); build with representation_size=%d to keep it, or fine-tune",
                    source, head.shape[-1], head.shape[0], head.shape[0], model.get_layer("head").kernel.shape[0], head.shape[0])
    elif head.shape[-1] == get_config(model).num_classes and not np.any(head) and not np.any(arrays.get("head/bias", 0)):
        log.warning("%s has an all-zero head (a pre-training checkpoint): the head is untrained; "
                    "fine-tune it, or build with include_top=False for features", source)


def load_weights(model: keras.Model, weights: PathLike, *, prefix: Optional[str] = None,
                 method: Optional[str] = None) -> keras.Model:
    """Load a checkpoint (.npz, timm/Hugging Face .safetensors, published name or hf://ORG/NAME)
    into a keras-vit model, in place; returns the model.

    A head of another size is dropped (the model keeps its zero-initialised one), the input
    kernel is adapted to the model's channels, position embeddings are resampled to the
    model's grid with `method` (default: as the checkpoint's own code does, timm's antialiased
    bicubic for timm files, else "linear").
    """
    ckpt = read_checkpoint(weights)
    arrays, big_vision_posemb = ckpt.canonical(num_heads=get_config(model).num_heads, prefix=prefix)
    assign_weights(model, arrays, method=method or ckpt.resample_method, big_vision_posemb=big_vision_posemb,
                   source_grid=ckpt.grid, source=f"checkpoint {ckpt.source!r}")
    warn_untrained_head(model, arrays, f"checkpoint {ckpt.source!r}")
    return model


def load_npz(model: keras.Model, path: PathLike, *, prefix: Optional[str] = None,
             method: Optional[str] = None) -> keras.Model:
    """Load an official .npz checkpoint (path or published name) into a keras-vit model, in place
    (any format `load_weights` reads is accepted). Returns the model."""
    return load_weights(model, path, prefix=prefix, method=method)


def _check_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path!r}: it is a folder; give a file name")


def _metadata(model: keras.Model) -> str:
    """The keras-vit config and class names as JSON: what `ViT(weights=path)` rebuilds the model from
    (the options the arrays do not show: a kept class token, normalisation, activation, epsilon...)."""
    names = getattr(model, "class_names", None)
    return json.dumps({"config": get_config(model).to_dict(), "class_names": list(names) if names else None})


def save_npz(model: keras.Model, path: PathLike) -> str:
    """Write the model's weights as an .npz in the vision_transformer layout (loadable by the
    official code and timm for the standard options), with the keras-vit config and class names
    as one extra 0-d string entry (`__keras_vit__`) so `ViT(weights=path)` rebuilds the same
    model; written then renamed."""
    path = os.fspath(path)
    arrays = model_arrays(model)
    arrays[METADATA_KEY] = np.array(_metadata(model))
    _check_folder(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def save_safetensors(model: keras.Model, path: PathLike, layout: str = "timm",
                     no_embed_class: Optional[bool] = None) -> str:
    """Write the model's weights as a .safetensors file in timm's VisionTransformer layout (fused
    qkv, PyTorch (out, in) kernels), or with `layout="hf"` in Hugging Face's Dinov2Model (a model
    with LayerScale), CLIPVisionModelWithProjection (a model with pre_norm) or SiglipVisionModel (no
    class token, "map" or "gap") layout (hf_layout.hf_kind), with the
    keras-vit config and class names as metadata so `ViT(weights=path)` rebuilds the same model;
    written then renamed.

    `no_embed_class` (timm layout): write pos_embed without the class / distillation tokens' rows,
    folded into the tokens, as timm's no_embed_class architectures (deit3_*, *_reg4_dinov2) load it.
    None: when the model has register tokens, or its prefix rows are zero (a model loaded from such
    a file); False writes them, as timm's vit_* take them. Either file gives the same logits.
    """
    cfg = get_config(model)
    if layout not in ("timm", "hf"):
        raise ValueError(f"layout must be 'timm' or 'hf', got {layout!r}")
    if no_embed_class not in (None, True, False):
        raise ValueError(f"no_embed_class must be None, True or False, got {no_embed_class!r}")
    if no_embed_class and cfg.register_pos_embedding:
        raise ValueError("no_embed_class=True drops the prefix rows of pos_embed, but this model's registers "
                         "have rows of their own (register_pos_embedding: timm's no_embed_class=False)")
    if cfg.pos_embedding not in ("learned", "none", "sincos2d"):
        raise ValueError(f"pos_embedding {cfg.pos_embedding!r} has no timm equivalent; "
                         "save this model with keras_vit.save_npz instead")
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ValueError("save_safetensors needs the safetensors package: pip install safetensors") from None
    arrays = {k: v.astype(np.float32) for k, v in model_arrays(model).items()}
    if layout == "hf" and cfg.register_pos_embedding:
        raise ValueError("layout='hf' has no position embeddings for register tokens (register_pos_embedding); "
                         "save this model with layout='timm'")
    if layout == "timm":  # registers' position rows: timm's no_embed_class=False
        if cfg.register_pos_embedding:
            no_embed_class = False
        elif no_embed_class is None and POSEMB in arrays and cfg.num_pos_prefix_tokens:
            rows = arrays[POSEMB].reshape(-1, arrays[POSEMB].shape[-1])[:cfg.num_pos_prefix_tokens]
            no_embed_class = bool(cfg.num_registers) or not np.any(rows)
        tensors = torch_layout.to_timm(arrays, no_embed_class=no_embed_class)
    else:
        kind = hf_layout.hf_kind(cfg)
        tensors = (hf_layout.to_clip(arrays) if kind == "clip" else hf_layout.to_siglip(arrays) if kind == "siglip"
                   else hf_layout.to_dinov2(arrays, swiglu=cfg.mlp == "swiglu"))
    meta = {"format": "pt", "keras_vit": _metadata(model)}
    path = os.fspath(path)
    _check_folder(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


__all__ = ["PUBLISHED", "Published", "Checkpoint", "checkpoint_path", "hub_file", "read_npz", "read_safetensors",
           "read_checkpoint", "shape_defaults", "hub_defaults", "canonicalize", "model_variables", "model_arrays",
           "adapt_input_conv", "assign_weights", "warn_untrained_head", "load_weights", "load_npz", "save_npz",
           "save_safetensors", "check_variant", "is_checkpoint", "ARCHITECTURE_FIELDS", "HF_PREFIX", "PathLike"]
