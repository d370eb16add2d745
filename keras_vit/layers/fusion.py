"""XLA clusters around the encoder block's element-wise work in TensorFlow graph-mode training under
bf16/fp16: what the notebook path (`compile(optimizer, loss)`, then `fit`, in `mixed_bfloat16`) and
`vitcli train --jit scoped` run on a CPU, where the matmuls stay oneDNN's and nothing else clusters the
LayerNorms and the MLP's activation (GELU, quick_gelu, SwiGLU). GradientTape does not carry a scope over to
gradient ops, so each writes its gradient out in a scope of its own (layers.norm, layers.block). The attention
softmax stays oneDNN's float32 one: in a scope it measured 0.972-0.980x at Ti/16 on the Zen 4 (BENCHMARKS.md,
2026-12-05). On an AMX CPU and an AMD Zen 4 or Zen 5 the step also takes `cpu_scoped`'s forms: each GEMM's bias after a reshape with a GEMM
for its gradient, oneDNN's softmax in bf16 with its gradient in a scope, the MLP's first bias in its activation's,
and the scopes' row sums as matrix-vector products (`row_sum`); and float32 training there runs this scoped step
too, in graph mode, not XLA-compiled whole (`float32_scoped`)."""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import keras
from keras import ops

# "0" turns the scopes off: `vitcli train --jit none` sets it for its run (no XLA at all, as asked);
# a notebook that wants plain graph mode sets it before its first step is traced.
SCOPES_ENV = "KERAS_VIT_XLA_SCOPES"


def scoped(training, compute_dtype) -> bool:
    """Whether `fused_elementwise` gives an XLA scope here (see there)."""
    if not training or keras.backend.backend() != "tensorflow" or os.environ.get(SCOPES_ENV) == "0":
        return False
    if keras.backend.standardize_dtype(compute_dtype) == "float32" and not float32_scoped():
        return False
    import tensorflow as tf

    if tf.executing_eagerly() or "--tf_xla_auto_jit" in os.environ.get("TF_XLA_FLAGS", ""):
        return False
    from keras_vit.precision import mirrored_on_cpus

    return not mirrored_on_cpus()


_STEP = threading.local()


@contextlib.contextmanager
def whole_step_xla(on: bool):
    """Marks the training step traced inside as XLA-compiled whole (`model.compile(jit_compile=True)`,
    keras_vit.model.ViT.train_step): there float32 keeps TensorFlow's own forms (`float32_scoped`)."""
    before = getattr(_STEP, "xla", False)
    _STEP.xla = bool(on)
    try:
        yield
    finally:
        _STEP.xla = before


def float32_scoped() -> bool:
    """Whether float32 training takes the scoped step (its XLA scopes and written-out gradients, `tf_training_forms`):
    on a scoped CPU (AMX, AMD Zen 4 and Zen 5), in a step not XLA-compiled whole (on the AMD kinds float32 is XLA's unless asked
    for `--jit scoped`). On AMX oneDNN's float32 GEMMs in graph mode outrun XLA's own (QKV 268 against 230 GFLOP/s at
    B/16): a float32 step in graph mode with the scopes ran 1.03x (Ti/16) and 1.13x (B/16) the whole-step XLA one,
    level (0.996x) at the digits demo's size (BENCHMARKS.md, 2026-12-05). Elsewhere
    float32 trains with the whole step in XLA (`keras_vit.precision.model_jit_compile`)."""
    return _on_scoped_cpu() and not getattr(_STEP, "xla", False)


def fused_elementwise(training, compute_dtype):
    """`tf.xla.experimental.jit_scope()` where it pays, else a no-op context.

    It pays in TensorFlow, in a traced (graph-mode, not XLA-compiled) training step in bf16/fp16,
    when TensorFlow's own fusible auto-clustering is off (`vitcli train`'s default on a CPU turns it on,
    and it clusters these ops itself), no multi-replica CPU strategy runs (XLA cannot place the replicas'
    variables) and `KERAS_VIT_XLA_SCOPES` is not "0". Inference, and so every export, never gets the
    scope. Ti/16 notebook bf16 on the AMD Zen 4: 31.25 / 27.30 img/s against 25.69 / 24.95 without; as
    `--jit scoped`, as fast as the fusible default with 17-23% less memory (BENCHMARKS.md, 2026-12-04).
    """
    if not scoped(training, compute_dtype):
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.xla.experimental.jit_scope()


