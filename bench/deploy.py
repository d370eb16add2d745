"""Deployment files of one model, timed interleaved in one process: ONNX fp32 / dynamic int8 /
static int8, each also with --optimize (onnxruntime), and TFLite fp32 / dynamic-range int8 / full int8
(LiteRT), batch 1, one thread each.

    python -m bench.deploy --model runs/latest/model.keras --calibration digits   # a trained model
    python -m bench.deploy --variant Ti/16 --calibration photos                   # random Ti/16, 224 px

Calling the files alternately puts each under the same machine load; the ratios to the fp32
file of the same runtime are the figures to read (and `x onnx fp32` across runtimes). Top-1 agreement is
against Keras.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from bench.common import check_args, cpu_name


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help=".keras file (default: a random --variant model)")
    p.add_argument("--variant", default="Ti/16")
    p.add_argument("--calibration", default="photos", help="calibration / check images (load_images source)")
    p.add_argument("--num-calibration", type=int, default=200)
    p.add_argument("--num-images", type=int, default=200, help="images for top-1 agreement")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--no-tflite", action="store_true")
    args = p.parse_args(argv)
    check_args(args, paths_must_exist=("model",))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    import keras_vit
    from keras_vit.export import to_onnx, to_tflite
    from keras_vit.export.images import load_images

    if args.model:
        model = keras_vit.load_model(args.model)
    else:
        model = keras_vit.ViT(args.variant, num_classes=10)
        head = model.get_layer("head")
        head.kernel.assign(np.random.RandomState(0).normal(0, 0.05, head.kernel.shape).astype("float32"))
    cfg = model.vit_config
    images = load_images(args.calibration, cfg.image_size, cfg.channels, args.num_images, split="test")
    ref = model.predict(images, verbose=0, batch_size=32).argmax(1)
    work = tempfile.mkdtemp(prefix="keras_vit_deploy_")
    try:
        files = {"onnx fp32": to_onnx(model, os.path.join(work, "fp32.onnx")),
                 "onnx fp32 optimize": to_onnx(model, os.path.join(work, "opt.onnx"), optimize=True),
                 "onnx dynamic int8": to_onnx(model, os.path.join(work, "dynamic.onnx"), quantize="dynamic"),
                 "onnx dynamic int8 optimize": to_onnx(model, os.path.join(work, "opt-dynamic.onnx"), quantize="dynamic",
                                                       optimize=True),
                 "onnx static int8": to_onnx(model, os.path.join(work, "static.onnx"), quantize="int8",
                                             calibration_images=args.calibration,
                                             num_calibration_images=args.num_calibration),
                 "onnx static int8 optimize": to_onnx(model, os.path.join(work, "opt-static.onnx"), quantize="int8",
                                                      optimize=True, calibration_images=args.calibration,
                                                      num_calibration_images=args.num_calibration)}
        if not args.no_tflite:
            files["tflite fp32"] = to_tflite(model, os.path.join(work, "fp32.tflite"))
            files["tflite dynamic int8"] = to_tflite(model, os.path.join(work, "dynamic.tflite"), quantize="dynamic")
            files["tflite full int8"] = to_tflite(model, os.path.join(work, "int8.tflite"), quantize="int8",
                                                  representative_images=args.calibration,
                                                  num_calibration_images=args.num_calibration)
        runs, agreement = {}, {}
        for name, path in files.items():
            if path.endswith(".onnx"):
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                fn = (lambda s: lambda x: s.run(None, {"images": x})[0])(sess)
            else:
                interp = Interpreter(model_path=path, num_threads=1)
                runner = interp.get_signature_runner()
                fn = (lambda r: lambda x: r(images=x)["logits"])(runner)
            out = np.concatenate([fn(images[i:i + 1]) for i in range(len(images))])
            agreement[name] = float(np.mean(out.argmax(1) == ref))
            runs[name] = fn
        x = images[:1]
        for fn in runs.values():
            for _ in range(10):
                fn(x)
        ms = {name: [] for name in runs}
        load0 = os.getloadavg()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn(x)
                ms[name].append(1e3 * (time.perf_counter() - t0))
        result = {"cpu": cpu_name(), "load": [load0, os.getloadavg()], "rounds": args.rounds,
                  "model": cfg.variant or args.model, "image_size": list(cfg.image_size),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": {}}
        print(f"{result['cpu']}; load {load0} -> {os.getloadavg()}; {args.rounds} interleaved rounds, batch 1, 1 thread")
        for name, v in ms.items():
            med = statistics.median(v)
            base = statistics.median(ms[name.split()[0] + " fp32"])
            onnx = med / statistics.median(ms["onnx fp32"])
            result["cases"][name] = {"median_ms": med, "x_fp32": med / base, "x_onnx_fp32": onnx,
                                     "top1_agreement": agreement[name], "size_kb": os.path.getsize(files[name]) / 1e3}
            print(f"  {name:26s} median {med:7.3f} ms  x fp32 {med / base:5.2f}  x onnx fp32 {onnx:5.2f}  "
                  f"top-1 vs Keras {agreement[name]:.2%}  {os.path.getsize(files[name]) / 1e3:8.0f} kB")
        print(json.dumps(result))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)  # nine model files


if __name__ == "__main__":
    main()
