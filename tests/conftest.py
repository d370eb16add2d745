"""Shared fixtures: quiet TensorFlow logs, small deterministic inputs, and the trained models
shared by many tests (session scope: each is trained once per test session)."""
import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

# Fixtures that train a model for tens of seconds (trained once per session, see below): the tests
# that use one are marked slow, so `make test-quick` (-m "not slow") never trains them.
TRAINING_FIXTURES = {"trained_digits", "trained_digits_vit", "killed_and_resumed"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# Python's full garbage collections walk every object alive: TensorFlow's and Keras' modules (~470,000
# objects once imported) and whatever earlier tests left (test_matrix's 48 models: ~1,000,000 more). Tracing
# and quantizing models triggers tens of them a test: test_quantize's int8 kernel test spent 13.4 of its 14.2 s
# in them after test_matrix. What is alive between tests is frozen out of the collections instead
# (gc.freeze): that test then takes 0.7 s.
def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if nextitem is None or nextitem.module is not item.module:
        gc.unfreeze()  # the module's fixtures are gone: what they held (frozen, hence never collected) goes now
    gc.collect()
    gc.freeze()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """The Hugging Face Hub unreachable and its cache empty (a fresh folder under tmp_path)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_images(n, h, w, c=3, seed=0):
    """Float images in [0, 255], the models' input range."""
    return np.random.default_rng(seed).uniform(0, 255, (n, h, w, c)).astype("float32")


def weighted_sum_step(layer, weights, training=True, **call):
    """A traced step of `layer` on t: its output, and the gradients of sum(output * weights) for t and its weights."""
    import tensorflow as tf

    @tf.function
    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = layer(t, training=training, **call)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * weights)
        return [y] + tape.gradient(loss, [t] + layer.trainable_variables)

    return step


def randomise_head(model, seed=0):
    """The head is zero-initialised; give it random weights so that logits differ per input."""
    head = model.get_layer("head")
    rs = np.random.default_rng(seed)
    head.kernel.assign(rs.normal(0, 0.5, head.kernel.shape).astype("float32"))
    head.bias.assign(rs.normal(0, 0.5, head.bias.shape).astype("float32"))
    return model


@pytest.fixture(scope="session")
def digits():
    """x_train, y_train, x_test, y_test of keras_vit.data.digits_arrays()."""
    from keras_vit.data import digits_arrays

    return digits_arrays()


def _once_per_run(tmp_path_factory, name: str, train, load):
    """What `train(path)` makes and saves at `path`, made once per `make test`: the first pytest-xdist worker
    to ask trains it, the others wait for it and `load(path)` (each trained its own before: the same
    tens of seconds twice). Without xdist, or where the first worker's training failed, it trains here."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return train(str(tmp_path_factory.mktemp(name) / "model.keras"))
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"  # the run's folder, above the workers' own
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes: the trainer's worker has saved by then
        if (shared / "done").exists():
            return load(str(shared / "model.keras"))
        made = train(str(shared / "model.keras"))
        (shared / "done").write_text("saved\n")
        return made


@pytest.fixture(scope="session")
def trained_digits(digits, tmp_path_factory):
    """(model, .keras path) of the export tests' digits model (see export_helpers.train_digits)."""
    from export_helpers import train_digits

    import keras_vit

    return _once_per_run(tmp_path_factory, "trained_digits", lambda path: train_digits(digits, path),
                         lambda path: (keras_vit.load_model(path), path))


@pytest.fixture(scope="session")
def trained_digits_vit(digits, tmp_path_factory):
    """The inspection / few-shot tests' digits model (see vit_digits.train_digits_vit)."""
    import keras_vit
    from tests.vit_digits import train_digits_vit

    def train(path):
        model = train_digits_vit(digits)
        model.save(path)
        return model

    return _once_per_run(tmp_path_factory, "trained_digits_vit", train, keras_vit.load_model)
