#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "util/error.h"
#include "util/json.h"

#ifdef _WIN32
#define NOMINMAX
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
// No real header comes near this; a larger value means a corrupt or foreign file.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1024 * 1024;

int current_pid() {
#ifdef _WIN32
  return _getpid();
#else
  return static_cast<int>(getpid());
#endif
}
}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

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
  HANDLE h = CreateFileA(path.c_str(), GENERIC_READ, FILE_SHARE_READ, nullptr, OPEN_EXISTING, FILE_ATTRIBUTE_NORMAL, nullptr);
  if (h == INVALID_HANDLE_VALUE) fail(path, ": cannot open (error ", GetLastError(), ")");
  LARGE_INTEGER size;
  GetFileSizeEx(h, &size);
  file->size_ = static_cast<size_t>(size.QuadPart);
  if (file->size_ > 0) {
    HANDLE mapping = CreateFileMappingA(h, nullptr, PAGE_READONLY, 0, 0, nullptr);
    if (!mapping) {
      CloseHandle(h);
      fail(path, ": cannot map (error ", GetLastError(), ")");
    }
    file->base_ = static_cast<const uint8_t*>(MapViewOfFile(mapping, FILE_MAP_READ, 0, 0, 0));
    CloseHandle(mapping);
  }
  CloseHandle(h);
  if (file->size_ > 0 && !file->base_) fail(path, ": cannot map the file");
#else
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail(path, ": cannot stat (", std::strerror(errno), ")");
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail(path, ": is a directory, not a safetensors file");
  }
  file->size_ = static_cast<size_t>(st.st_size);
  if (file->size_ > 0) {
    void* p = mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(path, ": cannot map (", std::strerror(errno), ")");
    }
    file->base_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
