#include "model/optimizer_pages.h"

#include <algorithm>
#include <cstring>
#include <exception>

#include "util/error.h"

namespace qlora {

OptimizerPages::OptimizerPages(Backend* backend, const std::vector<int64_t>& sizes,
                               const std::vector<int64_t>& layers)
    : backend_(backend), size_(sizes) {
  QLORA_CHECK(sizes.size() == layers.size(), "sizes and layers differ in length");
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (pages_.empty() || layers[i] != layers[i - 1]) {
      pages_.emplace_back();
      pages_.back().name = "model.layers." + std::to_string(layers[i]) + ".optimizer";
    }
    Page& page = pages_.back();
    page_of_.push_back(pages_.size() - 1);
    offset_.push_back(page.floats);
    page.params.push_back(i);
    page.floats += 2 * sizes[i];
  }
  for (Page& page : pages_) {
    const int64_t bytes = page.floats * static_cast<int64_t>(sizeof(float));
    if (!backend_->has_room(bytes)) {
      // No room now: the page starts out, zero, in host memory (nothing moved, so no page event).
      ensure_host(page);
      std::memset(page.host.get(), 0, static_cast<size_t>(bytes));
      page.state = State::Out;
    } else {
      page.device.reset(backend_, page.floats, MemCategory::Optimizer);
      backend_->fill_zero(page.device.get(), page.floats);
    }
  }
  backend_->set_pressure_handler([this](int64_t bytes) { return evict(bytes); });
}

OptimizerPages::~OptimizerPages() {
  backend_->set_pressure_handler(nullptr);
  // A destructor must not throw (that would end the process): a failing device call here has nothing left to save.
  for (Page& page : pages_) {
    try {
      if (page.state == State::Incoming) backend_->finish_page_copy(page.ticket);
      page.device.release();
      page.host.release();
    } catch (const std::exception&) {
    }
  }
}

void OptimizerPages::ensure_host(Page& page) {
  page.host.ensure(backend_, static_cast<size_t>(page.floats) * sizeof(float));
}

float* OptimizerPages::host_floats(Page& page) { return static_cast<float*>(page.host.get()); }

void OptimizerPages::page_out(Page& page) {
  ensure_host(page);
  const int64_t bytes = page.floats * static_cast<int64_t>(sizeof(float));
  const int64_t ticket =
      backend_->begin_page_copy(page.host.get(), page.device.get(), static_cast<size_t>(bytes), PageDir::Out);
  const double ms = backend_->finish_page_copy(ticket);  // the device memory is reused as soon as it is freed
  page.device.release();
  page.state = State::Out;
  backend_->record_page_move({PageDir::Out, page.name, bytes, ms});
}

void OptimizerPages::finish_incoming(Page& page) {
  const double ms = backend_->finish_page_copy(page.ticket);
  page.ticket = -1;
  page.state = State::Resident;
  backend_->record_page_move({PageDir::In, page.name, page.floats * static_cast<int64_t>(sizeof(float)), ms});
}

int64_t OptimizerPages::evict(int64_t bytes) {
  int64_t freed = 0;
  while (freed < bytes) {
    // The most recently used page goes first. The update visits the pages in order, every step: a page just updated
    // is needed again only after all the others, so least-recently-used would move out exactly the page needed next
    // (and every page would move out and back in every step).
    Page* victim = nullptr;
    for (Page& page : pages_)
      if (page.state == State::Resident && !page.held && (!victim || page.last_use > victim->last_use)) victim = &page;
    if (!victim) break;
    freed += victim->floats * static_cast<int64_t>(sizeof(float));
    page_out(*victim);
  }
  return freed;
}

void OptimizerPages::prefetch(size_t index) {
  Page& page = pages_.at(index);
  if (page.state != State::Out) return;
  // Only into free room: moving another page out to bring this one in early would gain nothing.
  const int64_t bytes = page.floats * static_cast<int64_t>(sizeof(float));
  if (!backend_->has_room(bytes)) return;
  page.device.reset(backend_, page.floats, MemCategory::Optimizer);
  page.ticket = backend_->begin_page_copy(page.device.get(), page.host.get(), static_cast<size_t>(bytes), PageDir::In);
  page.state = State::Incoming;
}

void OptimizerPages::acquire(size_t index) {
  Page& page = pages_.at(index);
  if (page.state == State::Out) {
    page.held = true;  // not a candidate while its own allocation makes room
    try {
      page.device.reset(backend_, page.floats, MemCategory::Optimizer);  // may move other pages out
    } catch (...) {
      page.held = false;
      throw;
    }
    page.ticket = backend_->begin_page_copy(page.device.get(), page.host.get(),
                                            static_cast<size_t>(page.floats) * sizeof(float), PageDir::In);
    page.state = State::Incoming;
  }
  if (page.state == State::Incoming) finish_incoming(page);
  page.held = true;
  page.last_use = ++clock_;
}

void OptimizerPages::release(size_t index) { pages_.at(index).held = false; }

float* OptimizerPages::device_ptr(size_t param, int which) {
  Page& page = pages_.at(page_of_.at(param));
  QLORA_CHECK(page.held && page.state == State::Resident, "optimizer page ", page.name, " used without acquire()");
  return page.device.get() + offset_[param] + (which ? size_[param] : 0);
}

float* OptimizerPages::exp_avg(size_t param) { return device_ptr(param, 0); }
float* OptimizerPages::exp_avg_sq(size_t param) { return device_ptr(param, 1); }

std::vector<float> OptimizerPages::read(size_t param, int which) {
  Page& page = pages_.at(page_of_.at(param));
  if (page.state == State::Incoming) finish_incoming(page);
  std::vector<float> out(static_cast<size_t>(size_[param]));
  const int64_t at = offset_[param] + (which ? size_[param] : 0);
  if (page.state == State::Out)
    std::memcpy(out.data(), host_floats(page) + at, out.size() * sizeof(float));
  else
    backend_->download(out.data(), page.device.get() + at, out.size() * sizeof(float));
  return out;
}

void OptimizerPages::write(size_t param, int which, const std::vector<float>& values) {
  QLORA_CHECK(static_cast<int64_t>(values.size()) == size_.at(param), "optimizer state of ", values.size(),
              " values for a parameter of ", size_[param]);
  Page& page = pages_.at(page_of_.at(param));
  if (page.state == State::Incoming) finish_incoming(page);
  const int64_t at = offset_[param] + (which ? size_[param] : 0);
  if (page.state == State::Out)
    std::memcpy(host_floats(page) + at, values.data(), values.size() * sizeof(float));
  else
    backend_->upload(page.device.get() + at, values.data(), values.size() * sizeof(float));
}

int64_t OptimizerPages::resident_bytes() const {
  int64_t bytes = 0;
  for (const Page& page : pages_)
    if (page.state != State::Out) bytes += page.floats * static_cast<int64_t>(sizeof(float));
  return bytes;
}

int64_t OptimizerPages::paged_out_bytes() const {
  int64_t bytes = 0;
  for (const Page& page : pages_)
    if (page.state == State::Out) bytes += page.floats * static_cast<int64_t>(sizeof(float));
  return bytes;
}

}  // namespace qlora
