#!/usr/bin/env bash
# ISQ time vs UQFF reload time, with peak RSS, for SmolLM2-135M and a random ~1.1B llama
# (made once into the cache by scripts/bench/make_random_llama.py with the peers venv).
# Usage: scripts/bench-uqff.sh [ISQ type, default q4k] [world size, default 1]
set -euo pipefail
cd "$(dirname "$0")/.."
ISQ="${1:-q4k}"
WORLD="${2:-1}"
CACHE="${SHARDWISE_CACHE:-$HOME/.cache/shardwise}"
PY="$(scripts/setup-peers.sh | tail -1)"
"$PY" -c "import safetensors, transformers, gguf" 2>/dev/null || { echo "bench-uqff: the peers venv lacks transformers/gguf: run scripts/setup-fixtures.sh once" >&2; exit 1; }
SMOL="$(scripts/get-smollm2.sh | tail -1)"
BIG="$CACHE/models/random-llama-1b"
[[ -f "$BIG/tokenizer.json" ]] || "$PY" scripts/bench/make_random_llama.py "$BIG" --tokenizer-gguf "$SMOL" >&2
cargo build --release --bin shardwise >&2
BIN=target/release/shardwise
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
measure() { # label, command...: prints wall seconds and peak RSS
    local label="$1"; shift
    /usr/bin/time -f "%e %M" -o "$OUT/time" "$@" >/dev/null 2>"$OUT/err" || { cat "$OUT/err" >&2; exit 1; }
    read -r secs kib < "$OUT/time"
    printf '| %s | %s s | %.2f GiB |\n' "$label" "$secs" "$(echo "$kib / 1048576" | bc -l)"
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u +%F)"
echo "| step | wall | peak RSS |"
echo "|---|---|---|"
for M in "$SMOL" "$BIG"; do
    name="$(basename "$M")"
    extra=(); [[ "$M" == *.gguf ]] && extra=(--dtype f32)
    measure "$name: load + ISQ $ISQ + write ($WORLD ranks)" \
        $BIN quantize --local "$WORLD" --model "$M" "${extra[@]}" --isq "$ISQ" --out "$OUT/m.uqff"
    measure "$name: load + ISQ $ISQ, 1 token ($WORLD ranks)" \
        $BIN generate --local "$WORLD" --model "$M" "${extra[@]}" --isq "$ISQ" --prompt "Hi" --max-tokens 1 --ignore-eos
    measure "$name: reload UQFF, 1 token ($WORLD ranks)" \
        $BIN generate --local "$WORLD" --model "$M" --from-uqff "$OUT/m.uqff" --prompt "Hi" --max-tokens 1 --ignore-eos
    rm -f "$OUT"/m.uqff*
done
