"""keras_vit.inspect and `vitcli inspect`: attention maps, rollout, attention distance,
position-embedding similarity, embedding filters (paper Section 4.5, Fig. 7)."""
import subprocess
import sys

import ckpt_factory as cf
import numpy as np
import pytest
import reference_vit as ref
from click.testing import CliRunner

import keras_vit
from keras_vit import inspect as kin
from keras_vit.config import ViTConfig
from tests.backend_worker import run_job
from tests.conftest import random_images
from tests.vit_digits import TINY_DIGITS

SMALL = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)


def _uniform_attention(model):
    """Zero query projections: every logit is 0, so every head attends uniformly."""
    for layer in model.layers:
        if isinstance(layer, keras_vit.layers.TransformerBlock):
            att = layer.attention
            att.query_kernel.assign(np.zeros(att.query_kernel.shape, "float32"))
            att.query_bias.assign(np.zeros(att.query_bias.shape, "float32"))
    return model


@pytest.mark.parametrize("classifier,image_size,patch", [("token", (32, 48), 8), ("gap", (16, 24), 4)])
def test_attention_maps_shapes_and_rows_sum_to_one(classifier, image_size, patch):
    model = keras_vit.ViT("Ti/8", image_size=image_size, num_classes=3, classifier=classifier,
                          patch_size=patch, **SMALL)
    grid = (image_size[0] // patch, image_size[1] // patch)
    s = grid[0] * grid[1] + (classifier == "token")
    maps = kin.attention_maps(model, random_images(3, *image_size), batch_size=2)  # two batches
    assert len(maps) == SMALL["num_layers"]
    for a in maps:
        assert a.shape == (3, SMALL["num_heads"], s, s) and a.dtype == np.float32
        np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-5)
        assert (a >= 0).all()
    assert kin.attention_rollout(model, random_images(2, *image_size)).shape == (2, *grid)
    assert kin.mean_attention_distance(model, random_images(2, *image_size)).shape == (2, 2)


def test_attention_maps_of_a_model_loaded_from_keras_file(tmp_path):
    model = keras_vit.ViT("Ti/8", image_size=32, num_classes=3, **SMALL)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras_vit.load_model(path)
    x = random_images(2, 32, 32)
    for a, b in zip(kin.attention_maps(model, x), kin.attention_maps(loaded, x)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_attention_maps_of_a_hybrid(tmp_path):
    model = keras_vit.ViT("R26+S/32", image_size=64, num_classes=3, **SMALL)
    maps = kin.attention_maps(model, random_images(1, 64, 64))
    assert maps[0].shape == (1, 2, 5, 5)
    # one "patch" spans the total stride (32 px): distances are multiples of it
    assert kin.mean_attention_distance(model, random_images(1, 64, 64)).max() <= 32 * np.sqrt(2) + 1e-3
    with pytest.raises(ValueError, match="hybrid"):
        kin.embedding_filters(model)
    written = kin.inspect_model(model, random_images(1, 64, 64), str(tmp_path))
    assert "embedding_filters" in written["skipped"] and (tmp_path / "attention_rollout.png").exists()


def _numpy_rollout(probs, prefix):
    """Abnar & Zuidema's rollout of float64 probabilities: head mean, (A + I) / 2 renormalised, product
    from the input up; the class token's row (or the mean patch row) over the patches, summing to 1."""
    r = None
    for a in probs:
        a = 0.5 * a.mean(axis=1) + 0.5 * np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        r = a if r is None else np.einsum("bij,bjk->bik", a, r)
    row = r[:, 0, prefix:] if prefix else r.mean(axis=1)
    return row / row.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["token", "gap", "hybrid"])
