"""`vitcli`: the click group. Commands import Keras/TensorFlow only when they run,
so `vitcli --help` stays fast and TensorFlow-free."""
from __future__ import annotations

import importlib
import os
import sys

import click

from keras_vit import __version__


class UserError(click.ClickException):
    """A user mistake: printed as one line `Error: ...`, exit code 2, no traceback."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vitcli")
def cli() -> None:
    """keras-vit: Vision Transformers for Keras - list, train, export and inspect models."""


@cli.command("models")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=1),
              help="Image side used for the parameter and FLOP counts.")
@click.option("--num-classes", default=1000, show_default=True, type=click.IntRange(min=1))
def models_cmd(image_size: int, num_classes: int) -> None:
    """List the variants: layers, width, MLP, heads, patch size, parameters and GFLOPs."""
    from keras_vit.config import LISTED_VARIANTS, parse_variant

    header = f"{'variant':<10} {'layers':>6} {'hidden':>6} {'mlp':>5} {'heads':>5} {'patch':>5} {'resnet':>10} {'params':>13} {'GFLOPs':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for name in LISTED_VARIANTS:
        try:
            cfg = parse_variant(name, image_size=image_size, num_classes=num_classes)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        resnet = "-" if cfg.resnet_layers is None else ",".join(map(str, cfg.resnet_layers))
        click.echo(f"{name:<10} {cfg.num_layers:>6} {cfg.hidden_size:>6} {cfg.mlp_dim:>5} {cfg.num_heads:>5} "
                   f"{cfg.input_stride[0]:>5} {resnet:>10} {cfg.count_params():>13,} {cfg.flops() / 1e9:>8.2f}")


# Further commands live in their own modules (cli/<topic>.py), each importing TensorFlow only
# inside the command body; each registers itself below with one line: cli.add_command(...).
from keras_vit.cli.train import evaluate_cmd, predict_cmd, train_cmd  # noqa: E402

cli.add_command(train_cmd)
cli.add_command(evaluate_cmd)
cli.add_command(predict_cmd)
cli.add_command(importlib.import_module("keras_vit.cli.export").export_cmd)

from keras_vit.cli.analysis import fewshot_cmd, inspect_cmd, pretrain_cmd  # noqa: E402  (issue 7)

cli.add_command(inspect_cmd)
cli.add_command(fewshot_cmd)
cli.add_command(pretrain_cmd)


def main() -> None:
    """Console-script entry point."""
    # TensorFlow's C++ start-up chatter (oneDNN, CUDA probing) would bury our one-line messages.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        cli(prog_name="vitcli")
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
