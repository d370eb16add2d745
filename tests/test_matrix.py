"""Every option on every path: the model options a user can set x the ways a model can go.

Options: pos_embedding (5) x classifier (3: token, gap, map) x gelu_approximate (2), in full (30
models), a "shape" factor: square RGB, non-square single-channel (35x50, channels=1, with
patch_remainder="drop": the pixels past the 4x6 patches ignored),
representation_size, include_top=False, and a hybrid (three one-unit BiT ResNet stages, total
stride 16; with the official code's epsilons and with timm's, resnet_epsilons="timm"); a "block"
factor, the ViT family's block options (issue #26): plain, LayerScale
(with qkv_bias=False),
qk_norm, quick_gelu, swiglu; and a "tokens" factor (issue #26): none, two register tokens, DeiT's
distillation token and head (with classifier "token" only: the pairs with gap and map are
excluded), a class token kept with fc_norm (a class token the pooling ignores under gap and map),
pre_norm with ImageNet's pixel mean and std, and registers with position embeddings
(register_pos_embedding, SoViT-150M's; with "map" the pooling reads the patch tokens alone).
Paths, per model:
- Keras: .keras save/load and keras.models.clone_model (every model), and one of
  mixed_bfloat16, model.quantize("int8" | "float8" | "int4"), LoRA on the MLP's Dense layers and the
  attention's query and value (keras_vit.enable_lora);
- ONNX in onnxruntime (fp32, --optimize, fp16, dynamic int8, static int8 with and without
  --optimize) and TFLite in LiteRT (fp32, fp16,
  dynamic, int8): one ONNX and one TFLite precision per model;
- the JAX and PyTorch backends (every model, one subprocess per backend).
The shape, block and tokens factors and the per-model paths are spread over the 30 option models
(plus a few more) by `pairwise.pairwise_rows`: every pair of values of any two factors appears in
some model. Each cell compares with the Keras float32 model on the same digits images: fp32 paths
at max |diff| <= 1e-4 and 100% top-1, fp16 at >= 99% top-1, lossy paths at a bound on max |diff|
(see MAX_REL_DIFF for why int8 and below get no top-1 check on random weights).
"""
from __future__ import annotations

import functools
import os
import warnings

import keras
import numpy as np
import pytest
from backend_worker import run_job
from pairwise import all_pairs, pairwise_rows

import keras_vit
from keras_vit.config import ViTConfig
from keras_vit.export import to_onnx, to_tflite, verify
from keras_vit.export.images import load_images

FACTORS = {
    "pos_embedding": ["learned", "learned_2d", "relative", "sincos2d", "none"],
    "classifier": ["token", "gap", "map"],
    "gelu_approximate": [True, False],
    "shape": ["square", "nonsquare_gray", "representation", "no_top", "hybrid", "hybrid_timm"],
    "block": ["plain", "layer_scale", "qk_norm", "quick_gelu", "swiglu"],
    "tokens": ["default", "registers", "distilled", "cls_fc_norm", "pre_norm_mean_std", "registers_pos"],
    "onnx": ["fp32", "optimize", "fp16", "dynamic", "static", "static_optimize"],
    "tflite": ["fp32", "fp16", "dynamic", "int8"],
    "keras": ["bf16", "int8", "float8", "int4", "lora"],
}
FULL = ("pos_embedding", "classifier", "gelu_approximate")
# DeiT's distillation head reads the class and distillation tokens: classifier "token" only.
EXCLUDE = [("classifier", "gap", "tokens", "distilled"), ("classifier", "map", "tokens", "distilled")]
ROWS = pairwise_rows(FACTORS, full=FULL, exclude=EXCLUDE)
IDS = [f"{r['pos_embedding']}-{r['classifier']}-{'tanh' if r['gelu_approximate'] else 'erf'}-{r['shape']}-{r['block']}"
       f"-{r['tokens']}"
       for r in ROWS]
