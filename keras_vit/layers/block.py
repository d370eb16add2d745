"""The pre-norm encoder block (Eq. 2-3) and its parts: MlpBlock (plain or SwiGLU), DropPath
(stochastic depth), LayerScale."""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence

import keras
from keras import layers, ops

from keras_vit.layers.attention import MultiHeadSelfAttention
from keras_vit.layers.fusion import (
    add_bias,
    bias_after_reshape,
    bias_gradient,
    cpu_scoped,
    exact_bias_gradients,
    fused_elementwise,
    gemm,
    residual_add,
    separate_bias,
    tf_training_forms,
)
from keras_vit.layers.norm import layer_norm, residual_layer_norm

_REG = keras.saving.register_keras_serializable(package="keras_vit")

# False (or KERAS_VIT_FUSED_RESIDUALS=0): the blocks' residual adds as TensorFlow ops (bench.train_ab's `--without
# fused-residuals`; the environment variable for a whole run, such as the digits check).
FUSED_RESIDUALS = True
FUSED_RESIDUALS_ENV = "KERAS_VIT_FUSED_RESIDUALS"


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
class LayerScale(layers.Layer):
    """Per-channel gains on a residual branch, x * gamma, gamma (D,) initialised to `init_value`
    (CaiT / DeiT-III / DINOv2; timm `LayerScale`, `ls1.gamma` / `ls2.gamma`)."""

    def __init__(self, init_value: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        self.init_value = float(init_value)

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.init_value),
                                     name="scale")
        self.built = True

    def call(self, x):
        return x * ops.cast(self.scale, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init_value": self.init_value}


def _with_input_gradient(value, slope, scope=contextlib.nullcontext, bias: bool = False):
    """x -> value(x) in float32, cast back, whose gradient upstream * slope(x) is recomputed from x alone.

    Why: TensorFlow differentiates an op-by-op activation by keeping its intermediates (five
    (tokens, mlp_dim) tensors per block for the tanh GELU) and running every op's gradient in the
    compute dtype (bf16 under mixed precision); this gradient reads x and the upstream gradient once,
    a single fused pass under XLA (`scope`: layers.fusion's, where the scoped bf16 step gives one).
    With `bias`, (x, b) -> value(x + b) for a GEMM output x and its float32 bias b, whose gradient also
    gives b's (layers.fusion.bias_gradient): the add joins the activation's fused passes instead of running
    as a TensorFlow op (layers.fusion.cpu_scoped).
    """

    def forward_and_grad(x, b):
        def preactivation():  # float32; the gradient computes it again from x rather than keep it
            return ops.cast(x, "float32") if b is None else ops.cast(x, "float32") + b

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            with scope():  # the gradient's ops are made later, outside the forward's scope
                dx = ops.cast(ops.cast(upstream, "float32") * slope(preactivation()), x.dtype)
            # the bias gradient outside the scope, a GEMM (XLA's column reduction measured slower)
            return dx if b is None else (dx, ops.cast(bias_gradient(dx), b.dtype))

        return ops.cast(value(preactivation()), x.dtype), grad

    if bias:
        @ops.custom_gradient
        def biased_activation(x, b):
            with scope():
                return forward_and_grad(x, b)

        return biased_activation

    @ops.custom_gradient
    def activation(x):
        with scope():
            return forward_and_grad(x, None)

    return activation


def _gelu_with_input_gradient(approximate: bool, scope=contextlib.nullcontext, bias: bool = False):
    """GELU (`ops.gelu`'s function) with its gradient recomputed from its input (`_with_input_gradient`).
    ViT-B/16 bf16 training: +3-5% (BENCHMARKS.md)."""
    c = math.sqrt(2.0 / math.pi)

    def value(x32):
        if approximate:  # 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
            return 0.5 * x32 * (1.0 + ops.tanh(c * (x32 + 0.044715 * x32 * x32 * x32)))
        return 0.5 * x32 * (1.0 + ops.erf(x32 / math.sqrt(2.0)))  # x Phi(x)

    def slope(x32):
        if approximate:
            x2 = x32 * x32
            t = ops.tanh(c * (x32 + 0.044715 * x2 * x32))
            return 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x2)
        return 0.5 * (1.0 + ops.erf(x32 / math.sqrt(2.0))) + x32 * ops.exp(-0.5 * x32 * x32) / math.sqrt(2.0 * math.pi)

    return _with_input_gradient(value, slope, scope, bias)


