"""Where a training step's time goes: TensorFlow's profiler over a few `train_on_batch` steps of
keras-vit (mixed_bfloat16 + fusible, the `vitcli train` default on a CPU with native bf16), with
the op time summed by kind and the XLA-fused element-wise work by the model part it comes from.

  python -m bench.profile_train --variant B/16 --steps 3
  python -m bench.profile_train --variant B/16 --without gelu-gradient   # as before that change

Times are the ops' durations on TensorFlow's threads, per step: two ops running at once on the
two inter-op threads both count, so the kinds add up to more than the step's wall time.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import tempfile
import time
from typing import Dict

from bench import common, train_ab

KINDS = (("weight GEMMs (oneDNN MatMul, forward and backward)", re.compile(r":_Mkl(Native)?(Fused)?MatMul$")),
         ("attention products (BatchMatMul)", re.compile(r"BatchMatMul")),
         ("patch embedding (Conv2D)", re.compile(r"Conv2D")),
         ("XLA cluster: caller waiting", re.compile(r"^BlockUntilReady$")),
         ("XLA-fused element-wise", re.compile(r"fusion|reduce-window|^wrapped_|ThunkExecutor|CpuExecutable")),
         ("TF executor", re.compile(r"^Executor")))


def _self_times(plane) -> Dict[str, int]:
    """Self time (picoseconds) per event name on the TF compute and Eigen threads."""
    self_ps: Dict[str, int] = collections.Counter()
    for line in plane.lines:
        if line.name == "python":
            continue
        stack = []
        for e in sorted(line.events, key=lambda e: (e.offset_ps, -e.duration_ps)):
            name = plane.event_metadata[e.metadata_id].name
            while stack and stack[-1][0] <= e.offset_ps:
                stack.pop()
            if stack:
                self_ps[stack[-1][1]] -= e.duration_ps
            self_ps[name] += e.duration_ps
            stack.append((e.offset_ps + e.duration_ps, name))
    return self_ps


def _fusion_parts(plane, dump: str) -> Dict[str, int]:
    """XLA fusion time by the TF op names (model parts) it was compiled from, via the HLO dump."""
    texts: Dict[tuple, str] = {}
    parts: Dict[str, int] = collections.Counter()
    for line in plane.lines:
        for e in line.events:
            stats = {plane.stat_metadata[s.metadata_id].name:
                     plane.stat_metadata[s.ref_value].name if s.ref_value else (s.str_value or s.int64_value)
                     for s in e.stats}
            if "hlo_op" not in stats or str(stats["hlo_op"]).startswith("ThunkExecutor"):
                continue
            key = (stats["hlo_module"], stats["program_id"])
            if key not in texts:
                found = glob.glob(f"{dump}/module_{key[1]:04d}.{key[0]}.cpu_after_optimizations.txt")
                texts[key] = open(found[0]).read() if found else ""
            parts[_part(texts[key], str(stats["hlo_op"]))] += e.duration_ps
    return parts


def _part(text: str, hlo_op: str) -> str:
    """The model part of one HLO instruction: its fused computation's most frequent op names."""
    m = re.search(r"^\s*(ROOT )?%" + re.escape(hlo_op) + r" = [^\n]*?calls=%([\w.\-]+)", text, re.M)
    body = ""
    if m:
        comp = re.search(r"^%" + re.escape(m.group(2)) + r" .*?\n}", text, re.M | re.S)
        body = comp.group(0) if comp else ""
    names = collections.Counter()
    for name in re.findall(r'op_name="([^"]+)"', body):
        backward = name.startswith("gradient_tape/")
        name = re.sub(r"^(gradient_tape/)?vit_\w+?_1/|encoderblock_\d+_1/|_\d+(?=/|$)", "", name)
        names[("backward: " if backward else "") + "/".join(name.split("/")[:3])] += 1
    return " + ".join(n for n, _ in names.most_common(2)) or "(other: converts, reductions)"


