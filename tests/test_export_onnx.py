"""ONNX export: every model family loads in onnxruntime and matches Keras on real images."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx  # a required dependency: a failed import fails the suite, it is not skipped
import onnxruntime as ort
import pytest
from export_helpers import DIGIT_NAMES, FAMILIES, full_ti16, small_model

from keras_vit.export import ExportError, to_onnx, verify
from keras_vit.export.images import load_images

FAMILY_PARAMS = list(FAMILIES) + ["hybrid"]


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_family_exports_and_matches_keras_at_batch_1_and_7(family, tmp_path):
    model = small_model(family)
    path = to_onnx(model, tmp_path / "m.onnx", class_names=DIGIT_NAMES)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["image_size"] == "32x32" and meta["precision"] == "fp32"
    assert json.loads(meta["class_names"]) == DIGIT_NAMES
    assert meta["keras_vit_version"] and meta["variant"]
    # the final Keras LayerNormalization is the standard opset-17 op; the blocks' LayerNorms are
    # written out on (tokens, features) (layers._layer_norm), measured faster in onnxruntime
    assert sum(n.op_type == "LayerNormalization" for n in proto.graph.node) == 1
    if family != "hybrid":  # the ResNet stem adds its own convolutions and GroupNorms
        assert len(proto.graph.node) < 150  # compact graph: no per-op shape plumbing
    for batch in (1, 7):
        report = verify(model, path, images="default", num_images=7, batch_size=batch, write_report=False)
        assert report["passed"], report["failures"]
        assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0
        assert report["latency_ms_per_batch"]["batch_size"] == batch


def test_export_after_keras_save_and_reload(tmp_path):
    import keras_vit

    model = small_model("learned_2d", seed=3)
    model.save(tmp_path / "m.keras")
    reloaded = keras_vit.load_model(tmp_path / "m.keras")
    path = to_onnx(reloaded, tmp_path / "reloaded.onnx")
    report = verify(model, path, images="photos", num_images=7, batch_size=7)
    assert report["passed"], report["failures"]
    # a path to the .keras file works as well
    path2 = to_onnx(str(tmp_path / "m.keras"), tmp_path / "from_path.onnx")
    assert verify(model, path2, images="digits", num_images=7, write_report=False)["passed"]


def test_opset_is_an_argument(tmp_path):
    model = small_model("none")
    proto = onnx.load(to_onnx(model, tmp_path / "m18.onnx", opset=18))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    with pytest.raises(ExportError, match="opset must be an integer from 17"):
        to_onnx(model, tmp_path / "m16.onnx", opset=16)


def test_fp16_and_optimized_exports_of_trained_digits_model(trained_digits, tmp_path):
    model, _ = trained_digits
    fp16 = to_onnx(model, tmp_path / "fp16.onnx", fp16=True)
    proto = onnx.load(fp16)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    report = verify(model, fp16, images="digits", num_images=360, batch_size=60)
    assert report["precision"] == "fp16" and report["top1_agreement"] >= 0.99, report["failures"]

    opt = to_onnx(model, tmp_path / "opt.onnx", optimize=True)
    proto = onnx.load(opt)
    ops = {n.op_type for n in proto.graph.node}
    assert {"FastGelu", "LayerNormalization", "Attention"} <= ops  # fused by onnxruntime's transformer optimizer
    fused = json.loads({p.key: p.value for p in proto.metadata_props}["optimized"])
    # one per block; the last block's attention has the class token as its only query and stays unfused
    assert fused["FastGelu"] == 2 and fused["Attention"] == 1
    report = verify(model, opt, images="digits", num_images=64, batch_size=32)
    assert report["passed"], report["failures"]  # still fp32 thresholds
    assert report["fused_ops"]["Attention"] == 1 and report["fused_ops"]["FastGelu"] == 2


@pytest.mark.parametrize("family", ["learned", "learned_2d", "sincos2d", "none", "gap",
                                    pytest.param("hybrid", marks=pytest.mark.slow), "dynamic_size", "relative",
                                    "no_qkv_bias"])
def test_optimize_fuses_attention_and_stays_within_fp32_thresholds(family, tmp_path):
    """optimize=True replaces each block's attention by onnxruntime's fused Attention op, except
    with relative position embeddings (a logit bias the op cannot compute); the last block of a
    class-token model (one query, the class token: the model computes that block on it alone)
    gets MultiHeadAttention (one query, every key). Either way the file matches Keras at the
    fp32 thresholds. Without query/key/value biases (qkv_bias=False) the fused ops get zero ones."""
    if family == "no_qkv_bias":
        model = small_model("learned", num_layers=2, qkv_bias=False)
    else:
        model = small_model("learned" if family == "dynamic_size" else family, num_layers=2)
    path = to_onnx(model, tmp_path / "opt.onnx", optimize=True, dynamic_size=family == "dynamic_size")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    expected = 0 if family == "relative" else 2 if family == "gap" else 1
    one_query = 0 if family in ("relative", "gap") else 1
    assert ops.count("Attention") == expected and ops.count("MultiHeadAttention") == one_query
    assert ops.count("Softmax") == 2 - expected - one_query
    report = verify(model, path, images="default", num_images=8, batch_size=4, write_report=False)
    assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0, report["failures"]
    assert report["fused_ops"].get("Attention", 0) == expected and report["fused_ops"]["FastGelu"] == 2
    assert report["fused_ops"].get("MultiHeadAttention", 0) == one_query
    if family == "dynamic_size":  # also checked at a non-square size against resize_model
        assert report["image_sizes"] and report["image_sizes"][0]["max_abs_diff"] <= 1e-4


def test_an_image_folder_is_read_as_training_reads_it(tmp_path):
    """The files a folder: dataset verifies and calibrates with are those training decodes: a .tiff
    beside the PNGs is left out as training leaves it out (it was picked and refused: 'cannot read')."""
    from PIL import Image

    from keras_vit.data.folders import IMAGE_EXTENSIONS

    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "0.tiff")
    assert ".tiff" not in IMAGE_EXTENSIONS
    images = load_images(f"folder:{tmp_path}", 16, 3, 8)
    assert images.shape == (3, 16, 16, 3)


def test_the_last_block_of_a_class_token_model_runs_on_the_class_token_alone(tmp_path):
    """classifier="token": the last block's MLP sees one token per image, in Keras and in the
    plain ONNX export; the logits equal the full computation (every token through the last
    block, then token 0), which forward_intermediates still gives."""
    import keras

    model = small_model("learned", num_layers=2)
    images = load_images("digits", 32, 3, 5)
    assert tuple(model.get_layer("encoder_norm").output.shape) == (None, 1, 192)
    tokens = model.forward_intermediates(images)["tokens"]
    assert tuple(tokens.shape) == (5, 65, 192)  # every token of the 8x8 grid and the class token
    full = keras.ops.convert_to_numpy(model.get_layer("head")(tokens[:, 0]))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)), full, atol=1e-5)
    assert tuple(small_model("gap", num_layers=2).get_layer("encoder_norm").output.shape) == (None, 64, 192)

    from onnx import helper

    proto = onnx.load(to_onnx(model, tmp_path / "m.onnx"))
    mlp_in = [n for n in proto.graph.node if n.op_type == "MatMul" and any(
        list(t.dims) == [192, 768] for t in proto.graph.initializer if t.name == n.input[1])][-1].output[0]
    proto.graph.output.append(helper.make_tensor_value_info(mlp_in, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, hidden = session.run(None, {"images": images})
    assert hidden.shape == (5, 768)  # the last block's MLP: the class token only
    np.testing.assert_allclose(logits, full, atol=1e-4)


def test_dynamic_int8_export_of_trained_digits_model(trained_digits, tmp_path):
    model, _ = trained_digits
    path = to_onnx(model, tmp_path / "int8.onnx", quantize="dynamic")
    proto = onnx.load(path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)  # int8 weights
    assert {p.key: p.value for p in proto.metadata_props}["precision"] == "dynamic"
    report = verify(model, path, images="digits", num_images=360, batch_size=60)
    assert report["precision"] == "dynamic" and report["top1_agreement"] >= 0.97, report["failures"]
    with pytest.raises(ExportError, match="quantize must be one of none, fp16, dynamic, int8 or None, got .int4."):
        to_onnx(model, tmp_path / "bad.onnx", quantize="int4")
    # with optimize, the fused Attention ops are quantized too (QAttention)
    fused = to_onnx(model, tmp_path / "opt-int8.onnx", quantize="dynamic", optimize=True)
    assert [n.op_type for n in onnx.load(fused).graph.node].count("QAttention") == 1
    report = verify(model, fused, images="digits", num_images=360, batch_size=60)
    assert report["top1_agreement"] >= 0.97 and report["fused_ops"]["QAttention"] == 1, report["failures"]


def test_rejects_non_keras_vit_models_and_bad_paths(tmp_path):
    import keras

    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ExportError, match="not a keras-vit model"):
        to_onnx(plain, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        to_onnx(tmp_path / "missing.keras", tmp_path / "x.onnx")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot create output folder"):
        to_onnx(small_model(), blocker / "x.onnx")
    with pytest.raises(ExportError, match="must end with .onnx"):
        to_onnx(small_model(), tmp_path / "x.tflite")
    with pytest.raises(ExportError, match="3 class names"):
        to_onnx(small_model(), tmp_path / "x.onnx", class_names=["a", "b", "c"])


def test_existing_file_replaced_only_by_a_complete_one(tmp_path, monkeypatch):
    import keras_vit.export.onnx as onnx_export

    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous export")

    def broken(*args, **kwargs):
        raise ExportError("tf2onnx could not convert the model: simulated failure")

    monkeypatch.setattr(onnx_export, "_convert", broken)
    with pytest.raises(ExportError, match="simulated"):
        to_onnx(small_model(), target)
    assert target.read_bytes() == b"previous export"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # no temporary left behind
    monkeypatch.undo()
    to_onnx(small_model(), target)
    assert onnx.load(str(target)).graph.output[0].name == "logits"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.slow
def test_full_ti16_at_224_matches_keras(tmp_path):
    """The real Ti/16 (12 blocks, 224px, 1000 classes) on photos, batch 1 and 7."""
    model = full_ti16()
    path = to_onnx(model, tmp_path / "ti16.onnx")
    for batch in (1, 7):
        report = verify(model, path, images="photos", num_images=14, batch_size=batch)
        assert report["passed"], report["failures"]


EXACT_GELU_FAMILIES = {"learned": {}, "relative": dict(pos_embedding="relative"),
                       "learned_2d-gap": dict(pos_embedding="learned_2d", classifier="gap"),
                       "sincos2d": dict(pos_embedding="sincos2d")}


@pytest.mark.parametrize("family", list(EXACT_GELU_FAMILIES) + [pytest.param("hybrid", marks=pytest.mark.slow)])
def test_exact_gelu_exports_as_erf_and_matches_keras(family, tmp_path):
    """tf.nn.gelu(approximate=False) traces to Erfc, which ONNX lacks; the file uses Erf instead."""
    if family == "hybrid":
        model = small_model("hybrid", gelu_approximate=False)
    else:
        model = small_model("learned", gelu_approximate=False, **EXACT_GELU_FAMILIES[family])
    path = to_onnx(model, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "Erfc" not in ops and ops.count("Erf") == model.vit_config.num_layers
    report = verify(model, path, images="default", num_images=6, batch_size=3, write_report=False)
    assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0, report["failures"]
    if family == "learned":  # onnxruntime's optimizer recognises the rewritten pattern as a GELU
        opt = to_onnx(model, tmp_path / "opt.onnx", optimize=True)
        ops = {n.op_type for n in onnx.load(opt).graph.node}
        assert ops & {"Gelu", "BiasGelu"} and not ops & {"Erf", "Erfc"}
        report = verify(model, opt, images="default", num_images=6, batch_size=3, write_report=False)
        assert report["max_abs_diff"] <= 1e-4 and report["top1_agreement"] == 1.0, report["failures"]


def test_erfc_outside_gelu_becomes_one_minus_erf():
    """A lone Erfc (not tf.nn.gelu's pattern) is rewritten as 1 - Erf(y); values match math.erfc."""
    import math

    from onnx import TensorProto, helper

    from keras_vit.export.onnx_graph import replace_erfc

    graph = helper.make_graph([helper.make_node("Erfc", ["y"], ["z"], name="erfc")], "g",
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [5])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert replace_erfc(proto) == 1
    onnx.checker.check_model(proto, full_check=True)
    y = np.array([-3.0, -0.5, 0.0, 0.7, 2.0], np.float32)
    z = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"y": y})[0]
    np.testing.assert_allclose(z, [math.erfc(v) for v in y], atol=1e-6)


