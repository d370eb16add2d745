"""Run folders: what the trainer writes (config.json, class_names.json, metrics.csv, backup/,
best/last/model.keras, curves.png, results.json), the runs/latest link, and reading a run back
(without TensorFlow: the CLI reads a run before it imports it)."""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from keras_vit.data import slug
from keras_vit.errors import TrainError
from keras_vit.files import FolderHeld, atomic_path, hold_folder, link, release_folder

if TYPE_CHECKING:  # recipes imports Keras; reading a run folder does not need it
    from keras_vit.train.recipes import TrainConfig

RUNS_DIR = "runs"


def new_run_dir(cfg: TrainConfig, output: Optional[str] = None, root: str = RUNS_DIR, kind: str = "",
                latest: bool = True, option: str = "--output") -> str:
    """Create the run folder: `output`, or `root/<kind><dataset>-<variant>-<time>` (+ `root/latest`
    when `latest`). `option` names the flag that sets `output`, for check_output's message."""
    if output:
        check_output(output, option)
        os.makedirs(output, exist_ok=True)
        return output
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(root, f"{kind}{slug(cfg.dataset)}-{cfg.label()}-{stamp}")
    os.makedirs(root, exist_ok=True)
    run, n = base, 1
    while True:  # mkdir either creates the folder or fails: runs started in the same second get -2, -3, ...
        try:
            os.mkdir(run)
            break
        except FileExistsError:
            n += 1
            run = f"{base}-{n}"
    if latest:
        link_latest(run, root)
    return run


LOCK_FILE = ".running"


def hold_run(run: str):
    """Mark `run` as trained by this process until the returned file is closed (an advisory lock the
    system drops when the process ends, killed or not); TrainError when a live process holds it.
    None where the system has no flock (the folder is then not guarded)."""
    try:
        return hold_folder(run, LOCK_FILE)
    except FolderHeld as held:
        raise TrainError(f"run {run!r} is being trained by another process (pid {held.pid}); wait for it to finish, "
                         "or stop it and --resume then") from None


def release_run(held) -> None:
    """Drop hold_run's mark (the lock file goes with it)."""
    release_folder(held)


def check_output(output: Optional[str], option: str = "--output") -> None:
    """TrainError when `output` exists and is not an empty folder (a new run never mixes files)."""
    if output and os.path.exists(output) and not os.path.isdir(output):
        raise TrainError(f"{option} {output!r} is a file; give a folder for the run")
    parent = os.path.dirname(os.path.abspath(output)) if output else ""
    while parent and not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):  # before the data and the model, not after them (at the mkdir)
        raise TrainError(f"{option} {output!r} is inside {parent!r}, a file; give a folder for the run")
    if output and os.path.isdir(output) and os.listdir(output):
        if os.path.exists(os.path.join(output, LOCK_FILE)):  # a run started there at the same time, still going
            release_run(hold_run(output))
        hint = ", or add --resume to continue that run" if option == "--output" else ""
        raise TrainError(f"output folder {output!r} already exists and is not empty; choose another {option}{hint}")


def link_latest(run: str, root: str) -> bool:
    """Point `root/latest` at `run`. A real file or folder named "latest" is left alone (with a
    note on stderr); on file systems without symlinks there is no "latest". True when linked."""
    latest = os.path.join(root, "latest")
    if link(os.path.basename(run), latest):
        return True
    if os.path.lexists(latest) and not os.path.islink(latest):
        print(f"note: {latest!r} is not a link; left as it is (pass --output to choose a run folder)",
              file=sys.stderr)
    return False


def resolve_run_dir(path: Optional[str] = None, root: str = RUNS_DIR) -> str:
    """The run folder to resume: `path`, or `root/latest`."""
    run = path or os.path.join(root, "latest")
    if not os.path.isfile(os.path.join(run, "config.json")):
        raise TrainError(f"nothing to resume: {run!r} is not a run folder (no config.json)")
    return os.path.realpath(run)


def read_run_config(run: str) -> Dict[str, Any]:
    """The run's config.json: {"train", "model", "class_names", "resolved", ...}."""
    with open(os.path.join(run, "config.json")) as f:
        return json.load(f)


def backup_epoch(backup_dir: str) -> int:
    """Epochs completed according to the backup: its weights file's own record, else BackupAndRestore's
    metadata (0 when there is none)."""
    from keras_vit.train.callbacks import backup_position, read_json

    try:
        held = backup_position(os.path.join(backup_dir, "latest.weights.h5"))
    except (OSError, ValueError):
        held = None
    held = held if held is not None else read_json(os.path.join(backup_dir, "training_metadata.json"))
    try:
        return int(held.get("epoch", 0))
    except (AttributeError, TypeError, ValueError):  # no metadata, or not an object
        return 0


