"""Precision and compilation of a training run, chosen for the hardware and the model's size.

Two fast paths on a CPU (BENCHMARKS.md has the measurements and the profile behind them):
- fp32 with the whole train step XLA-compiled ("xla"): XLA fuses the element-wise work, and its
  fp32 matmuls are as fast as oneDNN's; but XLA:CPU runs bf16 matmuls no faster than fp32;
- bf16 (`mixed_bfloat16`) with "fusible" compilation on TensorFlow: oneDNN runs the matmuls in
  bf16 (1.7x the fp32 rate with AVX512-BF16, 3.5x with AMX), while XLA auto-clustering,
  limited to fusible element-wise ops, fuses everything between them; on AMX and AMD's Zen 4 and Zen 5 "scoped"
  instead (XLA only around the blocks' LayerNorms and activations, layers.fusion), measured faster there.
`auto` picks bf16 (+ scoped on AMX and the AMD Zen 4 / Zen 5, fusible on other CPUs) where the CPU multiplies bf16
natively and the step is large enough for the GEMMs' saving to pay for the bf16 path's fixed cost (a break-even computed from the CPU's
fp32 and bf16 GEMM rates); small models (the digits default) stay in fp32 + XLA. On a GPU it
picks bf16 (compute capability >= 8.0) or fp16 with loss scaling (7.x), with XLA.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

MIXED_PRECISION = ("auto", "none", "mixed_bfloat16", "mixed_float16")
JIT_MODES = ("auto", "xla", "fusible", "scoped", "none")
# TensorFlow's XLA auto-clustering restricted to element-wise/fusible ops (MatMul stays oneDNN's).
FUSIBLE_FLAGS = ("--tf_xla_auto_jit=2", "--tf_xla_cpu_global_jit", "--tf_xla_ops_to_cluster=FUSIBLE")
# GEMM rates (GFLOP/s, 2 cores) of fp32 and of bf16 per CPU bf16 feature, TensorFlow's 2048^3 matmul
# peaks of bench/train.py (BENCHMARKS.md): AVX512-BF16 on AMD EPYC (440 / 740, a Zen 5) and AMX-BF16
# on the Intel Xeon (331 / 1148, `bench/amx.sh` 2026-12-05).
CPU_GEMM_GFLOPS = {"amx_bf16": (331.0, 1148.0), "avx512_bf16": (440.0, 740.0)}
# Extra time per step of the bf16 path (casts, its less fused graph) that its faster GEMMs must pay
# for: 30 ms puts the AVX512-BF16 break-even at ~11 GFLOP/step, between the measured 9 (even) and
# 15 (faster) of BENCHMARKS.md; on AMX the same cost is paid back from ~4.7 GFLOP/step.
BF16_STEP_OVERHEAD_S = 0.030


# The AMD EPYC kinds with AVX512-BF16 whose fastest bf16 training step is the scoped one with the CPU forms and,
# on two cores, two towers (BENCHMARKS.md: the Zen 5 2026-12-06, the Zen 4 2026-12-07).
AMD_KINDS = ("zen4", "zen5")


class Hardware(NamedTuple):
    """What `auto` looks at: the device kind, the CPU's bf16 feature, a GPU's compute capability."""

    device: str = "cpu"  # "cpu" | "gpu" | "tpu"
    cpu_bf16: Optional[str] = None  # "amx_bf16" | "avx512_bf16" | None
    compute_capability: Optional[Tuple[int, int]] = None  # GPUs only; None when unknown
    cpu_kind: Optional[str] = None  # "zen4" | "zen5" (`cpu_kind`); None: any other CPU

    @property
    def scoped_cpu(self) -> bool:
        """A CPU on which TensorFlow's fastest training step was measured to be the scoped one with its CPU forms
        (layers.fusion.cpu_scoped, train.updates): AMX-BF16 (the Intel Xeon), AMD's Zen 5 (BENCHMARKS.md, 2026-12-06)
        and AMD's Zen 4 (2026-12-07). The towers (train.towers): AMX's, and the two AMD kinds' in bf16."""
        return self.device == "cpu" and (self.cpu_bf16 == "amx_bf16" or self.cpu_kind in AMD_KINDS)

    def describe(self) -> str:
        if self.device == "gpu":
            cc = self.compute_capability
            return "GPU" + (f" (compute capability {cc[0]}.{cc[1]})" if cc else " (compute capability unknown)")
        if self.device == "tpu":
            return "TPU"
        feature = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}.get(self.cpu_bf16 or "")
        model = {"zen4": " (AMD Zen 4)", "zen5": " (AMD Zen 5)"}.get(self.cpu_kind or "", "")
        return f"CPU with {feature}{model}" if feature else "CPU without native bf16"


