"""train(cfg): a TrainConfig into a run folder, with model.fit on tf.data pipelines."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import keras
import numpy as np
import tensorflow as tf

from keras_vit import data as kdata
from keras_vit import precision
from keras_vit.config import ViTConfig
from keras_vit.errors import TrainError
from keras_vit.files import save_model, write_json, write_text
from keras_vit.model import build_model
from keras_vit.plots import plot_training_curves, read_metrics_csv
from keras_vit.train.callbacks import LearningRateLogger, atomic_checkpoint
from keras_vit.train.distribute import distribution_scope, replicas
from keras_vit.train.initial import load_initial_weights
from keras_vit.train.recipes import TrainConfig, make_optimizer, resolve_speed
from keras_vit.train.runs import RUNS_DIR, backup_epoch, check_output, new_run_dir, read_run_config, resolve_run_dir, trim_csv


@dataclasses.dataclass
class _Data:
    """The run's splits as batched pipelines, and the model config they fit."""

    splits: kdata.Splits
    vit_cfg: ViTConfig
    train: Any
    val: Any
    test: Any
    steps: int


def train(cfg: TrainConfig, output: Optional[str] = None, resume: bool = False,
          root: str = RUNS_DIR, verbose: Any = "auto") -> Dict[str, Any]:
    """Train `cfg` into a run folder (or resume the one at `output` / `root/latest`).

    The folder gets config.json, class_names.json, metrics.csv, logs/ (TensorBoard),
    best.keras / last.keras each epoch, model.keras, curves.png (loss, accuracy, learning rate
    per epoch) at the end and results.json (test metrics).
    """
    run = None
    if resume:
        run, cfg = _resumed(output, root)
    else:
        cfg.validate()
        check_output(output)
    mixed, jit, reason = resolve_speed(cfg)
    with _speed_settings(mixed, jit):
        keras.utils.set_random_seed(cfg.seed)
        try:
            data = _load_data(cfg)
            if run is None:  # the folder appears only once the dataset and options are known good
                run = _start_run(cfg, data, output, root, mixed, jit)
            print(f"precision: {'float32' if mixed == 'none' else mixed}, compilation: {jit}"
                  + (f" (auto: {reason})" if "auto" in (cfg.mixed_precision, cfg.jit_compile) else ""))
            model = _build_model(cfg, data, jit)
            start = time.time()
            history = model.fit(data.train, validation_data=data.val, epochs=cfg.epochs,
                                callbacks=_callbacks(run, resume),
                                verbose=(1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose)
            seconds = time.time() - start
            if model.stop_training and any(np.isnan(v) for v in history.history.get("loss", [])):
                raise TrainError(f"training diverged (loss NaN); kept checkpoints in {run}; try a lower --lr")
            save_model(model, os.path.join(run, "model.keras"))
            plot_training_curves(read_metrics_csv(os.path.join(run, "metrics.csv")), os.path.join(run, "curves.png"))
            test = dict(zip(["loss", "top1", "top5"], (float(v) for v in model.evaluate(data.test, verbose=0))))
        except tf.errors.OpError as exc:  # e.g. an image that decodes badly mid-run
            raise TrainError(kdata.bad_image_line(exc) or f"training failed: {op_error_line(exc)}") from None
    result = {"run": run, "test": test, "train_seconds": round(seconds, 1), "epochs": cfg.epochs,
              "params": int(model.count_params()), "resumed": bool(resume), "replicas": replicas(model),
              "mixed_precision": mixed, "jit_compile": jit,
              "last_epoch": {k: float(v[-1]) for k, v in history.history.items() if v}}
    bad = data.splits.bad_images
    if bad is not None:  # skip_bad_images: the skipped files, named in the run folder
        result["bad_images"] = len(bad)
        write_text(os.path.join(run, "bad_images.txt"), "".join(p + "\n" for p in bad.paths))
    write_json(os.path.join(run, "results.json"), result)
    return result


def _resumed(output: Optional[str], root: str):
    """(run folder, its TrainConfig) of the run to resume."""
    run = resolve_run_dir(output, root)
    saved = read_run_config(run)
    # a resumed run keeps the precision and compilation it started with, wherever it resumes
    cfg = TrainConfig.from_dict({**saved["train"], **saved.get("resolved", {})}).validate()
    if os.path.isfile(os.path.join(run, "model.keras")) and not os.path.isdir(os.path.join(run, "backup")):
        raise TrainError(f"run {run!r} has already finished (model.keras exists); nothing to resume")
    return run, cfg


@contextlib.contextmanager
def _speed_settings(mixed: str, jit: str) -> Iterator[None]:
    """The global dtype policy and XLA flags of a run, restored afterwards (the fusible mode sets
    XLA flags that TensorFlow reads once, so this comes before any TensorFlow work)."""
    previous_xla_flags = os.environ.get("TF_XLA_FLAGS")
    if jit == "fusible":
        precision.request_fusible_clustering()
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32" if mixed == "none" else mixed)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if previous_xla_flags is None:  # child processes do not inherit the fusible flags
            os.environ.pop("TF_XLA_FLAGS", None)
        else:
            os.environ["TF_XLA_FLAGS"] = previous_xla_flags


def _load_data(cfg: TrainConfig) -> _Data:
    """The dataset's splits as training (augmented), validation and test pipelines."""
    splits = kdata.load(cfg.dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, data_dir=cfg.data_dir,
                        skip_bad_images=cfg.skip_bad_images)
    channels = 1 if splits.image_shape[-1] == 1 else 3
    vit_cfg = cfg.vit_config(splits.num_classes, channels)
    opts = dict(image_size=vit_cfg.image_size, batch_size=cfg.batch_size, num_classes=splits.num_classes,
                channels=channels, seed=cfg.seed)
    train_ds = kdata.pipeline(splits.train, training=True, augment=cfg.augment, mixup=cfg.mixup,
                              cutmix=cfg.cutmix, **opts)
    steps = int(train_ds.cardinality())
    if steps < 1 and splits.sizes:  # skipped bad files or record shards: the listed count
        steps = splits.sizes[0] // cfg.batch_size
    elif steps < 1:
        steps = sum(1 for _ in train_ds)
    if steps < 1:
        raise TrainError(f"batch size {cfg.batch_size} is larger than the training split; use a smaller --batch-size")
    return _Data(splits, vit_cfg, train_ds, kdata.pipeline(splits.val, **opts), kdata.pipeline(splits.test, **opts),
                 steps)


def _start_run(cfg: TrainConfig, data: _Data, output: Optional[str], root: str, mixed: str, jit: str) -> str:
    """Create the run folder with config.json and class_names.json."""
    run = new_run_dir(cfg, output, root)
    write_json(os.path.join(run, "config.json"), {
        "train": cfg.to_dict(), "model": data.vit_cfg.to_dict(), "class_names": data.splits.class_names,
        "command": sys.argv, "keras": keras.__version__, "backend": keras.backend.backend(),
        "resolved": {"mixed_precision": mixed, "jit_compile": jit},
        "created": datetime.datetime.now().isoformat(timespec="seconds")})
    write_json(os.path.join(run, "class_names.json"), data.splits.class_names)
    return run


def _build_model(cfg: TrainConfig, data: _Data, jit: str) -> keras.Model:
    """The model, its initial weights and compile(), inside the run's distribution scope."""
    num_classes = data.splits.num_classes
    with distribution_scope(cfg.distribute):
        model = build_model(data.vit_cfg)
        model.class_names = list(data.splits.class_names)  # saved with the model
        if cfg.weights:
            report = load_initial_weights(model, cfg.weights)
            if report.get("npz"):
                print(f"initial weights: checkpoint {cfg.weights} (head kept when its size differs)")
            else:
                print(f"initial weights: {len(report['loaded'])} variables from {cfg.weights}, "
                      f"{len(report['skipped'])} kept as initialised (new shapes)")
        if cfg.freeze_backbone:
            from keras_vit.finetune import freeze_backbone

            freeze_backbone(model)
        model.compile(
            optimizer=make_optimizer(cfg, data.steps, model=model),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                     keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5")],
            jit_compile=precision.keras_jit_compile(jit) and not precision.mirrored_on_cpus())
    return model


def _callbacks(run: str, resume: bool) -> List[keras.callbacks.Callback]:
    """NaN stop, metrics.csv, TensorBoard, atomic checkpoints and the resumable backup."""
    backup = os.path.join(run, "backup")
    csv_path = os.path.join(run, "metrics.csv")
    if resume:
        trim_csv(csv_path, backup_epoch(backup))
    return [
        keras.callbacks.TerminateOnNaN(),
        LearningRateLogger(),
        keras.callbacks.CSVLogger(csv_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(run, "logs"), write_graph=False, profile_batch=0),
        atomic_checkpoint(run, monitor="val_accuracy"),
        # Last, so that everything above is on disk before an epoch counts as done.
        keras.callbacks.BackupAndRestore(backup, delete_checkpoint=True),
    ]


def op_error_line(exc: BaseException) -> str:
    """The informative line of a TensorFlow op error (not the 'Graph execution error' banner)."""
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(("File ", "Detected at", "[[", "Graph execution", "Cf. "))]
    return useful[-1] if useful else type(exc).__name__
