// Mesh::postRecvAfter against a peer the test plays by hand over a
// socketpair, so the order of events is fixed without sleeps: the deferred
// receive's bytes arrive while the send it waits for is still stuck in a
// full socket buffer, and must not land until that send is out.
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/mesh.h"

namespace archipelago::comm {
namespace {

constexpr uint32_t kMeshEpoch = 7;
constexpr uint64_t kSendTag = 1, kLateTag = 2, kMarkerTag = 3;

FrameHeader dataFrame(uint64_t tag, size_t bytes) {
  FrameHeader h;
  h.type = FrameType::kData;
  h.epoch = kMeshEpoch;
  h.tag = tag;
  h.offset = 0;
  h.total = bytes;
  return h;
}

TEST(Mesh, ReceiveAfterASendLandsOnlyOnceTheSendIsOut) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fds), 0);
  Socket peer(fds[1]);
  CommOptions o;
  o.heartbeat_timeout_s = 0;  // the hand-played peer sends no heartbeats
  Mesh mesh(0, kMeshEpoch, {0, 1}, o);
  std::vector<Mesh::PeerLinks> links(1);
  links[0].peer = 1;
  links[0].streams.push_back(std::make_unique<Socket>(fds[0]));
  mesh.start(std::move(links));
  const auto dl = core::Deadline::afterSeconds(30);

  // 8 MiB does not fit in the socket buffers: the send stays in flight
  // until the test reads it.
  std::vector<uint8_t> out(8 << 20, 0x11);
  SendHandle h = mesh.send(1, kSendTag, out.data(), out.size());
  std::vector<uint8_t> dst(4096, 0xAA);
  mesh.postRecvAfter(h, 1, kLateTag, dst.data(), dst.size());
  uint8_t marker = 0;
  mesh.postRecv(1, kMarkerTag, &marker, 1);

  // The peer sends the deferred receive's bytes, then a marker on the same
  // stream: once the marker is in, the receiver has read the first frame.
  const std::vector<uint8_t> late(dst.size(), 0x55), one(1, 0x01);
  ASSERT_TRUE(peer.writeFrame(dataFrame(kLateTag, late.size()), late, dl).isOk());
  ASSERT_TRUE(peer.writeFrame(dataFrame(kMarkerTag, 1), one, dl).isOk());
  ASSERT_TRUE(mesh.waitRecv(1, kMarkerTag, dl, nullptr).isOk());
  EXPECT_EQ(marker, 0x01);
  EXPECT_EQ(static_cast<size_t>(std::count(dst.begin(), dst.end(), 0xAA)), dst.size())
      << "the receive landed while the send it waits for was still going out";
  // The socket orders that check before the landing, which ThreadSanitizer
  // cannot see; the mesh's lock, taken here and by the sender thread that
  // posts the receive, shows it the same order.
  ASSERT_FALSE(mesh.failed());

  // Drain the send; then the staged bytes land.
  size_t drained = 0;
  while (drained < out.size()) {
    FrameHeader fh;
    std::vector<uint8_t> payload;
    ASSERT_TRUE(peer.readFrame(&fh, &payload, dl).isOk());
    if (fh.type == FrameType::kData && fh.tag == kSendTag) drained += payload.size();
  }
  ASSERT_TRUE(mesh.waitSend(h, dl, nullptr).isOk());
  ASSERT_TRUE(mesh.waitRecv(1, kLateTag, dl, nullptr).isOk());
  EXPECT_EQ(static_cast<size_t>(std::count(dst.begin(), dst.end(), 0x55)), dst.size());

  // A receive behind a send that is already out is posted at once.
  SendHandle small = mesh.send(1, kSendTag + 10, out.data(), 16);
  ASSERT_TRUE(mesh.waitSend(small, dl, nullptr).isOk());
  std::vector<uint8_t> dst2(16, 0xAA);
  mesh.postRecvAfter(small, 1, kLateTag + 10, dst2.data(), dst2.size());
  ASSERT_TRUE(peer.writeFrame(dataFrame(kLateTag + 10, 16), std::vector<uint8_t>(16, 0x66), dl).isOk());
  ASSERT_TRUE(mesh.waitRecv(1, kLateTag + 10, dl, nullptr).isOk());
  EXPECT_EQ(static_cast<size_t>(std::count(dst2.begin(), dst2.end(), 0x66)), dst2.size());

  // Goodbye both ways, so close() ends at once.
  FrameHeader bye;
  bye.type = FrameType::kAbort;
  bye.epoch = kMeshEpoch;
  const std::string text = "closing";
  ASSERT_TRUE(peer.writeFrame(bye, std::vector<uint8_t>(text.begin(), text.end()), dl).isOk());
  mesh.close();
}

}  // namespace
}  // namespace archipelago::comm
