"""train(cfg): a TrainConfig into a run folder, with model.fit on tf.data pipelines."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import keras
import numpy as np
import tensorflow as tf

from keras_vit import data as kdata
from keras_vit import precision
from keras_vit.config import ViTConfig
from keras_vit.errors import TrainError, first_line, op_error_line
from keras_vit.files import link, remove_temporaries, save_model, write_json, write_text
from keras_vit.layers.fusion import SCOPES_ENV
from keras_vit.model import build_model
from keras_vit.plots import plot_training_curves, read_metrics_csv
from keras_vit.train import towers
from keras_vit.train.callbacks import LearningRateLogger, PacedBackup, atomic_checkpoint, backup_position, read_json
from keras_vit.train.distribute import (
    Cluster,
    ClusterError,
    FollowChief,
    PeerLostError,
    check_cluster_options,
    check_same_options,
    clip_summed_gradients,
    distribution_scope,
    fingerprint,
    is_peer_lost,
    replicas,
    start_cluster,
    weights_digest,
)
from keras_vit.train.initial import load_initial_weights
from keras_vit.train.recipes import TrainConfig, make_optimizer, resolve_speed
from keras_vit.train.runs import (
    RUNS_DIR,
    backup_epoch,
    check_output,
    hold_run,
    new_run_dir,
    read_run_config,
    release_run,
    resolve_run_dir,
    trim_csv,
    trim_events,
)
from keras_vit.train.sharding import file_share, shard_datasets, uneven_shares
from keras_vit.weights.checkpoints import reading_once


@dataclasses.dataclass
class _Data:
    """The run's splits as batched pipelines, and the model config they fit."""

    splits: kdata.Splits
    vit_cfg: ViTConfig
    train: Any
    val: Any
    test: Any
    steps: int  # optimizer steps per epoch (the schedule's unit)
    fit_steps: Optional[int] = None  # steps_per_epoch for model.fit when the training stream is endless


def train(cfg: TrainConfig, output: Optional[str] = None, resume: bool = False,
          root: str = RUNS_DIR, verbose: Any = "auto", peer_timeout: Optional[float] = None) -> Dict[str, Any]:
    """Train `cfg` into a run folder (or resume the one at `output` / `root/latest`).

    The folder gets config.json, class_names.json, metrics.csv, logs/ (TensorBoard),
    best.keras / last.keras each epoch, model.keras, curves.png (loss, accuracy, learning rate
    per epoch) at the end and results.json (test metrics).

    Under TF_CONFIG (or the KERAS_DISTRIBUTION_* variables on JAX) the process first joins the
    cluster (waiting at most `peer_timeout` seconds for its peers); only the chief writes the run
    folder, and a worker restarted with the same options continues the unfinished run.
    """
    with reading_once():  # a --weights checkpoint read once for the model's config and its weights
        return _train_once(cfg, output, resume, root, verbose, peer_timeout)


def _train_once(cfg: TrainConfig, output: Optional[str], resume: bool, root: str, verbose: Any,
                peer_timeout: Optional[float]) -> Dict[str, Any]:
    """train()'s work."""
    run, held = None, []  # held: this process's mark on its run folder (hold_run), dropped however the run ends
    if resume:
        run, cfg = _resumed(output, root)
        held.append(hold_run(run))  # not a run another live process trains
        remove_temporaries(run)  # what a killed process was writing
    else:
        cfg.validate()
    cluster = start_cluster(cfg.distribute, peer_timeout)  # before any other TensorFlow work
    if cluster.multi_worker:
        if resume:
            raise ClusterError("--resume is for one-process runs; in a cluster, restart every worker with its "
                               "original command (it continues from the last completed epoch)")
        check_same_options(cluster, cfg.to_dict())
        check_cluster_options(cluster, cfg.batch_size, cfg.grad_accum)
    elif not resume:
        check_output(output)
    mixed, jit, reason = resolve_speed(cfg)
    worker_dir: List[str] = []  # a non-chief worker's temporary folder, removed however the run ends
    started: List[_Started] = []  # the run folder this call created, undone if it fails before an epoch ends
    try:
        return _train(cfg, run, resume, cluster, output, root, verbose, mixed, jit, reason, worker_dir, held, started)
    except BaseException:
        for new in started:
            new.undo_if_empty()
        raise
    finally:
        for folder in worker_dir:
            shutil.rmtree(folder, ignore_errors=True)
        for mark in held:
            release_run(mark)


