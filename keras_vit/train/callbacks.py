"""Checkpoints written atomically each epoch (keras.callbacks.ModelCheckpoint writes in place)."""
from __future__ import annotations

import os

import keras
import numpy as np

from keras_vit.files import save_model


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the model each epoch as `last.keras` and, when `monitor` improves, as `best.keras`,
    each through a temporary name, so a kill mid-write never leaves a truncated checkpoint."""

    def __init__(self, folder: str, monitor: str = "val_accuracy"):
        super().__init__()
        self.folder, self.monitor = folder, monitor
        self.best = -np.inf

    def on_epoch_end(self, epoch, logs=None):
        save_model(self.model, os.path.join(self.folder, "last.keras"))
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.best:
            self.best = value
            save_model(self.model, os.path.join(self.folder, "best.keras"))


def atomic_checkpoint(folder: str, monitor: str = "val_accuracy") -> AtomicCheckpoint:
    """The AtomicCheckpoint callback for a run folder."""
    return AtomicCheckpoint(folder, monitor)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's learning rate at the end of each epoch to the logs (so metrics.csv
    and TensorBoard record the schedule); put it before the loggers."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = current_learning_rate(self.model.optimizer)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The optimizer's learning rate now; for a keras.optimizers.MultiOptimizer (layer decay), the
    largest of its optimizers' rates (the head's: the recipe's rate)."""
    try:
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    except AttributeError:  # MultiOptimizer has no single rate
        return max(current_learning_rate(inner) for inner in optimizer.optimizers)
