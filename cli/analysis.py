"""`vitcli inspect`, `vitcli fewshot`, `vitcli pretrain`: the paper's analyses as commands.

Each command imports Keras/TensorFlow only inside its body (so `vitcli --help` stays light)
and turns bad input into one `Error: ...` line with a non-zero exit.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Tuple

import click



def _user_error(message: str) -> Exception:
    """The CLI's one-line user error (keras_vit.cli.main.UserError); imported when raised,
    because cli/main.py imports this module to register the commands."""
    from keras_vit.cli.main import UserError

    return UserError(message)

_OVERRIDES = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size")


# --- shared helpers -----------------------------------------------------------------------
def _load_model_arg(spec: str, image_size: Optional[Tuple[int, int]] = None, channels: int = 3,
                    include_top: Optional[bool] = None):
    """A .keras file written by keras-vit, or a variant name (random initialisation, a baseline)."""
    if spec.endswith(".keras") or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise _user_error(f"model file {spec!r} does not exist")
        from keras_vit.saving import load_model

        try:
            return load_model(spec)
        except ValueError as exc:
            raise _user_error(str(exc)) from None
    import keras_vit

    try:
        return keras_vit.ViT(spec, image_size=image_size or 224, channels=channels,
                             include_top=True if include_top is None else include_top)
    except ValueError as exc:
        raise _user_error(f"--model {spec!r} is neither a .keras file nor a variant name: {exc}") from None


def load_splits(name: str, seed: int = 0):
    """keras_vit.data.load(name) with a one-line user error for a bad name, folder or download."""
    from keras_vit import data

    try:
        return data.load(name, seed=seed)
    except ValueError as exc:
        raise _user_error(str(exc).splitlines()[0] if str(exc) else f"cannot load dataset {name!r}") from None


def split_arrays(ds, image_size: Tuple[int, int], channels: int, limit: Optional[int] = None):
    """An unbatched split as arrays: (images float32 (N, H, W, C) in [0, 255] at `image_size`
    with `channels`, labels int64 (N,)), through the same resize as training (data.prepare_image)."""
    import numpy as np

    from keras_vit import data

    if limit:
        ds = ds.take(limit)
    ds = ds.map(lambda x, y: (data.prepare_image(x, image_size, channels), y))
    xs, ys = [], []
    for x, y in ds.batch(256).as_numpy_iterator():
        xs.append(np.asarray(x, np.float32))
        ys.append(np.asarray(y).astype(np.int64))
    if not xs:
        raise _user_error("the dataset split is empty")
    return np.concatenate(xs), np.concatenate(ys)


def _model_input(splits) -> Tuple[Tuple[int, int], int]:
    """(image size, channels) a model for this dataset takes: its image shape (224 when images vary)."""
    h, w, c = splits.image_shape
    return ((h, w) if h and w else (224, 224)), (1 if c == 1 else 3)


def _resize(images, size: Tuple[int, int], channels: int):
    """Images (N, H, W, C) to the model's (H, W) and channel count."""
    import numpy as np

    from keras_vit import data

    try:
        return np.asarray(data.prepare_image(np.asarray(images, np.float32), size, channels), np.float32)
    except ValueError as exc:
        raise _user_error(str(exc)) from None


def _read_image(path: str, size: Tuple[int, int], channels: int):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise _user_error(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise _user_error(f"cannot read image {path!r}: {exc}") from None
    return arr[..., None] if arr.ndim == 2 else arr


def _write_json(path: str, obj) -> None:
    from keras_vit.files import write_json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, obj)


