// The native test executable: the engine checked on the CPU (fp64 finite differences, reference files, byte for
// byte formats). Usage: qlora_native_tests FIXTURES_DIR [NAME_FILTER].
#include "harness.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: qlora_native_tests FIXTURES_DIR [NAME_FILTER]\n");
    return 2;
  }
  qtest::fixtures_dir() = argv[1];
  return qtest::run_all(argc > 2 ? argv[2] : nullptr);
}
