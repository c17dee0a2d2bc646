#!/usr/bin/env bash
# The main job: installs dependencies and the default corpus, builds, prepares
# token shards, trains the demo job (configs/demo.yaml: 3 workers of
# different EMULATED speeds in 2 islands joined by an EMULATED strait) and
# ends with the report and a text sample.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
bash scripts/setup.sh
build_dir="${ARCHIPELAGO_BUILD_DIR:-build}"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build_dir" -j "$(nproc)" --target archipelago
bin="$build_dir/src/cli/archipelago"
job="${1:-configs/demo.yaml}"
run_dir="$("$bin" config dump "$job" | sed -n 's/^run_dir = \([^ ]*\).*/\1/p')"

"$bin" config check "$job"
if [ ! -f data/prepared/sotu-byte/manifest.json ]; then
  "$bin" data prepare --input data/corpus/sotu --out data/prepared/sotu-byte --tokenizer byte --val-fraction 0.02
fi
"$bin" data inspect data/prepared/sotu-byte --samples 1

# A fresh run each time: an old demo run is moved aside, never mixed in.
if [ -d "$run_dir" ]; then
  mv "$run_dir" "$run_dir.old.$(date +%s)"
fi
"$bin" train "$job"
"$bin" report "$run_dir"
"$bin" sample "$run_dir" --prompt "Fellow-Citizens of the Senate and House of Representatives:" --tokens 200 --temperature 0.8 --top-k 40
echo "demo finished: open $run_dir/report/index.html"
