#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <sstream>
#include <system_error>

#include "io/folder_hints.h"
#include "util/error.h"
#include "util/json.h"

#ifdef _WIN32
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <process.h>
#include <windows.h>
#else
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#endif

namespace qlora {

namespace fs = std::filesystem;

namespace {

// The Rust safetensors library refuses headers over 100 MB; no real header comes near it, so a larger value means
// a corrupt or foreign file, and we never try to parse it.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;

int current_pid() {
#ifdef _WIN32
  return _getpid();
#else
  return static_cast<int>(getpid());
#endif
}

// a * b, or false when the product does not fit in uint64 (shapes from a hostile header can be anything).
bool checked_mul(uint64_t a, uint64_t b, uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

// Number of elements of `shape`; false on a negative dimension or an overflowing product.
bool checked_numel(const std::vector<int64_t>& shape, uint64_t& out) {
  uint64_t n = 1;
  for (const int64_t d : shape) {
    if (d < 0 || !checked_mul(n, static_cast<uint64_t>(d), n)) return false;
  }
  out = n;
  return true;
}

}  // namespace

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (const int64_t d : shape) n *= d;
  return n;
}

int64_t TensorInfo::numel() const { return numel_of(shape); }

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

// ---------------------------------------------------------------------------------------------------------------
// SafetensorsFile

std::unique_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
#ifdef _WIN32
  HANDLE h = CreateFileA(path.c_str(), GENERIC_READ, FILE_SHARE_READ, nullptr, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL,
                         nullptr);
  if (h == INVALID_HANDLE_VALUE) fail(path, ": cannot open (Windows error ", GetLastError(), ")");
  LARGE_INTEGER size;
  if (!GetFileSizeEx(h, &size)) {
    const DWORD err = GetLastError();
    CloseHandle(h);
    fail(path, ": cannot read the file size (Windows error ", err, ")");
  }
  file->size_ = static_cast<size_t>(size.QuadPart);
  // A zero-length file cannot be mapped; it is rejected below as too short.
  if (file->size_ > 0) {
    HANDLE mapping = CreateFileMappingA(h, nullptr, PAGE_READONLY, 0, 0, nullptr);
    if (!mapping) {
      const DWORD err = GetLastError();
      CloseHandle(h);
      fail(path, ": cannot map (Windows error ", err, ")");
    }
    file->base_ = static_cast<const uint8_t*>(MapViewOfFile(mapping, FILE_MAP_READ, 0, 0, 0));
    const DWORD err = GetLastError();
    // The view keeps the mapping alive; the handles are no longer needed.
    CloseHandle(mapping);
    CloseHandle(h);
    if (!file->base_) fail(path, ": cannot map (Windows error ", err, ")");
  } else {
    CloseHandle(h);
  }
#else
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, ": cannot stat (", std::strerror(err), ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, ": is not a regular file");
  }
  file->size_ = static_cast<size_t>(st.st_size);
  // A zero-length file cannot be mapped; it is rejected below as too short.
  if (file->size_ > 0) {
    void* p = mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail(path, ": cannot map (", std::strerror(err), ")");
    }
    file->base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);  // the mapping stays valid after the descriptor is closed
