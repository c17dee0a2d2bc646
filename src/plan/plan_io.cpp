// Plan <-> JSON (the file `archipelago simulate` reads) and readable tables.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "archipelago/plan/planner.h"

namespace archipelago::plan {
namespace {
using nlohmann::json;

// A field of a plan file that is missing, of the wrong type or out of
// range; the message names it by its path ("groups[0].stages[2].p2p_link").
struct BadField {
  std::string message;
};

// A value as an error message shows it: at most 64 characters.
std::string shown(const json& v) {
  std::string s = v.dump();
  return s.size() > 64 ? s.substr(0, 61) + "..." : s;
}

// Typed, range-checked access to one JSON object of a plan file. nlohmann's
// own get<int>() casts floats and out-of-range integers silently (undefined
// for 1e300), and `simulate` indexes vectors with these numbers.
class Fields {
 public:
  Fields(const json& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j_.is_object()) throw BadField{(path_.empty() ? "the file" : "field '" + path_ + "'") + " is not an object"};
  }
  std::string name(const char* key) const { return path_.empty() ? std::string(key) : path_ + "." + key; }
  bool has(const char* key) const { return j_.contains(key); }
  const json& at(const char* key) const {
    auto it = j_.find(key);
    if (it == j_.end()) throw BadField{"missing field '" + name(key) + "'"};
    return *it;
  }
  template <typename T>
  T integer(const char* key, T lo = std::numeric_limits<T>::min(), T hi = std::numeric_limits<T>::max()) const {
    return checkedInteger<T>(at(key), name(key), lo, hi);
  }
  template <typename T>
  std::vector<T> integers(const char* key, T lo, T hi) const {
    const json& a = at(key);
    if (!a.is_array()) throw BadField{"field '" + name(key) + "' is not a list"};
    std::vector<T> out;
    for (size_t i = 0; i < a.size(); ++i) {
      out.push_back(checkedInteger<T>(a[i], name(key) + "[" + std::to_string(i) + "]", lo, hi));
    }
    return out;
  }
  // A number; non_negative for times, sizes and bandwidths, which the
  // simulator divides by and adds up.
  double number(const char* key, bool non_negative = false) const {
    const json& v = at(key);
    const double x = v.is_number() ? v.get<double>() : std::nan("");
    if (!std::isfinite(x) || (non_negative && x < 0)) {
      throw BadField{"field '" + name(key) + "' is " + shown(v) + ", expected a finite number" +
                     (non_negative ? " >= 0" : "")};
    }
    return x;
  }
  std::string string(const char* key) const {
    const json& v = at(key);
    if (!v.is_string()) throw BadField{"field '" + name(key) + "' is " + shown(v) + ", expected a string"};
    return v.get<std::string>();
  }
  bool boolean(const char* key) const {
    const json& v = at(key);
    if (!v.is_boolean()) throw BadField{"field '" + name(key) + "' is " + shown(v) + ", expected true or false"};
    return v.get<bool>();
  }
  Fields object(const char* key) const { return Fields(at(key), name(key)); }
  // The objects of a list field.
  std::vector<Fields> items(const char* key) const {
    const json& a = at(key);
    if (!a.is_array()) throw BadField{"field '" + name(key) + "' is not a list"};
    std::vector<Fields> out;
    for (size_t i = 0; i < a.size(); ++i) out.emplace_back(a[i], name(key) + "[" + std::to_string(i) + "]");
    return out;
  }

 private:
  template <typename T>
  static T checkedInteger(const json& v, const std::string& path, T lo, T hi) {
    bool ok = false;
    T x{};
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      ok = u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) && static_cast<int64_t>(u) >= lo &&
           static_cast<int64_t>(u) <= hi;
      x = static_cast<T>(u);
    } else if (v.is_number_integer()) {
      const int64_t i = v.get<int64_t>();
      ok = i >= lo && i <= hi;
      x = static_cast<T>(i);
    }
    if (!ok) {
      throw BadField{"field '" + path + "' is " + shown(v) + ", expected an integer in [" + std::to_string(lo) + ", " +
                     std::to_string(hi) + "]"};
    }
    return x;
  }

  const json& j_;
  std::string path_;
};

constexpr bool kNonNegative = true;

// One of `values`, by the name `name` gives it (cost_model.h's lists and names).
template <typename E, size_t N>
E named(const Fields& f, const char* key, const E (&values)[N], const char* (*name)(E)) {
  const std::string s = f.string(key);
  std::string known;
  for (E e : values) {
    if (s == name(e)) return e;
    known += std::string(known.empty() ? "" : "|") + name(e);
  }
  throw BadField{"field '" + f.name(key) + "' is '" + s + "', expected one of " + known};
}

