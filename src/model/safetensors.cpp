// safetensors and config.json reading/writing (see safetensors.h).
#include "archipelago/model/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "archipelago/core/files.h"

namespace archipelago::model {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; a big-endian host would need byte swapping");

using nlohmann::json;

namespace {

struct DtypeInfo {
  const char* name;
  torch::ScalarType type;
};
constexpr DtypeInfo kDtypes[] = {
    {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
    {"BF16", torch::kBFloat16}, {"I64", torch::kInt64}, {"I32", torch::kInt32},
    {"I16", torch::kInt16},   {"I8", torch::kInt8},     {"U8", torch::kUInt8},
    {"BOOL", torch::kBool},
};

core::Status corrupt(const std::string& what) { return core::dataLoss("safetensors: " + what); }

}  // namespace

const torch::Tensor* SafetensorsFile::find(const std::string& name) const {
  auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                             [](const auto& entry, const std::string& n) { return entry.first < n; });
  return it != tensors.end() && it->first == name ? &it->second : nullptr;
}

core::Result<std::string> safetensorsDtypeName(torch::ScalarType t) {
  for (const auto& d : kDtypes) {
    if (d.type == t) return std::string(d.name);
  }
  return core::unimplemented(std::string("safetensors: no dtype name for ") + c10::toString(t));
}

core::Result<torch::ScalarType> safetensorsDtype(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return d.type;
  }
  return corrupt("unsupported dtype '" + name + "'");
}

core::Result<std::string> serializeSafetensors(const NamedTensors& tensors,
                                               const std::map<std::string, std::string>& metadata,
                                               std::optional<torch::ScalarType> cast_floating) {
  std::map<std::string, torch::Tensor> sorted;
  for (const auto& [name, t] : tensors) {
    if (name.empty() || name == "__metadata__") return core::invalidArgument("safetensors: bad tensor name '" + name + "'");
    if (!t.defined()) return core::invalidArgument("safetensors: tensor '" + name + "' is undefined");
    torch::Tensor c = t.detach().to(torch::kCPU);
    if (cast_floating && c.is_floating_point()) c = c.to(*cast_floating);
    if (!sorted.emplace(name, c.contiguous()).second) {
      return core::invalidArgument("safetensors: duplicate tensor name '" + name + "'");
    }
  }
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : sorted) {
    auto dtype = safetensorsDtypeName(t.scalar_type());
    if (!dtype.isOk()) return dtype.status().withContext(name);
    uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", *dtype}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string h = header.dump();  // std::map-backed object: keys sorted
  h.append((8 - h.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + h.size() + offset);
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  out += h;
  for (const auto& [name, t] : sorted) {
    out.append(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.numel()) * t.element_size());
  }
  return out;
}

namespace {

// One tensor's byte range in the data section.
struct DataRange {
  uint64_t begin, end;
  std::string name;
};

// The element count of a header's shape. The product of the non-zero
// dimensions is bounded too: torch computes the element count of
// [0, 2^62, 2^62] as well, and a dimension past 2^63 would become a
// negative int64 size.
core::Result<uint64_t> shapeOf(const json& shape_j, const std::string& name, std::vector<int64_t>& shape) {
  if (!shape_j.is_array()) return corrupt("entry '" + name + "': shape is not an array");
  uint64_t nonzero = 1;
  bool empty = false;
  for (const auto& d : shape_j) {
    if (!d.is_number_unsigned()) return corrupt("entry '" + name + "': shape holds a non-integer or negative value");
    uint64_t dim = d.get<uint64_t>();
    if (dim != 0 && nonzero > (uint64_t{1} << 62) / dim) return corrupt("entry '" + name + "': shape overflows");
    if (dim == 0) empty = true;
    else nonzero *= dim;
    shape.push_back(static_cast<int64_t>(dim));
  }
  return empty ? 0 : nonzero;
}

// One header entry: checks dtype, shape and offsets against the data
// section, copies the bytes into a new tensor, returns its range.
core::Result<DataRange> parseEntry(const std::string& name, const json& v, std::string_view data,
                                   SafetensorsFile& file) {
  if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets")) {
    return corrupt("entry '" + name + "' needs dtype, shape and data_offsets");
  }
  if (!v["dtype"].is_string()) return corrupt("entry '" + name + "': dtype is not a string");
  auto dtype = safetensorsDtype(v["dtype"].get<std::string>());
  if (!dtype.isOk()) return dtype.status().withContext(name);
  std::vector<int64_t> shape;
  ARCH_ASSIGN_OR_RETURN(const uint64_t numel, shapeOf(v["shape"], name, shape));
  const json& off_j = v["data_offsets"];
  if (!off_j.is_array() || off_j.size() != 2 || !off_j[0].is_number_unsigned() || !off_j[1].is_number_unsigned()) {
    return corrupt("entry '" + name + "': data_offsets must be two non-negative integers");
  }
  uint64_t b = off_j[0].get<uint64_t>(), e = off_j[1].get<uint64_t>();
  if (b > e || e > data.size()) {
    return corrupt("entry '" + name + "': data_offsets [" + std::to_string(b) + ", " + std::to_string(e) +
                   "] outside the data region of " + std::to_string(data.size()) + " bytes");
  }
  uint64_t elem = c10::elementSize(*dtype);
  // Compared by division: numel * elem wrapped around for 2^62 F32
  // elements (to 0, matching an empty range) and torch::empty then threw.
  if ((e - b) % elem != 0 || (e - b) / elem != numel) {
    return corrupt("entry '" + name + "': " + std::to_string(e - b) + " bytes for shape of " +
                   std::to_string(numel) + " elements of " + std::to_string(elem) + " bytes");
  }
  torch::Tensor t;
  try {
    t = torch::empty(shape, torch::TensorOptions().dtype(*dtype));
  } catch (const std::exception&) {  // c10::Error's text carries a backtrace: not for a one-line error
    return corrupt("entry '" + name + "': torch cannot allocate a tensor of its shape");
  }
  if (e > b) std::memcpy(t.data_ptr(), data.data() + b, e - b);
  file.tensors.emplace_back(name, std::move(t));
  return DataRange{b, e, name};
}

