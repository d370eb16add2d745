"""Rewrites for `to_onnx(optimize=True)`: each self-attention core replaced by onnxruntime's
fused Attention op (com.microsoft domain, so for onnxruntime only); and the count of fused
nodes a graph holds. (A class-token model's last block already runs on that token alone in
the Keras graph, `TransformerBlock(class_token_only=True)`; its one-query attention becomes
MultiHeadAttention.)"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import helper

from keras_vit.export.onnx_graph import GraphIndex, split_inputs, tensor_ranks


# --- self-attention -> com.microsoft Attention ----------------------------------------------------
def fuse_attention(proto: onnx.ModelProto, num_heads: int) -> int:
    """Replace each self-attention core that `layers.MultiHeadSelfAttention` exports (one QKV
    MatMul + bias on (tokens, D) or (B, S, D); Reshape to (B, S, 3, heads, head_dim),
    Transpose, Split, Q K^T, Softmax, A V, Transpose back) by onnxruntime's fused Attention op
    (com.microsoft domain, so the file is for onnxruntime only). When only the first n tokens
    query (the class-token last block: q[:, :, :n]), the QKV projection stays and its Q rows of
    those tokens, K and V go to one com.microsoft MultiHeadAttention (n queries, S keys). The
    softmax scale is already folded into the query weights, so the ops' scale is 1. Attention
    with an extra logit bias (relative position embeddings) does not match and stays as it is.
    A projection without bias (qkv_bias=False) gets a zero one. Returns the number fused."""
    ranks = tensor_ranks(proto)
    g = GraphIndex(proto)
    drop, replace = set(), {}
    for k, softmax in enumerate(n for n in list(g.graph.node) if n.op_type == "Softmax"):
        match = _attention_match(g, softmax, num_heads)
        if match is None:
            continue
        x, weights, bias, shape5, nodes, queries = match
        prefix = f"{softmax.name or softmax.output[0]}/fused_attention_{k}"
        d = int(g.initializers[weights].dims[0])
        projection = 2 if bias is not None else 1  # the QKV MatMul (and its bias Add)
        if bias is None:
            bias = g.add_initializer(np.zeros(3 * d, np.float32), prefix + "/zero_qkv_bias",
                                     helper.tensor_dtype_to_np_dtype(g.initializers[weights].data_type))
        merge = nodes[-1]
        if queries is None:
            new = []
            if ranks.get(x) != 3:  # Attention takes (B, S, D)
                shape3, new = _batch_seq_hidden(g, shape5, d, prefix)
                new.append(helper.make_node("Reshape", [x, shape3], [prefix + "/x3d"], name=prefix + "/Reshape_in"))
                x = prefix + "/x3d"
            new.append(helper.make_node("Attention", [x, weights, bias], [prefix + "/context"],
                                        name=prefix + "/Attention", domain="com.microsoft", num_heads=num_heads,
                                        scale=1.0))
        else:
            new = _first_queries_attention(g, nodes[projection - 1].output[0], shape5, d, queries, num_heads, prefix)
            nodes = nodes[projection:]  # the QKV MatMul and its bias stay
        drop.update(id(n) for n in _read_context(g, merge, prefix + "/context", g.array(shape5), d))
        if merge.output[0] in g.consumers or merge.output[0] in g.outputs:
            # (B, S, D) -> (B, S, heads, head_dim), the replaced Transpose's tensor, for readers
            # whose result depends on the shape (Shape in dynamic-size graphs).
            heads = g.add_initializer([0, 0, num_heads, d // num_heads], prefix + "/shape_bshd", np.int64)
            new.append(helper.make_node("Reshape", [prefix + "/context", heads], list(merge.output),
                                        name=prefix + "/Reshape_out"))
        replace[id(merge)] = new
        drop.update(id(n) for n in nodes[:-1])
    if replace:
        g.rewrite(drop, replace)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replace)


def _first_queries_attention(g: GraphIndex, qkv: str, shape5: str, d: int, queries: int, num_heads: int,
                             prefix: str) -> list:
    """Nodes of MultiHeadAttention(Q of the first `queries` tokens, K, V) reading the projected
    `qkv` ((B*S, 3D) or (B, S, 3D)), writing prefix/context (B, queries, D)."""
    shape3, new = _batch_seq_hidden(g, shape5, 3 * d, prefix + "/qkv")
    new.append(helper.make_node("Reshape", [qkv, shape3], [prefix + "/qkv3d"], name=prefix + "/Reshape_qkv"))
    parts = {"q": ([0, 0], [queries, d], [1, 2]), "k": ([d], [2 * d], [2]), "v": ([2 * d], [3 * d], [2])}
    for name, (starts, ends, axes) in parts.items():
        inputs = [g.add_initializer(v, f"{prefix}/{name}_{what}", np.int64)
                  for what, v in (("starts", starts), ("ends", ends), ("axes", axes))]
        new.append(helper.make_node("Slice", [prefix + "/qkv3d"] + inputs, [f"{prefix}/{name}"],
                                    name=f"{prefix}/Slice_{name}"))
    new.append(helper.make_node("MultiHeadAttention", [prefix + "/q", prefix + "/k", prefix + "/v"],
                                [prefix + "/context"], name=prefix + "/MultiHeadAttention", domain="com.microsoft",
                                num_heads=num_heads, scale=1.0))
    return new


def _read_context(g: GraphIndex, merge, context: str, shape5: Optional[np.ndarray], d: int) -> list:
    """Point the Reshapes of the (B, S, heads, head_dim) context to constant shapes at the (B, S, D)
    `context` instead (same values: a Reshape without 0 entries ignores its input's shape);
    a Reshape to (-1, S, D) is then a no-op and its readers take `context`. Returns the
    Reshapes to drop; readers that need the 4-D shape stay on merge's output."""
    drop = []
    for n in list(g.consumers.get(merge.output[0], [])):
        target = g.array(n.input[1]) if n.op_type == "Reshape" and n.input[0] == merge.output[0] else None
        if target is None or 0 in [int(v) for v in target]:
            continue
        n.input[0] = context
        g.consumers[merge.output[0]].remove(n)
        if not g.consumers[merge.output[0]]:
            del g.consumers[merge.output[0]]
        if shape5 is not None and [int(v) for v in target] == [-1, int(shape5[1]), d] and n.output[0] not in g.outputs:
            for reader in g.consumers.get(n.output[0], []):
                reader.input[:] = [context if i == n.output[0] else i for i in reader.input]
            drop.append(n)
    return drop


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
    q_in, queries = scores.input[0], None
    first = g.node(q_in, "Slice")
    if first is not None:  # only the first n tokens query: q[:, :, :n]
        queries = _first_tokens(g, first)
        if queries is None or g.sole_user(first.output[0], "MatMul") is not scores:
            return None
        q_in = first.input[0]
    squeezes = [g.node(name, "Squeeze") for name in (q_in, k_t.input[0], av.input[1])]
    if any(s is None or not _squeezes_axis_0(g, s) for s in squeezes):
        return None
    split = g.node(squeezes[0].input[0], "Split")
    if split is None or [s.input[0] for s in squeezes] != list(split.output) or not _splits_axis_0(g, split):
        return None
    if any(g.sole_user(o, "Squeeze") is not s for o, s in zip(split.output, squeezes)):
        return None
    if any(g.consumers.get(s.output[0]) != [user] for s, user in zip(squeezes, (first or scores, k_t, av))):
        return None
    heads_major = g.node(split.input[0], "Transpose")
    if heads_major is None or _perm(heads_major) != [2, 0, 3, 1, 4] or g.sole_user(heads_major.output[0], "Split") \
            is not split:
        return None
    unpack = g.node(heads_major.input[0], "Reshape")
    if unpack is None or g.sole_user(unpack.output[0], "Transpose") is not heads_major:
        return None
    add, bias = g.node(unpack.input[0], "Add"), None
    if add is not None:  # the QKV bias
        if g.sole_user(add.output[0], "Reshape") is not unpack:
            return None
        matmul_name, bias = split_inputs(add, lambda n: n in g.producer and g.producer[n].op_type == "MatMul")
        matmul = matmul_name and g.producer[matmul_name]
        if not matmul or bias not in g.initializers or g.sole_user(matmul.output[0], "Add") is not add:
            return None
    else:  # qkv_bias=False: the MatMul feeds the Reshape
        matmul = g.node(unpack.input[0], "MatMul")
        if matmul is None or g.sole_user(matmul.output[0], "Reshape") is not unpack:
            return None
    x, weights = matmul.input
    if weights not in g.initializers:
        return None
    w_dims = list(g.initializers[weights].dims)
    if len(w_dims) != 2 or w_dims[1] != 3 * w_dims[0] or w_dims[0] % num_heads:
        return None
    if bias is not None and list(g.initializers[bias].dims) != [w_dims[1]]:
        return None
    static = g.array(unpack.input[1])
    if static is not None and [int(v) for v in static[2:]] != [3, num_heads, w_dims[0] // num_heads]:
        return None
    merge = g.sole_user(av.output[0], "Transpose")
    if merge is None or _perm(merge) != [0, 2, 1, 3]:
        # One query: (B, heads, 1, head_dim) has the (B, 1, heads, head_dim) layout already, and
        # the converter reshapes it with no Transpose. Its readers must be such Reshapes.
        readers = g.consumers.get(av.output[0], [])
        if queries != 1 or av.output[0] in g.outputs or not readers or not all(
                r.op_type == "Reshape" and r.input[0] == av.output[0] and g.array(r.input[1]) is not None
                and 0 not in [int(v) for v in g.array(r.input[1])] for r in readers):
            return None
        merge = None
    nodes = (matmul, *([add] if add is not None else []), unpack, heads_major, split, *squeezes,
             *([first] if first else []), k_t, scores, softmax, av) + ((merge,) if merge is not None else ())
    return x, weights, bias, unpack.input[1], nodes, queries


def _first_tokens(g: GraphIndex, s) -> Optional[int]:
    """n when Slice `s` takes x[:, :, :n] of a (B, heads, S, head_dim) tensor, else None."""
    if len(s.input) != 4:  # data, starts, ends, axes (no steps)
        return None
    arrays = [g.array(i) for i in s.input[1:]]
    if any(v is None for v in arrays):
        return None
    starts, ends, axes = ([int(v) for v in a.reshape(-1)] for a in arrays)
    cut = {axis % 4: (start, end) for axis, start, end in zip(axes, starts, ends)}
    whole = 2 ** 31 - 1  # tf2onnx's "to the end"
    if any(start != 0 or (axis != 2 and end < whole) for axis, (start, end) in cut.items()):
        return None
    n = cut.get(2, (0, whole))[1]
    return n if 0 < n < whole else None


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


__all__ = ["FUSED_OPS", "fuse_attention", "fused_op_counts"]
