// safetensors: a memory-mapped reader that checks every offset and size against the file, a loader for whole
// model folders (one file or shards listed in model.safetensors.index.json), and an atomic writer.
// Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets:[b,e]}} with
// optional "__metadata__" (string→string), then the data; offsets are relative to the end of the header.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/dtype.h"

namespace qlora {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  size_t data_begin = 0;  // absolute byte offset in the file
  size_t nbytes = 0;
  int64_t numel() const;
};

// One .safetensors file, memory-mapped read-only. Any inconsistency (header longer than the file, offsets out of
// range or overlapping, size != numel * dtype size, bad JSON, unknown dtype) throws EngineError naming the file
// (and tensor) and the problem.
class SafetensorsFile {
 public:
  static std::unique_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in file order
  const TensorInfo* find(const std::string& name) const;               // nullptr when absent
  const uint8_t* data(const TensorInfo& t) const { return base_ + t.data_begin; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model folder: `model.safetensors`, or the shards named by `model.safetensors.index.json`'s
// weight_map. Also accepts a path to a single .safetensors file (used for adapters and test files).
class TensorStore {
 public:
  static std::unique_ptr<TensorStore> open_dir(const std::string& dir);
  static std::unique_ptr<TensorStore> open_file(const std::string& path);

  bool has(const std::string& name) const;
  // Returns the tensor and its file; throws EngineError "<dir>: tensor '<name>' not found" when absent.
  const TensorInfo& info(const std::string& name) const;
  const uint8_t* data(const std::string& name) const;
  // Hands the pages of a tensor's bytes back to the OS once the caller is done with them (a copy or quantization of
  // them is made): they leave this process's resident memory, and a later read faults them in again from the page
  // cache or the file. Only whole pages inside the tensor go. Linux; elsewhere nothing.
  void release(const std::string& name) const;
  const std::string& file_of(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted

  // Reads a floating tensor as fp32, checking its shape when `expected_shape` is non-empty: a mismatch throws
  // "<file>: tensor '<name>' has shape [a, b], expected [c, d]".
  std::vector<float> read_f32(const std::string& name, const std::vector<int64_t>& expected_shape = {}) const;
  // read_f32 into `out`, which holds the tensor's element count.
  void read_f32_into(const std::string& name, float* out) const;
  // The tensor's info after the checks of read_f32 (a floating dtype; the shape when `expected_shape` is non-empty),
  // for a caller that takes its bytes as stored.
  const TensorInfo& floating(const std::string& name, const std::vector<int64_t>& expected_shape = {}) const;

  const std::string& location() const { return location_; }

 private:
  const uint8_t* mapped_bytes(const std::string& name) const;  // where the tensor's bytes are mapped, no hint given
  std::string location_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> file_of_tensor_;
};

// Collects tensors and writes them as one safetensors file: to a hidden temp file beside it (`.<name>.tmp-<pid>`,
// the pattern the extension's atomicFile.ts uses), flushed to disk, then renamed over `path`, so a crash never
// leaves a half-written file under the real name. Tensors are written in the order added, with contiguous offsets,
// __metadata__ first and the header space-padded to a multiple of 8 bytes (as the Rust library writes); names must
// be unique.
class SafetensorsWriter {
 public:
  void add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const void* data, size_t nbytes);
  void add_f32(const std::string& name, const std::vector<int64_t>& shape, const std::vector<float>& values);
  // A tensor whose bytes `produce` hands to its sink (in pieces, in order) when write() reaches it, so that only one
  // tensor is computed and held at a time; handing over other than its shape's byte count fails the write.
  using ByteSink = std::function<void(const void* data, size_t nbytes)>;
  void add_deferred(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                    std::function<void(const ByteSink&)> produce);
  void set_metadata(const std::string& key, const std::string& value);
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    size_t nbytes = 0;
    std::vector<uint8_t> bytes;                    // added: the bytes themselves
    std::function<void(const ByteSink&)> produce;  // deferred: what writes them
  };
  size_t checked_bytes(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const;
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Hands n fp32 values to `sink` stored as `t`: F32 as they are, BF16 or F16 rounded to nearest even, a chunk at a time.
void sink_f32_as(const SafetensorsWriter::ByteSink& sink, DType t, const float* values, size_t n);

std::string shape_to_string(const std::vector<int64_t>& shape);  // "[128, 256]"
int64_t numel_of(const std::vector<int64_t>& shape);             // the product of the dimensions

// Writes `contents` to `path` atomically (temp file + rename).
void write_file_atomic(const std::string& path, const std::string& contents);
std::string read_text_file(const std::string& path);  // throws "<path>: cannot read (<reason>)"

}  // namespace qlora