#endif

  // From here on `file` owns the mapping, so every failure below unmaps it.
  const size_t size = file->size_;
  if (size < 8) fail(path, ": too short to be a safetensors file (", size, " bytes; the header length alone is 8)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file->base_[i];
  if (header_len > size - 8)
    fail(path, ": header length ", header_len, " is larger than the rest of the file (", size - 8, " bytes); truncated or not safetensors");
  if (header_len > kMaxHeaderBytes) fail(path, ": header length ", header_len, " is implausibly large; not a safetensors file");
  const std::string_view header(reinterpret_cast<const char*>(file->base_ + 8), static_cast<size_t>(header_len));
  const json::Value root = json::Value::parse(header, path + " (header)");
  if (!root.is_object()) fail(path, ": header is not a JSON object");
  const size_t data_start = 8 + static_cast<size_t>(header_len);
  const size_t data_size = size - data_start;

  std::vector<std::pair<size_t, size_t>> ranges;
  for (const auto& [name, entry] : root.as_object(path)) {
    if (name == "__metadata__") {
      if (entry.is_null()) continue;
      if (!entry.is_object()) fail(path, ": __metadata__ is not an object");
      for (const auto& [k, v] : entry.as_object(path))
        file->metadata_[k] = v.is_string() ? v.as_string("") : v.dump();
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    if (!entry.is_object()) fail(where, " has no {dtype, shape, data_offsets} entry");
    const json::Value* dtype = entry.find("dtype");
    const json::Value* shape = entry.find("shape");
    const json::Value* offsets = entry.find("data_offsets");
    if (!dtype || !shape || !offsets) fail(where, " lacks dtype, shape or data_offsets");
    TensorInfo info;
    info.name = name;
    info.dtype = dtype_from_name(dtype->as_string(where + " dtype"), where);
    for (const json::Value& d : shape->as_array(where + " shape")) {
      const int64_t dim = d.as_int(where + " shape");
      if (dim < 0) fail(where, " has a negative dimension in its shape");
      info.shape.push_back(dim);
    }
    const auto& off = offsets->as_array(where + " data_offsets");
    if (off.size() != 2) fail(where, " data_offsets must be [begin, end]");
    const int64_t begin = off[0].as_int(where + " data_offsets"), end = off[1].as_int(where + " data_offsets");
    if (begin < 0 || end < begin) fail(where, " has data_offsets [", begin, ", ", end, "] (begin must be <= end)");
    if (static_cast<uint64_t>(end) > data_size)
      fail(where, " data_offsets [", begin, ", ", end, "] extend past the end of the data (", data_size, " bytes)");
    const size_t nbytes = static_cast<size_t>(end - begin);
    const int64_t numel = info.numel();
    if (static_cast<uint64_t>(numel) * dtype_size(info.dtype) != nbytes)
      fail(where, " holds ", nbytes, " bytes but ", dtype_name(info.dtype), " ", shape_to_string(info.shape), " needs ",
           static_cast<uint64_t>(numel) * dtype_size(info.dtype));
    info.data_begin = data_start + static_cast<size_t>(begin);
    info.nbytes = nbytes;
    if (file->index_.count(name)) fail(where, " appears twice in the header");
    file->index_[name] = file->tensors_.size();
    file->tensors_.push_back(std::move(info));
    if (nbytes > 0) ranges.emplace_back(static_cast<size_t>(begin), static_cast<size_t>(end));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    if (ranges[i].first < ranges[i - 1].second)
      fail(path, ": tensor data ranges overlap at byte ", ranges[i].first, " of the data section");
  std::sort(file->tensors_.begin(), file->tensors_.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.data_begin < b.data_begin; });
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
  if (!fs::exists(path)) fail(path, ": file not found");
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->location_ = path;
  store->files_.push_back(SafetensorsFile::open(path));
  for (const TensorInfo& t : store->files_[0]->tensors()) store->file_of_tensor_[t.name] = 0;
  return store;
}

std::unique_ptr<TensorStore> TensorStore::open_dir(const std::string& dir) {
  if (!fs::is_directory(dir)) fail(dir, ": not a folder");
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single = fs::path(dir) / "model.safetensors";
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->location_ = dir;
  if (fs::exists(index_path)) {
    const std::string index_file = index_path.string();
    const json::Value index = json::Value::parse(read_text_file(index_file), index_file);
    const json::Value* map = index.find("weight_map");
    if (!map) fail(index_file, ": no weight_map");
    std::map<std::string, size_t> shard_of_file;
    for (const auto& [name, shard_value] : map->as_object(index_file + ": weight_map")) {
      const std::string shard = shard_value.as_string(index_file + ": weight_map['" + name + "']");
      if (shard.find("..") != std::string::npos || fs::path(shard).is_absolute())
        fail(index_file, ": shard '", shard, "' is outside the model folder");
      auto it = shard_of_file.find(shard);
      if (it == shard_of_file.end()) {
        const std::string shard_path = (fs::path(dir) / shard).string();
        if (!fs::exists(shard_path)) fail(index_file, ": shard '", shard, "' listed for '", name, "' does not exist");
        store->files_.push_back(SafetensorsFile::open(shard_path));
        it = shard_of_file.emplace(shard, store->files_.size() - 1).first;
      }
      if (!store->files_[it->second]->find(name))
        fail(index_file, ": tensor '", name, "' is listed in shard '", shard, "' but ", store->files_[it->second]->path(),
             " does not contain it");
      store->file_of_tensor_[name] = it->second;
    }
  } else if (fs::exists(single)) {
    store->files_.push_back(SafetensorsFile::open(single.string()));
    for (const TensorInfo& t : store->files_[0]->tensors()) store->file_of_tensor_[t.name] = 0;
  } else {
    fail(dir, ": no model.safetensors or model.safetensors.index.json (only safetensors weights are read)");
  }
  return store;
}

bool TensorStore::has(const std::string& name) const { return file_of_tensor_.count(name) > 0; }

const TensorInfo& TensorStore::info(const std::string& name) const {
  const auto it = file_of_tensor_.find(name);
  if (it == file_of_tensor_.end()) fail(location_, ": tensor '", name, "' not found");
  return *files_[it->second]->find(name);
}

const uint8_t* TensorStore::data(const std::string& name) const {
  const TensorInfo& t = info(name);
  return files_[file_of_tensor_.at(name)]->data(t);
}

const std::string& TensorStore::file_of(const std::string& name) const {
  const auto it = file_of_tensor_.find(name);
  if (it == file_of_tensor_.end()) return location_;
  return files_[it->second]->path();
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : file_of_tensor_) out.push_back(name);
  return out;
}

