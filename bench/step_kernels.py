"""Which oneDNN kernel every matmul of a real training step runs, and for how long: keras-vit's bf16
step beside timm's, per primitive and problem, per step (`ONEDNN_VERBOSE=1` over a few steps).

    python -m bench.step_kernels --variant Ti/16                       # default and timm bf16 (explicit attention)
    python -m bench.step_kernels --cases default,scoped,timm-bf16 --interop 2 --json kernels.json

bench.gemm_ways times a step's products one by one; this reads the step itself, so it answers issue #25's
"get the AMX kernels into every matmul of the step (forward, backward, attention products)": a kernel
name with `amx` in it is AMX (`brg_matmul:avx512_core_amx`, `avx10_1_512_amx`), and the forward's
`inner_product` and the backward's transposed products show up as what they are.

Cases (each in its own process; mixed_bfloat16 / bf16 autocast, SGD momentum, synthetic batch):
- `default`: keras-vit as `vitcli train` runs it on a CPU with native bf16 (fusible clustering);
- `scoped`: the same with `--jit scoped` (the notebook's XLA scopes);
- `timm-bf16`, `timm-bf16-unfused`: timm under bf16 autocast, torch's fused attention / timm's explicit
  softmax(q k^T) v (the faster on the AMD Zen 4).

`--interop 1` (the default here) runs TensorFlow's ops one at a time, as torch runs its own: with
TensorFlow's default of two inter-op threads two GEMMs often run at once on the two cores, and each
call's time then reads about twice its kernel's (Ti/16 on the Zen 4: 623 ms of oneDNN time a step
against 345 with one thread, for a step 5% faster in wall time). The per-call times are comparable with
torch's only with one. The wall time a step printed here is under the verbose log's cost: read the
speed from bench.train.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.gemm_ways import _exec_line, onednn_isa, onednn_log  # noqa: E402

CASES = ("default", "scoped", "timm-bf16", "timm-bf16-unfused")
MARK = "keras_vit_step_kernels,steps\n"  # into the oneDNN log before the counted steps


def _step(case: str, args):
    """The case's training step as a call (its model built, nothing run yet)."""
    if case.startswith("timm"):
        from bench import train

        return train.timm_step(args, bf16=True, fused_attn=not case.endswith("-unfused"))[1]
    from bench import train_ab

    model, x, y = train_ab.bf16_training_model(args.variant, args.batch_size, args.image_size,
                                               jit="scoped" if case == "scoped" else "fusible")
    return lambda: model.train_on_batch(x, y)


def census(text: str, steps: int) -> Dict[str, object]:
    """oneDNN's exec lines after MARK, per step: ms by primitive kind, and each (kernel, problem) row's
    calls and ms, largest first; `amx`: whether any kernel run was an AMX one."""
    text = text.split(MARK, 1)[1] if MARK in text else text
    rows: Dict[tuple, List[float]] = collections.defaultdict(lambda: [0, 0.0])
    kinds: Dict[str, float] = collections.Counter()
    for ln in text.splitlines():
        line = _exec_line(ln)
        if line is None:
            continue
        name, descs, ms = line
        problem = descs.rsplit(",", 2)[-2] if descs.count(",") >= 2 else descs
        rows[(name, problem)][0] += 1
        rows[(name, problem)][1] += ms
        kinds[name.split(":", 1)[0]] += ms
    ordered = sorted(rows.items(), key=lambda kv: -kv[1][1])
    return {"onednn_ms": round(sum(kinds.values()) / steps, 2),
            "kinds_ms": {k: round(v / steps, 2) for k, v in kinds.most_common()},
            "rows": [{"kernel": k, "problem": p, "calls": round(n / steps, 2), "ms": round(ms / steps, 3)}
                     for (k, p), (n, ms) in ordered],
            "amx": any("amx" in k for k, _ in rows)}


