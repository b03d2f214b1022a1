// The Node binding of the engine (node-addon-api). It converts arguments, calls the engine, and turns every C++
// exception into a JS Error whose message is the engine's own (the TS wrapper in extension/engine/ types it).
// Calls are synchronous: the engine only ever runs inside the trainer process, never in the extension host.
#include <napi.h>

#include <cmath>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "backend/backend.h"
#include "cpu/kernels.h"
#include "cuda/cuda_backend.h"
#include "cuda/runtime_probe.h"
#include "binding/binding_util.h"
#include "io/model_config.h"
#include "model/bench_shapes.h"
#include "model/llama.h"
#include "model/lora.h"
#include "model/optimizer.h"
#include "io/safetensors.h"
#include "quant/bnb4.h"
#include "util/error.h"
#include "util/philox.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using namespace qlora;
using namespace qlora::binding;

Napi::Object config_to_js(Napi::Env env, const ModelConfig& c) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("architecture", c.architecture);
  o.Set("modelType", c.model_type);
  o.Set("vocabSize", static_cast<double>(c.vocab_size));
  o.Set("hiddenSize", static_cast<double>(c.hidden_size));
  o.Set("intermediateSize", static_cast<double>(c.intermediate_size));
  o.Set("numLayers", static_cast<double>(c.num_layers));
  o.Set("numHeads", static_cast<double>(c.num_heads));
  o.Set("numKvHeads", static_cast<double>(c.num_kv_heads));
  o.Set("headDim", static_cast<double>(c.head_dim));
  o.Set("rmsNormEps", c.rms_norm_eps);
  o.Set("ropeTheta", c.rope_theta);
  const char* rope = c.rope_scaling.kind == RopeScaling::Kind::Llama3   ? "llama3"
                     : c.rope_scaling.kind == RopeScaling::Kind::Linear ? "linear"
                                                                        : "default";
  o.Set("ropeScaling", rope);
  o.Set("ropeScalingFactor", c.rope_scaling.factor);
  o.Set("ropeLowFreqFactor", c.rope_scaling.low_freq_factor);
  o.Set("ropeHighFreqFactor", c.rope_scaling.high_freq_factor);
  o.Set("ropeOriginalMaxPositionEmbeddings", static_cast<double>(c.rope_scaling.original_max_position_embeddings));
  o.Set("tieWordEmbeddings", c.tie_word_embeddings);
  o.Set("qkvBias", c.qkv_bias);
  o.Set("maxPositionEmbeddings", static_cast<double>(c.max_position_embeddings));
  o.Set("bosTokenId", c.bos_token_id ? Napi::Value(Napi::Number::New(env, static_cast<double>(*c.bos_token_id))) : env.Null());
  Napi::Array eos = Napi::Array::New(env, c.eos_token_ids.size());
  for (size_t i = 0; i < c.eos_token_ids.size(); ++i) eos.Set(i, static_cast<double>(c.eos_token_ids[i]));
  o.Set("eosTokenIds", eos);
  o.Set("dtype", c.dtype);
  o.Set("quantized4bit", c.quantization.has_value() && c.quantization->load_in_4bit);
  return o;
}

