// The fast TCP path: spliced sends (the sender's memory is referenced by the
// socket until the peer acks it) and per-link frame checksums. The Mesh tests
// play the peer by hand over a real 127.0.0.1 TCP connection, so every step
// is ordered by events (frames, acks), not by clocks.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "comm/link_checksum.h"
#include "comm/mesh.h"
#include "comm_test_util.h"

namespace archipelago::comm {
namespace {

using ::testing::HasSubstr;

constexpr uint32_t kEpoch = 3;

FrameHeader dataFrame(uint64_t tag, size_t offset, size_t total, uint8_t flags = 0, uint32_t length = 0) {
  FrameHeader h;
  h.length = length;
  h.type = FrameType::kData;
  h.epoch = kEpoch;
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

  HandPlayedPeer(bool crc, bool splice, size_t pipe_bytes = 4096) {
    auto lis = listenTcp("127.0.0.1", 0);
    EXPECT_TRUE(lis.isOk());
    auto client = connectTcp("127.0.0.1", lis->second, dl, nullptr);
    EXPECT_TRUE(client.isOk());
    auto server = acceptTcp(lis->first, dl, nullptr);
    EXPECT_TRUE(server.isOk());
    ::close(lis->first);
    CommOptions o;
    o.heartbeat_timeout_s = 0;  // the hand-played peer sends no heartbeats
    o.splice_pipe_bytes = pipe_bytes;
    mesh = std::make_unique<Mesh>(0, kEpoch, std::vector<int>{0, 1}, o);
    std::vector<Mesh::PeerLinks> links(1);
    links[0].peer = 1;
    links[0].crc = crc;
    links[0].splice = splice;
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
  void ack(uint64_t count) {
    FrameHeader h;
    h.type = FrameType::kDataAck;
    h.epoch = kEpoch;
    std::vector<uint8_t> pl(8);
    std::memcpy(pl.data(), &count, 8);
    ASSERT_TRUE(peer->writeFrame(h, pl, dl).isOk());
  }
};

// A spliced send leaves its pages in the socket: the send completes, and a
// receive into the same memory (the ring's allgather lands in the blocks its
// reduce-scatter sent) may land, only once the peer acked that it read them.
// Through a one-page pipe the payload takes many vmsplice/splice rounds.
TEST(TcpPath, SplicedSendCompletesOnlyOnThePeersAck) {
  HandPlayedPeer t(/*crc=*/false, /*splice=*/true, 4096);
  const uint64_t kSend = 1, kLate = 2, kMarker = 3, kNever = 4;
  std::vector<uint8_t> src((1 << 20) + 64);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + 3);
  const uint8_t* payload = src.data() + 5;  // not page aligned
  const size_t bytes = (1 << 20) + 13;
  SendHandle h = t.mesh->send(1, kSend, payload, bytes, /*same_host_copy=*/false);
  // The deferred receive writes the very bytes the send still exposes.
  uint8_t* late_dst = src.data() + 5;
  std::vector<uint8_t> before(late_dst, late_dst + 4096);
  t.mesh->postRecvAfter(h, 1, kLate, late_dst, 4096);
  uint8_t marker = 0;
  t.mesh->postRecv(1, kMarker, &marker, 1);

  // Read the whole message as the peer: intact, no CRC, only the last frame
  // asks for an ack.
  std::vector<uint8_t> got(bytes);
  size_t seen = 0;
  int acks_wanted = 0;
  while (seen < bytes) {
    FrameHeader fh;
    std::vector<uint8_t> pl;
    ASSERT_TRUE(t.peer->readFrame(&fh, &pl, t.dl).isOk());
    ASSERT_EQ(fh.type, FrameType::kData);
    EXPECT_TRUE(fh.flags & kFrameFlagNoCrc);
    std::memcpy(got.data() + fh.offset, pl.data(), pl.size());
    seen += pl.size();
    if (fh.flags & kFrameFlagAckWanted) {
      ++acks_wanted;
      EXPECT_EQ(fh.offset + fh.length, bytes) << "only the part's last frame asks for the ack";
    }
  }
  EXPECT_EQ(acks_wanted, 1);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), payload));

  // The deferred receive's bytes and a marker arrive; no ack yet, so they
  // must not have landed in the memory the send exposes.
  t.raw(dataFrame(kLate, 0, 4096, kFrameFlagNoCrc), std::vector<uint8_t>(4096, 0x55));
  t.raw(dataFrame(kMarker, 0, 1, kFrameFlagNoCrc), std::vector<uint8_t>(1, 0x01));
  ASSERT_TRUE(t.mesh->waitRecv(1, kMarker, t.dl, nullptr).isOk());
  EXPECT_TRUE(std::equal(before.begin(), before.end(), late_dst)) << "landed before the ack";

  t.ack(1);
  ASSERT_TRUE(t.mesh->waitSend(h, t.dl, nullptr).isOk());
  ASSERT_TRUE(t.mesh->waitRecv(1, kLate, t.dl, nullptr).isOk());
  EXPECT_EQ(static_cast<size_t>(std::count(late_dst, late_dst + 4096, 0x55)), 4096u);

  // Acking frames that were never sent is a protocol error.
  uint8_t never = 0;
  t.mesh->postRecv(1, kNever, &never, 1);
  t.ack(5);
  core::Status st = t.mesh->waitRecv(1, kNever, t.dl, nullptr);
  EXPECT_EQ(st.code(), core::StatusCode::kDataLoss) << st.toString();
}

