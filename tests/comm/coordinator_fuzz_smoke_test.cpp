// The coordinator's libFuzzer targets (tests/fuzz/fuzz_coordinator_request.cpp
// and fuzz_coordinator_reply.cpp) driven by the deterministic mutation loop
// of tests/fuzz/mutator.h from their seed corpora, so every CI run throws
// broken requests at CoordinatorServer::handle and broken replies at the
// client's parser; plus the inputs found while writing them, as plain unit
// tests. No sockets: handle() is called through its test seam.
#include <gtest/gtest.h>

#define ARCHIPELAGO_FUZZ_SMOKE
#include "fuzz/fuzz_coordinator_reply.cpp"
#include "fuzz/fuzz_coordinator_request.cpp"
#include "fuzz/mutator.h"

namespace archipelago::fuzz {
namespace {

// Membership changes log a line each; the loop makes thousands.
class QuietLog {
 public:
  QuietLog() : saved_(core::logger().level()) { core::logger().set_level(spdlog::level::err); }
  ~QuietLog() { core::logger().set_level(saved_); }

 private:
  spdlog::level::level_enum saved_;
};

TEST(FuzzSmoke, CoordinatorRequestTargetSurvivesMutationsOfItsCorpus) {
  QuietLog quiet;
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/coordinator_request");
  ASSERT_GE(seeds.size(), 4u);
  const LoopResult r =
      runMutationLoop(seeds, fuzzCoordinatorRequest, {.seed = 61, .iterations = 10000, .random_inputs = 1000});
  EXPECT_GE(r.runs, 1000u);
}

TEST(FuzzSmoke, CoordinatorReplyTargetSurvivesMutationsOfItsCorpus) {
  const auto seeds = readCorpus(ARCHIPELAGO_FUZZ_CORPUS_DIR "/coordinator_reply");
  ASSERT_GE(seeds.size(), 6u);
  const LoopResult r =

      runMutationLoop(seeds, fuzzCoordinatorReply,
                      {.seed = 62, .iterations = 600000, .random_inputs = 50000, .min_runs = 5000});
  EXPECT_GE(r.runs, 5000u);
}

// ---- inputs the fuzzers found --------------------------------------------------

std::string handle(comm::CoordinatorServer& s, const std::string& request) {
  return comm::CoordinatorHandleForTesting::handle(s, request);
}

// {"op": 1}: value("op", "") threw json::type_error before the handler's
// try block, out of the connection thread: std::terminate, the whole
// coordinator gone. Wrongly typed fields inside the try were cast first
// (rank 1e300 to int is undefined behaviour; epoch -1 became 4294967295).
TEST(FuzzFinding, CoordinatorAnswersWronglyTypedFieldsWithAnError) {
  QuietLog quiet;
  comm::CoordinatorServer server("s");
  server.stop();
  for (const char* req : {R"({"op":1})", R"({"op":"register","rank":1e300,"address":"a"})",
                          R"({"op":"enter","rank":0,"epoch":-1})", R"({"op":"members","world":2,"timeout":-1e308})",
                          R"({"op":"register","rank":0,"island":4294967296,"address":"a"})"}) {
    auto reply = nlohmann::json::parse(handle(server, req));
    EXPECT_FALSE(reply.value("ok", true)) << req;
    EXPECT_NE(reply.value("error", "").find("field '"), std::string::npos) << req << " -> " << reply.dump();
  }
  EXPECT_EQ(server.membership().addresses.size(), 0u);
}

// A reply that is not an object made the client's value("ok") throw
// json::type_error out of every CoordinatorClient call (std::terminate in
// the worker); a wrongly typed field did the same.
TEST(FuzzFinding, ClientTurnsAMalformedReplyIntoAnError) {
  for (const char* reply : {"[1,2]", "7", R"({"ok":"yes"})", R"({"ok":true,"epoch":"1"})",
                            R"({"ok":false,"error":5})", R"({"ok":true,"epoch":4294967296})"}) {
    auto j = comm::parseCoordinatorReply(reply);
    EXPECT_FALSE(j.isOk()) << reply;
  }
}

// alive = [5] with one address: the runtime looks ranks up by index
// (launcher: pids[rank] of every failed rank), so such a table was an
// out-of-bounds read waiting to happen.
TEST(FuzzFinding, ClientRefusesAMembershipNamingRanksThatDoNotExist) {
  auto j = comm::parseCoordinatorReply(R"({"ok":true,"epoch":1,"addresses":["a"],"islands":[0],"pids":[1],"alive":[5]})");
  ASSERT_TRUE(j.isOk());
  auto m = comm::membershipFromJson(*j);
  ASSERT_FALSE(m.isOk());
  EXPECT_NE(m.status().message().find("field 'alive'"), std::string::npos) << m.status().toString();
  j = comm::parseCoordinatorReply(R"({"ok":true,"addresses":["a","b"],"islands":[0],"pids":[1,2]})");
  ASSERT_TRUE(j.isOk());
  EXPECT_FALSE(comm::membershipFromJson(*j).isOk());
  j = comm::parseCoordinatorReply(R"({"ok":true,"addresses":["a","b"],"islands":[0,0],"pids":[1,2],"alive":[1,0]})");
  ASSERT_TRUE(j.isOk());
  EXPECT_FALSE(comm::membershipFromJson(*j).isOk());
}

}  // namespace
}  // namespace archipelago::fuzz
