#!/usr/bin/env bash
# The GPU check of issue 19 in one command, on a machine with an NVIDIA GPU
# and a CUDA build of PyTorch (docs/devices.md "Build flavours"):
#   build  the CUDA flavour against that PyTorch's libtorch (+ .gpu_bundle/
#          from bench/gpu_bundle.sh for the C++ packages the machine lacks)
#   (a)    archipelago check ops --device cuda, bf16 and fp32
#   (b)    the trainer's step against a bare libtorch loop of the same model,
#          device and dtype, in the same process (bench_overhead_torch)
#   (c)    MFU of a >= 1B-parameter LLaMA in bf16 (the same bench, --peak h200)
#   (d)    a mixed job: one GPU worker and two CPU workers with speed-aware
#          shares (configs/gpu-mixed.yaml): the shares they settled on, tokens/s
#   (e)    FP8 against bf16: validation loss of the demo model trained with
#          FP8 linears (real at::_scaled_mm GEMMs where the GPU has them) and
#          in bf16 on the same batches (bench_fp8_loss_torch)
# Each step prints its result; a failed step does not stop the others. Ends
# with one table and OUT/gpu_check.json; exits 0 only if no step failed.
# Without a GPU it says so and exits 2, having measured nothing.
#
#   bash bench/gpu_check.sh [--cpu] [--python PY] [--build-dir DIR] [--out DIR] [--jobs N] [--only LIST]
#
# --only build,check_ops,overhead,mfu,mixed,fp8 (default: all) runs a part, e.g.
# the build in one session and the steps in the next on the same build dir.
# --cpu runs the same steps on this machine's CPU flavour (the build in
# build/, Debian's libtorch), with models sized for a CPU and the GPU
# island of (d) moved to the CPU: it exercises the script, it measures no GPU.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
mode=gpu py="${ARCHIPELAGO_PYTHON:-python3}" build_dir="" out="runs/gpu_check" jobs="$(nproc)"
only="build,check_ops,overhead,mfu,mixed,fp8"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --python) py="$2"; shift ;;
    --build-dir) build_dir="$2"; shift ;;
    --out) out="$2"; shift ;;
    --jobs) jobs="$2"; shift ;;
    --only) only="$2"; shift ;;
    *) echo "gpu_check: unknown argument '$1' (see the header of bench/gpu_check.sh)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out" && out="$(cd "$out" && pwd)"
rows="$out/rows.jsonl"; : > "$rows"

# ---- results ---------------------------------------------------------------

# record STEP STATUS RESULT [TARGET [JSON]]: one row of the summary (STATUS:
# ok | failed | skipped; TARGET: met | missed | -).
record() {
  local t="${4:--}"
  [ "$t" = - ] && t="" || t=" [target $t]"
  printf '%-22s %-8s %s%s\n' "$1" "$2" "$3" "$t"
  "$py_any" - "$1" "$2" "$3" "${4:--}" "${5:-null}" >> "$rows" <<'PY'
import json, sys
step, status, result, target, extra = sys.argv[1:6]
print(json.dumps({"step": step, "status": status, "result": result, "target": target, "data": json.loads(extra)}))
PY
}

# json_field FILE KEY: KEY of the last line of FILE that is a JSON object with it.
json_field() {
  "$py_any" - "$1" "$2" <<'PY'
import json, sys
val = ""
for line in open(sys.argv[1], errors="replace"):
    line = line.strip()
    if line.startswith("{"):
        try:
            o = json.loads(line)
        except ValueError:
            continue
        if sys.argv[2] in o:
            val = o[sys.argv[2]]
print(val)
PY
}

# Any python3 for the bookkeeping (the GPU flavour's own is checked below).
py_any="$(command -v "$py" || command -v python3)" || { echo "gpu_check: needs python3" >&2; exit 2; }

# ---- is there a GPU? -----------------------------------------------------------

