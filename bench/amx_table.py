"""bench.amx's record as markdown: the tables of the AMX run (GEMM ways and their oneDNN kernels, GEMM peaks, training
at Ti/16 and B/16 beside timm, inference), ready to paste into BENCHMARKS.md."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from bench.gemm_ways import time_shares

AMX_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16")
# torch-bf16: keras-vit on Keras' PyTorch backend in mixed_bfloat16, whose matmuls are torch's own oneDNN ones (the
# kernels timm-bf16 runs): the way in to AMX should TensorFlow's oneDNN not take it.
# tf-bf16 / tf-bf16-scoped: `--jit fusible` / `--jit scoped`, the two bf16 modes of `auto` (fusible on the AMD kind,
# scoped on AMX from this table, 2026-12-05); the one the default runs is left out (train_cases).
TRAIN_CASES = ("default", "tf-bf16", "tf-bf16-scoped", "notebook", "notebook-bf16", "torch-bf16", "timm", "timm-bf16",
               "timm-bf16-unfused")
# The explicit case that repeats the default where `auto` picks that bf16 mode (fusible; scoped on AMX since 2026-12-05)
MODE_CASES = {"fusible": "tf-bf16", "scoped": "tf-bf16-scoped"}


def train_cases(default_jit: str) -> Tuple[str, ...]:
    """TRAIN_CASES without the bf16 case that is the default's own mode on this CPU (`default_jit`): each round
    then times both bf16 modes once, the default in its row."""
    return tuple(c for c in TRAIN_CASES if c != MODE_CASES.get(default_jit))
# The peer's best path per precision: timm's bf16 step was 1.3x faster with its explicit attention than with
# torch's fused one on the Zen 4 (fp32: 0.9x), so the bf16 ratios are to the faster of the two.
TIMM_BEST = {"timm fp32": ("timm",), "timm bf16": ("timm-bf16", "timm-bf16-unfused")}
# bench.train's precision and jit fields in the table's words (the notebook's jit is the model's jit_compile)
PRECISION = {"none": "float32"}
COMPILATION = {"True": "XLA", "False": "graph mode", "xla": "XLA", "none": "graph mode",
               "scoped": "scoped (XLA around the blocks' element-wise work)"}


def _fmt(v: Optional[float], spec: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _load(stage: Dict[str, object]) -> str:
    return f"load {stage['start']['load'][0]:.2f} -> {stage['end']['load'][0]:.2f}"


def _when(stage: Dict[str, object]) -> str:
    return f"{stage['start']['date'][11:16]}-{stage['end']['date'][11:16]} UTC, {_load(stage)}"


def has_amx(flags: List[str]) -> bool:
    """Whether the CPU flags include AMX's tile and bf16 instructions (what oneDNN's amx kernels need)."""
    return "amx_bf16" in flags and "amx_tile" in flags


def title(m: Dict[str, object]) -> str:
    """The table's heading: the CPU and whether it has AMX, so a run without it cannot pass for one."""
    flags = m["cpu_flags"]
    kind = ("AMX (" + ", ".join(f for f in ("amx_bf16", "amx_int8") if f in flags) + ")" if has_amx(flags)
            else "**no AMX** on this CPU")
    return f"## The AMX table: {_cpu(m)}, {kind} ({m['date_start'][:10]})"


def _cpu(m: Dict[str, object]) -> str:
    """The model name with the core behind it (a VM's name can be a bare "AMD EPYC" for a Zen 4 or a Zen 5)."""
    return f"{m['cpu']} ({m['cpu_kind']})" if m.get("cpu_kind") else str(m["cpu"])


