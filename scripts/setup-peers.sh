#!/usr/bin/env bash
# Create (idempotently) the Python venv used by the peer benchmarks
# (PyTorch Gloo all-reduce, see scripts/bench-vs-gloo.sh).
#
# Venv location: ${SHARDWISE_PEERS_VENV:-$HOME/.cache/shardwise/peers-venv}
# Torch spec:    ${SHARDWISE_PEERS_TORCH:-torch==2.15.0}
#
# Install strategy:
#   1. the CPU-only wheel index of PyTorch (a few hundred MB), if it answers;
#   2. otherwise plain PyPI. On x86_64 Linux the PyPI wheel depends on the
#      nvidia-* CUDA runtime packages (several GB). They cannot be skipped with
#      --no-deps: libtorch_python.so links libtorch_cuda.so, which links
#      cublas/cudnn/nccl/..., so `import torch` fails without them.
#
# Progress goes to stderr; the last line on stdout is the venv's python path.
set -euo pipefail

VENV="${SHARDWISE_PEERS_VENV:-$HOME/.cache/shardwise/peers-venv}"
TORCH_SPEC="${SHARDWISE_PEERS_TORCH:-torch==2.15.0}"
CPU_INDEX="${SHARDWISE_PEERS_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
PY="$VENV/bin/python"

log() { echo "setup-peers: $*" >&2; }

verify() {
    "$PY" -W ignore -c 'import numpy, torch, torch.distributed as d
assert d.is_gloo_available(), "torch.distributed has no Gloo backend"
print("torch", torch.__version__, "gloo", d.is_gloo_available())'
}

if [[ -x "$PY" ]] && ver=$(verify 2>/dev/null); then
    log "venv ready at $VENV ($ver)"
    echo "$PY"
    exit 0
fi

HOST_PY="${PYTHON:-python3}"
command -v "$HOST_PY" >/dev/null || { log "error: $HOST_PY not found"; exit 1; }

if [[ ! -x "$PY" ]]; then
    log "creating venv at $VENV"
    mkdir -p "$(dirname "$VENV")"
    "$HOST_PY" -m venv "$VENV"
fi

start=$(date +%s)
pip_install() { "$PY" -m pip install --disable-pip-version-check --no-cache-dir "$@" >&2; }

installed=""
log "trying the CPU-only wheel index ($CPU_INDEX)"
# numpy only silences torch's "Failed to initialize NumPy" warning.
if pip_install --timeout 15 --retries 0 --index-url "$CPU_INDEX" "$TORCH_SPEC" numpy; then
    installed="cpu-index"
else
    log "CPU-only index unreachable or failed; installing $TORCH_SPEC from PyPI"
    log "(on x86_64 Linux this pulls the nvidia-* CUDA packages: several GB)"
    pip_install "$TORCH_SPEC" numpy
    installed="pypi"
fi

log "installed from $installed in $(( $(date +%s) - start ))s; verifying"
if ! ver=$(verify); then
    log "error: torch in $VENV does not import or lacks Gloo"
    exit 1
fi
log "$ver"
log "venv size: $(du -sh "$VENV" 2>/dev/null | cut -f1)"
echo "$PY"