void readHeader(const Fields& f, Plan& p) {
  p.model = f.string("model");
  p.cluster = f.string("cluster");
  p.strategy = f.string("strategy");
  p.diloco_h = f.integer<int64_t>("diloco_h");
  p.codec = f.string("codec");
  const Fields setup = f.object("setup");
  p.setup.global_batch_tokens = setup.integer<int64_t>("global_batch_tokens");
  p.setup.seq_len = setup.integer<int64_t>("seq_len");
  if (setup.has("compute_dtype")) {
    auto d = parseDtype(setup.string("compute_dtype"));
    if (!d.isOk()) throw BadField{"field 'setup.compute_dtype': " + d.status().message()};
    p.setup.compute_dtype = *d;
  }
  p.sync_s = f.number("sync_s");
}

// The links and the cross-group flows on them: `simulate` indexes
// Plan::links with every link number, so each must name one.
void readLinks(const Fields& f, Plan& p) {
  for (const Fields& l : f.items("links")) {
    p.links.push_back({l.string("name"), l.number("bandwidth", kNonNegative), l.number("latency", kNonNegative),
                       l.boolean("strait")});
  }
  const int last = static_cast<int>(p.links.size()) - 1;
  for (const Fields& fl : f.items("sync_flows")) {
    p.sync_flows.push_back({fl.integer<int>("link", 0, last), fl.number("bytes", kNonNegative)});
  }
}

StagePlan readStage(const Fields& s, size_t links) {
  const int last = static_cast<int>(links) - 1;
  StagePlan sp;
  sp.island = s.integer<int>("island", 0);
  sp.device = s.string("device");
  sp.tp = s.integer<int64_t>("tp", 1);
  sp.first_item = s.integer<int64_t>("first_item", 0);
  sp.num_items = s.integer<int64_t>("num_items", 0);
  sp.fwd_s = s.number("fwd_s", kNonNegative);
  sp.bwd_s = s.number("bwd_s", kNonNegative);
  sp.memory_bytes = s.number("memory_bytes");
  sp.memory_capacity = s.number("memory_capacity");
  sp.act_bytes_per_mb = s.number("act_bytes_per_mb");
  sp.p2p_bytes = s.number("p2p_bytes", kNonNegative);
  sp.p2p_link = s.integer<int>("p2p_link", -1, last);  // -1: the last stage sends nothing
  sp.p2p_weight = s.number("p2p_weight", kNonNegative);
  sp.dp_bytes = s.number("dp_bytes", kNonNegative);
  sp.dp_group = s.integer<int64_t>("dp_group", 1);
  sp.dp_link = s.integer<int>("dp_link", 0, last);  // every stage reduces its gradients on one
  sp.dp_s = s.number("dp_s", kNonNegative);
  sp.optimizer_s = s.number("optimizer_s", kNonNegative);
  sp.model_flops_per_mb = s.number("model_flops_per_mb");
  return sp;
}

GroupPlan readGroup(const Fields& g, size_t links) {
  GroupPlan out;
  out.islands = g.integers<int>("islands", 0, std::numeric_limits<int>::max());
  out.tp = g.integers<int64_t>("tp", 1, std::numeric_limits<int64_t>::max());
  out.pp = g.integers<int64_t>("pp", 1, std::numeric_limits<int64_t>::max());
  out.dp = g.integer<int64_t>("dp", 1);
  out.ep = g.integer<int64_t>("ep", 1);
  out.micro_batch = g.integer<int64_t>("micro_batch", 1);
  out.micro_batches = g.integer<int64_t>("micro_batches", 1);
  out.virtual_stages = g.integer<int64_t>("virtual_stages", 1);
  out.schedule = named(g, "schedule", kSchedules, scheduleName);
  out.recompute = named(g, "recompute", kRecomputes, recomputeName);
  out.zero = g.integer<int>("zero", 0);
  out.batch_sequences = g.number("batch_sequences", kNonNegative);
  out.step_s = g.number("step_s");
  out.pipeline_s = g.number("pipeline_s");
  out.bubble_fraction = g.number("bubble_fraction");
  out.dp_exposed_s = g.number("dp_exposed_s");
  out.devices = g.integer<int64_t>("devices", 0);
  for (const Fields& s : g.items("stages")) out.stages.push_back(readStage(s, links));
  if (out.stages.empty()) throw BadField{"field '" + g.name("stages") + "' is empty; a group has at least one stage"};
  // The interleaved order hands each device its micro-batches in rounds of
  // one per stage (plan/schedule.h); a remainder made the simulator write
  // past its per-device buffers. The planner never writes such a group.
  const int64_t stages = static_cast<int64_t>(out.stages.size());
  if (out.virtual_stages > 1 && out.micro_batches % stages != 0) {
    throw BadField{"field '" + g.name("micro_batches") + "' is " + std::to_string(out.micro_batches) +
                   ", expected a multiple of the group's " + std::to_string(stages) + " stages (" +
                   std::to_string(out.virtual_stages) + " virtual stages per device)"};
  }
  return out;
}