@dataclasses.dataclass
class _Started:
    """A run folder this process created, and what was there before: a run that fails before its first
    epoch ends (a bad image in the first batch, a precision the backend cannot run) leaves no folder
    and `runs/latest` where it pointed, as one that fails earlier does."""

    run: str
    root: str
    output_existed: bool  # --output was an empty folder already
    latest: Optional[str]  # where root/latest pointed (a link's target), None when it was no link

    @classmethod
    def before(cls, output: Optional[str], root: str) -> _Started:
        latest = os.path.join(root, "latest")
        return cls("", root, bool(output) and os.path.isdir(output),
                   os.readlink(latest) if os.path.islink(latest) else None)

    def undo_if_empty(self) -> None:
        """Remove the run unless an epoch ended (metrics.csv has a row); put runs/latest back."""
        metrics = os.path.join(self.run, "metrics.csv")
        if not self.run or (os.path.isfile(metrics) and read_metrics_csv(metrics)):  # no columns: no epoch row
            return
        if self.output_existed:
            for name in os.listdir(self.run):
                path = os.path.join(self.run, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        else:
            shutil.rmtree(self.run, ignore_errors=True)
        latest = os.path.join(self.root, "latest")
        if os.path.islink(latest) and os.path.realpath(latest) == os.path.realpath(self.run):
            if self.latest is not None:
                link(self.latest, latest)
            else:
                os.remove(latest)


def _train(cfg: TrainConfig, run: Optional[str], resume: bool, cluster: Cluster, output: Optional[str], root: str,
           verbose: Any, mixed: str, jit: str, reason: str, worker_dir: List[str], held: List,
           started: List[_Started]) -> Dict[str, Any]:
    """The body of train() once the cluster (if any) is joined."""
    with _speed_settings(mixed, jit):
        keras.utils.set_random_seed(cfg.seed)
        try:
            # one process resumed: a stream of its own (a cluster's workers must shuffle alike: their file shares)
            data = _load_data(cfg, cluster, backup_epoch(os.path.join(run, "backup"))
                              if resume and not cluster.multi_worker else 0)
            if cluster.multi_worker:
                run, resume = _cluster_run(cfg, data, cluster, output, root, mixed, jit, started)
                if not cluster.is_chief:
                    worker_dir.append(run)
            if resume and run:
                _check_same_classes(run, data.splits.class_names)
            print(f"precision: {'float32' if mixed == 'none' else mixed}, compilation: {jit}"
                  + (f" (auto: {reason})" if "auto" in (cfg.mixed_precision, cfg.jit_compile) else "")
                  + (f"; the batch as {towers.count()} towers, one thread each" if towers.count() > 1 else ""))
            model = _build_model(cfg, data, jit)
            if run is None:  # the folder (and runs/latest) appears only once the data, model and weights are good
                started.append(_Started.before(output, root))
                run = started[0].run = _start_run(cfg, data, output, root, mixed, jit)
            if cluster.is_chief and not held:
                held.append(hold_run(run))
                if resume:
                    remove_temporaries(run)
            build_without_data(model, data.train)
            start = time.time()
            history = model.fit(data.train, validation_data=data.val, epochs=cfg.epochs, steps_per_epoch=data.fit_steps,
                                callbacks=_callbacks(run, resume, cluster, cfg.checkpoint_interval),
                                verbose=(1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose)
            seconds = time.time() - start
            if model.stop_training and any(np.isnan(v) for v in history.history.get("loss", [])):
                raise TrainError(f"training diverged (loss NaN); kept checkpoints in {run}; try a lower --lr")
            save_model(model, os.path.join(run, "model.keras"))
            plot_training_curves(read_metrics_csv(os.path.join(run, "metrics.csv")), os.path.join(run, "curves.png"))
            test = dict(zip(["loss", "top1", "top5"], (float(v) for v in model.evaluate(data.test, verbose=0))))
            # the loss trained on (as Keras' val_loss): with the smoothing, where vitcli evaluate's is plain
            test["label_smoothing"] = cfg.label_smoothing
        except tf.errors.OpError as exc:  # e.g. an image that decodes badly mid-run
            if is_peer_lost(cluster, exc):
                raise PeerLostError(f"worker {cluster.index}: a peer of the cluster stopped ({type(exc).__name__}); "
                                    "start it again with its command: the cluster continues from the last "
                                    "completed epoch") from None
            raise TrainError(kdata.bad_image_line(exc) or f"training failed: {op_error_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - JAX's collectives raise JaxRuntimeError when a peer is gone
            if not (cluster.backend == "jax" and is_peer_lost(cluster, exc)):
                raise
            raise ClusterError(f"process {cluster.index}: a peer of the cluster stopped ({first_line(exc)}); a JAX "
                               "cluster cannot continue: start every process again with a new --output, or finish "
                               "the run in one process with vitcli train --resume --output RUN") from None
    result = {"run": run if cluster.is_chief else None, "test": test, "train_seconds": round(seconds, 1),
              "epochs": cfg.epochs, "params": int(model.count_params()), "resumed": bool(resume),
              "replicas": replicas(model), "workers": cluster.num_workers, "worker": cluster.index,
              "mixed_precision": mixed, "jit_compile": jit, "weights_digest": weights_digest(model),
              "last_epoch": _last_epoch(history, run if cluster.is_chief else None)}
    bad = data.splits.bad_images
    if bad is not None:  # skip_bad_images: the skipped files, named in the run folder
        result["bad_images"] = len(bad)
        if cluster.is_chief:
            write_text(os.path.join(run, "bad_images.txt"), "".join(p + "\n" for p in bad.paths))
    if cluster.is_chief:
        write_json(os.path.join(run, "results.json"), result)
        shutil.rmtree(os.path.join(run, "backup"), ignore_errors=True)  # finished: nothing left to resume
    return result


def _check_same_classes(run: str, names: Sequence[str]) -> None:
    """TrainError when the dataset's classes are no longer the ones the run was trained on (a class folder
    added or renamed since): resuming would load a head of another size (Keras' own error)."""
    saved = read_run_config(run).get("class_names")
    if saved is not None and list(saved) != list(names):
        added, gone = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        what = "; ".join(part for part in (f"new: {', '.join(added[:5])}" if added else "",
                                           f"missing: {', '.join(gone[:5])}" if gone else "") if part) or "reordered"
        raise TrainError(f"cannot resume {run!r}: the dataset now has {len(names)} classes, the run was trained on "
                         f"{len(saved)} (config.json's class_names; {what}); restore the dataset or start a new run")


def _last_epoch(history, run: Optional[str]) -> Dict[str, float]:
    """The last epoch's metrics: fit's, or metrics.csv's last row when this process ran no epoch (a run
    resumed after its last epoch, killed before model.keras)."""
    last = {k: float(v[-1]) for k, v in history.history.items() if v}
    if last or run is None or not os.path.isfile(os.path.join(run, "metrics.csv")):
        return last
    return {k: v[-1] for k, v in read_metrics_csv(os.path.join(run, "metrics.csv")).items() if v and k != "epoch"}


def _check_backup(run: str) -> None:
    """TrainError naming the file when the run's backup cannot be resumed from (cut short, damaged),
    before anything of the run is touched (metrics.csv is trimmed to the backup's epoch)."""
    backup = os.path.join(run, "backup")
    meta, weights = os.path.join(backup, "training_metadata.json"), os.path.join(backup, "latest.weights.h5")
    if not (os.path.exists(meta) or os.path.exists(weights)):
        return  # no epoch backed up yet: the run starts again
    last = (" (last.keras holds the last saved epoch: start a new run from it with --weights)"
            if os.path.isfile(os.path.join(run, "last.keras")) else "")
    import h5py

    path = weights
    try:
        if os.path.exists(weights):  # every array read: a damaged one fails here, not in Keras' restore
            with h5py.File(weights, "r") as f:
                f.visititems(lambda _, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
            held = backup_position(weights)
            if held is not None and held != read_json(meta):  # the weights' own epoch: the metadata
                write_json(meta, held)  # may be a kill behind it
        path = meta
        with open(meta) as f:
            epoch = json.load(f)["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch {epoch!r}")
        path = weights
        with h5py.File(weights, "r"):
            pass
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # h5py: RuntimeError for a bad heap
        raise TrainError(f"cannot resume {run!r}: its backup {path!r} is damaged ({first_line(exc)}){last}") from None


def _cluster_run(cfg: TrainConfig, data: _Data, cluster: Cluster, output: Optional[str], root: str,
                 mixed: str, jit: str, started: List[_Started]) -> Tuple[str, bool]:
    """(folder, resuming) of this worker in a cluster: the chief's run folder (the unfinished run
    at `output` or `root/latest` when its options match, else a new one, undone as a one-process run's
    if no epoch ends); a temporary folder for the other workers, which start from the chief's restored
    state (FollowChief). A folder the chief refuses stops every worker with its line, not a timeout."""
    problem: Optional[TrainError] = None
    run, resume = "", False
    if cluster.is_chief:
        candidate = output or os.path.join(root, "latest")
        try:
            if _unfinished_run_of(candidate, cfg):
                if cluster.backend == "jax":  # only TensorFlow's workers follow the chief's restored state
                    raise ClusterError(f"{candidate!r} holds an unfinished run, which a JAX cluster cannot continue: "
                                       "start every process with a new --output, or finish it in one process "
                                       f"with vitcli train --resume --output {candidate}")
                run, resume = os.path.realpath(candidate), True
            else:
                check_output(output)
        except TrainError as exc:
            problem = exc
    stopped = int(cluster.gather([int(problem is not None)])[0][0])
    if problem is not None:
        raise problem
    if stopped:
        raise ClusterError(f"worker {cluster.index}: the chief (worker 0) stopped before training; its output says why")
    if not cluster.is_chief:
        return tempfile.mkdtemp(prefix=f"keras-vit-worker{cluster.index}-"), False
    if not run:
        started.append(_Started.before(output, root))
        run = started[-1].run = _start_run(cfg, data, output, root, mixed, jit)
    return run, resume


def _unfinished_run_of(folder: str, cfg: TrainConfig) -> bool:
    """Whether `folder` is a run of the same options with a backup to continue from."""
    if not os.path.isdir(os.path.join(folder, "backup")):
        return False
    try:
        saved = read_run_config(folder)["train"]
    except (OSError, ValueError, KeyError):
        return False
    return fingerprint(saved) == fingerprint(cfg.to_dict())


def _resumed(output: Optional[str], root: str):
    """(run folder, its TrainConfig) of the run to resume."""
    run = resolve_run_dir(output, root)
    try:
        saved = read_run_config(run)
        saved["train"]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # cut short, not UTF-8, not a run's
        raise TrainError(f"cannot resume {run!r}: its config.json is damaged ({first_line(exc)})") from None
    _check_backup(run)
    # a resumed run keeps the precision it started with, wherever it resumes, and its compilation on
    # the backend it started on; on another, the compilation asked for is resolved again (TensorFlow's
    # "none" is a graph, JAX's would run eagerly; XLA on TensorFlow is torch.compile on PyTorch)
    resolved = dict(saved.get("resolved", {}))
    if saved.get("backend", keras.backend.backend()) != keras.backend.backend():
        resolved.pop("jit_compile", None)
    cfg = TrainConfig.from_dict({**saved["train"], **resolved}).validate()
    if os.path.isfile(os.path.join(run, "model.keras")) and not os.path.isdir(os.path.join(run, "backup")):
        raise TrainError(f"run {run!r} has already finished (model.keras exists); nothing to resume")
    return run, cfg


def _restore_env(name: str, previous: Optional[str]) -> None:
    """Puts an environment variable back as it was (unset when it was unset)."""
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous


@contextlib.contextmanager
def _speed_settings(mixed: str, jit: str) -> Iterator[None]:
    """The global dtype policy and XLA flags of a run, restored afterwards (the fusible mode sets
    XLA flags that TensorFlow reads once, so this comes before any TensorFlow work)."""
    previous_xla_flags = os.environ.get("TF_XLA_FLAGS")
    previous_scopes = os.environ.get(SCOPES_ENV)
    if jit == "fusible":
        precision.request_fusible_clustering()
    if jit in ("none", "scoped"):  # none: no XLA at all, as asked, not even the blocks' element-wise scopes
        os.environ[SCOPES_ENV] = "1" if jit == "scoped" else "0"  # (layers.fusion); scoped: those scopes only
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32" if mixed == "none" else mixed)
    if jit not in ("xla", "fusible"):  # XLA's computations want TensorFlow's threads (towers.keep_threads_for)
        towers.configure(keras.mixed_precision.global_policy().name)  # before the data starts TensorFlow
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        _restore_env("TF_XLA_FLAGS", previous_xla_flags)  # child processes do not inherit the fusible flags
        _restore_env(SCOPES_ENV, previous_scopes)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of the training stream's order and augmentation for a run (re)started at `epoch`: the run's
    own at 0; another one, fixed by both, for a resumed run (its fresh pipeline would otherwise replay epoch
    0's order and augmentations from its first epoch on)."""
    return seed if epoch <= 0 else (seed * 1_000_003 + epoch) % (2**31 - 1)


def _load_data(cfg: TrainConfig, cluster: Optional[Cluster] = None, start_epoch: int = 0) -> _Data:
    """The dataset's splits as training (augmented), validation and test pipelines; the training stream
    seeded by `epoch_seed(cfg.seed, start_epoch)`, the hold-out by cfg.seed."""
    cluster = cluster or Cluster()
    stream_seed = epoch_seed(cfg.seed, start_epoch)
    splits = kdata.load(cfg.dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, data_dir=cfg.data_dir,
                        skip_bad_images=cfg.skip_bad_images, worker=file_share(cluster, cfg.dataset),
                        shuffle_seed=stream_seed)
    channels = 1 if splits.image_shape[-1] == 1 else 3
    vit_cfg = cfg.vit_config(splits.num_classes, channels)
    opts = dict(image_size=vit_cfg.image_size, batch_size=cfg.batch_size, num_classes=splits.num_classes,
                channels=channels, seed=cfg.seed)
    train_ds = kdata.pipeline(splits.train, training=True, augment=cfg.augment, mixup=cfg.mixup,
                              cutmix=cfg.cutmix, **{**opts, "seed": stream_seed})
    steps = int(train_ds.cardinality())
    if steps < 1 and splits.sizes:  # skipped bad files or record shards: the listed count
        steps = splits.sizes[0] // cfg.batch_size
    elif steps < 1:
        steps = sum(1 for _ in train_ds)
    if steps < 1:
        count = splits.sizes[0] if splits.sizes else sum(1 for _ in splits.train)  # a small split: cheap
        raise TrainError(f"batch size {cfg.batch_size} is larger than the training split ({count} images); "
                         "use a smaller --batch-size")
    endless = uneven_shares(cluster, cfg.dataset)
    if endless:  # pass after pass of this worker's share; every worker takes `steps` per epoch
        train_ds = train_ds.repeat()
    train_ds, val_ds, test_ds = shard_datasets(cluster, cfg.dataset, cfg.batch_size, train_ds,
                                               kdata.pipeline(splits.val, **opts), kdata.pipeline(splits.test, **opts))
    return _Data(splits, vit_cfg, train_ds, val_ds, test_ds, steps, steps if endless else None)


def _start_run(cfg: TrainConfig, data: _Data, output: Optional[str], root: str, mixed: str, jit: str) -> str:
    """Create the run folder with config.json and class_names.json."""
    run = new_run_dir(cfg, output, root)
    write_json(os.path.join(run, "config.json"), {
        "train": cfg.to_dict(), "model": data.vit_cfg.to_dict(), "class_names": data.splits.class_names,
        "command": sys.argv, "cwd": os.getcwd(), "keras": keras.__version__, "backend": keras.backend.backend(),
        "resolved": {"mixed_precision": mixed, "jit_compile": jit}, "towers": towers.count(),
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
            _check_backbone_loaded(cfg, report)
        elif cfg.freeze_backbone or cfg.lora_rank:
            print(f"no --weights: {'--freeze-backbone' if cfg.freeze_backbone else '--lora'} trains on a randomly "
                  "initialised backbone (give --weights CHECKPOINT to fine-tune a trained one)")
        if cfg.freeze_backbone:
            from keras_vit.finetune import freeze_backbone

            freeze_backbone(model)
        if cfg.lora_rank:
            from keras_vit.finetune import lora_finetune

            lora_finetune(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        model.compile(
            optimizer=clip_summed_gradients(make_optimizer(cfg, data.steps, model=model)),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing),
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                     keras.metrics.TopKCategoricalAccuracy(k=min(5, num_classes), name="top5")],
            jit_compile=precision.keras_jit_compile(jit) and not precision.mirrored_on_cpus())
        # Now, not in the first trace of the train step (where Keras builds it when no strategy is
        # set): a tf.function that creates variables is traced twice, 6-8 s of the digits demo.
        model.optimizer.build(model.trainable_variables)
    return model


def _check_backbone_loaded(cfg: TrainConfig, report: dict) -> None:
    """Fine-tuning starts from the file's backbone: every backbone variable must come from --weights (as
    Keras' load_weights and timm's load_checkpoint are strict), else the run would train, and with
    --freeze-backbone or --lora keep, random weights there while saying it started from the file."""
    from keras_vit.finetune import HEAD_LAYERS

    missing = [p for p in report["skipped"] if p.split("/")[0] not in HEAD_LAYERS]
    if missing:
        what = ("--freeze-backbone would train on them untrained" if cfg.freeze_backbone else
                "--lora would train on them untrained" if cfg.lora_rank else "they would start untrained")
        total = len(missing) + len([p for p in report["loaded"] if p.split("/")[0] not in HEAD_LAYERS])
        raise TrainError(f"--weights {cfg.weights}: {len(missing)} of the backbone's {total} variables do not fit this "
                         f"model (e.g. {missing[0]}), and {what}; build the file's model (leave out the size options "
                         "to take it, or give its sizes: --hidden-size, --num-layers, --num-heads, --mlp-dim, "
                         "--image-size, --model-option)")


def build_without_data(model: keras.Model, train_ds) -> None:
    """Under a tf.distribute strategy Keras' fit (and evaluate) builds the model's metrics from a
    batch drawn from a new iterator of the data before training: that iterator would advance the
    training split's seeded reshuffle, so a cluster's first epoch would take one process's second
    epoch order (and every later epoch one ahead). Here they are built from the batches' spec."""
    if getattr(model, "_distribute_strategy", None) is None or not hasattr(model, "_maybe_symbolic_build"):
        return  # no strategy: Keras builds them in the first traced step, from the step's own batch
    spec = train_ds.element_spec
    keras_build = model._maybe_symbolic_build

    def from_spec(iterator=None, data_batch=None):
        return keras_build(data_batch=spec if data_batch is None else data_batch)

    model._maybe_symbolic_build = from_spec


def _callbacks(run: str, resume: bool, cluster: Optional[Cluster] = None,
               checkpoint_interval: float = 0.0) -> List[keras.callbacks.Callback]:
    """NaN stop, metrics.csv, TensorBoard, atomic checkpoints and the resumable backup (kept by
    the chief only in a TensorFlow cluster; the other workers follow the chief's restored state).
    One process saves at most every `checkpoint_interval` seconds; a cluster saves every epoch (its
    workers must agree on which epoch a backup holds)."""
    cluster = cluster or Cluster()
    interval = 0.0 if cluster.multi_worker else checkpoint_interval
    backup = os.path.join(run, "backup")
    csv_path = os.path.join(run, "metrics.csv")
    best = None  # a resumed run's best.keras is beaten only by a better epoch than those before
    if resume:
        epochs = backup_epoch(backup)
        trim_csv(csv_path, epochs)
        trim_events(os.path.join(run, "logs"), epochs)
        done = read_metrics_csv(csv_path).get("val_accuracy") if os.path.isfile(csv_path) else None
        best = max(done) if done and os.path.isfile(os.path.join(run, "best.keras")) else None
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        LearningRateLogger(),
        keras.callbacks.CSVLogger(csv_path, append=True),
        keras.callbacks.TensorBoard(os.path.join(run, "logs"), write_graph=False, profile_batch=0),
        atomic_checkpoint(run, monitor="val_accuracy", interval=interval, best=best),
    ]
    # JAX processes save in lockstep (saving creates variables, and each is checked equal on
    # every process), so there each worker keeps a backup; on TensorFlow only the chief does.
    if cluster.is_chief or cluster.backend == "jax":
        # Last, so that everything above is on disk before an epoch counts as done.
        # Kept when fit ends: train() removes it once model.keras and results.json are written (a kill in
        # between then resumes from the last epoch, not from scratch).
        callbacks.append(PacedBackup(backup, interval, delete_checkpoint=False))
    if cluster.multi_worker and cluster.backend == "tensorflow":
        callbacks.append(FollowChief(cluster))
    return callbacks