def markdown(record: Dict[str, object]) -> str:
    """The tables of the run, ready to paste into BENCHMARKS.md."""
    m, st = record["machine"], record["stages"]
    lines = [title(m), ""]
    flags = ", ".join(f"{f} {'yes' if f in m['cpu_flags'] else 'no'}" for f in AMX_FLAGS)
    lines += [f"`{record['command']}` ({'smoke run: tiny models, not figures to quote; ' if record['quick'] else ''}"
              f"{m['date_start']} to {record.get('date_end', '(running)')}, commit {record.get('commit') or '?'}). "
              f"Machine: {_cpu(m)}, {m['cores']} cores; flags: {flags}; load (1 / 5 / 15 min) "
              f"{' / '.join(map(str, m['load']))} at the start, {' / '.join(map(str, record.get('load_end', ['?'])))}"
              " at the end. "
              + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v) + "."]
    if not has_amx(m["cpu_flags"]):
        lines += ["", "This CPU has no AMX: the figures are this CPU kind's, for comparison with an AMX run of the "
                      "same command; none of them measures AMX."]
    _ways(lines, st)
    _peaks(lines, st, m["cpu_flags"])
    for variant in ("Ti/16", "B/16"):
        _training(lines, st, variant)
    _auto_modes(lines, st)
    _inference(lines, st)
    _profile(lines, st)
    _step_kernels(lines, st)
    problems = [f"- {name}: {s['error']}" for name, s in st.items() if "error" in s]
    for name, s in st.items():
        for r in s.get("results", []):
            if "error" in r or "skipped" in r:
                problems.append(f"- {name}, {r['case']}: {r.get('error') or 'skipped: ' + str(r['skipped'])}")
    if problems:
        lines += ["", "Not measured:", *problems]
    lines += ["", f"Budget {record['budget_s']:.0f} s; the run took {record.get('wall_s', 0):.0f} s. Raw figures: "
                  f"`amx.json` and the per-stage JSON files beside it."]
    return "\n".join(lines) + "\n"


def _ways(lines: List[str], st: Dict[str, Dict[str, object]]) -> None:
    """bench.gemm_ways: GFLOP/s of the step's products per way (bf16, then fp32), and each way's kernels."""
    s = st.get("gemm ways")
    if not s or "results" not in s:
        if s:
            lines += ["", f"GEMM ways: {s.get('error')}"]
        return
    done = [r for r in s["results"] if "results" in r]
    if not done:
        return
    info = s["info"]
    lines += ["", f"**Which way into the matrix units** (ViT-{info['variant']}'s training-step products at batch "
                  f"{info['batch_size']}, GFLOP/s, best of the repeats; `{s['command']}`; {_when(s)}):"]
    for dtype in ("bf16", "fp32"):
        shapes = [x for x in done[0]["results"] if x["dtype"] == dtype]
        lines += ["", f"| {dtype} product (batch x M x K x N) | " + " | ".join(r["case"] for r in done) + " |",
                  "|---|" + "---|" * len(done)]
        for x in shapes:
            cells = [next((y["gflop_s"] for y in r["results"] if y["shape"] == x["shape"] and y["dtype"] == dtype),
                          None) for r in done]
            best = max((c for c in cells if c is not None), default=None)
            lines.append(f"| {x['shape']} ({' x '.join(map(str, x['dims']))}) | " + " | ".join(
                "-" if c is None else (f"**{c:.0f}**" if c == best else f"{c:.0f}") for c in cells) + " |")
    isa = next((r.get("onednn_isa") for r in done if r.get("onednn_isa")), None)
    lines += ["", f"Kernels each way ran (`ONEDNN_VERBOSE=1`; oneDNN's ISA line: {isa or '?'}; with the share of "
                  "oneDNN's execution time each took while that dtype's products ran, reorders of the operands "
                  "included):", "",
              "| way | version, environment | bf16 | fp32 | AMX |", "|---|---|---|---|---|"]
    for r in done:
        env = ", ".join(f"{k}={v}" for k, v in r.get("env", {}).items())
        cell = {d: _kernel_cell(r, d, phase) for d, phase in (("bf16", "bf16"), ("f32", "fp32"))}
        amx = any("amx" in k for ks in r["kernels"].values() for k in ks)
        crash = f" (a first process crashed: {r['crashed_before']})" if "crashed_before" in r else ""
        lines.append(f"| {r['case']} | {r['version']}{'; ' + env if env else ''}{crash} | {cell['bf16']} | {cell['f32']} | "
                     f"{'**yes**' if amx else 'no'} |")


def _kernel_cell(r: Dict[str, object], dtype: str, phase: str) -> str:
    """The oneDNN kernels of one way and dtype; with their time shares where the record has them."""
    shares = time_shares(r.get("kernel_ms", {}).get(phase, {}))
    if shares:
        return ", ".join(f"`{name}` {pct:.0f}%" for name, pct in shares)
    return ", ".join(f"`{k}`" for k in r["kernels"].get(dtype, [])) or "not through oneDNN"


