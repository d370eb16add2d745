"""Accuracy checks: run the Keras model and the exported file on the same real images and
compare logits, top-1/top-5 predictions and latency; write a JSON report beside the file.

Thresholds depend on the file's precision (overridable): fp32 max |diff| <= 1e-4 and 100%
top-1 agreement; fp16 >= 99% top-1; dynamic-range and int8 >= 97% top-1.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from keras_vit.export._common import ExportError, PathLike, resolve_model
from keras_vit.export.runner import DEVICES, Runner
from keras_vit.files import write_text

THRESHOLDS: Dict[str, Dict[str, float]] = {
    "fp32": {"max_abs_diff": 1e-4, "top1_agreement": 1.0},
    "fp16": {"top1_agreement": 0.99},
    "dynamic": {"top1_agreement": 0.97},
    "int8": {"top1_agreement": 0.97},
}
METRICS = ("max_abs_diff", "mean_abs_diff", "top1_agreement", "top5_agreement")
_HIGHER_IS_BETTER = {"top1_agreement", "top5_agreement"}


def report_path(exported_path: PathLike) -> str:
    """Where the JSON report of an exported file lives: <file>.report.json beside it."""
    return os.fspath(exported_path) + ".report.json"


def _batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int):
    """Logits for all images and the median seconds per batch (after one warm-up batch)."""
    fn(images[:batch_size])
    outs, times = [], []
    for i in range(0, len(images), batch_size):
        t = time.perf_counter()
        outs.append(np.asarray(fn(images[i:i + batch_size]), dtype=np.float32))
        times.append(time.perf_counter() - t)
    return np.concatenate(outs), float(np.median(times))


def _pixels(images: np.ndarray, runner: Runner) -> np.ndarray:
    """Images as the file takes them: whole values for a uint8 input (same for Keras)."""
    return np.clip(np.round(images), 0, 255).astype(np.float32) if runner.input_dtype == "uint8" else images


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def other_size(cfg) -> Tuple[int, int]:
    """A non-square size for checking files that take any size: the width 1.5x, both dimensions
    multiples of the input stride."""
    (h, w), sw = cfg.image_size, cfg.input_stride[1]
    new_w = max(sw, round(1.5 * w / sw) * sw)
    return h, new_w if new_w not in (h, w) else new_w + sw


def _compare(ref: np.ndarray, out: np.ndarray) -> dict:
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    k = min(5, ref.shape[1])
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "top1_agreement": float(np.mean(out.argmax(1) == ref.argmax(1))),
            "top5_agreement": float(np.mean([set(a) == set(b) for a, b in zip(_topk(out, k), _topk(ref, k))]))}


def _check(metrics: dict, limits: dict, where: str = "") -> Tuple[list, list]:
    checks, failures = [], []
    for name, limit in limits.items():
        value = metrics[name]
        ok = value >= limit if name in _HIGHER_IS_BETTER else value <= limit
        checks.append({"metric": name, "value": value, "threshold": limit,
                       "rule": ">=" if name in _HIGHER_IS_BETTER else "<=", "passed": bool(ok)})
        if not ok:
            by = abs(value - limit)
            failures.append(f"{where}{name} {value:.6g} {'<' if name in _HIGHER_IS_BETTER else '>'} "
                            f"threshold {limit:.6g} (off by {by:.3g})")
    return checks, failures


def verify(keras_model, exported_path: PathLike, images=None, num_images: int = 64, batch_size: int = 8,
           precision: Optional[str] = None, thresholds: Optional[Dict[str, float]] = None,
           write_report: bool = True, runner: Optional[Runner] = None,
           image_sizes: Optional[Sequence[Tuple[int, int]]] = None, device: str = "auto",
           plot: bool = True) -> dict:
    """Compare `keras_model` (model or .keras path) with the exported file on real images.

    Files that take any image size are also checked at `image_sizes` (default: a non-square
    one, see `other_size`) against `keras_vit.resize_model(model, size)` with the file's
    interpolation. `device` (auto, cuda, cpu) picks onnxruntime's provider. With
    `write_report` a PNG (logits scatter, per-class agreement) is written beside the JSON too.

    Top-1 agreement: same argmax; top-5 agreement: the same set of 5 highest classes (stricter
    than top-1, reported, not checked by default).
    `images`: an array or any source `keras_vit.export.images.load_images` takes (default:
    offline digits and photos). Returns the report dict (`passed`, `failures`, metrics,
    latencies); with `write_report` it is also saved as <file>.report.json. A failed check
    does not raise: the file is kept and the report says which threshold failed by how much
    (`keras_vit.export.export_verified` writes and verifies in one call and never lets a failed
    file replace a good one).
    """
    report, ref, out = measure(keras_model, exported_path, images, num_images, batch_size, precision, thresholds,
                               runner, image_sizes, device)
    if write_report:
        write_report_files(report, ref, out, runner.path if runner else exported_path, plot)
    return report


def measure(keras_model, exported_path: PathLike, images=None, num_images: int = 64, batch_size: int = 8,
            precision: Optional[str] = None, thresholds: Optional[Dict[str, float]] = None,
            runner: Optional[Runner] = None, image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
            device: str = "auto") -> Tuple[dict, np.ndarray, np.ndarray]:
    """`verify` without writing anything: (report, Keras logits, the file's logits), so the
    caller can write the report files once it knows where the file ends up."""
    from keras_vit.export.images import load_images

    model, cfg = resolve_model(keras_model)
    runner = runner or Runner(exported_path, device=device)
    precision = precision or runner.precision
    limits = _limits(precision, thresholds)
    source = "default" if images is None else images if isinstance(images, (str, os.PathLike)) else type(images).__name__
    source_images = images
    images = _pixels(load_images(images, cfg.image_size, cfg.channels, num_images), runner)
    batch_size = max(1, min(batch_size, len(images)))

    ref, keras_s = _batched(lambda x: np.asarray(model.predict_on_batch(x)), images, batch_size)
    out, exported_s = _batched(runner, images, batch_size)
    if out.shape != ref.shape:
        raise ExportError(f"exported file returns logits of shape {out.shape}, Keras gives {ref.shape}")

    k = min(5, ref.shape[1])
    metrics = _compare(ref, out)
    checks, failures = _check(metrics, limits)

    sizes = []
    if runner.dynamic_size:
        wanted = _check_sizes(cfg, image_sizes if image_sizes is not None else [other_size(cfg)])
        sizes = _check_other_sizes(model, cfg, runner, source_images, wanted, num_images, batch_size, limits)
        failures += [f for size in sizes for f in size.pop("failures")]

    report = _report(runner, cfg, precision, metrics, checks, failures, sizes, source, len(images), k,
                     {"batch_size": batch_size, "keras": keras_s * 1e3, "exported": exported_s * 1e3})
    if not failures and not _outputs_vary(ref):
        report["warnings"] = [UNINFORMATIVE]
        report["status"] = "passed, but proves nothing: the Keras model's outputs are the same for every image"
    return report, ref, out


UNINFORMATIVE = ("the Keras model's outputs are the same for every image (a zero-initialised head, as an untrained "
                 "model's), so the checks compare that constant and prove nothing about the rest of the file; "
                 "verify a trained model (another model with such a head would pass as well)")


def _outputs_vary(ref: np.ndarray) -> bool:
    """Whether the Keras outputs differ between images: with every row alike (a zero head gives its
    bias for every image), agreement says nothing about the encoder the file holds."""
    scale = max(1.0, float(np.abs(ref).max())) if ref.size else 1.0
    return len(ref) < 2 or bool(np.abs(ref - ref[:1]).max() > 1e-6 * scale)


def write_report_files(report: dict, ref: np.ndarray, out: np.ndarray, exported_path: PathLike,
                       plot: bool = True, described: Optional[PathLike] = None) -> dict:
    """Write `report` as <file>.report.json (and the PNG, with `plot`) beside `exported_path`, the
    file it describes (its "file" entry is set to that path, or to `described`: where the file
    and the report will be renamed to); returns the report with "report_path" (and "plot_path")
    added, at `described` when given."""
    final = os.fspath(described if described is not None else exported_path)
    report["file"] = os.path.abspath(final)
    write_text(report_path(exported_path), json.dumps(report, indent=2) + "\n")
    report["report_path"] = report_path(final)
    if plot:
        write_plot(report, ref, out, plot_path(exported_path))
        report["plot_path"] = plot_path(final)
    elif os.path.isfile(plot_path(exported_path)):  # an earlier report's plot: it shows another file
        os.remove(plot_path(exported_path))
    return report


def _report(runner: Runner, cfg, precision: str, metrics: dict, checks: list, failures: list, sizes: list,
            source: str, num_images: int, k: int, latency_ms: dict) -> dict:
    """The JSON report of one verification: the file (digest, size), what was checked and how it
    went, where it ran, the model and the machine."""
    exported_path = runner.path
    sha, size_bytes = _digest(exported_path)
    return {
        "file": os.path.abspath(exported_path),
        "format": runner.format,
        "precision": precision,
        "sha256": sha,
        "size_bytes": size_bytes,
        "status": "passed" if not failures else "FAILED verification",
        "passed": not failures,
        "failures": failures,
        "num_images": int(num_images),
        "images": str(source),
        "top5_k": k,
        **metrics,
        "checks": checks,
        "image_sizes": sizes,
        "device": runner.device,
        "providers": list(runner.providers),
        "fused_ops": dict(runner.fused_ops),
        "latency_ms_per_batch": latency_ms,
        "runtime": runner.runtime,
        "model": {"variant": cfg.variant, "image_size": list(cfg.image_size), "num_classes": cfg.num_classes,
                  "pos_embedding": cfg.pos_embedding, "classifier": cfg.classifier},
        "metadata": runner.metadata,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def check_thresholds(thresholds: Optional[Dict[str, float]]) -> Dict[str, float]:
    """`thresholds` as {metric: float}; ExportError for an unknown metric or a value no result
    can meet or miss (not a number, negative, an agreement above 1 or of 0, an infinite difference:
    a check that cannot fail is none; --no-verify skips them)."""
    limits = {}
    for name, value in (thresholds or {}).items():
        if name not in METRICS:
            raise ExportError(f"unknown threshold {name!r}; allowed: {', '.join(METRICS)}")
        try:
            limit = float(value)
        except (TypeError, ValueError):
            limit = float("nan")
        ok = 0.0 < limit <= 1.0 if name in _HIGHER_IS_BETTER else 0.0 <= limit < math.inf
        if not ok:
            allowed = "above 0, at most 1" if name in _HIGHER_IS_BETTER else "a finite number >= 0"
            raise ExportError(f"threshold {name}={value!r} must be {allowed} (a check that cannot fail checks "
                              "nothing)")
        limits[name] = limit
    return limits


def _limits(precision: str, thresholds: Optional[Dict[str, float]]) -> Dict[str, float]:
    """The precision's default thresholds with `thresholds` on top; ExportError for bad ones."""
    if precision not in THRESHOLDS:
        raise ExportError(f"precision must be one of {', '.join(THRESHOLDS)}; got {precision!r}")
    return {**THRESHOLDS[precision], **check_thresholds(thresholds)}


def _check_sizes(cfg, sizes) -> List[Tuple[int, int]]:
    """`sizes` as (height, width) pairs; ExportError unless the model takes each: a multiple of the input
    stride, or with patch_remainder='drop' at least one patch (ViTConfig.check_image_size)."""
    out = []
    for size in sizes:
        try:
            h, w = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ExportError(f"image_sizes must be (height, width) pairs, got {size!r}") from None
        try:
            cfg.check_image_size(h, w, "image size")
        except ValueError as exc:
            raise ExportError(str(exc)) from None
        out.append((h, w))
    return out


def _check_other_sizes(model, cfg, runner: Runner, source_images, sizes, num_images: int, batch_size: int,
                       limits: Dict[str, float]) -> List[dict]:
    """A file that takes any image size, checked at each of `sizes` against
    keras_vit.resize_model(model, size) with the file's interpolation: one record per size
    (metrics, checks, and its failure lines under "failures")."""
    from keras_vit.export.images import load_images
    from keras_vit.vit import resize_model

    method = runner.metadata.get("pos_interpolation", cfg.pos_interpolation)
    records = []
    for size in sizes:
        at = _pixels(load_images(source_images, size, cfg.channels, num_images), runner)
        resized = resize_model(model, size, method=method)
        size_ref, _ = _batched(lambda x, m=resized: np.asarray(m.predict_on_batch(x)), at, batch_size)
        size_out, _ = _batched(runner, at, batch_size)
        size_metrics = _compare(size_ref, size_out)
        size_checks, size_failures = _check(size_metrics, limits, f"at {size[0]}x{size[1]}: ")
        records.append({"image_size": list(size), "interpolation": method, **size_metrics,
                        "passed": not size_failures, "checks": size_checks, "failures": size_failures})
    return records


def _digest(path: str) -> Tuple[str, int]:
    """sha256 and size in bytes of a file, or of all files of a folder (a SavedModel)."""
    sha = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    for name in files:
        with open(name, "rb") as f:
            sha.update(f.read())
    return sha.hexdigest(), sum(os.path.getsize(f) for f in files)


def plot_path(exported_path: PathLike) -> str:
    """Where the PNG of an exported file's report lives: <file>.report.png beside it."""
    return os.fspath(exported_path).rstrip("/\\") + ".report.png"


def write_plot(report: dict, ref: np.ndarray, out: np.ndarray, path: PathLike) -> str:
    """A small PNG for people: exported vs Keras logits (scatter, y = x line) and, per class
    Keras predicts, the share of images where the exported file predicts it too."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from keras_vit.files import atomic_path

    fig = Figure(figsize=(8, 3.4), dpi=80)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.scatter(ref.reshape(-1), out.reshape(-1), s=4, alpha=0.5, color="tab:blue")
    lo, hi = float(min(ref.min(), out.min())), float(max(ref.max(), out.max()))
    ax1.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax1.set_xlabel("Keras logits")
    ax1.set_ylabel(f"{report['format']} logits")
    ax1.set_title(f"max |diff| {report['max_abs_diff']:.2g}", fontsize=9)
    keras_top = ref.argmax(1)
    classes = np.unique(keras_top)
    agree = [float(np.mean(out[keras_top == c].argmax(1) == c)) for c in classes]
    ax2.bar(np.arange(len(classes)), agree, color=["tab:green" if a == 1 else "tab:red" for a in agree])
    names = json.loads(report.get("metadata", {}).get("class_names", "null") or "null")
    labels = [str(names[c]) if names and c < len(names) else str(c) for c in classes]
    if len(classes) <= 20:
        ax2.set_xticks(np.arange(len(classes)), labels, fontsize=7, rotation=90 if len(classes) > 10 else 0)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("class predicted by Keras")
    ax2.set_ylabel("top-1 agreement")
    ax2.set_title(f"top-1 agreement {report['top1_agreement']:.1%}: {report['status']}", fontsize=9,
                  color="black" if report["passed"] else "red")
    fig.suptitle(f"{os.path.basename(report['file'])} ({report['precision']}, {report['runtime']})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return os.fspath(path)


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
        (f"latency (batch {lat['batch_size']})", f"keras {lat['keras']:.2f} ms, exported " + (
            "n/a (onnx's reference evaluator checks values, not speed)" if report.get("providers") == ["onnx.reference"]
            else f"{lat['exported']:.2f} ms")),
        *[(f"at {r['image_size'][0]}x{r['image_size'][1]}",
           f"max |diff| {r['max_abs_diff']:.3g}, top-1 agreement {r['top1_agreement']:.2%} (vs resize_model, "
           f"{r['interpolation']})") for r in report.get("image_sizes", [])],
        ("device", report.get("device", "cpu")),
        *([("fused ops", ", ".join(f"{op} {n}" for op, n in report["fused_ops"].items()))]
          if report.get("fused_ops") else []),
        ("checks", "; ".join(f"{c['metric']} {c['rule']} {c['threshold']:g}: {'ok' if c['passed'] else 'FAIL'}"
                             for c in report["checks"])),
        ("status", report["status"]),
        *[("warning", w) for w in report.get("warnings", [])],
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


__all__ = ["THRESHOLDS", "METRICS", "DEVICES", "check_thresholds", "Runner", "verify", "measure", "report_path",
           "plot_path", "write_plot", "write_report_files", "format_table", "other_size"]
