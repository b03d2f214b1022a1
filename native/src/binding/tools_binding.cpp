// Bindings of the engine's whole-model tools (merge, memory estimate, GGUF block quantizers). Kept apart from
// addon.cpp, which binds the training model; errors follow its convention (JS Error with the engine's message and
// code "QLORA_ENGINE").
#include <napi.h>

#include <memory>
#include <optional>
#include <string>

#include "backend/backend.h"
#include "binding/binding_util.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/bench_shapes.h"
#include "model/estimate.h"
#include "model/lora.h"
#include "model/merge.h"
#include "quant/bnb4.h"
#include "quant/ggml_quants.h"

namespace {

using namespace qlora;
using namespace qlora::binding;

// A positive whole number option (sizes and counts).
std::optional<int64_t> opt_count(const Napi::Object& o, const char* key) {
  const std::optional<double> v = opt_number(o, key);
  if (!v) return std::nullopt;
  if (!(*v >= 1) || *v != static_cast<double>(static_cast<int64_t>(*v)))
    throw Napi::RangeError::New(o.Env(), std::string(key) + " must be a positive integer");
  return static_cast<int64_t>(*v);
}

// mergeWeights(modelDir, adapterDir, folder, dtype, maxShardBytes?) -> {shards, tensors, bytes, files}
Napi::Value MergeWeights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string model_dir = string_arg(info, 0, "model directory");
  const std::string adapter_dir = string_arg(info, 1, "adapter directory");
  const std::string folder = string_arg(info, 2, "output folder");
  const std::string dtype = string_arg(info, 3, "dtype");
  int64_t max_shard_bytes = kDefaultMaxShardBytes;
  if (info.Length() > 4 && !info[4].IsUndefined() && !info[4].IsNull()) {
    if (!info[4].IsNumber()) throw Napi::TypeError::New(env, "maxShardBytes must be a number");
    const double v = info[4].As<Napi::Number>().DoubleValue();
    if (!(v >= 1) || v != static_cast<double>(static_cast<int64_t>(v)))
      throw Napi::RangeError::New(env, "maxShardBytes must be a positive integer");
    max_shard_bytes = static_cast<int64_t>(v);
  }
  const MergeReport r =
      guarded(env, [&] { return merge_weights(model_dir, adapter_dir, folder, dtype, max_shard_bytes); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("shards", static_cast<double>(r.shards));
  o.Set("tensors", static_cast<double>(r.tensors));
  o.Set("bytes", static_cast<double>(r.bytes));
  Napi::Array files = Napi::Array::New(env, r.files.size());
  for (size_t i = 0; i < r.files.size(); ++i) files.Set(static_cast<uint32_t>(i), r.files[i]);
  o.Set("files", files);
  return o;
}

// estimateMemory(modelDir | {shape}, {batch, seq, rank, targets, quantize, gradientCheckpointing, optimizer,
// offloadBlockInputs, loraDropout, device, computeDtype}) -> {categories, peakTotal, loraParameters, optimizerPageBytes,
// activationPageBytes, offloadableActivationBytes, hostBytes, stored4bit, config}. Reads config.json only.
Napi::Value EstimateMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // a model folder, or {shape} of a benchmark shape
  const bool synthetic = info.Length() > 0 && info[0].IsObject();
  const std::string dir = synthetic ? "" : string_arg(info, 0, "model directory");
  Napi::Object opts = Napi::Object::New(env);
  if (info.Length() > 1 && !info[1].IsUndefined() && !info[1].IsNull()) {
    if (!info[1].IsObject()) throw Napi::TypeError::New(env, "options must be an object");
    opts = info[1].As<Napi::Object>();
  }
  EstimateOptions eo;
  eo.batch = opt_count(opts, "batch").value_or(eo.batch);
  eo.seq = opt_count(opts, "seq").value_or(eo.seq);
  eo.rank = opt_count(opts, "rank").value_or(eo.rank);
  eo.quantize_nf4 = opt_bool(opts, "quantize").value_or(eo.quantize_nf4);
  eo.gradient_checkpointing = opt_bool(opts, "gradientCheckpointing").value_or(eo.gradient_checkpointing);
  eo.with_optimizer = opt_bool(opts, "optimizer").value_or(eo.with_optimizer);
  eo.offload_block_inputs = opt_whole(opts, "offloadBlockInputs").value_or(eo.offload_block_inputs);
  eo.lora_dropout = opt_number(opts, "loraDropout").value_or(eo.lora_dropout);
  eo.cuda = opt_string(opts, "device").value_or("cpu") == "cuda";
  const std::string dtype = opt_string(opts, "computeDtype").value_or("f32");
  eo.compute = !eo.cuda ? GpuCompute::F32 : dtype == "bf16" ? GpuCompute::BF16 : dtype == "fp16" ? GpuCompute::F16 : GpuCompute::F32;
  Napi::Value targets = opts.Get("targets");
  if (!targets.IsUndefined() && !targets.IsNull()) {
    if (!targets.IsArray()) throw Napi::TypeError::New(env, "targets must be an array of module names");
    Napi::Array arr = targets.As<Napi::Array>();
    eo.targets.clear();
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      const std::string name = arr.Get(i).ToString().Utf8Value();
      const auto m = module_from_name(name);
      if (!m)
        throw Napi::Error::New(env, "unknown LoRA target module '" + name +
                                        "' (known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
      eo.targets.push_back(*m);
    }
  }
  ModelConfig c = guarded(env, [&] {
    return synthetic ? bench_shape(info[0].As<Napi::Object>().Get("shape").ToString().Utf8Value()) : load_model_config(dir);
  });
  eo.stored_4bit = c.quantization.has_value() && c.quantization->load_in_4bit;
  if (eo.stored_4bit) {
    // The tensors, not config.json, say whether the block constants are double-quantized (the loader goes by them):
    // the first quantized linear has a nested state or not; and which linears stay dense (LlamaModel::load). Reading
    // the headers maps no weights.
    guarded(env, [&] {
      const auto store = TensorStore::open_dir(dir);
      bool nesting_known = false;
      for (int64_t layer = 0; layer < c.num_layers; ++layer) {
        for (int mi = 0; mi < kNumModules; ++mi) {
          const Module m = static_cast<Module>(mi);
          const std::string name = module_path(layer, m) + ".weight";
          if (!bnb4::is_quantized(*store, name)) {
            eo.stored_dense_linears.insert({layer, m});
          } else if (!nesting_known) {
            c.quantization->double_quant = store->has(name + ".nested_absmax");
            nesting_known = true;
          }
        }
      }
      return 0;
    });
  }
  const MemoryEstimate e = guarded(env, [&] { return estimate_memory(c, eo); });

  Napi::Object categories = Napi::Object::New(env);
  for (size_t i = 0; i < static_cast<size_t>(MemCategory::Count); ++i)
    categories.Set(mem_category_name(static_cast<MemCategory>(i)), static_cast<double>(e.bytes[i]));
  Napi::Object config = Napi::Object::New(env);
  config.Set("architecture", c.architecture);
  config.Set("modelType", c.model_type);
  config.Set("numLayers", static_cast<double>(c.num_layers));
  config.Set("hiddenSize", static_cast<double>(c.hidden_size));
  config.Set("intermediateSize", static_cast<double>(c.intermediate_size));
  config.Set("numHeads", static_cast<double>(c.num_heads));
  config.Set("numKvHeads", static_cast<double>(c.num_kv_heads));
  config.Set("headDim", static_cast<double>(c.head_dim));
  config.Set("vocabSize", static_cast<double>(c.vocab_size));
  config.Set("tieWordEmbeddings", c.tie_word_embeddings);
  config.Set("dtype", c.dtype);
  Napi::Object o = Napi::Object::New(env);
  o.Set("categories", categories);
  o.Set("peakTotal", static_cast<double>(e.peak_total));
  o.Set("loraParameters", static_cast<double>(e.lora_parameters));
  o.Set("optimizerPageBytes", static_cast<double>(e.optimizer_page_bytes));
  o.Set("activationPageBytes", static_cast<double>(e.activation_page_bytes));
  o.Set("offloadableActivationBytes", static_cast<double>(e.offloadable_activation_bytes));
  o.Set("hostBytes", static_cast<double>(e.host_bytes));
  o.Set("stored4bit", eo.stored_4bit);
  o.Set("config", config);
  return o;
}

ggml::GgmlType ggml_type_arg(const Napi::CallbackInfo& info, size_t i) {
  const std::string name = string_arg(info, i, "type");
  const std::optional<ggml::GgmlType> t = ggml::type_from_name(name);
  if (!t)
    throw Napi::TypeError::New(info.Env(),
                               "unknown ggml type '" + name + "' (known: f32, f16, bf16, q8_0, q4_k, q6_k)");
  return *t;
}

// A non-negative whole number argument (rows, cols).
int64_t size_arg(const Napi::CallbackInfo& info, size_t i, const char* what) {
  if (info.Length() <= i || !info[i].IsNumber())
    throw Napi::TypeError::New(info.Env(), std::string(what) + " must be a number");
  const double v = info[i].As<Napi::Number>().DoubleValue();
  if (!(v >= 0) || v > 9007199254740991.0 || v != static_cast<double>(static_cast<int64_t>(v)))
    throw Napi::RangeError::New(info.Env(), std::string(what) + " must be a non-negative integer");
  return static_cast<int64_t>(v);
}

// Bytes of one row; a cols that is not a multiple of the type's block size is a RangeError naming both.
size_t ggml_row_bytes_arg(const Napi::Env& env, ggml::GgmlType t, int64_t cols) {
  try {
    return ggml::row_bytes(t, cols);
  } catch (const std::exception& e) {
    throw Napi::RangeError::New(env, e.what());
  }
}

// A typed array of `length` elements for a result: a view of the start of argument `index` when one is given (it
// must be of `type` and at least that long), else a new one. Reusing one array from tensor to tensor saves zeroing
// and faulting in fresh memory for each.
template <typename Array>
Array typed_array_into(const Napi::CallbackInfo& info, size_t index, napi_typedarray_type type, size_t length,
                       const char* what) {
  Napi::Env env = info.Env();
  if (info.Length() <= index || info[index].IsUndefined()) return Array::New(env, length);
  if (!info[index].IsTypedArray() || info[index].As<Napi::TypedArray>().TypedArrayType() != type)
    throw Napi::TypeError::New(env, std::string(what) + " must be a " +
                                        (type == napi_float32_array ? "Float32Array" : "Uint8Array"));
  const Array into = info[index].As<Array>();
  if (into.ElementLength() < length)
    throw Napi::RangeError::New(env, std::string(what) + " has " + std::to_string(into.ElementLength()) +
                                         " elements, fewer than the " + std::to_string(length) + " needed");
  return Array::New(env, length, into.ArrayBuffer(), into.ByteOffset());
}

// ggmlQuantize(type, data: Float32Array, rows, cols[, into: Uint8Array]) -> Uint8Array of rows * rowBytes(type, cols)
// bytes in ggml's block layout (a view of `into`'s first bytes when it holds them). Works on a whole tensor or any
// range of its rows.
Napi::Value GgmlQuantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ggml::GgmlType t = ggml_type_arg(info, 0);
  if (info.Length() <= 1 || !info[1].IsTypedArray() ||
      info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, "data must be a Float32Array");
  Napi::Float32Array data = info[1].As<Napi::Float32Array>();
  const int64_t rows = size_arg(info, 2, "rows"), cols = size_arg(info, 3, "cols");
  const size_t rb = ggml_row_bytes_arg(env, t, cols);
  if (static_cast<double>(data.ElementLength()) != static_cast<double>(rows) * static_cast<double>(cols))
    throw Napi::RangeError::New(env, "data has " + std::to_string(data.ElementLength()) +
                                         " values, expected rows * cols = " + std::to_string(rows) + " * " +
                                         std::to_string(cols));
  const size_t bytes = static_cast<size_t>(rows) * rb;
  Napi::Uint8Array out = typed_array_into<Napi::Uint8Array>(info, 4, napi_uint8_array, bytes, "into");
  guarded(env, [&] { ggml::quantize(t, data.Data(), out.Data(), rows, cols); });
  return out;
}