def _quick_gelu_with_input_gradient(scope=contextlib.nullcontext, bias: bool = False):
    """quick_gelu, x s with s = sigmoid(1.702 x), slope s + 1.702 x s (1 - s) (`_with_input_gradient`)."""

    def slope(x32):
        s = ops.sigmoid(1.702 * x32)
        return s + 1.702 * x32 * s * (1.0 - s)

    return _with_input_gradient(lambda x32: x32 * ops.sigmoid(1.702 * x32), slope, scope, bias)


def _swiglu_with_input_gradient(mlp_dim: int, scope=contextlib.nullcontext):
    """(tokens, 2 mlp_dim) -> silu(x1) x2 in float32, cast back, x1 the first half; its gradient
    (g x2 silu'(x1), g silu(x1)), silu'(a) = s (1 + a (1 - s)), recomputed from the input in one pass
    (TensorFlow's own keeps the intermediates and scatters each half's gradient with a slice gradient)."""

    @ops.custom_gradient
    def swiglu(h):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            with scope():
                g = ops.cast(upstream, "float32")
                a, b = ops.cast(h[..., :mlp_dim], "float32"), ops.cast(h[..., mlp_dim:], "float32")
                s = ops.sigmoid(a)
                return ops.cast(ops.concatenate([g * b * s * (1.0 + a * (1.0 - s)), g * a * s], axis=-1), h.dtype)

        with scope():
            a, b = ops.cast(h[..., :mlp_dim], "float32"), ops.cast(h[..., mlp_dim:], "float32")
            return ops.cast(ops.silu(a) * b, h.dtype), grad

    return swiglu


def _quick_gelu(x):
    """quick_gelu op by op in x's dtype, Mul(x, Sigmoid(Mul(x, 1.702))): the form exports fuse (see `activate`)."""
    return x * ops.sigmoid(x * ops.cast(1.702, x.dtype))


def _swiglu(h, mlp_dim: int):
    """SwiGLU op by op in h's dtype: silu of the first half times the second."""
    return ops.silu(h[..., :mlp_dim]) * h[..., mlp_dim:]


def gelu(x, approximate: bool = True, training=None, bias=None):
    """`ops.gelu`; in bf16/fp16 training on TensorFlow, the form with the cheaper gradient above.

    In float32 under XLA (the small-model default) TensorFlow's own gradient is faster (measured
    -13% with this one at ViT-Ti/16), so float32 keeps it, but for its scoped step on an AMX CPU
    (layers.fusion.float32_scoped, `tf_training_forms`). Inference, and so every exported
    file, keeps `ops.gelu`'s graph, which onnxruntime and the TFLite converter fuse; JAX and
    torch keep their own autodiff of it. `bias` (float32), where given, is added first (`activate`).
    """
    if tf_training_forms(x, training):
        scope = lambda: fused_elementwise(training, x.dtype)  # noqa: E731
        return (_gelu_with_input_gradient(approximate, scope)(x) if bias is None
                else _gelu_with_input_gradient(approximate, scope, bias=True)(x, bias))
    return ops.gelu(x if bias is None else x + ops.cast(bias, x.dtype), approximate=approximate)