def tf_training_forms(x, training) -> bool:
    """TensorFlow training in bf16/fp16 (`x` in the compute dtype), or in float32 in the scoped step
    (`float32_scoped`): where the training-only forms of the blocks' activations (layers.block), of the patch
    embedding (layers.embedding) and of the GEMMs' biases (`separate_bias`) are used."""
    if not (training and keras.backend.backend() == "tensorflow"):
        return False
    return keras.backend.standardize_dtype(x.dtype) != "float32" or scoped(training, x.dtype)


# "1" / "0" forces `separate_bias` on / off on any hardware (to measure it where `auto` leaves it off).
BIAS_APART_ENV = "KERAS_VIT_BIAS_APART"


@functools.cache
def _tensorflow_hardware():
    """`precision.detect_hardware("tensorflow")`, read once a process."""
    from keras_vit import precision

    return precision.detect_hardware("tensorflow")


def _on_scoped_cpu() -> bool:
    """TensorFlow on a CPU where the scoped step's CPU forms were measured to pay (`precision.Hardware.scoped_cpu`:
    AMX-BF16, AMD Zen 4 and Zen 5), no GPU."""
    return _tensorflow_hardware().scoped_cpu


def scoped_cpu_or_forced(env: str) -> bool:
    """A scoped-CPU form's switch: the environment variable `env` set to "1" / "0" forces it on / off on any CPU (to
    measure it where `_on_scoped_cpu` leaves it off), else on exactly on such a CPU (AMX, Zen 4, Zen 5)."""
    forced = os.environ.get(env)
    return forced == "1" if forced in ("0", "1") else _on_scoped_cpu()


def separate_bias(x, training) -> bool:
    """Whether the GEMMs on `x` add their bias after a reshape (`bias_after_reshape`, see there): in bf16/fp16
    training on TensorFlow on an AMX CPU or an AMD Zen 4 or Zen 5, and in the float32 scoped step (`float32_scoped`); the MLP's
    Dense layers then run on rank-3 inputs (tf.tensordot's reshapes). Elsewhere it is unmeasured: other CPUs, and GPUs
    (whose fused bias is cuBLAS's epilogue)."""
    if not tf_training_forms(x, training):
        return False
    return scoped_cpu_or_forced(BIAS_APART_ENV)


# "1" turns `exact_bias_gradients` on (off by default: the digits bf16 check read lower with it, see there).
BIAS_GRADIENT_ENV = "KERAS_VIT_BIAS_GRADIENT_GEMM"


def exact_bias_gradients(x, training) -> bool:
    """Whether the MLP's Dense layers, where `separate_bias` is off, add their bias with `add_bias` right after the
    GEMM: bf16/fp16 training on a TensorFlow CPU in graph mode with nothing XLA-compiling the gradient (no fusible
    auto-clustering, not a step XLA-compiled whole): the notebook's bf16 step and `--jit scoped` / `none` off AMX and
    the Zen 5. There TensorFlow's BiasAddGrad accumulates in bf16: a Ti/16 MLP bias's gradient 13-17% off float32's
    where every other weight's is 3-6% (BENCHMARKS.md, 2026-12-06). Grappler still fuses the GEMM and the add into
    oneDNN's inner product; the gradient is `bias_gradient`'s GEMM, level in time. Opt-in (`KERAS_VIT_BIAS_GRADIENT_GEMM=1`):
    the digits bf16 check (`--jit scoped`, the Zen 4's forms) read lower with it on 5 seeds of 6 (mean 92.6 against
    94.6%), as "more exact" forms of the residual adds had on AMX: bit-identity with TensorFlow's
    form is the bar this check sets, and this form is not."""
    if os.environ.get(BIAS_GRADIENT_ENV) != "1" or not tf_training_forms(x, training) \
            or keras.backend.standardize_dtype(x.dtype) == "float32" or separate_bias(x, training):
        return False
    import tensorflow as tf

    if tf.executing_eagerly() or getattr(_STEP, "xla", False) or "--tf_xla_auto_jit" in os.environ.get("TF_XLA_FLAGS", ""):
        return False
    return _tensorflow_hardware().device == "cpu"


