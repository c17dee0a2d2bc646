// Where a worker listens and the address it gives its peers (job fields
// cluster.islands[].listen / .advertise, `archipelago worker --listen /
// --advertise`). A spec is one of:
//   auto          the address of the interface this host reaches the
//                 coordinator through (the default: right on one host and
//                 on a cluster alike);
//   an interface  "eth0": its first IPv4 address, else its first IPv6
//                 address that is not link-local;
//   an address    IPv4 or IPv6; 0.0.0.0 or :: listens on every interface.
// The advertised address defaults to the listening one, or, when that is a
// wildcard, to the address `auto` finds.
#pragma once

#include <string>
#include <utility>

#include "archipelago/core/status.h"

namespace archipelago::comm {

// "HOST:PORT" or "[IPV6]:PORT" -> (host without brackets, port).
core::Result<std::pair<std::string, int>> splitHostPort(const std::string& address);
// The inverse: brackets an IPv6 address.
std::string joinHostPort(const std::string& host, int port);

struct Addresses {
  std::string listen;
  std::string advertise;
};

// `field` names the spec's origin in errors ("cluster.islands[1].listen").
core::Result<Addresses> resolveAddresses(const std::string& listen_spec, const std::string& advertise_spec,
                                         const std::string& coordinator_host, const std::string& field);

// The local address the kernel would send from to reach `host` (no packet
// is sent: a UDP socket is connected, then asked its own address).
core::Result<std::string> routeTo(const std::string& host);
// The address of interface `name` (see above); kNotFound listing the
// interfaces there are.
core::Result<std::string> interfaceAddress(const std::string& name);

}  // namespace archipelago::comm
