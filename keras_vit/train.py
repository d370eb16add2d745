"""Training recipes and the fit/evaluate glue: optimizer + schedule + callbacks around `model.fit`.

`make_config(dataset, recipe, **overrides)` gives a TrainConfig (a recipe, the dataset's
defaults, then your overrides); `train(cfg)` runs it into a run folder with checkpoints,
metrics.csv, TensorBoard logs and a resumable backup; `evaluate` and `predict_images` read a
trained model the same way `vitcli evaluate` / `vitcli predict` do.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from keras_vit import precision
from keras_vit.precision import JIT_MODES, MIXED_PRECISION

# Recipes (paper Appendix B, and the usual small-data ViT settings for "scratch").
RECIPES: Dict[str, Dict[str, Any]] = {
    "scratch": dict(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05, momentum=0.9,
                    warmup_epochs=3.0, label_smoothing=0.1, clipnorm=1.0, augment="basic",
                    mixup=0.0, cutmix=0.0, dropout_rate=0.0, drop_path_rate=0.1),
    "finetune": dict(optimizer="sgd", learning_rate=0.01, weight_decay=0.0, momentum=0.9,
                     warmup_epochs=0.5, label_smoothing=0.0, clipnorm=1.0, augment="light",
                     mixup=0.0, cutmix=0.0, dropout_rate=0.0, drop_path_rate=0.0),
}
# Per-dataset defaults: the model used when no --variant is given, its image size, and the
# schedule length. digits: a small custom ViT (16 tokens: 4x4 patches at 16px, each 2x2 of the
# original 8x8 pixels) that trains in minutes on a 2-core CPU; 16 tokens of 4x4 learnt faster and
# generalised better than 64 tokens of 2x2 at equal cost; augmentation slowed learning and
# dropout 0.1 did not help on average at this budget; 80 epochs rather than 40 put every seed
# tried (0-3) at >= 98% test top-1 in about 75 s of training (see BENCHMARKS.md).
_SMALL = dict(variant="Ti/4", image_size=32, epochs=100, batch_size=128)
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "digits": dict(variant="Ti/4", image_size=16, epochs=80, batch_size=32, augment="none",
                   drop_path_rate=0.0,
                   model=dict(hidden_size=128, num_layers=4, num_heads=4, mlp_dim=256)),
    "mnist": dict(_SMALL, image_size=28, epochs=30, augment="light"),
    "fashion_mnist": dict(_SMALL, image_size=28, epochs=30, augment="light"),
    "cifar10": dict(_SMALL),
    "cifar100": dict(_SMALL),
    "*": dict(variant="Ti/16", image_size=224, epochs=30, batch_size=64, augment="inception"),
}
MODEL_FIELDS = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "classifier", "pos_embedding",
                "representation_size")
OPTIMIZERS = ("adamw", "adam", "sgd")
DISTRIBUTE = ("auto", "none", "mirrored")
RUNS_DIR = "runs"


class TrainError(ValueError):
    """A training option or run folder that cannot be used (one clear line for the CLI)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything needed to repeat a run (written to the run folder as config.json)."""

    dataset: str = "digits"
    recipe: str = "scratch"
    variant: str = "Ti/4"
    image_size: int = 16
    model: Dict[str, Any] = dataclasses.field(default_factory=dict)  # ViTConfig overrides
    epochs: int = 30
    batch_size: int = 32
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 3.0
    label_smoothing: float = 0.1
    clipnorm: Optional[float] = 1.0
    augment: str = "basic"
    mixup: float = 0.0
    cutmix: float = 0.0
    dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    mixed_precision: str = "auto"  # auto: bf16 where the CPU has it natively and the step is big (precision.py)
    jit_compile: Any = "auto"  # auto | xla | fusible | none (True = xla, False = none)
    grad_accum: int = 1
    distribute: str = "auto"
    seed: int = 0
    val_fraction: float = 0.1
    weights: Optional[str] = None
    data_dir: Optional[str] = None

    def validate(self) -> "TrainConfig":
        """Raise TrainError naming the bad value and what is allowed."""
        if self.recipe not in RECIPES:
            raise TrainError(f"unknown recipe {self.recipe!r}; allowed: {', '.join(RECIPES)}")
        for name in ("epochs", "batch_size", "grad_accum", "image_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainError(f"{name} must be a positive integer, got {v!r}")
        for name in ("learning_rate", "weight_decay", "warmup_epochs", "label_smoothing", "mixup", "cutmix"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise TrainError(f"{name} must be a number >= 0, got {v!r}")
        if self.learning_rate <= 0:
            raise TrainError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.label_smoothing >= 1:
            raise TrainError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.clipnorm is not None and self.clipnorm <= 0:
            raise TrainError(f"clipnorm must be > 0 (or None for no clipping), got {self.clipnorm!r}")
        choices = dict(optimizer=OPTIMIZERS, mixed_precision=MIXED_PRECISION, distribute=DISTRIBUTE)
        if not isinstance(self.jit_compile, bool) and self.jit_compile not in JIT_MODES:
            raise TrainError(f"jit_compile must be one of {', '.join(JIT_MODES)} (or true/false); got {self.jit_compile!r}")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise TrainError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        from keras_vit.data import AUGMENTS

        if self.augment not in AUGMENTS:
            raise TrainError(f"unknown augmentation {self.augment!r}; allowed: {', '.join(AUGMENTS)}")
        if self.weights is not None and self.weights.endswith((".npz", ".keras")) and not os.path.isfile(self.weights):
            raise TrainError(f"weights file {self.weights!r} does not exist")
        self.vit_config(num_classes=2, channels=3)  # image size vs patch, head counts ...
        return self

    def vit_config(self, num_classes: int, channels: int):
        """The ViTConfig this run trains."""
        from keras_vit.config import parse_variant

        try:
            return parse_variant(self.variant, image_size=self.image_size, num_classes=num_classes,
                                 channels=channels, dropout_rate=self.dropout_rate,
                                 drop_path_rate=self.drop_path_rate, **self.model)
        except ValueError as exc:
            raise TrainError(str(exc)) from None

    def label(self) -> str:
        """Short variant label for run folder names, e.g. "Ti_4-d128-l4-h4-m256"."""
        text = self.variant.replace("/", "_").replace("+", "_")
        extra = {"hidden_size": "d", "num_layers": "l", "num_heads": "h", "mlp_dim": "m"}
        return text + "".join(f"-{extra[k]}{v}" for k, v in self.model.items() if k in extra)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training options {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def make_config(dataset: str = "digits", recipe: str = "scratch", **overrides) -> TrainConfig:
    """A TrainConfig from a recipe, then the dataset's defaults, then `overrides` (None = keep).

    Giving `variant` drops the dataset's default model size overrides (its `model` dict).
    Model-size keys (hidden_size, num_layers, num_heads, mlp_dim, ...) may be given directly.
    """
    if recipe not in RECIPES:
        raise TrainError(f"unknown recipe {recipe!r}; allowed: {', '.join(RECIPES)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    key = dataset if dataset in DATASET_DEFAULTS else "*"
    defaults = dict(DATASET_DEFAULTS[key])
    fields = dict(RECIPES[recipe])
    if recipe == "finetune":  # the dataset's augmentation is for training from scratch
        defaults.pop("augment", None)
        defaults.pop("drop_path_rate", None)
    model = dict(defaults.pop("model", {}))
    if "variant" in overrides:
        model = {}
    fields.update(defaults)
    model.update(overrides.pop("model", None) or {})
    for k in MODEL_FIELDS:
        if k in overrides:
            model[k] = overrides.pop(k)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TrainError(f"unknown training options {unknown}; allowed: {sorted(known | set(MODEL_FIELDS))}")
    fields.update(overrides)
    return TrainConfig(dataset=dataset, recipe=recipe, model=model, **fields).validate()


# --- building blocks -------------------------------------------------------------------------

def make_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    """The recipe's optimizer: linear warm-up then cosine decay (per step), clipping at global
    norm `clipnorm`, decoupled weight decay, optional gradient accumulation."""
    import keras

    updates_per_epoch = max(1, steps_per_epoch // cfg.grad_accum)
    total = max(1, cfg.epochs * updates_per_epoch)
    warmup = min(int(round(cfg.warmup_epochs * updates_per_epoch)), total - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else cfg.learning_rate, decay_steps=total - warmup,
        alpha=0.0, warmup_target=cfg.learning_rate if warmup else None, warmup_steps=warmup)
    common = dict(learning_rate=schedule, global_clipnorm=cfg.clipnorm,
                  gradient_accumulation_steps=cfg.grad_accum if cfg.grad_accum > 1 else None)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=cfg.weight_decay, **common)
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(**common)
    return keras.optimizers.SGD(momentum=cfg.momentum, weight_decay=cfg.weight_decay or None, **common)


def distribution_scope(kind: str = "auto"):
    """A context for building the model: a tf.distribute strategy on TensorFlow
    (MultiWorkerMirrored from TF_CONFIG, Mirrored over several GPUs, or over every visible
    device with kind="mirrored"), keras.distribution.DataParallel on JAX; else a no-op."""
    import contextlib

    import keras

    if kind == "none":
        return contextlib.nullcontext()
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if os.environ.get("TF_CONFIG"):
            return tf.distribute.MultiWorkerMirroredStrategy().scope()
        gpus = tf.config.list_logical_devices("GPU")
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy().scope()
        if kind == "mirrored":
            devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
            return tf.distribute.MirroredStrategy(devices).scope()
        return contextlib.nullcontext()
    if backend == "jax":
        import jax

        if len(jax.devices()) > 1 or kind == "mirrored":
            keras.distribution.set_distribution(keras.distribution.DataParallel())
    return contextlib.nullcontext()


def replicas(model) -> int:
    """How many devices a compiled model trains on (tf.distribute replicas, or the JAX
    DataParallel mesh)."""
    import keras

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is not None:
        return int(strategy.num_replicas_in_sync)
    dist = keras.distribution.distribution()
    return len(dist.device_mesh.devices.reshape(-1)) if dist is not None else 1


def _op_error_line(exc) -> str:
    """The informative line of a TensorFlow op error (not the 'Graph execution error' banner)."""
    lines = [ln.strip() for ln in str(getattr(exc, "message", exc)).splitlines()]
    useful = [ln for ln in lines if ln and not ln.startswith(("File ", "Detected at", "[[", "Graph execution", "Cf. "))]
    return useful[-1] if useful else type(exc).__name__


def load_initial_weights(model, path: str) -> Dict[str, List[str]]:
    """Initialise `model` from a checkpoint: a .npz (or a published checkpoint name) goes to
    keras_vit.weights.load_npz; a .keras is copied variable by variable where the paths (keras_vit
    layer names) and shapes match, skipping the classification head, so encoders from other heads
    (pre-training) load too. Returns {"loaded": [...], "skipped": [...]}."""
    path = os.fspath(path)
    if not path.endswith(".keras"):
        try:
            from keras_vit.weights import load_npz
        except ImportError:
            raise TrainError(f"weights {path!r}: .npz checkpoints need keras_vit.weights, not in this build") from None
        load_npz(model, path)  # raises on any misfit; a head of another size stays initialised
        return {"loaded": [v.path for v in model.weights], "skipped": [], "npz": True}
    import keras

    import keras_vit.layers  # noqa: F401  (registers the custom layers)
    import keras_vit.vit  # noqa: F401

    if not os.path.isfile(path):
        raise TrainError(f"weights file {path!r} does not exist")
    try:
        source = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001
        raise TrainError(f"could not read {path!r} as a keras-vit model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    source = _resized_source(source, model)
    by_path = {v.path: v for v in source.weights}
    loaded, skipped = [], []
    for var in model.weights:
        src = by_path.get(var.path)
        if var.path.startswith("head/") or src is None or tuple(src.shape) != tuple(var.shape):
            skipped.append(var.path)
            continue
        var.assign(keras.ops.cast(src.value, var.dtype))
        loaded.append(var.path)
    if not loaded:
        raise TrainError(f"no weights of {path!r} fit this model (no layer with the same name and shape)")
    return {"loaded": loaded, "skipped": skipped}


def _resized_source(source, target):
    """The source resized to the target's image size when both are keras-vit models at different
    resolutions and keras_vit.resize_model (the checkpoint issue) is available."""
    from keras_vit.vit import VisionTransformer

    if not (isinstance(source, VisionTransformer) and isinstance(target, VisionTransformer)):
        return source
    if source.vit_config.image_size == target.vit_config.image_size:
        return source
    try:
        from keras_vit import resize_model
    except (ImportError, AttributeError):
        return source
    return resize_model(source, image_size=target.vit_config.image_size)


def atomic_checkpoint(folder: str, monitor: str = "val_accuracy"):
    """A Keras callback saving the model each epoch as `last.keras` and, when `monitor` improves,
    as `best.keras` - each written to a temporary name and renamed, so a kill mid-write never
    leaves a truncated checkpoint (keras.callbacks.ModelCheckpoint writes in place)."""
    import keras

    class _Checkpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = -np.inf

        def on_epoch_end(self, epoch, logs=None):
            save_atomic(self.model, os.path.join(folder, "last.keras"))
            value = (logs or {}).get(monitor)
            if value is not None and value > self.best:
                self.best = value
                save_atomic(self.model, os.path.join(folder, "best.keras"))

    return _Checkpoint()


def save_atomic(model, path: str) -> None:
    """model.save to a temporary .keras name in the same folder, then rename into place."""
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    model.save(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
    """json.dump to a temporary name, then rename into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


