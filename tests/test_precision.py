"""keras_vit.precision: which precision and compilation `auto` picks, and the fusible XLA flags."""
from __future__ import annotations

import pytest

from keras_vit import precision as P
from tests.conftest import weighted_sum_step


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
    both = tmp_path / "d"
    both.write_text("flags\t: avx512_bf16 amx_bf16 amx_tile\n")
    assert P.cpu_bf16_feature(str(both)) == "amx_bf16"  # the faster one
    assert P.cpu_bf16_feature(str(with_bf16)) == "avx512_bf16"
    assert P.cpu_bf16_feature(str(without)) is None


def test_cpu_kind_tells_the_amd_kinds_apart(tmp_path):
    def cpuinfo(name, vendor, family, flags):
        block = f"processor\t: {{}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: 2\nflags\t\t: {flags}\n\n"
        path = tmp_path / name
        path.write_text(block.format(0) + block.format(1))
        return str(path)

    assert P.cpu_kind(cpuinfo("zen5", "AuthenticAMD", 26, "avx2 avx512f avx512_bf16")) == "zen5"
    assert P.cpu_kind(cpuinfo("zen4", "AuthenticAMD", 25, "avx2 avx512f avx512_bf16")) == "zen4"
    assert P.cpu_kind(cpuinfo("zen3", "AuthenticAMD", 25, "avx2")) is None  # family 25 without AVX512-BF16
    assert P.cpu_kind(cpuinfo("zen2", "AuthenticAMD", 23, "avx2 avx512_bf16")) is None  # no other family
    assert P.cpu_kind(cpuinfo("nobf16", "AuthenticAMD", 26, "avx2 avx512f")) is None
    assert P.cpu_kind(cpuinfo("intel", "GenuineIntel", 26, "avx512_bf16")) is None
    assert P.cpu_kind(str(tmp_path / "missing")) is None
    assert ZEN5.scoped_cpu and ZEN4.scoped_cpu and AMX.scoped_cpu and not AVX512.scoped_cpu and not PLAIN_CPU.scoped_cpu
    assert not P.Hardware("gpu", cpu_kind="zen5").scoped_cpu
    assert ZEN5.describe() == "CPU with AVX512-BF16 (AMD Zen 5)"
    assert ZEN4.describe() == "CPU with AVX512-BF16 (AMD Zen 4)"


AVX512 = P.Hardware("cpu", "avx512_bf16")
ZEN5 = P.Hardware("cpu", "avx512_bf16", cpu_kind="zen5")
ZEN4 = P.Hardware("cpu", "avx512_bf16", cpu_kind="zen4")
AMX = P.Hardware("cpu", "amx_bf16")
PLAIN_CPU = P.Hardware("cpu", None)
A100 = P.Hardware("gpu", compute_capability=(8, 0))
V100 = P.Hardware("gpu", compute_capability=(7, 0))
P100 = P.Hardware("gpu", compute_capability=(6, 0))
GPU_UNKNOWN = P.Hardware("gpu")
TPU = P.Hardware("tpu")


