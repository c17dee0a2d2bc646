#include "archipelago/comm/coordinator.h"

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "archipelago/core/log.h"
#include "comm/endpoint.h"
#include "comm/socket.h"

namespace archipelago::comm {

using nlohmann::json;

namespace {
constexpr uint32_t kMaxRequest = 1 << 20;

Membership fromJson(const json& j) {
  Membership m;
  m.epoch = j.value("epoch", 0u);
  if (j.contains("addresses")) m.addresses = j["addresses"].get<std::vector<std::string>>();
  if (j.contains("islands")) m.islands = j["islands"].get<std::vector<int>>();
  if (j.contains("alive")) m.alive = j["alive"].get<std::vector<int>>();
  return m;
}
}  // namespace

CoordinatorServer::CoordinatorServer(std::string secret, CoordinatorOptions options)
    : secret_(std::move(secret)), options_(std::move(options)) {}

CoordinatorServer::~CoordinatorServer() { stop(); }

core::Status CoordinatorServer::start() {
  if (secret_.empty()) return core::invalidArgument("coordinator: the job secret is empty");
  ARCH_ASSIGN_OR_RETURN(auto lp, listenTcp(options_.host, options_.port));
  listen_fd_ = lp.first;
  port_ = lp.second;
  accept_thread_ = std::thread([this] { acceptLoop(); });
  if (options_.heartbeat_timeout_s > 0) {
    monitor_ = std::thread([this] {
      while (!stop_.aborted()) {
        ::usleep(100000);
        std::lock_guard<std::mutex> lock(mu_);
        int64_t now = core::nowMicros();
        for (auto& [r, t] : last_heartbeat_us_) {
          if (alive_[r] && static_cast<double>(now - t) / 1e6 > options_.heartbeat_timeout_s) {
            bumpEpochLocked(r, "no heartbeat");
          }
        }
      }
    });
  }
  ARCH_LOG_INFO("coordinator listening on {}", address());
  return core::okStatus();
}

void CoordinatorServer::stop() {
  if (stop_.aborted()) return;
  stop_.abort();
  cv_.notify_all();
  if (accept_thread_.joinable()) accept_thread_.join();
  if (monitor_.joinable()) monitor_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& s : sockets_) s->shutdown();
  }
  for (auto& t : clients_) {
    if (t.joinable()) t.join();
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

std::string CoordinatorServer::address() const { return options_.host + ":" + std::to_string(port_); }

Membership CoordinatorServer::membership() const {
  std::lock_guard<std::mutex> lock(mu_);
  Membership m;
  m.epoch = epoch_;
  int n = addresses_.empty() ? 0 : addresses_.rbegin()->first + 1;
  m.addresses.assign(static_cast<size_t>(n), "");
  m.islands.assign(static_cast<size_t>(n), -1);
  for (auto& [r, a] : addresses_) m.addresses[static_cast<size_t>(r)] = a;
  for (auto& [r, i] : islands_) m.islands[static_cast<size_t>(r)] = i;
  for (auto& [r, al] : alive_) {
    if (al) m.alive.push_back(r);
  }
  return m;
}

void CoordinatorServer::bumpEpochLocked(int dead, const std::string& why) {
  alive_[dead] = false;
  ++epoch_;
  ARCH_LOG_WARN("coordinator: rank {} failed ({}); epoch -> {}", dead, why, epoch_);
  cv_.notify_all();
}

void CoordinatorServer::acceptLoop() {
  while (!stop_.aborted()) {
    auto sr = acceptTcp(listen_fd_, core::Deadline::afterSeconds(0.2), &stop_);
    if (!sr.isOk()) continue;
    std::shared_ptr<Socket> sock(std::move(sr).value().release());
    std::lock_guard<std::mutex> lock(mu_);
    sockets_.push_back(sock);
    clients_.emplace_back([this, sock] { serve(sock); });
  }
}

void CoordinatorServer::serve(std::shared_ptr<Socket> sock) {
  auto hr = serverHandshake(*sock, secret_, -1, 0, nullptr, core::Deadline::afterSeconds(5));
  if (!hr.isOk()) {
    ARCH_LOG_WARN("coordinator: refused a connection: {}", hr.status().toString());
    return;
  }
  while (!stop_.aborted()) {
    FrameHeader h;
    std::vector<uint8_t> payload;
    core::Status st = sock->readFrame(&h, &payload, core::Deadline::never(), &stop_, kMaxRequest);
    if (!st.isOk() || h.type != FrameType::kRequest) return;
    std::string reply = handle(std::string(payload.begin(), payload.end()));
    FrameHeader r;
    r.type = FrameType::kReply;
    r.tag = h.tag;
    if (!sock->writeFrame(r, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(reply.data()), reply.size()),
                          core::Deadline::afterSeconds(10), &stop_)
             .isOk()) {
      return;
    }
  }
}