def test_dynamic_int8_export_of_relative_position_model_runs(tmp_path):
    """The relative-position table (a batched 3-D MatMul weight) stays float; the rest is int8."""
    model = small_model("relative")
    path = to_onnx(model, tmp_path / "int8.onnx", quantize="dynamic")
    proto = onnx.load(path)
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer) >= 4  # qkv, out, MLP x2
    report = verify(model, path, images="default", num_images=8, batch_size=4, write_report=False)
    assert report["top1_agreement"] >= 0.75 and report["max_abs_diff"] < 0.1 * np.abs(model.predict(
        load_images("default", 32, 3, 8), verbose=0)).max(), report


def test_residual_stream_stays_on_tokens_by_features(tmp_path):
    """The plain file's residual adds run on (tokens, features): two Reshapes a block remain (to
    the 5-D QKV layout and back), against eight as converted; logits still match Keras."""
    model = small_model("learned", num_layers=3)
    proto = onnx.load(to_onnx(model, tmp_path / "m.onnx"))
    reshapes = [n for n in proto.graph.node if n.op_type == "Reshape"]
    # 2 a block; + the patch grid, the first block's input, and 3 around the class-token slice
    assert len(reshapes) <= 2 * 3 + 5, [n.name for n in reshapes]
    images = load_images("digits", 32, 3, 4)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": images})[0], model.predict(images, verbose=0), atol=1e-4)