void readPrediction(const Fields& pred, Plan& p) {
  p.step_s = pred.number("step_s");
  p.tokens_per_s = pred.number("tokens_per_s");
  p.mfu = pred.number("mfu");
  p.bubble_fraction = pred.number("bubble_fraction");
  p.total_params = pred.number("total_params");
  p.active_params = pred.number("active_params");
  p.devices = pred.integer<int64_t>("devices", 0);
  p.summary = pred.string("summary");
  for (const Fields& k : pred.items("kinds")) {
    p.kinds.push_back({k.string("kind"), k.integer<int64_t>("devices", 0), k.number("mfu"),
                       k.number("tflops_per_device"), k.number("max_memory_bytes"), k.number("memory_capacity")});
  }
  for (const Fields& s : pred.items("straits")) {
    p.straits.push_back({s.string("name"), s.number("bytes_per_step"), s.number("busy_s")});
  }
}

}  // namespace

std::string Plan::toJson() const {
  json j;
  j["format"] = "archipelago-plan/1";
  j["model"] = model;
  j["cluster"] = cluster;
  j["strategy"] = strategy;
  j["diloco_h"] = diloco_h;
  j["codec"] = codec;
  j["setup"] = {{"global_batch_tokens", setup.global_batch_tokens},
                {"seq_len", setup.seq_len},
                {"compute_dtype", dtypeName(setup.compute_dtype)}};
  j["links"] = json::array();
  for (const auto& l : links) {
    j["links"].push_back({{"name", l.name}, {"bandwidth", l.bandwidth}, {"latency", l.latency}, {"strait", l.strait}});
  }
  j["sync_flows"] = json::array();
  for (const auto& [l, b] : sync_flows) j["sync_flows"].push_back({{"link", l}, {"bytes", b}});
  j["sync_s"] = sync_s;
  j["groups"] = json::array();
  for (const auto& g : groups) {
    json jg;
    jg["islands"] = g.islands;
    jg["tp"] = g.tp;
    jg["pp"] = g.pp;
    jg["dp"] = g.dp;
    jg["ep"] = g.ep;
    jg["micro_batch"] = g.micro_batch;
    jg["micro_batches"] = g.micro_batches;
    jg["virtual_stages"] = g.virtual_stages;
    jg["schedule"] = scheduleName(g.schedule);
    jg["recompute"] = recomputeName(g.recompute);
    jg["zero"] = g.zero;
    jg["batch_sequences"] = g.batch_sequences;
    jg["step_s"] = g.step_s;
    jg["pipeline_s"] = g.pipeline_s;
    jg["bubble_fraction"] = g.bubble_fraction;
    jg["dp_exposed_s"] = g.dp_exposed_s;
    jg["devices"] = g.devices;
    jg["stages"] = json::array();
    for (const auto& s : g.stages) {
      jg["stages"].push_back({{"island", s.island}, {"device", s.device}, {"tp", s.tp},
                              {"first_item", s.first_item}, {"num_items", s.num_items}, {"fwd_s", s.fwd_s},
                              {"bwd_s", s.bwd_s}, {"memory_bytes", s.memory_bytes},
                              {"memory_capacity", s.memory_capacity}, {"act_bytes_per_mb", s.act_bytes_per_mb},
                              {"p2p_bytes", s.p2p_bytes}, {"p2p_link", s.p2p_link}, {"p2p_weight", s.p2p_weight},
                              {"dp_bytes", s.dp_bytes}, {"dp_group", s.dp_group}, {"dp_link", s.dp_link},
                              {"dp_s", s.dp_s}, {"optimizer_s", s.optimizer_s},
                              {"model_flops_per_mb", s.model_flops_per_mb}});
    }
    j["groups"].push_back(jg);
  }
  json pred;
  pred["step_s"] = step_s;
  pred["tokens_per_s"] = tokens_per_s;
  pred["mfu"] = mfu;
  pred["bubble_fraction"] = bubble_fraction;
  pred["total_params"] = total_params;
  pred["active_params"] = active_params;
  pred["devices"] = devices;
  pred["summary"] = summary;
  pred["kinds"] = json::array();
  for (const auto& k : kinds) {
    pred["kinds"].push_back({{"kind", k.kind}, {"devices", k.devices}, {"mfu", k.mfu},
                             {"tflops_per_device", k.tflops_per_device}, {"max_memory_bytes", k.max_memory_bytes},
                             {"memory_capacity", k.memory_capacity}});
  }
  pred["straits"] = json::array();
  for (const auto& s : straits) {
    pred["straits"].push_back({{"name", s.name}, {"bytes_per_step", s.bytes_per_step}, {"busy_s", s.busy_s}});
  }
  j["prediction"] = pred;
  return j.dump(2);
}

