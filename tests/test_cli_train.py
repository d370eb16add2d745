"""`vitcli train / evaluate / predict`: a short digits run that is killed (kill -9) after a few
epochs and resumed, then evaluated and used for prediction; bad input gives one line."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import click
import numpy as np
import pytest
from click.testing import CliRunner

from keras_vit.cli.main import cli

EPOCHS, KILL_AFTER = 12, 3
_VITCLI = os.path.join(os.path.dirname(sys.executable), "vitcli")


def _cmd(*args):
    return ([_VITCLI] if os.path.exists(_VITCLI) else [sys.executable, "-m", "keras_vit.cli.main"]) + list(args)


def _env():
    # TensorFlow's own log settings left out: the quiet CLI is tested on what a user sees
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "KERAS_BACKEND": "tensorflow"}


def _png(path):
    """(width, height, pixel std) of a PNG file."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size[0], im.size[1], float(np.asarray(im.convert("L"), np.float32).std())


def _backup_epoch(run):
    try:
        with open(os.path.join(run, "backup", "training_metadata.json")) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Train digits for EPOCHS with the default recipe, kill -9 after epoch KILL_AFTER, resume."""
    run = str(tmp_path_factory.mktemp("cli") / "run")
    log = open(run + ".log", "w")
    proc = subprocess.Popen(_cmd("train", "--dataset", "digits", "--epochs", str(EPOCHS), "--checkpoint-interval", "0",
                                 "--output", run),
                            stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 400
    while _backup_epoch(run) < KILL_AFTER and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, open(run + ".log").read()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _backup_epoch(run)
    assert KILL_AFTER <= killed_at < EPOCHS and not os.path.exists(os.path.join(run, "model.keras"))
    resumed = subprocess.run(_cmd("train", "--resume", "--output", run), capture_output=True, text=True,
                             env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    return run, killed_at, resumed.stdout, open(run + ".log").read() + resumed.stdout + resumed.stderr


def test_resume_after_kill_ends_with_all_epochs(killed_and_resumed):
    run, killed_at, stdout, _ = killed_and_resumed
    with open(os.path.join(run, "metrics.csv")) as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == list(range(EPOCHS))  # each epoch once: resumed at killed_at, not restarted
    with open(os.path.join(run, "results.json")) as f:
        result = json.load(f)
    assert result["resumed"] and result["epochs"] == EPOCHS
    assert "test top-1" in stdout and f"{EPOCHS} epochs" in stdout


def test_short_run_learns_digits(killed_and_resumed):
    """12 epochs (killed and resumed on the way) reach a bar chance (10%) cannot: >= 80%."""
    run, _, _, _ = killed_and_resumed
    with open(os.path.join(run, "results.json")) as f:
        assert json.load(f)["test"]["top1"] >= 0.80


def test_run_folder(killed_and_resumed):
    run, _, _, _ = killed_and_resumed
    for name in ("model.keras", "best.keras", "last.keras", "config.json", "metrics.csv", "class_names.json",
                 "results.json", "curves.png"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert os.listdir(os.path.join(run, "logs")) and not os.path.exists(os.path.join(run, "backup"))
    assert not [f for f in os.listdir(run) if ".tmp" in f]
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    from keras_vit import train as kt

    assert kt.TrainConfig.from_dict(config["train"]) == kt.make_config("digits", epochs=EPOCHS, checkpoint_interval=0)
    assert config["class_names"] == [str(i) for i in range(10)]
    assert os.path.isabs(config["cwd"])  # where a folder:/records: path given relative is resolved from


def test_curves_png_shows_loss_accuracy_and_learning_rate(killed_and_resumed):
    run, _, _, _ = killed_and_resumed
    with open(os.path.join(run, "metrics.csv")) as f:
        lr = [float(r["learning_rate"]) for r in csv.DictReader(f)]
    assert len(lr) == EPOCHS and lr[0] < lr[2] and lr[-1] < max(lr)  # warm-up, then cosine decay
    width, height, std = _png(os.path.join(run, "curves.png"))
    assert width > 800 and height > 250 and std > 10


def test_cli_output_has_no_tensorflow_start_up_lines(killed_and_resumed):
    """Both processes (the killed run and the resumed one) print no C++ log lines."""
    _, _, _, output = killed_and_resumed
    for noise in ("cuInit", "oneDNN", "absl", "E0000", "W0000", "I0000", "rebuild TensorFlow", "shuffle=True"):
        assert noise not in output, noise
    assert "test top-1" in output and "precision:" in output


@pytest.fixture(scope="module")
def digits_model(killed_and_resumed):
    import keras_vit

    run, _, _, _ = killed_and_resumed
    return run, keras_vit.load_model(os.path.join(run, "model.keras"))


def _model_probs(model, images):
    import tensorflow as tf

    from keras_vit.model import get_config

    x = tf.image.resize(np.asarray(images, np.float32), get_config(model).image_size).numpy()
    logits = model.predict(x, verbose=0)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_evaluate_agrees_with_model_predict(digits_model):
    from keras_vit.data import digits_arrays

    run, model = digits_model
    result = CliRunner().invoke(cli, ["evaluate", "--model", run, "--dataset", "digits", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert set(report) >= {"loss", "top1", "top5", "per_class"}
    _, _, x_te, y_te = digits_arrays()
    pred = _model_probs(model, x_te).argmax(-1)
    assert report["top1"] == pytest.approx(float((pred == y_te).mean()), abs=1e-9)
    assert report["per_class"]["3"] == pytest.approx(float((pred[y_te == 3] == 3).mean()), abs=1e-9)
    assert report["top5"] >= report["top1"] >= 0.8
    text = CliRunner().invoke(cli, ["evaluate", "--model", os.path.join(run, "model.keras")])
    assert text.exit_code == 0 and "top-1" in text.output and len(text.output.splitlines()) == 11
    confusion = np.asarray(report["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == report["count"] == len(y_te)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(report["top1"], abs=1e-9)
    assert confusion[3].sum() == (y_te == 3).sum()


def test_evaluate_on_a_folder_of_some_classes_scores_them_by_name(digits_model, tmp_path):
    """A folder with two of the model's ten classes: its labels are the model's 3 and 7, not 0 and 1."""
    from PIL import Image

    from keras_vit.data import digits_arrays

    run, model = digits_model
    _, _, x_te, y_te = digits_arrays()
    x = np.round(x_te).astype(np.uint8)
    for split in ("train", "test"):
        for cls in (3, 7):
            (tmp_path / "d" / split / str(cls)).mkdir(parents=True)
            for i in np.flatnonzero(y_te == cls):
                Image.fromarray(x[i]).save(tmp_path / "d" / split / str(cls) / f"{i}.png")
    result = CliRunner().invoke(cli, ["evaluate", "--model", run, "--dataset", f"folder:{tmp_path / 'd'}", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    keep = (y_te == 3) | (y_te == 7)
    pred = _model_probs(model, x[keep].astype(np.float32)).argmax(-1)
    assert report["count"] == keep.sum() and set(report["per_class"]) == {"3", "7"}
    assert report["top1"] == pytest.approx(float((pred == y_te[keep]).mean()), abs=1e-9) and report["top1"] > 0.5
    assert report["per_class"]["7"] == pytest.approx(float((pred[y_te[keep] == 7] == 7).mean()), abs=1e-9)


def test_evaluate_names_the_bad_images_it_skipped(digits_model, tmp_path):
    """evaluate --skip-bad-images counted the files it skipped but named none (train lists them)."""
    from PIL import Image

    run, _ = digits_model
    (tmp_path / "d" / "3").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "d" / "3" / "a.png")
    (tmp_path / "d" / "3" / "b.png").write_bytes(b"not a png")
    result = CliRunner().invoke(cli, ["evaluate", "--model", run, "--dataset", f"folder:{tmp_path / 'd'}",
                                      "--skip-bad-images"])
    assert result.exit_code == 0, result.output
    assert "(1 images, 1 bad files skipped)" in result.output
    assert f"skipped: {tmp_path / 'd' / '3' / 'b.png'}" in result.output
    as_json = CliRunner().invoke(cli, ["evaluate", "--model", run, "--dataset", f"folder:{tmp_path / 'd'}",
                                       "--skip-bad-images", "--json"])
    assert json.loads(as_json.output.strip().splitlines()[-1])["bad_image_paths"] == [str(tmp_path / "d" / "3" / "b.png")]


def test_evaluate_scores_a_plain_folder_whole_unless_the_model_trained_on_it(digits_model, tmp_path):
    """A folder of class sub-folders (no train/ or test/) is scored whole, one class allowed; the model's
    own training folder (its run's config.json) is scored on the run's hold-out, as training's test."""
    import shutil

    from PIL import Image

    from keras_vit.data import digits_arrays

    run, model = digits_model
    _, _, x_te, y_te = digits_arrays()
    x = np.round(x_te).astype(np.uint8)
    for cls in (3, 7):
        (tmp_path / "plain" / str(cls)).mkdir(parents=True)
        for i in np.flatnonzero(y_te == cls):
            Image.fromarray(x[i]).save(tmp_path / "plain" / str(cls) / f"{i}.png")
    n = int(((y_te == 3) | (y_te == 7)).sum())
    for folder, count in ((tmp_path / "plain", n), (tmp_path / "plain" / "3", None)):
        if count is None:  # PATH/3 itself: no class sub-folders; give its parent's layout one class instead
            shutil.copytree(tmp_path / "plain" / "3", tmp_path / "only" / "3")
            folder, count = tmp_path / "only", int((y_te == 3).sum())
        result = CliRunner().invoke(cli, ["evaluate", "--model", run, "--dataset", f"folder:{folder}", "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output.strip().splitlines()[-1])["count"] == count
    own = tmp_path / "own"
    own.mkdir()
    shutil.copy(os.path.join(run, "model.keras"), own / "model.keras")
    (own / "config.json").write_text(json.dumps({"train": {"dataset": f"folder:{tmp_path / 'plain'}", "seed": 1,
                                                           "val_fraction": 0.5}}))
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(own), "--dataset", f"folder:{tmp_path / 'plain'}/",
                                      "--json"])
    assert result.exit_code == 0, result.output
    held_out = json.loads(result.output.strip().splitlines()[-1])["count"]
    assert 0 < held_out < n and abs(held_out - n / 2) <= 2


def test_a_file_that_is_not_an_image_and_a_damaged_weights_file_are_one_line(digits_model, tmp_path):
    run, _ = digits_model
    (tmp_path / "text.png").write_text("hello")
    (tmp_path / "junk.keras").write_bytes(b"PK not a zip")
    for args, message in (
            (["predict", "--model", run, str(tmp_path / "text.png")],
             f"cannot read image {tmp_path / 'text.png'}: not a decodable JPEG/PNG/BMP/GIF"),
            (["train", "--variant", "Ti/4", "--weights", str(tmp_path / "junk.keras"), "--output", str(tmp_path / "r")],
             "--weights: could not load"),
            (["models", "--image-size", "7"], "--image-size 7 is not a multiple of any listed variant's patch size")):
        result = CliRunner().invoke(cli, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "r").exists()  # refused before a run folder is made
    listed = CliRunner().invoke(cli, ["models", "--image-size", "32"])
    assert listed.exit_code == 0 and "H/14" in listed.output and "-: 32 px is not a multiple" in listed.output


def test_evaluate_plot_writes_a_confusion_matrix_png(digits_model):
    run, _ = digits_model
    result = CliRunner().invoke(cli, ["evaluate", "--model", run, "--dataset", "digits", "--plot"])
    assert result.exit_code == 0, result.output
    png = os.path.join(run, "confusion_digits.png")
    assert f"confusion matrix: {png}" in result.output
    width, height, std = _png(png)
    assert width > 300 and height > 300 and std > 10


def test_predict_agrees_with_model_predict(digits_model, tmp_path):
    from PIL import Image

    from keras_vit.data import digits_arrays

    run, model = digits_model
    _, _, x_te, _ = digits_arrays()
    images = np.round(x_te[:3]).astype(np.uint8)
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(img).save(paths[-1])
    result = CliRunner().invoke(cli, ["predict", "--model", run, "--top-k", "2", *paths])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    probs = _model_probs(model, images.astype(np.float32))
    assert len(lines) == 3
    for line, path, p in zip(lines, paths, probs):
        name, prob = line.split(": ", 1)[1].split(", ")[0].split(" ")
        assert line.startswith(path) and int(name) == p.argmax() and float(prob) == pytest.approx(p.max(), abs=1e-3)


def test_help_does_not_import_tensorflow():
    code = ("import sys; from keras_vit.cli.main import cli\n"
            "for args in (['--help'], ['train', '--help'], ['evaluate', '--help'], ['predict', '--help']):\n"
            "    try: cli(args)\n    except SystemExit: pass\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'heavy import'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def not_a_model(tmp_path_factory):
    import keras

    path = tmp_path_factory.mktemp("bad") / "other.keras"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(path)
    return str(path)


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "imagenet9"], "unknown dataset 'imagenet9'"),
    (["train", "--dataset", "folder:/no/such/folder"], "does not exist"),
    (["train", "--dataset", "folder:README.md"], "'README.md' is a file, not a folder"),
    (["train", "--image-size", "31"], "image_size 31x31 is not divisible by the patch size 4x4"),
    (["train", "--epochs", "-1"], "epochs must be a positive integer, got -1"),
    (["train", "--variant", "Q/16"], "unknown variant 'Q/16'"),
    (["train", "--ema", "1.5"], "ema must be a momentum in (0, 1), e.g. 0.999, got 1.5"),
    (["train", "--resume", "--output", "/no/such/run"], "nothing to resume"),
    (["train", "--resume", "--epochs", "3"], "--resume continues a run with its saved options"),
    (["train", "--model-option", "qk_norm"], "--model-option takes KEY=VALUE (e.g. qk_norm=true), got 'qk_norm'"),
    (["train", "--model-option", "qk_norm=1", "--model-option", "qk-norm=0"], "--model-option qk_norm is given twice"),
    (["train", "--model-option", "registers=4"], "unknown model option 'registers'; allowed: activation, "),
    (["train", "--model-option", "image_size=32"], "model option 'image_size' is set by image_size (--image-size), not in model"),
    (["train", "--model-option", "qk_norm=yes"], "qk_norm must be True or False, got 'yes'"),
    (["train", "--model-option", "mlp=swigloo"], "mlp must be one of"),
    (["train", "--resume", "--model-option", "qk_norm=true"], "drop --model-option"),
    (["train", "--resume", "--lora", "2", "--jit", "none"], "drop --jit, --lora"),  # the flags, not the fields
    (["train", "--lora", "-1"], "lora_rank must be a positive integer, got -1"),
    (["train", "--resume", "--dataset", "mnist"], "drop --dataset"),
    (["train", "--bogus"], "No such option '--bogus'. (see 'cli train --help')"),  # click's, no usage block (CliRunner: 'cli')
    (["pretrain", "--epochs", "0"], "Invalid value for '--epochs': 0 is not in the range x>=1."),
    (["trian"], "No such command 'trian'."),
    (["train", "--resume", "--dataset", "digits", "--seed", "1"], "drop --dataset, --seed"),  # the default, typed
    (["train", "--lr", "nan"], "learning_rate must be a finite number >= 0, got nan"),
    (["train", "--lr", "inf"], "learning_rate must be a finite number >= 0, got inf"),
    (["train", "--warmup-epochs", "inf"], "warmup_epochs must be a finite number >= 0, got inf"),
    (["train", "--weight-decay", "nan"], "weight_decay must be a finite number >= 0, got nan"),
    (["train", "--label-smoothing", "nan"], "label_smoothing must be a finite number >= 0, got nan"),
    (["train", "--mixup", "nan"], "mixup must be a finite number >= 0, got nan"),
    (["train", "--clipnorm", "nan"], "clipnorm must be > 0 (or None for no clipping), got nan"),
    (["evaluate", "--model", "NOT_A_MODEL"], "not a keras-vit model"),
    (["evaluate", "--model", "/no/such.keras"], "does not exist"),
    (["predict", "--model", "NOT_A_MODEL", "README.md"], "not a keras-vit model"),
    (["predict", "--model", "NOT_A_MODEL", "/no/such.png"], "image file '/no/such.png' does not exist"),
    (["fewshot", "--model", "Ti/16", "--shots", "1,,5"], "--shots must be comma-separated distinct positive integers"),
    (["fewshot", "--model", "Ti/16", "--shots", "1,1"], "--shots must be comma-separated distinct positive integers"),
    (["fewshot", "--model", ".", "--shots", "1"], "'.' is a folder without model.keras (not a finished run)"),
])
def test_bad_input_gives_one_line(args, message, not_a_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("not an image")
    args = [not_a_model if a == "NOT_A_MODEL" else a for a in args]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert not (tmp_path / "runs").exists()  # nothing left behind


def test_ctrl_c_says_interrupted_and_exits_130(tmp_path, monkeypatch):
    """Ctrl-C in a command: "Interrupted." and status 130 (not click's "Aborted!" and 1, export's failed verification)."""
    import keras_vit.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(keras_vit.train, "train", interrupted)
    result = CliRunner().invoke(cli, ["train", "--dataset", "digits", "--output", str(tmp_path / "run")])
    assert result.exit_code == 130 and "Interrupted." in result.output and "Aborted" not in result.output, result.output


@pytest.mark.parametrize("args, expected", [
    ([], (None, None)),  # make_config keeps the "auto" defaults
    (["--no-jit"], (None, "none")),
    (["--jit", "fusible", "--mixed-precision", "mixed_bfloat16"], ("mixed_bfloat16", "fusible")),
    (["--jit", "scoped", "--mixed-precision", "mixed_bfloat16"], ("mixed_bfloat16", "scoped")),
])
def test_precision_and_jit_options_reach_the_config(args, expected, monkeypatch):
    from keras_vit import train as ktrain

    seen = {}

    def fake_make_config(dataset, recipe, **options):
        seen.update(options)
        raise ktrain.TrainError("stop here")

    monkeypatch.setattr(ktrain, "make_config", fake_make_config)
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 2 and "stop here" in result.output
    assert (seen["mixed_precision"], seen["jit_compile"]) == expected


def test_quiet_filter_drops_start_up_lines_and_keeps_real_errors():
    from keras_vit.cli.quiet import is_noise

    noise = [b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
             b"I0000 00:00:1795922077.678788   27563 port.cc:153] oneDNN custom operations are on.",
             b"W0000 00:00:1795922077.679118   27563 cudart_stub.cc:31] Could not find cuda drivers",
             b"E0000 00:00:1795922082.967147   27563 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
             b"CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
             b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow "
             b"with the appropriate compiler flags.",
             b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: FLOAT32",
             b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
             b"E0000 00:00:1796350560.116438   30548 util.cc:131] oneDNN supports DT_INT64 only on platforms with "
             b"AVX-512. Falling back to the default Eigen-based implementation if present.",
             b"Improper call to JPEG library in state 201",  # libjpeg, before the line naming the damaged file
             b"Corrupt JPEG data: 12 extraneous bytes before marker 0xd9",
             b"E0000 00:00:1796606207.587763   12205 jpeg_mem.cc:331] Premature end of JPEG data. Stopped at line 30/64",
             b"WARNING:root:Please consider to run pre-processing before quantization. Refer to example: https://x"]
    kept = [b"E0000 00:00:1795922082.967147   27563 kernel.cc:10] Out of memory while allocating 4 GB",
            b"Traceback (most recent call last):", b"Error: unknown recipe 'fast'", b"Epoch 1/8"]
    assert all(is_noise(line) for line in noise)
    assert not any(is_noise(line) for line in kept)


_LATE_LINES = '''
import atexit, os, sys
import click
from keras_vit.cli import main

def line(text):
    return lambda: os.write(2, b"E0000 00:00:1796279105.168648   12575 rendezvous.cc:1] " + text + b"\\n")

# Registered before vitcli's own handler, so it runs after it: stands for what C++ prints after Python's teardown.
atexit.register(line(b"StartAbort UNAVAILABLE: after the last atexit handler"))

@main.cli.command("probe")
def probe():
    line(b"a real error during the command")()
    click.echo("the command's own line")
    atexit.register(line(b"StartAbort UNAVAILABLE: in an atexit handler"))  # TensorFlow's teardown, in Python

sys.argv = ["vitcli", *sys.argv[1:], "probe"]
main.main()
'''


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_teardown_lines_after_the_command_reach_no_terminal(verbose):
    """TensorFlow's late error lines (a multi-worker run's 'StartAbort UNAVAILABLE' as the process
    exits) are hidden once the command has finished, also those written after Python's teardown;
    an error line during the command still shows; --verbose shows all."""
    proc = subprocess.run([sys.executable, "-c", _LATE_LINES, *(["--verbose"] if verbose else [])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "the command's own line\n", proc.stderr
    errors = proc.stderr.splitlines()
    assert errors[0].endswith("a real error during the command")
    assert len(errors) == (3 if verbose else 1), proc.stderr


def test_model_options_train_a_family_model(tmp_path):
    """--model-option reaches the model vitcli trains (DINOv2/SigLIP-style options on digits), its
    model.keras and its config.json; evaluate reloads it."""
    run = str(tmp_path / "run")
    options = ["qk_norm=true", "num_registers=2", "layer_scale_init=0.1", "mlp=swiglu", "classifier=map",
               "class_token=false", "fc_norm=TRUE", "pixel_mean=[0.5, 0.5, 0.5]", "pixel_std=[0.25,0.25,0.25]"]
    proc = subprocess.run(_cmd("train", "--dataset", "digits", "--epochs", "5", "--warmup-epochs", "1", "--num-layers", "2",
                               "--output", run, *[a for o in options for a in ("--model-option", o)]),
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import keras_vit

    model = keras_vit.load_model(os.path.join(run, "model.keras"))
    cfg = model.vit_config
    assert (cfg.qk_norm, cfg.num_registers, cfg.layer_scale_init, cfg.mlp, cfg.classifier, cfg.class_token,
            cfg.fc_norm, cfg.num_layers) == (True, 2, 0.1, "swiglu", "map", False, True, 2)
    assert tuple(cfg.pixel_mean) == (0.5, 0.5, 0.5) and tuple(cfg.pixel_std) == (0.25, 0.25, 0.25)
    saved = json.loads(open(os.path.join(run, "config.json")).read())["train"]["model"]
    assert saved["num_registers"] == 2 and saved["mlp"] == "swiglu" and saved["num_layers"] == 2
    top1 = float(proc.stdout.split("test top-1 ")[1].split()[0])
    assert top1 > 0.2, proc.stdout  # 0.37 here (chance 0.1) after 5 epochs
    ev = subprocess.run(_cmd("evaluate", "--model", run, "--json"), capture_output=True, text=True, env=_env(),
                        timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert abs(json.loads(ev.stdout)["top1"] - top1) < 1e-3  # the reloaded model.keras is the trained model
    # --weights model.keras alone: the file's model, options included, every weight (the head too: same classes)
    tuned = str(tmp_path / "tuned")
    ft = subprocess.run(_cmd("train", "--dataset", "digits", "--epochs", "1", "--weights", os.path.join(run, "model.keras"),
                             "--output", tuned), capture_output=True, text=True, env=_env(), timeout=600)
    assert ft.returncode == 0, ft.stdout[-2000:] + ft.stderr[-3000:]
    line = next(ln for ln in ft.stdout.splitlines() if ln.startswith("initial weights:"))
    assert ", 0 kept as initialised" in line, line
    assert keras_vit.load_model(os.path.join(tuned, "model.keras")).vit_config == cfg
    assert json.loads(open(os.path.join(tuned, "config.json")).read())["train"]["variant"] == "checkpoint"


def test_a_file_where_a_folder_is_needed_is_named():
    import click

    from keras_vit.cli.common import UserError, user_errors

    @user_errors
    def make(path):
        os.makedirs(os.path.join(path, "sub"))

    with pytest.raises(UserError, match=r"README.md: a file is where a folder is needed$"):
        make(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
    assert issubclass(UserError, click.ClickException)


def test_a_full_disk_is_one_line():
    """A write() that fails for lack of space carries no file name (OSError) or is TensorFlow's op error (the
    TFRecord writer): both are one line, where a bug's OSError keeps its traceback."""
    import errno

    from keras_vit.cli.common import UserError, user_errors

    class ResourceExhaustedError(Exception):  # tf.errors' name and message, without importing TensorFlow
        pass

    @user_errors
    def fail(exc):
        raise exc

    for exc in (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                ResourceExhaustedError("/out/train-00000-of-00001.tfrecord; No space left on device")):
        with pytest.raises(UserError, match=r"^No space left on device while writing the output; free some space"):
            fail(exc)
    with pytest.raises(OSError):
        fail(OSError(errno.EIO, "I/O error"))


def test_evaluate_plot_into_a_folder_it_cannot_write_stops_before_evaluating(tmp_path, monkeypatch):
    """--plot writes beside the model: a read-only folder there is one line before the evaluation runs."""
    import keras_vit.train

    folder = tmp_path / "ro"
    folder.mkdir()
    keras_vit.ViT("Ti/4", image_size=16, num_classes=10, hidden_size=16, num_layers=1, num_heads=2,
                  mlp_dim=32).save(folder / "model.keras")
    monkeypatch.setattr(keras_vit.train, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking --plot"))
    real_access = os.access  # root writes anywhere: the read-only folder is simulated for os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.fspath(p) == str(folder) else real_access(p, mode))
    result = CliRunner().invoke(cli, ["evaluate", "--model", str(folder / "model.keras"), "--plot"])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"Error: --plot '{folder / 'confusion_digits.png'}': the folder '{folder}' is not writable"


def test_num_heads_with_a_bare_timm_file_keeps_its_architecture(tmp_path):
    """A timm .safetensors without config.json cannot tell its heads (fused q/k/v): --num-heads (or
    --model-option num_heads=) completes it, and the run keeps the checkpoint's model (not the dataset's)."""
    from safetensors.numpy import load_file, save_file

    import keras_vit
    from keras_vit.train import TrainError, make_config

    model = keras_vit.ViT("Ti/4", image_size=16, num_classes=10, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64)
    save_file(load_file(keras_vit.save_safetensors(model, tmp_path / "m.safetensors")), tmp_path / "bare.safetensors")
    bare = str(tmp_path / "bare.safetensors")  # the arrays alone, as timm writes them
    with pytest.raises(TrainError, match="does not say its number of attention heads"):
        make_config("digits", weights=bare)
    for options in (dict(num_heads=4), dict(model={"num_heads": 4})):
        cfg = make_config("digits", weights=bare, **options)
        vit = cfg.vit_config(num_classes=10, channels=1)
        assert cfg.variant == "checkpoint" and (vit.hidden_size, vit.num_heads, vit.num_layers) == (32, 4, 1), options


def test_model_option_values_read_as_json_else_text():
    """`none` is the text of an option whose values include it (pos_embedding), else no value, as null."""
    from keras_vit.cli.common import parse_model_options

    assert parse_model_options(["pos_embedding=none", "layer_scale_init=None", "classifier=gap", "qk_norm=true",
                                "pixel_mean=[0.5,0.5,0.5]", "representation_size=null"]) == {
        "pos_embedding": "none", "layer_scale_init": None, "classifier": "gap", "qk_norm": True,
        "pixel_mean": (0.5, 0.5, 0.5), "representation_size": None}


def test_a_non_square_model_trains_at_its_own_size(tmp_path):
    """--weights of a non-square model alone keeps its HEIGHTxWIDTH (was the dataset's square default);
    --image-size takes HEIGHTxWIDTH; config.json keeps [height, width] and reads back."""
    import keras_vit
    from keras_vit.cli.common import ImageSize
    from keras_vit.train import TrainConfig, TrainError, make_config

    model = keras_vit.ViT(variant=None, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, patch_size=4,
                          image_size=(16, 24), num_classes=10)
    for path in (tmp_path / "ns.keras", keras_vit.save_safetensors(model, tmp_path / "ns.safetensors")):
        if str(path).endswith(".keras"):
            model.save(path)
        cfg = make_config("digits", weights=str(path))
        assert cfg.image_size == [16, 24] and cfg.vit_config(num_classes=10, channels=1).image_size == (16, 24), path
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).validate().image_size == [16, 24]
    assert make_config("digits", image_size=(16, 16)).image_size == 16
    for bad in (0, [16], [16, 0], [16, 24, 3], True, "16", 10**20, [16, 16385]):
        with pytest.raises(TrainError, match="image_size must be a positive integer up to 16384 or"):
            make_config("digits", image_size=bad)
    size = ImageSize()
    assert (size.convert("224", None, None), size.convert("16x24", None, None), size.convert("32X32", None, None)) \
        == (224, [16, 24], 32)
    for bad in ("0", "16x", "x16", "16x24x3", "-1", "a", "²", "16x²"):  # "²".isdigit(): int() failed, a traceback
        with pytest.raises(click.BadParameter, match="is not a side in pixels"):
            size.convert(bad, None, None)
    for bad in ("99999999999999999996", "16x16385"):  # a TensorFlow OverflowError traceback in the pipeline
        with pytest.raises(click.BadParameter, match="is larger than 16384 pixels a side"):
            size.convert(bad, None, None)


def test_options_given_twice_or_empty_are_one_line(tmp_path):
    """--hidden-size 32 with --model-option hidden_size=64 (the flag won silently); an option given as ""
    (an unset $VAR: --weights "" trained from scratch, --output "" moved runs/latest); --no-verify with
    what only verification reads."""
    from keras_vit.train import TrainError, make_config

    with pytest.raises(TrainError, match=r"hidden_size is given twice, as 32 and as the model option 64; give it once"):
        make_config("digits", hidden_size=32, model={"hidden_size": 64})
    assert make_config("digits", hidden_size=32, model={"hidden_size": 32}).model["hidden_size"] == 32
    runner = CliRunner()
    for args, line in ((["train", "--weights", ""], "Error: --weights is empty; give a value or leave the option out"),
                       (["train", "--output", ""], "Error: --output is empty; give a value or leave the option out"),
                       (["export", "--no-verify", "--threshold", "top1_agreement=0.9"],
                        "Error: --threshold sets the verification that --no-verify skips; drop one of them"),
                       (["export", "--no-verify", "--num-images", "8"],
                        "Error: --num-images sets the verification that --no-verify skips; drop one of them"),
                       (["export", "--no-verify", "--device", "cpu"],
                        "Error: --device sets the verification that --no-verify skips; drop one of them")):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and result.output.strip().splitlines()[-1] == line, (args, result.output)


def test_weights_whose_backbone_does_not_fit_are_refused(tmp_path):
    """--weights of another size loaded 2 of 24 variables and trained the rest from scratch, exit 0: the whole
    backbone must load (as Keras' load_weights and timm's load_checkpoint are strict); the head may differ."""
    import keras_vit
    from keras_vit.train import TrainError, make_config, train

    small = keras_vit.ViT(variant="Ti/4", image_size=16, num_classes=10, channels=1, hidden_size=32, num_layers=1,
                          num_heads=2, mlp_dim=64)
    small.save(tmp_path / "small.keras")
    cfg = make_config("digits", epochs=1, variant="Ti/4", hidden_size=48, num_layers=1, num_heads=2, mlp_dim=64,
                      weights=str(tmp_path / "small.keras"))
    with pytest.raises(TrainError, match=r"variables do not fit this model .* they would start untrained"):
        train(cfg, output=str(tmp_path / "run"), verbose=0)
    assert not (tmp_path / "run").exists()


def test_sigterm_during_training_cleans_up_as_ctrl_c(tmp_path):
    """SIGTERM (a timeout, kill, a scheduler) while the first epoch trains: "Terminated.", status 143 and no run
    folder, as Ctrl-C leaves (it left the folder with config.json only, and runs/latest moved to it)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd("train", "--dataset", "digits", "--variant", "Ti/4", "--image-size", "16",
                                 "--num-layers", "1", "--epochs", "50", "--output", str(run)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while not (run / "config.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and out.strip().splitlines()[-1] == "Terminated.", out[-3000:]
    assert not run.exists() and not (tmp_path / "runs").exists(), out[-3000:]
