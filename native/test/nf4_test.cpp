// NF4 and the bnb-4bit layout against what bitsandbytes 0.50 wrote on an H100: the quantized vectors and the two
// reference checkpoints must come out bit for bit, and malformed checkpoints must be rejected by name.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "harness.h"
#include "io/dtype.h"
#include "io/safetensors.h"
#include "quant/bnb4.h"
#include "quant/nf4.h"

using namespace qlora;

namespace {

std::vector<uint8_t> bytes_of(const TensorStore& store, const std::string& name) {
  const uint8_t* p = store.data(name);
  return std::vector<uint8_t>(p, p + store.info(name).nbytes);
}

std::vector<uint8_t> bytes_of_floats(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 4);
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// Index of the first differing element (in units of `elem` bytes), or -1 when equal; sizes must match.
int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b, size_t elem = 1) {
  if (a.size() != b.size()) return -2;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i / elem);
  return -1;
}

#define EXPECT_SAME_BYTES(a, b, elem, what) \
  do { const int64_t d_ = first_difference((a), (b), (elem)); \
    EXPECT_TRUE(d_ == -1, what, ": ", d_ == -2 ? "sizes differ" : "differs first at element ", d_); } while (0)

// A scratch folder under the system temp dir, removed at scope exit.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& tag) {
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    path = std::filesystem::temp_directory_path() / ("qlora-nf4-test-" + tag + "-" + std::to_string(stamp));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

std::vector<std::string> quantizable_names(const TensorStore& store) {
  std::vector<std::string> out;
  for (const std::string& n : store.names())
    if (bnb4::is_quantizable_linear(n)) out.push_back(n);
  return out;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t p = s.find(from); p != std::string::npos; p = s.find(from, p + to.size())) s.replace(p, from.size(), to);
  return s;
}

// Copies every tensor of `src` into a writer, letting `edit` replace or drop some (return false to drop).
template <typename Edit>
void copy_with_edit(const TensorStore& src, const std::string& out_path, Edit edit) {
  SafetensorsWriter w;
  for (const std::string& n : src.names()) {
    const TensorInfo& t = src.info(n);
    std::vector<int64_t> shape = t.shape;
    std::vector<uint8_t> data = bytes_of(src, n);
    DType dtype = t.dtype;
    if (!edit(n, dtype, shape, data)) continue;
    w.add(n, dtype, shape, data.data(), data.size());
  }
  w.set_metadata("format", "pt");
  w.write(out_path);
}

}  // namespace

TEST(nf4_dynamic_map_matches_bitsandbytes_bit_for_bit) {
  auto store = TensorStore::open_file(qtest::reference("nf4-vectors.safetensors"));
  const std::vector<float>& map = nf4::dynamic_map_signed();
  EXPECT_EQ(map.size(), size_t{256});
  for (const char* v : {"v0_dq", "v2_dq"}) {
    EXPECT_SAME_BYTES(bytes_of_floats(map), bytes_of(*store, std::string(v) + ".state2_code_f32"), 4, v);
  }
}

