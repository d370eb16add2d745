"""keras_vit.precision: which precision and compilation `auto` picks, and the fusible XLA flags."""
from __future__ import annotations

import pytest

from keras_vit import precision as P


def test_cpu_bf16_flag_detection(tmp_path):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    without = tmp_path / "b"
    without.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    amx = tmp_path / "c"
    amx.write_text("flags\t: fpu amx_bf16 amx_tile\n")
    assert P.cpu_has_native_bf16(str(with_bf16)) and P.cpu_has_native_bf16(str(amx))
    assert not P.cpu_has_native_bf16(str(without))
    assert not P.cpu_has_native_bf16(str(tmp_path / "missing"))


@pytest.mark.parametrize("args, expected", [
    # (mixed, jit, GFLOP/step, backend, accelerator, native bf16) -> (mixed, jit)
    (("auto", "auto", 40.0, "tensorflow", False, True), ("mixed_bfloat16", "fusible")),
    (("auto", "auto", 0.6, "tensorflow", False, True), ("none", "xla")),  # small step: fp32 wins
    (("auto", "auto", 40.0, "tensorflow", False, False), ("none", "xla")),  # no native bf16
    (("auto", "auto", 40.0, "tensorflow", True, True), ("none", "xla")),  # GPU: the user's choice
    (("auto", "auto", 40.0, "jax", False, True), ("none", "xla")),  # XLA:CPU bf16 dots are not faster
    (("mixed_bfloat16", "auto", 0.1, "tensorflow", False, False), ("mixed_bfloat16", "fusible")),
    (("mixed_bfloat16", "auto", 40.0, "jax", False, True), ("mixed_bfloat16", "xla")),
    (("none", True, 40.0, "tensorflow", False, True), ("none", "xla")),
    (("auto", False, 40.0, "tensorflow", False, True), ("mixed_bfloat16", "none")),
    (("mixed_float16", "none", 1.0, "tensorflow", False, True), ("mixed_float16", "none")),
])
def test_resolve(args, expected):
    mixed, jit, gflop, backend, accelerator, bf16 = args
    assert P.resolve(mixed, jit, gflop, backend, accelerator, native_bf16=bf16) == expected


@pytest.mark.parametrize("mixed, jit, backend, message", [
    ("fp8", "auto", "tensorflow", "mixed_precision must be one of auto, none, mixed_bfloat16, mixed_float16; got 'fp8'"),
    ("none", "fast", "tensorflow", "jit_compile must be one of auto, xla, fusible, none (or a bool); got 'fast'"),
    ("none", "fusible", "jax", "jit_compile 'fusible' needs the TensorFlow backend (this is jax)"),
])
def test_resolve_rejects(mixed, jit, backend, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        P.resolve(mixed, jit, 1.0, backend, False, native_bf16=True)


def test_fusible_flags_merge_with_the_users(monkeypatch):
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_auto_jit=1 --tf_xla_min_cluster_size=4")
    P.request_fusible_clustering()
    P.request_fusible_clustering()  # idempotent
    flags = P.os.environ["TF_XLA_FLAGS"].split()
    assert flags == ["--tf_xla_auto_jit=1", "--tf_xla_min_cluster_size=4",  # the user's own values kept
                     "--tf_xla_cpu_global_jit", "--tf_xla_ops_to_cluster=FUSIBLE"]
    monkeypatch.delenv("TF_XLA_FLAGS")
    P.request_fusible_clustering()
    assert P.os.environ["TF_XLA_FLAGS"].split() == list(P.FUSIBLE_FLAGS)


def test_accelerator_detection_respects_hidden_gpus(monkeypatch):
    import glob

    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setattr(P.os.path, "exists", lambda path: False)  # no ROCm device
    monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/nvidia0"])  # an NVIDIA GPU is there
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert P.has_accelerator("tensorflow") is True
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert P.has_accelerator("tensorflow") is False
    assert P.keras_jit_compile("xla") is True
    assert P.keras_jit_compile("fusible") is False and P.keras_jit_compile("none") is False