# --- runs ------------------------------------------------------------------------------------

def new_run_dir(cfg: TrainConfig, output: Optional[str] = None, root: str = RUNS_DIR) -> str:
    """Create the run folder: `output`, or `root/<dataset>-<variant>-<time>` (+ `root/latest`)."""
    from keras_vit.data import slug

    if output:
        _check_output(output)
        os.makedirs(output, exist_ok=True)
        return output
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = os.path.join(root, f"{slug(cfg.dataset)}-{cfg.label()}-{stamp}")
    n = 1
    while os.path.exists(run):
        n += 1
        run = os.path.join(root, f"{slug(cfg.dataset)}-{cfg.label()}-{stamp}-{n}")
    os.makedirs(run)
    _link_latest(run, root)
    return run


def _check_output(output: Optional[str]) -> None:
    if output and os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise TrainError(f"output folder {output!r} already exists and is not empty; "
                         "choose another --output, or add --resume to continue that run")


def _link_latest(run: str, root: str) -> None:
    latest = os.path.join(root, "latest")
    tmp = f"{latest}.tmp-{os.getpid()}"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(os.path.basename(run), tmp)
        if os.path.isdir(latest) and not os.path.islink(latest):
            return  # a real folder named "latest": leave it alone
        os.replace(tmp, latest)
    except OSError:  # file systems without symlinks: no "latest"
        if os.path.lexists(tmp):
            os.remove(tmp)


