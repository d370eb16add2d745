"""`vitcli export`: the default run folder, both formats, reports, and one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from export_helpers import DIGIT_NAMES, small_model

from keras_vit.cli.main import cli  # noqa: E402


def _run_folder(root, model_path):
    """root/runs/latest holding a copy of `model_path` as model.keras and the digit class names."""
    latest = root / "runs" / "latest"
    latest.mkdir(parents=True)
    shutil.copy(model_path, latest / "model.keras")
    (latest / "class_names.json").write_text(json.dumps(DIGIT_NAMES))
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A working folder whose latest run is a small 10-class model with noise weights (fp32 export
    checks need no training)."""
    root = tmp_path_factory.mktemp("cli")
    small_model().save(root / "small.keras")
    return _run_folder(root, root / "small.keras")


def _invoke(args, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, ["export", *args], catch_exceptions=False)
    finally:
        os.chdir(old)


def test_default_exports_latest_run_to_onnx_and_verifies(run_dir):
    result = _invoke(["--format", "onnx", "--num-images", "32"], run_dir)
    assert result.exit_code == 0, result.output
    onnx_path = run_dir / "runs" / "latest" / "model.onnx"
    report = json.loads((run_dir / "runs" / "latest" / "model.onnx.report.json").read_text())
    assert onnx_path.exists() and report["passed"] and report["num_images"] == 32
    assert json.loads(report["metadata"]["class_names"]) == DIGIT_NAMES
    assert "top-1 agreement" in result.output and "passed" in result.output


def test_tflite_int8_with_calibration_dataset(trained_digits, tmp_path):
    """int8 needs a model with margins between classes: the trained digits model."""
    run_dir = _run_folder(tmp_path, trained_digits[1])
    out = tmp_path / "digits.int8.tflite"
    result = _invoke(["--model", "runs/latest/model.keras", "--format", "tflite", "--quantize", "int8",
                      "--calibration-dataset", "digits", "--verify-dataset", "digits", "--num-images", "360",
                      "--output", str(out)], run_dir)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "digits.int8.tflite.report.json").read_text())
    assert report["precision"] == "int8" and report["top1_agreement"] >= 0.97
    assert (tmp_path / "digits.int8.labels.txt").read_text().split() == DIGIT_NAMES
    # The int8 file is timed against its float32 twin; when slower, the export says so and why.
    speed = json.loads(report["metadata"]["int8_vs_fp32"])
    assert speed["int8_ms"] > 0 and speed["fp32_ms"] > 0 and speed["faster"] == (speed["int8_ms"] < speed["fp32_ms"])
    if not speed["faster"]:
        assert "is not faster than float32" in result.output and "XNNPACK does not take" in result.output