def _parse_shots(text: str) -> List[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        shots = []
    if not shots or any(s < 1 for s in shots):
        raise _user_error(f"--shots must be comma-separated positive integers such as 1,5,10,25; got {text!r}")
    return shots


# --- vitcli inspect ---------------------------------------------------------------------------
@click.command("inspect")
@click.option("--model", "model_spec", required=True,
              help="A keras-vit .keras file, or a variant name (random weights) such as Ti/16.")
@click.option("--image", "image_paths", multiple=True, type=click.Path(dir_okay=False),
              help="Image to show attention on (repeatable). Default: the dataset's first test image, "
                   "else scikit-learn's sample photo.")
@click.option("--dataset", default=None, help="Dataset whose test images feed the attention-distance average.")
@click.option("--num-images", default=32, show_default=True, type=click.IntRange(min=1),
              help="Test images of --dataset averaged for the mean attention distance.")
@click.option("--components", default=28, show_default=True, type=click.IntRange(min=1),
              help="Principal components of the patch-embedding filters to draw.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for PNGs and inspect.npz.")
def inspect_cmd(model_spec: str, image_paths: Tuple[str, ...], dataset: Optional[str], num_images: int,
                components: int, out_dir: str) -> None:
    """Figures of what a ViT learned, as in the paper's Figure 7.

    Patch-embedding filters, position-embedding similarity, mean attention distance,
    attention maps and rollout: one PNG each in OUT, plus the raw arrays in OUT/inspect.npz."""
    import numpy as np

    from keras_vit import inspect as kin
    from keras_vit.model import get_config

    model = _load_model_arg(model_spec)
    cfg = get_config(model)
    size, channels = cfg.image_size, cfg.channels
    images = [_read_image(p, size, channels) for p in image_paths]
    dist_images = None
    if dataset is not None:
        dist_images = split_arrays(load_splits(dataset).test, size, channels, limit=num_images)[0]
        if not images:
            images = [dist_images[0]]
    if not images:
        from sklearn.datasets import load_sample_image

        photo = load_sample_image("china.jpg").astype(np.float32)[None]
        images = [_resize(photo, size, channels)[0]]
    try:
        written = kin.inspect_model(model, np.stack(images), out_dir, distance_images=dist_images, k=components)
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    skipped = written.pop("skipped", {})
    for name, path in written.items():
        click.echo(f"{name:<32} {path}")
    for name, why in skipped.items():
        click.echo(f"{name:<32} skipped: {why}")


# --- vitcli fewshot ---------------------------------------------------------------------------
@click.command("fewshot")
@click.option("--model", "model_spec", required=True,
              help="A keras-vit .keras file (its pre-logits features are used), or a variant name (random weights).")
@click.option("--dataset", default="digits", show_default=True, help="Dataset of the registry (keras_vit.data).")
@click.option("--shots", default="1,5,10,25", show_default=True, help="Images per class, comma-separated.")
@click.option("--draws", default=5, show_default=True, type=click.IntRange(min=1),
              help="Random support sets per shot count.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Also write the JSON here.")
def fewshot_cmd(model_spec: str, dataset: str, shots: str, draws: int, seed: int, batch_size: int,
                as_json: bool, out_path: Optional[str]) -> None:
    """Linear few-shot accuracy of a model's frozen features, the paper's protocol.

    Closed-form ridge regression to {-1, 1} targets from k images per class, several draws
    (mean and spread); the regulariser is chosen on the validation split."""
    shot_list = _parse_shots(shots)
    from keras_vit import fewshot
    from keras_vit.model import get_config

    data = load_splits(dataset)
    size, channels = _model_input(data)
    model = _load_model_arg(model_spec, image_size=size, channels=channels, include_top=False)
    cfg = get_config(model)
    splits = [split_arrays(ds, cfg.image_size, cfg.channels) for ds in (data.train, data.val, data.test)]
    try:
        result = fewshot.evaluate_model(model, *splits, batch_size=batch_size, shots=shot_list, draws=draws,
                                        seed=seed, num_classes=data.num_classes)
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    result = {"model": model_spec, "dataset": dataset, **result,
              "shots": {str(k): v for k, v in result["shots"].items()}}
    if out_path:
        _write_json(out_path, result)
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
@click.option("--image-size", default=None, type=click.IntRange(min=1), help="Input side [default: per dataset].")
@click.option("--hidden-size", default=None, type=click.IntRange(min=1))
@click.option("--num-layers", default=None, type=click.IntRange(min=1))
@click.option("--num-heads", default=None, type=click.IntRange(min=1))
@click.option("--mlp-dim", default=None, type=click.IntRange(min=1))
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
              help="Run folder [default: runs/pretrain-<dataset>-<variant>].")
def pretrain_cmd(dataset: str, variant: Optional[str], image_size: Optional[int], hidden_size, num_layers, num_heads,
                 mlp_dim, target: str, mask_ratio: float, epochs: int, batch_size: int,
                 learning_rate: float, weight_decay: float, seed: int, out_dir: Optional[str]) -> None:
    """Self-supervised masked patch prediction, as in the paper's Appendix B.1.2.

    Writes OUT/model.keras, an encoder that `vitcli train --weights OUT/model.keras`
    fine-tunes with a new head, and OUT/metrics.json. The model options mean what they mean
    for `vitcli train`; give the same ones to both."""
    import keras

    import keras_vit
    from keras_vit import pretrain as mpp
    from keras_vit import train as ktrain

    model_opts = dict(variant=variant, image_size=image_size, hidden_size=hidden_size, num_layers=num_layers,
                      num_heads=num_heads, mlp_dim=mlp_dim)
    try:
        tcfg = ktrain.make_config(dataset, "scratch", **model_opts)
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    splits = load_splits(dataset, seed)
    channels = 1 if splits.image_shape[-1] == 1 else 3
    try:
        cfg = tcfg.vit_config(splits.num_classes, channels).replace(include_top=False)
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    encoder = keras_vit.ViT(config=cfg)
    train_x = split_arrays(splits.train, cfg.image_size, channels)[0]
    val_x = split_arrays(splits.val, cfg.image_size, channels)[0]
    out_dir = out_dir or os.path.join("runs", f"pretrain-{_slug(dataset)}-{tcfg.label()}")
    os.makedirs(out_dir, exist_ok=True)
    keras.utils.set_random_seed(seed)
    history = mpp.pretrain(encoder, train_x, val_x, target=target, epochs=epochs, batch_size=batch_size,
                           learning_rate=learning_rate, weight_decay=weight_decay, seed=seed, mask_ratio=mask_ratio)
    path = mpp.save_encoder(encoder, os.path.join(out_dir, "model.keras"))
    _write_json(os.path.join(out_dir, "metrics.json"),
                {"task": "masked_patch_prediction", "dataset": dataset, "target": target, "mask_ratio": mask_ratio,
                 "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                 "weight_decay": weight_decay, "seed": seed, "config": cfg.to_dict(), "history": history})
    given = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in model_opts.items() if v is not None)
    click.echo(f"encoder saved to {path}; fine-tune it with: "
               f"vitcli train --dataset {dataset} {given + ' ' if given else ''}--weights {path}")


def _slug(name: str) -> str:
    from keras_vit import data

    return data.slug(name)
