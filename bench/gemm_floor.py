"""How much of an ONNX file's batch-1 latency is matrix products: each MatMul / Gemm (and the
QKV projection and the two products inside a fused Attention) timed alone in onnxruntime with
the file's shapes and weights' sizes, summed, next to the file's own latency.

    python -m bench.gemm_floor DIR/keras-opt.onnx DIR/timm.onnx --threads 1

The sum is what the file's products cost at the speed the same kernels reach alone; the rest
of the latency is everything else (LayerNorm, GELU, softmax, reshapes, per-node overhead).
Also prints the GFLOP/s of one large SGEMM, the CPU's fp32 ceiling as onnxruntime reaches it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Tuple

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_args, cpu_name  # noqa: E402

Shape = Tuple[int, ...]


def _session(proto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _median_ms(fn, rounds: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _input(path: str) -> Tuple[str, np.ndarray]:
    """The file's input name and one random image of its (batch-1) shape."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    inp = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in inp.type.tensor_type.shape.dim]
    dims[0] = 1
    return inp.name, np.random.default_rng(0).uniform(0, 1, dims).astype(np.float32)


def products(path: str) -> List[Tuple[Shape, Shape, bool]]:
    """(A's shape, B's shape, B is a weight) of every matrix product the file runs on one image:
    MatMul / Gemm nodes, and a fused Attention's QKV projection and its two products."""
    import onnx

    proto = onnx.load(path)
    weights = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm", "Attention")]
    wanted = {n.input[0] for n in nodes} | {n.input[1] for n in nodes if n.input[1] not in weights}
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in wanted if t not in have)
    name, x = _input(path)
    session = _session(proto, 1)
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, {name: x})), **{name: x})
    out = []
    for n in nodes:
        a = tuple(values[n.input[0]].shape)
        b = weights.get(n.input[1]) or tuple(values[n.input[1]].shape)
        if n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            b = b[::-1]
        out.append((a, b, n.input[1] in weights))
        if n.op_type == "Attention":  # the core: heads x (S, hd) x (hd, S), then x (S, hd)
            heads = next(a.i for a in n.attribute if a.name == "num_heads")
            s, hd = a[-2], b[-1] // 3 // heads
            out += [((1, heads, s, hd), (1, heads, hd, s), False), ((1, heads, s, s), (1, heads, s, hd), False)]
    return out


def product_ms(a: Shape, b: Shape, weight: bool, threads: int, rounds: int) -> float:
    """Median time of one MatMul of these shapes alone (B an initializer when it is a weight)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a))]
    inits = []
    if weight:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.02, b).astype(np.float32), "b"))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b)))
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "product", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    session = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), threads)
    feed = {"a": rng.normal(size=a).astype(np.float32)}
    if not weight:
        feed["b"] = rng.normal(size=b).astype(np.float32)
    return _median_ms(lambda: session.run(None, feed), rounds)


def main(argv=None) -> Dict[str, Dict[str, float]]:
    import onnx

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=100, help="timed calls of each file and each product")
    args = p.parse_args(argv)
    check_args(args, paths_must_exist=("files",))

    n = 1024
    peak_ms = product_ms((n, n), (n, n), True, args.threads, 20)
    print(f"{cpu_name()}; load {os.getloadavg()}; {args.threads} thread(s)")
    print(f"  one {n}x{n}x{n} SGEMM alone: {2 * n ** 3 / peak_ms / 1e6:.0f} GFLOP/s")
    cache: Dict[Tuple[Shape, Shape, bool], float] = {}
    results = {}
    for path in args.files:
        name, x = _input(path)
        session = _session(onnx.load(path), args.threads)
        latency = _median_ms(lambda s=session, feed={name: x}: s.run(None, feed), args.rounds)
        floor, flop = 0.0, 0.0
        for a, b, weight in products(path):
            key = (a, b, weight)
            if key not in cache:
                cache[key] = product_ms(a, b, weight, args.threads, args.rounds)
            floor += cache[key]
            flop += 2 * int(np.prod(a)) * b[-1]
        results[path] = {"latency_ms": latency, "products_ms": floor, "rest_ms": latency - floor,
                         "products_gflop": flop / 1e9}
        print(f"  {os.path.basename(path):24s} latency {latency:6.2f} ms; its {flop / 1e9:.2f} GFLOP of products "
              f"alone {floor:6.2f} ms ({flop / floor / 1e6:.0f} GFLOP/s); the rest {latency - floor:5.2f} ms")
    return results


if __name__ == "__main__":
    main()