def _tree(path):
    """{relative path: bytes} of a file, or of every file of a folder (a SavedModel)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,failed,side", [
    ("m.onnx", "m.failed.onnx", None),
    pytest.param("m.tflite", "m.failed.tflite", "labels.txt", marks=pytest.mark.slow),
    pytest.param("m.saved_model", "m.saved_model.failed", None, marks=pytest.mark.slow),
])
def test_failed_check_keeps_the_good_file_and_sets_the_failed_one_aside(run_dir, tmp_path, monkeypatch, name,
                                                                       failed, side):
    """Verification made to fail (max |diff| <= 0) over a good export: the good file, its report and
    labels stay byte for byte; the failed file is kept as NAME.failed.EXT with its own FAILED report
    (path and sha256 of that file); exit 1 with one line; no temporary file left. A second failure
    (ONNX) replaces the first failed file."""
    from keras_vit.export.runner import Runner
    from keras_vit.export.verify import _digest

    out = tmp_path / name
    fmt = {".onnx": "onnx", ".tflite": "tflite", ".saved_model": "saved_model"}[out.suffix]
    args = ["--format", fmt, "--output", str(out), "--num-images", "4"]
    assert _invoke(args, run_dir).exit_code == 0
    good = {p.name: _tree(p) for p in tmp_path.iterdir()}
    assert {f"{name}.report.json", f"{name}.report.png"} <= set(good)
    if fmt == "saved_model":  # TensorFlow runs the folder exactly as Keras: make its logits differ a little
        call = Runner.__call__
        monkeypatch.setattr(Runner, "__call__", lambda self, images: call(self, images) + 1e-3)
    for _attempt in range(2 if fmt == "onnx" else 1):
        result = _invoke([*args, "--threshold", "max_abs_diff=0"], run_dir)
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1 and "verification failed: max_abs_diff" in errors[0] and "off by" in errors[0]
        assert f"kept as {tmp_path / failed}" in errors[0] and f"{out} is unchanged" in errors[0]
        assert "Traceback" not in result.output
        assert {p.name: _tree(p) for p in tmp_path.iterdir() if p.name in good} == good
        extra = {f"{failed}", f"{failed}.report.json", f"{failed}.report.png"}
        if side:
            extra.add(f"{failed.rsplit('.', 1)[0]}.{side}")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(good) | extra)
    report = json.loads((tmp_path / f"{failed}.report.json").read_text())
    assert report["status"] == "FAILED verification" and not report["passed"]
    assert report["file"] == str(tmp_path / failed) and report["sha256"] == _digest(str(tmp_path / failed))[0]
    assert json.loads((tmp_path / f"{name}.report.json").read_text())["passed"]


def test_failed_check_with_no_earlier_file_writes_nothing_at_output(run_dir, tmp_path):
    out = tmp_path / "m.onnx"
    result = _invoke(["--output", str(out), "--num-images", "4", "--threshold", "max_abs_diff=0"], run_dir)
    assert result.exit_code == 1 and f"nothing was written to {out}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.failed.onnx", "m.failed.onnx.report.json",
                                                         "m.failed.onnx.report.png"]


@pytest.mark.parametrize("args,message", [
    (["--format", "coreml"], "Invalid value for '--format'"),
    (["--model", "nope/model.keras"], "model file 'nope/model.keras' does not exist"),
    (["--model", "not_vit.keras"], "not a keras-vit model"),
    (["--format", "tflite", "--quantize", "int8", "--no-verify"], "int8 export needs calibration data"),
    (["--output", "a_file/m.onnx", "--no-verify"], "cannot create output folder"),
    (["--format", "onnx", "--quantize", "int8", "--no-verify"], "int8 export needs calibration data"),
    (["--format", "tflite", "--optimize"], "apply to --format onnx only"),
    (["--opset", "9", "--no-verify", "--output", "x.onnx"], "--opset must be from 17 to"),
    (["--opset", "99", "--output", "new/x.onnx"], "--opset must be from 17 to"),  # refused before new/ is made
    (["--threshold", "fast"], "must look like NAME=NUMBER"),
    (["--model", "cut.keras"], "could not load 'cut.keras': not a .keras archive"),
    (["--model", "runs"], "'runs' is a folder without model.keras (not a finished run)"),
])
def test_bad_input_gives_one_line_and_nonzero_exit(run_dir, tmp_path, args, message):
    import keras

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save(tmp_path / "not_vit.keras")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "cut.keras").write_bytes((run_dir / "runs" / "latest" / "model.keras").read_bytes()[:5000])
    shutil.copytree(run_dir / "runs", tmp_path / "runs")
    result = _invoke(args, tmp_path)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "new").exists()


def test_missing_default_model_says_how_to_get_one(tmp_path):
    result = _invoke([], tmp_path)
    assert result.exit_code == 2
    assert "runs/latest/model.keras" in result.output and "vitcli train" in result.output


@pytest.mark.parametrize("args,message", [
    (["--threshold", "top1=0.9"], "unknown threshold 'top1'; allowed: max_abs_diff"),
    (["--threshold", "top1_agreement=nan"], "threshold top1_agreement=nan must be above 0, at most 1"),
    (["--threshold", "top1_agreement=0"], "threshold top1_agreement=0.0 must be above 0, at most 1 (a check that "
                                          "cannot fail checks nothing)"),
    (["--threshold", "max_abs_diff=-1"], "must be a finite number >= 0"),
    (["--threshold", "max_abs_diff=inf"], "threshold max_abs_diff=inf must be a finite number >= 0"),
    (["--verify-dataset", "nonsense"], "unknown dataset 'nonsense'"),
    (["--verify-dataset", "folder:no_such_folder"], "image folder 'no_such_folder' does not exist"),
    (["--verify-dataset", "folder:m.onnx"], "image folder 'm.onnx' is a file, not a folder"),
    (["--verify-dataset", "records:missing/*.tfrecord"], "records:missing/*.tfrecord matches no files"),
    (["--format", "tflite", "--device", "cuda"], "device cuda runs ONNX files only"),
    (["--format", "tflite", "--calibration", "10"], "--calibration applies to --quantize int8 only"),
    (["--quantize", "fp16", "--calibration-dataset", "digits"], "--calibration-dataset applies to --quantize int8"),
])
def test_bad_check_options_fail_before_the_file_is_replaced(run_dir, tmp_path, args, message):
    """Options that verification reads are checked first: the file already at --output stays as it was."""
    out = tmp_path / ("m.tflite" if "tflite" in args else "m.onnx")
    out.write_bytes(b"the previous export")
    result = _invoke(["--model", str(run_dir / "runs" / "latest" / "model.keras"), "--output", str(out), *args],
                     tmp_path)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_the_runs_relative_folder_is_found_from_another_folder(run_dir, tmp_path):
    """A run trained on folder:imgs (a path relative to where vitcli train ran) is exported from anywhere:
    config.json's "cwd" resolves it (was: "image folder 'imgs' does not exist" from any other folder).
    A run without it says the folder is the run's and which option replaces it."""
    from PIL import Image

    from keras_vit.train.runs import read_run

    trained_in = tmp_path / "project"
    for cls in ("a", "b"):
        (trained_in / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(trained_in / "imgs" / cls / f"{i}.png")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run_dir / "runs" / "latest" / "model.keras", run / "model.keras")
    config = {"train": {"dataset": "folder:imgs", "seed": 0}, "cwd": str(trained_in)}
    (run / "config.json").write_text(json.dumps(config))
    assert read_run(str(run / "model.keras")).dataset == f"folder:{trained_in / 'imgs'}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = _invoke(["--model", str(run), "--output", str(elsewhere / "m.onnx"), "--num-images", "4"],
                     elsewhere)  # the run folder, as predict and evaluate take it
    assert result.exit_code == 0 and "status" in result.output and "passed" in result.output, result.output
    del config["cwd"]  # a run from before config.json said where it ran
    (run / "config.json").write_text(json.dumps(config))
    result = _invoke(["--model", str(run / "model.keras"), "--output", str(elsewhere / "n.onnx")], elsewhere)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error")]
    assert lines == [f"Error: image folder 'imgs' does not exist (the dataset of the run that trained "
                     f"{run / 'model.keras'}, from its config.json); pass --verify-dataset to use other images"]


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's sysfs, a folder no one can write to")
def test_output_folder_the_file_system_refuses_is_one_line(run_dir):
    """os.access says yes to root even for a folder the file system refuses: probed by writing."""
    result = _invoke(["--output", "/sys/kernel/m.onnx", "--no-verify"], run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: output folder '/sys/kernel' is not writable" in result.output


def test_a_folder_name_that_is_not_utf8_exports_and_verifies(run_dir, tmp_path):
    """ONNX and TFLite files in a folder whose name is not UTF-8 are verified (the runtimes get the
    file's bytes); a SavedModel there, which TensorFlow cannot write, is one line."""
    import subprocess
    import sys

    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    vitcli = os.path.join(os.path.dirname(sys.executable), "vitcli")  # a terminal's bytes, not CliRunner's UTF-8
    model = str(run_dir / "runs" / "latest" / "model.keras")
    for fmt, rc, line in (("onnx", 0, b"status             passed"), ("tflite", 0, b"status             passed"),
                          ("saved_model", 2, b"is not a UTF-8 path, and TensorFlow writes to UTF-8 paths only")):
        out = os.path.join(folder, f"m.{fmt}".encode())
        done = subprocess.run([vitcli, "export", "--model", model, "--format", fmt, "--num-images", "8", "--output", out],
                              capture_output=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
        assert done.returncode == rc and line in done.stdout + done.stderr, done.stdout + done.stderr


def test_sigterm_during_export_keeps_the_good_file_and_leaves_no_temporary_one(run_dir, tmp_path):
    """SIGTERM (timeout, kill, Kubernetes) ends an export as Ctrl-C does: exit 143, the earlier file
    untouched, the half-written one removed."""
    import signal
    import subprocess
    import sys
    import time

    vitcli = os.path.join(os.path.dirname(sys.executable), "vitcli")
    model = str(run_dir / "runs" / "latest" / "model.keras")
    cmd = [vitcli, "export", "--model", model, "--format", "onnx", "--num-images", "8", "--output", str(tmp_path / "m.onnx")]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    assert subprocess.run(cmd, capture_output=True, env=env, timeout=300).returncode == 0
    good = (tmp_path / "m.onnx").read_bytes()
    for delay in (None, 1.0, 3.0):  # as the temporary file appears (conversion), then during verification
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 240
        while time.time() < deadline and not [f for f in os.listdir(tmp_path) if ".tmp" in f]:
            time.sleep(0.02)
        time.sleep(delay or 0)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=120)[0].decode()
        if proc.returncode == 0 and "Report: " in out:  # committed before the signal: the file it wrote, verified
            good = (tmp_path / "m.onnx").read_bytes()
            continue
        assert proc.returncode == 143 and out.strip().splitlines()[-1] == "Terminated.", (delay, out)
        assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.report.json", "m.onnx.report.png"], delay
        assert (tmp_path / "m.onnx").read_bytes() == good


def test_sigterm_inside_a_gc_callback_still_ends_the_export():
    """A SIGTERM whose handler runs inside a gc callback (JAX installs one) or a __del__ cannot raise
    there: Python printed "Exception ignored ... Terminated" and the export went on to write its file.
    It is raised again at the next Python call, and nothing is printed."""
    import gc
    import signal

    from keras_vit.cli import common
    from keras_vit.cli.common import Terminated, sigterm_cleans_up, terminated

    fired, went_on, unraisable = [], [], []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10))  # Python runs here: the handler raises inside the callback

    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    gc.callbacks.append(callback)
    try:
        with pytest.raises(Terminated):
            with sigterm_cleans_up():
                gc.collect()
                went_on.append(len([1, 2]))
    finally:
        gc.callbacks.remove(callback)
        sys.unraisablehook = previous_hook
        received, common._RECEIVED[:] = list(common._RECEIVED), []  # this process's later commands were not terminated
    assert fired and received == [signal.SIGTERM] and not terminated() and not went_on and not unraisable
    assert sys.unraisablehook is previous_hook and sys.gettrace() is None


