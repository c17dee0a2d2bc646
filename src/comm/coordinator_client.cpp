// The worker's side of the coordinator protocol (coordinator.h): requests,
// heartbeats, and carrying on through a lost coordinator: a broken
// connection is re-opened, to the same address or the next of a list, and
// reattached before anything else is asked ("Failover").
#include <unistd.h>

#include <thread>

#include <nlohmann/json.hpp>

#include "archipelago/comm/address.h"
#include "archipelago/comm/coordinator.h"
#include "archipelago/core/log.h"
#include "comm/coordinator_messages.h"
#include "comm/endpoint.h"
#include "comm/socket.h"

namespace archipelago::comm {

using nlohmann::json;

namespace {
constexpr uint32_t kMaxReply = 1 << 20;

std::vector<std::string> splitAddressList(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= list.size()) {
    size_t end = list.find(',', start);
    if (end == std::string::npos) end = list.size();
    std::string a = list.substr(start, end - start);
    a.erase(0, a.find_first_not_of(" \t"));
    a.erase(a.find_last_not_of(" \t") + 1);
    if (!a.empty()) out.push_back(a);
    start = end + 1;
  }
  return out;
}

// One authenticated connection to `address`.
core::Result<std::unique_ptr<Socket>> dialOne(const std::string& address, const std::string& secret, int rank,
                                              const TlsFiles& tls, const core::Deadline& deadline) {
  ARCH_ASSIGN_OR_RETURN(auto hp, splitHostPort(address));
  ARCH_ASSIGN_OR_RETURN(auto sock, connectTcp(hp.first, hp.second, deadline, nullptr));
  Hello hello;
  hello.role = PeerRole::kCoordinatorClient;
  hello.client_rank = rank;
  hello.server_rank = -1;
  core::Status st = clientHandshake(*sock, secret, hello, tls.empty() ? nullptr : &tls, deadline);
  if (!st.isOk()) return st.withContext("coordinator " + address);
  return sock;
}

// The first of `addresses` that answers, starting at *index (the last one
// that did). One address: retried until the deadline (it may be
// restarting); several: each gets half a second per round.
core::Result<std::unique_ptr<Socket>> dial(const std::vector<std::string>& addresses, const std::string& secret,
                                           int rank, const TlsFiles& tls, const core::Deadline& deadline,
                                           size_t* index) {
  if (addresses.empty()) return core::invalidArgument("no coordinator address (expected HOST:PORT[,HOST:PORT...])");
  if (addresses.size() == 1) return dialOne(addresses[0], secret, rank, tls, deadline);
  core::Status last = core::unavailable("no coordinator answered");
  while (true) {
    for (size_t k = 0; k < addresses.size(); ++k) {
      const size_t i = (*index + k) % addresses.size();
      const auto slice = core::Deadline::afterSeconds(0.5);
      auto s = dialOne(addresses[i], secret, rank, tls, slice.remaining() < deadline.remaining() ? slice : deadline);
      if (s.isOk()) {
        *index = i;
        return s;
      }
      last = s.status();
      if (deadline.expired()) return last.withContext("no coordinator of the list answered");
    }
  }
}

// One request and its reply on `sock`.
core::Result<std::string> exchange(Socket& sock, const std::string& request, const core::Deadline& deadline) {
  FrameHeader h;
  h.type = FrameType::kRequest;
  ARCH_RETURN_IF_ERROR(sock.writeFrame(
      h, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(request.data()), request.size()), deadline));
  std::vector<uint8_t> payload;
  ARCH_RETURN_IF_ERROR(sock.readFrame(&h, &payload, deadline, nullptr, kMaxReply).withContext("coordinator request"));
  return std::string(payload.begin(), payload.end());
}

void raiseTo(std::atomic<uint32_t>& latest, uint32_t e) {
  uint32_t cur = latest.load();
  while (e > cur && !latest.compare_exchange_weak(cur, e)) {
  }
}

core::Result<json> parseReply(const core::Result<std::string>& r, std::atomic<uint32_t>* latest = nullptr) {
  if (!r.isOk()) return r.status();
  ARCH_ASSIGN_OR_RETURN(json j, parseCoordinatorReply(*r));
  if (latest && j.contains("epoch")) raiseTo(*latest, j["epoch"].get<uint32_t>());
  return j;
}

