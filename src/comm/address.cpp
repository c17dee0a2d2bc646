#include "archipelago/comm/address.h"

#include <arpa/inet.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <set>

namespace archipelago::comm {

namespace {

bool isLiteral(const std::string& s) {
  in6_addr buf{};
  return inet_pton(AF_INET, s.c_str(), &buf) == 1 || inet_pton(AF_INET6, s.c_str(), &buf) == 1;
}

bool isWildcard(const std::string& s) { return s == "0.0.0.0" || s == "::" || s == "*"; }

std::string numeric(const sockaddr* sa) {
  char host[INET6_ADDRSTRLEN] = {0};
  if (sa->sa_family == AF_INET) inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(sa)->sin_addr, host, sizeof(host));
  else inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(sa)->sin6_addr, host, sizeof(host));
  return host;
}

}  // namespace

core::Result<std::string> routeTo(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), "9", &hints, &res) != 0 || !res) {
    return core::invalidArgument("cannot resolve the coordinator's host '" + host + "'");
  }
  const int fd = ::socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  int err = fd < 0 ? errno : 0;
  if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) != 0) err = errno;
  sockaddr_storage local{};
  socklen_t len = sizeof(local);
  if (err == 0 && ::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) != 0) err = errno;
  if (fd >= 0) ::close(fd);
  freeaddrinfo(res);
  if (err != 0) return core::unavailable("no route from this host to '" + host + "': " + std::strerror(err));
  return numeric(reinterpret_cast<const sockaddr*>(&local));
}

core::Result<std::string> interfaceAddress(const std::string& name) {
  ifaddrs* list = nullptr;
  if (getifaddrs(&list) != 0) return core::unavailable(std::string("cannot list interfaces: ") + std::strerror(errno));
  std::string v4, v6;
  std::set<std::string> names;
  for (ifaddrs* i = list; i; i = i->ifa_next) {
    if (!i->ifa_addr) continue;
    names.insert(i->ifa_name);
    if (name != i->ifa_name) continue;
    if (i->ifa_addr->sa_family == AF_INET && v4.empty()) v4 = numeric(i->ifa_addr);
    if (i->ifa_addr->sa_family == AF_INET6 && v6.empty() &&
        !IN6_IS_ADDR_LINKLOCAL(&reinterpret_cast<const sockaddr_in6*>(i->ifa_addr)->sin6_addr)) {
      v6 = numeric(i->ifa_addr);
    }
  }
  freeifaddrs(list);
  if (!v4.empty()) return v4;
  if (!v6.empty()) return v6;
  std::string known;
  for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
  return core::notFound("no interface '" + name + "' with an address on this host (it has: " + known + ")");
}

core::Result<Addresses> resolveAddresses(const std::string& listen_spec, const std::string& advertise_spec,
                                         const std::string& coordinator_host, const std::string& field) {
  auto one = [&](const std::string& spec, const std::string& which) -> core::Result<std::string> {
    core::Result<std::string> r = spec.empty() || spec == "auto" ? routeTo(coordinator_host)
                                  : isLiteral(spec) || isWildcard(spec) ? core::Result<std::string>(spec)
                                                                         : interfaceAddress(spec);
    if (!r.isOk()) return r.status().withContext(field + "." + which + " '" + (spec.empty() ? "auto" : spec) + "'");
    return r;
  };
  Addresses a;
  ARCH_ASSIGN_OR_RETURN(a.listen, one(listen_spec, "listen"));
  if (!advertise_spec.empty()) {
    ARCH_ASSIGN_OR_RETURN(a.advertise, one(advertise_spec, "advertise"));
    if (isWildcard(a.advertise)) {
      return core::invalidArgument(field + ".advertise '" + advertise_spec + "': peers cannot connect to a wildcard address");
    }
  } else if (isWildcard(a.listen)) {
    ARCH_ASSIGN_OR_RETURN(a.advertise, one("auto", "advertise"));
  } else {
    a.advertise = a.listen;
  }
  return a;
}

}  // namespace archipelago::comm
