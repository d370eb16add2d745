"""Training throughput (images/s) of keras-vit next to keras-hub's ViT and timm, in one run.

    python -m bench.train                      # ViT-Ti/16, 224 px, batch 16, all cases
    python -m bench.train --variant B/16 --batch-size 16
    python -m bench.train --quick              # < 2 minutes: tiny model, few steps (CI smoke test)

Cases (each in its own process): keras-vit as `vitcli train` runs it on this machine by
default (`default`: precision and compilation "auto", see keras_vit/precision.py), the same fed
by keras_vit.data's training pipeline on generated JPEGs (`e2e`: end-to-end img/s, printed beside
the model-only `default` with the pipeline's own img/s, to show which one limits), on TF in fp32
with the whole step XLA-compiled (`tf-xla`), in fp32 without XLA (`tf`), in `mixed_bfloat16` with
oneDNN matmuls and XLA-fused element-wise ops (`tf-bf16`, jit "fusible": TensorFlow's auto-clustering),
the same with XLA clusters only around the blocks' LayerNorms and GELU (`tf-bf16-scoped`, jit "scoped":
layers.fusion, what the bf16 notebook path gets), in `mixed_bfloat16` without XLA (`tf-bf16-graph`),
on the JAX backend in fp32 and mixed_bfloat16 (`jax`, `jax-bf16`; `-onednn`:
with XLA's oneDNN dot fusion, the way to AMX on the JAX backend), on the PyTorch backend in eager fp32
and mixed_bfloat16 (`torch`, `torch-bf16`: torch's own oneDNN matmuls, the kernels timm-bf16 runs) and the same with
`jit_compile=True` (`torch-compile`, `torch-bf16-compile`: Keras wraps the step in torch.compile); keras-hub's ViTBackbone + Dense head
on TF with XLA (`kerashub`); the notebook path (`notebook`, `notebook-bf16`: `model.compile(optimizer,
loss)` with Keras' other defaults and `model.fit` on tf.data, in the float32 / mixed_bfloat16 policy);
timm's ViT in torch in fp32 (`timm`) and in `torch.autocast("cpu", torch.bfloat16)` (`timm-bf16`), eager or with
the model under torch.compile (`timm-compile`, `timm-bf16-compile`: the peer's compiled path), and eager with timm's
explicit softmax(q k^T) v attention instead of torch's fused scaled_dot_product_attention (`timm-unfused`,
`timm-bf16-unfused`: `timm.layers.set_fused_attn(False)`; in bf16 on the Zen 4 the explicit form was 1.3x the fused
one, BENCHMARKS.md 2026-12-04, so it is part of the peer's best path).
Peers that are not installed are skipped. Achieved FLOP/s = img/s x 3 x forward FLOPs
(ViTConfig.flops()), compared with the best GEMM GFLOP/s of the precision the case computes in,
measured in the same run (`peak`: fp32 and bf16 2048^3 matmuls); `x timm` is against the fastest
timm case run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

CASES = ("peak", "default", "e2e", "tf-xla", "tf", "tf-bf16", "tf-bf16-scoped", "tf-bf16-graph", "notebook", "notebook-bf16", "jax",
         "jax-bf16", "jax-onednn", "jax-bf16-onednn", "torch", "torch-bf16", "torch-compile", "torch-bf16-compile",
         "kerashub", "timm", "timm-bf16", "timm-compile", "timm-bf16-compile", "timm-unfused", "timm-bf16-unfused")
BACKEND = {"default": "tensorflow", "e2e": "tensorflow", "tf-xla": "tensorflow", "tf": "tensorflow", "tf-bf16": "tensorflow",
           "tf-bf16-scoped": "tensorflow", "tf-bf16-graph": "tensorflow", "notebook": "tensorflow", "notebook-bf16": "tensorflow",
           **{c: "jax" for c in ("jax", "jax-bf16", "jax-onednn", "jax-bf16-onednn")},
           **{c: "torch" for c in ("torch", "torch-bf16", "torch-compile", "torch-bf16-compile")}, "kerashub": "tensorflow"}
# The notebook path: `keras_vit.ViT(...)`, `model.compile(optimizer=..., loss=...)` with nothing
# else, `model.fit` on a tf.data dataset; the -bf16 case sets the mixed_bfloat16 policy first.
NOTEBOOK_POLICY = {"notebook": "float32", "notebook-bf16": "mixed_bfloat16"}
# (mixed precision, jit mode) of each Keras case; `default` resolves "auto" as vitcli train does.
MODES = {"default": ("auto", "auto"), "e2e": ("auto", "auto"), "tf-xla": ("none", "xla"), "tf": ("none", "none"),
         "tf-bf16": ("mixed_bfloat16", "fusible"), "tf-bf16-scoped": ("mixed_bfloat16", "scoped"),
         "tf-bf16-graph": ("mixed_bfloat16", "none"),
         "jax": ("none", "xla"), "jax-bf16": ("mixed_bfloat16", "xla"), "jax-onednn": ("none", "xla"),
         "jax-bf16-onednn": ("mixed_bfloat16", "xla"), "torch": ("none", "none"), "torch-bf16": ("mixed_bfloat16", "none"),
         "torch-compile": ("none", "xla"), "torch-bf16-compile": ("mixed_bfloat16", "xla"),
         "kerashub": ("none", "xla")}
NUM_CLASSES = 10
LR = 1e-3


def config(args):
    """The ViTConfig benchmarked (common.vit_config with this bench's class count)."""
    return common.vit_config(args, NUM_CLASSES)


def _data(args):
    return common.synthetic_batch(args, NUM_CLASSES)


def _keras_model(case: str, cfg):
    """keras-vit's model, or keras-hub's ViTBackbone + class-token Dense head for `kerashub`."""
    import keras

    if case != "kerashub":
        from keras_vit.model import build_model

        return build_model(cfg)
    import keras_hub

    backbone = keras_hub.models.ViTBackbone(
        image_shape=(*cfg.image_size, 3), patch_size=cfg.patch_size[0], num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, hidden_dim=cfg.hidden_size, mlp_dim=cfg.mlp_dim)
    inputs = keras.Input((*cfg.image_size, 3))
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
    x = backbone(x)
    x = keras.layers.Lambda(lambda t: t[:, 0])(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES)(x))


