#!/usr/bin/env bash
# All-reduce: shardwise vs. PyTorch Gloo (ring all-reduce over loopback TCP),
# measured in the same run, world 2 and world 4, and printed as a markdown table.
#
# Usage: scripts/bench-vs-gloo.sh [--sizes 4K,1M,16M,64M,256M] [--iters 10]
#                                 [--transports grpc,shm] [--worlds 2,4]
#
# Environment:
#   SHARDWISE_BIN          use this shardwise binary instead of building
#                          target/release/shardwise with cargo
#   GLOO_SCRIPT            the Gloo peer script (default: ../shared/peers/
#                          gloo_allreduce.py next to the repository root)
#   SHARDWISE_PEERS_PY     python with torch to run it (default: the venv that
#                          scripts/setup-peers.sh creates or finds)
#   SHARDWISE_BENCH_TIMEOUT  seconds allowed for each single run (default 1800)
#
# busbw is computed for both sides from bytes and the median time, as
# nccl-tests defines it: busbw = bytes / median * 2(n-1)/n (GB = 1e9 bytes).
# Raw output of every run goes to target/bench-vs-gloo-<date>.log under the
# current directory.
set -euo pipefail

SIZES="4K,1M,16M,64M,256M"
ITERS=10
TRANSPORTS="grpc,shm"
WORLDS="2,4"