std::string CoordinatorServer::handle(const std::string& text) {
  json req = json::parse(text, nullptr, false);
  if (req.is_discarded() || !req.is_object() || !req.contains("op")) {
    return json{{"ok", false}, {"error", "malformed request"}}.dump();
  }
  std::string op = req.value("op", "");
  auto deadlineOf = [&] { return core::Deadline::afterSeconds(std::min(req.value("timeout", 0.0), 3600.0)); };
  auto state = [&](std::unique_lock<std::mutex>&) {
    json j{{"ok", true}, {"epoch", epoch_}};
    int n = addresses_.empty() ? 0 : addresses_.rbegin()->first + 1;
    std::vector<std::string> addrs(static_cast<size_t>(n));
    std::vector<int> isl(static_cast<size_t>(n), -1);
    std::vector<int> alive;
    for (auto& [r, a] : addresses_) addrs[static_cast<size_t>(r)] = a;
    for (auto& [r, i] : islands_) isl[static_cast<size_t>(r)] = i;
    for (auto& [r, al] : alive_) {
      if (al) alive.push_back(r);
    }
    j["addresses"] = addrs;
    j["islands"] = isl;
    j["alive"] = alive;
    return j;
  };
  std::unique_lock<std::mutex> lock(mu_);
  try {
    if (op == "register") {
      int rank = req.at("rank").get<int>();
      if (rank < 0 || rank > 1 << 20) return json{{"ok", false}, {"error", "bad rank"}}.dump();
      addresses_[rank] = req.at("address").get<std::string>();
      islands_[rank] = req.value("island", 0);
      alive_[rank] = true;
      last_heartbeat_us_[rank] = core::nowMicros();
      cv_.notify_all();
      return json{{"ok", true}, {"epoch", epoch_}}.dump();
    }
    if (op == "members") {
      int world = req.at("world").get<int>();
      auto dl = deadlineOf();
      while (static_cast<int>(addresses_.size()) < world && !dl.expired() && !stop_.aborted()) {
        cv_.wait_for(lock, std::chrono::milliseconds(20));
      }
      if (static_cast<int>(addresses_.size()) < world) {
        return json{{"ok", false}, {"code", "deadline"},
                    {"error", std::to_string(addresses_.size()) + " of " + std::to_string(world) + " ranks registered"}}
            .dump();
      }
      return state(lock).dump();
    }
    if (op == "heartbeat") {
      // Only registered, not departed ranks are watched.
      if (auto it = last_heartbeat_us_.find(req.at("rank").get<int>()); it != last_heartbeat_us_.end()) {
        it->second = core::nowMicros();
      }
      return json{{"ok", true}, {"epoch", epoch_}}.dump();
    }
    if (op == "state") return state(lock).dump();
    if (op == "leave") {
      // A rank that finished cleanly: no longer watched, not a failure.
      last_heartbeat_us_.erase(req.at("rank").get<int>());
      return json{{"ok", true}, {"epoch", epoch_}}.dump();
    }
    if (op == "report_failure") {
      int failed = req.at("failed").get<int>();
      uint32_t e = req.at("epoch").get<uint32_t>();
      if (e == epoch_ && alive_.count(failed) && alive_[failed]) {
        bumpEpochLocked(failed, "reported by rank " + std::to_string(req.value("rank", -1)));
      }
      return state(lock).dump();
    }
    if (op == "kv_set") {
      kv_[req.at("key").get<std::string>()] = req.at("value").get<std::string>();
      cv_.notify_all();
      return json{{"ok", true}}.dump();
    }
    if (op == "kv_get") {
      std::string key = req.at("key").get<std::string>();
      auto dl = deadlineOf();
      while (!kv_.count(key) && !dl.expired() && !stop_.aborted()) cv_.wait_for(lock, std::chrono::milliseconds(20));
      if (!kv_.count(key)) return json{{"ok", false}, {"code", "deadline"}, {"error", "key '" + key + "' not set"}}.dump();
      return json{{"ok", true}, {"value", kv_[key]}}.dump();
    }
  } catch (const std::exception& e) {
    return json{{"ok", false}, {"error", std::string("bad request: ") + e.what()}}.dump();
  }
  return json{{"ok", false}, {"error", "unknown op '" + op + "'"}}.dump();
}

// ---- client ------------------------------------------------------------------------

