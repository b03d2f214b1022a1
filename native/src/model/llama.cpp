#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "io/dtype.h"
#include "io/safetensors.h"
#include "model/hidden_states.h"
#include "model/rope.h"
#include "quant/bnb4.h"
#include "quant/nf4.h"
#include "util/error.h"
#include "util/philox.h"

namespace qlora {

// ----------------------------------------------------------------------------------------------------------------
// Buffers

// What one block keeps from its forward for its backward (all [rows, features] with rows = batch * seq).
struct LlamaModel::BlockActivations {
  const float* x_in = nullptr;
  DeviceArray<float> xn1, rstd1, q, k, v, lse, attn, h, xn2, rstd2, g, u, m;
  std::array<DeviceArray<float>, kNumModules> lora_t;  // drop(x)·A^T per adapted module, [rows, r]
  // xn1's, xn2's and m's 16-bit copies, written in their own bytes by the forward that keeps them for backward
  // (gemm_input_writing) and shared until backward's GEMMs have read them; g and u held in 16 bits
  // (Backend::begin_half_activation) until backward's GEMMs have read the gradients written in their place; m's
  // gradient held so (in m's bytes) where one GEMM writes it, until SwiGLU's backward has read it.
  // Declared after the buffers they live in, so that they end first.
  std::optional<SharedGemmInput> xn1_16, xn2_16, m_16, g_16, u_16, dm_16;
  HalfRowBuffers half;  // which buffers hold 16-bit rows alone

