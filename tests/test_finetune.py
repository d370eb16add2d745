"""Linear probe (frozen backbone) and layer-wise learning-rate decay, read back from the optimizer."""
from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit import finetune
from keras_vit.config import ViTConfig

TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=3, patch_size=4, image_size=8, num_classes=4)


def _group(path: str, layers: int) -> int:
    """BEiT's layer id of a variable: 0 embeddings, i + 1 block i, layers + 1 the rest."""
    top = path.split("/")[0]
    if top.startswith("encoderblock_"):
        return int(top.split("_")[1]) + 1
    return 0 if top in ("embedding", "cls", "posembed_input", "resnet") else layers + 1


@pytest.mark.parametrize("hybrid", [False, True])
def test_layer_decay_rates_per_block_from_the_optimizer(hybrid):
    """One SGD step with unit gradients moves each variable by exactly its learning rate."""
    extra = dict(patch_size=1, image_size=32, resnet_layers=(1, 1, 1)) if hybrid else {}
    model = keras_vit.ViT(config=ViTConfig(**{**TINY, **extra}))
    lr, decay, layers = 0.1, 0.5, TINY["num_layers"]
    opt = finetune.layerwise_optimizer(model, decay, lambda s: keras.optimizers.SGD(learning_rate=lr * s))
    before = [v.numpy().copy() for v in model.trainable_variables]
    opt.apply([keras.ops.ones_like(v) for v in model.trainable_variables], model.trainable_variables)
    seen = set()
    for v, b in zip(model.trainable_variables, before):
        step = float(np.mean(b - v.numpy()))
        expected = lr * decay ** (layers + 1 - _group(v.path, layers))
        assert step == pytest.approx(expected, rel=1e-5), v.path
        seen.add(_group(v.path, layers))
    assert seen == set(range(layers + 2))  # embeddings, every block and the head were all checked
    rates = sorted(float(o.learning_rate) for o in opt.optimizers)
    assert rates == pytest.approx(sorted(lr * decay ** k for k in range(layers + 2)))


def test_freeze_backbone_leaves_only_the_head():
    model = finetune.freeze_backbone(keras_vit.ViT(config=ViTConfig(**TINY)))
    assert [v.path for v in model.trainable_variables] == ["head/kernel", "head/bias"]
    with pytest.raises(ValueError, match="no head"):
        finetune.freeze_backbone(keras_vit.ViT(config=ViTConfig(**{**TINY, "include_top": False})))
    with pytest.raises(ValueError, match=r"layer decay must be in \(0, 1\]"):
        finetune.layer_decay_scales(3, 1.5)


# --- through training (keras_vit.train / vitcli train) -------------------------------------------
SMALL = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


def test_make_optimizer_layer_decay_rates_and_one_global_clip():
    from keras_vit import train as kt

    cfg = kt.make_config("digits", recipe="finetune", layer_decay=0.5, learning_rate=0.1, warmup_epochs=0,
                         clipnorm=1.0, **SMALL)
    model = keras_vit.ViT("Ti/4", image_size=16, num_classes=10, **SMALL)
    opt = kt.make_optimizer(cfg, steps_per_epoch=10, model=model)
    assert isinstance(opt, finetune.LayerwiseOptimizer)
    rates = sorted(float(o.learning_rate) for o in opt.optimizers)
    assert rates == pytest.approx(sorted(0.1 * 0.5 ** k for k in range(SMALL["num_layers"] + 2)))
    assert all(o.global_clipnorm is None for o in opt.optimizers)
    # unit gradients everywhere: one global norm of sqrt(#weights) scales every update alike
    variables = model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    opt.apply([keras.ops.ones_like(v) for v in variables], variables)
    total = np.sqrt(sum(int(np.prod(v.shape)) for v in variables))
    for v, b in zip(variables, before):
        expected = 0.1 * 0.5 ** (SMALL["num_layers"] + 1 - _group(v.path, SMALL["num_layers"])) / total
        assert float(np.mean(b - v.numpy())) == pytest.approx(expected, rel=1e-4), v.path
    with pytest.raises(kt.TrainError, match=r"layer_decay must be in \(0, 1\]"):
        kt.make_config("digits", layer_decay=0.0)
    with pytest.raises(kt.TrainError, match="use one"):
        kt.make_config("digits", layer_decay=0.5, freeze_backbone=True)


def _random_start(tmp_path, *options):
    """A small model with every weight random, saved as tmp_path/start.npz, and the `vitcli train`
    arguments that fine-tune it on digits for one epoch into tmp_path/run with `options`."""
    src = keras_vit.ViT("Ti/4", image_size=16, num_classes=10, **SMALL)
    rng = np.random.default_rng(0)
    for v in src.weights:
        v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    ckpt = keras_vit.save_npz(src, tmp_path / "start.npz")
    args = ["train", "--dataset", "digits", "--epochs", "1", "--weights", ckpt, *options, "--output", str(tmp_path / "run")]
    for k, v in SMALL.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return src, args


def test_vitcli_freeze_backbone_trains_only_the_head(tmp_path):
    """A linear probe from a checkpoint: after training every backbone weight is bit-identical to
    the checkpoint's, the head moved, and config.json records the option."""
    import json

    from click.testing import CliRunner

    from keras_vit.cli.main import cli
    from keras_vit.weights import model_arrays

    src, args = _random_start(tmp_path, "--freeze-backbone", "--jit", "none", "--mixed-precision", "none")
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output[-2000:]
    trained = keras_vit.load_model(run / "model.keras")
    start, end = model_arrays(src), model_arrays(trained)
    for k in start:
        if k.startswith("head/"):
            assert not np.array_equal(start[k], end[k]), k
        else:
            np.testing.assert_array_equal(start[k], end[k], err_msg=k)
    with open(run / "config.json") as f:
        train_cfg = json.load(f)["train"]
    assert train_cfg["freeze_backbone"] is True and train_cfg["layer_decay"] is None
    assert trained.class_names == [str(i) for i in range(10)]  # the dataset's names travel with the model
    assert [v.path for v in trained.trainable_weights] == ["head/kernel", "head/bias"]  # reloads frozen