class Choice(NamedTuple):
    """The resolved (policy or "none", jit mode) of a run and the one-line reason for it."""

    mixed_precision: str
    jit_compile: str
    reason: str = ""


def cpu_bf16_feature(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU's fastest native bf16 feature: "amx_bf16", "avx512_bf16" or None (Linux only)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return next((name for name in CPU_GEMM_GFLOPS if name in flags), None)
    except OSError:
        pass
    return None


def cpu_kind(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """"zen5" on AMD's Zen 5 (vendor AuthenticAMD, CPU family 26), "zen4" on its Zen 4 (family 25: the Zen 3 of that
    family has no AVX512-BF16), both with AVX512-BF16, else None (Linux only): the CPU models `auto` tells apart from
    the rest of their bf16 feature's kind (`Hardware.scoped_cpu`)."""
    fields: dict = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:  # the first processor's block is read
                        break
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    if fields.get("vendor_id") != "AuthenticAMD" or "avx512_bf16" not in fields.get("flags", "").split():
        return None
    return {"25": "zen4", "26": "zen5"}.get(fields.get("cpu family", ""))


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16); Linux only."""
    return cpu_bf16_feature(cpuinfo) is not None


def _nvidia_smi_capability() -> Optional[Tuple[int, int]]:
    """The first visible GPU's compute capability from nvidia-smi, without starting a framework."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return _parse_capability(out.split("\n", 1)[0])


def _parse_capability(text) -> Optional[Tuple[int, int]]:
    """(major, minor) from "8.0", (8, 0) or similar; None when it cannot be read."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        return int(text[0]), int(text[1])
    try:
        major, minor = str(text).strip().split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def _gpu_capability(backend: str) -> Optional[Tuple[int, int]]:
    """Compute capability of the backend's first GPU (None when unknown)."""
    try:
        if backend == "jax":
            import jax

            return _parse_capability(getattr(jax.devices()[0], "compute_capability", ""))
        if backend == "torch":
            import torch

            return tuple(torch.cuda.get_device_capability())
    except Exception:  # a device query that fails means "unknown", not a failed run
        return None
    return _nvidia_smi_capability()


def has_accelerator(backend: str) -> bool:
    """Whether the backend may run on a GPU/TPU.

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


def detect_hardware(backend: str) -> Hardware:
    """The Hardware this process trains on, for `resolve`."""
    if not has_accelerator(backend):
        feature = cpu_bf16_feature()
        return Hardware("cpu", feature, cpu_kind=cpu_kind() if feature == "avx512_bf16" else None)
    tpu = bool(os.environ.get("TPU_NAME"))
    if backend == "jax":
        import jax

        tpu = jax.default_backend() == "tpu"
    if tpu:
        return Hardware("tpu")
    return Hardware("gpu", compute_capability=_gpu_capability(backend))


def bf16_break_even_gflop(cpu_bf16: Optional[str], rates: Optional[Tuple[float, float]] = None) -> float:
    """Forward GFLOP per step from which bf16 GEMMs save more than the bf16 path's fixed cost, from
    the CPU kind's (fp32, bf16) GEMM rates in CPU_GEMM_GFLOPS, or from `rates` (GFLOP/s) measured."""
    if rates is None and cpu_bf16 not in CPU_GEMM_GFLOPS:
        return float("inf")
    fp32, bf16 = rates or CPU_GEMM_GFLOPS[cpu_bf16]
    if bf16 <= fp32:
        return float("inf")
    # The training step runs ~3x the forward FLOPs (forward + two backward GEMMs).
    return BF16_STEP_OVERHEAD_S / (3.0 * (1.0 / fp32 - 1.0 / bf16))


def _auto_precision(gflop_per_step: float, backend: str, hw: Hardware) -> Tuple[str, str]:
    """(policy or "none", why) for mixed_precision="auto"."""
    where = hw.describe()
    if hw.device == "tpu":
        return "mixed_bfloat16", f"{where}: bf16 is its native matmul type"
    if hw.device == "gpu":
        cc = hw.compute_capability
        if cc is None or cc >= (8, 0):
            return "mixed_bfloat16", f"{where}: bf16 tensor cores (fp32 is a 5-10x loss)"
        if cc >= (7, 0):
            return "mixed_float16", f"{where}: fp16 tensor cores, no bf16 (loss scaling on)"
        return "none", f"{where}: no tensor cores, float32"
    if hw.cpu_bf16 is None:
        return "none", f"{where}: float32"
    if backend == "jax":  # measured on AMX too: a bf16 Ti/16 step at 0.46x fp32's (BENCHMARKS.md, 2026-12-04)
        return "none", f"{where}, jax backend: XLA:CPU's bf16 training steps are slower than fp32, float32"
    # TensorFlow's oneDNN and torch's own bf16 GEMMs: Keras on torch in bf16 was 1.5x its fp32 at Ti/16
    # (BENCHMARKS.md, "Keras' PyTorch backend as a way in"); TensorFlow's GEMM rates set the break-even
    need = bf16_break_even_gflop(hw.cpu_bf16)
    on = "" if backend == "tensorflow" else f", {backend} backend"
    if gflop_per_step >= need:
        return "mixed_bfloat16", (f"{where}{on}: bf16 GEMMs pay from {need:.1f} GFLOP/step, "
                                  f"this step is {gflop_per_step:.1f}")
    return "none", f"{where}{on}: this step ({gflop_per_step:.1f} GFLOP) is below bf16's break-even {need:.1f}, float32"


def resolve(mixed_precision: str, jit_compile, gflop_per_step: float, backend: str,
            hardware: Hardware) -> Choice:
    """The precision policy and jit mode ("xla" | "fusible" | "scoped" | "none") of a run, with the reason.

    `jit_compile` may be a mode name or a bool (True = "xla", False = "none", as in Keras).
    Raises ValueError with one line for a mode this backend cannot run.
    """
    if isinstance(jit_compile, bool):
        jit_compile = "xla" if jit_compile else "none"
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}; got {mixed_precision!r}")
    if jit_compile not in JIT_MODES:
        raise ValueError(f"jit_compile must be one of {', '.join(JIT_MODES)} (or a bool); got {jit_compile!r}")
    reasons = []
    if mixed_precision == "auto":
        mixed_precision, why = _auto_precision(gflop_per_step, backend, hardware)
        reasons.append(why)
    if jit_compile == "auto":
        on_tf_cpu = backend == "tensorflow" and hardware.device == "cpu"
        if on_tf_cpu and mixed_precision == "none" and hardware.cpu_bf16 == "amx_bf16":
            # graph mode 1.03x (Ti/16) and 1.13x (B/16) whole-step XLA in float32 on the AMX Xeon (BENCHMARKS.md, 2026-12-05);
            # not on the Zen 5, whose digits demo (float32) keeps the XLA step it reached 99.44% with (2026-12-06)
            jit_compile = "scoped"
            reasons.append("float32 matmuls in graph mode (faster than XLA's on AMX), XLA around the blocks' element-wise work")
        elif on_tf_cpu and mixed_precision == "mixed_bfloat16":
            if hardware.scoped_cpu:
                # scoped 1.05-1.18x fusible at Ti/16 and B/16 in every round on the AMX Xeon (BENCHMARKS.md, 2026-12-05),
                # with its CPU forms (no towers) 1.21x at Ti/16 on the Zen 5, and its bf16 towers (train.towers) 1.18x
                # (Ti/16) and 1.07x (B/16) more there (2026-12-06); forms and towers 1.11-1.41x (Ti/16) and 1.14-1.15x
                # (B/16) fusible on the Zen 4 (2026-12-07)
                jit_compile = "scoped"
                amx = hardware.cpu_bf16 == "amx_bf16"
                reasons.append(f"oneDNN's {'AMX ' if amx else ''}bf16 matmuls, XLA around the blocks' element-wise work")
            else:
                jit_compile = "fusible"
                reasons.append("oneDNN bf16 matmuls with XLA-fused element-wise ops")
        elif backend == "torch":  # as the notebook path: torch.compile (jit xla) only on request; it gained
            # nothing on a Ti/16 bf16 step on the AMD Zen 4 (25.58 against 25.57 img/s eager, BENCHMARKS.md 2026-12-04)
            jit_compile = "none"
            reasons.append("eager PyTorch (torch.compile with --jit xla; its first step compiles for a minute)")
        else:
            jit_compile = "xla"
            reasons.append("whole step XLA-compiled")
    if jit_compile in ("fusible", "scoped") and backend != "tensorflow":
        raise ValueError(f"jit_compile {jit_compile!r} needs the TensorFlow backend (this is {backend}); use xla or none")
    check_policy(mixed_precision, backend, hardware)
    return Choice(mixed_precision, jit_compile, "; ".join(reasons) or "as requested")


