// The device seam. The model code (model/) is written once against this interface; the CPU backend runs the
// reference kernels of cpu/kernels.h and the CUDA backend will run kernels with the same signatures. Pointers
// handed to these functions are device pointers from alloc(); host data crosses only through upload/download.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/adamw_math.h"
#include "util/op_profile.h"

namespace qlora {

// What every engine allocation is for: the memory report (and the paging budget on the GPU) is by category.
enum class MemCategory { Weights = 0, Adapters, Gradients, Optimizer, Activations, Workspace, Count };
const char* mem_category_name(MemCategory c);

struct MemoryStats {
  std::array<int64_t, static_cast<size_t>(MemCategory::Count)> current{};
  std::array<int64_t, static_cast<size_t>(MemCategory::Count)> peak{};
  int64_t total_current = 0;
  int64_t total_peak = 0;
  // The high-water mark since the last begin_interval(): its total and what each category held at that moment
  // (between steps activations are freed, so `current` alone never shows what a step needs).
  int64_t interval_peak_total = 0;
  std::array<int64_t, static_cast<size_t>(MemCategory::Count)> at_interval_peak{};
};

// Tracks bytes by category and the peak of the total, as the allocator of each backend sees them.
class MemoryTracker {
 public:
  void on_alloc(MemCategory c, int64_t bytes);
  void on_free(MemCategory c, int64_t bytes);
  const MemoryStats& stats() const { return stats_; }
  void reset_peak();
  void begin_interval();

 private:
  MemoryStats stats_;
};

// One tensor of a multi-tensor AdamW update: a parameter, its gradient and AdamW's two moments, n floats each.
struct AdamWTensor {
  float* param;
  const float* grad;
  float* m;
  float* v;
  int64_t n;
};

// Direction of a page copy: out of device memory to host memory, or back in.
enum class PageDir { Out, In };

// One move of a page between device and host memory, as the user sees it (a `page` event).
struct PageMove {
  PageDir dir = PageDir::Out;
  // The page: "model.layers.7.optimizer" (AdamW's moments of that layer's LoRA) or "model.layers.7.input" (the
  // checkpointed input of that decoder block).
  std::string tensor;
  int64_t bytes = 0;
  double ms = 0.0;
};

// The most rows nf4_matmul_nt and gemm_few_rows_nt take: generation's prefill of a few tokens and token-by-token
// decode.
constexpr int64_t kNf4MatmulMaxRows = 4;
// An error naming `op` unless 0 <= rows <= kNf4MatmulMaxRows.
void check_few_rows(const char* op, int64_t rows);

// A frozen NF4 weight [out, in] as generation's few-row products read it in place (device pointers): its 4-bit codes
// and its block constants, in fp32 (absmax) or double-quantized (absmax_codes, absmax2, absmax_map, absmax_offset,
// restored as absmax_dequantize does), each value rounded to round_to as nf4_dequantize rounds it.
struct Nf4Weight {
  const uint8_t* packed = nullptr;
  const float* absmax = nullptr;  // null where the block constants are double-quantized
  const uint8_t* absmax_codes = nullptr;
  const float* absmax2 = nullptr;
  const float* absmax_map = nullptr;
  float absmax_offset = 0.0f;
  int absmax_blocksize2 = 256;
  int blocksize = 64;
  int64_t out = 0, in = 0;
};

// What a few-row product adds to x · W^T: a bias [out] and LoRA's up projection scale · t [rows, rank] · B^T
// (B [out, rank]); a null pointer (or rank 0) leaves either out.
struct FewRowsAddends {
  const float* bias = nullptr;
  const float* lora_t = nullptr;
  const float* lora_b = nullptr;
  int64_t rank = 0;
  float lora_scale = 0.0f;
};

// A floating format of the engine's frozen numbers: fp32, or 16 bits (bf16 or fp16). The dequantized NF4 values
// are rounded to the quant state's format; dense frozen weights are stored in the format of their file.
enum class FloatFormat { F32, BF16, F16 };
inline int64_t float_format_bytes(FloatFormat f) { return f == FloatFormat::F32 ? 4 : 2; }

// A frozen dense matrix in device memory as its file stores it: fp32 values (float), or the bf16/fp16 bits
// themselves (uint16_t), half the memory of an embedding or an LM head in fp32. Widening 16 bits to fp32 is exact,
// so every op sees the numbers the file holds.
struct StoredMatrix {
  const void* data = nullptr;
  FloatFormat format = FloatFormat::F32;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // ---- memory ----
  // Every engine allocation goes through here: it is counted by category and kept under the memory budget. When
  // an allocation would go over the budget, the pressure handler (the paged optimizer) is asked to free memory
  // first; if it cannot, the allocation is an EngineError that names the category, the bytes and the budget.
  void* alloc_bytes(size_t bytes, MemCategory category);
  void free_bytes(void* ptr, size_t bytes, MemCategory category);
  // Counts (and admits under the budget) `bytes` the engine reads where something else holds them, as alloc_bytes
  // would an allocation of them: a file mapping's weights where the backend reads file mappings.
  void count_bytes(size_t bytes, MemCategory category);
  void uncount_bytes(size_t bytes, MemCategory category) { tracker_.on_free(category, static_cast<int64_t>(bytes)); }
  // 0: no budget (the default). A budget below what is allocated already applies to later allocations.
  void set_memory_budget(int64_t bytes) {
    budget_ = bytes;
    on_memory_budget(bytes);
  }
  int64_t memory_budget() const { return budget_; }
  // Whether `bytes` more fit under the budget now, without moving anything out.
  bool has_room(int64_t bytes) const { return budget_ <= 0 || tracker_.stats().total_current + bytes <= budget_; }
  // handler(bytes) frees at least `bytes` of device memory if it can and returns how much it freed.
  using PressureHandler = std::function<int64_t(int64_t bytes)>;
  void set_pressure_handler(PressureHandler handler) { pressure_handler_ = std::move(handler); }
  virtual void upload(void* device_dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* device_src, size_t bytes) = 0;
  virtual void fill_zero(float* x, int64_t n) = 0;
  virtual void copy(float* dst, const float* src, int64_t n) = 0;  // device to device
  const MemoryStats& memory() const { return tracker_.stats(); }
  void reset_peak_memory() { tracker_.reset_peak(); }
  void begin_memory_interval() { tracker_.begin_interval(); }

