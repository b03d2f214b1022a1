// safetensors, JSON and config.json: malformed files are rejected with messages that name the file, tensor or key
// and what is wrong; the writer round-trips; sharded folders resolve through their index.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "harness.h"
#include "io/dtype.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "util/json.h"

using namespace qlora;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("qlora-io-" + name + "-" + std::to_string(std::rand()));
  fs::create_directories(dir);
  return dir;
}

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

// A safetensors file from a header text and a data section.
std::string st_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

std::string ref(const std::string& name) { return qtest::fixtures_dir() + "/reference/" + name; }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST(io_malformed_safetensors_are_rejected_with_file_and_reason) {
  const fs::path dir = temp_dir("malformed");
  const std::string file = (dir / "bad.safetensors").string();
  const std::string eight(8, 'x');
  struct Case {
    std::string bytes;
    std::string fragment;
  };
  const Case cases[] = {
      {"abc", "too short"},
      {std::string("\xff\xff\x00\x00\x00\x00\x00\x00", 8) + "{}", "header length 65535 is larger than the rest of the file"},
      {st_file("{\"a\": ", ""), "invalid JSON"},
      {st_file("[1, 2]", ""), "header is not a JSON object"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(4, 'x')),
       "tensor 'w' data_offsets [0, 8] extend past the end of the data (4 bytes)"},
      {st_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight), "tensor 'w' holds 8 bytes but F32 [3] needs 12"},
      {st_file(R"({"w":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})", eight), "dtype 'Q9' is not supported"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", eight), "begin must be <= end"},
      {st_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight), "negative dimension"},
      {st_file(R"({"w":{"dtype":"F32","shape":[2]}})", eight), "tensor 'w' lacks dtype, shape or data_offsets"},
      {st_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
       "overlap"},
  };
  for (const Case& c : cases) {
    write_bytes(file, c.bytes);
    EXPECT_THROWS_WITH(SafetensorsFile::open(file), file);
    EXPECT_THROWS_WITH(SafetensorsFile::open(file), c.fragment);
  }
  EXPECT_THROWS_WITH(SafetensorsFile::open((dir / "missing.safetensors").string()), "cannot open");
}

TEST(io_writer_round_trips_and_aligns_the_data) {
  const fs::path dir = temp_dir("writer");
  const std::string file = (dir / "out.safetensors").string();
  SafetensorsWriter w;
  w.set_metadata("format", "pt");
  const std::vector<float> a = {1.0f, -2.5f, 3.25f};
  const uint16_t b[2] = {0x3F80, 0xC000};
  w.add_f32("a", {3}, a);
  w.add("b.weight", DType::BF16, {1, 2}, b, sizeof(b));
  w.add("empty", DType::F32, {0, 4}, nullptr, 0);
  EXPECT_THROWS_WITH(w.add("a", DType::F32, {1}, a.data(), 4), "added twice");
  EXPECT_THROWS_WITH(w.add("c", DType::F32, {2}, a.data(), 4), "has 4 bytes for F32 [2]");
  w.write(file);
  for (const auto& entry : fs::directory_iterator(dir))
    EXPECT_TRUE(entry.path().filename().string().find(".tmp-") == std::string::npos, "temp file left behind");
  const auto f = SafetensorsFile::open(file);
  const std::string bytes = read_file(file);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[i]);
  EXPECT_EQ((8 + header_len) % 8, 0u);
  EXPECT_EQ(f->metadata().at("format"), std::string("pt"));
  EXPECT_EQ(f->tensors().size(), 3u);
  const TensorInfo* ta = f->find("a");
  EXPECT_TRUE(ta != nullptr);
  float back[3];
  std::memcpy(back, f->data(*ta), 12);
  EXPECT_EQ(back[1], -2.5f);
  const auto store = TensorStore::open_file(file);
  const std::vector<float> bf = store->read_f32("b.weight", {1, 2});
  EXPECT_EQ(bf[0], 1.0f);
  EXPECT_EQ(bf[1], -2.0f);
  EXPECT_THROWS_WITH(store->read_f32("b.weight", {2, 1}), "has shape [1, 2], expected [2, 1]");
  EXPECT_THROWS_WITH(store->info("nope"), "tensor 'nope' not found");
}

