"""The blocks' LayerNorm written out on (tokens, features) in float32 (the encoder block's two, and
the per-head query/key norms of qk_norm): one form that onnxruntime fuses and bf16 keeps in float32."""
from __future__ import annotations

import keras
from keras import layers, ops


def _layer_norm(norm: layers.LayerNormalization, x):
    """`norm`'s LayerNorm over the last axis, in float32, written out on (tokens, features).

    Same weights and result as calling the Keras layer; the explicit
    ReduceMean-Sub-Pow-ReduceMean-Add-Sqrt-Div form on a rank-2 tensor is what
    onnxruntime's optimizer fuses into one LayerNormalization node (tf.nn.moments on a
    rank-3 tensor exports as GlobalAveragePool chains that it cannot fuse). Its gradient stays
    TensorFlow's own: a custom one (as for GELU) measured slower at ViT-B/16 bf16 under the fusible
    auto-clustering; only the scoped bf16 step (`layer_norm`) writes it out. On torch,
    Keras' `ops.layer_normalization` (torch's fused LayerNorm, in float32 too).
    """
    if keras.backend.backend() == "torch":  # torch's fused kernel (F.layer_norm): the op-by-op form cost
        # a Ti/16 step 10-40% there (BENCHMARKS.md, 2026-12-04); exports run on TensorFlow only
        return ops.layer_normalization(ops.cast(x, "float32"), norm.gamma, norm.beta, epsilon=norm.epsilon)
    shape = tuple(x.shape) if all(n is not None for n in x.shape[1:]) else ops.shape(x)
    d = x.shape[-1]
    h = ops.reshape(ops.cast(x, "float32"), (-1, d))
    centred = h - ops.mean(h, axis=-1, keepdims=True)
    var = ops.mean(ops.power(centred, 2), axis=-1, keepdims=True)
    h = centred / ops.sqrt(var + norm.epsilon) * norm.gamma + norm.beta
    return ops.reshape(h, (-1,) + tuple(shape[1:]) if isinstance(shape, tuple) else shape)


def _normalized(norm: layers.LayerNormalization, h, gamma, beta, out_dtype):
    """(LayerNorm of float32 `h` in `out_dtype`, r, xhat): the forward of the scoped forms below."""
    from keras_vit.layers.fusion import row_mean

    centred = h - row_mean(h)
    r = ops.rsqrt(row_mean(centred * centred) + norm.epsilon)
    xhat = centred * r
    return ops.cast(xhat * gamma + beta, out_dtype), r, xhat


def _normalized_gradient(upstream, gamma, r, xhat):
    """(dx, dgamma, dbeta) in float32 of `_normalized` for its output's gradient `upstream`."""
    from keras_vit.layers.fusion import row_mean

    dy = ops.cast(upstream, "float32")
    dxhat = dy * gamma
    dx = r * (dxhat - row_mean(dxhat) - xhat * row_mean(dxhat * xhat))
    return dx, ops.sum(dy * xhat, axis=0), ops.sum(dy, axis=0)


def _scoped_layer_norm_with_gradient(norm: layers.LayerNormalization, out_dtype, scope):
    """LayerNorm on (tokens, features) in float32 with its gradient written out, both in `scope`.

    Why: TensorFlow's GradientTape does not carry an XLA scope over to the gradient ops, so in the
    scoped bf16 step (layers.fusion) TensorFlow's own LayerNorm gradient ran op by op (Sum, Tile,
    RealDiv, ... over every token). Written out here: dgamma = sum(dy xhat), dbeta = sum(dy),
    dx = r (dy gamma - mean(dy gamma) - xhat mean(dy gamma xhat)), r = 1 / sqrt(var + eps).
    ViT-B/16 scoped bf16 step: 1.020x (bench.train_ab --without ln-gradient, Zen 4, BENCHMARKS.md). The row means
    are `layers.fusion.row_mean`'s (GEMVs on AMX, where XLA's row reductions are serial).
    """

    @ops.custom_gradient
    def layer_norm(x, gamma, beta):
        with scope():
            y, r, xhat = _normalized(norm, ops.cast(x, "float32"), gamma, beta, out_dtype)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            with scope():  # the gradient's ops are made later, outside the forward's scope
                dx, dgamma, dbeta = _normalized_gradient(upstream, gamma, r, xhat)
                return ops.cast(dx, x.dtype), dgamma, dbeta

        return y, grad

    return layer_norm