  // ---- dense math (fp32 in the CPU reference) ----
  virtual void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                    const float* B, float beta, float* C) = 0;
  // The format gemm_stored takes a frozen weight in without converting it first: fp32 on the CPU, the compute
  // dtype's 16 bits on the GPU under bf16 or fp16 compute (its GEMMs round B to it anyway).
  virtual FloatFormat gemm_weight_format() const { return FloatFormat::F32; }
  // Whether gemm_stored converts a B of this format whole before each GEMM (the GPU, for any format but the one it
  // takes); a caller that uses one frozen weight in many GEMMs then converts it once itself (convert_stored).
  virtual bool gemm_converts(FloatFormat b_format) const { return b_format != gemm_weight_format(); }
  // out = the n values of src in format `to` (widened exactly, or rounded to nearest even).
  virtual void convert_stored(StoredMatrix src, int64_t n, FloatFormat to, void* out) = 0;
  // gemm with B a frozen weight as stored (A and C fp32): the numbers of gemm with B widened to fp32.
  virtual void gemm_stored(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                           StoredMatrix B, float beta, float* C) = 0;
  // The caller's promise that x ([rows, cols] floats) is not written from the first GEMM that reads it until
  // end_shared_input(x): meanwhile a backend whose GEMMs round their fp32 operands to 16 bits (the GPU under half
  // compute) rounds x once, at that first GEMM, for every GEMM that reads it whole, as A or as B, instead of once per
  // GEMM (the same bits). lora_columns: lora_fused_columns of the adapter's rank where gemm_with_lora_up will read x
  // (its copy then has room for them). False where x is shared already (or sharing buys nothing); then no end is due.
  // Use SharedGemmInput.
  virtual bool begin_shared_input(const float* /*x*/, int64_t /*rows*/, int64_t /*cols*/, int64_t /*lora_columns*/) {
    return false;
  }
  virtual void end_shared_input(const float* /*x*/) {}
  // The caller's promise that y ([rows, cols]) is written next by rmsnorm_forward (its y), swiglu_forward (its out),
  // cross_entropy (its dlogits) or swiglu_backward (its dg, or du) and then read only by GEMMs, whole, until
  // end_shared_input(y): a backend whose GEMMs round their inputs to 16 bits may then write only y's 16-bit copy (the
  // bits those GEMMs would make of it, with room for lora_columns as begin_shared_input) and leave y itself as it
  // was. in_place: the copy may take y's own bytes instead (no memory beside y's), where nothing reads y's fp32
  // values again and the op writing the copy reads other buffers (rmsnorm_forward, swiglu_forward). False where the
  // backend does neither (for in_place also where the copy's rows would not fit in y's).
  virtual bool begin_shared_output(float* /*y*/, int64_t /*rows*/, int64_t /*cols*/, int64_t /*lora_columns*/,
                                   bool /*in_place*/) {
    return false;
  }
  // The caller's promise that y ([rows, cols]), written next by a linear's fused GEMM (gemm_with_lora_up),
  // rmsnorm_forward or swiglu_forward, is then read only by dropout, swiglu_forward, swiglu_backward (which may write
  // its gradient in y's place: dg over g, du over u) and GEMMs reading it whole, until end_shared_input(y): a backend
  // that computes as torch's autocast does (the GPU under half compute) may then hold y as its writer's output
  // rounded to 16 bits, in y's own bytes, with room for lora_columns as begin_shared_input, and its readers read
  // that rounding (other numbers than fp32's, autocast's own), the gradient written there likewise. False where it
  // does not (the CPU keeps its fp32 numbers).
  virtual bool begin_half_activation(float* /*y*/, int64_t /*rows*/, int64_t /*cols*/, int64_t /*lora_columns*/) {
    return false;
  }
  // Whether begin_shared_output in place and begin_half_activation take every y not shared yet whose LoRA columns
  // are at most its columns (the GPU under half compute): a caller may then allocate such a y at the size of its
  // 16-bit rows alone.
  virtual bool holds_activations_in_16_bits() const { return false; }