@pytest.mark.parametrize("options, kernels", [
    ((), ("MultiHeadDotProductAttention_1/query", "MultiHeadDotProductAttention_1/value")),
    (("--lora-alpha", "4", "--lora-targets", "key, mlp"),
     ("MultiHeadDotProductAttention_1/key", "MlpBlock_3/Dense_0", "MlpBlock_3/Dense_1")),
])
def test_vitcli_lora_trains_the_adapters_and_the_head(tmp_path, options, kernels):
    """`vitcli train --lora R` from a checkpoint: model.keras (the adapters merged) differs from the
    checkpoint in the blocks' targeted kernels (query and value, or --lora-targets) and the head alone,
    bit for bit elsewhere; config.json records rank, alpha and targets. Default precision and compilation."""
    import json

    from click.testing import CliRunner

    from keras_vit.cli.main import cli
    from keras_vit.weights import model_arrays

    src, args = _random_start(tmp_path, "--lora", "2", *options)
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output[-2000:]
    trained = keras_vit.load_model(run / "model.keras")
    assert not any(getattr(layer, "lora_enabled", False) for layer in trained._flatten_layers())
    start, end = model_arrays(src), model_arrays(trained)
    changed = {k for k in start if not np.array_equal(start[k], end[k])}
    blocks = range(SMALL["num_layers"])
    assert changed == {"head/kernel", "head/bias"} | {
        f"Transformer/encoderblock_{i}/{p}/kernel" for i in blocks for p in kernels}, sorted(changed)
    with open(run / "config.json") as f:
        saved = json.load(f)["train"]
    assert (saved["lora_rank"], saved["lora_alpha"], saved["lora_targets"]) == (
        (2, 4.0, ["key", "mlp"]) if options else (2, None, None))


def test_vitcli_lora_bad_options_are_one_line(tmp_path):
    """Bad LoRA options: one line naming the value and what is allowed, exit 2, no run folder."""
    from click.testing import CliRunner

    from keras_vit.cli.main import cli

    for bad, message in ((["--lora", "0"], "lora_rank must be a positive integer, got 0"),
                         (["--lora", "2", "--freeze-backbone"], "use one"),
                         (["--lora", "2", "--lora-targets", "query,proj"],
                          "LoRA targets must be distinct names among query, key, value, mlp; got ['query', 'proj']"),
                         (["--lora", "2", "--lora-targets", "value,value"], "distinct names"),
                         (["--lora", "2", "--lora-targets", ""], "distinct names"),
                         (["--lora", "2", "--lora-alpha", "0"], "LoRA alpha must be a positive number, got 0.0"),
                         (["--lora", "2", "--lora-alpha", "nan"], "LoRA alpha must be a positive number, got nan"),
                         (["--lora-alpha", "8"], "give lora_rank too"),
                         (["--lora-targets", "key"], "give lora_rank too")):
        result = CliRunner().invoke(cli, ["train", "--dataset", "digits", "--epochs", "1", *bad,
                                          "--output", str(tmp_path / "bad")])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, (bad, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_train_with_layer_decay_records_it(tmp_path):
    import json

    from keras_vit import train as kt

    cfg = kt.make_config("digits", epochs=1, layer_decay=0.75, jit_compile="none", mixed_precision="none", augment="none", **SMALL)
    result = kt.train(cfg, output=str(tmp_path / "run"), verbose=0)
    assert np.isfinite(result["last_epoch"]["loss"]) and result["test"]["top1"] > 0.2
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["train"]["layer_decay"] == 0.75


def test_vitcli_bad_layer_decay_is_one_line():
    from click.testing import CliRunner

    from keras_vit.cli.main import cli

    result = CliRunner().invoke(cli, ["train", "--layer-decay", "2"])
    assert result.exit_code == 2 and result.output.strip().count("\n") == 0
    assert "layer_decay must be in (0, 1], got 2.0" in result.output


def test_a_probe_on_a_checkpoint_that_does_not_fit_is_refused_before_any_run_folder(tmp_path, monkeypatch):
    """--freeze-backbone from a .keras file of other sizes would load one or two variables and train a
    head on a random backbone: one line, and no run folder or runs/latest made for the failed run;
    without sizes the run takes the file's model at its own image size."""
    import json
    import os

    from click.testing import CliRunner

    from keras_vit.cli.main import cli

    src = keras_vit.ViT("Ti/4", image_size=16, num_classes=10, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    src.save(tmp_path / "src.keras")
    monkeypatch.chdir(tmp_path)
    args = ["train", "--dataset", "digits", "--epochs", "1", "--weights", str(tmp_path / "src.keras"), "--freeze-backbone",
            "--jit", "none", "--mixed-precision", "none"]
    result = CliRunner().invoke(cli, [*args, "--variant", "Ti/4", "--hidden-size", "48", "--num-heads", "2"])
    assert result.exit_code != 0 and "variables do not fit this model" in result.output, result.output[-1500:]
    assert "--freeze-backbone would train on them untrained" in result.output
    assert not os.path.exists(tmp_path / "runs")  # no folder, no runs/latest moved
    result = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "probe")])
    assert result.exit_code == 0, result.output[-1500:]
    config = json.loads((tmp_path / "probe" / "config.json").read_text())
    assert config["train"]["variant"] == "checkpoint" and config["model"]["image_size"] == [16, 16]
    assert config["model"]["hidden_size"] == 32
