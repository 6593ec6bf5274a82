#!/usr/bin/env bash
# Decode speed: shardwise vs. llama.cpp on SmolLM2-135M-Instruct, measured in
# the same run on this machine and printed as a markdown table.
#
# Usage: scripts/bench-vs-llamacpp.sh
#
# For each weight format (Q4_1 as downloaded, then Q8_0, Q4_0 and F32 made from
# it with `llama-quantize --allow-requantize`, cached next to the model), the
# two sides run back to back on the SAME .gguf file:
#   llama.cpp  llama-bench -m FILE -p 5 -n 64 -t 2 -r 3 -o json
#              (tg64 = mean of 3 runs of 64 generated tokens, pp5 = 5-token prompt)
#   shardwise  shardwise generate --local W --model FILE \
#                  --prompt "The capital of France is" --max-tokens 64 --ignore-eos
#              for W = 1 and 2, 3 runs each (alternating), median of the
#              "decode Y tokens/s" figure it prints on stderr.
# The prompt is 5 tokens, like llama-bench's -p 5. If the binary does not know
# --ignore-eos it runs without it (and may stop early at EOS; the table says so).
#
# Environment:
#   SHARDWISE_BIN          shardwise binary (default target/release/shardwise;
#                          it is not built here). If it is missing, the script
#                          waits up to SHARDWISE_BIN_WAIT seconds (default 300).
#   SHARDWISE_CACHE        cache root (default $HOME/.cache/shardwise)
#   LLAMACPP_BIN           folder with llama-bench and llama-quantize (default:
#                          what scripts/setup-llamacpp.sh builds or finds)
#   SHARDWISE_RUN_TIMEOUT  seconds allowed for each single run (default 180)
#
# Raw output of every run goes to target/bench-vs-llamacpp-<date>.log under the
# repository root. Exit status 1 if any measurement failed (the table is still
# printed, with "failed" in that cell).
set -euo pipefail

PROMPT="The capital of France is"
N_PROMPT=5
N_GEN=64
THREADS=2
REPS=3
WORLDS=(1 2)
QUANTS=(Q8_0 Q4_0 F32)

log() { echo "bench-vs-llamacpp: $*" >&2; }
die() { log "error: $*"; exit 1; }

case "${1:-}" in
    "") ;;
    -h|--help) sed -n '2,30s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1 (try --help)" ;;
esac

command -v python3 >/dev/null || die "python3 not found (needed to parse results)"
command -v timeout >/dev/null || die "timeout(1) not found"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/.." && pwd))"
CACHE="${SHARDWISE_CACHE:-$HOME/.cache/shardwise}"
RUN_TIMEOUT="${SHARDWISE_RUN_TIMEOUT:-180}"
SW_BIN="${SHARDWISE_BIN:-$ROOT/target/release/shardwise}"
BIN_WAIT="${SHARDWISE_BIN_WAIT:-300}"

mkdir -p "$ROOT/target"
STAMP="$(date +%Y%m%d-%H%M%S)"
LOG="$ROOT/target/bench-vs-llamacpp-$STAMP.log"
: > "$LOG"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/bench-vs-llamacpp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

# --- peers and model -----------------------------------------------------------
if [[ -n "${LLAMACPP_BIN:-}" ]]; then
    LBIN="$LLAMACPP_BIN"
else
    log "preparing llama.cpp (scripts/setup-llamacpp.sh)"
    LBIN="$(bash "$SCRIPT_DIR/setup-llamacpp.sh" | tail -n 1)" \
        || die "scripts/setup-llamacpp.sh failed"
fi
[[ -x "$LBIN/llama-bench" && -x "$LBIN/llama-quantize" ]] \
    || die "no llama-bench / llama-quantize in '$LBIN'"