def cpu_scoped(x, training) -> bool:
    """`separate_bias` in the scoped step (`scoped`): where the attention softmax runs in the compute dtype
    (`softmax_with_scoped_gradient`) and the MLP's first bias joins its activation's scope (layers.block;
    B/16 1.020x, Ti/16 level, on the AMX Xeon: bench.train_ab --without mlp-bias-in-activation)."""
    return separate_bias(x, training) and scoped(training, x.dtype)


# "1" / "0" forces `row_sum`'s matrix-vector product on / off on any hardware (to measure it where it is off).
ROW_DOTS_ENV = "KERAS_VIT_ROW_DOTS"


def row_sum(t):
    """`t` summed over its last axis, kept as size 1, for the float32 work in an XLA scope: on a scoped CPU (AMX, AMD Zen 4 and 5) as one
    matrix-vector product, (tokens, features) @ ones (features, 1), elsewhere `ops.sum`.

    Why: XLA:CPU (TensorFlow 2.21) sums a row as one serial chain of float32 adds, about 4 GB/s a core: one row
    mean at B/16's (3152, 768) took 1.19 ms on the AMX Xeon, its dot (a vectorised GEMV) 0.55; with the GEMVs the
    written-out LayerNorm's forward took 1.15 ms against 2.28 and its gradient 2.73 against 4.49, the softmax
    gradient at B/16 2.85 against 6.92 ms; the scoped step 1.095x at Ti/16, 1.094x at B/16 (bench.train_ab --without
    row-dots, BENCHMARKS.md, 2026-12-05). Elsewhere (other CPUs) it is unmeasured, so `ops.sum` stays there
    (`KERAS_VIT_ROW_DOTS=1` forces the dot for that measurement).
    """
    if not scoped_cpu_or_forced(ROW_DOTS_ENV):
        return ops.sum(t, axis=-1, keepdims=True)
    d = t.shape[-1]
    rows = ops.matmul(ops.reshape(t, (-1, d)), ops.ones((d, 1), t.dtype))
    return ops.reshape(rows, ops.shape(t)[:-1] + (1,)) if len(t.shape) != 2 else rows


def row_mean(t):
    """The mean over the last axis, kept as size 1: where `row_sum` is a GEMV, `row_sum(t)` over the features,
    elsewhere `ops.mean`, so that there the scopes' graph is op for op the one measured before the GEMVs (a Sum and
    a Mul by 1/d took the Means' place, the same bits in the runs checked; BENCHMARKS.md 2026-12-06)."""
    if not scoped_cpu_or_forced(ROW_DOTS_ENV):
        return ops.mean(t, axis=-1, keepdims=True)
    return row_sum(t) * (1.0 / t.shape[-1])


def softmax_with_scoped_gradient(logits, training):
    """Softmax over the last axis in the logits' dtype, its gradient (g - sum(g y)) y in float32 in an XLA scope.

    Why: the float32 softmax casts the (B, heads, S, S) logits up and the probabilities down, and TensorFlow's
    gradient runs Mul, Sum, Sub, Mul and two more casts over them, op by op: 53 ms of a 392 ms Ti/16 scoped
    step on the AMX Xeon. oneDNN's bf16 softmax computes in float32 inside and rounds once, as the cast did;
    the gradient reads y and g once in one fused pass. Ti/16 scoped step on the AMX Xeon 1.063x, B/16 1.057x
    (bench.train_ab --without softmax-compute-dtype, BENCHMARKS.md, 2026-12-05). Not measured on other kinds.
    """

    @ops.custom_gradient
    def softmax(x):
        y = ops.softmax(x, axis=-1)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            with fused_elementwise(training, x.dtype):
                g, p = ops.cast(upstream, "float32"), ops.cast(y, "float32")
                return ops.cast((g - row_sum(g * p)) * p, x.dtype)

        return y, grad

    return softmax(logits)