  // LoRA's up projection inside the base GEMM. A backend whose GEMMs round their inputs to 16 bits (the GPU under
  // half compute) computes y = x W^T + alpha t B^T as one GEMM over K + lora_fused_columns(R) values ([x | alpha t]
  // times [W | B]^T, the columns past R zeros), so y is written once instead of written, then read and written
  // again. 0: this backend runs the two GEMMs (the CPU, whose fp32 sums must stay those of the reference).
  virtual int64_t lora_fused_columns(int64_t /*rank*/) const { return 0; }
  // The fused product: x [M, K] fp32; w_rows: the base weight [N, K] in gemm_weight_format, in rows of
  // K + lora_fused_columns(R) values whose last columns this fills with B [N, R]; t [M, R] = drop(x) A^T.
  virtual void gemm_with_lora_up(int64_t M, int64_t N, int64_t K, const float* x, uint16_t* w_rows, int64_t R,
                                 const float* t, const float* b, float alpha, float* y);
  // Backward's counterpart: dx = dy W + dt A (+ beta dx) as one GEMM over K + lora_fused_columns(R) rows of
  // [dy | dt] times [W ; A]. dy [M, K] fp32; w_rows: the base weight [K, N] in gemm_weight_format, in rows w_ld >= N
  // values apart (wider: the forward's rows, B's columns beside W), followed by room for lora_fused_columns(R) more
  // rows, which this fills with A [R, N] and zeros; dt [M, R].
  virtual void gemm_dx_with_lora(int64_t M, int64_t N, int64_t K, const float* dy, uint16_t* w_rows, int64_t w_ld,
                                 int64_t R, const float* dt, const float* a, float beta, float* dx);
  virtual void add_inplace(float* y, const float* x, int64_t n) = 0;       // y += x
  virtual void add_bias_rows(float* y, const float* bias, int64_t rows, int64_t cols) = 0;
  virtual void scale_inplace(float* x, float s, int64_t n) = 0;
  virtual double sum_of_squares(const float* x, int64_t n) = 0;
  // The sum of squares of several tensors (a global gradient norm), brought to the host once.
  virtual double sum_of_squares_many(const std::vector<std::pair<const float*, int64_t>>& tensors) = 0;

