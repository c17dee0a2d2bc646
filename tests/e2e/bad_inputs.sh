#!/usr/bin/env bash
# Bad input to every verb, as a careless user gives it. Each case checks the
# exit code (2: the input is wrong, 1: the world is not as the command
# needs, other non-zero: the argument parser's own), that the error names
# the problem, and where the command writes, that nothing was left
# half-written or destroyed. Args: BINARY SOURCE_DIR
set -uo pipefail
bin="$1"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp" || exit 1
unset ARCHIPELAGO_SECRET
failures=0 cases=0

# expect RC TEXT ARGS...: exit code RC ("nz": any non-zero) and TEXT in the output.
expect() {
  local want_rc="$1" want="$2"
  shift 2
  cases=$((cases + 1))
  local out rc
  out="$(timeout 120 "$bin" "$@" 2>&1)"
  rc=$?
  if { [ "$want_rc" = nz ] && [ "$rc" -eq 0 ]; } || { [ "$want_rc" != nz ] && [ "$rc" != "$want_rc" ]; }; then
    echo "FAIL: archipelago $*: exit $rc, expected $want_rc"; echo "$out" | tail -5; failures=$((failures + 1)); return
  fi
  if ! grep -qF -- "$want" <<<"$out"; then
    echo "FAIL: archipelago $*: output lacks '$want':"; echo "$out" | tail -5; failures=$((failures + 1))
  fi
}
# absent PATH / intact PATH: after a refused command.
absent() { [ ! -e "$1" ] || { echo "FAIL: '$1' was written by a refused command"; failures=$((failures + 1)); }; }
intact() { [ -f "$1" ] || { echo "FAIL: '$1' was lost by a refused command"; failures=$((failures + 1)); }; }

# ---- fixture: a corpus, its dataset, a short run ----
mkdir corpus notes
for d in $(seq 1 40); do
  for l in $(seq 1 20); do echo "Document $d line $l: the union is strong and the people are free."; done > "corpus/doc$d.txt"
done
echo "somebody's notes" > notes/keep.txt
"$bin" data prepare --input corpus --out data --tokenizer byte >/dev/null 2>&1 || { echo "FAIL: fixture data"; exit 1; }
cat > job.yaml <<YAML
cluster:
  islands:
    - {name: a, count: 1}
model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}
data: {dir: $tmp/data, seq_len: 32}
train: {steps: 2, global_batch: 4, lr: 0.003, warmup_steps: 1, eval_every: 0}
checkpoint: {every: 2}
run_dir: $tmp/run
YAML
"$bin" train job.yaml >/dev/null 2>&1 || { echo "FAIL: fixture run"; exit 1; }
"$bin" export hf run export >/dev/null 2>&1 || { echo "FAIL: fixture export"; exit 1; }
sed 's/dim: 32/dim: 1000000/' job.yaml > huge.yaml
sed 's|run_dir: .*|run_dir: '"$tmp"'/huge_run|' huge.yaml > huge_new.yaml
printf 'train: {steps: 2}\ntrain: {steps: 3}\n' > dup.yaml
printf 'train: {stepz: 2}\n' > unknown.yaml
printf 'train: [unclosed\n' > broken.yaml
echo garbage > notjson.json
echo '{"a": 1}' > wrong.json

# ---- config ----
expect 1 "does not exist" config check missing.yaml
expect 2 "is a directory" config check corpus
expect 2 "key 'train' repeats the one on line 1" config check dup.yaml
expect 2 "train.stepz: unknown key" config check unknown.yaml
expect 2 "not valid YAML" config check broken.yaml
expect 2 "expected an integer" config dump job.yaml --set train.steps=abc
expect 2 "no such field" config dump job.yaml --set train.nosuch=1
expect 1 "model.dim" config check huge.yaml

# ---- data ----
expect 2 "no such file or directory" data prepare --input missing --out out1
absent out1
expect 2 "not one of byte|spm" data prepare --input corpus --out out2 --tokenizer foo
expect 2 "is or contains the input" data prepare --input corpus --out corpus --force
intact corpus/doc1.txt
expect 2 "is or contains the input" data prepare --input corpus/doc1.txt --out corpus --force
intact corpus/doc1.txt
expect 2 "inside the input directory" data prepare --input corpus --out corpus/data
absent corpus/data
expect 1 "not a prepared dataset" data prepare --input corpus --out notes --force
intact notes/keep.txt
expect 1 "already exists" data prepare --input corpus --out data
expect 2 "259" data prepare --input corpus --out out3 --vocab 100
expect 2 "--val-fraction" data prepare --input corpus --out out4 --val-fraction 1.5
expect 1 "manifest.json" data inspect missing

