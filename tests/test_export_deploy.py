"""Deployment: files for any image size (in-graph position-embedding interpolation), NCHW input,
TF-Serving SavedModels reloaded in a fresh process, metadata the runtimes read, the PNG report,
and the device choice. Each file runs in its runtime and is compared with Keras."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from export_helpers import DIGIT_NAMES, TI, small_model

import keras_vit
from keras_vit.cli.main import cli
from keras_vit.export import ExportError, to_onnx, to_saved_model, to_tflite, verify
from keras_vit.vit import dynamic_model, resize_model


def _noisy(model, seed=0):
    """Position embeddings (and all else) far from zero, so that a wrong resampling shows."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model


@pytest.mark.parametrize("pos_embedding,method,image_size", [
    ("learned", "linear", 32), ("learned", "bicubic", 32), ("learned_2d", "bicubic", 32), ("sincos2d", "linear", 32),
    ("learned", "bicubic_antialias", 32),  # timm's resampling, in the graph as in NumPy
    # a 4x6 grid plus the class token is 25 = 5x5 embeddings: not to be taken for a square grid without one
    ("learned", "linear", (32, 48))])
def test_dynamic_model_matches_resize_model_at_other_sizes(pos_embedding, method, image_size):
    small = dict(patch_size=8, hidden_size=32, num_heads=2, num_layers=1, mlp_dim=64, num_classes=5)
    model = _noisy(keras_vit.ViT("Ti/16", image_size=image_size, pos_embedding=pos_embedding, **small))
    dyn = dynamic_model(model, method)
    assert dyn.input_shape == (None, None, None, 3) and dyn.vit_config.pos_interpolation == method
    rng = np.random.default_rng(1)
    for size in [(32, 32), (48, 64), (24, 40), (48, 32)]:  # (48, 32): the 4x6 grid turned to 6x4, same count
        x = rng.uniform(0, 255, (2, *size, 3)).astype("float32")
        ref = resize_model(model, size, method=method).predict_on_batch(x)
        np.testing.assert_allclose(dyn.predict_on_batch(x), ref, atol=1e-5, rtol=0)


def test_vit_image_size_none_builds_a_model_for_any_size(tmp_path):
    model = _noisy(keras_vit.ViT("Ti/16", image_size=None, num_layers=1, num_classes=3, pos_interpolation="bicubic"))
    assert model.vit_config.dynamic_size and model.vit_config.image_size == (224, 224)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    logits = np.asarray(model.predict_on_batch(x))
    assert logits.shape == (2, 3)
    model.save(tmp_path / "dyn.keras")  # the dynamic size and its interpolation survive save/load
    reloaded = keras_vit.load_model(tmp_path / "dyn.keras")
    assert reloaded.vit_config.dynamic_size and reloaded.vit_config.pos_interpolation == "bicubic"
    np.testing.assert_allclose(np.asarray(reloaded.predict_on_batch(x)), logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="relative"):
        keras_vit.ViT("Ti/16", dynamic_size=True, pos_embedding="relative", num_layers=1)
    with pytest.raises(ValueError, match="pos_interpolation must be one of"):
        keras_vit.ViT("Ti/16", dynamic_size=True, pos_interpolation="cubic", num_layers=1)


def test_dynamic_nchw_onnx_matches_resized_keras_at_two_sizes(trained_digits, tmp_path):
    import onnx
    import onnxruntime as ort

    model, _ = trained_digits
    path = to_onnx(model, tmp_path / "dyn.onnx", dynamic_size=True, layout="nchw", class_names=DIGIT_NAMES)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["class_names"]) == DIGIT_NAMES and meta["layout"] == "nchw"
    assert json.loads(meta["mean"]) == [127.5] * 3 and json.loads(meta["std"]) == [127.5] * 3
    assert meta["dynamic_size"] == "true" and meta["image_size"] == "32x32"
    from keras_vit.export.images import load_images

    for size in [(32, 32), (24, 40)]:
        x = load_images("digits", size, 3, 48)
        ref = resize_model(model, size).predict_on_batch(x)
        out = session.run(None, {"images": x.transpose(0, 3, 1, 2)})[0]
        assert np.abs(out - ref).max() <= 1e-4
        assert (out.argmax(1) == ref.argmax(1)).all()
    report = verify(model, path, images="digits", num_images=32)
    assert report["passed"] and [s["image_size"] for s in report["image_sizes"]] == [[32, 48]]
    assert report["image_sizes"][0]["max_abs_diff"] <= 1e-4 and report["device"] == "cpu"


