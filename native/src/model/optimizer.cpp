#include "model/optimizer.h"

#include <cmath>

#include "io/safetensors.h"
#include "util/error.h"

namespace qlora {

AdamW::AdamW(Backend* backend, LoraAdapter* adapter) : backend_(backend), adapter_(adapter) {
  for (auto& [param, grad] : adapter_->parameters_and_grads()) {
    (void)grad;
    m_.emplace_back(backend, param->size(), MemCategory::Optimizer);
    v_.emplace_back(backend, param->size(), MemCategory::Optimizer);
    backend->fill_zero(m_.back().get(), param->size());
    backend->fill_zero(v_.back().get(), param->size());
  }
}

double AdamW::global_grad_norm(Backend* backend, LoraAdapter* adapter) {
  double total = 0.0;
  for (auto& [param, grad] : adapter->parameters_and_grads()) {
    (void)param;
    total += backend->sum_of_squares(grad->get(), grad->size());
  }
  return std::sqrt(total);
}

StepReport AdamW::step(const AdamWOptions& o) {
  StepReport report;
  report.grad_norm = global_grad_norm(backend_, adapter_);
  if (!std::isfinite(report.grad_norm))
    fail("gradient norm is ", report.grad_norm, " (not finite); the parameters were not updated");
  double grad_scale = 1.0;
  if (o.max_grad_norm > 0.0) {
    const double coef = o.max_grad_norm / (report.grad_norm + 1e-6);
    if (coef < 1.0) {
      grad_scale = coef;
      report.clipped = true;
    }
  }
  ++step_;
  auto params = adapter_->parameters_and_grads();
  for (size_t i = 0; i < params.size(); ++i)
    backend_->adamw_update(params[i].first->get(), params[i].second->get(), m_[i].get(), v_[i].get(),
                           params[i].first->size(), o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, step_, grad_scale);
  report.step = step_;
  return report;
}

void AdamW::save(const std::string& path) const {
  SafetensorsWriter writer;
  writer.set_metadata("format", "qlora-studio-adamw");
  writer.set_metadata("step", std::to_string(step_));
  const std::vector<std::string> names = adapter_->parameter_names();
  for (size_t i = 0; i < names.size(); ++i) {
    writer.add_f32(names[i] + ".exp_avg", {m_[i].size()}, m_[i].download());
    writer.add_f32(names[i] + ".exp_avg_sq", {v_[i].size()}, v_[i].download());
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
  for (size_t i = 0; i < names.size(); ++i) {
    m_[i].upload(store->read_f32(names[i] + ".exp_avg", {m_[i].size()}));
    v_[i].upload(store->read_f32(names[i] + ".exp_avg_sq", {v_[i].size()}));
  }
  try {
    step_ = std::stoll(step->second);
  } catch (const std::exception&) {
    fail(path, ": step '", step->second, "' in its metadata is not a number");
  }
}

}  // namespace qlora