TEST(io_sharded_models_resolve_through_the_index) {
  const fs::path dir = temp_dir("sharded");
  SafetensorsWriter s1, s2;
  s1.add_f32("x", {2}, {1.0f, 2.0f});
  s2.add_f32("y", {1}, {3.0f});
  s1.write((dir / "model-00001-of-00002.safetensors").string());
  s2.write((dir / "model-00002-of-00002.safetensors").string());
  write_bytes(dir / "model.safetensors.index.json",
              R"({"metadata":{"total_size":12},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}})");
  const auto store = TensorStore::open_dir(dir.string());
  EXPECT_EQ(store->names().size(), 2u);
  EXPECT_EQ(store->read_f32("y")[0], 3.0f);
  EXPECT_TRUE(store->file_of("y").find("00002") != std::string::npos);
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"z":"model-00001-of-00002.safetensors"}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.string()), "tensor 'z' is listed in shard 'model-00001-of-00002.safetensors'");
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map":{"x":"../elsewhere.safetensors"}})");
  EXPECT_THROWS_WITH(TensorStore::open_dir(dir.string()), "outside the model folder");
  EXPECT_THROWS_WITH(TensorStore::open_dir(temp_dir("empty").string()), "no model.safetensors");
}

TEST(io_reference_configs_parse_in_both_forms) {
  const ModelConfig llama = load_model_config(ref("llama-shared"));  // transformers 5: rope_parameters, dtype
  EXPECT_EQ(llama.architecture, std::string("LlamaForCausalLM"));
  EXPECT_EQ(llama.num_heads, 8);
  EXPECT_EQ(llama.num_kv_heads, 4);
  EXPECT_EQ(llama.head_dim, 16);
  EXPECT_EQ(llama.rope_theta, 10000.0);
  EXPECT_TRUE(llama.rope_scaling.kind == RopeScaling::Kind::None);
  EXPECT_EQ(llama.dtype, std::string("bfloat16"));
  EXPECT_EQ(llama.eos_token_ids.size(), 1u);
  const ModelConfig l3 = load_model_config(ref("llama3-shared"));  // Hub form: rope_theta + rope_scaling, torch_dtype
  EXPECT_TRUE(l3.rope_scaling.kind == RopeScaling::Kind::Llama3);
  EXPECT_EQ(l3.rope_scaling.original_max_position_embeddings, 16);
  EXPECT_TRUE(l3.tie_word_embeddings);
  const ModelConfig qwen = load_model_config(ref("qwen2-shared"));  // no head_dim
  EXPECT_EQ(qwen.head_dim, qwen.hidden_size / qwen.num_heads);
  EXPECT_TRUE(qwen.qkv_bias && !qwen.o_bias);
  const ModelConfig bnb = load_model_config(ref("llama-shared-bnb4-dq"));
  EXPECT_TRUE(bnb.quantization && bnb.quantization->load_in_4bit && bnb.quantization->double_quant);
}

