// The GPU backend's ops: the host side of each op of the backend seam (checks, launch shapes, scratch memory,
// results that go to host memory) over the kernels of cuda/kernels.cuh. Written once against an executor `Exec`
// that launches kernels and moves memory: cuda/cuda_backend.cu instantiates it with the CUDA runtime and cuBLASLt;
// the native tests instantiate it with a CUDA emulator on the CPU (test/cuda_emu.h), so that all of this code and
// every kernel runs in CI, through the whole model, against the CPU backend.
//
// Exec provides: name(), sm() (the compute capability the kernels run as, major * 10 + minor), threads (block size:
// a power of two <= kernels::kMaxThreads), max_grid_blocks (the most blocks of a grid-stride loop), launch(what,
// grid, block, kernel, args...), alloc(bytes, what) / free(ptr) / set_memory_limit(bytes: the budget, 0 none),
// upload / download / copy (device to device) / zero, gemm (fp32, the seam's signature plus a workspace of
// gemm_workspace_bytes()) and gemm_half (the same with A and B as fp16 or bf16 bits, fp32 accumulation and output,
// and optional leading dimensions lda / ldb for operands that are part of wider rows; false when it has no way to),
// gemm_half_to_half (C written in 16 bits, its rows ldc apart; B's ldb optional), alloc_host / free_host,
// begin_page_copy / finish_page_copy, set_profiling(on) / take_profile() (the time of each launch and GEMM by name
// while on).
#pragma once
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "cuda/cuda_backend.h"
#include "cuda/few_rows.cuh"
#include "cuda/flash_attention.cuh"
#include "cuda/kernels.cuh"
#include "quant/nf4.h"
#include "util/error.h"
#include "util/philox.h"

namespace qlora::cuda {

template <typename Exec>
class KernelBackend : public Backend {
 public:
  template <typename... Args>
  explicit KernelBackend(Args&&... args) : exec_(std::forward<Args>(args)...) {}
  ~KernelBackend() override {
    shared_.clear();
    gemm_workspace_.release();
  }

  Exec& exec() { return exec_; }

  // bf16 or fp16 compute, as torch.autocast computes: every GEMM rounds its inputs to the half type and accumulates
  // in fp32 (activations, norms, softmax, the loss and the optimizer stay fp32). F32: fp32 GEMMs.
  void set_compute(GpuCompute compute) { compute_ = compute; }
  GpuCompute compute() const { return compute_; }
  FloatFormat gemm_weight_format() const override { return compute_format(compute_); }
  std::string name() const override { return exec_.name(); }