// ggmlDequantize(type, bytes: Uint8Array, rows, cols) -> Float32Array of rows * cols values, as llama.cpp decodes them.
Napi::Value GgmlDequantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ggml::GgmlType t = ggml_type_arg(info, 0);
  if (info.Length() <= 1 || !info[1].IsTypedArray() ||
      info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
    throw Napi::TypeError::New(env, "bytes must be a Uint8Array");
  Napi::Uint8Array bytes = info[1].As<Napi::Uint8Array>();
  const int64_t rows = size_arg(info, 2, "rows"), cols = size_arg(info, 3, "cols");
  const size_t rb = ggml_row_bytes_arg(env, t, cols);
  if (static_cast<double>(bytes.ElementLength()) != static_cast<double>(rows) * static_cast<double>(rb))
    throw Napi::RangeError::New(env, "bytes has " + std::to_string(bytes.ElementLength()) + " bytes, expected " +
                                         std::to_string(rows) + " rows of " + std::to_string(rb) + " bytes (" +
                                         ggml::type_name(t) + ", " + std::to_string(cols) + " columns)");
  Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(rows * cols));
  guarded(env, [&] { ggml::dequantize(t, bytes.Data(), out.Data(), rows, cols); });
  return out;
}

// new MergedWeights(modelDir, adapterDir): the merge of an adapter into its base model in float32, planned and
// checked; tensors() -> [{name, shape}] in the order merge writes them; values(name) -> Float32Array of one merged
// tensor; close() unmaps the base model. For the GGUF export, which converts the tensors one at a time.
class MergedWeightsHandle : public Napi::ObjectWrap<MergedWeightsHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "MergedWeights",
                       {InstanceMethod("tensors", &MergedWeightsHandle::Tensors),
                        InstanceMethod("values", &MergedWeightsHandle::Values),
                        InstanceMethod("close", &MergedWeightsHandle::Close)});
  }

  explicit MergedWeightsHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<MergedWeightsHandle>(info) {
    const std::string model_dir = string_arg(info, 0, "model directory");
    const std::string adapter_dir = string_arg(info, 1, "adapter directory");
    plan_ = guarded(info.Env(), [&] { return std::make_unique<MergePlan>(model_dir, adapter_dir, "float32"); });
  }

 private:
  const MergePlan& open(const Napi::Env& env) const {
    if (!plan_) throw Napi::Error::New(env, "the merged weights were closed");
    return *plan_;
  }

  Napi::Value Tensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::vector<MergePlan::Tensor>& tensors = open(env).tensors();
    Napi::Array out = Napi::Array::New(env, tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      Napi::Object t = Napi::Object::New(env);
      t.Set("name", tensors[i].name);
      Napi::Array shape = Napi::Array::New(env, tensors[i].shape.size());
      for (size_t d = 0; d < tensors[i].shape.size(); ++d)
        shape.Set(static_cast<uint32_t>(d), static_cast<double>(tensors[i].shape[d]));
      t.Set("shape", shape);
      out.Set(static_cast<uint32_t>(i), t);
    }
    return out;
  }

  Napi::Value Values(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string name = string_arg(info, 0, "tensor name");
    const MergePlan& plan = open(env);
    const MergePlan::Tensor* t = plan.find(name);
    if (!t) throw Napi::Error::New(env, "the merged model has no tensor '" + name + "'");
    // computed into memory V8 allocates (Electron's Node refuses buffers made outside its heap's sandbox), so that
    // one copy of the tensor is held: the caller's `into` where it holds the values
    const size_t n = static_cast<size_t>(numel_of(t->shape));
    Napi::Float32Array out = typed_array_into<Napi::Float32Array>(info, 1, napi_float32_array, n, "into");
    guarded(env, [&] { plan.merged_values_into(*t, out.Data()); });
    return out;
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    plan_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<MergePlan> plan_;
};

}  // namespace

void register_tools(Napi::Env env, Napi::Object exports) {
  exports.Set("MergedWeights", MergedWeightsHandle::Define(env));
  exports.Set("mergeWeights", Napi::Function::New(env, MergeWeights));
  exports.Set("estimateMemory", Napi::Function::New(env, EstimateMemory));
  exports.Set("ggmlQuantize", Napi::Function::New(env, GgmlQuantize));
  exports.Set("ggmlDequantize", Napi::Function::New(env, GgmlDequantize));
}
