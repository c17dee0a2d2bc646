// The JSON messages of the coordinator protocol, checked field by field
// before anything reads them (private to comm; fuzzed by
// tests/fuzz/fuzz_coordinator_request.cpp and fuzz_coordinator_reply.cpp).
//
// Both ends read numbers that then index vectors (ranks, islands) or become
// deadlines, and nlohmann's get<int>() / value() either throw on a wrong type
// or cast an out-of-range value silently. A thrown exception on the server's
// connection thread would end the coordinator, on a worker the worker; so
// every field of a request or reply is checked here once, and a bad one is
// a Status that names it.
#pragma once

#include <string_view>

#include <nlohmann/json.hpp>

#include "archipelago/comm/coordinator.h"
#include "archipelago/core/status.h"

namespace archipelago::comm {

// A request object: "op" a string; "rank", "failed", "island" integers in
// [-1, 2^31); "world" in [0, 2^31); "epoch" and "seen" 32-bit unsigned
// integers; "pid" a 64-bit integer; "timeout" a number >= 0; "address",
// "why", "key", "value" strings; "view" an object (the handler reads it with
// membershipFromJson). Absent fields are the handler's business.
core::Status checkCoordinatorRequest(const nlohmann::json& request);

// A reply: a JSON object whose fields have the types above ("ok" a
// boolean, "error" and "code" strings, the membership fields the types
// membershipFromJson takes). A reply with "ok": false becomes its error
// (kDeadlineExceeded for "code": "deadline", kUnavailable for "recovering",
// else kInvalidArgument).
core::Result<nlohmann::json> parseCoordinatorReply(std::string_view text);

// The membership table of a reply. Besides the types: addresses, islands
// and pids are one per rank (the same length), and alive and failed are
// ascending, disjoint lists of ranks that exist, so the runtime may index
// by them.
core::Result<Membership> membershipFromJson(const nlohmann::json& reply);
nlohmann::json membershipToJson(const Membership& m);

}  // namespace archipelago::comm
