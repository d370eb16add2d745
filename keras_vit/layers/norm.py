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
    TensorFlow's own: a custom one (as for GELU) measured slower at ViT-B/16 bf16. On torch,
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
