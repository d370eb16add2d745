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


def _scoped_layer_norm_with_gradient(norm: layers.LayerNormalization, out_dtype, scope):
    """LayerNorm on (tokens, features) in float32 with its gradient written out, both in `scope`.

    Why: TensorFlow's GradientTape does not carry an XLA scope over to the gradient ops, so in the
    scoped bf16 step (layers.fusion) TensorFlow's own LayerNorm gradient ran op by op (Sum, Tile,
    RealDiv, ... over every token). Written out here: dgamma = sum(dy xhat), dbeta = sum(dy),
    dx = r (dy gamma - mean(dy gamma) - xhat mean(dy gamma xhat)), r = 1 / sqrt(var + eps).
    ViT-B/16 scoped bf16 step: 1.020x (bench.train_ab --without ln-gradient, Zen 4, BENCHMARKS.md). The row means
    are `layers.fusion.row_mean`'s (GEMVs on AMX, where XLA's row reductions are serial).
    """

    from keras_vit.layers.fusion import row_mean

    @ops.custom_gradient
    def layer_norm(x, gamma, beta):
        with scope():
            h = ops.cast(x, "float32")
            centred = h - row_mean(h)
            r = ops.rsqrt(row_mean(centred * centred) + norm.epsilon)
            xhat = centred * r
            y = ops.cast(xhat * gamma + beta, out_dtype)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            with scope():  # the gradient's ops are made later, outside the forward's scope
                dy = ops.cast(upstream, "float32")
                dxhat = dy * gamma
                dx = r * (dxhat - row_mean(dxhat) - xhat * row_mean(dxhat * xhat))
                return ops.cast(dx, x.dtype), ops.sum(dy * xhat, axis=0), ops.sum(dy, axis=0)

        return y, grad

    return layer_norm


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
