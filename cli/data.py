"""`vitcli records`: convert a dataset into TFRecord shards that `--dataset records:DIR` reads."""
from __future__ import annotations

import click

from keras_vit.cli.common import sigterm_cleans_up, user_errors


@click.command("records")
@click.option("--dataset", required=True, help="Any training dataset name, e.g. folder:PATH, digits, tfds:NAME.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the shards and dataset.json.")
@click.option("--examples-per-shard", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation hold-out.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Training data held out for validation when the dataset has no val split.")
@user_errors
@sigterm_cleans_up()
def records_cmd(dataset: str, output: str, examples_per_shard: int, seed: int, val_fraction: float) -> None:
    """Write DATASET as TFRecord shards (image/encoded, image/class/label, image/filename) in OUTPUT."""
    from keras_vit import data

    counts = data.write_records(dataset, output, examples_per_shard=examples_per_shard, seed=seed,
                                val_fraction=val_fraction)
    click.echo(", ".join(f"{split} {n}" for split, n in counts.items()) + f" examples in {output}; "
               f"train with --dataset records:{output}")
