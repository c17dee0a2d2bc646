// TLS (archipelago/comm/tls.h, docs/comm.md "TLS"): the credentials
// `secrets init` writes, that the bytes on the wire of a peer link and of
// the coordinator link are ciphertext (a relay in the middle records them),
// that a certificate of another CA, a plain client where TLS is required
// and a TLS client of an end without credentials are refused with a clear
// error, and that collectives stay exact over TLS on every link.
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "archipelago/comm/coordinator.h"
#include "archipelago/comm/tls.h"
#include "archipelago/core/files.h"
#include "comm/endpoint.h"
#include "comm/link_tls.h"
#include "comm/socket.h"
#include "comm_test_util.h"

namespace archipelago::comm {
namespace {

namespace fs = std::filesystem;
using testing::runAll;

core::Deadline dl() { return core::Deadline::afterSeconds(10); }

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("arch-tls-" + std::to_string(::getpid()) + "-" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Fresh credentials in dir_/name (each call a new CA).
  TlsFiles credentials(const std::string& name) {
    const core::Status st = writeCredentials((dir_ / name).string());
    EXPECT_TRUE(st.isOk()) << st.toString();
    return credentialFiles((dir_ / name).string());
  }
  fs::path dir_;
};

// A TCP relay in the middle of one connection: what it forwards from the
// client to the server (and back) is what a wire tap would see.
class Relay {
 public:
  explicit Relay(int target_port) {
    auto lp = listenTcp("127.0.0.1", 0);
    EXPECT_TRUE(lp.isOk());
    listen_fd_ = lp->first;
    port_ = lp->second;
    thread_ = std::thread([this, target_port] { run(target_port); });
  }
  ~Relay() {
    stop_ = true;
    thread_.join();
    ::close(listen_fd_);
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  // Everything forwarded so far, both directions in order of arrival.
  std::string seen() {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_;
  }

 private:
  void run(int target_port) {
    auto in = acceptTcp(listen_fd_, core::Deadline::afterSeconds(20), nullptr);
    if (!in.isOk()) return;
    auto out = connectTcp("127.0.0.1", target_port, core::Deadline::afterSeconds(20), nullptr);
    if (!out.isOk()) return;
    const int fds[2] = {(*in)->fd(), (*out)->fd()};
    char buf[1 << 16];
    while (!stop_) {
      pollfd p[2] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}};
      if (::poll(p, 2, 50) <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = ::recv(fds[i], buf, sizeof(buf), 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) return;
        if (n < 0) continue;
        {
          std::lock_guard<std::mutex> lock(mu_);
          seen_.append(buf, static_cast<size_t>(n));
        }
        for (ssize_t sent = 0; sent < n;) {
          const ssize_t k = ::send(fds[1 - i], buf + sent, static_cast<size_t>(n - sent), MSG_NOSIGNAL);
          if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            pollfd w{fds[1 - i], POLLOUT, 0};
            ::poll(&w, 1, 50);
            continue;
          }
          if (k <= 0) return;
          sent += k;
        }
      }
    }
  }
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
  std::mutex mu_;
  std::string seen_;
};

const std::string kMarker = "ARCHIPELAGO-PLAINTEXT-MARKER|";

std::string markerBytes(size_t n) {
  std::string s;
  while (s.size() < n) s += kMarker;
  return s;
}

