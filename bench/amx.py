"""The AMX table of issue #25 in one run, as JSON and markdown.

Training img/s of every entry path beside timm, the GEMM peaks, the GFLOP/s of a ViT step's
matmuls in every way in (TensorFlow's oneDNN, XLA, JAX with and without oneDNN, torch) with the
oneDNN kernel each runs (bench.gemm_ways), and the deployment files' latency.

    bash bench/amx.sh [--quick] [--out DIR]       # sets up the peers (torch, timm), then runs this
    python -m bench.amx [--quick] [--out DIR]     # the same in an environment that has them

Made for an Intel Xeon with AMX (amx_bf16, amx_int8) and runs on any x86 CPU: without AMX the
table's title says so. It runs bench.gemm_ways, bench.train, bench.infer, bench.ort_interleaved, bench.profile_train and
bench.step_kernels (every case in its own process) within --budget seconds: after the ways, the peaks and the inference stage,
B/16 keeps a quarter of the budget for Ti/16, which runs on what is left but a sixth (the profile and the step kernels); each training
stage starts another round only when one more as long as the last still fits. Last, bench.profile_train
splits Ti/16's default step by op kind (issue #25's "remaining gap ... explained per op kind"), and bench.step_kernels
names the oneDNN kernel of every matmul in that step and in timm's (issue #25's "the AMX kernels in every matmul of the step"). DIR/amx.json
(every figure with the CPU, its flags, the load, the date and the command) and DIR/amx.md (the
tables for BENCHMARKS.md) are rewritten after every stage, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.amx_table import AMX_FLAGS, has_amx, markdown, train_cases  # noqa: E402

INFER_CASES = ("onnx", "onnx-static", "onnx-opt-static", "tflite", "tflite-dynamic", "tflite-int8", "timm-onnx")
PACKAGES = ("tensorflow", "keras", "torch", "torchvision", "timm", "onnxruntime", "ai-edge-litert")
# B/16 (its rounds take minutes on 2 cores) runs before Ti/16 and leaves this share of the budget to it;
# Ti/16's rounds (a minute or two) then fill what is left.
TI_RESERVE = 0.25
ROUNDS = 3  # most rounds per training stage
# The profile of Ti/16's default step runs last, in what Ti/16's rounds leave of this share of the budget (40 s on the
# Zen 4: a model build, 6 warm-up and 3 profiled steps, the trace read back).
PROFILE_RESERVE = 0.1
# Then bench.step_kernels reads the oneDNN kernel of every matmul in Ti/16's default step and in timm's bf16 step
# (two processes, 45 s on the Zen 4).
KERNELS_RESERVE = 0.06
KERNEL_CASES = "{},timm-bf16-unfused"  # step_kernels' `default` is fusible: `scoped` where auto picks that (AMX)


# --- the stages ----------------------------------------------------------------------------
def stage_times() -> Dict[str, object]:
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load": [round(v, 2) for v in os.getloadavg()]}


def run_stage(record: Dict[str, object], name: str, fn) -> None:
    """Runs one stage, recording its date, load before and after, wall time and result (or error)."""
    print(f"\n== {name} ==", flush=True)
    start, t0 = stage_times(), time.perf_counter()
    try:
        result = fn()
    except (Exception, SystemExit) as e:  # one failed stage must not lose the others' figures
        result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    record["stages"][name] = {"start": start, "end": stage_times(), "wall_s": round(time.perf_counter() - t0, 1),
                              **result}


@functools.cache
def _default_jit() -> str:
    """The jit mode `vitcli train`'s default resolves to on this machine for a step as large as the table's."""
    from keras_vit import precision

    return precision.resolve("auto", "auto", 1e3, "tensorflow", precision.detect_hardware("tensorflow")).jit_compile


def train_stage(args, out: str, variant: str, budget: float, with_peak: bool = False) -> Dict[str, object]:
    """bench.train on `variant` (or its `peak` case alone): the JSON it writes, read back."""
    from bench import train

    tag = "peak" if with_peak else variant.replace("/", "")
    path = os.path.join(out, f"train-{tag}.json")
    argv = ["--variant", variant, "--json", path]
    if with_peak:
        argv += ["--cases", "peak", "--rounds", "1"]
    else:
        argv += ["--cases", ",".join(train_cases(_default_jit())), "--rounds", str(args.rounds),
                 "--budget", f"{max(1.0, budget):.0f}"]
        if not args.quick:  # B/16: seconds a step (timm fp32 ~20 s on 2 AVX512 cores), so few steps, more rounds
            steps = ("2", "1", "2") if variant == "B/16" else ("10", "5", "2")
            argv += ["--image-size", "224", "--batch-size", "16", "--warmup", steps[0], "--steps", steps[1],
                     "--repeats", steps[2]]
    train.main(argv + (["--quick"] if args.quick else []))
    with open(path) as f:
        raw = json.load(f)
    return {"command": raw["info"]["command"], "json": os.path.basename(path), **raw}


def profile_stage(args, out: str) -> Dict[str, object]:
    """bench.profile_train on the default path (mixed_bfloat16 + fusible; scoped on AMX) at Ti/16, in its own process
    (the XLA dump flags it sets must precede TensorFlow's start): the step's op time by kind (GEMMs, attention
    products, fused element-wise work, executor) and the fused work by model part."""
    path = os.path.join(out, "profile-Ti16.json")
    jit = _default_jit()
    argv = ["--variant", "Ti/16", "--json", path, "--jit", jit if jit in ("fusible", "scoped") else "fusible"]
    argv += ["--image-size", "32", "--batch-size", "4", "--steps", "1"] if args.quick else ["--steps", "3"]
    proc = subprocess.run([sys.executable, "-m", "bench.profile_train", *argv], cwd=common.ROOT, capture_output=True,
                          text=True, timeout=1200, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    print("\n".join(ln for ln in proc.stdout.splitlines() if not ln.startswith("{")), flush=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}"}
    with open(path) as f:
        raw = json.load(f)
    return {"command": raw["info"]["command"], "json": os.path.basename(path), **raw}


def kernels_stage(args, out: str) -> Dict[str, object]:
    """bench.step_kernels at Ti/16: which oneDNN kernel each matmul of the default training step runs (AMX or
    not), and its ms a step, beside timm's bf16 step."""
    from bench import step_kernels

    path = os.path.join(out, "step-kernels-Ti16.json")
    cases = KERNEL_CASES.format("scoped" if _default_jit() == "scoped" else "default")
    step_kernels.main(["--variant", "Ti/16", "--cases", cases, "--json", path] + (["--quick"] if args.quick else []))
    with open(path) as f:
        raw = json.load(f)
    return {"command": raw["info"]["command"], "json": os.path.basename(path), **raw}


def ways_stage(args, out: str) -> Dict[str, object]:
    """bench.gemm_ways on ViT-B/16's step shapes: the GFLOP/s of every way in (TensorFlow's oneDNN,
    XLA, JAX with and without oneDNN, torch) and the oneDNN kernel each one ran."""
    from bench import gemm_ways

    path = os.path.join(out, "gemm_ways.json")
    argv = ["--variant", "B/16", "--json", path, "--repeats", "3"] + (["--quick"] if args.quick else [])
    gemm_ways.main(argv)
    with open(path) as f:
        raw = json.load(f)
    return {"command": raw["info"]["command"], "json": os.path.basename(path), **raw}


def infer_stage(args, out: str) -> Dict[str, object]:
    """bench.infer (each file in its own process) then bench.ort_interleaved (the ONNX and TFLite files call
    by call in one process) on ViT-Ti/16's files."""
    from bench import infer, ort_interleaved

    files = os.path.join(out, "files")
    shutil.rmtree(files, ignore_errors=True)  # bench.ort_interleaved times every known file it finds there
    path, ort_path = os.path.join(out, "infer.json"), os.path.join(out, "ort_interleaved.json")
    argv = ["--cases", ",".join(INFER_CASES), "--keep", files, "--json", path] + (["--quick"] if args.quick else [])
    infer.main(argv)
    ort_argv = [files, "--rounds", "20" if args.quick else "100", "--json", ort_path]
    ort_interleaved.main(ort_argv)
    with open(path) as f:
        raw = json.load(f)
    with open(ort_path) as f:
        ort = json.load(f)
    return {"command": raw["info"]["command"], "ort_command": "python -m bench.ort_interleaved "
            + " ".join(ort_argv), "json": [os.path.basename(path), os.path.basename(ort_path)], **raw,
            "interleaved": ort}


# --- the driver ------------------------------------------------------------------------------
def versions() -> Dict[str, Optional[str]]:
    """Installed versions of the frameworks measured (None where a package is missing)."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def amx_and_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> List[str]:
    """Every CPU flag naming AMX or bf16 (amx_fp16, avx512_fp16 and the like included)."""
    try:
        with open(cpuinfo) as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return sorted(f for f in flags if "amx" in f or "bf16" in f)


def commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=common.ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write(record: Dict[str, object], out: str) -> None:
    """amx.json and amx.md, each written to a temporary name and renamed into place."""
    from keras_vit.files import atomic_path

    common.write_json(os.path.join(out, "amx.json"), record)
    with atomic_path(os.path.join(out, "amx.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(record))


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="amx-out", help="folder for amx.json, amx.md, the stages' JSON and the files")
    p.add_argument("--quick", action="store_true", help="tiny models and rounds: a smoke run of the pipeline")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 840; 150 with --quick)")
    p.add_argument("--rounds", type=int, default=None, help=f"most rounds per training stage (default {ROUNDS}; "
                                                             "2 with --quick)")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 150.0 if args.quick else 840.0
    if args.rounds is None:
        args.rounds = 2 if args.quick else ROUNDS
    if args.budget <= 0 or args.rounds < 1:
        raise SystemExit(f"--budget {args.budget:g} and --rounds {args.rounds}: --budget must be above 0 and "
                         "--rounds at least 1")
    return args


def main(argv=None) -> Dict[str, object]:
    args = _args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    m = common.machine()
    m["date_start"] = m.pop("date")
    m["amx_and_bf16_flags"] = amx_and_bf16_flags()
    command = os.environ.get("BENCH_AMX_COMMAND") or " ".join(
        ["python -m bench.amx", *(sys.argv[1:] if argv is None else argv)])
    record: Dict[str, object] = {
        "bench": "amx", "command": command.strip(),
        "quick": args.quick, "budget_s": args.budget, "machine": m, "amx": has_amx(m["cpu_flags"]),
        "versions": versions(), "commit": commit(), "stages": {}}
    print(f"{m['cpu']}, {m['cpu_kind']}: {', '.join(f'{f} ' + ('yes' if f in m['cpu_flags'] else 'no') for f in AMX_FLAGS)}; "
          f"load {m['load']}; budget {args.budget:.0f} s -> {out}", flush=True)

    def left() -> float:
        return args.budget - (time.perf_counter() - t0)

    stages = [("gemm ways", lambda: ways_stage(args, out)),
              ("peak", lambda: train_stage(args, out, "Ti/16", 0, with_peak=True)),
              ("inference", lambda: infer_stage(args, out)),
              ("train B/16", lambda: train_stage(args, out, "B/16", left() - TI_RESERVE * args.budget)),
              ("train Ti/16", lambda: train_stage(args, out, "Ti/16",
                                                  left() - (PROFILE_RESERVE + KERNELS_RESERVE) * args.budget)),
              ("profile Ti/16", lambda: profile_stage(args, out)),
              ("step kernels Ti/16", lambda: kernels_stage(args, out))]
    for name, fn in stages:
        run_stage(record, name, fn)
        record["wall_s"] = round(time.perf_counter() - t0, 1)
        write(record, out)
    record["date_end"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    record["load_end"] = [round(v, 2) for v in os.getloadavg()]
    write(record, out)
    print(f"\nwrote {os.path.join(out, 'amx.json')} and {os.path.join(out, 'amx.md')} "
          f"({record['wall_s']:.0f} s of a {args.budget:.0f} s budget)", flush=True)
    return record


if __name__ == "__main__":
    main()
