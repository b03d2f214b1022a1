// The CPU backend: host memory and the reference kernels of cpu/kernels.h in fp32, threaded with OpenMP.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "backend/backend.h"
#include "cpu/kernels.h"
#include "io/dtype.h"
#include "quant/nf4.h"
#include "util/philox.h"

namespace qlora {

const char* mem_category_name(MemCategory c) {
  switch (c) {
    case MemCategory::Weights: return "weights";
    case MemCategory::Adapters: return "adapters";
    case MemCategory::Gradients: return "gradients";
    case MemCategory::Optimizer: return "optimizer";
    case MemCategory::Activations: return "activations";
    case MemCategory::Workspace: return "workspace";
    case MemCategory::Count: break;
  }
  return "unknown";
}

void MemoryTracker::on_alloc(MemCategory c, int64_t bytes) {
  const size_t i = static_cast<size_t>(c);
  stats_.current[i] += bytes;
  stats_.peak[i] = std::max(stats_.peak[i], stats_.current[i]);
  stats_.total_current += bytes;
  stats_.total_peak = std::max(stats_.total_peak, stats_.total_current);
  if (stats_.total_current > stats_.interval_peak_total) {
    stats_.interval_peak_total = stats_.total_current;
    stats_.at_interval_peak = stats_.current;
  }
}

void MemoryTracker::on_free(MemCategory c, int64_t bytes) {
  stats_.current[static_cast<size_t>(c)] -= bytes;
  stats_.total_current -= bytes;
}

void MemoryTracker::reset_peak() {
  stats_.peak = stats_.current;
  stats_.total_peak = stats_.total_current;
  begin_interval();
}

void MemoryTracker::begin_interval() {
  stats_.interval_peak_total = stats_.total_current;
  stats_.at_interval_peak = stats_.current;
}

void* Backend::alloc_bytes(size_t bytes, MemCategory category) {
  admit(bytes, category);
  void* p = device_alloc(bytes, category);
  tracker_.on_alloc(category, static_cast<int64_t>(bytes));
  return p;
}

void Backend::count_bytes(size_t bytes, MemCategory category) {
  admit(bytes, category);
  tracker_.on_alloc(category, static_cast<int64_t>(bytes));
}

void Backend::admit(size_t bytes, MemCategory category) {
  const int64_t n = static_cast<int64_t>(bytes);
  if (budget_ > 0 && tracker_.stats().total_current + n > budget_ && pressure_handler_)
    pressure_handler_(tracker_.stats().total_current + n - budget_);
  if (budget_ > 0 && tracker_.stats().total_current + n > budget_) {
    const MemoryStats& s = tracker_.stats();
    std::string held;
    for (size_t i = 0; i < s.current.size(); ++i) {
      if (s.current[i] == 0) continue;
      held += held.empty() ? "" : ", ";
      held += std::string(mem_category_name(static_cast<MemCategory>(i))) + " " + format_bytes(s.current[i]);
    }
    fail("over the memory budget: ", format_bytes(n), " more for ", mem_category_name(category), " would make ",
         format_bytes(s.total_current + n), " of a ", format_bytes(budget_), " budget (held now: ",
         held.empty() ? "nothing" : held, ")");
  }
}

void Backend::free_bytes(void* ptr, size_t bytes, MemCategory category) {
  device_free(ptr, bytes);
  tracker_.on_free(category, static_cast<int64_t>(bytes));
}

void check_few_rows(const char* op, int64_t rows) {
  if (rows < 0 || rows > kNf4MatmulMaxRows) fail(op, " takes 0 to ", kNf4MatmulMaxRows, " rows, got ", rows);
}

void Backend::gemm_with_lora_up(int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t, const float*,
                                const float*, float, float*) {
  fail(name(), " backend: LoRA's up projection is not fused into the base GEMM here (lora_fused_columns is 0)");
}

void Backend::gemm_dx_with_lora(int64_t, int64_t, int64_t, const float*, uint16_t*, int64_t, int64_t, const float*,
                                const float*, float, float*) {
  fail(name(), " backend: LoRA's input gradient is not fused into the base GEMM here (lora_fused_columns is 0)");
}

namespace {

// A dequantized weight's rounding to `format`, as the CPU kernels take it: 0 none (fp32), 1 bf16, 2 fp16.
int round_kind(FloatFormat format) { return format == FloatFormat::F32 ? 0 : format == FloatFormat::BF16 ? 1 : 2; }

// Large allocations in 2 MiB pages where Linux's transparent huge pages are on for those who ask (enabled = madvise,
// Ubuntu's and Debian's default): a 4 KiB page is a fault when first written (a 1B model's weights are 300,000 of
// them) and a TLB entry when read. What lives as long as the model (weights, adapters, gradients, optimizer state)
// from 4 MiB; activations and workspace, which every step allocates and frees again, only from 32 MiB, which glibc
// maps afresh for each allocation anyway (its largest mmap threshold), so that smaller ones stay in malloc's reused
// memory. Only the whole 2 MiB pages inside the request are advised, so that memory beyond what was asked for (and
// counted) is never backed. Either is freed with free().
void* allocate_large_pages_where_possible(size_t bytes, MemCategory category) {
#if defined(__linux__)
  constexpr size_t kHugePage = size_t{2} << 20;
  const bool per_step = category == MemCategory::Activations || category == MemCategory::Workspace;
  const size_t from = per_step ? size_t{32} << 20 : size_t{4} << 20;
  if (bytes >= from && bytes <= SIZE_MAX - kHugePage) {
    void* p = std::aligned_alloc(kHugePage, (bytes + kHugePage - 1) / kHugePage * kHugePage);
    if (p) madvise(p, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);  // a hint: where it is refused, 4 KiB pages
    return p;
  }
#else
  (void)category;
#endif
  return std::malloc(bytes);
}

// Every step allocates and frees the same activation and workspace buffers. glibc gives the free memory at the top of
// its heap back to the system once it passes the trim threshold (by default twice the largest mapped block freed so
// far: about 40 MB on the bench's model), and the next step faults it back in a zeroed page at a time (19,000 faults
// a step at 1 x 1024 tokens, about 5% of its time). The heaps keep up to 512 MiB free instead, and the mmap
// threshold is fixed at glibc's own largest (32 MiB; setting either stops glibc adjusting them), so a block from
// 32 MiB is still mapped for its allocation alone and unmapped when freed. The engine runs only in its own processes
// (trainer, chat server, command line), never in the extension host.
void keep_freed_heap_memory() {
#if defined(__GLIBC__)
  static std::once_flag once;
  std::call_once(once, [] {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 512 << 20);
  });
#endif
}

class CpuBackend final : public Backend {
 public:
  CpuBackend() { keep_freed_heap_memory(); }
  std::string name() const override { return "cpu"; }
  bool reads_file_mappings() const override { return true; }

