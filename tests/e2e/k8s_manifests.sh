#!/usr/bin/env bash
# deploy/k8s: the manifests load, and every field a worker reads is set
# (tests/e2e/lib/k8s_manifests.py says which), the ConfigMap's job file passes
# `archipelago config check`, and a copy with any one of those fields broken
# is refused naming it (so the check is not vacuous). Running the pods is
# e2e.k8s_pods. Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/e2e/lib/tiny_job.sh"
python3 -c 'import yaml' 2>/dev/null || launch_skip "python3 has no yaml module: scripts/setup.sh installs python3-yaml"
check="$src/tests/e2e/lib/k8s_manifests.py"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python3 "$check" check "$src/deploy/k8s"
python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["data"]["job.yaml"])' \
  "$src/deploy/k8s/job-config.yaml" > "$tmp/job.yaml"
"$bin" config check "$tmp/job.yaml" >"$tmp/config.log" 2>&1 || { echo "FAIL: the ConfigMap's job file"; cat "$tmp/config.log"; exit 1; }

broken() {  # broken FILE SED_EXPR EXPECTED_MESSAGE
  rm -rf "$tmp/k8s"; cp -r "$src/deploy/k8s" "$tmp/k8s"
  sed -i "$2" "$tmp/k8s/$1"
  cmp -s "$src/deploy/k8s/$1" "$tmp/k8s/$1" && { echo "FAIL: '$2' changed nothing in $1"; exit 1; }
  if out="$(python3 "$check" check "$tmp/k8s")"; then echo "FAIL: accepted $1 with '$2'"; exit 1; fi
  grep -q "$3" <<<"$out" || { echo "FAIL: $1 with '$2': expected '$3', got: $out"; exit 1; }
}
broken job.yaml 's/job-completion-index/job-index/' "not the completion index"
broken job.yaml '/name: WORLD_SIZE/{n;s/"4"/"3"/}' "WORLD_SIZE 3 != completions 4"
broken job.yaml 's/parallelism: 4/parallelism: 2/' "parallelism 2 != completions 4"
broken job.yaml 's/completionMode: Indexed/completionMode: NonIndexed/' "not Indexed"
broken job.yaml 's/value: archipelago-0.archipelago/value: archipelago-1.archipelago/' "MASTER_ADDR archipelago-1.archipelago"
broken job.yaml 's/subdomain: archipelago/subdomain: workers/' "subdomain 'workers'"
broken job.yaml 's/name: archipelago-secret/name: other-secret/' "names Secret other-secret"
broken job.yaml 's/key: ARCHIPELAGO_SECRET/key: SECRET/' "has no key SECRET"
broken job.yaml '/--job/s/job.yaml/job.yml/' "no key job.yml"
broken job.yaml '/name: MASTER_PORT/{n;s/29500/29501/}' "MASTER_PORT 29501"
broken service.yaml 's/clusterIP: None/clusterIP: 10.0.0.9/' "not headless"
broken service.yaml 's/app.kubernetes.io\/name: archipelago/app: other/' "does not select the pods"
broken job-config.yaml 's/{name: b, count: 2}/{name: b, count: 3}/' "devices (5) != completions (4)"
broken job-config.yaml 's#run_dir: /data/runs#run_dir: /tmp/runs#' "run_dir /tmp/runs/archipelago is on no shared volume"
echo "deploy/k8s: 14 broken copies refused, each naming its field"
