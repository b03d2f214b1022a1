// Errors the engine raises. Every failure that a user can cause (a bad file, a bad shape, an unsupported
// architecture) becomes an EngineError whose message names the file or tensor and what is wrong; the addon turns it
// into a JS exception with the message intact. Never exit(), never abort on user input.
#pragma once
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <stdexcept>
#include <string>

namespace qlora {

class EngineError : public std::runtime_error {
 public:
  explicit EngineError(const std::string& message) : std::runtime_error(message) {}
};

// Builds a message from any streamable parts: fail("file ", path, ": header length ", n, " exceeds file size").
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  throw EngineError(out.str());
}

// "512 B", "3.5 MiB", "7.25 GiB": byte counts in messages a user reads.
inline std::string format_bytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while ((v >= 1024.0 || v <= -1024.0) && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return buf;
}

// Internal invariant checks (shapes passed between our own functions). Reported with file:line so a bug in the
// engine is told apart from bad input.
#define QLORA_CHECK(cond, ...)                                                                   \
  do {                                                                                           \
    if (!(cond)) ::qlora::fail("internal check failed at ", __FILE__, ":", __LINE__, " (", #cond, \
                               "): ", __VA_ARGS__);                                              \
  } while (0)

}  // namespace qlora
