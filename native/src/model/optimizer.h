// AdamW over the LoRA parameters with fp32 state, and global gradient-norm clipping (torch.nn.utils.
// clip_grad_norm_ semantics: scale every gradient by max_norm / (norm + 1e-6) when the norm exceeds max_norm).
// The state is paged (model/optimizer_pages.h): under a memory budget it moves between device and host memory, and
// the numbers are the same wherever it is.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/lora.h"
#include "model/optimizer_pages.h"

namespace qlora {

struct AdamWOptions {
  double lr = 2e-4;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 0.0;  // 0 or less: no clipping
  // The loss scale the gradients were computed with (RunOptions::loss_scale): divided out before clipping and the
  // update. With skip_non_finite, gradients that overflowed (a non-finite norm) skip the update instead of failing:
  // fp16's dynamic loss scaling then lowers the scale and goes on.
  double loss_scale = 1.0;
  bool skip_non_finite = false;
};

struct StepReport {
  double grad_norm = 0.0;  // before clipping
  bool clipped = false;
  int64_t step = 0;        // the optimizer step just taken (1-based)
  bool skipped = false;    // skip_non_finite and the gradients were not finite: nothing was updated
};

class AdamW {
 public:
  AdamW(Backend* backend, LoraAdapter* adapter);
  // One update from the gradients accumulated in the adapter. A non-finite gradient norm is an error and leaves the
  // parameters untouched.
  StepReport step(const AdamWOptions& options);
  int64_t steps_taken() const { return step_; }
  // The optimizer state as one safetensors file: `<PEFT name>.exp_avg` and `.exp_avg_sq` per parameter and the
  // step count in the metadata (written atomically). load() checks every name and shape against this adapter.
  void save(const std::string& path) const;
  void load(const std::string& path);
  static double global_grad_norm(Backend* backend, LoraAdapter* adapter);
  OptimizerPages& pages() { return *pages_; }

 private:
  Backend* backend_;
  LoraAdapter* adapter_;
  std::unique_ptr<OptimizerPages> pages_;
  int64_t step_ = 0;
};

}  // namespace qlora
