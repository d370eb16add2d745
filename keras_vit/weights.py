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

timm and Hugging Face `.safetensors` files (the PyTorch layout) are brought to the same names
by `keras_vit.torch_layout`; `hf://ORG/NAME` fetches one from the Hugging Face Hub (cached).
A checkpoint also says what model it fits (`checkpoint_defaults`): the Published table for the
paper's names, the Hub's config.json, our own safetensors metadata, else its array shapes.

Loading is all-or-nothing: nothing is assigned unless every key and shape fits.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

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
log = logging.getLogger("keras_vit")
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

    @property
    def labels(self) -> Optional[str]:
        """The label set of the head: "imagenet1k", "imagenet21k" (ImageNet-21k, 21843 classes)."""
        return {1000: "imagenet1k", 21843: "imagenet21k"}.get(self.num_classes)


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
HF_PREFIX = "hf://"


def checkpoint_path(weights: PathLike) -> str:
    """A local checkpoint path for a path, a published name (downloaded once, cached by Keras) or
    `hf://ORG/NAME[/FILE]` (FILE defaults to model.safetensors; cached by huggingface_hub)."""
    path = os.fspath(weights)
    if os.path.isfile(path):
        return path
    if path.startswith(HF_PREFIX):
        return hub_file(path)
    entry = PUBLISHED.get(path)
    if entry is None:
        raise ValueError(f"weights {path!r} is neither an existing .npz or .safetensors file, hf://ORG/NAME "
                         f"nor a published checkpoint; published names: {', '.join(sorted(PUBLISHED))}")
    fname = entry.url.rsplit("/", 1)[-1]
    try:
        # KERAS_HOME read now, not at Keras' import, so a process can point the cache elsewhere.
        return keras.utils.get_file(fname=fname, origin=entry.url, cache_dir=os.environ.get("KERAS_HOME") or None,
                                    cache_subdir=os.path.join("models", "keras_vit"))
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is reported the same way
        raise ValueError(f"downloading checkpoint {path!r} from {entry.url} failed ({first_line(exc)}); "
                         "pass the path of a local .npz file instead") from None


def _hub_repo(spec: str) -> Tuple[str, str]:
    parts = spec[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"weights {spec!r}: expected hf://ORG/NAME or hf://ORG/NAME/FILE.safetensors")
    return "/".join(parts[:2]), "/".join(parts[2:]) or "model.safetensors"


def hub_file(spec: str, filename: Optional[str] = None, required: bool = True) -> Optional[str]:
    """The local (cached) path of a file of the Hugging Face model `hf://ORG/NAME[/FILE]`;
    one-line ValueError when huggingface_hub is missing, the Hub cannot be reached or the
    file is not there (None instead when not `required`)."""
    repo, default = _hub_repo(spec)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise ValueError(f"weights {spec!r} need huggingface_hub: pip install 'keras-vit[hub]'") from None
    name = filename or default
    try:
        return huggingface_hub.hf_hub_download(repo, name)
    except hf_errors.LocalEntryNotFoundError:
        if not required:
            return None
        raise ValueError(f"{spec!r}: {name} is not in the Hugging Face cache and the Hub cannot be reached "
                         "(offline?); fetch it once while online, or pass a local .safetensors file") from None
    except hf_errors.RepositoryNotFoundError:
        raise ValueError(f"{spec!r}: no such model on the Hugging Face Hub (or it is private/gated)") from None
    except hf_errors.EntryNotFoundError:
        if not required:
            return None
        raise ValueError(f"{spec!r}: the model has no {name} (only .safetensors files load without torch)") from None
    except Exception as exc:  # noqa: BLE001 - network and HTTP errors: one line
        if not required:
            return None
        raise ValueError(f"{spec!r}: downloading {name} failed ({first_line(exc)})") from None


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


def read_safetensors(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """All tensors of a .safetensors file as float32 NumPy arrays (bfloat16/float16 widened),
    and its string metadata."""
    path = os.fspath(path)
    try:
        from safetensors import safe_open
    except ImportError:
        raise ValueError(f"reading {path!r} needs the safetensors package: pip install safetensors") from None
    try:
        with safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: one line
        raise ValueError(f"could not read checkpoint {path!r} as a .safetensors file ({first_line(exc)})") from None
    return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" or "bfloat16" in str(v.dtype) else np.asarray(v)
            for k, v in arrays.items()}, meta