TEST(nf4_vectors_are_bit_identical_to_bitsandbytes) {
  auto store = TensorStore::open_file(qtest::reference("nf4-vectors.safetensors"));
  for (const std::string v : {"v0", "v2"}) {
    const std::vector<float> x = store->read_f32(v + ".input_bf16");  // bf16 widened: exact
    const int64_t n = static_cast<int64_t>(x.size());
    const nf4::Blockwise4bit q = nf4::quantize(x.data(), n, 64);
    EXPECT_SAME_BYTES(q.packed, bytes_of(*store, v + "_plain.packed_u8"), 1, v + " packed");
    EXPECT_SAME_BYTES(q.packed, bytes_of(*store, v + "_dq.packed_u8"), 1, v + " packed (dq)");
    EXPECT_SAME_BYTES(bytes_of_floats(q.absmax), bytes_of(*store, v + "_plain.absmax_f32"), 4, v + " absmax");

    const nf4::DoubleQuantized dq = nf4::double_quantize(q.absmax, 256);
    EXPECT_SAME_BYTES(dq.codes, bytes_of(*store, v + "_dq.absmax_u8"), 1, v + " absmax codes");
    EXPECT_SAME_BYTES(bytes_of_floats({dq.offset}), bytes_of(*store, v + "_dq.offset_f32"), 4, v + " offset");
    EXPECT_SAME_BYTES(bytes_of_floats(dq.state2_absmax), bytes_of(*store, v + "_dq.state2_absmax_f32"), 4,
                      v + " state2 absmax");

    // The inputs were bf16, so bitsandbytes returned bf16: code * absmax in fp32, rounded to nearest even.
    std::vector<float> out(x.size());
    nf4::dequantize(q.packed.data(), q.absmax.data(), n, 64, out.data());
    for (float& o : out) o = round_to_bf16(o);
    EXPECT_SAME_BYTES(bytes_of_floats(out), bytes_of(*store, v + "_plain.dequant_f32"), 4, v + " dequant");

    const std::vector<float> absmax2 = nf4::double_dequantize(dq.codes.data(), static_cast<int64_t>(dq.codes.size()),
                                                              dq.state2_absmax.data(),
                                                              nf4::dynamic_map_signed().data(), dq.offset, 256);
    nf4::dequantize(q.packed.data(), absmax2.data(), n, 64, out.data());
    for (float& o : out) o = round_to_bf16(o);
    EXPECT_SAME_BYTES(bytes_of_floats(out), bytes_of(*store, v + "_dq.dequant_f32"), 4, v + " dequant (dq)");
  }
}

TEST(nf4_decision_tree_edges_zero_blocks_and_padding) {
  // Each code maps to itself; a value exactly on bitsandbytes' midpoint goes to the lower code (strict >).
  for (uint8_t c = 0; c < 16; ++c) EXPECT_EQ(int{nf4::quantize_normalized(nf4::kCodes[c])}, int{c});
  EXPECT_EQ(int{nf4::quantize_normalized(0.8614784181118011f)}, 14);
  EXPECT_EQ(int{nf4::quantize_normalized(std::nextafter(0.8614784181118011f, 1.0f))}, 15);
  EXPECT_EQ(int{nf4::quantize_normalized(-0.045525018125772476f)}, 6);
  EXPECT_EQ(int{nf4::quantize_normalized(0.03979014977812767f)}, 7);
  EXPECT_EQ(int{nf4::quantize_normalized(-2.0f)}, 0);
  EXPECT_EQ(int{nf4::quantize_normalized(2.0f)}, 15);

  // An all-zero block writes code 0 (GPU path) with absmax 0; its neighbour block is unaffected.
  std::vector<float> x(128, 0.0f);
  for (int i = 64; i < 128; ++i) x[static_cast<size_t>(i)] = (i % 2 ? 1.0f : -1.0f) * static_cast<float>(i) / 128.0f;
  nf4::Blockwise4bit q = nf4::quantize(x.data(), 128, 64);
  EXPECT_EQ(q.absmax[0], 0.0f);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(int{q.packed[static_cast<size_t>(i)]}, 0);
  EXPECT_EQ(q.absmax[1], 127.0f / 128.0f);
  EXPECT_EQ(int{q.packed[63]}, 0x0f);  // x[126] = -126/128 -> code 0 (-1), x[127] = +absmax -> code 15

  // Odd length: the last byte carries one element in its high nibble; the padding element is quantized as 0.0
  // the way the kernel loads it, i.e. NF4's zero code 7.
  const float odd[3] = {0.5f, -1.0f, 1.0f};
  q = nf4::quantize(odd, 3, 64);
  EXPECT_EQ(q.packed.size(), size_t{2});
  EXPECT_EQ(int{q.packed[1]}, 0xf7);
  std::vector<float> back(3);
  nf4::dequantize(q.packed.data(), q.absmax.data(), 3, 64, back.data());
  EXPECT_EQ(back[1], -1.0f);
  EXPECT_EQ(back[2], 1.0f);
  EXPECT_EQ(back[0], nf4::kCodes[12]);  // 0.5 lies below the 12/13 midpoint 0.5016...
  EXPECT_EQ(int{q.packed[0]}, 0xc0);
}