def run_keras(case: str, args) -> Dict[str, object]:
    from keras_vit.train.towers import keep_threads_for

    keep_threads_for(MODES[case][1])  # as `vitcli train --jit xla/fusible`, before keras_vit.model's import
    import keras

    from keras_vit import precision

    cfg = config(args)
    backend = keras.backend.backend()
    mixed, jit, _ = precision.resolve(*MODES[case], gflop_per_step=args.batch_size * cfg.flops() / 1e9,
                                      backend=backend, hardware=precision.detect_hardware(backend))
    if jit == "fusible":
        precision.request_fusible_clustering()  # before the first TF function runs
    if jit == "none":  # as vitcli train --jit none: no XLA, not even the blocks' element-wise scopes
        from keras_vit.layers.fusion import SCOPES_ENV

        os.environ[SCOPES_ENV] = "0"
    if mixed != "none":
        keras.mixed_precision.set_global_policy(mixed)
    model = _keras_model(case, cfg)
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=precision.keras_jit_compile(jit))
    x, y = _data(args)
    cpu: List[float] = []
    extra: Dict[str, object] = {}
    if case == "e2e":  # the same steps fed by the input pipeline (generated JPEGs, as training runs it)
        batches = iter(_input_pipeline(args, cfg))
        inputs = iter(_input_pipeline(args, cfg))
        input_times = common.time_calls(lambda: next(inputs), args.warmup, args.repeats, args.steps)
        extra["input_img_s"] = common.summary([args.batch_size / t for t in input_times])
        times = common.time_calls(lambda: model.train_on_batch(*next(batches)), args.warmup, args.repeats,
                                  args.steps, cpu)
    else:
        times = common.time_calls(lambda: model.train_on_batch(x, y), args.warmup, args.repeats, args.steps, cpu)
    from keras_vit.train import towers

    return {"params": model.count_params(), "backend": backend, "precision": mixed, "jit": jit,
            "towers": towers.count(), "times": times, "cpu": cpu, **extra}