// The data region must be covered exactly: no gaps, no overlaps.
core::Status checkCoverage(std::vector<DataRange> ranges, uint64_t data_size) {
  std::sort(ranges.begin(), ranges.end(), [](const DataRange& a, const DataRange& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (const auto& r : ranges) {
    if (r.begin != pos) {
      return corrupt("entry '" + r.name + "' starts at byte " + std::to_string(r.begin) + " but the previous data ends at " +
                     std::to_string(pos) + " (gap or overlap)");
    }
    pos = r.end;
  }
  if (pos != data_size) {
    return corrupt("tensors cover " + std::to_string(pos) + " of " + std::to_string(data_size) + " data bytes");
  }
  return core::okStatus();
}

}  // namespace

core::Result<SafetensorsFile> parseSafetensors(std::string_view bytes) {
  if (bytes.size() < 8) return corrupt("file of " + std::to_string(bytes.size()) + " bytes is shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  if (n > kMaxSafetensorsHeader) return corrupt("header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > bytes.size() - 8) {
    return corrupt("header length " + std::to_string(n) + " runs past the end of the file (" +
                   std::to_string(bytes.size()) + " bytes)");
  }
  json header;
  try {
    header = json::parse(bytes.substr(8, n));
  } catch (const json::exception& e) {
    return corrupt(std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) return corrupt("header is not a JSON object");
  const std::string_view data = bytes.substr(8 + n);

  SafetensorsFile file;
  std::vector<DataRange> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) return corrupt("__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) return corrupt("__metadata__." + m.key() + " is not a string");
        file.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    ARCH_ASSIGN_OR_RETURN(DataRange r, parseEntry(name, v, data, file));
    ranges.push_back(std::move(r));
  }
  ARCH_RETURN_IF_ERROR(checkCoverage(std::move(ranges), data.size()));
  std::sort(file.tensors.begin(), file.tensors.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  return file;
}

core::Status writeSafetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata,
                              std::optional<torch::ScalarType> cast_floating) {
  auto bytes = serializeSafetensors(tensors, metadata, cast_floating);
  if (!bytes.isOk()) return bytes.status().withContext(path.string());
  return core::writeFileAtomic(path, *bytes);
}

core::Result<SafetensorsFile> readSafetensors(const std::filesystem::path& path) {
  auto bytes = core::readFile(path);
  if (!bytes.isOk()) return bytes.status();
  auto file = parseSafetensors(*bytes);
  if (!file.isOk()) return file.status().withContext(path.string());
  return file;
}

core::Status loadIntoModel(Transformer& model, const SafetensorsFile& file, bool strict) {
  auto named = model->namedTensors();
  // Grouped so the message leads with the kind of mismatch, a few names each.
  std::vector<std::string> missing, shape, dtype, unexpected;
  std::set<std::string> expected;
  for (const auto& [name, t] : named) {
    expected.insert(name);
    const torch::Tensor* src = file.find(name);
    if (src == nullptr) {
      missing.push_back("'" + name + "'");
    } else if (src->sizes() != t.sizes()) {
      std::ostringstream ss;
      ss << "'" << name << "' has shape " << src->sizes() << ", the model expects " << t.sizes();
      shape.push_back(ss.str());
    } else if (!src->is_floating_point()) {
      dtype.push_back("'" + name + "' is " + std::string(c10::toString(src->scalar_type())));
    }
  }
  if (strict) {
    for (const auto& [name, t] : file.tensors) {
      if (!expected.count(name)) unexpected.push_back("'" + name + "'");
    }
  }
  std::string msg;
  auto group = [&](const char* what, const std::vector<std::string>& items) {
    if (items.empty()) return;
    msg += (msg.empty() ? "" : "; ") + std::to_string(items.size()) + " " + what + ": ";
    for (size_t i = 0; i < items.size() && i < 3; ++i) msg += (i ? ", " : "") + items[i];
    if (items.size() > 3) msg += ", ...";
  };
  group("missing tensor(s)", missing);
  group("tensor(s) with the wrong shape", shape);
  group("non-floating tensor(s)", dtype);
  group("unexpected tensor(s) not in this architecture", unexpected);
  if (!msg.empty()) return core::invalidArgument("weights do not match the model config: " + msg);
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : named) t.copy_(*file.find(name));
  return core::okStatus();
}