  // floats that hold rows x cols values, or their 16-bit rows with `room` beside each
  static int64_t floats(int64_t rows, int64_t cols, bool half_rows, int64_t room) {
    return half_rows ? (rows * (cols + room) + 1) / 2 : rows * cols;
  }
  void allocate(Backend* b, const ModelConfig& c, int64_t batch, int64_t seq, const LoraAdapter* adapter,
                const HalfRowBuffers& half_rows) {
    const int64_t n = batch * seq;
    const auto cat = MemCategory::Activations;
    half = half_rows;
    xn1.reset(b, floats(n, c.hidden_size, half.xn, half.room), cat);
    rstd1.reset(b, n, cat);
    q.reset(b, n * c.num_heads * c.head_dim, cat);
    k.reset(b, n * c.num_kv_heads * c.head_dim, cat);
    v.reset(b, n * c.num_kv_heads * c.head_dim, cat);
    lse.reset(b, batch * c.num_heads * seq, cat);  // attention's log-sum-exp per query row and head
    attn.reset(b, n * c.num_heads * c.head_dim, cat);
    h.reset(b, n * c.hidden_size, cat);
    xn2.reset(b, floats(n, c.hidden_size, half.xn, half.room), cat);
    rstd2.reset(b, n, cat);
    g.reset(b, floats(n, c.intermediate_size, half.g, half.room), cat);
    u.reset(b, floats(n, c.intermediate_size, half.u, half.room), cat);
    m.reset(b, floats(n, c.intermediate_size, half.m, half.room), cat);
    if (adapter)
      for (Module mod : adapter->config().targets)
        lora_t[static_cast<int>(mod)].reset(b, n * adapter->config().rank, cat);
  }
};

// Scratch shared by all blocks of one run.
struct LlamaModel::Workspace {
  DeviceArray<uint8_t> weight;  // one dequantized base weight at a time, in the backend's gemm_weight_format
  DeviceArray<float> absmax;    // its block constants restored, for a dequantization into fp32
  // The base weights a block's forward dequantizes for its backward to read again (keeps_weight): q k v o gate up,
  // whose recomputed forward runs right before their backward. Each in the forward's rows (B's columns beside W)
  // with room below for backward's rows of A; kept_layer: the layer whose weight it holds (-1 none).
  std::array<DeviceArray<uint16_t>, kNumModules> kept;
  std::array<int64_t, kNumModules> kept_layer{-1, -1, -1, -1, -1, -1, -1};
  int64_t keeping_for = -1;  // the layer whose forward is dequantizing into `kept` (its backward is next to come)
  DeviceArray<float> cos, sin;
  DeviceArray<float> dropx, lora_dt;
  // backward scratch (the gradients of the MLP's intermediates overwrite their saved activations)
  DeviceArray<float> dxn, dh, dattn, dq, dk, dv;
  // LM head
  DeviceArray<float> xf, rstdf, logits;
  DeviceArray<int32_t> targets;  // of every row, and their log-probs, on the device
  DeviceArray<double> logprobs;
  float* dxf = nullptr;  // the final norm's output gradient: the backward pass's second gradient buffer, free then
  int64_t logits_rows = 0;
};

namespace {

constexpr int32_t kIgnoreLabel = -100;  // transformers' ignore_index

FloatFormat round_to_for_dtype(const std::string& dtype, const std::string& context) {
  if (dtype == "float32") return FloatFormat::F32;
  if (dtype == "bfloat16") return FloatFormat::BF16;
  if (dtype == "float16") return FloatFormat::F16;
  fail(context, ": quant state dtype '", dtype, "' is not supported (float32, bfloat16, float16)");
}

FloatFormat float_format_of(DType t) {
  return t == DType::BF16 ? FloatFormat::BF16 : t == DType::F16 ? FloatFormat::F16 : FloatFormat::F32;
}

std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

// A frozen matrix from fp32 values that are exact in `format` (dequantized and rounded to it), stored in it.
DenseWeight dense_from_values(Backend* backend, const std::vector<float>& values, FloatFormat format) {
  DenseWeight w;
  w.format = format;
  const int64_t n = static_cast<int64_t>(values.size());
  w.bytes.reset(backend, n * float_format_bytes(format), MemCategory::Weights);
  if (format == FloatFormat::F32) {
    w.bytes.upload(reinterpret_cast<const uint8_t*>(values.data()), n * static_cast<int64_t>(sizeof(float)));
    return w;
  }
  std::vector<uint16_t> half(values.size());
  for (size_t i = 0; i < values.size(); ++i)
    half[i] = format == FloatFormat::BF16 ? f32_to_bf16(values[i]) : f32_to_f16(values[i]);
  w.bytes.upload(reinterpret_cast<const uint8_t*>(half.data()), n * 2);
  return w;
}

int64_t max_double_quant_blocks(const std::vector<LayerWeights>& layers) {
  int64_t most = 0;
  for (const LayerWeights& lw : layers)
    for (const FrozenLinear& fl : lw.linear)
      if (fl.double_quantized()) most = std::max(most, fl.blocks());
  return most;
}

void upload_double_quant(Backend* backend, FrozenLinear& fl, const bnb4::DoubleQuantState& dq) {
  const auto w = MemCategory::Weights;
  fl.absmax_codes.reset(backend, static_cast<int64_t>(dq.codes.size()), w);
  fl.absmax_codes.upload(dq.codes);
  fl.absmax2.reset(backend, static_cast<int64_t>(dq.state2_absmax.size()), w);
  fl.absmax2.upload(dq.state2_absmax);
  fl.absmax_map.reset(backend, static_cast<int64_t>(dq.code2.size()), w);
  fl.absmax_map.upload(dq.code2);
  fl.absmax_offset = dq.offset;
  fl.absmax_blocksize2 = dq.blocksize2;
}

// A dense weight of the file quantized to NF4 in blocks of 64 straight from its stored bytes, each block converted
// to fp32 on its own (a whole fp32 copy of an 8B model's MLP weight is 234 MB written, faulted in and read again).
nf4::Blockwise4bit quantize_stored(const TensorStore& store, const std::string& name, const std::vector<int64_t>& shape) {
  const TensorInfo& t = store.floating(name, shape);
  const uint8_t* bytes = store.data(name);
  const size_t element = dtype_size(t.dtype);
  return nf4::quantize_loaded(t.numel(), 64, [&](int64_t begin, int64_t count, float* out) {
    convert_block_to_f32(t.dtype, bytes + static_cast<size_t>(begin) * element, static_cast<size_t>(count), out);
  });
}

// Dropout elements of each (micro-batch, layer, module) come from their own range of the dropout stream.
uint64_t dropout_offset(uint32_t micro_batch, int64_t layer, Module m) {
  return ((static_cast<uint64_t>(micro_batch) * 4096 + static_cast<uint64_t>(layer)) * kNumModules +
          static_cast<uint64_t>(m))
         << 36;
}

// Where the model keeps its embedding table: in host memory where the backend wants it there and it is not also
// the LM head (tied), which the device's GEMMs read whole.
bool embedding_kept_on_host(const Backend* backend, const ModelConfig& c) {
  return backend->keeps_embedding_on_host() && !c.tie_word_embeddings;
}

}  // namespace

// ----------------------------------------------------------------------------------------------------------------
// Loading

std::unique_ptr<LlamaModel> LlamaModel::load(Backend* backend, const std::string& dir, const LoadOptions& options) {
  std::unique_ptr<LlamaModel> model(new LlamaModel());
  model->backend_ = backend;
  model->dir_ = dir;
  model->config_ = load_model_config(dir);
  const ModelConfig& c = model->config_;
  std::unique_ptr<TensorStore> store = TensorStore::open_dir(dir);
  bool reads_in_place = false;  // whether a dense weight is read from the mapping (then the model keeps it)
  // What is copied or quantized out of the mapping is released (TensorStore::release) once it is, so that the
  // process does not keep the file's pages resident beside the copies (while it loads, and after where the mapping
  // stays for weights read in place).
  const std::vector<std::string> names = store->names();  // sorted
  auto release_with_prefix = [&](const std::string& prefix) {
    for (auto it = std::lower_bound(names.begin(), names.end(), prefix);
         it != names.end() && it->compare(0, prefix.size(), prefix) == 0; ++it)
      store->release(*it);
  };

  auto load_dense = [&](const std::string& name, std::vector<int64_t> shape) {
    DeviceArray<float> out(backend, shape.size() == 1 ? shape[0] : shape[0] * shape[1], MemCategory::Weights);
    out.upload(store->read_f32(name, shape));
    return out;
  };
  // a frozen matrix as its file stores it (an F64 tensor narrowed to fp32, into `narrowed`): its format and bytes
  struct Stored {
    FloatFormat format;
    const uint8_t* bytes;
    size_t size;
    bool in_file;  // bytes are the file mapping's (not narrowed)
  };
  auto stored = [&](const std::string& name, const std::vector<int64_t>& shape, std::vector<float>& narrowed) {
    const TensorInfo& t = store->floating(name, shape);
    if (t.dtype != DType::F64) return Stored{float_format_of(t.dtype), store->data(name), t.nbytes, true};
    narrowed = store->read_f32(name);
    return Stored{FloatFormat::F32, reinterpret_cast<const uint8_t*>(narrowed.data()), narrowed.size() * sizeof(float), false};
  };
  auto load_stored = [&](const std::string& name, std::vector<int64_t> shape) {
    std::vector<float> narrowed;
    const Stored s = stored(name, shape, narrowed);
    DenseWeight w;
    w.format = s.format;
    // in place where the backend reads the mapping and the bytes are aligned to their values (safetensors does not
    // require it; a copy where they are not)
    if (backend->reads_file_mappings() && s.in_file &&
        reinterpret_cast<uintptr_t>(s.bytes) % static_cast<uintptr_t>(float_format_bytes(s.format)) == 0) {
      w.mapped = count_bytes_of(backend, s.bytes, static_cast<int64_t>(s.size), MemCategory::Weights);
      reads_in_place = true;
      return w;
    }
    w.bytes.reset(backend, static_cast<int64_t>(s.size), MemCategory::Weights);
    w.bytes.upload(s.bytes, static_cast<int64_t>(s.size));
    if (s.in_file) store->release(name);
    return w;
  };
  // in host memory, where the backend keeps an untied embedding table: read from the mapping, where a step gathers
  // its rows (1 GiB of Llama-3-8B's in bf16 that no copy holds)
  auto load_host = [&](const std::string& name, std::vector<int64_t> shape) {
    std::vector<float> narrowed;
    const Stored s = stored(name, shape, narrowed);
    HostMatrix w;
    w.format = s.format;
    if (s.in_file) {
      w.mapped = s.bytes;
      reads_in_place = true;
    } else {
      w.bytes.assign(s.bytes, s.bytes + s.size);
    }
    return w;
  };

  if (embedding_kept_on_host(backend, c))
    model->embed_host_ = load_host("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  else
    model->embed_ = load_stored("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  model->final_norm_ = load_dense("model.norm.weight", {c.hidden_size});
  if (!c.tie_word_embeddings) {
    const std::string name = "lm_head.weight";
    if (bnb4::is_quantized(*store, name)) {
      // transformers quantizes the LM head too when llm_int8_skip_modules is given without it; bitsandbytes
      // dequantizes it in every forward, into its quant state's dtype: here once, into that dtype
      const bnb4::Nf4Weight w = bnb4::read_weight(*store, name);
      if (w.shape != std::vector<int64_t>{c.vocab_size, c.hidden_size})
        fail(store->file_of(name), ": tensor '", name, "' has shape ", shape_to_string(w.shape), ", expected ",
             shape_to_string({c.vocab_size, c.hidden_size}));
      model->lm_head_ = dense_from_values(backend, bnb4::dequantize_weight(w),
                                          round_to_for_dtype(w.dtype, store->file_of(name) + ": tensor '" + name + "'"));
      release_with_prefix(name);
    } else {
      model->lm_head_ = load_stored(name, {c.vocab_size, c.hidden_size});
    }
  }
  // A bnb-4bit checkpoint's linears without a quant state were left in 16 bits on purpose (llm_int8_skip_modules:
  // unsloth's dynamic 4-bit models keep the layers that quantize worst), and transformers keeps them so: they are
  // used as stored, not quantized here.
  const bool quantize_dense_linears = options.quantize_nf4 && !(c.quantization && c.quantization->load_in_4bit);

  model->layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    LayerWeights& lw = model->layers_[layer];
    const std::string prefix = layer_prefix(layer);
    lw.attn_norm = load_dense(prefix + "input_layernorm.weight", {c.hidden_size});
    lw.mlp_norm = load_dense(prefix + "post_attention_layernorm.weight", {c.hidden_size});
    for (int mi = 0; mi < kNumModules; ++mi) {
      const Module m = static_cast<Module>(mi);
      const auto shape = module_shape(c, m);
      const std::string name = module_path(layer, m) + ".weight";
      FrozenLinear& fl = lw.linear[mi];
      fl.out = shape[0];
      fl.in = shape[1];
      if (bnb4::is_quantized(*store, name)) {
        const bnb4::Nf4Weight w = bnb4::read_weight(*store, name);
        if (w.shape != std::vector<int64_t>{shape[0], shape[1]})
          fail(store->file_of(name), ": tensor '", name, "' has shape ", shape_to_string(w.shape), ", expected ",
               shape_to_string({shape[0], shape[1]}));
        fl.packed.reset(backend, static_cast<int64_t>(w.packed.size()), MemCategory::Weights);
        fl.packed.upload(w.packed);
        fl.blocksize = w.blocksize;
        if (w.nested) {
          upload_double_quant(backend, fl, *w.nested);
        } else {
          fl.absmax.reset(backend, static_cast<int64_t>(w.absmax.size()), MemCategory::Weights);
          fl.absmax.upload(w.absmax);
        }
        fl.round_to = round_to_for_dtype(w.dtype, store->file_of(name) + ": tensor '" + name + "'");
        model->stored_4bit_ = true;
        release_with_prefix(name);  // the codes and their quant state
      } else if (quantize_dense_linears) {
        const nf4::Blockwise4bit q = quantize_stored(*store, name, {shape[0], shape[1]});
        store->release(name);
        // Double quantization, as QLoRA stores it: the block constants themselves go through 8 bits.
        nf4::DoubleQuantized dq = nf4::double_quantize(q.absmax, 256);
        fl.packed.reset(backend, static_cast<int64_t>(q.packed.size()), MemCategory::Weights);
        fl.packed.upload(q.packed);
        bnb4::DoubleQuantState state;
        state.codes = std::move(dq.codes);
        state.state2_absmax = std::move(dq.state2_absmax);
        state.code2 = nf4::dynamic_map_signed();
        state.offset = dq.offset;
        state.blocksize2 = 256;
        upload_double_quant(backend, fl, state);
        fl.round_to = float_format_of(store->info(name).dtype);
      } else {
        fl.dense = load_stored(name, {shape[0], shape[1]});
      }
      if (module_has_bias(c, m)) fl.bias = load_dense(module_path(layer, m) + ".bias", {shape[0]});
    }
  }
  model->max_double_quant_blocks_ = max_double_quant_blocks(model->layers_);
  if (reads_in_place) model->mapping_ = std::move(store);
  return model;
}

namespace {

// Fills device memory with `n` values made on the host in chunks (a whole 70B embedding never sits on the host).
template <typename T, typename Make>
void fill_in_chunks(Backend* backend, T* device, int64_t n, Make make) {
  constexpr int64_t kChunk = int64_t{1} << 22;
  std::vector<T> chunk(static_cast<size_t>(std::min(n, kChunk)));
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t count = std::min(kChunk, n - start);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) chunk[static_cast<size_t>(i)] = make(start + i);
    backend->upload(device + start, chunk.data(), static_cast<size_t>(count) * sizeof(T));
  }
}

// Makes n random elements, kPerBlock of them from each Philox block (four words), each block computed once: element
// i is make(words of block first_block + i / kPerBlock, i % kPerBlock); each chunk of them goes to emit(start of the
// chunk, its elements, their count). Returns the blocks used, so that the next tensor takes the generator's blocks
// after them.
template <typename T, int64_t kPerBlock, typename Make, typename Emit>
uint64_t make_from_philox(int64_t n, const Philox& rng, uint64_t first_block, Make make, Emit emit) {
  constexpr int64_t kChunk = int64_t{1} << 22;
  static_assert(kChunk % kPerBlock == 0, "chunks start on a block");
  std::vector<T> chunk(static_cast<size_t>(std::min(n, kChunk)));
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t count = std::min(kChunk, n - start);
    const int64_t blocks = (count + kPerBlock - 1) / kPerBlock;
    const uint64_t chunk_block = first_block + static_cast<uint64_t>(start / kPerBlock);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const std::array<uint32_t, 4> words = rng.block(chunk_block + static_cast<uint64_t>(b));
      for (int64_t lane = 0; lane < kPerBlock && b * kPerBlock + lane < count; ++lane)
        chunk[static_cast<size_t>(b * kPerBlock + lane)] = make(words, lane);
    }
    emit(start, chunk.data(), count);
  }
  return static_cast<uint64_t>((n + kPerBlock - 1) / kPerBlock);
}

