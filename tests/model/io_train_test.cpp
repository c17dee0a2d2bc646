// safetensors / config.json, flat gradient buffers and hooks, generation,
// and a tiny model learning a repeated sequence.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include <unistd.h>

#include "archipelago/core/hash.h"
#include "archipelago/model/safetensors.h"
#include "archipelago/model/training.h"
#include "model/test_util.h"

namespace archipelago::model {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() / ("arch_model_test_" + std::to_string(::getpid()) + "_" +
                                         std::to_string(counter_++));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

bool sameBytes(const torch::Tensor& a, const torch::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  auto x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), x.numel() * x.element_size()) == 0;
}

std::string withLength(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

TEST(Safetensors, RoundTripIsBitExactAndDeterministic) {
  auto f32 = torch::randn({3, 5});
  f32[0][0] = std::numeric_limits<float>::quiet_NaN();
  f32[0][1] = -0.0f;
  NamedTensors tensors = {{"z.f32", f32},
                          {"a.bf16", torch::randn({7}).to(torch::kBFloat16)},
                          {"m.f16", torch::randn({2, 2, 2}).to(torch::kFloat16)},
                          {"i.i64", torch::arange(5, torch::kLong)},
                          {"empty", torch::zeros({0, 3})}};
  auto bytes = serializeSafetensors(tensors, {{"format", "pt"}});
  ASSERT_TRUE(bytes.isOk()) << bytes.status().toString();
  EXPECT_EQ((bytes->size() - 8 - bytes->size() % 8) % 8, 0u);
  auto file = parseSafetensors(*bytes);
  ASSERT_TRUE(file.isOk()) << file.status().toString();
  EXPECT_EQ(file->metadata.at("format"), "pt");
  ASSERT_EQ(file->tensors.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    const torch::Tensor* got = file->find(name);
    ASSERT_NE(got, nullptr) << name;
    EXPECT_TRUE(sameBytes(*got, t)) << name;
  }
  // Same tensors in another order: the same bytes.
  NamedTensors reversed(tensors.rbegin(), tensors.rend());
  EXPECT_EQ(*serializeSafetensors(reversed, {{"format", "pt"}}), *bytes);
  // Header keys sorted; data in the same order.
  uint64_t n = 0;
  std::memcpy(&n, bytes->data(), 8);
  std::string header = bytes->substr(8, n);
  EXPECT_LT(header.find("\"a.bf16\""), header.find("\"empty\""));
  EXPECT_LT(header.find("\"m.f16\""), header.find("\"z.f32\""));
  // Casting on write.
  auto as_bf16 = parseSafetensors(*serializeSafetensors({{"w", f32}}, {}, torch::kBFloat16));
  EXPECT_EQ(as_bf16->find("w")->scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(sameBytes(*as_bf16->find("w"), f32.to(torch::kBFloat16)));
  // Duplicate names are refused.
  EXPECT_FALSE(serializeSafetensors({{"w", f32}, {"w", f32}}).isOk());
}

TEST(Safetensors, ParsesHandBuiltBuffer) {
  // Two F32 values, one I64, one BF16 (0x3FC0 = 1.5), little-endian.
  std::string data;
  auto put = [&](const void* p, size_t n) { data.append(static_cast<const char*>(p), n); };
  float f[2] = {1.5f, -2.0f};
  int64_t i = 7;
  uint8_t bf[2] = {0xC0, 0x3F};
  put(f, 8);
  put(&i, 8);
  put(bf, 2);
  std::string header =
      R"({"b":{"dtype":"I64","shape":[1],"data_offsets":[8,16]},)"
      R"("a":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]},)"
      R"("c":{"dtype":"BF16","shape":[],"data_offsets":[16,18]},"__metadata__":{"k":"v"}})";
  auto file = parseSafetensors(withLength(header, data));
  ASSERT_TRUE(file.isOk()) << file.status().toString();
  EXPECT_EQ(file->metadata.at("k"), "v");
  ASSERT_EQ(file->tensors.size(), 3u);
  EXPECT_EQ(file->tensors[0].first, "a");
  EXPECT_EQ(file->find("a")->sizes(), (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(file->find("a")->view({-1})[0].item<float>(), 1.5f);
  EXPECT_EQ(file->find("a")->view({-1})[1].item<float>(), -2.0f);
  EXPECT_EQ(file->find("b")->item<int64_t>(), 7);
  EXPECT_EQ(file->find("c")->dim(), 0);
  EXPECT_EQ(file->find("c")->item<float>(), 1.5f);
}

TEST(Safetensors, RejectsCorruptHeaders) {
  std::string data(8, '\0');
  auto bad = [&](const std::string& bytes, const std::string& expect) {
    auto r = parseSafetensors(bytes);
    ASSERT_FALSE(r.isOk()) << expect;
    EXPECT_EQ(r.status().code(), core::StatusCode::kDataLoss);
    EXPECT_NE(r.status().message().find(expect), std::string::npos) << r.status().message();
  };
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  ASSERT_TRUE(parseSafetensors(withLength(ok, data)).isOk());
  bad("abc", "shorter than");
  std::string huge = withLength(ok, data);
  huge[7] = 0x10;
  bad(huge, "exceeds");
  std::string past = withLength(ok, data);
  past[0] = static_cast<char>(ok.size() + 20);
  bad(past, "runs past");
  bad(withLength(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", data), "not valid JSON");
  bad(withLength(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", data), "outside the data region");
  bad(withLength(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data), "bytes for shape");
  bad(withLength(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", data), "unsupported dtype");
  bad(withLength(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data), "gap or overlap");
  bad(withLength(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", data), "cover 4 of 8");
  bad(withLength(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data), "negative");
  bad(withLength(R"({"a":{"dtype":"F32","shape":[2]}})", data), "data_offsets");
  bad(withLength(R"([1,2])", data), "not a JSON object");
}

TEST(Safetensors, ModelDirectoryRoundTripAndClearLoadErrors) {
  TempDir dir;
  auto c = testing::tinyMoeConfig("router_bias");
  Transformer a(c, 17);
  a->updateRouterBias(torch::tensor({{5, 1, 1, 1}, {1, 1, 1, 9}}, torch::kLong));
  ASSERT_TRUE(saveModelDir(dir.path(), a).isOk());
  ASSERT_TRUE(fs::exists(dir.path() / "config.json"));
  auto b = loadModelDir(dir.path());
  ASSERT_TRUE(b.isOk()) << b.status().toString();
  auto ta = a->namedTensors(), tb = (*b)->namedTensors();
  ASSERT_EQ(ta.size(), tb.size());
  for (size_t i = 0; i < ta.size(); ++i) EXPECT_TRUE(sameBytes(ta[i].second, tb[i].second)) << ta[i].first;
  // Written twice: identical bytes.
  TempDir dir2;
  ASSERT_TRUE(saveModelDir(dir2.path(), *b).isOk());
  auto s1 = *core::sha256File(dir.path() / "model.safetensors");
  auto s2 = *core::sha256File(dir2.path() / "model.safetensors");
  EXPECT_EQ(s1, s2);

  // A different architecture: names and shapes are reported.
  auto other = c;
  other.dim = 32;
  other.n_layers = 3;
  Transformer wrong(resolveModelConfig(other).value(), 0);
  auto file = readSafetensors(dir.path() / "model.safetensors");
  ASSERT_TRUE(file.isOk());
  auto st = loadIntoModel(wrong, *file);
  ASSERT_FALSE(st.isOk());
  EXPECT_EQ(st.code(), core::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("model.embed_tokens.weight' has shape [13, 16], the model expects [13, 32]"),
            std::string::npos)
      << st.message();
  EXPECT_NE(st.message().find("missing tensor(s): 'model.layers.2."), std::string::npos) << st.message();
  // Nothing was modified by the failed load.
  Transformer fresh(resolveModelConfig(other).value(), 0);
  EXPECT_TRUE(torch::equal(wrong->model->norm->weight, fresh->model->norm->weight));
  // Missing file.
  auto missing = readSafetensors(dir.path() / "nope.safetensors");
  EXPECT_EQ(missing.status().code(), core::StatusCode::kNotFound);
  // bf16 export.
  TempDir dir3;
  ASSERT_TRUE(saveModelDir(dir3.path(), a, torch::kBFloat16).isOk());
  auto half = readSafetensors(dir3.path() / "model.safetensors");
  EXPECT_EQ(half->find("lm_head.weight")->scalar_type(), torch::kBFloat16);
}

TEST(HfConfig, RoundTripsAndReadsPlainLlama) {
  auto c = testing::tinyMoeConfig("router_bias");
  c.moe.every = 2;
  c.moe.capacity_factor = 1.25;
  c.tie_embeddings = true;
  c.rope_theta = 500000.0;
  auto text = hfConfigJson(c);
  EXPECT_NE(text.find("\"model_type\": \"mixtral\""), std::string::npos);
  auto back = parseHfConfig(text);
  ASSERT_TRUE(back.isOk()) << back.status().toString();
  EXPECT_EQ(hfConfigJson(*back), text);
  EXPECT_EQ(back->moe.every, 2);
  EXPECT_EQ(back->moe.balance, "router_bias");
  EXPECT_DOUBLE_EQ(back->rope_theta, 500000.0);
  // A TinyLlama-1.1B style HF config.
  auto llama = parseHfConfig(R"({"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":2048,
    "intermediate_size":5632,"num_attention_heads":32,"num_key_value_heads":4,"num_hidden_layers":22,
    "vocab_size":32000,"rms_norm_eps":1e-05,"rope_theta":10000.0,"max_position_embeddings":2048,
    "tie_word_embeddings":false,"torch_dtype":"bfloat16","rope_scaling":null})");
  ASSERT_TRUE(llama.isOk()) << llama.status().toString();
  EXPECT_EQ(llama->n_kv_heads, 4);
  EXPECT_EQ(llama->ffn_hidden, 5632);
  EXPECT_EQ(llama->dtype, "bf16");
  EXPECT_EQ(countParameters(*llama).total, 1100048384);  // TinyLlama's published count
  auto missing = parseHfConfig(R"({"model_type":"llama","hidden_size":64})");
  ASSERT_FALSE(missing.isOk());
  EXPECT_NE(missing.status().message().find("num_hidden_layers"), std::string::npos);
  EXPECT_FALSE(parseHfConfig(R"({"model_type":"gpt2"})").isOk());
}

// The bucket layout these hooks drive is tested with the bucketer
// (tests/runtime/parts_test.cpp).
TEST(GradReadyHooks, FireOnceAfterAccumulationLastParameterFirst) {
  auto c = testing::tinyMoeConfig();
  Transformer m(c, 4);
  auto params = m->parameterList();
  std::vector<int> fired(params.size(), 0);
  std::vector<torch::Tensor> at_fire(params.size());
  std::vector<size_t> order;
  {
    GradReadyHooks hooks(params, [&](size_t i) {
      fired[i]++;
      order.push_back(i);
      at_fire[i] = params[i].grad().clone();
    });
    auto ids = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
    m->lossAndStats(ids, ids).loss.backward();
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_EQ(fired[i], 1) << i;
      EXPECT_TRUE(torch::equal(at_fire[i], params[i].grad())) << i;
    }
    // lm_head (last parameter) is ready before the embedding (first).
    auto pos = [&](size_t i) { return std::find(order.begin(), order.end(), i) - order.begin(); };
    EXPECT_LT(pos(params.size() - 1), pos(0));
  }
  // Removed with the object.
  auto ids = torch::randint(0, c.vocab_size, {2, 8}, torch::kLong);
  m->lossAndStats(ids, ids).loss.backward();
  EXPECT_EQ(fired[0], 1);
}

TEST(Generate, GreedyMatchesStepwiseArgmaxWithAndWithoutCache) {
  auto c = testing::tinyConfig();
  c.max_seq_len = 12;
  Transformer m(c, 21);
  std::vector<int64_t> prompt = {1, 2, 3};
  GenerateOptions o;
  o.max_new_tokens = 15;  // runs past max_seq_len: sliding window
  auto cached = generate(m, prompt, o);
  o.use_kv_cache = false;
  auto plain = generate(m, prompt, o);
  EXPECT_EQ(cached, plain);
  ASSERT_EQ(cached.size(), 15u);
  // Reference: argmax of a full forward over the last max_seq_len tokens.
  torch::NoGradGuard g;
  m->eval();
  std::vector<int64_t> ctx = prompt;
  for (int64_t step = 0; step < 15; ++step) {
    size_t w = std::min<size_t>(ctx.size(), 12);
    std::vector<int64_t> win(ctx.end() - static_cast<long>(w), ctx.end());
    auto logits = m(torch::tensor(win, torch::kLong).view({1, -1}));
    int64_t next = logits[0][static_cast<int64_t>(w) - 1].argmax().item<int64_t>();
    EXPECT_EQ(cached[static_cast<size_t>(step)], next) << step;
    ctx.push_back(next);
  }
}

TEST(Generate, SamplingIsSeededAndTopKOneIsGreedy) {
  auto c = testing::tinyConfig();
  Transformer m(c, 21);
  std::vector<int64_t> prompt = {4, 5};
  GenerateOptions o;
  o.max_new_tokens = 20;
  o.temperature = 1.5;
  o.seed = 9;
  auto a = generate(m, prompt, o), b = generate(m, prompt, o);
  EXPECT_EQ(a, b);
  o.seed = 10;
  EXPECT_NE(generate(m, prompt, o), a);
  o.top_k = 1;
  auto k1 = generate(m, prompt, o);
  GenerateOptions greedy;
  greedy.max_new_tokens = 20;
  EXPECT_EQ(k1, generate(m, prompt, greedy));
  o.top_k = 0;
  o.stop_token = a[3];
  o.seed = 9;
  auto stopped = generate(m, prompt, o);
  EXPECT_LE(stopped.size(), 4u);
  EXPECT_EQ(stopped.back(), a[3]);
}

double overfit(const core::ModelConfig& c, int steps) {
  torch::manual_seed(0);
  Transformer m(c, 3);
  torch::optim::AdamW opt(m->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.0));
  std::vector<int64_t> seq;
  for (int i = 0; i < 17; ++i) seq.push_back((i * 5 + 3) % c.vocab_size);
  auto all = torch::tensor(seq, torch::kLong).view({1, -1}).repeat({2, 1});
  auto in = all.narrow(1, 0, 16), tgt = all.narrow(1, 1, 16);
  double first = 0, last = 0;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    auto out = m->lossAndStats(in, tgt);
    out.loss.backward();
    opt.step();
    m->updateRouterBias();
    if (s == 0) first = out.ceMean();
    last = out.ceMean();
  }
  EXPECT_NEAR(first, std::log(static_cast<double>(c.vocab_size)), 0.3);
  return last / first;
}

TEST(Training, TinyDenseModelOverfitsRepeatedSequence) {
  EXPECT_LT(overfit(testing::tinyConfig(), 40), 0.2);
}

TEST(Training, TinyMoeModelOverfitsRepeatedSequence) {
  EXPECT_LT(overfit(testing::tinyMoeConfig("router_bias"), 40), 0.2);
  EXPECT_LT(overfit(testing::tinyMoeConfig("aux_loss"), 40), 0.2);
}

TEST(Threads, SetComputeThreads) {
  setComputeThreads(1);
  EXPECT_EQ(at::get_num_threads(), 1);
}

}  // namespace
}  // namespace archipelago::model
