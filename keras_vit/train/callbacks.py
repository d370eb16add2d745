"""Checkpoints written atomically at epoch ends, paced by time (keras.callbacks.ModelCheckpoint writes in place
and every epoch)."""
from __future__ import annotations

import json
import os
import time
import warnings
from typing import Optional

import keras
import numpy as np

from keras_vit.errors import first_line
from keras_vit.files import save_model, write_json


class SaveClock:
    """When an epoch-end save is due: `interval` seconds after the previous one (0: every epoch), and
    always after the last epoch. Short epochs (the digits demo's are under a second) then spend their
    time training rather than writing the same checkpoint 80 times."""

    def __init__(self, interval: float = 0.0):
        self.interval = float(interval)
        self.saved_at = time.monotonic()

    def due(self, epoch: int, epochs: Optional[int]) -> bool:
        last = epochs is not None and epoch + 1 >= epochs
        return self.interval <= 0 or last or time.monotonic() - self.saved_at >= self.interval

    def saved(self) -> None:
        self.saved_at = time.monotonic()


class AtomicCheckpoint(keras.callbacks.Callback):
    """Saves the model as `last.keras` and, when `monitor` improves, as `best.keras`, each through a
    temporary name, so a kill mid-write never leaves a truncated checkpoint; at most every `interval`
    seconds (the best weights are kept in memory until then) and after the last epoch.

    `mode`: "max", "min", or "auto" (min for a monitor named like a loss, as keras' ModelCheckpoint);
    `best`: the value to beat (a resumed run's best epoch so far), None for none. A monitor that is
    not in an epoch's logs (fit without validation data) is said once, as a warning."""

    def __init__(self, folder: str, monitor: str = "val_accuracy", interval: float = 0.0, mode: str = "auto",
                 best: Optional[float] = None):
        super().__init__()
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.folder, self.monitor = folder, monitor
        self.mode = ("min" if "loss" in monitor else "max") if mode == "auto" else mode
        self.best = (np.inf if self.mode == "min" else -np.inf) if best is None else float(best)
        self.clock = SaveClock(interval)
        self._best_weights = None  # the best epoch's weights, not yet written
        self._warned = False

    def on_train_begin(self, logs=None):
        self.clock.saved()

    def _improved(self, value) -> bool:
        if value is None:
            return False
        return value < self.best if self.mode == "min" else value > self.best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None and not self._warned:
            self._warned = True
            warnings.warn(f"AtomicCheckpoint: {self.monitor!r} is not in the epoch's logs ({', '.join(sorted(logs or {}))})"
                          f"; best.keras is not written (fit with validation data, or monitor one of those)",
                          stacklevel=2)
        improved = self._improved(value)
        if improved:
            self.best = value
        if not self.clock.due(epoch, (self.params or {}).get("epochs")):
            if improved:
                self._best_weights = self.model.get_weights()
            return
        save_model(self.model, os.path.join(self.folder, "last.keras"))
        if improved:
            save_model(self.model, os.path.join(self.folder, "best.keras"))
        elif self._best_weights is not None:
            self._save_best(self._best_weights)
        self._best_weights = None
        self.clock.saved()

    def on_train_end(self, logs=None):
        if self._best_weights is not None:  # training stopped before the next save (e.g. on a NaN)
            self._save_best(self._best_weights)
            self._best_weights = None

    def _save_best(self, weights) -> None:
        """best.keras with the kept weights, the model's own weights restored afterwards."""
        current = self.model.get_weights()
        self.model.set_weights(weights)
        try:
            save_model(self.model, os.path.join(self.folder, "best.keras"))
        finally:
            self.model.set_weights(current)


class PacedBackup(keras.callbacks.BackupAndRestore):
    """keras.callbacks.BackupAndRestore that writes its epoch-end backup at most every `interval`
    seconds (and after the last epoch): a resumed run repeats at most that much training, and
    `trim_csv` drops the repeated epochs' rows from metrics.csv."""

    def __init__(self, backup_dir: str, interval: float = 0.0, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.clock = SaveClock(interval)

    def on_train_begin(self, logs=None):
        self._agree_with_weights()
        super().on_train_begin(logs)
        self.clock.saved()

    def _agree_with_weights(self) -> None:
        """The epoch the weights file holds (written into it before its rename) is the backup's: a kill
        between the weights' rename and the metadata's left the metadata an epoch behind, and the
        resumed run trained that epoch again, past its schedule's end."""
        weights, meta = getattr(self, "_weights_path", None), getattr(self, "_training_metadata_path", None)
        held = backup_position(weights) if weights else None
        if held is not None and held != read_json(meta):
            write_json(meta, held)

    def on_epoch_end(self, epoch, logs=None):
        if self.clock.due(epoch, (self.params or {}).get("epochs")):
            super().on_epoch_end(epoch, logs)
            self.clock.saved()
        else:
            self._current_epoch = epoch + 1
            self._last_batch_seen = 0

    def _save_model(self):
        """Keras' own writes latest.weights.h5 in place: a process killed while it writes leaves a cut-short
        file that no resume can read. Here the weights go to a name of their own and are renamed into place
        when whole, then the epoch they hold (training_metadata.json), also renamed into place."""
        if not hasattr(self, "_weights_path") or not hasattr(self, "_training_metadata_path"):
            return super()._save_model()
        os.makedirs(self.backup_dir, exist_ok=True)
        tmp = os.path.join(self.backup_dir, f".{os.getpid()}-{os.urandom(4).hex()}.tmp.weights.h5")
        position = {"epoch": self._current_epoch, "batch": self._last_batch_seen}
        try:
            try:
                self.model.save_weights(filepath=tmp, overwrite=True)
            except OSError as exc:  # h5py's carries no file name: the line names the backup folder
                if exc.filename is not None:
                    raise
                raise type(exc)(exc.errno, exc.strerror or first_line(exc), self.backup_dir) from None
            import h5py

            with h5py.File(tmp, "a") as f:  # committed with the weights by the one rename
                f.attrs[POSITION_ATTR] = json.dumps(position)
            os.replace(tmp, self._weights_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        write_json(self._training_metadata_path, position)


POSITION_ATTR = "keras_vit_backup"  # the backup weights file's own {"epoch", "batch"}


def read_json(path: str):
    """The JSON in `path`; None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def backup_position(weights: str) -> Optional[dict]:
    """The {"epoch", "batch"} a backup weights file was written at (None: no file, or one written before
    keras-vit recorded it)."""
    import h5py

    if not os.path.isfile(weights):
        return None
    with h5py.File(weights, "r") as f:
        text = f.attrs.get(POSITION_ATTR)
    return None if text is None else json.loads(text)


def atomic_checkpoint(folder: str, monitor: str = "val_accuracy", interval: float = 0.0, mode: str = "auto",
                      best: Optional[float] = None) -> AtomicCheckpoint:
    """The AtomicCheckpoint callback for a run folder."""
    return AtomicCheckpoint(folder, monitor, interval, mode, best)


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