#endif

  // From here on `file` owns the mapping, so every failure below unmaps it.
  const size_t size = file->size_;
  if (size < 8)
    fail(path, ": too short to be a safetensors file (", size, " bytes; the header length alone takes 8)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file->base_[i];
  if (header_len > size - 8)
    fail(path, ": header length ", header_len, " is larger than the rest of the file (", size - 8,
         " bytes); the file is truncated or not safetensors");
  if (header_len > kMaxHeaderBytes)
    fail(path, ": header length ", header_len, " is implausibly large (over ", kMaxHeaderBytes,
         " bytes); not a safetensors file");
  const std::string_view header(reinterpret_cast<const char*>(file->base_ + 8), static_cast<size_t>(header_len));
  // Duplicates are kept so that a repeated tensor name is reported instead of silently taking the last entry.
  const json::Value root = json::Value::parse(header, path + " (header)", /*keep_duplicate_keys=*/true);
  if (!root.is_object()) fail(path, ": header is not a JSON object");
  const size_t data_start = 8 + static_cast<size_t>(header_len);
  const uint64_t data_size = size - data_start;

  bool seen_metadata = false;
  for (const auto& [name, entry] : root.as_object(path)) {
    if (name == "__metadata__") {
      if (seen_metadata) fail(path, ": __metadata__ appears twice in the header");
      seen_metadata = true;
      if (entry.is_null()) continue;
      if (!entry.is_object()) fail(path, ": __metadata__ is not an object");
      // The format says string -> string; tolerate other values (some writers put numbers) as their JSON text.
      for (const auto& [k, v] : entry.as_object(path)) file->metadata_[k] = v.is_string() ? v.as_string("") : v.dump();
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    if (file->index_.count(name)) fail(where, " appears twice in the header");
    if (!entry.is_object()) fail(where, " is not a {dtype, shape, data_offsets} object");
    const json::Value* dtype = entry.find("dtype");
    const json::Value* shape = entry.find("shape");
    const json::Value* offsets = entry.find("data_offsets");
    if (!dtype) fail(where, " has no dtype");
    if (!shape) fail(where, " has no shape");
    if (!offsets) fail(where, " has no data_offsets");

    TensorInfo info;
    info.name = name;
    info.dtype = dtype_from_name(dtype->as_string(where + " dtype"), where);
    for (const json::Value& d : shape->as_array(where + " shape")) {
      const int64_t dim = d.as_int(where + " shape");
      if (dim < 0) fail(where, " has a negative dimension (", dim, ") in its shape");
      info.shape.push_back(dim);
    }
    uint64_t numel = 0, expected_bytes = 0;
    if (!checked_numel(info.shape, numel) || numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        !checked_mul(numel, dtype_size(info.dtype), expected_bytes))
      fail(where, " has shape ", shape_to_string(info.shape), ", whose size overflows");

    const auto& off = offsets->as_array(where + " data_offsets");
    if (off.size() != 2) fail(where, " data_offsets must be [begin, end], got ", off.size(), " numbers");
    const int64_t begin = off[0].as_int(where + " data_offsets");
    const int64_t end = off[1].as_int(where + " data_offsets");
    if (begin < 0 || end < begin)
      fail(where, " has data_offsets [", begin, ", ", end, "] (need 0 <= begin <= end)");
    if (static_cast<uint64_t>(end) > data_size)
      fail(where, " data_offsets [", begin, ", ", end, "] extend past the end of the data (", data_size, " bytes)");
    const uint64_t nbytes = static_cast<uint64_t>(end - begin);
    if (nbytes != expected_bytes)
      fail(where, " holds ", nbytes, " bytes but ", dtype_name(info.dtype), " ", shape_to_string(info.shape),
           " needs ", expected_bytes);
    info.data_begin = data_start + static_cast<size_t>(begin);
    info.nbytes = static_cast<size_t>(nbytes);
    file->index_[name] = file->tensors_.size();
    file->tensors_.push_back(std::move(info));
  }

  // File order; ties (zero-size tensors share offsets) by name so the order does not depend on the header's.
  std::sort(file->tensors_.begin(), file->tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.data_begin != b.data_begin ? a.data_begin < b.data_begin : a.name < b.name;
  });
  // Two tensors sharing bytes would alias each other's weights; zero-size tensors take no bytes and never overlap.
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : file->tensors_) {
    if (t.nbytes == 0) continue;
    if (prev && t.data_begin < prev->data_begin + prev->nbytes)
      fail(path, ": tensors '", prev->name, "' and '", t.name, "' overlap (data bytes [", prev->data_begin - data_start,
           ", ", prev->data_begin - data_start + prev->nbytes, ") and [", t.data_begin - data_start, ", ",
           t.data_begin - data_start + t.nbytes, "))");
    prev = &t;
  }
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_[file->tensors_[i].name] = i;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (!base_) return;
#ifdef _WIN32
  UnmapViewOfFile(base_);
#else
  munmap(const_cast<uint8_t*>(base_), size_);
#endif
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// ---------------------------------------------------------------------------------------------------------------
// TensorStore

std::unique_ptr<TensorStore> TensorStore::open_file(const std::string& path) {
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->location_ = path;
  store->files_.push_back(SafetensorsFile::open(path));
  for (const TensorInfo& t : store->files_[0]->tensors()) store->file_of_tensor_[t.name] = 0;
  return store;
}

namespace {
// A shard name must stay inside the model folder: no absolute paths, no "..", no drive or root names.
bool is_inside_folder(const std::string& shard) {
  const fs::path p(shard);
  if (shard.empty() || p.is_absolute() || p.has_root_name() || p.has_root_directory()) return false;
  for (const fs::path& part : p)
    if (part == "..") return false;
  return true;
}

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}
}  // namespace

