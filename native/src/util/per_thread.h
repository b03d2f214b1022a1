// Scratch memory for each of OpenMP's threads, allocated before a parallel region: a throw inside one (bad_alloc from
// a vector made there) would end the process. Run the region with num_threads(scratch.threads()).
#pragma once
#include <cstddef>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace qlora {

template <typename T>
class PerThreadScratch {
 public:
  explicit PerThreadScratch(size_t per_thread)
      : threads_(max_threads()), per_thread_(per_thread), data_(per_thread * static_cast<size_t>(threads_)) {}

  int threads() const { return threads_; }
  // The calling thread's `per_thread` values (inside the region).
  T* mine() {
#ifdef _OPENMP
    return data_.data() + per_thread_ * static_cast<size_t>(omp_get_thread_num());
#else
    return data_.data();
#endif
  }

 private:
  static int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  }

  int threads_;
  size_t per_thread_;
  std::vector<T> data_;
};

}  // namespace qlora