TEST(nf4_vector_quantizer_picks_the_decision_trees_codes) {
  // quantize_block counts the midpoints a value exceeds; the tree branches on them. Values on, just below and just
  // above every midpoint, signed zeros, NaN, subnormals and random values, each beside a 1 (absmax 1, so scaled by
  // exactly 1), must take the tree's code; an infinity (beside 0.5) makes the scale 0 and itself NaN.
  std::vector<float> values = {0.0f, -0.0f, 1.0f, -1.0f, INFINITY, -INFINITY, NAN, 1e-45f, -1e-45f, 1e-38f, -1e-38f};
  for (const float m : nf4::kMidpoints)
    for (const float v : {m, std::nextafter(m, -2.0f), std::nextafter(m, 2.0f)}) values.push_back(v);
  uint32_t state = 12345;
  for (int i = 0; i < 4000; ++i) {
    state = state * 1664525u + 1013904223u;
    values.push_back(static_cast<float>(static_cast<int32_t>(state)) / 2147483648.0f);  // [-1, 1)
  }
  for (const float v : values) {
    const float block[2] = {std::isfinite(v) ? 1.0f : 0.5f, v};
    uint8_t packed = 0;
    const float absmax = nf4::quantize_block(block, 2, &packed);
    const float scale = 1.0f / absmax;
    EXPECT_EQ(int{packed & 0x0f}, int{nf4::quantize_normalized(v * scale)});
    EXPECT_EQ(int{packed >> 4}, int{nf4::quantize_normalized(block[0] * scale)});
  }

  // Whole tensors: blocks of 2, 64 (with an odd length) and 4096 (several chunks of 64 a block), against the tree a
  // value at a time; and quantize_loaded, fed the same values a block at a time, gives the same bytes.
  std::vector<float> x(10001);
  for (size_t i = 0; i < x.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    x[i] = static_cast<float>(static_cast<int32_t>(state)) / 2147483648.0f * (i % 777 == 0 ? 5.0f : 0.02f);
  }
  x[300] = NAN;
  for (size_t i = 128; i < 192; ++i) x[i] = 0.0f;  // an all-zero block of 64
  for (const int blocksize : {2, 64, 4096}) {
    const int64_t n = static_cast<int64_t>(x.size());
    const nf4::Blockwise4bit q = nf4::quantize(x.data(), n, blocksize);
    for (int64_t i = 0; i < n; ++i) {
      const float absmax = q.absmax[static_cast<size_t>(i / blocksize)];
      const int expected = absmax == 0.0f ? 0 : nf4::quantize_normalized(x[static_cast<size_t>(i)] * (1.0f / absmax));
      const uint8_t byte = q.packed[static_cast<size_t>(i / 2)];
      EXPECT_EQ(i % 2 == 0 ? byte >> 4 : byte & 0x0f, expected);
    }
    EXPECT_EQ(int{q.packed.back() & 0x0f}, 7);  // the odd length's padding: the NF4 zero
    const nf4::Blockwise4bit loaded = nf4::quantize_loaded(n, blocksize, [&](int64_t begin, int64_t count, float* out) {
      std::copy(x.begin() + begin, x.begin() + begin + count, out);
    });
    EXPECT_SAME_BYTES(loaded.packed, q.packed, 1, "quantize_loaded's codes");
    EXPECT_SAME_BYTES(bytes_of_floats(loaded.absmax), bytes_of_floats(q.absmax), 4, "quantize_loaded's absmax");
  }
}

TEST(nf4_quantizable_linear_names) {
  EXPECT_TRUE(bnb4::is_quantizable_linear("model.layers.0.self_attn.q_proj.weight"));
  EXPECT_TRUE(bnb4::is_quantizable_linear("model.layers.31.self_attn.o_proj.weight"));
  EXPECT_TRUE(bnb4::is_quantizable_linear("model.layers.7.mlp.down_proj.weight"));
  EXPECT_TRUE(!bnb4::is_quantizable_linear("model.layers.0.self_attn.q_proj.bias"));
  EXPECT_TRUE(!bnb4::is_quantizable_linear("model.layers.0.input_layernorm.weight"));
  EXPECT_TRUE(!bnb4::is_quantizable_linear("model.layers.x.mlp.up_proj.weight"));
  EXPECT_TRUE(!bnb4::is_quantizable_linear("model.layers.0.mlp.up_proj.weight.absmax"));
  EXPECT_TRUE(!bnb4::is_quantizable_linear("model.embed_tokens.weight"));
  EXPECT_TRUE(!bnb4::is_quantizable_linear("lm_head.weight"));
}

