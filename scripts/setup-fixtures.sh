#!/usr/bin/env bash
# Regenerate the reference fixtures in tests/fixtures/ (see its README.md).
#
#   1. scripts/setup-peers.sh provides the Python venv with torch;
#   2. the pinned packages below are installed into it when missing or at
#      another version;
#   3. scripts/fixtures/make_fixtures.py writes the fixtures (it fetches the
#      SmolLM2 GGUF into the cache through scripts/get-smollm2.sh).
#
# Idempotent: a second run installs nothing and rewrites identical files.
# Extra arguments go to make_fixtures.py (e.g. --only tiny).
# Progress goes to stderr except for make_fixtures.py's summary; the python
# used is printed too.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

PINS=(
    "transformers==5.24.0"
    "tokenizers==0.23.3"
    "gguf==0.19.0"
    "accelerate==1.15.0"
    "safetensors==0.8.0"
    "numpy==2.4.6"
)

log() { echo "setup-fixtures: $*" >&2; }

PY="$(bash "$HERE/setup-peers.sh" | tail -n 1)"
[[ -x "$PY" ]] || { log "error: setup-peers.sh gave no usable python ('$PY')"; exit 1; }
log "python: $PY"

# Which pins are missing or at another version?
missing="$("$PY" - "${PINS[@]}" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
out = []
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != want:
        out.append(spec)
print(" ".join(out))
PYEOF
)"

if [[ -n "$missing" ]]; then
    log "installing: $missing"
    "$PY" -m pip install --disable-pip-version-check "${PINS[@]}" >&2
else
    log "pinned packages present: ${PINS[*]}"
fi

cd "$ROOT"
"$PY" "$HERE/fixtures/make_fixtures.py" "$@"
echo "python: $PY"
