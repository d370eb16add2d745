"""The hybrid's BiT-style ResNet (paper Sec. 3.1 "Hybrid Architecture"), as in the official code.

Weight-standardised convolutions, GroupNorm (32 groups), post-activation bottleneck units
with a projection shortcut, root = 7x7/2 conv -> GroupNorm -> ReLU -> 3x3/2 max-pool, "SAME"
padding throughout. Sub-layer names follow the official checkpoints (conv_root, gn_root,
block{n}/unit{m}/conv{k}, gn{k}, conv_proj, gn_proj) so that loading a .npz is a copy.
"""
from __future__ import annotations

from typing import Dict, Sequence

import keras
from keras import layers, ops

from keras_vit.counts import ROOT_WIDTH

_REG = keras.saving.register_keras_serializable(package="keras_vit")
# Official code: flax nn.GroupNorm defaults (32 groups, epsilon 1e-6) and StdConv's 1e-5
# added to the kernel's standard deviation.
GN_GROUPS = 32
GN_EPSILON = 1e-6
WS_EPSILON = 1e-5
# The same layers as timm has them (StdConv2d(eps=1e-8): kernel / sqrt(var + eps); GroupNormAct
# 1e-5): a timm hybrid checkpoint gives timm's outputs with these (config resnet_epsilons="timm").
EPSILONS = {"jax": dict(gn_epsilon=GN_EPSILON, ws_epsilon=WS_EPSILON, ws_in_sqrt=False),
            "timm": dict(gn_epsilon=1e-5, ws_epsilon=1e-8, ws_in_sqrt=True)}


@_REG
class StdConv2D(layers.Conv2D):
    """Conv2D with weight standardisation: the kernel is centred and scaled to unit standard
    deviation over its spatial and input axes before every use (BiT, official ViT hybrid)."""

    def __init__(self, *args, ws_epsilon: float = WS_EPSILON, ws_in_sqrt: bool = False, **kwargs):
        kwargs.setdefault("use_bias", False)
        kwargs.setdefault("padding", "same")
        super().__init__(*args, **kwargs)
        self.ws_epsilon = float(ws_epsilon)
        self.ws_in_sqrt = bool(ws_in_sqrt)  # kernel / sqrt(var + eps) (timm) instead of / (std + eps)

    def convolution_op(self, inputs, kernel):
        kernel = ops.cast(kernel, "float32")
        mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        centred = kernel - mean
        var = ops.mean(ops.square(centred), axis=(0, 1, 2), keepdims=True)
        scale = ops.sqrt(var + self.ws_epsilon) if self.ws_in_sqrt else ops.sqrt(var) + self.ws_epsilon
        kernel = ops.cast(centred / scale, inputs.dtype)
        return super().convolution_op(inputs, kernel)

    def get_config(self):
        return {**super().get_config(), "ws_epsilon": self.ws_epsilon, "ws_in_sqrt": self.ws_in_sqrt}


def _group_norm(name: str, gamma_zero: bool = False, epsilon: float = GN_EPSILON) -> layers.GroupNormalization:
    return layers.GroupNormalization(
        groups=GN_GROUPS, epsilon=epsilon, gamma_initializer="zeros" if gamma_zero else "ones",
        name=name, dtype="float32")


