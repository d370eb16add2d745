"""The ViT family's block options (issue #26: layer_scale_init, qk_norm, activation, mlp, qkv_bias) against
float64 NumPy statements of timm's definitions (`LayerScale`, `Attention(qk_norm=True)`,
`QuickGELU`, `GluMlp` as `SwiGLUPacked`), and their counts, checkpoint names and weight files."""
import math

import keras
import numpy as np
import pytest
from scipy.special import erf

import keras_vit
from keras_vit import layers as L
from keras_vit.config import ViTConfig, parse_variant
from keras_vit.weights import load_npz, load_weights, model_arrays, save_npz, save_safetensors

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=48, num_layers=2, image_size=32, patch_size=8, num_classes=10)
# One value per block option and all of them together; "plain" is none of them.
OPTIONS = {
    "plain": {},
    "layer_scale": dict(layer_scale_init=0.5),
    "qk_norm": dict(qk_norm=True),
    "quick_gelu": dict(activation="quick_gelu"),
    "swiglu": dict(mlp="swiglu"),
    "no_qkv_bias": dict(qkv_bias=False),
    "all": dict(layer_scale_init=0.5, qk_norm=True, mlp="swiglu", qkv_bias=False),
}
BLOCK_ARGS = {"layer_scale_init": "layer_scale_init", "qk_norm": "qk_norm", "activation": "activation", "mlp": "mlp_kind",
              "qkv_bias": "qkv_bias"}


def _np(v) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(v), np.float64)


def _ln(x, gamma, beta, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(x.var(-1, keepdims=True) + eps) * gamma + beta


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _act(h, activation, approximate):
    if activation == "quick_gelu":  # timm QuickGELU: x * sigmoid(1.702 x)
        return h / (1.0 + np.exp(-1.702 * h))
    if approximate:
        return 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    return 0.5 * h * (1 + erf(h / math.sqrt(2)))


def block_numpy(block, x, num_queries=None):
    """timm's `Block.forward` in float64 with the block's weights: x + ls1(attn(norm1(x))),
    then x + ls2(mlp(norm2(x))); attention with q_norm / k_norm over head_dim before q k^T * scale;
    the MLP fc1 -> act -> fc2, or fc1 -> chunk(2) -> silu(x1) * x2 -> fc2 (SwiGLUPacked)."""
    att, mlp = block.attention, block.mlp
    eps = block.layer_norm_epsilon
    h = _ln(x, _np(block.norm_1.gamma), _np(block.norm_1.beta), eps)
    q, k, v = (np.einsum("btd,dhk->bhtk", h, _np(getattr(att, f"{n}_kernel")))
               + (_np(getattr(att, f"{n}_bias"))[:, None] if att.qkv_bias else 0.0)  # timm's qkv_bias=False: none
               for n in ("query", "key", "value"))
    if att.qk_norm:
        q = _ln(q, _np(att.query_norm.gamma), _np(att.query_norm.beta), eps)
        k = _ln(k, _np(att.key_norm.gamma), _np(att.key_norm.beta), eps)
    if num_queries is not None:
        q, x = q[:, :, :num_queries], x[:, :num_queries]
    p = _softmax(q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1]))
    y = np.einsum("bhtk,hkd->btd", p @ v, _np(att.out_kernel)) + _np(att.out_bias)
    if block.layer_scale:
        y = y * _np(block.layer_scale[0].scale)
    x = x + y
    h = _ln(x, _np(block.norm_2.gamma), _np(block.norm_2.beta), eps)
    h = h @ _np(mlp.dense_0.kernel) + _np(mlp.dense_0.bias)
    if mlp.kind == "swiglu":
        x1, x2 = np.split(h, 2, axis=-1)  # torch chunk(2): x1 the first half
        h = _silu(x1) * x2
    else:
        h = _act(h, mlp.activation, mlp.gelu_approximate)
    y = h @ _np(mlp.dense_1.kernel) + _np(mlp.dense_1.bias)
    if block.layer_scale:
        y = y * _np(block.layer_scale[1].scale)
    return x + y, p


