// Reading and writing the bnb-4bit (NF4) checkpoint layout that transformers + bitsandbytes use.
#include "quant/bnb4.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>

#include "quant/nf4.h"
#include "util/error.h"
#include "util/json.h"

namespace qlora::bnb4 {

namespace {

const char* const kNf4StateSuffix = ".quant_state.bitsandbytes__nf4";
const char* const kFp4StateSuffix = ".quant_state.bitsandbytes__fp4";

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_state_dtype(const std::string& dtype) {
  return dtype == "float32" || dtype == "bfloat16" || dtype == "float16";
}

// The tensor `tensor` that the bnb-4bit weight `name` needs; a missing one is reported as part of that weight.
const TensorInfo& component(const TensorStore& store, const std::string& name, const std::string& tensor) {
  if (!store.has(tensor)) {
    fail(store.file_of(name + kNf4StateSuffix), ": tensor '", name, "' is stored as bnb-4bit but '", tensor,
         "' is missing");
  }
  return store.info(tensor);
}

void expect_dtype(const TensorStore& store, const TensorInfo& t, DType dtype) {
  if (t.dtype != dtype) {
    fail(store.file_of(t.name), ": tensor '", t.name, "' has dtype ", dtype_name(t.dtype), ", expected ",
         dtype_name(dtype));
  }
}

// Bytes of a tensor read as fp32 values, requiring an exact element count.
std::vector<float> read_f32_count(const TensorStore& store, const TensorInfo& t, int64_t expected,
                                  const std::string& why) {
  if (t.numel() != expected) {
    fail(store.file_of(t.name), ": tensor '", t.name, "' has ", t.numel(), " values, expected ", expected, why);
  }
  std::vector<float> out(static_cast<size_t>(expected));
  const std::string context = store.file_of(t.name) + ": tensor '" + t.name + "'";
  convert_to_f32(t.dtype, store.data(t.name), out.size(), out.data(), context);
  return out;
}

// Exactly Python's json.dumps(quant_state_dict) for the dict bitsandbytes' QuantState.as_dict(packed=True) builds,
// so that files we write are byte-identical to the ones transformers saves.
std::string quant_state_json(const std::vector<int64_t>& shape, const std::string& dtype, int blocksize,
                             std::optional<float> nested_offset, int blocksize2) {
  std::string s = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(blocksize) + ", \"dtype\": " +
                  json::quote(dtype) + ", \"shape\": [";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  s += "]";
  if (nested_offset) {
    // bitsandbytes stores the fp32 offset via .item(), i.e. widened to a Python float (double) and printed by repr.
    s += ", \"nested_blocksize\": " + std::to_string(blocksize2) +
         ", \"nested_dtype\": \"float32\", \"nested_offset\": " +
         json::format_double(static_cast<double>(*nested_offset));
  }
  s += "}";
  return s;
}

const char* state_dtype_for(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default: return nullptr;
  }
}

bool parse_decimal(const std::string& s, size_t& pos) {
  const size_t start = pos;
  while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') ++pos;
  return pos > start;
}

bool consume(const std::string& s, size_t& pos, const std::string& lit) {
  if (s.compare(pos, lit.size(), lit) != 0) return false;
  pos += lit.size();
  return true;
}

}  // namespace

bool is_quantized(const TensorStore& store, const std::string& name) {
  // An fp4 weight counts too, so that loading it reaches read_weight and fails with a clear message instead of
  // tripping over a U8 tensor where floats were expected.
  return store.has(name + kNf4StateSuffix) || store.has(name + kFp4StateSuffix);
}

