"""Atomic writes (keras_vit.files): final mode as a normal write, no temporary file left behind."""
import os
import stat

import numpy as np
import pytest

from keras_vit import files


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


class _FailingModel:
    """A model whose save writes half a file, then fails (a full disk, a kill)."""

    def save(self, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")


def test_failed_model_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "last.keras"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(OSError, match="No space left"):
        files.save_model(_FailingModel(), str(target))
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["last.keras"]


def test_written_files_have_the_mode_of_a_normal_write(tmp_path, umask_022):
    normal = tmp_path / "normal.txt"
    normal.write_text("x")
    files.write_json(tmp_path / "a.json", {"a": 1})
    files.write_text(tmp_path / "b.txt", "b")
    with files.atomic_path(tmp_path / "c.npz") as tmp:
        np.savez(tmp, x=np.zeros(2))
    assert _mode(normal) == 0o644
    for name in ("a.json", "b.txt", "c.npz"):
        assert _mode(tmp_path / name) == 0o644, name
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.txt", "c.npz", "normal.txt"]


def test_save_npz_file_mode_follows_the_umask(tmp_path, umask_022):
    import keras_vit

    model = keras_vit.ViT("Ti/16", image_size=32, num_classes=3)
    path = keras_vit.save_npz(model, str(tmp_path / "w.npz"))
    assert _mode(path) == 0o644
    assert os.listdir(tmp_path) == ["w.npz"]


def test_save_safetensors_file_mode_follows_the_umask(tmp_path, umask_022):
    """safetensors writes its own file, 0600: the saved file still gets open()'s mode."""
    import keras_vit

    model = keras_vit.ViT("Ti/16", image_size=32, num_classes=3)
    path = keras_vit.save_safetensors(model, str(tmp_path / "w.safetensors"))
    assert _mode(path) == 0o644
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_latest_link_beside_a_real_folder_leaves_no_temp(tmp_path, capsys):
    from keras_vit.train.runs import link_latest

    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "keep.txt").write_text("mine")
    run = tmp_path / "digits-run"
    run.mkdir()
    assert link_latest(str(run), str(tmp_path)) is False
    assert sorted(os.listdir(tmp_path)) == ["digits-run", "latest"]
    assert (tmp_path / "latest" / "keep.txt").read_text() == "mine"
    assert "not a link" in capsys.readouterr().err
    # an existing link is replaced by one to the newer run
    (tmp_path / "latest" / "keep.txt").unlink()
    (tmp_path / "latest").rmdir()
    assert link_latest(str(run), str(tmp_path)) is True
    other = tmp_path / "digits-run-2"
    other.mkdir()
    assert link_latest(str(other), str(tmp_path)) is True
    assert os.readlink(tmp_path / "latest") == "digits-run-2"
    assert sorted(os.listdir(tmp_path)) == ["digits-run", "digits-run-2", "latest"]


def test_replace_path_puts_the_old_folder_back_when_the_rename_fails(tmp_path, monkeypatch):
    """A folder is replaced by moving the old one aside first; a failed rename moves it back."""
    old, new = tmp_path / "m.saved_model", tmp_path / "new"
    old.mkdir()
    (old / "saved_model.pb").write_bytes(b"good")
    new.mkdir()
    (new / "saved_model.pb").write_bytes(b"new")
    real = os.replace

    def refuse_the_new_one(src, dst):
        if os.fspath(src) == str(new):
            raise OSError(28, "No space left on device", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", refuse_the_new_one)
    with pytest.raises(OSError, match="No space left"):
        files.replace_path(new, old)
    monkeypatch.undo()
    assert (old / "saved_model.pb").read_bytes() == b"good" and sorted(os.listdir(tmp_path)) == ["m.saved_model", "new"]
    files.replace_path(new, old)
    assert (old / "saved_model.pb").read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["m.saved_model"]


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path):
    import threading

    from keras_vit.train.recipes import make_config
    from keras_vit.train.runs import new_run_dir

    cfg = make_config("digits")
    made, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        made.append(new_run_dir(cfg, root=str(tmp_path), latest=False))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == len(set(made)) == 8 and all(os.path.isdir(m) for m in made)


def test_a_run_another_live_process_trains_is_refused(tmp_path):
    """--resume of a folder a live process is training stops in one line; once that process is gone
    (killed included: the system drops its lock), the folder is free again."""
    import subprocess
    import sys

    from keras_vit.errors import TrainError
    from keras_vit.train.runs import LOCK_FILE, hold_run, release_run

    code = "import sys, time; from keras_vit.train.runs import hold_run; h = hold_run(sys.argv[1]); print(1, flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"1"
        with pytest.raises(TrainError, match=rf"is being trained by another process \(pid {proc.pid}\); wait for it"):
            hold_run(str(tmp_path))
        # a second `vitcli train --output SAME` started with it: not "add --resume", which it would refuse too
        from keras_vit.train.runs import check_output

        with pytest.raises(TrainError, match=rf"is being trained by another process \(pid {proc.pid}\)"):
            check_output(str(tmp_path))
    finally:
        proc.kill()
        proc.wait()
    held = hold_run(str(tmp_path))
    assert open(tmp_path / LOCK_FILE).read() == str(os.getpid())
    release_run(held)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_folder_where_the_file_goes_is_named_before_the_work(tmp_path):
    """vitcli inspect --out DIR with a folder named attention_rollout.png in it said 'DIR/.attention_rollout.png.
    e2e20ce7.tmp.png: Is a directory' after the work: the error now names the path, before the block runs."""
    (tmp_path / "figure.png").mkdir()
    ran = []
    with pytest.raises(IsADirectoryError) as info:
        with files.atomic_path(tmp_path / "figure.png"):
            ran.append(True)
    assert info.value.filename == str(tmp_path / "figure.png") and not ran
    assert os.listdir(tmp_path) == ["figure.png"]


def test_remove_temporaries_takes_only_the_writers_names(tmp_path):
    """What a SIGKILLed writer leaves (atomic_path's file, atomic_dir's folder, a folder moved aside, the
    backup's weights) is removed when its run resumes; files of the same look but other names stay."""
    left = [".last.keras.0f307181.tmp.keras", ".model.onnx.deadbeef.tmp.onnx", "backup/.4242-0a1b2c3d.tmp.weights.h5",
            ".saved.12345678.tmp/", ".saved.87654321.old/"]
    kept = ["last.keras", ".hidden", ".last.keras.tmp.keras", "notes.0f307181.tmp", "backup/latest.weights.h5"]
    for name in left + kept:
        path = tmp_path / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir()
            (path / "inside").write_text("x")
        else:
            path.write_text("x")
    gone = files.remove_temporaries(tmp_path)
    assert sorted(os.path.relpath(p, tmp_path) for p in gone) == sorted(n.rstrip("/") for n in left)
    assert sorted(os.path.relpath(os.path.join(d, n), tmp_path) for d, _, ns in os.walk(tmp_path) for n in ns) == \
        sorted(kept)
