"""Masked patch prediction benchmark: fine-tune from a `vitcli pretrain` encoder vs. from scratch,
same architecture, recipe, budget and seeds; prints test accuracies (and a BENCHMARKS.md row).

    vitcli pretrain --dataset digits --variant Ti/4 --hidden-size 128 --num-layers 4 \
        --num-heads 4 --mlp-dim 256 --epochs 40 --out runs/mpp-digits
    python bench/masked_patch.py --pretrained runs/mpp-digits/model.keras --epochs 10 --seeds 0,1,2

Fine-tuning copies every encoder weight by layer name where the shapes match (the head is new,
zero-initialised) with keras_vit.train.load_initial_weights, as `vitcli train --weights` does;
the recipe here is fixed (AdamW, cosine, no augmentation, no label smoothing) for both arms.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def fine_tune(cfg, data, weights, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    import keras
    import numpy as np

    import keras_vit
    from keras_vit.train import load_initial_weights, warmup_cosine

    keras.utils.set_random_seed(seed)
    model = keras_vit.ViT(config=cfg.replace(include_top=True, num_classes=len(data["class_names"])))
    if weights:
        load_initial_weights(model, weights)
    x, y = data["train"]
    steps = int(np.ceil(len(x) / batch_size)) * epochs
    sched = warmup_cosine(lr, steps, warmup_steps=max(1, steps // epochs))
    model.compile(keras.optimizers.AdamW(sched, weight_decay=0.05, global_clipnorm=1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=True)
    return float(model.evaluate(*data["test"], verbose=0)[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="model.keras written by vitcli pretrain")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="scratch,pretrained", help="which of scratch,pretrained to run")
    args = ap.parse_args()
    from bench.common import check_args, cpu_name

    check_args(args, paths_must_exist=("pretrained",))
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
    unknown = sorted(set(args.runs.split(",")) - {"scratch", "pretrained"})
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; allowed: scratch, pretrained")

    import numpy as np

    import keras_vit
    from keras_vit import data as kdata

    cfg = keras_vit.load_model(args.pretrained).vit_config
    splits = kdata.load(args.dataset)
    data = {"class_names": splits.class_names}
    for name in ("train", "val", "test"):
        data[name] = kdata.split_arrays(getattr(splits, name), cfg.image_size, cfg.channels)
    result = {"dataset": args.dataset, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
              "seeds": seeds, "train_images": int(len(data["train"][0])), "test_images": int(len(data["test"][0])),
              "machine": f"{cpu_name()} ({os.cpu_count()} CPUs)",
              "date": time.strftime("%Y-%m-%d", time.gmtime())}
    runs = [r for r in (("scratch", None), ("pretrained", args.pretrained)) if r[0] in args.runs.split(",")]
    for name, weights in runs:
        t = time.time()
        accs = [fine_tune(cfg, data, weights, args.epochs, args.batch_size, args.lr, s) for s in seeds]
        result[name] = {"accuracies": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
                        "seconds": round(time.time() - t, 1)}
        print(name, result[name], flush=True)
    print(json.dumps(result, indent=2))
    print("| " + " | ".join([str(args.epochs)] + [f"{result[n]['mean']:.4f} ± {result[n]['std']:.4f}" for n, _ in runs]) + " |")


if __name__ == "__main__":
    main()