Nf4Weight read_weight(const TensorStore& store, const std::string& name) {
  if (!store.has(name + kNf4StateSuffix)) {
    if (store.has(name + kFp4StateSuffix)) {
      fail(store.file_of(name + kFp4StateSuffix), ": tensor '", name,
           "' uses fp4, which is not supported (only nf4)");
    }
    fail(store.location(), ": tensor '", name, "' is not stored as bnb-4bit ('", name, kNf4StateSuffix,
         "' not found)");
  }
  const std::string state_name = name + kNf4StateSuffix;
  const TensorInfo& state_info = store.info(state_name);
  const std::string& file = store.file_of(state_name);
  const std::string state_ctx = file + ": tensor '" + state_name + "'";
  expect_dtype(store, state_info, DType::U8);
  const json::Value state = json::Value::parse(
      std::string_view(reinterpret_cast<const char*>(store.data(state_name)), state_info.nbytes), state_ctx);
  if (!state.is_object()) fail(state_ctx, ": quant state is not a JSON object");
  auto field = [&](const char* key) -> const json::Value& {
    const json::Value* v = state.find(key);
    if (!v) fail(state_ctx, ": quant state lacks '", key, "'");
    return *v;
  };
  auto key_ctx = [&](const char* key) { return state_ctx + ": " + key; };

  const std::string& quant_type = field("quant_type").as_string(key_ctx("quant_type"));
  if (quant_type == "fp4") fail(file, ": tensor '", name, "' uses fp4, which is not supported (only nf4)");
  if (quant_type != "nf4") fail(file, ": tensor '", name, "' uses quant_type '", quant_type, "', expected nf4");

  Nf4Weight w;
  const int64_t blocksize = field("blocksize").as_int(key_ctx("blocksize"));
  if (blocksize <= 0 || blocksize % 2 != 0 || blocksize > (int64_t{1} << 20)) {
    fail(state_ctx, ": blocksize ", blocksize, " is not a positive even number");
  }
  w.blocksize = static_cast<int>(blocksize);
  w.dtype = field("dtype").as_string(key_ctx("dtype"));
  if (!is_state_dtype(w.dtype)) {
    fail(state_ctx, ": dtype '", w.dtype, "' is not supported (float32, bfloat16 or float16)");
  }
  for (const json::Value& d : field("shape").as_array(key_ctx("shape"))) {
    const int64_t dim = d.as_int(key_ctx("shape"));
    if (dim <= 0 || dim > (int64_t{1} << 40)) fail(state_ctx, ": shape ", field("shape").dump(), " is not valid");
    w.shape.push_back(dim);
  }
  if (w.shape.empty()) fail(state_ctx, ": shape is empty");
  int64_t n = 1;
  for (int64_t d : w.shape) {
    if (n > (int64_t{1} << 50) / d) fail(state_ctx, ": shape ", shape_to_string(w.shape), " is too large");
    n *= d;
  }
  const int64_t nblocks = ceil_div(n, blocksize);
  const std::string for_shape =
      " for shape " + shape_to_string(w.shape) + " in blocks of " + std::to_string(blocksize);

  // Packed codes: U8 [ceil(n/2), 1] normally; with bnb_4bit_quant_storage set to another dtype the same bytes are
  // stored under that dtype, so only the byte count is checked.
  const TensorInfo& packed = component(store, name, name);
  const int64_t packed_bytes = ceil_div(n, 2);
  if (static_cast<int64_t>(packed.nbytes) != packed_bytes) {
    fail(file, ": tensor '", name, "' has ", packed.nbytes, " bytes of packed codes, expected ", packed_bytes,
         for_shape);
  }
  const uint8_t* packed_data = store.data(name);
  w.packed.assign(packed_data, packed_data + packed_bytes);

  // quant_map must be NF4's table (we decode with kCodes); a tolerance admits a copy stored in bf16/f16.
  if (store.has(name + ".quant_map")) {
    const TensorInfo& qm = store.info(name + ".quant_map");
    const std::vector<float> codes = read_f32_count(store, qm, 16, " (the NF4 code table)");
    for (int i = 0; i < 16; ++i) {
      if (!(std::fabs(codes[static_cast<size_t>(i)] - nf4::kCodes[i]) <= 1e-3f)) {
        fail(store.file_of(qm.name), ": tensor '", qm.name, "' is not the NF4 code table (value ", i, " is ",
             codes[static_cast<size_t>(i)], ", expected ", nf4::kCodes[i], ")");
      }
    }
  }

  const TensorInfo& absmax = component(store, name, name + ".absmax");
  if (const json::Value* nested_bs = state.find("nested_blocksize")) {
    const int64_t blocksize2 = nested_bs->as_int(key_ctx("nested_blocksize"));
    if (blocksize2 <= 0 || blocksize2 > (int64_t{1} << 20)) {
      fail(state_ctx, ": nested_blocksize ", blocksize2, " is not positive");
    }
    if (const json::Value* nd = state.find("nested_dtype")) {
      const std::string& nested_dtype = nd->as_string(key_ctx("nested_dtype"));
      if (nested_dtype != "float32") fail(state_ctx, ": nested_dtype '", nested_dtype, "' is not supported (float32)");
    }
    // bitsandbytes reads the offset back as a float32 tensor.
    const float offset = static_cast<float>(field("nested_offset").as_number(key_ctx("nested_offset")));

    expect_dtype(store, absmax, DType::U8);
    if (absmax.numel() != nblocks) {
      fail(file, ": tensor '", absmax.name, "' has ", absmax.numel(), " values, expected ", nblocks, for_shape);
    }
    const int64_t nblocks2 = ceil_div(nblocks, blocksize2);
    const std::string nested_why =
        " for " + std::to_string(nblocks) + " block constants in blocks of " + std::to_string(blocksize2);
    const std::vector<float> state2_absmax =
        read_f32_count(store, component(store, name, name + ".nested_absmax"), nblocks2, nested_why);
    const std::vector<float> code2 =
        read_f32_count(store, component(store, name, name + ".nested_quant_map"), 256, " (the 8-bit code table)");
    w.absmax = nf4::double_dequantize(store.data(absmax.name), nblocks, state2_absmax.data(), code2.data(), offset,
                                      static_cast<int>(blocksize2));
    DoubleQuantState nested;
    nested.codes.assign(store.data(absmax.name), store.data(absmax.name) + nblocks);
    nested.state2_absmax = state2_absmax;
    nested.code2 = code2;
    nested.offset = offset;
    nested.blocksize2 = static_cast<int>(blocksize2);
    w.nested = std::move(nested);
  } else {
    expect_dtype(store, absmax, DType::F32);
    w.absmax = read_f32_count(store, absmax, nblocks, for_shape);
  }
  return w;
}