  // ---- memory ----
  void upload(void* dst, const void* src, size_t bytes) override { exec_.upload(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { exec_.download(dst, src, bytes); }
  void fill_zero(float* x, int64_t n) override { exec_.zero(x, static_cast<size_t>(n) * sizeof(float)); }
  void copy(float* dst, const float* src, int64_t n) override {
    exec_.copy(dst, src, static_cast<size_t>(n) * sizeof(float));
  }
  void* alloc_host(size_t bytes) override { return exec_.alloc_host(bytes); }
  void free_host(void* ptr, size_t) override { exec_.free_host(ptr); }
  int64_t begin_page_copy(void* dst, const void* src, size_t bytes, PageDir dir) override {
    return exec_.begin_page_copy(dst, src, bytes, dir == PageDir::Out);
  }
  double finish_page_copy(int64_t ticket) override { return exec_.finish_page_copy(ticket); }
  void set_profiling(bool on) override { exec_.set_profiling(on); }
  std::vector<OpTime> take_profile() override { return exec_.take_profile(); }

  // ---- dense math ----
  void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, const float* B,
            float beta, float* C) override {
    gemm_stored(ta, tb, M, N, K, alpha, A, StoredMatrix{B, FloatFormat::F32}, beta, C);
  }
  void convert_stored(StoredMatrix src, int64_t n, FloatFormat to, void* out) override {
    if (n <= 0) return;
    const int from = static_cast<int>(src.format);
    if (src.format == to)
      exec_.copy(out, src.data, static_cast<size_t>(n * float_format_bytes(to)));
    else if (to == FloatFormat::F32)
      exec_.launch("widen_to_f32", grid_for(n), exec_.threads, kernels::widen_to_f32,
                   static_cast<const uint16_t*>(src.data), n, from, static_cast<float*>(out));
    else if (src.format == FloatFormat::F32)
      exec_.launch("to_half", grid_for(n), exec_.threads, kernels::to_half, static_cast<const float*>(src.data), n,
                   to == FloatFormat::F16, static_cast<uint16_t*>(out));
    else
      exec_.launch("half_to_half", grid_for(n), exec_.threads, kernels::half_to_half,
                   static_cast<const uint16_t*>(src.data), n, from, to == FloatFormat::F16, static_cast<uint16_t*>(out));
  }
  // A 16-bit B in the compute dtype goes to the GEMM as it is (the LM head of a bf16 model is never converted);
  // otherwise B is converted into workspace first, whole.
  void gemm_stored(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, StoredMatrix B,
                   float beta, float* C) override {
    if (M == 0 || N == 0) return;
    if (K == 0) {  // C = beta * C: cuBLASLt takes no empty inner dimension
      if (beta == 0.0f)
        fill_zero(C, M * N);
      else
        scale_inplace(C, beta, M * N);
      return;
    }
    const auto [workspace, workspace_bytes] = gemm_workspace();
    // A holds M*K values and B K*N, whichever way they are stored
    const int64_t b_count = K * N;
    DeviceArray<float> b32;  // B widened to fp32, when fp32 is what the GEMM takes
    auto b_f32 = [&]() -> const float* {
      if (B.format == FloatFormat::F32) return static_cast<const float*>(B.data);
      b32.reset(this, b_count, MemCategory::Workspace);
      convert_stored(B, b_count, FloatFormat::F32, b32.get());
      return b32.get();
    };
    if (compute_ == GpuCompute::F32)
      return exec_.gemm(ta, tb, M, N, K, alpha, A, b_f32(), beta, C, workspace, workspace_bytes);
    const bool f16 = compute_ == GpuCompute::F16;
    const FloatFormat half = f16 ? FloatFormat::F16 : FloatFormat::BF16;
    DeviceArray<uint16_t> a16, b16;
    // a shared copy (begin_shared_input) may have wider rows than the operand: its leading dimension goes along
    int64_t lda = 0, ldb = 0;
    const uint16_t* a_half = shared_half(A, ta ? K : M, ta ? M : K, &lda);
    if (!a_half) {
      require_fp32(A, "gemm");
      a16.reset(this, M * K, MemCategory::Workspace);
      exec_.launch("to_half", grid_for(M * K), exec_.threads, kernels::to_half, A, M * K, f16, a16.get());
      a_half = a16.get();
    }
    const uint16_t* b_half = B.format == half ? static_cast<const uint16_t*>(B.data)
                             : B.format == FloatFormat::F32
                                 ? shared_half(static_cast<const float*>(B.data), tb ? N : K, tb ? K : N, &ldb)
                                 : nullptr;
    if (!b_half) {
      if (B.format == FloatFormat::F32) require_fp32(static_cast<const float*>(B.data), "gemm");
      b16.reset(this, b_count, MemCategory::Workspace);
      convert_stored(B, b_count, half, b16.get());
      b_half = b16.get();
    }
    if (!exec_.gemm_half(f16, ta, tb, M, N, K, alpha, a_half, b_half, beta, C, workspace, workspace_bytes, lda, ldb)) {
      // No half kernel for this shape: the same product in fp32 from the 16-bit operands (a shared copy may be all
      // there is of A or B, held in its own bytes).
      DeviceArray<float> a32(this, M * K, MemCategory::Workspace), b32w(this, b_count, MemCategory::Workspace);
      widen_rows(a_half, ta ? K : M, ta ? M : K, lda, a32.get());
      widen_rows(b_half, tb ? N : K, tb ? K : N, ldb, b32w.get());
      a16.release();
      b16.release();
      exec_.gemm(ta, tb, M, N, K, alpha, a32.get(), b32w.get(), beta, C, workspace, workspace_bytes);
    }
  }
  // rows x cols 16-bit values in the compute's format, their rows ld apart (0: cols), widened to fp32.
  void widen_rows(const uint16_t* x, int64_t rows, int64_t cols, int64_t ld, float* out) {
    exec_.launch("widen_rows", grid_for(rows * cols), exec_.threads, kernels::widen_rows, x, rows, cols,
                 ld == 0 ? cols : ld, compute_ == GpuCompute::F16, out);
  }
  bool begin_shared_input(const float* x, int64_t rows, int64_t cols, int64_t lora_columns) override {
    if (compute_ == GpuCompute::F32 || !x || rows <= 0 || cols <= 0) return false;
    for (const SharedInput& s : shared_)
      if (s.x == x) return false;
    shared_.push_back(SharedInput{x, rows, cols, cols + std::max<int64_t>(lora_columns, 0), {}});
    return true;
  }
  // The op writing y then writes its 16-bit copy alone (written_in_16_bits); an op that writes y in fp32 instead
  // leaves the copy to be made from it at the first GEMM, as for a shared input (beside y, even where in_place).
  bool begin_shared_output(float* y, int64_t rows, int64_t cols, int64_t lora_columns, bool in_place) override {
    return share_output(y, rows, cols, lora_columns, in_place, false);
  }
  bool holds_activations_in_16_bits() const override { return compute_ != GpuCompute::F32; }
  // Held in 16 bits from the GEMM writing it: written as the GEMM's output rounded, read so by swiglu.
  bool begin_half_activation(float* y, int64_t rows, int64_t cols, int64_t lora_columns) override {
    return share_output(y, rows, cols, lora_columns, true, true);
  }
  int64_t lora_fused_columns(int64_t rank) const override { return qlora::lora_fused_columns(compute_, rank); }
  void gemm_with_lora_up(int64_t M, int64_t N, int64_t K, const float* x, uint16_t* w_rows, int64_t R,
                         const float* t, const float* b, float alpha, float* y) override {
    const int64_t columns = check_lora_fusion("gemm_with_lora_up", M, N, K, R), ld = K + columns;
    exec_.launch("to_half_rows", grid_for(N * columns), exec_.threads, kernels::to_half_rows, b, N, R, R, 1.0f,
                 compute_ == GpuCompute::F16, w_rows + K, ld, columns);  // B beside W
    DeviceArray<uint16_t> own;
    const uint16_t* a = with_lora_columns(x, M, K, t, R, alpha, own);
    // y shared as the output it is about to be (begin_shared_output, begin_half_activation): its 16-bit copy is
    // written instead
    const kernels::HalfRows y16 = written_in_16_bits(y, M * N);
    if (!y16.data) return gemm_16(false, true, M, N, ld, a, w_rows, 0.0f, y);
    gemm_16_to_16(true, M, N, ld, a, w_rows, y16);
  }
  void gemm_dx_with_lora(int64_t M, int64_t N, int64_t K, const float* dy, uint16_t* w_rows, int64_t w_ld, int64_t R,
                         const float* dt, const float* a, float beta, float* dx) override {
    const int64_t columns = check_lora_fusion("gemm_dx_with_lora", M, N, K, R), ld = K + columns;
    if (w_ld < N) fail("gemm_dx_with_lora: rows of ", N, " weights ", w_ld, " apart");
    uint16_t* below = w_rows + K * w_ld;  // A under W, then zero rows, in rows as wide as W's
    exec_.launch("to_half_rows", grid_for(R * N), exec_.threads, kernels::to_half_rows, a, R, N, N, 1.0f,
                 compute_ == GpuCompute::F16, below, w_ld, N);
    if (columns > R) exec_.zero(below + R * w_ld, static_cast<size_t>((columns - R) * w_ld) * sizeof(uint16_t));
    DeviceArray<uint16_t> own;
    const uint16_t* g = with_lora_columns(dy, M, K, dt, R, 1.0f, own);
    // dx held in 16 bits from here (begin_half_activation): written so, when not accumulated into
    const kernels::HalfRows dx16 = beta == 0.0f ? written_in_16_bits(dx, M * N) : kernels::HalfRows{};
    const int64_t ldb = w_ld == N ? 0 : w_ld;
    if (!dx16.data) return gemm_16(false, false, M, N, ld, g, w_rows, beta, dx, ldb);
    gemm_16_to_16(false, M, N, ld, g, w_rows, dx16, ldb);
  }
  void end_shared_input(const float* x) override {
    shared_.erase(std::remove_if(shared_.begin(), shared_.end(), [x](const SharedInput& s) { return s.x == x; }),
                  shared_.end());
  }
  void add_inplace(float* y, const float* x, int64_t n) override {
    if (n > 0) exec_.launch("add_inplace", grid_for(n), exec_.threads, kernels::add_inplace, y, x, n);
  }
  void add_bias_rows(float* y, const float* bias, int64_t rows, int64_t cols) override {
    require_fp32(y, "add_bias_rows");
    if (rows * cols > 0)
      exec_.launch("add_bias_rows", grid_for(rows * cols), exec_.threads, kernels::add_bias_rows, y, bias, rows, cols);
  }
  void scale_inplace(float* x, float s, int64_t n) override {
    if (n > 0) exec_.launch("scale_inplace", grid_for(n), exec_.threads, kernels::scale_inplace, x, s, n);
  }
  double sum_of_squares(const float* x, int64_t n) override { return sum_of_squares_many({{x, n}}); }
  // Each tensor's blocks write their partial sums side by side; one block adds them all, one download.
  double sum_of_squares_many(const std::vector<std::pair<const float*, int64_t>>& tensors) override {
    DeviceArray<double> partial;
    const int64_t slots = partial_sums_of_squares(tensors, partial, 1);
    if (slots == 0) return 0.0;
    double* total = partial.get() + slots;
    exec_.launch("sum_of_squares", 1u, exec_.threads, kernels::sum_partials, static_cast<const double*>(partial.get()),
                 slots, total);
    double result = 0.0;
    exec_.download(&result, total, sizeof result);
    return result;
  }
  // ---- transformer ops ----
  bool keeps_embedding_on_host() const override { return true; }
  void embedding(const int32_t* host_ids, int64_t rows, StoredMatrix table, int64_t dim, float* out) override {
    if (rows <= 0) return;
    DeviceArray<int32_t> ids(this, rows, MemCategory::Workspace);
    ids.upload(host_ids, rows);
    exec_.launch("embedding", row_grid(rows), exec_.threads, kernels::embedding, static_cast<const int32_t*>(ids.get()),
                 table.data, static_cast<int>(table.format), dim, out);
  }
  void rmsnorm_forward(const float* x, const float* w, int64_t rows, int64_t dim, double eps, float* y,
                       float* rstd) override {
    if (rows <= 0) return;
    // y shared as the output it is about to be (begin_shared_output): its 16-bit copy is written instead
    const kernels::HalfRows y16 = written_in_16_bits(y, rows * dim);
    exec_.launch("rmsnorm_forward", row_grid(rows), exec_.threads, kernels::rmsnorm_forward, x, w, dim, eps, y, y16,
                 compute_ == GpuCompute::F16, rstd);
  }
  void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, int64_t rows,
                        int64_t dim, float* dx) override {
    if (rows > 0)
      exec_.launch("rmsnorm_backward", row_grid(rows), exec_.threads, kernels::rmsnorm_backward, dy, x, w, rstd, dim, dx);
  }
  void rope_apply(float* x, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, const float* cos_table,
                  const float* sin_table, bool inverse) override {
    if (batch * seq * heads * (head_dim / 2) > 0)
      exec_.launch("rope_apply", row_grid(batch * seq), exec_.threads, kernels::rope_apply, x, seq, heads, head_dim,
                   cos_table, sin_table, inverse);
  }
  void attention_forward(const float* q, const float* k, const float* v, int64_t batch, int64_t seq, int64_t heads,
                         int64_t kv_heads, int64_t head_dim, float* out, float* lse) override {
    check_heads(heads, kv_heads, batch, head_dim);
    if (batch * seq == 0) return;
    if (uses_flash_attention(head_dim))
      return with_flash_kernels(head_dim, [&](auto dims, auto f16) {
        constexpr int D = decltype(dims)::value;
        constexpr bool F16 = decltype(f16)::value;
        exec_.launch("flash_attention_forward", flash_grid(seq, kernels::kFlashQueryRows, heads, batch),
                     kernels::kFlashThreads, kernels::flash_attention_forward<D, F16>, q, k, v, seq, int64_t{0},
                     heads, kv_heads, attention_scale(head_dim), out, lse);
      });
    exec_.launch("attention_forward", attention_grid(seq, heads, batch), exec_.threads, kernels::attention_forward, q, k,
                 v, seq, heads, kv_heads, head_dim, attention_scale(head_dim), out, lse);
  }
  void attention_backward(const float* dout, const float* q, const float* k, const float* v, const float* out,
                          const float* lse, int64_t batch, int64_t seq, int64_t heads, int64_t kv_heads,
                          int64_t head_dim, float* dq, float* dk, float* dv) override {
    check_heads(heads, kv_heads, batch, head_dim);
    if (batch * seq == 0) return;
    // D_i = dO_i·O_i of every query row: the rows pass writes it, the key pass reads it.
    DeviceArray<float> row_dots(this, batch * heads * seq, MemCategory::Workspace);
    if (uses_flash_attention(head_dim))
      return with_flash_kernels(head_dim, [&](auto dims, auto f16) {
        constexpr int D = decltype(dims)::value;
        constexpr bool F16 = decltype(f16)::value;
        const float scale = attention_scale(head_dim);
        exec_.launch("flash_attention_backward_dq", flash_grid(seq, kernels::kFlashQueryRows, heads, batch),
                     kernels::kFlashThreads, kernels::flash_attention_backward_dq<D, F16>, dout, q, k, v, out, lse,
                     seq, heads, kv_heads, scale, row_dots.get(), dq);
        exec_.launch("flash_attention_backward_dkv", flash_grid(seq, kernels::kFlashDkvKeys, kv_heads, batch),
                     kernels::kFlashDkvThreads, kernels::flash_attention_backward_dkv<D, F16>, dout, q, k, v, lse,
                     static_cast<const float*>(row_dots.get()), seq, heads, kv_heads, scale, dk, dv);
      });
    exec_.launch("attention_backward_dq", attention_grid(seq, heads, batch), exec_.threads,
                 kernels::attention_backward_dq, dout, q, k, v, out, lse, seq, heads, kv_heads, head_dim,
                 attention_scale(head_dim), row_dots.get(), dq);
    exec_.launch("attention_backward_dkv", attention_grid(seq, kv_heads, batch), exec_.threads,
                 kernels::attention_backward_dkv, dout, q, k, v, lse, static_cast<const float*>(row_dots.get()), seq,
                 heads, kv_heads, head_dim, attention_scale(head_dim), dk, dv);
  }
  void attention_cached(const float* q, const float* k_cache, const float* v_cache, int64_t q_len, int64_t past,
                        int64_t heads, int64_t kv_heads, int64_t head_dim, float* out) override {
    check_heads(heads, kv_heads, 1, head_dim);
    if (q_len <= 0) return;
    if (q_len >= kFlashPrefillRows && uses_flash_attention(head_dim))  // a prompt's prefill; decoding stays scalar
      return with_flash_kernels(head_dim, [&](auto dims, auto f16) {
        constexpr int D = decltype(dims)::value;
        constexpr bool F16 = decltype(f16)::value;
        exec_.launch("flash_attention_forward", flash_grid(q_len, kernels::kFlashQueryRows, heads, 1),
                     kernels::kFlashThreads, kernels::flash_attention_forward<D, F16>, q, k_cache, v_cache, q_len,
                     past, heads, kv_heads, attention_scale(head_dim), out, static_cast<float*>(nullptr));
      });
    exec_.launch("attention_cached", attention_grid(q_len, heads, 1), exec_.threads, kernels::attention_cached, q,
                 k_cache, v_cache, past, heads, kv_heads, head_dim, attention_scale(head_dim), out);
  }
  void swiglu_forward(const float* g, const float* u, int64_t n, float* out) override {
    if (n <= 0) return;
    const kernels::HalfRows g16 = held_in_16_bits(g, n, "swiglu_forward"),
                            u16 = held_in_16_bits(u, n, "swiglu_forward");
    const kernels::HalfRows out16 = written_in_16_bits(out, n);  // as rmsnorm_forward's y
    exec_.launch("swiglu_forward", grid_for(n), exec_.threads, kernels::swiglu_forward, g, u, n,
                 row_length(n, {g16, u16, out16}, "swiglu_forward"), g16, u16, out, out16, compute_ == GpuCompute::F16);
  }
  void swiglu_backward(const float* dout, const float* g, const float* u, int64_t n, float* dg, float* du) override {
    if (n <= 0) return;
    const kernels::HalfRows dout16 = held_in_16_bits(dout, n, "swiglu_backward"),
                            g16 = held_in_16_bits(g, n, "swiglu_backward"),
                            u16 = held_in_16_bits(u, n, "swiglu_backward");
    // dg and du shared as the outputs they are about to be (begin_shared_output): their 16-bit copies are written;
    // in place of g and u held in 16 bits (begin_half_activation), in their rows, which then hold the gradients
    const kernels::HalfRows dg16 = g16.data && dg == g ? g16 : written_in_16_bits(dg, n),
                            du16 = u16.data && du == u ? u16 : written_in_16_bits(du, n);
    exec_.launch("swiglu_backward", grid_for(n), exec_.threads, kernels::swiglu_backward, dout, dout16, g, u, n,
                 row_length(n, {dout16, g16, u16, dg16, du16}, "swiglu_backward"), g16, u16, dg, du, dg16, du16,
                 compute_ == GpuCompute::F16);
  }
  void cross_entropy(const float* logits, const int32_t* targets, int64_t rows, int64_t vocab, double grad_scale,
                     float* dlogits, double* logprobs) override {
    if (rows <= 0) return;
    // dlogits shared as the output it is about to be (begin_shared_output): its 16-bit copy is written instead
    const kernels::HalfRows dlogits16 = written_in_16_bits(dlogits, rows * vocab);
    exec_.launch("cross_entropy", row_grid(rows), exec_.threads, kernels::cross_entropy, logits, targets, vocab,
                 grad_scale, dlogits, dlogits16, compute_ == GpuCompute::F16, logprobs);
  }
  void log_softmax_rows(const float* logits, int64_t rows, int64_t vocab, float* host_out) override {
    if (rows <= 0) return;
    DeviceArray<float> out(this, rows * vocab, MemCategory::Workspace);
    exec_.launch("log_softmax_rows", row_grid(rows), exec_.threads, kernels::log_softmax_rows, logits, vocab, out.get());
    exec_.download(host_out, out.get(), static_cast<size_t>(rows * vocab) * sizeof(float));
  }