TEST(io_bad_configs_name_the_key) {
  const std::string base =
      R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2)";
  auto parse = [&](const std::string& extra) { return parse_model_config("{" + base + extra + "}", "cfg.json"); };
  EXPECT_EQ(parse(R"(, "architectures": ["LlamaForCausalLM"])").head_dim, 4);
  EXPECT_THROWS_WITH(parse(R"(, "architectures": ["GPT2LMHeadModel"])"),
                     "cfg.json: architecture 'GPT2LMHeadModel' is not supported (supported: LlamaForCausalLM");
  EXPECT_THROWS_WITH(parse(R"(, "model_type": "llama", "num_key_value_heads": 3)"),
                     "num_key_value_heads (3) does not divide num_attention_heads (2)");
  EXPECT_THROWS_WITH(parse(R"(, "model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4})"),
                     "rope scaling type 'yarn' is not supported");
  EXPECT_THROWS_WITH(parse(R"(, "model_type": "llama", "rope_scaling": {"type": "linear"})"), "rope_scaling.factor is required");
  // A repeated key: the last one wins, as Python's json does.
  EXPECT_THROWS_WITH(parse(R"(, "model_type": "llama", "hidden_size": "8")"), "cfg.json: hidden_size: expected a number, got a string");
  EXPECT_EQ(parse(R"(, "model_type": "mistral", "sliding_window": 4096)").sliding_window, 4096);
  EXPECT_EQ(parse(R"(, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": false)").sliding_window, 0);
  EXPECT_THROWS_WITH(parse_model_config(R"({"model_type": "llama"})", "cfg.json"), "cfg.json: missing 'vocab_size'");
  EXPECT_THROWS_WITH(parse(R"(, "model_type": "llama", "quantization_config": {"quant_method": "gptq"})"),
                     "quantization method 'gptq' is not supported");
  EXPECT_THROWS_WITH(load_model_config(temp_dir("noconfig").string()), "no config.json");
  const ModelConfig linear = parse(R"(, "model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0})");
  EXPECT_TRUE(linear.rope_scaling.kind == RopeScaling::Kind::Linear);
  EXPECT_EQ(linear.rope_scaling.factor, 2.0);
}

TEST(io_json_parses_escapes_and_reports_offsets) {
  const json::Value v = json::Value::parse(R"({"s": "a\"b\\\u00e9\ud83d\ude80", "n": -1.5e2, "a": [true, null]})", "t.json");
  EXPECT_EQ(v.find("s")->as_string("s"), std::string("a\"b\\\xc3\xa9\xf0\x9f\x9a\x80"));
  EXPECT_EQ(v.find("n")->as_number("n"), -150.0);
  EXPECT_EQ(v.find("a")->as_array("a").size(), 2u);
  EXPECT_THROWS_WITH(json::Value::parse("{\"a\": 1,}", "t.json"), "t.json: invalid JSON at byte 8");
  EXPECT_THROWS_WITH(json::Value::parse("[1] x", "t.json"), "unexpected text after the JSON value");
  EXPECT_THROWS_WITH(v.find("n")->as_string("t.json: n"), "t.json: n: expected a string, got a number");
  EXPECT_THROWS_WITH(json::Value::parse("1.5", "t").as_int("k"), "expected an integer");
  // Python's repr of floats, as bitsandbytes' quant states print them.
  EXPECT_EQ(json::format_double(static_cast<double>(0.1279611587524414f)), std::string("0.1279611587524414"));
  EXPECT_EQ(json::format_double(1.0), std::string("1.0"));
  EXPECT_EQ(json::format_double(1e-05), std::string("1e-05"));
  EXPECT_EQ(json::Value::parse(R"({"b": [1, 2.5]})", "t").dump(true), std::string(R"({"b": [1, 2.5]})"));
}

TEST(io_half_precision_conversions_round_to_nearest_even) {
  EXPECT_EQ(bf16_to_f32(0x3F80), 1.0f);
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3F80);     // exactly halfway: to even (down)
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3F82);     // halfway between 0x3F81 and 0x3F82: to even (up)
  EXPECT_EQ(f16_to_f32(0x3C00), 1.0f);
  EXPECT_EQ(f16_to_f32(0x0001), 5.9604644775390625e-08f);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);         // rounds to infinity
  EXPECT_EQ(f32_to_f16(1.00048828125f), 0x3C00);   // halfway: to even
  EXPECT_EQ(f32_to_f16(5.9604644775390625e-08f), 0x0001);
  for (uint32_t h = 0; h < 0x7C00; ++h) EXPECT_EQ(f32_to_f16(f16_to_f32(static_cast<uint16_t>(h))), h);
}