def resolve_run_dir(path: Optional[str] = None, root: str = RUNS_DIR) -> str:
    """The run folder to resume: `path`, or `root/latest`."""
    run = path or os.path.join(root, "latest")
    if not os.path.isfile(os.path.join(run, "config.json")):
        raise TrainError(f"nothing to resume: {run!r} is not a run folder (no config.json)")
    return os.path.realpath(run)


def _backup_epoch(backup_dir: str) -> int:
    """Epochs completed according to BackupAndRestore's metadata (0 when there is none)."""
    try:
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            return int(json.load(f).get("epoch", 0))
    except (OSError, ValueError):
        return 0


def _trim_csv(path: str, epochs: int) -> None:
    """Keep the header and the rows of the first `epochs` epochs (a kill between the CSV row
    and the backup would otherwise repeat an epoch after resuming)."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return
    keep = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epochs]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def resolve_speed(cfg: TrainConfig) -> precision.Choice:
    """(mixed precision policy or "none", jit mode, reason) that `cfg` trains with on this machine.

    Resolves "auto" from the hardware (keras_vit.precision): on a TensorFlow CPU, bf16 + fusible
    when its bf16 GEMMs pay for the step, fp32 + whole-step XLA otherwise; bf16/fp16 + XLA on GPUs.
    """
    import keras

    backend = keras.backend.backend()
    # FLOPs barely depend on the class count, which is not known before the data is loaded.
    gflop = cfg.batch_size * cfg.vit_config(num_classes=10, channels=3).flops() / 1e9
    try:
        return precision.resolve(cfg.mixed_precision, cfg.jit_compile, gflop, backend,
                                 precision.detect_hardware(backend))
    except ValueError as exc:
        raise TrainError(str(exc)) from None


def train(cfg: TrainConfig, output: Optional[str] = None, resume: bool = False,
          root: str = RUNS_DIR, verbose: Any = "auto") -> Dict[str, Any]:
    """Train `cfg` into a run folder (or resume the one at `output` / `root/latest`).

    The folder gets config.json, class_names.json, metrics.csv, logs/ (TensorBoard),
    best.keras / last.keras each epoch, model.keras at the end and results.json (test metrics).
    """
    if resume:
        run = resolve_run_dir(output, root)
        with open(os.path.join(run, "config.json")) as f:
            saved = json.load(f)
        # a resumed run keeps the precision and compilation it started with, wherever it resumes
        cfg = TrainConfig.from_dict({**saved["train"], **saved.get("resolved", {})}).validate()
        if os.path.isfile(os.path.join(run, "model.keras")) and not os.path.isdir(os.path.join(run, "backup")):
            raise TrainError(f"run {run!r} has already finished (model.keras exists); nothing to resume")
    else:
        cfg.validate()
        _check_output(output)
    import keras
    import tensorflow as tf

    from keras_vit import data as kdata
    from keras_vit.vit import build_model

    # Before any TensorFlow work: the fusible mode sets XLA flags that TF reads once.
    mixed, jit, reason = resolve_speed(cfg)
    previous_xla_flags = os.environ.get("TF_XLA_FLAGS")
    if jit == "fusible":
        precision.request_fusible_clustering()
    keras.utils.set_random_seed(cfg.seed)
    previous_policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32" if mixed == "none" else mixed)
    try:
        splits = kdata.load(cfg.dataset, seed=cfg.seed, val_fraction=cfg.val_fraction, data_dir=cfg.data_dir)
        channels = 1 if splits.image_shape[-1] == 1 else 3
        vit_cfg = cfg.vit_config(splits.num_classes, channels)
        size = vit_cfg.image_size
        opts = dict(image_size=size, batch_size=cfg.batch_size, num_classes=splits.num_classes,
                    channels=channels, seed=cfg.seed)
        train_ds = kdata.pipeline(splits.train, training=True, augment=cfg.augment, mixup=cfg.mixup,
                                  cutmix=cfg.cutmix, **opts)
        val_ds = kdata.pipeline(splits.val, **opts)
        test_ds = kdata.pipeline(splits.test, **opts)
        steps = int(train_ds.cardinality())
        if steps < 1:
            steps = sum(1 for _ in train_ds)
        if steps < 1:
            raise TrainError(f"batch size {cfg.batch_size} is larger than the training split; use a smaller --batch-size")
        if not resume:  # the folder appears only once the dataset and options are known good
            run = new_run_dir(cfg, output, root)
            write_json_atomic(os.path.join(run, "config.json"), {
                "train": cfg.to_dict(), "model": vit_cfg.to_dict(), "class_names": splits.class_names,
                "command": sys.argv, "keras": keras.__version__, "backend": keras.backend.backend(),
                "resolved": {"mixed_precision": mixed, "jit_compile": jit},
                "created": datetime.datetime.now().isoformat(timespec="seconds")})
            write_json_atomic(os.path.join(run, "class_names.json"), splits.class_names)

        print(f"precision: {'float32' if mixed == 'none' else mixed}, compilation: {jit}"
              + (f" (auto: {reason})" if "auto" in (cfg.mixed_precision, cfg.jit_compile) else ""))
        with distribution_scope(cfg.distribute):
            model = build_model(vit_cfg)
            if cfg.weights:
                report = load_initial_weights(model, cfg.weights)
                if report.get("npz"):
                    print(f"initial weights: checkpoint {cfg.weights} (head kept when its size differs)")
                else:
                    print(f"initial weights: {len(report['loaded'])} variables from {cfg.weights}, "
                          f"{len(report['skipped'])} kept as initialised (head, new shapes)")
            model.compile(
                optimizer=make_optimizer(cfg, steps),
                loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=cfg.label_smoothing),
                metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"),
                         keras.metrics.TopKCategoricalAccuracy(k=min(5, splits.num_classes), name="top5")],
                jit_compile=precision.keras_jit_compile(jit) and not precision.mirrored_on_cpus())
        backup = os.path.join(run, "backup")
        csv_path = os.path.join(run, "metrics.csv")
        if resume:
            _trim_csv(csv_path, _backup_epoch(backup))
        callbacks = [
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.CSVLogger(csv_path, append=True),
            keras.callbacks.TensorBoard(os.path.join(run, "logs"), write_graph=False, profile_batch=0),
            atomic_checkpoint(run, monitor="val_accuracy"),
            # Last, so that everything above is on disk before an epoch counts as done.
            keras.callbacks.BackupAndRestore(backup, delete_checkpoint=True),
        ]
        if verbose == "auto":
            verbose = 1 if sys.stdout.isatty() else 2
        start = time.time()
        history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs, callbacks=callbacks,
                            verbose=verbose)
        seconds = time.time() - start
        if model.stop_training and any(np.isnan(v) for v in history.history.get("loss", [])):
            raise TrainError(f"training diverged (loss NaN); kept checkpoints in {run}; try a lower --lr")
        save_atomic(model, os.path.join(run, "model.keras"))
        test = dict(zip(["loss", "top1", "top5"], (float(v) for v in model.evaluate(test_ds, verbose=0))))
    except tf.errors.OpError as exc:  # e.g. an image that decodes badly mid-run
        raise TrainError(f"training failed: {_op_error_line(exc)}") from None
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if previous_xla_flags is None:  # child processes do not inherit the fusible flags
            os.environ.pop("TF_XLA_FLAGS", None)
        else:
            os.environ["TF_XLA_FLAGS"] = previous_xla_flags
    result = {"run": run, "test": test, "train_seconds": round(seconds, 1), "epochs": cfg.epochs,
              "params": int(model.count_params()), "resumed": bool(resume), "replicas": replicas(model),
              "mixed_precision": mixed, "jit_compile": jit,
              "last_epoch": {k: float(v[-1]) for k, v in history.history.items() if v}}
    write_json_atomic(os.path.join(run, "results.json"), result)
    return result


# --- reading trained models ------------------------------------------------------------------

def model_path(path: str) -> str:
    """A .keras file, or a run folder holding model.keras."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "model.keras")
        if not os.path.isfile(candidate):
            raise TrainError(f"{path!r} is a folder without model.keras (not a finished run)")
        return candidate
    return path