@pytest.mark.parametrize("args, expected", [
    # (mixed, jit, GFLOP/step, backend, hardware) -> (mixed, jit)
    (("auto", "auto", 40.0, "tensorflow", AVX512), ("mixed_bfloat16", "fusible")),  # another AVX512-BF16 CPU: unmeasured
    (("auto", "auto", 40.0, "tensorflow", ZEN4), ("mixed_bfloat16", "scoped")),  # 1.11-1.41x / 1.14-1.15x fusible (2026-12-07)
    (("auto", "auto", 9.0, "tensorflow", ZEN4), ("none", "xla")),  # float32: XLA, as before
    (("auto", "auto", 40.0, "tensorflow", ZEN5), ("mixed_bfloat16", "scoped")),  # 1.43x / 1.22x fusible, Ti/16 / B/16
    (("auto", "auto", 9.0, "tensorflow", ZEN5), ("none", "xla")),  # float32 (the digits demo): XLA, as before
    (("none", "scoped", 40.0, "tensorflow", ZEN5), ("none", "scoped")),
    (("none", "xla", 40.0, "tensorflow", ZEN5), ("none", "xla")),
    (("auto", "auto", 0.6, "tensorflow", AVX512), ("none", "xla")),  # small step: fp32 wins
    (("auto", "auto", 9.0, "tensorflow", AVX512), ("none", "xla")),  # measured even at 9 GFLOP
    (("auto", "auto", 6.0, "tensorflow", AMX), ("mixed_bfloat16", "scoped")),  # AMX pays back sooner; scoped there
    (("mixed_bfloat16", "auto", 40.0, "tensorflow", AMX), ("mixed_bfloat16", "scoped")),
    (("mixed_float16", "auto", 40.0, "tensorflow", AMX), ("mixed_float16", "xla")),
    (("auto", "auto", 0.6, "tensorflow", AMX), ("none", "scoped")),  # float32 on AMX: oneDNN's GEMMs, graph mode
    (("none", "auto", 40.0, "tensorflow", AMX), ("none", "scoped")),
    (("none", "xla", 40.0, "tensorflow", AMX), ("none", "xla")),  # whole-step XLA on request
    (("none", "auto", 40.0, "torch", AMX), ("none", "none")),
    (("auto", "auto", 40.0, "tensorflow", PLAIN_CPU), ("none", "xla")),  # no native bf16
    (("auto", "auto", 40.0, "jax", AMX), ("none", "xla")),  # XLA:CPU bf16 dots are not faster
    (("auto", "auto", 0.6, "tensorflow", A100), ("mixed_bfloat16", "xla")),
    (("auto", "auto", 0.6, "jax", A100), ("mixed_bfloat16", "xla")),
    (("auto", "auto", 40.0, "tensorflow", V100), ("mixed_float16", "xla")),
    (("auto", "auto", 40.0, "tensorflow", P100), ("none", "xla")),
    (("auto", "auto", 40.0, "torch", GPU_UNKNOWN), ("mixed_bfloat16", "none")),  # eager: no torch.compile
    (("auto", "auto", 40.0, "torch", AVX512), ("mixed_bfloat16", "none")),  # torch's bf16 GEMMs, measured 1.5x
    (("auto", "auto", 0.6, "torch", AVX512), ("none", "none")),  # small step: fp32, as on TensorFlow
    (("auto", "auto", 40.0, "torch", PLAIN_CPU), ("none", "none")),
    (("auto", "xla", 40.0, "torch", AVX512), ("mixed_bfloat16", "xla")),  # torch.compile on request
    (("auto", "auto", 40.0, "jax", TPU), ("mixed_bfloat16", "xla")),
    (("mixed_bfloat16", "auto", 0.1, "tensorflow", PLAIN_CPU), ("mixed_bfloat16", "fusible")),
    (("mixed_bfloat16", "auto", 40.0, "jax", AVX512), ("mixed_bfloat16", "xla")),
    (("none", True, 40.0, "tensorflow", AVX512), ("none", "xla")),
    (("auto", False, 40.0, "tensorflow", AVX512), ("mixed_bfloat16", "none")),
    (("mixed_float16", "none", 1.0, "tensorflow", AVX512), ("mixed_float16", "none")),
])
def test_resolve(args, expected):
    choice = P.resolve(*args)
    assert (choice.mixed_precision, choice.jit_compile) == expected
    assert choice.reason  # printed with the run; says why


def test_resolve_reason_names_the_hardware():
    assert "AMX-BF16" in P.resolve("auto", "auto", 40.0, "tensorflow", AMX).reason
    assert "compute capability 7.0" in P.resolve("auto", "auto", 1.0, "tensorflow", V100).reason
    assert "below bf16's break-even" in P.resolve("auto", "auto", 0.6, "tensorflow", AVX512).reason


def test_break_even_follows_the_gemm_rates():
    # The more bf16 GEMMs gain over fp32, the smaller the step from which bf16 pays.
    amx, avx = P.bf16_break_even_gflop("amx_bf16"), P.bf16_break_even_gflop("avx512_bf16")
    assert 3.0 < amx < avx < 15.0
    assert P.bf16_break_even_gflop(None) == float("inf")


