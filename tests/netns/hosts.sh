# A multi-host test bed on one machine (sourced by tests): N network
# namespaces stand in for hosts, each with its own address 10.77.K.i/24 on a
# veth pair whose other end is on one bridge in the root namespace, so every
# "host" reaches every other one through a real kernel link (which
# `tc qdisc ... tbf` can shape and `ip link set DEV down` can cut). Needs
# root. netns_down removes everything, and netns_up arranges for it to run
# when the calling script exits, however it exits.
#
#   source tests/netns/hosts.sh
#   netns_up 3            # hosts $NETNS_PREFIX1..3 = 10.77.$NETNS_NET.1..3
#   netns_exec 2 CMD...   # run CMD on host 2
#   netns_link 2 down|up  # cut or restore host 2's link
#   netns_shape 2 1gbit  # the kernel shapes host 2's link, both directions (tc tbf)
#   netns_root_addr       # this (root) namespace's address on the bridge
#   netns_down            # also on exit

NETNS_PREFIX="ah$(( $$ % 100000 ))h"
NETNS_NET=$(( 100 + $$ % 100 ))
NETNS_COUNT=0

netns_addr() { echo "10.77.$NETNS_NET.$1"; }
netns_root_addr() { echo "10.77.$NETNS_NET.254"; }

# Best effort, every step: it also runs after a failure part-way through
# netns_up, and must not change the exit status of the script it ends.
netns_down() {
  local i
  for i in $(seq 1 "$NETNS_COUNT"); do
    ip netns pids "$NETNS_PREFIX$i" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$NETNS_PREFIX$i" 2>/dev/null || true
    ip link del "${NETNS_PREFIX}v$i" 2>/dev/null || true
  done
  ip link del "${NETNS_PREFIX}br" 2>/dev/null || true
  NETNS_COUNT=0
  return 0
}

netns_up() {
  local n="$1" i
  if [ "$(id -u)" != 0 ]; then echo "netns_up: needs root (network namespaces)" >&2; return 1; fi
  trap 'netns_down' EXIT
  ip link add "${NETNS_PREFIX}br" type bridge || return 1
  ip link set "${NETNS_PREFIX}br" up
  ip addr add "$(netns_root_addr)/24" dev "${NETNS_PREFIX}br"
  for i in $(seq 1 "$n"); do
    NETNS_COUNT=$i
    ip netns add "$NETNS_PREFIX$i" || return 1
    ip link add "${NETNS_PREFIX}v$i" type veth peer name eth0 netns "$NETNS_PREFIX$i" || return 1
    ip link set "${NETNS_PREFIX}v$i" master "${NETNS_PREFIX}br" up
    ip -n "$NETNS_PREFIX$i" addr add "$(netns_addr "$i")/24" dev eth0
    ip -n "$NETNS_PREFIX$i" link set eth0 up
    ip -n "$NETNS_PREFIX$i" link set lo up
  done
}

netns_exec() { local i="$1"; shift; ip netns exec "$NETNS_PREFIX$i" "$@"; }

# The host-side end of host i's link: cutting it partitions that host.
netns_link() { ip link set "${NETNS_PREFIX}v$1" "$2"; }

# Token-bucket shaping by the kernel on host i's link: its host-side end
# shapes what reaches the host, its eth0 what leaves it. netem does not
# exist on these machines, so only the rate is shaped; latency stays zero.
netns_shape() {
  local i="$1" rate="$2"
  tc qdisc replace dev "${NETNS_PREFIX}v$i" root tbf rate "$rate" burst 256kb latency 100ms
  ip netns exec "$NETNS_PREFIX$i" tc qdisc replace dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
}
