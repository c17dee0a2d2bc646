// Status and Result<T>: how failures travel in Archipelago.
//
// Why not exceptions: in comm and runtime, failure is normal (peers die,
// links drop, deadlines pass), errors must cross thread boundaries (progress
// engine -> caller) and must carry context (rank, peer, op, epoch) so the
// one line the CLI prints says what went wrong and where. Exceptions from
// third-party code (libtorch, yaml-cpp) are caught at the adapter and turned
// into a Status there.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace archipelago::core {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,     // bad input from a user: config, CLI flag, file contents
  kNotFound,            // a file, key or peer that does not exist
  kAlreadyExists,
  kFailedPrecondition,  // the system is not in a state to do this (e.g. stale epoch)
  kUnavailable,         // a peer or link is gone; retrying after recovery may work
  kDeadlineExceeded,    // a wait ran past its deadline
  kAborted,             // the operation was cancelled (abort flag, epoch change)
  kDataLoss,            // corrupted or truncated data (checksum mismatch)
  kPermissionDenied,    // authentication failed
  kResourceExhausted,   // out of memory / frame too large / queue full
  kUnimplemented,
  kInternal,            // a bug: an invariant that should have held did not
};

std::string_view statusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return Status(); }

  bool isOk() const { return code_ == StatusCode::kOk; }
  explicit operator bool() const { return isOk(); }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // Prepends context: Status(kUnavailable,"peer closed").withContext("allreduce rank 2")
  // reads "allreduce rank 2: peer closed".
  Status withContext(std::string_view context) const&;
  Status withContext(std::string_view context) &&;

  // "UNAVAILABLE: allreduce rank 2: peer closed"
  std::string toString() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status okStatus() { return Status(); }
Status invalidArgument(std::string msg);
Status notFound(std::string msg);
Status failedPrecondition(std::string msg);
Status unavailable(std::string msg);
Status deadlineExceeded(std::string msg);
Status aborted(std::string msg);
Status dataLoss(std::string msg);
Status permissionDenied(std::string msg);
Status resourceExhausted(std::string msg);
Status unimplemented(std::string msg);
Status internalError(std::string msg);

// Result<T>: a value or a non-OK Status.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(implicit)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(implicit)
    if (std::get<Status>(v_).isOk()) {
      v_ = Status(StatusCode::kInternal, "Result constructed from an OK status without a value");
    }
  }

  bool isOk() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return isOk(); }

  const Status& status() const {
    static const Status kOk;
    return isOk() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return checked(); }
  const T& value() const& { return const_cast<Result*>(this)->checked(); }
  T&& value() && { return std::move(checked()); }
  T* operator->() { return &checked(); }
  const T* operator->() const { return &const_cast<Result*>(this)->checked(); }
  T& operator*() & { return checked(); }
  const T& operator*() const& { return const_cast<Result*>(this)->checked(); }

 private:
  T& checked() {
    if (!isOk()) {
      std::fprintf(stderr, "archipelago: fatal: value() on error Result: %s\n",
                   std::get<Status>(v_).toString().c_str());
      std::abort();
    }
    return std::get<T>(v_);
  }
  std::variant<T, Status> v_;
};

[[noreturn]] void checkFailed(const char* file, int line, const char* expr, const std::string& msg);

}  // namespace archipelago::core

#define ARCH_CONCAT_INNER(a, b) a##b
#define ARCH_CONCAT(a, b) ARCH_CONCAT_INNER(a, b)

// Returns the Status from the enclosing function if expr is not OK.
#define ARCH_RETURN_IF_ERROR(expr)                                  \
  do {                                                              \
    ::archipelago::core::Status arch_status_ = (expr);              \
    if (!arch_status_.isOk()) return arch_status_;                  \
  } while (0)

// ARCH_ASSIGN_OR_RETURN(auto x, makeX()); returns the error if makeX fails.
#define ARCH_ASSIGN_OR_RETURN(lhs, expr) \
  ARCH_ASSIGN_OR_RETURN_IMPL(ARCH_CONCAT(arch_result_, __LINE__), lhs, expr)
#define ARCH_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.isOk()) return tmp.status();            \
  lhs = std::move(tmp).value()

// Always-on invariant check (kept under NDEBUG; never put side effects you
// need only in debug builds here, and never rely on assert()).
#define ARCH_CHECK(cond)                                                      \
  do {                                                                        \
    if (!(cond)) ::archipelago::core::checkFailed(__FILE__, __LINE__, #cond, ""); \
  } while (0)
#define ARCH_CHECK_MSG(cond, msg)                                                \
  do {                                                                           \
    if (!(cond)) ::archipelago::core::checkFailed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)
