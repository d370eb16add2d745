"""`vitcli train`, `vitcli evaluate`, `vitcli predict`. TensorFlow/Keras load inside the commands."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Optional, Sequence

import click

from keras_vit.cli.common import (
    MODEL_OPTION_HELP,
    ImageSize,
    UserError,
    check_writable,
    parse_model_options,
    sigterm_cleans_up,
    user_errors,
)
from keras_vit.errors import first_line
from keras_vit.train.cluster_env import JAX_ENV

_DATASET_HELP = ("digits (offline), cifar10, cifar100, mnist, fashion_mnist, tfds:NAME, "
                 "folder:PATH (PATH/<class>/*.jpg or PATH/train, PATH/val), "
                 "records:DIR or records:GLOB (TFRecord shards, see vitcli records).")


@click.command("train")
@click.option("--dataset", default="digits", show_default=True, help=_DATASET_HELP)
@click.option("--variant", default=None, help="Model, e.g. Ti/4, S/16, R50+B/16 [default: per dataset; digits: a small Ti/4 at 16px].")
@click.option("--image-size", type=ImageSize(), default=None,
              help="Input side in pixels, or HEIGHTxWIDTH [default: per dataset; with --weights alone, the checkpoint's].")
@click.option("--hidden-size", type=int, default=None, help="Override the variant's width D.")
@click.option("--num-layers", type=int, default=None, help="Override the variant's depth L.")
@click.option("--num-heads", type=int, default=None, help="Override the variant's heads.")
@click.option("--mlp-dim", type=int, default=None, help="Override the variant's MLP size.")
@click.option("--recipe", type=click.Choice(["scratch", "finetune"]), default=None,
              help="scratch: AdamW, warm-up + cosine, weight decay, label smoothing, augmentation. "
                   "finetune: SGD momentum 0.9, cosine, no weight decay.  [default: scratch]")
@click.option("--epochs", type=int, default=None, help="Epochs [default: per dataset].")
@click.option("--batch-size", type=int, default=None, help="Global batch size [default: per dataset].")
@click.option("--lr", "learning_rate", type=float, default=None, help="Peak learning rate [default: per recipe].")
@click.option("--weight-decay", type=float, default=None)
@click.option("--warmup-epochs", type=float, default=None)
@click.option("--label-smoothing", type=float, default=None)
@click.option("--clipnorm", type=float, default=None, help="Gradient clipping at this global norm [default: 1].")
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), default=None)
@click.option("--augment", type=click.Choice(["none", "light", "affine", "basic", "randaugment", "inception"]), default=None,
              help="Augmentation [default: per dataset].")
@click.option("--mixup", type=float, default=None, help="MixUp alpha (0 = off).")
@click.option("--cutmix", type=float, default=None, help="CutMix factor (0 = off).")
@click.option("--dropout", "dropout_rate", type=float, default=None)
@click.option("--drop-path", "drop_path_rate", type=float, default=None)
@click.option("--mixed-precision", type=click.Choice(["auto", "none", "mixed_bfloat16", "mixed_float16"]), default=None,
              help="auto: mixed_bfloat16 on a CPU with native bf16 (AVX512-BF16/AMX) when the step is large "
                   "enough to gain, else float32.  [default: auto]")
@click.option("--jit", "jit_compile", type=click.Choice(["auto", "xla", "fusible", "scoped", "none"]), default=None,
              help="xla: compile the whole train step; fusible (TensorFlow): oneDNN matmuls, XLA-fused "
                   "element-wise ops; scoped (TensorFlow: bf16/fp16, and float32 on AMX): oneDNN matmuls, XLA only "
                   "around the blocks' LayerNorms and GELU; auto: for bf16 on a CPU scoped on AMX and AMD Zen 4 / Zen 5 "
                   "(on AMX float32 too), fusible on other CPUs, none on PyTorch, else xla.  [default: auto]")
@click.option("--no-jit", "jit_compile", flag_value="none", hidden=True, help="Same as --jit none.")
@click.option("--grad-accum", type=int, default=None, help="Accumulate gradients over this many batches.")
@click.option("--distribute", type=click.Choice(["auto", "none", "mirrored"]), default=None,
              help="auto: MultiWorkerMirrored from TF_CONFIG, Mirrored over >1 GPU, DataParallel on JAX.")
@click.option("--weights", default=None, help="Initial weights: a checkpoint (.npz, timm/Hugging Face .safetensors, a model "
                   "folder, published name, hf://ORG/NAME) or a keras-vit .keras (its head too when the sizes match). "
                   "A checkpoint without --variant or size options sets the model (DINOv2, SigLIP, DeiT ... options).")
@click.option("--freeze-backbone", is_flag=True, default=None,
              help="Linear probe: train only the head; every other weight stays exactly as loaded (use with --weights).")
@click.option("--lora", "lora_rank", type=int, default=None, metavar="RANK",
              help="LoRA fine-tuning: rank-RANK adapters on each block's attention query and value (or --lora-targets); only they and "
                   "the head train (use with --weights). model.keras has them merged into the kernels.")
@click.option("--lora-alpha", type=float, default=None, metavar="ALPHA",
              help="LoRA scale numerator: the adapters add (ALPHA / RANK) A B to each kernel (peft's lora_alpha) "
                   "[default: RANK].")
@click.option("--lora-targets", callback=lambda ctx, param, value: None if value is None else [t.strip() for t in value.split(",")],
              default=None, metavar="NAMES", help="Comma-separated LoRA targets among query, key, value (the attention's "
                                                  "projections) and mlp (its two Dense layers) [default: query,value].")
@click.option("--layer-decay", type=float, default=None, metavar="R",
              help="Layer-wise learning-rate decay R in (0, 1]: block i of L trains at R^(L-i) of the head's rate, "
                   "the embeddings at R^(L+1) (BEiT/MAE fine-tuning).")
@click.option("--ema", type=float, default=None, metavar="MOMENTUM",
              help="Keep an exponential moving average of the weights (e.g. 0.999) and end with it: model.keras "
                   "and the test metrics use the average [default: off].")
@click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE", help=MODEL_OPTION_HELP)
@click.option("--seed", type=int, default=None, help="Seed for data order, augmentation and initialisation [default: 0].")
@click.option("--val-fraction", type=float, default=None, help="Training data held out for validation [default: 0.1].")
@click.option("--data-dir", default=None, help="tensorflow-datasets data folder (datasets prepared there are used as they are).")
@click.option("--skip-bad-images", is_flag=True, default=None,
              help="Skip image files that do not decode (counted, listed in the run's bad_images.txt) instead of failing.")
@click.option("--checkpoint-interval", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="Seconds between epoch-end checkpoints (last/best.keras, the backup --resume uses); 0 = every "
                   "epoch; the last epoch is always saved [default: 10].")
@click.option("--output", default=None, help="Run folder [default: runs/<dataset>-<variant>-<time>, linked as runs/latest].")
@click.option("--resume", is_flag=True, help="Continue the run in --output (default runs/latest) from its last epoch.")
@click.option("--peer-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Multi-worker: seconds to wait for the other workers (start-up, each exchange) "
                   "[default: $KERAS_VIT_PEER_TIMEOUT or 300].")
@user_errors
def train_cmd(dataset: str, output: Optional[str], resume: bool, peer_timeout: Optional[float], **options) -> None:
    """Train a ViT with model.fit on a tf.data pipeline; writes a run folder."""
    if options.get("jit_compile") in ("xla", "fusible"):  # before anything imports keras_vit.model
        from keras_vit.train.towers import keep_threads_for

        keep_threads_for(options["jit_compile"])
    from keras_vit import train as ktrain
    from keras_vit.weights.checkpoints import reading_once

    model = parse_model_options(options.pop("model_options"))
    if model:
        options["model"] = model
    if resume:
        flags = {"model": "--model-option"}  # each option's own flag (--lora for lora_rank, --jit for jit_compile)
        for param in click.get_current_context().command.params:
            if isinstance(param, click.Option) and not param.hidden:
                flags.setdefault(param.name, max(param.opts, key=len))
        given = sorted(flags.get(k, "--" + k.replace("_", "-")) for k, v in options.items() if v is not None)
        if click.get_current_context().get_parameter_source("dataset") != click.core.ParameterSource.DEFAULT:
            given = sorted(given + ["--dataset"])  # a default of its own: given only when the user typed it
        if given:
            raise UserError(f"--resume continues a run with its saved options; drop {', '.join(given)}")
    cfg = None
    with reading_once():  # --weights CHECKPOINT: its file read once, for the config, the model's size and the weights
        if not resume:
            cfg = ktrain.make_config(dataset, options.pop("recipe") or "scratch", **options)
        # One process: SIGTERM cleans up as Ctrl-C does (temporary files, a run folder with no epoch). A cluster
        # worker keeps the default: blocked in a collective, it would not stop until its peers answer.
        alone = not os.environ.get("TF_CONFIG") and not any(os.environ.get(k) for k in JAX_ENV)
        try:
            with sigterm_cleans_up() if alone else contextlib.nullcontext():
                result = ktrain.train(cfg, output=output, resume=resume, peer_timeout=peer_timeout)
        except ktrain.PeerLostError as exc:
            _rejoin(str(exc))
            raise
        except ktrain.ClusterError as exc:
            if any(os.environ.get(k) for k in JAX_ENV):  # jax.distributed's shutdown barrier at exit would wait for
                from keras_vit.cli import quiet  # the lost peer, then abort with a stack dump

                quiet.release()  # stderr back from the filter, which exit would have drained
                click.echo(f"Error: {first_line(exc)}", err=True)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            raise
    t = result["test"]
    smoothing = f" with label smoothing {t['label_smoothing']:g}" if t.get("label_smoothing") else ""
    click.echo(f"test top-1 {t['top1']:.4f}  top-5 {t['top5']:.4f}  loss{smoothing} {t['loss']:.4f}  "
               f"({result['epochs']} epochs, {result['train_seconds']:.0f} s of training"
               + (f", {result['bad_images']} bad images skipped" if result.get("bad_images") else "") + ")")
    if result["workers"] > 1:
        click.echo(f"worker {result['worker']} of {result['workers']}: weights {result['weights_digest']}")
    if result["run"] is None:
        click.echo("the chief (worker 0) wrote the run folder")
    else:
        click.echo(f"run folder: {result['run']}")


REJOIN_ENV = "KERAS_VIT_REJOINS"
MAX_REJOINS = 3


def _rejoin(reason: str) -> None:
    """Start this worker again with its own command line after a peer stopped: it waits (up to the
    peer timeout) for the peer to come back, then the cluster continues from the last completed
    epoch. Gives up after MAX_REJOINS restarts in a row (the caller then reports `reason`)."""
    done = int(os.environ.get(REJOIN_ENV, "0") or 0)
    if done >= MAX_REJOINS:
        return
    os.environ[REJOIN_ENV] = str(done + 1)
    from keras_vit.cli import quiet

    quiet.release()
    click.echo(f"{reason.split(';')[0]}; restarting to rejoin the cluster ({done + 1}/{MAX_REJOINS})", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", "from keras_vit.cli.main import main; main()", *sys.argv[1:]])


_MODEL_HELP = ("A .keras model, a run folder, or a checkpoint: a published name such as "
               "B/16-augreg-i21k-ft-in1k (downloaded once, cached), hf://ORG/NAME, an .npz or .safetensors file.")


def _load(model: str):
    """(path, model) for a .keras file or run folder, or a model built from a checkpoint."""
    from keras_vit import train as ktrain
    from keras_vit.saving import load_model
    from keras_vit.weights.checkpoints import is_checkpoint

    if is_checkpoint(model):
        from keras_vit.vit import ViT

        return model, ViT(weights=model)
    path = ktrain.model_path(model)
    return path, load_model(path, compile=False)


@click.command("evaluate")
@click.option("--model", "model_arg", required=True, help=_MODEL_HELP)
@click.option("--dataset", default="digits", show_default=True, help=_DATASET_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seed", type=int, default=None,
              help="Seed of the hold-out that is scored when the dataset is the model's own training folder or "
                   "shards without a test split [default: the run's seed, else 0].")
@click.option("--skip-bad-images", is_flag=True,
              help="Skip image files that cannot be decoded (counted in the output and named on stderr).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: loss, top1, top5, per_class, count, confusion_matrix.")
@click.option("--plot", is_flag=True,
              help="Also write the confusion matrix as a PNG beside the model (confusion_<dataset>.png).")
@user_errors
def evaluate_cmd(model_arg: str, dataset: str, batch_size: int, seed: Optional[int], skip_bad_images: bool,
                 as_json: bool, plot: bool) -> None:
    """Loss, top-1, top-5 and per-class accuracy on the dataset's test split: a folder of class
    sub-folders is scored whole, unless the model trained on it (then its held-out test split)."""
    from keras_vit import data as kdata
    from keras_vit import train as ktrain
    from keras_vit.model import get_config
    from keras_vit.plots import plot_confusion_matrix

    path, model = _load(model_arg)
    png = os.path.join(os.path.dirname(os.path.abspath(path)), f"confusion_{kdata.slug(dataset)}.png")
    if plot:  # before the evaluation's minutes
        check_writable(png, "--plot")
    run = ktrain.read_run(path) if os.path.exists(path) else ktrain.RunInfo()
    own = run.dataset is not None and ktrain.same_dataset(run.dataset, dataset)  # the run's own held-out test
    seed = seed if seed is not None else run.seed if own and run.seed is not None else 0
    splits = kdata.load(dataset, seed=seed, val_fraction=run.val_fraction if own and run.val_fraction else 0.1,
                        skip_bad_images=skip_bad_images, evaluation=not own)
    model_names = ktrain.class_names_for(path, get_config(model).num_classes, model)
    result = ktrain.evaluate(model, splits.test, splits.class_names, batch_size=batch_size,
                             model_class_names=model_names)
    if splits.bad_images is not None:
        result["bad_images"] = len(splits.bad_images)
        result["bad_image_paths"] = list(splits.bad_images.paths)
    if plot:
        plot_confusion_matrix(result["confusion_matrix"], model_names, png,
                              title=f"{dataset} test: top-1 {result['top1']:.4f}")
        click.echo(f"confusion matrix: {png}", err=as_json)
    if as_json:
        click.echo(json.dumps(result))
        return
    skipped = f", {result['bad_images']} bad files skipped" if result.get("bad_images") else ""
    click.echo(f"{dataset} test ({result['count']} images{skipped}): loss {result['loss']:.4f}  "
               f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}")
    for name, acc in result["per_class"].items():
        click.echo(f"  {name:<20} {acc:.4f}")
    for path in result.get("bad_image_paths", [])[:20]:  # as train's bad_images.txt names them
        click.echo(f"skipped: {path}", err=True)
    if len(result.get("bad_image_paths", [])) > 20:
        click.echo(f"skipped: ... and {len(result['bad_image_paths']) - 20} more (--json lists every one)", err=True)


@click.command("predict")
@click.option("--model", "model_arg", required=True, help=_MODEL_HELP)
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@user_errors
def predict_cmd(model_arg: str, top_k: int, images: Sequence[str]) -> None:
    """Top-k class names with probabilities for each IMAGE, one line each."""
    from keras_vit import train as ktrain
    from keras_vit.model import get_config

    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise UserError(f"image file {missing[0]!r} does not exist")
    path, model = _load(model_arg)
    names = ktrain.class_names_for(path, get_config(model).num_classes, model)
    for p, top in zip(images, ktrain.predict_images(model, images, names, top_k)):
        click.echo(f"{p}: " + ", ".join(f"{n} {prob:.3f}" for n, prob in top))
