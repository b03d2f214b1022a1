#include "model/estimate.h"

#include <algorithm>
#include <set>

#include "model/hidden_states.h"
#include "model/llama.h"
#include "util/error.h"

namespace qlora {

namespace {

constexpr int64_t kF32 = 4;
constexpr int64_t kNf4Blocksize = 64;
constexpr int64_t kDoubleQuantBlocksize = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

FloatFormat dense_weight_format(const ModelConfig& c) {
  if (c.dtype == "bfloat16") return FloatFormat::BF16;
  if (c.dtype == "float16") return FloatFormat::F16;
  return FloatFormat::F32;
}

MemoryEstimate estimate_memory(const ModelConfig& c, const EstimateOptions& o) {
  if (o.batch <= 0 || o.seq <= 0) fail("estimate: batch size and sequence length must be positive");
  if (o.rank <= 0) fail("estimate: LoRA rank must be positive, got ", o.rank);
  if (o.targets.empty()) fail("estimate: LoRA needs at least one target module");
  if (!(o.lora_dropout >= 0.0 && o.lora_dropout < 1.0))
    fail("estimate: LoRA dropout must be at least 0 and below 1, got ", o.lora_dropout);
  if (c.sliding_window > 0 && o.seq > c.sliding_window)
    fail("estimate: a sequence of ", o.seq, " tokens is longer than the model's sliding attention window (",
         c.sliding_window, "), which training refuses");
  const std::set<Module> targets(o.targets.begin(), o.targets.end());

  MemoryEstimate e;
  auto add = [&](MemCategory cat, int64_t bytes) { e.bytes[static_cast<size_t>(cat)] += bytes; };
  const auto W = MemCategory::Weights, Ad = MemCategory::Adapters, G = MemCategory::Gradients,
             Opt = MemCategory::Optimizer, Act = MemCategory::Activations, Ws = MemCategory::Workspace;
  const int64_t h = c.hidden_size, inter = c.intermediate_size, vocab = c.vocab_size, L = c.num_layers;
  const int64_t qd = c.num_heads * c.head_dim, kd = c.num_kv_heads * c.head_dim;

  // LlamaModel::load: frozen matrices as stored, norms and biases fp32; NF4 linears keep packed codes and their
  // block constants: with double quantization (always when quantizing on load; for a bnb-4bit checkpoint as its
  // tensors say, which the binding reads into config.quantization) one byte per block, one fp32 per 256 blocks and
  // the 256-value map, else one fp32 per block.
  const bool nf4 = o.stored_4bit || o.quantize_nf4;
  const bool double_quant = o.stored_4bit ? c.quantization.has_value() && c.quantization->double_quant : nf4;
  auto block_constants_bytes = [&](int64_t blocks) {
    return double_quant ? blocks + ceil_div(blocks, kDoubleQuantBlocksize) * kF32 + 256 * kF32 : blocks * kF32;
  };
  const FloatFormat dense = dense_weight_format(c);
  const int64_t dense_bytes = float_format_bytes(dense);
  // embed_tokens: on the GPU an untied table stays in host memory (Backend::keeps_embedding_on_host), with a
  // page-locked buffer for a step's rows
  if (o.cuda && !c.tie_word_embeddings)
    e.host_bytes = vocab * h * dense_bytes + o.batch * o.seq * h * dense_bytes;
  else
    add(W, vocab * h * dense_bytes);
  add(W, h * kF32);                                              // final norm
  if (!c.tie_word_embeddings) add(W, vocab * h * dense_bytes);   // lm_head
  // on the GPU under half compute LoRA's terms go into the base GEMMs: a dequantized weight has room for B beside
  // each row (forward) or for A's rows under it (backward), and a shared 16-bit input for t or dt beside each row
  const int64_t lora_columns = o.cuda ? lora_fused_columns(o.compute, o.rank) : 0;
  const int64_t largest_linear = max_linear_size(c), max_weight_rows = max_linear_size(c, lora_columns);
  const int64_t widest_in = max_linear_in(c);
  int64_t max_in_plus_out = 0;
  for (int64_t layer = 0; layer < L; ++layer) {
    add(W, 2 * h * kF32);  // input and post-attention norms
    for (int mi = 0; mi < kNumModules; ++mi) {
      const Module m = static_cast<Module>(mi);
      const auto shape = module_shape(c, m);
      const int64_t n = shape[0] * shape[1];
      max_in_plus_out = std::max(max_in_plus_out, shape[0] + shape[1]);
      const bool quantized = nf4 && !o.stored_dense_linears.count({layer, m});
      add(W, quantized ? ceil_div(n, 2) + block_constants_bytes(ceil_div(n, kNf4Blocksize)) : n * dense_bytes);
      if (module_has_bias(c, m)) add(W, shape[0] * kF32);
    }
  }

  // LoraAdapter: A [r, in] and B [out, r] with gradients of the same shapes; AdamW: exp_avg and exp_avg_sq.
  for (Module m : targets) {
    const auto shape = module_shape(c, m);
    e.lora_parameters += L * o.rank * (shape[0] + shape[1]);
  }
  add(Ad, e.lora_parameters * kF32);
  add(G, e.lora_parameters * kF32);
  if (o.with_optimizer) {
    add(Opt, 2 * e.lora_parameters * kF32);
    e.optimizer_page_bytes = 2 * (e.lora_parameters / L) * kF32;
  }

  // LlamaModel::run with gradients: only block inputs are freed before the run ends (as backward is done with
  // them), so each category peaks at the sum of its buffers as backward starts.
  const int64_t n = o.batch * o.seq;
  const int64_t r = o.rank;
  const int64_t targets_count = static_cast<int64_t>(targets.size());
  // Workspace: one dequantized weight (in the format the GEMM takes it), rope tables, dropout and LoRA scratch, one
  // chunk of logits.
  const FloatFormat takes = o.cuda ? compute_format(o.compute) : FloatFormat::F32;
  add(Ws, max_weight_rows * float_format_bytes(takes));
  // with checkpointing, the weights a block's recomputed forward dequantizes and its backward reads again (q k v o
  // gate up, fused with LoRA both ways: NF4, more rows than generation's, no LoRA dropout), in rows with room for B
  // beside and A under them (LlamaModel::keeps_weight)
  const bool fused_both_ways =
      nf4 && lora_columns > 0 && o.batch * o.seq > kNf4MatmulMaxRows && !(o.lora_dropout > 0.0);
  if (o.gradient_checkpointing && fused_both_ways)
    for (Module m : kRecomputedModules)
      if (targets.count(m) > 0) {
        const auto shape = module_shape(c, m);
        add(Ws, (shape[0] + lora_columns) * (shape[1] + lora_columns) * float_format_bytes(takes));
      }
  // its block constants restored, for a dequantization into fp32 (into 16 bits they are restored as they are read)
  if (nf4 && double_quant && takes == FloatFormat::F32) add(Ws, ceil_div(largest_linear, kNf4Blocksize) * kF32);
  add(Ws, 2 * o.seq * (c.head_dim / 2) * kF32);
  if (o.lora_dropout > 0.0) add(Ws, n * widest_in * kF32);  // dropx: drop(x) of the widest input
  add(Ws, n * r * kF32);                  // lora_dt
  const int64_t logits_rows = loss_chunk_rows(n, vocab);
  add(Ws, logits_rows * vocab * kF32);
  add(Ws, n * (4 + 8));  // every row's target and log-prob
  if (o.cuda) {
    add(Ws, kCudaGemmWorkspaceBytes);
    add(Ws, o.batch * c.num_heads * o.seq * kF32);  // attention backward's row dots D_i
    // KernelBackend::gemm_stored: a weight-side operand (the LM head, or a linear: NF4 dequantized straight into
    // the format the GEMM takes, or dense as stored) not in that format is converted whole. With half compute both
    // operands of every GEMM are 16 bits: the row side (a chunk of logits' gradient, or a linear's input with room
    // for LoRA's columns, with drop(input) as LoRA's down projection reads it where q, k, v or gate and up share the
    // input, and in backward a linear's input and output gradient at once) and the other (a converted weight, or an
    // n x r LoRA product with a LoRA factor, both converted while a shared row-side copy lives).
    const FloatFormat linear = nf4 ? takes : dense;
    const int64_t weight_side = std::max(dense != takes ? vocab * h : 0, linear != takes ? largest_linear : 0);
    if (o.compute == GpuCompute::F32) {
      add(Ws, weight_side * kF32);
    } else {
      const int64_t row_side = std::max(logits_rows * vocab, n * (std::max(max_in_plus_out, 2 * h) + lora_columns));
      add(Ws, 2 * (row_side + std::max(weight_side, n * r + r * widest_in)));
    }
  }
  // Activations: the final norm, the block inputs backward still holds, the blocks' saved tensors (all of them
  // without checkpointing, one block's worth with it), then the backward pass's buffers.
  add(Act, (n * h + n) * kF32);        // xf, rstdf
  // Block inputs (HiddenStates): the final hidden state is released after the loss, so backward's peak holds the L
  // block inputs less those offloaded (the lowest k <= L - 2: the last ones come back, prefetched, only after the
  // top ones are released). Under bf16 compute they are stored in bf16 (widened into two fp32 buffers as blocks read
  // them), unless every block's activations are kept.
  const bool keep_all = !o.gradient_checkpointing;
  const bool packed = o.cuda && o.compute == GpuCompute::BF16 && !keep_all;
  const int64_t state_bytes = n * h * (packed ? 2 : kF32);
  const int64_t movable = keep_all ? 0 : movable_block_inputs(L);
  const int64_t offloaded = std::clamp<int64_t>(o.offload_block_inputs, 0, movable);
  add(Act, (L - offloaded) * state_bytes);
  if (packed) add(Act, 2 * n * h * kF32);
  if (o.cuda && o.compute == GpuCompute::BF16 && keep_all) add(Ws, n * h * 2);  // the rounding's 16-bit scratch
  e.activation_page_bytes = state_bytes;
  e.offloadable_activation_bytes = movable * state_bytes;
  // Under half compute on the GPU (more rows than generation's few) xn1 and xn2 are held as 16-bit rows alone with
  // room for LoRA's columns, g and u too where gate and up are fused GEMMs (NF4, adapted, no bias), and m where
  // down's input gradient, written in its place, is one fused GEMM (NF4, adapted, no LoRA dropout):
  // LlamaModel::half_row_buffers.
  const bool half_rows = o.cuda && o.compute != GpuCompute::F32 && n > kNf4MatmulMaxRows;
  auto floats = [&](int64_t cols, bool half) { return half ? (n * (cols + lora_columns) + 1) / 2 : n * cols; };
  const bool xn_half = half_rows && lora_columns <= h;
  auto fused_half = [&](Module m) {
    return half_rows && nf4 && targets.count(m) > 0 && !module_has_bias(c, m) && lora_columns <= inter;
  };
  const bool m_half = half_rows && nf4 && targets.count(Module::Down) > 0 && !(o.lora_dropout > 0.0) &&
                      lora_columns <= inter;
  const int64_t block = 2 * floats(h, xn_half) + n * h + n * 2 + n * qd * 2 + n * kd * 2 + n * c.num_heads +
                        floats(inter, fused_half(Module::Gate)) + floats(inter, fused_half(Module::Up)) +
                        floats(inter, m_half) +
                        targets_count * n * r;  // xn1 xn2, h, rstd1/2, q attn, k v, lse, g, u, m, lora_t
  add(Act, (keep_all ? L : 1) * block * kF32);
  add(Act, 2 * n * h * kF32);                          // d_cur, d_next (the latter also the final norm's dxf)
  add(Act, (2 * n * h + 2 * n * qd + 2 * n * kd) * kF32);  // dxn dh, dattn dq, dk dv (dm, dg, du take m's, g's, u's place)

  for (int64_t b : e.bytes) e.peak_total += b;
  return e;
}

}  // namespace qlora