// make_from_philox into device memory.
template <typename T, int64_t kPerBlock, typename Make>
uint64_t fill_from_philox(Backend* backend, T* device, int64_t n, const Philox& rng, uint64_t first_block, Make make) {
  return make_from_philox<T, kPerBlock>(n, rng, first_block, make, [&](int64_t start, const T* chunk, int64_t count) {
    backend->upload(device + start, chunk, static_cast<size_t>(count) * sizeof(T));
  });
}

// Random bytes, sixteen from a block.
uint64_t fill_random_bytes(Backend* backend, uint8_t* device, int64_t n, const Philox& rng, uint64_t first_block) {
  return fill_from_philox<uint8_t, 16>(backend, device, n, rng, first_block, [](const std::array<uint32_t, 4>& w, int64_t lane) {
    return static_cast<uint8_t>(w[static_cast<size_t>(lane / 4)] >> (8 * (lane % 4)));
  });
}

}  // namespace

std::unique_ptr<LlamaModel> LlamaModel::synthetic(Backend* backend, const ModelConfig& config, uint64_t seed) {
  std::unique_ptr<LlamaModel> model(new LlamaModel());
  model->backend_ = backend;
  model->dir_ = "synthetic";
  model->config_ = config;
  const ModelConfig& c = model->config_;
  const Philox rng(seed, RngStream::BenchWeights);
  uint64_t next_block = 0;  // each tensor takes its own range of the generator's blocks
  // uniform on [-a, a] with a = 0.02 * sqrt(3): the 0.02 standard deviation of Llama's initialization
  // bf16, as the checkpoints of these shapes store their embeddings
  auto random_bf16 = [](const std::array<uint32_t, 4>& w, int64_t lane) {
    const float u = philox_uniform(w[static_cast<size_t>(lane)]);
    return f32_to_bf16((u * 2.0f - 1.0f) * 0.0346410f);
  };
  auto random_dense = [&](int64_t n) {
    DenseWeight out;
    out.format = FloatFormat::BF16;
    out.bytes.reset(backend, 2 * n, MemCategory::Weights);
    next_block += fill_from_philox<uint16_t, 4>(backend, reinterpret_cast<uint16_t*>(out.bytes.get()), n, rng,
                                                next_block, random_bf16);
    return out;
  };
  // the same numbers in host memory (an embedding kept there)
  auto random_host = [&](int64_t n) {
    HostMatrix out;
    out.format = FloatFormat::BF16;
    out.bytes.resize(static_cast<size_t>(2 * n));
    auto* values = reinterpret_cast<uint16_t*>(out.bytes.data());
    next_block += make_from_philox<uint16_t, 4>(n, rng, next_block, random_bf16,
                                                [&](int64_t start, const uint16_t* chunk, int64_t count) {
                                                  std::copy(chunk, chunk + count, values + start);
                                                });
    return out;
  };
  auto ones = [&](int64_t n) {
    DeviceArray<float> out(backend, n, MemCategory::Weights);
    fill_in_chunks(backend, out.get(), n, [](int64_t) { return 1.0f; });
    return out;
  };
  if (embedding_kept_on_host(backend, c))
    model->embed_host_ = random_host(c.vocab_size * c.hidden_size);
  else
    model->embed_ = random_dense(c.vocab_size * c.hidden_size);
  model->final_norm_ = ones(c.hidden_size);
  if (!c.tie_word_embeddings) model->lm_head_ = random_dense(c.vocab_size * c.hidden_size);
  model->layers_.resize(static_cast<size_t>(c.num_layers));
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    LayerWeights& lw = model->layers_[layer];
    lw.attn_norm = ones(c.hidden_size);
    lw.mlp_norm = ones(c.hidden_size);
    for (int mi = 0; mi < kNumModules; ++mi) {
      const auto shape = module_shape(c, static_cast<Module>(mi));
      FrozenLinear& fl = lw.linear[mi];
      fl.out = shape[0];
      fl.in = shape[1];
      fl.blocksize = 64;
      fl.round_to = FloatFormat::BF16;
      const int64_t n = shape[0] * shape[1];
      fl.packed.reset(backend, (n + 1) / 2, MemCategory::Weights);
      next_block += fill_random_bytes(backend, fl.packed.get(), (n + 1) / 2, rng, next_block);
      // Double-quantized block constants, as QLoRA stores them: 0.05 +- 0.01 (a block's largest |w| of 0.02-spread
      // weights is about 2.5 standard deviations), one random 8-bit code each.
      const int64_t blocks = fl.blocks();
      fl.absmax_codes.reset(backend, blocks, MemCategory::Weights);
      next_block += fill_random_bytes(backend, fl.absmax_codes.get(), blocks, rng, next_block);
      fl.absmax2.reset(backend, (blocks + fl.absmax_blocksize2 - 1) / fl.absmax_blocksize2, MemCategory::Weights);
      fill_in_chunks(backend, fl.absmax2.get(), fl.absmax2.size(), [](int64_t) { return 0.01f; });
      fl.absmax_map.reset(backend, 256, MemCategory::Weights);
      fl.absmax_map.upload(nf4::dynamic_map_signed());
      fl.absmax_offset = 0.05f;
      if (module_has_bias(c, static_cast<Module>(mi))) fl.bias = ones(shape[0]);
    }
  }
  model->max_double_quant_blocks_ = max_double_quant_blocks(model->layers_);
  return model;
}

// ----------------------------------------------------------------------------------------------------------------
// Linear layers with LoRA: y = x W^T + b + s (drop(x) A^T) B^T

bool LlamaModel::restores_block_constants() const {
  // only nf4_dequantize into fp32 takes them restored; the 16-bit dequantization and the few-row products restore
  // them as they read them
  return max_double_quant_blocks_ > 0 && backend_->gemm_weight_format() == FloatFormat::F32;
}

const float* LlamaModel::block_constants(const FrozenLinear& w, Workspace& ws) {
  if (!w.double_quantized()) return w.absmax.get();
  backend_->absmax_dequantize(w.absmax_codes.get(), w.blocks(), w.absmax2.get(), w.absmax_map.get(), w.absmax_offset,
                              w.absmax_blocksize2, ws.absmax.get());
  return ws.absmax.get();
}

namespace {
// An NF4 weight as the few-row products read it in place.
Nf4Weight nf4_weight(const FrozenLinear& w) {
  Nf4Weight v;
  v.packed = w.packed.get();
  if (w.double_quantized()) {
    v.absmax_codes = w.absmax_codes.get();
    v.absmax2 = w.absmax2.get();
    v.absmax_map = w.absmax_map.get();
    v.absmax_offset = w.absmax_offset;
    v.absmax_blocksize2 = w.absmax_blocksize2;
  } else {
    v.absmax = w.absmax.get();
  }
  v.blocksize = w.blocksize;
  v.out = w.out;
  v.in = w.in;
  return v;
}
}  // namespace

StoredMatrix LlamaModel::base_weight(const FrozenLinear& w, Workspace& ws) {
  if (!w.quantized()) return w.dense.view();
  const FloatFormat format = backend_->gemm_weight_format();
  if (format == FloatFormat::F32)
    backend_->nf4_dequantize(w.packed.get(), block_constants(w, ws), w.out * w.in, w.blocksize, w.round_to,
                             reinterpret_cast<float*>(ws.weight.get()));
  else
    dequantize_rows(w, ws, 0);
  return {ws.weight.get(), format};
}

uint16_t* LlamaModel::dequantize_rows(const FrozenLinear& w, Workspace& ws, int64_t extra_columns) {
  return dequantize_rows_into(w, reinterpret_cast<uint16_t*>(ws.weight.get()), extra_columns);
}

