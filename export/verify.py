"""Accuracy checks: run the Keras model and the exported file on the same real images and
compare logits, top-1/top-5 predictions and latency; write a JSON report beside the file.

Thresholds depend on the file's precision (overridable): fp32 max |diff| <= 1e-4 and 100%
top-1 agreement; fp16 >= 99% top-1; dynamic-range and int8 >= 97% top-1.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import time
from typing import Callable, Dict, Optional

import numpy as np

from keras_vit.export._common import ExportError, PathLike, resolve_model
from keras_vit.files import write_text

THRESHOLDS: Dict[str, Dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-4, "top1_agreement": 1.0},
    "fp16": {"top1_agreement": 0.99},
    "dynamic": {"top1_agreement": 0.97},
    "int8": {"top1_agreement": 0.97},
}
_HIGHER_IS_BETTER = {"top1_agreement", "top5_agreement"}


def report_path(exported_path: PathLike) -> str:
    """Where the JSON report of an exported file lives: <file>.report.json beside it."""
    return os.fspath(exported_path) + ".report.json"


class Runner:
    """Runs an exported file in its real runtime: onnxruntime for .onnx, LiteRT for .tflite."""

    def __init__(self, path: PathLike, providers: Optional[list] = None, num_threads: Optional[int] = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ExportError(f"exported file {self.path!r} does not exist")
        if self.path.endswith(".onnx"):
            self._init_onnx(providers, num_threads)
        elif self.path.endswith(".tflite"):
            self._init_tflite(num_threads)
        else:
            raise ExportError(f"unknown exported format for {self.path!r}; expected .onnx or .tflite")

    def _init_onnx(self, providers, num_threads) -> None:
        import onnx
        import onnxruntime as ort

        self.format = "onnx"
        available = ort.get_available_providers()
        if providers is None:
            # CUDA when the [gpu] extra is installed; TF32 off so fp32 stays fp32.
            providers = [("CUDAExecutionProvider", {"use_tf32": 0})] if "CUDAExecutionProvider" in available else []
            providers.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self._session = ort.InferenceSession(self.path, options, providers=providers)
        self.providers = self._session.get_providers()
        self.runtime = f"onnxruntime {ort.__version__} ({', '.join(self.providers)})"
        self.metadata = {p.key: p.value for p in onnx.load(self.path, load_external_data=False).metadata_props}
        self._input = self._session.get_inputs()[0].name

    def _init_tflite(self, num_threads) -> None:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter

        from keras_vit.export.tflite import read_metadata

        self.format = "tflite"
        # LiteRT applies its default delegate (XNNPACK) on CPU.
        self._interpreter = Interpreter(model_path=self.path, num_threads=num_threads)
        self._runner = self._interpreter.get_signature_runner()
        self.providers = ["XNNPACK"]
        self.runtime = f"LiteRT {getattr(ai_edge_litert, '__version__', '')} (XNNPACK, CPU)".replace("  ", " ")
        self.metadata = read_metadata(self.path) or {}

    @property
    def precision(self) -> str:
        return self.metadata.get("precision", "fp32")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.format == "onnx":
            return self._session.run(None, {self._input: images})[0]
        return self._runner(images=images)["logits"]


def _batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int):
    """Logits for all images and the median seconds per batch (after one warm-up batch)."""
    fn(images[:batch_size])
    outs, times = [], []
    for i in range(0, len(images), batch_size):
        t = time.perf_counter()
        outs.append(np.asarray(fn(images[i:i + batch_size]), dtype=np.float32))
        times.append(time.perf_counter() - t)
    return np.concatenate(outs), float(np.median(times))


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def verify(keras_model, exported_path: PathLike, images=None, num_images: int = 64, batch_size: int = 8,
           precision: Optional[str] = None, thresholds: Optional[Dict[str, float]] = None,
           write_report: bool = True, runner: Optional[Runner] = None) -> dict:
    """Compare `keras_model` (model or .keras path) with the exported file on real images.

    Top-1 agreement: same argmax; top-5 agreement: the same set of 5 highest classes (stricter
    than top-1, reported, not checked by default).
    `images`: an array or any source `keras_vit.export.images.load_images` takes (default:
    offline digits and photos). Returns the report dict (`passed`, `failures`, metrics,
    latencies); with `write_report` it is also saved as <file>.report.json. A failed check
    does not raise: the file is kept and the report says which threshold failed by how much.
    """
    from keras_vit.export.images import load_images

    model, cfg = resolve_model(keras_model)
    runner = runner or Runner(exported_path)
    precision = precision or runner.precision
    limits = _limits(precision, thresholds)
    source = "default" if images is None else images if isinstance(images, (str, os.PathLike)) else type(images).__name__
    images = load_images(images, cfg.image_size, cfg.channels, num_images)
    batch_size = max(1, min(batch_size, len(images)))

    ref, keras_s = _batched(lambda x: np.asarray(model.predict_on_batch(x)), images, batch_size)
    out, exported_s = _batched(runner, images, batch_size)
    if out.shape != ref.shape:
        raise ExportError(f"exported file returns logits of shape {out.shape}, Keras gives {ref.shape}")

    k = min(5, ref.shape[1])
    metrics = _agreement(out, ref, k)
    checks, failures = _checks(metrics, limits)

    exported_path = runner.path
    with open(exported_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    report = {
        "file": os.path.abspath(exported_path),
        "format": runner.format,
        "precision": precision,
        "sha256": sha,
        "size_bytes": os.path.getsize(exported_path),
        "status": "passed" if not failures else "FAILED verification",
        "passed": not failures,
        "failures": failures,
        "num_images": int(len(images)),
        "images": str(source),
        "top5_k": k,
        **metrics,
        "checks": checks,
        "latency_ms_per_batch": {"batch_size": batch_size, "keras": keras_s * 1e3, "exported": exported_s * 1e3},
        "runtime": runner.runtime,
        "model": {"variant": cfg.variant, "image_size": list(cfg.image_size), "num_classes": cfg.num_classes,
                  "pos_embedding": cfg.pos_embedding, "classifier": cfg.classifier},
        "metadata": runner.metadata,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if write_report:
        write_text(report_path(exported_path), json.dumps(report, indent=2) + "\n")
        report["report_path"] = report_path(exported_path)
    return report


def _limits(precision: str, thresholds: Optional[Dict[str, float]]) -> Dict[str, float]:
    """The precision's default thresholds with `thresholds` on top; ExportError for unknown names."""
    if precision not in THRESHOLDS:
        raise ExportError(f"precision must be one of {', '.join(THRESHOLDS)}; got {precision!r}")
    limits = {**THRESHOLDS[precision], **(thresholds or {})}
    unknown = sorted(set(limits) - {"max_abs_diff", "mean_abs_diff", "top1_agreement", "top5_agreement"})
    if unknown:
        raise ExportError(f"unknown threshold(s) {unknown}; allowed: max_abs_diff, mean_abs_diff, "
                          "top1_agreement, top5_agreement")
    return limits


