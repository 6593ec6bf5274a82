#!/usr/bin/env bash
# The main job on a fresh machine: fetch SmolLM2-135M-Instruct (GGUF, cached after the first
# run), build shardwise in release mode, and generate text with 2 ranks whose collectives run
# over gRPC on loopback (9 heads over 3 KV heads: 2 ranks split the heads 6 + 3).
# Extra arguments go to `shardwise generate` (e.g. --max-tokens 64 --isq q8_0 --local 4).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="$(scripts/get-smollm2.sh)"
cargo build --release --bin shardwise >&2
PROMPT="${PROMPT:-<|im_start|>user
Name three rivers of Europe.<|im_end|>
<|im_start|>assistant
}"
exec target/release/shardwise generate --local 2 --transport grpc \
    --model "$MODEL" --prompt "$PROMPT" --max-tokens 48 "$@"
