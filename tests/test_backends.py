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
    ("qk_norm-gap", dict(qk_norm=True, classifier="gap")),  # the per-head LayerNorms (torch: F.layer_norm)
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


_TORCH_SIDE = '''
import json, sys
import keras, numpy as np
import keras_vit

x, y = np.load(sys.argv[1]), np.arange(4) % 3
tf_saved = keras_vit.load_model(sys.argv[2])  # compiled on TensorFlow (XLA there)
tf_saved.fit(x, y, epochs=1, verbose=0)
model = keras_vit.ViT("Ti/8", image_size=16, num_classes=3, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1)
model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
model.fit(x, y, epochs=2, verbose=0)
model.save(sys.argv[3])
print(json.dumps({"jit": tf_saved.jit_compile, "iterations": int(keras.ops.convert_to_numpy(tf_saved.optimizer.iterations)),
                  "logits": keras.ops.convert_to_numpy(model(x)).tolist()}))
'''


@pytest.mark.torch
def test_a_compiled_model_moves_between_tensorflow_and_pytorch_and_trains_on(tmp_path):
    """load_model restores the compile state on another backend too: a TensorFlow file's XLA choice
    is not torch.compile on PyTorch (jit_compile "auto" there: eager), and PyTorch's own optimizer
    class, named in the files it saves, is Keras' public one on TensorFlow."""
    import json
    import os
    import subprocess
    import sys

    import keras

    pytest.importorskip("torch")
    x = random_images(4, 16, 16)
    np.save(tmp_path / "x.npy", x)
    model = keras_vit.ViT("Ti/8", image_size=16, num_classes=3, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1)
    model.compile(optimizer="adamw", loss="sparse_categorical_crossentropy")
    model.fit(x, np.arange(4) % 3, epochs=1, verbose=0)
    model.save(tmp_path / "tf.keras")
    proc = subprocess.run([sys.executable, "-c", _TORCH_SIDE, str(tmp_path / "x.npy"), str(tmp_path / "tf.keras"),
                           str(tmp_path / "torch.keras")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch_side = json.loads(proc.stdout.strip().splitlines()[-1])
    assert torch_side["jit"] is False and torch_side["iterations"] == 2  # eager, and the TF step count went on
    loaded = keras_vit.load_model(tmp_path / "torch.keras")
    assert loaded.compiled and type(loaded.optimizer) is keras.optimizers.AdamW
    assert int(loaded.optimizer.iterations.numpy()) == 2
    np.testing.assert_allclose(loaded.predict(x, verbose=0), torch_side["logits"], atol=1e-5)
    loaded.fit(x, np.arange(4) % 3, epochs=1, verbose=0)
    assert int(loaded.optimizer.iterations.numpy()) == 3


_TORCH_COMPILED = '''
import json
import keras, numpy as np
import keras_vit

rng = np.random.default_rng(0)
x, y = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32"), np.arange(16) % 5
losses = {}
for jit in (False, True):  # Keras' eager step, then torch.compile (model.compile(jit_compile=True))
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT(image_size=32, patch_size=8, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1, num_classes=5)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit)
    losses[str(jit)] = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0).history["loss"]
    losses[f"eval_{jit}"] = model.evaluate(x, y, verbose=0)
# LoRA on the MLP merges into a kernel that requires grad on PyTorch: checkpoints and resizing take its values
keras_vit.enable_lora(model, rank=2, targets=("mlp",))
for v in model.weights:
    if "lora" in v.path:
        v.assign(rng.normal(0, 0.2, v.shape).astype("float32"))
keras_vit.save_npz(model, "lora.npz")
again = keras_vit.ViT(weights="lora.npz")
resized = keras_vit.resize_model(model, 48)
print(json.dumps({"losses": losses, "npz": float(np.abs(keras.ops.convert_to_numpy(again(x)) - keras.ops.convert_to_numpy(model(x))).max()),
                  "resized": list(keras.ops.convert_to_numpy(resized(np.zeros((1, 48, 48, 3), "float32"))).shape)}))
'''


@pytest.mark.slow
@pytest.mark.torch
def test_torch_compile_trains_as_the_eager_step_and_lora_mlp_checkpoints(tmp_path):
    """`compile(jit_compile=True)` on PyTorch is torch.compile: the step traces (no TensorFlow context managers
    in it) and trains as Keras' eager step does; a LoRA-on-MLP model saves and resizes there."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, "-c", _TORCH_COMPILED], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    eager, compiled = out["losses"]["False"], out["losses"]["True"]
    assert compiled == pytest.approx(eager, rel=1e-4) and compiled[-1] < compiled[0]
    assert out["losses"]["eval_True"] == pytest.approx(out["losses"]["eval_False"], rel=1e-4)
    assert out["npz"] <= 1e-5 and out["resized"] == [1, 5]


_JAX_FLOAT16 = """
import keras
keras.mixed_precision.set_global_policy("mixed_float16")
import keras_vit
model = keras_vit.ViT(variant=None, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1, patch_size=4, image_size=16,
                      num_classes=3)
try:
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
except ValueError as exc:
    print("refused:", exc)
"""


def test_a_notebook_compile_refuses_float16_on_jax_on_a_cpu(tmp_path):
    """mixed_float16 on JAX without a GPU: `compile` says so in one line, as vitcli does (it compiled, and
    the first step failed inside XLA: "precision 'F16_F16_F32' is not supported by dot_general on CPU")."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax")
    proc = subprocess.run([sys.executable, "-c", _JAX_FLOAT16], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3",
                                             "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        "refused: mixed_float16 on JAX needs a GPU (XLA's CPU matmuls take no float16); on this CPU use "
        "mixed_bfloat16 or none")


_JAX_SCHEDULE = """
import numpy as np, keras, keras_vit
from keras_vit.train.schedules import evaluate_once_per_update, warmup_cosine

def fit(wrapped, jit, accumulation):
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT(variant=None, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1, patch_size=4,
                          image_size=16, num_classes=3)
    schedule = (warmup_cosine(1e-2, 12, 3, steps_per_update=accumulation or 1) if wrapped else
                keras.optimizers.schedules.CosineDecay(0.0, 9, alpha=0.0, warmup_target=1e-2, warmup_steps=3))
    opt = keras.optimizers.AdamW(schedule, weight_decay=0.1, gradient_accumulation_steps=accumulation)  # None: off
    model.compile(evaluate_once_per_update(opt) if wrapped else opt,
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    rng = np.random.default_rng(1)
    model.fit(rng.uniform(0, 255, (48, 16, 16, 3)).astype("float32"), rng.integers(0, 3, 48), batch_size=8,
              epochs=1, verbose=0, shuffle=False)
    return [np.asarray(w) for w in model.weights]

def gap(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))

# without accumulation against keras' own CosineDecay; with it (read at micro-step // 2) eager against jitted
print("eager", gap(fit(True, False, None), fit(False, False, None)))
print("accumulation", gap(fit(True, False, 2), fit(True, True, 2)))
"""


@pytest.mark.slow
def test_the_schedule_once_per_update_on_jax_eager_and_jitted(tmp_path):
    """On JAX the un-jitted step (`--jit none`) computes the schedule once per update, as a TensorFlow trace
    does (it took a cond per variable: 17 s a step for 2 blocks); eager, jitted and with gradient accumulation
    (its update under a cond, where a cached tracer would leak) the weights are keras' CosineDecay's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax")
    proc = subprocess.run([sys.executable, "-c", _JAX_SCHEDULE], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3",
                                             "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()[-2:]
    assert [line.split()[0] for line in lines] == ["eager", "accumulation"], lines
    for line in lines:
        assert float(line.split()[1]) < 1e-5, lines


@pytest.mark.parametrize("backend", [pytest.param("jax", marks=pytest.mark.jax),
                                     pytest.param("torch", marks=pytest.mark.torch)])
def test_vitcli_evaluate_on_other_backends_gives_tensorflows_figures(tmp_path, backend):
    """vitcli evaluate under KERAS_BACKEND=jax fed the TensorFlow batch to JAX's predict_on_batch: a TypeError
    traceback for every model (since evaluation reads the split in one pass). The same figures as TensorFlow."""
    import json
    import os
    import subprocess
    import sys

    import keras_vit

    pytest.importorskip(backend)
    model = keras_vit.ViT(variant=None, hidden_size=32, num_heads=2, mlp_dim=64, num_layers=1, patch_size=4,
                          image_size=32, channels=1, num_classes=10)
    model.save(tmp_path / "m.keras")
    figures = {}
    for name in ("tensorflow", backend):
        proc = subprocess.run([sys.executable, "-m", "keras_vit.cli.main", "evaluate", "--model", str(tmp_path / "m.keras"),
                               "--dataset", "digits", "--json"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                              env={**os.environ, "KERAS_BACKEND": name, "TF_CPP_MIN_LOG_LEVEL": "3",
                                   "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures[backend]["top1"] == figures["tensorflow"]["top1"]
    assert figures[backend]["loss"] == pytest.approx(figures["tensorflow"]["loss"], abs=1e-4)