if [ "$mode" = gpu ]; then
  smi="no nvidia-smi on the PATH"
  command -v nvidia-smi > /dev/null && smi="$(nvidia-smi -L 2>&1 | head -4)"
  cuda="$("$py" -c 'import torch; print(torch.version.cuda or "none", torch.cuda.is_available(), torch.__version__)' 2>&1 | tail -1)"
  echo "gpu_check: $smi"
  echo "gpu_check: $py: torch.version.cuda, torch.cuda.is_available(), torch.__version__ = $cuda"
  case "$cuda" in
    *" True "*) ;;
    *) echo "gpu_check: no usable GPU on this machine: nothing was built or measured. On a machine without" \
            "a GPU, 'bash bench/gpu_check.sh --cpu' runs the same steps on the CPU flavour." >&2
       exit 2 ;;
  esac
  dev=cuda build_dir="${build_dir:-build-cuda}"
else
  dev=cpu build_dir="${build_dir:-build}"
  echo "gpu_check: --cpu: the steps on this machine's CPU flavour; no GPU is measured"
fi
bin="$build_dir/src/cli/archipelago"
bench="$build_dir/bench/bench_overhead_torch"
fp8bench="$build_dir/bench/bench_fp8_loss_torch"
targets=(archipelago bench_overhead_torch bench_fp8_loss_torch) keep_going=()

# ---- build -----------------------------------------------------------------------

# A cmake and a ninja: the PATH's, else those pip installs beside PyTorch
# (the cmake and ninja packages), else the bundle's ninja; make otherwise.
find_tool() {  # name python-expression-of-its-folder
  command -v "$1" && return 0
  local d
  d="$("$py" -c "import $1; print($2)" 2>/dev/null)"
  [ -n "$d" ] && [ -x "$d/$1" ] && echo "$d/$1" && return 0
  [ -x "$here/.gpu_bundle/bin/$1" ] && echo "$here/.gpu_bundle/bin/$1" && return 0
  return 1
}

configure_cuda() {  # build-dir [extra cmake args]
  local dir="$1"; shift
  local gen=(-G "Unix Makefiles") args=()
  local ninja; ninja="$(find_tool ninja ninja.BIN_DIR)" && gen=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ninja")
  # Every compile error of the build in one log (a machine lent for minutes
  # should not show them one per try).
  keep_going=(-- -k 0); [ "${gen[1]}" = Ninja ] || keep_going=(-- -k)
  [ -d "$here/.gpu_bundle/usr" ] && args+=(-DARCHIPELAGO_BUNDLE="$here/.gpu_bundle")
  # nccl.h and CUDA's runtime headers of the wheel's pip packages, for the
  # NCCL half of the c10d island backend.
  local inc
  for pkg in nccl cuda_runtime; do
    inc="$("$py" -c "import nvidia.$pkg, os; print(os.path.join(list(nvidia.$pkg.__path__)[0], 'include'))" 2>/dev/null)"
    [ -f "$inc/nccl.h" ] && args+=(-DARCHIPELAGO_NCCL_INCLUDE="$inc")
    [ -f "$inc/cuda_runtime_api.h" ] && args+=(-DARCHIPELAGO_CUDART_INCLUDE="$inc")
  done
  "$cmake" -S "$here" -B "$dir" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_POLICY_VERSION_MINIMUM=3.5 \
    -DARCHIPELAGO_TORCH=python -DARCHIPELAGO_PYTHON="$(command -v "$py")" -DARCHIPELAGO_CUDA=on \
    -DARCHIPELAGO_BUILD_TESTS=OFF "${args[@]}" "$@"
}

