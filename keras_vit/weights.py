"""Official .npz checkpoints in and out (google-research/vision_transformer and big_vision).

Every checkpoint is first brought to the vision_transformer layout ("canonical" names):
`embedding/kernel`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3/Dense_0, Dense_1}`, `Transformer/encoder_norm`, `pre_logits`, `head`, and for the
hybrid `conv_root`, `gn_root`, `block{n}/unit{m}/{conv,gn}{1,2,3,_proj}`. big_vision names
(`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, top-level `pos_embedding`
without the class slot), the scanned `Transformer/encoderblock` stack and the `params/` /
`opt/target/` prefixes are converted. Our position-embedding extras use
`Transformer/posembed_input/{row,col,prefix}_embedding` ("learned_2d") and
`.../MultiHeadDotProductAttention_1/relative_embedding` ("relative").

Loading is all-or-nothing: nothing is assigned unless every key and shape fits.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np

from keras_vit.config import ViTConfig
from keras_vit.errors import first_line
from keras_vit.files import atomic_path
from keras_vit.model import get_config
from keras_vit.resize import (
    check_method,
    infer_grid,
    relative_table_grid,
    resample_1d,
    resample_position_embeddings,
    resample_relative_embedding,
)

PathLike = Union[str, os.PathLike]
_PREFIXES = ("opt/target/", "params/")
_POSEMB = "Transformer/posembed_input/pos_embedding"
_BIG_VISION_BLOCK = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                     "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
_GN_RE = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")

_GCS = "https://storage.googleapis.com/vit_models/"


@dataclasses.dataclass(frozen=True)
class Published:
    """A checkpoint published with the paper or later: where it is and what model it fits."""

    url: str
    variant: str
    image_size: int
    num_classes: int
    representation_size: Optional[int] = None


def _augreg(stem: str, ft: Optional[str] = None) -> str:
    return f"{_GCS}augreg/{stem}" + (f"--imagenet2012-steps_20k-{ft}" if ft else "") + ".npz"


# Names: "{variant}-{pre-training}[-ft-{fine-tuning}[-{res}]]". Sources: the vision_transformer
# README (imagenet21k/, imagenet21k+imagenet2012/) and the AugReg index (augreg/), as listed in
# timm's default_cfgs.
_AR = {
    "Ti/16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "S/32": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "S/16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "B/32": "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0",
    "B/16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "B/8": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "L/16": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
}
PUBLISHED: Dict[str, Published] = {
    # The paper's ImageNet-21k pre-trained models (with the pre-logits layer) ...
    **{f"{v}-i21k": Published(f"{_GCS}imagenet21k/ViT-{v.replace('/', '_')}.npz", v, 224, 21843, r)
       for v, r in (("B/16", 768), ("B/32", 768), ("L/16", 1024), ("L/32", 1024), ("H/14", 1280))},
    "R50+B/16-i21k": Published(f"{_GCS}imagenet21k/R50+ViT-B_16.npz", "R50+B/16", 224, 21843, 768),
    # ... and fine-tuned on ImageNet-1k at 384 px (and at 224 px: "-224").
    **{f"{v}-i21k-ft-in1k": Published(f"{_GCS}imagenet21k+imagenet2012/ViT-{v.replace('/', '_')}.npz", v, 384, 1000)
       for v in ("B/16", "B/32", "L/16", "L/32")},
    "B/16-i21k-ft-in1k-224": Published(f"{_GCS}imagenet21k+imagenet2012/ViT-B_16-224.npz", "B/16", 224, 1000),
    "L/16-i21k-ft-in1k-224": Published(f"{_GCS}imagenet21k+imagenet2012/ViT-L_16-224.npz", "L/16", 224, 1000),
    "R50+B/16-i21k-ft-in1k": Published(f"{_GCS}imagenet21k+imagenet2012/R50+ViT-B_16.npz", "R50+B/16", 384, 1000),
    # "How to train your ViT?" (AugReg) ImageNet-21k checkpoints and their ImageNet-1k fine-tunes.
    **{f"{v}-augreg-i21k": Published(_augreg(stem), v, 224, 21843) for v, stem in _AR.items()},
    "R26+S/32-augreg-i21k": Published(_augreg("R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0"),
                                      "R26+S/32", 224, 21843),
    "R50+L/32-augreg-i21k": Published(_augreg("R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"),
                                      "R50+L/32", 224, 21843),
    **{f"{v}-augreg-i21k-ft-in1k": Published(_augreg(_AR[v], f"lr_{lr}-res_224"), v, 224, 1000)
       for v, lr in (("Ti/16", "0.03"), ("S/32", "0.03"), ("S/16", "0.03"), ("B/32", "0.03"),
                     ("B/16", "0.01"), ("B/8", "0.01"), ("L/16", "0.01"))},
    **{f"{v}-augreg-i21k-ft-in1k-384": Published(_augreg(_AR[v], f"lr_{lr}-res_384"), v, 384, 1000)
       for v, lr in (("Ti/16", "0.03"), ("S/32", "0.03"), ("S/16", "0.03"), ("B/16", "0.01"), ("L/16", "0.01"))},
    "R26+S/32-augreg-i21k-ft-in1k": Published(_augreg(
        "R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1", "lr_0.03-res_224"), "R26+S/32", 224, 1000),
    "R26+S/32-augreg-i21k-ft-in1k-384": Published(_augreg(
        "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0", "lr_0.03-res_384"), "R26+S/32", 384, 1000),
    "R50+L/32-augreg-i21k-ft-in1k": Published(_augreg(
        "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "lr_0.01-res_224"), "R50+L/32", 224, 1000),
    "R50+L/32-augreg-i21k-ft-in1k-384": Published(_augreg(
        "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0", "lr_0.01-res_384"), "R50+L/32", 384, 1000),
}


# --- files ------------------------------------------------------------------------------
def checkpoint_path(weights: PathLike) -> str:
    """A local .npz path for a path or a published name (downloaded once, cached by Keras)."""
    path = os.fspath(weights)
    if os.path.isfile(path):
        return path
    entry = PUBLISHED.get(path)
    if entry is None:
        raise ValueError(f"weights {path!r} is neither an existing .npz file nor a published checkpoint; "
                         f"published names: {', '.join(sorted(PUBLISHED))}")
    fname = entry.url.rsplit("/", 1)[-1]
    try:
        return keras.utils.get_file(fname=fname, origin=entry.url, cache_subdir=os.path.join("models", "keras_vit"))
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is reported the same way
        raise ValueError(f"downloading checkpoint {path!r} from {entry.url} failed ({first_line(exc)}); "
                         "pass the path of a local .npz file instead") from None


def read_npz(path: PathLike) -> Dict[str, np.ndarray]:
    """All arrays of an .npz file (never unpickles)."""
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise ValueError("not an .npz archive")
            return {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, EOFError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"could not read checkpoint {path!r} as an .npz file ({msg})") from None


# --- naming schemes ---------------------------------------------------------------------
def canonicalize(arrays: Mapping[str, np.ndarray], prefix: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], bool]:
    """Arrays under vision_transformer names, and whether the position embeddings came in the
    big_vision way (added before the class token, so without its slot)."""
    if prefix is None:
        prefix = next((p for p in _PREFIXES if any(k.startswith(p) for k in arrays)), "")
    if prefix:
        arrays = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    out: Dict[str, np.ndarray] = {}
    for k, v in arrays.items():
        if k.startswith("Transformer/encoderblock/"):  # big_vision scan: leading layer axis
            rest = k[len("Transformer/encoderblock/"):]
            for i in range(v.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
        else:
            out[k] = v
    if any(re.match(r"Transformer/encoderblock_\d+/MlpBlock_0/", k) for k in out):
        renamed = {}
        for k, v in out.items():
            parts = k.split("/")
            if len(parts) > 2 and parts[1].startswith("encoderblock_"):
                parts[2] = _BIG_VISION_BLOCK.get(parts[2], parts[2])
            renamed["/".join(parts)] = v
        out = renamed
    big_vision_posemb = False
    for old in ("pos_embedding", "Transformer/pos_embedding"):
        if old in out:
            out[_POSEMB] = out.pop(old)
            big_vision_posemb = True
    for k in list(out):
        if _GN_RE.search(k):  # pre-linen flax stored GroupNorm params as (1, 1, 1, C)
            out[k] = out[k].reshape(-1)
    return out, big_vision_posemb


# --- the model's side -------------------------------------------------------------------
def model_variables(model: keras.Model) -> Dict[str, keras.Variable]:
    """The model's variables under their canonical (vision_transformer) checkpoint names."""
    cfg = get_config(model)
    out = {}
    if cfg.resnet_layers is not None:
        out.update(model.get_layer("resnet").official_weights())
    emb = model.get_layer("embedding").projection
    out["embedding/kernel"], out["embedding/bias"] = emb.kernel, emb.bias
    if cfg.classifier == "token":
        out["cls"] = model.get_layer("cls").cls
    pe = model.get_layer("posembed_input")
    p = "Transformer/posembed_input/"
    if cfg.pos_embedding == "learned":
        out[_POSEMB] = pe.pos_embedding
    elif cfg.pos_embedding == "learned_2d":
        out[p + "row_embedding"], out[p + "col_embedding"] = pe.row_embedding, pe.col_embedding
        if pe.num_prefix_tokens:
            out[p + "prefix_embedding"] = pe.prefix_embedding
    for i in range(cfg.num_layers):
        blk = model.get_layer(f"encoderblock_{i}")
        b = f"Transformer/encoderblock_{i}/"
        att = blk.attention
        a = b + "MultiHeadDotProductAttention_1/"
        for ln, layer in (("LayerNorm_0", blk.norm_1), ("LayerNorm_2", blk.norm_2)):
            out[f"{b}{ln}/scale"], out[f"{b}{ln}/bias"] = layer.gamma, layer.beta
        for n in ("query", "key", "value", "out"):
            out[f"{a}{n}/kernel"], out[f"{a}{n}/bias"] = getattr(att, f"{n}_kernel"), getattr(att, f"{n}_bias")
        if att.relative_grid is not None:
            out[a + "relative_embedding"] = att.relative_embedding
        for j, dense in enumerate((blk.mlp.dense_0, blk.mlp.dense_1)):
            out[f"{b}MlpBlock_3/Dense_{j}/kernel"], out[f"{b}MlpBlock_3/Dense_{j}/bias"] = dense.kernel, dense.bias
    norm = model.get_layer("encoder_norm")
    out["Transformer/encoder_norm/scale"], out["Transformer/encoder_norm/bias"] = norm.gamma, norm.beta
    for name in ("pre_logits", "head"):
        if any(layer.name == name for layer in model.layers):
            dense = model.get_layer(name)
            out[f"{name}/kernel"], out[f"{name}/bias"] = dense.kernel, dense.bias
    return out