def _peaks(lines: List[str], st: Dict[str, Dict[str, object]], flags: List[str]) -> None:
    s = st.get("peak")
    if not s or "results" not in s:
        return
    p = next((r for r in s["results"] if r["case"] == "peak"), {})
    names = {"tf_bf16": "TensorFlow bf16", "torch_bf16": "torch bf16", "tf_fp32": "TensorFlow fp32",
             "torch_fp32": "torch fp32", "numpy_fp32": "NumPy fp32"}
    rows = [f"| {label} | {p[k]:.0f} |" for k, label in names.items() if isinstance(p.get(k), float)]
    rows += [f"| {dtype}, the GEMM ways stage's 2048^3 square ({way}) | {gflops:.0f} |"
             for dtype, (gflops, way) in sorted(_square_bests(st).items())]
    if rows:
        lines += ["", f"**GEMM peaks** (2048^3, best of 5, `{s['command']}`, {_when(s)}; the training tables' share "
                      "is of the higher of this and the GEMM ways stage's square):", "",
                  "| GEMM | GFLOP/s |", "|---|---|", *rows]
    _auto_rates(lines, p, flags)


def _auto_rates(lines: List[str], p: Dict[str, object], flags: List[str]) -> None:
    """What `auto` (keras_vit/precision.py) would take from this run's TensorFlow peaks: the CPU kind's
    CPU_GEMM_GFLOPS entry and the bf16 break-even it gives, beside the entry it has now."""
    from keras_vit.precision import CPU_GEMM_GFLOPS, bf16_break_even_gflop

    fp32, bf16 = p.get("tf_fp32"), p.get("tf_bf16")
    kind = next((f for f in CPU_GEMM_GFLOPS if f in flags), None)
    if not (isinstance(fp32, float) and isinstance(bf16, float)) or kind is None:
        return
    now = CPU_GEMM_GFLOPS[kind]
    lines += ["", f"For `auto` on this kind: `CPU_GEMM_GFLOPS[\"{kind}\"] = ({fp32:.0f}, {bf16:.0f})` from these "
                  f"TensorFlow peaks puts bf16's break-even at {bf16_break_even_gflop(kind, (fp32, bf16)):.1f} forward "
                  f"GFLOP per step; the entry now, ({now[0]:.0f}, {now[1]:.0f}), puts it at "
                  f"{bf16_break_even_gflop(kind):.1f} (ViT-Ti/16 at 224 px, batch 16: 40)."]


def _square_bests(st: Dict[str, Dict[str, object]]) -> Dict[str, tuple]:
    """The GEMM ways stage's fastest 2048^3 square per dtype: {"bf16": (GFLOP/s, way), "fp32": ...}."""
    out: Dict[str, tuple] = {}
    for r in st.get("gemm ways", {}).get("results", []):
        for x in r.get("results", []):
            if x["shape"].startswith("square") and x["dims"][1] >= 2048 and x["gflop_s"] > out.get(x["dtype"], (0,))[0]:
                out[x["dtype"]] = (x["gflop_s"], r["case"])
    return out


def _peak_values(st: Dict[str, Dict[str, object]]) -> Dict[str, float]:
    """The run's GEMM peaks: the `peak` case's, raised to the GEMM ways stage's 2048^3 square where that ran faster
    (on the AMX host of 2026-12-04 torch's bf16 square ran at 1,262 there against 653 in the `peak` case: a share of
    the peak must be of the higher one)."""
    s = st.get("peak", {})
    p = dict(next((r for r in s.get("results", []) if r["case"] == "peak" and "peak_fp32" in r), {}))
    for dtype, (gflops, _) in _square_bests(st).items():
        key = "peak_bf16" if dtype == "bf16" else "peak_fp32"
        p[key] = max(p.get(key, 0.0), gflops)
    return p


