// The LLaMA-family decoder (Llama 2/3, Mistral, Qwen2) with LoRA on its linear layers: loading from a Hugging Face
// folder (plain or bnb-4bit), forward, backward to every LoRA parameter, loss and per-token log-probs. Written once
// against Backend; only the kernels differ between devices.
#pragma once
#include <array>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/model_config.h"
#include "io/safetensors.h"
#include "model/lora.h"

namespace qlora {

// A frozen dense matrix (the embedding, the LM head, a linear weight left unquantized) in device memory in its
// file's format: fp32, bf16 or fp16 (an F64 tensor is narrowed to fp32); or, where the backend reads file mappings
// (Backend::reads_file_mappings), its bytes where the model's file mapping holds them (`mapped`, kept alive by
// LlamaModel::mapping_).
struct DenseWeight {
  DeviceArray<uint8_t> bytes;
  CountedBytes mapped;
  FloatFormat format = FloatFormat::F32;
  StoredMatrix view() const { return {mapped.get() != nullptr ? mapped.get() : bytes.get(), format}; }
  bool empty() const { return bytes.empty() && mapped.get() == nullptr; }
};

// A frozen dense matrix in host memory as its file stores it: an untied embedding table where the backend keeps it
// there (Backend::keeps_embedding_on_host). Read where the model file's mapping holds it (`mapped`, kept alive by
// LlamaModel::mapping_; rows are copied out, so any alignment does), else (an F64 table narrowed) in `bytes`.
struct HostMatrix {
  std::vector<uint8_t> bytes;
  const uint8_t* mapped = nullptr;
  FloatFormat format = FloatFormat::F32;
  const uint8_t* data() const { return mapped != nullptr ? mapped : bytes.data(); }
  bool empty() const { return bytes.empty() && mapped == nullptr; }
};

// A frozen base weight [out, in]: either dense (as stored) or NF4 codes with per-block absmax, dequantized (rounded
// to the quant state's dtype) into a workspace at each use, as QLoRA does.
struct FrozenLinear {
  int64_t out = 0, in = 0;
  DenseWeight dense;
  DeviceArray<uint8_t> packed;
  DeviceArray<float> absmax;  // the block constants in fp32; empty when they are double-quantized
  // Double quantization as QLoRA keeps it: one 8-bit code per block constant, one fp32 constant per absmax_blocksize2
  // codes, the 256-value map and the offset; the fp32 constants are restored into workspace at each use.
  DeviceArray<uint8_t> absmax_codes;
  DeviceArray<float> absmax2, absmax_map;
  float absmax_offset = 0.0f;
  int absmax_blocksize2 = 256;
  int blocksize = 64;
  FloatFormat round_to = FloatFormat::F32;
  DeviceArray<float> bias;  // empty when the layer has none
  bool quantized() const { return !packed.empty(); }
  bool double_quantized() const { return !absmax_codes.empty(); }
  int64_t blocks() const { return (out * in + blocksize - 1) / blocksize; }
};

struct LayerWeights {
  DeviceArray<float> attn_norm, mlp_norm;
  std::array<FrozenLinear, kNumModules> linear;
};

struct LoadOptions {
  // Quantize dense linear weights to NF4 on load (QLoRA training from a bf16/f32 model). Checkpoints already in
  // bnb-4bit are used as stored either way.
  bool quantize_nf4 = false;
};

struct RunOptions {
  bool compute_grads = false;
  bool gradient_checkpointing = true;  // keep only each block's input; recompute the block in backward
  // With gradients and checkpointing: the inputs of blocks 0..k-1 move to host memory as forward writes them and
  // come back as backward reaches them (each move a page event), so that a step holds L - k of the L block inputs.
  // At most L - 2 can help (backward starts on the last two at once); more is taken as that many.
  int64_t offload_block_inputs = 0;
  double grad_normalizer = 0.0;        // gradients are of sum(loss)/normalizer; 0 means the labelled count
  bool training = false;               // LoRA dropout on
  uint64_t seed = 0;                   // dropout stream key
  uint32_t step = 0;
  uint32_t micro_batch = 0;
  bool want_logprobs = false;
  bool want_log_softmax = false;  // the whole next-token distribution at every position (for export checks)
  double lora_scale = 1.0;        // multiplies the adapter's alpha/r; 0 runs the base model alone
  // fp16 compute's loss scaling: gradients are of loss_scale * loss (the optimizer divides it out), so that small
  // gradients do not flush to zero in fp16; the loss itself is reported unscaled.
  double loss_scale = 1.0;
};

// Generation state of one sequence: the keys and values of every position so far, per layer, so that each new
// token costs one position's forward pass. One per conversation and adapter scale; positions beyond `length` are
// free (truncating a cache is setting `length`). Tied to the adapter it was filled with.
struct KvCache {
  int64_t length = 0;
  int64_t capacity = 0;
  double lora_scale = 1.0;
  std::vector<DeviceArray<float>> k, v;  // per layer [capacity, kv_heads * head_dim], after RoPE
  DeviceArray<float> cos, sin;           // rotary tables of positions 0..capacity-1
};

struct RunResult {
  double loss_sum = 0.0;      // sum over labelled positions of -log p(label)
  int64_t labelled = 0;       // positions with a label (the next token's label is not -100)
  std::vector<double> logprobs;  // [batch, seq - 1]: log p(labels[t+1] | ids[..t]) (0 where unlabelled)
  std::vector<float> log_softmax;  // [batch * seq, vocab] when want_log_softmax: log p(. | ids[..t])
};

// Rows of logits the loss computes at once, of `rows` over a vocabulary of `vocab`: about 16M logits (64 MB in
// fp32) and at least one row; a multiple of 128 rows where that many fit, since the LM head's GEMMs compute in tiles
// of 64 or 128 rows (130 rows would run a last tile almost empty).
int64_t loss_chunk_rows(int64_t rows, int64_t vocab);

class LlamaModel {
 public:
  static std::unique_ptr<LlamaModel> load(Backend* backend, const std::string& dir, const LoadOptions& options);
  // A model of the given shape with random weights and no files, for benchmarks: embeddings (and an untied LM head)
  // uniform with the spread of a trained model's, unit norms, and every linear layer NF4 with random codes and block
  // constants (bf16-rounded, as QLoRA quantizes a bf16 model): the same buffers, of the same sizes, that load()
  // makes of that model quantized.
  static std::unique_ptr<LlamaModel> synthetic(Backend* backend, const ModelConfig& config, uint64_t seed);

