"""Rewrites of the ONNX graph tf2onnx writes: Erfc (which ONNX lacks) to Erf, and Keras'
decomposed LayerNormalization to the standard op. Each pass finds exact patterns with a
GraphIndex, then swaps nodes in one go (`GraphIndex.rewrite`). The onnxruntime-only
rewrites (fused attention) are in `onnx_fusion`."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Set, Tuple, Union

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


def split_inputs(n, pred: Callable[[str], bool]) -> Tuple[Optional[str], Optional[str]]:
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
    ranks = tensor_ranks(proto)
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


def tensor_ranks(proto: onnx.ModelProto) -> Dict[str, int]:
    """Rank of each tensor that ONNX shape inference can tell."""
    return {name: len(dims) for name, dims in tensor_shapes(proto).items()}


def tensor_shapes(proto: onnx.ModelProto) -> Dict[str, List[Union[int, str, None]]]:
    """Shape of each tensor that ONNX shape inference can tell: per axis its size, the name of
    a symbolic size, or None."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                     for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
            if v.type.tensor_type.HasField("shape")}


# --- the residual stream on (tokens, features) ---------------------------------------------------
def residual_stream_2d(proto: onnx.ModelProto) -> int:
    """Keep each encoder block's residual stream on (tokens, features), the shape its LayerNorms,
    Dense layers and residual adds already compute on, instead of going back to
    (batch, tokens, features) after every sublayer: each residual Add(z, Reshape(y, (B, S, D)))
    becomes Add(z', y) on the rank-2 tensors (its (B, S, D) value kept as a Reshape for other
    readers), and the Reshapes to (-1, D) of a tensor already of that shape go. Same values; a
    ViT block loses six of its eight Reshapes. Adds whose inputs may broadcast (shapes not
    provably equal) are left alone. Returns the number of residual Adds moved."""
    shapes = tensor_shapes(proto)
    g = GraphIndex(proto)
    flat: Dict[str, str] = {}  # (B, S, D) tensor -> its rank-2 twin
    replace: Dict[int, list] = {}
    for add in list(g.graph.node):
        match = _residual_match(g, add, shapes) if add.op_type == "Add" else None
        if match is None:
            continue
        z, y, target, d = match
        prefix = add.name or add.output[0]
        new = []
        z2 = flat.get(z) or _rank2_source(g, z, shapes, d)
        if z2 is None:
            cols = g.add_initializer([-1, d], prefix + "/shape_2d", np.int64)
            z2 = prefix + "/z_2d"
            new.append(helper.make_node("Reshape", [z, cols], [z2], name=prefix + "/Reshape_2d"))
        total = prefix + "/sum_2d"
        new += [helper.make_node("Add", [z2, y], [total], name=prefix + "/Add_2d"),
                helper.make_node("Reshape", [total, target], list(add.output), name=prefix + "/Reshape_3d")]
        replace[id(add)] = new
        flat[add.output[0]] = total
        shapes[total] = shapes[y]
    if not replace:
        return 0
    g.rewrite(set(), replace)
    _drop_identity_reshapes(proto, flat, shapes)
    return len(replace)


def _residual_match(g: GraphIndex, add, shapes) -> Optional[Tuple[str, str, str, int]]:
    """(z, y, the (B, S, D) shape tensor, D) for add = Add(z, Reshape(y, (B, S, D))) with y of
    shape (N, D) and z of the Reshape's shape, else None."""
    for i in (0, 1):
        r = g.node(add.input[i], "Reshape")
        z = add.input[1 - i]
        if r is None or r.input[0] not in shapes or z not in shapes or r.output[0] not in shapes:
            continue
        y_shape, out_shape, z_shape = shapes[r.input[0]], shapes[r.output[0]], shapes[z]
        if len(y_shape) != 2 or len(out_shape) != 3 or not isinstance(y_shape[1], int):
            continue
        if len(z_shape) == 3 and _same_shape(z_shape, out_shape) and out_shape[2] == y_shape[1]:
            return z, r.input[0], r.input[1], y_shape[1]
    return None


