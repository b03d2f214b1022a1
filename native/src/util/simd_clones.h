// QLORA_SIMD_CLONES: a hot loop compiled for AVX-512, AVX2 and the baseline, the best chosen when the addon loads
// (GCC/Clang function multi-versioning on x86-64 Linux with glibc, whose ifunc chooses; one version elsewhere).
// Contraction stays off (no FMA) in every version, so each rounds as the baseline does.
#pragma once

#include <cstdlib>  // through glibc's features.h: __GLIBC__, which target_clones (ifunc) needs
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define QLORA_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QLORA_SIMD_CLONES
#endif

// The hottest loops are always inlined into the fp32 functions of cpu/simd_f32.cpp, which are compiled for several
// instruction sets: a loop in a separate function would be compiled for the baseline only.
#if defined(__GNUC__) || defined(__clang__)
#define QLORA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define QLORA_ALWAYS_INLINE inline
#endif