def check_policy(policy: str, backend: str, hardware: Hardware) -> None:
    """ValueError for a precision policy this backend cannot train with on this hardware (vitcli's
    --mixed-precision and a notebook's compile alike), before a step fails inside XLA."""
    if policy == "mixed_float16" and backend == "jax" and hardware.device == "cpu":
        # XLA:CPU: "The precision 'F16_F16_F32' is not supported by dot_general on CPU", at the first step
        raise ValueError("mixed_float16 on JAX needs a GPU (XLA's CPU matmuls take no float16); on this CPU use "
                         "mixed_bfloat16 or none")


def mirrored_on_cpus() -> bool:
    """True inside a tf.distribute strategy over several CPU devices, where XLA cannot place the
    replicas' variables (https://www.tensorflow.org/xla/known_issues)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync < 2:
        return False
    return all("CPU" in d.upper() for d in strategy.extended.worker_devices)


def model_jit_compile(policy: str, backend: str, hardware: Hardware) -> bool:
    """`jit_compile` for `model.compile(jit_compile="auto")` of a ViT (the notebook path).

    XLA wherever it is the fast path, CPUs included (Keras' own "auto" turns it off on TensorFlow
    CPUs). On a TensorFlow CPU in bf16/fp16, graph mode: there oneDNN runs the low-precision GEMMs,
    which XLA:CPU runs no faster than fp32; on an AMX CPU in float32 too, where oneDNN's float32 GEMMs
    outrun XLA's (layers.fusion.float32_scoped). torch keeps Keras' choice (no torch.compile).
    """
    if backend == "torch":
        return False
    if backend == "tensorflow" and hardware.device == "cpu" and (policy != "float32" or hardware.cpu_bf16 == "amx_bf16"):
        return False
    return not mirrored_on_cpus()


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
    """The `jit_compile` argument of `model.compile` for a jit mode (fusible, scoped: False, clusters do the rest)."""
    return mode == "xla"