std::vector<float> dequantize_weight(const Nf4Weight& w) {
  std::vector<float> out(static_cast<size_t>(numel_of(w.shape)));
  dequantize_weight_into(w, out.data());
  return out;
}

void dequantize_weight_into(const Nf4Weight& w, float* out) {
  const int64_t n = numel_of(w.shape);
  QLORA_CHECK(static_cast<int64_t>(w.packed.size()) == ceil_div(n, 2), "packed size ", w.packed.size(),
              " for ", n, " values");
  QLORA_CHECK(static_cast<int64_t>(w.absmax.size()) == ceil_div(n, w.blocksize), "absmax size ", w.absmax.size(),
              " for ", n, " values");
  // bitsandbytes' kernel writes code * absmax (fp32) into a tensor of the quant state's dtype.
  QLORA_CHECK(w.dtype == "bfloat16" || w.dtype == "float16" || w.dtype == "float32", "unknown quant state dtype '",
              w.dtype, "'");
  const nf4::Rounding round = w.dtype == "bfloat16" ? round_to_bf16 : w.dtype == "float16" ? round_to_f16 : nullptr;
  nf4::dequantize(w.packed.data(), w.absmax.data(), n, w.blocksize, out, round);
}

namespace {

// One weight's codes and block constants, computed when the writer reaches the first of its tensors that needs them
// and freed after the last, so that a writer holds one quantized weight at a time, not the whole output.
class PendingWeight {
 public:
  // With double quantization, `offset` is the one the quant state was written with (nullopt: none).
  PendingWeight(int64_t n, int blocksize, nf4::BlockLoader load, std::optional<float> offset, int blocksize2)
      : n_(n), blocksize_(blocksize), load_(std::move(load)), offset_(offset), blocksize2_(blocksize2) {}

  const nf4::Blockwise4bit& quantized() {
    compute();
    return *q_;
  }
  const nf4::DoubleQuantized& double_quantized() {
    compute();
    return *dq_;
  }
  void release() {
    q_.reset();
    dq_.reset();
  }

 private:
  void compute() {
    if (q_) return;
    q_ = nf4::quantize_loaded(n_, blocksize_, load_);
    if (!offset_) return;
    dq_ = nf4::double_quantize(q_->absmax, blocksize2_);
    // The quant state, written before the codes existed, holds the offset of the first pass over the weight.
    QLORA_CHECK(dq_->offset == *offset_, "double quantization offset ", dq_->offset, " differs from the planned ",
                *offset_);
  }

  int64_t n_;
  int blocksize_;
  nf4::BlockLoader load_;
  std::optional<float> offset_;
  int blocksize2_;
  std::optional<nf4::Blockwise4bit> q_;
  std::optional<nf4::DoubleQuantized> dq_;
};

}  // namespace

