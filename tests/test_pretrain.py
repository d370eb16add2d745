"""keras_vit.pretrain and `vitcli pretrain`: masked patch prediction (paper Appendix B.1.2)."""
import json
import os

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import keras_vit
from keras_vit import pretrain as mpp
from tests.conftest import random_images

SMALL = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1, patch_size=4)


def test_corruption_follows_the_paper():
    rng = np.random.default_rng(0)
    codes, src = mpp.corruption_codes(2000, 64, rng)
    selected = codes != mpp.KEEP
    assert (selected.sum(axis=1) == 32).all()  # exactly 50% of the patches of every image
    frac = np.array([(codes == c).sum() for c in (mpp.MASK, mpp.RANDOM, mpp.UNCHANGED)]) / selected.sum()
    np.testing.assert_allclose(frac, [0.8, 0.1, 0.1], atol=0.01)
    assert (src != np.arange(64)[None]).all() and src.min() >= 0 and src.max() <= 63  # another patch
    codes, _ = mpp.corruption_codes(3, 5, rng, mask_ratio=0.3)
    assert ((codes != mpp.KEEP).sum(axis=1) == 2).all()


def test_three_bit_mean_colour_targets():
    img = np.zeros((1, 8, 8, 3), np.float32)
    img[0, :4, :4] = (255, 0, 0)           # pure red -> bins (7, 0, 0)
    img[0, :4, 4:] = (40, 100, 200)        # bins (1, 3, 6)
    img[0, 4:, :4, 1] = 255                # green
    img[0, 4:, 4:] = 255                   # white -> 511
    t = mpp.patch_targets(img, (4, 4), "color")
    assert t.dtype == np.int32 and t.tolist() == [[7 * 64, 1 * 64 + 3 * 8 + 6, 7 * 8, 511]]
    assert mpp.num_outputs("color", (4, 4), 3) == 512 and mpp.num_outputs("color", (4, 4), 1) == 8
    reg = mpp.patch_targets(img, (4, 4), "color_regression")
    np.testing.assert_allclose(reg[0, 0], [1, -1, -1], atol=1e-6)
    full = mpp.patch_targets(img, (4, 4), "patch_regression")
    assert full.shape == (1, 4, 48)
    np.testing.assert_allclose(full[0, 3], 1.0)
    with pytest.raises(ValueError, match="target must be one of"):
        mpp.patch_targets(img, (4, 4), "pixels")


def test_patch_corruption_layer():
    layer = mpp.PatchCorruption()
    x = np.arange(2 * 4 * 3, dtype="float32").reshape(2, 4, 3)
    codes = np.array([[0, 1, 2, 3], [2, 0, 0, 1]], "int32")
    source = np.array([[1, 2, 0, 0], [3, 0, 0, 0]], "int32")
    out = keras.ops.convert_to_numpy(layer(x, codes, source))
    m = keras.ops.convert_to_numpy(layer.mask_embedding)
    np.testing.assert_allclose(out[0], [x[0, 0], m, x[0, 0], x[0, 3]])
    np.testing.assert_allclose(out[1], [x[1, 3], x[1, 1], x[1, 2], m])


def test_loss_is_on_corrupted_patches_only():
    enc = keras_vit.ViT("Ti/4", image_size=16, include_top=False, **SMALL)
    model = mpp.build_pretrainer(enc, "color")
    assert model.output_shape == (None, 16, 512)
    inputs, targets, weight = next(mpp.masked_patch_batches(random_images(4, 16, 16), (4, 4), 16, 4))
    assert (weight[inputs["codes"] == mpp.KEEP] == 0).all()
    assert weight.mean() == pytest.approx(1.0)  # Keras' mean over B*N == mean over corrupted patches
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    pred = model(inputs)
    other = np.where(inputs["codes"] == mpp.KEEP, (targets + 1) % 512, targets)  # change only kept patches
    a = float(loss(targets, pred, sample_weight=weight))
    b = float(loss(other, pred, sample_weight=weight))
    assert a == pytest.approx(b, rel=1e-6)


