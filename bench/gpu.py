"""GPU training throughput and MFU: keras-vit on the JAX backend in bf16 beside timm in bf16, one run.

    bash bench/gpu.sh                          # ViT-B/16, 224 px, batch 256: peak, keras-jax, timm-bf16, timm-bf16-compile
    python -m bench.gpu --quick --device cpu   # smoke test of the script on a CPU (tiny model)

Made for a GPU machine with JAX and PyTorch (+ timm) but no TensorFlow: nothing here imports
TensorFlow. Each case runs in its own process (JAX and torch each take the GPU's memory). MFU =
img/s x 3 x forward FLOPs (ViTConfig.flops()) / the bf16 GEMM peak measured in the same run
(`peak`: an 8192^3 bf16 matmul in torch and in JAX); the datasheet figure is printed beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

CASES = ("peak", "keras-jax", "timm-bf16", "timm-bf16-compile")
NUM_CLASSES = 1000
LR = 1e-3


def run_peak(args) -> Dict[str, object]:
    """bf16 GEMM TFLOP/s of torch and JAX on the device (the MFU denominator)."""
    n = args.peak_n
    flops = 2.0 * n ** 3
    out: Dict[str, object] = {}
    try:
        import torch

        dev = "cuda" if args.device == "gpu" else "cpu"
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)

        def mm():
            c = a @ b
            if dev == "cuda":
                torch.cuda.synchronize()
            return c

        out["torch_bf16_tflops"] = flops / min(common.time_calls(mm, 3, 10)) / 1e12
        out["device_name"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    except ImportError:
        pass
    try:
        import jax
        import jax.numpy as jnp

        ka, kb = jax.random.split(jax.random.PRNGKey(0))
        a = jax.random.normal(ka, (n, n), jnp.bfloat16)
        b = jax.random.normal(kb, (n, n), jnp.bfloat16)
        mm = jax.jit(lambda p, q: p @ q)
        out["jax_bf16_tflops"] = flops / min(common.time_calls(lambda: mm(a, b).block_until_ready(), 3, 10)) / 1e12
    except ImportError:
        pass
    vals = [v for k, v in out.items() if k.endswith("_tflops")]
    out["peak_bf16_tflops"] = max(vals) if vals else None
    return out


def run_keras(args) -> Dict[str, object]:
    """keras-vit, KERAS_BACKEND=jax, mixed_bfloat16, whole step jit-compiled; data already on the device."""
    import jax
    import keras

    import keras_vit

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    cfg = common.vit_config(args, NUM_CLASSES)
    model = keras_vit.ViT(config=cfg)
    model.compile(optimizer=keras.optimizers.SGD(LR, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    x, y = common.synthetic_batch(args, NUM_CLASSES)
    x, y = jax.device_put(x), jax.device_put(y)

    def step():
        logs = model.train_on_batch(x, y, return_dict=True)
        jax.block_until_ready(logs["loss"])

    times = common.time_calls(step, args.warmup, args.repeats, args.steps)
    return {"params": model.count_params(), "backend": f"jax {jax.__version__}", "precision": "mixed_bfloat16",
            "keras": keras.__version__, "times": times}


def run_timm(args, compiled: bool) -> Dict[str, object]:
    """timm's ViT with torch.autocast(bf16) (timm's documented mixed-precision path), optionally torch.compile'd."""
    import timm
    import torch

    cfg = common.vit_config(args, NUM_CLASSES)
    dev = "cuda" if args.device == "gpu" else "cpu"
    size = args.variant.split("/")[0]
    model = timm.create_model(common.TIMM_NAMES[size], pretrained=False, num_classes=NUM_CLASSES,
                              img_size=args.image_size, depth=cfg.num_layers).to(dev)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = common.synthetic_batch(args, NUM_CLASSES)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev)
    yt = torch.from_numpy(y).long().to(dev)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = loss_fn(forward(xt / 127.5 - 1.0), yt)
        loss.backward()
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()

    times = common.time_calls(step, args.warmup, args.repeats, args.steps)
    return {"params": sum(p.numel() for p in model.parameters()), "backend": f"torch {torch.__version__}",
            "precision": "bf16 autocast", "compiled": compiled, "times": times}