def _block(options, rng, **kwargs):
    """A block of D=16, 2 heads, with every weight random (LayerScale gains and norms included)."""
    args = {BLOCK_ARGS[k]: v for k, v in options.items()}
    block = L.TransformerBlock(num_heads=2, mlp_dim=12, **args, **kwargs)
    block.build((None, 5, 16))
    for w in block.weights:
        w.assign(rng.normal(0.0, 0.5, w.shape).astype(w.dtype))
    return block


@pytest.mark.parametrize("option", list(OPTIONS))
def test_block_option_matches_timm_formula(option, rng):
    block = _block(OPTIONS[option], rng)
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    ref, ref_p = block_numpy(block, x.astype(np.float64))
    np.testing.assert_allclose(_np(block(x)), ref, atol=1e-5)
    y, probs = block(x, return_attention_scores=True)
    np.testing.assert_allclose(_np(y), ref, atol=1e-5)
    np.testing.assert_allclose(_np(probs), ref_p, atol=1e-5)
    # the class-token-only last block: token 0 of the full block, its attention row
    ref1, ref1_p = block_numpy(block, x.astype(np.float64), num_queries=1)
    np.testing.assert_allclose(_np(block(x, class_token_only=True)), ref1, atol=1e-5)
    np.testing.assert_allclose(_np(block(x, class_token_only=True, return_attention_scores=True)[1]), ref1_p, atol=1e-5)
    again = L.TransformerBlock.from_config(block.get_config())
    assert again.get_config() == block.get_config()


def test_quick_gelu_is_x_sigmoid_1702x():
    x = np.linspace(-6, 6, 49, dtype="float32")
    np.testing.assert_allclose(_np(L.activate(x, "quick_gelu")), x / (1 + np.exp(-1.702 * x.astype(np.float64))),
                               atol=1e-6)


def test_swiglu_gates_the_first_half_with_silu(rng):
    """Dense_0's first mlp_dim columns go through SiLU and gate the second half (timm SwiGLUPacked,
    gate_last=False; DINOv2's w12 chunk order): with the second half fixed at 1, the output is
    Dense_1(silu(x1)); the other order would give Dense_1(x1 * silu(1))."""
    mlp = L.MlpBlock(6, kind="swiglu")
    x = rng.normal(size=(3, 4, 8)).astype("float32")
    mlp.build(x.shape)
    assert tuple(mlp.dense_0.kernel.shape) == (8, 12) and tuple(mlp.dense_1.kernel.shape) == (6, 8)
    w0 = rng.normal(size=(8, 12)).astype("float32")
    w0[:, 6:] = 0.0
    b0 = np.concatenate([rng.normal(size=6), np.ones(6)]).astype("float32")
    mlp.dense_0.kernel.assign(w0)
    mlp.dense_0.bias.assign(b0)
    x1 = x.astype(np.float64) @ w0[:, :6] + b0[:6]
    expected = _silu(x1) @ _np(mlp.dense_1.kernel) + _np(mlp.dense_1.bias)
    np.testing.assert_allclose(_np(mlp(x)), expected, atol=1e-5)
    assert L.MlpBlock.from_config(mlp.get_config()).get_config() == mlp.get_config()


def test_layer_scale_starts_at_its_init_value():
    model = keras_vit.ViT(config=ViTConfig(layer_scale_init=1e-5, **TINY))
    arrays = model_arrays(model)
    gains = [k for k in arrays if "LayerScale" in k]
    assert len(gains) == 2 * TINY["num_layers"]
    for k in gains:
        assert arrays[k].shape == (TINY["hidden_size"],)
        np.testing.assert_array_equal(arrays[k], np.float32(1e-5))
    layer = L.LayerScale(0.1)
    assert L.LayerScale.from_config(layer.get_config()).init_value == 0.1