def activate(x, activation: str = "gelu", approximate: bool = True, training=None, bias=None):
    """The MLP's nonlinearity: "gelu" (see `gelu`) or "quick_gelu", x sigmoid(1.702 x) (OpenAI CLIP),
    in the compute dtype like ops.gelu. Written Mul(x, Sigmoid(Mul(x, 1.702))), the operand order
    onnxruntime's QuickGelu fusion reads (the constant first crashes it). TensorFlow training where
    `tf_training_forms` (bf16/fp16; float32's scoped step on AMX) takes the recomputed-gradient form, as the GELU
    does. `bias` (float32), where given, is the GEMM's bias x lacks: added first, in the activation's scope and
    gradient in that form."""
    if activation == "quick_gelu":
        if tf_training_forms(x, training):
            scope = lambda: fused_elementwise(training, x.dtype)  # noqa: E731
            return (_quick_gelu_with_input_gradient(scope)(x) if bias is None
                    else _quick_gelu_with_input_gradient(scope, bias=True)(x, bias))
        return _quick_gelu(x if bias is None else x + ops.cast(bias, x.dtype))
    return gelu(x, approximate, training, bias)


def swiglu(h, mlp_dim: int, training=None):
    """silu(h[..., :mlp_dim]) * h[..., mlp_dim:] on (..., 2 mlp_dim); TensorFlow training where `tf_training_forms`
    (bf16/fp16; float32's scoped step on AMX) takes the recomputed-gradient form, as the GELU does."""
    if tf_training_forms(h, training):
        return _swiglu_with_input_gradient(mlp_dim, lambda: fused_elementwise(training, h.dtype))(h)
    return _swiglu(h, mlp_dim)