log "fetching the model (scripts/get-smollm2.sh)"
MODEL="$(bash "$SCRIPT_DIR/get-smollm2.sh" | tail -n 1)" || die "scripts/get-smollm2.sh failed"
[[ -s "$MODEL" ]] || die "model '$MODEL' missing"
MODELS_DIR="$(dirname "$MODEL")"
BASE="$(basename "$MODEL")"
BASE="${BASE%.gguf}"
ORIG_TYPE="${BASE##*.}"      # Q4_1
STEM="${BASE%.*}"            # SmolLM2-135M-Instruct

declare -A FILE
LABELS=("$ORIG_TYPE")
FILE[$ORIG_TYPE]="$MODEL"
for q in "${QUANTS[@]}"; do
    out="$MODELS_DIR/$STEM.$q.gguf"
    if [[ ! -s "$out" ]]; then
        log "making $out with llama-quantize --allow-requantize"
        part="$MODELS_DIR/.$STEM.$q.gguf.part.$$"
        if ! "$LBIN/llama-quantize" --allow-requantize "$MODEL" "$part" "$q" "$THREADS" >>"$LOG" 2>&1; then
            rm -f "$part"
            die "llama-quantize to $q failed (see $LOG)"
        fi
        mv -f "$part" "$out"
    else
        log "reusing $out"
    fi
    LABELS+=("$q")
    FILE[$q]="$out"
done

# Tensor types of a GGUF, e.g. "210 q4_1, 61 f32, 1 q8_0" (header only).
gguf_types() {
    python3 - "$1" <<'PYEOF'
import struct, sys, collections
NAMES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0",
         10: "q2_k", 11: "q3_k", 12: "q4_k", 13: "q5_k", 14: "q6_k", 15: "q8_k", 30: "bf16"}
f = open(sys.argv[1], "rb")
def rd(fmt):
    return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))
def rs():
    n, = rd("Q"); return f.read(n)
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
def skip(t):
    if t == 8:
        rs()
    elif t == 9:
        at, n = rd("IQ")
        if at in SCALAR:
            f.seek(n * struct.calcsize("<" + SCALAR[at]), 1)
        else:
            for _ in range(n):
                skip(at)
    else:
        rd(SCALAR[t])
if f.read(4) != b"GGUF":
    sys.exit("not a GGUF")
_, n_tensors, n_kv = rd("IQQ")
for _ in range(n_kv):
    rs(); t, = rd("I"); skip(t)
c = collections.Counter()
for _ in range(n_tensors):
    rs(); nd, = rd("I"); rd("Q" * nd); t, _ = rd("IQ")
    c[NAMES.get(t, f"type{t}")] += 1
print(", ".join(f"{n} {k}" for k, n in c.most_common()))
PYEOF
}

# --- shardwise -----------------------------------------------------------------
waited=0
while [[ ! -x "$SW_BIN" ]]; do
    (( waited < BIN_WAIT )) || die "$SW_BIN not found after ${BIN_WAIT}s (it is not built by this script)"
    (( waited == 0 )) && log "waiting for $SW_BIN to appear (up to ${BIN_WAIT}s)"
    sleep 10
    waited=$((waited + 10))
done
IGNORE_EOS=(--ignore-eos)
if ! "$SW_BIN" generate --help 2>/dev/null | grep -q -- '--ignore-eos'; then
    log "note: $SW_BIN generate has no --ignore-eos; running without it"
    IGNORE_EOS=()
fi
SW_VERSION="$("$SW_BIN" --version 2>/dev/null || echo shardwise)"