def bias_gradient(upstream):
    """The gradient of a bias added over (..., features): `upstream` summed over all but its last axis, as one GEMM
    (ones (1, tokens) @ upstream (tokens, features)) in upstream's dtype.

    Why: TensorFlow's BiasAddGrad (and the Sum of a broadcast add's gradient) on bf16 runs op by op in Eigen and
    accumulates in bf16: 6.4% off a float64 reference for a Ti/16 MLP bias (3152 tokens); oneDNN's AMX GEMM
    accumulates in float32 (0.23% off, its result rounded to bf16 once), at the same step time (Ti/16 scoped:
    1.000x, bench.train_ab --without bias-gradient-gemm).
    """
    d = upstream.shape[-1]
    rows = ops.reshape(upstream, (-1, d))
    ones = ops.ones((1, ops.shape(rows)[0]), upstream.dtype)
    return ops.reshape(ops.matmul(ones, rows), (d,))


def add_bias(y, bias):
    """`y + bias` (the bias cast to y's dtype) whose bias gradient is `bias_gradient`'s GEMM."""

    @ops.custom_gradient
    def biased(t, b):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return upstream, ops.cast(bias_gradient(upstream), b.dtype)

        return t + ops.cast(b, t.dtype), grad

    return biased(y, ops.cast(bias, bias.dtype))  # a tensor: a variable read inside would need `variables`


def branch_sum(z, g, bias=None):
    """z + g + bias (z, g in the compute dtype, bias float32 (features,) or None) in an XLA scope, rounded as TensorFlow's ops
    round it: grappler turns the block's z + (g + bias) into AddN(z, g) + bias, each in the compute dtype, so the sum
    is rounded after z + g and again after the bias. Those roundings kept (each add in float32, rounded to z's dtype)
    the step's numbers are the TensorFlow ops' to the bit: one rounding for the whole sum, more exact, was tried on
    2026-12-06 and the digits bf16 check fell on 5 seeds of 5 (BENCHMARKS.md). The bias goes in by BiasAdd: grappler
    rewrites a chain of two Adds into an AddN and an Add outside the XLA scope they were made in."""
    import tensorflow as tf

    dtype = z.dtype
    partial = ops.cast(ops.cast(z, "float32") + ops.cast(g, "float32"), dtype)
    return partial if bias is None else ops.cast(tf.nn.bias_add(ops.cast(partial, "float32"), bias), dtype)


def gradient_sum(a, b, dtype):
    """a + b (float32 or `dtype`) in `dtype` as TensorFlow's AddN of the two in `dtype` gives it: each rounded to
    `dtype`, summed in float32, rounded once more (see `branch_sum` for why these roundings are kept)."""
    return ops.cast(ops.cast(ops.cast(a, dtype), "float32") + ops.cast(ops.cast(b, dtype), "float32"), dtype)


def residual_add(z, g, bias, training):
    """z + g + bias for the residual stream z, a branch g and its GEMM's float32 bias (or None: g is the whole
    branch), in an XLA scope (`branch_sum`); the gradient is the upstream one for z and g, and `bias_gradient`'s GEMM
    for the bias: no element-wise op. In the AMX scoped step, where TensorFlow ran the adds in bf16, op by op
    (layers.norm.residual_layer_norm does the same with the LayerNorm after it)."""

    @ops.custom_gradient
    def added(a, *parts):
        with fused_elementwise(training, a.dtype):
            out = branch_sum(a, *parts)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            grads = [upstream, ops.cast(upstream, parts[0].dtype)]
            return tuple(grads + [ops.cast(bias_gradient(upstream), b.dtype) for b in parts[1:]])

        return out, grad

    return added(z, g) if bias is None else added(z, g, bias)