std::vector<float> TensorStore::read_f32(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  const TensorInfo& t = info(name);
  if (!expected_shape.empty() && t.shape != expected_shape)
    fail(file_of(name), ": tensor '", name, "' has shape ", shape_to_string(t.shape), ", expected ",
         shape_to_string(expected_shape));
  std::vector<float> out(static_cast<size_t>(t.numel()));
  convert_to_f32(t.dtype, data(name), out.size(), out.data(), file_of(name) + ": tensor '" + name + "'");
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing

void SafetensorsWriter::add(const std::string& name, DType dtype, const std::vector<int64_t>& shape, const void* data,
                            size_t nbytes) {
  for (const Entry& e : entries_)
    if (e.name == name) fail("safetensors writer: tensor '", name, "' added twice");
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (static_cast<size_t>(numel) * dtype_size(dtype) != nbytes)
    fail("safetensors writer: tensor '", name, "' has ", nbytes, " bytes for ", dtype_name(dtype), " ",
         shape_to_string(shape));
  Entry e{name, dtype, shape, std::vector<uint8_t>(nbytes)};
  if (nbytes) std::memcpy(e.bytes.data(), data, nbytes);
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::add_f32(const std::string& name, const std::vector<int64_t>& shape,
                                const std::vector<float>& values) {
  add(name, DType::F32, shape, values.data(), values.size() * sizeof(float));
}

void SafetensorsWriter::set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

namespace {
// Writes to a temp file beside `path`, flushes it to disk, then renames it over `path`.
void write_atomic(const std::string& path, const std::function<void(std::FILE*)>& body) {
  const fs::path target(path);
  const fs::path tmp = target.parent_path() / ("." + target.filename().string() + ".tmp-" + std::to_string(current_pid()));
  std::FILE* f = std::fopen(tmp.string().c_str(), "wb");
  if (!f) fail(path, ": cannot write (", std::strerror(errno), ")");
  try {
    body(f);
    if (std::fflush(f) != 0) fail(path, ": write failed (", std::strerror(errno), ")");
#ifndef _WIN32
    if (fsync(fileno(f)) != 0) fail(path, ": fsync failed (", std::strerror(errno), ")");
#endif
  } catch (...) {
    std::fclose(f);
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
  if (std::fclose(f) != 0) {
    std::error_code ec;
    fs::remove(tmp, ec);
    fail(path, ": write failed on close");
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    fail(path, ": cannot rename the finished file into place (", ec.message(), ")");
  }
}

void write_all(std::FILE* f, const void* data, size_t n, const std::string& path) {
  if (n && std::fwrite(data, 1, n, f) != n) fail(path, ": write failed (", std::strerror(errno), ")");
}
}  // namespace

void SafetensorsWriter::write(const std::string& path) const {
  json::Value header = json::Value::object();
  if (!metadata_.empty()) {
    json::Value meta = json::Value::object();
    for (const auto& [k, v] : metadata_) meta.set(k, json::Value::string(v));
    header.set("__metadata__", meta);
  }
  size_t offset = 0;
  for (const Entry& e : entries_) {
    json::Value shape = json::Value::array();
    for (int64_t d : e.shape) shape.push_back(json::Value::number(static_cast<double>(d)));
    json::Value offsets = json::Value::array();
    offsets.push_back(json::Value::number(static_cast<double>(offset)));
    offsets.push_back(json::Value::number(static_cast<double>(offset + e.bytes.size())));
    json::Value entry = json::Value::object();
    entry.set("dtype", json::Value::string(dtype_name(e.dtype)));
    entry.set("shape", shape);
    entry.set("data_offsets", offsets);
    header.set(e.name, entry);
    offset += e.bytes.size();
  }
  std::string text = header.dump();
  // Pad with spaces so the data starts 8-byte aligned, as the reference implementation does.
  while ((8 + text.size()) % 8 != 0) text += ' ';
  write_atomic(path, [&](std::FILE* f) {
    uint8_t len[8];
    uint64_t n = text.size();
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
    write_all(f, len, 8, path);
    write_all(f, text.data(), text.size(), path);
    for (const Entry& e : entries_) write_all(f, e.bytes.data(), e.bytes.size(), path);
  });
}

void write_file_atomic(const std::string& path, const std::string& contents) {
  write_atomic(path, [&](std::FILE* f) { write_all(f, contents.data(), contents.size(), path); });
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, ": cannot read (", std::strerror(errno), ")");
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace qlora
