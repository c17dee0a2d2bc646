#!/usr/bin/env bash
# Issue 18's two network benchmarks on namespace "hosts" (tests/netns/hosts.sh:
# real veth links through a bridge, one kernel TCP stack per host), each
# measured against its baseline in the same run:
#  1. allreduce, 4 ranks on 4 hosts, 64 MB, every byte through TCP (between
#     hosts there is no same-host shortcut): our busbw / the best of Gloo's
#     algorithms run on the same namespaces in the same invocation
#     (target >= 1.5x), and every row's share of the TCP floor (the
#     `tcp_floor` row: the ring's bytes through plain sockets, the bound
#     below any TCP allreduce, docs/comm.md section 7);
#  2. hierarchical allreduce between two islands of two ranks, one host per
#     island, the hosts' links shaped by the kernel (tc tbf, 1 Gbit/s): the
#     share of the shaped rate kept busy (target >= 90 %). Nothing is
#     emulated in userspace (the bench would say EMULATED).
# All hosts share this machine's cores: a 2-core VM runs 4 ranks and the
# kernel's softirq work on 2 cores, so figures here are CPU-bound.
# Needs root.  Usage: bash bench/multi_host_comm.sh [BIN] [ROUNDS]
set -euo pipefail
bin="${1:-build/src/cli/archipelago}"
rounds="${2:-3}"
bin="$(realpath "$bin")"
source "$(dirname "$0")/../tests/netns/hosts.sh"
netns_up 4
h() { echo "${NETNS_PREFIX}$1"; }

echo "== 1. allreduce 64 MB, 4 ranks on 4 namespace hosts, ours vs Gloo's best (same run) =="
"$bin" bench comm --ranks 4 --netns "$(h 1),$(h 2),$(h 3),$(h 4)" --coordinator-host "$(netns_root_addr)" \
  --ops allreduce --sizes 64MB --rounds "$rounds" | grep -v '^JSON'

echo "== 2. hierarchical allreduce 64 MB, 2 islands x 2 ranks, kernel-shaped 1 Gbit/s links (tc tbf) =="
netns_shape 1 1gbit
netns_shape 2 1gbit
"$bin" bench comm --ranks 4 --netns "$(h 1),$(h 1),$(h 2),$(h 2)" --coordinator-host "$(netns_root_addr)" \
  --strait "1Gbit/s,0ms" --kernel-shaped --ops hier_allreduce --sizes 64MB --rounds "$rounds" --no-gloo | grep -v '^JSON'
