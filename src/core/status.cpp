#include "archipelago/core/status.h"

namespace archipelago::core {

std::string_view statusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case StatusCode::kNotFound: return "NOT_FOUND";
    case StatusCode::kAlreadyExists: return "ALREADY_EXISTS";
    case StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case StatusCode::kUnavailable: return "UNAVAILABLE";
    case StatusCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case StatusCode::kAborted: return "ABORTED";
    case StatusCode::kDataLoss: return "DATA_LOSS";
    case StatusCode::kPermissionDenied: return "PERMISSION_DENIED";
    case StatusCode::kResourceExhausted: return "RESOURCE_EXHAUSTED";
    case StatusCode::kUnimplemented: return "UNIMPLEMENTED";
    case StatusCode::kInternal: return "INTERNAL";
  }
  return "UNKNOWN";
}

Status Status::withContext(std::string_view context) const& {
  if (isOk()) return *this;
  return Status(code_, std::string(context) + ": " + message_);
}

Status Status::withContext(std::string_view context) && {
  if (isOk()) return std::move(*this);
  message_ = std::string(context) + ": " + message_;
  return std::move(*this);
}

std::string Status::toString() const {
  if (isOk()) return "OK";
  return std::string(statusCodeName(code_)) + ": " + message_;
}

Status invalidArgument(std::string msg) { return {StatusCode::kInvalidArgument, std::move(msg)}; }
Status notFound(std::string msg) { return {StatusCode::kNotFound, std::move(msg)}; }
Status failedPrecondition(std::string msg) { return {StatusCode::kFailedPrecondition, std::move(msg)}; }
Status unavailable(std::string msg) { return {StatusCode::kUnavailable, std::move(msg)}; }
Status deadlineExceeded(std::string msg) { return {StatusCode::kDeadlineExceeded, std::move(msg)}; }
Status aborted(std::string msg) { return {StatusCode::kAborted, std::move(msg)}; }
Status dataLoss(std::string msg) { return {StatusCode::kDataLoss, std::move(msg)}; }
Status permissionDenied(std::string msg) { return {StatusCode::kPermissionDenied, std::move(msg)}; }
Status resourceExhausted(std::string msg) { return {StatusCode::kResourceExhausted, std::move(msg)}; }
Status unimplemented(std::string msg) { return {StatusCode::kUnimplemented, std::move(msg)}; }
Status internalError(std::string msg) { return {StatusCode::kInternal, std::move(msg)}; }

void checkFailed(const char* file, int line, const char* expr, const std::string& msg) {
  std::fprintf(stderr, "archipelago: check failed at %s:%d: %s%s%s\n", file, line, expr,
               msg.empty() ? "" : ": ", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

}  // namespace archipelago::core
