// Memory a QLoRA training step needs, by category, from config.json alone: the same buffers, of the same sizes,
// that LlamaModel::load, LoraAdapter, AdamW and LlamaModel::run allocate on the CPU backend (activations fp32,
// frozen dense weights in the format config.json's dtype names, NF4 codes one byte per two weights and one fp32
// absmax per block of 64). The CUDA path allocates through the same model code, so the numbers carry over as long
// as its buffers keep these shapes.
#pragma once
#include <array>
#include <cstdint>
#include <set>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "cuda/cuda_backend.h"
#include "io/model_config.h"
#include "model/lora.h"

namespace qlora {

struct EstimateOptions {
  int64_t batch = 1;
  int64_t seq = 512;
  int64_t rank = 8;
  std::vector<Module> targets = {Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down};
  // Dense linear weights quantized to NF4 on load (LoadOptions::quantize_nf4); a bnb-4bit checkpoint is NF4 either
  // way (stored_4bit).
  bool quantize_nf4 = true;
  bool stored_4bit = false;
  // Of a bnb-4bit checkpoint (stored_4bit), the linears stored unquantized (llm_int8_skip_modules), which stay
  // dense: (layer, module) pairs.
  std::set<std::pair<int64_t, Module>> stored_dense_linears;
  bool gradient_checkpointing = true;
  // RunOptions::offload_block_inputs (with checkpointing): the inputs of the lowest blocks move to host memory
  // between their forward and their backward (at most L - 2 of them count).
  int64_t offload_block_inputs = 0;
  bool with_optimizer = true;  // AdamW's two fp32 moments per LoRA parameter
  // LoRA dropout (during training): a workspace for drop(x) of the widest input, and on the GPU under half compute
  // SwiGLU's output at its fp32 size, since down's input gradient, written in its place, is then not one fused GEMM
  // held in 16 bits.
  double lora_dropout = 0.0;
  // On the CUDA backend: its GEMM workspace and the attention backward's row dots (cuda/kernel_backend.h) too,
  // and the converted copies of the largest GEMM's inputs that the compute dtype asks for.
  bool cuda = false;
  GpuCompute compute = GpuCompute::F32;
};

struct MemoryEstimate {
  // Peak bytes per category over a training step (run with gradients, then the optimizer update): weights,
  // adapters, gradients and optimizer are constant; activations and workspace peak as the backward pass starts (at
  // the model's last block), when every buffer of the run is held at once (of the block inputs, those not offloaded).
  std::array<int64_t, static_cast<size_t>(MemCategory::Count)> bytes{};
  int64_t peak_total = 0;       // all categories at once (each peaks as backward starts)
  int64_t lora_parameters = 0;  // A and B elements over all layers and targets
  // The paged optimizer's page: AdamW's two moments of one layer's LoRA parameters (0 without the optimizer).
  int64_t optimizer_page_bytes = 0;
  // One checkpointed block input (an activation page), and how much less a step holds with every block input that
  // can move offloaded (L - 2 of them; 0 without checkpointing); the estimate's own figures are with the options'
  // offload_block_inputs.
  int64_t activation_page_bytes = 0;
  int64_t offloadable_activation_bytes = 0;
  // Host memory the engine holds on the GPU beside the categories (0 on the CPU, whose every byte is in them): an
  // untied embedding table kept there (Backend::keeps_embedding_on_host) and the page-locked buffer a step gathers
  // its rows in. Pages moved out under a budget come on top.
  int64_t host_bytes = 0;

  int64_t operator[](MemCategory c) const { return bytes[static_cast<size_t>(c)]; }
};

// The format LlamaModel::load keeps the embedding, the LM head and unquantized linear weights in, as config.json's
// dtype names the file's (fp32 when it names none).
FloatFormat dense_weight_format(const ModelConfig& config);

// Throws EngineError for non-positive batch, seq or rank, no targets, or a sequence longer than the model's
// sliding window (which LlamaModel::run refuses).
MemoryEstimate estimate_memory(const ModelConfig& config, const EstimateOptions& options);

}  // namespace qlora
