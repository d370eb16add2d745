"""The ViT's building blocks as serialisable Keras layers (keras.ops only: TF, JAX and torch).

Names follow the paper (Eq. 1-4) and weights keep the layout of the official checkpoints,
so that loading a .npz is a copy: attention kernels are (D, heads, head_dim) and
(heads, head_dim, D).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import keras
import numpy as np
from keras import layers, ops

_REG = keras.saving.register_keras_serializable(package="keras_vit")
_INIT_STD = 0.02


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

    def call(self, images):
        x = self.projection(images)
        _, gh, gw, d = x.shape
        if gh is None or gw is None:  # a model for any image size: the grid is known at run time
            return ops.reshape(x, (ops.shape(x)[0], -1, d))
        return ops.reshape(x, (-1, gh * gw, d))

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        if h is None or w is None:
            return (b, None, self.hidden_size)
        return (b, (h // self.patch_size[0]) * (w // self.patch_size[1]), self.hidden_size)

    def get_config(self):
        return {**super().get_config(), "hidden_size": self.hidden_size, "patch_size": list(self.patch_size)}


@_REG
class ClassToken(layers.Layer):
    """Prepends the learnable x_class token (zero-initialised, as in the official code)."""

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
    """keras.ops twin of `keras_vit.resize.interpolation_matrix`: the (n_out, n_in) float32 matrix
    resampling n_in samples to `n_out` (an int or a scalar tensor known only at run time)."""
    from keras_vit.resize import check_method

    check_method(method)
    n_out_f = ops.cast(n_out, "float32")
    i = ops.cast(ops.arange(n_out), "float32")
    if method == "linear":  # first and last samples aligned (scipy.ndimage.zoom(order=1))
        src = i * float(n_in - 1) / ops.maximum(n_out_f - 1.0, 1.0)
    else:  # half-pixel centres
        src = (i + 0.5) * float(n_in) / n_out_f - 0.5

    def pick(idx):
        return ops.one_hot(ops.cast(ops.clip(idx, 0, n_in - 1), "int32"), n_in, dtype="float32")

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
                 stride: Optional[Sequence[int]] = None, method: str = "linear", **kwargs):
        super().__init__(**kwargs)
        self.kind = kind
        self.grid_size = tuple(int(g) for g in grid_size)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.stride = None if stride is None else tuple(int(s) for s in stride)
        self.method = method

    def build(self, x_shape, images_shape=None):
        d = x_shape[-1]
        gh, gw = self.grid_size
        init = keras.initializers.RandomNormal(stddev=_INIT_STD)
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
            grid = (shape[1] // self.stride[0], shape[2] // self.stride[1])
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
        return out


def relative_position_index(grid_size: Tuple[int, int], num_prefix_tokens: int) -> np.ndarray:
    """(S, S) index into a table of (2gh-1)(2gw-1) 2-D offsets, plus one slot for prefix pairs."""
    gh, gw = grid_size
    y, x = np.mgrid[:gh, :gw]
    y, x = y.reshape(-1), x.reshape(-1)
    dy = y[:, None] - y[None, :] + gh - 1
    dx = x[:, None] - x[None, :] + gw - 1
    idx = dy * (2 * gw - 1) + dx
    if num_prefix_tokens:
        n = gh * gw
        full = np.full((n + num_prefix_tokens,) * 2, (2 * gh - 1) * (2 * gw - 1), dtype=np.int64)
        full[num_prefix_tokens:, num_prefix_tokens:] = idx
        idx = full
    return idx.astype("int32")


@_REG
class MultiHeadSelfAttention(layers.Layer):
    """Multi-head self-attention with weights in the official checkpoint layout.

    query/key/value kernels (D, heads, head_dim) with biases (heads, head_dim); out kernel
    (heads, head_dim, D). On JAX it uses keras.ops.dot_product_attention (fused GPU kernels, in
    any precision: JAX keeps the logits and softmax in float32); on TensorFlow and torch, and
    whenever the probabilities are asked for (inspection) or attention dropout is active, it
    uses heads-major batched matmuls with the softmax in float32, which
    measured faster on CPU and export to a smaller ONNX graph (BENCHMARKS.md).
    With `relative_grid` set, a learned embedding per 2-D offset between patches is used as
    keys of an extra attention whose logits are added as a bias (paper Appendix D.4).
    """

    def __init__(self, num_heads: int, dropout_rate: float = 0.0,
                 relative_grid: Optional[Sequence[int]] = None, num_prefix_tokens: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dropout_rate = float(dropout_rate)
        self.relative_grid = None if relative_grid is None else tuple(int(g) for g in relative_grid)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.dropout = layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)

    def build(self, input_shape):
        d = input_shape[-1]
        h = self.num_heads
        hd = d // h
        self.head_dim = hd
        kinit = keras.initializers.GlorotUniform()
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_kernel", self.add_weight(shape=(d, h, hd), initializer=kinit, name=f"{name}_kernel"))
            setattr(self, f"{name}_bias", self.add_weight(shape=(h, hd), initializer="zeros", name=f"{name}_bias"))
        self.out_kernel = self.add_weight(shape=(h, hd, d), initializer=kinit, name="out_kernel")
        self.out_bias = self.add_weight(shape=(d,), initializer="zeros", name="out_bias")
        if self.relative_grid is not None:
            gh, gw = self.relative_grid
            n_off = (2 * gh - 1) * (2 * gw - 1) + (1 if self.num_prefix_tokens else 0)
            self.relative_embedding = self.add_weight(
                shape=(n_off, h, hd), initializer=keras.initializers.RandomNormal(stddev=_INIT_STD),
                name="relative_embedding")
            self._rel_index = relative_position_index(self.relative_grid, self.num_prefix_tokens)
        self.dropout.build((None, h, None, None))
        self.built = True

    def _qkv(self, x, scale: float):
        """q (pre-scaled by `scale`), k, v as (B, heads, S, head_dim) from ONE (D, 3D) matmul.

        The three official (D, heads, head_dim) kernels stay the stored weights; they are
        flattened and concatenated per call (a D x 3D copy, nothing next to the matmul), so
        the projection is a single large GEMM instead of three 4-D einsums, and the softmax
        scale is folded into the query columns instead of multiplying the (S, S) logits.
        """
        d = x.shape[-1]
        h, hd = self.num_heads, self.head_dim
        flat = h * hd
        kernel = ops.concatenate([ops.reshape(self.query_kernel, (d, flat)) * scale,
                                  ops.reshape(self.key_kernel, (d, flat)),
                                  ops.reshape(self.value_kernel, (d, flat))], axis=-1)
        bias = ops.concatenate([ops.reshape(self.query_bias, (flat,)) * scale,
                                ops.reshape(self.key_bias, (flat,)),
                                ops.reshape(self.value_bias, (flat,))], axis=-1)
        seq = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        # Rank-2 GEMM on (B*S, D): a rank-3 x rank-2 matmul becomes tf.tensordot on TensorFlow,
        # whose dynamic-shape plumbing (Shape/Gather/ReduceProd/Concat) lands in the ONNX graph.
        qkv = ops.matmul(ops.reshape(x, (-1, d)), ops.cast(kernel, x.dtype)) + ops.cast(bias, x.dtype)
        # Heads-major (3, B, heads, S, head_dim): the attention products are plain batched GEMMs.
        qkv = ops.transpose(ops.reshape(qkv, (-1, seq, 3, h, hd)), (2, 0, 3, 1, 4))
        # unstack, not qkv[0]/[1]/[2]: TF differentiates three strided slices as three
        # full-size StridedSliceGrad scatters (a quarter of the non-XLA step); Unpack's gradient is one Pack.
        q, k, v = ops.unstack(qkv, 3, axis=0)
        return q, k, v

    def _relative_bias(self, q):
        """(B, heads, S, S) logits of the query against the relative-offset embeddings."""
        table = ops.cast(self.relative_embedding, q.dtype)
        scores = ops.einsum("bhtk,ohk->bhto", q, table)  # (B, H, S, offsets)
        s = q.shape[2]
        idx = ops.convert_to_tensor(self._rel_index[None, None])  # (1, 1, S, S)
        idx = ops.broadcast_to(idx, (ops.shape(scores)[0], self.num_heads, s, s))
        return ops.take_along_axis(scores, idx, axis=-1)

    def call(self, x, training=None, return_attention_scores: bool = False):
        scale = 1.0 / math.sqrt(self.head_dim)
        q, k, v = self._qkv(x, scale)  # q already carries the softmax scale
        bias = None
        if self.relative_grid is not None:
            bias = self._relative_bias(q)  # from the scaled query: the bias is scaled too
        explicit = return_attention_scores or (training and self.dropout_rate > 0)
        if not explicit and keras.backend.backend() == "jax":
            # JAX's fused attention (cuDNN flash attention on GPU) takes (B, S, heads, head_dim);
            # with bf16/fp16 inputs it accumulates the logits and the softmax in float32.
            out = ops.dot_product_attention(*(ops.swapaxes(t, 1, 2) for t in (q, k, v)), bias=bias, scale=1.0)
            probs = None
        else:
            # Batched GEMMs in heads-major layout (what ops.dot_product_attention lowers to on
            # TF/torch CPU, minus its 4-D einsum transposes and dynamic-shape ops in exports).
            logits = ops.cast(ops.matmul(q, ops.swapaxes(k, -1, -2)), "float32")  # (B, H, S, S)
            if bias is not None:
                logits = logits + ops.cast(bias, "float32")
            probs = ops.softmax(logits, axis=-1)
            dropped = self.dropout(probs, training=training) if explicit else probs
            out = ops.swapaxes(ops.matmul(ops.cast(dropped, v.dtype), v), 1, 2)  # (B, S, H, hd)
            if not return_attention_scores:
                probs = None
        d = self.out_kernel.shape[-1]
        seq = out.shape[1] if out.shape[1] is not None else ops.shape(out)[1]
        # (B*S, heads*head_dim) @ (heads*head_dim, D): one GEMM, same weights as the 4-D einsum.
        kernel = ops.reshape(ops.cast(self.out_kernel, out.dtype), (d, d))
        y = ops.matmul(ops.reshape(out, (-1, d)), kernel) + ops.cast(self.out_bias, out.dtype)
        y = ops.reshape(y, (-1, seq, d))
        if return_attention_scores:
            return y, probs
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "dropout_rate": self.dropout_rate,
                "relative_grid": None if self.relative_grid is None else list(self.relative_grid),
                "num_prefix_tokens": self.num_prefix_tokens}


@_REG
class DropPath(layers.Layer):
    """Stochastic depth: drops the whole residual branch per sample with probability `rate`."""

    def __init__(self, rate: float = 0.0, seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None

    def call(self, x, training=None):
        if not training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (ops.shape(x)[0],) + (1,) * (len(x.shape) - 1)
        mask = keras.random.uniform(shape, seed=self.seed_generator, dtype=x.dtype) < keep
        return ops.where(mask, x / ops.cast(keep, x.dtype), ops.zeros_like(x))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


@_REG
class MlpBlock(layers.Layer):
    """MLP of the encoder block: Dense(mlp_dim) -> GELU -> dropout -> Dense(D) -> dropout."""

    def __init__(self, mlp_dim: int, dropout_rate: float = 0.0, gelu_approximate: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.gelu_approximate = bool(gelu_approximate)
        dense = dict(kernel_initializer="glorot_uniform",
                     bias_initializer=keras.initializers.RandomNormal(stddev=1e-6), dtype=self.dtype_policy)
        self.dense_0 = layers.Dense(self.mlp_dim, name="Dense_0", **dense)
        self.dense_1 = None
        self.dense_kwargs = dense
        self.dropout = layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.dense_0.build(input_shape)
        self.dense_1 = layers.Dense(input_shape[-1], name="Dense_1", **self.dense_kwargs)
        self.dense_1.build(tuple(input_shape[:-1]) + (self.mlp_dim,))
        self.dropout.build(input_shape)
        self.built = True

    def call(self, x, training=None):
        # The Dense layers run on (tokens, features): a rank-2 input is a plain GEMM (rank 3 would
        # be tf.tensordot, whose shape ops land in exported graphs). Calling the layers, not their
        # kernels, keeps what Keras adds to them working: model.quantize(...) and enable_lora.
        d = x.shape[-1]
        shape = tuple(x.shape) if all(n is not None for n in x.shape[1:]) else ops.shape(x)
        h = self.dense_0(ops.reshape(x, (-1, d)))
        h = self.dropout(ops.gelu(h, approximate=self.gelu_approximate), training=training)
        h = self.dense_1(h)
        out = ops.reshape(h, (-1,) + tuple(shape[1:]) if isinstance(shape, tuple) else shape)
        return self.dropout(out, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mlp_dim": self.mlp_dim, "dropout_rate": self.dropout_rate,
                "gelu_approximate": self.gelu_approximate}


def _layer_norm(norm: layers.LayerNormalization, x):
    """`norm`'s LayerNorm over the last axis, in float32, written out on (tokens, features).

    Same weights and result as calling the Keras layer; the explicit
    ReduceMean-Sub-Pow-ReduceMean-Add-Sqrt-Div form on a rank-2 tensor is what
    onnxruntime's optimizer fuses into one LayerNormalization node (tf.nn.moments on a
    rank-3 tensor exports as GlobalAveragePool chains that it cannot fuse).
    """
    shape = tuple(x.shape) if all(n is not None for n in x.shape[1:]) else ops.shape(x)
    d = x.shape[-1]
    h = ops.reshape(ops.cast(x, "float32"), (-1, d))
    centred = h - ops.mean(h, axis=-1, keepdims=True)
    var = ops.mean(ops.power(centred, 2), axis=-1, keepdims=True)
    h = centred / ops.sqrt(var + norm.epsilon) * norm.gamma + norm.beta
    return ops.reshape(h, (-1,) + tuple(shape[1:]) if isinstance(shape, tuple) else shape)


@_REG
class TransformerBlock(layers.Layer):
    """Pre-norm encoder block (Eq. 2-3): z' = MSA(LN(z)) + z;  z = MLP(LN(z')) + z'."""

    def __init__(self, num_heads: int, mlp_dim: int, dropout_rate: float = 0.0,
                 attention_dropout_rate: float = 0.0, drop_path_rate: float = 0.0,
                 gelu_approximate: bool = True, layer_norm_epsilon: float = 1e-6,
                 relative_grid: Optional[Sequence[int]] = None, num_prefix_tokens: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout_rate = float(attention_dropout_rate)
        self.drop_path_rate = float(drop_path_rate)
        self.gelu_approximate = bool(gelu_approximate)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.relative_grid = None if relative_grid is None else tuple(int(g) for g in relative_grid)
        self.num_prefix_tokens = int(num_prefix_tokens)
        policy = self.dtype_policy
        self.norm_1 = layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="LayerNorm_0", dtype="float32")
        self.attention = MultiHeadSelfAttention(
            self.num_heads, self.attention_dropout_rate, relative_grid=self.relative_grid,
            num_prefix_tokens=self.num_prefix_tokens, name="MultiHeadDotProductAttention_1", dtype=policy)
        self.dropout = layers.Dropout(self.dropout_rate, dtype=policy)
        self.norm_2 = layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="LayerNorm_2", dtype="float32")
        self.mlp = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu_approximate, name="MlpBlock_3", dtype=policy)
        self.drop_path = DropPath(self.drop_path_rate, dtype=policy)

    def build(self, input_shape):
        self.norm_1.build(input_shape)
        self.attention.build(input_shape)
        self.norm_2.build(input_shape)
        self.mlp.build(input_shape)
        # Built here too, as the functional model never traces this call: model.quantize()
        # refuses a model with unbuilt layers.
        self.dropout.build(input_shape)
        self.drop_path.build(input_shape)
        self.built = True

    def call(self, x, training=None, return_attention_scores: bool = False):
        y = ops.cast(_layer_norm(self.norm_1, x), self.compute_dtype)
        y = self.attention(y, training=training, return_attention_scores=return_attention_scores)
        if return_attention_scores:
            y, probs = y
        y = self.dropout(y, training=training)
        x = ops.cast(x, self.compute_dtype) + self.drop_path(y, training=training)
        y = ops.cast(_layer_norm(self.norm_2, x), self.compute_dtype)
        x = x + self.drop_path(self.mlp(y, training=training), training=training)
        if return_attention_scores:
            return x, probs
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "mlp_dim": self.mlp_dim,
                "dropout_rate": self.dropout_rate, "attention_dropout_rate": self.attention_dropout_rate,
                "drop_path_rate": self.drop_path_rate, "gelu_approximate": self.gelu_approximate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "relative_grid": None if self.relative_grid is None else list(self.relative_grid),
                "num_prefix_tokens": self.num_prefix_tokens}


@_REG
class PatchGrid(layers.Layer):
    """Token sequence (B, prefix + gh*gw, D) -> patch map (B, gh, gw, D): prefix (class) tokens dropped."""

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
class TokenPooling(layers.Layer):
    """y = LN(z_L) pooled: the class token ("token") or the mean of the patch tokens ("gap")."""

    def __init__(self, classifier: str = "token", **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier

    def call(self, x):
        if self.classifier == "token":
            return x[:, 0]
        return ops.mean(x, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "classifier": self.classifier}