def worker(case: str, args) -> None:
    """Builds and warms the case's step, then runs `--steps` with oneDNN's verbose log going to a file."""
    texts: List[str] = []
    with onednn_log(texts):
        step = _step(case, args)
        for _ in range(args.warmup):
            step()
        sys.stdout.write(MARK)
        sys.stdout.flush()  # before oneDNN's next line, which it writes to the descriptor itself
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - start) / args.steps
    common.emit({"case": case, "onednn_isa": onednn_isa(texts[0]), "verbose_wall_ms": round(wall * 1000, 1),
                 **census(texts[0], args.steps)})


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="Ti/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="steps logged (after --warmup)")
    p.add_argument("--warmup", type=int, default=6, help="steps before logging (compilation included)")
    p.add_argument("--interop", type=int, default=1,
                   help="TensorFlow's inter-op threads (TF_NUM_INTEROP_THREADS; 1: one op at a time, see above)")
    p.add_argument("--cases", default="default,timm-bf16-unfused", help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--top", type=int, default=12, help="rows (kernel, problem) to print per case")
    p.add_argument("--quick", action="store_true", help="a tiny step (32 px, batch 4, 1 + 1 steps): a smoke run")
    p.add_argument("--json", default=None, help="also write every row to this file")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    args = p.parse_args(argv)
    args.num_layers = None  # bench.train's model flags: the variant's own depth
    if args.quick:
        args.image_size, args.batch_size, args.steps, args.warmup = 32, 4, 1, 1
    if args.steps < 1 or args.warmup < 0 or args.interop < 1:
        raise SystemExit(f"--steps {args.steps}, --warmup {args.warmup}, --interop {args.interop}: "
                         "--steps and --interop must be at least 1, --warmup at least 0")
    common.check_args(args)
    return args


def main(argv=None) -> Dict[str, object]:
    args = _args(argv)
    if args.case:
        worker(args.case, args)
        return {}
    cases = common.parse_cases(args.cases, CASES)
    info = common.header("step_kernels", {"variant": args.variant, "image_size": args.image_size,
                                          "batch_size": args.batch_size, "steps": args.steps,
                                          "interop": args.interop}, argv)
    forward = ["--variant", args.variant, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
    results = []
    for case in cases:
        need = "timm" if case.startswith("timm") else "tensorflow"
        if not common.have(need):
            results.append(common.skipped(case, f"{need} not installed (pip install -r bench/requirements.txt)"))
            continue
        env = {"ONEDNN_VERBOSE": "1", "TF_NUM_INTEROP_THREADS": str(args.interop)}
        results.append(common.run_case("bench.step_kernels", case, forward, env=env, timeout=900))
    print_census(results, args.top)
    record = {"info": info, "results": results}
    if args.json:
        common.write_json(args.json, record)
    return record


def _kind_ms(r: Dict[str, object], kind: str) -> str:
    return f"{r['kinds_ms'].get(kind, 0):.1f}"


def print_census(results: List[Dict[str, object]], top: int) -> None:
    """One summary table (oneDNN ms a step by primitive kind), then each case's largest rows."""
    done = [r for r in results if "rows" in r]
    kinds = sorted({k for r in done for k in r["kinds_ms"]}, key=lambda k: -max(r["kinds_ms"].get(k, 0) for r in done))
    common.print_table("oneDNN ms a step by primitive", done, [
        ("case", lambda r: r["case"]), ("AMX", lambda r: "yes" if r["amx"] else "no"),
        ("oneDNN", lambda r: f"{r['onednn_ms']:.1f}"),
        *[(k, functools.partial(_kind_ms, kind=k)) for k in kinds],
        ("wall (verbose on)", lambda r: f"{r['verbose_wall_ms']:.0f}")])
    for r in done:
        common.print_table(f"{r['case']}: largest (kernel, problem) rows, a step", r["rows"][:top], [
            ("ms", lambda row: f"{row['ms']:.1f}"), ("calls", lambda row: f"{row['calls']:g}"),
            ("ms a call", lambda row: f"{row['ms'] / row['calls']:.2f}" if row["calls"] else "-"),
            ("kernel", lambda row: row["kernel"]), ("problem", lambda row: row["problem"])])
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"  {r['case']}: {r.get('error') or 'skipped: ' + r['skipped']}")


if __name__ == "__main__":
    main()
