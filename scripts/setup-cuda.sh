#!/usr/bin/env bash
# Build the `cuda` binary (CUDA devices, NCCL collectives) on a machine without a GPU or CUDA
# toolkit: fetches the CUDA 13.0 build toolkit from PyPI wheels (nvcc, headers, link stubs;
# ~100 MB, once) and runs `cargo build --release --features cuda` (~10 min the first time on
# 2 cores: candle's kernels go through nvcc). The binary targets sm_90 (H100/H200).
#
#   SHARDWISE_CUDA_HOME   toolkit location (default ~/.cache/shardwise/cu13)
#   SHARDWISE_CUDA_RECIPE the toolkit script (default ../shared/cuda/setup_cuda13_pip.sh next
#                         to this repository, where the lent machines keep it)
#
# Prints the binary's path last. With --pack DIR, also writes DIR/shardwise.gz (what a run on
# the GPU machine carries; scripts/gpu-run.sh unpacks it there).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CU="${SHARDWISE_CUDA_HOME:-$HOME/.cache/shardwise/cu13}"
RECIPE="${SHARDWISE_CUDA_RECIPE:-$ROOT/../shared/cuda/setup_cuda13_pip.sh}"
PACK=""
if [[ "${1:-}" == "--pack" ]]; then
    PACK="${2:?--pack needs a directory}"
fi

log() { echo "setup-cuda: $*" >&2; }

cd "$ROOT"
if [[ ! -f "$CU/env.sh" ]]; then
    [[ -x "$RECIPE" || -f "$RECIPE" ]] || { log "error: no toolkit recipe at $RECIPE"; exit 1; }
    log "fetching crates (the recipe reads cudarc's sources for its link stubs)"
    cargo fetch >&2
    log "installing the CUDA 13.0 build toolkit into $CU"
    bash "$RECIPE" "$CU" lean >&2
fi
# shellcheck disable=SC1091
source "$CU/env.sh"
# A target directory of its own: the CPU build in target/ stays as it is.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cuda}"
log "building with nvcc $(nvcc --version | tail -n 1)"
cargo build --release --features cuda >&2
BIN="$CARGO_TARGET_DIR/release/shardwise"
if [[ -n "$PACK" ]]; then
    mkdir -p "$PACK"
    strip -o "$PACK/shardwise" "$BIN"
    gzip -f "$PACK/shardwise"
    # The GPU tests (tests/gpu.rs) as one executable, for scripts/gpu-run.sh.
    TESTS="$(cargo test --release --features cuda --test gpu --no-run 2>&1 \
        | sed -n 's/.*Executable tests\/gpu.rs (\(.*\))/\1/p' | tail -n 1)"
    [[ -n "$TESTS" ]] || { log "error: no GPU test executable"; exit 1; }
    strip -o "$PACK/gpu-tests" "$TESTS"
    gzip -f "$PACK/gpu-tests"
    log "packed $PACK/shardwise.gz and gpu-tests.gz ($(du -ch "$PACK"/*.gz | tail -n 1 | cut -f1))"
fi
echo "$BIN"
