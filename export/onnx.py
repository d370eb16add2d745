"""Keras-vit model -> one .onnx file (tf2onnx through Keras' own `model.export(format="onnx")`).

The file takes `images` (float32 NHWC, or NCHW with layout="nchw", in [0, 255], dynamic batch;
with dynamic_size=True also dynamic height and width) and returns `logits`; the model's
variant, image size, class names, mean/std and the keras-vit version are in its metadata_props.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Optional, Sequence, Tuple

import numpy as np

from keras_vit.export._common import (
    ExportError,
    PathLike,
    check_class_names,
    check_layout,
    check_not_keras_quantized,
    check_output_path,
    check_tensorflow_backend,
    metadata,
    output_name,
    resolve_model,
)
from keras_vit.export.onnx_fusion import fuse_attention
from keras_vit.export.onnx_graph import fuse_layer_norms, replace_erfc, residual_stream_2d
from keras_vit.export.onnx_int8 import quantize_dynamic, quantize_static
from keras_vit.files import atomic_path

MIN_OPSET = 17  # LayerNormalization is a standard ONNX op from opset 17 on
INPUT_NAME = "images"


def max_opset() -> int:
    """Newest opset tf2onnx can emit (onnxruntime >= 1.18, our floor, runs all of them)."""
    import tf2onnx.constants

    return max(tf2onnx.constants.OPSET_TO_IR_VERSION)


ONNX_QUANTIZE = ("fp16", "dynamic", "int8")
INT8_AGREEMENT = 0.99  # static int8 keeps more in float until this top-1 agreement with fp32 holds


def to_onnx(model, path: PathLike, opset: int = MIN_OPSET, optimize: bool = False, fp16: bool = False,
            class_names: Optional[Sequence[str]] = None, quantize: Optional[str] = None,
            dynamic_size: bool = False, layout: str = "nhwc", interpolation: Optional[str] = None,
            calibration_images=None, num_calibration_images: int = 300,
            int8_agreement: float = INT8_AGREEMENT) -> str:
    """Export a keras-vit model (or its .keras path) to ONNX at `path`; returns the path.

    `dynamic_size`: the file takes any height and width divisible by the input stride; the
    position embeddings are resampled in the graph with `interpolation` (default: the model's
    pos_interpolation, "linear" as in `keras_vit.resize_model`). `layout="nchw"` takes
    (batch, channels, height, width) images (a Transpose in front of the graph).

    Keras LayerNorms (the final one; the blocks write theirs out, see layers._layer_norm) become
    the standard LayerNormalization op (see `onnx_graph.fuse_layer_norms`).
    `optimize` replaces each self-attention by onnxruntime's fused Attention op
    (`onnx_fusion.fuse_attention`; not with relative position embeddings, whose logit bias
    the op cannot take; the one-query attention of a class-token model's last block becomes
    MultiHeadAttention), then runs
    onnxruntime's transformer optimizer (LayerNorm, GELU fusions); the result uses
    com.microsoft ops, so it is for onnxruntime only.
    `fp16` (or quantize="fp16") stores weights and activations in float16 with float32
    `images`/`logits` kept. quantize="dynamic" is onnxruntime's dynamic int8 quantization
    (int8 weights, activations quantised per batch at run time; no calibration data needed;
    with `optimize` the fused Attention ops become QAttention).
    quantize="int8" is static int8 (`onnx_int8.quantize_static`): int8 weights per channel and
    uint8 activations whose scales are calibrated on `num_calibration_images` of
    `calibration_images` (an array, or a source name for `keras_vit.export.images.load_images`,
    e.g. "digits") and fixed in the file: a QuantizeLinear and a MatMulIntegerToFloat per GEMM
    (com.microsoft, so for onnxruntime only), QAttention with `optimize`. The patch embedding,
    LayerNorms, softmax, GELU, the attention products and the head stay float; when top-1
    agreement with the fp32 graph on held-out calibration images is below `int8_agreement`, the
    first and last blocks stay float too (the metadata lists what was).
    The file is written to a temporary name and renamed into place once complete and checked.
    """
    import onnx

    fp16, dynamic, static = _precision_flags(quantize, fp16, optimize, calibration_images)
    if optimize or fp16 or dynamic or static:  # before the conversion's seconds: one line naming the extra
        _need_onnxruntime("--optimize" if optimize else "fp16" if fp16 else
                          f"{'static' if static else 'dynamic'} int8 quantization (quantize={quantize!r})")
    model, cfg, layout = _export_model(model, layout, dynamic_size, interpolation)
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= max_opset():
        raise ExportError(f"opset must be an integer from {MIN_OPSET} to {max_opset()}, got {opset!r}")
    names = check_class_names(class_names, cfg.num_classes, model)
    path = check_output_path(path, ".onnx")

    with tempfile.TemporaryDirectory() as work:
        proto = _plain_graph(model, cfg, work, opset, layout)
        calibration = (calibration_images, num_calibration_images, int8_agreement)
        proto, fused, int8_info = _onnxruntime_passes(proto, cfg, work, layout, quantize, optimize, fp16, calibration)
        precision = "fp16" if fp16 else "dynamic" if dynamic else "int8" if static else "fp32"
        meta = metadata(cfg, names, precision, "onnx", dynamic_size=cfg.dynamic_size, layout=layout)
        meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in int8_info.items()})
        meta["opset"] = str(opset)
        meta["optimized"] = json.dumps({k: v for k, v in fused.items() if v}) if optimize else "false"
        _describe(proto, meta, cfg)
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
    return path


def _plain_graph(model, cfg, work: str, opset: int, layout: str):
    """The converted graph with our rewrites: `images` / `logits` names, an NCHW input when
    asked, Erf for Erfc, one LayerNormalization op per Keras LayerNorm and the residual stream
    kept on (tokens, features) (`onnx_graph.residual_stream_2d`)."""
    import onnx

    raw = os.path.join(work, "raw.onnx")
    _convert(model, cfg, raw, opset)
    proto = onnx.load(raw)
    _rename_io(proto, output_name(cfg), cfg.dynamic_size)
    if layout == "nchw":
        _nchw_input(proto)
    replace_erfc(proto)
    fuse_layer_norms(proto)
    residual_stream_2d(proto)
    return proto


def _onnxruntime_passes(proto, cfg, work: str, layout: str, quantize: Optional[str], optimize: bool, fp16: bool,
                        calibration: tuple) -> Tuple[object, dict, dict]:
    """The graph after onnxruntime's passes the options ask for: attention fusion and the
    optimizer (`optimize`), float16, dynamic or static int8; with the fused-op counts and what
    static int8 kept float. `calibration`: (images source, number of images, int8 agreement)."""
    fused, int8_info = {}, {}
    if optimize or fp16:
        proto, fused = _optimize(proto, cfg, work, fuse=optimize, fp16=fp16)
    if quantize == "dynamic":
        proto = quantize_dynamic(proto, work)
    if quantize == "int8":
        source, num_images, agreement = calibration
        proto, int8_info = quantize_static(proto, work, _calibration_images(cfg, layout, source, num_images), agreement)
    return proto, fused, int8_info


def _calibration_images(cfg, layout: str, source, num_images: int) -> np.ndarray:
    """Calibration images at the model's size from `source` (the training split), in the file's layout."""
    from keras_vit.export.images import load_images

    images = load_images(source, cfg.image_size, cfg.channels, num_images, split="train")
    return images.transpose(0, 3, 1, 2) if layout == "nchw" else images


def _describe(proto, meta: dict, cfg) -> None:
    """Set the file's metadata and one-line description, then check the whole model."""
    import onnx

    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"keras-vit {meta['variant']} ({meta['image_size']}, {cfg.num_classes} classes, "
                        f"{meta['precision']}): {meta['input']} -> {meta['output']}")
    onnx.checker.check_model(proto, full_check=True)


