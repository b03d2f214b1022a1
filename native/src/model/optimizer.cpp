#include "model/optimizer.h"

#include <algorithm>
#include <cmath>

#include "io/safetensors.h"
#include "util/error.h"

namespace qlora {

AdamW::AdamW(Backend* backend, LoraAdapter* adapter) : backend_(backend), adapter_(adapter) {
  // parameters_and_grads() runs layer by layer (layer, module, A then B): a page per layer.
  std::vector<int64_t> sizes, layers;
  const auto params = adapter_->parameters_and_grads();
  const size_t per_layer = params.size() / static_cast<size_t>(std::max<int64_t>(1, adapter_->num_layers()));
  for (size_t i = 0; i < params.size(); ++i) {
    sizes.push_back(params[i].first->size());
    layers.push_back(static_cast<int64_t>(i / std::max<size_t>(1, per_layer)));
  }
  pages_ = std::make_unique<OptimizerPages>(backend, sizes, layers);
}

namespace {

std::vector<std::pair<const float*, int64_t>> gradients_of(LoraAdapter* adapter) {
  std::vector<std::pair<const float*, int64_t>> grads;
  for (auto& [param, grad] : adapter->parameters_and_grads()) {
    (void)param;
    grads.emplace_back(grad->get(), grad->size());
  }
  return grads;
}

// The GradScale the device computed, once the work queued before it is done.
GradScale read_back(const DeviceArray<GradScale>& scale) { return scale.download().at(0); }

}  // namespace

double AdamW::global_grad_norm(Backend* backend, LoraAdapter* adapter) {
  DeviceArray<GradScale> scale(backend, 1, MemCategory::Workspace);
  backend->grad_scale(gradients_of(adapter), 1.0, 0.0, scale.get());
  return read_back(scale).norm;
}

StepReport AdamW::step(const AdamWOptions& o) {
  if (!(o.loss_scale > 0.0) || !std::isfinite(o.loss_scale)) fail("loss scale must be a positive number, got ", o.loss_scale);
  // The gradient norm, the clip coefficient and whether to update at all are the device's to compute and the
  // update's to read there: the update is queued behind the norm with no wait for the host between them, and the
  // host reads the norm once, at the end (a step whose norm is not finite has written nothing).
  DeviceArray<GradScale> scale(backend_, 1, MemCategory::Workspace);
  backend_->grad_scale(gradients_of(adapter_), o.loss_scale, o.max_grad_norm, scale.get());
  StepReport report;
  auto not_finite = [&](const GradScale& s) {
    report.grad_norm = s.norm;
    if (!o.skip_non_finite) fail("gradient norm is ", report.grad_norm, " (not finite); the parameters were not updated");
    report.skipped = true;
    report.step = step_;
    return report;
  };
  // Where the update moves pages, a step to be skipped is known first (one wait for the device, small beside the
  // copies) and moves none.
  if (pages_->paged_out_bytes() > 0) {
    const GradScale early = read_back(scale);
    if (!early.finite) return not_finite(early);
  }
  // The step count moves on only when every page was updated; a step that fails halfway (a device error) leaves
  // the optimizer part-updated, and the trainer stops the run at its last checkpoint.
  const int64_t step = step_ + 1;
  auto params = adapter_->parameters_and_grads();
  OptimizerPages& pages = *pages_;
  std::vector<AdamWTensor> tensors;
  for (size_t page = 0; page < pages.num_pages(); ++page) {
    pages.acquire(page);
    if (page + 1 < pages.num_pages()) pages.prefetch(page + 1);  // its copy runs while this page is updated
    tensors.clear();
    for (size_t i : pages.params_of(page))
      tensors.push_back({params[i].first->get(), params[i].second->get(), pages.exp_avg(i), pages.exp_avg_sq(i),
                         params[i].first->size()});
    backend_->adamw_update_many(tensors, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, step, scale.get());
    pages.release(page);
  }
  const GradScale s = read_back(scale);
  if (!s.finite) return not_finite(s);
  report.grad_norm = s.norm;
  report.clipped = s.clipped != 0;
  step_ = step;
  report.step = step_;
  return report;
}

void AdamW::save(const std::string& path) const {
  SafetensorsWriter writer;
  writer.set_metadata("format", "qlora-studio-adamw");
  writer.set_metadata("step", std::to_string(step_));
  const std::vector<std::string> names = adapter_->parameter_names();
  for (size_t i = 0; i < names.size(); ++i) {
    const std::vector<float> m = pages_->read(i, 0);
    writer.add_f32(names[i] + ".exp_avg", {static_cast<int64_t>(m.size())}, m);
    writer.add_f32(names[i] + ".exp_avg_sq", {static_cast<int64_t>(m.size())}, pages_->read(i, 1));
  }
  writer.write(path);
}

void AdamW::load(const std::string& path) {
  const auto file = SafetensorsFile::open(path);
  const auto& meta = file->metadata();
  const auto step = meta.find("step");
  if (step == meta.end()) fail(path, ": not an optimizer state file (no step in its metadata)");
  const auto store = TensorStore::open_file(path);
  const std::vector<std::string> names = adapter_->parameter_names();
  if (store->names().size() != 2 * names.size())
    fail(path, ": holds ", store->names().size(), " tensors, expected ", 2 * names.size(), " for this adapter");
  const auto params = adapter_->parameters_and_grads();
  for (size_t i = 0; i < names.size(); ++i) {
    const int64_t n = params[i].first->size();
    pages_->write(i, 0, store->read_f32(names[i] + ".exp_avg", {n}));
    pages_->write(i, 1, store->read_f32(names[i] + ".exp_avg_sq", {n}));
  }
  try {
    step_ = std::stoll(step->second);
  } catch (const std::exception&) {
    fail(path, ": step '", step->second, "' in its metadata is not a number");
  }
}

}  // namespace qlora
