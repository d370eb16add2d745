"""Epoch-end checkpoints paced by time: last.keras, best.keras and the resumable backup of a one-process
run are written at most every `interval` seconds and after the last epoch, with the best epoch's weights."""
from __future__ import annotations

import json
import os

import keras
import numpy as np

from keras_vit.train import callbacks as C


class FakeClock:
    """time.monotonic for the callbacks: each epoch end advances it by `step` seconds."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now


class Tick(keras.callbacks.Callback):
    """Advances the fake clock at each epoch end, before the savers look at it."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock = clock

    def on_epoch_end(self, epoch, logs=None):
        self.clock.now += self.clock.step


class ScriptedAccuracy(keras.callbacks.Callback):
    """Puts a given val_accuracy per epoch into the logs (the best epoch is chosen by the test)."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.weights_at = {}

    def on_epoch_end(self, epoch, logs=None):
        logs["val_accuracy"] = self.values[epoch]
        self.weights_at[epoch] = [w.copy() for w in self.model.get_weights()]


def _fit(tmp_path, monkeypatch, interval: float, step: float, accuracies, kill_after=None):
    clock = FakeClock(step)
    monkeypatch.setattr(C.time, "monotonic", clock)
    saves = []
    real_save = C.save_model
    monkeypatch.setattr(C, "save_model", lambda model, path: (saves.append(os.path.basename(path)), real_save(model, path)))
    backups = []
    real_backup = C.PacedBackup._save_model
    monkeypatch.setattr(C.PacedBackup, "_save_model",
                        lambda self: (backups.append(self._current_epoch), real_backup(self)))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.random.default_rng(0).normal(size=(16, 4)), np.zeros((16, 3))
    scripted = ScriptedAccuracy(accuracies)
    cbs = [Tick(clock), scripted, C.atomic_checkpoint(str(tmp_path), interval=interval),
           C.PacedBackup(str(tmp_path / "backup"), interval, delete_checkpoint=False)]
    model.fit(x, y, epochs=len(accuracies), verbose=0, callbacks=cbs)
    return model, saves, backups, scripted


def test_every_epoch_when_the_interval_is_zero(tmp_path, monkeypatch):
    _, saves, backups, _ = _fit(tmp_path, monkeypatch, 0.0, 0.5, [0.1, 0.3, 0.2, 0.4])
    assert saves.count("last.keras") == 4 and saves.count("best.keras") == 3
    assert backups == [1, 2, 3, 4]


def test_paced_saves_keep_the_best_epochs_weights(tmp_path, monkeypatch):
    # epochs end at t = 1..6 s; saves are due 2.5 s after the previous one (t = 3, 6) and after the last epoch
    model, saves, backups, scripted = _fit(tmp_path, monkeypatch, 2.5, 1.0, [0.1, 0.9, 0.2, 0.3, 0.4, 0.5])
    assert backups == [3, 6]
    assert saves.count("last.keras") == 2
    best = keras.saving.load_model(str(tmp_path / "best.keras"))
    for got, want in zip(best.get_weights(), scripted.weights_at[1]):  # epoch 1 (0.9) is the best
        np.testing.assert_array_equal(got, want)
    last = keras.saving.load_model(str(tmp_path / "last.keras"))
    for got, want in zip(last.get_weights(), model.get_weights()):  # the model's weights were put back
        np.testing.assert_array_equal(got, want)
    with open(tmp_path / "backup" / "training_metadata.json") as f:
        assert json.load(f)["epoch"] == 6


def test_a_run_stopped_early_still_writes_its_best(tmp_path, monkeypatch):
    class StopAt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    clock = FakeClock(1.0)
    monkeypatch.setattr(C.time, "monotonic", clock)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    scripted = ScriptedAccuracy([0.5, 0.1, 0.2])
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=3, verbose=0,
              callbacks=[Tick(clock), scripted, C.atomic_checkpoint(str(tmp_path), interval=100.0), StopAt()])
    best = keras.saving.load_model(str(tmp_path / "best.keras"))
    for got, want in zip(best.get_weights(), scripted.weights_at[0]):
        np.testing.assert_array_equal(got, want)


def test_backup_is_whole_or_the_previous_one(tmp_path):
    """The epoch-end backup goes to a name of its own and is renamed into place: a write that dies
    midway (kill -9 while h5py writes) leaves the previous backup, which a resume reads."""
    import pytest

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    backup = C.PacedBackup(str(tmp_path / "backup"), 0.0, delete_checkpoint=False)
    backup.set_model(model)
    backup._current_epoch = 1
    backup._save_model()
    first = (tmp_path / "backup" / "latest.weights.h5").read_bytes()
    model.layers[0].kernel.assign(np.ones((3, 2), "float32"))

    def dies_midway(filepath, overwrite=True):
        with open(filepath, "wb") as f:
            f.write(first[:50])
        raise KeyboardInterrupt  # as a kill would stop it, after a part is written

    real, model.save_weights = model.save_weights, dies_midway
    backup._current_epoch = 2
    with pytest.raises(KeyboardInterrupt):
        backup._save_model()
    assert (tmp_path / "backup" / "latest.weights.h5").read_bytes() == first
    assert sorted(os.listdir(tmp_path / "backup")) == ["latest.weights.h5", "training_metadata.json"]
    assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    model.save_weights = real
    backup._save_model()
    assert json.loads((tmp_path / "backup" / "training_metadata.json").read_text())["epoch"] == 2
    model.layers[0].kernel.assign(np.zeros((3, 2), "float32"))
    model.load_weights(str(tmp_path / "backup" / "latest.weights.h5"))
    np.testing.assert_array_equal(model.layers[0].kernel.numpy(), np.ones((3, 2)))


def _scripted_fit(folder, values, callbacks, key="val_accuracy", epochs=None):
    class Scripted(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if key is not None:
                logs[key] = values[epoch]

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((8, 4)), np.zeros((8, 3)), epochs=epochs or len(values), verbose=0,
              callbacks=[Scripted(), *callbacks])
    return model


def _saved_epochs(folder, name):
    return keras.saving.load_model(str(folder / name)).get_weights()


def test_a_loss_monitor_keeps_the_lowest_and_a_missing_one_is_said(tmp_path, monkeypatch):
    """monitor="val_loss" kept the highest loss (best.keras was the worst epoch); a fit without validation
    data wrote no best.keras without a word."""
    import pytest

    saves = []
    real = C.save_model
    monkeypatch.setattr(C, "save_model", lambda model, path: (saves.append(os.path.basename(path)), real(model, path)))
    check = C.atomic_checkpoint(str(tmp_path), monitor="val_loss")
    assert check.mode == "min"
    _scripted_fit(tmp_path, [0.5, 2.0, 0.1], [check], key="val_loss")
    assert check.best == 0.1 and saves == ["last.keras", "best.keras", "last.keras", "last.keras", "best.keras"]
    assert C.atomic_checkpoint(str(tmp_path), monitor="val_top5", mode="auto").mode == "max"
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max', got 'up'"):
        C.atomic_checkpoint(str(tmp_path), mode="up")
    (tmp_path / "b").mkdir()
    with pytest.warns(UserWarning, match=r"'val_accuracy' is not in the epoch's logs \(loss\); best.keras is not written"):
        _scripted_fit(tmp_path / "b", [0, 0], [C.atomic_checkpoint(str(tmp_path / "b"))], key=None)


def test_a_resumed_runs_best_is_beaten_only_by_a_better_epoch(tmp_path):
    """A resumed run started from best = -inf: its first epoch replaced best.keras (0.9) with a 0.3 one."""
    from keras_vit.train import loop

    run = tmp_path / "run"
    run.mkdir()
    _scripted_fit(run, [0.9, 0.5], loop._callbacks(str(run), False))
    best = _saved_epochs(run, "best.keras")
    _scripted_fit(run, [0, 0, 0.2, 0.3], loop._callbacks(str(run), True), epochs=4)  # epochs 2, 3 run
    for got, want in zip(_saved_epochs(run, "best.keras"), best):
        np.testing.assert_array_equal(got, want)
    _scripted_fit(run, [0, 0, 0, 0, 0.95], loop._callbacks(str(run), True), epochs=5)
    assert any(not np.array_equal(a, b) for a, b in zip(_saved_epochs(run, "best.keras"), best))


def test_a_kill_between_the_weights_and_the_metadata_resumes_at_the_weights_epoch(tmp_path, monkeypatch):
    """The backup's epoch is written into its weights file before the rename: a kill before the metadata
    followed left it an epoch behind, and the resume trained that epoch again (20 updates, not 16)."""
    import pytest

    from keras_vit.train import loop, runs

    run = tmp_path / "run"
    run.mkdir()
    real, calls = C.write_json, []

    def dying(path, obj):
        calls.append(obj)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(C, "write_json", dying)
    with pytest.raises(KeyboardInterrupt):
        _scripted_fit(run, [0.1] * 4, loop._callbacks(str(run), False))
    monkeypatch.setattr(C, "write_json", real)
    assert json.loads((run / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    assert runs.backup_epoch(str(run / "backup")) == 2
    model = _scripted_fit(run, [0.1] * 4, loop._callbacks(str(run), True))
    assert int(model.optimizer.iterations) == 4  # 1 step an epoch (batch 8 of 8), epochs 2 and 3
    assert [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]] == [0, 1, 2, 3]


def test_a_backup_with_a_damaged_array_is_one_line(tmp_path, monkeypatch):
    """A weights file that opens but holds a damaged heap gave h5py's RuntimeError traceback at the restore."""
    import pytest

    from keras_vit.errors import TrainError
    from keras_vit.train import loop

    run = tmp_path / "run"
    run.mkdir()
    _scripted_fit(run, [0.1, 0.2], loop._callbacks(str(run), False))
    path = run / "backup" / "latest.weights.h5"
    data = bytearray(path.read_bytes())
    for i in range(2000, len(data), 997):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TrainError, match=r"its backup '.*latest.weights.h5' is damaged") as exc:
        loop._check_backup(str(run))
    assert "\n" not in str(exc.value)