uint16_t* LlamaModel::dequantize_rows_into(const FrozenLinear& w, uint16_t* rows, int64_t extra_columns) {
  backend_->nf4_dequantize_16(nf4_weight(w), w.round_to, backend_->gemm_weight_format(), w.in, w.in + extra_columns,
                              rows);
  return rows;
}

int64_t LlamaModel::weight_workspace_bytes(const LoraAdapter* adapter) const {
  const int64_t lora_columns = adapter ? backend_->lora_fused_columns(adapter->config().rank) : 0;
  return max_linear_size(config_, lora_columns) * float_format_bytes(backend_->gemm_weight_format());
}

void LlamaModel::linear_forward(int64_t layer, Module m, LoraAdapter* adapter, const float* x, int64_t rows, float* y,
                                float* lora_t, Workspace& ws, const RunOptions& opt) {
  const FrozenLinear& w = layers_[layer].linear[static_cast<int>(m)];
  const int64_t lora_columns = fused_lora_columns(layer, m, adapter, rows, opt);
  SharedGemmInput shared_x(backend_, x, rows, w.in, lora_columns);  // the base GEMM and LoRA's down projection read x
  // LoRA's down projection first: with dropout it rounds drop(x) to 16 bits for its GEMM, before the base GEMM makes
  // x's shared copy (the two would otherwise be alive at once)
  const LoraParam* p = lora_down(layer, m, adapter, x, rows, lora_t, ws, opt);
  const float lora_scale = p ? static_cast<float>(adapter->config().scale() * opt.lora_scale) : 0.0f;
  if (w.quantized() && rows <= kNf4MatmulMaxRows) {
    // generation: read the 4-bit weights once instead of writing out their dequantized copy, the block constants,
    // bias and LoRA's up projection in the same pass (the same numbers)
    FewRowsAddends add;
    add.bias = w.bias.empty() ? nullptr : w.bias.get();
    if (p) {
      add.lora_t = lora_t;
      add.lora_b = p->b.get();
      add.rank = adapter->config().rank;
      add.lora_scale = lora_scale;
    }
    backend_->nf4_matmul_nt(x, rows, nf4_weight(w), w.round_to, add, y);
    return;
  }
  if (lora_columns > 0) {  // LoRA's up projection inside the base GEMM: y written once
    const int mi = static_cast<int>(m);
    uint16_t* w_rows = nullptr;
    if (ws.keeping_for == layer && !ws.kept[static_cast<size_t>(mi)].empty()) {  // its backward reads it again
      w_rows = dequantize_rows_into(w, ws.kept[static_cast<size_t>(mi)].get(), lora_columns);
      ws.kept_layer[static_cast<size_t>(mi)] = layer;
    } else {
      w_rows = dequantize_rows(w, ws, lora_columns);
    }
    backend_->gemm_with_lora_up(rows, w.out, w.in, x, w_rows, adapter->config().rank, lora_t, p->b.get(), lora_scale,
                                y);
  } else {
    backend_->gemm_stored(false, true, rows, w.out, w.in, 1.0f, x, base_weight(w, ws), 0.0f, y);
  }
  if (!w.bias.empty()) backend_->add_bias_rows(y, w.bias.get(), rows, w.out);
  if (p && lora_columns == 0)
    backend_->gemm(false, true, rows, w.out, adapter->config().rank, lora_scale, lora_t, p->b.get(), 1.0f, y);
}

int64_t LlamaModel::fused_lora_columns(int64_t layer, Module m, const LoraAdapter* adapter, int64_t rows,
                                       const RunOptions& opt) const {
  const FrozenLinear& w = layers_[layer].linear[static_cast<int>(m)];
  // an NF4 weight dequantized for a GEMM (generation's few rows read it in place; a dense one is used as stored)
  if (!adapter || opt.lora_scale == 0.0 || !adapter->param(layer, m) || !w.quantized() || rows <= kNf4MatmulMaxRows)
    return 0;
  return backend_->lora_fused_columns(adapter->config().rank);
}

int64_t LlamaModel::shared_lora_columns(int64_t layer, std::initializer_list<Module> readers,
                                        const LoraAdapter* adapter, int64_t rows, const RunOptions& opt) const {
  int64_t columns = 0;
  for (Module m : readers) columns = std::max(columns, fused_lora_columns(layer, m, adapter, rows, opt));
  return columns;
}

int64_t LlamaModel::dy_lora_columns(int64_t layer, Module m, const LoraAdapter* adapter, int64_t rows,
                                    const RunOptions& opt) const {
  const bool drop = adapter && opt.training && adapter->config().dropout > 0.0;
  return drop ? 0 : fused_lora_columns(layer, m, adapter, rows, opt);
}

const LoraParam* LlamaModel::lora_down(int64_t layer, Module m, LoraAdapter* adapter, const float* x, int64_t rows,
                                       float* lora_t, Workspace& ws, const RunOptions& opt) {
  const LoraParam* p = adapter && opt.lora_scale != 0.0 ? adapter->param(layer, m) : nullptr;
  if (!p) return nullptr;
  const LoraConfig& lc = adapter->config();
  const int64_t in = layers_[layer].linear[static_cast<int>(m)].in;
  const float* xin = x;
  if (opt.training && lc.dropout > 0.0) {
    backend_->dropout(x, rows * in, static_cast<float>(lc.dropout), opt.seed, opt.step,
                      dropout_offset(opt.micro_batch, layer, m), ws.dropx.get());
    xin = ws.dropx.get();
  }
  if (rows <= kNf4MatmulMaxRows)  // generation: one launch on the GPU, the same numbers
    backend_->gemm_few_rows_nt(xin, rows, p->a.get(), lc.rank, in, lora_t);
  else
    backend_->gemm(false, true, rows, lc.rank, in, 1.0f, xin, p->a.get(), 0.0f, lora_t);
  return p;
}

void LlamaModel::linear_backward(int64_t layer, Module m, LoraAdapter* adapter, const float* x, const float* lora_t,
                                 const float* dy, int64_t rows, float* dx, bool accumulate_dx, Workspace& ws,
                                 const RunOptions& opt, std::optional<SharedGemmInput>* x_share,
                                 std::optional<SharedGemmInput>* dx_hold, bool dx_half_rows) {
  const FrozenLinear& w = layers_[layer].linear[static_cast<int>(m)];
  LoraParam* p = adapter ? adapter->param(layer, m) : nullptr;
  const bool drop = p && opt.training && adapter->config().dropout > 0.0;
  // Without dropout (whose mask applies to LoRA's term alone) a fusing backend computes dx = [dy | dt] [W ; A] in one
  // GEMM, last, with dy's 16-bit copy shared by the four GEMMs that read dy.
  const int64_t lora_columns = dy_lora_columns(layer, m, adapter, rows, opt);
  auto not_held = [&] {
    fail("layer ", layer, ": the input gradient of ", module_name(m),
         " has a buffer of 16-bit rows but would not be held in 16 bits");
  };
  if (dx_half_rows && (lora_columns == 0 || accumulate_dx || !dx_hold)) not_held();  // before any write to dx
  // dx = dy W (+ LoRA's term). Accumulating, the base term goes first, as it always has; otherwise last, so that dx
  // may be x's own buffer (x is read only before dx is first written). The sums are the same either way: the base
  // and LoRA terms are added once, in either order.
  const bool base_first = accumulate_dx || !p;
  // dy feeds up to three GEMMs: the base term, dB and dt. Shared until dA's GEMM, which reads x's 16-bit copy (the
  // block's shared one, or its own) or drop(x)'s: two row-wide copies beside dy's would raise the peak. A base term
  // that comes last converts dy again. The fused GEMM reads dy's copy last, so it stays.
  SharedGemmInput shared_dy(backend_, dy, rows, w.out, lora_columns);
  if (base_first && lora_columns == 0)
    backend_->gemm_stored(false, false, rows, w.in, w.out, 1.0f, dy, base_weight(w, ws), accumulate_dx ? 1.0f : 0.0f,
                          dx);
  if (!p) return;
  const LoraConfig& lc = adapter->config();
  const float s = static_cast<float>(lc.scale());
  const uint64_t offset = dropout_offset(opt.micro_batch, layer, m);
  const float dropout_p = static_cast<float>(lc.dropout);
  // dB += s dy^T t
  backend_->gemm(true, false, w.out, lc.rank, rows, s, dy, lora_t, 1.0f, p->grad_b.get());
  // dt = s dy B
  backend_->gemm(false, false, rows, lc.rank, w.out, s, dy, p->b.get(), 0.0f, ws.lora_dt.get());
  if (lora_columns == 0) shared_dy.end();
  // dA += dt^T drop(x)
  const float* xin = x;
  if (drop) {
    backend_->dropout(x, rows * w.in, dropout_p, opt.seed, opt.step, offset, ws.dropx.get());
    xin = ws.dropx.get();
  }
  backend_->gemm(true, false, lc.rank, w.in, rows, 1.0f, ws.lora_dt.get(), xin, 1.0f, p->grad_a.get());
  if (x_share) x_share->reset();  // x is not read from here on
  if (lora_columns > 0) {  // the base and LoRA terms of dx in one GEMM
    if (dx_hold && !accumulate_dx)
      dx_hold->emplace(backend_, dx, rows, w.in, 0, SharedGemmInput::kHalfActivation);
    if (dx_half_rows && !(*dx_hold)->open()) not_held();
    // the weight as its forward left it, where it kept it (rows B's columns wider), else dequantized again
    const size_t mi = static_cast<size_t>(m);
    const bool kept = ws.kept_layer[mi] == layer;
    uint16_t* w_rows = kept ? ws.kept[mi].get() : dequantize_rows(w, ws, 0);
    const int64_t w_ld = kept ? w.in + backend_->lora_fused_columns(lc.rank) : w.in;
    backend_->gemm_dx_with_lora(rows, w.in, w.out, dy, w_rows, w_ld, lc.rank, ws.lora_dt.get(), p->a.get(),
                                accumulate_dx ? 1.0f : 0.0f, dx);
    return;
  }
  // dx += drop'(dt A): dropout is linear, so its backward is the same mask and scale applied to the gradient.
  if (drop && base_first) {  // through drop(x)'s buffer, no longer needed
    backend_->gemm(false, false, rows, w.in, lc.rank, 1.0f, ws.lora_dt.get(), p->a.get(), 0.0f, ws.dropx.get());
    backend_->dropout(ws.dropx.get(), rows * w.in, dropout_p, opt.seed, opt.step, offset, ws.dropx.get());
    backend_->add_inplace(dx, ws.dropx.get(), rows * w.in);
  } else if (drop) {  // into dx itself, which the base term is added to next
    backend_->gemm(false, false, rows, w.in, lc.rank, 1.0f, ws.lora_dt.get(), p->a.get(), 0.0f, dx);
    backend_->dropout(dx, rows * w.in, dropout_p, opt.seed, opt.step, offset, dx);
  } else {
    backend_->gemm(false, false, rows, w.in, lc.rank, 1.0f, ws.lora_dt.get(), p->a.get(), base_first ? 1.0f : 0.0f, dx);
  }
  if (!base_first) backend_->gemm_stored(false, false, rows, w.in, w.out, 1.0f, dy, base_weight(w, ws), 1.0f, dx);
}

