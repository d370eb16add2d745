"""Shared fixtures: quiet TensorFlow logs, small deterministic inputs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_images(n, h, w, c=3, seed=0):
    """Float images in [0, 255], the models' input range."""
    return np.random.default_rng(seed).uniform(0, 255, (n, h, w, c)).astype("float32")


def randomise_head(model, seed=0):
    """The head is zero-initialised; give it random weights so that logits differ per input."""
    head = model.get_layer("head")
    rs = np.random.default_rng(seed)
    head.kernel.assign(rs.normal(0, 0.5, head.kernel.shape).astype("float32"))
    head.bias.assign(rs.normal(0, 0.5, head.bias.shape).astype("float32"))
    return model
