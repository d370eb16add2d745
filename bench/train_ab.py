"""A/B of one training-speed change: img/s of keras-vit as built against the same model without it.

Changes (`--without`):
- `class-token-block`: the last block on every token (as built, a class-token model's last
  block computes the class token alone);
- `gelu-gradient`: TensorFlow's own gradient of the op-by-op GELU (as built, bf16 training uses
  the GELU whose float32 gradient is recomputed from its input, `layers.block.gelu`);
- `ln-gradient` (with `--jit scoped`): the LayerNorms in an XLA scope with TensorFlow's own gradient,
  op by op (as built, `layers.norm.layer_norm` writes the gradient out in a scope of its own);
- `activation-gradient` (with `--option activation=quick_gelu` or `--option mlp=swiglu`): quick_gelu or
  SwiGLU op by op with TensorFlow's own gradient (as built, bf16 training recomputes their float32
  gradient from the input, in the scoped step's XLA scope, `layers.block.activate` / `swiglu`);
- `relative-gather` (with `--option pos_embedding=relative`): the relative-offset logits picked with
  take_along_axis on (B, heads, S, S) indices (as built, query-major rows of one constant index,
  `layers.attention.MultiHeadSelfAttention._relative_bias`);
- `qk-norm-scope` (with `--option qk_norm=true --jit scoped`): qk_norm's query and key LayerNorms op by op
  with TensorFlow's gradient (as built, in the scoped step's XLA scope with the gradient written out,
  as the block's own LayerNorms, `layers.norm.layer_norm`);
- `patch-matmul`: the patch embedding's Conv2D in bf16 training too (as built, bf16/fp16 training on
  TensorFlow runs it as one GEMM of the patches, `layers.embedding.PatchEmbedding._patches_times_kernel`);
- `bias-after-reshape`: every GEMM's bias added right after it, which grappler fuses into oneDNN's inner product
  (as built, bf16/fp16 training adds it after a reshape and the GEMM stays a MatMul, `layers.fusion.bias_after_reshape`);
- `softmax-compute-dtype` (AMX, `--jit scoped`): the attention softmax in float32 with TensorFlow's gradient (as built,
  oneDNN's softmax in bf16 with its gradient in an XLA scope, `layers.fusion.softmax_with_scoped_gradient`);
- `mlp-bias-in-activation` (AMX, `--jit scoped`): the MLP's first bias added by its Dense layer after the reshape
  (as built, in the activation's scope with its gradient, `layers.block.activate(..., bias=)`);
- `bias-gradient-gemm` (AMX): the biases' gradients as TensorFlow's bf16 Sum / BiasAddGrad (as built, one GEMM each,
  `layers.fusion.bias_gradient`);
- `fused-updates` (AMX; with `--optimizer sgd` or `adamw`): Keras' optimizer updates op by op (as built, one TensorFlow
  ResourceApplyKerasMomentum / ResourceApplyAdam per variable, `keras_vit.train.updates`);
- `row-dots` (AMX, `--jit scoped`): the scoped LayerNorms' and softmax gradient's row sums as XLA reductions (as built,
  one matrix-vector product each, `layers.fusion.row_sum`);
- `towers` (AMX, 2 cores; processes only, not `--interleave`): the whole batch in one stream of ops, each forked over
  TensorFlow's default intra-op threads (as built, two half-batch towers on one intra-op thread each, `train.towers`);
- `dw-transposed` (AMX, `--jit scoped`, run with `KERAS_VIT_DW_TRANSPOSED=1`, which turns it on): the weight gradients as
  TensorFlow's MatMul(x, dy, transpose_a=True) (as built, a GEMM on x transposed by XLA, `layers.fusion.gemm`);
- `shared-casts` (the towers under mixed_bfloat16): each tower casts the weights for itself, and TensorFlow casts its
  gradients back and sums them (as built, one cast a weight for the towers, the gradients cast back and summed in one
  XLA pass, `train.towers._one_cast_per_variable`);
- `fused-residuals` (AMX, `--jit scoped`): the blocks' residual adds and their gradients' sums as TensorFlow ops (as
  built, in the LayerNorms' XLA scopes, `layers.block.TransformerBlock._call_fused`);
- `exact-bias-gradients` (graph-mode bf16 off AMX and the Zen 5, `--jit scoped`; on those two with
  `KERAS_VIT_BIAS_APART=0`; run with `KERAS_VIT_BIAS_GRADIENT_GEMM=1`, which turns it on): the MLP's Dense layers as
  Keras calls them, their bias gradients TensorFlow's bf16
  BiasAddGrad (as built, the bias added by `layers.fusion.add_bias`, its gradient one GEMM, `exact_bias_gradients`);
- `fused-heads` (AMX and the Zen 5, `--jit scoped`): the QKV bias add, the head split and its gradient as TensorFlow ops
  (as built, one XLA pass each way, `layers.attention.heads_major`).

`--without` takes several changes at once, comma-separated (`--without fused-heads,fused-residuals`).

Each variant runs in its own process (the `fusible` XLA flags are per process), alternately:
  python -m bench.train_ab --without gelu-gradient --variant B/16 --rounds 3 --steps 6
  python -m bench.train_ab --without ln-gradient --jit scoped
  python -m bench.train_ab --without activation-gradient --option mlp=swiglu --jit scoped
Prints one line per run and the median of each variant's runs.

`--interleave N` instead builds both variants in ONE process (as built first; the change is undone only after its
training step is traced) and times N pairs of single `train_on_batch` steps, A B B A ...: the VM's drift, which moves
whole processes by 10-20% from minute to minute, then falls on both sides of every pair alike. Prints the median of
the N per-pair ratios with its bootstrap 90% interval: a change whose interval excludes 1.0 is resolved.
  python -m bench.train_ab --without patch-matmul --interleave 60
The training is `model.fit`
over a repeated tf.data batch, mixed_bfloat16 + fusible (the `vitcli train` default on a CPU
with native bf16; `--jit scoped`: the blocks' own XLA scopes instead, layers.fusion), SGD momentum (`--optimizer
adamw`: AdamW, weight decay 0.05, the `scratch` recipe's; `--policy float32 --jit scoped`: the notebook's float32 step on
AMX, graph mode with the scopes).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import List, Optional

CHANGES = ("class-token-block", "gelu-gradient", "ln-gradient", "activation-gradient",
           "relative-gather", "qk-norm-scope", "patch-matmul", "bias-after-reshape", "softmax-compute-dtype",
           "mlp-bias-in-activation", "bias-gradient-gemm", "fused-updates", "row-dots", "towers",
           "dw-transposed", "shared-casts", "fused-residuals", "exact-bias-gradients",
           "fused-heads")
OPTIMIZERS = ("sgd", "adamw")


def _undo(changes: str) -> None:
    """Puts the model code back as it was before each of the comma-separated `changes`, in this process only."""
    for change in changes.split(","):
        _undo_one(change)


def _undo_one(change: str) -> None:
    """Puts the model code back as it was before `change`, in this process only."""
    if change == "class-token-block":
        import keras_vit.model as vit_model

        encode = vit_model._encode
        vit_model._encode = lambda *a, **k: encode(*a, **{**k, "head_tokens": None})
    elif change == "gelu-gradient":
        import keras_vit.layers.block as block

        block.gelu = lambda x, approximate=True, training=None, bias=None: block.ops.gelu(
            x if bias is None else x + block.ops.cast(bias, x.dtype), approximate=approximate)
    elif change == "ln-gradient":
        import keras_vit.layers.block as block
        from keras_vit.layers.fusion import fused_elementwise
        from keras_vit.layers.norm import _layer_norm

        def layer_norm(norm, x, out_dtype, training=None):
            with fused_elementwise(training, out_dtype):
                return block.ops.cast(_layer_norm(norm, x), out_dtype)

        block.layer_norm = layer_norm
    elif change == "activation-gradient":
        import keras_vit.layers.block as block

        block._quick_gelu_with_input_gradient = lambda scope=None: block._quick_gelu
        block._swiglu_with_input_gradient = lambda m, scope=None: lambda h: block._swiglu(h, m)
    elif change == "relative-gather":
        from keras_vit.layers.attention import MultiHeadSelfAttention, ops

        def relative_bias(self, q):
            scores = ops.einsum("bhtk,ohk->bhto", q, ops.cast(self.relative_embedding, q.dtype))
            rows = self._rel_index[: q.shape[2]]
            idx = ops.broadcast_to(ops.convert_to_tensor(rows[None, None]), (ops.shape(scores)[0], self.num_heads) + rows.shape)
            return ops.take_along_axis(scores, idx, axis=-1)

        MultiHeadSelfAttention._relative_bias = relative_bias
    elif change == "qk-norm-scope":
        import keras_vit.layers.attention as attention
        from keras_vit.layers.norm import _layer_norm

        attention.layer_norm = lambda norm, x, out_dtype, training=None, scale=1.0: attention.ops.cast(
            _layer_norm(norm, x) * scale, out_dtype)
    elif change == "patch-matmul":
        from keras_vit.layers.embedding import PatchEmbedding

        PatchEmbedding._patches_times_kernel = lambda self, images: self.projection(images)
    elif change == "bias-after-reshape":
        import keras_vit.layers.attention as attention
        import keras_vit.layers.block as block
        import keras_vit.layers.embedding as embedding

        attention.separate_bias = block.separate_bias = embedding.separate_bias = lambda x, training=None: False
        attention.cpu_scoped = block.cpu_scoped = lambda x, training=None: False
    elif change == "softmax-compute-dtype":
        import keras_vit.layers.attention as attention

        attention.cpu_scoped = lambda x, training=None: False
    elif change == "mlp-bias-in-activation":
        import keras_vit.layers.block as block

        block.cpu_scoped = lambda x, training=None: False
    elif change == "bias-gradient-gemm":
        import keras_vit.layers.block as block
        import keras_vit.layers.fusion as fusion

        fusion.add_bias = block.add_bias = lambda y, bias: y + fusion.ops.cast(bias, y.dtype)
        block.bias_gradient = lambda u: fusion.ops.sum(fusion.ops.reshape(u, (-1, u.shape[-1])), axis=0)
    elif change == "exact-bias-gradients":
        from keras_vit.layers.fusion import BIAS_GRADIENT_ENV

        os.environ[BIAS_GRADIENT_ENV] = "0"
    elif change == "fused-updates":
        from keras_vit.train.updates import FUSED_UPDATES_ENV

        os.environ[FUSED_UPDATES_ENV] = "0"
    elif change == "row-dots":
        from keras_vit.layers.fusion import ROW_DOTS_ENV

        os.environ[ROW_DOTS_ENV] = "0"
    elif change == "towers":  # before keras_vit.model's import starts TensorFlow (main does it first in a child)
        from keras_vit.train.towers import TOWERS_ENV

        os.environ[TOWERS_ENV] = "0"
    elif change == "dw-transposed":
        from keras_vit.layers.fusion import DW_TRANSPOSED_ENV

        os.environ[DW_TRANSPOSED_ENV] = "0"
    elif change == "shared-casts":
        from keras_vit.train import towers

        towers.SHARE_CASTS = False
    elif change == "fused-residuals":
        from keras_vit.layers import block

        block.FUSED_RESIDUALS = False
    elif change == "fused-heads":
        from keras_vit.layers import attention

        attention.FUSED_HEADS = False


def bf16_training_model(variant: str, batch_size: int, image_size: int = 224, without: str = "",
                        jit: str = "fusible", options: Optional[dict] = None, optimizer: str = "sgd",
                        policy: str = "mixed_bfloat16"):
    """(model, images, labels): keras-vit compiled as the `vitcli train` default on a CPU with native
    bf16 (mixed_bfloat16 + fusible, SGD momentum or `optimizer="adamw"`; `jit="scoped"`: the blocks' XLA scopes instead),
    optionally without one change and with ViT options (`options`, e.g. {"mlp": "swiglu"}); random data.
    Call it before TensorFlow's first function runs in the process (the fusible flags)."""
    from keras_vit import precision

    if jit == "fusible":
        precision.request_fusible_clustering()
    import keras
    import numpy as np

    import keras_vit

    if without:
        _undo(without)
    keras.mixed_precision.set_global_policy(policy)
    model = keras_vit.ViT(variant, num_classes=10, image_size=image_size, **(options or {}))
    opt = (keras.optimizers.AdamW(1e-3, weight_decay=0.05) if optimizer == "adamw"
           else keras.optimizers.SGD(0.01, momentum=0.9))
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch_size, image_size, image_size, 3)).astype("float32")
    return model, images, rng.integers(0, 10, batch_size)