def _same_shape(a: list, b: list) -> bool:
    """True when two shapes are provably equal (so an Add of them does not broadcast): each
    axis the same size or the same symbol; the batch axis may differ in symbol if neither is 1."""
    for axis, (x, y) in enumerate(zip(a, b)):
        if x is not None and x == y:
            continue
        if axis == 0 and x != 1 and y != 1 and not (isinstance(x, int) and isinstance(y, int)):
            continue
        return False
    return len(a) == len(b)


def _rank2_source(g: GraphIndex, name: str, shapes, d: int) -> Optional[str]:
    """A rank-2 tensor with D columns holding `name`'s values: x when `name` is Reshape(x) of such
    an x, or an existing Reshape(name, (-1, D)); else None."""
    r = g.node(name, "Reshape")
    src = r.input[0] if r is not None else None
    if src in shapes and len(shapes[src]) == 2 and shapes[src][1] == d:
        return src
    for reader in g.consumers.get(name, []):
        target = g.array(reader.input[1]) if reader.op_type == "Reshape" and reader.input[0] == name else None
        if target is not None and [int(v) for v in target.reshape(-1)] == [-1, d]:
            return reader.output[0]
    return None


def _drop_identity_reshapes(proto: onnx.ModelProto, flat: Dict[str, str], shapes) -> None:
    """Readers of Reshape(t, (-1, D)) read the rank-2 tensor with those values directly when there
    is one: t itself when t is (N, D), its twin in `flat` when t is a moved residual sum.
    Then nodes nothing reads any more are removed."""
    g = GraphIndex(proto)
    drop = set()
    for r in list(g.graph.node):
        target = g.array(r.input[1]) if r.op_type == "Reshape" else None
        if target is None or target.shape != (2,) or int(target[0]) != -1 or r.output[0] in g.outputs:
            continue
        same = flat.get(r.input[0], r.input[0])  # the rank-2 tensor holding the Reshape's values
        if same not in shapes or len(shapes[same]) != 2 or shapes[same][1] != int(target[1]):
            continue
        for reader in g.consumers.get(r.output[0], []):
            reader.input[:] = [same if i == r.output[0] else i for i in reader.input]
        drop.add(id(r))
    while True:  # nodes left without readers
        read = {i for n in g.graph.node if id(n) not in drop for i in n.input} | g.outputs
        dead = {id(n) for n in g.graph.node if id(n) not in drop and not any(o in read for o in n.output)}
        if not dead:
            break
        drop |= dead
    g.rewrite(drop, {})


def _layer_norm_match(g: GraphIndex, r, ranks: Dict[str, int]):
    """For the Reciprocal `r` of 1 / sqrt(var + eps): (x, the final Add, eps, gamma and beta
    initializer names, the nodes the LayerNormalization replaces), else None."""
    def inits(name: str) -> bool:
        return name in g.initializers

    sqrt = g.node(r.input[0], "Sqrt")
    add_eps = sqrt and g.node(sqrt.input[0], "Add")
    eps_name, var_name = split_inputs(add_eps, inits) if add_eps else (None, None)
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
    gamma_name = scale and split_inputs(scale, inits)[0]
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
    beta_name = shift and split_inputs(shift, inits)[0]
    out = beta_name and _only_consumer(g, shift, "Add")
    if not out or mul_x.output[0] not in out.input or _only_consumer(g, mul_x, "Add") is not out:
        return None
    return x, out, eps_name, gamma_name, beta_name, (mean, neg, diff, sq, var, add_eps, sqrt, r, scale, mul_x,
                                                      mul_mean, shift)


def _only_consumer(g: GraphIndex, n, op: str):
    """The one node reading n's first output if its op is `op` (and it is no graph output)."""
    return g.sole_user(n.output[0], op)


__all__ = ["GraphIndex", "fuse_layer_norms", "replace_erfc", "residual_stream_2d", "split_inputs", "tensor_ranks",
           "tensor_shapes"]
