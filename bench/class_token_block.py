"""A/B of the class-token last block: training img/s of a keras-vit model as built (its last
block computes the class token alone) and of the same model with that block on every token.

Each variant runs in its own process (the `fusible` XLA flags are per process), alternately:
  python -m bench.class_token_block --variant Ti/16 --rounds 2 --steps 15
Prints one line per run and the median of each variant's runs.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def run_one(full_last_block: bool, variant: str, steps: int, batch_size: int) -> float:
    """Median training img/s of `model.fit` (mixed_bfloat16 + fusible, SGD momentum) in this process."""
    from keras_vit import precision

    precision.request_fusible_clustering()  # before TensorFlow's first function runs
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_vit
    import keras_vit.model as vit_model

    if full_last_block:  # the graph as it was: the last block on every token
        encode = vit_model._encode
        vit_model._encode = lambda *a, **k: encode(*a, **{**k, "class_token_out": False})
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = keras_vit.ViT(variant, num_classes=10)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch_size, 224, 224, 3)).astype("float32")
    labels = rng.integers(0, 10, batch_size)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # warm-up, compilation included
    times = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[StepTimer()])
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["as-built", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("IMG_S", run_one(args.child == "full", args.variant, args.steps, args.batch_size))
        return
    results = {"as-built": [], "full": []}
    for r in range(args.rounds):
        for name in results:
            out = subprocess.run([sys.executable, "-m", "bench.class_token_block", "--child", name,
                                  "--variant", args.variant, "--steps", str(args.steps),
                                  "--batch-size", str(args.batch_size)], capture_output=True, text=True, check=True)
            img_s = float(next(line for line in out.stdout.splitlines() if line.startswith("IMG_S")).split()[1])
            results[name].append(img_s)
            print(f"round {r + 1} {name}: {img_s:.2f} img/s", flush=True)
    built, full = (statistics.median(results[k]) for k in ("as-built", "full"))
    print(f"{args.variant}: last block on the class token {built:.2f} img/s, on every token {full:.2f}: "
          f"{built / full:.3f}x")


if __name__ == "__main__":
    main()
