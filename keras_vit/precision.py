"""Precision and compilation of a training run, chosen for the hardware and the model's size.

Two fast paths on a CPU (BENCHMARKS.md has the measurements and the profile behind them):
- fp32 with the whole train step XLA-compiled ("xla"): XLA fuses the element-wise work, and its
  fp32 matmuls are as fast as oneDNN's; but XLA:CPU runs bf16 matmuls no faster than fp32;
- bf16 (`mixed_bfloat16`) with "fusible" compilation on TensorFlow: oneDNN runs the matmuls in
  bf16 (about twice the fp32 rate on CPUs with AVX512-BF16 or AMX), while XLA auto-clustering,
  limited to fusible element-wise ops, fuses everything between them.
`auto` picks bf16 + fusible where the CPU multiplies bf16 natively and the step is large enough
for its matmuls to dominate; small models (the digits default) stay in fp32 + XLA.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

MIXED_PRECISION = ("auto", "none", "mixed_bfloat16", "mixed_float16")
JIT_MODES = ("auto", "xla", "fusible", "none")
# Forward GFLOP per training step (batch x ViTConfig.flops()) from which `auto` picks bf16 on a
# CPU with native bf16. Measured with bench/train.py, batch 16 (BENCHMARKS.md): Ti/16 at 64 px
# (3 GFLOP) is 13% slower in bf16, at 112 px (9 GFLOP) even, at 224 px (40 GFLOP) 15-25% faster;
# the digits default (0.6 GFLOP) trains 1.4x slower in bf16.
AUTO_BF16_MIN_GFLOP_PER_STEP = 15.0
# TensorFlow's XLA auto-clustering restricted to element-wise/fusible ops (MatMul stays oneDNN's).
FUSIBLE_FLAGS = ("--tf_xla_auto_jit=2", "--tf_xla_cpu_global_jit", "--tf_xla_ops_to_cluster=FUSIBLE")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16); Linux only."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _CPU_BF16_FLAGS)
    except OSError:
        pass
    return False


def has_accelerator(backend: str) -> bool:
    """Whether the backend may run on a GPU/TPU (then `auto` keeps fp32 + XLA: bf16 is yours to ask).

    For TensorFlow this looks for GPU device files instead of asking TensorFlow, because
    initialising its devices would fix its XLA flags before `request_fusible_clustering` can set them.
    """
    import glob

    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")
    nvidia = bool(glob.glob("/dev/nvidia[0-9]*")) and not hidden
    return nvidia or os.path.exists("/dev/kfd") or bool(os.environ.get("TPU_NAME"))


def resolve(mixed_precision: str, jit_compile, gflop_per_step: float, backend: str,
            accelerator: bool, native_bf16: Optional[bool] = None) -> Tuple[str, str]:
    """(mixed precision policy or "none", jit mode "xla" | "fusible" | "none") for a run.

    `jit_compile` may be a mode name or a bool (True = "xla", False = "none", as in Keras).
    Raises ValueError with one line for a mode this backend cannot run.
    """
    if isinstance(jit_compile, bool):
        jit_compile = "xla" if jit_compile else "none"
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {mixed_precision!r}")
    if jit_compile not in JIT_MODES:
        raise ValueError(f"jit_compile must be one of {', '.join(JIT_MODES)} (or a bool); got {jit_compile!r}")
    on_tf_cpu = backend == "tensorflow" and not accelerator
    if mixed_precision == "auto":
        if native_bf16 is None:
            native_bf16 = cpu_has_native_bf16()
        fast_bf16 = on_tf_cpu and native_bf16 and gflop_per_step >= AUTO_BF16_MIN_GFLOP_PER_STEP
        mixed_precision = "mixed_bfloat16" if fast_bf16 else "none"
    if jit_compile == "auto":
        jit_compile = "fusible" if on_tf_cpu and mixed_precision == "mixed_bfloat16" else "xla"
    if jit_compile == "fusible" and backend != "tensorflow":
        raise ValueError(f"jit_compile 'fusible' needs the TensorFlow backend (this is {backend}); use xla or none")
    return mixed_precision, jit_compile


def request_fusible_clustering() -> None:
    """Turn on TensorFlow's XLA auto-clustering of fusible (element-wise) ops for this process.

    TensorFlow reads TF_XLA_FLAGS once, when it first optimises a graph: call this before the
    first tf.function runs (`vitcli train` does). Later it has no effect, and training runs
    in plain graph mode, with the same results and somewhat slower. It stays on for the process.
    """
    current = os.environ.get("TF_XLA_FLAGS", "").split()
    names = {flag.split("=", 1)[0] for flag in current}
    extra = [flag for flag in FUSIBLE_FLAGS if flag.split("=", 1)[0] not in names]
    if extra:
        os.environ["TF_XLA_FLAGS"] = " ".join(current + extra)


def keras_jit_compile(mode: str) -> bool:
    """The `jit_compile` argument of `model.compile` for a jit mode (fusible: False, clusters do the rest)."""
    return mode == "xla"
