"""Multi-head self-attention (Appendix A, Eq. 5-8) with the official checkpoints' kernel
layout, (D, heads, head_dim) and (heads, head_dim, D), and optional relative position bias."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import keras
import numpy as np
from keras import layers, ops

from keras_vit.config import INIT_STD
from keras_vit.layers.fusion import (
    bias_after_reshape,
    bias_gradient,
    cpu_scoped,
    fused_elementwise,
    gemm,
    separate_bias,
    softmax_with_scoped_gradient,
)
from keras_vit.layers.norm import layer_norm

_REG = keras.saving.register_keras_serializable(package="keras_vit")

ATTENTION_PROJECTIONS = ("query", "key", "value")
LORA_TARGETS = ("query", "value")  # peft's and keras-hub's default LoRA targets for ViTs

# False (or KERAS_VIT_FUSED_HEADS=0 for a whole run): the scoped step's QKV bias add and head split as TensorFlow ops
# (bench.train_ab's `--without fused-heads`).
FUSED_HEADS = True
FUSED_HEADS_ENV = "KERAS_VIT_FUSED_HEADS"


def heads_major(qkv, bias, training):
    """q, k, v as (B, heads, S, head_dim) from the QKV GEMM's output `qkv` (B, S, 3, heads, head_dim) and its
    `bias` (3, heads, head_dim, any float dtype) or None: the bias add and the transpose in one XLA pass
    (`fused_elementwise`), the gradient's transpose back in one, the bias's gradient `bias_gradient`'s GEMM. The
    values are those of TensorFlow's ops to the bit (the bias rounded to the compute dtype, the add rounded once).

    Why: in the scoped bf16 step TensorFlow added the bias in bf16 op by op (Eigen's AddV2 with a broadcast), then
    transposed to heads-major (oneDNN's reorder), and its gradient stacked and transposed back: 19 of a Ti/16 step's
    412 op-ms on the AMD Zen 5, 38 of 510 on the AMX Xeon. Measured on the Zen 5 only: 1.001-1.010x, not resolved
    (bench.train_ab --without fused-heads, BENCHMARKS.md, 2026-12-06); kept as bit-identical, for AMX's larger share."""
    dtype = qkv.dtype

    @ops.custom_gradient
    def split(t, *b):
        with fused_elementwise(training, dtype):
            if b:
                t = ops.cast(ops.cast(t, "float32") + ops.cast(ops.cast(b[0], dtype), "float32"), dtype)
            q, k, v = ops.unstack(ops.transpose(t, (2, 0, 3, 1, 4)), 3, axis=0)

        def grad(*upstream, **kwargs):
            parts = upstream if len(upstream) == 3 else kwargs["upstream"]
            with fused_elementwise(training, dtype):
                parts = [ops.zeros_like(q) if g is None else ops.cast(g, dtype) for g in parts]
                dt = ops.transpose(ops.stack(parts, axis=0), (1, 3, 0, 2, 4))
            if not b:
                return dt
            rows = ops.reshape(dt, (-1, math.prod(dt.shape[2:])))
            return dt, ops.reshape(ops.cast(bias_gradient(rows), b[0].dtype), b[0].shape)

        return (q, k, v), grad

    return split(qkv) if bias is None else split(qkv, bias)


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
    measured faster on CPU and export to a smaller ONNX graph (BENCHMARKS.md); bf16 training on an AMX CPU
    runs the softmax in bf16 (layers.fusion.softmax_with_scoped_gradient).
    With `relative_grid` set, a learned embedding per 2-D offset between patches is used as
    keys of an extra attention whose logits are added as a bias (paper Appendix D.4).
    With `qk_norm`, queries and keys are layer-normalised over head_dim (float32, affine
    `query_norm` / `key_norm`, shared by the heads) before their product, as timm's
    `qk_norm=True` (`attn.q_norm`, `attn.k_norm`); the softmax scale then follows the norm.
    With `qkv_bias=False` the query/key/value projections have no biases (timm's `qkv_bias=False`:
    SoViT-150M v2, timm's "sbb" ViTs); the output projection keeps its bias.
    `enable_lora(rank)` adds LoRA factors to the query and value projections (or `targets`), as
    Keras' `Dense.enable_lora` does to a Dense layer: those kernels frozen, A (D, rank) and B (rank,
    D) trained, the projection's kernel kernel + (alpha / rank) A B.
    """

    def __init__(self, num_heads: int, dropout_rate: float = 0.0,
                 relative_grid: Optional[Sequence[int]] = None, num_prefix_tokens: int = 1,
                 qk_norm: bool = False, layer_norm_epsilon: float = 1e-6, qkv_bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dropout_rate = float(dropout_rate)
        self.relative_grid = None if relative_grid is None else tuple(int(g) for g in relative_grid)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.qk_norm = bool(qk_norm)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.qkv_bias = bool(qkv_bias)
        self.lora_enabled = False
        self.lora_rank, self.lora_alpha, self.lora_targets = None, None, ()
        self.dropout = layers.Dropout(self.dropout_rate, dtype=self.dtype_policy)
        self.query_norm = self.key_norm = None
        if self.qk_norm:
            self.query_norm, self.key_norm = (
                layers.LayerNormalization(epsilon=self.layer_norm_epsilon, name=name, dtype="float32")
                for name in ("query_norm", "key_norm"))

    def build(self, input_shape):
        d = input_shape[-1]
        h = self.num_heads
        hd = d // h
        self.head_dim = hd
        kinit = keras.initializers.GlorotUniform()
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_kernel", self.add_weight(shape=(d, h, hd), initializer=kinit, name=f"{name}_kernel"))
            if self.qkv_bias:
                setattr(self, f"{name}_bias", self.add_weight(shape=(h, hd), initializer="zeros", name=f"{name}_bias"))
        self.out_kernel = self.add_weight(shape=(h, hd, d), initializer=kinit, name="out_kernel")
        self.out_bias = self.add_weight(shape=(d,), initializer="zeros", name="out_bias")
        if self.relative_grid is not None:
            gh, gw = self.relative_grid
            n_off = (2 * gh - 1) * (2 * gw - 1) + (1 if self.num_prefix_tokens else 0)
            self.relative_embedding = self.add_weight(
                shape=(n_off, h, hd), initializer=keras.initializers.RandomNormal(stddev=INIT_STD),
                name="relative_embedding")
            self._rel_index = relative_position_index(self.relative_grid, self.num_prefix_tokens)
        if self.qk_norm:
            self.query_norm.build((None, h, None, hd))
            self.key_norm.build((None, h, None, hd))
        self.dropout.build((None, h, None, None))
        self.built = True

    # --- LoRA ------------------------------------------------------------------------------
    def enable_lora(self, rank: int, lora_alpha: Optional[float] = None, targets: Sequence[str] = LORA_TARGETS,
                    a_initializer="he_uniform", b_initializer="zeros") -> None:
        """LoRA on the `targets` projections ("query", "key", "value"; peft's and keras-hub's
        default for ViTs is query and value): each target's kernel is frozen and gets float32
        factors `{target}_lora_a` (D, rank) and `{target}_lora_b` (rank, D), B zero so that the
        layer starts as it was. Once per layer, after it is built (as Dense.enable_lora)."""
        targets = tuple(targets)
        bad = [t for t in targets if t not in ATTENTION_PROJECTIONS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"LoRA targets must be distinct names among {', '.join(ATTENTION_PROJECTIONS)}; "
                             f"got {list(targets)!r}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not self.built:
            raise ValueError("Cannot enable lora on a layer that isn't yet built.")
        if self.lora_enabled:
            raise ValueError("lora is already enabled. This can only be done once per layer.")
        d, flat = self.query_kernel.shape[0], self.num_heads * self.head_dim
        self._tracker.unlock()
        for name in targets:
            setattr(self, f"{name}_lora_a", self.add_weight(
                name=f"{name}_lora_a", shape=(d, rank), initializer=keras.initializers.get(a_initializer),
                dtype="float32"))
            setattr(self, f"{name}_lora_b", self.add_weight(
                name=f"{name}_lora_b", shape=(rank, flat), initializer=keras.initializers.get(b_initializer),
                dtype="float32"))
            getattr(self, f"{name}_kernel").trainable = False
        self._tracker.lock()
        self.lora_enabled = True
        self.lora_rank, self.lora_targets = rank, targets
        self.lora_alpha = float(lora_alpha) if lora_alpha is not None else float(rank)

    def lora_factors(self) -> dict:
        """{variable name: variable} of the LoRA factors, e.g. query_lora_a, query_lora_b, ..."""
        return {f"{t}_lora_{ab}": getattr(self, f"{t}_lora_{ab}") for t in self.lora_targets for ab in "ab"}

    def _projection_kernel(self, name: str, flat: int):
        """The (D, heads * head_dim) kernel of projection `name`, its LoRA update added."""
        kernel = ops.reshape(getattr(self, f"{name}_kernel"), (-1, flat))
        if name in self.lora_targets:
            update = ops.matmul(getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b"))
            kernel = kernel + ops.cast(update * (self.lora_alpha / self.lora_rank), kernel.dtype)
        return kernel

    def merged_kernel(self, name: str) -> np.ndarray:
        """Projection `name`'s kernel as the layer multiplies by it, (D, heads, head_dim): its LoRA
        update merged (what a checkpoint of the fine-tuned model holds)."""
        kernel = getattr(self, f"{name}_kernel")
        return keras.ops.convert_to_numpy(ops.reshape(self._projection_kernel(name, self.num_heads * self.head_dim),
                                                      kernel.shape))

    def save_own_variables(self, store) -> None:
        """As Dense: the LoRA update merged into the kernels it belongs to, the factors not saved
        (keras_vit.save_lora_weights keeps them apart)."""
        if not self.lora_enabled:
            return super().save_own_variables(store)
        factors = {id(v) for v in self.lora_factors().values()}
        merged = {id(getattr(self, f"{t}_kernel")): self.merged_kernel(t) for t in self.lora_targets}
        own = [v for v in self._trainable_variables + self._non_trainable_variables if id(v) not in factors]
        for i, v in enumerate(own):  # the order Layer.save_own_variables gives the layer without LoRA
            store[str(i)] = merged[id(v)] if id(v) in merged else keras.ops.convert_to_numpy(v)

    def load_own_variables(self, store) -> None:
        """A file saved with the LoRA update merged: the kernels take it, the factors start again (B = 0)."""
        if not self.lora_enabled:
            return super().load_own_variables(store)
        factors = {id(v) for v in self.lora_factors().values()}
        own = [v for v in self._trainable_variables + self._non_trainable_variables if id(v) not in factors]
        if len(store.keys()) != len(own):
            raise ValueError(f"layer {self.name!r} expects {len(own)} variables, the file has {len(store.keys())}")
        for i, v in enumerate(own):
            v.assign(store[str(i)])
        for t in self.lora_targets:
            getattr(self, f"{t}_lora_b").assign(np.zeros(getattr(self, f"{t}_lora_b").shape, "float32"))

    def _qkv(self, x, scale: float, training=None):
        """q (pre-scaled by `scale`), k, v as (B, heads, S, head_dim) from ONE (D, 3D) matmul.

        The three official (D, heads, head_dim) kernels stay the stored weights; they are
        flattened and concatenated per call (a D x 3D copy, nothing next to the matmul), so
        the projection is a single large GEMM instead of three 4-D einsums, and the softmax
        scale is folded into the query columns instead of multiplying the (S, S) logits.
        """
        d = x.shape[-1]
        h, hd = self.num_heads, self.head_dim
        flat = h * hd
        kernel = ops.concatenate([self._projection_kernel("query", flat) * scale,
                                  self._projection_kernel("key", flat),
                                  self._projection_kernel("value", flat)], axis=-1)
        seq = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        # Rank-2 GEMM on (B*S, D): a rank-3 x rank-2 matmul becomes tf.tensordot on TensorFlow,
        # whose dynamic-shape plumbing (Shape/Gather/ReduceProd/Concat) lands in the ONNX graph.
        qkv = gemm(ops.reshape(x, (-1, d)), ops.cast(kernel, x.dtype), training)
        bias = None
        if self.qkv_bias:
            bias = ops.concatenate([ops.reshape(self.query_bias, (flat,)) * scale,
                                    ops.reshape(self.key_bias, (flat,)),
                                    ops.reshape(self.value_bias, (flat,))], axis=-1)
        # the scoped step on AMX and the AMD Zen 4 and 5: the bias add and the head split one XLA pass each way
        if FUSED_HEADS and os.environ.get(FUSED_HEADS_ENV) != "0" and cpu_scoped(x, training):
            return heads_major(ops.reshape(qkv, (-1, seq, 3, h, hd)),
                               None if bias is None else ops.reshape(bias, (3, h, hd)), training)
        if bias is not None:
            if separate_bias(x, training):  # the GEMM stays AMX's (layers.fusion)
                qkv = bias_after_reshape(qkv, (-1, seq, 3 * flat), bias)
            else:
                qkv = qkv + ops.cast(bias, x.dtype)
        # Heads-major (3, B, heads, S, head_dim): the attention products are plain batched GEMMs.
        qkv = ops.transpose(ops.reshape(qkv, (-1, seq, 3, h, hd)), (2, 0, 3, 1, 4))
        # unstack, not qkv[0]/[1]/[2]: TF differentiates three strided slices as three
        # full-size StridedSliceGrad scatters (a quarter of the non-XLA step); Unpack's gradient is one Pack.
        q, k, v = ops.unstack(qkv, 3, axis=0)
        return q, k, v

    def _relative_bias(self, q):
        """(B, heads, S_q, S) logits of the queries (the first S_q tokens) against the
        relative-offset embeddings.

        The logits against every offset, (B, heads, S_q, offsets), are picked per (query, key) pair
        query-major: rows of B x heads values taken by one constant (S_q S,) index. The index does not
        depend on the image or the head, so nothing is broadcast over them, and the gradient adds rows
        of B x heads values (take_along_axis on (B, heads, S_q, S) indices, as before 2026-12-05: the
        same values, a Ti/16 bf16 training step 2.5x slower than without the bias, BENCHMARKS.md).
        """
        table = ops.cast(self.relative_embedding, q.dtype)
        scores = ops.einsum("bhtk,ohk->bhto", q, table)  # (B, H, S_q, offsets)
        n_q, n_off = q.shape[2], table.shape[0]
        rows = self._rel_index[:n_q]  # (S_q, S) offset of each pair
        flat = (np.arange(n_q)[:, None] * n_off + rows).reshape(-1).astype("int32")
        by_pair = ops.reshape(ops.transpose(scores, (2, 3, 0, 1)), (n_q * n_off, -1))  # (S_q offsets, B H)
        picked = ops.take(by_pair, ops.convert_to_tensor(flat), axis=0)  # (S_q S, B H)
        return ops.transpose(ops.reshape(picked, (n_q, rows.shape[1], -1, self.num_heads)), (2, 3, 0, 1))

    def call(self, x, training=None, return_attention_scores: bool = False, num_queries: Optional[int] = None,
             defer_bias: bool = False):
        """(B, S, D) -> (B, S, D); with `num_queries` n, only the first n tokens attend (to all S)
        and the result is (B, n, D): what a class-token head reads of the last block. `defer_bias`: (the output
        without the out projection's bias, that bias in float32), for the block's fused residual add."""
        scale = 1.0 / math.sqrt(self.head_dim)
        q, k, v = self._qkv(x, 1.0 if self.qk_norm else scale, training)  # q carries the softmax scale
        if num_queries is not None:
            q = q[:, :, :num_queries]
        if self.qk_norm:  # LN(q) scaled, LN(k): the scale cannot be folded into the kernel
            q = layer_norm(self.query_norm, q, x.dtype, training, scale=scale)
            k = layer_norm(self.key_norm, k, x.dtype, training)
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
            logits = ops.matmul(q, ops.swapaxes(k, -1, -2))  # (B, H, S, S)
            if bias is not None:
                logits = ops.cast(logits, "float32") + ops.cast(bias, "float32")
            # float32 softmax, oneDNN's, also in the scoped bf16 step: its XLA scope with a written-out gradient
            # (until 2026-12-05) measured 0.972-0.980x at Ti/16 and level at S/16 and B/16 (BENCHMARKS.md);
            # on AMX that step runs oneDNN's bf16 softmax with its gradient in a scope (layers.fusion)
            if bias is None and not return_attention_scores and cpu_scoped(logits, training):
                probs = softmax_with_scoped_gradient(logits, training)
            else:
                probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
            dropped = self.dropout(probs, training=training) if explicit else probs
            out = ops.swapaxes(ops.matmul(ops.cast(dropped, v.dtype), v), 1, 2)  # (B, S, H, hd)
            if not return_attention_scores:
                probs = None
        d = self.out_kernel.shape[-1]
        seq = out.shape[1] if out.shape[1] is not None else ops.shape(out)[1]
        # (B*S, heads*head_dim) @ (heads*head_dim, D): one GEMM, same weights as the 4-D einsum.
        kernel = ops.reshape(ops.cast(self.out_kernel, out.dtype), (d, d))
        y = gemm(ops.reshape(out, (-1, d)), kernel, training)
        if defer_bias:
            return ops.reshape(y, (-1, seq, d)), ops.cast(self.out_bias, "float32")
        if separate_bias(out, training):  # the GEMM stays AMX's (layers.fusion)
            y = bias_after_reshape(y, (-1, seq, d), self.out_bias)
        else:
            y = ops.reshape(y + ops.cast(self.out_bias, out.dtype), (-1, seq, d))
        if return_attention_scores:
            return y, probs
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads, "dropout_rate": self.dropout_rate,
                "relative_grid": None if self.relative_grid is None else list(self.relative_grid),
                "num_prefix_tokens": self.num_prefix_tokens, "qk_norm": self.qk_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon, "qkv_bias": self.qkv_bias}
