#!/usr/bin/env bash
# Installs what the test suite needs beyond cargo: iproute2 (`ip`, for the multi-host tests
# in network namespaces). Idempotent; does nothing when everything is present. Without root
# or a package manager it says what is missing and the namespace tests skip themselves.
set -euo pipefail

missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: missing ${missing[*]} and not root; the multi-host tests will be skipped" >&2
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  echo "install-test-deps: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
elif command -v dnf >/dev/null 2>&1; then
  dnf install -y -q "${missing[@]}"
else
  echo "install-test-deps: no apt-get or dnf; install ${missing[*]} by hand or the multi-host tests skip" >&2
fi
