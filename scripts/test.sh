#!/usr/bin/env bash
# The whole test suite: installs dependencies, builds, runs every test through
# CTest. This is exactly what .ci/run calls.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh --no-corpus
build_dir="${ARCHIPELAGO_BUILD_DIR:-build}"
jobs="${ARCHIPELAGO_JOBS:-$(nproc)}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build_dir" -j "$jobs"
ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" "$@"
