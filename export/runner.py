"""Runs an exported file in its real runtime (onnxruntime, LiteRT, TensorFlow) behind one call:
NHWC float images in [0, 255] in, logits out."""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np

from keras_vit.errors import first_line
from keras_vit.export._common import ExportError, PathLike
from keras_vit.files import utf8_path

DEVICES = ("auto", "cuda", "cpu")
ONNXRUNTIME_MISSING = ("onnxruntime is not installed: verifying with onnx's reference evaluator (slow); "
                       "pip install 'keras-vit[cpu]' (or [gpu]) for onnxruntime")


def have_onnxruntime() -> bool:
    """Whether onnxruntime imports (a plain `pip install keras-vit` has none: the [cpu] and [gpu]
    extras bring one each)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def check_device(device: str, fmt: str) -> None:
    """ExportError unless files of format `fmt` (onnx, tflite, saved_model) can run on `device`
    here: cuda needs an ONNX file and onnxruntime with the CUDA provider."""
    if device not in DEVICES:
        raise ExportError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device != "cuda":
        return
    if fmt != "onnx":
        raise ExportError(f"device cuda runs ONNX files only; {fmt} files run on the CPU (use --device cpu or auto)")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("device cuda needs onnxruntime with the CUDA provider: "
                          "pip install 'keras-vit[gpu]'") from None
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ExportError(f"device cuda needs onnxruntime with the CUDA provider (pip install "
                          f"'keras-vit[gpu]'); this onnxruntime {ort.__version__} has {', '.join(available)}")


class Runner:
    """Runs an exported file in its real runtime: onnxruntime for .onnx, LiteRT for .tflite,
    TensorFlow for a SavedModel folder. Always called with NHWC float images in [0, 255]
    (transposed for NCHW files)."""

    def __init__(self, path: PathLike, providers: Optional[list] = None, num_threads: Optional[int] = None,
                 device: str = "auto"):
        self.path = os.fspath(path)
        self.input_dtype = "float32"  # uint8: verify feeds both sides whole pixel values
        self.fused_ops: Dict[str, int] = {}  # ONNX: nodes of fused attention / LayerNorm / GELU ops
        if device not in DEVICES:
            raise ExportError(f"device must be one of {', '.join(DEVICES)}; got {device!r}")
        self.device = "cpu"
        if os.path.isdir(self.path) and os.path.isfile(os.path.join(self.path, "saved_model.pb")):
            check_device(device, "saved_model")
            self._init_saved_model()
            return
        if not os.path.isfile(self.path):
            raise ExportError(f"exported file {self.path!r} does not exist")
        if self.path.endswith(".onnx"):
            check_device(device, "onnx")
            self._init_onnx(providers, num_threads, device)
        elif self.path.endswith(".tflite"):
            check_device(device, "tflite")
            self._init_tflite(num_threads)
        else:
            raise ExportError(f"unknown exported format for {self.path!r}; expected .onnx, .tflite "
                              "or a SavedModel folder")

    def _init_onnx(self, providers, num_threads, device: str = "auto") -> None:
        import onnx

        from keras_vit.export.onnx_fusion import fused_op_counts

        self.format = "onnx"
        if not have_onnxruntime():
            self._init_onnx_reference()
            return
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            # CUDA when the [gpu] extra is installed; TF32 off so fp32 stays fp32.
            use_cuda = device != "cpu" and "CUDAExecutionProvider" in available
            if use_cuda and hasattr(ort, "preload_dlls"):
                # onnxruntime-gpu >= 1.21 finds CUDA/cuDNN in the nvidia-* wheels that the [gpu]
                # extra's tensorflow[and-cuda] installs; best effort, the system's are used otherwise.
                try:
                    ort.preload_dlls()
                except Exception:  # noqa: BLE001
                    pass
            providers = [("CUDAExecutionProvider", {"use_tf32": 0})] if use_cuda else []
            providers.append("CPUExecutionProvider")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        try:
            self._session = ort.InferenceSession(_loadable(self.path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line naming it
            raise ExportError(f"onnxruntime cannot load {self.path!r}: {first_line(exc)}") from exc
        self.providers = self._session.get_providers()
        self.runtime = f"onnxruntime {ort.__version__} ({', '.join(self.providers)})"
        proto = onnx.load(self.path, load_external_data=False)
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        self.fused_ops = fused_op_counts(proto)
        self._input = self._session.get_inputs()[0].name
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _init_onnx_reference(self) -> None:
        """Without onnxruntime, ONNX's own reference evaluator runs the file (slowly, exactly);
        files of onnxruntime's own ops (--optimize, int8) are refused in one line naming the extra."""
        import warnings

        import onnx
        from onnx.reference import ReferenceEvaluator

        from keras_vit.export.onnx_fusion import fused_op_counts

        proto = onnx.load(self.path)
        foreign = sorted({node.domain for node in proto.graph.node} - {"", "ai.onnx"})
        if foreign:
            raise ExportError(f"{self.path!r} uses onnxruntime's own ops ({', '.join(foreign)}), which only "
                              "onnxruntime runs: pip install 'keras-vit[cpu]' (or 'keras-vit[gpu]')")
        warnings.warn(ONNXRUNTIME_MISSING, RuntimeWarning, stacklevel=2)  # once per process
        self._session, self.providers = ReferenceEvaluator(proto), ["onnx.reference"]
        self.runtime = (f"onnx.reference {onnx.__version__} (onnxruntime not installed: "
                        "pip install 'keras-vit[cpu]' or 'keras-vit[gpu]')")
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        self.fused_ops = fused_op_counts(proto)
        self._input = proto.graph.input[0].name

    def _init_saved_model(self) -> None:
        import tensorflow as tf

        from keras_vit.export.saved_model import SIGNATURE, read_metadata

        self.format = "saved_model"
        self._loaded = tf.saved_model.load(self.path)
        self._serve = self._loaded.signatures[SIGNATURE]
        self.input_dtype = self._serve.structured_input_signature[1]["images"].dtype.name
        self.providers = ["TensorFlow"]
        self.runtime = f"TensorFlow {tf.__version__} (tf.saved_model.load, {SIGNATURE})"
        self.metadata = read_metadata(self.path)

    def _init_tflite(self, num_threads) -> None:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter

        from keras_vit.export.tflite import read_metadata

        self.format = "tflite"
        # LiteRT applies its default delegate (XNNPACK) on CPU.
        try:
            source = _loadable(self.path)
            self._interpreter = Interpreter(**({"model_path": source} if isinstance(source, str) else
                                               {"model_content": source}), num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:  # a damaged or foreign file: one line naming it
            raise ExportError(f"LiteRT cannot load {self.path!r}: {first_line(exc)}") from exc
        self._runner = self._interpreter.get_signature_runner()
        self.providers = ["XNNPACK"]
        self.runtime = f"LiteRT {getattr(ai_edge_litert, '__version__', '')} (XNNPACK, CPU)".replace("  ", " ")
        self.metadata = read_metadata(self.path) or {}

    @property
    def precision(self) -> str:
        return self.metadata.get("precision", "fp32")

    @property
    def layout(self) -> str:
        return self.metadata.get("layout", "nhwc")

    @property
    def dynamic_size(self) -> bool:
        return self.metadata.get("dynamic_size") == "true"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if self.layout == "nchw":
            images = images.transpose(0, 3, 1, 2)
        images = np.ascontiguousarray(images)
        if self.format == "saved_model":
            if self.input_dtype == "uint8":
                images = np.clip(np.round(images), 0, 255).astype(np.uint8)
            return _only(self._serve(images=images)).numpy()
        if self.format == "onnx":
            return self._session.run(None, {self._input: images})[0]
        return _only(self._runner(images=images))


def _only(outputs: dict):
    """The signature's one output, whatever its name (`logits`, or `features` without a head)."""
    (value,) = outputs.values()
    return value


def _loadable(path: str):
    """`path` for the runtimes, or the file's bytes when the path is not UTF-8 (bytes that are not
    UTF-8 in a folder's name, or any non-ASCII name under a C locale), which their bindings cannot take."""
    if utf8_path(path):
        return path
    with open(path, "rb") as f:
        return f.read()
