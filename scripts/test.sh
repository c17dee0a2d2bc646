#!/usr/bin/env bash
# The whole test suite: installs dependencies, builds, runs every test through
# CTest, then the AddressSanitizer/UBSan and ThreadSanitizer builds of the
# torch-free layers (scripts/sanitizers.sh, docs/testing.md). This is
# exactly what .ci/run calls.
#
#   ARCHIPELAGO_SANITIZERS=1     (default) the main build and tests, then the sanitizer builds
#   ARCHIPELAGO_SANITIZERS=0     the main build and tests only: a quicker local run
#   ARCHIPELAGO_SANITIZERS=only  the sanitizer builds only
# Arguments go to the main build's ctest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
sanitizers="${ARCHIPELAGO_SANITIZERS:-1}"
case "$sanitizers" in
  0 | 1 | only) ;;
  *) echo "test.sh: ARCHIPELAGO_SANITIZERS='$sanitizers' (expected 1, 0 or only)" >&2; exit 2 ;;
esac
# Each phase's wall time goes to stderr at its end, so a CI log shows where
# the time went (docs/testing.md "Time of the whole test command").
phase_start=$SECONDS
phase_done() {
  echo "test.sh: $1 took $((SECONDS - phase_start)) s" >&2
  phase_start=$SECONDS
}
bash scripts/setup.sh --no-corpus
phase_done "setup"
if [ "$sanitizers" != only ]; then
  build_dir="${ARCHIPELAGO_BUILD_DIR:-build}"
  jobs="${ARCHIPELAGO_JOBS:-$(nproc)}"
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
  cmake --build "$build_dir" -j "$jobs"
  phase_done "the main build"
  ctest --test-dir "$build_dir" --output-on-failure -j "$jobs" "$@"
  phase_done "the main build's tests"
fi
if [ "$sanitizers" != 0 ]; then
  bash scripts/sanitizers.sh
  phase_done "the sanitizer builds and their tests"
fi