// ---- config.json ------------------------------------------------------------

namespace {
const char* hfDtype(const std::string& d) {
  if (d == "bf16" || d == "fp8") return "bfloat16";  // fp8 linears compute around bf16
  if (d == "fp16") return "float16";
  return "float32";
}
}  // namespace

std::string hfConfigJson(const core::ModelConfig& c) {
  bool moe = c.moe.num_experts > 0;
  json j;
  j["architectures"] = {moe ? "MixtralForCausalLM" : "LlamaForCausalLM"};
  j["model_type"] = moe ? "mixtral" : "llama";
  j["hidden_size"] = c.dim;
  j["intermediate_size"] = moe ? c.moe.expert_hidden : c.ffn_hidden;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["num_hidden_layers"] = c.n_layers;
  j["head_dim"] = c.n_heads > 0 ? c.dim / c.n_heads : 0;
  j["vocab_size"] = c.vocab_size;
  j["rms_norm_eps"] = c.norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["rope_scaling"] = nullptr;
  j["max_position_embeddings"] = c.max_seq_len;
  j["tie_word_embeddings"] = c.tie_embeddings;
  j["hidden_act"] = "silu";
  j["attention_bias"] = false;
  j["mlp_bias"] = false;
  j["initializer_range"] = c.init_std;
  j["torch_dtype"] = hfDtype(c.dtype);
  if (moe) {
    j["num_local_experts"] = c.moe.num_experts;
    j["num_experts_per_tok"] = c.moe.top_k;
    j["router_aux_loss_coef"] = c.moe.aux_loss_coef;
    j["output_router_logits"] = false;
  }
  json a;
  a["ffn_hidden"] = c.ffn_hidden;
  a["dtype"] = c.dtype;
  a["preset"] = c.preset;
  a["moe"] = {{"num_experts", c.moe.num_experts},         {"top_k", c.moe.top_k},
              {"expert_hidden", c.moe.expert_hidden},     {"shared_expert", c.moe.shared_expert},
              {"every", c.moe.every},                     {"balance", c.moe.balance},
              {"aux_loss_coef", c.moe.aux_loss_coef},     {"router_bias_rate", c.moe.router_bias_rate},
              {"capacity_factor", c.moe.capacity_factor}};
  j["archipelago"] = a;
  return j.dump(2) + "\n";
}

