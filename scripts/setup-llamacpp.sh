#!/usr/bin/env bash
# Build (idempotently) a CPU-only llama.cpp to measure shardwise against
# (see scripts/bench-vs-llamacpp.sh) and print its bin folder as the last line
# of stdout. Progress goes to stderr.
#
# Source:   the PyPI source package llama-cpp-python (default 0.3.36), which
#           vendors llama.cpp under vendor/llama.cpp. It is fetched with
#           `pip download --no-deps --no-binary llama-cpp-python`; nothing is
#           installed into any Python environment.
# Install:  ${SHARDWISE_CACHE:-$HOME/.cache/shardwise}/llama.cpp/
#             bin/         llama-bench, llama-quantize, llama-perplexity and
#                          llama-simple (llama-cli where llama-simple is absent)
#             BUILD_INFO   source, compiler, cmake flags, build seconds
#             tools-venv/  only if cmake had to be installed (pip wheel)
#
# Build:    cmake, Release, -DGGML_NATIVE=ON -DLLAMA_CURL=OFF, static libs (so
#           the binaries can be moved out of the build tree), only the targets
#           above, -j${SHARDWISE_BUILD_JOBS:-2}. About 4 minutes on 2 cores.
#
# An install whose binaries exist and whose `llama-bench --help` runs is reused
# without any download. Set SHARDWISE_LLAMACPP_REBUILD=1 to force a rebuild.
#
# Environment:
#   SHARDWISE_CACHE              cache root (default $HOME/.cache/shardwise)
#   SHARDWISE_LLAMACPP_PYPKG     pip spec (default llama-cpp-python==0.3.36)
#   SHARDWISE_BUILD_JOBS         parallel build jobs (default 2)
#   SHARDWISE_LLAMACPP_REBUILD   1 = rebuild even if an install exists
set -euo pipefail

PKG_SPEC="${SHARDWISE_LLAMACPP_PYPKG:-llama-cpp-python==0.3.36}"
PKG_NAME="${PKG_SPEC%%[=<>!~ ]*}"
CACHE="${SHARDWISE_CACHE:-$HOME/.cache/shardwise}"
PREFIX="$CACHE/llama.cpp"
BIN="$PREFIX/bin"
JOBS="${SHARDWISE_BUILD_JOBS:-2}"
REQUIRED=(llama-bench llama-quantize llama-perplexity)

log() { echo "setup-llamacpp: $*" >&2; }
die() { log "error: $*"; exit 1; }

# --- reuse an existing install -------------------------------------------------
installed_ok() {
    local b
    for b in "${REQUIRED[@]}"; do [[ -x "$BIN/$b" ]] || return 1; done
    [[ -x "$BIN/llama-simple" || -x "$BIN/llama-cli" ]] || return 1
    "$BIN/llama-bench" --help >/dev/null 2>&1 || return 1
}

if [[ "${SHARDWISE_LLAMACPP_REBUILD:-0}" != 1 ]] && installed_ok; then
    log "reusing $BIN ($(grep -m1 '^source:' "$PREFIX/BUILD_INFO" 2>/dev/null || echo 'build info missing'))"
    echo "$BIN"
    exit 0
fi

# --- tools ---------------------------------------------------------------------
command -v python3 >/dev/null || die "python3 not found (needed for pip download)"
python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip is unavailable"

CXX_BIN="${CXX:-}"
if [[ -z "$CXX_BIN" ]]; then
    for c in c++ g++ clang++; do
        if command -v "$c" >/dev/null; then CXX_BIN="$(command -v "$c")"; break; fi
    done
fi
[[ -n "$CXX_BIN" ]] && command -v "$CXX_BIN" >/dev/null \
    || die "no C++ compiler found (install g++ or clang++, or set CXX)"
CC_BIN="${CC:-}"
if [[ -z "$CC_BIN" ]]; then
    for c in cc gcc clang; do
        if command -v "$c" >/dev/null; then CC_BIN="$(command -v "$c")"; break; fi
    done
fi
[[ -n "$CC_BIN" ]] || die "no C compiler found (install gcc or clang, or set CC)"
command -v make >/dev/null || command -v ninja >/dev/null \
    || die "neither make nor ninja found"

# cmake >= 3.14 (llama.cpp's minimum): the system one, else a pip wheel in a
# private venv, else apt-get as a last resort when running as root.
cmake_ok() {
    local v
    v="$("$1" --version 2>/dev/null | sed -n '1s/^cmake version \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
    [[ -n "$v" ]] || return 1
    local major="${v%%.*}" minor="${v#*.}"
    (( major > 3 || (major == 3 && minor >= 14) ))
}
CMAKE=""
TOOLS_VENV="$PREFIX/tools-venv"
if command -v cmake >/dev/null && cmake_ok "$(command -v cmake)"; then
    CMAKE="$(command -v cmake)"
elif [[ -x "$TOOLS_VENV/bin/cmake" ]] && cmake_ok "$TOOLS_VENV/bin/cmake"; then
    CMAKE="$TOOLS_VENV/bin/cmake"
