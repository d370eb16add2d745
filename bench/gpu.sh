#!/usr/bin/env bash
# GPU training benchmark in one command (< 8 minutes on an H100/H200): ViT-B/16 bf16, keras-vit on
# the JAX backend beside timm (bf16 autocast, eager and torch.compile), MFU against the bf16 GEMM
# peak measured in the same run. For a GPU machine with JAX, PyTorch and timm but no TensorFlow;
# Keras is installed from wheels in .whl/ when the machine lacks it (see BENCHMARKS.md).
#   bash bench/gpu.sh [--batch-size 256] [--json PATH]      (JSON defaults to $OUT/gpu.json or ./gpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import keras" 2>/dev/null; then
    [ -d .whl ] || { echo "keras is not installed and there is no .whl/ folder of wheels to install it from" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
exec timeout 470 python3 -m bench.gpu --json "${OUT:-.}/gpu.json" "$@"
