"""ViTConfig and the paper's variant strings ("B/16", "Ti/4", "R50+B/16"), decoded in one place.

Pure Python (no TensorFlow, no Keras) so that `vitcli models` and parameter/FLOP counts are cheap.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable
from typing import Optional, Sequence, Tuple, Union

# Paper Table 1 plus the later Ti and S sizes and the shape-optimised So400m (Alabdulmohsin et al. 2023;
# big_vision's "So400m", SigLIP's and PaliGemma's image tower): hidden_size, mlp_dim, num_heads, num_layers.
VARIANTS = {
    "Ti": dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12),
    "S": dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    "B": dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    "L": dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
    "H": dict(hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32),
    "So400m": dict(hidden_size=1152, mlp_dim=4304, num_heads=16, num_layers=27),
}
# ResNet depth -> units per stage of the hybrid's BiT-style backbone. "R50" is the paper's
# three-stage ResNet-50 with (3, 4, 9) units (total stride 16); see parse_variant for others.
RESNET_DEPTHS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3)}

CLASSIFIERS = ("token", "gap", "map")
ACTIVATIONS = ("gelu", "quick_gelu")
MLPS = ("mlp", "swiglu")
OUTPUTS = (None, "tokens")
POS_EMBEDDINGS = ("learned", "learned_2d", "relative", "sincos2d", "none")
# What an image_size that is not a multiple of the patch size does: "error" refuses it (a typo's
# guard); "drop" ignores the last H mod P rows and W mod P columns of pixels, as the VALID patch
# convolution of timm, big_vision and transformers does (SigLIP So400m/14 at 384 px: 27x27 patches).
PATCH_REMAINDERS = ("error", "drop")
# The hybrid ResNet's epsilons, as each code base has them: "jax" (the official vit_jax / big_vision
# code: GroupNorm 1e-6, kernel / (std + 1e-5)) or "timm" (GroupNorm 1e-5, kernel / sqrt(var + 1e-8)).
RESNET_EPSILONS = ("jax", "timm")
# Standard deviation of the normal initialisers of learned embeddings (position, class token,
# relative offsets), as in the official code and timm.
INIT_STD = 0.02
_OVERRIDES = ("hidden_size", "mlp_dim", "num_heads", "num_layers", "patch_size")
# Official list shown by `vitcli models`.
LISTED_VARIANTS = ("Ti/16", "S/16", "S/32", "B/16", "B/32", "B/8", "L/16", "L/32", "H/14",
                   "R26+S/32", "R50+B/16", "R50+L/32")

_VARIANT_RE = re.compile(r"^(?:R(?P<depth>\d+)\+)?(?P<size>So400m|Ti|S|B|L|H)/(?P<patch>\d+)$")


def _is_int(value) -> bool:
    """An integer, NumPy's included (a notebook's `y.max() + 1`), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A real number, NumPy's included, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _plain(value):
    """A NumPy integer or float as Python's int or float, so the config is JSON as Keras saves it;
    anything else as it is (validate() judges it)."""
    if _is_int(value):
        return int(value)
    if _is_real(value) and not isinstance(value, float):
        return float(value)
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):  # pixel_mean=np.array([...]), resnet_layers=...
        return tuple(_plain(v) for v in value.tolist())
    return value


# The largest image side accepted (pixels): beyond it a size is a typo (TensorFlow's resize overflows at
# 2**63, and 16384 px at patch 16 is already a million tokens per image).
MAX_IMAGE_SIDE = 16384