  // ---- 16-bit storage ----
  FloatFormat hidden_state_format() const override {
    return compute_ == GpuCompute::BF16 ? FloatFormat::BF16 : FloatFormat::F32;
  }
  void pack_16(const float* x, int64_t n, FloatFormat format, uint16_t* out) override {
    if (format == FloatFormat::F32) fail("pack_16 writes bf16 or fp16, not fp32");
    if (n > 0)
      exec_.launch("to_half", grid_for(n), exec_.threads, kernels::to_half, x, n, format == FloatFormat::F16, out);
  }
  void widen_16(const uint16_t* x, int64_t n, FloatFormat format, float* out) override {
    if (format == FloatFormat::F32) fail("widen_16 reads bf16 or fp16, not fp32");
    if (n > 0)
      exec_.launch("widen_to_f32", grid_for(n), exec_.threads, kernels::widen_to_f32, x, n, static_cast<int>(format), out);
  }

  // ---- QLoRA specifics ----
  void nf4_dequantize(const uint8_t* packed, const float* absmax, int64_t n, int blocksize, FloatFormat round_to,
                      float* out) override {
    if (n <= 0) return;
    nf4::check_blocksize(blocksize, "nf4_dequantize");
    exec_.launch("nf4_dequantize", grid_for((n + 1) / 2), exec_.threads, kernels::nf4_dequantize, packed, absmax, n,
                 blocksize, static_cast<int>(round_to), out);
  }
  void absmax_dequantize(const uint8_t* codes, int64_t n, const float* state2_absmax, const float* code2, float offset,
                         int blocksize2, float* out) override {
    if (blocksize2 <= 0) fail("double quantization blocksize must be positive, got ", blocksize2);
    if (n > 0)
      exec_.launch("absmax_dequantize", grid_for(n), exec_.threads, kernels::absmax_dequantize, codes, n, state2_absmax,
                   code2, offset, blocksize2, out);
  }
  void nf4_dequantize_16(const Nf4Weight& w, FloatFormat round_to, FloatFormat out_format, int64_t row_len,
                         int64_t row_stride, uint16_t* out) override {
    if (out_format == FloatFormat::F32) fail("nf4_dequantize_16 writes bf16 or fp16, not fp32");
    nf4::check_rows(row_len, row_stride, "nf4_dequantize_16");
    nf4::check_blocksize(w.blocksize, "nf4_dequantize_16");
    check_double_quantization(w);
    const int64_t n = w.out * w.in;
    if (n <= 0) return;
    const bool to_f16 = out_format == FloatFormat::F16;
    const kernels::Nf4Rows rows = nf4_rows(w, round_to);
    constexpr int64_t chunk = kernels::kNf4ChunkValues;
    // every 32 values under one block constant, in one row, 16-byte aligned in and out: a weight's usual layout
    if (row_len % chunk == 0 && n % row_len == 0 && w.blocksize % chunk == 0 && row_stride % 8 == 0 &&
        aligned_16(w.packed) && aligned_16(out)) {
      exec_.launch("nf4_dequantize_16", grid_for(n / chunk), exec_.threads, kernels::nf4_dequantize_16_wide, rows,
                   to_f16, row_len, row_stride, out);
      return;
    }
    exec_.launch("nf4_dequantize_16", grid_for((n + 1) / 2), exec_.threads, kernels::nf4_dequantize_16, rows, to_f16,
                 row_len, row_stride, out);
  }
  // Reads the 4-bit weights once, dequantizing as it goes, with the block constants, bias and LoRA's up projection
  // in the same pass: the values of the composition in the compute dtype, summed in another order than cuBLASLt's
  // (so equal to rounding, not bit for bit as on the CPU).
  void nf4_matmul_nt(const float* x, int64_t rows, const Nf4Weight& w, FloatFormat round_to, const FewRowsAddends& add,
                     float* y) override {
    static_assert(kNf4MatmulMaxRows <= kernels::kMaxFewRows, "the kernel keeps kMaxFewRows sums a thread");
    check_few_rows("nf4_matmul_nt", rows);
    nf4::check_blocksize(w.blocksize, "nf4_matmul_nt");
    check_double_quantization(w);
    if (rows == 0 || w.out == 0) return;
    const int warps = exec_.threads / kernels::kLanes;
    if (warps == 0 || exec_.threads % kernels::kLanes != 0)
      fail("nf4_matmul_nt: a warp a row needs blocks of whole warps, not ", exec_.threads, " threads");
    require_fp32(x, "nf4_matmul_nt");
    if (add.lora_t) require_fp32(add.lora_t, "nf4_matmul_nt");
    // 16 aligned bytes of codes a lane, under one block constant, and x's rows in float4s
    const bool wide = w.in % kernels::kNf4ChunkValues == 0 && w.blocksize % kernels::kNf4ChunkValues == 0 &&
                      aligned_16(w.packed) && aligned_16(x);
    const kernels::Nf4Rows rows_of_w = nf4_rows(w, round_to);
    const kernels::RowAddends addends{add.bias, add.lora_t, add.lora_b, add.rank, add.lora_scale};
    exec_.launch("nf4_matmul_nt", row_grid((w.out + warps - 1) / warps), exec_.threads, kernels::nf4_matmul_nt, x, rows,
                 rows_of_w, wide, addends, y);
  }
  void gemm_few_rows_nt(const float* x, int64_t rows, const float* w, int64_t out, int64_t in, float* y) override {
    check_few_rows("gemm_few_rows_nt", rows);
    if (rows == 0 || out == 0) return;
    require_fp32(x, "gemm_few_rows_nt");
    const bool wide = in % 4 == 0 && aligned_16(w) && aligned_16(x);  // every row's start 16-byte aligned too
    exec_.launch("gemm_few_rows_nt", row_grid(out), exec_.threads, kernels::gemm_few_rows_nt, x, rows, w, out, in,
                 wide, static_cast<int>(compute_format(compute_)), y);
  }
  // bitsandbytes' blockwise NF4 quantizer on the device (not part of the seam: the loader quantizes on the CPU).
  void nf4_quantize(const float* x, int64_t n, int blocksize, uint8_t* packed, float* absmax) {
    if (n <= 0) return;
    nf4::check_blocksize(blocksize, "nf4_quantize");
    exec_.launch("nf4_quantize", static_cast<unsigned>((n + blocksize - 1) / blocksize), exec_.threads,
                 kernels::nf4_quantize, x, n, blocksize, packed, absmax);
  }
  void dropout(const float* x, int64_t n, float p, uint64_t seed, uint32_t step, uint64_t offset,
               float* out) override {
    if (n <= 0) return;
    const kernels::HalfRows x16 = held_in_16_bits(x, n, "dropout");
    exec_.launch("dropout", grid_for((n + 3) / 4 + 1), exec_.threads, kernels::dropout, x, x16,
                 compute_ == GpuCompute::F16, n, p, seed, static_cast<uint32_t>(RngStream::Dropout), step, offset,
                 1.0f / (1.0f - p), out);
  }
  void adamw_update_many(const std::vector<AdamWTensor>& tensors, double lr, double beta1, double beta2, double eps,
                         double weight_decay, int64_t step, const GradScale* scale) override {
    // the gradient's scale is the device's (scale->scale), not this 1
    const AdamWStep constants = adamw_step_constants(lr, beta1, beta2, eps, weight_decay, step, 1.0);
    in_launch_groups(
        tensors.size(), [&](size_t i) { return tensors[i].n; },
        [&](size_t first, size_t count, int64_t widest) {
          if (widest <= 0) return;
          kernels::AdamWTensorList list{};
          for (size_t k = 0; k < count; ++k) {
            const AdamWTensor& t = tensors[first + k];
            list.param[k] = t.param;
            list.grad[k] = t.grad;
            list.m[k] = t.m;
            list.v[k] = t.v;
            list.n[k] = t.n;
          }
          exec_.launch("adamw_update", dim3(grid_for(widest), static_cast<unsigned>(count)), exec_.threads,
                       kernels::adamw_update_many, list, constants, scale);
        });
  }
  void grad_scale(const std::vector<std::pair<const float*, int64_t>>& grads, double loss_scale, double max_grad_norm,
                  GradScale* out) override {
    DeviceArray<double> partial;
    const int64_t slots = partial_sums_of_squares(grads, partial, 0);
    exec_.launch("grad_scale", 1u, exec_.threads, kernels::grad_scale_of_partials,
                 static_cast<const double*>(partial.get()), slots, loss_scale, max_grad_norm, out);
  }