  // ---- transformer ops (see cpu/kernels.h for the exact math) ----
  // out[r] = table[host_ids[r]] widened to fp32.
  virtual void embedding(const int32_t* host_ids, int64_t rows, StoredMatrix table, int64_t dim, float* out) = 0;
  // Whether the model keeps an untied embedding table in host memory, gathers a run's rows there and uploads only
  // them (widened with widen_16): the GPU, where the table would hold device memory (1 GiB of Llama-3-8B's, 2 GiB of
  // 70B's in bf16) that nothing but this lookup of a few MiB of rows a step reads. A tied table stays on the device,
  // where it is the LM head.
  virtual bool keeps_embedding_on_host() const { return false; }
  // Whether the backend's memory is the host's own (the CPU), so that a frozen dense weight can be read where the
  // model file's mapping holds it instead of being copied out of it: the OS pages it in from the file as it is read
  // and may drop those pages again under memory pressure, where a copy would hold as much anonymous memory (an 8B
  // model's bf16 weights: 16 GB) for as long as the model is loaded. Such bytes are counted (count_bytes) as if they
  // were allocated, so memory reports, budgets and estimates do not change.
  virtual bool reads_file_mappings() const { return false; }
  virtual void rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t dim, double eps, float* y,
                               float* rstd) = 0;
  virtual void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, int64_t rows,
                                int64_t dim, float* dx) = 0;
  virtual void rope_apply(float* x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim,
                          const float* cos_table, const float* sin_table, bool inverse) = 0;
  // lse [batch, heads, seq]: each query row's log-sum-exp of its scores, all that backward keeps of the softmax
  // (it recomputes the probabilities from q, k and lse; nothing seq x seq is ever stored).
  virtual void attention_forward(const float* q, const float* k, const float* v, int64_t batch, int64_t seq,
                                 int64_t heads, int64_t kv_heads, int64_t head_dim, float* out, float* lse) = 0;
  // out, lse: what attention_forward wrote.
  virtual void attention_backward(const float* dout, const float* q, const float* k, const float* v,
                                  const float* out, const float* lse, int64_t batch, int64_t seq, int64_t heads,
                                  int64_t kv_heads, int64_t head_dim, float* dq, float* dk, float* dv) = 0;
  // Generation: q_len new queries (positions past..past+q_len-1) over the first past + q_len rows of the caches.
  virtual void attention_cached(const float* q, const float* k_cache, const float* v_cache, int64_t q_len,
                                int64_t past, int64_t heads, int64_t kv_heads, int64_t head_dim, float* out) = 0;
  virtual void swiglu_forward(const float* g, const float* u, int64_t n, float* out) = 0;
  // dg may be g and du may be u (in place).
  virtual void swiglu_backward(const float* dout, const float* g, const float* u, int64_t n, float* dg,
                               float* du) = 0;
  // logprobs[r] = log p(targets[r]) (0 where the target is -100; NaN where it is outside the vocabulary);
  // dlogits (optional) = grad_scale * (softmax - onehot), and may be `logits` itself (written in place). targets and
  // logprobs are device memory: nothing comes back to the host here, so a step's chunks of the loss run without
  // waiting for each other.
  virtual void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab,
                             double grad_scale, float* dlogits, double* logprobs) = 0;
  // Log-softmax of each row of `logits` (device memory) into `host_out` [rows, vocab] (host memory).
  virtual void log_softmax_rows(const float* logits, int64_t rows, int64_t vocab, float* host_out) = 0;

  // ---- 16-bit storage ----
  // The format of the hidden states between decoder blocks: fp32, or bf16 under bf16 compute (where a bf16 model's
  // residual stream is bf16 anyway). The model rounds each block's output to it, so that the checkpointed block
  // inputs can be stored in it losslessly.
  virtual FloatFormat hidden_state_format() const { return FloatFormat::F32; }
  // out = x rounded to `format` (BF16 or F16), as its bits.
  virtual void pack_16(const float* x, int64_t n, FloatFormat format, uint16_t* out) = 0;
  // out = x (BF16 or F16 bits) widened to fp32, exactly.
  virtual void widen_16(const uint16_t* x, int64_t n, FloatFormat format, float* out) = 0;

  // ---- QLoRA specifics ----
  // Double quantization's block constants: out[i] = code2[codes[i]] * state2_absmax[i / blocksize2] + offset, a
  // product and a sum each rounded to fp32 (never one fused multiply-add), as bitsandbytes computes them.
  virtual void absmax_dequantize(const uint8_t* codes, int64_t n, const float* state2_absmax, const float* code2,
                                 float offset, int blocksize2, float* out) = 0;
  // out[i] = code(packed, i) * absmax[i / blocksize], rounded to `round_to`.
  virtual void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, FloatFormat round_to,
                              float* out) = 0;
  // The w.out * w.in values of nf4_dequantize (its block constants restored as absmax_dequantize would, where they
  // are double-quantized) rounded on to 16 bits (out_format BF16 or F16): a weight dequantized straight into the
  // format the GEMM takes (gemm_weight_format), never written out in fp32, in one pass. Value i goes to row
  // i / row_len of `out`, rows row_stride values apart (row_stride = row_len: contiguous; wider rows leave room for
  // LoRA's factor).
  virtual void nf4_dequantize_16(const Nf4Weight& w, FloatFormat round_to, FloatFormat out_format, int64_t row_len,
                                 int64_t row_stride, uint16_t* out) = 0;
  // y [rows, out] = x [rows, in] · W^T + bias + scale · t · B^T (rows <= kNf4MatmulMaxRows) with W dequantized on
  // the fly as nf4_dequantize would (rounded to `round_to`), never written out: generation's few-row products read the
  // 4-bit weights once, in one pass with their block constants, bias and LoRA's up projection. Equal to
  // absmax_dequantize, nf4_dequantize, gemm(false, true, ...), add_bias_rows and gemm(..., beta 1) in turn: bit for
  // bit on the CPU, to rounding on the GPU.
  virtual void nf4_matmul_nt(const float* x, int64_t rows, const Nf4Weight& w, FloatFormat round_to,
                             const FewRowsAddends& add, float* y) = 0;
  // y [rows, out] = x [rows, in] · W^T for fp32 W [out, in] and rows <= kNf4MatmulMaxRows (LoRA's down projection in
  // generation): gemm(false, true, ...)'s numbers, bit for bit on the CPU, to rounding on the GPU, in one launch there.
  virtual void gemm_few_rows_nt(const float* x, int64_t rows, const float* w, int64_t out, int64_t in, float* y) = 0;
  // out = x * mask / (1 - p), mask[i] = philox(seed, Dropout, step).uniform(offset + i) >= p; out may be x.
  virtual void dropout(const float* x, int64_t n, float p, uint64_t seed, uint32_t step, uint64_t offset,
                       float* out) = 0;
  // AdamW over several tensors at once (one launch on the GPU where they fit in one), with each gradient times
  // scale->scale; where !scale->finite nothing is written. scale: device memory, as grad_scale wrote it.
  virtual void adamw_update_many(const std::vector<AdamWTensor>& tensors, double lr, double beta1, double beta2,
                                 double eps, double weight_decay, int64_t step, const GradScale* scale) = 0;
  // *out (device memory) = make_grad_scale of the gradients' sum of squares, computed on the device: nothing waits
  // for the host between backward and the update that reads it.
  virtual void grad_scale(const std::vector<std::pair<const float*, int64_t>>& grads, double loss_scale,
                          double max_grad_norm, GradScale* out) = 0;

  // ---- profile: time by op (bench --profile) ----
  // On: each op's device time is measured (GPU: CUDA events around every kernel and GEMM, which costs a little);
  // a backend without a profiler ignores it and takes nothing.
  virtual void set_profiling(bool on) { (void)on; }
  // The time by op since the last take (waiting for the device first), the most time first.
  virtual std::vector<OpTime> take_profile() { return {}; }

  // ---- paging: host memory that device pages move to, and the copies between them ----
  // Host memory for pages moved out (page-locked on the GPU, so copies run asynchronously); not counted in the
  // device budget.
  virtual void* alloc_host(size_t bytes) = 0;
  virtual void free_host(void* ptr, size_t bytes) = 0;
  // Starts copying `bytes` between device memory and host memory (dir Out: device src to host dst; In: host src
  // to device dst) after the compute issued so far, on a stream of its own, and returns a ticket for it.
  virtual int64_t begin_page_copy(void* dst, const void* src, size_t bytes, PageDir dir) = 0;
  // Waits until the copy is done (compute issued afterwards sees its data) and returns how long it took, in ms.
  virtual double finish_page_copy(int64_t ticket) = 0;
  // Every pager (the optimizer's, the activations') logs its moves here, so that they come out in the order they
  // happened.
  void record_page_move(PageMove move) { page_moves_.push_back(std::move(move)); }
  // The moves since the last call, oldest first.
  std::vector<PageMove> take_page_moves() {
    std::vector<PageMove> out;
    out.swap(page_moves_);
    return out;
  }

 protected:
  // A backend whose device allocator holds memory beyond what is in use (a cache) bounds it by the budget too.
  virtual void on_memory_budget(int64_t) {}
  virtual void* device_alloc(size_t bytes, MemCategory category) = 0;
  virtual void device_free(void* ptr, size_t bytes) = 0;
  MemoryTracker tracker_;

 private:
  // Makes room for `bytes` more under the budget (asking the pressure handler first), or throws what is held.
  void admit(size_t bytes, MemCategory category);
  int64_t budget_ = 0;
  PressureHandler pressure_handler_;
  std::vector<PageMove> page_moves_;
};

