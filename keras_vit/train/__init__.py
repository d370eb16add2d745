"""Training: recipes (TrainConfig, make_config, the optimizer and schedule), run folders, the
fit loop, distribution, and reading trained models back.

`make_config(dataset, recipe, **overrides)` gives a TrainConfig (a recipe, the dataset's
defaults, then your overrides); `train(cfg)` runs it into a run folder with checkpoints,
metrics.csv, TensorBoard logs and a resumable backup; `evaluate` and `predict_images` read a
trained model the same way `vitcli evaluate` / `vitcli predict` do.

Names load on first use, so that `keras_vit.train.runs` (reading run folders) imports no TensorFlow.
"""
from __future__ import annotations

import importlib

# public name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(["DATASET_DEFAULTS", "DISTRIBUTE", "MODEL_FIELDS", "OPTIMIZERS", "RECIPES", "TrainConfig",
                     "make_config", "make_optimizer", "resolve_speed"], "recipes"),
    **dict.fromkeys(["WarmupCosine", "warmup_cosine"], "schedules"),
    **dict.fromkeys(["RUNS_DIR", "RunInfo", "class_names_for", "model_path", "new_run_dir", "read_run",
                     "resolve_run_dir", "same_dataset"], "runs"),
    **dict.fromkeys(["AtomicCheckpoint", "LearningRateLogger", "atomic_checkpoint"], "callbacks"),
    **dict.fromkeys(["ClusterError", "PeerLostError", "distribution_scope", "replicas", "start_cluster"],
                    "distribute"),
    **dict.fromkeys(["evaluate", "predict", "predict_images", "predict_logits"], "evaluation"),
    "load_initial_weights": "initial",
    "train": "loop",
    "TrainError": None,
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'keras_vit.train' has no attribute {name!r}")
    module = "keras_vit.errors" if _LAZY[name] is None else f"keras_vit.train.{_LAZY[name]}"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
