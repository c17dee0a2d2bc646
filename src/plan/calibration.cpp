// Calibration profile: measurements, lookup by GEMM size, JSON file format.
#include "archipelago/plan/calibration.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

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
    jd["memory_bandwidth"] = dc.memory_bandwidth;
    jd["step_overhead_s"] = dc.step_overhead_s;
    jd["loopback_bandwidth"] = dc.loopback_bandwidth;
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
      dc.memory_bandwidth = jd.value("memory_bandwidth", 0.0);
      dc.step_overhead_s = jd.value("step_overhead_s", 0.0);
      dc.loopback_bandwidth = jd.value("loopback_bandwidth", 0.0);
    }
  } catch (const nlohmann::json::exception& e) {
    return core::invalidArgument(std::string("calibration profile: ") + e.what());
  }
  return p;
}

core::Status CalibrationProfile::save(const std::string& path) const {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    if (!out) return core::notFound("cannot write calibration profile '" + tmp + "'");
    out << toJson() << "\n";
    if (!out) return core::internalError("short write to '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return core::internalError("cannot rename '" + tmp + "' to '" + path + "'");
  }
  return core::okStatus();
}

core::Result<CalibrationProfile> CalibrationProfile::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return core::notFound("calibration profile '" + path + "' cannot be opened");
  std::stringstream ss;
  ss << in.rdbuf();
  auto r = fromJson(ss.str());
  if (!r.isOk()) return r.status().withContext(path);
  return r;
}

}  // namespace archipelago::plan