@_REG
class BottleneckUnit(layers.Layer):
    """Post-activation bottleneck: 1x1 -> GN -> ReLU -> 3x3/stride -> GN -> ReLU -> 1x1 -> GN,
    plus the (projected when shape changes) shortcut, then ReLU. Output width = 4 * `width`."""

    def __init__(self, width: int, stride: int = 1, gn_epsilon: float = GN_EPSILON,
                 ws_epsilon: float = WS_EPSILON, ws_in_sqrt: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.width = int(width)
        self.stride = int(stride)
        self.gn_epsilon = float(gn_epsilon)
        self.ws_epsilon = float(ws_epsilon)
        self.ws_in_sqrt = bool(ws_in_sqrt)
        conv = dict(ws_epsilon=self.ws_epsilon, ws_in_sqrt=self.ws_in_sqrt, kernel_initializer="he_normal",
                    dtype=self.dtype_policy)
        self.conv1 = StdConv2D(self.width, 1, name="conv1", **conv)
        self.gn1 = _group_norm("gn1", epsilon=self.gn_epsilon)
        self.conv2 = StdConv2D(self.width, 3, strides=self.stride, name="conv2", **conv)
        self.gn2 = _group_norm("gn2", epsilon=self.gn_epsilon)
        self.conv3 = StdConv2D(4 * self.width, 1, name="conv3", **conv)
        # Zero-initialised last GroupNorm scale: each unit starts as identity (official code).
        self.gn3 = _group_norm("gn3", gamma_zero=True, epsilon=self.gn_epsilon)
        self.conv_proj = None
        self.gn_proj = None
        self._conv = conv

    def _needs_projection(self, in_channels: int) -> bool:
        return in_channels != 4 * self.width or self.stride != 1

    def build(self, input_shape):
        b, h, w, cin = input_shape
        if self._needs_projection(cin):
            self.conv_proj = StdConv2D(4 * self.width, 1, strides=self.stride, name="conv_proj", **self._conv)
            self.gn_proj = _group_norm("gn_proj", epsilon=self.gn_epsilon)
            self.conv_proj.build(input_shape)
            self.gn_proj.build(self.conv_proj.compute_output_shape(input_shape))
        self.conv1.build(input_shape)
        s1 = self.conv1.compute_output_shape(input_shape)
        self.gn1.build(s1)
        self.conv2.build(s1)
        s2 = self.conv2.compute_output_shape(s1)
        self.gn2.build(s2)
        self.conv3.build(s2)
        self.gn3.build(self.conv3.compute_output_shape(s2))
        self.built = True

    def call(self, x):
        residual = x
        if self.conv_proj is not None:
            residual = ops.cast(self.gn_proj(self.conv_proj(x)), self.compute_dtype)
        y = ops.relu(ops.cast(self.gn1(self.conv1(x)), self.compute_dtype))
        y = ops.relu(ops.cast(self.gn2(self.conv2(y)), self.compute_dtype))
        y = ops.cast(self.gn3(self.conv3(y)), self.compute_dtype)
        return ops.relu(residual + y)

    def compute_output_shape(self, input_shape):
        return self.conv3.compute_output_shape(self.conv2.compute_output_shape(input_shape))

    def official_weights(self) -> Dict[str, keras.Variable]:
        """Variables under their official checkpoint names (relative to the unit)."""
        out = {}
        for k in (1, 2, 3):
            out[f"conv{k}/kernel"] = getattr(self, f"conv{k}").kernel
            gn = getattr(self, f"gn{k}")
            out[f"gn{k}/scale"], out[f"gn{k}/bias"] = gn.gamma, gn.beta
        if self.conv_proj is not None:
            out["conv_proj/kernel"] = self.conv_proj.kernel
            out["gn_proj/scale"], out["gn_proj/bias"] = self.gn_proj.gamma, self.gn_proj.beta
        return out

    def get_config(self):
        return {**super().get_config(), "width": self.width, "stride": self.stride,
                "gn_epsilon": self.gn_epsilon, "ws_epsilon": self.ws_epsilon, "ws_in_sqrt": self.ws_in_sqrt}


@_REG
class ResNetStem(layers.Layer):
    """The hybrid's feature extractor: root (7x7/2 StdConv, GN, ReLU, 3x3/2 max-pool) then one
    stage per entry of `block_units` (stage s: width 64*`width`*2^s, first unit strided but the
    first stage's). Total stride 4 * 2^(stages - 1); e.g. (3, 4, 9) = the paper's R50, stride 16.
    The epsilons are the official code's unless given (EPSILONS["timm"] for timm's)."""

    def __init__(self, block_units: Sequence[int], width: int = 1, gn_epsilon: float = GN_EPSILON,
                 ws_epsilon: float = WS_EPSILON, ws_in_sqrt: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.block_units = tuple(int(n) for n in block_units)
        if not self.block_units or any(n < 1 for n in self.block_units):
            raise ValueError(f"block_units must be a non-empty list of positive unit counts, got {block_units!r}")
        self.width = int(width)
        self.gn_epsilon = float(gn_epsilon)
        self.ws_epsilon = float(ws_epsilon)
        self.ws_in_sqrt = bool(ws_in_sqrt)
        root = ROOT_WIDTH * self.width
        self.conv_root = StdConv2D(root, 7, strides=2, ws_epsilon=self.ws_epsilon, ws_in_sqrt=self.ws_in_sqrt,
                                   kernel_initializer="he_normal", name="conv_root", dtype=self.dtype_policy)
        self.gn_root = _group_norm("gn_root", epsilon=self.gn_epsilon)
        self.pool = layers.MaxPooling2D(3, strides=2, padding="same", name="pool", dtype=self.dtype_policy)
        self.units = []
        for s, n in enumerate(self.block_units):
            for u in range(n):
                self.units.append(BottleneckUnit(
                    root * 2 ** s, stride=2 if (s > 0 and u == 0) else 1, gn_epsilon=self.gn_epsilon,
                    ws_epsilon=self.ws_epsilon, ws_in_sqrt=self.ws_in_sqrt, name=f"block{s + 1}_unit{u + 1}",
                    dtype=self.dtype_policy))

    def unit_names(self):
        """Official names ("block{n}/unit{m}") of the units, in order."""
        return [f"block{s + 1}/unit{u + 1}" for s, n in enumerate(self.block_units) for u in range(n)]

    def build(self, input_shape):
        self.conv_root.build(input_shape)
        shape = self.conv_root.compute_output_shape(input_shape)
        self.gn_root.build(shape)
        shape = self.pool.compute_output_shape(shape)
        for unit in self.units:
            unit.build(shape)
            shape = unit.compute_output_shape(shape)
        self.built = True

    def call(self, images):
        x = self.conv_root(images)
        x = ops.relu(ops.cast(self.gn_root(x), self.compute_dtype))
        x = self.pool(x)
        for unit in self.units:
            x = unit(x)
        return x

    def compute_output_shape(self, input_shape):
        shape = self.pool.compute_output_shape(self.conv_root.compute_output_shape(input_shape))
        for unit in self.units:
            shape = unit.compute_output_shape(shape)
        return shape

    def official_weights(self, prefix: str = "") -> Dict[str, keras.Variable]:
        """Variables under the official checkpoint names, e.g. "block1/unit1/conv1/kernel"."""
        out = {f"{prefix}conv_root/kernel": self.conv_root.kernel,
               f"{prefix}gn_root/scale": self.gn_root.gamma, f"{prefix}gn_root/bias": self.gn_root.beta}
        for name, unit in zip(self.unit_names(), self.units):
            out.update({f"{prefix}{name}/{k}": v for k, v in unit.official_weights().items()})
        return out

    def get_config(self):
        return {**super().get_config(), "block_units": list(self.block_units), "width": self.width,
                "gn_epsilon": self.gn_epsilon, "ws_epsilon": self.ws_epsilon, "ws_in_sqrt": self.ws_in_sqrt}


__all__ = ["StdConv2D", "BottleneckUnit", "ResNetStem", "GN_EPSILON", "WS_EPSILON", "EPSILONS"]
