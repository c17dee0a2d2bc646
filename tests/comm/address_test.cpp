// Listen and advertise addresses (comm/address.h), IPv4 and IPv6, on this
// host's real interfaces.
#include <fstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "archipelago/comm/address.h"
#include "comm/socket.h"

namespace archipelago::comm {
namespace {

using ::testing::HasSubstr;

TEST(Address, HostPortSplitsAndJoinsIpv6InBrackets) {
  auto v6 = splitHostPort("[::1]:29500");
  ASSERT_TRUE(v6.isOk());
  EXPECT_EQ(v6->first, "::1");
  EXPECT_EQ(v6->second, 29500);
  auto v4 = splitHostPort("10.77.0.1:80");
  ASSERT_TRUE(v4.isOk());
  EXPECT_EQ(v4->first, "10.77.0.1");
  auto bare = splitHostPort("::1:5");
  ASSERT_FALSE(bare.isOk());
  EXPECT_THAT(bare.status().message(), HasSubstr("brackets"));
  EXPECT_EQ(joinHostPort("::1", 5), "[::1]:5");
  EXPECT_EQ(joinHostPort("10.0.0.1", 5), "10.0.0.1:5");
}

TEST(Address, AutoInterfaceAndLiteralResolveOnThisHost) {
  auto r = routeTo("127.0.0.1");
  ASSERT_TRUE(r.isOk()) << r.status().toString();
  EXPECT_EQ(*r, "127.0.0.1");
  auto lo = interfaceAddress("lo");
  ASSERT_TRUE(lo.isOk()) << lo.status().toString();
  EXPECT_EQ(*lo, "127.0.0.1");
  auto a = resolveAddresses("auto", "", "127.0.0.1", "cluster.islands[0]");
  ASSERT_TRUE(a.isOk());
  EXPECT_EQ(a->listen, "127.0.0.1");
  EXPECT_EQ(a->advertise, "127.0.0.1");
  // A wildcard listens everywhere and advertises the route to the coordinator.
  auto any = resolveAddresses("0.0.0.0", "", "127.0.0.1", "cluster.islands[0]");
  ASSERT_TRUE(any.isOk());
  EXPECT_EQ(any->listen, "0.0.0.0");
  EXPECT_EQ(any->advertise, "127.0.0.1");
  auto bad = resolveAddresses("eth9", "", "127.0.0.1", "cluster.islands[1]");
  ASSERT_FALSE(bad.isOk());
  EXPECT_THAT(bad.status().message(), HasSubstr("cluster.islands[1].listen 'eth9'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("lo"));
  auto wild = resolveAddresses("auto", "::", "127.0.0.1", "worker");
  ASSERT_FALSE(wild.isOk());
  EXPECT_THAT(wild.status().message(), HasSubstr("worker.advertise"));
}

bool hostHasIpv6Loopback() {
  std::ifstream f("/proc/net/if_inet6");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("00000000000000000000000000000001", 0) == 0) return true;
  }
  return false;
}

TEST(Address, Ipv6LoopbackConnects) {
  if (!hostHasIpv6Loopback()) GTEST_SKIP() << "this host has no IPv6 loopback (::1)";
  auto lp = listenTcp("::1", 0);
  ASSERT_TRUE(lp.isOk()) << lp.status().toString();
  auto client = connectTcp("::1", lp->second, core::Deadline::afterSeconds(10), nullptr);
  ASSERT_TRUE(client.isOk()) << client.status().toString();
  auto server = acceptTcp(lp->first, core::Deadline::afterSeconds(10), nullptr);
  ASSERT_TRUE(server.isOk()) << server.status().toString();
  EXPECT_THAT((*server)->peerAddress(), HasSubstr("[::1]:"));
  EXPECT_EQ((*client)->peerAddress(), joinHostPort("::1", lp->second));
  ::close(lp->first);
}

}  // namespace
}  // namespace archipelago::comm