std::unique_ptr<Backend> make_cpu_backend();

// A scope over which the GEMMs reading x share its 16-bit copy (Backend::begin_shared_input, with kWrittenNext or
// kWrittenNextInPlace begin_shared_output, with kHalfActivation begin_half_activation); end() closes it early.
class SharedGemmInput {
 public:
  SharedGemmInput(Backend* backend, const float* x, int64_t rows, int64_t cols, int64_t lora_columns = 0)
      : backend_(backend), x_(x), open_(backend->begin_shared_input(x, rows, cols, lora_columns)) {}
  enum class WrittenNext { kBeside, kInPlace, kHalf };  // scoped: never taken for a column count
  static constexpr WrittenNext kWrittenNext = WrittenNext::kBeside;
  static constexpr WrittenNext kWrittenNextInPlace = WrittenNext::kInPlace;
  static constexpr WrittenNext kHalfActivation = WrittenNext::kHalf;
  SharedGemmInput(Backend* backend, float* y, int64_t rows, int64_t cols, int64_t lora_columns, WrittenNext how)
      : backend_(backend), x_(y), open_(begin(backend, y, rows, cols, lora_columns, how)) {}
  ~SharedGemmInput() { end(); }
  SharedGemmInput(SharedGemmInput&& other) noexcept : backend_(other.backend_), x_(other.x_), open_(other.open_) {
    other.open_ = false;
  }
  SharedGemmInput(const SharedGemmInput&) = delete;
  SharedGemmInput& operator=(const SharedGemmInput&) = delete;
  SharedGemmInput& operator=(SharedGemmInput&&) = delete;
  void end() {
    if (open_) backend_->end_shared_input(x_);
    open_ = false;
  }
  bool open() const { return open_; }

