"""Which way into the CPU's matrix units is fastest: the matmuls of a ViT training step timed in
every framework path keras-vit can take, with the oneDNN kernel each one runs.

    python -m bench.gemm_ways                       # ViT-B/16's step shapes, batch 16
    python -m bench.gemm_ways --variant Ti/16 --ways tf-onednn,jax-onednn --json ways.json
    python -m bench.gemm_ways --quick               # small shapes: a smoke run

Ways (each in its own process, so each sets its own oneDNN / XLA environment first):
- `tf-onednn`: TensorFlow graph mode (`tf.function`), MatMul / BatchMatMul rewritten to oneDNN
  (what the `fusible` and graph-mode training steps run); each product is one tf.function call, whose
  dispatch (0.2-0.6 ms on the Zen 4) a step's graph does not pay per op: at Ti/16's few-ms products it reads
  below `tf-eager` for that reason, not for its kernel (same kernel, oneDNN times within 7%);
- `tf-onednn-bf32`: the same with oneDNN's fp32 math mode set to bf16 (`ONEDNN_DEFAULT_FPMATH_MODE`,
  `TF_SET_ONEDNN_FPMATH_MODE`: fp32 matmuls computed by bf16 units, as TF32 on a GPU; fp32 rows only);
- `tf-eager`: TensorFlow eager `tf.linalg.matmul`, one op at a time (what bench.train's `peak` case and
  the issue's first TensorFlow bf16 figure timed; oneDNN's kernel without a graph around it);
- `tf-xla`: TensorFlow with `jit_compile=True` (XLA's own CPU dot, Eigen underneath);
- `jax`: JAX's XLA CPU as the JAX backend runs it by default;
- `jax-onednn`: JAX with XLA's oneDNN dot fusion on (`--xla_cpu_use_onednn`,
  `--xla_cpu_experimental_onednn_fusion_type=dot`);
- `torch`: the peer (oneDNN for bf16, MKL for fp32), the speed the others are held to.

Shapes: the forward QKV and MLP products, the MLP's weight gradient (x^T dy: the transposed
operand the backward pass hands the GEMM) and the attention product (batch x heads small
matmuls) of one training step at batch 16, plus a 2048^3 square. Each in bf16 and fp32. The
kernel column is what `ONEDNN_VERBOSE=1` printed for the way (`brg_matmul:avx512_core_amx` is
AMX; no line means the matmul did not go through oneDNN at all), with each kernel's share of oneDNN's
execution time while that dtype's products ran (a matmul that re-lays out its weights every call shows
its reorders there).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

# way -> (framework, environment)
WAYS: Dict[str, Tuple[str, Dict[str, str]]] = {
    "tf-onednn": ("tf", {}),
    "tf-onednn-bf32": ("tf", {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "TF_SET_ONEDNN_FPMATH_MODE": "BF16"}),
    "tf-eager": ("tf-eager", {}),
    "tf-xla": ("tf-xla", {}),
    "jax": ("jax", {"JAX_PLATFORMS": "cpu"}),
    "jax-onednn": ("jax", {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": common.ONEDNN_XLA_FLAGS}),
    "torch": ("torch", {}),
}
DTYPES = ("bf16", "fp32")
# (name, batch, M, K, N, A transposed): C[batch] = A[batch] (M x K) @ B[batch] (K x N)
Shape = Tuple[str, int, int, int, int, bool]
PHASE_MARK = "keras_vit_gemm_ways,phase,"  # measure() prints it before each dtype's products


def shapes(variant: str, batch_size: int = 16, quick: bool = False) -> List[Shape]:
    """A training step's products for a ViT variant at 224 px (196 patches + the class token)."""
    from keras_vit.config import parse_variant

    cfg = parse_variant(variant, image_size=224)
    d, mlp, heads = cfg.hidden_size, cfg.mlp_dim, cfg.num_heads
    seq = (224 // cfg.patch_size[0]) * (224 // cfg.patch_size[1]) + 1
    square = 2048
    if quick:
        seq, d, mlp, heads, square = 17, 32, 64, 2, 128
    tokens, hd = batch_size * seq, d // heads
    return [("QKV forward", 1, tokens, d, 3 * d, False),
            ("MLP in forward", 1, tokens, d, mlp, False),
            ("MLP out forward", 1, tokens, mlp, d, False),
            ("MLP in weight gradient (x^T dy)", 1, d, tokens, mlp, True),
            ("attention q k^T", batch_size * heads, seq, hd, seq, False),
            (f"square {square}", 1, square, square, square, False)]


def gflop(s: Shape) -> float:
    return 2.0 * s[1] * s[2] * s[3] * s[4] / 1e9


def _operands(s: Shape):
    import numpy as np

    _, b, m, k, n, ta = s
    rng = np.random.default_rng(0)
    a = rng.standard_normal((b, k, m) if ta else (b, m, k)).astype("float32")
    w = rng.standard_normal((b, k, n)).astype("float32")
    return (a[0], w[0]) if b == 1 else (a, w)


def _matmul_fn(framework: str, dtype: str, transposed: bool):
    """(convert, call) for one framework: convert takes NumPy fp32 to the framework's tensor in
    `dtype`; call runs the product to completion."""
    if framework.startswith("tf"):
        import tensorflow as tf

        dt = tf.bfloat16 if dtype == "bf16" else tf.float32
        def product(a, b):
            return tf.linalg.matmul(a, b, transpose_a=transposed)

        fn = product if framework == "tf-eager" else tf.function(product, jit_compile=framework == "tf-xla")
        return (lambda x: tf.cast(tf.constant(x), dt)), (lambda a, b: fn(a, b).numpy())
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
        fn = jax.jit(lambda a, b: jnp.matmul(jnp.swapaxes(a, -1, -2) if transposed else a, b))
        return (lambda x: jnp.asarray(x, dtype=dt)), (lambda a, b: fn(a, b).block_until_ready())
    import torch

    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    return (lambda x: torch.from_numpy(x).to(dt)), (lambda a, b: (a.transpose(-1, -2) if transposed else a) @ b)


def measure(framework: str, shape_list: Sequence[Shape], repeats: int) -> List[Dict[str, object]]:
    """GFLOP/s (best of `repeats` after two warm-up calls) of every shape in both dtypes."""
    out = []
    for dtype in DTYPES:
        print(PHASE_MARK + dtype, flush=True)  # into the oneDNN log (the worker's stdout): kernel_ms_by_phase
        for s in shape_list:
            convert, call = _matmul_fn(framework, dtype, s[5])
            a, b = (convert(x) for x in _operands(s))
            best = min(common.time_calls(functools.partial(call, a, b), warmup=2, repeats=repeats))
            out.append({"shape": s[0], "dims": list(s[1:5]), "dtype": dtype, "gflop_s": round(gflop(s) / best, 3)})
    return out


def _exec_line(ln: str):
    """(kernel name, memory descriptors, ms) of one ONEDNN_VERBOSE exec line (primitive or graph API), else None."""
    if not ln.startswith("onednn_verbose,") or ",exec," not in ln:
        return None
    parts = ln.split(",")
    i = parts.index("exec")
    if "graph" in parts[:i]:  # the graph API's line: onednn_verbose,v1,graph,exec,cpu,ID,KIND,...
        name, descs = f"graph:{parts[i + 3]}", ",".join(parts[i + 4:])
    else:
        name = f"{parts[i + 2]}:{parts[i + 3]}" if parts[i + 3] else parts[i + 2]
        descs = ",".join(parts[i + 4:])
    try:
        ms = float(parts[-1])
    except ValueError:
        ms = 0.0
    return name, descs, ms


def kernels_by_dtype(text: str) -> Dict[str, List[str]]:
    """oneDNN's `primitive:implementation` names per source dtype, from ONEDNN_VERBOSE=1 lines
    (both the primitive API's and the graph API's exec lines)."""
    kernels: Dict[str, List[str]] = {}
    for ln in text.splitlines():
        line = _exec_line(ln)
        if line is None:
            continue
        name, descs, _ = line
        dtype = next((d for d in ("bf16", "f16", "f32", "s8", "u8") if re.search(rf"(src|in0)[:_]{d}\b", descs)), "?")
        names = kernels.setdefault(dtype, [])
        if name not in names:
            names.append(name)
    return kernels


def kernel_ms_by_phase(text: str) -> Dict[str, Dict[str, float]]:
    """oneDNN's execution milliseconds per kernel while each dtype's products ran (bf16, fp32: the
    PHASE_MARK lines measure() prints), reorders and converts included: how much of a way's oneDNN
    time is the matmul kernel and how much re-lays out its operands every call."""
    out: Dict[str, Dict[str, float]] = {}
    phase = "?"
    for ln in text.splitlines():
        if ln.startswith(PHASE_MARK):
            phase = ln[len(PHASE_MARK):].strip()
            continue
        line = _exec_line(ln)
        if line is not None:
            times = out.setdefault(phase, {})
            times[line[0]] = round(times.get(line[0], 0.0) + line[2], 3)
    return out


def time_shares(times: Dict[str, float]) -> List[Tuple[str, float]]:
    """(kernel, % of the phase's oneDNN time) of one phase's kernel_ms_by_phase, largest first."""
    total = sum(times.values())
    if total <= 0:
        return []
    return [(name, 100 * ms / total) for name, ms in sorted(times.items(), key=lambda kv: -kv[1])]


@contextlib.contextmanager
def onednn_log(texts: List[str]):
    """This process's standard output (file descriptor 1, where `ONEDNN_VERBOSE` writes) goes to a temporary
    file for the block, whose text is then appended to `texts`: the verbose lines stay out of the result line."""
    log = tempfile.TemporaryFile(mode="w+")
    saved = os.dup(1)
    sys.stdout.flush()
    os.dup2(log.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        log.seek(0)
        texts.append(log.read())
        log.close()


def onednn_isa(text: str) -> Optional[str]:
    """The ISA oneDNN's verbose log says it dispatches for (None without the log)."""
    return next((ln.split("isa:", 1)[1].strip().strip(",") for ln in text.splitlines() if "isa:" in ln), None)


def worker(way: str, args) -> None:
    """Times every shape in this process (its environment already set) and emits the GFLOP/s
    with the oneDNN kernels it ran; oneDNN's verbose lines go to a file, not to the result."""
    framework = WAYS[way][0]
    texts: List[str] = []
    with onednn_log(texts):
        rows = measure(framework, shapes(args.variant, args.batch_size, args.quick), args.repeats)
        version = _version(framework)
    text = texts[0]
    common.emit({"case": way, "framework": framework, "version": version, "results": rows,
                 "kernels": kernels_by_dtype(text), "kernel_ms": kernel_ms_by_phase(text), "onednn_isa": onednn_isa(text),
                 "env": {k: v for k, v in WAYS[way][1].items() if k != "JAX_PLATFORMS"}})


def _version(framework: str) -> str:
    if framework.startswith("tf"):
        import tensorflow as tf

        return f"tensorflow {tf.__version__}"
    if framework == "jax":
        import jax

        return f"jax {jax.__version__}"
    import torch

    return f"torch {torch.__version__}"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="B/16", help="the ViT whose step shapes are timed (default B/16)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one way
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 2
    if args.batch_size < 1 or args.repeats < 1:
        raise SystemExit(f"--batch-size {args.batch_size} and --repeats {args.repeats}: both must be at least 1")
    common.check_args(args)
    return args


def main(argv=None) -> Dict[str, object]:
    args = _args(argv)
    if args.case:
        worker(args.case, args)
        return {}
    ways = common.parse_cases(args.ways, tuple(WAYS))
    try:
        shapes(args.variant, args.batch_size, args.quick)
    except ValueError as e:
        raise SystemExit(f"--variant {args.variant!r}: {e}") from None
    info = common.header("gemm_ways", {"variant": args.variant, "batch_size": args.batch_size}, argv)
    forward = ["--variant", args.variant, "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
    results = []
    for way in ways:
        framework, env = WAYS[way]
        need = "tensorflow" if framework.startswith("tf") else framework
        if not common.have(need):
            results.append(common.skipped(way, f"{need} not installed"))
            continue
        run = functools.partial(common.run_case, "bench.gemm_ways", way, forward + (["--quick"] if args.quick else []),
                                env=dict(env, ONEDNN_VERBOSE="1"), timeout=900)
        r = run()
        if str(r.get("error", "")).startswith("exit -"):  # killed by a signal: XLA's oneDNN path has aborted now and then
            crash = r["error"]
            r = dict(run(), crashed_before=crash[:200])
        results.append(r)
        print(f"  {way}: " + ("failed" if "error" in r else "done"), flush=True)
    print_ways(results)
    record = {"info": info, "results": results}
    if args.json:
        common.write_json(args.json, record)
    return record


def print_ways(results: List[Dict[str, object]]) -> None:
    """GFLOP/s of each shape (rows) by way (columns), bf16 then fp32, then each way's kernels."""
    done = [r for r in results if "results" in r]
    for dtype in DTYPES:
        names = [row["shape"] for row in done[0]["results"] if row["dtype"] == dtype] if done else []
        rows = [{"shape": n, **{r["case"]: next((x["gflop_s"] for x in r["results"]
                                                 if x["shape"] == n and x["dtype"] == dtype), None) for r in done}}
                for n in names]
        common.print_table(f"{dtype} GFLOP/s", rows, [("product", lambda r: r["shape"])] + [
            (r["case"], lambda row, c=r["case"]: "-" if row[c] is None else f"{row[c]:.0f}") for r in done])
    for r in done:
        ks = "; ".join(f"{d}: {', '.join(v)}" for d, v in r["kernels"].items()) or "none (not through oneDNN)"
        by_phase = {d: time_shares(t) for d, t in r.get("kernel_ms", {}).items()}
        shares = "; ".join(f"{d}: " + ", ".join(f"{k} {pct:.0f}%" for k, pct in kp) for d, kp in by_phase.items() if kp)
        print(f"  {r['case']} ({r['version']}): {ks}" + (f"; oneDNN time {shares}" if shares else "")
              + (f" (the first process crashed: {r['crashed_before']}; these are the retry's)" if "crashed_before" in r else ""))
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"  {r['case']}: {r.get('error') or 'skipped: ' + r['skipped']}")


if __name__ == "__main__":
    main()
