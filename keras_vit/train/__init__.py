"""Training: recipes (TrainConfig, make_config, the optimizer and schedule), run folders, the
fit loop, distribution, and reading trained models back.

`make_config(dataset, recipe, **overrides)` gives a TrainConfig (a recipe, the dataset's
defaults, then your overrides); `train(cfg)` runs it into a run folder with checkpoints,
metrics.csv, TensorBoard logs and a resumable backup; `evaluate` and `predict_images` read a
trained model the same way `vitcli evaluate` / `vitcli predict` do.
"""
from keras_vit.errors import TrainError
from keras_vit.train.callbacks import AtomicCheckpoint, atomic_checkpoint
from keras_vit.train.distribute import ClusterError, PeerLostError, distribution_scope, replicas, start_cluster
from keras_vit.train.evaluate import evaluate, predict_images, predict_logits
from keras_vit.train.initial import load_initial_weights
from keras_vit.train.loop import train
from keras_vit.train.recipes import (DATASET_DEFAULTS, DISTRIBUTE, MODEL_FIELDS, OPTIMIZERS, RECIPES, TrainConfig,
                                     make_config, make_optimizer, resolve_speed, warmup_cosine)
from keras_vit.train.runs import RUNS_DIR, class_names_for, model_path, new_run_dir, resolve_run_dir

__all__ = ["AtomicCheckpoint", "ClusterError", "PeerLostError", "start_cluster", "DATASET_DEFAULTS", "DISTRIBUTE", "MODEL_FIELDS", "OPTIMIZERS", "RECIPES", "RUNS_DIR",
           "TrainConfig", "TrainError", "atomic_checkpoint", "class_names_for", "distribution_scope", "evaluate",
           "load_initial_weights", "make_config", "make_optimizer", "model_path", "new_run_dir", "predict_images",
           "predict_logits", "replicas", "resolve_run_dir", "resolve_speed", "train", "warmup_cosine"]