def bias_after_reshape(y, shape, bias):
    """`ops.reshape(y, shape) + bias` for a GEMM output `y`, where `separate_bias`; the bias gradient by
    `bias_gradient`.

    Why: grappler fuses a MatMul followed directly by its bias add into `_MklFusedMatMul`, whose oneDNN inner
    product in bf16 (TensorFlow 2.21's oneDNN 3.7.3, with the plain weights TensorFlow hands it) runs `gemm:jit`,
    not the AMX `brg_matmul` a lone MatMul gets: 2.83 against 1.89 ms for a Ti/16 MLP-in GEMM on the AMX Xeon,
    91.5 of a Ti/16 step's 222 oneDNN ms (BENCHMARKS.md, 2026-12-05). A Reshape between them leaves the MatMul
    alone, and the add goes with the element-wise work after it. Inference, and so every export, keeps MatMul + Add.
    """
    return add_bias(ops.reshape(y, shape), bias)


# "1" turns `gemm`'s transposed-operand weight gradient on (off by default: its accuracy is not settled, see there).
DW_TRANSPOSED_ENV = "KERAS_VIT_DW_TRANSPOSED"


def transposed_weight_gradient(x, w, training) -> bool:
    """Whether `gemm(x, w)` computes its weight gradient on x transposed first: only where KERAS_VIT_DW_TRANSPOSED=1,
    in the AMX scoped step in bf16/fp16 (`cpu_scoped`), for GEMMs at least 512 wide (the saving grows with the width,
    the transpose's cost does not). Speed on the AMX Xeon: TensorFlow 2.23-dev (oneDNN 3.12) B/16 1.068x, Ti/16
    1.018x; TensorFlow 2.21 (oneDNN 3.7.3) B/16 0.937x. Why it is not a default there: the digits bf16 check on
    TensorFlow 2.23-dev read 93.61 / 93.61% (seeds 0 / 1) with it against 97.50 / 95.83% without, from gradients that
    equal TensorFlow's form for two steps and differ in the last bits after (BENCHMARKS.md, 2026-12-06)."""
    if os.environ.get(DW_TRANSPOSED_ENV) != "1":
        return False
    if keras.backend.standardize_dtype(x.dtype) == "float32" or not cpu_scoped(x, training):
        return False  # float32's GEMMs (oneDNN's gemm_api) are unmeasured with it
    return w.shape[-1] is not None and w.shape[-1] >= 512


def gemm(x, w, training):
    """`x (tokens, K) @ w (K, N)`, and where `transposed_weight_gradient`, its weight gradient x^T dy as a GEMM on
    x transposed by XLA (the same values).

    Why: TensorFlow hands oneDNN the weight gradient as MatMul(x, dy, transpose_a=True), and oneDNN's AMX kernel
    runs that form well below a plain one. One thread, bf16, B/16's half-batch shapes (1576 tokens) on the AMX Xeon:
    TensorFlow 2.21 plain 677-722 GFLOP/s, transpose_a 521-588; TensorFlow 2.23-dev plain 1,001-1,096,
    transpose_a 501-594. A graph-mode Transpose before the MatMul is folded back into transpose_a by grappler, so
    the transpose is an XLA computation of its own (`_xla_transpose`)."""
    if not transposed_weight_gradient(x, w, training):
        return ops.matmul(x, w)
    import tensorflow as tf

    @ops.custom_gradient
    def product(a, b):
        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return (tf.linalg.matmul(upstream, b, transpose_b=True),
                    tf.linalg.matmul(_xla_transpose()(a), upstream))

        return ops.matmul(a, b), grad

    return product(x, w)


@functools.cache
def _xla_transpose():
    """A rank-2 transpose compiled by XLA (a function of its own: a lone op in a jit_scope is not clustered)."""
    import tensorflow as tf

    return tf.function(tf.transpose, jit_compile=True)