def _pair(value: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    if _is_int(value):
        value = (value, value)
    try:  # a tuple, a list (JSON) or a NumPy array of two integers; a string is not one
        pair = () if isinstance(value, (str, bytes)) else tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(_is_int(v) for v in pair):
        raise ValueError(f"{what} must be an int or (height, width), got {value!r}")
    h, w = (int(v) for v in pair)
    if h < 1 or w < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return h, w


@dataclasses.dataclass
class ViTConfig:
    """Every hyper-parameter of a ViT, in the paper's words. `validate()` checks them all."""

    hidden_size: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    patch_size: Union[int, Tuple[int, int]] = 16
    image_size: Union[int, Tuple[int, int]] = 224
    channels: int = 3
    num_classes: int = 1000
    include_top: bool = True
    include_preprocessing: bool = True
    classifier: str = "token"
    representation_size: Optional[int] = None
    pos_embedding: str = "learned"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    # Official checkpoints (flax nn.gelu) use the tanh approximation; we default to it so
    # loaded checkpoints reproduce the reference logits.
    gelu_approximate: bool = True
    layer_norm_epsilon: float = 1e-6
    # Hybrid: units per ResNet stage (None = plain ViT) and the width factor of the ResNet.
    resnet_layers: Optional[Tuple[int, ...]] = None
    resnet_width: int = 1
    resnet_epsilons: str = "jax"  # RESNET_EPSILONS: whose GroupNorm / weight-standardisation epsilons
    variant: Optional[str] = None
    # Features for dense tasks (with include_top=False): "tokens" gives the (B, S, D) sequence after
    # the encoder norm; feature_layers gives those blocks' outputs as (B, H/P, W/P, D) maps.
    output: Optional[str] = None
    feature_layers: Optional[Tuple[int, ...]] = None
    # Any image size (H, W divisible by the input stride): the position embeddings, learned for
    # image_size's patch grid, are resampled in the graph with pos_interpolation (a
    # keras_vit.weights.resize method; "linear" is resize_model's default).
    dynamic_size: bool = False
    pos_interpolation: str = "linear"
    # ViT family: block options (issue #26). LayerScale gains initialised to layer_scale_init
    # (CaiT, DeiT-III, DINOv2; None = none); LayerNorm of queries and keys per head (qk_norm);
    # the MLP's activation ("quick_gelu" = x sigmoid(1.702 x), OpenAI CLIP); mlp="swiglu":
    # silu(x W1) * (x W2) of two mlp_dim halves of one Dense (EVA, DINOv2-g, timm SwiGLUPacked).
    layer_scale_init: Optional[float] = None
    qk_norm: bool = False
    qkv_bias: bool = True  # False: no query/key/value biases (timm's qkv_bias=False, SoViT-150M v2)
    activation: str = "gelu"
    mlp: str = "mlp"
    # ViT family: token and head options (issue #26). Sequence: [class?, distillation?, registers*,
    # patches]; position embeddings cover class, distillation and patches, not the registers.
    class_token: Optional[bool] = None  # None: a class token iff classifier == "token"
    num_registers: int = 0  # register tokens (Darcet et al. 2024, DINOv2-reg)
    distilled: bool = False  # DeiT's distillation token and second head, logits averaged
    pre_norm: bool = False  # a LayerNorm on the tokens before the first block (CLIP ln_pre)
    fc_norm: bool = False  # the final LayerNorm after pooling, not on the tokens (timm fc_norm)
    pixel_mean: Optional[Tuple[float, ...]] = None  # per channel, [0, 1] scale; None: [-1, 1] inputs
    pixel_std: Optional[Tuple[float, ...]] = None
    # Registers with position embeddings (timm's no_embed_class=False with reg_tokens: SoViT-150M
    # reg4): they join the sequence before the position embeddings, which then have their rows.
    register_pos_embedding: bool = False
    # Whether MAP pooling attends over the prefix tokens too (big_vision has none; timm >= 1.0
    # leaves them out: False). Other classifiers are unaffected ("gap" always leaves them out).
    pool_include_prefix: bool = True
    # "drop": image_size need not be a multiple of the patch size (PATCH_REMAINDERS).
    patch_remainder: str = "error"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # NumPy numbers as Python's (JSON, and the checks below)
            setattr(self, field.name, _plain(getattr(self, field.name)))
        self.image_size = _pair(self.image_size, "image_size")
        if max(self.image_size) > MAX_IMAGE_SIDE:
            raise ValueError(f"image_size {self.image_size} is larger than {MAX_IMAGE_SIDE} pixels a side")
        self.patch_size = _pair(self.patch_size, "patch_size")
        if self.resnet_layers is not None:
            if isinstance(self.resnet_layers, (int, str)) or not self.resnet_layers \
                    or not all(_is_int(n) and n >= 1 for n in self.resnet_layers):
                raise ValueError("resnet_layers must be the units per ResNet stage, one or more positive integers "
                                 f"(R50's (3, 4, 9)), or None for the plain ViT; got {self.resnet_layers!r}")
            self.resnet_layers = tuple(int(n) for n in self.resnet_layers)
        if self.feature_layers is not None:
            given = self.feature_layers
            if isinstance(given, (int, str)) or not isinstance(given, Iterable) \
                    or not all(_is_int(i) for i in given):
                raise ValueError(f"feature_layers must be a tuple of block indices, got {given!r}")
            given = tuple(int(i) for i in given)
            layers = tuple(i + self.num_layers if i < 0 else i for i in given)
            if not layers or len(set(layers)) != len(layers) or not all(0 <= i < self.num_layers for i in layers):
                raise ValueError(f"feature_layers must be distinct block indices in [-{self.num_layers}, "
                                 f"{self.num_layers}) (negative ones count from the last block); got {given!r}")
            self.feature_layers = layers
        if isinstance(self.layer_scale_init, int) and not isinstance(self.layer_scale_init, bool):
            self.layer_scale_init = float(self.layer_scale_init)  # 1 from JSON is 1.0
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(_plain(v) for v in value))
        self.validate()

    # --- checks -----------------------------------------------------------------------
    def validate(self) -> ViTConfig:
        """Raise ValueError naming the bad value and what is allowed."""
        for name in ("hidden_size", "mlp_dim", "num_heads", "num_layers", "resnet_width"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not _is_int(self.channels) or self.channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {self.channels!r}")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}; got {self.classifier!r}")
        self._validate_tokens()
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"pos_embedding must be one of {', '.join(POS_EMBEDDINGS)}; got {self.pos_embedding!r}")
        if self.pos_embedding in ("learned_2d", "sincos2d") and self.hidden_size % 2:
            raise ValueError(f"pos_embedding {self.pos_embedding!r} needs an even hidden_size, got {self.hidden_size}")
        if self.pos_embedding == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"pos_embedding 'sincos2d' needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.representation_size is not None and (
            not _is_int(self.representation_size) or self.representation_size < 1
        ):
            raise ValueError(f"representation_size must be a positive integer or None, got {self.representation_size!r}")
        for name in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
            v = getattr(self, name)
            if not _is_real(v) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not _is_real(self.layer_norm_epsilon) or not 0.0 < self.layer_norm_epsilon < 1.0:
            raise ValueError(f"layer_norm_epsilon must be a small positive number (e.g. 1e-6), got {self.layer_norm_epsilon!r}")
        for name in ("include_top", "include_preprocessing", "gelu_approximate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self._validate_block_options()
        if self.resnet_epsilons not in RESNET_EPSILONS:
            raise ValueError(f"resnet_epsilons must be one of {', '.join(RESNET_EPSILONS)}; got {self.resnet_epsilons!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(map(repr, OUTPUTS))}; got {self.output!r}")
        if self.feature_layers is not None:
            bad = [i for i in self.feature_layers if not 0 <= i < self.num_layers]
            if bad or not self.feature_layers or len(set(self.feature_layers)) != len(self.feature_layers):
                raise ValueError(f"feature_layers must be distinct block indices in [-{self.num_layers}, "
                                 f"{self.num_layers}); got {self.feature_layers!r}")
        if (self.output is not None or self.feature_layers is not None) and self.include_top:
            raise ValueError("output='tokens' and feature_layers return features: build with include_top=False")
        if self.output is not None and self.feature_layers is not None:
            raise ValueError("give output='tokens' or feature_layers, not both")
        if not isinstance(self.dynamic_size, bool):
            raise ValueError(f"dynamic_size must be True or False, got {self.dynamic_size!r}")
        from keras_vit.weights.resize import METHODS

        if self.pos_interpolation not in METHODS:
            raise ValueError(f"pos_interpolation must be one of {', '.join(METHODS)}; got {self.pos_interpolation!r}")
        if self.dynamic_size and self.pos_embedding == "relative":
            raise ValueError("dynamic_size=True needs pos_embedding learned, learned_2d, sincos2d or none; "
                             "'relative' indexes a table built for one patch grid")
        if self.dynamic_size and self.feature_layers is not None:
            raise ValueError("dynamic_size=True returns logits, pre-logits or tokens; feature_layers maps need "
                             "a fixed image_size")
        self._validate_remainder()
        return self

    def _validate_remainder(self) -> None:
        """image_size against the input stride, as patch_remainder says."""
        if self.patch_remainder not in PATCH_REMAINDERS:
            raise ValueError(f"patch_remainder must be one of {', '.join(map(repr, PATCH_REMAINDERS))}; "
                             f"got {self.patch_remainder!r}")
        if self.patch_remainder == "drop" and self.resnet_layers is not None:
            raise ValueError("patch_remainder='drop' is for the plain ViT: a hybrid's ResNet pads its "
                             "convolutions (SAME), so its image_size must be a multiple of the total stride")
        self.check_image_size(*self.image_size)

    def check_image_size(self, h: int, w: int, what: str = "image_size") -> None:
        """Raise one clear ValueError unless an h x w image makes the patch grid as patch_remainder says
        (a multiple of the input stride, or with 'drop' at least one patch); a model built with
        dynamic_size checks the images it is called on with it (`what` names them in the message)."""
        sh, sw = self.input_stride
        if h < sh or w < sw:
            raise ValueError(f"{what} {h}x{w} is smaller than one {sh}x{sw} patch")
        if self.patch_remainder != "drop" and (h % sh or w % sw):
            what_stride = "patch size" if self.resnet_layers is None else "total stride (ResNet stride x patch size)"
            hint = "" if self.resnet_layers is not None else (
                ", or set patch_remainder='drop' to ignore the last pixels as timm and big_vision do")
            raise ValueError(
                f"{what} {h}x{w} is not divisible by the {what_stride} {sh}x{sw}; "
                f"use a multiple of it, e.g. {max(1, round(h / sh)) * sh}x{max(1, round(w / sw)) * sw}{hint}")

    def _validate_block_options(self) -> None:
        """The block options of issue #26 (layer_scale_init, qk_norm, activation, mlp)."""
        v = self.layer_scale_init
        if v is not None and (not _is_real(v) or not 0.0 < v < float("inf")):
            raise ValueError(f"layer_scale_init must be a positive number (e.g. 1e-5) or None, got {v!r}")
        for name in ("qk_norm", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"mlp must be one of {', '.join(MLPS)}; got {self.mlp!r}")
        if self.mlp == "swiglu" and self.activation != "gelu":
            raise ValueError(f"activation {self.activation!r} does not apply to mlp='swiglu' (its gate is SiLU); "
                             "leave activation='gelu'")

    def _validate_tokens(self) -> None:
        """The token and head options of issue #26."""
        if self.class_token is not None and not isinstance(self.class_token, bool):  # 1 == True: `in` took 0 and 1
            raise ValueError(f"class_token must be None, True or False, got {self.class_token!r}")
        if self.classifier == "token" and self.class_token is False:
            raise ValueError("class_token=False is allowed with classifier 'gap' or 'map' only; classifier='token' "
                             "reads the class token")
        if not _is_int(self.num_registers) or self.num_registers < 0:
            raise ValueError(f"num_registers must be an integer >= 0, got {self.num_registers!r}")
        for name in ("distilled", "pre_norm", "fc_norm", "register_pos_embedding", "pool_include_prefix"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.register_pos_embedding and not self.num_registers:
            raise ValueError("register_pos_embedding=True gives register tokens position embeddings: set num_registers")
        if self.distilled and self.classifier != "token":
            raise ValueError("distilled=True needs a class token read by the head: classifier='token', "
                             f"got classifier={self.classifier!r}")
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("give pixel_mean and pixel_std together (per channel, on the [0, 1] scale), "
                             f"got pixel_mean={self.pixel_mean!r} and pixel_std={self.pixel_std!r}")
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if value is None:
                continue
            ok = isinstance(value, tuple) and len(value) == self.channels and \
                all(_is_real(v) and math.isfinite(v) for v in value)
            # On the [0, 1] scale no channel's deviation exceeds 0.5; 1 is "no scaling" (mean 0, std 1 configs)
            if not ok or (name == "pixel_std" and not 0 < min(value) <= max(value) <= 1) \
                    or (name == "pixel_mean" and not 0 <= min(value) <= max(value) <= 1):
                allowed, example = (("numbers in (0, 1]", "ImageNet's std 0.229, not 58.395") if name == "pixel_std"
                                    else ("numbers in [0, 1]", "ImageNet's mean 0.485, not 123.675"))
                raise ValueError(f"{name} must be {self.channels} {allowed} (one per channel, on the [0, 1] scale: "
                                 f"{example}), got {value!r}")

    # --- derived quantities -----------------------------------------------------------
    @property
    def has_class_token(self) -> bool:
        """Whether the sequence starts with a class token (class_token, or by default classifier == "token")."""
        return self.classifier == "token" if self.class_token is None else bool(self.class_token)

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Prefix tokens that have a position embedding: the class and distillation tokens, and the
        registers with register_pos_embedding."""
        return self.num_prefix_tokens - (0 if self.register_pos_embedding else self.num_registers)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, distillation and register tokens."""
        return int(self.has_class_token) + int(self.distilled) + self.num_registers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def resnet_stride(self) -> int:
        """Total stride of the hybrid's ResNet: root (4) times 2 per stage after the first."""
        if self.resnet_layers is None:
            return 1
        return 4 * 2 ** (len(self.resnet_layers) - 1)

    @property
    def input_stride(self) -> Tuple[int, int]:
        ph, pw = self.patch_size
        return ph * self.resnet_stride, pw * self.resnet_stride

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Patches along (height, width)."""
        sh, sw = self.input_stride
        return self.image_size[0] // sh, self.image_size[1] // sw

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def seq_len(self) -> int:
        """Tokens entering the encoder: N patches plus the prefix tokens (class, distillation, registers)."""
        return self.num_patches + self.num_prefix_tokens

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        d["patch_size"] = list(self.patch_size)
        if self.resnet_layers is not None:
            d["resnet_layers"] = list(self.resnet_layers)
        if self.feature_layers is not None:
            d["feature_layers"] = list(self.feature_layers)
        for name in ("pixel_mean", "pixel_std"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        """The inverse of to_dict; ValueError naming unknown keys."""
        return from_fields(cls, d, "ViTConfig keys")

    def replace(self, **changes) -> ViTConfig:
        """A copy with `changes`; ValueError naming unknown fields."""
        return from_fields(type(self), {**dataclasses.asdict(self), **changes}, "ViTConfig fields")

    # --- counts (analytic, no weights allocated) ----------------------------------------
    def count_params(self) -> int:
        """Trainable + non-trainable parameters of the Keras model this config builds."""
        from keras_vit.counts import count_params

        return count_params(self)

    def flops(self) -> int:
        """Forward-pass FLOPs per image (2 per multiply-add), matmuls and attention only."""
        from keras_vit.counts import count_flops

        return count_flops(self)


def from_fields(cls, d: dict, what: str, error: type = ValueError):
    """The dataclass `cls` from dict `d`; `error` naming the unknown keys (`what`) and the allowed ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise error(f"unknown {what} {unknown}; allowed: {sorted(known)}")
    return cls(**d)


def parse_variant(variant: str, **overrides) -> ViTConfig:
    """Decode "B/16", "Ti/4", "R50+B/16", "R26+S/32" ... into a ViTConfig.

    `overrides` may set any ViTConfig field (hidden_size, mlp_dim, num_heads, num_layers,
    patch_size, image_size, ...), which gives custom sizes.
    """
    if not isinstance(variant, str):
        raise ValueError(f"variant must be a string such as 'B/16' or 'R50+B/16', got {variant!r}")
    m = _VARIANT_RE.match(variant.strip())
    if not m:
        raise ValueError(
            f"unknown variant {variant!r}; allowed: SIZE/PATCH with SIZE one of "
            f"{', '.join(VARIANTS)} (e.g. 'B/16', 'Ti/4'), optionally a ResNet hybrid "
            f"'R50+B/16', 'R50+L/32', 'R26+S/32'")
    size, patch = m["size"], int(m["patch"])
    if patch < 1:
        raise ValueError(f"patch size in variant {variant!r} must be >= 1")
    fields = dict(VARIANTS[size], patch_size=patch)
    if m["depth"] is not None:
        depth = int(m["depth"])
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unknown ResNet depth R{depth} in {variant!r}; allowed: "
                             f"{', '.join(f'R{d}' for d in RESNET_DEPTHS)}")
        layers = RESNET_DEPTHS[depth]
        if depth == 50 and patch == 16:
            # The paper's R50+B/16: ResNet-50 with stage 4 removed and its units moved to stage 3.
            layers = (3, 4, 9)
        # Hybrid "/16" or "/32" names the total stride; the 1x1 "patches" are over the feature map.
        fields["resnet_layers"] = layers
        stride = 4 * 2 ** (len(layers) - 1)
        if patch % stride:
            raise ValueError(f"hybrid {variant!r}: total stride {patch} must be a multiple of the ResNet stride {stride}")
        fields["patch_size"] = patch // stride
    bad = sorted(k for k in overrides if k not in {f.name for f in dataclasses.fields(ViTConfig)})
    if bad:
        raise ValueError(f"unknown option(s) {bad}; allowed overrides: {', '.join(_OVERRIDES)} "
                         "and any other ViTConfig field")
    fields.update(overrides)
    fields.setdefault("variant", variant.strip())
    return ViTConfig(**fields)