@pytest.mark.parametrize("z_shape,moved", [(["b", 4, 8], 1), ([1, 4, 8], 0), (["b", 1, 8], 0)])
def test_residual_stream_2d_leaves_broadcasting_adds_alone(z_shape, moved):
    """Add(z, Reshape(y, (-1, 4, 8))) moves to rank 2 only when z provably has the Reshape's shape
    (an Add that broadcasts z over the batch or the tokens stays as it is); values unchanged."""
    from onnx import TensorProto, helper, numpy_helper

    from keras_vit.export.onnx_graph import residual_stream_2d

    shape3 = numpy_helper.from_array(np.array([-1, 4, 8], np.int64), "shape3")
    flat = numpy_helper.from_array(np.array([-1, 8], np.int64), "flat")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["y", "shape3"], ["y3"], name="to3d"),
         helper.make_node("Add", ["z", "y3"], ["s"], name="residual"),
         helper.make_node("Reshape", ["s", "flat"], ["s2"], name="to2d"),
         helper.make_node("Relu", ["s2"], ["out"], name="relu")], "g",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, z_shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 8])], [shape3, flat])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feed = {"y": rng.normal(size=(8, 8)).astype(np.float32),
            "z": rng.normal(size=[2 if d == "b" else d for d in z_shape]).astype(np.float32)}
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert residual_stream_2d(proto) == moved
    onnx.checker.check_model(proto, full_check=True)
    after = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_array_equal(after, before)
    assert sum(n.op_type == "Reshape" for n in proto.graph.node) == (2 if not moved else 1)