# ---- plan / simulate / report ----
expect 1 "does not exist" plan missing.yaml llama3-8b
expect 1 "neither a preset" plan job.yaml no-such-model
expect 2 "parse error" simulate notjson.json
expect 2 "archipelago-plan/1" simulate wrong.json
expect 1 "plan file" simulate missing.json
expect 1 "does not exist" report missing
expect 1 "no metrics.jsonl" report corpus

# ---- train / worker / coordinator ----
expect 1 "does not exist" train missing.yaml
expect 1 "--resume" train job.yaml
expect 1 "no checkpoints to resume from" train job.yaml --resume --set run_dir="$tmp/fresh_run"
absent fresh_run
expect 2 "train.steps" train job.yaml --set train.steps=0 --set run_dir="$tmp/zero_run"
absent zero_run
expect 1 "RESOURCE_EXHAUSTED" train huge_new.yaml
absent huge_run
expect 2 "ARCHIPELAGO_SECRET" worker --job job.yaml --rank 0 --coordinator 127.0.0.1:1
expect 2 "outside" worker --job job.yaml --rank 5 --coordinator 127.0.0.1:1
RANK=two expect 2 "environment variable RANK='two' is not a rank" worker --job job.yaml --coordinator 127.0.0.1:1
SLURM_PROCID=0 SLURM_NTASKS=99 expect 2 "world size 99 (from SLURM_NTASKS) does not match" worker --job job.yaml --coordinator 127.0.0.1:1
# Nobody listens on port 1: a clear error once the wait is over, never a silent hang.
ARCHIPELAGO_SECRET=s expect 1 "no coordinator answered at 127.0.0.1:1 within 2 s" worker --job job.yaml --rank 0 --coordinator 127.0.0.1:1 --wait-coordinator 2
expect nz "99999" coordinator --port 99999
expect 2 "ARCHIPELAGO_SECRET" coordinator
# TLS: credentials that are not there stop the job before anything is written.
expect 2 "security.credentials" train job.yaml --set security.tls=true --set security.credentials="$tmp/nocreds" --set run_dir="$tmp/tls_run"
absent tls_run
ARCHIPELAGO_SECRET=s expect 2 "--credentials" coordinator --credentials "$tmp/nocreds"
ARCHIPELAGO_SECRET_FILE="$tmp/nosecret" expect 1 "ARCHIPELAGO_SECRET_FILE" coordinator

# ---- secrets ----
expect 0 "node.key" secrets init creds
expect 1 "already holds credentials" secrets init creds
expect 0 "node.key" secrets init creds --force
expect 2 "not a credential file" secrets init notes --force
intact notes/keep.txt

# ---- sample / ckpt ----
expect 1 "neither a checkpoint" sample missing
expect nz "--tokens" sample run --tokens -5
expect 2 "max_seq_len" sample run --prompt "$(printf 'a%.0s' $(seq 1 100))" --tokens 4
expect 1 "no checkpoints" ckpt verify missing
expect 1 "neither a checkpoint" ckpt inspect corpus
cp -r run corrupt_run
ckpt="$(ls -d corrupt_run/checkpoints/step_* | head -1)"
printf 'X' | dd of="$ckpt/model.safetensors" bs=1 seek=200 conv=notrunc 2>/dev/null
expect 1 "sha256" ckpt verify corrupt_run

# ---- export / import hf ----
expect 1 "neither a checkpoint" export hf missing out5
absent out5
expect 1 "--force" export hf run export
expect 1 "not an earlier export" export hf run notes --force
intact notes/keep.txt
expect 1 "config.json" import hf corpus job.yaml
sed -e 's/n_heads: 2/n_heads: 4/' -e 's|run_dir: .*|run_dir: '"$tmp"'/wrong_run|' job.yaml > wrong_model.yaml
expect 2 "model.n_heads: the job has 4, config.json has 2" import hf export wrong_model.yaml
absent wrong_run
expect 1 "already holds checkpoints" import hf export job.yaml

# ---- bench ----
expect 2 "--ranks" bench comm --ranks 0

echo "bad inputs: $cases cases, $failures failed"
[ "$failures" -eq 0 ]