def class_names_for(path: str, num_classes: int) -> List[str]:
    """The class names stored next to a model (class_names.json in its run folder), else indices."""
    f = os.path.join(os.path.dirname(os.path.abspath(path)), "class_names.json")
    try:
        with open(f) as fh:
            names = json.load(fh)
        if isinstance(names, list) and len(names) == num_classes:
            return [str(n) for n in names]
    except (OSError, ValueError):
        pass
    return [str(i) for i in range(num_classes)]


def predict_logits(model, ds, batch_size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of a model over an unbatched (image, label) split, preprocessed exactly
    as in training (resize + channels, no augmentation)."""
    from keras_vit import data as kdata
    from keras_vit.vit import get_config

    vcfg = get_config(model)
    batched = kdata.pipeline(ds, image_size=vcfg.image_size, batch_size=batch_size, num_classes=vcfg.num_classes,
                             channels=vcfg.channels, one_hot=False)
    labels = np.concatenate([y.numpy() for _, y in batched])
    logits = model.predict(batched.map(lambda x, y: x), verbose=0)
    return np.asarray(logits, np.float32), labels.astype(np.int64)


def evaluate(model, ds, class_names: Sequence[str], batch_size: int = 128) -> Dict[str, Any]:
    """Loss, top-1, top-5 and per-class accuracy of `model` on a split, from `model.predict`."""
    logits, labels = predict_logits(model, ds, batch_size)
    n_cls = logits.shape[-1]
    if labels.size and labels.max() >= n_cls:
        raise TrainError(f"the dataset has labels up to {labels.max()} but the model has {n_cls} classes")
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    top1 = logits.argmax(-1) == labels
    k = min(5, n_cls)
    topk = (np.argsort(-logits, axis=-1)[:, :k] == labels[:, None]).any(-1)
    names = list(class_names) if len(class_names) == n_cls else [str(i) for i in range(n_cls)]
    per_class = {names[c]: float(top1[labels == c].mean()) for c in range(n_cls) if (labels == c).any()}
    return {"loss": loss, "top1": float(top1.mean()), "top5": float(topk.mean()), "per_class": per_class,
            "count": int(len(labels))}


def predict_images(model, paths: Sequence[str], class_names: Sequence[str], top_k: int = 5
                   ) -> List[List[Tuple[str, float]]]:
    """Top-k (class name, probability) for each image file, preprocessed as in training."""
    import tensorflow as tf

    from keras_vit import data as kdata
    from keras_vit.vit import get_config

    vcfg = get_config(model)
    images = []
    for p in paths:
        try:
            img = kdata.read_image(tf.constant(open(p, "rb").read()), from_bytes=True)
        except (OSError, tf.errors.OpError) as exc:
            raise TrainError(f"cannot read image {p}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        images.append(kdata.prepare_image(img, vcfg.image_size, vcfg.channels).numpy())
    logits = model.predict(np.stack(images), verbose=0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    k = max(1, min(top_k, probs.shape[-1]))
    return [[(class_names[i], float(row[i])) for i in np.argsort(-row)[:k]] for row in probs]