// The references were quantized from the model loaded in fp32, so with dtype "float32" every tensor bnb wrote for a
// weight, quant state JSON included, must come out byte for byte.
TEST(nf4_add_quantized_weight_reproduces_reference_checkpoints) {
  auto model = TensorStore::open_dir(qtest::reference("llama-shared"));
  for (const bool dq : {true, false}) {
    auto ref = TensorStore::open_dir(qtest::reference(dq ? "llama-shared-bnb4-dq" : "llama-shared-bnb4"));
    TempDir tmp(dq ? "add-dq" : "add");
    SafetensorsWriter w;
    const std::vector<std::string> names = quantizable_names(*model);
    EXPECT_EQ(names.size(), size_t{14});
    for (const std::string& n : names) {
      bnb4::add_quantized_weight(w, n, model->info(n).shape, model->read_f32(n), dq, "float32");
    }
    w.write(tmp.file("q.safetensors"));
    auto ours = TensorStore::open_file(tmp.file("q.safetensors"));
    size_t compared = 0;
    for (const std::string& t : ours->names()) {
      EXPECT_TRUE(ref->has(t), "reference lacks ", t);
      EXPECT_TRUE(ours->info(t).dtype == ref->info(t).dtype, t, " dtype");
      EXPECT_EQ(shape_to_string(ours->info(t).shape), shape_to_string(ref->info(t).shape));
      EXPECT_SAME_BYTES(bytes_of(*ours, t), bytes_of(*ref, t), 1, t);
      ++compared;
    }
    // Every tensor of the reference that belongs to a quantized weight was produced.
    size_t expected = 0;
    for (const std::string& t : ref->names())
      if (t.find("_proj.weight") != std::string::npos) ++expected;
    EXPECT_EQ(compared, expected);
  }
}

TEST(nf4_quantize_model_matches_reference_checkpoints) {
  for (const bool dq : {true, false}) {
    TempDir tmp(dq ? "model-dq" : "model");
    const std::string out = tmp.file("model.safetensors");
    const bnb4::QuantizeReport r = bnb4::quantize_model(qtest::reference("llama-shared"), out, dq);
    EXPECT_EQ(r.quantized_tensors, int64_t{14});
    EXPECT_EQ(r.copied_tensors, int64_t{7});
    EXPECT_TRUE(r.bytes_out < r.bytes_in);

    auto src = TensorStore::open_dir(qtest::reference("llama-shared"));
    auto ref = TensorStore::open_dir(qtest::reference(dq ? "llama-shared-bnb4-dq" : "llama-shared-bnb4"));
    auto ours = TensorStore::open_file(out);
    for (const std::string& n : src->names()) {
      if (!bnb4::is_quantizable_linear(n)) {  // copied as stored (bf16 here)
        EXPECT_TRUE(ours->info(n).dtype == src->info(n).dtype, n);
        EXPECT_SAME_BYTES(bytes_of(*ours, n), bytes_of(*src, n), 1, n);
        continue;
      }
      EXPECT_TRUE(bnb4::is_quantized(*ours, n), n);
      std::vector<std::string> parts = {"", ".absmax", ".quant_map"};
      if (dq) parts.insert(parts.end(), {".nested_absmax", ".nested_quant_map"});
      for (const std::string& p : parts) EXPECT_SAME_BYTES(bytes_of(*ours, n + p), bytes_of(*ref, n + p), 1, n + p);
      // This model is stored in bf16, so its quant state says so; the reference was made from an fp32 load.
      const std::string state = n + ".quant_state.bitsandbytes__nf4";
      const std::vector<uint8_t> ref_state = bytes_of(*ref, state);
      const std::string expected = replace_all(std::string(ref_state.begin(), ref_state.end()),
                                               "\"dtype\": \"float32\", \"shape\"",
                                               "\"dtype\": \"bfloat16\", \"shape\"");
      const std::vector<uint8_t> got = bytes_of(*ours, state);
      EXPECT_EQ(std::string(got.begin(), got.end()), expected);
    }
    EXPECT_TRUE(ours->info("model.layers.1.mlp.up_proj.weight").dtype == DType::U8);
  }
}

