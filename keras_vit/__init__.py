"""keras-vit: the Vision Transformer (Dosovitskiy et al., 2021) as plain Keras models.

Heavy imports (Keras, TensorFlow) happen on first use of a model attribute, so that
`vitcli --help` and `keras_vit.config` stay light.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "ViTConfig": "keras_vit.config",
    "parse_variant": "keras_vit.config",
    "VARIANTS": "keras_vit.config",
    "ViT": "keras_vit.vit",
    "VisionTransformer": "keras_vit.model",
    "get_config": "keras_vit.model",
    "load_model": "keras_vit.saving",
    "layers": "keras_vit.layers",
    "load_npz": "keras_vit.weights",
    "save_npz": "keras_vit.weights",
    "load_weights": "keras_vit.weights",
    "save_safetensors": "keras_vit.weights",
    "enable_lora": "keras_vit.weights.lora",
    "save_lora_weights": "keras_vit.weights.lora",
    "load_lora_weights": "keras_vit.weights.lora",
    "imagenet_labels": "keras_vit.labels",
    "predict": "keras_vit.train.evaluation",
    "resize_model": "keras_vit.vit",
    "dynamic_model": "keras_vit.vit",
    "resample_position_embeddings": "keras_vit.weights.resize",
}
__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_vit' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


# keras.saving.load_model finds custom classes only once they are registered. When Keras is
# already loaded (a notebook that imported it first), registering costs nothing: do it now, so
# `import keras, keras_vit; keras.saving.load_model("m.keras")` works. Otherwise stay light
# (vitcli --help); keras_vit.load_model and any model attribute register them on first use.
class _RegisterWithKeras(importlib.abc.MetaPathFinder):
    """Registers keras-vit's classes as soon as Keras itself is imported, after keras_vit (`import keras_vit,
    keras; keras.saving.load_model(...)`): Keras' loader finds custom classes only once registered."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "keras":
            return None
        sys.meta_path.remove(self)  # once; the real finders locate Keras
        spec = importlib.util.find_spec("keras")
        exec_module = getattr(getattr(spec, "loader", None), "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_register(module):
            exec_module(module)
            # Not while one of keras_vit's own modules imports Keras (keras_vit.model would import a module
            # that is half-initialised): then the classes register when a model is first used, as before.
            frame = sys._getframe(1)
            while frame is not None:
                if str(frame.f_globals.get("__name__", "")).startswith("keras_vit."):
                    return
                frame = frame.f_back
            importlib.import_module("keras_vit.model")

        spec.loader.exec_module = exec_then_register
        return spec


if "keras" in sys.modules:
    importlib.import_module("keras_vit.model")
elif not any(isinstance(finder, _RegisterWithKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithKeras())