void add_quantized_weight(SafetensorsWriter& writer, const std::string& name, const std::vector<int64_t>& shape,
                          nf4::BlockLoader load, bool double_quant, const std::string& dtype) {
  constexpr int kBlocksize = 64;
  constexpr int kBlocksize2 = 256;
  using Sink = SafetensorsWriter::ByteSink;
  QLORA_CHECK(is_state_dtype(dtype), name, ": unsupported quant state dtype '", dtype, "'");
  const int64_t n = numel_of(shape);
  const int64_t nblocks = ceil_div(n, kBlocksize);
  const std::vector<float> quant_map(nf4::kCodes, nf4::kCodes + 16);
  // The quant state's JSON, whose length the file's header holds, has the mean block constant in it: a first pass
  // over the weight computes the block constants alone for it.
  const std::optional<float> offset =
      double_quant ? std::optional<float>(nf4::double_quant_offset(nf4::absmax_loaded(n, kBlocksize, load)))
                   : std::nullopt;
  const auto pending = std::make_shared<PendingWeight>(n, kBlocksize, std::move(load), offset, kBlocksize2);
  // Same order as safetensors' Python writer (fp32 tensors first, then bytes), each group sorted by name; the last
  // tensor that needs the codes or constants frees them.
  if (double_quant) {
    writer.add_deferred(name + ".nested_absmax", DType::F32, {ceil_div(nblocks, kBlocksize2)},
                        [pending](const Sink& sink) {
                          const nf4::DoubleQuantized& dq = pending->double_quantized();
                          sink(dq.state2_absmax.data(), dq.state2_absmax.size() * sizeof(float));
                        });
    writer.add_f32(name + ".nested_quant_map", {256}, nf4::dynamic_map_signed());
    writer.add_f32(name + ".quant_map", {16}, quant_map);
    writer.add_deferred(name, DType::U8, {ceil_div(n, 2), 1}, [pending](const Sink& sink) {
      const nf4::Blockwise4bit& q = pending->quantized();
      sink(q.packed.data(), q.packed.size());
    });
    writer.add_deferred(name + ".absmax", DType::U8, {nblocks}, [pending](const Sink& sink) {
      const nf4::DoubleQuantized& dq = pending->double_quantized();
      sink(dq.codes.data(), dq.codes.size());
      pending->release();
    });
  } else {
    writer.add_deferred(name + ".absmax", DType::F32, {nblocks}, [pending](const Sink& sink) {
      const nf4::Blockwise4bit& q = pending->quantized();
      sink(q.absmax.data(), q.absmax.size() * sizeof(float));
    });
    writer.add_f32(name + ".quant_map", {16}, quant_map);
    writer.add_deferred(name, DType::U8, {ceil_div(n, 2), 1}, [pending](const Sink& sink) {
      const nf4::Blockwise4bit& q = pending->quantized();
      sink(q.packed.data(), q.packed.size());
      pending->release();
    });
  }
  const std::string state = quant_state_json(shape, dtype, kBlocksize, offset, kBlocksize2);
  writer.add(name + kNf4StateSuffix, DType::U8, {static_cast<int64_t>(state.size())}, state.data(), state.size());
}

void add_quantized_weight(SafetensorsWriter& writer, const std::string& name, const std::vector<int64_t>& shape,
                          const std::vector<float>& values, bool double_quant, const std::string& dtype) {
  QLORA_CHECK(static_cast<int64_t>(values.size()) == numel_of(shape), name, ": ", values.size(),
              " values for shape ", shape_to_string(shape));
  // Held until the writer has written the weight.
  const auto held = std::make_shared<const std::vector<float>>(values);
  add_quantized_weight(
      writer, name, shape,
      [held](int64_t begin, int64_t count, float* out) {
        std::copy(held->data() + begin, held->data() + begin + count, out);
      },
      double_quant, dtype);
}

bool is_quantizable_linear(const std::string& name) {
  // model.layers.<N>.self_attn.{q,k,v,o}_proj.weight | model.layers.<N>.mlp.{gate,up,down}_proj.weight
  size_t pos = 0;
  if (!consume(name, pos, "model.layers.") || !parse_decimal(name, pos) || !consume(name, pos, ".")) return false;
  static const char* const kModules[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj", "mlp.gate_proj",    "mlp.up_proj",
                                         "mlp.down_proj"};
  for (const char* module : kModules) {
    size_t p = pos;
    if (consume(name, p, module) && consume(name, p, ".weight") && p == name.size()) return true;
  }
  return false;
}