@pytest.mark.slow  # the quick loop pre-trains through `vitcli pretrain` (test_cli_pretrain_writes_...)
@pytest.mark.parametrize("target", mpp.TARGETS)
def test_pretraining_learns_and_saves_a_fine_tunable_encoder(digits, tmp_path, target):
    x_tr = digits[0][:256]
    enc = keras_vit.ViT("Ti/4", image_size=32, include_top=False, **SMALL)
    hist = mpp.pretrain_encoder(enc, x_tr, x_tr[:64], target=target, epochs=3, batch_size=32, learning_rate=2e-3,
                        seed=0, verbose=0)
    assert hist["loss"][-1] < hist["loss"][0] and "val_loss" in hist
    path = mpp.save_encoder(enc, str(tmp_path / "run" / "model.keras"))
    loaded = keras_vit.load_model(path)
    assert isinstance(loaded, keras_vit.VisionTransformer) and loaded.output_shape == (None, 32)
    x = digits[2][:4]
    np.testing.assert_allclose(loaded.predict(x, verbose=0), enc.predict(x, verbose=0), atol=1e-5)
    # fine-tuning: a classifier of the same variant takes every weight but the (new) head
    clf = keras_vit.ViT("Ti/4", image_size=32, num_classes=10, **SMALL)
    from keras_vit.train import load_initial_weights  # what `vitcli train --weights` does

    report = load_initial_weights(clf, path)
    assert sorted(report["skipped"]) == ["head/bias", "head/kernel"]
    feats = keras.Model(clf.inputs, clf.get_layer("head").input)
    np.testing.assert_allclose(feats.predict(x, verbose=0), enc.predict(x, verbose=0), atol=1e-5)


def test_pretrain_rejects_bad_input():
    enc = keras_vit.ViT("Ti/4", image_size=32, include_top=False, **SMALL)
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        mpp.pretrain_encoder(enc, random_images(4, 16, 16), epochs=1)
    with pytest.raises(ValueError, match="mask_ratio"):
        mpp.corruption_codes(1, 4, np.random.default_rng(0), mask_ratio=0.0)
    with pytest.raises(ValueError, match="end with .keras"):
        mpp.save_encoder(enc, "model.h5")


def test_cli_pretrain_writes_encoder_and_metrics(tmp_path):
    from keras_vit.cli.main import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--dataset", "digits", "--variant", "Ti/4", "--hidden-size", "32",
                                      "--num-layers", "1", "--num-heads", "2", "--mlp-dim", "64", "--epochs", "1",
                                      "--batch-size", "128", "--model-option", "qk_norm=true", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"vitcli train --dataset digits --weights {out / 'model.keras'}" in result.output
    model = keras_vit.load_model(out / "model.keras")
    assert model.vit_config.include_top is False and model.vit_config.image_size == (16, 16)  # digits' default
    assert model.vit_config.hidden_size == 32 and model.vit_config.num_layers == 1 and model.vit_config.qk_norm
    # what `vitcli train --weights` alone then builds: the encoder's model with a head for the classes
    from keras_vit import train as kt

    tcfg = kt.make_config("digits", weights=str(out / "model.keras"))
    vit = tcfg.vit_config(num_classes=10, channels=3)
    assert tcfg.variant == "checkpoint" and vit == model.vit_config.replace(include_top=True, num_classes=10)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target"] == "color" and len(metrics["history"]["loss"]) == 1
    # a non-square encoder, as vitcli train takes --image-size HxW (was: "not a valid integer range")
    wide = CliRunner().invoke(cli, ["pretrain", "--dataset", "digits", "--variant", "Ti/4", "--hidden-size", "16",
                                    "--num-layers", "1", "--num-heads", "2", "--mlp-dim", "32", "--epochs", "1",
                                    "--batch-size", "128", "--image-size", "16x24", "--out", str(tmp_path / "wide")])
    assert wide.exit_code == 0, wide.output
    assert keras_vit.load_model(tmp_path / "wide" / "model.keras").vit_config.image_size == (16, 24)
    bad = CliRunner().invoke(cli, ["pretrain", "--variant", "Ti/5", "--epochs", "1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "image_size" in bad.output
    # a second run into the same folder is refused; the first encoder stays as it was
    before = (out / "model.keras").read_bytes()
    again = CliRunner().invoke(cli, ["pretrain", "--dataset", "digits", "--epochs", "1", "--seed", "5", "--out", str(out)])
    assert again.exit_code == 2 and "already exists and is not empty; choose another --out" in again.output
    assert len(again.output.strip().splitlines()) == 1 and (out / "model.keras").read_bytes() == before


def test_pretrain_runs_in_a_new_folder_each_time_and_a_failed_step_is_one_line(tmp_path, monkeypatch):
    """The default folder is new for every run (runs/latest is left to `train`); an op error while
    pre-training (out of memory, say) is one line, as `train` gives."""
    import tensorflow as tf

    from keras_vit.cli.main import cli

    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "--dataset", "digits", "--variant", "Ti/4", "--hidden-size", "16", "--num-layers", "1",
            "--num-heads", "1", "--mlp-dim", "16", "--epochs", "1", "--batch-size", "256"]
    runs = [CliRunner().invoke(cli, args) for _ in range(2)]
    assert [r.exit_code for r in runs] == [0, 0], runs[-1].output
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("pretrain-digits-") for f in folders), folders
    assert all((tmp_path / "runs" / f / "model.keras").is_file() for f in folders)

    def oom(*a, **k):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[1,9,9,3]\n"
                                                           "\t [[{{node resize/ResizeBilinear}}]]")

    monkeypatch.setattr(mpp, "pretrain_encoder", oom)
    failed = CliRunner().invoke(cli, args + ["--out", "oom"])
    assert failed.exit_code == 2 and failed.output.strip() == (
        "Error: pre-training failed: OOM when allocating tensor with shape[1,9,9,3]"), failed.output