@_REG
class MlpBlock(layers.Layer):
    """MLP of the encoder block: Dense(mlp_dim) -> GELU (or quick_gelu) -> dropout -> Dense(D) -> dropout.

    kind="swiglu": Dense_0 to 2 mlp_dim, halves x1 (first), x2; silu(x1) * x2 -> dropout -> Dense_1 (timm
    `SwiGLUPacked`, DINOv2 `SwiGLUFFNFused`); `activation` does not apply.
    """

    def __init__(self, mlp_dim: int, dropout_rate: float = 0.0, gelu_approximate: bool = True,
                 activation: str = "gelu", kind: str = "mlp", **kwargs):
        super().__init__(**kwargs)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.gelu_approximate = bool(gelu_approximate)
        self.activation = str(activation)
        self.kind = str(kind)
        dense = dict(kernel_initializer="glorot_uniform",
                     bias_initializer=keras.initializers.RandomNormal(stddev=1e-6), dtype=self.dtype_policy)
        self.dense_0 = layers.Dense(self.mlp_dim * (2 if self.kind == "swiglu" else 1), name="Dense_0", **dense)
        self.dense_1 = None
        self.dense_kwargs = dense
        self.dropout = layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)

    def build(self, input_shape):
        self.dense_0.build(input_shape)
        self.dense_1 = layers.Dense(input_shape[-1], name="Dense_1", **self.dense_kwargs)
        self.dense_1.build(tuple(input_shape[:-1]) + (self.mlp_dim,))
        self.dropout.build(input_shape)
        self.built = True

    def call(self, x, training=None, defer_bias: bool = False):
        """`defer_bias` (where `separate_bias`, no dropout, not quantized): (the output without Dense_1's bias, that
        bias in float32), for the block's fused residual add."""
        # The Dense layers run on (tokens, features): a rank-2 input is a plain GEMM (rank 3 would
        # be tf.tensordot, whose shape ops land in exported graphs). Calling the layers, not their
        # kernels, keeps what Keras adds to them working: model.quantize(...) and enable_lora.
        # Bf16/fp16 training on TensorFlow on AMX adds each bias after a reshape (layers.fusion): `_apart`.
        d = x.shape[-1]
        shape = tuple(x.shape) if all(n is not None for n in x.shape[1:]) else ops.shape(x)
        if separate_bias(x, training):
            if defer_bias:
                return self._apart(x, shape, training, defer_bias=True)
            return self.dropout(self._apart(x, shape, training), training=training)
        dense = self._dense_exact if exact_bias_gradients(x, training) and self.dense_0.quantization_mode is None \
            and self.dense_1.quantization_mode is None else (lambda layer, t: layer(t))
        h = self._nonlinearity(dense(self.dense_0, ops.reshape(x, (-1, d))), training)
        h = dense(self.dense_1, self.dropout(h, training=training))
        return self.dropout(ops.reshape(h, (-1,) + tuple(shape[1:]) if isinstance(shape, tuple) else shape),
                            training=training)

    @staticmethod
    def _dense_exact(dense: layers.Dense, t):
        """`dense(t)` as Keras computes it (the kernel property carries LoRA's update), its bias added by `add_bias`:
        the bias gradient accumulated in float32 (layers.fusion.exact_bias_gradients)."""
        return add_bias(ops.matmul(t, ops.cast(dense.kernel, t.dtype)), dense.bias)

    def _nonlinearity(self, h, training, bias=None):
        """SwiGLU, or the activation (`bias`, a float32 bias h lacks, for the activation only: `activate`)."""
        if self.kind == "swiglu":
            return swiglu(h, self.mlp_dim, training)
        return activate(h, self.activation, self.gelu_approximate, training, bias=bias)

    def _apart(self, x, shape, training, defer_bias: bool = False):
        """The MLP with each GEMM alone and its bias after a reshape (layers.fusion.bias_after_reshape); in the
        scoped step Dense_0's bias joins the GELU / quick_gelu's scope (layers.fusion.cpu_scoped). The kernel
        property carries LoRA's update where enabled; quantized layers keep their call, on rank-3 inputs
        (tensordot's reshape comes before the bias there)."""
        if self.dense_0.quantization_mode is not None or self.dense_1.quantization_mode is not None:
            return self.dense_1(self.dropout(self._nonlinearity(self.dense_0(x), training), training=training))

        def dense_gemm(dense, t):
            return gemm(ops.reshape(t, (-1, t.shape[-1])), ops.cast(dense.kernel, t.dtype), training)

        def tokens(width):  # (B, S, ..., width)
            return ((-1,) + tuple(shape[1:-1]) + (width,) if isinstance(shape, tuple)
                    else ops.concatenate([shape[:-1], [width]], axis=0))

        width = self.dense_0.units
        h = dense_gemm(self.dense_0, x)
        if self.kind != "swiglu" and cpu_scoped(x, training):
            h = self._nonlinearity(ops.reshape(h, tokens(width)), training, bias=ops.cast(self.dense_0.bias, "float32"))
        else:
            h = self._nonlinearity(bias_after_reshape(h, tokens(width), self.dense_0.bias), training)
        h = self.dropout(h, training=training)
        if defer_bias:
            return ops.reshape(dense_gemm(self.dense_1, h), tokens(self.dense_1.units)), \
                ops.cast(self.dense_1.bias, "float32")
        return bias_after_reshape(dense_gemm(self.dense_1, h), tokens(self.dense_1.units), self.dense_1.bias)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mlp_dim": self.mlp_dim, "dropout_rate": self.dropout_rate,
                "gelu_approximate": self.gelu_approximate, "activation": self.activation, "kind": self.kind}


def _queries(class_token_only: bool, num_queries: Optional[int]) -> Optional[int]:
    """The leading tokens a block computes (None: all); class_token_only is num_queries=1."""
    if num_queries is not None and (isinstance(num_queries, bool) or not isinstance(num_queries, int)
                                    or num_queries < 1):
        raise ValueError(f"num_queries must be an integer >= 1 or None, got {num_queries!r}")
    if class_token_only and num_queries not in (None, 1):
        raise ValueError(f"class_token_only computes 1 token; got num_queries={num_queries}")
    return 1 if class_token_only else num_queries