def _training(lines: List[str], st: Dict[str, Dict[str, object]], variant: str) -> None:
    s = st.get(f"train {variant}")
    if not s or "results" not in s:
        if s:
            lines += ["", f"Training {variant}: {s.get('error')}"]
        return
    info = s["info"]
    by = {r["case"]: r for r in s["results"] if "img_s" in r}
    peaks = _peak_values(st)
    labels = {"default": "`vitcli train` default (`auto`)", "tf-bf16": "`vitcli train --jit fusible`",
              "tf-bf16-scoped": "`vitcli train --jit scoped`",
              "notebook": "notebook: `ViT()`, `compile(optimizer, loss)`, `fit(tf.data)`",
              "notebook-bf16": "notebook after `set_global_policy(\"mixed_bfloat16\")`",
              "torch-bf16": "`KERAS_BACKEND=torch`, `mixed_bfloat16` (eager)",
              "timm": "timm fp32", "timm-bf16": "timm, `torch.autocast(\"cpu\", torch.bfloat16)`",
              "timm-bf16-unfused": "timm bf16 autocast, explicit attention (`set_fused_attn(False)`)"}
    rows = []
    for case in TRAIN_CASES:
        r = by.get(case)
        if r is None:
            continue
        med = r["img_s"]["median"]
        bf16 = "bf16" in str(r.get("precision", "")) or "bfloat16" in str(r.get("precision", ""))
        gflops = med * info["gflop_per_image_train"]
        peak = peaks.get("peak_bf16" if bf16 else "peak_fp32")
        x = {}
        for peer, cases in TIMM_BEST.items():
            best = max((by[c]["img_s"]["median"] for c in cases if c in by and c != case), default=None)
            x[peer] = med / best if best and case not in cases else None
        how = (f"{PRECISION.get(r['precision'], r['precision'])}, {COMPILATION.get(r['jit'], r['jit'])}"
               if case in ("default", "tf-bf16", "tf-bf16-scoped", "notebook", "notebook-bf16") else str(r.get("precision")))
        rows.append(f"| {labels[case]} | {how} | **{med:.2f}** | {100 * r['img_s']['spread']:.0f}% | "
                    f"{_fmt(x['timm fp32'])} | {_fmt(x['timm bf16'])} | {gflops:.0f} | "
                    f"{_fmt(100 * gflops / peak if peak else None, '.0f', '%')} {'bf16' if bf16 else 'fp32'} | "
                    f"{' / '.join(f'{v:.2f}' for v in r.get('round_img_s', []))} |")
    lines += ["", f"**Training, ViT-{variant}** ({info['image_size']} px, batch {info['batch_size']}, "
                  f"{info['num_layers']} blocks, {info['gflop_per_image_train']} GFLOP per training image, SGD "
                  f"momentum; {info.get('rounds_run', '?')} alternating round(s); `{s['command']}`; {_when(s)}):", "",
              "| path | precision, compilation | img/s | spread | x timm fp32 | x timm bf16 (the faster timm bf16 row) | GFLOP/s | "
              "share of the GEMM peak | per round img/s |",
              "|---|---|---|---|---|---|---|---|---|", *rows]


# A mode change for `auto` is read off the table only past this margin at every variant measured: single rounds on
# these VMs move by 10-20%.
AUTO_MARGIN = 1.05


def _auto_modes(lines: List[str], st: Dict[str, Dict[str, object]]) -> None:
    """What the training tables say of `auto`'s bf16 mode on TensorFlow CPUs (keras_vit/precision.py): the default
    row's mode (fusible; scoped on AMX) against the other one's row. (Float32's XLA against oneDNN's GEMMs is the GEMM
    ways stage's fp32 `tf-xla` and `tf-onednn` columns: a training row of its own cost 25-30 s at Ti/16 that the 840 s
    budget does not have.)"""
    def row(variant: str, case: str) -> Optional[Dict[str, object]]:
        return next((r for r in st.get(f"train {variant}", {}).get("results", []) if r["case"] == case and "img_s" in r),
                    None)

    pairs, modes = {}, set()
    for v in ("Ti/16", "B/16"):
        default = row(v, "default")
        mode = str(default.get("jit")) if default else None
        if mode not in MODE_CASES:  # not a bf16 step of the two modes (a CPU without native bf16)
            continue
        other = next(m for m in MODE_CASES if m != mode)
        alternative = row(v, MODE_CASES[other])
        if alternative:
            pairs[v] = (alternative["img_s"]["median"], default["img_s"]["median"])
            modes.add((mode, other))
    if len(modes) != 1:
        return
    (mode, other), = modes
    ratios = ", ".join(f"{v} {a / b:.2f}x" for v, (a, b) in pairs.items())
    switch = all(a / b >= AUTO_MARGIN for a, b in pairs.values())
    lines += ["", "**What the training tables say of `auto`'s modes on this kind** (a change needs "
                  f"{AUTO_MARGIN:.2f}x at every size measured): bf16: `{other}` against the default's `{mode}` {ratios}: "
                  + (f"**{other} is faster at every size measured**: `precision.resolve` should pick it on this kind."
                     if switch else f"not {AUTO_MARGIN:.2f}x or more at every size, so `{mode}` stays.")]


