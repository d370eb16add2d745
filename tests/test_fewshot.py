"""keras_vit.fewshot and `vitcli fewshot`: the paper's linear few-shot protocol."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from keras_vit import fewshot


@pytest.mark.parametrize("n,d", [(60, 12), (12, 60)])  # primal (n >= d) and dual (n < d) forms
def test_closed_form_equals_iterative_solver(n, d):
    from sklearn.linear_model import Ridge

    rs = np.random.default_rng(0)
    x = rs.normal(size=(n, d))
    y = 2.0 * np.eye(4)[rs.integers(0, 4, n)] - 1.0
    for l2 in (0.1, 3.0):
        w = fewshot.ridge_regression(x, y, l2)
        iterative = Ridge(alpha=l2, fit_intercept=False, solver="sag", tol=1e-12, max_iter=200_000,
                          random_state=0).fit(x, y)
        np.testing.assert_allclose(w, iterative.coef_.T, atol=1e-5)
        # gradient of ||XW - Y||^2 + l2 ||W||^2 vanishes at the solution
        np.testing.assert_allclose(x.T @ (x @ w - y) + l2 * w, 0.0, atol=1e-8)


def test_eigendecomposition_path_equals_closed_form():
    rs = np.random.default_rng(1)
    for n in (40, 8):
        x = rs.normal(size=(n, 16))
        labels = np.arange(n) % 4
        cache = fewshot._RidgeCache(x, labels, 4)
        xs = fewshot._standardise(x, cache.mean, cache.std)
        for l2 in (2.0 ** -5, 1.0, 2.0 ** 8):
            np.testing.assert_allclose(cache.weights(l2), fewshot.ridge_regression(xs, fewshot._targets(labels, 4), l2),
                                       atol=1e-6)


def _features(model, digits):
    x_tr, y_tr, x_te, y_te = digits
    f_tr = fewshot.extract_features(model, x_tr)
    f_te = fewshot.extract_features(model, x_te)
    # validation: the last 200 training images; the support sets are drawn from the rest
    return (f_tr[:-200], y_tr[:-200]), (f_tr[-200:], y_tr[-200:]), (f_te, y_te)


def test_ten_shot_on_digits_trained_features_is_far_above_chance(trained_digits_vit, digits):
    train, val, test = _features(trained_digits_vit, digits)
    assert train[0].shape[1] == 64  # pre-logits width, the head is cut off
    result = fewshot.fewshot_evaluate(train, val, test, shots=(1, 10), draws=3, seed=0)
    assert result["chance"] == pytest.approx(0.1)
    ten = result["shots"][10]
    assert len(ten["accuracies"]) == 3 and ten["std"] >= 0
    assert ten["mean"] > 0.6, result
    assert ten["l2"] in fewshot.DEFAULT_L2_GRID
    # the regulariser is chosen on validation data: scrambling the test labels cannot change it
    scrambled = (test[0], np.random.default_rng(0).permutation(test[1]))
    again = fewshot.fewshot_evaluate(train, val, scrambled, shots=(1, 10), draws=3, seed=0)
    assert [again["shots"][k]["l2"] for k in (1, 10)] == [result["shots"][k]["l2"] for k in (1, 10)]


def test_too_many_shots_is_a_clear_error():
    rs = np.random.default_rng(0)
    x, y = rs.normal(size=(20, 4)), np.arange(20) % 2
    with pytest.raises(ValueError, match="fewer than 25 shots"):
        fewshot.fewshot_evaluate((x, y), (x, y), (x, y), shots=(25,))


@pytest.mark.parametrize("change,message", [
    (dict(num_classes=3), r"labels must be class indices 0\.\.2 of num_classes=3; got labels up to 4"),
    (dict(shots=(2.5,)), r"shots must be distinct positive integers, got \[2\.5\]"),
    (dict(shots=(1, 1)), r"shots must be distinct positive integers, got \[1, 1\]"),
    (dict(l2_grid=()), r"l2_grid must be finite ridge penalties >= 0, at least one; got \[\]"),
    (dict(features=np.nan), r"the model's features are not all finite"),
    (dict(train=0), r"needs non-empty train, validation and test splits"),
])
def test_bad_arguments_are_one_line(change, message):
    """Labels past num_classes gave chance 1/3 and never predicted classes 3, 4; 2.5 shots ran 2; a repeated
    shot count ran twice and kept one; an empty l2 grid or split failed in NumPy; NaN features gave
    'Eigenvalues did not converge'."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 8)), np.arange(50) % 5
    if "features" in change:
        x[0, 0] = change.pop("features")
    train = (x[:0], y[:0]) if change.pop("train", None) == 0 else (x, y)
    with pytest.raises(ValueError, match=message):
        fewshot.fewshot_evaluate(train, (x, y), (x, y), **{"shots": (1,), **change})