TINY = dict(hidden_size=32, num_heads=2, mlp_dim=64, num_layers=2)
SHAPES = {
    "square": dict(image_size=32, patch_size=8),
    # 35 x 50 px with patch_remainder="drop": 4 x 6 patches, the last 3 rows and 2 columns ignored
    "nonsquare_gray": dict(image_size=(35, 50), patch_size=8, channels=1, patch_remainder="drop"),
    "representation": dict(image_size=32, patch_size=8, representation_size=16),
    "no_top": dict(image_size=32, patch_size=8, include_top=False),
    # A hybrid in miniature: three BiT stages of one bottleneck unit (total stride 16, as
    # R50+B/16), 1x1 patches over the 2x2 feature map.
    "hybrid": dict(image_size=32, patch_size=1, resnet_layers=(1, 1, 1)),
    # The same with timm's ResNet epsilons (what a timm hybrid checkpoint loads with).
    "hybrid_timm": dict(image_size=32, patch_size=1, resnet_layers=(1, 1, 1), resnet_epsilons="timm"),
}
# LayerScale at 0.5 (not timm's 1e-5), so that the branches still weigh in the outputs; row_model
# then draws the gains per channel around it (a constant gain would hide a channel-order bug).
# With LayerScale, no query/key/value biases (qkv_bias=False), as timm's SoViT-150M v2 and DeiT-III-like sbb ViTs.
BLOCKS = {"plain": {}, "layer_scale": dict(layer_scale_init=0.5, qkv_bias=False), "qk_norm": dict(qk_norm=True),
          "quick_gelu": dict(activation="quick_gelu"), "swiglu": dict(mlp="swiglu")}
TOKENS = {
    "default": {},
    "registers": dict(num_registers=2),
    "distilled": dict(distilled=True),
    "cls_fc_norm": dict(class_token=True, fc_norm=True),
    "pre_norm_mean_std": dict(pre_norm=True, pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225)),
    # SoViT-150M reg4's tokens: registers with position rows; a MAP head reads the patch tokens alone
    "registers_pos": dict(num_registers=2, register_pos_embedding=True, pool_include_prefix=False),
}
# fp32 and fp16: the thresholds of keras_vit.export.verify.THRESHOLDS (max |diff| and top-1).
FP32_MAX_DIFF = 1e-4
MIN_TOP1 = {"fp32": 1.0, "fp16": 0.99}
# Every lossy path is also held to max |diff| as a share of the largest |output|: bounds about
# twice the largest share measured over the rows (bf16 0.036, Keras int8 0.055, float8 0.18,
# int4 0.24, TFLite full-integer int8 0.22, ONNX static int8 0.065), far below what a broken path gives (a quantized
# kernel used without its scale: ~1). The 8-bit-and-below paths get no top-1 check here: a
# random-weight model has no margins between its classes for top-1 to measure (ONNX dynamic
# int8 of the hybrid row: 94% top-1 at 3% of the logit scale). Their top-1 threshold (>= 97%)
# is checked on the trained digits model: test_quantize.py (model.quantize int8, float8, int4),
# test_export_onnx.py (dynamic int8), test_export_deploy.py (ONNX static int8),
# test_export_tflite.py (dynamic, int8).
MAX_REL_DIFF = {"fp16": 0.01, "bf16": 0.08, "int8": 0.12, "int8_onnx_static": 0.13, "int8_static": 0.45,
                "float8": 0.35, "int4": 0.45}
NUM_IMAGES = 100  # 97% top-1 allows three of them to differ


def row_config(row: dict) -> ViTConfig:
    """The ViTConfig of one matrix row."""
    shape = SHAPES[row["shape"]]
    tokens = dict(TOKENS[row["tokens"]])
    if "pixel_mean" in tokens and shape.get("channels", 3) == 1:  # one channel: the mean of the RGB values
        tokens.update(pixel_mean=(0.449,), pixel_std=(0.226,))
    return ViTConfig(num_classes=10, pos_embedding=row["pos_embedding"], classifier=row["classifier"],
                     gelu_approximate=row["gelu_approximate"], variant=f"matrix {row['shape']}",
                     **TINY, **shape, **BLOCKS[row["block"]], **tokens)


