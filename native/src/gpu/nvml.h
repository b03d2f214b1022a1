// NVML, loaded at run time and started once: the driver version and each GPU's name, memory, compute capability,
// utilization, temperature and power. `doctor`'s probe reads it once; the trainer's GPU telemetry samples it about
// once a second for as long as a run trains on the GPU.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "gpu/libraries.h"

namespace qlora::gpu {

struct GpuInfo {
  int index = 0;
  std::string name;
  uint64_t memory_total = 0, memory_used = 0, memory_free = 0;
  int cc_major = 0, cc_minor = 0;
  int utilization = -1;   // percent, -1 when not reported
  int temperature = -1;   // degrees C
  double power_w = -1.0;  // watts
  int cuda_index = -1;    // the CUDA runtime's number for this GPU (the engine's device 0 is the one it trains on);
                          // -1 when the runtime does not see it (CUDA_VISIBLE_DEVICES, or no CUDA)
};

class Nvml {
 public:
  // Loads NVML from the folders of libraries.h and starts it. Null when the library is not there (`library` says
  // where it was looked for) or does not start (`note` says why, as a sentence).
  static std::unique_ptr<Nvml> open(const std::vector<std::string>& dirs, bool windows, Library* library,
                                    std::string* note);
  ~Nvml();
  Nvml(const Nvml&) = delete;
  Nvml& operator=(const Nvml&) = delete;

  std::string driver_version() const;
  // Every GPU now; a figure the driver does not report stays at its "unknown" value.
  std::vector<GpuInfo> sample() const;
  // NVML's index of the GPU at a PCI bus id ("0000:3B:00.0"), or -1.
  int index_of_bus_id(const std::string& bus_id) const;

 private:
  struct Functions;
  explicit Nvml(std::unique_ptr<Functions> f);
  std::unique_ptr<Functions> f_;
};

// NVML for the trainer's telemetry, opened on first use with the same search as `doctor` and kept for the life of
// the process; null without NVML.
const Nvml* telemetry_nvml(const std::string& library_dir);

}  // namespace qlora::gpu