core::Result<std::unique_ptr<CoordinatorClient>> CoordinatorClient::connect(const std::string& address,
                                                                            const std::string& secret, int rank,
                                                                            const core::Deadline& deadline) {
  ARCH_ASSIGN_OR_RETURN(auto hp, splitHostPort(address));
  ARCH_ASSIGN_OR_RETURN(auto sock, connectTcp(hp.first, hp.second, deadline, nullptr));
  Hello hello;
  hello.role = PeerRole::kCoordinatorClient;
  hello.client_rank = rank;
  hello.server_rank = -1;
  core::Status st = clientHandshake(*sock, secret, hello, false, deadline);
  if (!st.isOk()) return st.withContext("coordinator " + address);
  std::unique_ptr<CoordinatorClient> c(new CoordinatorClient());
  c->sock_ = std::move(sock);
  c->rank_ = rank;
  return c;
}

CoordinatorClient::~CoordinatorClient() {
  stop_ = true;
  if (hb_.joinable()) hb_.join();
}

core::Result<std::string> CoordinatorClient::call(const std::string& request, const core::Deadline& deadline) {
  std::lock_guard<std::mutex> lock(mu_);
  FrameHeader h;
  h.type = FrameType::kRequest;
  ARCH_RETURN_IF_ERROR(sock_->writeFrame(
      h, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(request.data()), request.size()), deadline));
  std::vector<uint8_t> payload;
  core::Status st = sock_->readFrame(&h, &payload, deadline, nullptr, kMaxRequest);
  if (!st.isOk()) {
    sock_->shutdown();  // a half-read reply would desynchronise the stream
    return st.withContext("coordinator request");
  }
  return std::string(payload.begin(), payload.end());
}

namespace {
core::Result<json> parseReply(const core::Result<std::string>& r) {
  if (!r.isOk()) return r.status();
  json j = json::parse(*r, nullptr, false);
  if (j.is_discarded()) return core::dataLoss("coordinator sent a malformed reply");
  if (!j.value("ok", false)) {
    std::string err = j.value("error", "unknown error");
    if (j.value("code", "") == "deadline") return core::deadlineExceeded("coordinator: " + err);
    return core::invalidArgument("coordinator: " + err);
  }
  return j;
}
double secondsLeft(const core::Deadline& d) {
  return d.isNever() ? 3600.0 : std::chrono::duration<double>(d.remaining()).count();
}
}  // namespace

core::Result<uint32_t> CoordinatorClient::registerRank(int rank, int island, const std::string& address,
                                                       const core::Deadline& deadline) {
  json req{{"op", "register"}, {"rank", rank}, {"island", island}, {"address", address}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline)));
  return j.value("epoch", 0u);
}

core::Result<Membership> CoordinatorClient::waitForMembers(int world, const core::Deadline& deadline) {
  json req{{"op", "members"}, {"world", world}, {"timeout", std::max(0.0, secondsLeft(deadline) - 0.05)}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline)));
  return fromJson(j);
}

core::Result<Membership> CoordinatorClient::membership(const core::Deadline& deadline) {
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(json{{"op", "state"}}.dump(), deadline)));
  return fromJson(j);
}

core::Result<uint32_t> CoordinatorClient::heartbeat(const core::Deadline& deadline) {
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(json{{"op", "heartbeat"}, {"rank", rank_}}.dump(), deadline)));
  return j.value("epoch", 0u);
}

core::Status CoordinatorClient::leave(const core::Deadline& deadline) {
  auto r = parseReply(call(json{{"op", "leave"}, {"rank", rank_}}.dump(), deadline));
  return r.isOk() ? core::okStatus() : r.status();
}

core::Result<Membership> CoordinatorClient::reportFailure(int failed, uint32_t epoch, const core::Deadline& deadline) {
  json req{{"op", "report_failure"}, {"rank", rank_}, {"failed", failed}, {"epoch", epoch}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline)));
  return fromJson(j);
}

core::Status CoordinatorClient::kvSet(const std::string& key, const std::string& value,
                                      const core::Deadline& deadline) {
  auto r = parseReply(call(json{{"op", "kv_set"}, {"key", key}, {"value", value}}.dump(), deadline));
  return r.status();
}

core::Result<std::string> CoordinatorClient::kvGet(const std::string& key, const core::Deadline& deadline) {
  json req{{"op", "kv_get"}, {"key", key}, {"timeout", std::max(0.0, secondsLeft(deadline) - 0.05)}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline)));
  return j.value("value", "");
}

void CoordinatorClient::startHeartbeats(double interval_s) {
  if (hb_.joinable()) return;
  hb_ = std::thread([this, interval_s] {
    while (!stop_) {
      for (double t = 0; t < interval_s && !stop_; t += 0.02) ::usleep(20000);
      if (stop_) return;
      (void)heartbeat(core::Deadline::afterSeconds(2));
    }
  });
}

}  // namespace archipelago::comm
