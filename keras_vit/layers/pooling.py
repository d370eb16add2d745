"""Multihead attention pooling: big_vision's MAPHead (timm's AttentionPoolLatent), the "map"
classifier of SigLIP: one learned probe query attends over every token, then x + MLP(LN(x))."""
from __future__ import annotations

import math

import keras
from keras import layers, ops

from keras_vit.layers.block import MlpBlock

_REG = keras.saving.register_keras_serializable(package="keras_vit")


@_REG
class MAPHead(layers.Layer):
    """(B, S, D) tokens -> (B, D): a probe (1, 1, D) attends over all S tokens with `num_heads`
    heads (kernels in the checkpoint layout, (D, heads, head_dim) and (heads, head_dim, D)), then
    y = x + MlpBlock(LayerNorm(x)) with `mlp_dim` hidden units (big_vision vit.MAPHead); the MLP's
    `activation` is the encoder's, as timm's AttentionPoolLatent takes the model's act_layer."""

    def __init__(self, num_heads: int, mlp_dim: int, layer_norm_epsilon: float = 1e-6,
                 gelu_approximate: bool = True, activation: str = "gelu", **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.gelu_approximate = bool(gelu_approximate)
        self.activation = str(activation)
        self.norm = layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name="LayerNorm_0", dtype="float32")
        self.mlp = MlpBlock(self.mlp_dim, 0.0, self.gelu_approximate, activation=self.activation, name="MlpBlock_0",
                            dtype=self.dtype_policy)

    def build(self, input_shape):
        d = input_shape[-1]
        h = self.num_heads
        hd = d // h
        glorot = keras.initializers.GlorotUniform()
        self.probe = self.add_weight(shape=(1, 1, d), initializer=glorot, name="probe")
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_kernel", self.add_weight(shape=(d, h, hd), initializer=glorot, name=f"{name}_kernel"))
            setattr(self, f"{name}_bias", self.add_weight(shape=(h, hd), initializer="zeros", name=f"{name}_bias"))
        self.out_kernel = self.add_weight(shape=(h, hd, d), initializer=glorot, name="out_kernel")
        self.out_bias = self.add_weight(shape=(d,), initializer="zeros", name="out_bias")
        self.norm.build((None, d))
        self.mlp.build((None, d))
        self.built = True

    def _project(self, x, name: str):
        """x (N, D) @ the `name` kernel as one (D, D) GEMM, plus its bias."""
        d = x.shape[-1]
        kernel = ops.reshape(ops.cast(getattr(self, f"{name}_kernel"), x.dtype), (d, d))
        return ops.matmul(x, kernel) + ops.reshape(ops.cast(getattr(self, f"{name}_bias"), x.dtype), (d,))

    def call(self, x):
        d = x.shape[-1]
        h = self.num_heads
        hd = d // h
        seq = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        probe = ops.reshape(ops.cast(self.probe, x.dtype), (1, d))
        q = ops.reshape(self._project(probe, "query") * (1.0 / math.sqrt(hd)), (1, h, 1, hd))
        tokens = ops.reshape(x, (-1, d))  # rank 2: plain GEMMs in exported graphs
        k = ops.transpose(ops.reshape(self._project(tokens, "key"), (-1, seq, h, hd)), (0, 2, 3, 1))  # (B, h, hd, S)
        v = ops.transpose(ops.reshape(self._project(tokens, "value"), (-1, seq, h, hd)), (0, 2, 1, 3))  # (B, h, S, hd)
        probs = ops.softmax(ops.cast(ops.matmul(q, k), "float32"), axis=-1)  # (B, h, 1, S)
        out = ops.reshape(ops.matmul(ops.cast(probs, v.dtype), v), (-1, d))  # one query: heads-major = (h, hd)
        y = ops.matmul(out, ops.reshape(ops.cast(self.out_kernel, out.dtype), (d, d))) + ops.cast(self.out_bias, out.dtype)
        return y + self.mlp(ops.cast(self.norm(y), self.compute_dtype))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "num_heads": self.num_heads, "mlp_dim": self.mlp_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon, "gelu_approximate": self.gelu_approximate,
                "activation": self.activation}
