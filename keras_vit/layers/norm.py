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


def _normalise(h, gamma, beta, epsilon: float):
    """LayerNorm's forward on float32 (tokens, features) h: (xhat, 1 / sqrt(var + eps), xhat gamma + beta)."""
    from keras_vit.layers.fusion import row_mean

    centred = h - row_mean(h)
    r = ops.rsqrt(row_mean(centred * centred) + epsilon)
    xhat = centred * r
    return xhat, r, xhat * gamma + beta


def _normalise_gradient(dy, xhat, r, gamma):
    """LayerNorm's gradient from float32 dy: dx = r (dy gamma - mean(dy gamma) - xhat mean(dy gamma xhat)),
    dgamma = sum(dy xhat), dbeta = sum(dy)."""
    from keras_vit.layers.fusion import row_mean

    dxhat = dy * gamma
    dx = r * (dxhat - row_mean(dxhat) - xhat * row_mean(dxhat * xhat))
    return dx, ops.sum(dy * xhat, axis=0), ops.sum(dy, axis=0)


def _scoped_layer_norm_with_gradient(norm: layers.LayerNormalization, out_dtype, scope):
    """LayerNorm on (tokens, features) in float32 with its gradient written out, both in `scope`.

    Why: TensorFlow's GradientTape does not carry an XLA scope over to the gradient ops, so in the
    scoped bf16 step (layers.fusion) TensorFlow's own LayerNorm gradient ran op by op (Sum, Tile,
    RealDiv, ... over every token). Written out here (`_normalise_gradient`).
    ViT-B/16 scoped bf16 step: 1.020x (bench.train_ab --without ln-gradient, Zen 4, BENCHMARKS.md). The row means
    are `layers.fusion.row_mean`'s (GEMVs on AMX, where XLA's row reductions are serial).
    """

    @ops.custom_gradient
    def layer_norm(x, gamma, beta):
        with scope():
            xhat, r, y = _normalise(ops.cast(x, "float32"), gamma, beta, norm.epsilon)
            y = ops.cast(y, out_dtype)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            with scope():  # the gradient's ops are made later, outside the forward's scope
                dx, dgamma, dbeta = _normalise_gradient(ops.cast(upstream, "float32"), xhat, r, gamma)
                return ops.cast(dx, x.dtype), dgamma, dbeta

        return y, grad

    return layer_norm


def _scoped_residual_layer_norm(norm: layers.LayerNormalization, out_dtype, scope):
    """(z, [g, [b,]] gamma, beta) -> (z', LN(z')) on (tokens, features) in `scope`: z' = z + g (+ b) (a residual
    branch g, and where given its GEMM's float32 bias b apart, `layers.fusion.branch_sum`), or z' = z. The gradient
    takes both outputs' upstream gradients: dz' = upstream(z') + LN's input gradient in the same fused pass, rounded
    as TensorFlow's AddN of the two rounds it (`layers.fusion.gradient_sum`), for z and g (b's by
    `layers.fusion.bias_gradient`'s GEMM).

    Why: in the scoped bf16 step the residual stream's adds (the GEMM's bias, then the branch) ran as TensorFlow
    ops in bf16, op by op in Eigen, and the stream's two gradients (past the block, through the LayerNorm) met in
    an AddN: 250 of a B/16 step's 4,350 op-ms on the AMX Xeon (BENCHMARKS.md, 2026-12-06)."""
    from keras_vit.layers.fusion import bias_gradient
    from keras_vit.layers.fusion import branch_sum as _branch_sum
    from keras_vit.layers.fusion import gradient_sum as _gradient_sum

    @ops.custom_gradient
    def residual_norm(z, *args):
        *parts, gamma, beta = args
        with scope():
            z2 = _branch_sum(z, *parts) if parts else z
            xhat, r, y = _normalise(ops.cast(z2, "float32"), gamma, beta, norm.epsilon)
            y = ops.cast(y, out_dtype)

        def grad(*upstream, **kwargs):
            dz, dy = upstream if len(upstream) == 2 else kwargs["upstream"]
            with scope():
                if dy is None:
                    dt, dgamma, dbeta = ops.cast(dz, z.dtype), ops.zeros_like(gamma), ops.zeros_like(beta)
                else:
                    dt, dgamma, dbeta = _normalise_gradient(ops.cast(dy, "float32"), xhat, r, gamma)
                    dt = ops.cast(dt, z.dtype) if dz is None else _gradient_sum(dt, dz, z.dtype)
            grads = [dt] + [ops.cast(dt, part.dtype) for part in parts[:1]]
            grads += [ops.cast(bias_gradient(dt), part.dtype) for part in parts[1:]]
            return (*grads, dgamma, dbeta)

        return (z2, y), grad

    return residual_norm


def residual_layer_norm(norm: layers.LayerNormalization, z, out_dtype, training, branch=None):
    """(z', LN(z')) for the residual stream z in the AMX scoped step (layers.fusion.cpu_scoped): z' = z, or with
    `branch` (g, b) z' = z + g (+ b where b is not None: a GEMM's float32 bias), the add and the LayerNorm in one XLA
    scope and their gradient in one (`_scoped_residual_layer_norm`). z' in z's dtype, LN(z') in `out_dtype`."""
    from keras_vit.layers.fusion import fused_elementwise

    d = z.shape[-1]
    shape = tuple(z.shape) if all(n is not None for n in z.shape[1:]) else ops.shape(z)
    fn = _scoped_residual_layer_norm(norm, out_dtype, lambda: fused_elementwise(training, out_dtype))
    gamma, beta = ops.cast(norm.gamma, "float32"), ops.cast(norm.beta, "float32")
    rows = [ops.reshape(z, (-1, d))]
    if branch is not None:
        rows += [ops.reshape(branch[0], (-1, d))] + ([branch[1]] if branch[1] is not None else [])
    z2, y = fn(*rows, gamma, beta)
    back = (-1,) + tuple(shape[1:]) if isinstance(shape, tuple) else shape
    return ops.reshape(z2, back), ops.reshape(y, back)


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