// One peer stream through a relay: returns what the relay saw, after the
// client sent `bytes` and the server echoed them back intact.
std::string peerStreamSeenOnTheWire(const TlsFiles* tls, const TlsFiles& server_files) {
  auto ep = Endpoint::listen("127.0.0.1", 1, "job-secret", [tls](PeerRole, int32_t) { return tls != nullptr; },
                             server_files);
  EXPECT_TRUE(ep.isOk());
  Relay relay((*ep)->port());
  auto client = dialPeer(relay.address(), "job-secret", 0, 1, 0, 0, tls, dl(), nullptr);
  EXPECT_TRUE(client.isOk()) << client.status().toString();
  if (!client.isOk()) return "";
  auto server = (*ep)->take(0, 0, 0, dl(), nullptr);
  EXPECT_TRUE(server.isOk());
  const std::string bytes = markerBytes(256 << 10);
  std::string got(bytes.size(), '\0'), back(bytes.size(), '\0');
  std::thread writer([&] { EXPECT_TRUE((*client)->writeFull(bytes.data(), bytes.size(), dl(), nullptr).isOk()); });
  EXPECT_TRUE((*server)->readFull(got.data(), got.size(), dl(), nullptr).isOk());
  writer.join();
  EXPECT_EQ(got, bytes);
  std::thread echo([&] { EXPECT_TRUE((*server)->writeFull(got.data(), got.size(), dl(), nullptr).isOk()); });
  EXPECT_TRUE((*client)->readFull(back.data(), back.size(), dl(), nullptr).isOk());
  echo.join();
  EXPECT_EQ(back, bytes);
  return relay.seen();
}

