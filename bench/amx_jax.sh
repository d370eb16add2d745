#!/usr/bin/env bash
# Issue #25's AMX rows that a machine without TensorFlow can give, in one command (about 10 minutes): the GPU
# machine lent by the `device` tool has an AMX Xeon for its host CPU, with JAX, torch and timm but no
# TensorFlow. On 2 of its CPUs (as the project's 2-core machines), pinned with taskset: the B/16 step's
# matmuls in JAX (XLA's own dot, XLA's oneDNN dots) and torch with the oneDNN kernel each runs, then training
# img/s of keras-vit on the JAX backend (fp32, mixed_bfloat16, with and without oneDNN dots) and the PyTorch
# backend (mixed_bfloat16) beside timm fp32 and bf16 autocast (its fused attention and its explicit one, the faster
# on the Zen 4) at ViT-Ti/16 (B/16: JAX fp32 and timm), batch 16.
# First run (2026-12-04, in parts: BENCHMARKS.md, "The AMX Xeon through JAX and torch"). Writes DIR/*.json and DIR/amx_jax.log.
#   bash bench/amx_jax.sh [--quick] [DIR]       (DIR defaults to $OUT, else ./amx-jax-out; AMX_CPUS=0,1 to choose)
# Keras comes from .whl/ when the machine lacks it (bench/gpu.sh does the same; BENCHMARKS.md, "GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=()
[ "${1:-}" = "--quick" ] && { QUICK=(--quick); shift; }
DIR=${1:-${OUT:-amx-jax-out}}
mkdir -p "$DIR"
exec > >(tee "$DIR/amx_jax.log") 2>&1
if ! python3 -c "import keras" 2>/dev/null; then
    [ -d .whl ] || { echo "keras is not installed and there is no .whl/ folder of wheels to install it from"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# Two CPUs on two physical cores where the topology says so (a core's AMX unit is shared by its threads).
first=$(cut -d, -f1 < /sys/devices/system/cpu/cpu0/topology/thread_siblings_list | cut -d- -f1)
second=$(for c in /sys/devices/system/cpu/cpu[0-9]*; do n=${c##*cpu}
    grep -qE "(^|[,-])$n([,-]|$)" /sys/devices/system/cpu/cpu0/topology/thread_siblings_list || { echo "$n"; break; }; done)
CPUS=${AMX_CPUS:-$first,${second:-1}}
echo "CPU: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); $(nproc --all) CPUs, pinned to $CPUS"
echo "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E 'amx|bf16|avx512_vnni' | sort | tr '\n' ' ')"
echo "cpu0 siblings: $(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "versions: $(python3 -c 'import jax, keras, torch, timm; print("jax", jax.__version__, "keras", keras.__version__, "torch", torch.__version__, "timm", timm.__version__)' 2>&1 | tail -1)"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
PIN=(taskset -c "$CPUS")
timeout 90 "${PIN[@]}" python3 -m bench.gemm_ways --variant B/16 --ways jax,jax-onednn,torch --repeats 3 \
    "${QUICK[@]}" --json "$DIR/gemm_ways.json"
timeout 320 "${PIN[@]}" python3 -m bench.train --variant Ti/16 --warmup 3 --repeats 3 --steps 3 "${QUICK[@]}" \
    --cases peak,jax,jax-bf16,jax-bf16-onednn,torch-bf16,timm,timm-bf16,timm-bf16-unfused --json "$DIR/train-ti16.json"
timeout 190 "${PIN[@]}" python3 -m bench.train --variant B/16 --warmup 1 --repeats 2 --steps 1 "${QUICK[@]}" \
    --cases jax,timm,timm-bf16,timm-bf16-unfused --json "$DIR/train-b16.json"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
