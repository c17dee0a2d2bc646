// Refused connections (comm/refusal_log.h): peer and reason on every line,
// a wrong secret named as such, and a bounded number of lines per window.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "comm/refusal_log.h"
#include "comm/socket.h"

namespace archipelago::comm {
namespace {

using ::testing::HasSubstr;

TEST(RefusalLog, AtMostBurstLinesPerWindowThenACount) {
  std::vector<std::string> lines;
  RefusalLog log("comm rank 3", 5, 60, [&](const std::string& l) { lines.push_back(l); });
  const core::Status wrong = core::permissionDenied("handshake from rank 1 failed authentication (wrong job secret?)");
  for (int i = 0; i < 20; ++i) log.refusedAt("10.0.0." + std::to_string(i) + ":4000", wrong, i);
  ASSERT_EQ(lines.size(), 5u);
  EXPECT_THAT(lines[0], HasSubstr("comm rank 3: refused a connection from 10.0.0.0:4000: wrong job secret"));
  EXPECT_THAT(lines[4], HasSubstr("counted, not shown"));
  // The next window starts with what the last one left out.
  log.refusedAt("10.0.0.99:4000", core::failedPrecondition("stale epoch"), 61);
  ASSERT_EQ(lines.size(), 7u);
  EXPECT_THAT(lines[5], HasSubstr("15 more connection(s) refused in the last 61 s"));
  EXPECT_THAT(lines[5], HasSubstr("latest: from 10.0.0.19:4000"));
  EXPECT_THAT(lines[6], HasSubstr("from 10.0.0.99:4000: FAILED_PRECONDITION: stale epoch"));
  EXPECT_EQ(log.total(), 21);
  // A refused certificate is not called a wrong secret.
  log.refusedAt("10.0.0.98:4000", core::permissionDenied("TLS handshake: the certificates were refused"), 62);
  EXPECT_THAT(lines.back(), HasSubstr("the certificates were refused"));
  EXPECT_THAT(lines.back(), ::testing::Not(HasSubstr("wrong job secret")));
}

TEST(Socket, PeerAddressNamesTheOtherEnd) {
  auto lp = listenTcp("127.0.0.1", 0);
  ASSERT_TRUE(lp.isOk()) << lp.status().toString();
  auto client = connectTcp("127.0.0.1", lp->second, core::Deadline::afterSeconds(10), nullptr);
  ASSERT_TRUE(client.isOk()) << client.status().toString();
  auto server = acceptTcp(lp->first, core::Deadline::afterSeconds(10), nullptr);
  ASSERT_TRUE(server.isOk()) << server.status().toString();
  EXPECT_THAT((*server)->peerAddress(), HasSubstr("127.0.0.1:"));
  EXPECT_EQ((*client)->peerAddress(), "127.0.0.1:" + std::to_string(lp->second));
  ::close(lp->first);
}

}  // namespace
}  // namespace archipelago::comm
