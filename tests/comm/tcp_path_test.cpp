// The TCP path's per-link frame checksums, reuse of a send's memory as
// soon as the send completed, and the bench's TCP floor. The Mesh tests play the peer by hand over a
// real 127.0.0.1 TCP connection, so every step is ordered by events
// (frames), not by clocks.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <unistd.h>
#include <memory>
#include <string>
#include <vector>

#include "comm/bench_tcp_floor.h"
#include "comm/link_checksum.h"
#include "comm/mesh.h"
#include "comm_test_util.h"

namespace archipelago::comm {
namespace {

using ::testing::HasSubstr;

constexpr uint32_t kPathEpoch = 3;

FrameHeader dataFrame(uint64_t tag, size_t offset, size_t total, uint8_t flags = 0, uint32_t length = 0) {
  FrameHeader h;
  h.length = length;
  h.type = FrameType::kData;
  h.epoch = kPathEpoch;
  h.tag = tag;
  h.offset = offset;
  h.total = total;
  h.flags = flags;
  return h;
}

// A Mesh of rank 0 whose one peer (rank 1) is a socket the test drives.
struct HandPlayedPeer {
  std::unique_ptr<Mesh> mesh;
  std::unique_ptr<Socket> peer;
  core::Deadline dl = core::Deadline::afterSeconds(30);