def worker(case: str, args) -> None:
    if case == "peak":
        common.emit({"case": case, **run_peak(args)})
        return
    res = run_keras(args) if case == "keras-jax" else run_timm(args, compiled=case.endswith("compile"))
    times = res.pop("times")
    common.emit({"case": case, **res, "img_s_values": [args.batch_size / t for t in times]})


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="B/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="steps before timing (compilation included)")
    p.add_argument("--peak-n", type=int, default=8192, help="matrix size of the bf16 GEMM peak")
    p.add_argument("--datasheet-tflops", type=float, default=989.0,
                   help="the device's dense bf16 datasheet rate (H100/H200 SXM: 989)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--quick", action="store_true", help="tiny model and matrices: checks the script runs")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.variant, args.image_size, args.num_layers, args.batch_size = "Ti/16", 32, 2, 4
        args.steps, args.repeats, args.warmup, args.peak_n = 2, 2, 1, 256
    return args


def _forward(args) -> List[str]:
    return common.model_flags(args) + ["--steps", str(args.steps), "--peak-n", str(args.peak_n), "--device", args.device]


def main(argv=None) -> List[Dict[str, object]]:
    args = _args(argv)
    if args.case:
        worker(args.case, args)
        return []
    cfg = common.vit_config(args, NUM_CLASSES)
    train_flops = 3 * cfg.flops()
    info = common.header("gpu", {"variant": args.variant, "image_size": args.image_size,
                                 "batch_size": args.batch_size, "gflop_per_image_train": round(train_flops / 1e9, 2)})
    env = {"KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.85"}
    if args.device == "cpu":
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    results = []
    for case in common.parse_cases(args.cases, CASES):
        need = {"keras-jax": "jax", "timm-bf16": "timm", "timm-bf16-compile": "timm"}.get(case)
        if need and not common.have(need):
            results.append(common.skipped(case, f"{need} not installed"))
            continue
        r = common.run_case("bench.gpu", case, _forward(args), env=env, timeout=600)
        results.append(r)
        print(f"  {case}: " + (f"{common.summary(r['img_s_values'])['median']:.1f} img/s" if "img_s_values" in r
                               else str(r.get("error") or r.get("skipped") or r)), flush=True)
    peak = next((r.get("peak_bf16_tflops") for r in results if r["case"] == "peak"), None)
    timm_best = max((common.summary(r["img_s_values"])["median"] for r in results
                     if r["case"].startswith("timm") and "img_s_values" in r), default=None)
    for r in results:
        if "img_s_values" not in r:
            continue
        r["img_s"] = common.summary(r["img_s_values"])
        tflops = r["img_s"]["median"] * train_flops / 1e12
        r["tflop_s"] = tflops
        r["mfu_datasheet"] = tflops / args.datasheet_tflops
        if peak:
            r["mfu_measured_peak"] = tflops / peak
        if timm_best:
            r["x_best_timm"] = r["img_s"]["median"] / timm_best
    common.print_table("GPU training throughput (median of repeats)", [r for r in results if "img_s" in r], [
        ("case", lambda r: r["case"]),
        ("img/s", lambda r: f"{r['img_s']['median']:.1f}"),
        ("spread", lambda r: f"{100 * r['img_s']['spread']:.0f}%"),
        ("TFLOP/s", lambda r: f"{r['tflop_s']:.1f}"),
        ("MFU (measured peak)", lambda r: f"{100 * r['mfu_measured_peak']:.0f}%" if "mfu_measured_peak" in r else "-"),
        ("MFU (datasheet)", lambda r: f"{100 * r['mfu_datasheet']:.0f}%"),
        ("x best timm", lambda r: f"{r['x_best_timm']:.2f}" if "x_best_timm" in r else "-"),
    ])
    for r in results:
        if "error" in r or "skipped" in r or r["case"] == "peak":
            print(f"  {r['case']}: " + json.dumps({k: v for k, v in r.items() if k != "case"}))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
