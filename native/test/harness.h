// A minimal test harness for the native tests (llm.c style: plain functions, numbers checked, no framework).
// TEST(name) registers a function; main() runs them all (or those whose name contains argv[2]) and prints one line
// per test. Fixture files are found under the directory given as argv[1].
#pragma once
#include <atomic>
#include <exception>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

#ifdef _WIN32
#include <process.h>
#define QLORA_TEST_PID _getpid()
#else
#include <unistd.h>
#define QLORA_TEST_PID getpid()
#endif

namespace qtest {

struct TestCase {
  std::string name;
  std::function<void()> fn;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline std::string& fixtures_dir() {
  static std::string dir;
  return dir;
}

// A folder or file of the reference fixtures (test/fixtures/reference: models, adapters and what transformers, PEFT
// and bitsandbytes computed of them).
inline std::string reference(const std::string& name) { return fixtures_dir() + "/reference/" + name; }

// Twelve token ids that every reference model's vocabulary holds: two sequences of six for batch-2 runs.
inline const std::vector<int32_t>& reference_ids() {
  static const std::vector<int32_t> ids = {1, 5, 200, 7, 31, 99, 4, 250, 13, 2, 17, 64};
  return ids;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

struct Failure {
  std::string message;
};

template <typename... Parts>
[[noreturn]] void fail_test(const char* file, int line, const Parts&... parts) {
  std::ostringstream out;
  out << file << ":" << line << ": ";
  (out << ... << parts);
  throw Failure{out.str()};
}

// A fresh folder under the system temp dir, removed when the test ends (pass or fail). The name carries the pid,
// a counter and the clock, so concurrent and repeated runs never share one.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& name) {
    static std::atomic<int> counter{0};
    const auto ticks = std::chrono::steady_clock::now().time_since_epoch().count();
    path = std::filesystem::temp_directory_path() / ("qlora-test-" + name + "-" + std::to_string(QLORA_TEST_PID) + "-" +
                                        std::to_string(counter++) + "-" + std::to_string(ticks));
    std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Runs the registered tests (those whose name contains `filter`, when given), one line each; returns the exit status.
inline int run_all(const char* filter) {
  int passed = 0, failed = 0;
  for (const auto& test : registry()) {
    if (filter && test.name.find(filter) == std::string::npos) continue;
    try {
      test.fn();
      std::printf("ok   %s\n", test.name.c_str());
      ++passed;
    } catch (const Failure& f) {
      std::printf("FAIL %s\n     %s\n", test.name.c_str(), f.message.c_str());
      ++failed;
    } catch (const std::exception& e) {
      std::printf("FAIL %s\n     unexpected exception: %s\n", test.name.c_str(), e.what());
      ++failed;
    }
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace qtest

#define QT_CONCAT2(a, b) a##b
#define QT_CONCAT(a, b) QT_CONCAT2(a, b)
#define TEST(name)                                                            \
  static void QT_CONCAT(test_fn_, name)();                                    \
  static qtest::Registrar QT_CONCAT(test_reg_, name)(#name, QT_CONCAT(test_fn_, name)); \
  static void QT_CONCAT(test_fn_, name)()

#define EXPECT_TRUE(cond, ...) \
  do { if (!(cond)) qtest::fail_test(__FILE__, __LINE__, "expected ", #cond, " ", ##__VA_ARGS__); } while (0)
#define EXPECT_EQ(a, b)                                                                              \
  do { auto va_ = (a); auto vb_ = (b);                                                               \
    if (!(va_ == vb_)) qtest::fail_test(__FILE__, __LINE__, #a, " == ", #b, " failed: ", va_, " vs ", vb_); } while (0)
#define EXPECT_NEAR(a, b, tol)                                                                       \
  do { double va_ = (a); double vb_ = (b);                                                           \
    if (!(std::fabs(va_ - vb_) <= (tol)))                                                            \
      qtest::fail_test(__FILE__, __LINE__, #a, " ~ ", #b, " failed: ", va_, " vs ", vb_, " (tol ", (tol), ")"); } while (0)
// Runs stmt and expects an EngineError whose message contains `fragment`.
#define EXPECT_THROWS_WITH(stmt, fragment)                                                           \
  do { bool threw_ = false;                                                                          \
    try { stmt; } catch (const std::exception& e_) { threw_ = true;                                  \
      if (std::string(e_.what()).find(fragment) == std::string::npos)                                \
        qtest::fail_test(__FILE__, __LINE__, "error message '", e_.what(), "' lacks '", fragment, "'"); } \
    if (!threw_) qtest::fail_test(__FILE__, __LINE__, #stmt, " did not throw"); } while (0)