def _profile(lines: List[str], st: Dict[str, Dict[str, object]]) -> None:
    """bench.profile_train: Ti/16's default step by op kind, and the fused element-wise work by model part."""
    s = st.get("profile Ti/16")
    if not s or "kinds_ms" not in s:  # a failed stage is listed under "Not measured"
        return
    info, step = s["info"], s["step_ms"]
    lines += ["", f"**Where ViT-{info['variant']}'s default step goes** ({info['image_size']} px, batch {info['batch_size']}, "
                  f"mixed_bfloat16 + {info.get('jit', 'fusible')}, {info['steps']} profiled steps; `{s['command']}`; {_when(s)}): "
                  f"{step:.0f} ms a step under the profiler ({info['batch_size'] / step * 1000:.2f} img/s). Op time on "
                  "TensorFlow's threads: two inter-op threads run ops at once, so the kinds add up to more than the step.",
              "", "| op kind | ms per step | x the step |", "|---|---|---|"]
    lines += [f"| {kind} | {ms:.1f} | {ms / step:.2f} |" for kind, ms in s["kinds_ms"].items()]
    parts = s.get("fusion_parts_ms", {})
    if parts:
        lines += ["", "XLA-fused element-wise work by model part (ms per step): "
                  + "; ".join(f"{part} {ms:.1f}" for part, ms in parts.items()) + "."]
    other = s.get("other_ops_ms", {})
    if other:
        lines += ["", "Other TF ops by type (ms per step): " + "; ".join(f"{op} {ms:.1f}" for op, ms in other.items()) + "."]


STEP_KERNEL_ROWS = 8  # (kernel, problem) rows shown per case


def _step_kernels(lines: List[str], st: Dict[str, Dict[str, object]]) -> None:
    """bench.step_kernels: the oneDNN kernel of every matmul in a real training step, keras-vit's beside timm's."""
    s = st.get("step kernels Ti/16")
    if not s or "results" not in s:
        return
    done = [r for r in s["results"] if "rows" in r]
    if not done:
        return
    info = s["info"]
    steps = f"{info['steps']} step{'s' if info['steps'] != 1 else ''}"
    kinds = sorted({k for r in done for k in r["kinds_ms"]}, key=lambda k: -max(r["kinds_ms"].get(k, 0) for r in done))
    lines += ["", f"**The kernels of ViT-{info['variant']}'s training step** (`ONEDNN_VERBOSE=1` over {steps}, "
                  f"{info['interop']} TensorFlow inter-op thread(s); `{s['command']}`; {_when(s)}): oneDNN ms a step by "
                  "primitive (a kernel name with `amx` in it is AMX).",
              "", "| case | AMX kernels | oneDNN ms | " + " | ".join(kinds) + " |",
              "|---|---|---|" + "---|" * len(kinds)]
    lines += [f"| {r['case']} | {'yes' if r['amx'] else 'no'} | {r['onednn_ms']:.1f} | "
              + " | ".join(f"{r['kinds_ms'].get(k, 0):.1f}" for k in kinds) + " |" for r in done]
    for r in done:
        lines += ["", f"{r['case']}, largest rows (ms a step, calls, kernel, problem): " + "; ".join(
            f"{row['ms']:.1f} ms, {row['calls']:g}x `{row['kernel']}` {row['problem']}" for row in r["rows"][:STEP_KERNEL_ROWS])
            + "."]


