#include "io/folder_hints.h"

#include <algorithm>
#include <filesystem>
#include <system_error>
#include <vector>

namespace qlora {
namespace fs = std::filesystem;

namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// The names of the plain files directly in `dir`, sorted (an unreadable folder: none).
std::vector<std::string> file_names(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code type_ec;
    if (it->is_regular_file(type_ec)) names.push_back(it->path().filename().string());
  }
  std::sort(names.begin(), names.end());
  return names;
}

// The first name with one of `tails`, or "" (names in `skip` do not count).
std::string first_with(const std::vector<std::string>& names, std::initializer_list<const char*> tails,
                       std::initializer_list<const char*> skip = {}) {
  for (const std::string& n : names) {
    if (std::any_of(skip.begin(), skip.end(), [&](const char* s) { return n == s; })) continue;
    for (const char* t : tails)
      if (ends_with(n, t)) return n;
  }
  return "";
}

bool has(const std::vector<std::string>& names, const char* name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

const char* kAdapterHint =
    ": it holds adapter_config.json, so it is a LoRA adapter, not a model: give its base model (adapter_config.json's "
    "base_model_name_or_path) as the model and this folder as the adapter";

}  // namespace

std::string weights_hint(const std::string& dir) {
  const std::vector<std::string> names = file_names(dir);
  if (has(names, "adapter_config.json")) return kAdapterHint;
  // a Trainer checkpoint's own pickles (its arguments, optimizer, scheduler, RNG) are not the model's weights
  const std::string pickle = first_with(names, {".bin", ".pt", ".pth", ".ckpt", ".pkl"},
                                        {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"});
  if (!pickle.empty())
    return ": it holds " + pickle +
           ", a PyTorch pickle, which is never loaded (a pickle can run code): use the model's safetensors release, "
           "or convert it once with transformers (save_pretrained with safe_serialization=True)";
  const std::string gguf = first_with(names, {".gguf"});
  if (!gguf.empty())
    return ": it holds " + gguf + ", a llama.cpp file; training needs the Hugging Face release of the model";
  const std::string other = first_with(names, {".safetensors"});
  if (!other.empty())
    return ": it holds " + other +
           ", which is not in the Hugging Face layout (model.safetensors, or shards listed in "
           "model.safetensors.index.json)";
  return "";
}

std::string config_hint(const std::string& dir) {
  const std::vector<std::string> names = file_names(dir);
  if (has(names, "adapter_config.json")) return kAdapterHint;
  const std::string gguf = first_with(names, {".gguf"});
  if (!gguf.empty())
    return ": it holds " + gguf +
           ", a llama.cpp file; training needs the model's Hugging Face release (config.json, safetensors, "
           "tokenizer.json)";
  if (has(names, "params.json"))
    return ": it holds params.json, the original checkpoint layout of Meta or Mistral; use the model's Hugging Face "
           "release (config.json, safetensors, tokenizer.json)";
  return "";
}

}  // namespace qlora
