"""Checkpoints by name and by file: the published table, the Hugging Face Hub, reading .npz and
.safetensors files, and what a checkpoint says about the model it fits (`read_checkpoint`).

A checkpoint says what model it fits: the Published table for the paper's names, the Hub's
config.json, our own safetensors metadata, else its array shapes (`npz_layout.shape_defaults`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import socket
import zipfile
import zlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse
from urllib.request import getproxies

import keras
import numpy as np

from keras_vit.config import ViTConfig, _pair, parse_variant
from keras_vit.errors import first_line
from keras_vit.labels import imagenet_labels
from keras_vit.weights import hf_layout, torch_layout
from keras_vit.weights.npz_layout import METADATA_KEY, canonicalize, shape_defaults
from keras_vit.weights.presets import FAMILY, PUBLISHED, Published  # noqa: F401 - re-exported

PathLike = Union[str, os.PathLike]
log = logging.getLogger("keras_vit")


# --- files ------------------------------------------------------------------------------
HF_PREFIX = "hf://"


def checkpoint_path(weights: PathLike) -> str:
    """A local checkpoint path for a path, a published name (downloaded once, cached by Keras) or
    `hf://ORG/NAME[/FILE]` (FILE defaults to model.safetensors; cached by huggingface_hub)."""
    path = os.fspath(weights)
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):  # a downloaded Hub model: config.json beside model.safetensors
        local = os.path.join(path, "model.safetensors")
        if not os.path.isfile(local):
            raise ValueError(f"weights folder {path!r} has no model.safetensors")
        return local
    if path.startswith(HF_PREFIX):
        return hub_file(path)
    entry = PUBLISHED.get(path)
    if entry is not None and entry.url.startswith(HF_PREFIX):
        return hub_file(entry.url)
    if entry is None:
        raise ValueError(f"weights {path!r} is neither an existing .npz or .safetensors file, hf://ORG/NAME "
                         f"nor a published checkpoint; published names: {', '.join(sorted(PUBLISHED))}")
    return _download(path, entry.url)


def _download(name: str, url: str) -> str:
    """The cached file of `url` (Keras' cache, KERAS_HOME/models/keras_vit), downloaded once: to a
    name of this process's own, renamed into place when whole, so a download killed midway or one
    running in another process never leaves a cut-short file under the cached name."""
    fname = url.rsplit("/", 1)[-1]
    # KERAS_HOME read now, not at Keras' import, so a process can point the cache elsewhere.
    cache_dir = os.path.expanduser(os.environ.get("KERAS_HOME") or os.path.join("~", ".keras"))
    folder = os.path.join(cache_dir, "models", "keras_vit")
    final = os.path.join(folder, fname)
    if os.path.isfile(final):
        return final
    part = f".{fname}.part-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        got = keras.utils.get_file(fname=part, origin=url, cache_dir=cache_dir,
                                   cache_subdir=os.path.join("models", "keras_vit"))
        os.replace(got, final)
    except Exception as exc:  # noqa: BLE001 - any failure to fetch is reported the same way
        raise ValueError(f"downloading checkpoint {name!r} from {url} failed ({first_line(exc)}); "
                         "pass the path of a local .npz file instead") from None
    finally:
        if os.path.exists(os.path.join(folder, part)):
            os.remove(os.path.join(folder, part))
    return final


def is_checkpoint(spec: PathLike) -> bool:
    """Whether `spec` names a checkpoint (a published name, hf://ORG/NAME, an .npz or .safetensors
    file, a model folder with model.safetensors) rather than a .keras model or a run folder."""
    spec = os.fspath(spec)
    return (spec in PUBLISHED or spec.startswith(HF_PREFIX)
            or (os.path.isfile(spec) and spec.endswith((".npz", ".safetensors")))
            or os.path.isfile(os.path.join(spec, "model.safetensors")))


def _hub_repo(spec: str) -> Tuple[str, str]:
    parts = spec[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"weights {spec!r}: expected hf://ORG/NAME or hf://ORG/NAME/FILE.safetensors")
    return "/".join(parts[:2]), "/".join(parts[2:]) or "model.safetensors"


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether the Hub's host takes a TCP connection (or a proxy is set, which then decides). Offline,
    huggingface_hub tries each file five times over about 25 s, with a warning a try, before it looks in its
    cache; a cached file is read at once instead, and a missing one is one line."""
    if any(getproxies().get(scheme) for scheme in ("https", "http", "all")):  # the *_proxy variables, either case
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


def hub_file(spec: str, filename: Optional[str] = None, required: bool = True) -> Optional[str]:
    """The local (cached) path of a file of the Hugging Face model `hf://ORG/NAME[/FILE]`;
    one-line ValueError when huggingface_hub is missing, the Hub cannot be reached or the
    file is not there (None instead when not `required`)."""
    repo, default = _hub_repo(spec)
    try:
        import huggingface_hub
        from huggingface_hub import constants as hf_constants
        from huggingface_hub import errors as hf_errors
    except ImportError:
        raise ValueError(f"weights {spec!r} need huggingface_hub: pip install 'keras-vit[hub]'") from None
    name = filename or default
    try:
        offline = hf_constants.HF_HUB_OFFLINE or not hub_reachable(hf_constants.ENDPOINT)
        return huggingface_hub.hf_hub_download(repo, name, local_files_only=offline)
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
    """All weight arrays of an .npz file (never unpickles; keras-vit's metadata entry left out)."""
    return _read_npz(path)[0]


_PICKLE = "a PyTorch pickle"


def _is_pickle(path: str) -> bool:
    """Whether the file starts as a pickle does (protocol 2 and later: 0x80, the protocol number)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _read_npz(path: PathLike) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """An .npz file's weight arrays, and the metadata save_npz wrote in it ({"keras_vit": JSON},
    as a .safetensors file's; empty for official checkpoints)."""
    path = os.fspath(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):  # a lone .npy array under an .npz name
            raise ValueError("one array, not an .npz archive")
        if any(name.endswith("data.pkl") for name in loaded.files):  # torch.save's zip archive
            loaded.close()
            raise ValueError(_PICKLE)
        with loaded as f:
            arrays = {k: _recover_dtype(np.asarray(f[k])) for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # cut short, a bad CRC ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if msg == _PICKLE or _is_pickle(path):  # torch.save's zip archive, or its legacy pickle
            raise ValueError(f"checkpoint {path!r} is a PyTorch pickle (torch.save: .pth, .pt, .bin), which "
                             "keras-vit never unpickles; save its state dict as .safetensors (safetensors.torch."
                             "save_file(torch.load(path), 'model.safetensors')) and load that") from None
        if "pickled" in msg:  # NumPy's word for any file that is neither a zip nor an .npy array
            msg = "not an .npz archive, nor a .safetensors file"
        raise ValueError(f"could not read checkpoint {path!r} as an .npz file ({msg})") from None
    entry = arrays.pop(METADATA_KEY, None)
    meta = {"keras_vit": str(entry[()])} if entry is not None and entry.dtype.kind == "U" and entry.ndim == 0 else {}
    return arrays, meta


def _recover_dtype(a: np.ndarray) -> np.ndarray:
    """bfloat16 as float32: np.savez stores JAX's bfloat16 arrays as 2-byte voids ('|V2'), which
    big_vision's own reader views as bfloat16 again (big_vision.utils.recover_dtype)."""
    if a.dtype == np.dtype("V2"):
        import ml_dtypes

        return a.view(ml_dtypes.bfloat16).astype(np.float32)
    return a


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


# --- what a checkpoint fits ----------------------------------------------------------------
# ViTConfig fields that describe the architecture (taken from a checkpoint only when the user
# names neither a variant nor a config).
ARCHITECTURE_FIELDS = ("variant", "hidden_size", "mlp_dim", "num_heads", "num_layers", "patch_size",
                       "resnet_layers", "resnet_width")
_TIMM_SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read once: its arrays in their own layout ("npz", "timm" or "hf") and
    `defaults`, the ViTConfig fields (and `class_names`) of the model it was trained as."""

    source: str
    path: str
    raw: Dict[str, np.ndarray]
    layout: str
    defaults: Dict[str, Any]
    no_embed_class: Optional[bool] = None  # a timm pos_embed without the prefix tokens' rows (None: from its shape)

    @property
    def grid(self) -> Optional[Tuple[int, int]]:
        """The patch grid of the model the checkpoint was trained as, when its defaults tell it (its
        image size, patch size and ResNet stages); None when they do not."""
        fields = {k: self.defaults[k] for k in ("image_size", "patch_size", "resnet_layers", "patch_remainder")
                  if self.defaults.get(k) is not None}
        if "image_size" not in fields:
            return None
        try:
            if "patch_size" not in fields and self.defaults.get("variant"):
                named = parse_variant(self.defaults["variant"])
                fields.setdefault("patch_size", named.patch_size)
                fields.setdefault("resnet_layers", named.resnet_layers)
            return tuple(ViTConfig(**fields).grid_size) if "patch_size" in fields else None
        except (TypeError, ValueError):
            return None

    @property
    def resample_method(self) -> str:
        """How the checkpoint's model resamples its position embeddings to another grid: the
        pos_interpolation keras-vit's own metadata records, else its own code's way (layout_method)."""
        return self.defaults.get("pos_interpolation") or self.layout_method

    @property
    def layout_method(self) -> str:
        """How the checkpoint's own code resamples its position embeddings to another grid:
        timm's bicubic with antialias (resample_abs_pos_embed), transformers' interpolate_pos_encoding
        for its ViT family and ViTModel (hf_layout.resample_method: bicubic), else the official "linear"."""
        if self.layout in hf_layout.LAYOUTS or self.layout == "hf":
            return hf_layout.resample_method(self.raw, self.layout)
        return "bicubic_antialias" if self.layout == "timm" else "linear"

    def canonical(self, num_heads: Optional[int] = None, prefix: Optional[str] = None
                  ) -> Tuple[Dict[str, np.ndarray], bool]:
        """Arrays under canonical names and whether the position embeddings are big_vision's."""
        if self.layout == "npz":
            return canonicalize(self.raw, prefix=prefix)
        try:
            return hf_layout.any_to_canonical(self.raw, num_heads or self.defaults.get("num_heads") or 1,
                                              no_embed_class=self.no_embed_class), False
        except ValueError as exc:  # e.g. a width the model's heads do not divide: say which file
            raise ValueError(f"checkpoint {self.source!r}: {exc}") from None


# Heads of timm's size names beyond the paper's (the sizes themselves come from the arrays).
_TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16,
               "so150m": 14, "so150m2": 13, "so400m": 16}  # the shape-optimised SoViT-150M (v1, v2) and SigLIP So400m
_TIMM_POOL = {"token": "token", "avg": "gap", "map": "map"}
_TIMM_SIZE_ARGS = ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")


def _timm_arch(name: str, tag: str = "") -> Dict[str, Any]:
    """ViTConfig fields from a timm architecture name (and pretrained tag): vit_base_patch16_384,
    vit_base_r50_s16_384, and the family: deit_*_distilled_*, deit3_*, vit_*_dinov2, vit_*_reg4_dinov2,
    vit_*_clip[_quickgelu]_* (quick_gelu also for the `openai` tag), vit_*_siglip[_gap]_*, and the heads
    of the shape-optimised sizes (vit_so400m_patch14_siglip_384, vit_so150m_patch16_reg4_map_256)."""
    m = re.match(r"^vit_(tiny|small|base|large|huge)_r(26|50)_s(\d+)_(\d+)", name)
    if m:
        return dict(variant=f"R{m[2]}+{_TIMM_SIZES[m[1]]}/{m[3]}", image_size=int(m[4]))
    m = re.match(r"^(vit|deit|deit3)_(tiny|small|medium|base|large|huge|giant|so150m2?|so400m)_(?:.*_)?patch(\d+)(?:_(.*))?$",
                 name)
    if not m:
        return {}
    family, size, patch, rest = m[1], m[2], int(m[3]), m[4] or ""
    words = set(name.split("_"))
    out: Dict[str, Any] = {}
    if size in _TIMM_SIZES:
        out["variant"] = f"{_TIMM_SIZES[size]}/{patch}"
    else:
        out.update(num_heads=_TIMM_HEADS[size], patch_size=patch)
    res = re.search(r"(?:^|_)(\d+)$", rest)
    if res:
        out["image_size"] = int(res[1])
    if family == "deit" and "distilled" in words:
        out["distilled"] = True
    if family == "deit3":
        out["layer_scale_init"] = 1e-6
    if "dinov2" in words:
        out["layer_scale_init"] = 1e-5
        out.setdefault("image_size", 518)
    reg = re.search(r"(?:^|_)reg(\d+)(?:_|$)", rest)
    if reg:
        out["num_registers"] = int(reg[1])
    if "clip" in words:
        out.update(pre_norm=True, layer_norm_epsilon=1e-5)  # torch's nn.LayerNorm default
        if "quickgelu" in words or tag.startswith("openai"):
            out["activation"] = "quick_gelu"
    if "siglip" in words:
        out["classifier"] = "gap" if "gap" in words else "map"
        out["class_token"] = False
    return out


def _timm_pool(global_pool: Any, include_prefix: Any = None) -> Optional[str]:
    """keras-vit's classifier for timm's global_pool ("token", "avg", "map"; None when not said);
    ValueError for a pooling keras-vit does not compute (max, avgmax; avg over the prefix tokens too),
    rather than a model that pools otherwise."""
    if global_pool in (None, ""):
        return None
    pool = _TIMM_POOL.get(global_pool)
    if pool is None:
        raise ValueError(f"timm's global_pool={global_pool!r} is not a keras-vit classifier; it loads timm's "
                         f"{', '.join(repr(k) for k in _TIMM_POOL)} (as {', '.join(_TIMM_POOL.values())})")
    if pool == "gap" and include_prefix:
        raise ValueError("timm's global_pool='avg' with pool_include_prefix=True (the class token averaged with "
                         "the patches) is not a keras-vit classifier; 'gap' averages the patch tokens")
    return pool


def _timm_model_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """ViTConfig fields from the `model_args` of a timm config.json (timm's VisionTransformer
    arguments); the sizes themselves come from the arrays."""
    out: Dict[str, Any] = {}
    if "num_heads" in args:
        out["num_heads"] = int(args["num_heads"])
    if "img_size" in args:
        out["image_size"] = args["img_size"]
    pool = _timm_pool(args.get("global_pool"), args.get("pool_include_prefix"))
    if pool:
        out["classifier"] = pool
        if pool != "token" and args.get("class_token", True):
            out["class_token"] = True  # the arrays have the last word (_class_token_of_arrays)
    if args.get("class_token") is False:
        out["class_token"] = False
    for arg, field in (("reg_tokens", "num_registers"), ("init_values", "layer_scale_init"), ("qk_norm", "qk_norm"),
                       ("pre_norm", "pre_norm"), ("fc_norm", "fc_norm")):
        if args.get(arg):
            out[field] = args[arg]
    if args.get("qkv_bias") is False:
        out["qkv_bias"] = False
    if "pool_include_prefix" in args:
        out["pool_include_prefix"] = bool(args["pool_include_prefix"])
    act = args.get("act_layer")
    if act == "quick_gelu":
        out["activation"] = "quick_gelu"
    elif act in ("gelu", "gelu_tanh"):
        out["gelu_approximate"] = act == "gelu_tanh"
    return out


def _timm_defaults(config: Mapping[str, Any]) -> Dict[str, Any]:
    """ViTConfig fields from a timm config.json: the architecture name, `model_args` and the
    pretrained config's input size and normalisation."""
    pre = config.get("pretrained_cfg") or {}
    out = _timm_arch(str(config["architecture"]), str(pre.get("tag") or ""))
    args = config.get("model_args") or {}
    if any(k in args for k in _TIMM_SIZE_ARGS):  # sizes of their own: the name's variant, patch and heads do not apply
        for key in ("variant", "patch_size", "num_heads"):
            out.pop(key, None)
    pool = _timm_pool(config.get("global_pool"), args.get("pool_include_prefix"))
    if pool:
        out["classifier"] = pool
    out.update(_timm_model_args(args))
    size = pre.get("input_size") or config.get("input_size")
    if isinstance(size, (list, tuple)) and len(size) == 3:
        out["image_size"] = (int(size[1]), int(size[2]))
    mean, std = pre.get("mean"), pre.get("std")
    if mean is not None and std is not None and (not np.allclose(mean, 0.5) or not np.allclose(std, 0.5)):
        out["pixel_mean"], out["pixel_std"] = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return out


def hub_defaults(config: Mapping[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    """ViTConfig fields and class names from a Hub config.json (timm's or transformers')."""
    out: Dict[str, Any] = {}
    names = None
    if "architecture" in config:  # timm
        out.update(_timm_defaults(config))
        pre = config.get("pretrained_cfg") or {}
        names = config.get("label_names") or pre.get("label_names")
        if not names and num_classes in (1000, 21843):  # timm's ImageNet heads, in the usual order
            names = imagenet_labels("imagenet1k" if num_classes == 1000 else "imagenet21k")
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
    out.update(hf_layout.config_fields(config))  # the family: DINOv2, CLIP, SigLIP, DeiT (their vision towers)
    if names and num_classes is not None and len(names) == num_classes:
        out["class_names"] = [str(n) for n in names]
    return out


def _read_arrays(spec: str, local: str) -> Tuple[Dict[str, np.ndarray], str, Dict[str, str], Dict[str, Any]]:
    """The file's arrays, their layout ("npz", "timm" or "hf"), the metadata keras-vit wrote in it and
    what the layout itself says of the model (OpenAI CLIP's activation, epsilon and normalisation)."""
    if not ((local.endswith(".safetensors") and not zipfile.is_zipfile(local)) or _is_safetensors(local)):
        # an .npz is a zip archive whatever its name (save_npz(model, "m.safetensors") writes one)
        arrays, file_meta = _read_npz(local)
        return arrays, "npz", file_meta, {}
    raw, file_meta = read_safetensors(local)
    raw, source = torch_layout.image_tower(raw)
    raw = hf_layout.vision_model_names(raw)
    layout = hf_layout.layout_of(raw)
    if not layout:
        if torch_layout.text_tower(raw):
            raise ValueError(f"checkpoint {spec!r} holds a CLIP text tower (text_model.* or transformer.resblocks.* "
                             "without visual.*), not an image model; load the image tower's weights")
        raise ValueError(f"checkpoint {spec!r} is a .safetensors file but not a timm or Hugging Face ViT, DeiT, "
                         "DINOv2, CLIP or SigLIP vision model (no patch_embed.proj / patch_embedding tensors)")
    return raw, layout, file_meta, dict(torch_layout.OPENAI_CLIP_DEFAULTS) if source == "openai_clip" else {}


def _described_defaults(spec: str, local: str, file_meta: Mapping[str, str],
                        num_classes: Optional[int]) -> Dict[str, Any]:
    """What the files beside the arrays say: the Hub's config.json (of an hf:// model, or next to
    a local .safetensors file, as timm and transformers save them), then keras-vit's own
    .npz / .safetensors metadata, then the Published table (later ones win)."""
    defaults: Dict[str, Any] = {}
    config = _side_json(spec, local, "config.json")
    if config is not None:
        try:
            defaults.update(hub_defaults(config, num_classes))
        except ValueError as exc:  # a model keras-vit does not compute (timm's max pooling ...)
            raise ValueError(f"checkpoint {spec!r}: {exc}") from None
    preprocessor = _side_json(spec, local, "preprocessor_config.json")
    if preprocessor is not None:
        defaults.update(hf_layout.preprocessing_fields(preprocessor))
    if "keras_vit" in file_meta:  # written by save_npz / save_safetensors: the exact config
        try:
            ours = json.loads(file_meta["keras_vit"])
            saved = ours.get("config", {})
            defaults.update({k: v for k, v in saved.items() if k != "include_top"})
            if saved.get("include_top") is False:  # a headless model's file rebuilds it headless (num_classes= adds one)
                defaults["include_top"] = False
            if ours.get("class_names"):
                defaults["class_names"] = list(ours["class_names"])
        except (ValueError, AttributeError):
            pass
    entry = PUBLISHED.get(spec)
    if entry is not None:
        defaults.update(entry.defaults())
        if entry.labels:
            defaults["class_names"] = imagenet_labels(entry.labels)
    return defaults


def _side_json(spec: str, local: str, name: str) -> Optional[Dict[str, Any]]:
    """A JSON file of the Hub model `hf://ORG/NAME`, or beside a local .safetensors file (a model
    folder, as timm and transformers save them); None when there is none or it does not parse."""
    if spec.startswith(HF_PREFIX):
        path = hub_file(spec, name, required=False)
    elif local.endswith(".safetensors"):
        path = os.path.join(os.path.dirname(local), name)
    else:
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


_ONCE: List[Dict[Tuple[Any, ...], Checkpoint]] = []  # the open reading_once() scopes' last checkpoint


@contextlib.contextmanager
def reading_once() -> Iterator[None]:
    """Within this scope a checkpoint file read again, unchanged, is not read again: a training run
    asks its checkpoint for the model's size, its config (several times) and its weights. The arrays
    of the last checkpoint read are held until the scope ends."""
    _ONCE.append({})
    try:
        yield
    finally:
        _ONCE.pop()


def read_checkpoint(weights: PathLike) -> Checkpoint:
    """Read a checkpoint (an .npz or .safetensors path, a published name or hf://ORG/NAME) and
    what it says about its model: the Published table, the Hub's config.json, the metadata
    keras-vit writes, else the array shapes (once per unchanged file inside `reading_once()`)."""
    spec = os.fspath(weights)
    if spec.endswith(".keras") and os.path.isfile(spec):  # a zip, which np.load would read as an .npz of 3 files
        raise ValueError(f"{spec!r} is a Keras model (.keras), not a checkpoint: load it with "
                         "keras_vit.load_model(path), or train from it with vitcli train --weights "
                         "(keras_vit.train.load_initial_weights)")
    local = checkpoint_path(spec)
    if not _ONCE:
        return _read_checkpoint(spec, local)
    stat = os.stat(local)
    key = (spec, os.path.realpath(local), stat.st_mtime_ns, stat.st_size)
    held = _ONCE[0]
    if key not in held:
        held.clear()  # one checkpoint's arrays at a time
        held[key] = _read_checkpoint(spec, local)
    return held[key]


def _read_checkpoint(spec: str, local: str) -> Checkpoint:
    """read_checkpoint's work: the arrays of `local` (the file of `spec`) and their model's defaults."""
    raw, layout, file_meta, layout_defaults = _read_arrays(spec, local)
    ckpt = Checkpoint(spec, local, raw, layout, {})
    ckpt.defaults = _checkpoint_defaults(ckpt, file_meta, layout_defaults)
    rows = raw.get("pos_embed")
    grid = ckpt.grid
    if layout == "timm" and rows is not None and grid is not None and np.ndim(rows) == 3:
        # The image size the files beside it say settles whether the table has the class token's row: a
        # (g-1)x(g+1) grid plus that row is a square, which the shape alone reads as a g x g table without it.
        without = int(np.shape(rows)[1]) == grid[0] * grid[1]
        if without != _no_embed_class_by_shape(ckpt):
            ckpt.no_embed_class = without
            ckpt.defaults = _checkpoint_defaults(ckpt, file_meta, layout_defaults)
    return ckpt


def _no_embed_class_by_shape(ckpt: Checkpoint) -> bool:
    """Whether torch_layout reads a timm pos_embed's shape as holding no prefix rows."""
    raw = ckpt.raw
    prefix = int("cls_token" in raw) + int("dist_token" in raw)
    regs = int(np.shape(raw["reg_token"])[1]) if "reg_token" in raw else 0
    table = np.zeros((1, int(np.shape(raw["pos_embed"])[1]), 1), np.float32)
    return torch_layout.timm_pos_embed(table, prefix, regs).shape[1] != table.shape[1]


def _checkpoint_defaults(ckpt: Checkpoint, file_meta: Mapping[str, str], layout_defaults: Mapping[str, Any]
                         ) -> Dict[str, Any]:
    """The ViTConfig fields (and class_names) a checkpoint's arrays and the files beside it give."""
    spec, local, raw, layout = ckpt.source, ckpt.path, ckpt.raw, ckpt.layout
    arrays, big_vision_posemb = ckpt.canonical(num_heads=1)
    defaults = shape_defaults(arrays, big_vision_posemb)
    if layout != "npz":  # timm and transformers use exact GELU; heads are not in the fused torch
        defaults["gelu_approximate"] = False  # shapes (qk-norm's width gives them)
        if not defaults.get("qk_norm"):
            defaults.pop("num_heads", None)
    if layout in hf_layout.LAYOUTS:  # what the family's tensor names say (options, a headless backbone)
        defaults.update(hf_layout.layout_fields(raw, layout, arrays))
    if layout == "timm" and defaults.get("classifier") == "map" and ("cls" in arrays or "reg" in arrays):
        defaults["pool_include_prefix"] = False  # timm >= 1.0's AttentionPoolLatent reads the patch tokens
    if layout == "timm" and defaults.get("resnet_layers") is not None:
        defaults["resnet_epsilons"] = "timm"  # timm's hybrids: GroupNorm 1e-5, StdConv2d sqrt(var + 1e-8)
    if layout in ("timm", "hf") and "head/kernel" not in arrays:
        # a feature tower (timm's num_classes=0, transformers' ViTModel: its pooler), as the HF family's headless models
        defaults["include_top"] = False
    defaults.update(layout_defaults)
    defaults.update(_described_defaults(spec, local, file_meta, defaults.get("num_classes")))
    if "variant" in defaults and "num_heads" not in defaults:
        try:
            defaults["num_heads"] = parse_variant(defaults["variant"]).num_heads
        except ValueError:
            defaults.pop("variant")
    if _floors_image_size(defaults):
        defaults["patch_remainder"] = "drop"  # its own code's VALID convolution ignores the last pixels
    # The model keeps its checkpoint's resampling: resize_model, dynamic_model and image_size=None then
    # resample as the load at another image_size does (timm's antialiased bicubic for a timm file).
    defaults.setdefault("pos_interpolation", ckpt.layout_method)
    _class_token_of_arrays(defaults, "cls" in arrays)
    return defaults


def _class_token_of_arrays(defaults: Dict[str, Any], has_cls: bool) -> None:
    """The arrays say whether the model has a class token, whatever its config.json says (timm's
    save_for_hf records global_pool='map' for SigLIP, not the class_token=False of its architecture)."""
    classifier = defaults.get("classifier", "token")
    implied = classifier == "token" if defaults.get("class_token") is None else bool(defaults["class_token"])
    if implied != has_cls and classifier != "token":
        defaults["class_token"] = has_cls


def _floors_image_size(defaults: Mapping[str, Any]) -> bool:
    """Whether a plain ViT checkpoint's image size is not a multiple of its patch size (timm's and
    transformers' SigLIP So400m/14 at 384 px): its code floors the patch grid."""
    if "image_size" not in defaults or defaults.get("resnet_layers") is not None:
        return False
    patch = defaults.get("patch_size")
    if patch is None and defaults.get("variant"):
        try:
            patch = parse_variant(defaults["variant"]).patch_size
        except ValueError:
            return False
    if patch is None:
        return False
    (h, w), (ph, pw) = _pair(defaults["image_size"], "image_size"), _pair(patch, "patch_size")
    return bool(h % ph or w % pw)


def check_variant(weights: PathLike, variant: Optional[str]) -> None:
    """ValueError when a published checkpoint's variant is not `variant` (checked before downloading)."""
    spec = os.fspath(weights)
    entry = PUBLISHED.get(spec) if not os.path.isfile(spec) else None
    if entry is not None and variant is not None and variant != entry.variant:
        raise ValueError(f"checkpoint {spec!r} is a {entry.variant} model; "
                         f"build it with variant={entry.variant!r}, not {variant!r}")