TEST_F(TlsTest, SecretsInitWritesACaANodeCertificateItSignedAndASecret) {
  const TlsFiles a = credentials("a");
  EXPECT_TRUE(checkCredentials(a, "security.credentials").isOk());
  struct stat st {};
  ASSERT_EQ(::stat((dir_ / "a").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0700u);
  for (const char* f : {"node.key", "secret"}) {
    ASSERT_EQ(::stat((dir_ / "a" / f).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u) << f;
  }
  auto secret = readSecretFile((dir_ / "a" / "secret").string());
  ASSERT_TRUE(secret.isOk());
  EXPECT_EQ(secret->size(), 64u);
  EXPECT_EQ(secret->find_first_not_of("0123456789abcdef"), std::string::npos);

  // Existing credentials are kept unless forced; forced, a new CA replaces them.
  const std::string ca_before = core::readFile(a.ca).value();
  EXPECT_EQ(writeCredentials((dir_ / "a").string()).code(), core::StatusCode::kFailedPrecondition);
  EXPECT_EQ(core::readFile(a.ca).value(), ca_before);
  CredentialOptions force;
  force.force = true;
  ASSERT_TRUE(writeCredentials((dir_ / "a").string(), force).isOk());
  EXPECT_NE(core::readFile(a.ca).value(), ca_before);
  EXPECT_TRUE(checkCredentials(a, "security.credentials").isOk());

  // A directory holding anything else is never written into, even forced.
  fs::create_directories(dir_ / "notes");
  ASSERT_TRUE(core::writeFile(dir_ / "notes" / "keep.txt", "mine").isOk());
  const core::Status notes = writeCredentials((dir_ / "notes").string(), force);
  EXPECT_EQ(notes.code(), core::StatusCode::kInvalidArgument);
  EXPECT_NE(notes.message().find("keep.txt"), std::string::npos) << notes.message();
  EXPECT_EQ(core::readFile(dir_ / "notes" / "keep.txt").value(), "mine");

  // Files that do not belong together are refused naming the field.
  const TlsFiles b = credentials("b");
  const core::Status other_ca = checkCredentials({b.ca, a.cert, a.key}, "security.credentials");
  EXPECT_EQ(other_ca.code(), core::StatusCode::kInvalidArgument);
  EXPECT_NE(other_ca.message().find("is not signed by the CA"), std::string::npos) << other_ca.message();
  const core::Status other_key = checkCredentials({a.ca, a.cert, b.key}, "security.credentials");
  EXPECT_NE(other_key.message().find("does not belong"), std::string::npos) << other_key.message();
  const core::Status missing = checkCredentials(credentialFiles((dir_ / "none").string()), "security.credentials");
  EXPECT_NE(missing.message().find("security.credentials"), std::string::npos) << missing.message();
  EXPECT_NE(missing.message().find("secrets init"), std::string::npos) << missing.message();
}

TEST_F(TlsTest, APeerStreamCarriesOnlyCiphertext) {
  const TlsFiles a = credentials("a");
  // Control: without TLS the relay sees the marker, so it does record the stream.
  EXPECT_NE(peerStreamSeenOnTheWire(nullptr, {}).find(kMarker), std::string::npos);
  const std::string wire = peerStreamSeenOnTheWire(&a, a);
  EXPECT_GT(wire.size(), size_t{2} * (256 << 10));  // both directions went through the relay
  EXPECT_EQ(wire.find(kMarker), std::string::npos);
  EXPECT_EQ(wire.find("ARCHIPELAGO"), std::string::npos);
}

TEST_F(TlsTest, TheCoordinatorLinkCarriesOnlyCiphertext) {
  const TlsFiles a = credentials("a");
  CoordinatorOptions o;
  o.tls = a;
  CoordinatorServer server("coord-secret", o);
  ASSERT_TRUE(server.start().isOk());
  Relay relay(server.port());
  auto c = CoordinatorClient::connect(relay.address(), "coord-secret", 0, dl(), a);
  ASSERT_TRUE(c.isOk()) << c.status().toString();
  const std::string address = "marker-host-" + kMarker + ":1234";
  ASSERT_TRUE((*c)->registerRank(0, 0, address, dl()).isOk());
  EXPECT_EQ((*c)->membership(dl()).value().addresses, (std::vector<std::string>{address}));
  EXPECT_GT(relay.seen().size(), address.size());
  EXPECT_EQ(relay.seen().find("marker-host"), std::string::npos);
  EXPECT_EQ(relay.seen().find("register"), std::string::npos);
  c->reset();
  server.stop();
}

TEST_F(TlsTest, AnotherCaAPlainClientAndAnEndWithoutCredentialsAreRefused) {
  const TlsFiles a = credentials("a");
  const TlsFiles b = credentials("b");
  auto ep = Endpoint::listen("127.0.0.1", 1, "s", [](PeerRole, int32_t) { return true; }, a);
  ASSERT_TRUE(ep.isOk());
  const std::string addr = "127.0.0.1:" + std::to_string((*ep)->port());
  // The client does not trust the server's certificate (another CA): refused at once, not retried.
  auto other = dialPeer(addr, "s", 0, 1, 0, 0, &b, dl(), nullptr);
  EXPECT_EQ(other.status().code(), core::StatusCode::kPermissionDenied) << other.status().toString();
  EXPECT_NE(other.status().message().find("certificate"), std::string::npos) << other.status().toString();
  // The client trusts the server, but its own certificate is of another CA: the server refuses it.
  const TlsFiles mixed{a.ca, b.cert, b.key};
  auto refused = dialPeer(addr, "s", 0, 1, 0, 0, &mixed, dl(), nullptr);
  EXPECT_EQ(refused.status().code(), core::StatusCode::kPermissionDenied) << refused.status().toString();
  EXPECT_NE(refused.status().message().find("refused"), std::string::npos) << refused.status().toString();
  // No TLS where it is required.
  auto plain = dialPeer(addr, "s", 0, 1, 0, 0, nullptr, dl(), nullptr);
  EXPECT_EQ(plain.status().code(), core::StatusCode::kPermissionDenied);
  EXPECT_NE(plain.status().message().find("must use TLS"), std::string::npos) << plain.status().toString();
  // Same credentials: accepted.
  EXPECT_TRUE(dialPeer(addr, "s", 0, 1, 0, 0, &a, dl(), nullptr).isOk());

  // An end without credentials cannot answer a TLS client.
  auto bare = Endpoint::listen("127.0.0.1", 1, "s", [](PeerRole, int32_t) { return false; });
  ASSERT_TRUE(bare.isOk());
  auto to_bare = dialPeer("127.0.0.1:" + std::to_string((*bare)->port()), "s", 0, 1, 0, 0, &a, dl(), nullptr);
  EXPECT_FALSE(to_bare.isOk());
  EXPECT_NE(to_bare.status().message().find("TLS"), std::string::npos) << to_bare.status().toString();

  // The coordinator: another CA and a plain client are refused.
  CoordinatorOptions o;
  o.tls = a;
  CoordinatorServer server("s", o);
  ASSERT_TRUE(server.start().isOk());
  auto c_other = CoordinatorClient::connect(server.address(), "s", 0, dl(), b);
  EXPECT_EQ(c_other.status().code(), core::StatusCode::kPermissionDenied) << c_other.status().toString();
  auto c_plain = CoordinatorClient::connect(server.address(), "s", 0, dl());
  EXPECT_EQ(c_plain.status().code(), core::StatusCode::kPermissionDenied) << c_plain.status().toString();
  EXPECT_NE(c_plain.status().message().find("must use TLS"), std::string::npos) << c_plain.status().toString();
  EXPECT_TRUE(CoordinatorClient::connect(server.address(), "s", 0, dl(), a).isOk());
  server.stop();
}

// Which links are encrypted (comm/link_tls.h): the dialler and the
// listener both ask this rule.
TEST(TlsRule, EveryLinkWithSecurityTlsElseTheStraitsThatSaySo) {
  CommOptions o;
  core::ClusterSpec cl;
  testing::twoIslandCluster(cl, "a", "b");
  EXPECT_FALSE(linkTls(o, cl, 0, 1));
  EXPECT_FALSE(anyLinkTls(o, cl));
  cl.straits[0].tls = true;
  EXPECT_TRUE(linkTls(o, cl, 0, 1));
  EXPECT_TRUE(linkTls(o, cl, 1, 0));
  EXPECT_FALSE(linkTls(o, cl, 0, 0));  // inside an island
  EXPECT_TRUE(anyLinkTls(o, cl));
  o.tls_on_straits = false;
  EXPECT_FALSE(linkTls(o, cl, 0, 1));
  o.tls_all_links = true;
  EXPECT_TRUE(linkTls(o, cl, 0, 0));
  EXPECT_TRUE(linkTls(o, core::ClusterSpec{}, 0, 0));  // no spec at all: still every link
}

TEST_F(TlsTest, TlsWithoutCredentialsIsRefusedNamingTheField) {
  CommConfig cfg;
  cfg.world = 1;
  cfg.secret = "s";
  cfg.options.tls_all_links = true;
  auto c = Communicator::create(cfg);
  ASSERT_FALSE(c.isOk());
  EXPECT_EQ(c.status().code(), core::StatusCode::kInvalidArgument);
  EXPECT_NE(c.status().message().find("security.credentials"), std::string::npos) << c.status().toString();
  EXPECT_NE(c.status().message().find("secrets init"), std::string::npos) << c.status().toString();
}

// Three ranks over two islands, every link TLS (security.tls), and two
// ranks with TLS on their strait only: results stay exact.
TEST_F(TlsTest, CollectivesAreExactOverTlsOnEveryLinkAndOnAStrait) {
  const TlsFiles a = credentials("a");
  for (const bool all : {true, false}) {
    const int world = all ? 3 : 2;
    runAll(world, [&](const LocalRank& lr) -> std::string {
      CommConfig cfg = testing::testConfig();
      cfg.island_of_rank = all ? std::vector<int>{0, 0, 1} : std::vector<int>{0, 1};
      testing::twoIslandCluster(cfg.cluster, "a", "b").tls = !all;
      cfg.options.tls_all_links = all;
      cfg.options.tls = a;
      auto cr = connectRank(lr, cfg, core::Deadline::afterSeconds(20));
      if (!cr.isOk()) return cr.status().toString();
      std::vector<float> x(300001, static_cast<float>(lr.rank + 1));
      RANK_OK(cr->world->allreduce(x.data(), x.size(), DType::kF32, ReduceOp::kSum));
      const float want = all ? 6.0f : 3.0f;
      RANK_CHECK(x[0] == want && x[300000] == want, "TLS allreduce result " << x[0]);
      return "";
    }, 60);
  }
}

}  // namespace
}  // namespace archipelago::comm
