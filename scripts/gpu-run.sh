#!/usr/bin/env bash
# Runs the GPU checks and benchmarks on the GPU machine in one go (one `device` call):
#   1. unpacks the `cuda` binary that scripts/setup-cuda.sh --pack gpu-bin made here;
#   2. finds NCCL and the CUDA 13 runtime in the machine's Python packages (nvidia.nccl,
#      nvidia.cu13), with NCCL_NVLS_ENABLE=0 always set;
#   3. runs `shardwise bench nccl` (which first checks every collective against host
#      arithmetic) and PyTorch's torch.distributed NCCL all-reduce, same sizes, same call;
#   4. runs the GPU tests (tests/gpu.rs, packed as gpu-bin/gpu-tests.gz) against the fixtures;
#   5. times decode steps of a synthetic Llama-3-8B-shaped bf16 model at 1 and 2 GPUs.
# All-reduce lines: `<who> <bytes> <mean_us> <busbw_GBps>`; everything also goes to $OUT/.
#
#   GPU_BIN   packed binary (default gpu-bin/shardwise.gz)
#   BASE_BIN  a second packed binary (e.g. the main branch's): `bench nccl` and every decode row
#             of the first section also run with it, right after, for a same-call comparison
#   SIZES     message sizes (default 8K,64K,1M,16M,256M,1G)
#   CUDA_GRAPH  1 (default) captures decode steps as CUDA graphs, 0 runs them eagerly
#   ONLY      sections to run, comma-separated: nccl, tests, decode, launch, smollm2 (default
#             all)
#   DIRECT    0 skips the `--direct` decode rows (in-process ranks without the runtime)
#   FUSED_TOO 1 also times decode with SHARDWISE_FUSED=0 (candle's operations, batch 1) and
#             with SHARDWISE_GEMV=0 (cuBLAS products, the other fused kernels on)
#   SWEEP     space-separated VAR=value settings: decode (1 and 2 GPUs, batches SWEEP_BATCH,
#             default 1) is also timed under each, e.g. SWEEP="SHARDWISE_GEMV=0 SHARDWISE_ATTN_SPLIT=256"
#   PROFILE   1 profiles one GPU's eager decode steps with Nsight Compute (when the machine has
#             `ncu`): time and DRAM bytes of each kernel name over the last 4 steps' layers, from
#             $PROFILE_COUNT kernels after $PROFILE_SKIP, at batch $PROFILE_BATCH (default 1).
#             PROFILE_FILTER (an ncu --kernel-name, e.g. "regex:nvjet|attend|rope_store|gemv")
#             profiles only those kernels: with PROFILE_SKIP=0 and a large PROFILE_COUNT, a
#             batch's decode steps rather than its prefill
#   PROFILE_KERNEL  a kernel name (regex): one launch of it under ncu's stall sections
#             (warp states, scheduler, occupancy, speed of light), eager TP1 decode at batch
#             $PROFILE_BATCH
#   NSYS      1 records decode steps at 1 and 2 GPUs with Nsight Systems (when the machine has
#             `nsys`) and prints idle time between kernels and steps (bench/nsys_gaps.py), at
#             batch NSYS_BATCH (default 1)
#   MODEL     the decode sections' model (default synthetic:llama3-8b; synthetic:llama3-8b-half
#             is one rank's share of it at two ranks: its one-GPU step is a two-GPU step's
#             products without the collectives)
#   SMOLLM2   a SmolLM2 GGUF on the GPU machine: greedy tokens of GPU ranks (f32, 1 and 2
#             GPUs) against a CPU rank (f32) of the same binary, in the same call
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
GPU_BIN="${GPU_BIN:-$ROOT/gpu-bin/shardwise.gz}"
SIZES="${SIZES:-8K,64K,1M,16M,256M,1G}"
OUT="${OUT:-$(mktemp -d)}"
MODEL="${MODEL:-synthetic:llama3-8b}"

export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
lib_of() { python3 -c "import $1 as m,os;print(os.path.join(list(m.__path__)[0],'lib'))" 2>/dev/null || true; }
NCCL_DIR="$(lib_of nvidia.nccl)"
CU13="$(lib_of nvidia.cu13)"
export LD_LIBRARY_PATH="${NCCL_DIR:+$NCCL_DIR:}${CU13:+$CU13:}${LD_LIBRARY_PATH:-}"

BIN="$OUT/shardwise"
gzip -dc "$GPU_BIN" > "$BIN"
chmod +x "$BIN"
BASE=""
if [[ -n "${BASE_BIN:-}" ]]; then
    BASE="$OUT/base-shardwise"
    gzip -dc "$BASE_BIN" > "$BASE"
    chmod +x "$BASE"
