#!/usr/bin/env bash
# A strait shaped by the kernel, not by us: two "hosts" (network namespaces,
# tests/netns/hosts.sh) whose links carry a token-bucket filter at 1 Gbit/s
# (tc tbf, both directions), two ranks on each. The hierarchical allreduce
# between the two islands runs over that real link (`bench comm --netns ...
# --kernel-shaped`): nothing may be emulated in userspace, the result must
# match the fp64 reference, and the rate measured must not exceed the
# kernel's (the shaping is real). How much of it is kept busy depends on
# the CPU left over by other tests: the >= 90 % target is a benchmark
# figure (docs/comm.md section 7), printed here but not asserted.
# Args: BINARY SOURCE_DIR
set -euo pipefail
bin="$1"; src="$2"
source "$src/tests/netns/hosts.sh"
netns_up 2
out="$(mktemp)"
trap 'netns_down; rm -f "$out"' EXIT
netns_shape 1 1gbit
netns_shape 2 1gbit
h1="${NETNS_PREFIX}1" h2="${NETNS_PREFIX}2"
timeout 300 "$bin" bench comm --ranks 4 --netns "$h1,$h1,$h2,$h2" --coordinator-host "$(netns_root_addr)" \
  --strait "1Gbit/s,0ms" --kernel-shaped --ops hier_allreduce --sizes 16MB --rounds 1 --no-gloo >"$out" 2>&1 \
  || { echo "FAIL: bench comm"; cat "$out"; exit 1; }
grep -v '^JSON' "$out"
if grep -q "EMULATED" "$out"; then echo "FAIL: a real link was emulated in userspace"; exit 1; fi
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l[5:]) for l in open(sys.argv[1]) if l.startswith("JSON ")]
row = [r for r in rows if r["op"] == "hier_allreduce"][0]
frac, err = row["strait_fraction"], row["max_rel_err"]
print("kernel-shaped 1 Gbit/s strait: %.1f%% kept busy, max relative error %.1e" % (100 * frac, err))
ok = 0 < frac <= 1.05 and err < 1e-6
sys.exit(0 if ok else 1)
PY