@pytest.mark.parametrize("mixed, jit, backend, message", [
    ("fp8", "auto", "tensorflow", "mixed_precision must be one of auto, none, mixed_bfloat16, mixed_float16; got 'fp8'"),
    ("none", "fast", "tensorflow", "jit_compile must be one of auto, xla, fusible, scoped, none (or a bool); got 'fast'"),
    ("none", "fusible", "jax", "jit_compile 'fusible' needs the TensorFlow backend (this is jax)"),
    ("mixed_bfloat16", "scoped", "torch", "jit_compile 'scoped' needs the TensorFlow backend (this is torch)"),
    # XLA:CPU's dot_general has no float16: it failed at the first step, after the run folder was made
    ("mixed_float16", "xla", "jax", "mixed_float16 on JAX needs a GPU (XLA's CPU matmuls take no float16)"),
])
def test_resolve_rejects(mixed, jit, backend, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        P.resolve(mixed, jit, 1.0, backend, AVX512)


def test_detect_hardware_on_a_faked_gpu_machine(monkeypatch):
    monkeypatch.setattr(P, "has_accelerator", lambda backend: True)
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setattr(P, "_nvidia_smi_capability", lambda: (9, 0))
    assert P.detect_hardware("tensorflow") == P.Hardware("gpu", compute_capability=(9, 0))
    monkeypatch.setenv("TPU_NAME", "local")
    assert P.detect_hardware("tensorflow").device == "tpu"


def test_detect_hardware_on_a_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "has_accelerator", lambda backend: False)
    monkeypatch.setattr(P, "cpu_bf16_feature", lambda cpuinfo="/proc/cpuinfo": "amx_bf16")
    assert P.detect_hardware("tensorflow") == AMX
    monkeypatch.setattr(P, "cpu_bf16_feature", lambda cpuinfo="/proc/cpuinfo": "avx512_bf16")
    monkeypatch.setattr(P, "cpu_kind", lambda cpuinfo="/proc/cpuinfo": "zen5")
    assert P.detect_hardware("tensorflow") == ZEN5
    monkeypatch.setattr(P, "cpu_kind", lambda cpuinfo="/proc/cpuinfo": None)
    assert P.detect_hardware("tensorflow") == AVX512


def test_model_jit_compile_leaves_xla_where_onednn_is_faster():
    """The notebook's `compile(jit_compile="auto")`: graph mode for bf16 on any TensorFlow CPU, and for float32 on
    AMX; XLA for float32 elsewhere (the Zen 5 included) and on GPUs."""
    assert P.model_jit_compile("mixed_bfloat16", "tensorflow", AVX512) is False
    assert P.model_jit_compile("float32", "tensorflow", AVX512) is True
    assert P.model_jit_compile("float32", "tensorflow", ZEN5) is True  # no towers there: XLA's whole step
    assert P.model_jit_compile("float32", "tensorflow", AMX) is False
    assert P.model_jit_compile("float32", "tensorflow", A100) is True
    assert P.model_jit_compile("float32", "torch", A100) is False


def test_capability_parsing():
    assert P._parse_capability("8.6\n") == (8, 6)
    assert P._parse_capability((7, 5)) == (7, 5)
    assert P._parse_capability("") is None


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