die() { echo "bench-vs-gloo: error: $*" >&2; exit 1; }
log() { echo "bench-vs-gloo: $*" >&2; }
usage() { sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --sizes) [[ $# -ge 2 ]] || die "--sizes needs a value"; SIZES="$2"; shift 2 ;;
        --sizes=*) SIZES="${1#*=}"; shift ;;
        --iters) [[ $# -ge 2 ]] || die "--iters needs a value"; ITERS="$2"; shift 2 ;;
        --iters=*) ITERS="${1#*=}"; shift ;;
        --transports) [[ $# -ge 2 ]] || die "--transports needs a value"; TRANSPORTS="$2"; shift 2 ;;
        --transports=*) TRANSPORTS="${1#*=}"; shift ;;
        --worlds) [[ $# -ge 2 ]] || die "--worlds needs a value"; WORLDS="$2"; shift 2 ;;
        --worlds=*) WORLDS="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ "$ITERS" =~ ^[1-9][0-9]*$ ]] || die "--iters must be a positive integer, got '$ITERS'"
[[ "$SIZES" =~ ^[0-9]+[KMG]?(,[0-9]+[KMG]?)*$ ]] || die "--sizes must look like 4K,1M,16M, got '$SIZES'"
[[ "$TRANSPORTS" =~ ^[A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*$ ]] || die "--transports must look like grpc,shm, got '$TRANSPORTS'"
[[ "$WORLDS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--worlds must look like 2,4, got '$WORLDS'"
IFS=, read -r -a TRANSPORT_LIST <<<"$TRANSPORTS"
IFS=, read -r -a WORLD_LIST <<<"$WORLDS"

command -v python3 >/dev/null || die "python3 not found (needed to parse results)"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null || (cd "$SCRIPT_DIR/.." && pwd))"

# --- the Gloo peer -----------------------------------------------------------
GLOO_SCRIPT="${GLOO_SCRIPT:-$ROOT/../shared/peers/gloo_allreduce.py}"
[[ -f "$GLOO_SCRIPT" ]] || die "Gloo peer script not found at '$GLOO_SCRIPT' (set GLOO_SCRIPT to its path)"

if [[ -n "${SHARDWISE_PEERS_PY:-}" ]]; then
    PEER_PY="$SHARDWISE_PEERS_PY"
else
    log "preparing the peer venv (scripts/setup-peers.sh)"
    PEER_PY="$("$ROOT/scripts/setup-peers.sh" | tail -n 1)" \
        || die "scripts/setup-peers.sh failed; cannot run the Gloo peer"
fi
[[ -x "$PEER_PY" ]] || die "peer python '$PEER_PY' is not executable"

# --- our binary --------------------------------------------------------------
if [[ -n "${SHARDWISE_BIN:-}" ]]; then
    BIN="$SHARDWISE_BIN"
else
    command -v cargo >/dev/null || die "cargo not found; build shardwise or set SHARDWISE_BIN"
    log "building shardwise (cargo build --release --bin shardwise)"
    (cd "$ROOT" && cargo build --release --bin shardwise >&2) || die "cargo build failed"
    TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
    [[ "$TARGET_DIR" = /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
    BIN="$TARGET_DIR/release/shardwise"
fi
[[ -x "$BIN" ]] || die "shardwise binary not found or not executable at '$BIN' (set SHARDWISE_BIN)"

# --- bookkeeping -------------------------------------------------------------
RUN_TIMEOUT="${SHARDWISE_BENCH_TIMEOUT:-1800}"
TIMEOUT=()
command -v timeout >/dev/null && TIMEOUT=(timeout --kill-after=10 "$RUN_TIMEOUT")

mkdir -p target
LOG="$PWD/target/bench-vs-gloo-$(date +%Y%m%d-%H%M%S).log"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/bench-vs-gloo.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

{
    echo "# bench-vs-gloo $(date -Iseconds)"
    echo "# sizes=$SIZES iters=$ITERS transports=$TRANSPORTS worlds=$WORLDS"
    echo "# host: $(uname -srm), $(nproc 2>/dev/null || echo '?') cores"
    echo "# shardwise: $BIN ($(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo 'no git'))"
    echo "# gloo peer: $GLOO_SCRIPT"
    echo "# torch: $("$PEER_PY" -W ignore -c 'import torch; print(torch.__version__)' 2>/dev/null || echo '?')"
} >"$LOG"

free_port() {
    local port i
    for i in $(seq 1 50); do
        port=$((29500 + RANDOM % 1000))
        if python3 -c 'import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.close()' "$port" 2>/dev/null; then
            echo "$port"; return 0
        fi
    done
    die "no free port found in 29500-30499"
}

# run NAME CMD...: stdout -> $WORK/NAME.out, stderr -> $WORK/NAME.err,
# exit code -> $WORK/NAME.rc; everything is appended to the log. Never fails.
run() {
    local name="$1"; shift
    local rc=0
    log "$name: $*"
    "${TIMEOUT[@]}" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" || rc=$?
    echo "$rc" >"$WORK/$name.rc"
    {
        echo
        echo "## $name (exit $rc): $*"
        cat "$WORK/$name.out"
        sed 's/^/# stderr: /' "$WORK/$name.err"
    } >>"$LOG"
    if [[ $rc -ne 0 ]]; then
        log "$name failed (exit $rc): $(tail -n 1 "$WORK/$name.err")"
    fi
}

for w in "${WORLD_LIST[@]}"; do
    run "gloo-w$w" "$PEER_PY" "$GLOO_SCRIPT" --world "$w" --sizes "$SIZES" \
        --iters "$ITERS" --port "$(free_port)"
    for t in "${TRANSPORT_LIST[@]}"; do
        run "ours-w$w-$t" "$BIN" bench allreduce --world "$w" --transport "$t" \
            --sizes "$SIZES" --iters "$ITERS" --json
    done
done

# --- report ------------------------------------------------------------------
python3 - "$WORK" "$WORLDS" "$TRANSPORTS" "$SIZES" >"$WORK/table.md" <<'PY'
import json, os, sys

work, worlds, transports, sizes = sys.argv[1:5]
worlds = [int(w) for w in worlds.split(",")]
transports = transports.split(",")
MULT = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s):
    return int(s[:-1]) * MULT[s[-1]] if s[-1] in MULT else int(s)


requested = [parse_size(s) for s in sizes.split(",")]
notes = []


def read(name):
    path = os.path.join(work, name + ".out")
    rc_path = os.path.join(work, name + ".rc")
    rc = int(open(rc_path).read().strip()) if os.path.exists(rc_path) else None
    lines = open(path, errors="replace").read().splitlines() if os.path.exists(path) else []
    return rc, lines


def last_err(name):
    path = os.path.join(work, name + ".err")
    if not os.path.exists(path):
        return ""
    lines = [l for l in open(path, errors="replace").read().splitlines() if l.strip()]
    return lines[-1].strip()[:160] if lines else ""


def busbw(nbytes, median_s, world):
    if not median_s or median_s <= 0:
        return None
    return nbytes / median_s / 1e9 * 2 * (world - 1) / world


def parse_gloo(world):
    """'gloo world=2 bytes=1048576 median_s=... algbw_GBps=... busbw_GBps=...'"""
    rc, lines = read(f"gloo-w{world}")
    out = {}
    for line in lines:
        toks = line.split()
        if not toks or toks[0] != "gloo":
            continue
        kv = dict(t.split("=", 1) for t in toks[1:] if "=" in t)
        try:
            if int(kv.get("world", world)) != world:
                continue
            out[int(kv["bytes"])] = float(kv["median_s"])
        except (KeyError, ValueError):
            continue
    if rc != 0:
        notes.append(f"gloo world {world} exited {rc}: {last_err(f'gloo-w{world}')}")
    return out


def parse_ours(world, transport):
    """One JSON object per line: transport, world, dtype, bytes, median_s, algbw_gbps, busbw_gbps."""
    name = f"ours-w{world}-{transport}"
    rc, lines = read(name)
    out = {}
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
            nbytes, med = int(rec["bytes"]), float(rec["median_s"])
        except (ValueError, KeyError, TypeError):
            continue
        if "world" in rec and int(rec["world"]) != world:
            continue
        if "transport" in rec and str(rec["transport"]).lower() != transport.lower():
            notes.append(f"{name}: line reports transport {rec['transport']!r}")
        dtype = str(rec.get("dtype", "?"))
        if dtype.lower() not in ("f32", "float32", "?"):
            notes.append(f"{name}: dtype {dtype} (the Gloo peer uses float32)")
        rep = rec.get("busbw_gbps")
        calc = busbw(nbytes, med, world)
        if isinstance(rep, (int, float)) and calc and calc > 1e-3 and abs(rep - calc) > 0.05 * calc:
            notes.append(f"{name} {nbytes} B: reported busbw_gbps {rep:.3f} != bytes/median*2(n-1)/n = {calc:.3f}"
                         " (table uses the latter)")
        out[nbytes] = med
    if rc != 0:
        notes.append(f"{transport} world {world} failed (exit {rc}): {last_err(name)}")
    elif not out:
        notes.append(f"{transport} world {world}: no JSON result lines on stdout")
    return out


def fmt_bw(v):
    return "n/a" if v is None else f"{v:.3f}"


def fmt_ms(s):
    if s is None:
        return "n/a"
    ms = s * 1e3
    return f"{ms:.3f}" if ms >= 0.1 else f"{ms:.4f}"


def fmt_ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


head = ["world", "bytes", "gloo busbw GB/s", "gloo median ms"]
for t in transports:
    head += [f"{t} busbw GB/s", f"{t} median ms", f"{t}/gloo busbw", f"{t}/gloo latency"]
rows = []
for w in worlds:
    gloo = parse_gloo(w)
    ours = {t: parse_ours(w, t) for t in transports}
    sizes_w = list(requested)
    for d in [gloo, *ours.values()]:
        sizes_w += [b for b in d if b not in sizes_w]
    sizes_w.sort()
    smallest = sizes_w[0] if sizes_w else None
    for b in sizes_w:
        g_med = gloo.get(b)
        g_bw = busbw(b, g_med, w)
        row = [str(w), str(b), fmt_bw(g_bw), fmt_ms(g_med)]
        for t in transports:
            o_med = ours[t].get(b)
            o_bw = busbw(b, o_med, w)
            lat = fmt_ratio(o_med, g_med) if b == smallest else ""
            row += [fmt_bw(o_bw), fmt_ms(o_med), fmt_ratio(o_bw, g_bw), lat]
        rows.append(row)

print("| " + " | ".join(head) + " |")
print("|" + "|".join("---:" if i != 0 else "---" for i in range(len(head))) + "|")
for r in rows:
    print("| " + " | ".join(r) + " |")
print()
print("busbw = bytes / median * 2(n-1)/n (GB = 1e9 B), from each side's median time."
      " `x/gloo busbw` > 1: ours moves more data per second;"
      " `x/gloo latency` (smallest size only) = our median / gloo median, < 1: ours is quicker.")
seen = set()
for n in notes:
    if n not in seen:
        seen.add(n)
        print(f"- {n}")
PY

{ echo; echo "## table"; cat "$WORK/table.md"; } >>"$LOG"
cat "$WORK/table.md"
log "raw output: $LOG"
