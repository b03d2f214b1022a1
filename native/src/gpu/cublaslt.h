// cuBLASLt, loaded at run time from the folders of libraries.h, with our own declarations of the few functions and
// constants the engine uses (cublasLt.h's stable C ABI), so that no cuBLAS is needed to build. One handle per
// process; `matmul` is the engine's GEMM on the GPU: row-major C = alpha * op(A) op(B) + beta * C with fp32
// accumulation, inputs in fp32, bf16 or fp16.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "gpu/libraries.h"

namespace qlora::gpu {

// cudaDataType values (library_types.h) of the element types the engine passes.
enum class GemmType : int { F32 = 0, F16 = 2, BF16 = 14 };

class CublasLt {
 public:
  // Loads and initializes cuBLASLt, or throws EngineError with the sentence `doctor` gives for a missing library.
  static const CublasLt& get(const std::string& library_dir = "");
  ~CublasLt();
  CublasLt(const CublasLt&) = delete;
  CublasLt& operator=(const CublasLt&) = delete;

  const std::string& path() const { return path_; }
  size_t version() const { return version_; }

  // Row-major C [M, N] = alpha * op(A) op(B) + beta * C, op(A) [M, K], op(B) [K, N]; A stored [M, K] or, with
  // trans_a, [K, M] (likewise B). A and B of type `in`, C of type `out`; compute and scale in fp32. `workspace`
  // (device memory, may be null) speeds up some algorithms. Runs on `stream` (a cudaStream_t; null: the default).
  void matmul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
              const void* B, float beta, void* C, GemmType in, GemmType out, void* workspace,
              size_t workspace_bytes, void* stream) const;
  // The same, returning false (and computing nothing) when cuBLASLt has no algorithm for these types, shapes and
  // alignments (bf16 rows of an odd length, say), so that the caller can compute it another way. Each distinct
  // shape, types, alignments, leading dimensions and workspace is planned once (descriptors and the heuristic's
  // algorithm) and the plan kept (up to a few thousand, then all are dropped and planned afresh): a training step's
  // few dozen shapes never ask the heuristic twice. lda, ldb, ldc: the stored rows' lengths in values when A, B or C
  // is a part of a wider matrix (0: as stored whole, K or M for A, N or K for B, N for C).
  bool try_matmul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                  const void* B, float beta, void* C, GemmType in, GemmType out, void* workspace,
                  size_t workspace_bytes, void* stream, int64_t lda = 0, int64_t ldb = 0, int64_t ldc = 0) const;

 private:
  struct Functions;
  struct Plan;
  using PlanKey = std::array<int64_t, 15>;
  CublasLt() = default;
  std::shared_ptr<const Plan> plan(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, int64_t lda,
                                   int64_t ldb, int64_t ldc, GemmType in, GemmType out,
                                   const std::array<uint32_t, 4>& alignments, uint64_t workspace_bytes) const;
  std::unique_ptr<Functions> f_;
  mutable std::mutex plans_mutex_;
  // Shared with the calls using them, so that dropping the plans (when there are too many: generation's prompts
  // of every length) never destroys one in use.
  mutable std::map<PlanKey, std::shared_ptr<const Plan>> plans_;
  void* handle_ = nullptr;
  std::string path_;
  size_t version_ = 0;
};

}  // namespace qlora::gpu