def test_attention_maps_and_rollout_equal_the_numpy_reference(tmp_path, kind):
    """What inspect reads from the model's own outputs equals the independent float64 NumPy ViT
    of the same checkpoint: every block's probabilities and the rollout, to 1e-5."""
    rng = np.random.default_rng(3)
    tiny = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, num_classes=5)
    if kind == "hybrid":
        arrays = cf.vit_checkpoint(rng, patch=1, resnet=(1, 1, 1))
        cfg = ViTConfig(**tiny, patch_size=1, image_size=32, resnet_layers=(1, 1, 1))
    else:
        arrays = cf.vit_checkpoint(rng, grid=(2, 3), token=kind == "token")
        cfg = ViTConfig(**tiny, patch_size=4, image_size=(8, 12), classifier=kind)
    path = cf.write(tmp_path / "vit.npz", arrays)
    model = keras_vit.ViT(config=cfg, weights=path)
    x = random_images(3, *cfg.image_size)
    want = ref.encoder(path, x, "gap" if kind == "gap" else "token")[1]
    got = kin.attention_maps(model, x, batch_size=2)
    assert len(got) == 2 and got[0].shape == want[0].shape
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-5
    rollout = kin.attention_rollout(model, x)
    assert rollout.shape == (3, *cfg.grid_size)
    np.testing.assert_allclose(rollout.reshape(3, -1), _numpy_rollout(want, int(kind != "gap")), atol=1e-5)


def test_inspect_a_dynamic_size_model_at_any_size_as_the_resized_model():
    """A dynamic-size model is inspected at any multiple of the patch size, and gives what
    resize_model gives at that size (a resized model is inspected like any other)."""
    model = keras_vit.ViT("Ti/8", image_size=16, num_classes=3, **SMALL)
    dynamic = keras_vit.dynamic_model(model)
    x = random_images(2, 24, 32)
    resized = keras_vit.resize_model(model, (24, 32))
    for a, b in zip(kin.attention_maps(dynamic, x), kin.attention_maps(resized, x)):
        assert a.shape == (2, 2, 13, 13) and np.abs(a - b).max() <= 1e-5
    np.testing.assert_allclose(kin.attention_rollout(dynamic, x), kin.attention_rollout(resized, x), atol=1e-5)
    np.testing.assert_allclose(kin.mean_attention_distance(dynamic, x), kin.mean_attention_distance(resized, x),
                               atol=1e-4)
    with pytest.raises(ValueError, match="H a multiple of 8"):
        kin.attention_maps(dynamic, random_images(1, 20, 32))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_attention_maps_and_pretrainer_on_other_backends(backend, tmp_path):
    """Under KERAS_BACKEND=jax / torch (own process, same weights) the attention maps and the
    masked-patch-prediction outputs are TensorFlow's (JAX's default attention is the fused
    kernel, which never forms the probabilities: asking for them takes the explicit path)."""
    pytest.importorskip(backend)  # optional extras, as in tests/test_matrix.py
    from keras_vit import pretrain as mpp

    rs = np.random.default_rng(0)
    x = random_images(2, 32, 24)
    np.save(tmp_path / "x.npy", x)
    job = {"cases": [], "output": str(tmp_path / "out.json")}
    expected = {}
    for name, opts in (("token", {}), ("relative-gap", dict(pos_embedding="relative", classifier="gap"))):
        model = keras_vit.ViT("Ti/8", image_size=(32, 24), num_classes=3, **SMALL, **opts)
        for w in model.weights:
            w.assign(rs.normal(0, 0.3, w.shape).astype("float32"))
        model.save_weights(tmp_path / f"{name}.weights.h5")
        case = {"name": name, "config": model.vit_config.to_dict(), "weights": str(tmp_path / f"{name}.weights.h5"),
                "inputs": str(tmp_path / "x.npy"), "attention": True}
        expected[name] = kin.attention_maps(model, x)
        if name == "token":
            pre = mpp.build_pretrainer(model, "color")
            pre.save_weights(tmp_path / "pre.weights.h5")
            inputs, _, _ = next(mpp.masked_patch_batches(x, (8, 8), 12, 2, seed=1))
            np.savez(tmp_path / "pre_inputs.npz", **inputs)
            expected["pretrainer"] = np.asarray(pre(inputs))
            case.update(pretrainer=str(tmp_path / "pre.weights.h5"), pretrainer_inputs=str(tmp_path / "pre_inputs.npz"))
        job["cases"].append(case)
    out = run_job(job, tmp_path, backend, timeout=600)
    for name in ("token", "relative-gap"):
        got = out[name + ":attention"]
        assert len(got) == len(expected[name]) == 2
        for g, w in zip(got, expected[name]):
            assert np.abs(np.asarray(g) - w).max() <= 1e-5, name
    assert np.abs(np.asarray(out["token:pretrainer"]) - expected["pretrainer"]).max() <= 1e-4


