// The CPU's hottest fp32 loops (the GEMM's row blocks, attention's backward pass), built for AVX-512, AVX2 and the
// baseline, the best chosen when the addon loads (GCC/Clang function multi-versioning on x86-64 Linux; one version
// elsewhere). Contraction stays off (no FMA) and no reduction is reordered, so every version rounds each multiply and
// add as the baseline does: the results are bit for bit the same on every CPU.
#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define QLORA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QLORA_SIMD_CLONES
#endif

namespace qlora::cpu {

QLORA_SIMD_CLONES
void gemm_row_block_f32(int64_t m0, int64_t rows, int64_t N, int64_t K, float alpha, const float* a, const float* b,
                        float beta, float* C) {
  gemm_row_block<float>(m0, rows, N, K, alpha, a, b, beta, C);
}

QLORA_SIMD_CLONES
void attention_backward_group_f32(const float* dout, const float* q, const float* k, const float* v,
                                  const float* probs, int64_t b, int64_t kvh, int64_t seq, int64_t heads,
                                  int64_t kv_heads, int64_t head_dim, float* dq, float* dk, float* dv, float* ds) {
  attention_backward_group<float>(dout, q, k, v, probs, b, kvh, seq, heads, kv_heads, head_dim, dq, dk, dv, ds);
}

}  // namespace qlora::cpu