 protected:
  void* device_alloc(size_t bytes, MemCategory category) override {
    return exec_.alloc(bytes, mem_category_name(category));
  }
  void device_free(void* ptr, size_t) override { exec_.free(ptr); }
  void on_memory_budget(int64_t bytes) override { exec_.set_memory_limit(bytes); }

 private:
  // The partial sums of squares of `tensors` (in double, kernels::kTensorsPerLaunch tensors a launch) into
  // `partial`, with `extra` slots after them; returns how many partials there are. The same tensors give the same
  // partials in the same order on every run.
  int64_t partial_sums_of_squares(const std::vector<std::pair<const float*, int64_t>>& tensors,
                                  DeviceArray<double>& partial, int64_t extra) {
    auto length = [&](size_t i) { return tensors[i].second; };
    // each launch's blocks span its widest tensor (the others' extra blocks write zeros)
    int64_t slots = 0;
    in_launch_groups(tensors.size(), length, [&](size_t, size_t count, int64_t widest) {
      slots += static_cast<int64_t>(grid_for(widest)) * static_cast<int64_t>(count);
    });
    partial.reset(this, slots + extra, MemCategory::Workspace);
    int64_t at = 0;
    in_launch_groups(tensors.size(), length, [&](size_t first, size_t count, int64_t widest) {
      kernels::TensorList list{};
      for (size_t k = 0; k < count; ++k) {
        list.x[k] = tensors[first + k].first;
        list.n[k] = std::max<int64_t>(0, tensors[first + k].second);
      }
      const unsigned blocks = grid_for(widest);
      exec_.launch("sum_of_squares", dim3(blocks, static_cast<unsigned>(count)), exec_.threads,
                   kernels::sum_of_squares_partial_many, list, partial.get() + at);
      at += static_cast<int64_t>(blocks) * static_cast<int64_t>(count);
    });
    return slots;
  }
  // The multi-tensor launches over `tensors` tensors: consecutive groups of at most kernels::kTensorsPerLaunch,
  // each(first, count, the longest length(i) of the group).
  template <typename Length, typename Each>
  static void in_launch_groups(size_t tensors, Length length, Each each) {
    for (size_t first = 0; first < tensors; first += kernels::kTensorsPerLaunch) {
      const size_t count = std::min<size_t>(kernels::kTensorsPerLaunch, tensors - first);
      int64_t widest = 0;
      for (size_t k = 0; k < count; ++k) widest = std::max(widest, length(first + k));
      each(first, count, widest);
    }
  }
  // Blocks for a grid-stride loop over n items: enough to fill the device, at most exec_.max_grid_blocks (each thread
  // loops).
  unsigned grid_for(int64_t n) const {
    const int64_t blocks = (n + exec_.threads - 1) / exec_.threads;
    return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, exec_.max_grid_blocks));
  }
  static bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
  kernels::Nf4Rows nf4_rows(const Nf4Weight& w, FloatFormat round_to) const {
    return {w.packed, w.absmax, w.absmax_codes, w.absmax2, w.absmax_map, w.absmax_offset, w.absmax_blocksize2,
            w.blocksize, w.out, w.in, static_cast<int>(round_to), static_cast<int>(compute_format(compute_))};
  }
  static void check_double_quantization(const Nf4Weight& w) {
    if (!w.absmax && w.absmax_blocksize2 <= 0)
      fail("double quantization blocksize must be positive, got ", w.absmax_blocksize2);
  }
  static unsigned row_grid(int64_t rows) {
    if (rows > int64_t{0x7fffffff}) fail("too many rows for one launch: ", rows);
    return static_cast<unsigned>(rows);
  }
  static dim3 attention_grid(int64_t rows, int64_t heads, int64_t batch) {
    if (rows > int64_t{0x7fffffff} || heads > 65535 || batch > 65535)
      fail("attention of ", batch, " x ", heads, " heads x ", rows, " rows is more than one launch takes");
    return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  }
  void check_heads(int64_t heads, int64_t kv_heads, int64_t batch, int64_t head_dim) const {
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads != 0 || batch < 0)
      fail("attention: ", heads, " query heads cannot share ", kv_heads, " kv heads");
    if (head_dim > int64_t{kernels::kMaxDimsPerThread} * exec_.threads)
      fail("attention: a head of ", head_dim, " dimensions is more than the kernels take (", kernels::kMaxDimsPerThread * exec_.threads, ")");
  }
  // Generation's new rows from which the tensor-core kernel (blocks of 64 query rows) beats one block per row.
  static constexpr int64_t kFlashPrefillRows = 16;
  // The tensor-core attention (flash_attention.cuh), for the head sizes built: fp16 compute from Turing on (its
  // tensor cores take fp16 in products of k 8, two to each of the kernels' k 16), bf16 from Ampere on.
  bool uses_flash_attention(int64_t head_dim) const {
    const int least_sm = compute_ == GpuCompute::F16 ? 75 : compute_ == GpuCompute::BF16 ? 80 : 0;
    return least_sm > 0 && exec_.sm() >= least_sm && kernels::flash_head_dim_supported(head_dim);
  }
  // Calls run(dims, f16) with the head size and the compute's 16-bit type as compile-time constants.
  template <typename Run>
  void with_flash_kernels(int64_t head_dim, Run&& run) const {
    const bool f16 = compute_ == GpuCompute::F16;
    auto with_dims = [&](auto dims) {
      if (f16)
        run(dims, std::true_type{});
      else
        run(dims, std::false_type{});
    };
    switch (head_dim) {
      case 16: return with_dims(std::integral_constant<int, 16>{});
      case 32: return with_dims(std::integral_constant<int, 32>{});
      case 64: return with_dims(std::integral_constant<int, 64>{});
      case 128: return with_dims(std::integral_constant<int, 128>{});
      default: fail("attention: no tensor-core kernel for heads of ", head_dim, " dimensions");
    }
  }
  static dim3 flash_grid(int64_t rows, int64_t rows_per_block, int64_t heads, int64_t batch) {
    return attention_grid((rows + rows_per_block - 1) / rows_per_block, heads, batch);
  }
  static float attention_scale(int64_t head_dim) {
    return static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  }

  int64_t check_lora_fusion(const char* op, int64_t M, int64_t N, int64_t K, int64_t R) const {
    const int64_t columns = lora_fused_columns(R);
    if (columns < R || columns == 0 || M <= 0 || N <= 0 || K <= 0)
      fail(op, ": a ", M, "x", N, "x", K, " GEMM with LoRA of rank ", R, " is not fused under ", exec_.name(),
           " in this compute dtype");
    return columns;
  }
  // [x | scale t] ([M, K] and [M, R] fp32) in 16 bits, rows of K + lora_fused_columns(R) values, the columns past R
  // zero: in x's shared copy where it has that room, else in `own`.
  const uint16_t* with_lora_columns(const float* x, int64_t M, int64_t K, const float* t, int64_t R, float scale,
                                    DeviceArray<uint16_t>& own) {
    const int64_t columns = lora_fused_columns(R), ld = K + columns;
    const bool f16 = compute_ == GpuCompute::F16;
    int64_t shared_ld = 0;
    uint16_t* rows = shared_half(x, M, K, &shared_ld);
    if (!rows || shared_ld != ld) {
      require_fp32(x, "a fused LoRA GEMM");
      own.reset(this, M * ld, MemCategory::Workspace);
      exec_.launch("to_half_rows", grid_for(M * K), exec_.threads, kernels::to_half_rows, x, M, K, K, 1.0f, f16,
                   own.get(), ld, K);
      rows = own.get();
    }
    exec_.launch("to_half_rows", grid_for(M * columns), exec_.threads, kernels::to_half_rows, t, M, R, R, scale, f16,
                 rows + K, ld, columns);
    return rows;
  }
  // C = A op(B) written in 16 bits into C's rows (the fp32 sums rounded), as gemm_16 (fp32, then rounded, where
  // cuBLASLt has no such algorithm).
  void gemm_16_to_16(bool tb, int64_t M, int64_t N, int64_t K, const uint16_t* A, const uint16_t* B,
                     kernels::HalfRows C, int64_t ldb = 0) {
    if (C.cols != N) fail("a ", M, "x", N, " GEMM output shared as rows of ", C.cols, " values");
    const bool f16 = compute_ == GpuCompute::F16;
    const auto [workspace, workspace_bytes] = gemm_workspace();
    if (exec_.gemm_half_to_half(f16, false, tb, M, N, K, 1.0f, A, B, C.data, C.ld, workspace, workspace_bytes, ldb))
      return;
    DeviceArray<float> c32(this, M * N, MemCategory::Workspace);
    gemm_16(false, tb, M, N, K, A, B, 0.0f, c32.get(), ldb);
    exec_.launch("to_half_rows", grid_for(M * N), exec_.threads, kernels::to_half_rows, c32.get(), M, N, N, 1.0f, f16,
                 C.data, C.ld, N);
  }
  // C = A op(B) + beta C with A [M, K] and B 16-bit matrices in the compute's format, B's rows ldb values apart
  // where ldb > 0 (wider than its columns); where cuBLASLt has no half algorithm for the shape, the same product in
  // fp32 from the 16-bit values.
  void gemm_16(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const uint16_t* A, const uint16_t* B, float beta,
               float* C, int64_t ldb = 0) {
    const bool f16 = compute_ == GpuCompute::F16;
    const auto [workspace, workspace_bytes] = gemm_workspace();
    if (exec_.gemm_half(f16, ta, tb, M, N, K, 1.0f, A, B, beta, C, workspace, workspace_bytes, 0, ldb)) return;
    const FloatFormat half = f16 ? FloatFormat::F16 : FloatFormat::BF16;
    const int64_t b_rows = tb ? N : K, b_cols = tb ? K : N;
    DeviceArray<float> a32(this, M * K, MemCategory::Workspace);
    DeviceArray<float> b32(this, b_rows * b_cols, MemCategory::Workspace);
    convert_stored({A, half}, M * K, FloatFormat::F32, a32.get());
    if (ldb > 0)
      widen_rows(B, b_rows, b_cols, ldb, b32.get());
    else
      convert_stored({B, half}, b_rows * b_cols, FloatFormat::F32, b32.get());
    exec_.gemm(ta, tb, M, N, K, 1.0f, a32.get(), b32.get(), beta, C, workspace, workspace_bytes);
  }
  // cuBLASLt's scratch, allocated on first use, so that it counts against the budget set by then.
  std::pair<void*, size_t> gemm_workspace() {
    if (!gemm_workspace_ready_) {
      const size_t bytes = exec_.gemm_workspace_bytes();
      if (bytes > 0) gemm_workspace_.reset(this, static_cast<int64_t>(bytes), MemCategory::Workspace);
      gemm_workspace_ready_ = true;
    }
    return {gemm_workspace_.get(), static_cast<size_t>(gemm_workspace_.size())};
  }
  // The 16-bit copy of a shared GEMM input (begin_shared_input) read whole as [rows, cols], made on first use, and
  // its leading dimension (*ld); null where x is not shared or is read as another shape (a part of it).
  uint16_t* shared_half(const float* x, int64_t rows, int64_t cols, int64_t* ld) {
    for (SharedInput& s : shared_) {
      if (s.x != x || s.rows != rows || s.cols != cols) continue;
      if (!s.half) {
        s.own.reset(this, rows * s.ld, MemCategory::Workspace);
        s.half = s.own.get();
        exec_.launch("to_half_rows", grid_for(rows * cols), exec_.threads, kernels::to_half_rows, x, rows, cols, cols,
                     1.0f, compute_ == GpuCompute::F16, s.half, s.ld, cols);
      }
      *ld = s.ld;
      return s.half;
    }
    return nullptr;
  }

  // Where an op writes y's 16-bit copy alone: y shared by begin_shared_output as n values, its copy not yet made.
  // The copy is made here and y marked as held in 16 bits only; {} (no data) where y is not such an output.
  kernels::HalfRows written_in_16_bits(const float* y, int64_t n) {
    for (SharedInput& s : shared_)
      if (y && s.x == y && s.written_next && s.rows * s.cols == n && !s.half) {
        if (s.in_place) {
          s.half = reinterpret_cast<uint16_t*>(const_cast<float*>(y));
        } else {
          s.own.reset(this, s.rows * s.ld, MemCategory::Workspace);
          s.half = s.own.get();
        }
        s.fp32_stale = true;
        return {s.half, s.cols, s.ld};
      }
    return {};
  }
  bool share_output(float* y, int64_t rows, int64_t cols, int64_t lora_columns, bool in_place, bool half_activation) {
    // in place, rows of cols + lora_columns 16-bit values fill at most rows of cols floats
    if (in_place && std::max<int64_t>(lora_columns, 0) > cols) return false;
    if (!begin_shared_input(y, rows, cols, lora_columns)) return false;
    shared_.back().written_next = true;
    shared_.back().in_place = in_place;
    shared_.back().half_activation = half_activation;
    return true;
  }
  // The row length of an elementwise op's operands held or written in 16-bit rows (all the same, else an error), or
  // n (one row) where none is.
  static int64_t row_length(int64_t n, std::initializer_list<kernels::HalfRows> operands, const char* op) {
    int64_t cols = 0;
    for (const kernels::HalfRows& h : operands)
      if (h.data) {
        if (cols != 0 && h.cols != cols) fail(op, ": operands in 16-bit rows of ", cols, " and ", h.cols, " values");
        cols = h.cols;
      }
    return cols > 0 ? cols : std::max<int64_t>(n, 1);
  }
  // x of n values as held in 16 bits (begin_half_activation), its rows; {} (no data) where x is held in fp32.
  kernels::HalfRows held_in_16_bits(const float* x, int64_t n, const char* op) {
    for (SharedInput& s : shared_)
      if (x && s.x == x && s.half_activation && s.fp32_stale) {
        if (s.rows * s.cols != n)
          fail(op, ": reads ", n, " values of a tensor held in 16 bits as ", s.rows, "x", s.cols);
        return {s.half, s.cols, s.ld};
      }
    require_fp32(x, op);
    return {};
  }
  // An op about to read x in fp32: an error where only x's 16-bit copy was written (a caller that broke
  // begin_shared_output's promise), instead of results from whatever the fp32 buffer held.
  void require_fp32(const float* x, const char* op) const {
    for (const SharedInput& s : shared_)
      if (s.x == x && s.fp32_stale)
        fail(op, ": reads in fp32 a tensor of ", s.rows, "x", s.cols,
             " that was written only in 16 bits (shared as an output its GEMMs read whole)");
  }

  struct SharedInput {
    const float* x;
    int64_t rows, cols, ld;  // ld: cols and room for LoRA's columns (gemm_with_lora_up)
    DeviceArray<uint16_t> own;  // the copy where it is not in x's own bytes
    uint16_t* half = nullptr;   // the copy, once made
    bool written_next = false;  // begin_shared_output: the next op may write `half` alone
    bool in_place = false;      // ... into x's own bytes
    bool half_activation = false;  // begin_half_activation: swiglu reads the copy (x held in 16 bits)
    bool fp32_stale = false;    // ... and did: x holds what it held before, or (in place) the copy
  };
  std::vector<SharedInput> shared_;  // a few at a time
  Exec exec_;
  DeviceArray<uint8_t> gemm_workspace_;  // scratch of the GEMM library (cuBLASLt's), when it wants one
  bool gemm_workspace_ready_ = false;
  GpuCompute compute_ = GpuCompute::F32;
};

}  // namespace qlora::cuda