Napi::Object memory_to_js(Napi::Env env, const MemoryStats& s) {
  Napi::Object current = Napi::Object::New(env), peak = Napi::Object::New(env), high_water = Napi::Object::New(env);
  for (size_t i = 0; i < static_cast<size_t>(MemCategory::Count); ++i) {
    const char* name = mem_category_name(static_cast<MemCategory>(i));
    current.Set(name, static_cast<double>(s.current[i]));
    peak.Set(name, static_cast<double>(s.peak[i]));
    high_water.Set(name, static_cast<double>(s.at_interval_peak[i]));
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("current", current);
  o.Set("peak", peak);
  o.Set("totalCurrent", static_cast<double>(s.total_current));
  o.Set("totalPeak", static_cast<double>(s.total_peak));
  o.Set("highWater", high_water);
  o.Set("highWaterTotal", static_cast<double>(s.interval_peak_total));
  return o;
}

// ---------------------------------------------------------------------------------------------------------------

class ModelHandle : public Napi::ObjectWrap<ModelHandle> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Model",
                       {InstanceMethod("config", &ModelHandle::Config),
                        InstanceMethod("stored4bit", &ModelHandle::Stored4bit),
                        InstanceMethod("createLora", &ModelHandle::CreateLora),
                        InstanceMethod("loadAdapter", &ModelHandle::LoadAdapter),
                        InstanceMethod("saveAdapter", &ModelHandle::SaveAdapter),
                        InstanceMethod("loraInfo", &ModelHandle::LoraInfo),
                        InstanceMethod("run", &ModelHandle::Run),
                        InstanceMethod("zeroGrad", &ModelHandle::ZeroGrad),
                        InstanceMethod("saveGradients", &ModelHandle::SaveGradients),
                        InstanceMethod("gradNorm", &ModelHandle::GradNorm),
                        InstanceMethod("optimizerStep", &ModelHandle::OptimizerStep),
                        InstanceMethod("saveOptimizerState", &ModelHandle::SaveOptimizerState),
                        InstanceMethod("loadOptimizerState", &ModelHandle::LoadOptimizerState),
                        InstanceMethod("memory", &ModelHandle::Memory),
                        InstanceMethod("beginMemoryInterval", &ModelHandle::BeginMemoryInterval),
                        InstanceMethod("takePageMoves", &ModelHandle::TakePageMoves),
                        InstanceMethod("setProfiling", &ModelHandle::SetProfiling),
                        InstanceMethod("takeProfile", &ModelHandle::TakeProfile),
                        InstanceMethod("generationStart", &ModelHandle::GenerationStart),
                        InstanceMethod("generationAppend", &ModelHandle::GenerationAppend),
                        InstanceMethod("generationTruncate", &ModelHandle::GenerationTruncate),
                        InstanceMethod("generationLength", &ModelHandle::GenerationLength),
                        InstanceMethod("generationEnd", &ModelHandle::GenerationEnd),
                        InstanceMethod("dispose", &ModelHandle::Dispose)});
  }

  // new Model(dir, options) loads a Hugging Face folder; new Model({shape, seed}, options) makes a benchmark shape
  // with random NF4 weights (model/bench_shapes.h).
  explicit ModelHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelHandle>(info) {
    Napi::Env env = info.Env();
    std::optional<std::string> shape;
    uint64_t seed = 0;
    std::string dir;
    if (info.Length() > 0 && info[0].IsObject()) {
      const Napi::Object source = info[0].As<Napi::Object>();
      if (!source.Get("shape").IsString()) throw Napi::TypeError::New(env, "a synthetic model needs {shape: 'tiny' | '1b' | '8b' | '70b'}");
      shape = source.Get("shape").As<Napi::String>().Utf8Value();
      seed = static_cast<uint64_t>(opt_number(source, "seed").value_or(0));
    } else {
      dir = string_arg(info, 0, "model directory");
    }
    const Napi::Object opts = options_arg(info, 1);
    guarded(env, [&] {
      const std::string device = opt_string(opts, "device").value_or("cpu");
      const std::string dtype = opt_string(opts, "computeDtype").value_or("f32");
      if (dtype != "f32" && dtype != "bf16" && dtype != "fp16") fail("computeDtype must be 'f32', 'bf16' or 'fp16', got '", dtype, "'");
      if (device == "cuda") {
        CudaBackendOptions co;
        co.library_dir = opt_string(opts, "cudaLibraryDir").value_or("");
        co.compute = dtype == "bf16" ? GpuCompute::BF16 : dtype == "fp16" ? GpuCompute::F16 : GpuCompute::F32;
        backend_ = make_cuda_backend(co);
      } else if (device == "cpu") {
        if (dtype != "f32") fail("the CPU computes in fp32 only (computeDtype '", dtype, "' is for the GPU)");
        backend_ = make_cpu_backend();
      } else {
        fail("device must be 'cpu' or 'cuda', got '", device, "'");
      }
      // The budget bounds every engine allocation; the paged optimizer moves its pages to host memory to stay under.
      const std::optional<double> budget = opt_number(opts, "memoryBudget");
      if (budget) {
        if (!(*budget >= 0)) fail("memoryBudget must be a number of bytes >= 0, got ", *budget);
        backend_->set_memory_budget(static_cast<int64_t>(*budget));
      }
      if (shape) {
        model_ = LlamaModel::synthetic(backend_.get(), bench_shape(*shape), seed);
        return 0;
      }
      LoadOptions lo;
      lo.quantize_nf4 = opt_bool(opts, "quantize").value_or(false);
      model_ = LlamaModel::load(backend_.get(), dir, lo);
      return 0;
    });
  }

 private:
  LlamaModel& model(Napi::Env env) {
    if (!model_) throw Napi::Error::New(env, "the model was disposed");
    return *model_;
  }
  LoraAdapter& adapter(Napi::Env env) {
    if (!adapter_) throw Napi::Error::New(env, "no LoRA adapter: call createLora or loadAdapter first");
    return *adapter_;
  }

  Napi::Value Config(const Napi::CallbackInfo& info) { return config_to_js(info.Env(), model(info.Env()).config()); }
  Napi::Value Stored4bit(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), model(info.Env()).stored_4bit());
  }

  Napi::Value CreateLora(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const Napi::Object o = options_arg(info, 0);
    LoraConfig lc;
    lc.rank = static_cast<int64_t>(opt_number(o, "rank").value_or(8));
    lc.alpha = opt_number(o, "alpha").value_or(16);
    lc.dropout = opt_number(o, "dropout").value_or(0);
    lc.use_rslora = opt_bool(o, "useRslora").value_or(false);
    Napi::Value targets = o.Get("targets");
    if (targets.IsArray()) {
      lc.targets.clear();
      Napi::Array arr = targets.As<Napi::Array>();
      for (uint32_t i = 0; i < arr.Length(); ++i) {
        const std::string name = arr.Get(i).ToString().Utf8Value();
        const auto m = module_from_name(name);
        if (!m) throw Napi::Error::New(env, "unknown LoRA target module '" + name +
                                                "' (known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
        lc.targets.push_back(*m);
      }
    }
    const uint64_t seed = static_cast<uint64_t>(opt_number(o, "seed").value_or(0));
    guarded(env, [&] {
      optimizer_.reset();
      sessions_.clear();
      adapter_ = LoraAdapter::create(backend_.get(), model(env).config(), lc, seed);
      return 0;
    });
    return env.Undefined();
  }

  Napi::Value LoadAdapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string dir = string_arg(info, 0, "adapter directory");
    guarded(env, [&] {
      optimizer_.reset();
      sessions_.clear();
      adapter_ = LoraAdapter::load_peft(backend_.get(), model(env).config(), dir);
      return 0;
    });
    return env.Undefined();
  }

  Napi::Value SaveAdapter(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string dir = string_arg(info, 0, "adapter directory");
    const std::string base = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "";
    guarded(env, [&] {
      adapter(env).save_peft(dir, base);
      return 0;
    });
    return env.Undefined();
  }

  Napi::Value LoraInfo(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!adapter_) return env.Null();
    const LoraConfig& lc = adapter_->config();
    Napi::Object o = Napi::Object::New(env);
    o.Set("rank", static_cast<double>(lc.rank));
    o.Set("alpha", lc.alpha);
    o.Set("dropout", lc.dropout);
    o.Set("useRslora", lc.use_rslora);
    o.Set("scale", lc.scale());
    Napi::Array targets = Napi::Array::New(env, lc.targets.size());
    for (size_t i = 0; i < lc.targets.size(); ++i) targets.Set(i, module_name(lc.targets[i]));
    o.Set("targets", targets);
    o.Set("parameters", static_cast<double>(adapter_->num_parameters()));
    return o;
  }

  // run(ids: Int32Array, labels: Int32Array | null, batch, seq, options)
  Napi::Value Run(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 4 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
      throw Napi::TypeError::New(env, "run(ids: Int32Array, labels: Int32Array | null, batch, seq, options)");
    Napi::Int32Array ids = info[0].As<Napi::Int32Array>();
    const int64_t batch = info[2].As<Napi::Number>().Int64Value();
    const int64_t seq = info[3].As<Napi::Number>().Int64Value();
    if (batch <= 0 || seq <= 0 || static_cast<int64_t>(ids.ElementLength()) != batch * seq)
      throw Napi::RangeError::New(env, "ids must hold batch * seq token ids");
    const int32_t* labels = ids.Data();
    if (info[1].IsTypedArray()) {
      Napi::Int32Array l = info[1].As<Napi::Int32Array>();
      if (l.ElementLength() != ids.ElementLength()) throw Napi::RangeError::New(env, "labels must have the length of ids");
      labels = l.Data();
    }
    const Napi::Object o = options_arg(info, 4);
    RunOptions ro;
    ro.compute_grads = opt_bool(o, "computeGrads").value_or(false);
    ro.gradient_checkpointing = opt_bool(o, "gradientCheckpointing").value_or(true);
    ro.offload_block_inputs = opt_whole(o, "offloadBlockInputs").value_or(0);
    ro.grad_normalizer = opt_number(o, "gradNormalizer").value_or(0);
    ro.training = opt_bool(o, "training").value_or(false);
    ro.seed = static_cast<uint64_t>(opt_number(o, "seed").value_or(0));
    ro.step = static_cast<uint32_t>(opt_number(o, "step").value_or(0));
    ro.micro_batch = static_cast<uint32_t>(opt_number(o, "microBatch").value_or(0));
    ro.want_logprobs = opt_bool(o, "logprobs").value_or(false);
    ro.want_log_softmax = opt_bool(o, "logSoftmax").value_or(false);
    ro.loss_scale = opt_number(o, "lossScale").value_or(1.0);
    if (!(ro.loss_scale > 0.0) || !std::isfinite(ro.loss_scale))
      throw Napi::RangeError::New(env, "lossScale must be a positive finite number");
    RunResult r = guarded(env, [&] {
      return model(env).run(ids.Data(), labels, batch, seq, adapter_.get(), ro);
    });
    Napi::Object out = Napi::Object::New(env);
    out.Set("lossSum", r.loss_sum);
    out.Set("labelled", static_cast<double>(r.labelled));
    if (ro.want_logprobs) {
      Napi::Float64Array lp = Napi::Float64Array::New(env, r.logprobs.size());
      for (size_t i = 0; i < r.logprobs.size(); ++i) lp[i] = r.logprobs[i];
      out.Set("logprobs", lp);
    }
    if (ro.want_log_softmax) {
      Napi::Float32Array ls = Napi::Float32Array::New(env, r.log_softmax.size());
      std::copy(r.log_softmax.begin(), r.log_softmax.end(), ls.Data());
      out.Set("logSoftmax", ls);
    }
    return out;
  }

  Napi::Value ZeroGrad(const Napi::CallbackInfo& info) {
    adapter(info.Env()).zero_grad();
    return info.Env().Undefined();
  }

  Napi::Value SaveGradients(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string path = string_arg(info, 0, "gradient file path");
    guarded(env, [&] {
      adapter(env).save_gradients(path);
      return 0;
    });
    return env.Undefined();
  }

  Napi::Value GradNorm(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Napi::Number::New(env, AdamW::global_grad_norm(backend_.get(), &adapter(env)));
  }

  Napi::Value OptimizerStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const Napi::Object o = options_arg(info, 0);
    AdamWOptions ao;
    ao.lr = opt_number(o, "lr").value_or(ao.lr);
    ao.beta1 = opt_number(o, "beta1").value_or(ao.beta1);
    ao.beta2 = opt_number(o, "beta2").value_or(ao.beta2);
    ao.eps = opt_number(o, "eps").value_or(ao.eps);
    ao.weight_decay = opt_number(o, "weightDecay").value_or(ao.weight_decay);
    ao.max_grad_norm = opt_number(o, "maxGradNorm").value_or(ao.max_grad_norm);
    ao.loss_scale = opt_number(o, "lossScale").value_or(ao.loss_scale);
    ao.skip_non_finite = opt_bool(o, "skipNonFinite").value_or(ao.skip_non_finite);
    StepReport rep = guarded(env, [&] { return optimizer(env).step(ao); });
    Napi::Object out = Napi::Object::New(env);
    out.Set("gradNorm", rep.grad_norm);
    out.Set("clipped", rep.clipped);
    out.Set("step", static_cast<double>(rep.step));
    out.Set("skipped", rep.skipped);
    return out;
  }

  AdamW& optimizer(Napi::Env env) {
    if (!optimizer_) optimizer_ = std::make_unique<AdamW>(backend_.get(), &adapter(env));
    return *optimizer_;
  }

  Napi::Value SaveOptimizerState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string path = string_arg(info, 0, "optimizer state path");
    guarded(env, [&] {
      optimizer(env).save(path);
      return 0;
    });
    return env.Undefined();
  }

  Napi::Value LoadOptimizerState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string path = string_arg(info, 0, "optimizer state path");
    guarded(env, [&] {
      optimizer(env).load(path);
      return 0;
    });
    return env.Undefined();
  }

  Napi::Value Memory(const Napi::CallbackInfo& info) { return memory_to_js(info.Env(), backend_->memory()); }
  // Starts a new high-water interval: the trainer calls it after each memory report.
  Napi::Value BeginMemoryInterval(const Napi::CallbackInfo& info) {
    backend_->begin_memory_interval();
    return info.Env().Undefined();
  }

  // takePageMoves() -> [{dir: 'out' | 'in', tensor, bytes, ms}]: the moves of the paged optimizer and of offloaded
  // activations since the last call, oldest first.
  Napi::Value TakePageMoves(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::vector<PageMove> moves = backend_->take_page_moves();
    Napi::Array out = Napi::Array::New(env, moves.size());
    for (size_t i = 0; i < moves.size(); ++i) {
      Napi::Object m = Napi::Object::New(env);
      m.Set("dir", moves[i].dir == PageDir::Out ? "out" : "in");
      m.Set("tensor", moves[i].tensor);
      m.Set("bytes", static_cast<double>(moves[i].bytes));
      m.Set("ms", moves[i].ms);
      out.Set(i, m);
    }
    return out;
  }

  // setProfiling(on): time every kernel and GEMM on the GPU (no effect on the CPU).
  Napi::Value SetProfiling(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsBoolean()) throw Napi::TypeError::New(info.Env(), "setProfiling takes a boolean");
    backend_->set_profiling(info[0].As<Napi::Boolean>().Value());
    return info.Env().Undefined();
  }

  // takeProfile() -> [{op, calls, ms}]: device time by op since the last call, the most first ([] on the CPU).
  Napi::Value TakeProfile(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::vector<OpTime> profile = guarded(env, [&] { return backend_->take_profile(); });
    Napi::Array out = Napi::Array::New(env, profile.size());
    for (size_t i = 0; i < profile.size(); ++i) {
      Napi::Object t = Napi::Object::New(env);
      t.Set("op", profile[i].op);
      t.Set("calls", static_cast<double>(profile[i].calls));
      t.Set("ms", profile[i].ms);
      out.Set(i, t);
    }
    return out;
  }

  // ---- generation sessions: KV caches held here, so that replacing the adapter ends them (their keys and values
  // came from the old one) and nothing outlives the model.

  // generationStart({ loraScale }) -> session id
  Napi::Value GenerationStart(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    model(env);
    const Napi::Object o = options_arg(info, 0);
    auto cache = std::make_unique<KvCache>();
    cache->lora_scale = opt_number(o, "loraScale").value_or(adapter_ ? 1.0 : 0.0);
    if (cache->lora_scale != 0.0 && !adapter_)
      throw Napi::Error::New(env, "a generation with loraScale " + std::to_string(cache->lora_scale) +
                                      " needs a LoRA adapter: load one first, or use loraScale 0 for the base model");
    const int64_t id = next_session_++;
    sessions_[id] = std::move(cache);
    return Napi::Number::New(env, static_cast<double>(id));
  }

  KvCache& session(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "a generation session id is required");
    const int64_t id = info[0].As<Napi::Number>().Int64Value();
    auto it = sessions_.find(id);
    if (it == sessions_.end())
      throw Napi::Error::New(env, "generation session " + std::to_string(id) +
                                      " no longer exists (it was ended, or the adapter was replaced)");
    return *it->second;
  }

  // generationAppend(id, ids: Int32Array, { allLogits }) -> Float32Array logits
  Napi::Value GenerationAppend(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    KvCache& cache = session(info);
    if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
      throw Napi::TypeError::New(env, "generationAppend(id, ids: Int32Array, options)");
    Napi::Int32Array ids = info[1].As<Napi::Int32Array>();
    const bool all = opt_bool(options_arg(info, 2), "allLogits").value_or(false);
    LoraAdapter* adapter = cache.lora_scale != 0.0 ? adapter_.get() : nullptr;
    std::vector<float> logits = guarded(env, [&] {
      return model(env).decode(ids.Data(), static_cast<int64_t>(ids.ElementLength()), cache, adapter, all);
    });
    Napi::Float32Array out = Napi::Float32Array::New(env, logits.size());
    std::copy(logits.begin(), logits.end(), out.Data());
    return out;
  }

  Napi::Value GenerationTruncate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    KvCache& cache = session(info);
    if (info.Length() < 2 || !info[1].IsNumber()) throw Napi::TypeError::New(env, "generationTruncate(id, length)");
    const int64_t length = info[1].As<Napi::Number>().Int64Value();
    if (length < 0 || length > cache.length)
      throw Napi::RangeError::New(env, "cannot truncate a generation of " + std::to_string(cache.length) +
                                           " tokens to " + std::to_string(length));
    cache.length = length;
    return env.Undefined();
  }

  Napi::Value GenerationLength(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(session(info).length));
  }

  Napi::Value GenerationEnd(const Napi::CallbackInfo& info) {
    if (info.Length() >= 1 && info[0].IsNumber()) sessions_.erase(info[0].As<Napi::Number>().Int64Value());
    return info.Env().Undefined();
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    sessions_.clear();
    optimizer_.reset();
    adapter_.reset();
    model_.reset();
    return info.Env().Undefined();
  }

  // Destruction order matters: everything allocated through the backend goes before it.
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<LoraAdapter> adapter_;
  std::unique_ptr<AdamW> optimizer_;
  std::map<int64_t, std::unique_ptr<KvCache>> sessions_;
  int64_t next_session_ = 1;
};

