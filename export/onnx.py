"""Keras-vit model -> one .onnx file (tf2onnx through Keras' own `model.export(format="onnx")`).

The file takes `images` (float32 NHWC in [0, 255], dynamic batch) and returns `logits`; the
model's variant, image size, class names and the keras-vit version are in its metadata_props.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Optional, Sequence

from keras_vit.export._common import (ExportError, PathLike, check_class_names,
                                      check_output_path, check_tensorflow_backend, metadata, resolve_model)
from keras_vit.files import atomic_path

MIN_OPSET = 17  # LayerNormalization became a standard op in 17; the issue asks for 17 or newer
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def max_opset() -> int:
    """Newest opset tf2onnx can emit (onnxruntime >= 1.18, our floor, runs all of them)."""
    import tf2onnx.constants

    return max(tf2onnx.constants.OPSET_TO_IR_VERSION)


ONNX_QUANTIZE = ("fp16", "dynamic")


def to_onnx(model, path: PathLike, opset: int = MIN_OPSET, optimize: bool = False, fp16: bool = False,
            class_names: Optional[Sequence[str]] = None, quantize: Optional[str] = None) -> str:
    """Export a keras-vit model (or its .keras path) to ONNX at `path`; returns the path.

    Keras LayerNorms (the final one; the blocks write theirs out, see layers._layer_norm) become
    the standard LayerNormalization op (see `_fuse_layer_norms`).
    `optimize` runs onnxruntime's transformer optimizer (SkipLayerNorm and GELU fusions; its
    attention patterns do not match tf2onnx's einsum graph); the result uses com.microsoft
    ops, so it is for onnxruntime only.
    `fp16` (or quantize="fp16") stores weights and activations in float16 with float32
    `images`/`logits` kept. quantize="dynamic" is onnxruntime's dynamic int8 quantization
    (int8 weights, activations quantised per batch at run time; no calibration data needed).
    The file is written to a temporary name and renamed into place once complete and checked.
    """
    import onnx

    if quantize is not None and quantize not in ONNX_QUANTIZE:
        raise ExportError(f"ONNX quantize must be one of {', '.join(ONNX_QUANTIZE)} or None, got {quantize!r}")
    fp16 = fp16 or quantize == "fp16"
    dynamic = quantize == "dynamic"
    if fp16 and dynamic:
        raise ExportError("choose one of fp16 and dynamic int8 quantization, not both")
    model, cfg = resolve_model(model)
    check_tensorflow_backend("ONNX")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise ExportError(f"opset must be an integer from {MIN_OPSET} to {max_opset()}, got {opset!r}")
    names = check_class_names(class_names, cfg.num_classes)
    path = check_output_path(path, ".onnx")

    with tempfile.TemporaryDirectory() as work:
        raw = os.path.join(work, "raw.onnx")
        _convert(model, cfg, raw, opset)
        proto = onnx.load(raw)
        _rename_io(proto)
        _replace_erfc(proto)
        _fuse_layer_norms(proto)
        fused = {}
        if optimize or fp16:
            proto, fused = _optimize(proto, cfg, work, fuse=optimize, fp16=fp16)
        if dynamic:
            proto = _quantize_dynamic(proto, work)
        precision = "fp16" if fp16 else "dynamic" if dynamic else "fp32"
        meta = metadata(cfg, names, precision, "onnx")
        meta["opset"] = str(opset)
        meta["optimized"] = json.dumps({k: v for k, v in fused.items() if v}) if optimize else "false"
        onnx.helper.set_model_props(proto, meta)
        proto.doc_string = (f"keras-vit {meta['variant']} ({meta['image_size']}, {cfg.num_classes} classes, "
                            f"{precision}): {meta['input']} -> {meta['output']}")
        onnx.checker.check_model(proto, full_check=True)
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
    return path


def _convert(model, cfg, out_path: str, opset: int) -> None:
    import tensorflow as tf

    h, w = cfg.image_size
    spec = tf.TensorSpec((None, h, w, cfg.channels), tf.float32, name=INPUT_NAME)
    try:
        model.export(out_path, format="onnx", input_signature=[spec], opset_version=opset, verbose=False)
    except Exception as exc:  # noqa: BLE001 - converter failures become one line naming the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"tf2onnx could not convert the model: {first}") from exc


def _rename_io(proto) -> None:
    """Name the output `logits` (tf2onnx calls it Identity:0) and the batch dimension `batch`."""
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [OUTPUT_NAME if o == old else o for o in node.output]
        node.input[:] = [OUTPUT_NAME if i == old else i for i in node.input]
    proto.graph.output[0].name = OUTPUT_NAME
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"


def _replace_erfc(proto) -> int:
    """Rewrite the Erfc nodes tf2onnx leaves behind (ONNX has no Erfc op; tf.nn.gelu's exact form
    is 0.5 * x * erfc(-x / sqrt 2)) with Erf, which ONNX has. An exact GELU becomes
    x * ((erf(x * 0.7071) + 1) * 0.5), the TensorFlow pattern onnxruntime's optimizer fuses into
    one Gelu node; any other Erfc(y) becomes 1 - Erf(y). Returns the number of Erfc nodes replaced.
    (TFLite needs no rewrite: its converter fuses the erfc form into its GELU op.)"""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    erfcs = [n for n in graph.node if n.op_type == "Erfc" and n.domain in ("", "ai.onnx")]
    if not erfcs:
        return 0
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in graph.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}

    def const(name):
        """The scalar value of an initializer or Constant node output, else None."""
        if name in inits and inits[name].size == 1:
            return float(inits[name].reshape(-1)[0])
        n = producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute:
            value = numpy_helper.to_array(n.attribute[0].t)
            return float(value.reshape(-1)[0]) if value.size == 1 else None
        return None

    def sole_user(name, op):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and name not in graph_outputs else None

    def scalar(value, name):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    drop, replace = set(), {}
    for k, erfc in enumerate(erfcs):
        prefix = (erfc.name or erfc.output[0]) + f"/erf_{k}"
        scaled = producer.get(erfc.input[0])
        pair = None
        if scaled is not None and scaled.op_type == "Mul" and sole_user(scaled.output[0], "Erfc") is erfc:
            neg_in = [i for i in scaled.input if i in producer and producer[i].op_type == "Neg"]
            c = [const(i) for i in scaled.input if i not in neg_in]
            if len(neg_in) == 1 and len(c) == 1 and c[0] is not None and abs(c[0] - 0.5 ** 0.5) < 1e-6:
                neg = producer[neg_in[0]]
                x = neg.input[0]
                out = sole_user(erfc.output[0], "Mul")
                half = out and next((producer[i] for i in out.input if i != erfc.output[0] and i in producer), None)
                if (half is not None and half.op_type == "Mul" and x in half.input
                        and const(next(i for i in half.input if i != x)) == 0.5
                        and sole_user(half.output[0], "Mul") is out and sole_user(neg.output[0], "Mul") is scaled):
                    pair = (x, neg, scaled, half, out)
        if pair is not None:
            # erfc(-x c) = 1 + erf(x c): GELU(x) = x * ((erf(x c) + 1) * 0.5)
            x, neg, scaled, half, out = pair
            c_name = scalar(0.5 ** 0.5, prefix + "/inv_sqrt2")
            one, half_c = scalar(1.0, prefix + "/one"), scalar(0.5, prefix + "/half")
            nodes = [helper.make_node("Mul", [x, c_name], [prefix + "/xc"], name=prefix + "/Mul_c"),
                     helper.make_node("Erf", [prefix + "/xc"], [prefix + "/erf"], name=prefix + "/Erf"),
                     helper.make_node("Add", [prefix + "/erf", one], [prefix + "/cdf2"], name=prefix + "/Add_1"),
                     helper.make_node("Mul", [prefix + "/cdf2", half_c], [prefix + "/cdf"], name=prefix + "/Mul_half"),
                     helper.make_node("Mul", [x, prefix + "/cdf"], list(out.output), name=prefix + "/Mul_x")]
            drop.update(id(n) for n in (neg, scaled, erfc, half))
            replace[id(out)] = nodes
        else:
            one = scalar(1.0, prefix + "/one")
            replace[id(erfc)] = [
                helper.make_node("Erf", list(erfc.input), [prefix + "/erf"], name=prefix + "/Erf"),
                helper.make_node("Sub", [one, prefix + "/erf"], list(erfc.output), name=prefix + "/Sub")]
    nodes = []
    for n in graph.node:
        if id(n) in drop:
            continue
        nodes.extend(replace.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(erfcs)


def _fuse_layer_norms(proto) -> int:
    """Replace tf2onnx's decomposition of each Keras LayerNormalization (GlobalAveragePool mean
    and variance, Sqrt, Reciprocal, scale and shift) by the standard LayerNormalization op of
    opset 17. tf2onnx does not emit that op yet (onnx/tensorflow-onnx#2183), and neither its
    rewriter nor onnxruntime's TF LayerNorm fusion matches Keras 3's graph. Only exact matches
    on rank-3 tensors (where GlobalAveragePool averages the last axis) are replaced.
    Returns the number of fused LayerNorms."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    ranks = {}
    inferred = onnx.shape_inference.infer_shapes(proto)
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        if v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}

    def node(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(n, op):
        users = consumers.get(n.output[0], [])
        if len(users) != 1 or users[0].op_type != op or n.output[0] in graph_outputs:
            return None
        return users[0]

    def split(n, pred):
        """(input matching pred, the other input) of a binary node, or (None, None)."""
        a, b = n.input
        return (a, b) if pred(a) else (b, a) if pred(b) else (None, None)

    fused, drop, replace = 0, set(), {}
    for r in graph.node:
        if r.op_type != "Reciprocal":
            continue
        sqrt = node(r.input[0], "Sqrt")
        add_eps = sqrt and node(sqrt.input[0], "Add")
        if not add_eps:
            continue
        eps_name, var_name = split(add_eps, lambda x: x in inits)
        var = var_name and node(var_name, "GlobalAveragePool")
        sq = var and node(var.input[0], "Mul")
        if not sq or sq.input[0] != sq.input[1]:
            continue
        diff = node(sq.input[0], "Sub")
        mean = diff and node(diff.input[1], "GlobalAveragePool")
        if not mean or mean.input[0] != diff.input[0] or ranks.get(diff.input[0]) != 3:
            continue
        x = diff.input[0]
        scale = only_consumer(r, "Mul")
        gamma_name = scale and split(scale, lambda i: i in inits)[0]
        if not gamma_name:
            continue
        users = consumers.get(scale.output[0], [])
        mul_x = next((u for u in users if u.op_type == "Mul" and x in u.input), None)
        mul_mean = next((u for u in users if u.op_type == "Mul" and any(
            (p := node(i, "Neg")) is not None and p.input[0] == mean.output[0] for i in u.input)), None)
        if len(users) != 2 or not mul_x or not mul_mean:
            continue
        neg = next(producer[i] for i in mul_mean.input if i in producer and producer[i].op_type == "Neg")
        shift = only_consumer(mul_mean, "Add")
        beta_name = shift and split(shift, lambda i: i in inits)[0]
        out = beta_name and only_consumer(shift, "Add")
        if not out or mul_x.output[0] not in out.input or only_consumer(mul_x, "Add") is not out:
            continue
        gamma = numpy_helper.to_array(inits[gamma_name]).reshape(-1)
        beta = numpy_helper.to_array(inits[beta_name]).reshape(-1)
        eps = float(numpy_helper.to_array(inits[eps_name]).reshape(-1)[0])
        if gamma.shape != beta.shape:
            continue
        prefix = out.name or out.output[0]
        g_init = numpy_helper.from_array(gamma.astype(np.float32), prefix + "/LayerNorm_gamma")
        b_init = numpy_helper.from_array(beta.astype(np.float32), prefix + "/LayerNorm_beta")
        graph.initializer.extend([g_init, b_init])
        replace[id(out)] = onnx.helper.make_node(
            "LayerNormalization", [x, g_init.name, b_init.name], [out.output[0]], name=prefix + "/LayerNorm",
            axis=-1, epsilon=eps)
        drop.update(id(n) for n in (mean, neg, diff, sq, var, add_eps, sqrt, r, scale, mul_x, mul_mean, shift))
        fused += 1
    if fused:
        nodes = [replace.get(id(n), n) for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return fused


def _quantize_dynamic(proto, work: str):
    """onnxruntime's dynamic int8 quantization of the MatMuls (weights int8, activations per batch)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = os.path.join(work, "fp32.onnx"), os.path.join(work, "dynamic.onnx")
    onnx.save(proto, src)
    # Per-channel weight scales: half the logit error of per-tensor (3.6e-2 vs 6.5e-2 on Ti/16) at
    # the same speed. MatMuls only: the patch embedding as ConvInteger took 1.4 ms against 0.3 ms
    # in fp32 at batch 1 (Ti/16; int8 0.61x instead of 0.70x fp32's latency, BENCHMARKS.md).
    # DefaultTensorType: fused com.microsoft ops (after optimize) have no shape inference.
    # Only MatMuls by a 2-D weight: onnxruntime's DynamicQuantizeMatMul rejects the batched
    # (heads, head_dim, offsets) table of the relative position embedding at run time.
    dims = {t.name: len(t.dims) for t in proto.graph.initializer}
    batched = [n.name for n in proto.graph.node if n.op_type == "MatMul" and dims.get(n.input[1], 2) != 2]
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     nodes_to_exclude=batched, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return onnx.load(dst)


def _optimize(proto, cfg, work: str, fuse: bool, fp16: bool):
    """onnxruntime.transformers.optimizer fusions and/or float16 conversion (float32 I/O kept)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    src = os.path.join(work, "renamed.onnx")
    onnx.save(proto, src)
    if fuse:
        # "vit" expects a PyTorch producer and warns about tf2onnx; the fusions work regardless.
        opt_logger = logging.getLogger("onnxruntime.transformers.optimizer")
        level = opt_logger.level
        opt_logger.setLevel(logging.ERROR)
        try:
            optimized = optimize_model(src, model_type="vit", num_heads=cfg.num_heads,
                                       hidden_size=cfg.hidden_size, opt_level=0)
        except ImportError as exc:  # the optimizer's shape inference needs sympy
            raise ExportError(f"--optimize needs an extra package: {exc}") from None
        finally:
            opt_logger.setLevel(level)
        fused = optimized.get_fused_operator_statistics()
    else:
        from onnxruntime.transformers.onnx_model import OnnxModel

        optimized, fused = OnnxModel(proto), {}
    if fp16:
        optimized.convert_float_to_float16(keep_io_types=True)
        optimized.topological_sort()  # the I/O casts are appended at the end of the node list
    proto = optimized.model
    domains = {node.domain for node in proto.graph.node} - {"", "ai.onnx"}
    imported = {o.domain for o in proto.opset_import}
    for domain in sorted(domains - imported):  # fused ops (FastGelu, ...) live in com.microsoft
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return proto, fused
