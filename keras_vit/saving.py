"""Loading saved keras-vit models, with a clear error for files that are not ours."""
from __future__ import annotations

import json
import os
import warnings
import zipfile
from typing import Optional, Union

import keras

import keras_vit.layers  # noqa: F401  (registers the custom layers)
from keras_vit.config import ViTConfig
from keras_vit.errors import first_line
from keras_vit.model import VisionTransformer


def load_model(path: Union[str, os.PathLike], compile: bool = True) -> keras.Model:
    """Load a .keras file written by `model.save`; ValueError if missing or not a keras-vit model.

    compile=True, as `keras.saving.load_model`: a model saved compiled comes back compiled, its
    optimizer's state included, so `fit` goes on where it stopped. Where that compile state cannot
    be rebuilt (a loss or metric this process does not know), the model loads uncompiled with a
    warning that says why. compile=False skips it (inference: no optimizer variables)."""
    path = check_model_file(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = _load(path, compile)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a loadable keras-vit file
        # Keras' warnings on the way (a weight group it skipped ...) are dropped: the one line says it all
        raise ValueError(f"could not load {path!r} as a keras-vit model: {first_line(exc)}") from exc
    for w in caught:  # a model that loads: Keras' warnings (and ours) as they came
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a keras-vit model")
    return model


def check_model_file(path: Union[str, os.PathLike]) -> str:
    """The path as a string; ValueError, saying what is wrong, for what cannot be a .keras model
    file: a folder, a missing file, another suffix, a file that is not a zip (truncated, say)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"model file {path!r} is a folder; give the .keras file written by model.save")
    if not os.path.isfile(path):
        raise ValueError(f"model file {path!r} does not exist")
    if not path.endswith(".keras"):
        raise ValueError(f"model file {path!r} must be a .keras file written by model.save")
    try:
        open(path, "rb").close()  # zipfile.is_zipfile says False for a file it may not read
    except OSError as exc:
        raise ValueError(f"could not read model file {path!r}: {exc.strerror}") from None
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" for a truncated or foreign file
        raise ValueError(f"could not load {path!r}: not a .keras archive (the zip model.save writes); "
                         "the file is damaged or of another kind")
    return path


def _load(path: str, compile: bool) -> keras.Model:
    """keras.saving.load_model; with compile=True, where the model loads but its compile state
    cannot be rebuilt, the model uncompiled and a warning saying why."""
    try:
        return keras.saving.load_model(path, compile=compile)
    except Exception as exc:  # noqa: BLE001 - retried without the compile state; a file that is bad fails again
        if not compile:
            raise
        model = keras.saving.load_model(path, compile=False)
        warnings.warn(f"{path!r} loaded uncompiled: its compile state could not be rebuilt ({first_line(exc)}); "
                      "call model.compile() before fit", stacklevel=3)
        return model


def saved_config(path: Union[str, os.PathLike]) -> Optional[ViTConfig]:
    """The ViTConfig of a keras-vit .keras file, read from its config.json without building the
    model; None for a file that is not a readable keras-vit model (load_model says why)."""
    path = os.fspath(path)
    if not (path.endswith(".keras") and os.path.isfile(path) and zipfile.is_zipfile(path)):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            saved = json.loads(archive.read("config.json"))
        if saved.get("class_name") != "VisionTransformer" or saved.get("module") != "keras_vit.model":
            return None
        return ViTConfig.from_dict(saved["config"]["config"])
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return None