fi
WORLD="$(nvidia-smi -L | wc -l)"
# Every step runs even when an earlier one fails; a failure is printed and fails the script.
FAILED=0
# Each step has a deadline (STEP_TIMEOUT seconds, default 240): a hang costs one step, not the
# whole device call.
want() { [[ -z "${ONLY:-}" || ",$ONLY," == *",$1,"* ]]; }
step() { timeout "${STEP_TIMEOUT:-240}" "$@" || { echo "FAILED ($?): $*"; FAILED=1; }; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    echo "world $WORLD, sizes $SIZES"
    if want nccl; then
    step "$BIN" bench nccl --world "$WORLD" --sizes "$SIZES" --dtype bf16
    if [[ -n "$BASE" ]]; then
        echo "bench nccl, base binary"
        step "$BASE" bench nccl --world "$WORLD" --sizes "$SIZES" --dtype bf16
    fi
    step python3 "$HERE/bench/torch_nccl_allreduce.py" --world "$WORLD" --sizes "$SIZES" --dtype bf16
    fi
    TESTS="$(dirname "$GPU_BIN")/gpu-tests.gz"
    if [[ -f "$TESTS" ]] && want tests; then
        gzip -dc "$TESTS" > "$OUT/gpu-tests" && chmod +x "$OUT/gpu-tests"
        SHARDWISE_FIXTURES="$ROOT/tests/fixtures" step "$OUT/gpu-tests" --test-threads 1 --nocapture
    fi
    # Decode steps are captured as CUDA graphs (the default; CUDA_GRAPH=0 runs them eagerly).
    export SHARDWISE_CUDA_GRAPH="${CUDA_GRAPH:-1}"
    echo "SHARDWISE_CUDA_GRAPH=$SHARDWISE_CUDA_GRAPH"
    want decode && for n in $(seq 1 "$(( WORLD < 2 ? WORLD : 2 ))"); do
        modes=("")
        [[ "${DIRECT:-1}" == 0 ]] || modes+=(--direct)
        for mode in "${modes[@]}"; do
            for bin in "$BIN" $BASE; do
                label="${mode:-through the runtime}"
                [[ "$bin" == "$BIN" ]] || label="$label, base binary"
                echo "decode, $n GPU(s) $label"
                step "$bin" bench decode --model "$MODEL" --local "$n" --transport nccl \
                    --dtype bf16 --batch "${BATCH:-1,8}" --context 512 --steps "${STEPS:-30}" $mode
            done
        done
    done
    if [[ "${FUSED_TOO:-0}" == 1 ]] && want decode; then
        for n in $(seq 1 "$(( WORLD < 2 ? WORLD : 2 ))"); do
            echo "decode, $n GPU(s), SHARDWISE_FUSED=0"
            SHARDWISE_FUSED=0 step "$BIN" bench decode --model "$MODEL" --local "$n" \
                --transport nccl --dtype bf16 --batch 1 --context 512 --steps "${STEPS:-30}"
            echo "decode, $n GPU(s), SHARDWISE_GEMV=0"
            SHARDWISE_GEMV=0 step "$BIN" bench decode --model "$MODEL" --local "$n" \
                --transport nccl --dtype bf16 --batch 1 --context 512 --steps "${STEPS:-30}"
        done
    fi
    for setting in ${SWEEP:-}; do
        want decode || break
        for n in $(seq 1 "$(( WORLD < 2 ? WORLD : 2 ))"); do
            echo "decode, $n GPU(s), $setting"
            env "$setting" timeout "${STEP_TIMEOUT:-240}" "$BIN" bench decode \
                --model "$MODEL" --local "$n" --transport nccl --dtype bf16 \
                --batch "${SWEEP_BATCH:-1}" --context 512 --steps "${STEPS:-30}" \
                || { echo "FAILED: $setting"; FAILED=1; }
        done
    done
    if [[ "${PROFILE:-0}" == 1 ]] && command -v ncu >/dev/null; then
        # Eager steps only: the spinning all-reduce kernels of two ranks stall under ncu's
        # one-kernel-at-a-time replay. Caches are not flushed between kernels (as in a step).
        echo "profile, 1 GPU, eager decode steps, batch ${PROFILE_BATCH:-1} (ncu)"
        SHARDWISE_CUDA_GRAPH=0 step ncu --clock-control none --cache-control none \
            --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
            --kernel-name "${PROFILE_FILTER:-regex:.}" --launch-skip "${PROFILE_SKIP:-3000}" \
            --launch-count "${PROFILE_COUNT:-1500}" "$BIN" bench decode \
            --model "$MODEL" --local 1 --transport nccl --dtype bf16 \
            --batch "${PROFILE_BATCH:-1}" --context 512 --steps 20 > "$OUT/ncu.csv" 2>"$OUT/ncu.log"
        python3 "$HERE/bench/ncu_summary.py" "$OUT/ncu.csv" --layers 32 --last-layers 128
    fi
    if [[ -n "${PROFILE_KERNEL:-}" ]] && command -v ncu >/dev/null; then
        echo "profile of $PROFILE_KERNEL, 1 GPU, eager decode step (ncu)"
        SHARDWISE_CUDA_GRAPH=0 step ncu --kernel-name "regex:$PROFILE_KERNEL" --launch-skip 200 \
            --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
            --section SchedulerStats --section WarpStateStats "$BIN" bench decode \
            --model "$MODEL" --local 1 --transport nccl --dtype bf16 --batch "${PROFILE_BATCH:-1}" \
            --context 512 --steps 10 2>"$OUT/ncu-kernel.log" > "$OUT/ncu-kernel.txt"
        grep -E "Duration|Elapsed Cycles|SM Frequency|Executed Ipc|Issue Slots|Registers Per|Achieved Occ|No Eligible|Warp Cycles Per Issued|stall|Stall" \
            "$OUT/ncu-kernel.txt" | head -n 40
    fi
    NSYS_BIN="$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -n 1 || true)"
    if [[ "${NSYS:-0}" == 1 && -n "$NSYS_BIN" ]]; then
        # Timeline of decode steps as they run (graphs as configured): idle time between
        # kernels inside a step and between steps, per GPU.
        for n in $(seq 1 "$(( WORLD < 2 ? WORLD : 2 ))"); do
            echo "timeline, $n GPU(s), decode steps (nsys)"
            step "$NSYS_BIN" profile --trace cuda --cuda-graph-trace node --sample none \
                --cpuctxsw none --force-overwrite true --export sqlite -o "$OUT/decode-tp$n" \
                "$BIN" bench decode --model "$MODEL" --local "$n" --transport nccl \
                --dtype bf16 --batch "${NSYS_BATCH:-1}" --context 512 --steps "${STEPS:-30}" > "$OUT/nsys-tp$n.log" 2>&1
            for d in $(seq 0 $(( n - 1 ))); do
                python3 "$HERE/bench/nsys_gaps.py" "$OUT/decode-tp$n.sqlite" --device "$d" --keep 0.5
            done
            rm -f "$OUT/decode-tp$n.sqlite" "$OUT/decode-tp$n.nsys-rep"
        done
    elif [[ "${NSYS:-0}" == 1 ]]; then
        echo "NSYS=1 but this machine has no nsys"
    fi
    if [[ -n "${SMOLLM2:-}" ]] && want smollm2; then
        # Fidelity: greedy continuations of GPU ranks equal the CPU rank's, token for token.
        gen() {
            SHARDWISE_CUDA_GRAPH=0 "$BIN" generate --model "$SMOLLM2" --dtype f32 --temperature 0 \
                --max-tokens "${TOKENS:-48}" "$@" \
                --prompt "Tensor parallelism splits each layer of a model across devices, so"
        }
        CPU_TEXT="$(gen --local 1 --transport local 2>"$OUT/smollm2-cpu.log")" || FAILED=1
        echo "smollm2 f32, CPU rank: $CPU_TEXT"
        for n in 1 2; do
            GPU_TEXT="$(gen --local "$n" --transport nccl 2>"$OUT/smollm2-gpu$n.log")" || FAILED=1
            if [[ -n "$CPU_TEXT" && "$GPU_TEXT" == "$CPU_TEXT" ]]; then
                echo "smollm2 f32, $n GPU(s): same tokens as the CPU rank"
            else
                echo "FAILED: smollm2 f32, $n GPU(s) differ from the CPU rank: $GPU_TEXT"
                FAILED=1
            fi
        done
    fi
    if (( WORLD >= 2 )) && want launch; then
        # One process per GPU (examples/ranks-2gpu.toml), NCCL id through the control plane.
        export SHARDWISE_TOKEN="gpu-run-$RANDOM$RANDOM"
        "$BIN" launch --config "$ROOT/examples/ranks-2gpu.toml" > "$OUT/launch.log" 2>&1 &
        LAUNCH=$!
        sleep 5
        step "$BIN" bench decode --model "$MODEL" --config "$ROOT/examples/ranks-2gpu.toml" \
            --dtype bf16 --batch "${BATCH:-1,8}" --context 512 --steps "${STEPS:-30}"
        kill "$LAUNCH" 2>/dev/null; wait "$LAUNCH" 2>/dev/null || true
        tail -n 5 "$OUT/launch.log"
    fi
    exit "$FAILED"
} 2>&1 | tee "$OUT/gpu-run.log"