def test_ctrl_c_inside_a_del_still_ends_the_export():
    """Ctrl-C landing in a __del__ (TensorFlow's AtomicFunction.__del__ during an export) was printed as
    "Exception ignored ... KeyboardInterrupt" and the export wrote its file and exited 0: raised again."""
    import gc

    from keras_vit.cli.common import sigterm_cleans_up

    went_on, unraisable = [], []

    class Interrupted:
        def __del__(self):
            raise KeyboardInterrupt

    previous_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_cleans_up():
                Interrupted()
                gc.collect()
                went_on.append(len([1, 2]))
    finally:
        sys.unraisablehook = previous_hook
    assert not went_on and not unraisable
    assert sys.unraisablehook is previous_hook and sys.gettrace() is None


def test_a_signal_after_the_export_does_not_undo_it(run_dir, tmp_path):
    """SIGTERM or Ctrl-C once the report is printed (Python's and TensorFlow's teardown take seconds)
    ends with the command's status, 0 (was: killed, -15, or a segfault); the report describes the file."""
    import hashlib
    import signal
    import subprocess
    import sys

    vitcli = os.path.join(os.path.dirname(sys.executable), "vitcli")
    model = str(run_dir / "runs" / "latest" / "model.keras")
    out = tmp_path / "m.onnx"
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen([vitcli, "export", "--model", model, "--format", "onnx", "--num-images", "8", "--output",
                                 str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        for line in proc.stdout:
            if line.startswith("Report: "):
                proc.send_signal(sig)
                break
        proc.stdout.read()
        assert proc.wait(timeout=120) == 0, sig
        report = json.loads((tmp_path / "m.onnx.report.json").read_text())
        assert report["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest() and report["file"] == str(out)
        assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.report.json", "m.onnx.report.png"]


def test_the_file_and_its_report_are_renamed_together(tmp_path, monkeypatch):
    """The report and plot are written beside the staged file, naming the final one, and renamed with it
    while a signal waits (signals_held): a report never describes the file that was there before."""
    import signal

    from keras_vit.export import verified
    from keras_vit.files import signals_held

    with signals_held():
        os.kill(os.getpid(), signal.SIGINT)  # would be KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    renames = []
    real = os.replace
    monkeypatch.setattr(verified.os, "replace", lambda a, b: renames.append((a, b)) or real(a, b))
    model = small_model()
    out = tmp_path / "m.onnx"
    report = verified.export_verified(model, str(out), num_images=4)
    assert report["passed"] and report["file"] == str(out) and report["report_path"] == str(out) + ".report.json"
    assert json.loads((tmp_path / "m.onnx.report.json").read_text())["file"] == str(out)
    finals = [os.path.basename(b) for _, b in renames]
    assert finals[-3:] == ["m.onnx", "m.onnx.report.json", "m.onnx.report.png"], finals  # together, at the end
    assert all(os.path.basename(a).startswith(".m.onnx.tmp-") for a, _ in renames[-3:]), renames
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.report.json", "m.onnx.report.png"]


def test_export_runs_on_tensorflow_whatever_keras_backend_says(run_dir, tmp_path):
    """A shell set up for JAX training (KERAS_BACKEND=jax) exports without changing it: the command takes
    the TensorFlow backend, which the converters need, and says so on stderr."""
    import subprocess
    import sys

    pytest.importorskip("jax")
    vitcli = os.path.join(os.path.dirname(sys.executable), "vitcli")
    done = subprocess.run([vitcli, "export", "--model", str(run_dir / "runs" / "latest" / "model.keras"), "--format",
                           "onnx", "--num-images", "8", "--output", str(tmp_path / "m.onnx")], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0 and "passed" in done.stdout, done.stdout + done.stderr
    assert "export runs on the TensorFlow backend (KERAS_BACKEND=jax set aside for this command)" in done.stderr


def test_names_the_model_carries_reach_the_file(tmp_path):
    """A .keras file outside a run folder keeps its own class names (saved with the model) in the export."""
    import onnxruntime as ort

    model = small_model()
    model.class_names = [f"class {i}" for i in range(10)]
    model.save(tmp_path / "named.keras")
    result = _invoke(["--model", "named.keras", "--output", "named.onnx", "--no-verify"], tmp_path)
    assert result.exit_code == 0, result.output
    meta = ort.InferenceSession(str(tmp_path / "named.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == model.class_names


def test_verification_images_the_model_cannot_take_fail_before_writing(tmp_path):
    """A 4-channel model and the 3-channel default images: one line before the export, old file kept."""
    small_model(channels=4).save(tmp_path / "rgba.keras")
    (tmp_path / "rgba.onnx").write_bytes(b"the previous export")
    result = _invoke(["--model", "rgba.keras", "--output", "rgba.onnx"], tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "Error: images have 3 channels, the model takes 4: use a source of 4-channel images" in result.output
    assert (tmp_path / "rgba.onnx").read_bytes() == b"the previous export"


def test_disk_full_while_writing_is_one_line(run_dir, tmp_path, monkeypatch):
    """An OSError about a file (no space left, read-only folder) is one line; the old file stays."""
    import errno

    import onnx

    def full(proto, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(onnx, "save", full)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    result = _invoke(["--output", str(out), "--no-verify"], run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "No space left on device" in result.output.strip().splitlines()[-1]
    assert out.read_bytes() == b"the previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_no_verify_removes_the_report_of_the_replaced_file(run_dir, tmp_path):
    """A report beside the output checked the file an unverified export replaces: it goes too."""
    out = tmp_path / "m.onnx"
    assert _invoke(["--output", str(out), "--num-images", "4"], run_dir).exit_code == 0
    assert json.loads((tmp_path / "m.onnx.report.json").read_text())["passed"]
    result = _invoke(["--output", str(out), "--no-verify"], run_dir)
    assert result.exit_code == 0 and "not verified: --no-verify" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_without_onnxruntime_one_line_says_which_extra(run_dir, tmp_path, monkeypatch):
    """A plain `pip install keras-vit`: the export verifies with onnx's reference evaluator and says
    so in one line naming the extras; --optimize (onnxruntime's own ops) fails in one line, before
    anything is written."""
    import sys

    from keras_vit.export.runner import ONNXRUNTIME_MISSING

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    result = _invoke(["--output", str(tmp_path / "m.onnx"), "--num-images", "2"], run_dir)
    assert result.exit_code == 0, result.output
    assert result.output.count(ONNXRUNTIME_MISSING) == 1 and "keras-vit[cpu]" in ONNXRUNTIME_MISSING
    assert "onnx.reference" in result.output
    result = _invoke(["--output", str(tmp_path / "o.onnx"), "--optimize"], run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == ["Error: --optimize needs onnxruntime: pip install "
                                                  "'keras-vit[cpu]' (or 'keras-vit[gpu]')"]  # one line, nothing above
    assert not (tmp_path / "o.onnx").exists()
    assert "exported n/a (onnx's reference evaluator checks values, not speed)" in _invoke(
        ["--output", str(tmp_path / "m.onnx"), "--num-images", "2"], run_dir).output
    result = _invoke(["--output", str(tmp_path / "q.onnx"), "--quantize", "int8", "--calibration-dataset", "digits"],
                     run_dir)
    assert result.output.strip().splitlines() == ["Error: static int8 quantization (quantize='int8') needs onnxruntime: "
                                                  "pip install 'keras-vit[cpu]' (or 'keras-vit[gpu]')"]


def test_export_of_runs_latest_goes_beside_the_model_it_read(run_dir, tmp_path, monkeypatch):
    """A training started during `vitcli export` moves runs/latest: the old run's model was written into
    the new run's folder (as runs/latest/model.onnx). The link is read once, before the model loads."""
    import keras_vit.export._common as common

    runs = tmp_path / "runs"
    (runs / "old").mkdir(parents=True)
    (runs / "new").mkdir()
    for name in ("model.keras", "class_names.json"):
        shutil.copy(run_dir / "runs" / "latest" / name, runs / "old" / name)
    os.symlink("old", runs / "latest")
    real = common.resolve_model

    def moved(path):  # the new run appears while the model loads
        os.remove(runs / "latest")
        os.symlink("new", runs / "latest")
        return real(path)

    monkeypatch.setattr(common, "resolve_model", moved)
    result = _invoke(["--format", "onnx", "--no-verify"], tmp_path)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(runs / "new")) == [] and (runs / "old" / "model.onnx").is_file()
    assert os.path.join("runs", "old", "model.onnx") in result.output