TINY = ["pretrain", "--dataset", "digits", "--variant", "Ti/4", "--hidden-size", "16", "--num-layers", "1",
        "--num-heads", "1", "--mlp-dim", "16", "--epochs", "1", "--batch-size", "256"]


@pytest.mark.parametrize("option,value,message", [
    ("--lr", "nan", "learning_rate must be a finite number >= 0, got nan"),
    ("--lr", "inf", "learning_rate must be a finite number >= 0, got inf"),
    ("--weight-decay", "nan", "weight_decay must be a finite number >= 0, got nan"),
    ("--weight-decay", "inf", "weight_decay must be a finite number >= 0, got inf"),
    ("--mask-ratio", "nan", "mask_ratio must be a number in (0, 1], got nan"),
])
def test_cli_pretrain_refuses_nan_and_infinity_before_anything(tmp_path, monkeypatch, option, value, message):
    """click's FloatRange lets NaN (and inf, where unbounded) through: refused in one line, no folder made."""
    from keras_vit.cli.main import cli

    monkeypatch.setattr(mpp, "pretrain_encoder", lambda *a, **k: pytest.fail("pre-trained with " + value))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, TINY + [option, value, "--out", str(out)])
    assert result.exit_code == 2 and result.output.strip() == f"Error: {message}", result.output
    assert not out.exists()
    with pytest.raises(ValueError, match="mask_ratio"):
        mpp.PretrainConfig(mask_ratio=float("nan")).validate()


def test_cli_pretrain_that_diverges_saves_nothing(tmp_path):
    """A loss that turns NaN stops the run with train's one line: no encoder saved, no fine-tune hint."""
    from keras_vit.cli.main import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, TINY + ["--lr", "1e30", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == "Error: training diverged (loss NaN); no encoder saved; try a lower --lr"
    assert "fine-tune" not in result.output and not out.exists()


@pytest.mark.slow
def test_vitcli_pretrain_then_train_with_weights(tmp_path):
    """The documented workflow: `vitcli pretrain --dataset D`, then `vitcli train --weights .../model.keras`
    loads every encoder weight (only the new head is left as initialised)."""
    from keras_vit.cli.main import cli

    out = tmp_path / "pre"
    result = CliRunner().invoke(cli, ["pretrain", "--dataset", "digits", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    weights = out / "model.keras"
    result = CliRunner().invoke(cli, ["train", "--dataset", "digits", "--epochs", "1", "--weights", str(weights),
                                      "--output", str(tmp_path / "ft")])
    assert result.exit_code == 0, result.output
    assert "kept as initialised" in result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("initial weights:"))
    assert line.split()[2] != "0" and ", 2 kept as initialised" in line  # head kernel and bias only
    encoder = keras_vit.load_model(weights)
    tuned_before = keras_vit.load_model(tmp_path / "ft" / "model.keras")
    assert {layer.name for layer in encoder.layers} <= {layer.name for layer in tuned_before.layers}


def test_pretrainer_around_a_hybrid_predicts_per_feature_map_patch():
    enc = keras_vit.ViT("R26+S/32", image_size=64, include_top=False, **dict(SMALL, patch_size=1))
    model = mpp.build_pretrainer(enc, "color")
    inputs, targets, _ = next(mpp.masked_patch_batches(random_images(2, 64, 64), (32, 32), 4, 2))
    assert model(inputs).shape == (2, 4, 512) and targets.shape == (2, 4)


class _StartingWeights(keras.callbacks.Callback):
    """Records the model's weights when fit starts (after the build, before any update)."""

    def on_train_begin(self, logs=None):
        self.weights = [np.array(w) for w in self.model.get_weights()]


@pytest.mark.slow
def test_pretrain_seed_fixes_the_starting_weights(tmp_path):
    """Same seed, same initial encoder (the seed is set before the encoder is built); another seed differs."""
    def start(seed, name):
        cfg = mpp.PretrainConfig(dataset="digits", variant="Ti/4", hidden_size=16, num_layers=1, num_heads=2,
                                 mlp_dim=32, epochs=1, batch_size=512, seed=seed)
        probe = _StartingWeights()
        result = mpp.pretrain(cfg, output=str(tmp_path / name), verbose=0, callbacks=[probe])
        assert os.path.isfile(result["model"]) and len(result["history"]["loss"]) == 1
        return probe.weights

    a, b, c = start(1, "a"), start(1, "b"), start(2, "c")
    assert len(a) == len(b) == len(c) > 4
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c) if x.std() > 0)


