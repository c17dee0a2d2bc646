// Calibration profile: measurements, lookup by GEMM size, JSON file format.
#include "archipelago/plan/calibration.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "archipelago/core/files.h"

namespace archipelago::plan {

void CalibrationProfile::addMatmul(const std::string& kind, Dtype dtype, double m, double n, double k,
                                   double seconds) {
  if (seconds <= 0 || m <= 0 || n <= 0 || k <= 0) return;
  const double flops = 2.0 * m * n * k;
  auto& pts = devices_[kind].matmul[dtypeName(dtype)];
  for (auto& p : pts) {
    // Same shape class (within 1%): keep the mean of the achieved rates.
    if (std::fabs(p.gemm_flops - flops) <= 0.01 * flops) {
      p.achieved_flops = 0.5 * (p.achieved_flops + flops / seconds);
      return;
    }
  }
  pts.push_back({flops, flops / seconds});
  std::sort(pts.begin(), pts.end(), [](const auto& a, const auto& b) { return a.gemm_flops < b.gemm_flops; });
}

void CalibrationProfile::addItemTiming(const std::string& kind, const std::string& key, double tokens, double fwd_s,
                                       double bwd_s) {
  if (tokens <= 0 || fwd_s <= 0 || bwd_s < 0) return;
  auto& pts = devices_[kind].items[key];
  pts.erase(std::remove_if(pts.begin(), pts.end(), [&](const ItemTiming& t) { return t.tokens == tokens; }),
            pts.end());
  pts.push_back({tokens, fwd_s, bwd_s});
  std::sort(pts.begin(), pts.end(), [](const auto& a, const auto& b) { return a.tokens < b.tokens; });
}

std::optional<ItemTiming> CalibrationProfile::itemTiming(const std::string& kind, const std::string& key,
                                                         double tokens) const {
  const DeviceCalibration* dc = find(kind);
  if (!dc) return std::nullopt;
  auto it = dc->items.find(key);
  if (it == dc->items.end() || it->second.empty()) return std::nullopt;
  const auto& pts = it->second;
  if (pts.size() == 1) {
    const double f = tokens / pts[0].tokens;
    return ItemTiming{tokens, pts[0].fwd_s * f, pts[0].bwd_s * f};
  }
  // The segment containing `tokens`, or the nearest one (extrapolation).
  size_t hi = 1;
  while (hi + 1 < pts.size() && pts[hi].tokens < tokens) ++hi;
  const ItemTiming& a = pts[hi - 1];
  const ItemTiming& b = pts[hi];
  const double t = (tokens - a.tokens) / (b.tokens - a.tokens);
  // Never below a proportional share of the smaller point (a negative
  // fixed cost from noise must not make tiny batches free).
  const double floor_f = a.fwd_s * std::min(1.0, tokens / a.tokens), floor_b = a.bwd_s * std::min(1.0, tokens / a.tokens);
  return ItemTiming{tokens, std::max(floor_f, a.fwd_s + t * (b.fwd_s - a.fwd_s)),
                    std::max(floor_b, a.bwd_s + t * (b.bwd_s - a.bwd_s))};
}

const DeviceCalibration* CalibrationProfile::find(const std::string& kind) const {
  auto it = devices_.find(kind);
  return it == devices_.end() ? nullptr : &it->second;
}

std::optional<double> CalibrationProfile::achievedFlops(const std::string& kind, Dtype dtype,
                                                        double gemm_flops) const {
  const DeviceCalibration* dc = find(kind);
  if (!dc) return std::nullopt;
  auto it = dc->matmul.find(dtypeName(dtype));
  if (it == dc->matmul.end() || it->second.empty()) {
    if (dc->matmul.size() != 1 || dc->matmul.begin()->second.empty()) return std::nullopt;
    it = dc->matmul.begin();
  }
  const auto& pts = it->second;
  if (gemm_flops <= pts.front().gemm_flops) {
    // Below the smallest measured shape the fixed per-call cost dominates:
    // keep the smallest shape's time per call, scaled by size.
    return pts.front().achieved_flops * gemm_flops / pts.front().gemm_flops;
  }
  if (gemm_flops >= pts.back().gemm_flops) return pts.back().achieved_flops;
  for (size_t i = 1; i < pts.size(); ++i) {
    if (gemm_flops <= pts[i].gemm_flops) {
      const double x0 = std::log(pts[i - 1].gemm_flops), x1 = std::log(pts[i].gemm_flops);
      const double y0 = std::log(pts[i - 1].achieved_flops), y1 = std::log(pts[i].achieved_flops);
      const double t = (std::log(gemm_flops) - x0) / (x1 - x0);
      return std::exp(y0 + t * (y1 - y0));
    }
  }
  return pts.back().achieved_flops;
}

std::string CalibrationProfile::toJson() const {
  nlohmann::json j;
  j["version"] = 1;
  nlohmann::json devs = nlohmann::json::object();
  for (const auto& [kind, dc] : devices_) {
    nlohmann::json jd;
    nlohmann::json mm = nlohmann::json::object();
    for (const auto& [dt, pts] : dc.matmul) {
      nlohmann::json arr = nlohmann::json::array();
      for (const auto& p : pts) arr.push_back({{"gemm_flops", p.gemm_flops}, {"achieved_flops", p.achieved_flops}});
      mm[dt] = arr;
    }
    jd["matmul"] = mm;
    nlohmann::json items = nlohmann::json::object();
    for (const auto& [key, pts] : dc.items) {
      nlohmann::json arr = nlohmann::json::array();
      for (const auto& p : pts) arr.push_back({{"tokens", p.tokens}, {"fwd_s", p.fwd_s}, {"bwd_s", p.bwd_s}});
      items[key] = arr;
    }
    jd["items"] = items;
    jd["memory_bandwidth"] = dc.memory_bandwidth;
    jd["step_overhead_s"] = dc.step_overhead_s;
    jd["loopback_bandwidth"] = dc.loopback_bandwidth;
    jd["loopback_cpu_per_byte"] = dc.loopback_cpu_per_byte;
    jd["optimizer_s_per_param"] = dc.optimizer_s_per_param;
    jd["host_cores"] = dc.host_cores;
    jd["background_procs"] = dc.background_procs;
    jd["background_groups"] = dc.background_groups;
    jd["threads"] = dc.threads;
    jd["alone_core_share"] = dc.alone_core_share;
    nlohmann::json corun = nlohmann::json::array();
    for (const auto& c : dc.corun) {
      corun.push_back({{"threads", c.threads}, {"compute_factor", c.compute_factor},
                       {"optimizer_factor", c.optimizer_factor}, {"compute_cv", c.compute_cv}});
    }
    jd["corun"] = corun;
    devs[kind] = jd;
  }
  j["devices"] = devs;
  return j.dump(2);
}

core::Result<CalibrationProfile> CalibrationProfile::fromJson(const std::string& text) {
  CalibrationProfile p;
  try {
    const auto j = nlohmann::json::parse(text);
    if (!j.contains("devices") || !j["devices"].is_object()) {
      return core::invalidArgument("calibration profile: expected a 'devices' object");
    }
    for (const auto& [kind, jd] : j["devices"].items()) {
      DeviceCalibration& dc = p.devices_[kind];
      if (jd.contains("matmul")) {
        for (const auto& [dt, arr] : jd["matmul"].items()) {
          ARCH_RETURN_IF_ERROR(parseDtype(dt).status().withContext("calibration profile: devices." + kind));
          auto& pts = dc.matmul[dt];
          for (const auto& e : arr) {
            CalibrationPoint cp{e.at("gemm_flops").get<double>(), e.at("achieved_flops").get<double>()};
            if (cp.gemm_flops <= 0 || cp.achieved_flops <= 0) {
              return core::invalidArgument("calibration profile: devices." + kind + ".matmul." + dt +
                                           ": gemm_flops and achieved_flops must be > 0");
            }
            pts.push_back(cp);
          }
          std::sort(pts.begin(), pts.end(),
                    [](const auto& a, const auto& b) { return a.gemm_flops < b.gemm_flops; });
        }
      }
      if (jd.contains("items")) {
        for (const auto& [key, arr] : jd["items"].items()) {
          auto& pts = dc.items[key];
          for (const auto& e : arr) {
            ItemTiming t{e.at("tokens").get<double>(), e.at("fwd_s").get<double>(), e.at("bwd_s").get<double>()};
            if (t.tokens <= 0 || t.fwd_s <= 0 || t.bwd_s < 0) {
              return core::invalidArgument("calibration profile: devices." + kind + ".items." + key +
                                           ": tokens and fwd_s must be > 0, bwd_s >= 0");
            }
            pts.push_back(t);
          }
          std::sort(pts.begin(), pts.end(), [](const auto& a, const auto& b) { return a.tokens < b.tokens; });
        }
      }
      dc.optimizer_s_per_param = jd.value("optimizer_s_per_param", 0.0);
      dc.host_cores = jd.value("host_cores", 0.0);
      dc.background_procs = jd.value("background_procs", 0.0);
      dc.background_groups = jd.value("background_groups", std::vector<double>{});
      dc.threads = jd.value("threads", int64_t{1});
      dc.alone_core_share = jd.value("alone_core_share", 0.0);
      if (jd.contains("corun")) {
        for (const auto& jc : jd.at("corun")) {
          DeviceCalibration::Corun c;
          c.threads = jc.value("threads", int64_t{0});
          c.compute_factor = jc.value("compute_factor", 1.0);
          c.optimizer_factor = jc.value("optimizer_factor", 1.0);
          c.compute_cv = jc.value("compute_cv", 0.0);
          if (c.threads < 1 || c.compute_factor <= 0 || c.optimizer_factor <= 0 || c.compute_cv < 0) {
            return core::invalidArgument("calibration profile: devices." + kind +
                                         ".corun: threads must be >= 1, factors > 0 and compute_cv >= 0");
          }
          dc.corun.push_back(c);
        }
        std::sort(dc.corun.begin(), dc.corun.end(), [](const auto& a, const auto& b) { return a.threads < b.threads; });
      }
      dc.memory_bandwidth = jd.value("memory_bandwidth", 0.0);
      dc.step_overhead_s = jd.value("step_overhead_s", 0.0);
      dc.loopback_bandwidth = jd.value("loopback_bandwidth", 0.0);
      dc.loopback_cpu_per_byte = jd.value("loopback_cpu_per_byte", 0.0);
    }
  } catch (const nlohmann::json::exception& e) {
    return core::invalidArgument(std::string("calibration profile: ") + e.what());
  }
  return p;
}

core::Status CalibrationProfile::save(const std::string& path) const {
  return core::writeFileAtomic(path, toJson() + "\n").withContext("calibration profile");
}

core::Result<CalibrationProfile> CalibrationProfile::load(const std::string& path) {
  auto text = core::readFile(path);
  if (!text.isOk()) return text.status().withContext("calibration profile");
  auto r = fromJson(*text);
  if (!r.isOk()) return r.status().withContext(path);
  return r;
}

}  // namespace archipelago::plan