def images(cfg: ViTConfig, n: int = NUM_IMAGES, split: str = "test") -> np.ndarray:
    """Digits at the model's size and channels (the verification images of the export cells)."""
    return load_images("digits", cfg.image_size, cfg.channels, n, split=split)


@functools.cache
def row_model(index: int):
    """The row's model with every weight random (zero-initialised ones and LayerScale gains
    included) and a head scaled so that the logits spread over several units."""
    keras.utils.set_random_seed(index)
    model = keras_vit.ViT(config=row_config(ROWS[index]))
    rng = np.random.default_rng(index)
    for w in model.weights:
        value = np.asarray(w.numpy())
        if not value.any():
            w.assign(rng.normal(0.0, 0.2, value.shape).astype("float32"))
        elif "LayerScale" in w.path:
            w.assign(rng.normal(value, 0.5 * np.abs(value)).astype("float32"))
    if model.vit_config.include_top:
        head = model.get_layer("head")
        head.kernel.assign(rng.normal(0.0, 1.0, head.kernel.shape).astype("float32"))
    return model


@pytest.fixture(autouse=True, scope="module")
def _free_row_models():
    """The 48 models (~700 MB) go with the module, not with the test process."""
    yield
    row_model.cache_clear()


def row_images(index: int, n: int = NUM_IMAGES) -> np.ndarray:
    return images(row_model(index).vit_config, n)


def run(model, x: np.ndarray) -> np.ndarray:
    """Outputs of one eager call (cheaper than tracing predict for each of the many models)."""
    return np.asarray(model(x, training=False), np.float32)


def agreement(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean(np.asarray(out).argmax(-1) == np.asarray(ref).argmax(-1)))


def check(out, ref, precision: str, what: str) -> None:
    """`out` against the float32 reference `ref` at the threshold of `precision` (see above);
    top-1 is checked for logits, not for the features of include_top=False models."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    diff = float(np.abs(out - ref).max())
    rel = diff / float(np.abs(ref).max())
    if precision == "fp32":
        assert diff <= FP32_MAX_DIFF, f"{what}: max |diff| {diff:.3g} > {FP32_MAX_DIFF}"
    else:
        assert rel <= MAX_REL_DIFF[precision], f"{what}: max |diff| {rel:.3g} of max |output| > {MAX_REL_DIFF[precision]}"
    if precision in MIN_TOP1 and out.shape[-1] == 10:  # logits (num_classes=10); features have 32 or 16
        top1 = agreement(out, ref)
        assert top1 >= MIN_TOP1[precision], f"{what}: top-1 agreement {top1:.3f} < {MIN_TOP1[precision]}"


def test_rows_cover_every_pair_and_the_full_option_product():
    covered = set()
    for row in ROWS:
        names = list(row)
        covered |= {(a, row[a], b, row[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    excluded = {p for a, va, b, vb in EXCLUDE for p in ((a, va, b, vb), (b, vb, a, va))}
    assert all_pairs(FACTORS) - excluded <= covered and not covered & excluded
    assert {tuple(r[f] for f in FULL) for r in ROWS} == {
        (p, c, g) for p in FACTORS["pos_embedding"] for c in FACTORS["classifier"] for g in FACTORS["gelu_approximate"]}
    assert len(ROWS) == 48 and ROWS == pairwise_rows(FACTORS, full=FULL, exclude=EXCLUDE)  # deterministic
    for row in ROWS:
        row_config(row)  # every row is a valid config


def test_every_row_rebuilds_with_its_frozen_layers():
    """get_config names the frozen layers by path; a model rebuilt from it in this same process (where
    Keras numbers auto-named layers on) freezes the same ones, for every row's architecture."""
    for row in ROWS:
        model = keras_vit.ViT(config=row_config(row))
        weighted = [layer for layer in model._flatten_layers(include_self=False) if layer.weights]
        for layer in weighted[1::2]:
            layer.trainable = False
        flags = [(layer.path or layer.name, layer.trainable) for layer in weighted]
        rebuilt = keras_vit.VisionTransformer.from_config(model.get_config())
        assert [(layer.path or layer.name, layer.trainable) for layer in rebuilt._flatten_layers(include_self=False)
                if layer.weights] == flags, row
        assert [v.path for v in rebuilt.trainable_weights] == [v.path for v in model.trainable_weights], row


