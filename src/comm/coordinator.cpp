#include "archipelago/comm/coordinator.h"

#include <unistd.h>

#include <nlohmann/json.hpp>

#include "archipelago/core/log.h"
#include "comm/coordinator_messages.h"
#include "comm/endpoint.h"
#include "comm/refusal_log.h"
#include "comm/socket.h"

namespace archipelago::comm {

using nlohmann::json;

namespace {
constexpr uint32_t kMaxRequest = 1 << 20;

json toJson(const Membership& m) {
  return json{{"epoch", m.epoch}, {"addresses", m.addresses}, {"islands", m.islands}, {"pids", m.pids},
              {"alive", m.alive}, {"failed", m.failed}};
}

}  // namespace

bool Membership::isAlive(int rank) const { return std::binary_search(alive.begin(), alive.end(), rank); }

// ---- state machine ------------------------------------------------------------------

void MembershipTable::bump(const std::string& kind, int rank, const std::string& why) {
  ++epoch_;
  events_.push_back({epoch_, kind, rank, why, core::wallMicros()});
  if (kind == "join") {
    ARCH_LOG_INFO("coordinator: rank {} joined ({}); epoch -> {}", rank, why, epoch_);
  } else if (rank >= 0) {
    ARCH_LOG_WARN("coordinator: rank {} failed ({}); epoch -> {}", rank, why, epoch_);
  } else {
    ARCH_LOG_WARN("coordinator: transient fault ({}); epoch -> {} with the same members", why, epoch_);
  }
}

void MembershipTable::occupy(Slot& s, int island, const std::string& address, int64_t pid, int64_t now_us) {
  s.state = State::kAlive;
  s.address = address;
  s.island = island;
  s.pid = pid;
  s.last_heartbeat_us = now_us;
  s.watched = true;
  s.entered = 0;
}

uint32_t MembershipTable::registerRank(int rank, int island, const std::string& address, int64_t pid,
                                       int64_t now_us) {
  Slot& s = slots_[rank];
  const bool rejoin = s.state == State::kFailed;
  occupy(s, island, address, pid, now_us);
  if (rejoin) bump("join", rank, "re-registered");
  return epoch_;
}

core::Result<int> MembershipTable::join(int rank, int island, const std::string& address, int64_t pid,
                                        int64_t now_us) {
  if (rank < 0) {
    for (const auto& [r, s] : slots_) {
      if (s.state == State::kFailed) {
        rank = r;
        break;
      }
    }
    if (rank < 0) {
      return core::failedPrecondition("no failed worker slot to join; every rank of the job is alive "
                                      "(pass --rank to replace a specific one)");
    }
  }
  auto it = slots_.find(rank);
  if (it == slots_.end()) {
    return core::invalidArgument("rank " + std::to_string(rank) + " is not a slot of this job (never registered)");
  }
  Slot& s = it->second;
  const bool replacing = s.state == State::kAlive;
  occupy(s, island < 0 ? s.island : island, address, pid, now_us);
  bump("join", rank, replacing ? "replaces a process not yet detected as failed" : "took a failed slot");
  return rank;
}

void MembershipTable::heartbeat(int rank, int64_t now_us) {
  auto it = slots_.find(rank);
  if (it != slots_.end() && it->second.state == State::kAlive) it->second.last_heartbeat_us = now_us;
}

void MembershipTable::leave(int rank) {
  auto it = slots_.find(rank);
  if (it != slots_.end()) it->second.watched = false;
}

bool MembershipTable::reportFailure(int failed, uint32_t epoch, int reporter, const std::string& why,
                                    int64_t /*now_us*/) {
  if (epoch != epoch_) return false;  // already handled (or from the future: ignore)
  const std::string by = "reported by rank " + std::to_string(reporter) + (why.empty() ? "" : ": " + why);
  if (failed < 0) {
    bump("transient", -1, by);
    return true;
  }
  auto it = slots_.find(failed);
  if (it == slots_.end() || it->second.state != State::kAlive) return false;
  it->second.state = State::kFailed;
  it->second.watched = false;
  bump("failure", failed, by);
  return true;
}

std::vector<int> MembershipTable::expire(int64_t now_us) {
  std::vector<int> out;
  if (timeout_s_ <= 0) return out;
  for (auto& [r, s] : slots_) {
    if (s.state != State::kAlive || !s.watched) continue;
    const double silent = static_cast<double>(now_us - s.last_heartbeat_us) / 1e6;
    if (silent > timeout_s_) {
      s.state = State::kFailed;
      s.watched = false;
      bump("failure", r, "no heartbeat for " + std::to_string(silent).substr(0, 4) + " s");
      out.push_back(r);
    }
  }
  return out;
}

void MembershipTable::enter(int rank, uint32_t epoch) {
  auto it = slots_.find(rank);
  if (it != slots_.end() && it->second.state == State::kAlive) {
    it->second.entered = std::max(it->second.entered, epoch + 1);
  }
}

bool MembershipTable::allEntered() const {
  for (const auto& [r, s] : slots_) {
    if (s.state == State::kAlive && s.entered != epoch_ + 1) return false;
  }
  return true;
}

int MembershipTable::registered() const { return static_cast<int>(slots_.size()); }

MembershipTable::State MembershipTable::state(int rank) const {
  auto it = slots_.find(rank);
  return it == slots_.end() ? State::kUnknown : it->second.state;
}

Membership MembershipTable::snapshot() const {
  Membership m;
  m.epoch = epoch_;
  const int n = slots_.empty() ? 0 : slots_.rbegin()->first + 1;
  m.addresses.assign(static_cast<size_t>(n), "");
  m.islands.assign(static_cast<size_t>(n), -1);
  m.pids.assign(static_cast<size_t>(n), 0);
  for (const auto& [r, s] : slots_) {
    m.addresses[static_cast<size_t>(r)] = s.address;
    m.islands[static_cast<size_t>(r)] = s.island;
    m.pids[static_cast<size_t>(r)] = s.pid;
    if (s.state == State::kAlive) m.alive.push_back(r);
    if (s.state == State::kFailed) m.failed.push_back(r);
  }
  return m;
}

// ---- server ---------------------------------------------------------------------------

CoordinatorServer::CoordinatorServer(std::string secret, CoordinatorOptions options)
    : secret_(std::move(secret)),
      options_(std::move(options)),
      refusals_(std::make_unique<RefusalLog>("coordinator")),
      table_(options_.heartbeat_timeout_s) {}

CoordinatorServer::~CoordinatorServer() { stop(); }

core::Status CoordinatorServer::start() {
  if (secret_.empty()) return core::invalidArgument("coordinator: the job secret is empty");
  ARCH_ASSIGN_OR_RETURN(auto lp, listenTcp(options_.host, options_.port));
  listen_fd_ = lp.first;
  port_ = lp.second;
  accept_thread_ = std::thread([this] { acceptLoop(); });
  if (options_.heartbeat_timeout_s > 0) {
    monitor_ = std::thread([this] {
      // Checks 20 times per timeout (at most every 100 ms): detection within ~1.05 x the bound.
      const auto period = std::chrono::duration<double>(std::min(0.1, options_.heartbeat_timeout_s / 20));
      while (!stop_.aborted()) {
        std::this_thread::sleep_for(period);
        std::lock_guard<std::mutex> lock(mu_);
        if (!table_.expire(core::nowMicros()).empty()) cv_.notify_all();
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

std::string CoordinatorServer::address() const { return joinHostPort(options_.host, port_); }

Membership CoordinatorServer::membership() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_.snapshot();
}

std::vector<MembershipEvent> CoordinatorServer::events() const {
  std::lock_guard<std::mutex> lock(mu_);
  return table_.events();
}

void CoordinatorServer::declareFailed(int rank, const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  if (table_.reportFailure(rank, table_.epoch(), -1, why, core::nowMicros())) cv_.notify_all();
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
    refusals_->refused(sock->peerAddress(), hr.status());
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
  // Types and ranges of every field, before anything below reads one.
  if (core::Status st = checkCoordinatorRequest(req); !st.isOk()) {
    return json{{"ok", false}, {"error", "bad request: " + st.message()}}.dump();
  }
  std::string op = req.value("op", "");
  auto deadlineOf = [&] { return core::Deadline::afterSeconds(std::min(req.value("timeout", 0.0), 3600.0)); };
  std::unique_lock<std::mutex> lock(mu_);
  try {
    if (op == "register") {
      int rank = req.at("rank").get<int>();
      if (rank < 0 || rank > 1 << 20) return json{{"ok", false}, {"error", "bad rank"}}.dump();
      table_.registerRank(rank, req.value("island", 0), req.at("address").get<std::string>(),
                          req.value("pid", int64_t{0}), core::nowMicros());
      cv_.notify_all();
      return json{{"ok", true}, {"epoch", table_.epoch()}}.dump();
    }
    if (op == "join") {
      auto r = table_.join(req.value("rank", -1), req.value("island", -1), req.at("address").get<std::string>(),
                           req.value("pid", int64_t{0}), core::nowMicros());
      if (!r.isOk()) return json{{"ok", false}, {"error", r.status().message()}}.dump();
      cv_.notify_all();
      return json{{"ok", true}, {"epoch", table_.epoch()}, {"rank", *r}}.dump();
    }
    if (op == "members") {
      int world = req.at("world").get<int>();
      return waitMembers(world, deadlineOf(), lock);
    }
    if (op == "enter") {
      const int rank = req.at("rank").get<int>();
      const uint32_t e = req.at("epoch").get<uint32_t>();
      return enterAndWait(rank, e, deadlineOf(), lock);
    }
    if (op == "heartbeat") {
      table_.heartbeat(req.at("rank").get<int>(), core::nowMicros());
      return json{{"ok", true}, {"epoch", table_.epoch()}}.dump();
    }
    if (op == "state") return stateReply();
    if (op == "leave") {
      table_.leave(req.at("rank").get<int>());
      return json{{"ok", true}, {"epoch", table_.epoch()}}.dump();
    }
    if (op == "report_failure") {
      if (table_.reportFailure(req.at("failed").get<int>(), req.at("epoch").get<uint32_t>(), req.value("rank", -1),
                               req.value("why", ""), core::nowMicros())) {
        cv_.notify_all();
      }
      return stateReply();
    }
    if (op == "kv_set") {
      kv_[req.at("key").get<std::string>()] = req.at("value").get<std::string>();
      cv_.notify_all();
      return json{{"ok", true}}.dump();
    }
    if (op == "kv_get") {
      std::string key = req.at("key").get<std::string>();
      return waitKey(key, deadlineOf(), lock);
    }
  } catch (const std::exception& e) {
    return json{{"ok", false}, {"error", std::string("bad request: ") + e.what()}}.dump();
  }
  return json{{"ok", false}, {"error", "unknown op '" + op + "'"}}.dump();
}

std::string CoordinatorServer::waitMembers(int world, const core::Deadline& deadline,
                                           std::unique_lock<std::mutex>& lock) {
  while (table_.registered() < world && !deadline.expired() && !stop_.aborted()) {
    cv_.wait_for(lock, std::chrono::milliseconds(20));
  }
  if (table_.registered() < world) {
    return json{{"ok", false}, {"code", "deadline"},
                {"error", std::to_string(table_.registered()) + " of " + std::to_string(world) + " ranks registered"}}
        .dump();
  }
  return stateReply();
}

std::string CoordinatorServer::enterAndWait(int rank, uint32_t epoch, const core::Deadline& deadline,
                                          std::unique_lock<std::mutex>& lock) {
  if (epoch == table_.epoch()) {
    table_.enter(rank, epoch);
    cv_.notify_all();
  }
  while (epoch == table_.epoch() && !table_.allEntered() && !deadline.expired() && !stop_.aborted()) {
    cv_.wait_for(lock, std::chrono::milliseconds(20));
  }
  if (epoch == table_.epoch() && !table_.allEntered()) {
    return json{{"ok", false}, {"code", "deadline"},
                {"error", "not every member entered epoch " + std::to_string(epoch) + " in time"}}.dump();
  }
  return stateReply();
}

std::string CoordinatorServer::waitKey(const std::string& key, const core::Deadline& deadline,
                                       std::unique_lock<std::mutex>& lock) {
  while (!kv_.count(key) && !deadline.expired() && !stop_.aborted()) cv_.wait_for(lock, std::chrono::milliseconds(20));
  if (!kv_.count(key)) return json{{"ok", false}, {"code", "deadline"}, {"error", "key '" + key + "' not set"}}.dump();
  return json{{"ok", true}, {"value", kv_[key]}}.dump();
}

std::string CoordinatorServer::stateReply() const {
  json j = toJson(table_.snapshot());
  j["ok"] = true;
  return j.dump();
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
  c->address_ = address;
  c->secret_ = secret;
  c->last_contact_us_.store(core::nowMicros());
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
  last_contact_us_.store(core::nowMicros());
  return std::string(payload.begin(), payload.end());
}

double CoordinatorClient::secondsSinceContact() const {
  const int64_t t = last_contact_us_.load();
  return t == 0 ? 0.0 : static_cast<double>(core::nowMicros() - t) / 1e6;
}

namespace {
core::Result<json> parseReply(const core::Result<std::string>& r, std::atomic<uint32_t>* latest = nullptr) {
  if (!r.isOk()) return r.status();
  ARCH_ASSIGN_OR_RETURN(json j, parseCoordinatorReply(*r));
  if (latest && j.contains("epoch")) {
    const uint32_t e = j["epoch"].get<uint32_t>();
    uint32_t cur = latest->load();
    while (e > cur && !latest->compare_exchange_weak(cur, e)) {
    }
  }
  return j;
}
double secondsLeft(const core::Deadline& d) {
  return d.isNever() ? 3600.0 : std::chrono::duration<double>(d.remaining()).count();
}
}  // namespace

core::Result<uint32_t> CoordinatorClient::registerRank(int rank, int island, const std::string& address,
                                                       const core::Deadline& deadline) {
  json req{{"op", "register"}, {"rank", rank}, {"island", island}, {"address", address},
           {"pid", static_cast<int64_t>(::getpid())}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  return j.value("epoch", 0u);
}

core::Result<CoordinatorClient::Joined> CoordinatorClient::join(int rank, int island, const std::string& address,
                                                                const core::Deadline& deadline) {
  json req{{"op", "join"}, {"rank", rank}, {"island", island}, {"address", address},
           {"pid", static_cast<int64_t>(::getpid())}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  Joined out;
  out.rank = j.value("rank", -1);
  out.epoch = j.value("epoch", 0u);
  rank_ = out.rank;
  return out;
}

core::Result<Membership> CoordinatorClient::enterEpoch(uint32_t epoch, const core::Deadline& deadline) {
  json req{{"op", "enter"}, {"rank", rank_.load()}, {"epoch", epoch}, {"timeout", std::max(0.0, secondsLeft(deadline) - 0.05)}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  return membershipFromJson(j);
}

core::Result<Membership> CoordinatorClient::waitForMembers(int world, const core::Deadline& deadline) {
  json req{{"op", "members"}, {"world", world}, {"timeout", std::max(0.0, secondsLeft(deadline) - 0.05)}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  return membershipFromJson(j);
}

core::Result<Membership> CoordinatorClient::membership(const core::Deadline& deadline) {
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(json{{"op", "state"}}.dump(), deadline), &latest_epoch_));
  return membershipFromJson(j);
}

core::Result<uint32_t> CoordinatorClient::heartbeat(const core::Deadline& deadline) {
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(json{{"op", "heartbeat"}, {"rank", rank_.load()}}.dump(), deadline), &latest_epoch_));
  return j.value("epoch", 0u);
}

core::Status CoordinatorClient::leave(const core::Deadline& deadline) {
  auto r = parseReply(call(json{{"op", "leave"}, {"rank", rank_.load()}}.dump(), deadline), &latest_epoch_);
  return r.isOk() ? core::okStatus() : r.status();
}

core::Result<Membership> CoordinatorClient::reportFailure(int failed, uint32_t epoch, const core::Deadline& deadline,
                                                         const std::string& why) {
  json req{{"op", "report_failure"}, {"rank", rank_.load()}, {"failed", failed}, {"epoch", epoch}, {"why", why}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  return membershipFromJson(j);
}

core::Status CoordinatorClient::kvSet(const std::string& key, const std::string& value,
                                      const core::Deadline& deadline) {
  auto r = parseReply(call(json{{"op", "kv_set"}, {"key", key}, {"value", value}}.dump(), deadline), &latest_epoch_);
  return r.status();
}

core::Result<std::string> CoordinatorClient::kvGet(const std::string& key, const core::Deadline& deadline) {
  json req{{"op", "kv_get"}, {"key", key}, {"timeout", std::max(0.0, secondsLeft(deadline) - 0.05)}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  return j.value("value", "");
}

void CoordinatorClient::startHeartbeats(double interval_s) {
  if (hb_.joinable()) return;
  // Own connection: a long barrier or members wait on the main one must not
  // hold heartbeats back (the coordinator would declare this rank failed).
  hb_ = std::thread([this, interval_s] {
    std::unique_ptr<CoordinatorClient> c;
    const auto interval = std::chrono::duration_cast<core::Duration>(std::chrono::duration<double>(interval_s));
    auto next = core::Clock::now();
    while (!stop_) {
      // Against the clock, not a count of short sleeps: on a loaded machine
      // every wake-up is late and the late parts would add up.
      next += interval;
      while (!stop_ && core::Clock::now() < next) ::usleep(10000);
      if (stop_) return;
      if (core::Clock::now() > next + interval) next = core::Clock::now();  // fell behind: do not burst
      if (!c) {
        auto r = connect(address_, secret_, rank_.load(), core::Deadline::afterSeconds(std::max(1.0, 2 * interval_s)));
        if (!r.isOk()) continue;
        c = std::move(r).value();
      }
      auto e = c->heartbeat(core::Deadline::afterSeconds(std::max(1.0, 2 * interval_s)));
      if (!e.isOk()) {
        c.reset();  // reconnect next time
        continue;
      }
      last_contact_us_.store(core::nowMicros());
      uint32_t cur = latest_epoch_.load();
      while (*e > cur && !latest_epoch_.compare_exchange_weak(cur, *e)) {
      }
    }
  });
}

}  // namespace archipelago::comm