def test_cli_fewshot_json(trained_digits_vit, tmp_path):
    from keras_vit.cli.main import cli

    path = tmp_path / "digits.keras"
    trained_digits_vit.save(path)
    out = tmp_path / "fewshot.json"
    result = CliRunner().invoke(cli, ["fewshot", "--model", str(path), "--dataset", "digits", "--shots", "1,5",
                                      "--draws", "2", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    parsed = json.loads(result.output[result.output.index("{"):])
    assert set(parsed["shots"]) == {"1", "5"} and parsed["num_classes"] == 10
    assert parsed["shots"]["5"]["mean"] > 0.3
    assert json.loads(out.read_text()) == parsed
    bad = CliRunner().invoke(cli, ["fewshot", "--model", str(path), "--shots", "0,5"])
    assert bad.exit_code == 2 and "--shots" in bad.output and len(bad.output.strip().splitlines()) == 1


def test_cli_fewshot_refuses_an_out_it_cannot_write_before_evaluating(tmp_path, monkeypatch):
    """A read-only folder or a file in the way of --out: one line naming --out's path, before any work; no folder made."""
    import os

    from keras_vit.cli.main import cli

    monkeypatch.setattr(fewshot, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_access = os.access  # root writes anywhere: the read-only folder is also simulated for os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.fspath(p) == str(ro) else real_access(p, mode, *a, **k))
    (tmp_path / "file").write_text("")
    cases = [(ro / "sub" / "f.json", f"the folder '{ro}' is not writable"),
             (tmp_path / "file" / "f.json", f"'{tmp_path / 'file'}' is a file, where a folder is needed")]
    try:
        for out, why in cases:
            result = CliRunner().invoke(cli, ["fewshot", "--model", "Ti/4", "--shots", "1", "--draws", "1", "--out", str(out)])
            assert result.exit_code == 2 and result.output.strip().startswith(f"Error: --out '{out}': {why}"), result.output
            assert len(result.output.strip().splitlines()) == 1
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_features_of_every_headless_form_are_the_pre_logits(classifier):
    import keras_vit

    kw = dict(variant="Ti/4", image_size=16, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
              classifier=classifier)
    full = keras_vit.ViT(num_classes=10, **kw)
    images = np.random.default_rng(0).uniform(0, 255, (5, 16, 16, 3)).astype("float32")
    expected = fewshot.extract_features(full, images)
    assert expected.shape == (5, 32)
    for form in (dict(include_top=False), dict(include_top=False, output="tokens")):
        headless = keras_vit.ViT(**kw, **form)
        headless.set_weights(full.get_weights()[:-2])  # all but the head's kernel and bias
        np.testing.assert_allclose(fewshot.extract_features(headless, images), expected, atol=1e-5)
    maps = keras_vit.ViT(**kw, include_top=False, feature_layers=(0,))
    with pytest.raises(ValueError, match="feature maps of blocks"):
        fewshot.extract_features(maps, images)
