"""`vitcli inspect`, `vitcli fewshot`, `vitcli pretrain`: the paper's analyses as commands.

Each command imports Keras/TensorFlow only inside its body (so `vitcli --help` stays light)
and turns bad input into one `Error: ...` line with a non-zero exit.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Tuple

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


# --- shared helpers -----------------------------------------------------------------------
def _load_model_arg(spec: str, image_size: Optional[Tuple[int, int]] = None, channels: int = 3,
                    include_top: Optional[bool] = None):
    """A .keras file written by keras-vit (or a run folder holding one), a checkpoint (published name, hf://ORG/NAME, .npz /
    .safetensors file or model folder: at its own image size and options), or a variant name
    (random initialisation, a baseline)."""
    from keras_vit.weights.checkpoints import is_checkpoint

    if is_checkpoint(spec):
        import keras_vit

        try:
            return keras_vit.ViT(weights=spec, channels=channels,
                                 **({} if include_top is None else {"include_top": include_top}))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if spec.endswith(".keras") or os.path.exists(spec):
        if os.path.isdir(spec):  # a run folder, as evaluate and predict take
            from keras_vit.train.runs import model_path

            spec = model_path(spec)
        if not os.path.isfile(spec):
            raise UserError(f"model file {spec!r} does not exist")
        from keras_vit.saving import load_model

        return load_model(spec, compile=False)
    import keras_vit

    try:
        return keras_vit.ViT(spec, image_size=image_size or 224, channels=channels,
                             include_top=True if include_top is None else include_top)
    except ValueError as exc:
        raise UserError(f"--model {spec!r} is neither a .keras file nor a variant name: {exc}") from None


def _model_input(splits) -> Tuple[Tuple[int, int], int]:
    """(image size, channels) a model for this dataset takes: its image shape (224 when images vary)."""
    h, w, c = splits.image_shape
    return ((h, w) if h and w else (224, 224)), (1 if c == 1 else 3)


def _parse_shots(text: str) -> List[int]:
    try:
        shots = [int(s) for s in text.split(",")]  # an empty item (1,,5) is a typo: int("") refuses it
    except ValueError:
        shots = []
    if not shots or any(s < 1 for s in shots) or len(set(shots)) != len(shots):
        raise UserError(f"--shots must be comma-separated distinct positive integers such as 1,5,10,25; got {text!r}")
    return shots


def _write_json_to(path: str, obj, option: str) -> None:
    """Write `obj` as JSON to `path` (making its folder); an OSError names `path`, not a temporary file."""
    from keras_vit.files import write_json

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_json(path, obj)
    except OSError as exc:
        raise UserError(f"{option} {path!r}: {exc.strerror or exc}") from None


# --- vitcli inspect ---------------------------------------------------------------------------
@click.command("inspect")
@click.option("--model", "model_spec", required=True,
              help="A keras-vit .keras file or run folder, or a variant name (random weights) such as Ti/16.")
@click.option("--image", "image_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Image to show attention on (repeatable). Default: the dataset's first test image, "
                   "else scikit-learn's sample photo.")
@click.option("--dataset", default=None, help="Dataset whose test images feed the attention-distance average.")
@click.option("--num-images", default=32, show_default=True, type=click.IntRange(min=1),
              help="Test images of --dataset averaged for the mean attention distance.")
@click.option("--components", default=28, show_default=True, type=click.IntRange(min=1),
              help="Principal components of the patch-embedding filters to draw.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for PNGs and inspect.npz.")
@user_errors
def inspect_cmd(model_spec: str, image_paths: Tuple[str, ...], dataset: Optional[str], num_images: int,
                components: int, out_dir: str) -> None:
    """Figures of what a ViT learned, as in the paper's Figure 7.

    Patch-embedding filters, position-embedding similarity, mean attention distance,
    attention maps and rollout: one PNG each in OUT, plus the raw arrays in OUT/inspect.npz."""
    import numpy as np

    from keras_vit import data
    from keras_vit import inspect as kin
    from keras_vit.model import get_config

    missing = [p for p in image_paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"image {missing[0]!r} does not exist")
    ctx = click.get_current_context()
    if dataset is None and ctx.get_parameter_source("num_images") == click.core.ParameterSource.COMMANDLINE:
        raise UserError("--num-images counts test images of --dataset; give --dataset too (or drop --num-images)")
    model = _load_model_arg(model_spec)
    cfg = get_config(model)
    size, channels = cfg.image_size, cfg.channels
    images = [data.load_image_file(p, size, channels) for p in image_paths]
    dist_images = None
    if dataset is not None:
        dist_images = data.split_arrays(data.load(dataset).test, size, channels, limit=num_images)[0]
        if not images:
            images = [dist_images[0]]
    if not images:
        from sklearn.datasets import load_sample_image

        photo = load_sample_image("china.jpg").astype(np.float32)
        images = [np.asarray(data.prepare_image(photo, size, channels), np.float32)]
    written = kin.inspect_model(model, np.stack(images), out_dir, distance_images=dist_images, k=components)
    skipped = written.pop("skipped", {})
    for name, path in written.items():
        click.echo(f"{name:<32} {path}")
    for name, why in skipped.items():
        click.echo(f"{name:<32} skipped: {why}")


# --- vitcli fewshot ---------------------------------------------------------------------------
@click.command("fewshot")
@click.option("--model", "model_spec", required=True,
              help="A keras-vit .keras file or run folder (its pre-logits features are used), a checkpoint (published name, "
                   "hf://ORG/NAME, .npz/.safetensors file or model folder; at its own image size), or a variant "
                   "name (random weights).")
@click.option("--dataset", default="digits", show_default=True, help="Dataset of the registry (keras_vit.data).")
@click.option("--shots", default="1,5,10,25", show_default=True, help="Images per class, comma-separated.")
@click.option("--draws", default=5, show_default=True, type=click.IntRange(min=1),
              help="Random support sets per shot count.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also write the JSON here.")
@user_errors
def fewshot_cmd(model_spec: str, dataset: str, shots: str, draws: int, seed: int, batch_size: int,
                as_json: bool, out_path: Optional[str]) -> None:
    """Linear few-shot accuracy of a model's frozen features, the paper's protocol.

    Closed-form ridge regression to {-1, 1} targets from k images per class, several draws
    (mean and spread); the regulariser is chosen on the validation split."""
    shot_list = _parse_shots(shots)
    if out_path:
        check_writable(out_path, "--out")
    from keras_vit import data, fewshot
    from keras_vit.model import get_config

    splits = data.load(dataset)
    size, channels = _model_input(splits)
    model = _load_model_arg(model_spec, image_size=size, channels=channels, include_top=False)
    cfg = get_config(model)
    arrays = [data.split_arrays(ds, cfg.image_size, cfg.channels) for ds in (splits.train, splits.val, splits.test)]
    result = fewshot.evaluate_model(model, *arrays, batch_size=batch_size, shots=shot_list, draws=draws,
                                    seed=seed, num_classes=splits.num_classes)
    result = {"model": model_spec, "dataset": dataset, **result,
              "shots": {str(k): v for k, v in result["shots"].items()}}
    if out_path:
        _write_json_to(out_path, result, "--out")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{dataset}: {result['num_classes']} classes, chance {result['chance']:.3f}, {draws} draws")
    click.echo(f"{'shots':>5} {'accuracy':>9} {'+/-':>7} {'l2':>10}")
    for k, r in result["shots"].items():
        click.echo(f"{k:>5} {r['mean']:>9.4f} {r['std']:>7.4f} {r['l2']:>10.4g}")


# --- vitcli pretrain --------------------------------------------------------------------------
@click.command("pretrain")
@click.option("--dataset", default="digits", show_default=True,
              help="Dataset of the registry; its training images are used without labels.")
@click.option("--variant", default=None,
              help="Model, e.g. Ti/4, S/16 [default: the dataset's `vitcli train` default, so that "
                   "`vitcli train --weights` fits it as is].")
@click.option("--image-size", default=None, type=ImageSize(),
              help="Input side in pixels, or HEIGHTxWIDTH, as for vitcli train [default: per dataset].")
@click.option("--hidden-size", default=None, type=click.IntRange(min=1))
@click.option("--num-layers", default=None, type=click.IntRange(min=1))
@click.option("--num-heads", default=None, type=click.IntRange(min=1))
@click.option("--mlp-dim", default=None, type=click.IntRange(min=1))
@click.option("--model-option", "model_options", multiple=True, metavar="KEY=VALUE", help=MODEL_OPTION_HELP)
@click.option("--target", default="color", show_default=True,
              type=click.Choice(["color", "color_regression", "patch_regression"]),
              help="color: 3-bit mean colour classes (the paper's); or L2 regression of the mean colour / full patch.")
@click.option("--mask-ratio", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", "learning_rate", default=1e-3, show_default=True, type=click.FloatRange(min=0.0, min_open=True))
@click.option("--weight-decay", default=0.05, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Run folder, new or empty [default: runs/pretrain-<dataset>-<variant>-<time>].")
@user_errors
@sigterm_cleans_up()
def pretrain_cmd(dataset: str, out_dir: Optional[str], **options) -> None:
    """Self-supervised masked patch prediction, as in the paper's Appendix B.1.2.

    Writes OUT/model.keras, an encoder that `vitcli train --weights OUT/model.keras`
    fine-tunes with a new head, and OUT/metrics.json. The model options mean what they mean
    for `vitcli train`; give the same ones to both."""
    from keras_vit import pretrain as mpp

    cfg = mpp.PretrainConfig(dataset=dataset, model=parse_model_options(options.pop("model_options")), **options)
    path = mpp.pretrain(cfg, output=out_dir)["model"]
    # The .keras file carries the model (sizes and options): --weights alone rebuilds it.
    click.echo(f"encoder saved to {path}; fine-tune it with: vitcli train --dataset {dataset} --weights {path}")