def test_qk_norm_under_mixed_bfloat16_normalises_in_float32(rng):
    """The query/key LayerNorms compute in float32 inside a bf16 block; the block's output is
    the float32 formula's within bf16 rounding."""
    block = _block(OPTIONS["qk_norm"], rng, dtype="mixed_bfloat16")
    assert block.compute_dtype == "bfloat16"
    assert block.attention.query_norm.compute_dtype == block.attention.key_norm.compute_dtype == "float32"
    assert block.attention.query_norm.gamma.dtype == "float32"
    x = rng.normal(size=(2, 5, 16)).astype("float32")
    y, probs = block(x, return_attention_scores=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    ref, _ = block_numpy(block, x.astype(np.float64))
    err = np.abs(_np(keras.ops.cast(y, "float32")) - ref).max() / np.abs(ref).max()
    assert err < 0.03, err


@pytest.mark.parametrize("option", list(OPTIONS))
def test_analytic_counts_equal_the_built_model(option):
    for classifier in ("token", "gap"):
        cfg = ViTConfig(classifier=classifier, **OPTIONS[option], **TINY)
        assert keras_vit.ViT(config=cfg).count_params() == cfg.count_params()


def test_counts_of_timm_models():
    """timm's own counts (timm 1.0.31 `create_model(...).parameters()`): deit3_small_patch16_224
    22,059,496 (its pos_embed has no class slot, no_embed_class=True: ours adds 384 zeros there);
    vit_small_patch14_dinov2 (518 px, no head) 22,056,192."""
    deit3 = parse_variant("S/16", layer_scale_init=1e-5)
    assert deit3.count_params() - deit3.hidden_size == 22_059_496
    dinov2 = parse_variant("S/14", image_size=518, layer_scale_init=1e-5, include_top=False)
    assert dinov2.count_params() == 22_056_192
    # the swiglu MLP: 3 D mlp_dim multiply-adds per token instead of 2
    s16 = parse_variant("S/16")
    assert s16.replace(mlp="swiglu").flops() - s16.flops() == 12 * 2 * s16.seq_len * 384 * 1536


def _random_model(option: str, rng):
    """(config, model) of one block option with every weight drawn at random (non-trivial gains)."""
    cfg = ViTConfig(**OPTIONS[option], **TINY)
    model = keras_vit.ViT(config=cfg)
    for w in model.weights:
        w.assign(rng.normal(0.0, 0.3, w.shape).astype("float32"))
    return cfg, model


@pytest.mark.parametrize("option", list(OPTIONS))
def test_npz_round_trip_with_canonical_names(option, tmp_path, rng):
    cfg, model = _random_model(option, rng)
    arrays = model_arrays(model)
    b = "Transformer/encoderblock_1/"
    a = b + "MultiHeadDotProductAttention_1/"
    d, m, hd = TINY["hidden_size"], TINY["mlp_dim"], TINY["hidden_size"] // TINY["num_heads"]
    expected = {b + "LayerScale_0/scale": (d,), b + "LayerScale_1/scale": (d,)} if cfg.layer_scale_init else {}
    if cfg.qk_norm:
        expected.update({f"{a}{n}/{p}": (hd,) for n in ("query_norm", "key_norm") for p in ("scale", "bias")})
    hidden = 2 * m if cfg.mlp == "swiglu" else m
    expected.update({b + "MlpBlock_3/Dense_0/kernel": (d, hidden), b + "MlpBlock_3/Dense_0/bias": (hidden,),
                     b + "MlpBlock_3/Dense_1/kernel": (m, d)})
    assert {k: arrays[k].shape for k in expected} == expected
    assert any("LayerScale" in k for k in arrays) == (cfg.layer_scale_init is not None)
    assert any("query_norm" in k for k in arrays) == cfg.qk_norm
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ref = _np(model(x))
    save_npz(model, tmp_path / "m.npz")
    fresh = keras_vit.ViT(config=cfg)
    load_npz(fresh, tmp_path / "m.npz")
    np.testing.assert_array_equal(_np(fresh(x)), ref)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_safetensors_round_trip(option, tmp_path, rng):
    cfg, model = _random_model(option, rng)
    x = rng.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    save_safetensors(model, tmp_path / "m.safetensors")
    again = keras_vit.ViT(weights=str(tmp_path / "m.safetensors"))  # the config from the file's metadata
    assert again.vit_config == cfg
    np.testing.assert_allclose(_np(again(x)), _np(model(x)), atol=1e-5)
    fresh = load_weights(keras_vit.ViT(config=cfg), tmp_path / "m.safetensors")
    np.testing.assert_allclose(_np(fresh(x)), _np(model(x)), atol=1e-5)
