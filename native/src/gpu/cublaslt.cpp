#include "gpu/cublaslt.h"

#include <algorithm>
#include <mutex>

#include "util/error.h"

namespace qlora::gpu {

namespace {

// ---- our declarations (cublasLt.h, stable since CUDA 11) ----
using cublasStatus_t = int;
using Handle = void*;
using Desc = void*;
using Layout = void*;
using Preference = void*;
struct Algo {
  uint64_t data[8];
};
struct HeuristicResult {
  Algo algo;
  size_t workspace_size;
  cublasStatus_t state;
  float waves_count;
  int reserved[4];
};
constexpr int kComputeF32 = 68;             // CUBLAS_COMPUTE_32F: fp32 accumulation, no TF32
constexpr int kDescTransA = 3;              // CUBLASLT_MATMUL_DESC_TRANSA
constexpr int kDescTransB = 4;              // CUBLASLT_MATMUL_DESC_TRANSB
constexpr int kPrefMaxWorkspaceBytes = 1;   // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
constexpr int kPrefMinAlignmentA = 5;       // CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES: 5, 6, 7, 8

// The alignment a pointer has, up to the 256 bytes cuBLASLt assumes by default: the engine passes pointers into
// the middle of buffers (a chunk of rows), which an algorithm that needs 256 would read wrongly.
uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  return a == 0 ? 256u : static_cast<uint32_t>(std::min<uintptr_t>(256, a & (~a + 1)));
}
constexpr int kOpN = 0, kOpT = 1;           // CUBLAS_OP_N, CUBLAS_OP_T
constexpr int kStatusNotSupported = 15;    // CUBLAS_STATUS_NOT_SUPPORTED

// A function cuBLASLt must have.
template <typename F>
F required(const Library& lib, const char* name) {
  F f = lib.function<F>(name);
  if (!f) fail("cuBLASLt at ", lib.path, " has no ", name, "; install cuBLASLt for CUDA 13");
  return f;
}

}  // namespace

struct CublasLt::Functions {
  cublasStatus_t (*create)(Handle*);
  cublasStatus_t (*destroy)(Handle);
  size_t (*get_version)();
  cublasStatus_t (*desc_create)(Desc*, int, int);
  cublasStatus_t (*desc_set)(Desc, int, const void*, size_t);
  cublasStatus_t (*desc_destroy)(Desc);
  cublasStatus_t (*layout_create)(Layout*, int, uint64_t, uint64_t, int64_t);
  cublasStatus_t (*layout_destroy)(Layout);
  cublasStatus_t (*pref_create)(Preference*);
  cublasStatus_t (*pref_set)(Preference, int, const void*, size_t);
  cublasStatus_t (*pref_destroy)(Preference);
  cublasStatus_t (*heuristic)(Handle, Desc, Layout, Layout, Layout, Layout, Preference, int, HeuristicResult*, int*);
  cublasStatus_t (*matmul)(Handle, Desc, const void*, const void*, Layout, const void*, Layout, const void*,
                           const void*, Layout, void*, Layout, const Algo*, void*, size_t, void*);
};