def _agreement(out: np.ndarray, ref: np.ndarray, k: int) -> Dict[str, float]:
    """Absolute logit differences and top-1 / top-k agreement of exported vs Keras logits."""
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
            "top5_agreement": float(np.mean([set(a) == set(b) for a, b in zip(_topk(out, k), _topk(ref, k))]))}


def _checks(metrics: Dict[str, float], limits: Dict[str, float]):
    """(one record per threshold, the failed ones as lines saying by how much)."""
    checks, failures = [], []
    for name, limit in limits.items():
        value = metrics[name]
        higher = name in _HIGHER_IS_BETTER
        ok = value >= limit if higher else value <= limit
        checks.append({"metric": name, "value": value, "threshold": limit, "rule": ">=" if higher else "<=",
                       "passed": bool(ok)})
        if not ok:
            failures.append(f"{name} {value:.6g} {'<' if higher else '>'} threshold {limit:.6g} "
                            f"(off by {abs(value - limit):.3g})")
    return checks, failures


def format_table(report: dict) -> str:
    """A short terminal table of a verify() report."""
    lat = report["latency_ms_per_batch"]
    rows = [
        ("file", report["file"]),
        ("runtime", report["runtime"]),
        ("precision", report["precision"]),
        ("images", f"{report['num_images']} ({report['images']})"),
        ("max |diff|", f"{report['max_abs_diff']:.3g}"),
        ("mean |diff|", f"{report['mean_abs_diff']:.3g}"),
        ("top-1 agreement", f"{report['top1_agreement']:.2%}"),
        (f"top-{report['top5_k']} agreement", f"{report['top5_agreement']:.2%}"),
        (f"latency (batch {lat['batch_size']})", f"keras {lat['keras']:.2f} ms, exported {lat['exported']:.2f} ms"),
        ("checks", "; ".join(f"{c['metric']} {c['rule']} {c['threshold']:g}: {'ok' if c['passed'] else 'FAIL'}"
                             for c in report["checks"])),
        ("status", report["status"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