def test_report_png_shows_the_comparison(tmp_path):
    from PIL import Image

    model = small_model("learned")
    path = to_onnx(model, tmp_path / "m.onnx")
    report = verify(model, path, num_images=16)
    assert report["plot_path"] == str(tmp_path / "m.onnx.report.png")
    with Image.open(report["plot_path"]) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 400
    assert pixels.std() > 20  # not blank: axes, points and bars drawn on white
    green = (pixels[..., 1] > 120) & (pixels[..., 0] < 100) & (pixels[..., 2] < 100)
    assert green.sum() > 500  # the per-class agreement bars of a passing file are green


def test_cuda_device_without_cuda_provider_is_one_clear_error(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the GPU check runs in bench/gpu.sh")
    model = small_model("learned")
    path = to_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="device cuda needs onnxruntime with the CUDA provider"):
        verify(model, path, num_images=4, device="cuda")
    with pytest.raises(ExportError, match="device must be one of auto, cuda, cpu"):
        verify(model, path, num_images=4, device="gpu")
    with pytest.raises(ExportError, match="layout must be one of nhwc, nchw"):
        to_onnx(model, tmp_path / "x.onnx", layout="nhcw")


_RELOAD = """
import json, sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
serve = loaded.signatures["serving_default"]
x = np.load(sys.argv[2])
out = {"signatures": sorted(loaded.signatures), "dtype": serve.structured_input_signature[1]["images"].dtype.name,
       "metadata": json.loads(loaded.signatures["metadata"]()["metadata"].numpy().decode())}
np.save(sys.argv[3], serve(images=tf.constant(x))["logits"].numpy())
print(json.dumps(out))
"""