else
    log "cmake not found; installing the cmake wheel into $TOOLS_VENV"
    mkdir -p "$PREFIX"
    if python3 -m venv "$TOOLS_VENV" >&2 \
        && "$TOOLS_VENV/bin/python" -m pip install --disable-pip-version-check \
               --no-cache-dir --only-binary cmake cmake >&2 \
        && cmake_ok "$TOOLS_VENV/bin/cmake"; then
        CMAKE="$TOOLS_VENV/bin/cmake"
    elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        log "pip cmake failed; falling back to apt-get install cmake"
        apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y cmake >&2
        CMAKE="$(command -v cmake)" || true
        [[ -n "$CMAKE" ]] && cmake_ok "$CMAKE" || die "apt-get did not provide a usable cmake"
    else
        die "could not install cmake (pip failed, not root for apt-get)"
    fi
fi
log "cmake: $CMAKE ($("$CMAKE" --version | head -n 1)); C++: $CXX_BIN"

# --- source --------------------------------------------------------------------
TMP="$(mktemp -d "${TMPDIR:-/tmp}/setup-llamacpp.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT

log "downloading the $PKG_SPEC source package (~75 MB)"
# --no-binary only for this package: with :all: pip would also refuse wheels
# for the build dependencies it installs to read the metadata, and compile
# cmake itself from source.
python3 -m pip download --disable-pip-version-check --no-deps --no-cache-dir \
    --no-binary "$PKG_NAME" "$PKG_SPEC" -d "$TMP/dl" >&2
shopt -s nullglob
sdists=("$TMP/dl"/*.tar.gz)
shopt -u nullglob
[[ ${#sdists[@]} -ge 1 ]] || die "pip downloaded no .tar.gz source package"
SDIST="${sdists[0]}"
TOP="$(basename "$SDIST" .tar.gz)"
log "unpacking $TOP/vendor/llama.cpp from $(basename "$SDIST")"
mkdir -p "$TMP/src"
tar xzf "$SDIST" -C "$TMP/src" "$TOP/vendor/llama.cpp"
SRC="$TMP/src/$TOP/vendor/llama.cpp"
[[ -f "$SRC/CMakeLists.txt" ]] || die "no vendor/llama.cpp/CMakeLists.txt in $(basename "$SDIST")"

# --- build ---------------------------------------------------------------------
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DBUILD_SHARED_LIBS=OFF
    -DCMAKE_C_COMPILER="$CC_BIN"
    -DCMAKE_CXX_COMPILER="$CXX_BIN"
)
BUILD="$TMP/build"
start=$(date +%s)
log "configuring: cmake ${CMAKE_FLAGS[*]}"
"$CMAKE" -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}" >&2

# Pick the targets this llama.cpp version defines. llama-simple is preferred to
# llama-cli: recent llama-cli is built on the server code and compiles far longer.
AVAILABLE="$("$CMAKE" --build "$BUILD" --target help 2>/dev/null || true)"
has_target() { grep -Eq "(^|[ .:])$1(:|\$| )" <<<"$AVAILABLE"; }
TARGETS=()
for t in "${REQUIRED[@]}"; do
    has_target "$t" || die "this llama.cpp defines no $t target"
    TARGETS+=("$t")
done
if has_target llama-simple; then
    TARGETS+=(llama-simple)
elif has_target llama-cli; then
    TARGETS+=(llama-cli)
else
    die "this llama.cpp defines neither llama-simple nor llama-cli"
fi

log "building ${TARGETS[*]} with -j$JOBS (about 4 minutes on 2 cores)"
"$CMAKE" --build "$BUILD" --config Release -j"$JOBS" --target "${TARGETS[@]}" >&2
secs=$(( $(date +%s) - start ))

# --- install -------------------------------------------------------------------
mkdir -p "$PREFIX"
NEWBIN="$PREFIX/.bin.new.$$"
rm -rf "$NEWBIN"
mkdir -p "$NEWBIN"
for t in "${TARGETS[@]}"; do
    f="$(find "$BUILD" -type f -name "$t" -perm -u+x -print -quit)"
    [[ -n "$f" ]] || die "built target $t but found no executable for it"
    cp "$f" "$NEWBIN/$t"
done
"$NEWBIN/llama-bench" --help >/dev/null 2>&1 || die "the built llama-bench does not run"
rm -rf "$BIN"
mv "$NEWBIN" "$BIN"

{
    echo "source: $PKG_SPEC (vendor/llama.cpp)"
    commit="$(grep -Eo 'LLAMA_BUILD_COMMIT[^)]*' "$BUILD/CMakeCache.txt" 2>/dev/null | head -n 1 || true)"
    [[ -n "$commit" ]] && echo "llama.cpp: $commit"
    echo "compiler: $("$CXX_BIN" --version | head -n 1)"
    echo "cmake: $("$CMAKE" --version | head -n 1)"
    echo "flags: ${CMAKE_FLAGS[*]}"
    echo "targets: ${TARGETS[*]}"
    echo "jobs: $JOBS"
    echo "build_seconds: $secs"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "machine: $(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1), nproc $(nproc)"
} > "$PREFIX/BUILD_INFO"

log "built ${TARGETS[*]} in ${secs}s (configure + build); installed to $BIN"
echo "$BIN"
