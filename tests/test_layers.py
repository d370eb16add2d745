"""Each layer of keras_vit.layers against a numpy statement of the paper's equations."""
import math

import keras
import numpy as np
import pytest

from keras_vit import layers as L
from tests.conftest import weighted_sum_step


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _mhsa_numpy(layer, x, bias=None):
    w = {v.path.split("/")[-1]: keras.ops.convert_to_numpy(v) for v in layer.weights}
    q = np.einsum("btd,dhk->bthk", x, w["query_kernel"]) + w["query_bias"]
    k = np.einsum("btd,dhk->bthk", x, w["key_kernel"]) + w["key_bias"]
    v = np.einsum("btd,dhk->bthk", x, w["value_kernel"]) + w["value_bias"]
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias(q, w)
    p = _softmax(logits)
    out = np.einsum("bhqt,bthk->bqhk", p, v)
    return np.einsum("bthk,hkd->btd", out, w["out_kernel"]) + w["out_bias"], p


def _roundtrip(layer):
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    return clone


def test_patch_embedding_is_a_linear_map_of_flattened_patches(rng):
    layer = L.PatchEmbedding(8, (4, 4))
    x = rng.normal(size=(2, 8, 12, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (2, 6, 8)
    kernel = keras.ops.convert_to_numpy(layer.projection.kernel)  # (4, 4, 3, 8)
    bias = keras.ops.convert_to_numpy(layer.projection.bias)
    # Patch (row 1, col 2) is token 1 * 3 + 2 (row-major order).
    patch = x[:, 4:8, 8:12, :]
    expected = np.einsum("bhwc,hwcd->bd", patch, kernel) + bias
    np.testing.assert_allclose(y[:, 5], expected, atol=1e-5)
    _roundtrip(layer)


@pytest.mark.parametrize("size", [(8, 12), (10, 13)])
def test_training_patch_embedding_is_one_gemm_with_the_convs_values_and_gradients(rng, size, monkeypatch):
    """Bf16 training on TensorFlow runs the patch embedding as patches times the kernel: in float32 the
    Conv2D's values and gradients, pixels past the last whole patch dropped as its "valid" padding does;
    in bf16 within rounding of them; float32 and inference keep the Conv2D (and so every export)."""
    import tensorflow as tf

    x = tf.constant(rng.normal(size=(2, *size, 3)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, size[0] // 4, size[1] // 4, 8)).astype("float32"))
    layer = L.PatchEmbedding(8, (4, 4))
    layer.build(x.shape)
    layer.projection.bias.assign(rng.normal(size=8).astype("float32"))

    def with_gradients(fn):
        with tf.GradientTape() as tape:
            y = fn(x)
            loss = tf.reduce_sum(tf.cast(tf.reshape(y, upstream.shape), tf.float32) * upstream)
        return y, tape.gradient(loss, layer.trainable_variables)

    (y, g), (ref_y, ref_g) = with_gradients(layer._patches_times_kernel), with_gradients(layer.projection)
    np.testing.assert_allclose(y.numpy(), ref_y.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    mixed = L.PatchEmbedding(8, (4, 4), dtype="mixed_bfloat16")
    mixed.build(x.shape)
    mixed.set_weights(layer.get_weights())
    yb, ref_yb = mixed(x, training=True), mixed(x, training=False)
    assert yb.dtype == tf.bfloat16 and yb.shape == ref_yb.shape == (2, (size[0] // 4) * (size[1] // 4), 8)
    np.testing.assert_allclose(tf.cast(yb, tf.float32).numpy(), tf.cast(ref_yb, tf.float32).numpy(), rtol=2e-2, atol=2e-2)
    taken = []
    monkeypatch.setattr(L.PatchEmbedding, "_patches_times_kernel", lambda self, im: taken.append(1) or self.projection(im))
    mixed(x, training=True)
    mixed(x, training=False)
    layer(x, training=True)
    assert taken == [1]
    conv = mixed.projection

    class Quantized:  # what the layer reads of a quantized Conv2D (Keras 3.15 cannot quantize one; later ones can)
        quantization_mode = "int8"

        def __call__(self, images):
            taken.append("conv")
            return conv(images)

    monkeypatch.setattr(mixed, "projection", Quantized())
    mixed(x, training=True)
    assert taken == [1, "conv"]  # its own (quantized) call, in training too


def test_class_token_is_prepended_and_zero_initialised(rng):
    layer = L.ClassToken()
    x = rng.normal(size=(3, 5, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (3, 6, 4)
    np.testing.assert_array_equal(y[:, 0], 0.0)
    np.testing.assert_array_equal(y[:, 1:], x)
    assert len(layer.trainable_weights) == 1
    _roundtrip(layer)


def test_learned_position_embedding_adds_per_token_vector(rng):
    layer = L.PositionEmbedding("learned", (2, 3), num_prefix_tokens=1)
    x = rng.normal(size=(2, 7, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    emb = keras.ops.convert_to_numpy(layer.pos_embedding)
    assert emb.shape == (1, 7, 4)
    np.testing.assert_allclose(y, x + emb, atol=1e-6)
    _roundtrip(layer)


def test_learned_2d_concatenates_row_and_column_embeddings(rng):
    layer = L.PositionEmbedding("learned_2d", (2, 3), num_prefix_tokens=1)
    layer.build((None, 7, 6))
    emb = keras.ops.convert_to_numpy(layer.embedding())[0]
    row = keras.ops.convert_to_numpy(layer.row_embedding)
    col = keras.ops.convert_to_numpy(layer.col_embedding)
    assert row.shape == (2, 3) and col.shape == (3, 3)
    for r in range(2):
        for c in range(3):
            np.testing.assert_allclose(emb[1 + r * 3 + c], np.concatenate([row[r], col[c]]))
    _roundtrip(layer)


def test_sincos2d_is_fixed_and_matches_big_vision_formula():
    layer = L.PositionEmbedding("sincos2d", (2, 2), num_prefix_tokens=0)
    layer.build((None, 4, 8))
    assert layer.weights == []
    emb = keras.ops.convert_to_numpy(layer.embedding())[0]
    omega = 1.0 / 10000 ** (np.arange(2) / 1.0)
    # token 3 is (y=1, x=1)
    expected = np.concatenate([np.sin(omega), np.cos(omega), np.sin(omega), np.cos(omega)])
    np.testing.assert_allclose(emb[3], expected, atol=1e-6)
    np.testing.assert_allclose(emb[0], [0, 0, 1, 1, 0, 0, 1, 1], atol=1e-6)


def test_none_position_embedding_is_identity(rng):
    layer = L.PositionEmbedding("none", (2, 2))
    x = rng.normal(size=(1, 5, 4)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), x)


def test_attention_layout_and_output_match_numpy(rng):
    layer = L.MultiHeadSelfAttention(num_heads=2)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    y, probs = layer(x, return_attention_scores=True)
    assert tuple(layer.query_kernel.shape) == (8, 2, 4)
    assert tuple(layer.out_kernel.shape) == (2, 4, 8)
    ref, ref_p = _mhsa_numpy(layer, x)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), ref, atol=1e-5)
    probs = keras.ops.convert_to_numpy(probs)
    np.testing.assert_allclose(probs, ref_p, atol=1e-5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # The fused dot_product_attention path gives the same output.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), ref, atol=1e-5)
    _roundtrip(layer)


def test_relative_attention_adds_query_times_offset_embedding(rng):
    grid = (2, 3)
    layer = L.MultiHeadSelfAttention(num_heads=2, relative_grid=grid, num_prefix_tokens=1)
    x = rng.normal(size=(2, 7, 8)).astype("float32")
    layer.build(x.shape)
    table = rng.normal(size=tuple(layer.relative_embedding.shape)).astype("float32")
    layer.relative_embedding.assign(table)
    index = L.relative_position_index(grid, 1)
    assert index.shape == (7, 7)
    assert index[0, 0] == index[0, 3] == index[4, 0] == (2 * 2 - 1) * (2 * 3 - 1)  # class-token slot
    assert index[1, 1] == index[6, 6]  # same offset (0, 0)

    def bias(q, w):
        return np.einsum("bqhk,qthk->bhqt", q, table[index]) / math.sqrt(q.shape[-1])

    ref, _ = _mhsa_numpy(layer, x, bias=bias)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), ref, atol=1e-4)
    y, _ = layer(x, return_attention_scores=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y), ref, atol=1e-4)
    _roundtrip(layer)


def test_drop_path_is_identity_at_inference_and_drops_whole_samples_in_training():
    layer = L.DropPath(0.5, seed=1)
    x = np.ones((64, 3, 4), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = y.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # whole sample kept or dropped
    assert 10 < (per_sample[:, 0] == 0).sum() < 54
    _roundtrip(layer)


@pytest.mark.parametrize("approximate", [True, False])
def test_mlp_block_is_dense_gelu_dense(rng, approximate):
    layer = L.MlpBlock(16, gelu_approximate=approximate)
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    w0, b0 = (keras.ops.convert_to_numpy(v) for v in (layer.dense_0.kernel, layer.dense_0.bias))
    w1, b1 = (keras.ops.convert_to_numpy(v) for v in (layer.dense_1.kernel, layer.dense_1.bias))
    h = x @ w0 + b0
    if approximate:
        h = _gelu_tanh(h)
    else:
        from scipy.special import erf
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    np.testing.assert_allclose(y, h @ w1 + b1, atol=1e-5)
    _roundtrip(layer)


@pytest.mark.parametrize("approximate", [True, False])
def test_training_gelu_matches_ops_gelu_and_its_gradient(rng, approximate, monkeypatch):
    """The bf16-training GELU (gradient recomputed from its input, TF) has ops.gelu's values and gradient."""
    import tensorflow as tf

    from keras_vit.layers.block import _gelu_with_input_gradient, gelu

    x = tf.constant(rng.normal(scale=3.0, size=(64, 96)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(64, 96)).astype("float32"))
    with tf.GradientTape() as tape:  # in float32 the form itself equals ops.gelu and its autodiff
        tape.watch(x)
        y = _gelu_with_input_gradient(approximate)(x)
    ref_y, ref_g = _gelu_and_gradient_fp32(x, upstream, approximate)
    np.testing.assert_allclose(y.numpy(), ref_y.numpy(), atol=1e-6)
    np.testing.assert_allclose(tape.gradient(y, x, output_gradients=upstream).numpy(), ref_g.numpy(), atol=1e-5)
    # the layer takes it for bf16 in training: bf16 values and gradients within bf16 rounding
    xb = tf.cast(x, tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(xb)
        yb = gelu(xb, approximate, training=True)
    gb = tape.gradient(yb, xb, output_gradients=tf.cast(upstream, tf.bfloat16))
    assert yb.dtype == gb.dtype == tf.bfloat16
    ref_y, ref_g = (t.numpy() for t in _gelu_and_gradient_fp32(tf.cast(xb, tf.float32), upstream, approximate))
    np.testing.assert_allclose(tf.cast(yb, tf.float32).numpy(), ref_y, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(tf.cast(gb, tf.float32).numpy(), ref_g, rtol=2e-2, atol=2e-2)
    # which form runs: the custom one for bf16 training only; float32 and inference keep ops.gelu
    import keras_vit.layers.block as block

    taken = []
    monkeypatch.setattr(block, "_gelu_with_input_gradient",
                        lambda a, scope: taken.append(a) or (lambda t: t))  # scope: layers.fusion's, per call
    gelu(xb, approximate, training=True)
    gelu(xb, approximate, training=False)
    gelu(x, approximate, training=True)
    assert taken == [approximate]


@pytest.mark.parametrize("kind", ["quick_gelu", "swiglu"])
def test_training_quick_gelu_and_swiglu_match_their_op_by_op_forms(rng, kind, monkeypatch):
    """quick_gelu (CLIP) and SwiGLU (DINOv2) in bf16 training take a gradient recomputed from the input,
    as the GELU does: in float32 the same values and gradients as the op-by-op forms' autodiff; in bf16
    within bf16 rounding of them; float32 and inference keep the op-by-op forms (and so every export)."""
    import tensorflow as tf

    import keras_vit.layers.block as block

    m = 48
    x = tf.constant(rng.normal(scale=3.0, size=(64, 2 * m if kind == "swiglu" else m)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(64, m)).astype("float32"))

    def op_by_op(t):
        if kind == "swiglu":
            return keras.ops.silu(t[:, :m]) * t[:, m:]
        return t * keras.ops.sigmoid(t * keras.ops.cast(1.702, t.dtype))

    def with_gradient(fn, t, g):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = fn(t)
        return y, tape.gradient(y, t, output_gradients=g)

    written = block._swiglu_with_input_gradient(m) if kind == "swiglu" else block._quick_gelu_with_input_gradient()
    (y, g), (ref_y, ref_g) = with_gradient(written, x, upstream), with_gradient(op_by_op, x, upstream)
    np.testing.assert_allclose(y.numpy(), ref_y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), ref_g.numpy(), rtol=1e-5, atol=1e-5)

    def layer_form(t, training):
        return block.swiglu(t, m, training) if kind == "swiglu" else block.activate(t, "quick_gelu", training=training)

    xb = tf.cast(x, tf.bfloat16)
    yb, gb = with_gradient(lambda t: layer_form(t, True), xb, tf.cast(upstream, tf.bfloat16))
    assert yb.dtype == gb.dtype == tf.bfloat16
    ref_y, ref_g = (t.numpy() for t in with_gradient(op_by_op, tf.cast(xb, tf.float32), upstream))
    np.testing.assert_allclose(tf.cast(yb, tf.float32).numpy(), ref_y, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(tf.cast(gb, tf.float32).numpy(), ref_g, rtol=2e-2, atol=5e-2)
    name = "_swiglu_with_input_gradient" if kind == "swiglu" else "_quick_gelu_with_input_gradient"
    taken = []
    monkeypatch.setattr(block, name, lambda *a, **k: taken.append(1) or (lambda t: t))
    layer_form(xb, True)
    layer_form(xb, False)
    layer_form(x, True)
    assert taken == [1]


@pytest.mark.parametrize("activation,approximate", [("gelu", True), ("gelu", False), ("quick_gelu", True)])
def test_training_activation_with_the_gemms_bias_has_the_biased_values_and_gradients(rng, activation, approximate):
    """The AMX scoped step's MLP adds Dense_0's bias inside the activation's form (layers.block.activate's `bias`):
    in float32 the values and gradients (input and bias) of the op-by-op activation of x + b; in bf16 training
    within bf16 rounding of them, the bias gradient in float32; without training, x + b then the activation."""
    import tensorflow as tf

    import keras_vit.layers.block as block

    x = tf.constant(rng.normal(scale=3.0, size=(2, 32, 48)).astype("float32"))
    b = tf.constant(rng.normal(size=(48,)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, 32, 48)).astype("float32"))

    def op_by_op(t, bias):
        z = t + bias
        return keras.ops.gelu(z, approximate=approximate) if activation == "gelu" else z * keras.ops.sigmoid(1.702 * z)

    def with_gradients(fn, t, bias, g):
        with tf.GradientTape() as tape:
            tape.watch([t, bias])
            y = fn(t, bias)
        return [y] + tape.gradient(y, [t, bias], output_gradients=g)

    written = (block._gelu_with_input_gradient(approximate, bias=True) if activation == "gelu"
               else block._quick_gelu_with_input_gradient(bias=True))
    for got, want in zip(with_gradients(written, x, b, upstream), with_gradients(op_by_op, x, b, upstream)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)
    xb = tf.cast(x, tf.bfloat16)
    yb, gxb, gbias = with_gradients(lambda t, bias: block.activate(t, activation, approximate, True, bias=bias),
                                    xb, b, tf.cast(upstream, tf.bfloat16))
    assert yb.dtype == gxb.dtype == tf.bfloat16 and gbias.dtype == tf.float32
    ref_y, ref_gx, ref_gb = (t.numpy() for t in with_gradients(op_by_op, tf.cast(xb, tf.float32), b, upstream))
    np.testing.assert_allclose(tf.cast(yb, tf.float32).numpy(), ref_y, rtol=1e-2, atol=2e-2)
    np.testing.assert_allclose(tf.cast(gxb, tf.float32).numpy(), ref_gx, rtol=2e-2, atol=5e-2)
    assert np.linalg.norm(gbias.numpy() - ref_gb) <= 1e-2 * np.linalg.norm(ref_gb)
    np.testing.assert_allclose(block.activate(x, activation, approximate, False, bias=b).numpy(),
                               op_by_op(x, b).numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dots", ["0", "1"])
def test_softmax_with_scoped_gradient_is_softmax_and_its_gradient(rng, monkeypatch, dots):
    """layers.fusion.softmax_with_scoped_gradient (the AMX scoped step's attention softmax, its gradient's row sums
    as XLA reductions or matrix-vector products): in float32 ops.softmax and its autodiff gradient; in bf16 a bf16
    softmax within rounding, its gradient within rounding of float32's."""
    import tensorflow as tf

    from keras_vit.layers.fusion import ROW_DOTS_ENV, softmax_with_scoped_gradient

    monkeypatch.setenv(ROW_DOTS_ENV, dots)

    logits = tf.constant(rng.normal(scale=3.0, size=(2, 3, 17, 17)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(2, 3, 17, 17)).astype("float32"))

    def with_gradient(fn, t, g):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = fn(t)
        return y, tape.gradient(y, t, output_gradients=g)

    (y, g), (ref_y, ref_g) = (with_gradient(f, logits, upstream) for f in (
        lambda t: softmax_with_scoped_gradient(t, True), lambda t: keras.ops.softmax(t, axis=-1)))
    np.testing.assert_allclose(y.numpy(), ref_y.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g.numpy(), ref_g.numpy(), rtol=1e-5, atol=1e-6)
    yb, gb = with_gradient(lambda t: softmax_with_scoped_gradient(t, True), tf.cast(logits, tf.bfloat16),
                           tf.cast(upstream, tf.bfloat16))
    assert yb.dtype == gb.dtype == tf.bfloat16
    ref_y, ref_g = with_gradient(lambda t: keras.ops.softmax(t, axis=-1), tf.cast(tf.cast(logits, tf.bfloat16),
                                                                                   tf.float32), upstream)
    np.testing.assert_allclose(tf.cast(yb, tf.float32).numpy(), ref_y.numpy(), rtol=1e-2, atol=1e-3)
    assert np.linalg.norm(tf.cast(gb, tf.float32).numpy() - ref_g.numpy()) <= 2e-2 * np.linalg.norm(ref_g.numpy())


@pytest.mark.parametrize("dots", ["0", "1"])
@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 5, 9)])
def test_row_sum_is_the_sum_over_the_last_axis(rng, monkeypatch, dots, shape):
    """layers.fusion.row_sum (the scoped step's row sums; on AMX a matrix-vector product, KERAS_VIT_ROW_DOTS forcing
    either form): the sum over the last axis, kept as size 1, eagerly and in an XLA scope with an unknown batch size,
    as one MatMul where the dot form is on and none where it is off."""
    import tensorflow as tf

    from keras_vit.layers import fusion

    monkeypatch.setenv(fusion.ROW_DOTS_ENV, dots)
    t = rng.normal(size=shape).astype("float32")
    ref = t.sum(-1, keepdims=True)
    np.testing.assert_allclose(fusion.row_sum(tf.constant(t)).numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fusion.row_mean(tf.constant(t)).numpy(), ref / shape[-1], rtol=1e-5, atol=1e-6)

    @tf.function(input_signature=[tf.TensorSpec((None,) + shape[1:], tf.float32)])
    def scoped(u):
        with tf.xla.experimental.jit_scope():
            return fusion.row_sum(u * 2.0)

    np.testing.assert_allclose(scoped(tf.constant(t)).numpy(), 2 * ref, rtol=1e-5, atol=1e-5)
    ops_made = [op.type for op in scoped.get_concrete_function().graph.get_operations()]
    assert ("MatMul" in ops_made) == (dots == "1") and ("Sum" in ops_made) == (dots == "0")


@pytest.mark.parametrize("dots", ["0", "1"])
def test_scoped_layer_norm_is_layer_norm_and_its_gradient(rng, monkeypatch, dots):
    """The scoped step's LayerNorm with its gradient written out (layers.norm), with its row means as XLA reductions
    or as matrix-vector products (layers.fusion.row_mean): in float32 the values and the x, gamma and beta
    gradients of the LayerNorm's autodiff, in an XLA scope."""
    import tensorflow as tf

    from keras_vit.layers import fusion
    from keras_vit.layers.norm import _scoped_layer_norm_with_gradient

    monkeypatch.setenv(fusion.ROW_DOTS_ENV, dots)
    norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype="float32")
    norm.build((None, 24))
    x = tf.constant(rng.normal(size=(10, 24)).astype("float32") * 3 + 1)
    gamma, beta = (tf.constant(rng.normal(size=(24,)).astype("float32")) for _ in range(2))
    upstream = tf.constant(rng.normal(size=(10, 24)).astype("float32"))
    scoped = _scoped_layer_norm_with_gradient(norm, "float32", tf.xla.experimental.jit_scope)

    def reference(t, g, b):
        mu = tf.reduce_mean(t, -1, keepdims=True)
        var = tf.reduce_mean(tf.square(t - mu), -1, keepdims=True)
        return (t - mu) * tf.math.rsqrt(var + 1e-6) * g + b

    def with_gradients(fn):
        @tf.function(autograph=False)  # as in a Keras layer's call (fn a closure: tf.function can't take it)
        def step():
            with tf.GradientTape() as tape:
                tape.watch([x, gamma, beta])
                y = fn(x, gamma, beta)
            return [y] + tape.gradient(y, [x, gamma, beta], output_gradients=upstream)

        return step()

    got = with_gradients(scoped)
    for a, b in zip(got, with_gradients(reference)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[0].numpy(), _ln(x.numpy()) * gamma.numpy() + beta.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_residual_layer_norm_is_the_add_and_layer_norm_with_their_gradients(rng, branch):
    """layers.norm's residual LayerNorm: (z + g + b, LN(z + g + b)) (or z + g, or z) in float32, with the gradients of
    both outputs summed for z and g as autodiff of the add and the LayerNorm gives them, b's and gamma's and beta's."""
    import tensorflow as tf

    from keras_vit.layers.norm import _scoped_residual_layer_norm

    norm = keras.layers.LayerNormalization(epsilon=1e-6, dtype="float32")
    norm.build((None, 24))
    z, g = (tf.constant(rng.normal(size=(10, 24)).astype("float32") * 3 + 1) for _ in range(2))
    b, gamma, beta = (tf.constant(rng.normal(size=(24,)).astype("float32")) for _ in range(3))
    up_z, up_y = (tf.constant(rng.normal(size=(10, 24)).astype("float32")) for _ in range(2))
    fused = _scoped_residual_layer_norm(norm, "float32", tf.xla.experimental.jit_scope)
    inputs = [z, g, b][:branch + 1] + [gamma, beta]  # the stream, and the branch without or with its bias apart

    def reference(*args):
        t = sum(args[:branch + 1])
        mu = tf.reduce_mean(t, -1, keepdims=True)
        var = tf.reduce_mean(tf.square(t - mu), -1, keepdims=True)
        return t, (t - mu) * tf.math.rsqrt(var + 1e-6) * args[-2] + args[-1]

    def with_gradients(fn):
        @tf.function(autograph=False)
        def step():
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                t, y = fn(*inputs)
            return [t, y] + tape.gradient([t, y], inputs, output_gradients=[up_z, up_y])

        return step()

    got, want = with_gradients(fused), with_gradients(reference)
    assert len(got) == len(want) == len(inputs) + 2
    for a, e in zip(got, want):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=5e-5, atol=5e-5)


@pytest.mark.parametrize("options,call", [
    ({}, {}),
    ({"qk_norm": True, "activation": "quick_gelu", "qkv_bias": False}, {"class_token_only": True}),
    ({"mlp_kind": "swiglu", "relative_grid": (2, 2)}, {}),
    ({"drop_path_rate": 0.3}, {}),
    ({"layer_scale_init": 0.1, "dropout_rate": 0.2}, {"class_token_only": True}),
])
def test_block_residuals_in_the_layer_norms_scopes_keep_values_and_gradients(monkeypatch, options, call):
    """In the AMX scoped bf16 step (forced here on any CPU) a block adds the residual stream in the LayerNorms' XLA
    scopes (layers.block.TransformerBlock._call_fused; the GEMMs' biases too where nothing comes after them): no AddN
    of the stream's gradients left in the step (two fewer), and the values and gradients of the TensorFlow ops' form
    to the bit, with dropout, stochastic depth and LayerScale too (the same random draws)."""
    import tensorflow as tf

    from keras_vit.layers import block as block_module
    from keras_vit.layers import fusion

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setenv(fusion.BIAS_APART_ENV, "1")
    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    layer = L.TransformerBlock(num_heads=2, mlp_dim=16, dtype=keras.mixed_precision.Policy("mixed_bfloat16"),
                               **options)
    layer(x)
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape) * 0.5)
    weights = tf.constant(rng.normal(size=layer(x, **call).shape), tf.float32)

    draws = [v.numpy() for v in layer.non_trainable_variables]  # the seed generators' states

    def traced():
        for v, value in zip(layer.non_trainable_variables, draws):
            v.assign(value)
        step = weighted_sum_step(layer, weights, **call)
        found = [op.type for op in step.get_concrete_function(x).graph.get_operations()]
        return step(x), found

    as_built, built_ops = traced()
    monkeypatch.setattr(block_module, "FUSED_RESIDUALS", False)
    plain, plain_ops = traced()
    # the stream's two junctions (the block's input, z'), each read by a LayerNorm and a residual add
    assert plain_ops.count("AddN") - built_ops.count("AddN") == 2
    # rounded as TensorFlow's ops round them (layers.fusion.branch_sum, gradient_sum): the same numbers to the bit
    names = ["output", "input"] + [v.path for v in layer.trainable_variables]
    for name, a, e in zip(names, as_built, plain):
        np.testing.assert_array_equal(a.numpy(), e.numpy(), err_msg=name)


def _gelu_and_gradient_fp32(x, upstream, approximate):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = keras.ops.gelu(x, approximate=approximate)
    return y, tape.gradient(y, x, output_gradients=upstream)


def test_transformer_block_is_pre_norm_residual(rng):
    block = L.TransformerBlock(num_heads=2, mlp_dim=16)
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    y = keras.ops.convert_to_numpy(block(x))
    attn_out, _ = _mhsa_numpy(block.attention, _ln(x))
    z = x + attn_out
    mlp = keras.ops.convert_to_numpy(block.mlp(_ln(z).astype("float32")))
    np.testing.assert_allclose(y, z + mlp, atol=1e-4)
    y2, probs = block(x, return_attention_scores=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y2), y, atol=1e-5)
    assert tuple(probs.shape) == (2, 2, 5, 5)
    cfg = _roundtrip(block).get_config()
    assert cfg["layer_norm_epsilon"] == 1e-6


@pytest.mark.parametrize("relative", [False, True])
def test_transformer_block_class_token_only_is_token_0_of_the_full_block(rng, relative):
    """class_token_only: (B, 1, D), the full block's token 0 (the class token attends to every
    token, with the relative-offset bias of its own row); attention probabilities (B, H, 1, S)."""
    block = L.TransformerBlock(num_heads=2, mlp_dim=16, relative_grid=(2, 2) if relative else None)
    x = rng.normal(size=(3, 5, 8)).astype("float32")
    full = keras.ops.convert_to_numpy(block(x))
    if relative:  # the offset table starts at zero: give the bias a value
        table = block.attention.relative_embedding
        table.assign(rng.normal(size=table.shape).astype("float32"))
        full = keras.ops.convert_to_numpy(block(x))
    cls = keras.ops.convert_to_numpy(block(x, class_token_only=True))
    assert cls.shape == (3, 1, 8)
    np.testing.assert_allclose(cls, full[:, :1], atol=1e-5)
    _, probs = block(x, return_attention_scores=True)
    _, cls_probs = block(x, return_attention_scores=True, class_token_only=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(cls_probs), keras.ops.convert_to_numpy(probs)[:, :, :1],
                               atol=1e-6)
    spec = block.compute_output_spec(keras.KerasTensor((None, 5, 8)), class_token_only=True)
    assert tuple(spec.shape) == (None, 1, 8)
    # num_queries=2: the class and distillation tokens a distilled model's heads read
    two = keras.ops.convert_to_numpy(block(x, num_queries=2))
    np.testing.assert_allclose(two, full[:, :2], atol=1e-5)
    assert tuple(block.compute_output_spec(keras.KerasTensor((None, 5, 8)), num_queries=2).shape) == (None, 2, 8)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_queries must be an integer >= 1 or None"):
            block(x, num_queries=bad)


def test_token_pooling(rng):
    x = rng.normal(size=(2, 5, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(L.TokenPooling("token")(x)), x[:, 0])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(L.TokenPooling("gap")(x)), x.mean(1), atol=1e-6)


def test_every_layer_has_its_own_get_config():
    """Keras' automatic config fails for layers built with a DTypePolicy (a mixed-precision graph):
    each keras_vit layer writes its config out, so any model containing one saves."""
    import inspect as pyinspect

    from keras_vit import layers as L
    from keras_vit import resnet as R

    for module in (L, R):
        for name, cls in pyinspect.getmembers(module, pyinspect.isclass):
            if issubclass(cls, keras.layers.Layer) and cls.__module__.startswith(module.__name__):
                assert "get_config" in vars(cls), f"{name} has no get_config"
    layer = L.ClassToken(dtype=keras.DTypePolicy("mixed_bfloat16"), name="cls")
    layer.build((None, 4, 8))
    again = L.ClassToken.from_config(layer.get_config())
    assert again.dtype_policy.name == "mixed_bfloat16"


def test_gemm_takes_its_weight_gradient_on_x_transposed_where_asked(monkeypatch):
    """layers.fusion.gemm: with KERAS_VIT_DW_TRANSPOSED=1, in the AMX scoped step in bf16, for GEMMs at least 512 wide,
    the weight gradient is a plain MatMul on x transposed by XLA, not MatMul's transpose_a form, with the same
    values; narrower GEMMs, float32, inference, eager calls and the default keep TensorFlow's form."""
    import tensorflow as tf

    from keras_vit.layers import fusion
    from keras_vit.layers.block import TransformerBlock

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda: True)
    monkeypatch.delenv(fusion.BIAS_APART_ENV, raising=False)
    with tf.Graph().as_default():  # traced, as a training step is
        x_bf16 = tf.zeros((4, 512), "bfloat16")
        wide, narrow = tf.zeros((512, 512), "bfloat16"), tf.zeros((512, 256), "bfloat16")
        for forced in (None, "0", "1"):
            if forced is None:
                monkeypatch.delenv(fusion.DW_TRANSPOSED_ENV, raising=False)
            else:
                monkeypatch.setenv(fusion.DW_TRANSPOSED_ENV, forced)
            assert fusion.transposed_weight_gradient(x_bf16, wide, True) is (forced == "1")
            assert not fusion.transposed_weight_gradient(x_bf16, narrow, True)
            assert not fusion.transposed_weight_gradient(x_bf16, wide, False)
            assert not fusion.transposed_weight_gradient(tf.zeros((4, 512)), tf.zeros((512, 512)), True)
    assert not fusion.transposed_weight_gradient(tf.zeros((4, 512), "bfloat16"), tf.zeros((512, 512), "bfloat16"), True)

    rng = np.random.default_rng(0)
    block = TransformerBlock(num_heads=2, mlp_dim=512, dtype="mixed_bfloat16")
    x = tf.constant(rng.normal(size=(2, 5, 16)), tf.float32)
    block(x)
    results = {}
    for forced in ("1", "0"):
        monkeypatch.setenv(fusion.DW_TRANSPOSED_ENV, forced)

        @tf.function
        def step(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                loss = tf.reduce_sum(tf.cast(block(t, training=True), "float32") ** 2)
            return tape.gradient(loss, [t] + block.trainable_variables)

        graph = step.get_concrete_function(x).graph
        transposed_a = sum(op.type == "MatMul" and op.get_attr("transpose_a") for op in graph.get_operations())
        results[forced] = [g.numpy() for g in step(x)], transposed_a
    (on, ta_on), (off, ta_off) = results["1"], results["0"]
    assert ta_off - ta_on == 1  # the MLP-in GEMM (16 -> 512); the 16-wide ones keep TensorFlow's form
    for a, b in zip(on, off):
        np.testing.assert_allclose(a.astype("float32"), b.astype("float32"), rtol=1e-2, atol=1e-3)