# The CUDA flavour imports the wheel's libtorch directly (auto); should
# that fail to configure or build, its TorchConfig.cmake gets one try.
# A compile error is ours and would only repeat: no second try then.
build_cuda() {  # log
  configure_cuda "$build_dir" >> "$1" 2>&1 &&
    "$cmake" --build "$build_dir" -j "$jobs" --target "${targets[@]}" "${keep_going[@]}" >> "$1" 2>&1 && return 0
  # The NCCL half of the c10d island backend has never been compiled before
  # this machine (and needs CUDA's own headers): should it fail, the rest
  # still builds and measures without it.
  if grep -qE 'c10d_(backend|group)\.cpp.*error|FAILED: .*c10d_(backend|group)' "$1"; then
    echo "gpu_check: the NCCL island backend did not compile; building without it" | tee -a "$1"
    record nccl_backend failed "$(grep -m1 -E 'c10d_(backend|group)\.cpp.*error' "$1")"
    configure_cuda "$build_dir" -DARCHIPELAGO_NCCL=off >> "$1" 2>&1 &&
      "$cmake" --build "$build_dir" -j "$jobs" --target "${targets[@]}" "${keep_going[@]}" >> "$1" 2>&1 && return 0
  fi
  grep -qE 'CMake Error|undefined reference|ld returned|cannot find -l' "$1" || return 1
  echo "gpu_check: the direct import failed ($(grep -m1 -E 'CMake Error|undefined reference|ld returned|cannot find' "$1"));" \
       "trying TorchConfig.cmake" | tee -a "$1"
  build_dir="$build_dir-config"
  bin="$build_dir/src/cli/archipelago" bench="$build_dir/bench/bench_overhead_torch"
  fp8bench="$build_dir/bench/bench_fp8_loss_torch"
  configure_cuda "$build_dir" -DARCHIPELAGO_TORCH_IMPORT=config >> "$1" 2>&1 &&
    "$cmake" --build "$build_dir" -j "$jobs" --target "${targets[@]}" >> "$1" 2>&1
}

build() {
  local log="$out/build.log" t0=$SECONDS
  : > "$log"
  cmake="$(find_tool cmake cmake.CMAKE_BIN_DIR)" || { record build failed "no cmake on PATH or in $py's packages"; return 1; }
  if [ "$mode" = cpu ]; then
    local gen=(); [ -f "$build_dir/CMakeCache.txt" ] || gen=(-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo)
    "$cmake" -S "$here" -B "$build_dir" "${gen[@]}" >> "$log" 2>&1 &&
      "$cmake" --build "$build_dir" -j "$jobs" --target "${targets[@]}" >> "$log" 2>&1
  else
    build_cuda "$log"
  fi || { record build failed "$(grep -m1 -A2 -E 'CMake Error|error:' "$log" | tr '\n' ' ')(whole log: $log)"; return 1; }
  local flavour; flavour="$(grep -o 'torch flavour.*' "$log" | tail -1)"
  echo "$flavour"
  record build ok "$build_dir, ${flavour%%;*}, $((SECONDS - t0)) s"
}

# ---- data --------------------------------------------------------------------------

