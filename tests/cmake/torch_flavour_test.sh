#!/usr/bin/env bash
# The configure-time rules of the python build flavour
# (cmake/TorchFlavour.cmake, docs/devices.md "Build flavours"), run through
# the real module in a scratch project that compiles nothing:
#   - Debian's python3-torch (a real PyTorch without CUDA) with
#     ARCHIPELAGO_CUDA=on stops and says the libtorch has no CUDA;
#   - the same with ARCHIPELAGO_CUDA=auto configures a CPU build and names
#     the flavour (version, backend, ABI, import);
#   - a PyTorch that reports the old C++ ABI (a stand-in module saying what
#     a pip wheel before 2.7 says) stops with the ABI rule;
#   - a python without torch stops and says so.
# Exits 77 (skipped) where Debian's python3-torch is not installed.
#   torch_flavour_test.sh SOURCE_DIR [CMAKE]
set -euo pipefail
src="$1" cmake="${2:-cmake}"
debian_py=/usr/bin/python3
"$debian_py" -c 'import torch' 2>/dev/null || { echo "skipped: $debian_py cannot import torch (python3-torch)"; exit 77; }
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/project"
cat > "$tmp/project/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.25)
project(torch_flavour_probe LANGUAGES CXX)
list(APPEND CMAKE_MODULE_PATH "$src/cmake")
include(TorchFlavour)
archipelago_find_torch()
EOF

# A torch module that reports what a CUDA 12.4 wheel of PyTorch 2.5 built
# with the old ABI reports (the probe reads only these attributes).
mkdir -p "$tmp/oldabi/torch"
cat > "$tmp/oldabi/torch/__init__.py" <<'EOF'
__version__ = "2.5.1+cu124"
class _C:
    _GLIBCXX_USE_CXX11_ABI = False
class version:
    cuda = "12.4"
    hip = None
class utils:
    cmake_prefix_path = "/nonexistent/share/cmake"
EOF
printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$tmp/oldabi" "$debian_py" > "$tmp/python-oldabi"
printf '#!/bin/sh\nexec %s -S "$@"\n' "$debian_py" > "$tmp/python-notorch"  # -S: no dist-packages
chmod +x "$tmp/python-oldabi" "$tmp/python-notorch"

passed=0 failed=0
# case NAME EXPECT(ok|fail) REGEX CMAKE-ARGS...: configure, then check the
# outcome and that REGEX (extended) matches what configure printed.
case_() {
  local name="$1" expect="$2" text="$3"; shift 3
  local got=ok
  "$cmake" -S "$tmp/project" -B "$tmp/build" -DARCHIPELAGO_TORCH=python "$@" > "$tmp/out.txt" 2>&1 || got=fail
  # CMake wraps long messages: compare with the line breaks taken out.
  if [ "$got" = "$expect" ] && tr -s ' \n' ' ' < "$tmp/out.txt" | grep -qE -- "$text"; then
    echo "PASS $name"; passed=$((passed + 1))
  else
    echo "FAIL $name: expected $expect with '$text', got $got:"; sed 's/^/    /' "$tmp/out.txt"; failed=$((failed + 1))
  fi
}

case_ cuda_required_but_cpu_torch fail "ARCHIPELAGO_CUDA=on, but the libtorch found has no CUDA \(python: PyTorch 1\.13" \
  -DARCHIPELAGO_PYTHON="$debian_py" -DARCHIPELAGO_CUDA=on
case_ cpu_torch_auto ok \
  "torch flavour python: PyTorch 1\.13[^ ]* \([^)]*\), CPU only, _GLIBCXX_USE_CXX11_ABI=1, imported via direct; ARCHIPELAGO_WITH_CUDA=OFF" \
  -DARCHIPELAGO_PYTHON="$debian_py" -DARCHIPELAGO_CUDA=auto
case_ old_abi_wheel fail "was built with _GLIBCXX_USE_CXX11_ABI=0, but yaml-cpp, fmt and spdlog here use _GLIBCXX_USE_CXX11_ABI=1" \
  -DARCHIPELAGO_PYTHON="$tmp/python-oldabi" -DARCHIPELAGO_CUDA=auto
case_ python_without_torch fail "cannot import torch" \
  -DARCHIPELAGO_PYTHON="$tmp/python-notorch" -DARCHIPELAGO_CUDA=auto
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
