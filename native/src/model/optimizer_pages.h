// The paged optimizer's state: AdamW's exp_avg and exp_avg_sq of every LoRA parameter, in pages of one decoder
// layer each. A page stays in device memory while the memory budget allows; when an allocation would go over the
// budget (the activations of a long batch, say) pages move out to host memory (the most recently used first: the
// update visits them in order), and the optimizer step moves each page back in before it updates that layer, the
// next page's copy running, where there is room, while the current one is updated. This is what bitsandbytes' paged optimizers do with CUDA unified memory, done with
// explicit copies so that every move is seen, timed and reported (Backend::take_page_moves).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace qlora {

class OptimizerPages {
 public:
  // sizes[i], layers[i]: element count and decoder layer of parameter i, in the optimizer's order (a layer's
  // parameters are consecutive). Pages start in device memory as far as the budget allows and in host memory after
  // that, all zero. Registers itself as the backend's memory-pressure handler.
  OptimizerPages(Backend* backend, const std::vector<int64_t>& sizes, const std::vector<int64_t>& layers);
  ~OptimizerPages();
  OptimizerPages(const OptimizerPages&) = delete;
  OptimizerPages& operator=(const OptimizerPages&) = delete;

  size_t num_pages() const { return pages_.size(); }
  const std::vector<size_t>& params_of(size_t page) const { return pages_[page].params; }
  int64_t page_bytes(size_t page) const { return pages_[page].floats * static_cast<int64_t>(sizeof(float)); }

  // Makes the page resident (moving it in, or waiting for its prefetch) and keeps it there until release(page).
  void acquire(size_t page);
  void release(size_t page);
  // Starts moving a page in, if it is out and there is free room for it under the budget, so that a later acquire
  // finds it ready.
  void prefetch(size_t page);
  // Device pointers to a parameter's exp_avg and exp_avg_sq; valid while its page is held.
  float* exp_avg(size_t param);
  float* exp_avg_sq(size_t param);

  // Moves resident pages that are not held out to host memory, most recently used first, until at least `bytes`
  // are freed or none is left; returns the bytes freed.
  int64_t evict(int64_t bytes);

  // A parameter's state wherever its page is (for checkpoints): which = 0 for exp_avg, 1 for exp_avg_sq.
  std::vector<float> read(size_t param, int which);
  void write(size_t param, int which, const std::vector<float>& values);

  int64_t resident_bytes() const;
  int64_t paged_out_bytes() const;

 private:
  enum class State { Resident, Incoming, Out };
  struct Page {
    std::string name;
    std::vector<size_t> params;
    int64_t floats = 0;
    State state = State::Resident;
    DeviceArray<float> device;
    HostBuffer host;        // allocated the first time the page moves out (or at start when it starts out)
    int64_t ticket = -1;    // the copy in flight while Incoming
    bool held = false;
    uint64_t last_use = 0;
  };
  void ensure_host(Page& page);
  static float* host_floats(Page& page);
  void page_out(Page& page);
  void finish_incoming(Page& page);
  float* device_ptr(size_t param, int which);

  Backend* backend_;
  std::vector<Page> pages_;
  std::vector<size_t> page_of_;     // per parameter
  std::vector<int64_t> offset_;     // per parameter: exp_avg at offset, exp_avg_sq at offset + size
  std::vector<int64_t> size_;       // per parameter
  uint64_t clock_ = 0;
};

}  // namespace qlora