core::Result<core::ModelConfig> parseHfConfig(std::string_view text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    return core::invalidArgument(std::string("config.json: not valid JSON: ") + e.what());
  }
  if (!j.is_object()) return core::invalidArgument("config.json: expected a JSON object");
  std::string type = j.value("model_type", "");
  if (type != "llama" && type != "mistral" && type != "mixtral") {
    return core::unimplemented("config.json: model_type '" + type + "'; expected llama, mistral or mixtral");
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    return core::unimplemented("config.json: rope_scaling is not supported (expected null)");
  }
  core::ModelConfig c;
  std::string missing;
  auto get_int = [&](const char* key, int64_t& out, bool required) {
    if (j.contains(key) && j[key].is_number_integer()) {
      out = j[key].get<int64_t>();
    } else if (required) {
      missing += std::string(missing.empty() ? "" : ", ") + key;
    }
  };
  auto get_double = [&](const char* key, double& out) {
    if (j.contains(key) && j[key].is_number()) out = j[key].get<double>();
  };
  try {
    get_int("hidden_size", c.dim, true);
    get_int("num_hidden_layers", c.n_layers, true);
    get_int("num_attention_heads", c.n_heads, true);
    get_int("vocab_size", c.vocab_size, true);
    int64_t inter = 0;
    get_int("intermediate_size", inter, true);
    c.n_kv_heads = c.n_heads;
    get_int("num_key_value_heads", c.n_kv_heads, false);
    get_int("max_position_embeddings", c.max_seq_len, false);
    get_double("rms_norm_eps", c.norm_eps);
    get_double("rope_theta", c.rope_theta);
    get_double("initializer_range", c.init_std);
    if (j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean()) {
      c.tie_embeddings = j["tie_word_embeddings"].get<bool>();
    }
    if (j.contains("head_dim") && j["head_dim"].is_number_integer() && c.n_heads > 0 &&
        j["head_dim"].get<int64_t>() * c.n_heads != c.dim) {
      return core::unimplemented("config.json: head_dim * num_attention_heads != hidden_size is not supported");
    }
    std::string td = j.value("torch_dtype", "float32");
    c.dtype = td == "bfloat16" ? "bf16" : td == "float16" ? "fp16" : "fp32";
    c.ffn_hidden = inter;
    if (type == "mixtral") {
      get_int("num_local_experts", c.moe.num_experts, true);
      get_int("num_experts_per_tok", c.moe.top_k, true);
      get_double("router_aux_loss_coef", c.moe.aux_loss_coef);
      c.moe.expert_hidden = inter;
    }
    if (!missing.empty()) return core::invalidArgument("config.json: missing or non-integer " + missing);
    if (j.contains("archipelago") && j["archipelago"].is_object()) {
      const json& a = j["archipelago"];
      c.ffn_hidden = a.value("ffn_hidden", c.ffn_hidden);
      c.dtype = a.value("dtype", c.dtype);
      c.preset = a.value("preset", c.preset);
      if (a.contains("moe") && a["moe"].is_object()) {
        const json& m = a["moe"];
        c.moe.num_experts = m.value("num_experts", c.moe.num_experts);
        c.moe.top_k = m.value("top_k", c.moe.top_k);
        c.moe.expert_hidden = m.value("expert_hidden", c.moe.expert_hidden);
        c.moe.shared_expert = m.value("shared_expert", c.moe.shared_expert);
        c.moe.every = m.value("every", c.moe.every);
        c.moe.balance = m.value("balance", c.moe.balance);
        c.moe.aux_loss_coef = m.value("aux_loss_coef", c.moe.aux_loss_coef);
        c.moe.router_bias_rate = m.value("router_bias_rate", c.moe.router_bias_rate);
        c.moe.capacity_factor = m.value("capacity_factor", c.moe.capacity_factor);
      }
    }
  } catch (const json::exception& e) {
    return core::invalidArgument(std::string("config.json: ") + e.what());
  }
  auto resolved = resolveModelConfig(c);
  if (!resolved.isOk()) return resolved.status().withContext("config.json");
  return resolved;
}

core::Status saveModelDir(const std::filesystem::path& dir, Transformer& model,
                          std::optional<torch::ScalarType> cast_floating) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return core::unavailable(dir.string() + ": cannot create directory: " + ec.message());
  core::ModelConfig c = model->config();
  if (cast_floating) {
    c.dtype = *cast_floating == torch::kBFloat16 ? "bf16" : *cast_floating == torch::kFloat16 ? "fp16" : "fp32";
  }
  ARCH_RETURN_IF_ERROR(core::writeFileAtomic(dir / "config.json", hfConfigJson(c)));
  // transformers refuses safetensors files whose metadata lacks format=pt.
  return writeSafetensors(dir / "model.safetensors", model->namedTensors(), {{"format", "pt"}}, cast_floating);
}

core::Result<Transformer> loadModelDir(const std::filesystem::path& dir) {
  auto text = core::readFile(dir / "config.json");
  if (!text.isOk()) return text.status();
  auto config = parseHfConfig(*text);
  if (!config.isOk()) return config.status().withContext((dir / "config.json").string());
  auto model = buildModel(*config, 0);
  if (!model.isOk()) return model.status();
  auto file = readSafetensors(dir / "model.safetensors");
  if (!file.isOk()) return file.status();
  Transformer m = *model;
  ARCH_RETURN_IF_ERROR(loadIntoModel(m, *file).withContext((dir / "model.safetensors").string()));
  return m;
}

}  // namespace archipelago::model