namespace {
// The target of --dtype: "" keeps each tensor's stored dtype.
std::optional<DType> parse_target_dtype(const std::string& dtype) {
  if (dtype.empty()) return std::nullopt;
  if (dtype == "float32") return DType::F32;
  if (dtype == "bfloat16") return DType::BF16;
  if (dtype == "float16") return DType::F16;
  fail("dtype '", dtype, "' is not supported (float32, bfloat16, float16)");
}

// Values of a tensor of the file, a block at a time, rounded to `t` as casting the loaded weight to torch_dtype
// rounds them (F32: as stored).
nf4::BlockLoader rounded_loader(const TensorStore& store, const std::string& name, DType t) {
  const TensorInfo& info = store.floating(name);
  const uint8_t* bytes = store.data(name);
  const size_t element = dtype_size(info.dtype);
  const DType stored = info.dtype;
  // Rounding a value to the dtype it is stored in changes nothing (at most a NaN's payload, which quantizes alike).
  if (t == stored) t = DType::F32;
  return [bytes, element, stored, t](int64_t begin, int64_t count, float* out) {
    convert_block_to_f32(stored, bytes + static_cast<size_t>(begin) * element, static_cast<size_t>(count), out);
    if (t == DType::BF16)
      for (int64_t i = 0; i < count; ++i) out[i] = round_to_bf16(out[i]);
    else if (t == DType::F16)
      for (int64_t i = 0; i < count; ++i) out[i] = round_to_f16(out[i]);
  };
}

// A tensor of the file cast to `t`, converted a chunk at a time as the writer reaches it.
void add_cast(SafetensorsWriter& writer, const TensorStore& store, const std::string& name, DType t) {
  const TensorInfo& info = store.floating(name);
  writer.add_deferred(name, t, info.shape, [&store, &info, t](const SafetensorsWriter::ByteSink& sink) {
    constexpr size_t kChunk = size_t{1} << 20;
    const size_t n = static_cast<size_t>(info.numel());
    const uint8_t* bytes = store.data(info.name);
    std::vector<float> values(std::min(n, kChunk));
    for (size_t begin = 0; begin < n; begin += kChunk) {
      const size_t count = std::min(kChunk, n - begin);
      convert_block_to_f32(info.dtype, bytes + begin * dtype_size(info.dtype), count, values.data());
      sink_f32_as(sink, t, values.data(), count);
    }
  });
}
}  // namespace

QuantizeReport quantize_model(const std::string& model_dir, const std::string& out_file, bool double_quant,
                              const std::string& dtype) {
  const std::optional<DType> target = parse_target_dtype(dtype);
  const std::unique_ptr<TensorStore> store = TensorStore::open_dir(model_dir);
  const std::vector<std::string> names = store->names();
  for (const std::string& name : names) {
    if (name.find(".quant_state.") != std::string::npos) fail(model_dir, ": model is already quantized (bnb-4bit)");
  }

  // Each tensor is computed (or copied from the model's mapping) when the writer reaches it: the output is never
  // whole in memory.
  QuantizeReport report;
  SafetensorsWriter writer;
  for (const std::string& name : names) {
    const TensorInfo& info = store->info(name);
    report.bytes_in += static_cast<int64_t>(info.nbytes);
    const DType out_dtype = target && is_floating(info.dtype) ? *target : info.dtype;
    const char* state_dtype = state_dtype_for(out_dtype);
    if (is_quantizable_linear(name)) {
      if (!state_dtype) {
        fail(store->file_of(name), ": tensor '", name, "' has dtype ", dtype_name(info.dtype),
             ", expected F32, BF16 or F16 to quantize");
      }
      if (info.shape.size() != 2) {
        fail(store->file_of(name), ": tensor '", name, "' has shape ", shape_to_string(info.shape),
             ", expected a 2-D linear weight");
      }
      // The quant state records the model's dtype (as loaded): dequantized values come back rounded to it.
      add_quantized_weight(writer, name, info.shape, rounded_loader(*store, name, out_dtype), double_quant,
                           state_dtype);
      ++report.quantized_tensors;
    } else if (out_dtype != info.dtype) {
      add_cast(writer, *store, name, out_dtype);
      ++report.copied_tensors;
    } else {
      writer.add_deferred(name, info.dtype, info.shape, [&store, &info](const SafetensorsWriter::ByteSink& sink) {
        sink(store->data(info.name), info.nbytes);
      });
      ++report.copied_tensors;
    }
  }
  writer.set_metadata("format", "pt");
  writer.write(out_file);
  // Tensor bytes as written (the writer does not expose its entries, so read them back from the new file).
  const std::unique_ptr<SafetensorsFile> written = SafetensorsFile::open(out_file);
  for (const TensorInfo& t : written->tensors()) report.bytes_out += static_cast<int64_t>(t.nbytes);
  return report;
}

}  // namespace qlora::bnb4