@_REG
class TransformerBlock(layers.Layer):
    """Pre-norm encoder block (Eq. 2-3): z' = MSA(LN(z)) + z;  z = MLP(LN(z')) + z'.

    The ViT family's block options (issue #26): `layer_scale_init` multiplies each branch by
    LayerScale gains (z' = gamma_1 * MSA(LN(z)) + z, ...); `qk_norm` normalises queries and keys
    per head; `activation` ("gelu" | "quick_gelu") and `mlp_kind` ("mlp" | "swiglu") shape the MLP;
    `qkv_bias=False` leaves the query/key/value projections without biases.
    """

    def __init__(self, num_heads: int, mlp_dim: int, dropout_rate: float = 0.0,
                 attention_dropout_rate: float = 0.0, drop_path_rate: float = 0.0,
                 gelu_approximate: bool = True, layer_norm_epsilon: float = 1e-6,
                 relative_grid: Optional[Sequence[int]] = None, num_prefix_tokens: int = 1,
                 layer_scale_init: Optional[float] = None, qk_norm: bool = False, activation: str = "gelu",
                 mlp_kind: str = "mlp", qkv_bias: bool = True, **kwargs):
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
        self.layer_scale_init = None if layer_scale_init is None else float(layer_scale_init)
        self.qk_norm = bool(qk_norm)
        self.activation = str(activation)
        self.mlp_kind = str(mlp_kind)
        self.qkv_bias = bool(qkv_bias)
        policy = self.dtype_policy
        self.norm_1 = layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="LayerNorm_0", dtype="float32")
        self.attention = MultiHeadSelfAttention(
            self.num_heads, self.attention_dropout_rate, relative_grid=self.relative_grid,
            num_prefix_tokens=self.num_prefix_tokens, qk_norm=self.qk_norm,
            layer_norm_epsilon=self.layer_norm_epsilon, qkv_bias=self.qkv_bias, name="MultiHeadDotProductAttention_1",
            dtype=policy)
        self.dropout = layers.Dropout(self.dropout_rate, dtype=policy)
        self.norm_2 = layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="LayerNorm_2", dtype="float32")
        self.mlp = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu_approximate, activation=self.activation,
                            kind=self.mlp_kind, name="MlpBlock_3", dtype=policy)
        self.drop_path = DropPath(self.drop_path_rate, dtype=policy)
        # LayerScale_0 after the attention, LayerScale_1 after the MLP (the canonical checkpoint names).
        self.layer_scale = None
        if self.layer_scale_init is not None:
            self.layer_scale = [LayerScale(self.layer_scale_init, name=f"LayerScale_{j}", dtype=policy) for j in (0, 1)]

    def build(self, input_shape):
        self.norm_1.build(input_shape)
        self.attention.build(input_shape)
        self.norm_2.build(input_shape)
        self.mlp.build(input_shape)
        for scale in self.layer_scale or ():
            scale.build(input_shape)
        # Built here too, as the functional model never traces this call: model.quantize()
        # refuses a model with unbuilt layers.
        self.dropout.build(input_shape)
        self.drop_path.build(input_shape)
        self.built = True

    def call(self, x, training=None, return_attention_scores: bool = False, class_token_only: bool = False,
             num_queries: Optional[int] = None):
        """(B, S, D) -> (B, S, D); with `num_queries` n, (B, n, D): the first n tokens' outputs alone
        (`class_token_only`: n = 1, the class token's).

        Those tokens still attend to every token, so their values are the same; the attention
        of the other tokens, their MLP and LayerNorm are skipped. A last block whose only reader
        is the class-token head runs this way (about 6% fewer FLOPs for a 12-block model), and a
        distilled model's with n = 2 (the class and distillation tokens its two heads read).
        """
        queries = _queries(class_token_only, num_queries)
        if not return_attention_scores and self._fused_residuals(x, training):
            return self._call_fused(x, training, queries)
        y = layer_norm(self.norm_1, x, self.compute_dtype, training)
        y = self.attention(y, training=training, return_attention_scores=return_attention_scores,
                           num_queries=queries)
        if return_attention_scores:
            y, probs = y
        y = self._finish_branch(self.dropout(y, training=training), 0, training)
        if queries is not None:
            x = x[:, :queries]
        x = ops.cast(x, self.compute_dtype) + y
        y = layer_norm(self.norm_2, x, self.compute_dtype, training)
        x = x + self._finish_branch(self.mlp(y, training=training), 1, training)
        if return_attention_scores:
            return x, probs
        return x

    def _fused_residuals(self, x, training) -> bool:
        """Whether the block's residual adds join the LayerNorms' XLA scopes (`_call_fused`): in the AMX scoped step
        in bf16/fp16 (layers.fusion.cpu_scoped), while `FUSED_RESIDUALS` is on. Where TensorFlow ran the adds in bf16
        op by op in Eigen: ViT-B/16 1.026x, Ti/16 1.035x on the AMX Xeon, the same numbers to the bit
        (bench.train_ab --without fused-residuals; BENCHMARKS.md, 2026-12-06)."""
        if not FUSED_RESIDUALS or os.environ.get(FUSED_RESIDUALS_ENV) == "0":
            return False
        if keras.backend.standardize_dtype(self.compute_dtype) == "float32":
            return False  # TensorFlow's float32 adds are vectorised: Ti/16's float32 scoped step 0.987x with it
        return cpu_scoped(ops.cast(x, self.compute_dtype), training)

    def _call_fused(self, x, training, queries):
        """The block as `call` computes it, with the residual stream's adds and gradient sums in the LayerNorms'
        XLA scopes (layers.norm.residual_layer_norm, layers.fusion.residual_add): z' = z + MSA(LN(z)), LN(z') in
        the same pass; z' + MLP(LN(z')) likewise; rounded as TensorFlow's ops round them (layers.fusion.branch_sum).
        A branch that ends in its GEMM's bias (no dropout, stochastic depth or LayerScale after it, no quantized MLP)
        hands the bias over apart, to join the add; otherwise the branch comes whole, as `call` makes it."""
        apart = not (self.dropout_rate or self.drop_path_rate or self.layer_scale)
        z, y = residual_layer_norm(self.norm_1, ops.cast(x, self.compute_dtype), self.compute_dtype, training)
        if apart:
            branch = self.attention(y, training=training, num_queries=queries, defer_bias=True)
        else:
            branch = (self._finish_branch(self.dropout(self.attention(y, training=training, num_queries=queries),
                                                       training=training), 0, training), None)
        if queries is not None:
            z = z[:, :queries]
        z, y = residual_layer_norm(self.norm_2, z, self.compute_dtype, training, branch=branch)
        quantized = self.mlp.dense_0.quantization_mode is not None or self.mlp.dense_1.quantization_mode is not None
        if apart and not quantized:
            g, bias = self.mlp(y, training=training, defer_bias=True)
        else:
            g, bias = self._finish_branch(self.mlp(y, training=training), 1, training), None
        return residual_add(z, g, bias, training)

    def _finish_branch(self, y, index: int, training):
        """A residual branch's end as `call` has it: LayerScale `index` where the block has one, then stochastic depth."""
        if self.layer_scale:
            y = self.layer_scale[index](y)
        return self.drop_path(y, training=training)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, x, training=None, return_attention_scores: bool = False,
                            class_token_only: bool = False, num_queries: Optional[int] = None):
        """Symbolic outputs: the tokens, and with `return_attention_scores` the float32 probabilities."""
        b, s = x.shape[0], x.shape[1]
        queries = _queries(class_token_only, num_queries) or s
        out = keras.KerasTensor((b, queries) + tuple(x.shape[2:]), dtype=self.compute_dtype)
        if not return_attention_scores:
            return out
        return out, keras.KerasTensor((b, self.num_heads, queries, s), dtype="float32")

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "mlp_dim": self.mlp_dim,
                "dropout_rate": self.dropout_rate, "attention_dropout_rate": self.attention_dropout_rate,
                "drop_path_rate": self.drop_path_rate, "gelu_approximate": self.gelu_approximate,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "relative_grid": None if self.relative_grid is None else list(self.relative_grid),
                "num_prefix_tokens": self.num_prefix_tokens, "layer_scale_init": self.layer_scale_init,
                "qk_norm": self.qk_norm, "activation": self.activation, "mlp_kind": self.mlp_kind,
                "qkv_bias": self.qkv_bias}