def run_one(without: str, variant: str, steps: int, batch_size: int, jit: str = "fusible",
            options: Optional[dict] = None, image_size: int = 224, optimizer: str = "sgd",
            policy: str = "mixed_bfloat16") -> float:
    """Median training img/s of `model.fit` (mixed_bfloat16 + `jit`, `optimizer`) in this process."""
    model, images, labels = bf16_training_model(variant, batch_size, image_size, without=without, jit=jit,
                                                options=options, optimizer=optimizer, policy=policy)
    import keras
    import tensorflow as tf

    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    model.fit(data, steps_per_epoch=5, epochs=1, verbose=0)  # warm-up, compilation included
    times = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[StepTimer()])
    return batch_size / statistics.median(times)


def run_interleaved(without: str, variant: str, pairs: int, batch_size: int, jit: str = "fusible",
                    options: Optional[dict] = None, warmup: int = 5, image_size: int = 224,
                    optimizer: str = "sgd", policy: str = "mixed_bfloat16") -> dict:
    """Both variants in this process, their single steps timed in pairs (A B, then B A, alternately).

    The as-built model is built and its training step traced before `_undo(without)` patches the code, so its
    traced step keeps the change; the other model is built after. Returns the per-pair ratios
    (without's step time over as-built's: > 1 means the change is faster), their median with a bootstrap 90%
    interval, and each variant's median img/s."""
    import numpy as np

    built, images, labels = bf16_training_model(variant, batch_size, image_size, jit=jit, options=options,
                                                optimizer=optimizer, policy=policy)
    for _ in range(warmup):  # traces (and XLA-compiles) the as-built step before anything is undone
        built.train_on_batch(images, labels)
    other, _, _ = bf16_training_model(variant, batch_size, image_size, without=without, jit=jit, options=options,
                                      optimizer=optimizer, policy=policy)
    for _ in range(warmup):
        other.train_on_batch(images, labels)

    def step(model) -> float:
        start = time.perf_counter()
        model.train_on_batch(images, labels)
        return time.perf_counter() - start

    times = {"as-built": [], "without": []}
    for i in range(pairs):
        order = (("as-built", built), ("without", other)) if i % 2 == 0 else (("without", other), ("as-built", built))
        for name, model in order:
            times[name].append(step(model))
    a, b = np.array(times["as-built"]), np.array(times["without"])
    ratios = b / a
    rng = np.random.default_rng(0)
    boot = np.median(rng.choice(ratios, (2000, ratios.size)), axis=1)
    return {"pairs": pairs, "ratio_median": float(np.median(ratios)),
            "ratio_90": [float(np.quantile(boot, 0.05)), float(np.quantile(boot, 0.95))],
            "as_built_img_s": float(batch_size / np.median(a)), "without_img_s": float(batch_size / np.median(b)),
            "ratios": [round(float(r), 4) for r in ratios]}