# One shardwise run; prints "prefill_tps decode_tps new_tokens" or returns 1.
sw_once() {
    local w="$1" file="$2" err="$TMP/sw.err" rc=0
    [[ -e "$TMP/no-ignore-eos" ]] && IGNORE_EOS=()
    timeout "$RUN_TIMEOUT" "$SW_BIN" generate --local "$w" --model "$file" \
        --prompt "$PROMPT" --max-tokens "$N_GEN" "${IGNORE_EOS[@]}" \
        >"$TMP/sw.out" 2>"$err" || rc=$?
    { echo "### shardwise --local $w $file ${IGNORE_EOS[*]} (rc $rc)"; cat "$TMP/sw.out" "$err"; } >>"$LOG"
    if (( rc != 0 )) && [[ ${#IGNORE_EOS[@]} -gt 0 ]] && grep -q -- "--ignore-eos" "$err"; then
        log "note: the binary rejects --ignore-eos; running without it from now on"
        touch "$TMP/no-ignore-eos"
        return 2
    fi
    (( rc == 0 )) || return 1
    sed -nE 's/.*prompt ([0-9]+) tokens: prefill ([0-9.]+) tokens\/s; generated ([0-9]+) tokens: decode ([0-9.]+) tokens\/s.*/\2 \4 \3/p' "$err" | tail -n 1 | grep . || return 1
}

# With retries: a binary being replaced mid-run, or rejecting --ignore-eos.
sw_run() {
    local attempt r out
    for attempt in 1 2 3; do
        r=0; out="$(sw_once "$@")" || r=$?
        if (( r == 0 )); then echo "$out"; return 0; fi
        if (( r == 2 )); then continue; fi
        log "shardwise --local $1 failed (attempt $attempt, see $LOG); retrying in 15 s"
        sleep 15
        [[ -x "$SW_BIN" ]] || sleep 30
    done
    return 1
}

median() { tr ' ' '\n' | { grep . || true; } | sort -g | awk '{a[NR]=$1} END {if (NR==0) print ""; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }

# --- runs, interleaved per weight format ----------------------------------------
declare -A LL_TG LL_TG_SD LL_PP LL_SIZE SW_DEC SW_PRE SW_TOK TYPES
FAILED=0
START=$(date +%s)
LOAD_START="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
for label in "${LABELS[@]}"; do
    file="${FILE[$label]}"
    TYPES[$label]="$(gguf_types "$file" 2>/dev/null || echo '?')"
    log "[$label] llama-bench ($(du -hL "$file" | cut -f1), ${TYPES[$label]})"
    if "$LBIN/llama-bench" -m "$file" -p "$N_PROMPT" -n "$N_GEN" -t "$THREADS" -r "$REPS" -o json \
            >"$TMP/ll.json" 2>"$TMP/ll.err"; then
        { echo "### llama-bench $file"; cat "$TMP/ll.json" "$TMP/ll.err"; } >>"$LOG"
        read -r pp tg tgsd size < <(python3 - "$TMP/ll.json" <<'PYEOF'
import json, sys
rows = json.load(open(sys.argv[1]))
pp = next((r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0), None)
tg = next((r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0), None)
f = lambda r, k: f"{r[k]:.1f}" if r else "nan"
size = f"{rows[0]['model_size'] / 2**20:.0f}MiB" if rows and "model_size" in rows[0] else "?"
print(f(pp, "avg_ts"), f(tg, "avg_ts"), f(tg, "stddev_ts"), size)
PYEOF
        ) || { pp=nan; tg=nan; tgsd=nan; size='?'; }
    else
        { echo "### llama-bench $file FAILED"; cat "$TMP/ll.json" "$TMP/ll.err"; } >>"$LOG"
        log "[$label] llama-bench failed (see $LOG)"
        pp=nan; tg=nan; tgsd=nan; size='?'; FAILED=1
    fi
    LL_PP[$label]="$pp"; LL_TG[$label]="$tg"; LL_TG_SD[$label]="$tgsd"; LL_SIZE[$label]="$size"
    log "[$label] llama.cpp tg$N_GEN $tg t/s, pp$N_PROMPT $pp t/s"

    declare -A dec=() pre=() tok=()
    for ((rep = 1; rep <= REPS; rep++)); do
        for w in "${WORLDS[@]}"; do
            if res="$(sw_run "$w" "$file")"; then
                read -r p d n <<<"$res"
                pre[$w]+="$p "; dec[$w]+="$d "; tok[$w]+="$n "
                log "[$label] shardwise TP=$w run $rep: decode $d t/s, prefill $p t/s, $n tokens"
            else
                log "[$label] shardwise TP=$w run $rep failed"
            fi
        done
    done
    for w in "${WORLDS[@]}"; do
        SW_DEC[$label,$w]="$(median <<<"${dec[$w]:-}")"
        SW_PRE[$label,$w]="$(median <<<"${pre[$w]:-}")"
        SW_TOK[$label,$w]="$(tr ' ' '\n' <<<"${tok[$w]:-}" | { grep . || true; } | sort -un | paste -sd/ -)"
        [[ -n "${SW_DEC[$label,$w]}" ]] || FAILED=1
    done
    unset dec pre tok
done
ELAPSED=$(( $(date +%s) - START ))
LOAD_END="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"

# --- table -------------------------------------------------------------------------
cell() { [[ -n "$1" && "$1" != nan ]] && echo "$1" || echo failed; }
ratio() { python3 -c 'import sys
try: print(f"{float(sys.argv[1]) / float(sys.argv[2]):.2f}")
except Exception: print("n/a")' "$1" "$2"; }

CPU="$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1)"
LL_SRC="$(sed -n 's/^source: //p' "$LBIN/../BUILD_INFO" 2>/dev/null | head -n 1)"
EOS_NOTE="--ignore-eos"
[[ -e "$TMP/no-ignore-eos" ]] && IGNORE_EOS=()
[[ ${#IGNORE_EOS[@]} -gt 0 ]] || EOS_NOTE="without --ignore-eos (binary lacks it; may stop at EOS)"

echo "## SmolLM2-135M-Instruct: decode tokens/s, shardwise vs. llama.cpp"
echo
echo "- machine: ${CPU:-unknown CPU}, nproc $(nproc); load average $LOAD_START at start, $LOAD_END at end"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC') (all rows measured in this one run, ${ELAPSED}s)"
echo "- llama.cpp: ${LL_SRC:-llama.cpp} CPU build, \`llama-bench -p $N_PROMPT -n $N_GEN -t $THREADS -r $REPS\` (mean ± sd of $REPS)"
echo "- shardwise: $SW_VERSION, \`generate --local W --max-tokens $N_GEN\` $EOS_NOTE, prompt \"$PROMPT\" ($N_PROMPT tokens), median of $REPS runs"
echo "- both sides read the same .gguf per row; Q8_0, Q4_0 and F32 are made from the $ORIG_TYPE file with \`llama-quantize --allow-requantize\`"
echo
echo "| weights | llama.cpp tg$N_GEN t/s ($THREADS threads) | shardwise TP=1 | shardwise TP=2 | ratio TP=1/llama.cpp |"
echo "|---|---:|---:|---:|---:|"
for label in "${LABELS[@]}"; do
    ll="$(cell "${LL_TG[$label]}")"
    [[ "$ll" != failed ]] && ll="$ll ± ${LL_TG_SD[$label]}"
    echo "| $label | $ll | $(cell "${SW_DEC[$label,1]}") | $(cell "${SW_DEC[$label,2]}") | $(ratio "${SW_DEC[$label,1]}" "${LL_TG[$label]}") |"
done
echo
echo "Prefill of the $N_PROMPT-token prompt (tokens/s), same runs:"
echo
echo "| weights | llama.cpp pp$N_PROMPT | shardwise TP=1 | shardwise TP=2 |"
echo "|---|---:|---:|---:|"
for label in "${LABELS[@]}"; do
    echo "| $label | $(cell "${LL_PP[$label]}") | $(cell "${SW_PRE[$label,1]}") | $(cell "${SW_PRE[$label,2]}") |"
done
echo
echo "Files (tensor types):"
echo
for label in "${LABELS[@]}"; do
    echo "- $label: $(basename "${FILE[$label]}"), ${LL_SIZE[$label]}, ${TYPES[$label]}; shardwise generated ${SW_TOK[$label,1]:-?} (TP=1) / ${SW_TOK[$label,2]:-?} (TP=2) tokens"
done
log "raw output: $LOG"
exit "$FAILED"