// Without a CRC the receiver still rejects a frame that is cut short: at
// the end of the connection, or when what follows does not parse as the
// next header; and an oversized length is refused before any byte is read.
TEST(TcpPath, ChecksumOffLinkRejectsTruncatedAndOversizedFrames) {
  {
    HandPlayedPeer t(false, false);
    std::vector<uint8_t> dst(1000, 0xAA);
    t.mesh->postRecv(1, 10, dst.data(), dst.size());
    t.raw(dataFrame(10, 0, 1000, kFrameFlagNoCrc, 1000), std::vector<uint8_t>(500, 1));
    t.peer->shutdownWrite();
    core::Status st = t.mesh->waitRecv(1, 10, t.dl, nullptr);
    EXPECT_EQ(st.code(), core::StatusCode::kUnavailable) << st.toString();
  }
  {
    HandPlayedPeer t(false, false);
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
    HandPlayedPeer t(false, false);
    std::vector<uint8_t> dst(16);
    t.mesh->postRecv(1, 10, dst.data(), dst.size());
    t.raw(dataFrame(10, 0, 1u << 30, kFrameFlagNoCrc, kMaxFramePayload), {});
    core::Status st = t.mesh->waitRecv(1, 10, t.dl, nullptr);
    EXPECT_EQ(st.code(), core::StatusCode::kResourceExhausted) << st.toString();
  }
}

// A link that requires checksums refuses a frame that has none.
TEST(TcpPath, ChecksumOnLinkRefusesAFrameWithoutOne) {
  HandPlayedPeer t(/*crc=*/true, false);
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
  core::IslandSpec a, b;
  a.name = "a";
  b.name = "b";
  cl.islands = {a, b};
  core::StraitSpec s;
  s.a = "a";
  s.b = "b";
  cl.straits = {s};
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

// Spliced sends between processes: the sender overwrites its buffer as soon
// as each send completes; the receiver must still see every message as it
// was when sent (the completion waits for the receiver's ack).
TEST(TcpPath, SourceReusedRightAfterEachSendNeverReachesThePeer) {
  testing::runAll(2, [](const LocalRank& lr) -> std::string {
    CommConfig cfg = testing::testConfig();
    cfg.options.splice_pipe_bytes = 4096;
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

}  // namespace
}  // namespace archipelago::comm