// ----------------------------------------------------------------------------------------------------------------
// Decoder block

std::optional<SharedGemmInput::WrittenNext> LlamaModel::gemm_input_writing(const LoraAdapter* adapter, int64_t rows,
                                                                           const RunOptions& opt) const {
  if (rows <= kNf4MatmulMaxRows) return std::nullopt;
  const bool dropout = adapter && opt.training && opt.lora_scale != 0.0 && adapter->config().dropout > 0.0;
  return dropout ? SharedGemmInput::kHalfActivation : SharedGemmInput::kWrittenNextInPlace;
}

LlamaModel::HalfRowBuffers LlamaModel::half_row_buffers(const LoraAdapter* adapter, int64_t rows,
                                                         const RunOptions& opt) const {
  HalfRowBuffers half;
  if (!backend_->holds_activations_in_16_bits()) return half;
  const ModelConfig& c = config_;
  half.room = adapter ? backend_->lora_fused_columns(adapter->config().rank) : 0;
  auto fused_everywhere = [&](Module m) {
    if (module_has_bias(c, m)) return false;  // added to the fp32 output (block_forward holds it in fp32 then)
    for (int64_t layer = 0; layer < c.num_layers; ++layer)
      if (fused_lora_columns(layer, m, adapter, rows, opt) == 0) return false;
    return half.room <= c.intermediate_size;  // in place (Backend::begin_half_activation)
  };
  const bool written_in_16_bits = gemm_input_writing(adapter, rows, opt).has_value();
  half.xn = written_in_16_bits && half.room <= c.hidden_size;
  half.g = fused_everywhere(Module::Gate);
  half.u = fused_everywhere(Module::Up);
  // m's gradient is written in m's place: in 16 bits where down's input gradient is one fused GEMM
  // (linear_backward's dx_hold), else in fp32, which needs m's fp32 size
  bool gradient_held = true;
  for (int64_t layer = 0; layer < c.num_layers; ++layer)
    gradient_held = gradient_held && dy_lora_columns(layer, Module::Down, adapter, rows, opt) > 0;
  half.m = written_in_16_bits && half.room <= c.intermediate_size && (!opt.compute_grads || gradient_held);
  return half;
}

bool LlamaModel::keeps_weight(Module m, const LoraAdapter* adapter, int64_t rows, const RunOptions& opt) const {
  // only with checkpointing (its forward is recomputed right before backward), where the weight's forward and
  // backward GEMMs are fused in every layer
  if (!opt.compute_grads || !opt.gradient_checkpointing) return false;
  for (int64_t layer = 0; layer < config_.num_layers; ++layer)
    if (fused_lora_columns(layer, m, adapter, rows, opt) == 0 || dy_lora_columns(layer, m, adapter, rows, opt) == 0)
      return false;
  return true;
}

int64_t LlamaModel::kept_weight_values(Module m, const LoraAdapter* adapter) const {
  const int64_t columns = backend_->lora_fused_columns(adapter->config().rank);
  const auto shape = module_shape(config_, m);
  return (shape[0] + columns) * (shape[1] + columns);  // rows of in + B's columns; out + A's rows of them
}

bool LlamaModel::forward_kept_for_backward(int64_t layer, const RunOptions& opt) const {
  // With checkpointing the last block's forward is kept too: its backward comes right after the loss, so its
  // activations are still there (one block's buffers serve every recomputation) and running it again would give
  // the same bits.
  return opt.compute_grads && (!opt.gradient_checkpointing || layer == config_.num_layers - 1);
}

void LlamaModel::block_forward(int64_t layer, const float* x_in, float* x_out, BlockActivations& a,
                               LoraAdapter* adapter, int64_t batch, int64_t seq, Workspace& ws,
                               const RunOptions& opt) {
  const ModelConfig& c = config_;
  const LayerWeights& lw = layers_[layer];
  const int64_t n = batch * seq;
  auto t = [&](Module m) { return a.lora_t[static_cast<int>(m)].get(); };
  a.x_in = x_in;
  // The normed inputs and SwiGLU's output, each shared by the GEMMs of the linears reading it (with room for their
  // LoRA columns) from before the op that writes it, which then writes the 16-bit copy alone, into the fp32
  // buffer's own bytes (gemm_input_writing); a forward whose activations backward reads keeps these shares open for
  // backward's GEMMs and dropout (block_backward ends them).
  const std::optional<SharedGemmInput::WrittenNext> writing = gemm_input_writing(adapter, n, opt);
  const bool backward_reads = !x_out || forward_kept_for_backward(layer, opt);
  ws.keeping_for = backward_reads && opt.compute_grads ? layer : -1;  // its linears' weights too, where kept
  const bool for_backward = writing && backward_reads;
  auto share = [&](std::optional<SharedGemmInput>& scope, DeviceArray<float>& y, int64_t cols,
                   std::initializer_list<Module> readers, bool half_rows) {
    const int64_t lora_columns = shared_lora_columns(layer, readers, adapter, n, opt);
    scope.reset();
    if (writing)
      scope.emplace(backend_, y.get(), n, cols, lora_columns, *writing);
    else
      scope.emplace(backend_, static_cast<const float*>(y.get()), n, cols, lora_columns);
    if (half_rows && !scope->open())  // fp32 values would not fit
      fail("layer ", layer, ": an activation has a buffer of 16-bit rows that the backend did not write so");
  };
  auto forward_done_with = [&](std::optional<SharedGemmInput>& scope) {
    if (!for_backward) scope.reset();
  };
  // q, k, v and their LoRA down projections
  share(a.xn1_16, a.xn1, c.hidden_size, {Module::Q, Module::K, Module::V}, a.half.xn);
  backend_->rmsnorm_forward(x_in, lw.attn_norm.get(), n, c.hidden_size, c.rms_norm_eps, a.xn1.get(), a.rstd1.get());
  linear_forward(layer, Module::Q, adapter, a.xn1.get(), n, a.q.get(), t(Module::Q), ws, opt);
  linear_forward(layer, Module::K, adapter, a.xn1.get(), n, a.k.get(), t(Module::K), ws, opt);
  linear_forward(layer, Module::V, adapter, a.xn1.get(), n, a.v.get(), t(Module::V), ws, opt);
  forward_done_with(a.xn1_16);
  backend_->rope_apply(a.q.get(), batch, seq, c.num_heads, c.head_dim, ws.cos.get(), ws.sin.get(), false);
  backend_->rope_apply(a.k.get(), batch, seq, c.num_kv_heads, c.head_dim, ws.cos.get(), ws.sin.get(), false);
  backend_->attention_forward(a.q.get(), a.k.get(), a.v.get(), batch, seq, c.num_heads, c.num_kv_heads, c.head_dim,
                              a.attn.get(), a.lse.get());
  linear_forward(layer, Module::O, adapter, a.attn.get(), n, a.h.get(), t(Module::O), ws, opt);
  backend_->add_inplace(a.h.get(), x_in, n * c.hidden_size);
  // gate, up and their LoRA down projections. Their outputs are held in 16 bits, as autocast holds them, by a
  // backend that computes so, where each is one fused GEMM; backward writes their gradients in their place.
  auto hold_in_16_bits = [&](std::optional<SharedGemmInput>& scope, DeviceArray<float>& y, Module m, bool half_rows) {
    scope.reset();
    if (fused_lora_columns(layer, m, adapter, n, opt) > 0 && !module_has_bias(c, m))  // a bias is added in fp32
      scope.emplace(backend_, y.get(), n, c.intermediate_size, dy_lora_columns(layer, m, adapter, n, opt),
                    SharedGemmInput::kHalfActivation);
    if (half_rows && !(scope && scope->open()))
      fail("layer ", layer, ": ", module_name(m), "'s output has a buffer of 16-bit rows that the backend did not",
           " hold");
  };
  hold_in_16_bits(a.g_16, a.g, Module::Gate, a.half.g);
  hold_in_16_bits(a.u_16, a.u, Module::Up, a.half.u);
  share(a.xn2_16, a.xn2, c.hidden_size, {Module::Gate, Module::Up}, a.half.xn);
  backend_->rmsnorm_forward(a.h.get(), lw.mlp_norm.get(), n, c.hidden_size, c.rms_norm_eps, a.xn2.get(),
                            a.rstd2.get());
  linear_forward(layer, Module::Gate, adapter, a.xn2.get(), n, a.g.get(), t(Module::Gate), ws, opt);
  linear_forward(layer, Module::Up, adapter, a.xn2.get(), n, a.u.get(), t(Module::Up), ws, opt);
  forward_done_with(a.xn2_16);
  share(a.m_16, a.m, c.intermediate_size, {Module::Down}, a.half.m);
  backend_->swiglu_forward(a.g.get(), a.u.get(), n * c.intermediate_size, a.m.get());
  if (!backward_reads) {
    a.g_16.reset();
    a.u_16.reset();
  }
  if (!x_out) {  // recomputed for backward, which needs down's LoRA input but not the block's output
    lora_down(layer, Module::Down, adapter, a.m.get(), n, t(Module::Down), ws, opt);
    forward_done_with(a.m_16);
    return;
  }
  linear_forward(layer, Module::Down, adapter, a.m.get(), n, x_out, t(Module::Down), ws, opt);
  forward_done_with(a.m_16);
  backend_->add_inplace(x_out, a.h.get(), n * c.hidden_size);
}