 private:
  static bool begin(Backend* backend, float* y, int64_t rows, int64_t cols, int64_t lora_columns, WrittenNext how) {
    if (how == WrittenNext::kHalf) return backend->begin_half_activation(y, rows, cols, lora_columns);
    return backend->begin_shared_output(y, rows, cols, lora_columns, how == WrittenNext::kInPlace);
  }
  Backend* backend_;
  const float* x_;
  bool open_;
};

// A device allocation owned by one object: freed (and un-counted) when it goes away.
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(Backend* backend, int64_t n, MemCategory category) { reset(backend, n, category); }
  ~DeviceArray() { release(); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept { *this = std::move(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      release();
      backend_ = o.backend_;
      ptr_ = o.ptr_;
      n_ = o.n_;
      category_ = o.category_;
      o.ptr_ = nullptr;
      o.n_ = 0;
    }
    return *this;
  }

  void reset(Backend* backend, int64_t n, MemCategory category) {
    release();
    backend_ = backend;
    category_ = category;
    n_ = n;
    ptr_ = n > 0 ? static_cast<T*>(backend->alloc_bytes(static_cast<size_t>(n) * sizeof(T), category)) : nullptr;
  }
  void release() {
    if (ptr_) backend_->free_bytes(ptr_, static_cast<size_t>(n_) * sizeof(T), category_);
    ptr_ = nullptr;
    n_ = 0;
  }
  void upload(const T* host, int64_t n) { backend_->upload(ptr_, host, static_cast<size_t>(n) * sizeof(T)); }
  void upload(const std::vector<T>& host) { upload(host.data(), static_cast<int64_t>(host.size())); }
  std::vector<T> download() const {
    std::vector<T> host(static_cast<size_t>(n_));
    if (n_ > 0) backend_->download(host.data(), ptr_, static_cast<size_t>(n_) * sizeof(T));
    return host;
  }

  T* get() const { return ptr_; }
  int64_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  Backend* backend_ = nullptr;
  T* ptr_ = nullptr;
  int64_t n_ = 0;
  MemCategory category_ = MemCategory::Workspace;
};

