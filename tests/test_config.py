"""ViTConfig, parse_variant and the analytic counts (no weights allocated)."""
import pytest

from keras_vit.config import VARIANTS, ViTConfig, parse_variant

# Reference parameter counts at 224px, 1000 classes, token classifier (PAPER.md, Table 1 sizes).
REFERENCE_COUNTS = {
    "Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656, "B/32": 88_224_232,
    "B/8": 86_576_872, "L/16": 304_326_632, "L/32": 306_535_400, "H/14": 632_045_800,
    "R50+B/16": 98_659_112, "R50+L/32": 328_994_856, "R26+S/32": 36_431_912,
}


@pytest.mark.parametrize("variant,expected", sorted(REFERENCE_COUNTS.items()))
def test_analytic_param_counts_match_reference(variant, expected):
    assert parse_variant(variant).count_params() == expected


def test_hybrid_count_at_384():
    assert parse_variant("R50+B/16", image_size=384).count_params() == 98_950_952


@pytest.mark.parametrize("size", sorted(VARIANTS))
def test_variant_sizes_follow_table_1(size):
    cfg = parse_variant(f"{size}/16")
    assert (cfg.hidden_size, cfg.mlp_dim, cfg.num_heads, cfg.num_layers) == tuple(
        VARIANTS[size][k] for k in ("hidden_size", "mlp_dim", "num_heads", "num_layers"))


def test_cifar_example_has_64_patches_plus_class_token():
    cfg = parse_variant("Ti/4", image_size=32)
    assert cfg.num_patches == 64 and cfg.seq_len == 65
    assert parse_variant("Ti/4", image_size=32, classifier="gap").seq_len == 64


def test_non_square_grid():
    cfg = parse_variant("B/16", image_size=(224, 320))
    assert cfg.grid_size == (14, 20) and cfg.num_patches == 280


def test_overrides_give_custom_sizes():
    cfg = parse_variant("B/16", hidden_size=128, num_heads=4, mlp_dim=256, num_layers=3, patch_size=8)
    assert (cfg.hidden_size, cfg.num_heads, cfg.mlp_dim, cfg.num_layers, cfg.patch_size) == (128, 4, 256, 3, (8, 8))


def test_hybrid_variants_decode_stages_and_stride():
    assert parse_variant("R50+B/16").resnet_layers == (3, 4, 9)
    assert parse_variant("R50+B/16").input_stride == (16, 16)
    assert parse_variant("R50+L/32").resnet_layers == (3, 4, 6, 3)
    assert parse_variant("R26+S/32").resnet_layers == (2, 2, 2, 2)


def test_round_trip_dict():
    cfg = parse_variant("S/16", image_size=(64, 96), pos_embedding="relative", classifier="gap")
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


def test_block_options_round_trip_and_old_dicts_load():
    cfg = parse_variant("S/16", layer_scale_init=1, qk_norm=True, mlp="swiglu")
    assert cfg.layer_scale_init == 1.0 and isinstance(cfg.layer_scale_init, float)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    old = parse_variant("S/16").to_dict()
    for key in ("layer_scale_init", "qk_norm", "activation", "mlp"):  # a config saved before issue #26
        old.pop(key)
    assert ViTConfig.from_dict(old) == parse_variant("S/16")


def test_flops_grow_with_sequence():
    assert parse_variant("B/16", image_size=384).flops() > 2.9 * parse_variant("B/16").flops()


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/", "", "R99+B/16", "Ti/0"])
def test_unknown_variant_is_a_clear_error(variant):
    with pytest.raises(ValueError, match="variant|depth|patch"):
        parse_variant(variant)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=225), "225x225 is not divisible by the patch size 16x16"),
    (dict(image_size=(224, 100)), "not divisible"),
    (dict(classifier="cls"), "classifier must be one of token, gap, map; got 'cls'"),
    (dict(pos_embedding="rope"), "pos_embedding must be one of"),
    (dict(channels=0), "channels must be an integer >= 1, got 0"),
    (dict(num_heads=5), "divisible by num_heads"),
    (dict(dropout_rate=1.5), "dropout_rate must be in"),
    (dict(num_classes=0), "num_classes"),
    (dict(nonsense=1), "unknown option"),
    (dict(layer_scale_init=0.0), "layer_scale_init must be a positive number (e.g. 1e-5) or None, got 0.0"),
    (dict(layer_scale_init="1e-5"), "layer_scale_init must be a positive number"),
    (dict(qk_norm=1), "qk_norm must be True or False, got 1"),
    (dict(activation="relu"), "activation must be one of gelu, quick_gelu; got 'relu'"),
    (dict(mlp="glu"), "mlp must be one of mlp, swiglu; got 'glu'"),
    (dict(mlp="swiglu", activation="quick_gelu"), "activation 'quick_gelu' does not apply to mlp='swiglu'"),
    (dict(include_top="False"), "include_top must be True or False, got 'False'"),
    (dict(include_preprocessing="no"), "include_preprocessing must be True or False, got 'no'"),
    (dict(gelu_approximate=0), "gelu_approximate must be True or False, got 0"),
    (dict(image_size="224"), "image_size must be an int or (height, width), got '224'"),
    (dict(image_size=224.0), "image_size must be an int or (height, width), got 224.0"),
    (dict(image_size=(224, 224, 3)), "image_size must be an int or (height, width)"),
    (dict(image_size=(224, 10**20)), "image_size (224, 100000000000000000000) is larger than 16384 pixels a side"),
    (dict(layer_norm_epsilon=-1.0), "layer_norm_epsilon must be a small positive number (e.g. 1e-6), got -1.0"),
    (dict(layer_norm_epsilon=0), "layer_norm_epsilon must be a small positive number"),
    (dict(resnet_layers=()), "resnet_layers must be the units per ResNet stage, one or more positive integers"),
    (dict(resnet_layers=(3, 0)), "got (3, 0)"),
    (dict(resnet_layers=3), "resnet_layers must be"),
])
def test_bad_options_name_the_value_and_what_is_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        parse_variant("B/16", **kwargs)


