"""examples/*.ipynb run end to end (nbclient) on small offline stand-ins the tests write: a tiny
checkpoint, a photo and an image folder, through the notebooks' KERAS_VIT_EXAMPLE_* parameters."""
from __future__ import annotations

import json
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

import keras_vit
from keras_vit.config import ViTConfig
from keras_vit.weights import model_arrays, read_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
TABBY = 281


def run_notebook(name, tmp_path, **env):
    """Execute examples/<name>.ipynb with KERAS_VIT_EXAMPLE_<KEY> set; returns its text outputs."""
    nb = nbformat.read(os.path.join(ROOT, "examples", f"{name}.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store notebooks without outputs"
    saved = dict(os.environ)
    os.environ.update({f"KERAS_VIT_EXAMPLE_{k.upper()}": str(v) for k, v in env.items()})
    os.environ.update(TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")


def _photo(path, size=(48, 40)):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_imagenet_model(tmp_path_factory):
    """A tiny ViT with ImageNet's class names whose head picks class 281, as .safetensors."""
    model = keras_vit.ViT(config=ViTConfig(patch_size=16, image_size=32, **TINY))
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
    bias = np.zeros(1000, np.float32)
    bias[TABBY] = 30.0
    model.get_layer("head").bias.assign(bias)
    model.class_names = keras_vit.imagenet_labels()
    return keras_vit.save_safetensors(model, tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.mark.slow
def test_classify_and_rollout_notebook(tmp_path, tiny_imagenet_model):
    out = run_notebook("01_classify_and_rollout", tmp_path, weights=tiny_imagenet_model,
                       image=_photo(tmp_path / "cat.jpg"), out=tmp_path / "out")
    lines = out.splitlines()
    assert lines[0] == "None (32, 32) 1000 classes"
    assert lines[1].endswith("  tabby, tabby cat") and float(lines[1].split()[0]) > 0.99
    assert "rollout grid (2, 2) sum 1.0" in out
    assert os.path.getsize(tmp_path / "out" / "rollout.png") > 1000


@pytest.mark.slow
def test_finetune_notebook_probe_then_layer_decay(tmp_path):
    start = keras_vit.ViT("Ti/16", image_size=32, num_classes=3, **TINY)
    rng = np.random.default_rng(1)
    for v in start.weights:
        v.assign(rng.normal(0, 0.1, v.shape).astype("float32"))
    ckpt = keras_vit.save_npz(start, tmp_path / "start.npz")
    for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(10):
            img = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "folder" / f"class{c}" / f"{i}.png")
    out = run_notebook("02_finetune_probe_then_layer_decay", tmp_path, weights=ckpt, folder=tmp_path / "folder",
                       out=tmp_path / "runs", tiny=1)
    assert "linear probe: test top-1" in out and "fine-tuned: test top-1" in out and "4 epochs plotted" in out
    runs = tmp_path / "runs"
    with open(runs / "probe" / "config.json") as f:
        assert json.load(f)["train"]["freeze_backbone"] is True
    with open(runs / "full" / "config.json") as f:
        assert json.load(f)["train"]["layer_decay"] == 0.75
    probe = model_arrays(keras_vit.load_model(runs / "probe" / "model.keras"))
    for k, v in read_npz(ckpt).items():  # the probe left the backbone exactly as loaded
        if not k.startswith("head/"):
            np.testing.assert_array_equal(probe[k], v, err_msg=k)
    full = model_arrays(keras_vit.load_model(runs / "full" / "model.keras"))
    assert not np.array_equal(full["embedding/kernel"], probe["embedding/kernel"])  # then everything trained
    assert os.path.getsize(runs / "curves.png") > 1000


@pytest.mark.slow
def test_export_notebook_agrees_with_keras(tmp_path, tiny_imagenet_model):
    out = run_notebook("03_export_verify_onnxruntime", tmp_path, model=tiny_imagenet_model,
                       image=_photo(tmp_path / "cat.jpg"), out=tmp_path / "out")
    with open(tmp_path / "out" / "model.onnx.report.json") as f:
        report = json.load(f)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
    assert "onnxruntime: tabby, tabby cat" in out and "keras:       tabby, tabby cat" in out
    assert float(out.split("max |diff|:")[1].split()[0]) <= 1e-4


@pytest.mark.slow
def test_dinov2_features_linear_probe_notebook(tmp_path):
    """The notebook writes its own tiny DINOv2-layout checkpoint (offline) and probes its features."""
    out = run_notebook("04_dinov2_features_linear_probe", tmp_path, out=tmp_path / "out")
    assert "registers 4, LayerScale True" in out and "linear probe: test top-1" in out
    top1 = float(out.split("linear probe: test top-1 ")[1].split()[0])
    assert top1 > 0.3  # random features of 8x8 digits, linearly separable well above chance (0.1)
    assert (tmp_path / "out" / "tiny-dinov2-reg" / "config.json").is_file()