double secondsLeft(const core::Deadline& d) {
  return d.isNever() ? 3600.0 : std::chrono::duration<double>(d.remaining()).count();
}

// "recovering" replies (a restarted coordinator still collecting
// reattaches) are answered again until the deadline.
bool retryRecovering(const core::Status& st, const core::Deadline& deadline) {
  if (st.code() != core::StatusCode::kUnavailable || st.message().find("rebuilding the membership") == std::string::npos ||
      deadline.expired()) {
    return false;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  return true;
}

// The job's failure timeout on the requests that (re)introduce a rank.
void announce(json& req, double failure_timeout_s) {
  if (failure_timeout_s > 0) req["failure_timeout"] = failure_timeout_s;
}
}  // namespace

core::Result<std::unique_ptr<CoordinatorClient>> CoordinatorClient::connect(const std::string& address,
                                                                            const std::string& secret, int rank,
                                                                            const core::Deadline& deadline,
                                                                            TlsFiles tls) {
  std::unique_ptr<CoordinatorClient> c(new CoordinatorClient());
  c->addresses_ = splitAddressList(address);
  c->secret_ = secret;
  c->tls_ = std::move(tls);
  c->rank_ = rank;
  size_t index = 0;
  ARCH_ASSIGN_OR_RETURN(c->sock_, dial(c->addresses_, secret, rank, c->tls_, deadline, &index));
  c->current_ = index;
  c->last_contact_us_.store(core::nowMicros());
  return c;
}

CoordinatorClient::~CoordinatorClient() {
  stop_ = true;
  if (hb_.joinable()) hb_.join();
}

std::string CoordinatorClient::reattachRequest() const {
  std::lock_guard<std::mutex> lock(id_mu_);
  if (!registered_) return "";
  json req{{"op", "reattach"}, {"rank", rank_.load()}, {"island", island_}, {"address", my_address_},
           {"pid", static_cast<int64_t>(::getpid())}, {"seen", latest_epoch_.load()}};
  announce(req, failure_timeout_s_.load());
  if (has_view_) req["view"] = membershipToJson(view_);
  return req.dump();
}

void CoordinatorClient::remember(int island, const std::string& address) {
  std::lock_guard<std::mutex> lock(id_mu_);
  registered_ = true;
  island_ = island;
  my_address_ = address;
}

void CoordinatorClient::rememberView(const Membership& m) {
  std::lock_guard<std::mutex> lock(id_mu_);
  has_view_ = true;
  view_ = m;
}

core::Result<std::unique_ptr<Socket>> CoordinatorClient::open(const core::Deadline& deadline) {
  size_t index = current_.load();
  ARCH_ASSIGN_OR_RETURN(auto sock, dial(addresses_, secret_, rank_.load(), tls_, deadline, &index));
  if (index != current_.load()) ARCH_LOG_WARN("coordinator: now talking to {}", addresses_[index]);
  current_ = index;
  ++reconnects_;
  if (const std::string re = reattachRequest(); !re.empty()) {
    ARCH_RETURN_IF_ERROR(parseReply(exchange(*sock, re, deadline), &latest_epoch_).status().withContext("reattach"));
  }
  return sock;
}

core::Result<std::string> CoordinatorClient::call(const std::string& request, const core::Deadline& deadline,
                                                  bool retry) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int attempt = 0;; ++attempt) {
    if (!sock_) {
      ARCH_ASSIGN_OR_RETURN(sock_, open(deadline));
    }
    auto r = exchange(*sock_, request, deadline);
    if (r.isOk()) {
      last_contact_us_.store(core::nowMicros());
      return r;
    }
    // Broken, or a half-read reply that would desynchronise the stream: the
    // next request opens a fresh connection.
    sock_->shutdown();
    sock_.reset();
    if (!retry || attempt >= 1 || deadline.expired()) return r.status();
  }
}

double CoordinatorClient::secondsSinceContact() const {
  const int64_t t = last_contact_us_.load();
  return t == 0 ? 0.0 : static_cast<double>(core::nowMicros() - t) / 1e6;
}

core::Result<uint32_t> CoordinatorClient::registerRank(int rank, int island, const std::string& address,
                                                       const core::Deadline& deadline) {
  json req{{"op", "register"}, {"rank", rank}, {"island", island}, {"address", address},
           {"pid", static_cast<int64_t>(::getpid())}};
  announce(req, failure_timeout_s_.load());
  while (true) {
    auto j = parseReply(call(req.dump(), deadline), &latest_epoch_);
    if (!j.isOk() && retryRecovering(j.status(), deadline)) continue;
    if (!j.isOk()) return j.status();
    remember(island, address);
    return j->value("epoch", 0u);
  }
}

