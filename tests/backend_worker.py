"""Run in a subprocess with KERAS_BACKEND set: rebuild models from configs, load weights,
write logits. Used by test_backends.py, test_matrix.py, test_inspect.py, test_family_timm.py and
test_hf_family.py (one Keras backend per process)."""
import contextlib
import json
import os
import subprocess
import sys

import keras
import numpy as np

from keras_vit.config import ViTConfig
from keras_vit.model import build_model


@contextlib.contextmanager
def weights_loaded_after():
    """Skip the initializers' random draws while building a model whose every weight is loaded next: on JAX
    each new kernel shape's draw is an XLA compilation (about 1 s a model, half of test_matrix's JAX cell)."""
    from keras.src.backend import random

    saved = {name: getattr(random, name) for name in ("normal", "truncated_normal", "uniform")}

    def zeros(shape, *args, dtype=None, **kwargs):
        return keras.ops.zeros(shape, dtype=dtype or "float32")

    for name in saved:
        setattr(random, name, zeros)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(random, name, fn)


def main(job_path: str) -> None:
    job = json.load(open(job_path))
    out = {"backend": keras.backend.backend()}
    for case in job["cases"]:
        with weights_loaded_after():
            model = build_model(ViTConfig.from_dict(case["config"]))
        model.load_weights(case["weights"])
        x = np.load(case["inputs"])
        out[case["name"]] = model.predict(x, verbose=0).tolist()
        if case.get("attention"):  # what keras_vit.inspect reads from the model's own outputs
            from keras_vit import inspect as kin

            out[case["name"] + ":attention"] = [a.tolist() for a in kin.attention_maps(model, x)]
        if case.get("pretrainer"):  # the masked-patch-prediction model around it, on fixed corruption codes
            from keras_vit import pretrain as mpp

            pre = mpp.build_pretrainer(model, "color")
            pre.load_weights(case["pretrainer"])
            inputs = dict(np.load(case["pretrainer_inputs"]))
            out[case["name"] + ":pretrainer"] = keras.ops.convert_to_numpy(pre(inputs)).tolist()
    if job.get("fit"):
        keras.utils.set_random_seed(0)
        model = build_model(ViTConfig.from_dict(job["cases"][0]["config"]))
        x = np.load(job["cases"][0]["inputs"])
        y = np.arange(len(x)) % model.output_shape[-1]
        model.compile(optimizer=keras.optimizers.Adam(3e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        hist = model.fit(x, y, epochs=10, batch_size=len(x), verbose=0).history["loss"]
        out["fit_losses"] = hist
    json.dump(out, open(job["output"], "w"))


def run_job(job: dict, folder, backend: str, timeout: int = 900) -> dict:
    """Run `job` (its "output" a path in `folder`) in a worker process under KERAS_BACKEND=backend on
    the CPU; its output, checked to come from that backend."""
    path = os.path.join(str(folder), "job.json")
    with open(path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tests.backend_worker", path],
                          env=env, cwd=root, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(job["output"]) as f:
        out = json.load(f)
    assert out["backend"] == backend
    return out



def outputs_on(backend: str, models: dict, x, folder, timeout: int = 600) -> dict:
    """{name: outputs on `x`} of keras-vit `models` ({name: model}) rebuilt from their configs and
    weights in one worker process under `backend`."""
    import numpy as np

    np.save(os.path.join(str(folder), "x.npy"), x)
    job = {"cases": [], "output": os.path.join(str(folder), "out.json")}
    for name, model in models.items():
        weights = os.path.join(str(folder), f"{name}.weights.h5")
        model.save_weights(weights)
        job["cases"].append({"name": name, "config": model.vit_config.to_dict(), "weights": weights,
                             "inputs": os.path.join(str(folder), "x.npy")})
    return run_job(job, folder, backend, timeout=timeout)

if __name__ == "__main__":
    main(sys.argv[1])