// ---------------------------------------------------------------------------------------------------------------

Napi::Value Version(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), "0.1.0"); }

Napi::Value EngineInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("backends", Napi::Array::New(env));
  Napi::Array backends = o.Get("backends").As<Napi::Array>();
  backends.Set(0u, "cpu");
  if (qlora::cuda::compiled()) backends.Set(1u, "cuda");
  // What the CUDA backend computes in (fp16 with the trainer's dynamic loss scaling).
  Napi::Array dtypes = Napi::Array::New(env);
  if (qlora::cuda::compiled()) {
    dtypes.Set(0u, "f32");
    dtypes.Set(1u, "bf16");
    dtypes.Set(2u, "fp16");
  }
  o.Set("cudaComputeDtypes", dtypes);
  o.Set("cudaCompiled", qlora::cuda::compiled());
  o.Set("cpuVectorCode", qlora::cpu::vector_code());
#ifdef _OPENMP
  o.Set("threads", omp_get_max_threads());
#else
  o.Set("threads", static_cast<double>(std::thread::hardware_concurrency()));
#endif
  return o;
}

Napi::Value ReadModelConfig(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string dir = string_arg(info, 0, "model directory");
  return guarded(env, [&] { return config_to_js(env, load_model_config(dir)); });
}

Napi::Value QuantizeModel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string dir = string_arg(info, 0, "model directory");
  const std::string out = string_arg(info, 1, "output file");
  const bool double_quant = info.Length() > 2 && info[2].IsBoolean() ? info[2].As<Napi::Boolean>().Value() : true;
  const std::string dtype = info.Length() > 3 && info[3].IsString() ? info[3].As<Napi::String>().Utf8Value() : "";
  const bnb4::QuantizeReport r = guarded(env, [&] { return bnb4::quantize_model(dir, out, double_quant, dtype); });
  Napi::Object o = Napi::Object::New(env);
  o.Set("quantizedTensors", static_cast<double>(r.quantized_tensors));
  o.Set("copiedTensors", static_cast<double>(r.copied_tensors));
  o.Set("bytesIn", static_cast<double>(r.bytes_in));
  o.Set("bytesOut", static_cast<double>(r.bytes_out));
  return o;
}