def test_cli_saved_model_uint8_reloads_in_a_fresh_process(trained_digits, tmp_path):
    model, keras_path = trained_digits
    out = tmp_path / "served"
    result = CliRunner().invoke(cli, ["export", "--model", keras_path, "--format", "saved_model", "--output",
                                      str(out), "--input-dtype", "uint8", "--dynamic-size", "--num-images", "32",
                                      "--verify-dataset", "digits"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "at 32x48" in result.output and os.path.isfile(str(out) + ".report.png")
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 48, 3)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["dtype"] == "uint8"
    assert {"serving_default", "serving_float32", "serving_uint8", "metadata"} <= set(info["signatures"])
    assert info["metadata"]["image_size"] == "32x32" and info["metadata"]["dynamic_size"] == "true"
    assert (out / "assets" / "keras_vit.json").is_file()
    ref = resize_model(model, (32, 48)).predict_on_batch(x.astype("float32"))
    got = np.load(tmp_path / "y.npy")
    assert np.abs(got - ref).max() <= 1e-4 and (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("args,message", [
    (["--format", "tflite", "--dynamic-size"], "--dynamic-size applies to --format onnx and saved_model"),
    (["--format", "saved_model", "--layout", "nchw"], "--layout apply to --format onnx only"),
    (["--format", "saved_model", "--quantize", "fp16"], "a SavedModel keeps float32 weights"),
    (["--interpolation", "bicubic"], "--interpolation applies with --dynamic-size only"),
])
def test_cli_bad_combinations_give_one_line(trained_digits, tmp_path, args, message):
    _, keras_path = trained_digits
    result = CliRunner().invoke(cli, ["export", "--model", keras_path, *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def _stub_wheel(folder, name: str, version: str = "99.0") -> None:
    """An empty wheel named `name` (no dependencies), enough for pip's resolver."""
    import zipfile

    norm = name.lower().replace("-", "_").replace(".", "_")
    info = f"{norm}-{version}.dist-info"
    with zipfile.ZipFile(os.path.join(folder, f"{norm}-{version}-py3-none-any.whl"), "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


def test_gpu_extra_resolves_to_one_onnxruntime_wheel(tmp_path):
    """pip's own resolver (offline: stub wheels for every requirement of pyproject.toml) installs
    exactly one onnxruntime distribution for each of the [gpu] and [cpu] extras, none without one."""
    import re
    import shutil

    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    project, setuptools_cfg = pyproject["project"], pyproject["tool"]["setuptools"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs}:
        _stub_wheel(stubs, name)
    src = tmp_path / "src"
    package_dirs = setuptools_cfg.get("package-dir", {})
    for package in setuptools_cfg["packages"]:  # the folders setuptools checks exist
        (src / package_dirs.get(package, package.replace(".", "/"))).mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(root, "pyproject.toml"), src)
    shutil.copy(os.path.join(root, "README.md"), src)
    shutil.copy(os.path.join(root, "keras_vit", "__init__.py"), src / "keras_vit")

    def onnxruntimes(extra: str):
        report = tmp_path / f"report{extra}.json"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                               "--no-index", "--find-links", str(stubs), "--no-build-isolation", "--quiet",
                               "--report", str(report), f"{src}{extra}"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        names = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
        assert "keras-vit" in names and "tensorflow" in names
        return sorted(n for n in names if n.startswith("onnxruntime"))

    assert onnxruntimes("[gpu]") == ["onnxruntime-gpu"]
    assert onnxruntimes("[cpu]") == ["onnxruntime"]
    assert onnxruntimes("") == []


def test_verify_without_onnxruntime_uses_onnx_reference(tmp_path, monkeypatch):
    """A plain `pip install keras-vit` (no onnxruntime) still verifies ONNX files: onnx's reference
    evaluator runs them; the options that need onnxruntime say which extra to install."""
    model = small_model("learned")
    path = to_onnx(model, tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    report = verify(model, path, num_images=4, batch_size=4)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4
    assert report["providers"] == ["onnx.reference"] and "keras-vit[cpu]" in report["runtime"]
    with pytest.raises(ExportError, match=r"needs onnxruntime: pip install 'keras-vit\[cpu\]'"):
        to_onnx(model, tmp_path / "q.onnx", quantize="dynamic")


@pytest.mark.parametrize("optimize", [False, True], ids=["plain", "optimize"])
def test_cli_static_int8_onnx_agrees_with_keras(trained_digits, tmp_path, optimize):
    """Static int8, calibrated on the digits training split: >= 99% top-1 agreement with Keras
    on 360 test digits; activation scales fixed in the file (QuantizeLinear, MatMulIntegerToFloat,
    QAttention with --optimize, no per-call DynamicQuantizeLinear); the head, LayerNorms, softmax
    and GELU stay float (metadata says so)."""
    import onnx

    model, keras_path = trained_digits
    out = tmp_path / "m.int8.onnx"
    result = CliRunner().invoke(cli, ["export", "--model", keras_path, "--quantize", "int8", "--calibration", "200",
                                      "--calibration-dataset", "digits", "--verify-dataset", "digits",
                                      "--num-images", "360", "--output", str(out)] + (["--optimize"] if optimize else []),
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m.int8.onnx.report.json").read_text())
    assert report["precision"] == "int8" and report["num_images"] == 360
    assert report["top1_agreement"] >= 0.99
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["calibration_images"] == "150" and int(meta["int8_matmuls"]) >= 4
    assert "LayerNorm, softmax, GELU, head, attention products" in meta["kept_float"]
    ops = [n.op_type for n in proto.graph.node]
    assert "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    assert {"QuantizeLinear", "MatMulIntegerToFloat", "Softmax" if not optimize else "QAttention"} <= set(ops)
    assert ("QAttention" in ops) == optimize
    # the scales are constants of the file: the same image gives the same logits alone or in a batch
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).uniform(0, 255, (8,) + tuple(model.input_shape[1:])).astype(np.float32)
    batch = session.run(None, {"images": x})[0]
    alone = np.concatenate([session.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(alone, batch, atol=1e-5)


def test_saved_model_bad_arguments_are_one_line(tmp_path):
    model = small_model("learned")
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ExportError, match="input_dtype must be one of float32, uint8; got 'int8'"):
        to_saved_model(model, tmp_path / "sm", input_dtype="int8")
    with pytest.raises(ExportError, match="is a file; a SavedModel is a folder"):
        to_saved_model(model, tmp_path / "file")
    with pytest.raises(ExportError, match="ends with .onnx, a file's suffix; a SavedModel is a folder"):
        to_saved_model(model, tmp_path / "model.onnx")
    with pytest.raises(ExportError, match="exists and is not a SavedModel"):
        to_saved_model(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "x"
    with pytest.raises(ExportError, match="interpolation applies with dynamic_size=True only"):
        to_saved_model(model, tmp_path / "sm", interpolation="bicubic")
    with pytest.raises(ExportError, match="input_dtype uint8 needs a model that takes \\[0, 255\\] pixels"):
        to_saved_model(small_model("learned", include_preprocessing=False), tmp_path / "sm", input_dtype="uint8")
    assert not (tmp_path / "sm").exists()


def test_python_api_bad_inputs_are_one_clear_error(tmp_path):
    """Damaged files, empty image sources, impossible sizes and feature-map models: ExportError, no file."""
    import onnx

    model = small_model("learned")
    tokens = keras_vit.ViT("Ti/4", image_size=32, **TI, include_top=False, output="tokens")
    with pytest.raises(ExportError, match=r"returns its tokens \(output='tokens'\)"):
        to_onnx(tokens, tmp_path / "tokens.onnx")
    with pytest.raises(ExportError, match="the image source gave no images"):
        to_onnx(model, tmp_path / "int8.onnx", quantize="int8", calibration_images=np.zeros((0, 32, 32, 3)))
    for name, runtime in (("bad.onnx", "onnxruntime"), ("bad.tflite", "LiteRT")):
        (tmp_path / name).write_bytes(b"not a model")
        with pytest.raises(ExportError, match=f"{runtime} cannot load"):
            verify(model, tmp_path / name, num_images=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "bad.tflite"]
    path = to_onnx(model, tmp_path / "any.onnx", dynamic_size=True)
    with pytest.raises(ExportError, match=r"image size 0x32 is smaller than one 4x4 patch"):
        verify(model, path, num_images=2, image_sizes=[(0, 32)])
    with pytest.raises(ExportError, match=r"image size 30x32 is not divisible by the patch size 4x4"):
        verify(model, path, num_images=2, image_sizes=[(30, 32)])
    with pytest.raises(ExportError, match="the image source gave no images"):
        verify(model, path, images=np.zeros((0, 32, 32, 3), np.float32))
    features = keras_vit.ViT("Ti/4", image_size=32, **TI, include_top=False)
    proto = onnx.load(to_onnx(features, tmp_path / "features.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["output"] == "features (include_top=False): float32 [batch, 192]"


def test_features_model_output_is_named_features_in_every_format(tmp_path):
    """An include_top=False model's files return `features`, not `logits` (ONNX output, TFLite and
    SavedModel signatures), and the Runner reads them as Keras computes them."""
    import onnx
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from keras_vit.export.runner import Runner

    features = keras_vit.ViT("Ti/4", image_size=32, **TI, include_top=False)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    want = np.asarray(features(x, training=False))
    onnx_path = to_onnx(features, tmp_path / "f.onnx")
    assert [o.name for o in onnx.load(str(onnx_path)).graph.output] == ["features"]
    tflite_path = to_tflite(features, tmp_path / "f.tflite")
    assert Interpreter(model_path=str(tflite_path)).get_signature_list() == {
        "serving_default": {"inputs": ["images"], "outputs": ["features"]}}
    saved = to_saved_model(features, tmp_path / "f_saved")
    assert list(tf.saved_model.load(str(saved)).signatures["serving_default"].structured_outputs) == ["features"]
    for path in (onnx_path, tflite_path, saved):
        np.testing.assert_allclose(Runner(path)(x), want, atol=1e-4, rtol=1e-4)


def test_model_trained_in_mixed_bfloat16_exports_as_float32(tmp_path):
    """A .keras saved under mixed_bfloat16 (vitcli train --mixed-precision) holds float32 weights
    and a bfloat16 compute policy: exported as its float32 twin, checked at the fp32 thresholds."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = small_model("learned")
        model.save(tmp_path / "bf16.keras")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert keras_vit.load_model(tmp_path / "bf16.keras").dtype_policy.name == "mixed_bfloat16"
    for path in (to_onnx(tmp_path / "bf16.keras", tmp_path / "m.onnx", dynamic_size=True),
                 to_tflite(tmp_path / "bf16.keras", tmp_path / "m.tflite")):
        report = verify(tmp_path / "bf16.keras", path, num_images=8, write_report=False)
        assert report["passed"] and report["max_abs_diff"] <= 1e-4, report["failures"]
    # Resized copies compute as their source does, whatever the global policy.
    assert resize_model(model, (32, 48)).dtype_policy.name == "mixed_bfloat16"


def test_model_quantized_in_keras_is_refused_in_one_line(tmp_path):
    """model.quantize() layers do not convert (TFLite) or convert to another computation (ONNX):
    the exporters ask for the float model and their own quantization."""
    model = small_model("learned")
    model.quantize("int8")
    for export, path in ((to_onnx, "m.onnx"), (to_tflite, "m.tflite")):
        with pytest.raises(ExportError, match=r"layers quantized in Keras \(model.quantize: int8\)"):
            export(model, tmp_path / path)
    for dynamic_size in (True, False):  # a SavedModel keeps float32 weights (fp32 in its metadata)
        with pytest.raises(ExportError, match="layers quantized in Keras"):
            to_saved_model(model, tmp_path / "sm", dynamic_size=dynamic_size)
    assert not any(tmp_path.iterdir())


def test_a_drop_model_that_takes_any_size_exports_and_verifies(tmp_path):
    """patch_remainder='drop' with dynamic_size: the check at another size asked for multiples of the patch
    (36x56 for a 36 px model: 'must be positive multiples of the input stride'), which 'drop' does not need."""
    model = keras_vit.ViT(variant=None, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patch_size=8,
                          image_size=36, num_classes=3, patch_remainder="drop")
    path = to_onnx(model, tmp_path / "drop.onnx", dynamic_size=True)
    report = verify(model, path, num_images=4, image_sizes=[(36, 56), (41, 57)])
    assert report["passed"], report