  const ModelConfig& config() const { return config_; }
  const std::string& dir() const { return dir_; }
  bool stored_4bit() const { return stored_4bit_; }
  // Whether some dense weight is read where the file's mapping holds it (Backend::reads_file_mappings, or an
  // embedding table kept in host memory).
  bool reads_weights_in_place() const { return mapping_ != nullptr; }
  Backend* backend() const { return backend_; }

  // ids, labels: [batch, seq] row-major; labels[t] is the label of ids[t] as transformers takes them (shifted
  // inside: position t is scored on labels[t+1]); -100 ignores a position. With compute_grads the gradients are
  // added to the adapter's gradient buffers.
  RunResult run(const int32_t* ids, const int32_t* labels, int64_t batch, int64_t seq, LoraAdapter* adapter,
                const RunOptions& options);

  // Generation: runs `count` tokens at positions cache.length.. (a whole prompt, or one sampled token) through the
  // model with the cache's adapter scale, appends their keys and values to the cache, and returns the raw fp32
  // next-token logits of the last new position ([vocab]) or, with all_logits, of each new position ([count, vocab]).
  std::vector<float> decode(const int32_t* ids, int64_t count, KvCache& cache, LoraAdapter* adapter,
                            bool all_logits = false);

 private:
  struct BlockActivations;
  struct Workspace;
  // Which of a block's activations a run allocates at the size of their 16-bit rows alone (rows of their columns and
  // `room` for LoRA's), because the backend holds them so (Backend::holds_activations_in_16_bits): xn1 and xn2
  // where gemm_input_writing writes them in 16 bits, g and u where gate's (up's) linear is one fused GEMM in every
  // layer and has no bias, m where SwiGLU writes it in 16 bits and its gradient, which takes its place, is held in
  // 16 bits too (down's input gradient one fused GEMM in every layer) or not computed.
  struct HalfRowBuffers {
    bool xn = false, g = false, u = false, m = false;
    int64_t room = 0;
  };
  HalfRowBuffers half_row_buffers(const LoraAdapter* adapter, int64_t rows, const RunOptions& opt) const;
  LlamaModel() = default;
  void check_ids(const int32_t* ids, int64_t n) const;
  // out [rows, hidden] = the embedding rows of ids (checked), widened to fp32, from wherever the table is kept.
  void embed(const int32_t* ids, int64_t rows, float* out);
  void linear_forward(int64_t layer, Module m, LoraAdapter* adapter, const float* x, int64_t rows, float* y,
                      float* lora_t, Workspace& ws, const RunOptions& options);
  // t = drop(x)·A^T of the adapter's module m (the LoRA input backward needs); its parameter, or null without one.
  const LoraParam* lora_down(int64_t layer, Module m, LoraAdapter* adapter, const float* x, int64_t rows,
                             float* lora_t, Workspace& ws, const RunOptions& opt);
  // x_share: a share of x (its 16-bit copy, which may live in x's own bytes) that ends once x is last read, before
  // dx, which may then be x's buffer, is written. dx_hold: where dx is one fused GEMM's output (not accumulated),
  // it is held in 16 bits from that GEMM (Backend::begin_half_activation) in this scope, for a reader that reads
  // the rounding (SwiGLU's backward). dx_half_rows: dx's buffer holds 16-bit rows alone, so a dx not held so is an
  // error (before anything is written), never a write past the buffer's end.
  void linear_backward(int64_t layer, Module m, LoraAdapter* adapter, const float* x, const float* lora_t,
                       const float* dy, int64_t rows, float* dx, bool accumulate_dx, Workspace& ws,
                       const RunOptions& options, std::optional<SharedGemmInput>* x_share = nullptr,
                       std::optional<SharedGemmInput>* dx_hold = nullptr, bool dx_half_rows = false);
  // x_out null: the recomputation of gradient checkpointing, which skips what only the block's output needs (the
  // base down projection).
  // How a forward of a block writes its normed inputs and SwiGLU's output, which only GEMMs and LoRA dropout read
  // (in the forward and in backward): in 16 bits alone, in their own bytes, with the same bits where GEMMs alone
  // read them (kWrittenNextInPlace); under LoRA dropout held in 16 bits (kHalfActivation: the mask applies to the
  // rounded values, as PEFT's dropout under autocast does); in fp32 (nullopt) where few rows read NF4 weights in
  // place (nf4_matmul_nt takes fp32 rows).
  std::optional<SharedGemmInput::WrittenNext> gemm_input_writing(const LoraAdapter* adapter, int64_t rows,
                                                                 const RunOptions& opt) const;
  // Whether a block's forward pass keeps what its backward reads (no recomputation): every block without gradient
  // checkpointing, the last one with it.
  bool forward_kept_for_backward(int64_t layer, const RunOptions& opt) const;
  void block_forward(int64_t layer, const float* x_in, float* x_out, BlockActivations& acts, LoraAdapter* adapter,
                     int64_t batch, int64_t seq, Workspace& ws, const RunOptions& options);
  void block_backward(int64_t layer, BlockActivations& acts, const float* dx_out, float* dx_in,
                      LoraAdapter* adapter, int64_t batch, int64_t seq, Workspace& ws, const RunOptions& options);
  StoredMatrix base_weight(const FrozenLinear& w, Workspace& ws);
  // An NF4 weight dequantized into ws.weight in 16 bits, in rows of in + extra_columns values (LoRA's factor goes
  // beside each row for gemm_with_lora_up).
  uint16_t* dequantize_rows(const FrozenLinear& w, Workspace& ws, int64_t extra_columns);
  uint16_t* dequantize_rows_into(const FrozenLinear& w, uint16_t* rows, int64_t extra_columns);
  // Whether a run keeps module m's dequantized weight from a block's forward for its backward (Workspace::kept): the
  // linears a checkpointed block's recomputation runs (all but down), fused with LoRA both ways in every layer; and
  // the 16-bit values each such buffer holds.
  bool keeps_weight(Module m, const LoraAdapter* adapter, int64_t rows, const RunOptions& opt) const;
  int64_t kept_weight_values(Module m, const LoraAdapter* adapter) const;
  // ws.weight's size: the largest linear in the GEMM's format, with room for LoRA's factor where the backend fuses it.
  int64_t weight_workspace_bytes(const LoraAdapter* adapter) const;
  // lora_fused_columns of the adapter's rank where this linear's LoRA up projection goes into its base GEMM, else 0.
  int64_t fused_lora_columns(int64_t layer, Module m, const LoraAdapter* adapter, int64_t rows,
                             const RunOptions& opt) const;
  // The LoRA columns beside the output gradient's 16-bit copy in linear_backward: fused_lora_columns where the input
  // gradient's base and LoRA terms are one GEMM (never under LoRA dropout, whose mask applies to LoRA's term alone).
  // The room a shared input of these linears needs for their LoRA columns: the widest of their fused_lora_columns.
  int64_t shared_lora_columns(int64_t layer, std::initializer_list<Module> readers, const LoraAdapter* adapter,
                              int64_t rows, const RunOptions& opt) const;
  int64_t dy_lora_columns(int64_t layer, Module m, const LoraAdapter* adapter, int64_t rows,
                          const RunOptions& opt) const;
  // Whether a run restores double-quantized block constants into ws.absmax (block_constants) before dequantizing.
  bool restores_block_constants() const;
  const float* block_constants(const FrozenLinear& w, Workspace& ws);
  StoredMatrix lm_head_weight() const { return lm_head_.empty() ? embed_.view() : lm_head_.view(); }
  void reserve(KvCache& cache, int64_t needed) const;
  // The final norm, the LM head and the loss over chunks of rows, on the targets in ws.targets: each row's log-prob
  // into ws.logprobs (device memory, read by run after backward), the gradient of the hidden state into dx_final
  // (optional).
  void lm_head(const float* x_final, int64_t rows, double grad_scale, float* dx_final, float* log_softmax,
               Workspace& ws);

  Backend* backend_ = nullptr;
  // The model's safetensors files, kept open (mapped) while dense weights are read from them in place: declared
  // before the weights, so that it outlives them.
  std::unique_ptr<TensorStore> mapping_;
  std::string dir_;
  ModelConfig config_;
  bool stored_4bit_ = false;
  DenseWeight embed_;      // [vocab, hidden]; empty when it is kept in host memory (embed_host_)
  HostMatrix embed_host_;  // [vocab, hidden] where Backend::keeps_embedding_on_host and it is untied
  HostBuffer embed_rows_;  // a run's rows of embed_host_, gathered (page-locked on the GPU) to go up in one copy
  DenseWeight lm_head_;  // [vocab, hidden]; empty when tied to embed_
  DeviceArray<float> final_norm_;
  std::vector<LayerWeights> layers_;
  int64_t max_double_quant_blocks_ = 0;  // the workspace block_constants needs
  std::vector<HostBuffer> state_host_;   // where offloaded block inputs go, kept between runs
};

}  // namespace qlora