void LlamaModel::block_backward(int64_t layer, BlockActivations& a, const float* dx_out, float* dx_in,
                                LoraAdapter* adapter, int64_t batch, int64_t seq, Workspace& ws,
                                const RunOptions& opt) {
  const ModelConfig& c = config_;
  const LayerWeights& lw = layers_[layer];
  const int64_t n = batch * seq;
  auto t = [&](Module m) { return a.lora_t[static_cast<int>(m)].get(); };
  // xn1, xn2, m, g and u are shared from the forward where it kept their shares open (BlockActivations::xn1_16
  // ...): the scopes opened here then add nothing, and each ends once its last GEMM has read it.
  // MLP: x_out = h + down(swiglu(gate(xn2), up(xn2)))
  // in place: the gradient of m takes m's place, those of gate and up g's and u's (nothing reads them afterwards);
  // m is read (its dA) before its gradient is written
  linear_backward(layer, Module::Down, adapter, a.m.get(), t(Module::Down), dx_out, n, a.m.get(), false, ws, opt,
                  &a.m_16, &a.dm_16, a.half.m);
  a.m_16.reset();  // where down has no LoRA, x was not read
  // dg and du are read by gate's and up's GEMMs alone: where g and u are held in 16 bits they are written in their
  // rows; else a backend whose GEMMs round dg to 16 bits writes it so (du too would hold two such copies at once
  // beside xn2's, a higher peak; it is converted for up's GEMMs after dg's copy is gone)
  const int64_t inter = c.intermediate_size;
  SharedGemmInput dg(backend_, a.g.get(), n, inter, dy_lora_columns(layer, Module::Gate, adapter, n, opt),
                     SharedGemmInput::kWrittenNext);
  backend_->swiglu_backward(a.m.get(), a.g.get(), a.u.get(), n * inter, a.g.get(), a.u.get());
  a.dm_16.reset();
  SharedGemmInput shared_xn2(backend_, a.xn2.get(), n, c.hidden_size);  // gate's and up's dA
  linear_backward(layer, Module::Gate, adapter, a.xn2.get(), t(Module::Gate), a.g.get(), n, ws.dxn.get(), false, ws,
                  opt);
  dg.end();
  a.g_16.reset();
  linear_backward(layer, Module::Up, adapter, a.xn2.get(), t(Module::Up), a.u.get(), n, ws.dxn.get(), true, ws, opt);
  a.u_16.reset();
  shared_xn2.end();
  a.xn2_16.reset();
  backend_->rmsnorm_backward(ws.dxn.get(), a.h.get(), lw.mlp_norm.get(), a.rstd2.get(), n, c.hidden_size,
                             ws.dh.get());
  backend_->add_inplace(ws.dh.get(), dx_out, n * c.hidden_size);
  // Attention: h = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1)))
  linear_backward(layer, Module::O, adapter, a.attn.get(), t(Module::O), ws.dh.get(), n, ws.dattn.get(), false, ws,
                  opt);
  backend_->attention_backward(ws.dattn.get(), a.q.get(), a.k.get(), a.v.get(), a.attn.get(), a.lse.get(), batch, seq,
                               c.num_heads, c.num_kv_heads, c.head_dim, ws.dq.get(), ws.dk.get(), ws.dv.get());
  backend_->rope_apply(ws.dq.get(), batch, seq, c.num_heads, c.head_dim, ws.cos.get(), ws.sin.get(), true);
  backend_->rope_apply(ws.dk.get(), batch, seq, c.num_kv_heads, c.head_dim, ws.cos.get(), ws.sin.get(), true);
  SharedGemmInput shared_xn1(backend_, a.xn1.get(), n, c.hidden_size);  // q's, k's and v's dA
  linear_backward(layer, Module::Q, adapter, a.xn1.get(), t(Module::Q), ws.dq.get(), n, ws.dxn.get(), false, ws, opt);
  linear_backward(layer, Module::K, adapter, a.xn1.get(), t(Module::K), ws.dk.get(), n, ws.dxn.get(), true, ws, opt);
  linear_backward(layer, Module::V, adapter, a.xn1.get(), t(Module::V), ws.dv.get(), n, ws.dxn.get(), true, ws, opt);
  shared_xn1.end();
  a.xn1_16.reset();
  backend_->rmsnorm_backward(ws.dxn.get(), a.x_in, lw.attn_norm.get(), a.rstd1.get(), n, c.hidden_size, dx_in);
  backend_->add_inplace(dx_in, ws.dh.get(), n * c.hidden_size);
}

// ----------------------------------------------------------------------------------------------------------------
// LM head and loss, in chunks of rows so that the [rows, vocab] logits never exist at once.

int64_t loss_chunk_rows(int64_t rows, int64_t vocab) {
  constexpr int64_t kTile = 128;
  const int64_t fit = (int64_t{1} << 24) / vocab;
  if (fit >= rows) return rows;
  return fit >= kTile ? fit / kTile * kTile : std::max<int64_t>(1, fit);
}