def _is_safetensors(path: str) -> bool:
    """By content: an 8-byte little-endian header length, then the JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


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


# --- what a checkpoint fits ----------------------------------------------------------------
# ViTConfig fields that describe the architecture (taken from a checkpoint only when the user
# names neither a variant nor a config) and those that describe its training data and head.
ARCHITECTURE_FIELDS = ("variant", "hidden_size", "mlp_dim", "num_heads", "num_layers", "patch_size",
                       "resnet_layers", "resnet_width")
_TIMM_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
_RESNET_DEPTH = {(3, 4, 9): 50, (3, 4, 6, 3): 50, (2, 2, 2, 2): 26}


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read once: its arrays in their own layout ("npz", "timm" or "hf") and
    `defaults`, the ViTConfig fields (and `class_names`) of the model it was trained as."""

    source: str
    path: str
    raw: Dict[str, np.ndarray]
    layout: str
    defaults: Dict[str, Any]

    def canonical(self, num_heads: Optional[int] = None, prefix: Optional[str] = None
                  ) -> Tuple[Dict[str, np.ndarray], bool]:
        """Arrays under canonical names and whether the position embeddings are big_vision's."""
        if self.layout == "npz":
            return canonicalize(self.raw, prefix=prefix)
        from keras_vit import torch_layout

        return torch_layout.to_canonical(self.raw, num_heads or self.defaults.get("num_heads") or 1), False


def _paper_variant(hidden: int, mlp: int, layers: int) -> Optional[str]:
    from keras_vit.config import VARIANTS

    for name, v in VARIANTS.items():
        if (v["hidden_size"], v["mlp_dim"], v["num_layers"]) == (hidden, mlp, layers):
            return name
    return None