def model_arrays(model: keras.Model) -> Dict[str, np.ndarray]:
    """The model's weights as numpy arrays under canonical names (what save_npz writes)."""
    return {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in model_variables(model).items()}


def _split_posemb(n: int, model_prefix: int, grid: Tuple[int, int], big_vision: bool) -> int:
    """How many prefix (class-token) slots a checkpoint's n position embeddings have."""
    order = (0, 1) if big_vision else (model_prefix, 1 - model_prefix)
    for p in order:
        if n - p == grid[0] * grid[1]:
            return p
    for p in order:
        r = int(np.sqrt(max(n - p, 0)))
        if n - p > 0 and r * r == n - p:
            return p
    return order[0]


def _adapt(values: Dict[str, np.ndarray], target: Mapping[str, keras.Variable], cfg: ViTConfig, method: str,
           big_vision_posemb: bool, source_grid: Optional[Sequence[int]]) -> None:
    """Make checkpoint arrays fit the model where that is well defined: drop a head of another
    size (and pre-logits the model lacks), add the class slot, resample position embeddings."""
    if "head/kernel" in values and ("head/kernel" not in target or
                                    tuple(values["head/kernel"].shape) != tuple(target["head/kernel"].shape)):
        values.pop("head/kernel"), values.pop("head/bias", None)
    if "pre_logits/kernel" in values and "pre_logits/kernel" not in target:
        values.pop("pre_logits/kernel"), values.pop("pre_logits/bias", None)
    grid = cfg.grid_size
    prefix = 1 if cfg.classifier == "token" else 0
    if _POSEMB in values and _POSEMB in target:
        pe = values[_POSEMB]
        pe = pe[None] if pe.ndim == 2 else pe
        p = _split_posemb(pe.shape[1], prefix, grid, big_vision_posemb)
        if p == 0 and prefix == 1:  # big_vision adds E_pos before prepending x_class: a zero slot
            pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
            p = 1
        if p == prefix and pe.shape[1] - p != grid[0] * grid[1]:
            old = tuple(source_grid) if source_grid is not None else infer_grid(pe.shape[1] - p, grid)
            pe = resample_position_embeddings(pe, grid, p, old_grid=old, method=method)
        values[_POSEMB] = pe
    rows = "Transformer/posembed_input/row_embedding"
    if rows in values and rows in target:
        values[rows] = resample_1d(values[rows], grid[0], method)
        cols = "Transformer/posembed_input/col_embedding"
        if cols in values:
            values[cols] = resample_1d(values[cols], grid[1], method)
    for k in [k for k in values if k.endswith("/relative_embedding") and k in target]:
        want = tuple(target[k].shape)
        if tuple(values[k].shape) != want and values[k].ndim == 3 and values[k].shape[1:] == want[1:]:
            extra = 1 if prefix else 0
            old = (tuple(source_grid) if source_grid is not None
                   else relative_table_grid(values[k].shape[0] - extra, grid))
            values[k] = resample_relative_embedding(values[k], grid, prefix, old_grid=old, method=method)


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
    target = model_variables(model)
    values = dict(arrays)
    _adapt(values, target, cfg, method, big_vision_posemb, source_grid)
    # The head is the one part a checkpoint need not give: the model keeps its zero-initialised one.
    missing = sorted(set(target) - set(values) - {"head/kernel", "head/bias"})
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
    for k, var in target.items():
        if k in values:
            var.assign(values[k].astype(var.dtype))


def load_npz(model: keras.Model, path: PathLike, *, prefix: Optional[str] = None,
             method: str = "linear") -> keras.Model:
    """Load an official .npz checkpoint (path or published name) into a keras-vit model, in place.

    A head of another size is dropped (the model keeps its zero-initialised one), position
    embeddings are resampled to the model's grid with `method`. Returns the model.
    """
    local = checkpoint_path(path)
    arrays, big_vision_posemb = canonicalize(read_npz(local), prefix=prefix)
    assign_weights(model, arrays, method=method, big_vision_posemb=big_vision_posemb,
                   source=f"checkpoint {os.fspath(path)!r}")
    return model


def save_npz(model: keras.Model, path: PathLike) -> str:
    """Write the model's weights as an .npz in the vision_transformer layout (loadable by the
    official code and timm for the standard options); the file is written then renamed."""
    path = os.fspath(path)
    arrays = model_arrays(model)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} does not exist")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


__all__ = ["PUBLISHED", "Published", "checkpoint_path", "read_npz", "canonicalize", "model_variables",
           "model_arrays", "assign_weights", "load_npz", "save_npz"]