  explicit HandPlayedPeer(bool crc) {
    auto lis = listenTcp("127.0.0.1", 0);
    EXPECT_TRUE(lis.isOk());
    auto client = connectTcp("127.0.0.1", lis->second, dl, nullptr);
    EXPECT_TRUE(client.isOk());
    auto server = acceptTcp(lis->first, dl, nullptr);
    EXPECT_TRUE(server.isOk());
    ::close(lis->first);
    CommOptions o;
    o.heartbeat_timeout_s = 0;  // the hand-played peer sends no heartbeats
    mesh = std::make_unique<Mesh>(0, kPathEpoch, std::vector<int>{0, 1}, o);
    std::vector<Mesh::PeerLinks> links(1);
    links[0].peer = 1;
    links[0].crc = crc;
    links[0].streams.push_back(std::move(client).value());
    mesh->start(std::move(links));
    peer = std::move(server).value();
  }
  ~HandPlayedPeer() {
    peer->shutdown();
    mesh->fail(core::aborted("test over"));
  }
  // Writes raw bytes: a header (its length = the payload's unless set) and
  // as much payload as the test wants.
  void raw(FrameHeader h, const std::vector<uint8_t>& payload) {
    if (h.length == 0) h.length = static_cast<uint32_t>(payload.size());
    uint8_t hdr[kFrameHeaderSize];
    encodeHeader(h, hdr);
    ASSERT_TRUE(peer->writeTwo(hdr, sizeof(hdr), payload.data(), payload.size(), dl, nullptr).isOk());
  }
};

// The flags byte: a data frame may say "no CRC"; unknown flags, or flags on
// any other frame type, are garbage.
TEST(TcpPath, FrameFlagsAreParsedStrictly) {
  FrameHeader h = dataFrame(5, 0, 3, kFrameFlagNoCrc, 3);
  h.crc = 0x12345678;  // not checked for a flagged frame
  uint8_t b[kFrameHeaderSize];
  encodeHeader(h, b);
  auto back = decodeHeader(b);
  ASSERT_TRUE(back.isOk()) << back.status().toString();
  EXPECT_EQ(back->flags, kFrameFlagNoCrc);
  EXPECT_EQ(back->type, FrameType::kData);
  const std::vector<uint8_t> pl = {1, 2, 3};
  EXPECT_TRUE(checkPayload(*back, pl).isOk());
  EXPECT_EQ(checkPayload(*back, std::vector<uint8_t>{1, 2}).code(), core::StatusCode::kDataLoss);
  h.flags = 0;  // the same header with a CRC claimed is checked
  EXPECT_EQ(checkPayload(h, pl).code(), core::StatusCode::kDataLoss);
  h.flags = 0x80;
  encodeHeader(h, b);
  EXPECT_EQ(decodeHeader(b).status().code(), core::StatusCode::kDataLoss);
  FrameHeader hb;
  hb.type = FrameType::kHeartbeat;
  hb.flags = kFrameFlagNoCrc;
  encodeHeader(hb, b);
  EXPECT_EQ(decodeHeader(b).status().code(), core::StatusCode::kDataLoss);
}

// Without a CRC the receiver still rejects a frame that is cut short: at
// the end of the connection, or when what follows does not parse as the
// next header; and an oversized length is refused before any byte is read.
TEST(TcpPath, ChecksumOffLinkRejectsTruncatedAndOversizedFrames) {
  {
    HandPlayedPeer t(/*crc=*/false);
    std::vector<uint8_t> dst(1000, 0xAA);
    t.mesh->postRecv(1, 10, dst.data(), dst.size());
    t.raw(dataFrame(10, 0, 1000, kFrameFlagNoCrc, 1000), std::vector<uint8_t>(500, 1));
    t.peer->shutdownWrite();
    core::Status st = t.mesh->waitRecv(1, 10, t.dl, nullptr);
    EXPECT_EQ(st.code(), core::StatusCode::kUnavailable) << st.toString();
  }
  {
    HandPlayedPeer t(/*crc=*/false);
    std::vector<uint8_t> a(1000), b(600);
    t.mesh->postRecv(1, 10, a.data(), a.size());
    t.mesh->postRecv(1, 11, b.data(), b.size());
    t.raw(dataFrame(10, 0, 1000, kFrameFlagNoCrc, 1000), std::vector<uint8_t>(500, 1));
    t.raw(dataFrame(11, 0, 600, kFrameFlagNoCrc, 600), std::vector<uint8_t>(600, 2));
    core::Status st = t.mesh->waitRecv(1, 11, t.dl, nullptr);
    EXPECT_EQ(st.code(), core::StatusCode::kDataLoss) << st.toString();
    EXPECT_THAT(st.message(), HasSubstr("magic"));
  }
  {
    HandPlayedPeer t(/*crc=*/false);
    std::vector<uint8_t> dst(16);
    t.mesh->postRecv(1, 10, dst.data(), dst.size());
    t.raw(dataFrame(10, 0, 1u << 30, kFrameFlagNoCrc, kMaxFramePayload), {});
    core::Status st = t.mesh->waitRecv(1, 10, t.dl, nullptr);
    EXPECT_EQ(st.code(), core::StatusCode::kResourceExhausted) << st.toString();
  }
}

// A link that requires checksums refuses a frame that has none.
TEST(TcpPath, ChecksumOnLinkRefusesAFrameWithoutOne) {
  HandPlayedPeer t(/*crc=*/true);
  std::vector<uint8_t> dst(64);
  t.mesh->postRecv(1, 10, dst.data(), dst.size());
  t.raw(dataFrame(10, 0, 64, kFrameFlagNoCrc, 64), std::vector<uint8_t>(64, 9));
  core::Status st = t.mesh->waitRecv(1, 10, t.dl, nullptr);
  EXPECT_EQ(st.code(), core::StatusCode::kDataLoss) << st.toString();
  EXPECT_THAT(st.message(), HasSubstr("without a CRC32C"));
}

// The per-link rule (docs/comm.md "Checksums").
TEST(TcpPath, ChecksumRulePerLink) {
  core::ClusterSpec cl;
  testing::twoIslandCluster(cl, "a", "b");
  // Inside an island: off on one host, on between hosts.
  EXPECT_FALSE(linkChecksum("auto", cl, 0, 0, /*same_host=*/true, /*tls=*/false));
  EXPECT_TRUE(linkChecksum("auto", cl, 0, 0, false, false));
  // Across a strait: on, also on one host (it stands for a WAN), off with TLS.
  EXPECT_TRUE(linkChecksum("auto", cl, 0, 1, true, false));
  EXPECT_FALSE(linkChecksum("auto", cl, 0, 1, false, true));
  // The job's explicit settings win over auto.
  cl.islands[0].checksum = "off";
  cl.islands[1].checksum = "on";
  cl.straits[0].checksum = "off";
  EXPECT_FALSE(linkChecksum("auto", cl, 0, 0, false, false));
  EXPECT_TRUE(linkChecksum("auto", cl, 1, 1, true, false));
  EXPECT_FALSE(linkChecksum("auto", cl, 1, 0, false, false));
  // CommOptions::checksum forces every link.
  EXPECT_TRUE(linkChecksum("on", cl, 0, 0, true, true));
  EXPECT_FALSE(linkChecksum("off", cl, 1, 1, false, false));
  // No cluster spec (the bench, tests): auto.
  EXPECT_FALSE(linkChecksum("auto", core::ClusterSpec{}, 0, 0, true, false));
  EXPECT_TRUE(checkChecksumOption("auto").isOk());
  core::Status bad = checkChecksumOption("maybe");
  EXPECT_EQ(bad.code(), core::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("checksum 'maybe': expected auto, on or off"));
}

// Between processes over TCP frames without checksums: the sender
// overwrites its buffer as soon as each send completes; the receiver must
// still see every message as it was when sent (a completed send no longer
// reads its memory, whatever path the bytes took).
TEST(TcpPath, SourceReusedRightAfterEachSendNeverReachesThePeer) {
  testing::runAll(2, [](const LocalRank& lr) -> std::string {
    CommConfig cfg = testing::testConfig();
    auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    Group& g = *cr->world;
    OpOptions o;
    o.same_host_copy = false;  // every byte through TCP
    o.deadline = core::Deadline::afterSeconds(60);
    std::vector<uint32_t> buf((1 << 20) / 4 + 3);
    for (uint32_t k = 0; k < 40; ++k) {
      if (g.rank() == 0) {
        std::fill(buf.begin(), buf.end(), k);
        RANK_OK(g.send(buf.data(), buf.size(), DType::kI32, 1, 7, o));
        std::fill(buf.begin(), buf.end(), 0xDEADBEEFu);  // reuse at once
      } else {
        RANK_OK(g.recv(buf.data(), buf.size(), DType::kI32, 0, 7, o));
        auto bad = std::find_if(buf.begin(), buf.end(), [k](uint32_t v) { return v != k; });
        RANK_CHECK(bad == buf.end(), "message " << k << " word " << (bad - buf.begin()) << " is " << *bad);
      }
    }
    RANK_OK(g.barrier());
    return "";
  });
}

// `bench comm`'s tcp_floor row moves what it claims: 2(n-1) pieces of
// bytes/n from each rank to the next, over plain sockets. Every rank checks
// each received piece against the previous rank's source, word by word.
TEST(TcpPath, FloorRowMovesTheRingsBytesToTheNextRank) {
  testing::runAll(3, [](const LocalRank& lr) -> std::string {
    auto cr = connectRank(lr, testing::testConfig(), core::Deadline::afterSeconds(20));
    if (!cr.isOk()) return cr.status().toString();
    Group& g = *cr->world;
    auto floor = TcpFloor::connect(g, "127.0.0.1");
    if (!floor.isOk()) return floor.status().toString();
    const int n = g.size();
    const int prev = (g.rank() + n - 1) % n;
    const size_t words = 3 * 100003;  // 3 pieces of 100003 words
    auto word = [](int rank, size_t i) { return static_cast<uint32_t>(rank) << 24 | static_cast<uint32_t>(i); };
    std::vector<uint32_t> src(words), dst(words, 0xFFFFFFFFu);
    for (size_t i = 0; i < words; ++i) src[i] = word(g.rank(), i);
    RANK_OK((*floor)->exchange(src.data(), dst.data(), words * 4));
    for (size_t i = 0; i < words; ++i) {
      RANK_CHECK(dst[i] == word(prev, i), "word " << i << " is " << dst[i] << ", rank " << prev << " sent "
                                                  << word(prev, i));
    }
    RANK_OK(g.barrier());
    return "";
  });
}

}  // namespace
}  // namespace archipelago::comm
