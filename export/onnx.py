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

from keras_vit.export._common import (
    ExportError,
    PathLike,
    check_class_names,
    check_output_path,
    check_tensorflow_backend,
    metadata,
    resolve_model,
)
from keras_vit.export.onnx_graph import fuse_layer_norms, replace_erfc
from keras_vit.files import atomic_path

MIN_OPSET = 17  # LayerNormalization is a standard ONNX op from opset 17 on
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
    the standard LayerNormalization op (see `onnx_graph.fuse_layer_norms`).
    `optimize` runs onnxruntime's transformer optimizer (fusions such as SkipLayerNormalization
    and GELU); the result uses com.microsoft ops, so it is for onnxruntime only.
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
        replace_erfc(proto)
        fuse_layer_norms(proto)
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
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
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
