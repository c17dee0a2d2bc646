// Internal: which links are encrypted (docs/comm.md "TLS"). Both ends
// derive the same answer from the same options and cluster spec: the
// dialler uses TLS exactly when the listener requires it.
#pragma once

#include "archipelago/comm/communicator.h"
#include "archipelago/comm/tls.h"
#include "archipelago/core/config.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

// The rule, written once: every link when the job asks for TLS on all
// (security.tls: CommOptions::tls_all_links), else a link across a strait
// whose spec says tls: true (unless tls_on_straits is off). Islands the
// spec does not name have no strait.
inline bool linkTls(const CommOptions& o, const core::ClusterSpec& cl, int island_a, int island_b) {
  if (o.tls_all_links) return true;
  if (!o.tls_on_straits || island_a == island_b) return false;
  const int n = static_cast<int>(cl.islands.size());
  if (island_a < 0 || island_b < 0 || island_a >= n || island_b >= n) return false;
  const core::StraitSpec* s =
      cl.strait(cl.islands[static_cast<size_t>(island_a)].name, cl.islands[static_cast<size_t>(island_b)].name);
  return s && s->tls;
}

// Whether any link can use TLS, so that the credentials are needed.
inline bool anyLinkTls(const CommOptions& o, const core::ClusterSpec& cl) {
  return o.tls_all_links || (o.tls_on_straits && jobUsesTls(false, cl));
}

// The credentials, when any link needs them (requireJobCredentials).
inline core::Status checkTlsCredentials(const CommOptions& o, const core::ClusterSpec& cl) {
  return anyLinkTls(o, cl) ? requireJobCredentials(o.tls_all_links, o.tls) : core::okStatus();
}

}  // namespace archipelago::comm