def test_static_int8_that_keeps_everything_float_is_refused(tmp_path):
    """When the agreement gate leaves no MatMul in int8 (here: an unreachable 101% on a 2-block
    model, whose first and last blocks are all its blocks), the export says so in one line and
    writes no file, instead of a float32 file called int8."""
    model = small_model("learned", num_layers=2)
    with pytest.raises(ExportError, match=r"static int8 keeps no MatMul in int8: .* under 101%"):
        to_onnx(model, tmp_path / "m.onnx", quantize="int8", calibration_images="digits",
                num_calibration_images=40, int8_agreement=1.01)
    assert not (tmp_path / "m.onnx").exists()


def test_static_int8_keeps_both_heads_of_a_distilled_model_float(tmp_path):
    """DeiT's two heads (head and head_dist, averaged into the logits) both stay float, as the metadata's
    kept_float says; the blocks' GEMMs are int8."""
    model = small_model("learned", distilled=True)
    path = to_onnx(model, tmp_path / "m.onnx", quantize="int8", calibration_images="digits", num_calibration_images=40)
    nodes = onnx.load(path).graph.node
    heads = {n.name: n.op_type for n in nodes if "/head" in n.name and n.op_type in ("MatMul", "MatMulIntegerToFloat")}
    assert sorted(heads.values()) == ["MatMul", "MatMul"], heads
    assert any(n.op_type == "MatMulIntegerToFloat" and "encoderblock_0" in n.name for n in nodes)
    gate = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["int8_gate"])
    assert gate["check_images"] == 10 and gate["held_out"] is True  # a quarter of 40, none of them calibrating


def test_metadata_gives_the_mean_and_std_the_model_applies(tmp_path):
    """The file's mean/std (on [0, 255] pixels) applied by hand equal the model's own preprocessing: 127.5 by
    default, 255 x pixel_mean / pixel_std where the model has them (ImageNet's here)."""
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    for options in ({}, dict(pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))):
        model = small_model("learned", **options)
        meta = {p.key: p.value for p in onnx.load(to_onnx(model, tmp_path / "m.onnx")).metadata_props}
        mean, std = np.asarray(json.loads(meta["mean"])), np.asarray(json.loads(meta["std"]))
        inside = keras.ops.convert_to_numpy(model.get_layer("preprocessing")(x))
        np.testing.assert_allclose((x - mean) / std, inside, rtol=1e-5, atol=1e-5)