const CublasLt& CublasLt::get(const std::string& library_dir) {
  static std::mutex mutex;
  static std::unique_ptr<CublasLt> instance;
  std::lock_guard<std::mutex> lock(mutex);
  if (instance) return *instance;
  const SearchEnv env = current_search_env(library_dir);
  const std::vector<std::string> dirs = search_dirs(env);
  const Library lib = load_library(cublaslt_names(env.windows), dirs);
  if (!lib.found())
    fail("cuBLASLt (", cublaslt_names(env.windows)[0], ") was not found in ", dirs.size(),
         " places searched: install the CUDA 13 toolkit or the nvidia-cublas wheel for CUDA 13, or set "
         "qlora.cudaLibraryPath (QLORA_CUDA_LIB_DIR) to the folder that holds it (QLoRA: Check GPU Setup lists them)");
  std::unique_ptr<CublasLt> lt(new CublasLt());
  auto f = std::make_unique<Functions>();
  f->create = required<decltype(f->create)>(lib, "cublasLtCreate");
  f->destroy = required<decltype(f->destroy)>(lib, "cublasLtDestroy");
  f->get_version = required<decltype(f->get_version)>(lib, "cublasLtGetVersion");
  f->desc_create = required<decltype(f->desc_create)>(lib, "cublasLtMatmulDescCreate");
  f->desc_set = required<decltype(f->desc_set)>(lib, "cublasLtMatmulDescSetAttribute");
  f->desc_destroy = required<decltype(f->desc_destroy)>(lib, "cublasLtMatmulDescDestroy");
  f->layout_create = required<decltype(f->layout_create)>(lib, "cublasLtMatrixLayoutCreate");
  f->layout_destroy = required<decltype(f->layout_destroy)>(lib, "cublasLtMatrixLayoutDestroy");
  f->pref_create = required<decltype(f->pref_create)>(lib, "cublasLtMatmulPreferenceCreate");
  f->pref_set = required<decltype(f->pref_set)>(lib, "cublasLtMatmulPreferenceSetAttribute");
  f->pref_destroy = required<decltype(f->pref_destroy)>(lib, "cublasLtMatmulPreferenceDestroy");
  f->heuristic = required<decltype(f->heuristic)>(lib, "cublasLtMatmulAlgoGetHeuristic");
  f->matmul = required<decltype(f->matmul)>(lib, "cublasLtMatmul");
  if (const cublasStatus_t s = f->create(&lt->handle_); s != 0)
    fail("cublasLtCreate failed with status ", s, " (is the NVIDIA driver new enough for CUDA 13?)");
  lt->version_ = f->get_version();
  lt->path_ = lib.path;
  lt->f_ = std::move(f);
  instance = std::move(lt);
  return *instance;
}

// One GEMM shape as cuBLASLt plans it: its descriptors and the heuristic's algorithm (found false: none).
struct CublasLt::Plan {
  const Functions& f;
  Desc desc = nullptr;
  Layout lb = nullptr, la = nullptr, lc = nullptr;
  bool found = false;
  Algo algo{};
  explicit Plan(const Functions& functions) : f(functions) {}
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    for (Layout l : {lc, la, lb})
      if (l) f.layout_destroy(l);
    if (desc) f.desc_destroy(desc);
  }
};

CublasLt::~CublasLt() {
  plans_.clear();  // their descriptors go before the handle
  if (handle_) f_->destroy(handle_);
}

void CublasLt::matmul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                      const void* B, float beta, void* C, GemmType in, GemmType out, void* workspace,
                      size_t workspace_bytes, void* stream) const {
  if (!try_matmul(trans_a, trans_b, M, N, K, alpha, A, B, beta, C, in, out, workspace, workspace_bytes, stream))
    fail("cuBLASLt has no algorithm for a ", M, "x", N, "x", K, " GEMM of these types");
}

bool CublasLt::try_matmul(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const void* A,
                          const void* B, float beta, void* C, GemmType in, GemmType out, void* workspace,
                          size_t workspace_bytes, void* stream, int64_t lda, int64_t ldb, int64_t ldc) const {
  if (M == 0 || N == 0) return true;
  if (K <= 0) fail("cuBLASLt matmul with an inner dimension of ", K, " (the engine never asks for one)");
  const int64_t a_row = trans_a ? M : K, b_row = trans_b ? K : N;  // the length of a stored row
  if (lda == 0) lda = a_row;
  if (ldb == 0) ldb = b_row;
  if (ldc == 0) ldc = N;
  if (lda < a_row || ldb < b_row || ldc < N)
    fail("cuBLASLt matmul with rows of ", lda, ", ", ldb, " and ", ldc, " values, shorter than ", a_row, ", ", b_row,
         " and ", N);
  // cuBLASLt's A, B, C, D are our B, A, C, C
  const std::array<uint32_t, 4> alignments = {alignment_of(B), alignment_of(A), alignment_of(C), alignment_of(C)};
  const uint64_t ws = workspace ? workspace_bytes : 0;
  const std::shared_ptr<const Plan> p = plan(trans_a, trans_b, M, N, K, lda, ldb, ldc, in, out, alignments, ws);
  if (!p->found) return false;
  const cublasStatus_t s = f_->matmul(handle_, p->desc, &alpha, B, p->lb, A, p->la, &beta, C, p->lc, C, p->lc,
                                      &p->algo, workspace, ws, stream);
  if (s != 0) fail("cuBLASLt cublasLtMatmul failed with status ", s);
  return true;
}