def _input_pipeline(args, cfg):
    """keras_vit.data's training pipeline (inception crop + flip, the default at 224 px) over
    generated 375x500 JPEGs, repeated: the input of the `e2e` case."""
    from bench.data import make_images
    from keras_vit import data

    folder = make_images(os.path.join(os.environ.get("TMPDIR", "/tmp"), "keras_vit_bench_data", "jpegs-800"), 800)
    splits = data.load(f"folder:{folder}", val_fraction=0.01)
    return data.pipeline(splits.train, image_size=cfg.image_size, batch_size=args.batch_size,
                         num_classes=splits.num_classes, training=True, augment="inception", one_hot=False,
                         cache=False).repeat()


def run_notebook(case: str, args) -> Dict[str, object]:
    """What a notebook user runs: ViT(...), compile(optimizer, loss) and fit on tf.data, no other
    argument. One fit call of warm-up + repeats x steps steps, timed between batches by a callback
    (as in an epoch of a real run; fit's own start-up is not a per-step cost)."""
    import keras
    import tensorflow as tf

    import keras_vit

    class Clock(keras.callbacks.Callback):
        """(wall, CPU) seconds at the end of the warm-up and of every `steps` steps after it."""

        def __init__(self):
            super().__init__()
            self.marks: List[tuple] = []

        def on_train_batch_end(self, batch, logs=None):
            done = batch + 1 - args.warmup
            if done >= 0 and done % args.steps == 0:
                self.marks.append((time.perf_counter(), time.process_time()))

    keras.mixed_precision.set_global_policy(NOTEBOOK_POLICY[case])
    model = keras_vit.ViT(config=config(args))
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(args)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat()
    clock = Clock()
    model.fit(ds, steps_per_epoch=max(1, args.warmup) + args.repeats * args.steps, epochs=1, verbose=0,
              callbacks=[clock])
    if args.warmup < 1:
        clock.marks.insert(0, clock.marks[0])
    spans = list(zip(clock.marks, clock.marks[1:]))
    from keras_vit.train import towers

    return {"params": model.count_params(), "backend": "tensorflow", "precision": NOTEBOOK_POLICY[case],
            "jit": str(model.jit_compile), "towers": towers.count(), "times": [(b[0] - a[0]) / args.steps for a, b in spans],
            "cpu": [(b[1] - a[1]) / args.steps for a, b in spans]}


def timm_step(args, bf16: bool = False, compiled: bool = False, fused_attn: bool = True):
    """(model, step): timm's ViT for `args` and one SGD-momentum training step on a synthetic batch,
    in bf16 autocast or float32, eager or torch.compile'd, with torch's fused attention or timm's explicit form."""
    import timm
    import torch

    timm.layers.set_fused_attn(fused_attn)  # read by each Attention module as it is built

    cfg = config(args)
    size = args.variant.split("/")[0]
    model = timm.create_model(common.TIMM_NAMES[size], pretrained=False, num_classes=NUM_CLASSES,
                              img_size=args.image_size, depth=cfg.num_layers)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    forward = torch.compile(model) if compiled else model  # inductor: the first warm-up step compiles
    x, y = _data(args)
    # timm takes NCHW in [-1, 1]-ish; the rescale is part of the step as for the Keras models.
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y).long()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(forward(xt / 127.5 - 1.0), yt)
        loss.backward()
        opt.step()

    return model, step


def run_timm(args, bf16: bool = False, compiled: bool = False, fused_attn: bool = True) -> Dict[str, object]:
    import torch

    model, step = timm_step(args, bf16, compiled, fused_attn)
    cpu: List[float] = []
    times = common.time_calls(step, args.warmup, args.repeats, args.steps, cpu)
    return {"params": sum(p.numel() for p in model.parameters()), "backend": f"torch {torch.__version__}",
            "precision": ("bf16 autocast" if bf16 else "float32") + (", torch.compile" if compiled else "")
            + ("" if fused_attn else ", explicit attention"),
            "threads": torch.get_num_threads(), "times": times, "cpu": cpu}


