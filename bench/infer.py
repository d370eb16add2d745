"""Inference latency (batch 1) and throughput (batch 32) of keras-vit's runtimes next to timm's.

    python -m bench.infer                     # ViT-Ti/16, 224 px, all cases
    python -m bench.infer --quick             # < 2 minutes: tiny model (CI smoke test)

Cases (each in its own process, after one `export` process wrote the files):
  keras-xla     the Keras model on TF, called through tf.function(jit_compile=True)
  onnx          keras_vit.export.to_onnx, onnxruntime with its default graph optimisations
  onnx-opt      to_onnx(optimize=True): fused Attention op + onnxruntime.transformers' fusions (GELU, LN)
  onnx-int8     to_onnx(quantize="dynamic"): onnxruntime's dynamic int8 quantization of the MatMuls
  onnx-opt-int8 to_onnx(quantize="dynamic", optimize=True): the same on the fused graph (QAttention)
  onnx-static   to_onnx(quantize="int8"): static int8, activation scales calibrated on --calib-images
  onnx-opt-static  to_onnx(quantize="int8", optimize=True): the same on the fused graph (static QAttention)
  tflite        keras_vit.export.to_tflite, fp32, in LiteRT (XNNPACK)
  tflite-dynamic  to_tflite(quantize="dynamic"): int8 weights, activations quantized per call (XNNPACK's
                dynamically quantized int8 GEMMs) in LiteRT
  tflite-int8   to_tflite(quantize="int8"): int8 weights and activations (calibrated) in LiteRT
  timm          timm's ViT in torch (eval, inference_mode)
  timm-onnx     timm -> ONNX (torch.onnx.export) in onnxruntime
  timm-onnx-int8  timm's ONNX with the same dynamic int8 quantization
Every case reports agreement with the Keras fp32 logits (keras-vit's formats) so that a
fast but wrong runtime is visible. The peers are skipped when torch/timm are not installed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

CASES = ("peak", "keras-xla", "onnx", "onnx-opt", "onnx-int8", "onnx-opt-int8", "onnx-static", "onnx-opt-static",
         "tflite", "tflite-dynamic", "tflite-int8",
         "timm", "timm-onnx", "timm-onnx-int8")
NUM_CLASSES = 10
THREADS = os.cpu_count() or 1


def config(args):
    """The ViTConfig benchmarked (common.vit_config with this bench's class count)."""
    return common.vit_config(args, NUM_CLASSES)


def images(args, n: int, seed: int = 1):
    import numpy as np

    return np.random.default_rng(seed).uniform(0, 255, (n, args.image_size, args.image_size, 3)).astype("float32")


def keras_model(args):
    """keras-vit's model with deterministic random weights, shaped like a trained model's.

    The zero head is randomised, and so are the LayerNorm scales (1 at initialisation) and
    every bias and shift (0): TensorFlow's graph optimiser folds x * 1 and x + 0 away, which
    would export a smaller graph than any trained model has.
    """
    import keras
    import numpy as np

    from keras_vit.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(config(args))
    rs = np.random.default_rng(0)
    head = model.get_layer("head")
    head.kernel.assign(rs.normal(0, 0.05, head.kernel.shape).astype("float32"))
    for w in model.weights:
        name = w.path.split("/")[-1]
        if name == "gamma":
            w.assign(1.0 + rs.normal(0, 0.1, w.shape).astype("float32"))
        elif name in ("beta", "bias") or name.endswith("_bias"):
            w.assign(rs.normal(0, 0.02, w.shape).astype("float32"))
    return model


def timm_model(args):
    import timm
    import torch

    torch.manual_seed(0)
    size = args.variant.split("/")[0]
    model = timm.create_model(common.TIMM_NAMES[size], pretrained=False, num_classes=NUM_CLASSES,
                              img_size=args.image_size, depth=config(args).num_layers)
    return model.eval()


# --- exports (keras_vit.export for keras-vit's files; torch.onnx for timm's) ---------------
def export_all(args) -> Dict[str, object]:
    """Writes every file the cases load into --workdir, and the Keras reference logits."""
    import numpy as np

    wd = args.workdir
    model = keras_model(args)
    x = images(args, args.eval_images)
    np.save(os.path.join(wd, "x.npy"), x)
    np.save(os.path.join(wd, "ref.npy"), model.predict(x, verbose=0, batch_size=8))
    done: Dict[str, str] = {}

    def step(name: str, fn) -> None:
        try:
            fn()
            done[name] = "ok"
        except Exception as e:  # one failed format must not hide the others
            done[name] = f"{type(e).__name__}: {str(e)[:200]}"

    config(args)  # validates the options before the exports
    from keras_vit.export import to_onnx, to_tflite

    calib = images(args, args.calib_images, seed=2)
    exports = {
        "onnx": ("keras.onnx", lambda: to_onnx(model, os.path.join(wd, "keras.onnx"), opset=17)),
        "onnx-opt": ("keras-opt.onnx", lambda: to_onnx(model, os.path.join(wd, "keras-opt.onnx"), opset=17,
                                                       optimize=True)),
        "onnx-int8": ("keras-int8.onnx", lambda: to_onnx(model, os.path.join(wd, "keras-int8.onnx"), opset=17,
                                                         quantize="dynamic")),
        "onnx-opt-int8": ("keras-opt-int8.onnx", lambda: to_onnx(model, os.path.join(wd, "keras-opt-int8.onnx"),
                                                                 opset=17, quantize="dynamic", optimize=True)),
        "onnx-static": ("keras-static.onnx", lambda: to_onnx(model, os.path.join(wd, "keras-static.onnx"), opset=17,
                                                             quantize="int8", calibration_images=calib,
                                                             num_calibration_images=len(calib))),
        "onnx-opt-static": ("keras-opt-static.onnx", lambda: to_onnx(
            model, os.path.join(wd, "keras-opt-static.onnx"), opset=17, quantize="int8", optimize=True,
            calibration_images=calib, num_calibration_images=len(calib))),
        "tflite": ("keras-fp32.tflite", lambda: to_tflite(model, os.path.join(wd, "keras-fp32.tflite"))),
        "tflite-dynamic": ("keras-dynamic.tflite", lambda: to_tflite(model, os.path.join(wd, "keras-dynamic.tflite"),
                                                                     quantize="dynamic")),
        "tflite-int8": ("keras-int8.tflite", lambda: to_tflite(model, os.path.join(wd, "keras-int8.tflite"),
                                                               quantize="int8", representative_images=calib)),
    }
    cases = common.parse_cases(args.cases, CASES)
    for case, (name, fn) in exports.items():
        if case in cases:  # only the files the chosen cases load
            step(name, fn)
    return done


def export_timm(args) -> Dict[str, str]:
    """timm's model -> ONNX (+ dynamic int8), and its reference logits; its own process, since
    torch(vision) and TensorFlow crash when loaded together."""
    import numpy as np
    import torch

    wd = args.workdir
    x = np.load(os.path.join(wd, "x.npy"))
    tm = timm_model(args)
    with torch.inference_mode():
        np.save(os.path.join(wd, "ref-timm.npy"), tm(torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0).numpy())
    torch.onnx.export(tm, (torch.zeros(1, 3, args.image_size, args.image_size),), os.path.join(wd, "timm.onnx"),
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "b"}, "logits": {0: "b"}}, opset_version=17, dynamo=False)
    _quantize_onnx(os.path.join(wd, "timm.onnx"), os.path.join(wd, "timm-int8.onnx"))
    return {"timm.onnx": "ok", "timm-int8.onnx": "ok"}


