"""int8 ONNX graphs for onnxruntime: dynamic (activation scales computed per call) and static
(activation scales calibrated on images, then fixed in the file).

Both start from onnxruntime's dynamic quantizer, whose graph onnxruntime runs with its fused
int8 kernels (DynamicQuantizeMatMul, QAttention). Static int8 then replaces each
DynamicQuantizeLinear by a QuantizeLinear with the calibrated scale and zero point, and each
MatMulInteger -> Cast -> Mul(scales) [-> Add(bias)] by one com.microsoft MatMulIntegerToFloat:
two nodes per GEMM, no min/max pass over the activations. onnxruntime's QDQ form of the same
quantization ran each MatMul as QLinearMatMul with a Dequantize, a bias Add and a Quantize
around it: 0.63x fp32 latency against 0.55x for this graph (ViT-Ti/16, batch 1, BENCHMARKS.md).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

from keras_vit.export._common import ExportError

# Ops whose weight input onnxruntime's dynamic quantizer turns int8: the MatMuls, and the fused
# Attention of an optimized graph (QAttention: its QKV projection in int8).
QUANTIZED_OPS = ("MatMul", "Attention")


def quantize_dynamic(proto, work: str, exclude: Sequence[str] = ()):
    """onnxruntime's dynamic int8 quantization: weights int8 per output channel, activations
    quantized per call; `exclude` names nodes to keep float."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    src, dst = os.path.join(work, "fp32.onnx"), os.path.join(work, "dynamic.onnx")
    onnx.save(proto, src)
    # Per-channel weight scales: half the logit error of per-tensor (3.6e-2 vs 6.5e-2 on Ti/16) at
    # the same speed. MatMuls only: the patch embedding as ConvInteger took 1.4 ms against 0.3 ms
    # in fp32 at batch 1 (Ti/16; int8 0.61x instead of 0.70x fp32's latency, BENCHMARKS.md).
    # DefaultTensorType: fused com.microsoft ops (after optimize) have no shape inference.
    ort_quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(QUANTIZED_OPS),
                         nodes_to_exclude=list(exclude) + _batched_weight_matmuls(proto),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return onnx.load(dst)


def _batched_weight_matmuls(proto) -> List[str]:
    """MatMuls by a weight that is not 2-D: onnxruntime's DynamicQuantizeMatMul rejects the
    batched (heads, head_dim, offsets) table of the relative position embedding at run time."""
    dims = {t.name: len(t.dims) for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and dims.get(n.input[1], 2) != 2]


def quantize_static(proto, work: str, images: np.ndarray, agreement: float) -> Tuple[object, Dict[str, object]]:
    """Static int8: activation ranges calibrated (min/max) on 3/4 of `images`; the other quarter
    checks top-1 agreement with the float graph (a single image does both; the gate's "held_out"
    says). Stages keep more in float until the agreement holds: (1) the head; (2) + the first and
    last blocks. The attention products (Q K^T, A V), LayerNorms, softmax, GELU and the patch
    embedding stay float throughout. Returns (proto, what the metadata records)."""
    import onnx

    n_cal = max(1, len(images) * 3 // 4)
    held_out = len(images) > n_cal  # one image: it calibrates and checks (the gate says so)
    calibrate, check = images[:n_cal], images[n_cal:] if held_out else images
    input_name = proto.graph.input[0].name
    inits = {t.name for t in proto.graph.initializer}
    weighted = [n.name for n in proto.graph.node
                if n.op_type in QUANTIZED_OPS and any(i in inits for i in n.input[1:2])]
    outside = [n for n in weighted if not re.search(r"encoderblock_\d+", n)]
    # the classifier heads (DeiT's head_dist too: half of its averaged logits), else the last GEMM (features)
    head = [n for n in outside if re.search(r"(^|/)head(_dist)?(_\d+)?/", n)] or [n for n in outside if n == weighted[-1]]
    blocks = sorted({m.group(0) for m in (re.search(r"encoderblock_\d+", n) for n in weighted) if m},
                    key=lambda b: int(b.rsplit("_", 1)[1]))
    edge = [n for n in weighted if blocks and re.search(rf"({blocks[0]}|{blocks[-1]})(?!\d)", n)]
    reference = _top1(proto, input_name, check)
    stages = [head, head + edge]
    first = 0.0  # the agreement with the blocks' MatMuls in int8
    for stage, keep in enumerate(stages):
        dynamic = quantize_dynamic(proto, work, exclude=keep)
        ranges = activation_ranges(dynamic, input_name, calibrate)
        static = fix_activation_scales(dynamic, ranges)
        agree = float(np.mean(_top1(static, input_name, check) == reference))
        first = agree if stage == 0 else first
        if agree >= agreement or stage == len(stages) - 1:
            break
    int8 = sum(n.op_type in ("MatMulIntegerToFloat", "QAttention") for n in static.graph.node)
    if int8 == 0:  # a file called int8 that computes everything in float would mislead
        raise ExportError(f"static int8 keeps no MatMul in int8: with the blocks' MatMuls int8, top-1 agreement "
                          f"with float32 on {len(check)} {'held-out ' if held_out else ''}calibration images was "
                          f"{first:.1%}, under "
                          f"{agreement:.0%}, and the first and last blocks are all the model has; use "
                          "--quantize dynamic, or more calibration images")
    info = {"calibration_images": str(len(calibrate)), "int8_matmuls": int8, "float_weight_matmuls": len(keep),
            "int8_stage": stage + 1, "int8_scheme": "static: calibrated QuantizeLinear + MatMulIntegerToFloat"
            + (" / QAttention" if any(n.op_type == "QAttention" for n in static.graph.node) else ""),
            "int8_gate": {"top1_agreement_vs_fp32": agree, "threshold": agreement, "check_images": int(len(check)),
                          "held_out": held_out},
            "kept_float": "patch embedding, LayerNorm, softmax, GELU, head, attention products" + (
                ", first and last blocks" if stage >= 1 else "")}
    onnx.checker.check_model(static)
    return static, info


def activation_ranges(proto, input_name: str, images: np.ndarray, batch: int = 16) -> Dict[str, Tuple[float, float]]:
    """(min, max) over `images` of each tensor a DynamicQuantizeLinear reads. (onnxruntime's
    calibrator selects tensors by their inferred type, which the outputs of fused com.microsoft
    ops lack; here every such tensor is float by the op's definition.)"""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    names = list(dict.fromkeys(n.input[0] for n in probe.graph.node if n.op_type == "DynamicQuantizeLinear"))
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in names if t not in outputs and t != input_name)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = [o.name for o in session.get_outputs()]
    low = dict.fromkeys(names, np.inf)
    high = dict.fromkeys(names, -np.inf)
    for i in range(0, len(images), batch):
        feed = images[i:i + batch]
        values = dict(zip(fetched, session.run(None, {input_name: feed})), **{input_name: feed})
        for t in names:
            low[t] = min(low[t], float(values[t].min()))
            high[t] = max(high[t], float(values[t].max()))
    return {t: (low[t], high[t]) for t in names}