# The whole matrix runs in `make test`; the quick loop keeps the first row of each cheap Keras
# path (bf16, float8, LoRA; model.quantize int8 and int4 take seconds a row), save/load and
# clone_model included (test_vit.py saves and reloads every pos_embedding x classifier quickly).
_QUICK_ROWS = {kind: next(i for i, r in enumerate(ROWS) if r["keras"] == kind) for kind in ("bf16", "float8", "lora")}
KERAS_ROWS = [pytest.param(i, id=f"{name}-{r['keras']}", marks=[] if i in _QUICK_ROWS.values() else [pytest.mark.slow])
              for i, (name, r) in enumerate(zip(IDS, ROWS))]


@pytest.mark.parametrize("index", KERAS_ROWS)
def test_keras_paths(index, tmp_path):
    """save/load and clone_model, then the row's mixed_bfloat16 / model.quantize / LoRA cell."""
    model = row_model(index)
    cfg = model.vit_config
    x = row_images(index)
    ref = run(model, x)
    assert np.ptp(ref) > 1.0  # outputs spread over several units
    assert model.count_params() == cfg.count_params()  # the analytic count, for every option

    model.save(tmp_path / "m.keras")
    check(run(keras_vit.load_model(tmp_path / "m.keras"), x), ref, "fp32", "save/load")

    # Keras clones a functional subclass as a plain functional model: same layers, new weights
    clone = keras.models.clone_model(model)
    assert [type(a) for a in clone.layers] == [type(b) for b in model.layers]
    clone.set_weights(model.get_weights())
    check(run(clone, x), ref, "fp32", "clone_model")

    kind = ROWS[index]["keras"]
    if kind == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            bf16 = keras_vit.ViT(config=cfg)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        bf16.set_weights(model.get_weights())
        assert bf16.get_layer("encoderblock_0").compute_dtype == "bfloat16"
        check(run(bf16, x), ref, "bf16", "mixed_bfloat16")
    elif kind == "lora":
        lora = keras_vit.ViT(config=cfg)
        lora.set_weights(model.get_weights())
        dense = [layer for layer in lora._flatten_layers() if layer.name in ("Dense_0", "Dense_1")]
        rng = np.random.default_rng(index)
        for layer in dense:
            layer.enable_lora(2)
            layer.lora_kernel_b.assign(rng.normal(0, 0.2, layer.lora_kernel_b.shape).astype("float32"))
        keras_vit.enable_lora(lora, rank=2, targets=("query", "value"))  # the attention's own LoRA
        attention = [layer for layer in lora._flatten_layers() if getattr(layer, "lora_targets", ())]
        for layer in attention:
            for name, factor in layer.lora_factors().items():
                if name.endswith("_b"):
                    factor.assign(rng.normal(0, 0.2, factor.shape).astype("float32"))
        merged = keras_vit.ViT(config=cfg)
        merged.set_weights(model.get_weights())
        merged_kernels = {layer.path: layer.kernel for layer in dense}  # W + (alpha / rank) A B
        merged_kernels.update({f"{layer.path}/{t}": layer.merged_kernel(t) for layer in attention for t in layer.lora_targets})
        for layer in merged._flatten_layers():
            if layer.path in merged_kernels:
                layer.kernel.assign(merged_kernels[layer.path])
            for t in ("query", "value"):
                if f"{layer.path}/{t}" in merged_kernels:
                    getattr(layer, f"{t}_kernel").assign(merged_kernels[f"{layer.path}/{t}"])
        out = run(lora, x)
        assert np.abs(out - ref).max() > 1e-3  # the low-rank update is in the outputs
        check(out, run(merged, x), "fp32", "LoRA")
    else:
        quant = keras_vit.ViT(config=cfg)
        quant.set_weights(model.get_weights())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras notes each layer type it does not quantize
            quant.quantize(kind)
        assert sum(layer.quantization_mode == kind for layer in quant._flatten_layers()) >= 2 * cfg.num_layers
        check(run(quant, x), ref, kind, f"model.quantize({kind!r})")


