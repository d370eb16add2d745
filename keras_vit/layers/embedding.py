"""Embedding layers: image patches to tokens (Eq. 1), the class and distillation tokens, register
tokens, position embeddings (learned, learned_2d, sincos2d, none), and the way back from tokens
(PatchGrid, TokenPooling)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import keras
import numpy as np
from keras import layers, ops

from keras_vit.config import INIT_STD
from keras_vit.layers.fusion import bias_after_reshape, separate_bias, tf_training_forms

_REG = keras.saving.register_keras_serializable(package="keras_vit")


@_REG
class PatchEmbedding(layers.Layer):
    """Splits the image into P x P patches and projects each to D (a Conv2D, kernel = stride = P).

    Output: (B, N, D) with N = (H / P) * (W / P), patches in row-major order.
    """

    def __init__(self, hidden_size: int, patch_size: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = int(hidden_size)
        self.patch_size = tuple(int(p) for p in (patch_size if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)))
        self.projection = layers.Conv2D(
            self.hidden_size, self.patch_size, strides=self.patch_size, padding="valid",
            kernel_initializer="lecun_normal", name="kernel_conv", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.built = True

    def call(self, images, training=None):
        if (tf_training_forms(images, training) and None not in images.shape[1:3]
                and self.projection.quantization_mode is None):  # a quantized Conv2D keeps its own call
            x = self._patches_times_kernel(images)
        else:
            x = self.projection(images)
        _, gh, gw, d = x.shape
        if gh is None or gw is None:  # a model for any image size: the grid is known at run time
            return ops.reshape(x, (ops.shape(x)[0], -1, d))
        return ops.reshape(x, (-1, gh * gw, d))

    def _patches_times_kernel(self, images):
        """The Conv2D as one GEMM: the (B gh gw, P P C) patches times the kernel as (P P C, D), plus the bias.

        Why: bf16 training on TensorFlow. oneDNN's bf16 convolution with a kernel as large as its stride
        and its filter gradient took 11-12 ms a ViT-Ti/16 step (batch 16, 224 px, the Zen 4) against 4-5 for
        this form, with equal values and gradients (BENCHMARKS.md). Inference, and so every export, keeps
        the Conv2D; pixels past the last whole patch are dropped, as its "valid" padding does.
        """
        conv = self.projection
        (ph, pw), (_, h, w, c) = self.patch_size, images.shape
        gh, gw = h // ph, w // pw
        x = ops.reshape(images[:, :gh * ph, :gw * pw, :], (-1, gh, ph, gw, pw, c))
        patches = ops.reshape(ops.transpose(x, (0, 1, 3, 2, 4, 5)), (-1, ph * pw * c))
        y = ops.matmul(patches, ops.reshape(ops.cast(conv.kernel, images.dtype), (ph * pw * c, self.hidden_size)))
        if conv.use_bias and separate_bias(images, True):  # the GEMM stays AMX's (layers.fusion)
            return bias_after_reshape(y, (-1, gh, gw, self.hidden_size), conv.bias)
        if conv.use_bias:
            y = y + ops.cast(conv.bias, images.dtype)
        return ops.reshape(y, (-1, gh, gw, self.hidden_size))

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        if h is None or w is None:
            return (b, None, self.hidden_size)
        return (b, (h // self.patch_size[0]) * (w // self.patch_size[1]), self.hidden_size)

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size, "patch_size": list(self.patch_size)}


@_REG
class ClassToken(layers.Layer):
    """Prepends the learnable x_class token (zero-initialised, as in the official code); DeiT's
    distillation token is another one, prepended before the class token's."""

    def build(self, input_shape):
        self.cls = self.add_weight(shape=(1, 1, input_shape[-1]), initializer="zeros", name="cls")
        self.built = True

    def get_config(self) -> dict:
        # Written out: Keras' automatic config cannot serialise a DTypePolicy passed as dtype=.
        return super().get_config()

    def call(self, x):
        cls = ops.cast(ops.broadcast_to(self.cls, (ops.shape(x)[0], 1, ops.shape(x)[-1])), x.dtype)
        return ops.concatenate([cls, x], axis=1)

    def compute_output_shape(self, input_shape):
        b, n, d = input_shape
        return (b, None if n is None else n + 1, d)