std::unique_ptr<TensorStore> TensorStore::open_dir(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(dir, ": not a folder");
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->location_ = dir;
  if (is_file(index_path)) {
    const std::string index_file = index_path.string();
    const json::Value index = json::Value::parse(read_text_file(index_file), index_file);
    const json::Value* map = index.find("weight_map");
    if (!map) fail(index_file, ": no weight_map");
    // Each shard is opened (and mapped) once, however many tensors the index assigns to it.
    std::map<std::string, size_t> file_of_shard;
    for (const auto& [name, shard_value] : map->as_object(index_file + ": weight_map")) {
      const std::string shard = shard_value.as_string(index_file + ": weight_map['" + name + "']");
      if (!is_inside_folder(shard)) fail(index_file, ": shard '", shard, "' is outside the model folder");
      auto it = file_of_shard.find(shard);
      if (it == file_of_shard.end()) {
        const fs::path shard_path = fs::path(dir) / shard;
        if (!is_file(shard_path)) fail(index_file, ": shard '", shard, "' listed for '", name, "' does not exist");
        store->files_.push_back(SafetensorsFile::open(shard_path.string()));
        it = file_of_shard.emplace(shard, store->files_.size() - 1).first;
      }
      if (!store->files_[it->second]->find(name))
        fail(index_file, ": tensor '", name, "' is listed in shard '", shard, "' but ",
             store->files_[it->second]->path(), " does not contain it");
      store->file_of_tensor_[name] = it->second;
    }
  } else if (is_file(single)) {
    store->files_.push_back(SafetensorsFile::open(single.string()));
    for (const TensorInfo& t : store->files_[0]->tensors()) store->file_of_tensor_[t.name] = 0;
  } else {
    const std::string hint = weights_hint(dir);
    if (!hint.empty()) fail(dir, ": no model.safetensors or model.safetensors.index.json", hint);
    fail(dir, ": no model.safetensors or model.safetensors.index.json (only safetensors weights can be read)");
  }
  return store;
}

bool TensorStore::has(const std::string& name) const { return file_of_tensor_.count(name) > 0; }

const TensorInfo& TensorStore::info(const std::string& name) const {
  const auto it = file_of_tensor_.find(name);
  if (it == file_of_tensor_.end()) fail(location_, ": tensor '", name, "' not found");
  return *files_[it->second]->find(name);
}

namespace {

#if defined(__linux__)
uintptr_t page_bytes() {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));  // 4 KiB, or 16/64 KiB on some ARM
  return page;
}
#endif

// Maps a tensor's pages in one call before it is read whole, where Linux can (5.14 and newer): read through the
// mapping, every 64 KiB is a page fault, and a 16 GB model a quarter of a million of them. A hint only: where it is
// refused, the reads fault as before.
void map_in_for_reading(const uint8_t* p, size_t bytes) {
#if defined(__linux__)
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
  constexpr size_t kWorthIt = size_t{1} << 20;
  if (bytes < kWorthIt) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(p) & ~(page_bytes() - 1);
  madvise(reinterpret_cast<void*>(start), bytes + (reinterpret_cast<uintptr_t>(p) - start), MADV_POPULATE_READ);
#else
  (void)p;
  (void)bytes;
#endif
}