core::Result<Plan> Plan::fromJson(const std::string& text) {
  Plan p;
  try {
    const json j = json::parse(text);
    if (!j.is_object() || !j.contains("format") || j["format"] != "archipelago-plan/1") {
      return core::invalidArgument("plan file: 'format' is not archipelago-plan/1; write it with `archipelago plan --out`");
    }
    readHeader(Fields(j, ""), p);
    readLinks(Fields(j, ""), p);
    for (const Fields& jg : Fields(j, "").items("groups")) p.groups.push_back(readGroup(jg, p.links.size()));
    readPrediction(Fields(j, "").object("prediction"), p);
  } catch (const json::exception& e) {
    return core::invalidArgument(std::string("plan file: ") + e.what());
  } catch (const BadField& e) {
    return core::invalidArgument("plan file: " + e.message);
  }
  if (p.groups.empty()) return core::invalidArgument("plan file: no groups");
  return p;
}

std::string formatPlan(const Plan& p) {
  std::string s;
  s += fmt::format("  layout    {}\n", p.summary);
  s += fmt::format("  strategy  {}{}\n", p.strategy,
                   p.strategy == "diloco" ? fmt::format(" (H={}, codec {})", p.diloco_h, p.codec)
                   : p.strategy == "sync" ? fmt::format(" (codec {})", p.codec)
                                          : std::string());
  s += fmt::format("  step      {:.3f} s   tokens/s {:.4g}   MFU {:.1f}%   bubble {:.1f}%   devices {}\n", p.step_s,
                   p.tokens_per_s, 100 * p.mfu, 100 * p.bubble_fraction, p.devices);
  for (const auto& k : p.kinds) {
    s += fmt::format("  {:<11} x{:<6} MFU {:5.1f}%  {:6.1f} TFLOP/s/dev  memory {:5.1f} / {:.0f} GB\n", k.kind,
                     k.devices, 100 * k.mfu, k.tflops_per_device, k.max_memory_bytes / 1e9, k.memory_capacity / 1e9);
  }
  for (const auto& g : p.groups) {
    std::string layers;
    for (const auto& st : g.stages) layers += fmt::format("{}{}", layers.empty() ? "" : ",", st.num_items);
    if (g.stages.size() > 24) layers = fmt::format("{} stages, first {} last {} items", g.stages.size(),
                                                   g.stages.front().num_items, g.stages.back().num_items);
    s += fmt::format("  group     m={} mb={} step {:.3f}s bubble {:.1f}% dp-exposed {:.3f}s items/stage [{}]\n",
                     g.micro_batches, g.micro_batch, g.step_s, 100 * g.bubble_fraction, g.dp_exposed_s, layers);
  }
  for (const auto& t : p.straits) {
    s += fmt::format("  strait    {:<28} {:.3g} GB/step  busy {:.3f} s/step\n", t.name, t.bytes_per_step / 1e9, t.busy_s);
  }
  return s;
}

std::string formatPlans(const PlanResult& r, bool explain) {
  std::string s;
  if (!r.plans.empty()) {
    const Plan& p0 = r.plans.front();
    s += fmt::format("model {}: {:.4g}B parameters, {:.4g}B active; cluster {}\n", p0.model, p0.total_params / 1e9,
                     p0.active_params / 1e9, p0.cluster);
  }
  s += fmt::format("{:<3} {:>10} {:>12} {:>7} {:>8}  {}\n", "#", "step s", "tokens/s", "MFU", "bubble", "strategy / layout");
  for (size_t i = 0; i < r.plans.size(); ++i) {
    const Plan& p = r.plans[i];
    s += fmt::format("{:<3} {:>10.3f} {:>12.4g} {:>6.1f}% {:>7.1f}%  {}: {}\n", i + 1, p.step_s, p.tokens_per_s,
                     100 * p.mfu, 100 * p.bubble_fraction, p.strategy, p.summary);
  }
  if (!r.plans.empty()) s += "best plan:\n" + formatPlan(r.plans.front());
  int64_t total = 0;
  for (const auto& [k, c] : r.rejected.counts) total += c;
  s += fmt::format("searched {} layouts in {:.2f} s; rejected {}\n", r.evaluated, r.search_s, total);
  for (const auto& [k, c] : r.rejected.counts) {
    s += fmt::format("  rejected {:>8}  {}\n", c, k);
    if (explain) {
      auto it = r.rejected.examples.find(k);
      if (it != r.rejected.examples.end()) {
        for (const auto& e : it->second) s += "             e.g. " + e + "\n";
      }
    }
  }
  return s;
}

}  // namespace archipelago::plan
