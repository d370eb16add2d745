"""`vitcli`: the click group. Commands import Keras/TensorFlow only when they run,
so `vitcli --help` stays fast and TensorFlow-free."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys

import click

from keras_vit import __version__
from keras_vit.cli import quiet
from keras_vit.cli.analysis import fewshot_cmd, inspect_cmd, pretrain_cmd
from keras_vit.cli.common import Terminated, UserError, console_process, outcome_decided, terminated
from keras_vit.cli.data import records_cmd
from keras_vit.cli.export import export_cmd
from keras_vit.cli.train import evaluate_cmd, predict_cmd, train_cmd

_VERBOSE_HELP = "Show TensorFlow's start-up logs and library warnings (hidden by default)."


INTERRUPTED = 130  # 128 + SIGINT, as shells report a process stopped by Ctrl-C (export's 1 is "failed verification")
TERMINATED = 143  # 128 + SIGTERM


class _Group(click.Group):
    """click's group, but Ctrl-C ends with "Interrupted." and exit status 130 (click's own says "Aborted!" and 1),
    and a command's bad option is one line (click's usage block above it left out; exit status 2 as click's)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            raise UserError(exc.format_message() + where) from None
        except KeyboardInterrupt:
            click.echo("\nInterrupted.", err=True)
            raise click.exceptions.Exit(INTERRUPTED) from None
        except BaseException as exc:  # Terminated, or what a library made of it (its own error, one line)
            if isinstance(exc, Terminated) or terminated():
                click.echo("\nTerminated.", err=True)
                raise click.exceptions.Exit(TERMINATED) from None
            raise


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="vitcli")
@click.option("--verbose", is_flag=True, help=_VERBOSE_HELP)
def cli(verbose: bool) -> None:
    """keras-vit: Vision Transformers for Keras - list, train, export and inspect models."""


@cli.command("models")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=1),
              help="Image side used for the parameter and FLOP counts.")
@click.option("--num-classes", default=1000, show_default=True, type=click.IntRange(min=1))
def models_cmd(image_size: int, num_classes: int) -> None:
    """List the variants (layers, width, MLP, heads, patch size, parameters, GFLOPs) and the ViT
    family's published checkpoints."""
    from keras_vit.config import LISTED_VARIANTS, parse_variant

    header = f"{'variant':<10} {'layers':>6} {'hidden':>6} {'mlp':>5} {'heads':>5} {'patch':>5} {'resnet':>10} {'params':>13} {'GFLOPs':>8}"
    rows, unfit = [], []
    for name in LISTED_VARIANTS:  # every row is made before any is printed: an error leaves no half table
        try:
            cfg = parse_variant(name, image_size=image_size, num_classes=num_classes)
            params, gflops = f"{cfg.count_params():,}", f"{cfg.flops() / 1e9:.2f}"
        except ValueError:  # image_size is not a multiple of this variant's input stride
            cfg, params, gflops = parse_variant(name, num_classes=num_classes), "-", "-"
            unfit.append(name)
        resnet = "-" if cfg.resnet_layers is None else ",".join(map(str, cfg.resnet_layers))
        rows.append(f"{name:<10} {cfg.num_layers:>6} {cfg.hidden_size:>6} {cfg.mlp_dim:>5} {cfg.num_heads:>5} "
                    f"{cfg.input_stride[0]:>5} {resnet:>10} {params:>13} {gflops:>8}")
    if len(unfit) == len(LISTED_VARIANTS):
        raise UserError(f"--image-size {image_size} is not a multiple of any listed variant's patch size "
                        "(8, 14, 16, 32; hybrids: their total stride); try 224")
    click.echo(header)
    click.echo("-" * len(header))
    click.echo("\n".join(rows))
    if unfit:
        click.echo(f"-: {image_size} px is not a multiple of the patch size (hybrids: the total stride) of "
                   f"{', '.join(unfit)}")
    _list_presets()


def _list_presets() -> None:
    """The ViT family's published checkpoints (weights=NAME): model, options, preprocessing, parameters."""
    from keras_vit.config import parse_variant
    from keras_vit.weights.presets import FAMILY

    click.echo("\nViT family checkpoints (ViT(weights=NAME), vitcli train --weights NAME; README \"Models\"):")
    header = f"{'name':<38} {'variant':<9} {'image':>5} {'classes':>7} {'params':>12}  options; preprocessing; weights"
    click.echo(header)
    click.echo("-" * len(header))
    for name, entry in FAMILY.items():
        fields = entry.defaults()
        cfg = parse_variant(fields.pop("variant"), **fields)
        shown = ", ".join(f"{k}={v}" for k, v in entry.options.items() if not k.startswith("pixel_"))
        norm = "mean/std " + ("ImageNet" if entry.options.get("pixel_mean") == (0.485, 0.456, 0.406) else
                              "CLIP" if entry.options.get("pixel_mean") else "0.5")
        click.echo(f"{name:<38} {entry.variant:<9} {entry.image_size:>5} {entry.num_classes or '-':>7} "
                   f"{cfg.count_params():>12,}  {shown}; {norm}, {entry.interpolation}, crop {entry.crop_pct}; "
                   f"{entry.url}")


for command in (train_cmd, evaluate_cmd, predict_cmd, export_cmd, inspect_cmd, fewshot_cmd, pretrain_cmd, records_cmd):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    _closed_streams_to_devnull()
    # Before any command imports TensorFlow: its start-up lines would bury our one-line messages.
    quiet.install(verbose="--verbose" in sys.argv[1:])
    console_process()
    try:
        try:
            cli(prog_name="vitcli")
        except SystemExit:
            sys.stdout.flush()  # what is still buffered: a full disk or a closed pipe says so here
            raise
    except KeyboardInterrupt:  # outside a command (while click parses the arguments)
        click.echo("Interrupted.", err=True)
        sys.exit(INTERRUPTED)
    except OSError as exc:  # stdout could not be written (help, version, a command's last lines)
        if exc.filename is not None or exc.errno not in _OUTPUT_LOST:
            raise
        code = _output_lost(exc)
        outcome_decided(code)
        sys.exit(code)
    except SystemExit as exc:  # the command's outcome: from here on a signal does not change it
        outcome_decided(exc.code)
        raise
    finally:
        quiet.finished()  # TensorFlow's teardown logs from here on are hidden (unless --verbose)


_OUTPUT_LOST = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT)


def _output_lost(exc: OSError) -> int:
    """The status for output that could not be written: a closed pipe (`vitcli models | head -1`) ends
    quietly, as a process SIGPIPE stops (141); a full disk says so in one line (1). What is left to
    write goes nowhere (no 'Exception ignored' at exit)."""
    sys.stdout = open(os.devnull, "w")
    if exc.errno == errno.EPIPE:
        return 128 + signal.SIGPIPE
    with contextlib.suppress(OSError):
        click.echo(f"Error: {os.strerror(exc.errno)} while writing the output", err=True)
    return 1


def _closed_streams_to_devnull() -> None:
    """A process started with stdout or stderr closed (`>&-`) has None there: writes go nowhere."""
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))


if __name__ == "__main__":
    main()
