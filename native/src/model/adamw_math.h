// One AdamW update of one parameter, in double, for the CPU reference (cpu/kernels.h) and the GPU kernel
// (cuda/kernels.cuh) alike: torch.optim.AdamW's semantics, p -= lr*wd*p (decoupled), m = b1 m + (1-b1) g,
// v = b2 v + (1-b2) g^2, p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps).
#pragma once
#include <cmath>
#include <cstdint>

#include "util/host_device.h"

namespace qlora {

// The constants of step t, computed once per update: step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t).
struct AdamWStep {
  double lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, grad_scale;
};

// The constants of step `step` (from 1), on the host.
inline AdamWStep adamw_step_constants(double lr, double beta1, double beta2, double eps, double weight_decay,
                                      int64_t step, double grad_scale) {
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  return AdamWStep{lr, beta1, beta2, eps, weight_decay, lr / bc1, std::sqrt(bc2), grad_scale};
}

// What a step's gradients make of its update, computed where the gradients are (on the GPU, without a wait for the
// host between backward and the update): the host reads it once the update is queued.
struct GradScale {
  double norm;      // the global gradient norm of the unscaled loss: sqrt(sum of squares) / loss_scale
  double scale;     // what the update multiplies each gradient by: 1 / loss_scale, times the clip coefficient
  int32_t finite;   // 0: the norm is NaN or infinite, and the update leaves every parameter and moment as it was
  int32_t clipped;  // 1: the clip coefficient max_grad_norm / (norm + 1e-6) was below 1 and applied
};

// The GradScale of gradients whose squares sum to sum_of_squares (max_grad_norm <= 0: no clipping), in the order of
// torch's clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), applied where below 1).
QLORA_HOST_DEVICE inline GradScale make_grad_scale(double sum_of_squares, double loss_scale, double max_grad_norm) {
  GradScale g{};
  g.norm = sqrt(sum_of_squares) / loss_scale;
  g.finite = g.norm - g.norm == 0.0 ? 1 : 0;  // NaN - NaN and inf - inf are NaN (isfinite without std:: either side)
  g.scale = 1.0 / loss_scale;
  if (g.finite && max_grad_norm > 0.0) {
    const double coef = max_grad_norm / (g.norm + 1e-6);
    if (coef < 1.0) {
      g.scale *= coef;
      g.clipped = 1;
    }
  }
  return g;
}

// param, m and v in and out; `grad` before grad_scale (clipping and loss scaling).
QLORA_HOST_DEVICE inline void adamw_element(const AdamWStep& s, double grad, double& param, double& m, double& v) {
  const double g = grad * s.grad_scale;
  const double p = param * (1.0 - s.lr * s.weight_decay);
  m = s.beta1 * m + (1.0 - s.beta1) * g;
  v = s.beta2 * v + (1.0 - s.beta2) * g * g;
  param = p - s.step_size * m / (sqrt(v) / s.bc2_sqrt + s.eps);
}

}  // namespace qlora
