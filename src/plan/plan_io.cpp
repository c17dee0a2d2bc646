// Plan <-> JSON (the file `archipelago simulate` reads) and readable tables.
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "archipelago/plan/planner.h"

namespace archipelago::plan {
namespace {
using nlohmann::json;

Schedule scheduleFrom(const std::string& s) {
  if (s == "interleaved") return Schedule::kInterleaved;
  if (s == "dualpipe") return Schedule::kDualPipe;
  return Schedule::k1F1B;
}
Recompute recomputeFrom(const std::string& s) {
  if (s == "full") return Recompute::kFull;
  if (s == "selective") return Recompute::kSelective;
  return Recompute::kNone;
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
    if (j.value("format", "") != "archipelago-plan/1") {
      return core::invalidArgument("plan file: 'format' is not archipelago-plan/1; write it with `archipelago plan --out`");
    }
    p.model = j.at("model").get<std::string>();
    p.cluster = j.at("cluster").get<std::string>();
    p.strategy = j.at("strategy").get<std::string>();
    p.diloco_h = j.at("diloco_h").get<int64_t>();
    p.codec = j.at("codec").get<std::string>();
    p.setup.global_batch_tokens = j.at("setup").at("global_batch_tokens").get<int64_t>();
    p.setup.seq_len = j.at("setup").at("seq_len").get<int64_t>();
    for (const auto& l : j.at("links")) {
      p.links.push_back({l.at("name").get<std::string>(), l.at("bandwidth").get<double>(),
                         l.at("latency").get<double>(), l.at("strait").get<bool>()});
    }
    for (const auto& f : j.at("sync_flows")) p.sync_flows.push_back({f.at("link").get<int>(), f.at("bytes").get<double>()});
    p.sync_s = j.at("sync_s").get<double>();
    for (const auto& jg : j.at("groups")) {
      GroupPlan g;
      g.islands = jg.at("islands").get<std::vector<int>>();
      g.tp = jg.at("tp").get<std::vector<int64_t>>();
      g.pp = jg.at("pp").get<std::vector<int64_t>>();
      g.dp = jg.at("dp").get<int64_t>();
      g.ep = jg.at("ep").get<int64_t>();
      g.micro_batch = jg.at("micro_batch").get<int64_t>();
      g.micro_batches = jg.at("micro_batches").get<int64_t>();
      g.virtual_stages = jg.at("virtual_stages").get<int64_t>();
      g.schedule = scheduleFrom(jg.at("schedule").get<std::string>());
      g.recompute = recomputeFrom(jg.at("recompute").get<std::string>());
      g.zero = jg.at("zero").get<int>();
      g.batch_sequences = jg.at("batch_sequences").get<double>();
      g.step_s = jg.at("step_s").get<double>();
      g.pipeline_s = jg.at("pipeline_s").get<double>();
      g.bubble_fraction = jg.at("bubble_fraction").get<double>();
      g.dp_exposed_s = jg.at("dp_exposed_s").get<double>();
      g.devices = jg.at("devices").get<int64_t>();
      for (const auto& s : jg.at("stages")) {
        StagePlan sp;
        sp.island = s.at("island").get<int>();
        sp.device = s.at("device").get<std::string>();
        sp.tp = s.at("tp").get<int64_t>();
        sp.first_item = s.at("first_item").get<int64_t>();
        sp.num_items = s.at("num_items").get<int64_t>();
        sp.fwd_s = s.at("fwd_s").get<double>();
        sp.bwd_s = s.at("bwd_s").get<double>();
        sp.memory_bytes = s.at("memory_bytes").get<double>();
        sp.memory_capacity = s.at("memory_capacity").get<double>();
        sp.act_bytes_per_mb = s.at("act_bytes_per_mb").get<double>();
        sp.p2p_bytes = s.at("p2p_bytes").get<double>();
        sp.p2p_link = s.at("p2p_link").get<int>();
        sp.p2p_weight = s.at("p2p_weight").get<double>();
        sp.dp_bytes = s.at("dp_bytes").get<double>();
        sp.dp_group = s.at("dp_group").get<int64_t>();
        sp.dp_link = s.at("dp_link").get<int>();
        sp.dp_s = s.at("dp_s").get<double>();
        sp.optimizer_s = s.at("optimizer_s").get<double>();
        sp.model_flops_per_mb = s.at("model_flops_per_mb").get<double>();
        if (sp.p2p_link >= static_cast<int>(p.links.size()) || sp.dp_link >= static_cast<int>(p.links.size())) {
          return core::invalidArgument("plan file: a stage names a link index out of range");
        }
        g.stages.push_back(sp);
      }
      if (g.stages.empty()) return core::invalidArgument("plan file: a group has no stages");
      p.groups.push_back(g);
    }
    const json& pred = j.at("prediction");
    p.step_s = pred.at("step_s").get<double>();
    p.tokens_per_s = pred.at("tokens_per_s").get<double>();
    p.mfu = pred.at("mfu").get<double>();
    p.bubble_fraction = pred.at("bubble_fraction").get<double>();
    p.total_params = pred.at("total_params").get<double>();
    p.active_params = pred.at("active_params").get<double>();
    p.devices = pred.at("devices").get<int64_t>();
    p.summary = pred.at("summary").get<std::string>();
    for (const auto& k : pred.at("kinds")) {
      p.kinds.push_back({k.at("kind").get<std::string>(), k.at("devices").get<int64_t>(), k.at("mfu").get<double>(),
                         k.at("tflops_per_device").get<double>(), k.at("max_memory_bytes").get<double>(),
                         k.at("memory_capacity").get<double>()});
    }
    for (const auto& s : pred.at("straits")) {
      p.straits.push_back({s.at("name").get<std::string>(), s.at("bytes_per_step").get<double>(),
                           s.at("busy_s").get<double>()});
    }
  } catch (const json::exception& e) {
    return core::invalidArgument(std::string("plan file: ") + e.what());
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