def main(argv=None) -> Dict[str, float]:
    """Profiles, prints the tables and returns {kind: ms per step} with "step" the wall time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="B/16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--top", type=int, default=15, help="model parts (and other ops' types) to list")
    parser.add_argument("--without", choices=train_ab.CHANGES, help="profile the model without this change")
    parser.add_argument("--jit", default="fusible", choices=("fusible", "scoped"),
                        help="the step's compilation: fusible (the default) or scoped (`vitcli train --jit scoped`)")
    parser.add_argument("--policy", default="mixed_bfloat16", choices=("mixed_bfloat16", "float32"),
                        help="float32 with --jit scoped: the notebook's float32 step on AMX (graph mode, the scopes)")
    parser.add_argument("--json", default=None, help="also write the step's time by op kind and model part here")
    parser.add_argument("--keep", default=None, help="keep the HLO dump and the trace in this folder (default: a "
                                                     "temporary one, removed at the end)")
    args = parser.parse_args(argv)
    common.check_args(args)
    info = common.header("profile_train", {"variant": args.variant, "image_size": args.image_size,
                                           "batch_size": args.batch_size, "steps": args.steps,
                                           "without": args.without, "jit": args.jit, "policy": args.policy},
                         argv)
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    work = args.keep or tempfile.mkdtemp(prefix="keras_vit_profile_")
    try:
        return _profile(args, info, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _profile(args, info: Dict[str, object], work: str) -> Dict[str, float]:
    """main()'s work, its HLO dump and trace in `work`."""
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={work}/hlo --xla_dump_hlo_as_text"
    model, x, y = train_ab.bf16_training_model(args.variant, args.batch_size, args.image_size, args.without or "",
                                                jit=args.jit, policy=args.policy)
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    for _ in range(6):
        model.train_on_batch(x, y)
    tf.profiler.experimental.start(f"{work}/trace")
    start = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    wall = (time.perf_counter() - start) / args.steps
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{work}/trace/plugins/profile/*/*.xplane.pb")[0], "rb") as f:
        space.ParseFromString(f.read())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    per_step = 1e9 * args.steps  # picoseconds -> ms per step
    kinds: Dict[str, int] = collections.Counter()
    other: Dict[str, int] = collections.Counter()  # "other TF ops" by op type (the event name's last part)
    for name, ps in _self_times(plane).items():
        kind = next((k for k, rx in KINDS if rx.search(name)), "other TF ops")
        kinds[kind] += ps
        if kind == "other TF ops":
            other[name.rsplit(":", 1)[-1].strip()] += ps
    print(f"{args.variant}, {args.image_size} px, batch {args.batch_size}, {args.policy} + {args.jit}: {wall * 1000:.0f} ms a step "
          f"({args.batch_size / wall:.2f} img/s under the profiler)" + (f"; the trace in {work}" if args.keep else ""))
    for kind, ps in kinds.most_common():
        print(f"  {ps / per_step:8.1f} ms  {kind}")
    print("XLA-fused element-wise work by model part:")
    parts = collections.Counter(_fusion_parts(plane, f"{work}/hlo")).most_common(args.top)
    for part, ps in parts:
        print(f"  {ps / per_step:8.1f} ms  {part}")
    others = other.most_common(args.top)
    print("Other TF ops by type: " + "; ".join(f"{op} {ps / per_step:.1f} ms" for op, ps in others))
    result = {"step": wall * 1000, **{kind: ps / per_step for kind, ps in kinds.items()}}
    if args.json:
        common.write_json(args.json, {"info": info, "step_ms": round(wall * 1000, 2),
                                      "kinds_ms": {k: round(ps / per_step, 2) for k, ps in kinds.most_common()},
                                      "fusion_parts_ms": {part: round(ps / per_step, 2) for part, ps in parts},
                                      "other_ops_ms": {op: round(ps / per_step, 2) for op, ps in others}})
    return result


if __name__ == "__main__":
    main()