def fix_activation_scales(proto, ranges: Dict[str, Tuple[float, float]]):
    """The dynamic graph with each DynamicQuantizeLinear replaced by a QuantizeLinear at the
    uint8 scale and zero point of its input's calibrated range, and each MatMulInteger chain
    that dequantizes its result by one MatMulIntegerToFloat (bias included)."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    from keras_vit.export.onnx_graph import GraphIndex

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = GraphIndex(out)
    qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.UINT8)
    drop, replace, renamed = set(), {}, {}
    for dq in [n for n in g.graph.node if n.op_type == "DynamicQuantizeLinear"]:
        low, high = ranges[dq.input[0]]
        zero_point, scale = compute_scale_zp(np.float32(low), np.float32(high), qmin, qmax)
        scale_name, zp_name = f"{dq.output[0]}_static_scale", f"{dq.output[0]}_static_zero_point"
        g.graph.initializer.extend([numpy_helper.from_array(np.asarray(scale, np.float32).reshape(()), scale_name),
                                    numpy_helper.from_array(np.asarray(zero_point, np.uint8).reshape(()), zp_name)])
        renamed.update({dq.output[1]: scale_name, dq.output[2]: zp_name})
        replace[id(dq)] = [helper.make_node("QuantizeLinear", [dq.input[0], scale_name, zp_name], [dq.output[0]],
                                            name=dq.name + "_static")]
        for user in g.consumers.get(dq.output[0], []):
            if user.op_type == "MatMulInteger":
                fused = _matmul_integer_to_float(g, user, dq, scale_name, zp_name)
                if fused is not None:
                    node, chain = fused
                    replace[id(user)] = [node]
                    drop.update(id(n) for n in chain)
    for n in g.graph.node:  # QAttention and anything else reading the per-call scale / zero point
        n.input[:] = [renamed.get(i, i) for i in n.input]
    g.rewrite(drop, replace)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def _matmul_integer_to_float(g, matmul, dq, scale_name: str, zp_name: str):
    """(MatMulIntegerToFloat node, the nodes it replaces) for MatMulInteger(A, B) -> Cast ->
    Mul(Mul(a_scale, b_scale)) [-> Add(bias initializer)], else None."""
    from onnx import helper

    cast = g.sole_user(matmul.output[0], "Cast")
    mul = cast and g.sole_user(cast.output[0], "Mul")
    scales = mul and g.producer.get(next(i for i in mul.input if i != cast.output[0]))
    if not mul or scales is None or scales.op_type != "Mul" or dq.output[1] not in scales.input:
        return None
    if len(g.consumers.get(scales.output[0], [])) != 1:
        return None
    b_scale = next(i for i in scales.input if i != dq.output[1])
    a, b = matmul.input[0], matmul.input[1]
    b_zero_point = matmul.input[3] if len(matmul.input) > 3 else ""
    chain, last, bias = [cast, mul, scales], mul, ""
    add = g.sole_user(mul.output[0], "Add")
    if add is not None:
        other = next(i for i in add.input if i != mul.output[0])
        if other in g.initializers and len(g.initializers[other].dims) == 1:
            bias, last = other, add
            chain.append(add)
    inputs = [a, b, scale_name, b_scale, zp_name, b_zero_point] + ([bias] if bias else [])
    node = helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]], name=matmul.name + "_to_float",
                            domain="com.microsoft")
    return node, chain


def _top1(proto, input_name: str, images: np.ndarray) -> np.ndarray:
    """Arg-max class of each image under onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {input_name: images[i:i + 64]})[0].argmax(1)
                           for i in range(0, len(images), 64)])


__all__ = ["activation_ranges", "fix_activation_scales", "quantize_dynamic", "quantize_static"]
