// The CPU's vector code (the GEMM's panels and transposes, generation's few-row and NF4 products, attention's dot
// products) runs on vectors of 16 lanes where the CPU has AVX-512 and of 8 elsewhere: tests of its bits run at both
// widths, whatever CPU runs them.
#pragma once
#include "cpu/kernels.h"

namespace qtest {

// Runs body(narrow) at the CPU's own width (narrow false), then at 8 lanes (true), and leaves the CPU's width on.
template <typename Body>
void at_both_vector_widths(Body&& body) {
  for (const bool narrow : {false, true}) {
    qlora::cpu::force_narrow_vectors(narrow);
    try {
      body(narrow);
    } catch (...) {
      qlora::cpu::force_narrow_vectors(false);
      throw;
    }
  }
  qlora::cpu::force_narrow_vectors(false);
}

}  // namespace qtest
