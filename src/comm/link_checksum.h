// Internal: which links carry a frame CRC32C (docs/comm.md "Checksums").
// Both ends of a link derive the same answer from the same cluster spec and
// addresses; a receiver whose link requires checksums rejects a frame
// without one.
#pragma once

#include <string>

#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

// The rule, written once. `option` is CommOptions::checksum: "on"/"off"
// force every link; "auto" asks the cluster spec:
//  - a link inside one island: the island's `checksum`; its "auto" is off
//    when both ends run on one host (loopback cannot corrupt), else on;
//  - a link across a strait: the strait's `checksum`; its "auto" is on
//    (a WAN can corrupt what TCP's 16-bit checksum misses), off with TLS
//    (its AEAD rejects any altered byte).
// Islands or straits the spec does not name count as "auto".
inline bool linkChecksum(const std::string& option, const core::ClusterSpec& cl, int island_a, int island_b,
                         bool same_host, bool tls) {
  if (option == "on") return true;
  if (option == "off") return false;
  auto decide = [](const std::string& setting, bool auto_value) {
    return setting == "on" ? true : setting == "off" ? false : auto_value;
  };
  const int n = static_cast<int>(cl.islands.size());
  const bool known = island_a >= 0 && island_b >= 0 && island_a < n && island_b < n;
  if (island_a == island_b || !known) {
    std::string setting = known ? cl.islands[static_cast<size_t>(island_a)].checksum : "auto";
    return decide(setting, !same_host && !tls);
  }
  const core::StraitSpec* s =
      cl.strait(cl.islands[static_cast<size_t>(island_a)].name, cl.islands[static_cast<size_t>(island_b)].name);
  return decide(s ? s->checksum : "auto", !tls);
}

// CommOptions::checksum must be auto, on or off.
inline core::Status checkChecksumOption(const std::string& option) {
  if (option == "auto" || option == "on" || option == "off") return core::okStatus();
  return core::invalidArgument("comm: checksum '" + option + "': expected auto, on or off");
}

}  // namespace archipelago::comm