def _scoped_residual_layer_norm_with_gradient(norm: layers.LayerNormalization, out_dtype, scope):
    """(x + y, LayerNorm(x + y)) on (tokens, features), the sum rounded to x's dtype, in `scope`; the gradient
    (the sum's own plus the LayerNorm's, to x and y alike) in one too.

    Why: op by op, the residual add is a pass of its own (grappler's AddN with the attention's bias), and in the
    backward pass TensorFlow adds the two gradients of the sum in another (AddN): 23 ms of a Ti/16 scoped step on
    the AMX Xeon, half of them this block-internal sum's (BENCHMARKS.md, 2026-12-05)."""

    @ops.custom_gradient
    def residual_layer_norm(x, y, gamma, beta):
        with scope():
            total = ops.cast(ops.cast(x, "float32") + ops.cast(y, "float32"), x.dtype)
            normed, r, xhat = _normalized(norm, ops.cast(total, "float32"), gamma, beta, out_dtype)

        def grad(*args, upstream=None):
            d_total, d_normed = args if upstream is None else upstream
            with scope():
                dx, dgamma, dbeta = _normalized_gradient(d_normed, gamma, r, xhat)
                dx = ops.cast(dx + ops.cast(d_total, "float32"), x.dtype)
                return dx, ops.cast(dx, y.dtype), dgamma, dbeta

        return (total, normed), grad

    return residual_layer_norm


def layer_norm(norm: layers.LayerNormalization, x, out_dtype, training=None, scale: float = 1.0):
    """`_layer_norm` times `scale` (in float32), cast to `out_dtype`; in the scoped bf16 training step
    (layers.fusion), in an XLA scope with its gradient written out in one too (TensorFlow's own would run op
    by op). `scale` is the attention's 1/sqrt(head_dim) after qk_norm's query norm: there it scales the
    affine's gamma and beta."""
    from keras_vit.layers.fusion import fused_elementwise, scoped

    if not scoped(training, out_dtype):
        y = _layer_norm(norm, x)
        return ops.cast(y * scale if scale != 1.0 else y, out_dtype)
    d = x.shape[-1]
    shape = tuple(x.shape) if all(n is not None for n in x.shape[1:]) else ops.shape(x)
    fn = _scoped_layer_norm_with_gradient(norm, out_dtype, lambda: fused_elementwise(training, out_dtype))
    gamma, beta = ops.cast(norm.gamma, "float32"), ops.cast(norm.beta, "float32")
    if scale != 1.0:
        gamma, beta = gamma * scale, beta * scale
    y = fn(ops.reshape(x, (-1, d)), gamma, beta)
    return ops.reshape(y, (-1,) + tuple(shape[1:]) if isinstance(shape, tuple) else shape)


def residual_layer_norm(norm: layers.LayerNormalization, x, y, out_dtype, training=None):
    """(x + y, `layer_norm(norm, x + y, out_dtype, training)`): the encoder block's first residual sum and the
    LayerNorm that reads it. Where `layers.fusion.amx_scoped`, both (and their gradient) in an XLA scope
    (`_scoped_residual_layer_norm_with_gradient`); elsewhere the two as before."""
    from keras_vit.layers.fusion import amx_scoped, fused_elementwise

    if not amx_scoped(x, training):
        total = x + y
        return total, layer_norm(norm, total, out_dtype, training)
    d = x.shape[-1]
    shape = tuple(x.shape) if all(n is not None for n in x.shape[1:]) else ops.shape(x)
    fn = _scoped_residual_layer_norm_with_gradient(norm, out_dtype, lambda: fused_elementwise(training, out_dtype))
    total, normed = fn(ops.reshape(x, (-1, d)), ops.reshape(y, (-1, d)),
                       ops.cast(norm.gamma, "float32"), ops.cast(norm.beta, "float32"))
    back = (-1,) + tuple(shape[1:]) if isinstance(shape, tuple) else shape
    return ops.reshape(total, back), ops.reshape(normed, back)