def test_a_backup_folder_it_cannot_write_is_named(tmp_path):
    """h5py's PermissionError for a read-only backup/ has no file name, so vitcli printed its traceback; the
    error now names the backup folder (vitcli's one line)."""
    import errno

    import pytest

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    backup = C.PacedBackup(str(tmp_path / "backup"), 0.0, delete_checkpoint=False)
    backup.set_model(model)
    backup._current_epoch = 1

    def refused(filepath, overwrite=True):
        raise PermissionError(errno.EACCES, "Unable to synchronously create file (permission denied)")

    model.save_weights = refused
    with pytest.raises(PermissionError) as info:
        backup._save_model()
    assert info.value.filename == str(tmp_path / "backup") and "permission denied" in info.value.strerror
    assert os.listdir(tmp_path / "backup") == []


def test_a_resume_drops_the_repeated_epochs_from_the_tensorboard_logs(tmp_path):
    """Epochs logged after the backup and trained again after --resume were in TensorBoard's event files
    twice (metrics.csv was trimmed, the events were not): every scalar now has one value per epoch."""
    import shutil

    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    from keras_vit.train import loop

    run = tmp_path / "run"
    run.mkdir()
    x, y = np.ones((8, 4)), np.zeros((8, 3))

    def fit(epochs, resume):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss="mse")
        model.fit(x, y, validation_data=(x, y), epochs=epochs, verbose=0, callbacks=loop._callbacks(str(run), resume))

    fit(2, False)
    shutil.copytree(run / "backup", tmp_path / "backup2")
    fit(4, True)  # epochs 2 and 3 logged, then "killed" before their backup:
    shutil.rmtree(run / "backup")
    shutil.copytree(tmp_path / "backup2", run / "backup")
    fit(4, True)  # epochs 2 and 3 again
    for kind in ("train", "validation"):
        steps = {}
        for path in sorted((run / "logs" / kind).iterdir()):
            assert not path.name.startswith(".")
            for record in tf.data.TFRecordDataset(str(path)):
                event = event_pb2.Event.FromString(record.numpy())
                for value in event.summary.value:
                    steps.setdefault(value.tag, []).append(event.step)
        assert "epoch_loss" in steps
        assert steps["epoch_loss"] == [0, 1, 2, 3], steps
        assert all(len(s) == 4 for s in steps.values()), steps
    assert [int(r.split(",")[0]) for r in (run / "metrics.csv").read_text().splitlines()[1:]] == [0, 1, 2, 3]