ONNX_OPTIONS = {"fp32": {}, "optimize": dict(optimize=True), "fp16": dict(quantize="fp16"),
                "dynamic": dict(quantize="dynamic"),
                # int8_agreement=0: every row runs its quantized graph (random weights give top-1 no
                # margin; the agreement gate is tested on the trained digits model).
                "static": dict(quantize="int8", calibration_images="digits", num_calibration_images=100,
                               int8_agreement=0.0),
                "static_optimize": dict(quantize="int8", optimize=True, calibration_images="digits",
                                      num_calibration_images=100, int8_agreement=0.0)}
PRECISION = {"fp32": "fp32", "optimize": "fp32", "fp16": "fp16", "dynamic": "int8", "int8": "int8_static",
             "static": "int8_onnx_static", "static_optimize": "int8_onnx_static"}


def _verified(index: int, path: str, kind: str) -> None:
    """Run the file in its runtime on the digits; the thresholds of its precision."""
    from keras_vit.export.verify import Runner

    model = row_model(index)
    x = row_images(index)
    runner = Runner(path)
    out = np.concatenate([runner(x[i:i + 25]) for i in range(0, len(x), 25)])
    check(out, run(model, x), PRECISION[kind], f"{os.path.basename(path)} {kind}")
    if PRECISION[kind] == "fp32":  # the library's own check agrees
        report = verify(model, path, images=x, num_images=len(x), batch_size=25, write_report=False)
        assert report["passed"], report["failures"]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(ROWS)), ids=[f"{i}-onnx-{r['onnx']}" for i, r in zip(IDS, ROWS)])
def test_onnx_in_onnxruntime(index, tmp_path):
    kind = ROWS[index]["onnx"]
    path = to_onnx(row_model(index), tmp_path / "m.onnx", **ONNX_OPTIONS[kind])
    _verified(index, path, kind)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(ROWS)), ids=[f"{i}-tflite-{r['tflite']}" for i, r in zip(IDS, ROWS)])
def test_tflite_in_litert(index, tmp_path):
    kind = ROWS[index]["tflite"]
    options = {} if kind == "fp32" else dict(quantize=kind)
    if kind == "int8":
        # compare_fp32 (a second, float32 conversion timed beside the int8 file) is the CLI's test
        options.update(representative_images="digits", num_calibration_images=100, compare_fp32=False)
    path = to_tflite(row_model(index), tmp_path / "m.tflite", **options)
    _verified(index, path, kind)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_backends_give_the_tensorflow_outputs(backend, tmp_path):
    """Each model rebuilt from its config under KERAS_BACKEND=jax / torch (one process each)
    with the same weights gives the TensorFlow outputs: max |diff| <= 1e-4, same top-1."""
    pytest.importorskip(backend)  # optional extras ([jax], torch from the [test] extra where it resolves)
    job = {"cases": [], "output": str(tmp_path / "out.json")}
    expected = {}
    for index in range(len(ROWS)):
        model = row_model(index)
        x = row_images(index, 16)
        name = IDS[index]
        np.save(tmp_path / f"{index}.npy", x)
        model.save_weights(tmp_path / f"{index}.weights.h5")
        expected[name] = run(model, x)
        job["cases"].append({"name": name, "config": model.vit_config.to_dict(), "inputs": str(tmp_path / f"{index}.npy"),
                             "weights": str(tmp_path / f"{index}.weights.h5")})
    out = run_job(job, tmp_path, backend, timeout=900)
    for name, ref in expected.items():
        check(out[name], ref, "fp32", f"{backend} {name}")  # include_top=False too: fp32 is exact
