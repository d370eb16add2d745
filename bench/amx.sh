#!/usr/bin/env bash
# The AMX table of issue #25 in one command (sized for 15 minutes on 2 quiet cores, --budget 840; --quick: the
# same pipeline on tiny models, a smoke run of about 3 CPU-minutes):
# training img/s of `vitcli train`'s default, the notebook path (fp32, mixed_bfloat16) and timm (fp32, bf16
# autocast) at ViT-Ti/16 and B/16, the bf16/fp32 GEMM peaks, a B/16 step's matmuls in every way in
# (bench.gemm_ways: TensorFlow's oneDNN, XLA, JAX with and without XLA's oneDNN dots, torch) with the oneDNN
# kernel each runs (ONEDNN_VERBOSE=1: `brg_matmul:avx512_core_amx` or not), and the deployment files' latency. Writes
# DIR/amx.json and DIR/amx.md (BENCHMARKS.md's table for this CPU kind, AMX or not).
#   bash bench/amx.sh [--quick] [--out DIR] [--budget SECONDS] [--rounds N]     (DIR defaults to ./amx-out)
# Set-up, once per machine: .venv (as `make test` makes it) and, beside it, .venv-peers: a venv that sees
# .venv's packages and adds the peers pinned in bench/requirements.txt (torch + torchvision + timm; on this
# project's x86_64 machines pip takes torch and torchvision from local disk). .venv itself is left as it is
# (its torch stays the [test] extra's). AMX_PEERS_VENV=PATH puts the peers elsewhere; without them the timm
# cases and the torch probe are reported as skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || make .venv/.installed
case " $* " in *" -h "*|*" --help "*) exec "$PY" -m bench.amx --help ;; esac
PEERS=${AMX_PEERS_VENV:-.venv-peers}
has_peers() {  # found, not imported (an import of torch takes a while); a broken one shows as a failed case
    "$PEERS/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('timm', 'torchvision'))))" 2>/dev/null
}
if ! has_peers; then
    echo "setting up $PEERS (torch, torchvision, timm from bench/requirements.txt; several GB, minutes)" >&2
    [ -x "$PEERS/bin/python" ] || "$PY" -m venv "$PEERS"
    site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    peers_site=$("$PEERS/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # .venv's packages (keras-vit's editable install included) after the peers' own
    echo "import site; site.addsitedir('$site')" > "$peers_site/zz_keras_vit_venv.pth"
    grep -E '^(torch|torchvision|timm)==' bench/requirements.txt > "$PEERS/requirements.txt"
    "$PEERS/bin/python" -m pip install -q -r "$PEERS/requirements.txt" \
        || echo "could not install the peers: the timm cases will be reported as skipped" >&2
fi
has_peers && PY="$PEERS/bin/python"
echo "CPU: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
echo "flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E 'amx|bf16|avx512_vnni' | sort | tr '\n' ' ')"
grep -qw amx_bf16 /proc/cpuinfo || echo "this CPU has no AMX: the table is this CPU kind's, for comparison"
echo "load: $(uptime)"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 BENCH_AMX_COMMAND="bash bench/amx.sh $*"
exec "$PY" -m bench.amx "$@"