def test_wrong_image_shape_is_a_clear_error():
    model = keras_vit.ViT("Ti/8", image_size=32, num_classes=3, **SMALL)
    with pytest.raises(ValueError, match=r"\(batch, 32, 32, 3\)"):
        kin.attention_maps(model, random_images(1, 16, 16))


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_uniform_attention_gives_uniform_rollout(classifier):
    model = _uniform_attention(keras_vit.ViT("Ti/8", image_size=(32, 48), num_classes=3,
                                             classifier=classifier, **SMALL))
    x = random_images(2, 32, 48)
    maps = kin.attention_maps(model, x)
    np.testing.assert_allclose(maps[0], 1.0 / maps[0].shape[-1], atol=1e-6)
    rollout = kin.attention_rollout(model, x)
    assert rollout.shape == (2, 4, 6)
    np.testing.assert_allclose(rollout, 1.0 / 24, atol=1e-6)


def test_rollout_of_one_layer_is_the_residual_mixed_attention():
    rs = np.random.default_rng(0)
    a = rs.random((1, 2, 5, 5))
    a /= a.sum(-1, keepdims=True)
    expected = 0.5 * a.mean(1)[0] + 0.5 * np.eye(5)
    row = expected[0, 1:] / expected[0, 1:].sum()
    np.testing.assert_allclose(kin.rollout_from_attention([a], num_prefix_tokens=1)[0], row, atol=1e-6)


def test_self_only_head_has_zero_attention_distance():
    grid, stride = (4, 6), (8, 8)
    n = 24
    eye = np.broadcast_to(np.eye(n + 1), (2, 1, n + 1, n + 1))
    # a head looking only at the patch to its right (wrapping at the row end excluded)
    right = np.zeros((1, 1, n + 1, n + 1))
    right[0, 0, 0, 1] = 1
    for q in range(n):
        r, c = divmod(q, 6)
        right[0, 0, q + 1, 1 + r * 6 + (c + 1 if c < 5 else c - 1)] = 1
    out = kin.attention_distance_from_probs(np.concatenate([eye[:1], right], axis=1), grid, stride)
    assert out.shape == (2,)
    assert out[0] == pytest.approx(0.0, abs=1e-6)
    assert out[1] == pytest.approx(8.0, abs=1e-5)  # one patch (8 px) away
    # class-token attention is dropped and the patch row renormalised
    half = np.zeros((1, 1, n + 1, n + 1))
    half[..., 0] = 0.5
    half[0, 0, np.arange(1, n + 1), np.arange(1, n + 1)] = 0.5
    assert kin.attention_distance_from_probs(half, grid, stride)[0] == pytest.approx(0.0, abs=1e-6)


def test_position_embeddings_trained_on_digits_are_more_similar_to_neighbours(trained_digits_vit):
    model = trained_digits_vit
    sim = kin.position_embedding_similarity(model)
    g = 32 // TINY_DIGITS["patch_size"]
    assert sim.shape == (g, g, g, g)
    idx = np.arange(g)
    np.testing.assert_allclose(sim[idx[:, None], idx[None, :], idx[:, None], idx[None, :]], 1.0, atol=1e-5)
    dist = kin.patch_distances((g, g), (1, 1)).reshape(g, g, g, g)
    neighbours, far = sim[dist == 1].mean(), sim[dist >= g / 2].mean()
    assert neighbours > far + 0.1, (neighbours, far)


def test_position_embedding_similarity_needs_a_table():
    model = keras_vit.ViT("Ti/8", image_size=32, num_classes=3, pos_embedding="none", **SMALL)
    with pytest.raises(ValueError, match="no position embedding"):
        kin.position_embedding_similarity(model)
    sincos = keras_vit.ViT("Ti/8", image_size=32, num_classes=3, pos_embedding="sincos2d", **SMALL)
    assert kin.position_embedding_similarity(sincos).shape == (4, 4, 4, 4)