std::shared_ptr<const CublasLt::Plan> CublasLt::plan(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                                                     int64_t lda, int64_t ldb, int64_t ldc, GemmType in,
                                                     GemmType out, const std::array<uint32_t, 4>& alignments,
                                                     uint64_t ws) const {
  constexpr size_t kMaxPlans = 4096;
  const PlanKey key = {trans_a,       trans_b,       M,   N, K, lda, ldb, ldc, static_cast<int64_t>(in),
                       static_cast<int64_t>(out), alignments[0], alignments[1], alignments[2], alignments[3],
                       static_cast<int64_t>(ws)};
  std::lock_guard<std::mutex> lock(plans_mutex_);
  auto at = plans_.find(key);
  if (at != plans_.end()) return at->second;
  if (plans_.size() >= kMaxPlans) plans_.clear();
  // cuBLASLt is column-major: row-major C [M, N] is column-major C^T [N, M] = op(B)^T op(A)^T, so B goes first.
  // Row-major X stored [r, c] is column-major [c, r] with leading dimension c.
  const auto check = [](cublasStatus_t s, const char* what) {
    if (s != 0) fail("cuBLASLt ", what, " failed with status ", s);
  };
  auto p = std::make_shared<Plan>(*f_);
  check(f_->desc_create(&p->desc, kComputeF32, static_cast<int>(GemmType::F32)), "cublasLtMatmulDescCreate");
  const int op_first = trans_b ? kOpT : kOpN, op_second = trans_a ? kOpT : kOpN;
  check(f_->desc_set(p->desc, kDescTransA, &op_first, sizeof op_first), "set TRANSA");
  check(f_->desc_set(p->desc, kDescTransB, &op_second, sizeof op_second), "set TRANSB");
  // first operand: op(B)^T is [N, K] column-major; stored B is [K, N] row-major (= [N, K] column-major, ld N) or,
  // transposed, [N, K] row-major (= [K, N] column-major, ld K); a part of wider rows has the wider rows' ld
  check(f_->layout_create(&p->lb, static_cast<int>(in), trans_b ? K : N, trans_b ? N : K, ldb), "layout B");
  check(f_->layout_create(&p->la, static_cast<int>(in), trans_a ? M : K, trans_a ? K : M, lda), "layout A");
  check(f_->layout_create(&p->lc, static_cast<int>(out), N, M, ldc), "layout C");
  // The preference is needed only by the heuristic.
  struct PreferenceOwner {
    const Functions& f;
    Preference pref = nullptr;
    ~PreferenceOwner() {
      if (pref) f.pref_destroy(pref);
    }
  } pref{*f_};
  check(f_->pref_create(&pref.pref), "cublasLtMatmulPreferenceCreate");
  check(f_->pref_set(pref.pref, kPrefMaxWorkspaceBytes, &ws, sizeof ws), "set max workspace");
  for (int i = 0; i < 4; ++i)
    check(f_->pref_set(pref.pref, kPrefMinAlignmentA + i, &alignments[static_cast<size_t>(i)], sizeof(uint32_t)),
          "set min alignment");
  HeuristicResult result{};
  int found = 0;
  // "not supported" is the heuristic's way of saying that no algorithm fits these types, shapes and alignments: the
  // caller then computes the product another way, as when it finds none
  const cublasStatus_t heuristic =
      f_->heuristic(handle_, p->desc, p->lb, p->la, p->lc, p->lc, pref.pref, 1, &result, &found);
  if (heuristic == kStatusNotSupported)
    found = 0;
  else
    check(heuristic, "cublasLtMatmulAlgoGetHeuristic");
  p->found = found > 0;
  p->algo = result.algo;
  plans_.emplace(key, p);
  return p;
}

}  // namespace qlora::gpu
