"""ImageNet class names in the package; published checkpoints set the model's defaults and carry
their class names through save/load, `keras_vit.predict` and `vitcli predict --model NAME`.

The published checkpoint is a random Ti/16 written by the test into the Keras cache under the
published file name (no network): its head favours class 281 for every image."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import ckpt_factory as cf
import numpy as np
import pytest
from PIL import Image

import keras_vit
from keras_vit import weights as W

NAME = "Ti/16-augreg-i21k-ft-in1k"
TABBY = 281


def test_imagenet_labels_ship_with_the_package():
    in1k = keras_vit.imagenet_labels("imagenet1k")
    assert len(in1k) == 1000 and in1k[0].startswith("tench") and in1k[TABBY] == "tabby, tabby cat"
    assert in1k[999].startswith("toilet tissue")
    in21k = keras_vit.imagenet_labels("imagenet21k")
    assert len(in21k) == 21843 and len(set(in1k) - set(in21k)) < 10
    assert W.PUBLISHED[NAME].labels == "imagenet1k" and W.PUBLISHED["B/16-i21k"].labels == "imagenet21k"
    with pytest.raises(ValueError, match="allowed: imagenet1k, imagenet21k"):
        keras_vit.imagenet_labels("coco")


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory):
    """A Keras cache holding NAME's file: a random Ti/16 whose head picks class 281."""
    home = tmp_path_factory.mktemp("keras_home")
    entry = W.PUBLISHED[NAME]
    arrays = cf.vit_checkpoint(np.random.default_rng(0), hidden=192, heads=3, mlp=768, layers=12, patch=16,
                               grid=(14, 14), classes=1000)
    arrays["head/bias"][TABBY] = 50.0
    folder = home / "models" / "keras_vit"
    folder.mkdir(parents=True)
    cf.write(folder / entry.url.rsplit("/", 1)[-1], arrays)
    return str(home)


def test_published_checkpoint_sets_defaults_and_names(keras_home, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("KERAS_HOME", keras_home)
    model = keras_vit.ViT(weights=NAME)
    cfg = model.vit_config
    assert (cfg.variant, cfg.image_size, cfg.num_classes, cfg.representation_size) == ("Ti/16", (224, 224), 1000, None)
    assert model.class_names == keras_vit.imagenet_labels()
    x = np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    top = keras_vit.predict(model, x, top_k=2)
    assert [t[0][0] for t in top] == ["tabby, tabby cat"] * 2 and top[0][0][1] > 0.99
    model.save(tmp_path / "m.keras")
    assert keras_vit.load_model(tmp_path / "m.keras").class_names == model.class_names
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        small = keras_vit.ViT(weights=NAME, image_size=160, num_classes=10)
    assert small.vit_config.image_size == (160, 160) and small.vit_config.num_classes == 10
    assert small.class_names is None  # a new head: the ImageNet names no longer apply
    assert small.vit_config.representation_size is None
    assert any("resampled from a 14x14 to a 10x10 grid" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_vitcli_predict_with_a_published_name(keras_home, tmp_path):
    img = tmp_path / "cat.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(img)
    vitcli = os.path.join(os.path.dirname(sys.executable), "vitcli")
    env = {**os.environ, "KERAS_HOME": keras_home, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run([vitcli, "predict", "--model", NAME, "--top-k", "1", str(img)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"{img}: tabby, tabby cat 1.000"
