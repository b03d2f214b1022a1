// Time by op: the GPU backend's per-kernel profile (bench --profile), summed over the calls since the last take.
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace qlora {

struct OpTime {
  std::string op;
  int64_t calls = 0;
  double ms = 0.0;
};

class OpProfile {
 public:
  void add(const std::string& op, double ms) {
    OpTime& t = by_op_[op];
    t.op = op;
    t.calls += 1;
    t.ms += ms;
  }
  // Every op seen since the last take, the most time first (ties by name), and a fresh start.
  std::vector<OpTime> take() {
    std::vector<OpTime> out;
    out.reserve(by_op_.size());
    for (auto& [op, t] : by_op_) out.push_back(t);
    by_op_.clear();
    std::stable_sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
    return out;
  }

 private:
  std::map<std::string, OpTime> by_op_;
};

}  // namespace qlora