@_REG
class RegisterTokens(layers.Layer):
    """Inserts `num_registers` learnable register tokens after the first `index` tokens ("Vision
    Transformers Need Registers"): after the class (and distillation) token, before the patches,
    once the position embeddings are added (registers have none)."""

    def __init__(self, num_registers: int, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.num_registers = int(num_registers)
        self.index = int(index)

    def build(self, input_shape):
        self.reg = self.add_weight(shape=(1, self.num_registers, input_shape[-1]),
                                   initializer=keras.initializers.RandomNormal(stddev=INIT_STD), name="reg")
        self.built = True

    def call(self, x):
        reg = ops.cast(ops.broadcast_to(self.reg, (ops.shape(x)[0], self.num_registers, ops.shape(x)[-1])), x.dtype)
        if not self.index:  # no empty slice: LiteRT's XNNPack delegate cannot reshape a zero-size tensor
            return ops.concatenate([reg, x], axis=1)
        return ops.concatenate([x[:, :self.index], reg, x[:, self.index:]], axis=1)

    def compute_output_shape(self, input_shape):
        b, n, d = input_shape
        return (b, None if n is None else n + self.num_registers, d)

    def get_config(self) -> dict:
        return {**super().get_config(), "num_registers": self.num_registers, "index": self.index}


def preprocessing_scale_offset(mean: Optional[Sequence[float]], std: Optional[Sequence[float]]):
    """(scale, offset) of the Rescaling that maps [0, 255] images to (x / 255 - mean) / std per
    channel; None/None is the official checkpoints' [-1, 1] (mean = std = 0.5)."""
    if mean is None:
        return 1.0 / 127.5, -1.0
    return ([1.0 / (255.0 * s) for s in std], [-m / s for m, s in zip(mean, std)])


def sincos_2d(grid_size: Tuple[int, int], dim: int, temperature: float = 10000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embeddings (big_vision's posemb_sincos_2d), shape (gh*gw, dim)."""
    gh, gw = grid_size
    y, x = np.mgrid[:gh, :gw].astype(np.float32)
    omega = np.arange(dim // 4, dtype=np.float32) / (dim // 4 - 1 if dim // 4 > 1 else 1)
    omega = 1.0 / (temperature ** omega)
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


def interpolation_matrix_ops(n_in: int, n_out, method: str = "linear"):
    """keras.ops twin of `keras_vit.weights.resize.interpolation_matrix`: the (n_out, n_in) float32 matrix
    resampling n_in samples to `n_out` (an int or a scalar tensor known only at run time)."""
    from keras_vit.weights.resize import check_method

    check_method(method)
    n_out_f = ops.cast(n_out, "float32")
    i = ops.cast(ops.arange(n_out), "float32")
    if method == "linear":  # first and last samples aligned (scipy.ndimage.zoom(order=1))
        src = i * float(n_in - 1) / ops.maximum(n_out_f - 1.0, 1.0)
    else:  # half-pixel centres
        src = (i + 0.5) * float(n_in) / n_out_f - 0.5

    def pick(idx):
        return ops.one_hot(ops.cast(ops.clip(idx, 0, n_in - 1), "int32"), n_in, dtype="float32")

    if method == "bicubic_antialias":  # torch's antialiased bicubic (PIL's): a = -0.5, rows renormalised
        scale = float(n_in) / n_out_f
        stretch = ops.maximum(scale, 1.0)
        t = ops.abs((ops.cast(ops.arange(n_in), "float32")[None, :] + 0.5 - (scale * (i + 0.5))[:, None]) / stretch)
        a = -0.5
        w = ops.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                      ops.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
        return w / ops.sum(w, axis=1, keepdims=True)
    if method == "nearest":
        return pick(ops.floor(src + 0.5))
    if method == "bicubic":
        base = ops.floor(src)
        w = 0.0
        for off in (-1.0, 0.0, 1.0, 2.0):
            tap = base + off
            t = ops.abs(src - tap)
            a = -0.75
            cubic = ops.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                              ops.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
            w = w + pick(tap) * cubic[:, None]
        return w
    src = ops.clip(src, 0.0, float(n_in - 1))
    lo = ops.floor(src)
    frac = (src - lo)[:, None]
    return pick(lo) * (1.0 - frac) + pick(ops.minimum(lo + 1.0, float(n_in - 1))) * frac


def sincos_2d_ops(gh, gw, dim: int, temperature: float = 10000.0):
    """keras.ops twin of `sincos_2d` for a grid known only at run time: (gh*gw, dim) float32."""
    q = dim // 4
    omega = np.arange(q, dtype=np.float32) / (q - 1 if q > 1 else 1)
    omega = ops.convert_to_tensor((1.0 / (temperature ** omega)).astype(np.float32))
    ys = ops.cast(ops.arange(gh), "float32")
    xs = ops.cast(ops.arange(gw), "float32")
    y = ops.reshape(ops.broadcast_to(ys[:, None], (gh, gw)), (-1,))[:, None] * omega[None, :]
    x = ops.reshape(ops.broadcast_to(xs[None, :], (gh, gw)), (-1,))[:, None] * omega[None, :]
    return ops.concatenate([ops.sin(x), ops.cos(x), ops.sin(y), ops.cos(y)], axis=1)


@_REG
class PositionEmbedding(layers.Layer):
    """Adds E_pos to the token sequence. kind:

    - "learned": 1-D learned (N+1, D), the paper's default (class-token slot first);
    - "learned_2d": row and column embeddings of D/2 each, concatenated (+ a class-token slot);
    - "sincos2d": fixed 2-D sin-cos (class-token slot zero);
    - "none": identity (also used with "relative", whose bias lives in the attention).

    With `stride` (the image pixels per patch, (sh, sw)) the layer serves any image size: called
    as `layer(tokens, images=images)`, it reads the patch grid from the images' shape at run time
    and resamples the learned embeddings of `grid_size` to it with `method` (as
    `keras_vit.resize_model` does offline; "linear" is its default), or rebuilds sincos2d.
    """

    def __init__(self, kind: str, grid_size: Sequence[int], num_prefix_tokens: int = 1,
                 stride: Optional[Sequence[int]] = None, method: str = "linear", padded_stride: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.stride = None if stride is None else tuple(int(s) for s in stride)
        self.method = method
        # A hybrid's ResNet pads (SAME): its feature map is ceil(H / padded_stride) high, the patches
        # after it floor that by the rest of the stride, as the tokens the model actually has.
        self.padded_stride = int(padded_stride)

    def build(self, x_shape, images_shape=None):
        d = x_shape[-1]
        gh, gw = self.grid_size
        init = keras.initializers.RandomNormal(stddev=INIT_STD)
        if self.kind == "learned":
            self.pos_embedding = self.add_weight(
                shape=(1, gh * gw + self.num_prefix_tokens, d), initializer=init, name="pos_embedding")
        elif self.kind == "learned_2d":
            self.row_embedding = self.add_weight(shape=(gh, d // 2), initializer=init, name="row_embedding")
            self.col_embedding = self.add_weight(shape=(gw, d - d // 2), initializer=init, name="col_embedding")
            if self.num_prefix_tokens:
                self.prefix_embedding = self.add_weight(
                    shape=(1, self.num_prefix_tokens, d), initializer=init, name="prefix_embedding")
        self._dim = d
        self.built = True

    def embedding(self, grid=None):
        """The full (1, prefix + N, D) embedding (None for "none"/"relative"); `grid` (nh, nw),
        ints or run-time scalars, resamples it to another patch grid."""
        gh, gw = self.grid_size
        nh, nw = (gh, gw) if grid is None else grid
        d = self._dim
        if self.kind == "learned":
            if grid is None:
                return self.pos_embedding
            p = self.num_prefix_tokens
            table = ops.reshape(ops.cast(self.pos_embedding[0, p:], "float32"), (gh, gw, d))
            out = ops.einsum("ai,bj,ijd->abd", interpolation_matrix_ops(gh, nh, self.method),
                             interpolation_matrix_ops(gw, nw, self.method), table)
            out = ops.reshape(out, (1, -1, d))
            if p:
                out = ops.concatenate([ops.cast(self.pos_embedding[:, :p], "float32"), out], axis=1)
            return out
        if self.kind == "learned_2d":
            rows, cols = self.row_embedding, self.col_embedding
            if grid is not None:
                rows = ops.matmul(interpolation_matrix_ops(gh, nh, self.method), ops.cast(rows, "float32"))
                cols = ops.matmul(interpolation_matrix_ops(gw, nw, self.method), ops.cast(cols, "float32"))
            rows = ops.broadcast_to(rows[:, None, :], (nh, nw, d // 2))
            cols = ops.broadcast_to(cols[None, :, :], (nh, nw, d - d // 2))
            grid_emb = ops.reshape(ops.concatenate([ops.cast(rows, "float32"), ops.cast(cols, "float32")], axis=-1),
                                   (1, -1, d))
            if self.num_prefix_tokens:
                grid_emb = ops.concatenate([ops.cast(self.prefix_embedding, "float32"), grid_emb], axis=1)
            return grid_emb
        if self.kind == "sincos2d":
            table = sincos_2d(self.grid_size, d) if grid is None else sincos_2d_ops(nh, nw, d)
            table = ops.concatenate([ops.zeros((self.num_prefix_tokens, d), "float32"),
                                     ops.convert_to_tensor(table, "float32")], axis=0)[None]
            return table
        return None

    def call(self, x, images=None):
        grid = None
        if self.stride is not None and images is not None and self.kind != "none":
            shape = ops.shape(images)
            c = self.padded_stride
            grid = tuple((shape[i + 1] + c - 1) // c // (self.stride[i] // c) for i in range(2))
        emb = self.embedding(grid)
        if emb is None:
            return x
        return x + ops.cast(emb, x.dtype)

    def compute_output_shape(self, x_shape, images_shape=None):
        return x_shape

    def get_config(self):
        out = {**super().get_config(), "kind": self.kind, "grid_size": list(self.grid_size),
               "num_prefix_tokens": self.num_prefix_tokens}
        if self.stride is not None:
            out.update(stride=list(self.stride), method=self.method)
            if self.padded_stride != 1:
                out["padded_stride"] = self.padded_stride
        return out


@_REG
class PatchGrid(layers.Layer):
    """Token sequence (B, prefix + gh*gw, D) -> patch map (B, gh, gw, D): prefix (class, distillation,
    register) tokens dropped."""

    def __init__(self, grid_size: Sequence[int], num_prefix_tokens: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, x):
        gh, gw = self.grid_size
        return ops.reshape(x[:, self.num_prefix_tokens:], (-1, gh, gw, x.shape[-1]))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.grid_size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "grid_size": list(self.grid_size), "num_prefix_tokens": self.num_prefix_tokens}


@_REG
class PatchTokens(layers.Layer):
    """Token sequence (B, prefix + N, D) -> the patch tokens (B, N, D): what timm >= 1.0's MAP pooling
    attends over (pool_include_prefix=False)."""

    def __init__(self, num_prefix_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, x):
        return x[:, self.num_prefix_tokens:]

    def compute_output_shape(self, input_shape):
        n = input_shape[1]
        return (input_shape[0], None if n is None else n - self.num_prefix_tokens, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "num_prefix_tokens": self.num_prefix_tokens}


@_REG
class TokenPooling(layers.Layer):
    """y = LN(z_L) pooled: token `index` ("token": the class token, or DeiT's distillation token at
    index 1) or the mean of the patch tokens ("gap": the `num_prefix_tokens` first tokens excluded)."""

    def __init__(self, classifier: str = "token", num_prefix_tokens: int = 0, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.index = int(index)

    def call(self, x):
        if self.classifier == "token":
            return x[:, self.index]
        return ops.mean(x[:, self.num_prefix_tokens:] if self.num_prefix_tokens else x, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "classifier": self.classifier, "num_prefix_tokens": self.num_prefix_tokens,
                "index": self.index}