void LlamaModel::lm_head(const float* x_final, int64_t rows, double grad_scale, float* dx_final, float* log_softmax,
                         Workspace& ws) {
  const ModelConfig& c = config_;
  StoredMatrix w = lm_head_weight();
  DeviceArray<uint8_t> converted;
  if (backend_->gemm_converts(w.format)) {  // once for every chunk, forward and backward, not at each GEMM
    const FloatFormat to = backend_->gemm_weight_format();
    converted.reset(backend_, c.vocab_size * c.hidden_size * float_format_bytes(to), MemCategory::Workspace);
    backend_->convert_stored(w, c.vocab_size * c.hidden_size, to, converted.get());
    w = {converted.get(), to};
  }
  backend_->rmsnorm_forward(x_final, final_norm_.get(), rows, c.hidden_size, c.rms_norm_eps, ws.xf.get(),
                            ws.rstdf.get());
  for (int64_t r0 = 0; r0 < rows; r0 += ws.logits_rows) {
    const int64_t rc = std::min(ws.logits_rows, rows - r0);
    backend_->gemm_stored(false, true, rc, c.vocab_size, c.hidden_size, 1.0f, ws.xf.get() + r0 * c.hidden_size, w, 0.0f,
                          ws.logits.get());
    if (log_softmax) backend_->log_softmax_rows(ws.logits.get(), rc, c.vocab_size, log_softmax + r0 * c.vocab_size);
    // The gradient of the logits overwrites the logits in place (each row is read before it is written); its one
    // reader is the GEMM below, so a backend whose GEMMs round it to 16 bits may write it in 16 bits alone.
    SharedGemmInput gradient(backend_, ws.logits.get(), dx_final ? rc : 0, c.vocab_size, 0,
                             SharedGemmInput::kWrittenNext);
    backend_->cross_entropy(ws.logits.get(), ws.targets.get() + r0, rc, c.vocab_size, grad_scale,
                            dx_final ? ws.logits.get() : nullptr, ws.logprobs.get() + r0);
    if (dx_final)
      backend_->gemm_stored(false, false, rc, c.hidden_size, c.vocab_size, 1.0f, ws.logits.get(), w, 0.0f,
                            ws.dxf + r0 * c.hidden_size);
  }
  if (dx_final)
    backend_->rmsnorm_backward(ws.dxf, x_final, final_norm_.get(), ws.rstdf.get(), rows, c.hidden_size,
                               dx_final);
}

// ----------------------------------------------------------------------------------------------------------------
// Whole model

void LlamaModel::check_ids(const int32_t* ids, int64_t n) const {
  for (int64_t i = 0; i < n; ++i)
    if (ids[i] < 0 || ids[i] >= config_.vocab_size)
      fail("token id ", ids[i], " at position ", i, " is outside the model's vocabulary (0..", config_.vocab_size - 1,
           ")");
}

void LlamaModel::embed(const int32_t* ids, int64_t rows, float* out) {
  const int64_t h = config_.hidden_size;
  if (embed_host_.empty()) return backend_->embedding(ids, rows, embed_.view(), h, out);
  const FloatFormat format = embed_host_.format;
  const size_t row_bytes = static_cast<size_t>(h * float_format_bytes(format));
  const size_t bytes = static_cast<size_t>(rows) * row_bytes;
  embed_rows_.ensure(backend_, bytes);
  auto* gathered = static_cast<uint8_t*>(embed_rows_.get());
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(gathered + static_cast<size_t>(r) * row_bytes,
                embed_host_.data() + static_cast<size_t>(ids[r]) * row_bytes, row_bytes);
  if (format == FloatFormat::F32) return backend_->upload(out, gathered, bytes);
  // up as stored (half the bytes of fp32), widened there exactly
  DeviceArray<uint16_t> rows16(backend_, rows * h, MemCategory::Workspace);
  backend_->upload(rows16.get(), gathered, bytes);
  backend_->widen_16(rows16.get(), rows * h, format, out);
}

RunResult LlamaModel::run(const int32_t* ids, const int32_t* labels, int64_t batch, int64_t seq, LoraAdapter* adapter,
                          const RunOptions& opt) {
  const ModelConfig& c = config_;
  if (batch <= 0 || seq <= 0) fail("run needs at least one sequence of at least one token");
  const int64_t n = batch * seq;
  if (c.sliding_window > 0 && seq > c.sliding_window)
    fail("a sequence of ", seq, " tokens is longer than the model's sliding attention window (", c.sliding_window,
         "); sliding-window attention is not supported, use sequences of at most ", c.sliding_window, " tokens");
  check_ids(ids, n);
  if (adapter && adapter->num_layers() != c.num_layers)
    fail("adapter has ", adapter->num_layers(), " layers but the model has ", c.num_layers);
  if (opt.compute_grads && !adapter) fail("gradients need a LoRA adapter");

  // Targets: position t of each sequence is scored on labels[t + 1]; the last position has none.
  std::vector<int32_t> targets(static_cast<size_t>(n), kIgnoreLabel);
  RunResult result;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t + 1 < seq; ++t) {
      const int32_t label = labels[b * seq + t + 1];
      if (label != kIgnoreLabel && (label < 0 || label >= c.vocab_size))
        fail("label ", label, " at position ", b * seq + t + 1, " is neither -100 nor a token id of the vocabulary (0..",
             c.vocab_size - 1, ")");
      targets[b * seq + t] = label;
      if (label != kIgnoreLabel) ++result.labelled;
    }

  Workspace ws;
  Backend* be = backend_;
  const auto act = MemCategory::Activations, work = MemCategory::Workspace;
  int64_t rank = 0;
  if (adapter) rank = adapter->config().rank;
  ws.weight.reset(be, weight_workspace_bytes(adapter), work);
  if (restores_block_constants()) ws.absmax.reset(be, max_double_quant_blocks_, work);
  for (Module m : kRecomputedModules)
    if (keeps_weight(m, adapter, n, opt))
      ws.kept[static_cast<size_t>(m)].reset(be, kept_weight_values(m, adapter), work);
  const RopeTables rope = build_rope_tables(c, seq);
  ws.cos.reset(be, static_cast<int64_t>(rope.cos.size()), work);
  ws.cos.upload(rope.cos);
  ws.sin.reset(be, static_cast<int64_t>(rope.sin.size()), work);
  ws.sin.upload(rope.sin);
  if (adapter) {
    // drop(x), for LoRA dropout's masks alone
    if (opt.training && adapter->config().dropout > 0.0) ws.dropx.reset(be, n * max_linear_in(c), work);
    if (opt.compute_grads) ws.lora_dt.reset(be, n * rank, work);
  }
  ws.xf.reset(be, n * c.hidden_size, act);
  ws.rstdf.reset(be, n, act);
  ws.logits_rows = loss_chunk_rows(n, c.vocab_size);
  ws.logits.reset(be, ws.logits_rows * c.vocab_size, work);
  ws.targets.reset(be, n, work);
  ws.targets.upload(targets);  // here, not at the loss: an upload from pageable memory waits for the device
  ws.logprobs.reset(be, n, work);

  const bool keep_all = opt.compute_grads && !opt.gradient_checkpointing;
  // Block inputs: the input of each block and the final hidden state.
  HiddenStatesOptions so;
  so.count = c.num_layers + 1;
  so.size = n * c.hidden_size;
  so.format = be->hidden_state_format();
  so.keep_fp32 = keep_all;
  so.offload = opt.compute_grads ? opt.offload_block_inputs : 0;
  HiddenStates states(be, so, &state_host_);
  embed(ids, n, states.output(0));
  states.commit(0);

  std::vector<BlockActivations> acts(keep_all ? static_cast<size_t>(c.num_layers) : 1);
  const HalfRowBuffers half_rows = half_row_buffers(adapter, n, opt);
  for (auto& a : acts) a.allocate(be, c, batch, seq, adapter, half_rows);
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    block_forward(layer, states.input(layer), states.output(layer + 1), acts[keep_all ? layer : 0], adapter, batch,
                  seq, ws, opt);
    states.commit(layer + 1);
    if (!opt.compute_grads) states.release(layer);  // no backward to come back for it
  }

  const double normalizer = opt.grad_normalizer > 0.0 ? opt.grad_normalizer : static_cast<double>(result.labelled);
  const double grad_scale = normalizer > 0.0 ? opt.loss_scale / normalizer : 0.0;
  if (opt.want_log_softmax) result.log_softmax.resize(static_cast<size_t>(n * c.vocab_size));
  DeviceArray<float> d_cur, d_next;
  if (opt.compute_grads) {
    d_cur.reset(be, n * c.hidden_size, act);
    d_next.reset(be, n * c.hidden_size, act);
    ws.dxf = d_next.get();
  }
  lm_head(states.input(c.num_layers), n, grad_scale, opt.compute_grads ? d_cur.get() : nullptr,
          opt.want_log_softmax ? result.log_softmax.data() : nullptr, ws);
  states.release(c.num_layers);

  if (opt.compute_grads) {
    const int64_t qd = c.num_heads * c.head_dim, kd = c.num_kv_heads * c.head_dim;
    ws.dxn.reset(be, n * c.hidden_size, act);
    ws.dh.reset(be, n * c.hidden_size, act);
    ws.dattn.reset(be, n * qd, act);
    ws.dq.reset(be, n * qd, act);
    ws.dk.reset(be, n * kd, act);
    ws.dv.reset(be, n * kd, act);
    for (int64_t layer = c.num_layers - 1; layer >= 0; --layer) {
      BlockActivations& a = acts[keep_all ? layer : 0];
      // Gradient checkpointing: only the block's input was kept; run the block again to get its activations.
      // Dropout masks come from the counter-based generator, so the recomputation draws the same ones.
      const float* x_in = states.input(layer);
      if (layer > 0) states.prefetch(layer - 1);  // an offloaded input comes back while this block computes
      if (!forward_kept_for_backward(layer, opt))
        block_forward(layer, x_in, nullptr, a, adapter, batch, seq, ws, opt);
      else if (!keep_all)
        a.x_in = x_in;  // the last block's forward was kept; its input read back as a recomputation would read it
      block_backward(layer, a, d_cur.get(), d_next.get(), adapter, batch, seq, ws, opt);
      states.release(layer);
      std::swap(d_cur, d_next);
    }
  }

  // The log-probs of every row come back once, with backward queued too: nothing in a step waits for the host
  // before its end (the loss needs nothing sooner).
  const std::vector<double> row_logprobs = ws.logprobs.download();
  for (int64_t r = 0; r < n; ++r)
    if (targets[static_cast<size_t>(r)] != kIgnoreLabel) result.loss_sum -= row_logprobs[static_cast<size_t>(r)];
  if (opt.want_logprobs) {
    result.logprobs.reserve(static_cast<size_t>(batch * (seq - 1)));
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t t = 0; t + 1 < seq; ++t) result.logprobs.push_back(row_logprobs[b * seq + t]);
  }
  return result;
}

