#!/usr/bin/env bash
# Every shipped job and cluster spec validates, and bad input fails with a
# message naming the field. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
for job in "$src"/configs/*.yaml; do
  (cd "$src" && "$bin" config check "$job") || { echo "FAIL: $job does not validate"; exit 1; }
  (cd "$src" && "$bin" config dump "$job" >/dev/null)
done
# Effective values carry their source.
out="$(cd "$src" && ARCHIPELAGO_TRAIN_LR=0.002 "$bin" config dump configs/demo.yaml --set train.steps=7)"
grep -q '^train.steps = 7 .*# flag' <<<"$out" || { echo "FAIL: flag source missing"; echo "$out" | grep train.steps; exit 1; }
grep -q '^train.lr = 0.002 .*# env ARCHIPELAGO_TRAIN_LR' <<<"$out" || { echo "FAIL: env source missing"; exit 1; }
grep -q '^train.min_lr = .*# file' <<<"$out" || { echo "FAIL: file source missing"; exit 1; }
grep -q '^train.micro_batch = 0 .*# default' <<<"$out" || { echo "FAIL: default source missing"; exit 1; }
# A bad job exits non-zero (2) naming the field path and the expectation.
cat > "$tmp/bad.yaml" <<'YAML'
cluster:
  islands: [{name: a, count: 2}, {name: b}]
  straits: [{a: a, b: c, bandwidth: -1Gbit/s}]
train: {global_batch: 2, stepz: 4}
YAML
set +e
msg="$("$bin" config check "$tmp/bad.yaml" 2>&1)"; rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "FAIL: exit code $rc, expected 2"; echo "$msg"; exit 1; }
for want in "train.stepz: unknown key" ; do
  grep -qF "$want" <<<"$msg" || { echo "FAIL: missing '$want' in: $msg"; exit 1; }
done
sed -i 's/, stepz: 4//' "$tmp/bad.yaml"
set +e
msg="$("$bin" config check "$tmp/bad.yaml" 2>&1)"; rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "FAIL: exit code $rc, expected 2"; echo "$msg"; exit 1; }
for want in "cluster.straits[0].b: got 'c'" "cluster.straits[0].bandwidth: got a negative bandwidth" "train.global_batch: got 2"; do
  grep -qF "$want" <<<"$msg" || { echo "FAIL: missing '$want' in: $msg"; exit 1; }
done
echo "configs: OK"
