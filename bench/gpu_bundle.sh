#!/usr/bin/env bash
# Packs the C++ dependencies of the build that a GPU machine may lack into
# one folder (default .gpu_bundle/, ignored by git) to carry there, next to
# the working tree: headers, shared libraries and CMake config files of
# Debian's yaml-cpp, nlohmann-json, spdlog, fmt, CLI11 and OpenSSL, and,
# when installed here, GoogleTest, SentencePiece and a ninja binary. Run it
# on the Debian 12 machine that builds the CPU flavour; the CUDA flavour's
# configure (-DARCHIPELAGO_BUNDLE=DIR, which bench/gpu_check.sh passes)
# takes from it only what the GPU machine's system lacks
# (cmake/DependencyBundle.cmake, docs/devices.md "Build flavours").
#
# The folder keeps Debian's paths (DIR/usr/include, DIR/usr/lib/<arch>,
# DIR/usr/share/cmake) because the packages' CMake files locate their
# headers and libraries relative to themselves. Static archives are left
# out (the build links the shared libraries) except GoogleTest's, which
# Debian ships only static. Prints the size: the device tool carries at
# most 64 MiB with the working tree.
#   bash bench/gpu_bundle.sh [DIR]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/.gpu_bundle}"
arch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
# What the build needs (a missing one is an error) and what it can do
# without (a missing one is skipped with a line saying so).
required=(libyaml-cpp-dev nlohmann-json3-dev libspdlog-dev libfmt-dev libcli11-dev libssl-dev)
optional=(libgtest-dev libgmock-dev libsentencepiece-dev)

command -v dpkg-query >/dev/null || { echo "gpu_bundle: needs a Debian machine (dpkg-query not found)" >&2; exit 2; }
rm -rf "$out"
mkdir -p "$out/usr"

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# Copies one path of a package, keeping symbolic links as links; a link's
# target comes along (the runtime package's libX.so.N behind libX.so).
copy_path() {
  local f="$1"
  while :; do
    [ -e "$out$f" ] || [ -L "$out$f" ] && return 0
    mkdir -p "$out$(dirname "$f")"
    cp -a "$f" "$out$f"
    [ -L "$f" ] || return 0
    local t
    t="$(readlink "$f")"
    case "$t" in /*) f="$t" ;; *) f="$(dirname "$f")/$t" ;; esac
  done
}

pack() {  # package
  local pkg="$1" f
  while IFS= read -r f; do
    case "$f" in
      /usr/include/* | /usr/lib/"$arch"/* | /usr/share/cmake/* | /usr/lib/cmake/*) ;;
      *) continue ;;
    esac
    [ -d "$f" ] && [ ! -L "$f" ] && continue
    case "$f" in
      */pkgconfig/*) continue ;;  # the configure reads CMake files, and pkg-config files hold absolute paths
      *.a) case "$pkg" in libgtest-dev | libgmock-dev) ;; *) continue ;; esac ;;
    esac
    copy_path "$f"
  done < <(dpkg-query -L "$pkg")
  echo "$pkg $(dpkg-query -W -f='${Version}' "$pkg")" >> "$out/MANIFEST"
}

for p in "${required[@]}"; do
  installed "$p" || { echo "gpu_bundle: $p is not installed here (bash scripts/setup.sh installs it)" >&2; exit 1; }
  pack "$p"
done
for p in "${optional[@]}"; do
  if installed "$p"; then pack "$p"; else echo "gpu_bundle: $p not installed here: skipped (the GPU build goes without it)"; fi
done
# OpenSSL's configuration headers live in Debian's multiarch include
# folder, which another distribution's compiler does not search: they go
# beside the others.
cp -a "$out/usr/include/$arch/openssl/." "$out/usr/include/openssl/"
# A ninja binary when it needs nothing but the C and C++ runtimes (every
# x86-64 Linux has those); CMake links a dozen libraries and stays behind
# (a PyTorch machine usually has pip's cmake).
if ninja="$(command -v ninja)" && ! ldd "$ninja" | grep -vqE 'linux-vdso|libc\.so|libm\.so|libstdc\+\+|libgcc_s|ld-linux'; then
  mkdir -p "$out/bin" && cp "$ninja" "$out/bin/ninja" && echo "ninja $(ninja --version)" >> "$out/MANIFEST"
else
  echo "gpu_bundle: no self-contained ninja here: skipped (gpu_check.sh falls back to make)"
fi
echo "debian $(cat /etc/debian_version 2>/dev/null || echo unknown) $arch" >> "$out/MANIFEST"
bytes=$(du -sb "$out" | cut -f1)
awk -v b="$bytes" -v d="$out" 'BEGIN { printf "gpu_bundle: %s: %.1f MiB\n", d, b / 1048576 }'
sed 's/^/  /' "$out/MANIFEST"
