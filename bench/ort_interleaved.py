"""Batch-1 latency of ONNX files in onnxruntime (and the TFLite files beside them in LiteRT), interleaved call
by call in one process.

    python -m bench.infer --keep /tmp/vit-onnx --cases onnx      # writes the files
    python -m bench.ort_interleaved /tmp/vit-onnx                 # keras-vit vs timm, same load

On a shared machine, interleaving puts every file under the same load, which sequential
cases in separate processes cannot; the ratio to timm's ONNX is the figure to read. The
TFLite files bench.infer wrote (fp32, dynamic-range, full int8) run in LiteRT with --threads
threads (default: every core), so the two runtimes meet under the same load too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import check_args, cpu_name, machine, write_json  # noqa: E402

FILES = ("keras.onnx", "keras-opt.onnx", "keras-int8.onnx", "keras-opt-int8.onnx", "keras-static.onnx",
         "keras-opt-static.onnx", "timm.onnx", "timm-int8.onnx")
TFLITE_FILES = ("keras-fp32.tflite", "keras-dynamic.tflite", "keras-int8.tflite")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--extra", nargs="*", default=[], help="more keras-vit files of the folder to time with them")
    p.add_argument("--json", default=None, help="also write the figures (and the machine, load, date) to this file")
    args = p.parse_args(argv)
    check_args(args, paths_must_exist=("folder",))
    for extra in args.extra:
        if not os.path.exists(os.path.join(args.folder, extra)):
            raise SystemExit(f"--extra {extra}: no such file in {args.folder}")
    import onnxruntime as ort

    x = np.load(os.path.join(args.folder, "x.npy"))[:1]
    xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2) / np.float32(127.5) - np.float32(1.0))
    runs = {}
    for f in FILES + tuple(args.extra):
        path = os.path.join(args.folder, f)
        if os.path.exists(path):
            so = ort.SessionOptions()
            # Several sessions share the cores here: no thread may spin after its own run.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            feed = {sess.get_inputs()[0].name: xt if f.startswith("timm") else x}
            runs[f] = lambda s=sess, feed=feed: s.run(None, feed)
            for _ in range(5):
                runs[f]()
    for f in TFLITE_FILES:
        path = os.path.join(args.folder, f)
        if os.path.exists(path):
            from ai_edge_litert.interpreter import Interpreter

            runner = Interpreter(model_path=path, num_threads=args.threads or os.cpu_count() or 1).get_signature_runner()
            runs[f] = lambda r=runner: r(images=x)
            for _ in range(5):
                runs[f]()
    ms = {f: [] for f in runs}
    load0 = os.getloadavg()
    for _ in range(args.rounds):
        for f, run in runs.items():
            t0 = time.perf_counter()
            run()
            ms[f].append(1e3 * (time.perf_counter() - t0))
    ref = ms.get("timm.onnx")
    fp32 = ms.get("keras.onnx")
    load1 = os.getloadavg()
    print(f"{cpu_name()}; load {load0} -> {load1}; {args.rounds} interleaved rounds, "
          f"{args.threads or 'default'} threads")
    files = {}
    for f, v in ms.items():
        med = statistics.median(v)
        # the median of the per-round ratios: each round's calls met about the same load
        ratio = statistics.median(a / b for a, b in zip(v, ref)) if ref else None
        own = statistics.median(a / b for a, b in zip(v, fp32)) if fp32 else None
        files[f] = {"median_ms": med, "p10_ms": float(np.percentile(v, 10)), "p90_ms": float(np.percentile(v, 90)),
                    "x_timm_onnx": ratio, "x_keras_onnx": own}
        print(f"  {f:22s} median {med:7.2f} ms  p10 {np.percentile(v, 10):7.2f}  p90 {np.percentile(v, 90):7.2f}"
              + (f"  x timm.onnx {ratio:.2f}" if ref else "") + (f"  x keras.onnx {own:.2f}" if fp32 else ""))
    if args.json:
        write_json(args.json, {"info": {**machine(), "load": [list(load0), list(load1)], "rounds": args.rounds,
                                        "threads": args.threads or "default", "onnxruntime": ort.__version__},
                               "files": files})
    return {f: statistics.median(v) for f, v in ms.items()}


if __name__ == "__main__":
    main()