def _inference(lines: List[str], st: Dict[str, Dict[str, object]]) -> None:
    s = st.get("inference")
    if not s or "results" not in s:
        if s:
            lines += ["", f"Inference: {s.get('error')}"]
        return
    by = {r["case"]: r for r in s["results"] if "latency_ms" in r}
    inter = s.get("interleaved", {}).get("files", {})
    labels = {"onnx": ("keras-vit ONNX fp32", "keras.onnx"), "onnx-static": ("keras-vit ONNX static int8",
                                                                             "keras-static.onnx"),
              # onnxruntime's fused attention (QAttention: the QKV GEMM in int8, no head-split
              # Transpose/Split/Squeeze), the non-GEMM work the plain static file cannot shed
              "onnx-opt-static": ("keras-vit ONNX static int8, fused attention (`optimize=True`)",
                                  "keras-opt-static.onnx"),
              "tflite": ("keras-vit TFLite fp32 (LiteRT)", "keras-fp32.tflite"),
              "tflite-dynamic": ("keras-vit TFLite dynamic-range int8 (LiteRT)", "keras-dynamic.tflite"),
              "tflite-int8": ("keras-vit TFLite full int8 (LiteRT)", "keras-int8.tflite"),
              "timm-onnx": ("timm ONNX fp32", "timm.onnx")}
    rows = []
    for case, (label, file) in labels.items():
        r, i = by.get(case), inter.get(file or "", {})
        if r is None and not i:
            continue
        agree = (f"{100 * r['top1_agree']:.1f}% (max diff {r['max_abs_diff']:.1e})"
                 if r and case != "timm-onnx" else "-")
        rows.append(f"| {label} | {_fmt(r and r['latency_ms']['median'])} | {_fmt(r and r.get('lat_x_onnx'))} | "
                    f"{_fmt(r and r.get('lat_x_timm-onnx'))} | {_fmt(i.get('median_ms'))} | "
                    f"{_fmt(i.get('x_keras_onnx'))} | {_fmt(i.get('x_timm_onnx'))} | "
                    f"{_fmt(r and r['throughput']['median'], '.1f')} | {agree} |")
    extra = inter.get("timm-int8.onnx")
    info = s["info"]
    lines += ["", f"**Inference, ViT-{info['variant']}** ({info['image_size']} px, random weights, batch 1; "
                  f"`{s['command']}` (each file in its own process), then `{s['ort_command']}` (the files "
                  f"call by call in one process, {s['interleaved']['info']['threads']} threads); {_when(s)}):", "",
              "| file | b1 ms (own process) | x our ONNX fp32 | x timm ONNX | b1 ms (interleaved) | x our ONNX fp32 | "
              f"x timm ONNX | batch-{info['batch_size']} img/s | top-1 vs Keras ({info.get('eval_images', '?')} images) |",
              "|---|---|---|---|---|---|---|---|---|", *rows]
    if extra:
        lines += ["", f"(timm's ONNX with the same dynamic int8 quantization, interleaved: {extra['median_ms']:.2f} ms, "
                      f"{_fmt(extra.get('x_timm_onnx'))}x timm's fp32 file.)"]
    tflite = by.get("tflite")
    quantized = [(name, by[case]) for case, name in (("tflite-dynamic", "dynamic-range int8"), ("tflite-int8", "full int8"))
                 if case in by]
    if tflite and quantized:  # LiteRT against its own float32 file (same runtime, same threads)
        fp32_ms = tflite["latency_ms"]["median"]
        lines += ["", "(Against the TFLite fp32 file in LiteRT: " + ", ".join(
            f"{name} {r['latency_ms']['median'] / fp32_ms:.2f}x" for name, r in quantized) + ".)"]


def main(argv: Optional[List[str]] = None) -> str:
    """`python -m bench.amx_table DIR/amx.json`: the markdown of a record again (after the renderer changed)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.amx_table AMX_JSON")
    try:
        with open(args[0]) as f:
            record = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{args[0]}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(record, dict) or "machine" not in record:
        raise SystemExit(f"{args[0]} is not an amx.json record (bench/amx.sh writes one): it has no 'machine'")
    md = markdown(record)
    print(md, end="")
    return md


if __name__ == "__main__":
    main()