def worker(case: str, args) -> None:
    """Runs one case in this process and emits its result."""
    if case == "peak":
        common.emit({"case": case, **common.matmul_peak(dtypes=("float32", "bfloat16"))})
        return
    if case.startswith("timm"):
        res = run_timm(args, bf16=case.startswith("timm-bf16"), compiled=case.endswith("-compile"),
                       fused_attn=not case.endswith("-unfused"))
    elif case in NOTEBOOK_POLICY:
        res = run_notebook(case, args)
    else:
        res = run_keras(case, args)
    times, cpu = res.pop("times"), res.pop("cpu")
    ips = [args.batch_size / t for t in times]
    common.emit({"case": case, **res, "img_s_values": ips,
                 "img_per_cpu_s_values": [args.batch_size / t for t in cpu]})


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="Ti/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-layers", type=int, default=None, help="override the variant's depth")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    # 10: in TF graph mode (the bf16 notebook) the steps after the third were still slow (BENCHMARKS.md).
    p.add_argument("--warmup", type=int, default=10, help="steps before timing (compilation included)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the case list this many times, alternating (the repeats of all rounds are pooled): "
                        "on a shared machine, load that comes and goes then hits every case alike")
    p.add_argument("--budget", type=float, default=0,
                   help="seconds: start no further round when one more, as long as the last, would end past "
                        "this (the first round always runs; 0: no limit)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test under 2 minutes")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.num_layers, args.batch_size = 32, 2, 4
        args.steps, args.repeats, args.warmup = 2, 2, 1
    common.check_args(args)
    return args


def _forward(args) -> List[str]:
    return common.model_flags(args) + ["--steps", str(args.steps)]


def main(argv=None) -> List[Dict[str, object]]:
    args = _args(argv)
    if args.case:
        worker(args.case, args)
        return []
    cfg = config(args)
    fwd = cfg.flops()
    info = common.header("train", {"variant": args.variant, "image_size": args.image_size,
                                   "batch_size": args.batch_size, "num_layers": cfg.num_layers,
                                   "gflop_per_image_train": round(3 * fwd / 1e9, 3)}, argv)
    cases = common.parse_cases(args.cases, CASES)
    merged: Dict[str, Dict[str, object]] = {}
    start, last_round, info["rounds_run"] = time.perf_counter(), 0.0, 0
    for rnd in range(max(1, args.rounds)):
        round_start = time.perf_counter()
        if rnd and args.budget and round_start - start + last_round > args.budget:
            print(f"  stopping after {rnd} round(s): one more (~{last_round:.0f} s, as the last) would pass "
                  f"the --budget of {args.budget:.0f} s", flush=True)
            break
        for case in cases:
            need = {**{c: "jax" for c in CASES if c.startswith("jax")},
                    **{c: "torch" for c in CASES if c.startswith("torch")}, "kerashub": "keras_hub",
                    **{c: "timm" for c in CASES if c.startswith("timm")}}.get(case)
            if need and not common.have(need):
                merged[case] = common.skipped(case, f"{need} not installed (pip install -r bench/requirements.txt)")
                continue
            env = {"KERAS_BACKEND": BACKEND[case]} if case in BACKEND else {}
            if case.startswith("jax"):
                env["JAX_PLATFORMS"] = "cpu"  # the CPU's speed, also where JAX sees a GPU
            if case.endswith("-onednn"):
                env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + common.ONEDNN_XLA_FLAGS).strip()
            r = common.run_case("bench.train", case, _forward(args), env=env)
            if "img_s_values" in r:
                r["round_img_s"] = [statistics.median(r["img_s_values"])]
            _pool(merged, case, r)
            print(f"  round {rnd + 1} {case}: " + ("%.2f img/s" % (sum(r["img_s_values"]) / len(r["img_s_values"]))
                                                  if "img_s_values" in r else str(r.get("error") or "done")),
                  flush=True)
        last_round = time.perf_counter() - round_start
        info["rounds_run"] = rnd + 1
    results = [merged[c] for c in cases]
    for r in results:
        if "img_s_values" in r:
            r["img_s"] = common.summary(r["img_s_values"])
            r["img_per_cpu_s"] = common.summary(r["img_per_cpu_s_values"])
    peaks = next((r for r in results if r["case"] == "peak" and "peak_fp32" in r), {})
    by_case = {r["case"]: r for r in results}
    timm_best = max((by_case[c] for c in CASES if c.startswith("timm") and "img_s" in by_case.get(c, {})),
                    key=lambda r: r["img_s"]["median"], default=None)
    for r in results:
        if "img_s" in r:
            gflops = r["img_s"]["median"] * 3 * fwd / 1e9
            r["gflop_s"] = gflops
            bf16 = "bf16" in str(r.get("precision", "")) or "bfloat16" in str(r.get("precision", ""))
            peak = peaks.get("peak_bf16" if bf16 else "peak_fp32")
            if peak:
                r["share_of_peak"] = gflops / peak
                r["peak_used"] = "bf16" if bf16 else "fp32"
            if timm_best is not None and r is not timm_best:
                r["x_timm"] = r["img_s"]["median"] / timm_best["img_s"]["median"]
                r["x_timm_case"] = timm_best["case"]
            if "img_s" in by_case.get("kerashub", {}) and r["case"] != "kerashub":
                r["x_kerashub"] = r["img_s"]["median"] / by_case["kerashub"]["img_s"]["median"]
    _report(results)
    e2e = by_case.get("e2e", {})
    if "img_s" in e2e and "img_s" in by_case.get("default", {}):
        model_only, end_to_end = by_case["default"]["img_s"]["median"], e2e["img_s"]["median"]
        feed = e2e["input_img_s"]["median"]
        print(f"input pipeline: {feed:.1f} img/s alone; model-only {model_only:.2f} img/s, end-to-end "
              f"{end_to_end:.2f} img/s ({end_to_end / model_only:.2f}x): the "
              + ("input pipeline is the bottleneck" if feed < 1.2 * model_only or end_to_end < 0.9 * model_only
                 else "model is the bottleneck, not the input pipeline"))
    if args.json:
        common.write_json(args.json, {"info": info, "results": results})
    return results


