"""The same weights give the same logits under TensorFlow, JAX and PyTorch (each other backend in
its own process), and model.fit learns there."""

import numpy as np
import pytest

import keras_vit
from tests.backend_worker import run_job
from tests.conftest import random_images

TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)
CASES = [
    ("learned-token", dict(pos_embedding="learned", classifier="token")),
    ("learned_2d-gap", dict(pos_embedding="learned_2d", classifier="gap", representation_size=16)),
    ("relative-token", dict(pos_embedding="relative")),
    ("sincos2d-gap", dict(pos_embedding="sincos2d", classifier="gap")),
    ("none-token-exact-gelu", dict(pos_embedding="none", gelu_approximate=False)),
]


@pytest.mark.jax
@pytest.mark.parametrize("backend", ["jax", pytest.param("torch", marks=pytest.mark.torch)])
def test_other_backends_give_the_tensorflow_logits_and_fit(tmp_path, backend):
    pytest.importorskip(backend)  # optional extras: [jax]; torch from the [test] extra where it resolves
    rs = np.random.default_rng(0)
    job = {"cases": [], "output": str(tmp_path / "out.json"), "fit": True}
    expected = {}
    x = random_images(4, 32, 24)
    np.save(tmp_path / "x.npy", x)
    for name, opts in CASES:
        model = keras_vit.ViT(variant="Ti/8", image_size=(32, 24), num_classes=5, **TINY, **opts)
        for w in model.weights:  # randomise everything, the zero head included
            w.assign(rs.normal(0, 0.2, w.shape).astype("float32"))
        path = tmp_path / f"{name}.weights.h5"
        model.save_weights(path)
        expected[name] = model.predict(x, verbose=0)
        job["cases"].append({"name": name, "config": model.vit_config.to_dict(), "weights": str(path),
                             "inputs": str(tmp_path / "x.npy")})
    out = run_job(job, tmp_path, backend, timeout=600)
    for name, _ in CASES:
        got = np.asarray(out[name], dtype="float32")
        assert np.abs(got - expected[name]).max() <= 1e-5, name
        assert np.abs(expected[name]).max() > 0.1  # non-trivial logits
    losses = out["fit_losses"]
    assert losses[-1] < losses[0], losses  # model.fit learns on this backend too