// quantize_model writes a tensor at a time: a linear's codes and constants are computed when the writer reaches them,
// a cast goes in chunks of 2^20 values. Against the eager functions, on sizes that end in a partial block of 64, a
// partial group of 256 constants and a partial chunk, from fp32 values that each target dtype rounds.
TEST(nf4_quantize_model_streams_the_same_tensors_the_eager_functions_make) {
  TempDir tmp("stream");
  const std::vector<int64_t> linear_shape = {97, 340};  // 32,980 values: 516 blocks (the last of 20), 3 groups of 256
  const std::vector<int64_t> embed_shape = {(int64_t{1} << 14) + 3, 64};  // 2^20 + 192 values
  auto values_of = [](int64_t n, uint32_t seed) {
    std::vector<float> v(static_cast<size_t>(n));
    uint32_t x = seed;
    for (float& f : v) {
      x = x * 1664525u + 1013904223u;
      f = (static_cast<float>(x >> 8) / 16777216.0f - 0.5f) * 0.37f;  // 24 random bits: bf16 and f16 round them
    }
    return v;
  };
  const std::vector<float> linear = values_of(numel_of(linear_shape), 1), embed = values_of(numel_of(embed_shape), 2);
  {
    SafetensorsWriter w;
    w.add_f32("model.embed_tokens.weight", embed_shape, embed);
    w.add_f32("model.layers.0.mlp.up_proj.weight", linear_shape, linear);
    w.write(tmp.file("model.safetensors"));
  }
  for (const auto& [dtype, t] : {std::pair<std::string, DType>{"bfloat16", DType::BF16}, {"float16", DType::F16}}) {
    for (const bool dq : {true, false}) {
      const std::string out = tmp.file(dtype + (dq ? "-dq" : "") + ".safetensors");
      bnb4::quantize_model(tmp.path.string(), out, dq, dtype);
      const auto ours = TensorStore::open_file(out);
      const std::string what = dtype + (dq ? " with double quant" : "");

      std::vector<uint16_t> cast(embed.size());
      for (size_t i = 0; i < embed.size(); ++i)
        cast[i] = t == DType::BF16 ? f32_to_bf16(embed[i]) : f32_to_f16(embed[i]);
      std::vector<uint8_t> cast_bytes(cast.size() * 2);
      std::memcpy(cast_bytes.data(), cast.data(), cast_bytes.size());
      EXPECT_TRUE(ours->info("model.embed_tokens.weight").dtype == t, what);
      EXPECT_SAME_BYTES(bytes_of(*ours, "model.embed_tokens.weight"), cast_bytes, 2, what + ": the cast embedding");

      std::vector<float> rounded = linear;
      for (float& v : rounded) v = t == DType::BF16 ? round_to_bf16(v) : round_to_f16(v);
      const nf4::Blockwise4bit q = nf4::quantize(rounded.data(), static_cast<int64_t>(rounded.size()), 64);
      const std::string name = "model.layers.0.mlp.up_proj.weight";
      EXPECT_SAME_BYTES(bytes_of(*ours, name), q.packed, 1, what + ": the codes");
      const std::vector<uint8_t> state = bytes_of(*ours, name + ".quant_state.bitsandbytes__nf4");
      const std::string state_text(state.begin(), state.end());
      if (dq) {
        const nf4::DoubleQuantized d = nf4::double_quantize(q.absmax, 256);
        EXPECT_SAME_BYTES(bytes_of(*ours, name + ".absmax"), d.codes, 1, what + ": the constants' codes");
        EXPECT_SAME_BYTES(bytes_of(*ours, name + ".nested_absmax"), bytes_of_floats(d.state2_absmax), 4,
                          what + ": the nested constants");
        const size_t at = state_text.find("\"nested_offset\": ") + 17;
        const float offset = static_cast<float>(std::stod(state_text.substr(at)));
        EXPECT_TRUE(offset == d.offset, what, ": the quant state's offset ", offset, " is not ", d.offset);
      } else {
        EXPECT_SAME_BYTES(bytes_of(*ours, name + ".absmax"), bytes_of_floats(q.absmax), 4, what + ": the constants");
      }
      EXPECT_TRUE(state_text.find("\"dtype\": \"" + dtype + "\"") != std::string::npos, what, ": ", state_text);
      // read back as transformers would: the values within NF4's error of the rounded weights
      const std::vector<float> back = bnb4::dequantize_weight(bnb4::read_weight(*ours, name));
      for (size_t i = 0; i < back.size(); i += 997)
        EXPECT_TRUE(std::fabs(back[i] - rounded[i]) < 0.05f, what, " at ", i);
    }
  }
}