def _pool(merged: Dict[str, Dict[str, object]], case: str, r: Dict[str, object]) -> None:
    """Adds one round's result to the case's pooled result (repeats appended, peak RSS max)."""
    old = merged.get(case)
    if case == "peak" and old is not None and "peak_fp32" in old and "peak_fp32" in r:
        merged[case] = {k: max(v, r.get(k, v)) if isinstance(v, float) else v for k, v in old.items()}
        return  # the limit: the best sgemm of all rounds
    if old is not None and "img_s_values" in old and "img_s_values" in r:
        for key in ("img_s_values", "img_per_cpu_s_values", "round_img_s"):
            old[key] = old[key] + r[key]
        old["peak_rss_mb"] = max(old["peak_rss_mb"], r["peak_rss_mb"])
    elif old is None or "img_s_values" not in old:
        merged[case] = r  # a round that failed after a good one is dropped, the good one kept


def _report(results) -> None:
    ok = [r for r in results if "img_s" in r]
    common.print_peak_and_problems(results, lambda: common.print_table(
        "training throughput (median of repeats; spread = (max-min)/median)", ok, [
            ("case", lambda r: r["case"] + (f" ({r['precision']}, {r['jit']}"
                                            + (f", {r['towers']} towers" if r.get("towers", 1) > 1 else "") + ")"
                                            if r["case"] in ("default", "notebook", "notebook-bf16") else "")),
            ("img/s", lambda r: f"{r['img_s']['median']:.2f}"),
            ("spread", lambda r: f"{100 * r['img_s']['spread']:.0f}%"),
            ("x best timm", lambda r: f"{r['x_timm']:.2f} ({r['x_timm_case']})" if "x_timm" in r else "-"),
            ("x keras-hub", lambda r: f"{r['x_kerashub']:.2f}" if "x_kerashub" in r else "-"),
            ("img/CPU-s", lambda r: f"{r['img_per_cpu_s']['median']:.2f}"),
            ("GFLOP/s", lambda r: f"{r['gflop_s']:.1f}"),
            ("% of peak", lambda r: f"{100 * r['share_of_peak']:.0f}% {r['peak_used']}" if "share_of_peak" in r else "-"),
            ("peak RSS MiB", lambda r: f"{r['peak_rss_mb']:.0f}"),
            ("params", lambda r: f"{r['params']:,}"),
        ]))


if __name__ == "__main__":
    sys.exit(common.failed(main()))  # 1 when a case failed: a caller reading the status sees it