// Drops the whole pages inside a tensor's bytes from this process's mapping (TensorStore::release). A read-only
// private mapping holds no changes of its own: its dropped pages read back as the file has them.
void map_out(const uint8_t* p, size_t bytes) {
#if defined(__linux__)
  const uintptr_t page = page_bytes(), begin = reinterpret_cast<uintptr_t>(p);
  const uintptr_t start = (begin + page - 1) & ~(page - 1), end = (begin + bytes) & ~(page - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_DONTNEED);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace

const uint8_t* TensorStore::mapped_bytes(const std::string& name) const {
  const TensorInfo& t = info(name);  // first: an unknown name is its error, naming the folder
  return files_[file_of_tensor_.at(name)]->data(t);
}

const uint8_t* TensorStore::data(const std::string& name) const {
  const uint8_t* p = mapped_bytes(name);
  map_in_for_reading(p, info(name).nbytes);
  return p;
}

void TensorStore::release(const std::string& name) const { map_out(mapped_bytes(name), info(name).nbytes); }

const std::string& TensorStore::file_of(const std::string& name) const {
  const auto it = file_of_tensor_.find(name);
  if (it == file_of_tensor_.end()) return location_;
  return files_[it->second]->path();
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  out.reserve(file_of_tensor_.size());
  for (const auto& [name, file] : file_of_tensor_) out.push_back(name);
  return out;
}

const TensorInfo& TensorStore::floating(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  const TensorInfo& t = info(name);
  if (!expected_shape.empty() && t.shape != expected_shape)
    fail(file_of(name), ": tensor '", name, "' has shape ", shape_to_string(t.shape), ", expected ",
         shape_to_string(expected_shape));
  if (!is_floating(t.dtype))
    fail(file_of(name), ": tensor '", name, "' is ", dtype_name(t.dtype),
         ", not a floating type (F32, F16, BF16 or F64 expected)");
  return t;
}

std::vector<float> TensorStore::read_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  std::vector<float> out(static_cast<size_t>(floating(name, expected_shape).numel()));
  read_f32_into(name, out.data());
  return out;
}