def test_embedding_filters_are_principal_components():
    model = keras_vit.ViT("Ti/4", image_size=32, num_classes=3, **SMALL)
    comps, ratio = kin.embedding_filters(model, k=28)
    assert comps.shape == (28, 4, 4, 3)
    flat = comps.reshape(28, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(28), atol=1e-4)  # orthonormal directions
    assert np.all(np.diff(ratio) <= 1e-7) and 0 < ratio.sum() <= 1 + 1e-6
    assert kin.embedding_filters(model, k=1000)[0].shape[0] == 32  # capped at min(D, P*P*C)


def test_cli_inspect_writes_figures_and_arrays(digits, trained_digits_vit, tmp_path):
    from keras_vit.cli.main import cli

    path = tmp_path / "digits.keras"
    trained_digits_vit.save(path)
    x_te = digits[2]
    from PIL import Image

    Image.fromarray(x_te[0].astype("uint8")).save(tmp_path / "digit.png")
    out = tmp_path / "figs"
    result = CliRunner().invoke(cli, ["inspect", "--model", str(path), "--image", str(tmp_path / "digit.png"),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("attention_rollout", "attention_maps", "mean_attention_distance",
                 "position_embedding_similarity", "embedding_filters"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    arrays = np.load(out / "inspect.npz")
    assert arrays["attention_layer0"].shape == (1, 4, 65, 65)
    assert arrays["mean_attention_distance"].shape == (2, 4)
    assert arrays["attention_rollout"].shape == (1, 8, 8)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_inspect_bad_input_is_one_line(tmp_path):
    from keras_vit.cli.main import cli

    result = CliRunner().invoke(cli, ["inspect", "--model", str(tmp_path / "missing.keras"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: model file '{tmp_path / 'missing.keras'}' does not exist"]
    result = CliRunner().invoke(cli, ["inspect", "--model", "Q/16", "--out", str(tmp_path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "unknown variant" in result.output
    result = CliRunner().invoke(cli, ["inspect", "--model", "Ti/16", "--num-images", "5", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        "Error: --num-images counts test images of --dataset; give --dataset too (or drop --num-images)"]


def test_analysis_commands_import_on_their_own_without_tensorflow():

    code = ("import sys, keras_vit.cli.analysis as a; "
            "assert a.inspect_cmd.name == 'inspect' and 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_attention_distance_is_summed_batch_by_batch():
    """Batches of 2 give the distance of one pass over all the images (memory follows batch_size: 400
    images of a 64 px model took 2.5 GB when every layer's maps were kept); no images is one line."""
    import keras_vit

    model = keras_vit.ViT(variant=None, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=4,
                          image_size=16, num_classes=3)
    x = random_images(5, 16, 16)
    whole = np.stack([kin.attention_distance_from_probs(a, (4, 4), (4, 4)) for a in kin.attention_maps(model, x)])
    np.testing.assert_allclose(kin.mean_attention_distance(model, x, batch_size=2), whole, rtol=1e-6)
    with pytest.raises(ValueError, match=r"no images \(shape \(0, 16, 16, 3\)\): give at least one"):
        kin.mean_attention_distance(model, x[:0])


def test_inspect_model_reads_the_attention_once(tmp_path, monkeypatch):
    """The mean attention distance over the shown images reused none of the maps just computed: a second
    pass over the same images. One pass now, with the same figure as the separate computation."""
    import keras_vit

    model = keras_vit.ViT(variant=None, hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, patch_size=4,
                          image_size=16, num_classes=3)
    x = random_images(3, 16, 16)
    want = kin.mean_attention_distance(model, x)
    calls = []
    real = kin.attention_maps
    monkeypatch.setattr(kin, "attention_maps", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    kin.inspect_model(model, x, str(tmp_path / "a"))
    assert len(calls) == 1
    np.testing.assert_allclose(np.load(tmp_path / "a" / "inspect.npz")["mean_attention_distance"], want, rtol=1e-5)
    kin.inspect_model(model, x[:1], str(tmp_path / "b"), distance_images=x)
    np.testing.assert_allclose(np.load(tmp_path / "b" / "inspect.npz")["mean_attention_distance"], want, rtol=1e-5)
