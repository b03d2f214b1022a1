#include "model/hidden_states.h"

#include <algorithm>
#include <exception>
#include <string>

#include "util/error.h"

namespace qlora {

void round_through_16(Backend* backend, float* x, int64_t n, FloatFormat format, uint16_t* bits) {
  backend->pack_16(x, n, format, bits);
  backend->widen_16(bits, n, format, x);
}

HiddenStates::HiddenStates(Backend* backend, const HiddenStatesOptions& o, std::vector<HostBuffer>* host)
    : backend_(backend),
      count_(o.count),
      size_(o.size),
      format_(o.format),
      packed_(o.format != FloatFormat::F32 && !o.keep_fp32),
      // the saved activations of every block point at their inputs: nothing of those can move
      offload_(o.keep_fp32 ? 0 : std::clamp<int64_t>(o.offload, 0, movable_block_inputs(o.count - 1))),
      host_(host),
      states_(static_cast<size_t>(o.count)) {
  QLORA_CHECK(offload_ == 0 || host_, "offloaded hidden states need host buffers");
  if (packed_) {
    for (auto& w : wide_) w.reset(backend, size_, MemCategory::Activations);
  } else if (format_ != FloatFormat::F32) {
    rounding_.reset(backend, size_, MemCategory::Workspace);
  }
  if (offload_ > 0 && static_cast<int64_t>(host_->size()) < offload_) host_->resize(static_cast<size_t>(offload_));
}

HiddenStates::~HiddenStates() {
  // A destructor must not throw; a copy that fails here has nothing left to save (its state dies with the run).
  for (State& s : states_) {
    try {
      if (s.where == Where::Outgoing || s.where == Where::Incoming) backend_->finish_page_copy(s.ticket);
    } catch (const std::exception&) {
    }
  }
}

HiddenStates::State& HiddenStates::at(int64_t l) {
  QLORA_CHECK(l >= 0 && l < count_, "hidden state ", l, " of ", count_);
  return states_[static_cast<size_t>(l)];
}

void HiddenStates::allocate(State& s) {
  s.device.reset(backend_, state_bytes(), MemCategory::Activations);
  s.where = Where::Resident;
}

void* HiddenStates::host_of(int64_t l) {
  HostBuffer& h = (*host_)[static_cast<size_t>(l)];
  // a quarter more than this run needs: micro-batches padded to their longest example grow a little at a time, and
  // page-locking anew (and the GPU stall of unlocking) at each new longest would cost more than the slack
  const auto bytes = static_cast<size_t>(state_bytes());
  if (h.bytes() < bytes) h.ensure(backend_, bytes + bytes / 4);
  return h.get();
}

void HiddenStates::record(PageDir dir, int64_t l, double ms) {
  backend_->record_page_move({dir, "model.layers." + std::to_string(l) + ".input", state_bytes(), ms});
}

// A copy in flight ends: an outgoing state's device memory is freed (it lives in host memory now), an incoming one
// is resident.
void HiddenStates::finish_copy(int64_t l) {
  State& s = at(l);
  if (s.where != Where::Outgoing && s.where != Where::Incoming) return;
  const double ms = backend_->finish_page_copy(s.ticket);
  s.ticket = -1;
  if (s.where == Where::Outgoing) {
    s.device.release();
    s.where = Where::Out;
    record(PageDir::Out, l, ms);
  } else {
    s.where = Where::Resident;
    record(PageDir::In, l, ms);
  }
}

void HiddenStates::finish_outgoing() {
  for (int64_t l = 0; l < count_; ++l)
    if (states_[static_cast<size_t>(l)].where == Where::Outgoing) finish_copy(l);
}

float* HiddenStates::output(int64_t l) {
  if (packed_) {
    holds_[l % 2] = l;
    return wide_[l % 2].get();
  }
  State& s = at(l);
  if (s.where == Where::Absent) allocate(s);
  return reinterpret_cast<float*>(s.device.get());
}

void HiddenStates::commit(int64_t l) {
  // The previous state's copy has had a block's time to run: its device memory is free for this one.
  finish_outgoing();
  State& s = at(l);
  if (packed_) {
    if (s.where == Where::Absent) allocate(s);
    round_through_16(backend_, wide_[l % 2].get(), size_, format_, reinterpret_cast<uint16_t*>(s.device.get()));
  } else if (format_ != FloatFormat::F32) {
    round_through_16(backend_, reinterpret_cast<float*>(s.device.get()), size_, format_, rounding_.get());
  }
  if (l < offloaded_below()) {
    s.ticket = backend_->begin_page_copy(host_of(l), s.device.get(), static_cast<size_t>(state_bytes()), PageDir::Out);
    s.where = Where::Outgoing;
  }
}

void HiddenStates::bring_in(int64_t l) {
  State& s = at(l);
  if (s.where == Where::Out) {
    allocate(s);  // may move optimizer pages out to make room
    s.ticket = backend_->begin_page_copy(s.device.get(), host_of(l), static_cast<size_t>(state_bytes()), PageDir::In);
    s.where = Where::Incoming;
  }
  if (s.where == Where::Incoming) finish_copy(l);
  // an outgoing state is still in device memory (forward's next block reads it while it moves out)
  QLORA_CHECK(s.where == Where::Resident || s.where == Where::Outgoing, "hidden state ", l,
              " read before it was written or after its release");
}

void HiddenStates::prefetch(int64_t l) {
  State& s = at(l);
  if (s.where != Where::Out || !backend_->has_room(state_bytes())) return;
  allocate(s);
  s.ticket = backend_->begin_page_copy(s.device.get(), host_of(l), static_cast<size_t>(state_bytes()), PageDir::In);
  s.where = Where::Incoming;
}

const float* HiddenStates::input(int64_t l) {
  if (packed_ && holds_[l % 2] == l) return wide_[l % 2].get();
  bring_in(l);
  State& s = at(l);
  if (!packed_) return reinterpret_cast<const float*>(s.device.get());
  backend_->widen_16(reinterpret_cast<const uint16_t*>(s.device.get()), size_, format_, wide_[l % 2].get());
  holds_[l % 2] = l;
  return wide_[l % 2].get();
}

void HiddenStates::release(int64_t l) {
  State& s = at(l);
  finish_copy(l);  // a move that started is seen through (and reported) before its memory goes
  s.device.release();
  s.where = Where::Absent;
}

}  // namespace qlora