void TensorStore::read_f32_into(const std::string& name, float* out) const {
  const TensorInfo& t = floating(name);
  convert_to_f32(t.dtype, data(name), static_cast<size_t>(t.numel()), out, file_of(name) + ": tensor '" + name + "'");
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

size_t SafetensorsWriter::checked_bytes(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
  if (name == "__metadata__") fail("safetensors writer: '__metadata__' is reserved and cannot name a tensor");
  for (const Entry& e : entries_)
    if (e.name == name) fail("safetensors writer: tensor '", name, "' added twice");
  uint64_t numel = 0, expected = 0;
  if (!checked_numel(shape, numel) || !checked_mul(numel, dtype_size(dtype), expected))
    fail("safetensors writer: tensor '", name, "' has an invalid shape ", shape_to_string(shape));
  return static_cast<size_t>(expected);
}

void SafetensorsWriter::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const void* data,
                            size_t nbytes) {
  const size_t expected = checked_bytes(name, dtype, shape);
  if (expected != nbytes)
    fail("safetensors writer: tensor '", name, "' has ", nbytes, " bytes for ", dtype_name(dtype), " ",
         shape_to_string(shape), " (needs ", expected, ")");
  Entry e{name, dtype, shape, nbytes, std::vector<uint8_t>(nbytes), nullptr};
  if (nbytes) std::memcpy(e.bytes.data(), data, nbytes);
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::add_deferred(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                                     std::function<void(const ByteSink&)> produce) {
  const size_t nbytes = checked_bytes(name, dtype, shape);
  entries_.push_back(Entry{name, dtype, shape, nbytes, {}, std::move(produce)});
}

void SafetensorsWriter::add_f32(const std::string& name, const std::vector<int64_t>& shape,
                                const std::vector<float>& values) {
  add(name, DType::F32, shape, values.data(), values.size() * sizeof(float));
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

namespace {

void write_all(std::FILE* f, const void* data, size_t n, const std::string& path) {
  if (n && std::fwrite(data, 1, n, f) != n) fail(path, ": write failed (", std::strerror(errno), ")");
}

// Makes the rename itself durable: on POSIX the new directory entry reaches the disk only when the directory is
// synced. Best effort: some file systems refuse to open or sync a directory, and the data is already safe.
void sync_parent_dir(const fs::path& target) {
#ifndef _WIN32
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const int fd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    (void)fsync(fd);
    ::close(fd);
  }
#else
  (void)target;
#endif
}

// Writes to a hidden temp file beside `path` (same folder, so the rename cannot cross file systems; the same
// `.<name>.tmp-<pid>` pattern as the extension's atomicFile.ts), flushes it to disk, then renames it over `path`.
// Any failure removes the temp file and leaves an existing `path` untouched.
void write_atomic(const std::string& path, const std::function<void(std::FILE*)>& body) {
  const fs::path target(path);
  if (target.filename().empty()) fail(path, ": not a file path");
  const fs::path tmp =
      target.parent_path() / ("." + target.filename().string() + ".tmp-" + std::to_string(current_pid()));
  std::FILE* f = std::fopen(tmp.string().c_str(), "wb");
  if (!f) fail(path, ": cannot write (", std::strerror(errno), ")");
  std::error_code ec;
  try {
    body(f);
    if (std::fflush(f) != 0) fail(path, ": write failed (", std::strerror(errno), ")");
#ifndef _WIN32
    if (fsync(fileno(f)) != 0) fail(path, ": fsync failed (", std::strerror(errno), ")");
#endif
  } catch (...) {
    std::fclose(f);
    fs::remove(tmp, ec);
    throw;
  }
  // fclose can be where a deferred write error (a full disk on a network file system) finally shows.
  if (std::fclose(f) != 0) {
    const int err = errno;
    fs::remove(tmp, ec);
    fail(path, ": write failed on close (", std::strerror(err), ")");
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    const std::string reason = ec.message();
    fs::remove(tmp, ec);
    fail(path, ": cannot move the finished file into place (", reason, ")");
  }
  sync_parent_dir(target);
}

}  // namespace

void SafetensorsWriter::write(const std::string& path) const {
  std::vector<std::pair<std::string, json::Value>> members;
  members.reserve(entries_.size() + 1);
  // __metadata__ first, as the Python and Rust libraries write it.
  if (!metadata_.empty()) {
    json::Value meta = json::Value::object();
    for (const auto& [k, v] : metadata_) meta.set(k, json::Value::string(v));
    members.emplace_back("__metadata__", std::move(meta));
  }
  uint64_t offset = 0;
  for (const Entry& e : entries_) {
    std::vector<json::Value> shape;
    for (const int64_t d : e.shape) shape.push_back(json::Value::number(static_cast<double>(d)));
    // Offsets are contiguous, in the order the tensors were added.
    std::vector<json::Value> offsets = {json::Value::number(static_cast<double>(offset)),
                                        json::Value::number(static_cast<double>(offset + e.nbytes))};
    members.emplace_back(e.name, json::Value::object({{"dtype", json::Value::string(dtype_name(e.dtype))},
                                                      {"shape", json::Value::array(std::move(shape))},
                                                      {"data_offsets", json::Value::array(std::move(offsets))}}));
    offset += e.nbytes;
  }
  // The offsets are held as doubles in the header; past 2^53 they could no longer be written exactly.
  if (offset > (uint64_t{1} << 53))
    fail(path, ": ", offset, " bytes of tensor data is more than one header can describe");
  std::string text = json::Value::object(std::move(members)).dump();
  // Pad with spaces so the data starts 8-byte aligned, as the Rust safetensors library does.
  text.append((8 - text.size() % 8) % 8, ' ');
  write_atomic(path, [&](std::FILE* f) {
    uint8_t len[8];
    const uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
    write_all(f, len, 8, path);
    write_all(f, text.data(), text.size(), path);
    for (const Entry& e : entries_) {
      if (!e.produce) {
        write_all(f, e.bytes.data(), e.bytes.size(), path);
        continue;
      }
      size_t written = 0;
      e.produce([&](const void* data, size_t nbytes) {
        if (nbytes > e.nbytes - written)
          fail(path, ": tensor '", e.name, "' was given more than its ", e.nbytes, " bytes");
        write_all(f, data, nbytes, path);
        written += nbytes;
      });
      if (written != e.nbytes) fail(path, ": tensor '", e.name, "' was given ", written, " of its ", e.nbytes, " bytes");
    }
  });
}

void sink_f32_as(const SafetensorsWriter::ByteSink& sink, DType t, const float* values, size_t n) {
  if (t == DType::F32) return sink(values, n * sizeof(float));
  if (t != DType::BF16 && t != DType::F16) fail("sink_f32_as: ", dtype_name(t), " is not F32, BF16 or F16");
  constexpr size_t kChunk = 8192;
  uint16_t encoded[kChunk];
  for (size_t begin = 0; begin < n; begin += kChunk) {
    const size_t count = std::min(kChunk, n - begin);
    for (size_t i = 0; i < count; ++i)
      encoded[i] = t == DType::BF16 ? f32_to_bf16(values[begin + i]) : f32_to_f16(values[begin + i]);
    sink(encoded, count * sizeof(uint16_t));
  }
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  write_atomic(path, [&](std::FILE* f) { write_all(f, contents.data(), contents.size(), path); });
}

std::string read_text_file(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) fail(path, ": cannot read (it is a folder)");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail(path, ": cannot read (", std::strerror(errno), ")");
  std::string out;
  char buf[1 << 16];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  if (failed) fail(path, ": cannot read (", std::strerror(err), ")");
  return out;
}

}  // namespace qlora