def _pretrainer_from_layer_names(encoder, target="color"):
    """The reference: the pre-training graph written out from the encoder's layer names."""
    cfg = keras_vit.get_config(encoder)
    n = cfg.num_patches
    images = keras.Input((*cfg.image_size, cfg.channels), name="images")
    codes = keras.Input((n,), dtype="int32", name="codes")
    source = keras.Input((n,), dtype="int32", name="source")
    names = {layer.name for layer in encoder.layers}
    x = images
    for name in ("preprocessing", "resnet", "embedding"):
        if name in names:
            x = encoder.get_layer(name)(x)
    x = mpp.PatchCorruption(name="patch_corruption")(x, codes, source)
    for name in ("cls", "posembed_input", "dropout", *(f"encoderblock_{i}" for i in range(cfg.num_layers)),
                 "encoder_norm"):
        if name in names:
            x = encoder.get_layer(name)(x)
    x = mpp.DropPrefixTokens(cfg.seq_len - n, name="patch_tokens")(x)
    x = keras.layers.Dense(mpp.num_outputs(target, cfg.input_stride, cfg.channels), name="mpp_head",
                           dtype="float32")(x)
    return keras.Model({"images": images, "codes": codes, "source": source}, x)


def _losses(encoder, images, target="color"):
    """Training losses of three epochs of 2 steps."""
    return mpp.pretrain_encoder(encoder, images, target=target, epochs=3, batch_size=4, seed=3, verbose=0)["loss"]


@pytest.mark.parametrize("classifier", ["token", pytest.param("gap", marks=pytest.mark.slow)])
def test_pretraining_on_the_encoders_own_outputs_gives_the_reference_losses(monkeypatch, classifier):
    """Same seed, same losses as the graph written out by layer name."""
    images = random_images(6, 16, 16)

    def encoder():
        keras.utils.set_random_seed(2)
        return keras_vit.ViT("Ti/4", image_size=16, include_top=False, classifier=classifier, **SMALL)

    ours = _losses(encoder(), images)
    monkeypatch.setattr(mpp, "build_pretrainer", _pretrainer_from_layer_names)
    np.testing.assert_allclose(ours, _losses(encoder(), images), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_pretraining_a_loaded_dynamic_size_encoder(tmp_path):
    """The dynamic-size copy of an encoder loaded from .keras pre-trains as the encoder it came from."""
    keras.utils.set_random_seed(2)
    encoder = keras_vit.ViT("Ti/4", image_size=16, include_top=False, **SMALL)
    encoder.save(tmp_path / "enc.keras")
    images = random_images(6, 16, 16)
    want = _losses(encoder, images, "patch_regression")
    dynamic = keras_vit.dynamic_model(keras_vit.load_model(tmp_path / "enc.keras"))
    np.testing.assert_allclose(_losses(dynamic, images, "patch_regression"), want, rtol=0, atol=1e-5)
    features = keras_vit.ViT("Ti/4", image_size=16, include_top=False, feature_layers=(0,), **SMALL)
    with pytest.raises(ValueError, match="feature maps of blocks \\[0\\]"):
        mpp.build_pretrainer(features)
