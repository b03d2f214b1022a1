// Errors the engine raises. Every failure that a user can cause (a bad file, a bad shape, an unsupported
// architecture) becomes an EngineError whose message names the file or tensor and what is wrong; the addon turns it
// into a JS exception with the message intact. Never exit(), never abort on user input.
#pragma once
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

// Internal invariant checks (shapes passed between our own functions). Reported with file:line so a bug in the
// engine is told apart from bad input.
#define QLORA_CHECK(cond, ...)                                                                   \
  do {                                                                                           \
    if (!(cond)) ::qlora::fail("internal check failed at ", __FILE__, ":", __LINE__, " (", #cond, \
                               "): ", __VA_ARGS__);                                              \
  } while (0)

}  // namespace qlora