def _precision_flags(quantize: Optional[str], fp16: bool, optimize: bool, calibration_images) -> Tuple[bool, bool, bool]:
    """(fp16, dynamic int8, static int8) from the options; ExportError for combinations that do not go together."""
    if quantize not in (None, "none") and quantize not in ONNX_QUANTIZE:
        raise ExportError(f"ONNX quantize must be one of none, {', '.join(ONNX_QUANTIZE)} or None, got {quantize!r}")
    fp16 = fp16 or quantize == "fp16"
    dynamic = quantize == "dynamic"
    static = quantize == "int8"
    if static and calibration_images is None:
        raise ExportError("int8 export needs calibration data: pass calibration_images "
                          "(an array, a dataset name such as 'digits', or folder:PATH)")
    if static and fp16:
        raise ExportError("choose one of fp16 and static int8 quantization, not both")
    if fp16 and dynamic:
        raise ExportError("choose one of fp16 and dynamic int8 quantization, not both")
    return fp16, dynamic, static


def _export_model(model, layout: str, dynamic_size: bool, interpolation: Optional[str]):
    """(model, its config, layout) to convert: the model resolved from a path, made one for any
    image size (resampling in the graph with `interpolation`) when `dynamic_size` asks."""
    model, cfg = resolve_model(model)
    layout = check_layout(layout)
    if not isinstance(dynamic_size, bool):
        raise ExportError(f"dynamic_size must be True or False, got {dynamic_size!r}")
    if interpolation is not None and not dynamic_size and not cfg.dynamic_size:
        raise ExportError("interpolation applies with dynamic_size=True only")
    check_tensorflow_backend("ONNX")
    check_not_keras_quantized(model, "ONNX export")
    if dynamic_size or cfg.dynamic_size:
        from keras_vit.vit import dynamic_model

        try:
            model = dynamic_model(model, interpolation)
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        cfg = model.vit_config
    return model, cfg, layout