def _options(parser: argparse.ArgumentParser, given: List[str]) -> dict:
    """{"mlp": "swiglu", "qk_norm": True, ...} from NAME=VALUE strings (true/false and numbers read as such)."""
    options = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--option takes NAME=VALUE; got {item!r}")
        lowered = value.lower()
        if lowered in ("true", "false"):
            options[name] = lowered == "true"
            continue
        try:
            options[name] = float(value) if "." in value or "e" in lowered else int(value)
        except ValueError:
            options[name] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def changes(text: str) -> str:
        unknown = [c for c in text.split(",") if c not in CHANGES]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown change {unknown[0]!r}; one or more of {', '.join(CHANGES)}, "
                                             "comma-separated")
        return text

    parser.add_argument("--without", type=changes, required=True, metavar="CHANGE[,CHANGE...]",
                        help=f"the change(s) to leave out in variant B: {', '.join(CHANGES)}")
    parser.add_argument("--variant", default="Ti/16")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jit", choices=["fusible", "scoped"], default="fusible",
                        help="fusible: TensorFlow's auto-clustering (vitcli train's default); scoped: the blocks' scopes")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a ViT option for both variants, e.g. mlp=swiglu or activation=quick_gelu (repeatable)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                        help="sgd: SGD momentum 0.9 (timm's in bench.train); adamw: the scratch recipe's AdamW")
    parser.add_argument("--policy", choices=["mixed_bfloat16", "float32"], default="mixed_bfloat16",
                        help="float32 with --jit scoped: the notebook's float32 step on AMX (graph mode, the scopes)")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="both variants in one process, N pairs of single steps (ABBA); instead of --rounds")
    parser.add_argument("--child", choices=["as-built", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    from bench.common import check_args, header

    check_args(args)  # --steps 0 trained forever (fit on a repeated dataset with steps_per_epoch=0)
    if not args.child:
        header("train_ab", {"without": args.without, "variant": args.variant, "jit": args.jit})
    options = _options(parser, args.option)
    label = ", ".join([args.jit] + ([args.optimizer] if args.optimizer != "sgd" else [])
                      + ([args.policy] if args.policy != "mixed_bfloat16" else []) + args.option)
    towers = "towers" in args.without.split(",")
    if towers and args.interleave:
        parser.error("--without towers needs a process each (TensorFlow's threads are fixed when it starts): use --rounds")
    if args.child == "without" and towers:
        _undo_one("towers")  # before anything imports keras_vit.model
    if args.interleave:
        r = run_interleaved(args.without, args.variant, args.interleave, args.batch_size, args.jit, options,
                            image_size=args.image_size, optimizer=args.optimizer, policy=args.policy)
        lo, hi = r["ratio_90"]
        print(f"{args.variant} ({label}), {r['pairs']} interleaved pairs of steps: as built {r['as_built_img_s']:.2f} "
              f"img/s, without {args.without} {r['without_img_s']:.2f}: {r['ratio_median']:.3f}x "
              f"(90% interval {lo:.3f}-{hi:.3f}; {'resolved' if lo > 1 or hi < 1 else 'not resolved'})")
        return
    if args.child:
        img_s = run_one(args.without if args.child == "without" else "", args.variant, args.steps, args.batch_size,
                        args.jit, options, args.image_size, args.optimizer, args.policy)
        print("IMG_S", img_s)
        return
    results = {"as-built": [], "without": []}
    for r in range(args.rounds):
        for name in results:
            out = subprocess.run([sys.executable, "-m", "bench.train_ab", "--child", name, "--without", args.without,
                                  "--variant", args.variant, "--steps", str(args.steps),
                                  "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                                  "--jit", args.jit, "--optimizer", args.optimizer, "--policy", args.policy]
                                 + [f"--option={o}" for o in args.option],
                                 capture_output=True, text=True, timeout=3600)
            if out.returncode:  # the child's own line (an unknown variant ...), not CalledProcessError's
                tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
                raise SystemExit(f"round {r + 1} {name}: exit {out.returncode}: {tail[0][:300]}")
            img_s = float(next(line for line in out.stdout.splitlines() if line.startswith("IMG_S")).split()[1])
            results[name].append(img_s)
            print(f"round {r + 1} {name if name == 'as-built' else 'without ' + args.without}: {img_s:.2f} img/s",
                  flush=True)
    built, without = (statistics.median(results[k]) for k in ("as-built", "without"))
    print(f"{args.variant} ({label}): as built {built:.2f} img/s, without {args.without} {without:.2f}: {built / without:.3f}x")


if __name__ == "__main__":
    main()