// randomNormal(seed, count): standard normals from the engine's counter-based generator (stream TinyModelInit),
// so fixture models are the same on every machine.
Napi::Value RandomNormal(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsNumber() || !info[1].IsNumber())
    throw Napi::TypeError::New(env, "randomNormal(seed: number, count: number)");
  const uint64_t seed = static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value());
  const int64_t count = info[1].As<Napi::Number>().Int64Value();
  if (count < 0) throw Napi::RangeError::New(env, "count must be >= 0");
  const Philox rng(seed, RngStream::TinyModelInit);
  Napi::Float32Array out = Napi::Float32Array::New(env, static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) out[static_cast<size_t>(i)] = rng.normal(static_cast<uint64_t>(i));
  return out;
}

// writeSafetensors(path, tensors: {name, dtype: 'F32' | 'BF16' | 'F16', shape, data: Float32Array}[], metadata?)
// Values arrive as fp32 and are rounded to the requested dtype; the file is written atomically.
Napi::Value WriteSafetensors(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string path = string_arg(info, 0, "output path");
  if (info.Length() < 2 || !info[1].IsArray()) throw Napi::TypeError::New(env, "tensors must be an array");
  Napi::Array tensors = info[1].As<Napi::Array>();
  SafetensorsWriter writer;
  guarded(env, [&] {
    for (uint32_t i = 0; i < tensors.Length(); ++i) {
      Napi::Object t = tensors.Get(i).As<Napi::Object>();
      const std::string name = t.Get("name").ToString().Utf8Value();
      const std::string dtype = t.Get("dtype").ToString().Utf8Value();
      Napi::Array shape_js = t.Get("shape").As<Napi::Array>();
      std::vector<int64_t> shape;
      int64_t numel = 1;
      for (uint32_t d = 0; d < shape_js.Length(); ++d) {
        shape.push_back(shape_js.Get(d).As<Napi::Number>().Int64Value());
        numel *= shape.back();
      }
      Napi::Float32Array data = t.Get("data").As<Napi::Float32Array>();
      if (static_cast<int64_t>(data.ElementLength()) != numel)
        fail("tensor '", name, "': ", data.ElementLength(), " values for shape ", shape_to_string(shape));
      if (dtype == "F32") {
        writer.add(name, DType::F32, shape, data.Data(), static_cast<size_t>(numel) * 4);
      } else if (dtype == "BF16" || dtype == "F16") {
        std::vector<uint16_t> half(static_cast<size_t>(numel));
        for (int64_t j = 0; j < numel; ++j)
          half[j] = dtype == "BF16" ? f32_to_bf16(data[static_cast<size_t>(j)]) : f32_to_f16(data[static_cast<size_t>(j)]);
        writer.add(name, dtype == "BF16" ? DType::BF16 : DType::F16, shape, half.data(), half.size() * 2);
      } else {
        fail("tensor '", name, "': dtype '", dtype, "' cannot be written (F32, BF16, F16)");
      }
    }
    if (info.Length() > 2 && info[2].IsObject()) {
      Napi::Object meta = info[2].As<Napi::Object>();
      Napi::Array keys = meta.GetPropertyNames();
      for (uint32_t k = 0; k < keys.Length(); ++k) {
        const std::string key = keys.Get(k).ToString().Utf8Value();
        writer.set_metadata(key, meta.Get(key).ToString().Utf8Value());
      }
    }
    writer.write(path);
    return 0;
  });
  return env.Undefined();
}

}  // namespace

// Defined in tools_binding.cpp: merge and memory estimation; in gpu_binding.cpp: the GPU probe.
void register_tools(Napi::Env env, Napi::Object exports);
void register_gpu(Napi::Env env, Napi::Object exports);

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("version", Napi::Function::New(env, Version));
  exports.Set("engineInfo", Napi::Function::New(env, EngineInfo));
  exports.Set("readModelConfig", Napi::Function::New(env, ReadModelConfig));
  exports.Set("quantizeModel", Napi::Function::New(env, QuantizeModel));
  exports.Set("randomNormal", Napi::Function::New(env, RandomNormal));
  exports.Set("writeSafetensors", Napi::Function::New(env, WriteSafetensors));
  exports.Set("Model", ModelHandle::Define(env));
  register_tools(env, exports);
  register_gpu(env, exports);
  return exports;
}

NODE_API_MODULE(qlora_native, Init)
