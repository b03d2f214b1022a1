// The GPU tests (npm run test:gpu): each CUDA kernel against the CPU reference on awkward sizes, the device
// allocator on cudaMalloc, page copies on their stream. Built with the CUDA backend; on a machine without a usable
// GPU it says so and runs nothing.
#include <string>

#include "cuda/runtime_probe.h"
#include "../test/harness.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: qlora_gpu_tests FIXTURES_DIR [NAME_FILTER]\n");
    return 2;
  }
  std::string error;
  const int devices = qlora::cuda::device_count(&error);
  if (devices <= 0) {
    std::printf("skipped: no CUDA device (%s)\n", devices < 0 ? error.c_str() : "the runtime sees none");
    return 3;  // the runner (scripts/test-gpu.mjs) reports this as skipped, not passed
  }
  qtest::fixtures_dir() = argv[1];
  return qtest::run_all(argc > 2 ? argv[2] : nullptr);
}
