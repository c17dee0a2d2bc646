#!/usr/bin/env bash
# The sanitizer builds of the torch-free layers (docs/testing.md), run by
# scripts/test.sh after the main build; alone it needs the packages that
# scripts/setup.sh installs.
#
#   scripts/sanitizers.sh             # both
#   scripts/sanitizers.sh asan        # AddressSanitizer + UBSan: core, comm, data, plan, report
#   scripts/sanitizers.sh tsan        # ThreadSanitizer: comm
#
# Each build tree is torch-free and builds only the test binaries it runs.
# Any report fails its test, and any failed test fails this script.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
jobs="${ARCHIPELAGO_JOBS:-$(nproc)}"
which="${1:-all}"
case "$which" in
  all | asan | tsan) ;;
  *) echo "sanitizers.sh: unknown build '$which' (expected asan, tsan or nothing for both)" >&2; exit 2 ;;
esac

# ASan: halt at the first error (the default, said out loud); leaks are
# reported when a test process exits; returning a pointer to a dead stack
# frame and static initialisers that read other files' globals are caught
# too. A user's own ASAN_OPTIONS come last and win.
export ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
# UBSan: stop at the first report with a stack (the build also passes
# -fno-sanitize-recover=all, so the process exits non-zero).
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# TSan: halt at the first race. Multi-process tests fork ranks that end
# with _exit(), which skips TSan's exit-status check, so a race inside a
# rank must kill the rank to fail the test. Lock-order reports show both
# stacks. die_after_fork stays at its default (on): ranks are forked before
# the parent starts any thread, and a fork from a threaded parent should fail.
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"

# configure_build DIR SANITIZERS TARGETS...: a torch-free tree with the
# sanitizers on every target. -Og -g1 instead of RelWithDebInfo's -O2 -g1:
# UBSan's checks at -O2 double the compile time, -Og keeps every check, and
# line tables are all a report's stack needs.
configure_build() {
  local dir="$1" san="$2"
  shift 2
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-Og -g1 -DNDEBUG" \
    -DARCHIPELAGO_WITH_TORCH=OFF -DARCHIPELAGO_WITH_GLOO=OFF -DARCHIPELAGO_BUILD_BENCH=OFF \
    "-DARCHIPELAGO_SANITIZE=$san"
  cmake --build "$dir" -j "$jobs" --target "$@"
}

# Labels select the suites that were built (the CLI's e2e tests were not).
if [ "$which" = all ] || [ "$which" = asan ]; then
  configure_build build-asan address,undefined test_core test_comm test_data test_plan test_report
fi
if [ "$which" = all ] || [ "$which" = tsan ]; then
  configure_build build-tsan thread test_comm
fi
# Both suites run even when the first fails, so one CI run shows every report.
status=0
if [ "$which" = all ] || [ "$which" = asan ]; then
  ctest --test-dir build-asan --output-on-failure -j "$jobs" -L '^(core|comm|data|plan|report)$' || status=1
fi
if [ "$which" = all ] || [ "$which" = tsan ]; then
  ctest --test-dir build-tsan --output-on-failure -j "$jobs" -L '^comm$' || status=1
fi
exit "$status"