def _convert(model, cfg, out_path: str, opset: int) -> None:
    import tensorflow as tf

    h, w = (None, None) if cfg.dynamic_size else cfg.image_size
    spec = tf.TensorSpec((None, h, w, cfg.channels), tf.float32, name=INPUT_NAME)
    try:
        model.export(out_path, format="onnx", input_signature=[spec], opset_version=opset, verbose=False)
    except Exception as exc:  # noqa: BLE001 - converter failures become one line naming the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"tf2onnx could not convert the model: {first}") from exc


def _rename_io(proto, name: str, dynamic_size: bool = False) -> None:
    """Name the output `name` (`logits`, or `features` without a head; tf2onnx calls it Identity:0),
    the batch dimension `batch` and,
    with dynamic_size, the image dimensions `height` and `width`."""
    old = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [name if o == old else o for o in node.output]
        node.input[:] = [name if i == old else i for i in node.input]
    proto.graph.output[0].name = name
    for value in (proto.graph.input[0], proto.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    if dynamic_size:
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        for i, name in ((1, "height"), (2, "width")):
            dims[i].Clear()
            dims[i].dim_param = name


def _nchw_input(proto) -> None:
    """Make the `images` input NCHW: a Transpose to NHWC in front of the graph (onnxruntime
    cancels it against the converter's own NHWC -> NCHW transpose before the patch Conv)."""
    from onnx import helper

    graph = proto.graph
    value = graph.input[0]
    inner = INPUT_NAME + "_nhwc"
    for node in graph.node:
        node.input[:] = [inner if i == value.name else i for i in node.input]
    dims = value.type.tensor_type.shape.dim
    b, h, w, c = [d.dim_param or d.dim_value for d in dims]
    new_input = helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, [b, c, h, w])
    graph.node.insert(0, helper.make_node("Transpose", [value.name], [inner], name="images_nchw_to_nhwc",
                                          perm=[0, 2, 3, 1]))
    graph.input.remove(value)
    graph.input.insert(0, new_input)


def _need_onnxruntime(what: str) -> None:
    """ExportError naming the extra to install when onnxruntime (its optimizer, quantizer) is missing."""
    from keras_vit.export.runner import have_onnxruntime

    if not have_onnxruntime():
        raise ExportError(f"{what} needs onnxruntime: pip install 'keras-vit[cpu]' (or 'keras-vit[gpu]')")


def _optimize(proto, cfg, work: str, fuse: bool, fp16: bool):
    """onnxruntime.transformers.optimizer fusions and/or float16 conversion (float32 I/O kept)."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    if fuse:
        # onnxruntime's own ViT attention fusion expects PyTorch's graph: ours is rewritten here.
        fuse_attention(proto, cfg.num_heads)
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