core::Result<CoordinatorClient::Joined> CoordinatorClient::join(int rank, int island, const std::string& address,
                                                                const core::Deadline& deadline) {
  json req{{"op", "join"}, {"rank", rank}, {"island", island}, {"address", address},
           {"pid", static_cast<int64_t>(::getpid())}};
  announce(req, failure_timeout_s_.load());
  while (true) {
    // Not re-sent on a broken connection: a join the coordinator took would bump the epoch twice.
    auto j = parseReply(call(req.dump(), deadline, false), &latest_epoch_);
    if (!j.isOk() && retryRecovering(j.status(), deadline)) continue;
    if (!j.isOk()) return j.status();
    Joined out;
    out.rank = j->value("rank", -1);
    out.epoch = j->value("epoch", 0u);
    rank_ = out.rank;
    remember(island, address);
    return out;
  }
}

core::Result<Membership> CoordinatorClient::enterEpoch(uint32_t epoch, const core::Deadline& deadline) {
  json req{{"op", "enter"}, {"rank", rank_.load()}, {"epoch", epoch}, {"timeout", std::max(0.0, secondsLeft(deadline) - 0.05)}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  ARCH_ASSIGN_OR_RETURN(Membership m, membershipFromJson(j));
  if (m.epoch == epoch) rememberView(m);  // everyone entered: this is the epoch we hold
  return m;
}

core::Result<Membership> CoordinatorClient::waitForMembers(int world, const core::Deadline& deadline) {
  json req{{"op", "members"}, {"world", world}, {"timeout", std::max(0.0, secondsLeft(deadline) - 0.05)}};
  ARCH_ASSIGN_OR_RETURN(json j, parseReply(call(req.dump(), deadline), &latest_epoch_));
  ARCH_ASSIGN_OR_RETURN(Membership m, membershipFromJson(j));
  if (m.epoch == 0) rememberView(m);  // the start-up epoch every member connects to
  return m;
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
    std::unique_ptr<Socket> s;
    const auto interval = std::chrono::duration_cast<core::Duration>(std::chrono::duration<double>(interval_s));
    auto next = core::Clock::now();
    bool lost = false;
    auto markLost = [&](const core::Status& why) {
      if (!lost) {
        ARCH_LOG_WARN("coordinator unreachable ({}); training goes on, membership changes wait for it",
                      why.message());
      }
      lost = true;
      s.reset();  // reconnect (and reattach) next time
    };
    while (!stop_) {
      // Against the clock, not a count of short sleeps: on a loaded machine
      // every wake-up is late and the late parts would add up.
      next += interval;
      while (!stop_ && core::Clock::now() < next) ::usleep(10000);
      if (stop_) return;
      if (core::Clock::now() > next + interval) next = core::Clock::now();  // fell behind: do not burst
      const auto dl = core::Deadline::afterSeconds(std::max(1.0, 2 * interval_s));
      if (!s) {
        size_t index = current_.load();
        auto r = dial(addresses_, secret_, rank_.load(), tls_, dl, &index);
        if (!r.isOk()) {
          markLost(r.status());
          continue;
        }
        s = std::move(r).value();
        // A new connection reattaches first: a restarted coordinator would not know this rank.
        if (const std::string re = reattachRequest(); !re.empty()) {
          if (auto rr = parseReply(exchange(*s, re, dl), &latest_epoch_); !rr.isOk()) {
            markLost(rr.status());
            continue;
          }
        }
      }
      auto e = parseReply(exchange(*s, json{{"op", "heartbeat"}, {"rank", rank_.load()}}.dump(), dl), &latest_epoch_);
      if (!e.isOk()) {
        markLost(e.status());
        // Redial at once (not an interval later): the dial keeps trying for
        // its deadline, so a coordinator restarted meanwhile is found within ms.
        next = core::Clock::now() - interval;
        continue;
      }
      if (lost) ARCH_LOG_INFO("coordinator reachable again (epoch {})", latestEpoch());
      lost = false;
      last_contact_us_.store(core::nowMicros());
    }
  });
}

}  // namespace archipelago::comm