// ----------------------------------------------------------------------------------------------------------------
// Generation with a KV cache

void LlamaModel::reserve(KvCache& cache, int64_t needed) const {
  if (needed <= cache.capacity) return;
  const ModelConfig& c = config_;
  // Grow geometrically so a long answer reallocates a handful of times, not at every token.
  const int64_t capacity = std::max({needed, cache.capacity * 2, int64_t{256}});
  const int64_t kd = c.num_kv_heads * c.head_dim;
  const auto cat = MemCategory::Activations;
  cache.k.resize(static_cast<size_t>(c.num_layers));
  cache.v.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (auto* arrays : {&cache.k, &cache.v}) {
      DeviceArray<float> grown(backend_, capacity * kd, cat);
      auto& old = (*arrays)[static_cast<size_t>(l)];
      if (cache.length > 0) backend_->copy(grown.get(), old.get(), cache.length * kd);
      old = std::move(grown);
    }
  }
  const RopeTables rope = build_rope_tables(c, capacity);
  cache.cos.reset(backend_, static_cast<int64_t>(rope.cos.size()), cat);
  cache.cos.upload(rope.cos);
  cache.sin.reset(backend_, static_cast<int64_t>(rope.sin.size()), cat);
  cache.sin.upload(rope.sin);
  cache.capacity = capacity;
}

std::vector<float> LlamaModel::decode(const int32_t* ids, int64_t count, KvCache& cache, LoraAdapter* adapter,
                                      bool all_logits) {
  const ModelConfig& c = config_;
  if (count <= 0) fail("decode needs at least one token");
  const int64_t past = cache.length, total = past + count;
  if (c.sliding_window > 0 && total > c.sliding_window)
    fail("a sequence of ", total, " tokens is longer than the model's sliding attention window (", c.sliding_window,
         "); sliding-window attention is not supported");
  check_ids(ids, count);
  if (adapter && adapter->num_layers() != c.num_layers)
    fail("adapter has ", adapter->num_layers(), " layers but the model has ", c.num_layers);
  reserve(cache, total);

  RunOptions opt;
  opt.lora_scale = cache.lora_scale;
  Backend* be = backend_;
  const auto act = MemCategory::Activations, work = MemCategory::Workspace;
  const int64_t n = count, qd = c.num_heads * c.head_dim, kd = c.num_kv_heads * c.head_dim;
  const int64_t half = c.head_dim / 2;
  Workspace ws;
  // few rows read NF4 weights and their block constants in place (nf4_matmul_nt); only a longer prefill dequantizes
  // a layer at a time
  if (n > kNf4MatmulMaxRows) {
    ws.weight.reset(be, weight_workspace_bytes(adapter), work);
    if (restores_block_constants()) ws.absmax.reset(be, max_double_quant_blocks_, work);
  }
  DeviceArray<float> x(be, n * c.hidden_size, act), x_next(be, n * c.hidden_size, act);
  DeviceArray<float> xn(be, n * c.hidden_size, act), rstd(be, n, act), q(be, n * qd, act), attn(be, n * qd, act);
  DeviceArray<float> h(be, n * c.hidden_size, act), g(be, n * c.intermediate_size, act);
  DeviceArray<float> u(be, n * c.intermediate_size, act), m(be, n * c.intermediate_size, act);
  DeviceArray<float> lora_t;
  if (adapter) lora_t.reset(be, n * adapter->config().rank, work);
  embed(ids, n, x.get());
  // hidden states between blocks rounded as a training run rounds them (hidden_state_format)
  const FloatFormat hidden = be->hidden_state_format();
  DeviceArray<uint16_t> rounding;
  auto round_hidden = [&](float* state) {
    if (hidden == FloatFormat::F32) return;
    if (rounding.empty()) rounding.reset(be, n * c.hidden_size, work);
    round_through_16(be, state, n * c.hidden_size, hidden, rounding.get());
  };
  round_hidden(x.get());

  const float* cos = cache.cos.get() + past * half;
  const float* sin = cache.sin.get() + past * half;
  // A prefill's normed inputs and SwiGLU's output, read by GEMMs alone, are written in 16 bits in their own bytes
  // where the backend's GEMMs round them so (as a training run's forward writes them; few rows read fp32).
  const std::optional<SharedGemmInput::WrittenNext> writing = gemm_input_writing(adapter, n, opt);
  auto share = [&](int64_t layer, DeviceArray<float>& y, int64_t cols, std::initializer_list<Module> readers) {
    return SharedGemmInput(be, writing ? y.get() : nullptr, n, cols,
                           shared_lora_columns(layer, readers, adapter, n, opt),
                           writing.value_or(SharedGemmInput::kWrittenNextInPlace));
  };
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    const LayerWeights& lw = layers_[layer];
    float* k_new = cache.k[static_cast<size_t>(layer)].get() + past * kd;
    float* v_new = cache.v[static_cast<size_t>(layer)].get() + past * kd;
    SharedGemmInput shared_xn1 = share(layer, xn, c.hidden_size, {Module::Q, Module::K, Module::V});
    be->rmsnorm_forward(x.get(), lw.attn_norm.get(), n, c.hidden_size, c.rms_norm_eps, xn.get(), rstd.get());
    linear_forward(layer, Module::Q, adapter, xn.get(), n, q.get(), lora_t.get(), ws, opt);
    linear_forward(layer, Module::K, adapter, xn.get(), n, k_new, lora_t.get(), ws, opt);
    linear_forward(layer, Module::V, adapter, xn.get(), n, v_new, lora_t.get(), ws, opt);
    shared_xn1.end();
    be->rope_apply(q.get(), 1, n, c.num_heads, c.head_dim, cos, sin, false);
    be->rope_apply(k_new, 1, n, c.num_kv_heads, c.head_dim, cos, sin, false);
    be->attention_cached(q.get(), cache.k[static_cast<size_t>(layer)].get(), cache.v[static_cast<size_t>(layer)].get(),
                         n, past, c.num_heads, c.num_kv_heads, c.head_dim, attn.get());
    linear_forward(layer, Module::O, adapter, attn.get(), n, h.get(), lora_t.get(), ws, opt);
    be->add_inplace(h.get(), x.get(), n * c.hidden_size);
    SharedGemmInput shared_xn2 = share(layer, xn, c.hidden_size, {Module::Gate, Module::Up});
    be->rmsnorm_forward(h.get(), lw.mlp_norm.get(), n, c.hidden_size, c.rms_norm_eps, xn.get(), rstd.get());
    linear_forward(layer, Module::Gate, adapter, xn.get(), n, g.get(), lora_t.get(), ws, opt);
    linear_forward(layer, Module::Up, adapter, xn.get(), n, u.get(), lora_t.get(), ws, opt);
    shared_xn2.end();
    SharedGemmInput shared_m = share(layer, m, c.intermediate_size, {Module::Down});
    be->swiglu_forward(g.get(), u.get(), n * c.intermediate_size, m.get());
    linear_forward(layer, Module::Down, adapter, m.get(), n, x_next.get(), lora_t.get(), ws, opt);
    shared_m.end();
    be->add_inplace(x_next.get(), h.get(), n * c.hidden_size);
    round_hidden(x_next.get());
    std::swap(x, x_next);
  }
  cache.length = total;

  // Only the rows whose logits are wanted go through the final norm and the LM head.
  const int64_t rows = all_logits ? n : 1;
  const float* last = x.get() + (n - rows) * c.hidden_size;
  be->rmsnorm_forward(last, final_norm_.get(), rows, c.hidden_size, c.rms_norm_eps, xn.get(), rstd.get());
  DeviceArray<float> logits(be, rows * c.vocab_size, work);
  be->gemm_stored(false, true, rows, c.vocab_size, c.hidden_size, 1.0f, xn.get(), lm_head_weight(), 0.0f, logits.get());
  return logits.download();
}

}  // namespace qlora