# Token shards to train on: the prepared corpus if there is one, else the
# corpus prepared now, else this repository's own text (throughput does
# not depend on which bytes are trained on; the source is printed).
prepare_data() {
  data="data/prepared/sotu-byte"
  [ -f "$data/manifest.json" ] && { echo "data: $data"; return 0; }
  local corpus="data/corpus/sotu"
  if [ ! -d "$corpus" ]; then
    corpus="$out/corpus"; mkdir -p "$corpus"
    cat README.md docs/*.md src/*/*.cpp src/*/*/*.cpp include/archipelago/*/*.h > "$corpus/repository.txt"
    echo "data: data/corpus/sotu is not here: training on this repository's text ($(du -h "$corpus/repository.txt" | cut -f1))"
  fi
  data="$out/prepared"
  [ -f "$data/manifest.json" ] && { echo "data: $data (prepared by an earlier run)"; return 0; }
  "$bin" data prepare --input "$corpus" --out "$data" > "$out/data.log" 2>&1 || {
    echo "data: prepare failed: $out/data.log"; return 1; }
}

# ---- steps -------------------------------------------------------------------------

# limit GPU CPU: a step's time limit in seconds. On a GPU each step takes
# seconds to a minute when it works, and a machine is lent for minutes: a
# step that hangs must not spend the lease (one did: the trainer calibrated
# a 100M model on the CPU before its first GPU step, fixed since).
limit() { [ "$mode" = gpu ] && echo "$1" || echo "$2"; }

check_ops() {  # dtype
  local name="check_ops_$1" log="$out/check_ops_$1.log"
  # CLI11 answers --help before it looks at the words: read the list.
  if ! "$bin" --help 2>/dev/null | grep -qE '^  check +'; then
    record "$name" skipped "this build has no 'archipelago check' command (branch fp8-checkops not merged)"
    return 0
  fi
  if timeout "$(limit 120 600)" "$bin" check ops --device "$dev" --dtype "$1" > "$log" 2>&1; then
    record "$name" ok "every operator within tolerance on $dev $1 ($log)"
  else
    record "$name" failed "$(tail -3 "$log" | tr '\n' ' ')($log)"
  fi
}

overhead() {  # name dtype target(ratio|mfu) bench-args...
  local name="$1" dtype="$2" target="$3"; shift 3
  local log="$out/$name.log"
  if ! timeout "$(limit 180 900)" "$bench" "$data" --device "$dev" --dtype "$dtype" "$@" > "$log" 2>&1; then
    record "$name" failed "$(tail -2 "$log" | tr '\n' ' ')($log)"; return 0
  fi
  grep -vE '^\[[0-9:.]+\] \[(info|warning)\]' "$log" | sed 's/^/    /'
  local ratio params tps mfu fpt line
  ratio="$(json_field "$log" ratio)" params="$(json_field "$log" params)"
  tps="$(json_field "$log" trainer_tokens_per_s)" mfu="$(json_field "$log" trainer_mfu)"
  fpt="$(json_field "$log" flops_per_token)"
  line="$(grep '^{"bench":"overhead"' "$log" | tail -1)"
  if [ "$target" = ratio ]; then
    record "$name" ok "trainer/bare step $ratio ($dev $dtype, $params params)" \
      "$(awk -v r="$ratio" 'BEGIN { print (r <= 1.05) ? "met" : "missed" }') <= 1.05" "$line"
  elif awk -v m="${mfu:-0}" 'BEGIN { exit !(m > 0) }'; then
    record "$name" ok "MFU $(awk -v m="$mfu" 'BEGIN { printf "%.1f%%", 100 * m }'), $params params, $tps tokens/s" \
      "$(awk -v m="$mfu" 'BEGIN { print (m >= 0.40) ? "met" : "missed" }') >= 40%" "$line"
  else
    record "$name" ok "$(awk -v f="$fpt" -v t="$tps" 'BEGIN { printf "%.3g TFLOP/s achieved", f * t / 1e12 }'), $params params, $tps tokens/s (no MFU: no catalog peak for this CPU)" "-" "$line"
  fi
}

mixed() {
  local name=mixed_job run="$out/mixed" log="$out/mixed.log"
  local sets=(--set "run_dir=$run" --set "data.dir=$data")
  if [ "$mode" = cpu ]; then
    # The GPU island on the CPU: fp32 there, bf16 on the other island, one
    # thread each, so the two islands differ for real (dtype), not by sleeps.
    sets+=(--set "cluster.islands[0].torch_device=cpu" --set "cluster.islands[0].device=cpu"
           --set "cluster.islands[0].dtype=fp32" --set "cluster.islands[1].dtype=bf16"
           --set "cluster.islands[1].threads=1" --set "train.global_batch=24" --set "model.dim=128")
  fi
  rm -rf "$run"
  if ! timeout "$(limit 180 900)" "$bin" train configs/gpu-mixed.yaml "${sets[@]}" > "$log" 2>&1; then
    record "$name" failed "$(tail -3 "$log" | tr '\n' ' ')($log)"; return 0
  fi
  local summary
  summary="$("$py_any" - "$run/metrics.jsonl" <<'PY'
import json, sys
first, last, step_s = {}, {}, None
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("kind") == "step" and "share" in r:
        last[r["rank"]] = (r.get("island", "?"), int(r["share"]), r.get("tokens", 0))
        first.setdefault(r["rank"], int(r["share"]))
    if r.get("kind") == "summary":
        step_s = r.get("measured_step_s")
ranks = sorted(last)
tokens = sum(last[k][2] for k in ranks)  # one step's tokens over all workers
tps = tokens / step_s if step_s else 0
shares = ", ".join("rank %d (%s) %d" % (k, last[k][0], last[k][1]) for k in ranks)
print(json.dumps({"shares": {str(k): last[k][1] for k in ranks}, "islands": {str(k): last[k][0] for k in ranks},
                  "measured_step_s": step_s, "tokens_per_s": round(tps, 1),
                  "first_shares": {str(k): first[k] for k in ranks},
                  "text": "shares %s at the first step, settled at %s; %.0f tokens/s (steady state)" %
                          ([first[k] for k in ranks], shares, tps)}))
PY
)" || { record "$name" failed "no step records in $run/metrics.jsonl"; return 0; }
  record "$name" ok "$(echo "$summary" | "$py_any" -c 'import json,sys; print(json.load(sys.stdin)["text"])')" "-" "$summary"
}

# FP8 (delayed and block scaling) against bf16 on the same batches: the
# mean validation loss over seeds; the target is FP8 within 1% of bf16.
fp8_loss() {
  local name=fp8_loss log="$out/fp8_loss.log" steps=300 seeds=2
  [ "$mode" = cpu ] && steps=60 seeds=1  # EMULATED GEMMs on the CPU: a shorter run exercises the step
  timeout "$(limit 150 600)" "$fp8bench" "$data" "$steps" 8 "$seeds" "$dev" > "$log" 2>&1
  local summary
  summary="$("$py_any" - "$log" <<'PY'
import json, sys
means, backends = [], {}
for line in open(sys.argv[1], errors="replace"):
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    if r.get("bench") == "fp8_loss":
        backends[r["compute"]] = r["fp8_gemms"]
    elif r.get("bench") == "fp8_loss_mean":
        means.append(r)
if not means:
    sys.exit(1)
worst = max(m["gap"] for m in means)
text = "; ".join("%s (%s) val %.4f vs bf16 %.4f, %+.2f%%" % (m["compute"], backends.get(m["compute"], "?"),
                 m["val_loss"], m["bf16_val_loss"], 100 * m["gap"]) for m in means)
print(json.dumps({"worst_gap": worst, "text": text, "rows": means}))
PY
)" || { record "$name" failed "$(tail -2 "$log" | tr '\n' ' ')($log)"; return 0; }
  local worst
  worst="$(echo "$summary" | "$py_any" -c 'import json,sys; print(json.load(sys.stdin)["worst_gap"])')"
  record "$name" ok "$(echo "$summary" | "$py_any" -c 'import json,sys; print(json.load(sys.stdin)["text"])')" \
    "$(awk -v g="$worst" 'BEGIN { print (g <= 0.01) ? "met" : "missed" }') <= +1%" "$summary"
}

# ---- run ---------------------------------------------------------------------------

wants() { [[ ",$only," == *",$1,"* ]]; }
built=yes
if wants build; then build || built=no; fi
if [ "$built" = yes ] && [ -x "$bin" ] && [ -x "$bench" ] && [ -x "$fp8bench" ] && prepare_data; then
  if wants check_ops; then check_ops bf16; check_ops fp32; fi
  if [ "$mode" = gpu ]; then
    wants overhead &&
      overhead overhead_bf16 bf16 ratio --dim 1024 --layers 8 --heads 16 --seq 1024 --batch 8 --rounds 2 --threads 4 30
    wants mfu &&
      overhead mfu_1b_bf16 bf16 mfu --dim 2048 --layers 20 --heads 16 --seq 1024 --batch 8 --peak h200 --threads 4 12
  else
    if wants overhead; then
      overhead overhead_fp32 fp32 ratio --rounds 3 30
      overhead overhead_bf16 bf16 ratio --rounds 2 10
    fi
    # No >= 1B model on a CPU: a reduced one, and achieved FLOP/s, not MFU.
    wants mfu && overhead mfu_reduced bf16 mfu --dim 512 --layers 8 --heads 8 --seq 256 --batch 4 4
  fi
  wants mixed && mixed
  wants fp8 && fp8_loss
else
  for s in check_ops overhead mfu mixed fp8; do
    wants "$s" && record "$s" skipped "no build in $build_dir, or no data"
  done
fi

# ---- summary -----------------------------------------------------------------------

echo
"$py_any" - "$rows" "$out/gpu_check.json" "$mode" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("%-22s %-8s %-8s %s" % ("step", "status", "target", "result"))
for r in rows:
    print("%-22s %-8s %-8s %s" % (r["step"], r["status"], r["target"].split()[0], r["result"]))
doc = {"check": "gpu_check", "mode": sys.argv[3], "gpu": sys.argv[3] == "gpu", "steps": rows}
json.dump(doc, open(sys.argv[2], "w"), indent=1)
print("json: " + sys.argv[2])
PY
! grep -q '"status": "failed"' "$rows"
