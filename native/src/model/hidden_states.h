// The hidden states between the decoder blocks of one run: state l is the input of block l, state L the final
// hidden state. A state is allocated when it is written and freed when the run says it is done with it (release),
// so a run without gradients holds two, and one with gradient checkpointing holds each block's input until that
// block's backward.
//
// In fp32, or in the backend's 16-bit hidden_state_format: then each block's output is rounded to it when
// committed and stored in 16 bits, and widened into one of two fp32 buffers when a block reads it (in forward the
// state just written; in backward each checkpointed input in turn). keep_fp32 (training without checkpointing, where
// each block's saved activations point at their input until backward) rounds each state but keeps it in fp32.
//
// Offloading (training with checkpointing under a tight memory budget): the lowest checkpointed inputs (up to all but
// the last two) start moving to host memory as soon as they are committed, on the copy stream while the next block
// computes, and their device memory is freed at the next commit; backward brings each one back a block ahead of its
// use (prefetch) where the budget has room, else when it is needed. Each move is a page event ("model.layers.7.input").
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "backend/backend.h"

namespace qlora {

// x (n fp32 values) rounded in place to `format` (BF16 or F16), through its 16-bit bits in `bits`.
void round_through_16(Backend* backend, float* x, int64_t n, FloatFormat format, uint16_t* bits);

// How many of a model's `layers` block inputs offloading can move: all but the last two (backward starts on both at
// once, so moving the second-last out would only bring it straight back).
inline int64_t movable_block_inputs(int64_t layers) { return layers > 2 ? layers - 2 : 0; }

struct HiddenStatesOptions {
  int64_t count = 0;  // states: layers + 1
  int64_t size = 0;   // floats in each: rows x hidden size
  FloatFormat format = FloatFormat::F32;
  bool keep_fp32 = false;
  int64_t offload = 0;  // the lowest states to move out (see offloaded_below)
};

class HiddenStates {
 public:
  // host: the pinned buffers states move to, one per state, kept by the caller between runs (page-locking memory
  // is slow); grown here as needed.
  HiddenStates(Backend* backend, const HiddenStatesOptions& options, std::vector<HostBuffer>* host);
  ~HiddenStates();
  HiddenStates(const HiddenStates&) = delete;
  HiddenStates& operator=(const HiddenStates&) = delete;

  // Where state l is written, in fp32, before commit(l).
  float* output(int64_t l);
  // State l is written: round it to the format (storing it in 16 bits), and start moving it out if it is offloaded.
  void commit(int64_t l);
  // State l in fp32 (brought back to device memory first if it was moved out); valid until the state two below or
  // above it is read or written, or it is released.
  const float* input(int64_t l);
  // Starts bringing state l back to device memory, if it is out and the budget has room for it now.
  void prefetch(int64_t l);
  // The run needs state l no more: its device memory is freed.
  void release(int64_t l);
  // States offloaded from the forward pass: 0..offloaded_below()-1 (at most movable_block_inputs of the model).
  int64_t offloaded_below() const { return offload_; }

 private:
  enum class Where { Absent, Resident, Outgoing, Out, Incoming };
  struct State {
    DeviceArray<uint8_t> device;
    Where where = Where::Absent;
    int64_t ticket = -1;  // the copy in flight while Outgoing or Incoming
  };
  int64_t state_bytes() const { return size_ * (packed_ ? 2 : 4); }
  State& at(int64_t l);
  void allocate(State& s);
  void finish_copy(int64_t l);
  void finish_outgoing();
  void bring_in(int64_t l);
  void* host_of(int64_t l);
  void record(PageDir dir, int64_t l, double ms);

  Backend* backend_;
  int64_t count_;
  int64_t size_;
  FloatFormat format_;
  bool packed_;
  int64_t offload_;
  std::vector<HostBuffer>* host_;
  std::vector<State> states_;
  DeviceArray<uint16_t> rounding_;  // keep_fp32 with a 16-bit format: round_through_16's scratch
  std::array<DeviceArray<float>, 2> wide_;
  std::array<int64_t, 2> holds_ = {-1, -1};  // the state each of wide_ holds
};

}  // namespace qlora
