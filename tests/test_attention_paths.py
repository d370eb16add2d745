"""Which attention path runs: JAX's fused dot_product_attention under every precision policy,
agreeing with the explicit (float32-softmax) path (JAX in its own process)."""
import json
import os
import subprocess
import sys

import pytest

WORKER = r'''
import json, sys
import keras
import numpy as np
from keras import ops
import keras_vit
from keras_vit import layers as L
from keras_vit.layers import attention

calls = []
fused = ops.dot_product_attention
def spy(*args, **kwargs):
    calls.append(keras.backend.standardize_dtype(args[0].dtype))
    return fused(*args, **kwargs)
attention.ops.dot_product_attention = spy

out = {}
rs = np.random.default_rng(0)
for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
    keras.mixed_precision.set_global_policy(policy)
    for pos in ("learned", "relative"):
        keras.utils.set_random_seed(0)
        layer = L.MultiHeadSelfAttention(num_heads=4, relative_grid=(4, 4) if pos == "relative" else None,
                                         name="attn")
        x = ops.convert_to_tensor(rs.normal(size=(2, 17, 64)).astype("float32"), dtype=layer.compute_dtype)
        del calls[:]
        y_fused = layer(x)
        n_fused = len(calls)
        y_explicit, probs = layer(x, return_attention_scores=True)
        out[f"{policy}-{pos}"] = {
            "fused_calls": n_fused, "explicit_calls": len(calls) - n_fused, "dtype": calls[0] if calls else None,
            "max_diff": float(np.abs(np.asarray(ops.convert_to_numpy(ops.cast(y_fused, "float32")))
                                     - np.asarray(ops.convert_to_numpy(ops.cast(y_explicit, "float32")))).max()),
            "scale": float(np.abs(np.asarray(ops.convert_to_numpy(ops.cast(y_explicit, "float32")))).max()),
            "probs_dtype": keras.backend.standardize_dtype(probs.dtype)}
# The whole model under bf16 takes the fused path in every block.
keras.mixed_precision.set_global_policy("mixed_bfloat16")
model = keras_vit.ViT(variant="Ti/8", image_size=32, num_classes=3, num_layers=2)
del calls[:]
model.predict(rs.uniform(0, 255, (2, 32, 32, 3)).astype("float32"), verbose=0)
out["model_bf16_calls"] = len(calls)
json.dump(out, open(sys.argv[1], "w"))
'''


@pytest.mark.jax
def test_jax_uses_fused_attention_under_mixed_precision(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out.json")], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    tolerance = {"float32": 1e-5, "mixed_bfloat16": 3e-2, "mixed_float16": 4e-3}
    for policy, tol in tolerance.items():
        for pos in ("learned", "relative"):
            case = out[f"{policy}-{pos}"]
            assert case["fused_calls"] == 1 and case["explicit_calls"] == 0, case
            assert case["dtype"] == policy.replace("mixed_", ""), case
            assert case["probs_dtype"] == "float32", case  # the explicit softmax stays float32
            assert case["max_diff"] <= tol * max(1.0, case["scale"]), (policy, pos, case)
    assert out["model_bf16_calls"] >= 2  # one per block (predict may trace more than once)