// The codes of a weight added with a loader are computed during write() and not before: the loader runs once over
// the weight for the block constants at add time (with double quantization; not at all without), once more in
// write(), and the file equals the one made from the values in memory.
TEST(nf4_add_quantized_weight_loads_the_codes_when_the_writer_writes_them) {
  TempDir tmp("loader");
  const std::vector<int64_t> shape = {33, 130};  // 4,290 values: 68 blocks, the last of 2
  std::vector<float> values(static_cast<size_t>(numel_of(shape)));
  for (size_t i = 0; i < values.size(); ++i) values[i] = std::sin(0.37f * static_cast<float>(i)) * (1.0f + i % 7);
  for (const bool dq : {true, false}) {
    std::atomic<int64_t> loaded{0};
    SafetensorsWriter streamed;
    bnb4::add_quantized_weight(
        streamed, "model.layers.0.self_attn.o_proj.weight", shape,
        [&](int64_t begin, int64_t count, float* out) {
          loaded += count;
          std::copy(values.begin() + begin, values.begin() + begin + count, out);
        },
        dq, "float32");
    EXPECT_EQ(loaded.load(), dq ? numel_of(shape) : int64_t{0});
    streamed.write(tmp.file("streamed.safetensors"));
    EXPECT_EQ(loaded.load(), (dq ? 2 : 1) * numel_of(shape));

    SafetensorsWriter eager;
    bnb4::add_quantized_weight(eager, "model.layers.0.self_attn.o_proj.weight", shape, values, dq, "float32");
    eager.write(tmp.file("eager.safetensors"));
    EXPECT_EQ(read_text_file(tmp.file("streamed.safetensors")), read_text_file(tmp.file("eager.safetensors")));
  }
}

TEST(nf4_read_weight_dequantizes_reference_checkpoint) {
  auto src = TensorStore::open_dir(qtest::reference("llama-shared"));
  auto ref_dq = TensorStore::open_dir(qtest::reference("llama-shared-bnb4-dq"));
  auto ref_plain = TensorStore::open_dir(qtest::reference("llama-shared-bnb4"));
  for (const std::string& n : quantizable_names(*src)) {
    const std::vector<float> original = src->read_f32(n);
    EXPECT_TRUE(bnb4::is_quantized(*ref_dq, n), n);
    const bnb4::Nf4Weight w = bnb4::read_weight(*ref_dq, n);
    EXPECT_EQ(shape_to_string(w.shape), shape_to_string(src->info(n).shape));
    EXPECT_EQ(w.blocksize, 64);
    EXPECT_EQ(w.dtype, std::string("float32"));
    const std::vector<float> deq = bnb4::dequantize_weight(w);
    EXPECT_EQ(deq.size(), original.size());

    // The double-dequantized block constants sit within the 8-bit map's resolution of the exact ones.
    const bnb4::Nf4Weight plain = bnb4::read_weight(*ref_plain, n);
    EXPECT_SAME_BYTES(plain.packed, w.packed, 1, n + " packed (plain vs dq)");
    for (size_t b = 0; b < w.absmax.size(); ++b) EXPECT_NEAR(w.absmax[b], plain.absmax[b], 2e-2 * plain.absmax[b]);

    for (size_t i = 0; i < deq.size(); ++i) {
      const uint8_t byte = w.packed[i / 2];
      const int code = i % 2 == 0 ? byte >> 4 : byte & 0x0f;
      const float a = w.absmax[i / 64];
      const float exact = nf4::kCodes[code] * a;
      EXPECT_TRUE(std::memcmp(&deq[i], &exact, 4) == 0, n, "[", i, "] ", deq[i], " vs ", exact);
      // Half the widest NF4 gap (between -1 and -0.696) times the block scale, plus the scale's own error.
      const float true_absmax = plain.absmax[i / 64];
      const double bound = 0.153 * std::max(a, true_absmax) + std::fabs(a - true_absmax);
      EXPECT_TRUE(std::fabs(deq[i] - original[i]) <= bound, n, "[", i, "] ", deq[i], " vs ", original[i]);
    }
  }
}