// Bytes that something else holds (a file mapping) read by the engine, counted as backend memory of a category
// (Backend::count_bytes) for as long as the pointer lives: its deleter un-counts them and frees nothing.
struct Uncount {
  Backend* backend = nullptr;
  int64_t bytes = 0;
  MemCategory category = MemCategory::Weights;
  void operator()(const uint8_t*) const { backend->uncount_bytes(static_cast<size_t>(bytes), category); }
};
using CountedBytes = std::unique_ptr<const uint8_t, Uncount>;
inline CountedBytes count_bytes_of(Backend* backend, const uint8_t* bytes, int64_t n, MemCategory category) {
  backend->count_bytes(static_cast<size_t>(n), category);
  return CountedBytes(bytes, Uncount{backend, n, category});
}

// Host memory that pages move to (Backend::alloc_host: page-locked on the GPU), owned by one object.
class HostBuffer {
 public:
  HostBuffer() = default;
  ~HostBuffer() {
    try {
      release();
    } catch (...) {  // a destructor must not throw; a failing device call here has nothing left to save
    }
  }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  HostBuffer(HostBuffer&& o) noexcept { *this = std::move(o); }
  HostBuffer& operator=(HostBuffer&& o) noexcept {
    if (this != &o) {
      release();
      backend_ = o.backend_;
      ptr_ = o.ptr_;
      bytes_ = o.bytes_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
    }
    return *this;
  }
  // At least `bytes`: kept when it is large enough (page-locking memory is slow, so buffers live across steps).
  void ensure(Backend* backend, size_t bytes) {
    if (ptr_ && bytes_ >= bytes) return;
    release();
    backend_ = backend;
    ptr_ = backend->alloc_host(bytes);
    bytes_ = bytes;
  }
  void release() {
    if (ptr_) backend_->free_host(ptr_, bytes_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  Backend* backend_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace qlora
