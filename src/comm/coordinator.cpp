#include "archipelago/comm/coordinator.h"

#include <unistd.h>

#include <set>

#include <fmt/format.h>
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
}  // namespace

bool Membership::isAlive(int rank) const { return std::binary_search(alive.begin(), alive.end(), rank); }

// ---- state machine ------------------------------------------------------------------

void MembershipTable::bump(const std::string& kind, int rank, const std::string& why) {
  ++epoch_;
  events_.push_back({epoch_, kind, rank, why, core::wallMicros()});
  if (kind == "join") {
    ARCH_LOG_INFO("coordinator: rank {} joined ({}); epoch -> {}", rank, why, epoch_);
  } else if (kind == "recovery") {
    ARCH_LOG_WARN("coordinator: {}; epoch -> {}", why, epoch_);
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
      table_(options_.heartbeat_timeout_s, options_.recovery_window_s) {}

CoordinatorServer::~CoordinatorServer() { stop(); }

core::Status CoordinatorServer::start() {
  if (secret_.empty()) return core::invalidArgument("coordinator: the job secret is empty");
  if (!options_.tls.empty()) ARCH_RETURN_IF_ERROR(checkCredentials(options_.tls, "coordinator --credentials"));
  ARCH_ASSIGN_OR_RETURN(auto lp, listenTcp(options_.host, options_.port));
  listen_fd_ = lp.first;
  port_ = lp.second;
  accept_thread_ = std::thread([this] { acceptLoop(); });
  monitor_ = std::thread([this] { monitorLoop(); });
  ARCH_LOG_INFO("coordinator listening on {}{}", address(), options_.tls.empty() ? "" : " (TLS, mutual, job CA)");
  return core::okStatus();
}

// Heartbeat expiry and the end of a recovery window.
void CoordinatorServer::monitorLoop() {
  while (!stop_.aborted()) {
    // Checks 20 times per timeout (at most every 100 ms): detection within ~1.05 x the bound.
    double t = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      t = table_.timeout();
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(t > 0 ? std::min(0.1, t / 20) : 0.1));
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = core::nowMicros();
    const bool settled = table_.settleRecovery(now);
    if (settled || (!table_.recovering() && !table_.expire(now).empty())) cv_.notify_all();
  }
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
  const bool tls = !options_.tls.empty();
  auto hr = serverHandshake(*sock, secret_, -1, 0, [tls](PeerRole, int32_t) { return tls; },
                            core::Deadline::afterSeconds(5), options_.tls);
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
    adoptWorkerTimeout(req);
    if (op == "reattach") return handleReattach(req);
    // Membership is not answered from a table still being rebuilt.
    static const std::set<std::string> kWaitsForRecovery = {"register", "join", "members", "enter", "state",
                                                            "report_failure"};
    if (kWaitsForRecovery.count(op)) {
      if (std::string busy = waitRecovered(deadlineOf(), lock); !busy.empty()) return busy;
    }
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

std::string CoordinatorServer::waitRecovered(const core::Deadline& deadline, std::unique_lock<std::mutex>& lock) {
  const auto cap = core::Deadline::afterSeconds(2);
  while (table_.recovering() && !deadline.expired() && !cap.expired() && !stop_.aborted()) {
    cv_.wait_for(lock, std::chrono::milliseconds(20));
  }
  if (!table_.recovering()) return "";
  return json{{"ok", false}, {"code", "recovering"},
              {"error", fmt::format("the coordinator is rebuilding the membership from the workers (restarted {:.1f} s "
                                    "ago); ask again", table_.recoverySeconds(core::nowMicros()))}}
      .dump();
}

// Under mu_. A worker's announced failure timeout, when the options let
// the workers set it and it is longer than the one in force.
void CoordinatorServer::adoptWorkerTimeout(const json& req) {
  const double t = req.value("failure_timeout", 0.0);
  if (!options_.adopt_worker_timeout || t <= table_.timeout()) return;
  table_.raiseTimeout(t);
  ARCH_LOG_INFO("coordinator: failure timeout {:.1f} s (the job's strategy.failure_timeout, announced by rank {})",
                t, req.value("rank", -1));
}

std::string CoordinatorServer::handleReattach(const json& req) {
  Reattach r;
  r.rank = req.at("rank").get<int>();
  if (r.rank < 0 || r.rank > 1 << 20) return json{{"ok", false}, {"error", "bad rank"}}.dump();
  r.island = req.value("island", -1);
  r.address = req.value("address", "");
  r.pid = req.value("pid", int64_t{0});
  r.seen = req.value("seen", 0u);
  if (auto it = req.find("view"); it != req.end()) {
    auto v = membershipFromJson(*it);
    if (!v.isOk()) return json{{"ok", false}, {"error", "bad reattach view: " + v.status().message()}}.dump();
    r.has_view = true;
    r.view = std::move(v).value();
  }
  table_.reattach(r, core::nowMicros());
  cv_.notify_all();
  return json{{"ok", true}, {"epoch", table_.epoch()}, {"recovering", table_.recovering()}}.dump();
}

std::string CoordinatorServer::stateReply() const {
  json j = membershipToJson(table_.snapshot());
  j["ok"] = true;
  return j.dump();
}

}  // namespace archipelago::comm