  void* alloc_host(size_t bytes) override {
    void* p = std::malloc(bytes);
    if (!p) fail("out of host memory allocating ", bytes, " bytes for paged-out memory");
    return p;
  }
  void free_host(void* ptr, size_t) override { std::free(ptr); }
  // On the CPU "device" and host memory are the same memory: a page copy is a memcpy, done when it starts.
  int64_t begin_page_copy(void* dst, const void* src, size_t bytes, PageDir) override {
    const auto start = std::chrono::steady_clock::now();
    std::memcpy(dst, src, bytes);
    copy_ms_.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    return static_cast<int64_t>(copy_ms_.size()) - 1;
  }
  double finish_page_copy(int64_t ticket) override {
    if (ticket < 0 || ticket >= static_cast<int64_t>(copy_ms_.size()) || copy_ms_[static_cast<size_t>(ticket)] < 0)
      fail("finish_page_copy: unknown ticket ", ticket);
    const double ms = copy_ms_[static_cast<size_t>(ticket)];
    copy_ms_[static_cast<size_t>(ticket)] = -1.0;  // finished
    // tickets start again from 0 once no copy is outstanding
    if (std::all_of(copy_ms_.begin(), copy_ms_.end(), [](double m) { return m < 0; })) copy_ms_.clear();
    return ms;
  }
  void upload(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void fill_zero(float* x, int64_t n) override { std::memset(x, 0, static_cast<size_t>(n) * sizeof(float)); }
  void copy(float* dst, const float* src, int64_t n) override {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
  }

  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B,
            float beta, float* C) override {
    cpu::gemm<float>(ta, tb, M, N, K, alpha, A, B, beta, C);
  }
  // The CPU's GEMM widens a 16-bit B as it packs it: no whole copy, whatever the format.
  bool gemm_converts(FloatFormat) const override { return false; }
  void convert_stored(StoredMatrix src, int64_t n, FloatFormat to, void* out) override {
    const auto value = [&](int64_t i) {
      switch (src.format) {
        case FloatFormat::BF16: return bf16_to_f32(static_cast<const uint16_t*>(src.data)[i]);
        case FloatFormat::F16: return f16_to_f32(static_cast<const uint16_t*>(src.data)[i]);
        case FloatFormat::F32: break;
      }
      return static_cast<const float*>(src.data)[i];
    };
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      if (to == FloatFormat::F32)
        static_cast<float*>(out)[i] = value(i);
      else
        static_cast<uint16_t*>(out)[i] = to == FloatFormat::BF16 ? f32_to_bf16(value(i)) : f32_to_f16(value(i));
    }
  }
  void gemm_stored(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, StoredMatrix B,
                   float beta, float* C) override {
    switch (B.format) {
      case FloatFormat::F32: return gemm(ta, tb, M, N, K, alpha, A, static_cast<const float*>(B.data), beta, C);
      case FloatFormat::BF16:
        return cpu::gemm<float>(ta, tb, M, N, K, alpha, A, static_cast<const cpu::Bf16Bits*>(B.data), beta, C);
      case FloatFormat::F16:
        return cpu::gemm<float>(ta, tb, M, N, K, alpha, A, static_cast<const cpu::F16Bits*>(B.data), beta, C);
    }
  }
  void add_inplace(float* y, const float* x, int64_t n) override {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }
  void add_bias_rows(float* y, const float* bias, int64_t rows, int64_t cols) override {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) y[r * cols + c] += bias[c];
  }
  void scale_inplace(float* x, float s, int64_t n) override {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) x[i] *= s;
  }
  double sum_of_squares(const float* x, int64_t n) override { return cpu::sum_of_squares<float>(x, n); }
  double sum_of_squares_many(const std::vector<std::pair<const float*, int64_t>>& tensors) override {
    double total = 0.0;
    for (const auto& [x, n] : tensors) total += cpu::sum_of_squares<float>(x, n);
    return total;
  }

  void embedding(const int32_t* ids, int64_t rows, StoredMatrix table, int64_t dim, float* out) override {
    const DType dtype = table.format == FloatFormat::F32 ? DType::F32 : table.format == FloatFormat::BF16 ? DType::BF16 : DType::F16;
    const size_t row_bytes = static_cast<size_t>(dim * float_format_bytes(table.format));
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      convert_to_f32(dtype, static_cast<const uint8_t*>(table.data) + static_cast<size_t>(ids[r]) * row_bytes,
                     static_cast<size_t>(dim), out + r * dim, "embedding");
  }
  void rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t dim, double eps, float* y,
                       float* rstd) override {
    cpu::rmsnorm_forward<float>(x, w, rows, dim, eps, y, rstd);
  }
  void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, int64_t rows,
                        int64_t dim, float* dx) override {
    cpu::rmsnorm_backward<float>(dy, x, w, rstd, rows, dim, dx);
  }
  void rope_apply(float* x, int64_t b, int64_t t, int64_t h, int64_t d, const float* c, const float* s,
                  bool inverse) override {
    cpu::rope_apply<float>(x, b, t, h, d, c, s, inverse);
  }
  void attention_forward(const float* q, const float* k, const float* v, int64_t b, int64_t t, int64_t h,
                         int64_t kvh, int64_t d, float* out, float* lse) override {
    cpu::attention_forward<float>(q, k, v, b, t, h, kvh, d, out, lse);
  }
  void attention_cached(const float* q, const float* kc, const float* vc, int64_t q_len, int64_t past, int64_t h,
                        int64_t kvh, int64_t d, float* out) override {
    cpu::attention_cached<float>(q, kc, vc, q_len, past, h, kvh, d, out);
  }
  void attention_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                          const float* lse, int64_t b, int64_t t, int64_t h, int64_t kvh, int64_t d, float* dq,
                          float* dk, float* dv) override {
    cpu::attention_backward<float>(dout, q, k, v, out, lse, b, t, h, kvh, d, dq, dk, dv);
  }
  void swiglu_forward(const float* g, const float* u, int64_t n, float* out) override {
    cpu::swiglu_forward<float>(g, u, n, out);
  }
  void swiglu_backward(const float* dout, const float* g, const float* u, int64_t n, float* dg, float* du) override {
    cpu::swiglu_backward<float>(dout, g, u, n, dg, du);
  }
  void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab, double grad_scale,
                     float* dlogits, double* logprobs) override {
    cpu::cross_entropy<float>(logits, targets, rows, vocab, grad_scale, dlogits, logprobs);
  }
  void log_softmax_rows(const float* logits, int64_t rows, int64_t vocab, float* host_out) override {
    cpu::log_softmax_rows<float>(logits, rows, vocab, host_out);
  }


  void pack_16(const float* x, int64_t n, FloatFormat format, uint16_t* out) override {
    if (format == FloatFormat::F32) fail("pack_16 writes bf16 or fp16, not fp32");
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = format == FloatFormat::BF16 ? f32_to_bf16(x[i]) : f32_to_f16(x[i]);
  }
  void widen_16(const uint16_t* x, int64_t n, FloatFormat format, float* out) override {
    if (format == FloatFormat::F32) fail("widen_16 reads bf16 or fp16, not fp32");
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = format == FloatFormat::BF16 ? bf16_to_f32(x[i]) : f16_to_f32(x[i]);
  }

  void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, FloatFormat round_to,
                      float* out) override {
    cpu::nf4_dequantize_f32(packed, absmax, n, blocksize, round_kind(round_to), out);
  }
  void absmax_dequantize(const uint8_t* codes, int64_t n, const float* state2_absmax, const float* code2, float offset,
                         int blocksize2, float* out) override {
    if (blocksize2 <= 0) fail("double quantization blocksize must be positive, got ", blocksize2);
    nf4::double_dequantize_into(codes, n, state2_absmax, code2, offset, blocksize2, out);
  }
  void nf4_dequantize_16(const Nf4Weight& w, FloatFormat round_to, FloatFormat out_format, int64_t row_len,
                         int64_t row_stride, uint16_t* out) override {
    if (out_format == FloatFormat::F32) fail("nf4_dequantize_16 writes bf16 or fp16, not fp32");
    nf4::check_rows(row_len, row_stride, "nf4_dequantize_16");
    nf4::check_blocksize(w.blocksize, "nf4_dequantize_16");
    const int64_t n = w.out * w.in;
    std::vector<float> restored, values(static_cast<size_t>(n));
    nf4_dequantize(w.packed, block_constants(w, restored), n, w.blocksize, round_to, values.data());
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float v = values[static_cast<size_t>(i)];
      out[i / row_len * row_stride + i % row_len] = out_format == FloatFormat::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
  }
  // w's block constants in fp32: its own, or restored into `restored` as absmax_dequantize restores them.
  const float* block_constants(const Nf4Weight& w, std::vector<float>& restored) {
    if (w.absmax) return w.absmax;
    restored.resize(static_cast<size_t>((w.out * w.in + w.blocksize - 1) / w.blocksize));
    absmax_dequantize(w.absmax_codes, static_cast<int64_t>(restored.size()), w.absmax2, w.absmax_map, w.absmax_offset,
                      w.absmax_blocksize2, restored.data());
    return restored.data();
  }
  void nf4_matmul_nt(const float* x, int64_t rows, const Nf4Weight& w, FloatFormat round_to, const FewRowsAddends& add,
                     float* y) override {
    static_assert(kNf4MatmulMaxRows <= cpu::kFewRows, "nf4_matmul_tile_f32 sums at most kFewRows rows");
    check_few_rows("nf4_matmul_nt", rows);
    nf4::check_blocksize(w.blocksize, "nf4_matmul_nt");
    // the composition this op stands for, step by step: the same numbers bit for bit
    std::vector<float> restored;
    const float* absmax = block_constants(w, restored);
    const int round = round_kind(round_to);
    const int64_t tiles = (w.out + cpu::kNtTile - 1) / cpu::kNtTile;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t o0 = t * cpu::kNtTile;
      cpu::nf4_matmul_tile_f32(x, rows, w.packed, absmax, o0, std::min(cpu::kNtTile, w.out - o0), w.out, w.in,
                               w.blocksize, round, y);
    }
    if (add.bias) add_bias_rows(y, add.bias, rows, w.out);
    if (add.lora_t && add.rank > 0)
      gemm(false, true, rows, w.out, add.rank, add.lora_scale, add.lora_t, add.lora_b, 1.0f, y);
  }
  void gemm_few_rows_nt(const float* x, int64_t rows, const float* w, int64_t out, int64_t in, float* y) override {
    check_few_rows("gemm_few_rows_nt", rows);
    gemm(false, true, rows, out, in, 1.0f, x, w, 0.0f, y);
  }
  void dropout(const float* x, int64_t n, float p, uint64_t seed, uint32_t step, uint64_t offset,
               float* out) override {
    const Philox rng(seed, RngStream::Dropout, step);
    const float keep_scale = 1.0f / (1.0f - p);
    // chunks for the threads; each chunk's first counter is offset + its start, so any split gives the same numbers
    constexpr int64_t kChunk = 8192;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t begin = c * kChunk;
      cpu::dropout_f32(x + begin, std::min(kChunk, n - begin), p, keep_scale, rng,
                       offset + static_cast<uint64_t>(begin), out + begin);
    }
  }
  void adamw_update_many(const std::vector<AdamWTensor>& tensors, double lr, double beta1, double beta2, double eps,
                         double weight_decay, int64_t step, const GradScale* scale) override {
    if (!scale->finite) return;
    for (const AdamWTensor& t : tensors)
      cpu::adamw_update<float>(t.param, t.grad, t.m, t.v, t.n, lr, beta1, beta2, eps, weight_decay, step, scale->scale);
  }
  void grad_scale(const std::vector<std::pair<const float*, int64_t>>& grads, double loss_scale, double max_grad_norm,
                  GradScale* out) override {
    *out = make_grad_scale(sum_of_squares_many(grads), loss_scale, max_grad_norm);
  }

 protected:
  void* device_alloc(size_t bytes, MemCategory category) override {
    void* p = allocate_large_pages_where_possible(bytes, category);
    if (!p) fail("out of host memory allocating ", bytes, " bytes for ", mem_category_name(category));
    return p;
  }
  void device_free(void* ptr, size_t) override { std::free(ptr); }

 private:
  std::vector<double> copy_ms_;  // by ticket: the copy's duration until it is finished, then -1
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace qlora
