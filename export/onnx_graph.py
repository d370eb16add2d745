"""Rewrites of the ONNX graph tf2onnx writes: Erfc (which ONNX lacks) to Erf, Keras'
decomposed LayerNormalization to the standard op, and (for onnxruntime) each self-attention
core to its fused com.microsoft Attention op. Each pass finds exact patterns with a
GraphIndex, then swaps nodes in one go (`GraphIndex.rewrite`)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphIndex:
    """Who produces and who consumes each tensor of an ONNX graph, and its constants."""

    def __init__(self, proto: onnx.ModelProto):
        self.graph = proto.graph
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: Dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}

    def node(self, name: str, op: str):
        """The node producing `name` if its op is `op`, else None."""
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def sole_user(self, name: str, op: str):
        """The one node reading `name` if its op is `op` and `name` is no graph output, else None."""
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op and name not in self.outputs else None

    def array(self, name: str) -> Optional[np.ndarray]:
        """The value of an initializer or of a Constant node's output, else None."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant" and n.attribute:
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def scalar(self, name: str) -> Optional[float]:
        """The value of a one-element constant, else None."""
        value = self.array(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def add_initializer(self, value, name: str, dtype=np.float32) -> str:
        """Add `value` (as `dtype`) as an initializer called `name`; returns the name."""
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def rewrite(self, drop: Set[int], replace: Dict[int, List]) -> None:
        """Remove the nodes whose id() is in `drop`, put replace[id(n)] in place of node n, and
        drop the initializers nothing reads any more."""
        nodes = []
        for n in self.graph.node:
            if id(n) not in drop:
                nodes.extend(replace.get(id(n), [n]))
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        used = {i for n in self.graph.node for i in n.input}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        produced = {o for n in self.graph.node for o in n.output}
        infos = [v for v in self.graph.value_info if v.name in produced]
        del self.graph.value_info[:]
        self.graph.value_info.extend(infos)


def _split(n, pred: Callable[[str], bool]) -> Tuple[Optional[str], Optional[str]]:
    """(input matching pred, the other input) of a binary node, or (None, None)."""
    a, b = n.input
    return (a, b) if pred(a) else (b, a) if pred(b) else (None, None)


# --- Erfc -> Erf ---------------------------------------------------------------------------------
def replace_erfc(proto: onnx.ModelProto) -> int:
    """Rewrite the Erfc nodes tf2onnx leaves behind (ONNX has no Erfc op; tf.nn.gelu's exact form
    is 0.5 * x * erfc(-x / sqrt 2)) with Erf, which ONNX has. An exact GELU becomes
    x * ((erf(x * 0.7071) + 1) * 0.5), the TensorFlow pattern onnxruntime's optimizer fuses into
    one Gelu node; any other Erfc(y) becomes 1 - Erf(y). Returns the number of Erfc nodes replaced.
    (TFLite needs no rewrite: its converter fuses the erfc form into its GELU op.)"""
    g = GraphIndex(proto)
    erfcs = [n for n in g.graph.node if n.op_type == "Erfc" and n.domain in ("", "ai.onnx")]
    drop, replace = set(), {}
    for k, erfc in enumerate(erfcs):
        prefix = (erfc.name or erfc.output[0]) + f"/erf_{k}"
        gelu = _exact_gelu(g, erfc)
        if gelu is not None:
            x, neg, scaled, half, out = gelu
            drop.update(id(n) for n in (neg, scaled, erfc, half))
            replace[id(out)] = _gelu_with_erf(g, x, list(out.output), prefix)
        else:
            one = g.add_initializer(1.0, prefix + "/one")
            replace[id(erfc)] = [
                helper.make_node("Erf", list(erfc.input), [prefix + "/erf"], name=prefix + "/Erf"),
                helper.make_node("Sub", [one, prefix + "/erf"], list(erfc.output), name=prefix + "/Sub")]
    if erfcs:
        g.rewrite(drop, replace)
    return len(erfcs)


def _exact_gelu(g: GraphIndex, erfc):
    """(x, Neg, Mul by 1/sqrt 2, Mul by 0.5, output Mul) when `erfc` is the middle of
    0.5 * x * erfc(-x / sqrt 2) with no other reader of its pieces, else None."""
    scaled = g.producer.get(erfc.input[0])
    if scaled is None or scaled.op_type != "Mul" or g.sole_user(scaled.output[0], "Erfc") is not erfc:
        return None
    neg_in = [i for i in scaled.input if i in g.producer and g.producer[i].op_type == "Neg"]
    c = [g.scalar(i) for i in scaled.input if i not in neg_in]
    if len(neg_in) != 1 or len(c) != 1 or c[0] is None or abs(c[0] - 0.5 ** 0.5) >= 1e-6:
        return None
    neg = g.producer[neg_in[0]]
    x = neg.input[0]
    out = g.sole_user(erfc.output[0], "Mul")
    half = out and next((g.producer[i] for i in out.input if i != erfc.output[0] and i in g.producer), None)
    if (half is not None and half.op_type == "Mul" and x in half.input
            and g.scalar(next(i for i in half.input if i != x)) == 0.5
            and g.sole_user(half.output[0], "Mul") is out and g.sole_user(neg.output[0], "Mul") is scaled):
        return x, neg, scaled, half, out
    return None


def _gelu_with_erf(g: GraphIndex, x: str, outputs: List[str], prefix: str) -> list:
    """Nodes of x * ((erf(x / sqrt 2) + 1) * 0.5), since erfc(-x c) = 1 + erf(x c)."""
    c = g.add_initializer(0.5 ** 0.5, prefix + "/inv_sqrt2")
    one, half = g.add_initializer(1.0, prefix + "/one"), g.add_initializer(0.5, prefix + "/half")
    return [helper.make_node("Mul", [x, c], [prefix + "/xc"], name=prefix + "/Mul_c"),
            helper.make_node("Erf", [prefix + "/xc"], [prefix + "/erf"], name=prefix + "/Erf"),
            helper.make_node("Add", [prefix + "/erf", one], [prefix + "/cdf2"], name=prefix + "/Add_1"),
            helper.make_node("Mul", [prefix + "/cdf2", half], [prefix + "/cdf"], name=prefix + "/Mul_half"),
            helper.make_node("Mul", [x, prefix + "/cdf"], outputs, name=prefix + "/Mul_x")]


# --- LayerNormalization ------------------------------------------------------------------------
def fuse_layer_norms(proto: onnx.ModelProto) -> int:
    """Replace tf2onnx's decomposition of each Keras LayerNormalization (GlobalAveragePool mean
    and variance, Sqrt, Reciprocal, scale and shift) by the standard LayerNormalization op of
    opset 17. tf2onnx does not emit that op yet (onnx/tensorflow-onnx#2183), and neither its
    rewriter nor onnxruntime's TF LayerNorm fusion matches Keras 3's graph. Only exact matches
    on rank-3 tensors (where GlobalAveragePool averages the last axis) are replaced.
    Returns the number of fused LayerNorms."""
    g = GraphIndex(proto)
    ranks = _ranks(proto)
    drop, replace = set(), {}
    for r in list(g.graph.node):
        match = _layer_norm_match(g, r, ranks) if r.op_type == "Reciprocal" else None
        if match is None:
            continue
        x, out, eps_name, gamma_name, beta_name, nodes = match
        gamma = numpy_helper.to_array(g.initializers[gamma_name]).reshape(-1)
        beta = numpy_helper.to_array(g.initializers[beta_name]).reshape(-1)
        if gamma.shape != beta.shape:
            continue
        prefix = out.name or out.output[0]
        eps = float(numpy_helper.to_array(g.initializers[eps_name]).reshape(-1)[0])
        g_name = g.add_initializer(gamma, prefix + "/LayerNorm_gamma")
        b_name = g.add_initializer(beta, prefix + "/LayerNorm_beta")
        replace[id(out)] = [helper.make_node("LayerNormalization", [x, g_name, b_name], [out.output[0]],
                                             name=prefix + "/LayerNorm", axis=-1, epsilon=eps)]
        drop.update(id(n) for n in nodes)
    if replace:
        g.rewrite(drop, replace)
    return len(replace)


def _ranks(proto: onnx.ModelProto) -> Dict[str, int]:
    """Rank of each tensor that ONNX shape inference can tell."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    return {v.name: len(v.type.tensor_type.shape.dim)
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)
            if v.type.tensor_type.HasField("shape")}


def _layer_norm_match(g: GraphIndex, r, ranks: Dict[str, int]):
    """For the Reciprocal `r` of 1 / sqrt(var + eps): (x, the final Add, eps, gamma and beta
    initializer names, the nodes the LayerNormalization replaces), else None."""
    def inits(name: str) -> bool:
        return name in g.initializers

    sqrt = g.node(r.input[0], "Sqrt")
    add_eps = sqrt and g.node(sqrt.input[0], "Add")
    eps_name, var_name = _split(add_eps, inits) if add_eps else (None, None)
    var = var_name and g.node(var_name, "GlobalAveragePool")
    sq = var and g.node(var.input[0], "Mul")
    if not sq or sq.input[0] != sq.input[1]:
        return None
    diff = g.node(sq.input[0], "Sub")
    mean = diff and g.node(diff.input[1], "GlobalAveragePool")
    if not mean or mean.input[0] != diff.input[0] or ranks.get(diff.input[0]) != 3:
        return None
    x = diff.input[0]
    scale = _only_consumer(g, r, "Mul")
    gamma_name = scale and _split(scale, inits)[0]
    if not gamma_name:
        return None
    users = g.consumers.get(scale.output[0], [])
    mul_x = next((u for u in users if u.op_type == "Mul" and x in u.input), None)
    mul_mean = next((u for u in users if u.op_type == "Mul" and any(
        (p := g.node(i, "Neg")) is not None and p.input[0] == mean.output[0] for i in u.input)), None)
    if len(users) != 2 or not mul_x or not mul_mean:
        return None
    neg = next(g.producer[i] for i in mul_mean.input if i in g.producer and g.producer[i].op_type == "Neg")
    shift = _only_consumer(g, mul_mean, "Add")
    beta_name = shift and _split(shift, inits)[0]
    out = beta_name and _only_consumer(g, shift, "Add")
    if not out or mul_x.output[0] not in out.input or _only_consumer(g, mul_x, "Add") is not out:
        return None
    return x, out, eps_name, gamma_name, beta_name, (mean, neg, diff, sq, var, add_eps, sqrt, r, scale, mul_x,
                                                      mul_mean, shift)


def _only_consumer(g: GraphIndex, n, op: str):
    """The one node reading n's first output if its op is `op` (and it is no graph output)."""
    return g.sole_user(n.output[0], op)


# --- self-attention -> com.microsoft Attention ----------------------------------------------------
def fuse_attention(proto: onnx.ModelProto, num_heads: int) -> int:
    """Replace each self-attention core that `layers.MultiHeadSelfAttention` exports (one QKV
    MatMul + bias on (tokens, D), Reshape to (B, S, 3, heads, head_dim), Transpose, Split,
    Q K^T, Softmax, A V, Transpose back) by onnxruntime's fused Attention op (com.microsoft
    domain, so the file is for onnxruntime only). The softmax scale is already folded into the
    query weights, so the op's scale is 1. Attention with an extra logit bias (relative
    position embeddings) does not match and stays as it is. Returns the number fused."""
    g = GraphIndex(proto)
    drop, replace = set(), {}
    for k, softmax in enumerate(n for n in list(g.graph.node) if n.op_type == "Softmax"):
        match = _attention_match(g, softmax, num_heads)
        if match is None:
            continue
        x, weights, bias, shape5, nodes = match
        prefix = f"{softmax.name or softmax.output[0]}/fused_attention_{k}"
        d = int(g.initializers[weights].dims[0])
        shape3, shape_nodes = _batch_seq_hidden(g, shape5, d, prefix)
        heads = g.add_initializer([0, 0, num_heads, d // num_heads], prefix + "/shape_bshd", np.int64)
        merge = nodes[-1]
        replace[id(merge)] = shape_nodes + [
            helper.make_node("Reshape", [x, shape3], [prefix + "/x3d"], name=prefix + "/Reshape_in"),
            helper.make_node("Attention", [prefix + "/x3d", weights, bias], [prefix + "/context"],
                             name=prefix + "/Attention", domain="com.microsoft", num_heads=num_heads, scale=1.0),
            # (B, S, D) -> (B, S, heads, head_dim): the tensor the replaced Transpose produced, for
            # its readers (the output projection's Reshape, and Shape in dynamic-size graphs).
            helper.make_node("Reshape", [prefix + "/context", heads], list(merge.output), name=prefix + "/Reshape_out")]
        drop.update(id(n) for n in nodes[:-1])
    if replace:
        g.rewrite(drop, replace)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace)


def _attention_match(g: GraphIndex, softmax, num_heads: int):
    """For the Softmax of softmax(q k^T) v: (x, QKV weight and bias initializer names, the
    (B, S, 3, heads, head_dim) shape tensor, the nodes Attention replaces, the last being the
    Transpose to (B, S, heads, head_dim)), else None."""
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    scores = g.node(softmax.input[0], "MatMul")
    av = g.sole_user(softmax.output[0], "MatMul")
    if axis not in (-1, 3) or scores is None or av is None or av.input[0] != softmax.output[0]:
        return None
    if g.sole_user(scores.output[0], "Softmax") is not softmax:
        return None
    k_t = g.node(scores.input[1], "Transpose")
    if k_t is None or _perm(k_t) != [0, 1, 3, 2] or g.sole_user(k_t.output[0], "MatMul") is not scores:
        return None
    squeezes = [g.node(name, "Squeeze") for name in (scores.input[0], k_t.input[0], av.input[1])]
    if any(s is None or not _squeezes_axis_0(g, s) for s in squeezes):
        return None
    split = g.node(squeezes[0].input[0], "Split")
    if split is None or [s.input[0] for s in squeezes] != list(split.output) or not _splits_axis_0(g, split):
        return None
    if any(g.sole_user(o, "Squeeze") is not s for o, s in zip(split.output, squeezes)):
        return None
    if any(g.consumers.get(s.output[0]) != [user] for s, user in zip(squeezes, (scores, k_t, av))):
        return None
    heads_major = g.node(split.input[0], "Transpose")
    if heads_major is None or _perm(heads_major) != [2, 0, 3, 1, 4] or g.sole_user(heads_major.output[0], "Split") \
            is not split:
        return None
    unpack = g.node(heads_major.input[0], "Reshape")
    add = unpack and g.node(unpack.input[0], "Add")
    if add is None or g.sole_user(unpack.output[0], "Transpose") is not heads_major \
            or g.sole_user(add.output[0], "Reshape") is not unpack:
        return None
    matmul_name, bias = _split(add, lambda n: n in g.producer and g.producer[n].op_type == "MatMul")
    matmul = matmul_name and g.producer[matmul_name]
    if not matmul or bias not in g.initializers or g.sole_user(matmul.output[0], "Add") is not add:
        return None
    x, weights = matmul.input
    if weights not in g.initializers:
        return None
    w_dims, b_dims = list(g.initializers[weights].dims), list(g.initializers[bias].dims)
    if len(w_dims) != 2 or w_dims[1] != 3 * w_dims[0] or b_dims != [w_dims[1]] or w_dims[0] % num_heads:
        return None
    static = g.array(unpack.input[1])
    if static is not None and [int(v) for v in static[2:]] != [3, num_heads, w_dims[0] // num_heads]:
        return None
    merge = g.sole_user(av.output[0], "Transpose")
    if merge is None or _perm(merge) != [0, 2, 1, 3]:
        return None
    nodes = (matmul, add, unpack, heads_major, split, *squeezes, k_t, scores, softmax, av, merge)
    return x, weights, bias, unpack.input[1], nodes


def _perm(transpose) -> Optional[List[int]]:
    return next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)


def _squeezes_axis_0(g: GraphIndex, squeeze) -> bool:
    axes = g.array(squeeze.input[1]) if len(squeeze.input) > 1 else next(
        (np.array(a.ints) for a in squeeze.attribute if a.name == "axes"), None)
    return axes is not None and [int(a) for a in np.reshape(axes, -1)] == [0]


def _splits_axis_0(g: GraphIndex, split) -> bool:
    axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
    sizes = g.array(split.input[1]) if len(split.input) > 1 and split.input[1] else None
    return axis == 0 and len(split.output) == 3 and (sizes is None or [int(s) for s in sizes] == [1, 1, 1])


def _batch_seq_hidden(g: GraphIndex, shape5: str, d: int, prefix: str) -> Tuple[str, list]:
    """(name of the (B, S, D) shape for Attention's input, nodes computing it) from the
    (B, S, 3, heads, head_dim) reshape target: a constant, or for dynamic image sizes its
    first two entries (computed in the graph) followed by D."""
    static = g.array(shape5)
    if static is not None:
        return g.add_initializer([int(static[0]), int(static[1]), d], prefix + "/shape_bsd", np.int64), []
    for name, value in (("starts", [0]), ("ends", [2]), ("hidden", [d])):
        g.add_initializer(value, f"{prefix}/{name}", np.int64)
    return prefix + "/shape_bsd", [
        helper.make_node("Slice", [shape5, prefix + "/starts", prefix + "/ends"], [prefix + "/batch_seq"],
                         name=prefix + "/Slice_bs"),
        helper.make_node("Concat", [prefix + "/batch_seq", prefix + "/hidden"], [prefix + "/shape_bsd"],
                         name=prefix + "/Concat_bsd", axis=0)]


FUSED_OPS = ("Attention", "MultiHeadAttention", "QAttention", "LayerNormalization", "SkipLayerNormalization",
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "Gelu", "FastGelu", "BiasGelu",
             "QuickGelu", "GemmFastGelu")


def fused_op_counts(proto: onnx.ModelProto) -> Dict[str, int]:
    """How many nodes of each fused op (attention, LayerNorm, GELU kinds) the graph holds."""
    counts: Dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type in FUSED_OPS:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


__all__ = ["FUSED_OPS", "GraphIndex", "fuse_attention", "fuse_layer_norms", "fused_op_counts", "replace_erfc"]