def trim_csv(path: str, epochs: int) -> None:
    """Keep the header and the rows of the first `epochs` epochs (a kill between the CSV row
    and the backup would otherwise repeat an epoch after resuming)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epochs]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)


def trim_events(logs: str, epochs: int) -> None:
    """Keep the first `epochs` values of every TensorBoard scalar under `logs` (Keras' TensorBoard writes
    one per epoch: epoch_* at the epoch, evaluation_*_vs_iterations at the update count). A resumed run
    writes the epochs after its backup again, and TensorBoard drew both copies."""
    if not os.path.isdir(logs):
        return
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    for folder, _, names in sorted(os.walk(logs)):
        files: Dict[str, list] = {}
        for name in sorted(names):
            if ".tfevents." in name and not name.startswith("."):  # not atomic_path's temporary names
                events = files.setdefault(os.path.join(folder, name), [])
                try:
                    for record in tf.data.TFRecordDataset(os.path.join(folder, name)):
                        events.append(event_pb2.Event.FromString(record.numpy()))
                except (tf.errors.DataLossError, ValueError):  # a cut-short last record (a kill while writing)
                    pass
        seen: Dict[str, int] = {}
        dropped = set()
        order = sorted(((e.wall_time, p, i) for p, events in files.items() for i, e in enumerate(events)))
        for _, path, i in order:
            tags = [v.tag for v in files[path][i].summary.value]
            if tags and any(seen.get(t, 0) >= epochs for t in tags):
                dropped.add((path, i))
            for t in tags:
                seen[t] = seen.get(t, 0) + 1
        for path, events in files.items():
            if any((path, i) in dropped for i in range(len(events))):
                with atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
                    for i, event in enumerate(events):
                        if (path, i) not in dropped:
                            writer.write(event.SerializeToString())


def model_path(path: str) -> str:
    """A .keras file, or a run folder holding model.keras."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "model.keras")
        if not os.path.isfile(candidate):
            raise TrainError(f"{path!r} is a folder without model.keras (not a finished run)")
        return candidate
    return path


@dataclasses.dataclass
class RunInfo:
    """What a run folder says about the model in it: class names and the dataset it trained on."""

    class_names: Optional[List[str]] = None
    dataset: Optional[str] = None
    seed: Optional[int] = None  # with val_fraction: which examples the run held out of its training data
    val_fraction: Optional[float] = None


def read_run(model: str) -> RunInfo:
    """The class names (class_names.json) and dataset (config.json) of the run folder holding the
    model file `model`, or of the run folder `model`; None for what the folder does not have."""
    folder = model if os.path.isdir(model) else os.path.dirname(os.path.abspath(model))
    info = RunInfo()
    for name in ("class_names.json", "config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                content = json.load(f)
        except (OSError, ValueError):
            continue
        if name == "class_names.json" and isinstance(content, list):
            info.class_names = [str(c) for c in content]
        elif isinstance(content, dict) and isinstance(content.get("train"), dict):
            train = content["train"]
            info.dataset = train["dataset"] if isinstance(train.get("dataset"), str) else None
            if info.dataset is not None and isinstance(content.get("cwd"), str):
                info.dataset = _from_folder(info.dataset, content["cwd"])
            info.seed = train["seed"] if isinstance(train.get("seed"), int) else None
            info.val_fraction = train["val_fraction"] if isinstance(train.get("val_fraction"), float) else None
    return info


def _from_folder(dataset: str, cwd: str) -> str:
    """A folder:/records: dataset named by a relative path, as the run's command gave it, resolved
    against the folder it ran in (config.json's "cwd"): export and evaluate find it from anywhere."""
    for prefix in ("folder:", "records:"):
        if dataset.startswith(prefix):
            path = os.path.expanduser(dataset[len(prefix):])
            return dataset if os.path.isabs(path) else prefix + os.path.normpath(os.path.join(cwd, path))
    return dataset


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset names are the same data: folder:/records: paths compared as files."""
    for prefix in ("folder:", "records:"):
        if a.startswith(prefix) and b.startswith(prefix):
            pa, pb = (os.path.realpath(os.path.expanduser(x[len(prefix):])) for x in (a, b))
            return pa == pb
    return a.strip() == b.strip()


def class_names_for(path: str, num_classes: int, model=None) -> List[str]:
    """The class names a model carries (`model.class_names`), else those stored next to it (its
    run folder's class_names.json), when they count `num_classes`; else the class indices."""
    own = getattr(model, "class_names", None)
    if own and len(own) == num_classes:
        return [str(n) for n in own]
    names = read_run(path).class_names
    return names if names is not None and len(names) == num_classes else [str(i) for i in range(num_classes)]
