"""Shared plumbing of the benchmarks: timing, peak RSS, matmul peak, one subprocess per case.

Each case (a framework/backend/format) runs in its own Python process so that its peak RSS
is its own, its thread pools do not fight another framework's, and the Keras backend can be
chosen before Keras is imported. The driver collects one JSON line per case and prints
medians, spreads and ratios measured in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

RESULT_PREFIX = "BENCH_RESULT "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA:CPU flags that send dots (and their fusions) to oneDNN: its AMX kernels where the CPU has them.
ONEDNN_XLA_FLAGS = "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot"


# --- measuring ---------------------------------------------------------------------------
def time_calls(fn: Callable[[], object], warmup: int, repeats: int, inner: int = 1,
               cpu: Optional[List[float]] = None) -> List[float]:
    """Wall seconds per call of `fn` (mean over `inner` calls), `repeats` times, after `warmup`
    calls. When a list is passed as `cpu`, the process CPU seconds per call are appended to it
    (a figure that other processes' load disturbs far less than wall time)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t0) / inner)
        if cpu is not None:
            cpu.append((time.process_time() - c0) / inner)
    return out


def summary(values: Sequence[float]) -> Dict[str, float]:
    """Median with min/max and the relative spread ((max-min)/median) of repeated timings."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / med if med else 0.0, "n": len(values)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


# (vendor, family, first model, last model) -> core: the server cores this project's VMs have shown or may show.
# A VM's model name can be as bare as "AMD EPYC": the 2026-11-29 figures are from a Zen 5 (family 26), those of
# 2026-12-04 from a Zen 4 (family 25, model 17) at half its bf16 GEMM rate, both named "AMD EPYC".
CPU_CORES = ((("AuthenticAMD", 25, 0x00, 0x0F), "Zen 3"), (("AuthenticAMD", 25, 0x10, 0x1F), "Zen 4"),
             (("AuthenticAMD", 25, 0xA0, 0xAF), "Zen 4c"), (("AuthenticAMD", 26, 0x00, 0xFF), "Zen 5"),
             (("GenuineIntel", 6, 0x55, 0x55), "Skylake/Cascade Lake"), (("GenuineIntel", 6, 0x6A, 0x6A), "Ice Lake"),
             (("GenuineIntel", 6, 0x8F, 0x8F), "Sapphire Rapids"), (("GenuineIntel", 6, 0xCF, 0xCF), "Emerald Rapids"),
             (("GenuineIntel", 6, 0xAD, 0xAE), "Granite Rapids"))


def cpu_kind(vendor: str, family: Optional[int], model: Optional[int]) -> str:
    """"Zen 4 (family 25, model 17)": the core behind /proc/cpuinfo's family and model numbers, where known."""
    if family is None or model is None:
        return "unknown"
    core = next((name for (v, f, lo, hi), name in CPU_CORES if v == vendor and f == family and lo <= model <= hi), None)
    ids = f"family {family}, model {model}"
    return f"{core} ({ids})" if core else ids


def machine() -> Dict[str, object]:
    """What the numbers were measured on (CPU model, its core, the SIMD flags that matter for fp32/int8
    kernels), and how busy it was."""
    model, flags, fields = platform.processor(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key, _, value = (part.strip() for part in ln.partition(":"))
                if key == "model name":
                    model = value
                elif key in ("vendor_id", "cpu family", "model"):
                    fields.setdefault(key, value)
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3

    def number(key: str) -> Optional[int]:
        return int(fields[key]) if fields.get(key, "").isdigit() else None

    return {"cpu": model, "cpu_kind": cpu_kind(fields.get("vendor_id", ""), number("cpu family"), number("model")),
            "cpu_flags": [f for f in SIMD_FLAGS if f in flags], "cores": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": [round(v, 2) for v in load]}


def cpu_name() -> str:
    """One line: CPU model, its SIMD flags, core count."""
    m = machine()
    return f"{m['cpu'] or 'unknown CPU'}, {m['cpu_kind']} ({' '.join(m['cpu_flags'])}), {m['cores']} cores"


def emit(result: Dict[str, object]) -> None:
    """Hand one case's result to the driver (a tagged JSON line on stdout)."""
    result = dict(result, peak_rss_mb=round(peak_rss_mb(), 1))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


# --- the machine's matmul limit ----------------------------------------------------------
def matmul_peak(n: int = 2048, repeats: int = 5, dtypes: Sequence[str] = ("float32",)) -> Dict[str, float]:
    """Best GEMM GFLOP/s this process reaches with TensorFlow, torch and NumPy (whichever import),
    in fp32 and, when asked, bf16.

    The best of each precision is the 'limit' that achieved FLOP/s in that precision are compared with.
    """
    import numpy as np

    rs = np.random.default_rng(0)
    a = rs.standard_normal((n, n)).astype("float32")
    b = rs.standard_normal((n, n)).astype("float32")
    flops = 2.0 * n ** 3
    out: Dict[str, float] = {}

    def best(fn) -> float:
        return flops / min(time_calls(fn, warmup=2, repeats=repeats)) / 1e9

    out["numpy_fp32"] = best(lambda: a @ b)
    try:
        import tensorflow as tf

        ta, tb = tf.constant(a), tf.constant(b)
        out["tf_fp32"] = best(lambda: tf.linalg.matmul(ta, tb).numpy())
        if "bfloat16" in dtypes:
            ha, hb = tf.cast(ta, tf.bfloat16), tf.cast(tb, tf.bfloat16)
            out["tf_bf16"] = best(lambda: tf.linalg.matmul(ha, hb).numpy())
    except ImportError:
        pass
    try:
        import torch

        pa, pb = torch.from_numpy(a), torch.from_numpy(b)
        out["torch_fp32"] = best(lambda: pa @ pb)
        if "bfloat16" in dtypes:
            ha, hb = pa.bfloat16(), pb.bfloat16()
            out["torch_bf16"] = best(lambda: ha @ hb)
    except ImportError:
        pass
    out["peak_fp32"] = max(v for k, v in out.items() if k.endswith("fp32"))
    bf16 = [v for k, v in out.items() if k.endswith("bf16")]
    if bf16:
        out["peak_bf16"] = max(bf16)
    return out


# --- what is benchmarked -----------------------------------------------------------------
TIMM_NAMES = {"Ti": "vit_tiny_patch16_224", "S": "vit_small_patch16_224", "B": "vit_base_patch16_224",
              "L": "vit_large_patch16_224"}


def model_flags(args) -> List[str]:
    """The flags that pass the benchmarked model and batch on to a case's own process."""
    out = ["--variant", args.variant, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    return out + (["--num-layers", str(args.num_layers)] if args.num_layers else [])


def vit_config(args, num_classes: int):
    """The ViTConfig benchmarked: --variant with the --image-size / --num-layers overrides."""
    from keras_vit.config import parse_variant

    extra = {"num_layers": args.num_layers} if args.num_layers else {}
    return parse_variant(args.variant, image_size=args.image_size, num_classes=num_classes, **extra)


def synthetic_batch(args, num_classes: int):
    """One seeded training batch: float images in [0, 255] (B, H, W, 3) and int32 labels."""
    import numpy as np

    rs = np.random.default_rng(0)
    x = rs.uniform(0, 255, (args.batch_size, args.image_size, args.image_size, 3)).astype("float32")
    y = rs.integers(0, num_classes, (args.batch_size,)).astype("int32")
    return x, y


# Counts a run needs at least one of, and counts that may be 0 (a warm-up, no interleaving).
_AT_LEAST_ONE = ("steps", "repeats", "rounds", "batch_size", "batch_repeats", "eval_images", "images", "epochs",
                 "num_images", "num_calibration")
_AT_LEAST_ZERO = ("warmup", "interleave", "threads")  # threads 0: the runtime's default
_PATHS = ("json", "keep", "work_dir", "out")


def check_args(args, paths_must_exist: Sequence[str] = ()) -> None:
    """One SystemExit line for a bad option, before any case runs (a case would fail in its own process, the
    run exit 0 with an empty table, or `--steps 0` train forever): counts >= 1 (warm-up, interleave >= 0),
    the variant and image size a ViT can be built with, the folder of --json existing; --json, --keep and
    --work-dir made absolute (each case's process runs in the repository, not here); `paths_must_exist`:
    the attributes naming input files or folders."""
    for name in _AT_LEAST_ONE + _AT_LEAST_ZERO:
        value = getattr(args, name, None)
        floor = 0 if name in _AT_LEAST_ZERO else 1
        if isinstance(value, int) and not isinstance(value, bool) and value < floor:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least {floor}, got {value}")
    if getattr(args, "variant", None) is not None and hasattr(args, "image_size"):
        from keras_vit.config import parse_variant

        layers = getattr(args, "num_layers", None)
        try:
            parse_variant(args.variant, image_size=args.image_size, num_classes=10,
                          **({"num_layers": layers} if layers else {}))
        except (ValueError, TypeError) as exc:
            raise SystemExit(str(exc).strip().splitlines()[0]) from None
    for name in _PATHS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            setattr(args, name, os.path.abspath(value))
    if isinstance(getattr(args, "json", None), str) and not os.path.isdir(os.path.dirname(args.json)):
        raise SystemExit(f"--json {args.json}: folder {os.path.dirname(args.json)} does not exist")
    for name in paths_must_exist:
        for value in (getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]):
            if value is not None and not os.path.exists(value):
                raise SystemExit(f"{value}: no such file or folder")


def failed(results: Sequence[Dict[str, object]]) -> int:
    """The exit status of a run: 1 when a case that was not skipped has an error, else 0."""
    return int(any("error" in r for r in results))


def parse_cases(text: str, allowed: Sequence[str]) -> List[str]:
    """The comma-separated case list, or one clear SystemExit naming the unknown ones."""
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in allowed]
    if bad:
        raise SystemExit(f"unknown case(s) {bad}; allowed: {', '.join(allowed)}")
    return cases


# --- the driver --------------------------------------------------------------------------
def run_case(module: str, case: str, args: Sequence[str], env: Optional[Dict[str, str]] = None,
             timeout: float = 1800) -> Dict[str, object]:
    """Run `python -m module --case case args...` and return its result, or why it has none."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    cmd = [sys.executable, "-m", module, "--case", case, *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            res = json.loads(line[len(RESULT_PREFIX):])
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"case": case, "error": f"exit {proc.returncode}: {tail[0][:300]}"}


def skipped(case: str, why: str) -> Dict[str, object]:
    return {"case": case, "skipped": why}


def have(module: str) -> bool:
    """Whether a module can be imported (the peers are optional: CI does not install them)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def print_table(title: str, rows: List[Dict[str, object]], columns: Sequence[tuple]) -> None:
    """A plain-text table: columns are (header, function of a row -> str)."""
    cells = [[h for h, _ in columns]]
    for r in rows:
        cells.append([f(r) for _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for i, c in enumerate(cells):
        print("  " + "  ".join(s.rjust(w) if j else s.ljust(w) for j, (s, w) in enumerate(zip(c, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def print_peak_and_problems(results: List[Dict[str, object]], table) -> None:
    """The matmul limit line, then `table()` (the bench's own table), then failed/skipped cases."""
    p = next((r for r in results if r["case"] == "peak"), None)
    if p and "peak_fp32" in p:
        print("matmul peak (2048^3 GEMM, GFLOP/s): " + ", ".join(
            f"{k} {v:.0f}" for k, v in p.items() if isinstance(v, float) and k not in ("peak_rss_mb", "wall_s")))
    table()
    for r in results:
        if "error" in r or "skipped" in r:
            print(f"  {r['case']}: {r.get('error') or 'skipped: ' + r['skipped']}")


def write_json(path: str, obj: object) -> None:
    """`obj` as indented JSON at `path`, written to a temporary name and renamed into place."""
    from keras_vit.files import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def header(name: str, extra: Dict[str, object], argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Print and return what this run is: machine, load, command line (`argv` when the bench's main
    was called from Python with arguments, as bench.amx does, else this process's own)."""
    command = f"python -m bench.{name} " + " ".join(list(argv) if argv is not None else sys.argv[1:])
    info = {"bench": name, "command": command, **machine(), **extra}
    print(json.dumps(info))
    return info
