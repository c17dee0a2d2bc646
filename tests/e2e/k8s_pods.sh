#!/usr/bin/env bash
# deploy/k8s, run: each pod of the Indexed Job runs on a "node" of its own (a
# network namespace, tests/netns/hosts.sh) with exactly the environment and
# command the manifests give it (tests/e2e/lib/k8s_manifests.py render: rank
# from the completion index, the secret from the Secret, the job file from
# the ConfigMap, the volumes as local folders). Pod 0 runs the coordinator;
# the others reach it by the headless Service's name archipelago-0.archipelago,
# which a private /etc/hosts (bind-mounted in each pod's own mount namespace,
# never in the host's) points at pod 0's node, as cluster DNS would. The pods
# start in reverse order (workers before their coordinator). The job must
# train the single-process loss curve. Skipped (exit 77) without root,
# namespaces or python3-yaml. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/e2e/lib/tiny_job.sh"
[ "$(id -u)" = 0 ] || launch_skip "needs root for network and mount namespaces"
python3 -c 'import yaml' 2>/dev/null || launch_skip "python3 has no yaml module: scripts/setup.sh installs python3-yaml"
command -v unshare >/dev/null || launch_skip "unshare (util-linux) is not installed"
"$bin" worker --help >/dev/null 2>&1 || launch_skip "'$bin' has no worker verb (a build without libtorch)"
source "$src/tests/netns/hosts.sh"
tmp="$(mktemp -d)"
world="$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["spec"]["completions"])' "$src/deploy/k8s/job.yaml")"
netns_up "$world" || { rm -rf "$tmp"; launch_skip "cannot create $world network namespaces (ip netns)"; }
trap 'netns_down; rm -rf "$tmp"' EXIT

mkdir "$tmp/pods" "$tmp/volumes" "$tmp/bin"
python3 "$src/tests/e2e/lib/k8s_manifests.py" render "$src/deploy/k8s" "$tmp/pods" "$tmp/volumes"
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$tmp/pods/job.json" "$1"; }
data_dir="$(field data_dir)"; run_dir="$(field run_dir)"; steps="$(field steps)"; pod0="$(field pod0)"

# The image: `archipelago` on PATH. The volume: a prepared dataset.
ln -s "$bin" "$tmp/bin/archipelago"
mkdir "$tmp/corpus"
for d in $(seq 1 30); do
  for l in $(seq 1 20); do echo "Document $d line $l: the union is strong and the people are free."; done > "$tmp/corpus/doc$d.txt"
done
"$bin" data prepare --input "$tmp/corpus" --out "$data_dir" --tokenizer byte >"$tmp/prepare.log" 2>&1
"$bin" train "$tmp/pods/ref.yaml" >"$tmp/ref.log" 2>&1 || launch_fail "reference run" "$tmp/ref.log"

# Cluster DNS: pod 0's name is node 1's address.
{ cat /etc/hosts; echo "$(netns_addr 1) $pod0"; } > "$tmp/hosts"
pids=()
for i in $(seq $((world - 1)) -1 0); do
  netns_exec $((i + 1)) unshare --mount --propagation private sh -c \
    'mount --bind "$1" /etc/hosts && PATH="$2:$PATH" exec timeout 180 sh "$3"' \
    pod "$tmp/hosts" "$tmp/bin" "$tmp/pods/pod$i.sh" >"$tmp/pod$i.log" 2>&1 &
  pids[$i]=$!
done
for i in $(seq 0 $((world - 1))); do
  wait "${pids[$i]}" || launch_fail "pod $i exited with $?" "$tmp/pod$i.log"
done
for i in $(seq 0 $((world - 1))); do
  grep -q "rank $i of $world (RANK, WORLD_SIZE)" "$tmp/pod$i.log" || launch_fail "pod $i did not run as rank $i" "$tmp/pod$i.log"
  grep -q "listening on $(netns_addr $((i + 1)))" "$tmp/pod$i.log" || launch_fail "pod $i did not listen on its node's address" "$tmp/pod$i.log"
done
grep -q "EMULATED strait" "$tmp"/pod*.log && launch_fail "a real link between pods was emulated" "$tmp/pod0.log"
python3 "$src/tests/e2e/lib/same_curve.py" "$tmp/pods/ref/metrics.jsonl" "$run_dir/metrics.jsonl" "$steps"