def test_bf16_graph_training_clusters_the_blocks_elementwise_work(monkeypatch):
    """The notebook's bf16 step (graph mode, no fusible flags) gets XLA scopes around the LayerNorms and the
    GELU; inference, float32, eager calls and the fusible default do not."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vit.layers.block import TransformerBlock
    from keras_vit.layers.fusion import fused_elementwise

    monkeypatch.setenv("TF_XLA_FLAGS", "")

    def scoped_ops(policy, training, flags=""):
        monkeypatch.setenv("TF_XLA_FLAGS", flags)
        block = TransformerBlock(num_heads=2, mlp_dim=16, dtype=policy)
        x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, 8)), tf.float32)
        fn = tf.function(lambda t: block(t, training=training))
        graph = fn.get_concrete_function(x).graph
        # a MatMul to one column is a row sum's GEMV (layers.fusion.row_sum, on AMX), not a weight GEMM
        return ["RowSum" if op.type == "MatMul" and op.outputs[0].shape[-1] == 1 else op.type
                for op in graph.get_operations() if _xla_compile(op)]

    bf16 = keras.mixed_precision.Policy("mixed_bfloat16")
    marked = scoped_ops(bf16, True)
    assert "Tanh" in marked and "Rsqrt" in marked and "MatMul" not in marked and "BatchMatMulV2" not in marked
    assert "Softmax" not in marked  # oneDNN's float32 softmax: faster than a scope of its own at Ti/16
    assert scoped_ops(bf16, False) == []  # inference: every export traces this
    from keras_vit.layers import fusion

    monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda: False)
    assert scoped_ops("float32", True) == []  # float32 trains with the whole step in XLA, off AMX
    monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda: True)
    marked = scoped_ops("float32", True)  # on AMX: graph mode with the scopes (fusion.float32_scoped)
    assert "Tanh" in marked and "Rsqrt" in marked and "MatMul" not in marked
    with fusion.whole_step_xla(True):  # model.compile(jit_compile=True): TensorFlow's own forms, no scopes
        assert scoped_ops("float32", True) == []
    assert scoped_ops(bf16, True, "--tf_xla_auto_jit=2 --tf_xla_ops_to_cluster=FUSIBLE") == []  # clusters itself
    monkeypatch.setenv("KERAS_VIT_XLA_SCOPES", "0")  # vitcli train --jit none: no XLA at all
    assert scoped_ops(bf16, True) == []
    monkeypatch.delenv("KERAS_VIT_XLA_SCOPES")
    assert isinstance(fused_elementwise(True, "bfloat16"), type(fused_elementwise(False, "bfloat16")))  # eager: none


# The block's family options (issue #26), each through the scoped step; half with the class-token last block.
SCOPED_OPTIONS = [
    ({}, {}),
    ({"relative_grid": (2, 2)}, {"class_token_only": True}),
    ({"qk_norm": True}, {}),
    ({"layer_scale_init": 0.1}, {"class_token_only": True}),
    ({"mlp_kind": "swiglu"}, {}),
    ({"activation": "quick_gelu", "qkv_bias": False}, {"class_token_only": True}),
    ({"gelu_approximate": False}, {}),
]


@pytest.mark.parametrize("options,call", SCOPED_OPTIONS, ids=lambda o: ",".join(o) or "-")
def test_scoped_gradients_equal_the_plain_graph_ones(monkeypatch, options, call):
    """In the scoped bf16 step the LayerNorms' gradients are written out (layers.norm) and compiled in scopes of
    their own, as the MLP activation's: the same gradients as TensorFlow's op by op, for every block option, and
    the backward pass's LayerNorm work is inside the scopes. The softmax stays out (oneDNN's, measured faster)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vit.layers.block import TransformerBlock

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    # the forms of the non-AMX kind on any CPU: on AMX the scoped step also takes a bf16 softmax and the MLP bias
    # in the activation's scope (layers.fusion.cpu_scoped), checked against float32 in the test below
    monkeypatch.setenv("KERAS_VIT_BIAS_APART", "0")
    rng = np.random.default_rng(0)
    block = TransformerBlock(num_heads=2, mlp_dim=16, dtype=keras.mixed_precision.Policy("mixed_bfloat16"), **options)
    x = tf.constant(rng.normal(size=(2, 5, 8)) * 2 + 0.5, tf.float32)
    block(x)
    weights = tf.constant(rng.normal(size=block(x, **call).shape), tf.float32)
    for v in block.trainable_variables:  # non-trivial LayerNorm affine and biases
        v.assign(rng.normal(size=v.shape) * 0.5)

    def gradients(scopes):
        monkeypatch.setenv("KERAS_VIT_XLA_SCOPES", scopes)

        @tf.function
        def step(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                loss = tf.reduce_sum(tf.cast(block(t, training=True, **call), tf.float32) * weights)
            return tape.gradient(loss, [t] + block.trainable_variables)

        graph = step.get_concrete_function(x).graph
        return step(x), [op.type for op in graph.get_operations() if _xla_compile(op)]

    (scoped, marked), (plain, unmarked) = gradients("1"), gradients("0")
    assert unmarked == []
    # the block's two LayerNorms (and qk_norm's query and key norms); not the softmax
    assert marked.count("Rsqrt") == (4 if options.get("qk_norm") else 2) and "Softmax" not in marked
    # the MLP's activation and its gradient: tanh GELU, exact GELU, quick_gelu / SwiGLU (sigmoids)
    activation = ("Sigmoid" if "activation" in options or "mlp_kind" in options
                  else "Erf" if options.get("gelu_approximate") is False else "Tanh")
    assert marked.count(activation) >= 2, activation
    assert marked.count("Sum") >= 4  # dgamma, dbeta of both LayerNorms
    # The same float32 formulas on both sides, but XLA's code (fused multiply-adds) may round a value 1 ulp
    # apart, which flips a bf16 rounding (2^-8) that then spreads: so 1% in norm, per gradient (a wrong term
    # is O(1); test_layers checks each written-out gradient exactly in float32). The key bias's gradient is
    # zero in exact arithmetic (softmax ignores a shift per query), rounding noise here: it is measured
    # against the key kernel's.
    names = ["input"] + [v.path for v in block.trainable_variables]
    norms = dict(zip(names, (float(tf.norm(b)) for b in plain)))
    for name, a, b in zip(names, scoped, plain):
        scale = norms[name.replace("key_bias", "key_kernel")]
        assert float(tf.norm(a - b)) <= 1e-2 * scale, (name, float(tf.norm(a - b)), scale)


def _xla_compile(op) -> bool:
    try:
        return bool(op.get_attr("_XlaCompile"))
    except ValueError:
        return False


def test_a_run_with_jit_none_or_scoped_switches_the_scopes_for_its_duration(monkeypatch):
    import os

    from keras_vit.layers.fusion import SCOPES_ENV
    from keras_vit.train.loop import _speed_settings

    monkeypatch.delenv(SCOPES_ENV, raising=False)
    with _speed_settings("mixed_bfloat16", "none"):
        assert os.environ[SCOPES_ENV] == "0"
    assert SCOPES_ENV not in os.environ
    with _speed_settings("mixed_bfloat16", "xla"):
        assert SCOPES_ENV not in os.environ
    monkeypatch.setenv(SCOPES_ENV, "0")  # --jit scoped asks for them, whatever the environment said
    with _speed_settings("mixed_bfloat16", "scoped"):
        assert os.environ[SCOPES_ENV] == "1" and "--tf_xla_auto_jit" not in os.environ.get("TF_XLA_FLAGS", "")
    assert os.environ[SCOPES_ENV] == "0"


@pytest.mark.parametrize("options,call", SCOPED_OPTIONS, ids=lambda o: ",".join(o) or "-")
def test_float32_scoped_step_on_amx_equals_tensorflows_own_forms(monkeypatch, options, call):
    """Float32 training on an AMX CPU in graph mode takes the scoped step's forms (layers.fusion.float32_scoped:
    XLA scopes, written-out gradients, biases after a reshape): values and gradients equal TensorFlow's own forms
    to float32 rounding, for every block option; under whole-step XLA (`whole_step_xla`) and off AMX, none."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vit.layers import fusion
    from keras_vit.layers.block import TransformerBlock

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.delenv(fusion.BIAS_APART_ENV, raising=False)
    monkeypatch.delenv(fusion.ROW_DOTS_ENV, raising=False)
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    block = TransformerBlock(num_heads=2, mlp_dim=16, dtype="float32", **options)
    block(x)
    for v in block.trainable_variables:
        v.assign(rng.normal(size=v.shape) * 0.5)
    weights = tf.constant(rng.normal(size=block(x, **call).shape), tf.float32)

    def traced(amx: bool, whole_step_xla: bool = False):
        monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda: amx)

        @tf.function
        def step(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = block(t, training=True, **call)
                loss = tf.reduce_sum(y * weights)
            return [y] + tape.gradient(loss, [t] + block.trainable_variables)

        with fusion.whole_step_xla(whole_step_xla):
            graph = step.get_concrete_function(x).graph
            return step(x), [op.type for op in graph.get_operations() if _xla_compile(op)], _matmul_consumers(graph)

    (scoped, marked, consumers), (own, unmarked, fused) = traced(True), traced(False)
    assert marked and "Rsqrt" in marked and not unmarked
    assert "MatMul" in marked  # the LayerNorms' row sums as GEMVs (layers.fusion.row_sum), on AMX
    assert not {"Add", "AddV2", "BiasAdd"} & set(consumers) and {"Add", "AddV2", "BiasAdd"} & set(fused)
    assert not traced(True, whole_step_xla=True)[1]
    # key_bias's gradient is zero in exact arithmetic: each is measured against the largest norm's millionth too
    names = ["output", "input"] + [v.path for v in block.trainable_variables]
    largest = max(float(tf.norm(b)) for b in own)
    for name, a, b in zip(names, scoped, own):
        assert float(tf.norm(a - b)) <= 1e-4 * max(float(tf.norm(b)), 1e-2 * largest), name
    assert keras.backend.standardize_dtype(scoped[0].dtype) == "float32"


def test_vit_float32_on_amx_compiles_to_graph_mode_with_the_scopes(monkeypatch):
    """The notebook path in float32 on an AMX CPU: `compile(optimizer, loss)` picks graph mode (oneDNN's float32
    GEMMs, the blocks' scopes); `jit_compile=True` keeps whole-step XLA, its train step traced without the scopes.
    Both train, and from the same weights agree after a step."""
    import keras
    import numpy as np

    import keras_vit
    from keras_vit import precision
    from keras_vit.layers import fusion

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda: True)
    monkeypatch.setattr(precision, "detect_hardware", lambda backend: precision.Hardware("cpu", "amx_bf16"))
    seen = []
    real = fusion.float32_scoped
    monkeypatch.setattr(fusion, "float32_scoped", lambda: seen.append(real()) or seen[-1])
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32"), rng.integers(0, 3, 4)
    models = []
    for jit in ("auto", True):
        keras.utils.set_random_seed(0)
        model = keras_vit.ViT(variant="Ti/16", image_size=32, patch_size=8, num_layers=2, hidden_size=32,
                              num_heads=2, mlp_dim=64, num_classes=3)
        model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=jit,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert model.jit_compile is (jit is True)
        seen.clear()
        model.train_on_batch(x, y)
        assert seen and all(seen) is (jit == "auto")
        models.append(model)
    for a, b in zip(*(m.trainable_variables for m in models)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def _matmul_consumers(graph) -> list:
    """The op types that read a MatMul's output directly, over a graph."""
    return [c.type for op in graph.get_operations() if op.type == "MatMul" for c in op.outputs[0].consumers()]


@pytest.mark.parametrize("options,call", SCOPED_OPTIONS, ids=lambda o: ",".join(o) or "-")
def test_bf16_training_adds_no_bias_right_after_a_gemm(monkeypatch, options, call):
    """Bf16 training on TensorFlow adds each GEMM's bias after a reshape (layers.fusion.bias_after_reshape): no
    MatMul of the step feeds an add directly, which grappler would fuse into oneDNN's inner product (gemm:jit, not
    the AMX brg_matmul). In the scoped step the softmax runs in bf16 where no relative bias comes in, and the MLP's
    first bias joins the GELU / quick_gelu's scope (layers.fusion.cpu_scoped). Values and gradients are float32's
    within bf16 rounding, as the plain form's are, for every block option; inference (so every export) keeps
    MatMul + Add."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_vit.layers.attention as attention
    import keras_vit.layers.block as block_module
    from keras_vit.layers.block import TransformerBlock

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setenv("KERAS_VIT_BIAS_APART", "1")  # as on an AMX CPU, on any CPU
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    block, reference = (TransformerBlock(num_heads=2, mlp_dim=16, dtype=keras.mixed_precision.Policy(p), **options)
                        for p in ("mixed_bfloat16", "float32"))
    block(x)
    reference(x)
    for v in block.trainable_variables:
        v.assign(rng.normal(size=v.shape) * 0.5)
    reference.set_weights(block.get_weights())
    weights = tf.constant(rng.normal(size=block(x, **call).shape), tf.float32)

    def traced(layer, training=True):
        step = weighted_sum_step(layer, weights, training, **call)
        return step(x), _matmul_consumers(step.get_concrete_function(x).graph)

    adds = {"Add", "AddV2", "BiasAdd"}
    (separate, consumers), (exact, _) = traced(block), traced(reference)
    assert consumers and not adds & set(consumers), consumers
    assert adds & set(traced(block, training=False)[1])
    graph = tf.function(lambda t: block(t, training=True, **call)).get_concrete_function(x).graph
    softmax = {op.get_attr("T").name for op in graph.get_operations() if op.type == "Softmax"}
    assert softmax == {"float32" if "relative_grid" in options else "bfloat16"}, softmax
    assert "Dense_0/BiasAdd" not in " ".join(op.name for op in graph.get_operations()) or "mlp_kind" in options
    for module in (attention, block_module):
        monkeypatch.setattr(module, "separate_bias", lambda t, training=None: False)
        monkeypatch.setattr(module, "cpu_scoped", lambda t, training=None: False)
    plain, fused_consumers = traced(block)
    assert adds & set(fused_consumers)
    # Some gradients are zero in exact arithmetic, rounding noise here: key_bias's (measured against key_kernel's,
    # as in test_scoped_gradients_...) and relative_embedding's with the class token alone (against a hundredth
    # of the largest). 5%: a block this small (8 features) lands 1-4.7% from float32 in bf16 over seeds 0-5 with
    # either form (2026-12-05)
    names = ["output", "input"] + [v.path for v in block.trainable_variables]
    norms = {n: float(tf.norm(e)) for n, e in zip(names, exact)}
    for name, a, b, e in zip(names, separate, plain, exact):
        scale = max(norms[name.replace("key_bias", "key_kernel")], 1e-2 * max(norms.values()))
        for got in (a, b):
            assert float(tf.norm(tf.cast(got, tf.float32) - e)) <= 5e-2 * scale, name


@pytest.mark.parametrize("lora", [False, True])
def test_exact_bias_gradients_where_the_mlp_bias_follows_its_gemm(monkeypatch, lora):
    """layers.fusion.exact_bias_gradients (opt-in): in bf16 graph-mode training where the MLP's bias is added right
    after its GEMM (`separate_bias` off: the Zen 4, any CPU but AMX and the Zen 5), its gradient is the GEMM's, summed in float32.
    TensorFlow's bf16 BiasAddGrad sums 3,000 rows of 0.01 to 4.0 (exact: 30.03); the outputs and every other gradient
    (LoRA's too) are Keras' Dense's to the bit, as grappler still fuses the GEMM and its bias add."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_vit.layers import fusion
    from keras_vit.layers.block import MlpBlock

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setenv(fusion.BIAS_APART_ENV, "0")
    monkeypatch.setenv(fusion.BIAS_GRADIENT_ENV, "1")  # opt-in
    rng = np.random.default_rng(0)
    mlp = MlpBlock(mlp_dim=16, dtype=keras.mixed_precision.Policy("mixed_bfloat16"))
    x = tf.constant(rng.normal(size=(10, 300, 8)), tf.float32)
    mlp(x)
    if lora:
        mlp.dense_0.enable_lora(2)
        for v in mlp.dense_0.trainable_variables:
            v.assign(rng.normal(size=v.shape) * 0.1)

    def step():
        @tf.function
        def run(t):
            with tf.GradientTape() as tape:
                tape.watch(t)
                y = mlp(t, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * 0.01)
            return [y] + tape.gradient(loss, [t] + mlp.trainable_variables)
        return run(x)

    exact = step()
    monkeypatch.setenv(fusion.BIAS_GRADIENT_ENV, "0")
    keras_form = step()
    names = ["output", "input"] + [v.path for v in mlp.trainable_variables]
    biases = {i for i, n in enumerate(names) if n.endswith("bias")}
    assert len(biases) == 2 and len(names) == (7 if lora else 6)  # LoRA freezes the kernel
    for i, (a, b) in enumerate(zip(exact, keras_form)):
        if i not in biases:
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=names[i])
    dense_1_bias = next(g for n, g in zip(names, exact) if n.endswith("Dense_1/bias"))
    np.testing.assert_allclose(dense_1_bias.numpy(), 3000 * float(tf.cast(tf.constant(0.01, tf.bfloat16), tf.float32)),
                               rtol=4e-3)  # one bf16 rounding of the sum


def test_exact_bias_gradients_only_in_graph_mode_bf16_training_without_xla_on_the_gradient(monkeypatch):
    import keras
    import tensorflow as tf

    from keras_vit.layers import fusion

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setenv(fusion.BIAS_APART_ENV, "0")
    monkeypatch.delenv(fusion.BIAS_GRADIENT_ENV, raising=False)
    assert not tf.function(lambda: tf.constant(fusion.exact_bias_gradients(keras.ops.ones((2, 3), "bfloat16"), True)))()
    monkeypatch.setenv(fusion.BIAS_GRADIENT_ENV, "1")  # opt-in: what follows is where it then applies

    def decided(dtype, training=True, **env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return tf.function(lambda: tf.constant(fusion.exact_bias_gradients(keras.ops.ones((2, 3), dtype), training)))()

    assert bool(decided("bfloat16")) and bool(decided("float16"))
    assert not decided("float32") and not decided("bfloat16", training=False)
    assert not fusion.exact_bias_gradients(keras.ops.ones((2, 3), "bfloat16"), True)  # eager
    with fusion.whole_step_xla(True):
        assert not decided("bfloat16")
    assert not decided("bfloat16", KERAS_VIT_BIAS_APART="1")  # the bias after a reshape has its own GEMM gradient
    monkeypatch.setenv(fusion.BIAS_APART_ENV, "0")
    assert not decided("bfloat16", TF_XLA_FLAGS="--tf_xla_auto_jit=fusible")  # XLA's BiasAddGrad sums in float32
    monkeypatch.setenv("TF_XLA_FLAGS", "")
    assert not decided("bfloat16", KERAS_VIT_BIAS_GRADIENT_GEMM="0")


def test_bias_apart_only_in_bf16_tensorflow_training_on_amx_unless_forced(monkeypatch):
    """layers.fusion.separate_bias: on where it was measured (bf16/fp16 TensorFlow training on an AMX CPU),
    KERAS_VIT_BIAS_APART=1/0 forcing it either way; never in float32 or at inference."""
    import keras

    from keras_vit.layers import fusion

    monkeypatch.delenv(fusion.BIAS_APART_ENV, raising=False)
    bf16, fp32 = keras.ops.ones((2, 3), "bfloat16"), keras.ops.ones((2, 3), "float32")
    for amx in (True, False):
        monkeypatch.setattr(fusion, "_on_scoped_cpu", lambda amx=amx: amx)
        assert fusion.separate_bias(bf16, True) is amx
        assert not fusion.separate_bias(bf16, False) and not fusion.separate_bias(fp32, True)
        for forced in ("1", "0"):
            monkeypatch.setenv(fusion.BIAS_APART_ENV, forced)
            assert fusion.separate_bias(bf16, True) is (forced == "1") and not fusion.separate_bias(fp32, True)
        monkeypatch.delenv(fusion.BIAS_APART_ENV)


@pytest.mark.parametrize("options,call", SCOPED_OPTIONS, ids=lambda o: ",".join(o) or "-")
def test_fused_heads_equal_tensorflows_ops_to_the_bit(monkeypatch, options, call):
    """The scoped bf16 step's QKV bias add and head split (layers.attention.heads_major) in one XLA pass each way:
    the block's output and every gradient equal those of TensorFlow's AddV2 / Transpose / Unpack (and their
    gradients) to the bit, for every block option (qkv_bias off, qk_norm, the relative bias, the class token alone);
    the traced step has no head-split Transpose, Pack or Unpack outside an XLA scope."""
    import collections

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_vit.layers.attention as attention
    from keras_vit.layers.block import TransformerBlock

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setenv("KERAS_VIT_BIAS_APART", "1")  # the scoped step's CPU forms (AMX, Zen 5) on any CPU
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(2, 5, 8)), tf.float32)
    block = TransformerBlock(num_heads=2, mlp_dim=16, dtype=keras.mixed_precision.Policy("mixed_bfloat16"), **options)
    block(x)
    for v in block.trainable_variables:
        v.assign(rng.normal(size=v.shape) * 0.5)
    weights = tf.constant(rng.normal(size=block(x, **call).shape), tf.float32)

    def traced():
        step = weighted_sum_step(block, weights, **call)
        graph = step.get_concrete_function(x).graph
        outside = collections.Counter(op.type for op in graph.get_operations() if "MultiHeadDotProductAttention" in op.name
                                      and op.type in ("Transpose", "Pack", "Unpack") and "_XlaScope" not in op.node_def.attr)
        return step(x), outside

    fused, fused_outside = traced()
    assert not fused_outside["Pack"] and not fused_outside["Unpack"], fused_outside
    monkeypatch.setattr(attention, "FUSED_HEADS", False)
    plain, plain_outside = traced()
    # the split's forward and gradient transposes (the attention's own k^T and output swap stay TensorFlow's)
    assert plain_outside["Transpose"] == fused_outside["Transpose"] + 2 and plain_outside["Unpack"] == 1
    for a, b in zip(fused, plain):
        np.testing.assert_array_equal(tf.cast(a, tf.float32).numpy(), tf.cast(b, tf.float32).numpy())


def test_fused_heads_gradient_where_a_projection_is_unused():
    """heads_major's gradient with an output the loss does not read (TensorFlow hands None): zeros for its part,
    and the bias gradient is the GEMM sum of the rest."""
    import numpy as np
    import tensorflow as tf

    from keras_vit.layers.attention import heads_major

    rng = np.random.default_rng(0)
    t = tf.constant(rng.normal(size=(2, 3, 3, 2, 4)), tf.float32)  # (B, S, 3, heads, head_dim)
    b = tf.constant(rng.normal(size=(3, 2, 4)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([t, b])
        q, k, v = heads_major(t, b, training=True)
        loss = tf.reduce_sum(q * 2.0) + tf.reduce_sum(v)
    dt, db = tape.gradient(loss, [t, b])
    np.testing.assert_array_equal(q.numpy(), np.transpose(t.numpy() + b.numpy(), (2, 0, 3, 1, 4))[0])
    want = np.stack([np.full((2, 3, 2, 4), 2.0), np.zeros((2, 3, 2, 4)), np.ones((2, 3, 2, 4))], axis=2)
    np.testing.assert_array_equal(dt.numpy(), want)
    np.testing.assert_allclose(db.numpy(), want.sum(axis=(0, 1)))