TEST(nf4_dequantize_weight_rounds_to_state_dtype) {
  bnb4::Nf4Weight w;
  w.shape = {1, 2};
  w.blocksize = 64;
  w.packed = {0xe1};  // codes 14 and 1
  w.absmax = {0.3f};
  w.dtype = "bfloat16";
  std::vector<float> v = bnb4::dequantize_weight(w);
  EXPECT_EQ(v[0], round_to_bf16(nf4::kCodes[14] * 0.3f));
  EXPECT_EQ(v[1], round_to_bf16(nf4::kCodes[1] * 0.3f));
  EXPECT_TRUE(v[0] != nf4::kCodes[14] * 0.3f);
  w.dtype = "float16";
  v = bnb4::dequantize_weight(w);
  EXPECT_EQ(v[0], round_to_f16(nf4::kCodes[14] * 0.3f));
  w.dtype = "float32";
  v = bnb4::dequantize_weight(w);
  EXPECT_EQ(v[1], nf4::kCodes[1] * 0.3f);
}

TEST(nf4_rejects_malformed_checkpoints_by_name) {
  auto ref = TensorStore::open_dir(qtest::reference("llama-shared-bnb4-dq"));
  const std::string q = "model.layers.0.self_attn.q_proj.weight";
  TempDir tmp("bad");

  // Truncated absmax: 100 block codes instead of 256.
  const std::string truncated = tmp.file("truncated.safetensors");
  copy_with_edit(*ref, truncated, [&](const std::string& n, DType&, std::vector<int64_t>& shape,
                                      std::vector<uint8_t>& data) {
    if (n == q + ".absmax") {
      data.resize(100);
      shape = {100};
    }
    return true;
  });
  auto bad = TensorStore::open_file(truncated);
  EXPECT_THROWS_WITH(bnb4::read_weight(*bad, q),
                     "tensor '" + q + ".absmax' has 100 values, expected 256 for shape [128, 128] in blocks of 64");
  EXPECT_THROWS_WITH(bnb4::read_weight(*bad, q), truncated);
  bnb4::read_weight(*bad, "model.layers.0.self_attn.k_proj.weight");  // the others still load

  // Missing nested absmax, short packed codes.
  const std::string missing = tmp.file("missing.safetensors");
  copy_with_edit(*ref, missing, [&](const std::string& n, DType&, std::vector<int64_t>& shape,
                                    std::vector<uint8_t>& data) {
    if (n == q) {
      data.resize(data.size() - 2);
      shape = {static_cast<int64_t>(data.size()), 1};
    }
    return n != "model.layers.0.self_attn.k_proj.weight.nested_absmax";
  });
  auto bad2 = TensorStore::open_file(missing);
  EXPECT_THROWS_WITH(bnb4::read_weight(*bad2, "model.layers.0.self_attn.k_proj.weight"),
                     "'model.layers.0.self_attn.k_proj.weight.nested_absmax' is missing");
  EXPECT_THROWS_WITH(bnb4::read_weight(*bad2, q), "tensor '" + q + "' has 8190 bytes of packed codes, expected 8192");

  // fp4 quant state.
  const std::string fp4 = tmp.file("fp4.safetensors");
  copy_with_edit(*ref, fp4, [&](const std::string& n, DType&, std::vector<int64_t>& shape,
                                std::vector<uint8_t>& data) {
    if (n == q + ".quant_state.bitsandbytes__nf4") {
      std::string s = replace_all(std::string(data.begin(), data.end()), "\"nf4\"", "\"fp4\"");
      data.assign(s.begin(), s.end());
      shape = {static_cast<int64_t>(data.size())};
    }
    return true;
  });
  auto bad3 = TensorStore::open_file(fp4);
  EXPECT_THROWS_WITH(bnb4::read_weight(*bad3, q), "'" + q + "' uses fp4, which is not supported (only nf4)");

  // Quantizing a checkpoint that is already bnb-4bit.
  EXPECT_THROWS_WITH(bnb4::quantize_model(qtest::reference("llama-shared-bnb4-dq"), tmp.file("again.safetensors"), true),
                     "model is already quantized (bnb-4bit)");
}