def shape_defaults(arrays: Mapping[str, np.ndarray], big_vision_posemb: bool = False) -> Dict[str, Any]:
    """The ViTConfig fields that canonical arrays pin down: sizes, classes, pre-logits, classifier,
    image size (from a square position-embedding grid) and the paper's variant when one fits."""
    out: Dict[str, Any] = {}
    emb = arrays.get("embedding/kernel")
    if emb is None or emb.ndim != 4:
        return out
    ph, pw, _, hidden = (int(n) for n in emb.shape)
    out.update(hidden_size=hidden, patch_size=(ph, pw), classifier="token" if "cls" in arrays else "gap")
    layers = len({m[1] for k in arrays for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
    if layers:
        out["num_layers"] = layers
    dense0 = arrays.get("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel")
    if dense0 is not None:
        out["mlp_dim"] = int(dense0.shape[-1])
    q = arrays.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel")
    if q is not None and q.ndim == 3 and q.shape[1] > 1:
        out["num_heads"] = int(q.shape[1])
    stride = 1
    units: Dict[int, int] = {}
    for k in arrays:
        m = re.match(r"block(\d+)/unit(\d+)/", k)
        if m:
            units[int(m[1])] = max(units.get(int(m[1]), 0), int(m[2]))
    if units and "conv_root/kernel" in arrays:
        out["resnet_layers"] = tuple(units[s] for s in sorted(units))
        out["resnet_width"] = max(1, int(arrays["conv_root/kernel"].shape[-1]) // 64)
        stride = 4 * 2 ** (len(units) - 1)
    head = arrays.get("head/kernel")
    if head is not None:
        out["num_classes"] = int(head.shape[-1])
    pre = arrays.get("pre_logits/kernel")
    out["representation_size"] = None if pre is None else int(pre.shape[-1])
    pe = arrays.get(_POSEMB)
    if pe is not None:
        n = int(pe.shape[-2])
        n -= 1 if ("cls" in arrays and not big_vision_posemb and int(np.sqrt(n)) ** 2 != n) else 0
        g = int(round(np.sqrt(n)))
        if g * g == n:
            out["image_size"] = (g * ph * stride, g * pw * stride)
    size = _paper_variant(hidden, out.get("mlp_dim", -1), layers)
    if size is not None and ph == pw:
        depth = _RESNET_DEPTH.get(out.get("resnet_layers")) if "resnet_layers" in out else None
        if "resnet_layers" not in out or (depth is not None and out.get("resnet_width") == 1):
            out["variant"] = (f"R{depth}+" if depth else "") + f"{size}/{ph * stride}"
            from keras_vit.config import VARIANTS

            out.setdefault("num_heads", VARIANTS[size]["num_heads"])
    return out


def _timm_arch(name: str) -> Dict[str, Any]:
    """ViTConfig fields from a timm architecture name: vit_base_patch16_384, vit_base_r50_s16_384."""
    m = re.match(r"^vit_(tiny|small|base|large|huge)_patch(\d+)(?:_[a-z]+)?_(\d+)", name)
    if m:
        return dict(variant=f"{_TIMM_SIZES[m[1]]}/{m[2]}", image_size=int(m[3]))
    m = re.match(r"^vit_(tiny|small|base|large|huge)_r(26|50)_s(\d+)_(\d+)", name)
    if m:
        return dict(variant=f"R{m[2]}+{_TIMM_SIZES[m[1]]}/{m[3]}", image_size=int(m[4]))
    return {}


def hub_defaults(config: Mapping[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    """ViTConfig fields and class names from a Hub config.json (timm's or transformers')."""
    out: Dict[str, Any] = {}
    names = None
    if "architecture" in config:  # timm
        out.update(_timm_arch(str(config["architecture"])))
        pre = config.get("pretrained_cfg") or {}
        size = pre.get("input_size") or config.get("input_size")
        if isinstance(size, (list, tuple)) and len(size) == 3:
            out["image_size"] = (int(size[1]), int(size[2]))
        names = config.get("label_names") or pre.get("label_names")
        if not names and num_classes in (1000, 21843):  # timm's ImageNet heads, in the usual order
            from keras_vit.labels import imagenet_labels

            names = imagenet_labels("imagenet1k" if num_classes == 1000 else "imagenet21k")
        mean, std = pre.get("mean"), pre.get("std")
        if mean is not None and std is not None and (not np.allclose(mean, 0.5) or not np.allclose(std, 0.5)):
            log.warning("checkpoint expects inputs normalised with mean %s / std %s; keras-vit models rescale "
                        "[0, 255] to [-1, 1] (mean 0.5, std 0.5), so logits will differ from timm's", mean, std)
    if "num_attention_heads" in config:  # transformers ViTConfig
        for ours, theirs in (("hidden_size", "hidden_size"), ("num_heads", "num_attention_heads"),
                             ("num_layers", "num_hidden_layers"), ("mlp_dim", "intermediate_size"),
                             ("layer_norm_epsilon", "layer_norm_eps")):
            if theirs in config:
                out[ours] = config[theirs]
        if "image_size" in config:
            out["image_size"] = config["image_size"]
        if config.get("hidden_act") in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            out["gelu_approximate"] = config["hidden_act"] != "gelu"
        id2label = config.get("id2label") or {}
        try:
            names = [id2label[k] for k in sorted(id2label, key=int)]
        except (TypeError, ValueError):
            names = None
    if names and num_classes is not None and len(names) == num_classes:
        out["class_names"] = [str(n) for n in names]
    return out


def read_checkpoint(weights: PathLike) -> Checkpoint:
    """Read a checkpoint (an .npz or .safetensors path, a published name or hf://ORG/NAME) and
    what it says about its model: the Published table, the Hub's config.json, the metadata
    keras-vit writes, else the array shapes."""
    from keras_vit import torch_layout

    spec = os.fspath(weights)
    local = checkpoint_path(spec)
    file_meta: Dict[str, str] = {}
    if local.endswith(".safetensors") or _is_safetensors(local):
        raw, file_meta = read_safetensors(local)
        layout = torch_layout.detect(raw)
        if not layout:
            raise ValueError(f"checkpoint {spec!r} is a .safetensors file but not a timm or Hugging Face ViT "
                             "(no patch_embed.proj / embeddings.patch_embeddings tensors)")
    else:
        raw, layout = read_npz(local), "npz"
    ckpt = Checkpoint(spec, local, raw, layout, {})
    arrays, big_vision_posemb = ckpt.canonical(num_heads=1)
    defaults = shape_defaults(arrays, big_vision_posemb)
    if layout != "npz":  # heads are not in the fused torch shapes; timm and transformers use exact GELU
        defaults.pop("num_heads", None)
        defaults["gelu_approximate"] = False
    if spec.startswith(HF_PREFIX):
        cfg_path = hub_file(spec, "config.json", required=False)
        if cfg_path:
            try:
                with open(cfg_path) as f:
                    defaults.update(hub_defaults(json.load(f), defaults.get("num_classes")))
            except (OSError, ValueError):
                pass
    if "keras_vit" in file_meta:  # written by save_safetensors: the exact config
        try:
            ours = json.loads(file_meta["keras_vit"])
            defaults.update({k: v for k, v in ours.get("config", {}).items() if k != "include_top"})
            if ours.get("class_names"):
                defaults["class_names"] = list(ours["class_names"])
        except (ValueError, AttributeError):
            pass
    entry = PUBLISHED.get(spec)
    if entry is not None:
        defaults.update(variant=entry.variant, image_size=entry.image_size, num_classes=entry.num_classes,
                        representation_size=entry.representation_size)
        if entry.labels:
            from keras_vit.labels import imagenet_labels

            defaults["class_names"] = imagenet_labels(entry.labels)
    if "variant" in defaults and "num_heads" not in defaults:
        from keras_vit.config import parse_variant

        try:
            defaults["num_heads"] = parse_variant(defaults["variant"]).num_heads
        except ValueError:
            defaults.pop("variant")
    ckpt.defaults = defaults
    return ckpt


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
        for n in ("query", "key", "value", "out"):
            out[f"{a}{n}/kernel"], out[f"{a}{n}/bias"] = getattr(att, f"{n}_kernel"), getattr(att, f"{n}_bias")
        if att.relative_grid is not None:
            out[a + "relative_embedding"] = att.relative_embedding
        for j, dense in enumerate((blk.mlp.dense_0, blk.mlp.dense_1)):
            out[f"{b}MlpBlock_3/Dense_{j}/kernel"], out[f"{b}MlpBlock_3/Dense_{j}/bias"] = dense.kernel, dense.bias
    if "encoder_norm" in names:
        norm = model.get_layer("encoder_norm")
        out["Transformer/encoder_norm/scale"], out["Transformer/encoder_norm/bias"] = norm.gamma, norm.beta
    for name in ("pre_logits", "head"):
        if name in names:
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
    if "head/kernel" in values and ("head/kernel" not in target or
                                    tuple(values["head/kernel"].shape) != tuple(target["head/kernel"].shape)):
        if "head/kernel" in target:
            log.info("%s: head of %d classes not loaded (the model has %d)", source,
                     values["head/kernel"].shape[-1], target["head/kernel"].shape[-1])
        values.pop("head/kernel"), values.pop("head/bias", None)
    first = "conv_root/kernel" if "conv_root/kernel" in target else "embedding/kernel"
    if first in values and first in target and values[first].ndim == 4:
        have, want = values[first].shape, tuple(target[first].shape)
        if have[2] != want[2] and have[:2] == want[:2] and have[3] == want[3]:
            values[first] = adapt_input_conv(values[first], want[2])
    if "pre_logits/kernel" in values and "pre_logits/kernel" not in target:
        values.pop("pre_logits/kernel"), values.pop("pre_logits/bias", None)
    if cfg.feature_layers is not None or cfg.output is not None:  # features: later layers are not built
        later = re.compile(r"^Transformer/(encoder_norm/|encoderblock_(\d+)/)")
        for k in [k for k in values if later.match(k) and k not in target]:
            m = later.match(k)
            if m[2] is None or int(m[2]) < cfg.num_layers:
                values.pop(k)
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
            log.warning("%s: position embeddings resampled from a %dx%d to a %dx%d grid (%s) for image_size %dx%d",
                        source, old[0], old[1], grid[0], grid[1], method, *cfg.image_size)
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
    _adapt(values, target, cfg, method, big_vision_posemb, source_grid, source)
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


def warn_untrained_head(model: keras.Model, arrays: Mapping[str, np.ndarray], source: str) -> None:
    """One log line when a checkpoint leaves the model's head untrained: it has none, or an all-zero
    one of the model's size (the ImageNet-21k pre-training checkpoints)."""
    if not any(layer.name == "head" for layer in model.layers):
        return
    head = arrays.get("head/kernel")
    if head is None:
        log.warning("%s has no classification head: the model's head is untrained (zeros); "
                    "fine-tune it, or build with include_top=False for features", source)
    elif head.shape[-1] == get_config(model).num_classes and not np.any(head) and not np.any(arrays.get("head/bias", 0)):
        log.warning("%s has an all-zero head (a pre-training checkpoint): the head is untrained; "
                    "fine-tune it, or build with include_top=False for features", source)


def load_weights(model: keras.Model, weights: PathLike, *, prefix: Optional[str] = None,
                 method: str = "linear") -> keras.Model:
    """Load a checkpoint (.npz, timm/Hugging Face .safetensors, published name or hf://ORG/NAME)
    into a keras-vit model, in place; returns the model.

    A head of another size is dropped (the model keeps its zero-initialised one), the input
    kernel is adapted to the model's channels, position embeddings are resampled to the
    model's grid with `method`.
    """
    ckpt = read_checkpoint(weights)
    arrays, big_vision_posemb = ckpt.canonical(num_heads=get_config(model).num_heads, prefix=prefix)
    assign_weights(model, arrays, method=method, big_vision_posemb=big_vision_posemb,
                   source=f"checkpoint {ckpt.source!r}")
    warn_untrained_head(model, arrays, f"checkpoint {ckpt.source!r}")
    return model


def load_npz(model: keras.Model, path: PathLike, *, prefix: Optional[str] = None,
             method: str = "linear") -> keras.Model:
    """Load an official .npz checkpoint (path or published name) into a keras-vit model, in place
    (any format `load_weights` reads is accepted). Returns the model."""
    return load_weights(model, path, prefix=prefix, method=method)


def _check_folder(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path!r}: folder {folder!r} does not exist")


def save_npz(model: keras.Model, path: PathLike) -> str:
    """Write the model's weights as an .npz in the vision_transformer layout (loadable by the
    official code and timm for the standard options); the file is written then renamed."""
    path = os.fspath(path)
    arrays = model_arrays(model)
    _check_folder(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def save_safetensors(model: keras.Model, path: PathLike) -> str:
    """Write the model's weights as a .safetensors file in timm's VisionTransformer layout (fused
    qkv, PyTorch (out, in) kernels), with the keras-vit config and class names as metadata so
    `ViT(weights=path)` rebuilds the same model; written then renamed."""
    from keras_vit import torch_layout

    cfg = get_config(model)
    if cfg.pos_embedding not in ("learned", "none", "sincos2d"):
        raise ValueError(f"pos_embedding {cfg.pos_embedding!r} has no timm equivalent; "
                         "save this model with keras_vit.save_npz instead")
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ValueError("save_safetensors needs the safetensors package: pip install safetensors") from None
    tensors = torch_layout.to_timm({k: v.astype(np.float32) for k, v in model_arrays(model).items()})
    names = getattr(model, "class_names", None)
    meta = {"format": "pt",
            "keras_vit": json.dumps({"config": cfg.to_dict(), "class_names": list(names) if names else None})}
    path = os.fspath(path)
    _check_folder(path)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return path


def check_variant(weights: PathLike, variant: Optional[str]) -> None:
    """ValueError when a published checkpoint's variant is not `variant` (checked before downloading)."""
    spec = os.fspath(weights)
    entry = PUBLISHED.get(spec) if not os.path.isfile(spec) else None
    if entry is not None and variant is not None and variant != entry.variant:
        raise ValueError(f"checkpoint {spec!r} is a {entry.variant} model; "
                         f"build it with variant={entry.variant!r}, not {variant!r}")


__all__ = ["PUBLISHED", "Published", "Checkpoint", "checkpoint_path", "hub_file", "read_npz", "read_safetensors",
           "read_checkpoint", "shape_defaults", "canonicalize", "model_variables", "model_arrays",
           "adapt_input_conv", "assign_weights", "warn_untrained_head", "load_weights", "load_npz", "save_npz", "save_safetensors",
           "check_variant", "ARCHITECTURE_FIELDS"]
