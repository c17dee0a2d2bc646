#!/usr/bin/env bash
# A 2-island job over 3 hosts: network namespaces joined by real veth links
# (tests/netns/hosts.sh) stand in for machines. The coordinator runs on
# host 1, island a's two workers on host 2 and island b's worker on host 3,
# each listening on its host's own address (listen: auto). The job must
# train the single-process loss curve, and its strait, a real link between
# hosts, must not be emulated. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
tmp="$(mktemp -d)"
netns_up 3
trap 'netns_down; rm -rf "$tmp"' EXIT
cd "$tmp"

mkdir corpus
for d in $(seq 1 40); do
  for l in $(seq 1 20); do echo "Document $d line $l: the union is strong and the people are free."; done > "corpus/doc$d.txt"
done
"$bin" data prepare --input corpus --out data --tokenizer byte >/dev/null
job() {  # job NAME ISLANDS
  cat <<YAML
cluster:
  islands:
$2
  straits: [{a: a, b: b, bandwidth: 1Gbit/s, latency: 1ms}]
model: {dim: 32, n_layers: 2, n_heads: 2, max_seq_len: 32}
data: {dir: $tmp/data, seq_len: 32}
train: {steps: 12, global_batch: 6, lr: 0.003, warmup_steps: 3, eval_every: 0, rebalance: false}
checkpoint: {every: 0}
run_dir: $tmp/$1
YAML
}
job ref "    - {name: a, count: 1}
    - {name: b, count: 0}" | sed '/count: 0/d; /straits/d' > ref.yaml
job mh "    - {name: a, count: 2, host: $(netns_addr 2)}
    - {name: b, count: 1, host: $(netns_addr 3)}" > mh.yaml
"$bin" train ref.yaml >ref.log 2>&1 || { echo "FAIL: reference run"; tail ref.log; exit 1; }

export ARCHIPELAGO_SECRET="netns-$$"
netns_exec 1 "$bin" coordinator --host "$(netns_addr 1)" --port 29500 >coord.log 2>&1 &
for _ in $(seq 1 100); do grep -q "listening" coord.log && break; sleep 0.1; done
coord="$(netns_addr 1):29500"
pids=()
netns_exec 2 timeout 300 "$bin" worker --job mh.yaml --coordinator "$coord" --rank 0 >w0.log 2>&1 & pids+=($!)
netns_exec 2 timeout 300 "$bin" worker --job mh.yaml --coordinator "$coord" --rank 1 >w1.log 2>&1 & pids+=($!)
netns_exec 3 timeout 300 "$bin" worker --job mh.yaml --coordinator "$coord" --rank 2 >w2.log 2>&1 & pids+=($!)
for i in 0 1 2; do
  wait "${pids[$i]}" || { echo "FAIL: worker $i exited with $?"; tail -20 w$i.log; exit 1; }
done

# Each worker listened on its own host's address, and the strait was not shaped.
grep -q "$(netns_addr 2)" w0.log || { echo "FAIL: rank 0 did not listen on $(netns_addr 2)"; tail w0.log; exit 1; }
grep -q "$(netns_addr 3)" w2.log || { echo "FAIL: rank 2 did not listen on $(netns_addr 3)"; tail w2.log; exit 1; }
if grep -q "EMULATED strait" w0.log w1.log w2.log; then echo "FAIL: a real link was emulated"; exit 1; fi

python3 "$src/tests/e2e/lib/same_curve.py" "$tmp/ref/metrics.jsonl" "$tmp/mh/metrics.jsonl" 12