def test_numpy_numbers_are_taken_as_python_numbers():
    """A notebook's `num_classes=y.max() + 1` is a NumPy integer: taken, and stored as int (JSON)."""
    import json

    import numpy as np

    cfg = parse_variant("B/16", image_size=np.int64(32), patch_size=np.array([8, 8]), num_classes=np.int64(3),
                        num_registers=np.int32(2), representation_size=np.int64(16), dropout_rate=np.float32(0.25),
                        layer_scale_init=np.float32(0.5), layer_norm_epsilon=np.float64(1e-5),
                        pixel_mean=[np.float32(0.5)] * 3, pixel_std=(np.float64(0.25),) * 3, feature_layers=(np.int64(-1),),
                        include_top=False)
    assert cfg == parse_variant("B/16", image_size=32, patch_size=8, num_classes=3, num_registers=2, representation_size=16,
                                dropout_rate=0.25, layer_scale_init=0.5, layer_norm_epsilon=1e-5, pixel_mean=(0.5,) * 3,
                                pixel_std=(0.25,) * 3, feature_layers=(11,), include_top=False)
    assert type(cfg.num_classes) is int and type(cfg.dropout_rate) is float and type(cfg.pixel_mean[0]) is float
    assert ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


FEATURE_OPTIONS = [dict(include_top=False, feature_layers=(0,)), dict(include_top=False, feature_layers=(1, -1)),
                   dict(include_top=False, output="tokens"), dict(include_top=False, output="tokens", classifier="map"),
                   dict(include_top=False, output="tokens", classifier="gap", fc_norm=True),
                   dict(include_top=False, feature_layers=(0,), pre_norm=True, classifier="map")]


@pytest.mark.parametrize("options", FEATURE_OPTIONS)
def test_features_models_count_what_they_build(options):
    """feature_layers stops after its last block, output="tokens" has no pooling or head: the analytic counts
    follow (were the whole classifier's: 85.8 M for B/16's first block, 7.8 M built), and FLOPs too."""
    import keras_vit

    cfg = ViTConfig(hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64, patch_size=8, image_size=16, **options)
    assert cfg.count_params() == keras_vit.ViT(config=cfg).count_params()
    whole = cfg.replace(include_top=True, output=None, feature_layers=None)
    assert cfg.flops() < whole.flops()
    if cfg.feature_layers == (0,):
        assert cfg.flops() < cfg.replace(feature_layers=(2,)).flops()


def test_feature_layers_none_numpy_values_and_typos_are_plain():
    """feature_layers=None is the default (was a TypeError); NumPy arrays are taken as sequences; a mistyped
    argument or field is a ValueError naming it; a bad index is named as given, not rewritten."""
    import numpy as np

    import keras_vit

    tiny = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=8, image_size=16)
    assert keras_vit.ViT(variant=None, feature_layers=None, **tiny).vit_config.feature_layers is None
    cfg = ViTConfig(**{**tiny, "patch_size": 1}, pixel_mean=np.array([0.5, 0.5, 0.5]), pixel_std=np.array([0.5] * 3),
                    resnet_layers=np.array([1, 1]))
    assert (cfg.pixel_mean, cfg.resnet_layers) == ((0.5, 0.5, 0.5), (1, 1))
    with pytest.raises(ValueError, match=r"unknown ViT arguments \['hiden_size'\]; allowed: \["):
        keras_vit.ViT(variant=None, hiden_size=3, **tiny)
    with pytest.raises(ValueError, match=r"unknown ViTConfig fields \['foo'\]"):
        ViTConfig(**tiny).replace(foo=1)
    for given, shown in (((-5,), r"\(-5,\)"), ((0, -2), r"\(0, -2\)"), (0, "0")):
        with pytest.raises(ValueError, match=r"feature_layers must be .*got " + shown + "$"):
            ViTConfig(include_top=False, feature_layers=given, **tiny)