def _quantize_onnx(src: str, dst: str) -> None:
    """timm's ONNX quantized as `to_onnx(quantize="dynamic")` quantizes ours (per-channel, MatMuls)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


# --- runners -------------------------------------------------------------------------------
def runner(case: str, args):
    """(callable taking a float32 NHWC batch and returning logits, reference logits file)."""
    import numpy as np

    wd = args.workdir
    if case == "keras-xla":
        import tensorflow as tf

        model = keras_model(args)
        f = tf.function(lambda t: model(t, training=False), jit_compile=True)
        return (lambda x: f(x).numpy()), "ref.npy"
    if case.startswith("onnx") or case.startswith("timm-onnx"):
        import onnxruntime as ort

        path = {"onnx": "keras.onnx", "onnx-opt": "keras-opt.onnx", "onnx-int8": "keras-int8.onnx",
                "onnx-opt-int8": "keras-opt-int8.onnx", "onnx-static": "keras-static.onnx",
                "onnx-opt-static": "keras-opt-static.onnx",
                "timm-onnx": "timm.onnx", "timm-onnx-int8": "timm-int8.onnx"}[case]
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        sess = ort.InferenceSession(os.path.join(wd, path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        if case.startswith("timm"):
            return (lambda x: sess.run(None, {name: np.ascontiguousarray(
                x.transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0))})[0]), "ref-timm.npy"
        return (lambda x: sess.run(None, {name: x})[0]), "ref.npy"
    if case.startswith("tflite"):
        from ai_edge_litert.interpreter import Interpreter

        q = {"tflite": "fp32", "tflite-dynamic": "dynamic", "tflite-int8": "int8"}[case]
        interp = Interpreter(model_path=os.path.join(wd, f"keras-{q}.tflite"), num_threads=THREADS)
        inp = interp.get_input_details()[0]["index"]
        out = interp.get_output_details()[0]["index"]
        state = {"batch": None}

        def run(x):
            if state["batch"] != len(x):
                interp.resize_tensor_input(inp, list(x.shape))
                interp.allocate_tensors()
                state["batch"] = len(x)
            interp.set_tensor(inp, x)
            interp.invoke()
            return interp.get_tensor(out)

        return run, "ref.npy"
    if case == "timm":
        import torch

        torch.set_num_threads(THREADS)
        model = timm_model(args)

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0).numpy()

        return run, "ref-timm.npy"
    raise SystemExit(f"unknown case {case!r}")


def worker(case: str, args) -> None:
    import numpy as np

    if case == "peak":
        common.emit({"case": case, **common.matmul_peak()})
        return
    if case == "export":
        common.emit({"case": case, "files": export_all(args)})
        return
    if case == "export-timm":
        common.emit({"case": case, "files": export_timm(args)})
        return
    run, ref_file = runner(case, args)
    x = np.load(os.path.join(args.workdir, "x.npy"))
    ref = np.load(os.path.join(args.workdir, ref_file))
    got = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
    one = x[:1]
    lat = common.time_calls(lambda: run(one), args.warmup, args.repeats)
    big = np.concatenate([x] * (-(-args.batch_size // len(x))))[:args.batch_size]
    thr = common.time_calls(lambda: run(big), 1, args.batch_repeats)
    common.emit({"case": case, "latency_ms": common.summary([1e3 * t for t in lat]),
                 "throughput": common.summary([args.batch_size / t for t in thr]),
                 "max_abs_diff": float(np.abs(got - ref).max()),
                 "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).mean())})


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="Ti/16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-layers", type=int, default=None, help="override the variant's depth")
    p.add_argument("--batch-size", type=int, default=32, help="batch of the throughput figure")
    p.add_argument("--repeats", type=int, default=50, help="timed batch-1 calls")
    p.add_argument("--batch-repeats", type=int, default=5, help="timed batch calls")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-images", type=int, default=32, help="images compared with the Keras logits")
    p.add_argument("--calib-images", type=int, default=16, help="int8 calibration images")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--quick", action="store_true", help="tiny model, few repeats: a smoke test under 2 minutes")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--keep", default=None, help="export into this folder and keep the files (for bench.ort_interleaved)")
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.image_size, args.num_layers, args.batch_size = 32, 2, 4
        args.repeats, args.batch_repeats, args.warmup = 5, 2, 2
        args.eval_images, args.calib_images = 4, 2
    common.check_args(args)
    return args


def _forward(args) -> List[str]:
    return common.model_flags(args) + [
        "--batch-repeats", str(args.batch_repeats), "--eval-images", str(args.eval_images),
        "--calib-images", str(args.calib_images), "--workdir", args.workdir, "--cases", args.cases]


def main(argv=None) -> List[Dict[str, object]]:
    args = _args(argv)
    if args.case:
        worker(args.case, args)
        return []
    cfg = config(args)
    fwd = cfg.flops()
    info = common.header("infer", {"variant": args.variant, "image_size": args.image_size,
                                   "num_layers": cfg.num_layers, "batch_size": args.batch_size,
                                   "eval_images": args.eval_images, "calib_images": args.calib_images,
                                   "gflop_per_image": round(fwd / 1e9, 3)}, argv)
    cases = common.parse_cases(args.cases, CASES)
    results = []
    with tempfile.TemporaryDirectory(prefix="vit-bench-") as tmp:
        wd = args.keep or tmp
        os.makedirs(wd, exist_ok=True)
        args.workdir = wd
        exp = common.run_case("bench.infer", "export", _forward(args))
        print("  export: " + (json.dumps(exp["files"]) if "error" not in exp else exp["error"]), flush=True)
        want_timm = any(c.startswith("timm") for c in cases) and common.have("timm") and "error" not in exp
        if want_timm:
            texp = common.run_case("bench.infer", "export-timm", _forward(args))
            print("  export-timm: " + (json.dumps(texp["files"]) if "error" not in texp else texp["error"]), flush=True)
        for case in cases:
            if case.startswith("timm") and not (common.have("timm") and common.have("torch")):
                results.append(common.skipped(case, "timm/torch not installed (pip install -r bench/requirements.txt)"))
            elif case != "peak" and "error" in exp:
                results.append(common.skipped(case, "export failed"))
            else:
                results.append(common.run_case("bench.infer", case, _forward(args)))
            r = results[-1]
            print(f"  {case}: " + (f"{r['latency_ms']['median']:.2f} ms" if "latency_ms" in r
                                    else str(r.get("error") or r.get("skipped") or "done")), flush=True)
    _derive(results, fwd)
    _report(results)
    if args.json:
        common.write_json(args.json, {"info": info, "results": results})
    return results


def _derive(results, fwd: int) -> None:
    """Ratios to the peers and to our own fp32 ONNX, and achieved FLOP/s at the batch size."""
    by = {r["case"]: r for r in results}
    peak = by.get("peak", {}).get("peak_fp32")
    for r in results:
        if "latency_ms" not in r:
            continue
        r["gflop_s"] = r["throughput"]["median"] * fwd / 1e9
        if peak and not any(q in r["case"] for q in ("int8", "static", "dynamic")):  # int8 products: not fp32's peak
            r["share_of_peak"] = r["gflop_s"] / peak
        for ref in ("timm-onnx", "onnx"):
            if "latency_ms" in by.get(ref, {}):
                r[f"lat_x_{ref}"] = r["latency_ms"]["median"] / by[ref]["latency_ms"]["median"]


def _report(results) -> None:
    ok = [r for r in results if "latency_ms" in r]
    common.print_peak_and_problems(results, lambda: common.print_table(
        "inference (batch-1 latency median of repeats; spread = (max-min)/median)", ok, [
            ("case", lambda r: r["case"]),
            ("b1 ms", lambda r: f"{r['latency_ms']['median']:.2f}"),
            ("spread", lambda r: f"{100 * r['latency_ms']['spread']:.0f}%"),
            ("x timm-onnx", lambda r: f"{r['lat_x_timm-onnx']:.2f}" if "lat_x_timm-onnx" in r else "-"),
            ("x our onnx", lambda r: f"{r['lat_x_onnx']:.2f}" if "lat_x_onnx" in r else "-"),
            ("batch img/s", lambda r: f"{r['throughput']['median']:.1f}"),
            ("GFLOP/s", lambda r: f"{r['gflop_s']:.1f}"),
            ("% of peak", lambda r: f"{100 * r['share_of_peak']:.0f}%" if "share_of_peak" in r else "-"),
            ("max|diff|", lambda r: f"{r['max_abs_diff']:.1e}"),
            ("top-1 agree", lambda r: f"{100 * r['top1_agree']:.0f}%"),
            ("peak RSS MiB", lambda r: f"{r['peak_rss_mb']:.0f}"),
        ]))


if __name__ == "__main__":
    sys.exit(common.failed(main()))  # 1 when a case failed: a caller reading the status sees it
