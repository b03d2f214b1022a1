#include "gpu/libraries.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <system_error>

#ifdef _WIN32
#include <windows.h>
#else
#include <dlfcn.h>
#endif

namespace qlora::gpu {

namespace fs = std::filesystem;

namespace {

std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

// Sub-folders of `dir` whose names start with `prefix`, sorted newest-looking last (so callers reverse for newest
// first): python3.10, python3.12, ... or cuda-12.4, cuda-13.0.
std::vector<fs::path> children_starting_with(const fs::path& dir, const std::string& prefix) {
  std::vector<fs::path> out;
  std::error_code ec;
  if (!is_dir(dir)) return out;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.rfind(prefix, 0) == 0 && is_dir(it->path())) out.push_back(it->path());
  }
  std::sort(out.begin(), out.end());
  std::reverse(out.begin(), out.end());
  return out;
}

// site-packages folders of a Python environment rooted at `prefix` (lib/python3.X/site-packages on Linux and
// macOS, Lib/site-packages on Windows).
std::vector<fs::path> site_packages(const fs::path& prefix, bool windows) {
  std::vector<fs::path> out;
  if (windows) {
    if (is_dir(prefix / "Lib" / "site-packages")) out.push_back(prefix / "Lib" / "site-packages");
    return out;
  }
  for (const fs::path& py : children_starting_with(prefix / "lib", "python3")) {
    for (const char* sub : {"site-packages", "dist-packages"})
      if (is_dir(py / sub)) out.push_back(py / sub);
  }
  return out;
}

}  // namespace

SearchEnv current_search_env(const std::string& library_dir) {
  SearchEnv e;
  e.library_dir = !library_dir.empty() ? library_dir : env_or_empty("QLORA_CUDA_LIB_DIR");
  e.cuda_path = env_or_empty("CUDA_PATH");
  e.cuda_home = env_or_empty("CUDA_HOME");
  e.virtual_env = env_or_empty("VIRTUAL_ENV");
  e.conda_prefix = env_or_empty("CONDA_PREFIX");
#ifdef _WIN32
  e.home = env_or_empty("USERPROFILE");
  e.windows = true;
#else
  e.home = env_or_empty("HOME");
#endif
  return e;
}

std::vector<std::string> search_dirs(const SearchEnv& env) {
  std::vector<fs::path> dirs;
  if (!env.library_dir.empty()) dirs.emplace_back(env.library_dir);
  for (const std::string& root : {env.cuda_path, env.cuda_home}) {
    if (root.empty()) continue;
    const fs::path r(root);
    if (env.windows) {
      dirs.push_back(r / "bin" / "x64");  // CUDA 13 on Windows keeps its DLLs here
      dirs.push_back(r / "bin");
    } else {
      dirs.push_back(r / "lib64");
      dirs.push_back(r / "lib");
    }
  }
  dirs.emplace_back("");  // the loader's own search

  // CUDA toolkit default folders
  if (env.windows) {
    const fs::path toolkit("C:/Program Files/NVIDIA GPU Computing Toolkit/CUDA");
    for (const fs::path& v : children_starting_with(toolkit, "v")) {
      dirs.push_back(v / "bin" / "x64");
      dirs.push_back(v / "bin");
    }
  } else {
    dirs.emplace_back("/usr/local/cuda/lib64");
    for (const fs::path& v : children_starting_with("/usr/local", "cuda-")) dirs.push_back(v / "lib64");
    dirs.emplace_back("/usr/lib/x86_64-linux-gnu");
    dirs.emplace_back("/usr/lib/aarch64-linux-gnu");
  }

  // Python environments: pip's nvidia-cublas wheels (nvidia/cu13/lib for CUDA 13, nvidia/cublas/lib before)
  std::vector<fs::path> prefixes;
  if (!env.virtual_env.empty()) prefixes.emplace_back(env.virtual_env);
  if (!env.conda_prefix.empty()) prefixes.emplace_back(env.conda_prefix);
  if (!env.home.empty()) {
    const fs::path home(env.home);
    prefixes.push_back(home / ".local");
    if (env.windows) {
      // python.org's installs (%LOCALAPPDATA%\Programs\Python\Python3xx) and their user sites
      // (%APPDATA%\Python\Python3xx\site-packages, without a Lib folder)
      for (const fs::path& py : children_starting_with(home / "AppData" / "Local" / "Programs" / "Python", "Python3"))
        prefixes.push_back(py);
      for (const fs::path& py : children_starting_with(home / "AppData" / "Roaming" / "Python", "Python3"))
        for (const char* sub : {"cu13", "cublas"})
          for (const fs::path& bin : {fs::path("bin"), fs::path("bin") / "x86_64"})
            dirs.push_back(py / "site-packages" / "nvidia" / sub / bin);
    }
    for (const char* conda : {"miniconda3", "anaconda3", "miniforge3", "mambaforge"}) {
      prefixes.push_back(home / conda);
      for (const fs::path& e : children_starting_with(home / conda / "envs", "")) prefixes.push_back(e);
    }
  }
  if (!env.windows) {
    prefixes.emplace_back("/usr/local");
    prefixes.emplace_back("/usr");
  }
  // (on Windows CUDA 13's wheels keep the DLLs in bin\x86_64, earlier ones in bin)
  for (const fs::path& prefix : prefixes)
    for (const fs::path& sp : site_packages(prefix, env.windows))
      for (const char* sub : {"cu13", "cublas"}) {
        if (!env.windows) {
          dirs.push_back(sp / "nvidia" / sub / "lib");
          continue;
        }
        for (const fs::path& bin : {fs::path("bin"), fs::path("bin") / "x86_64"})
          dirs.push_back(sp / "nvidia" / sub / bin);
      }

  // Ollama's bundled CUDA libraries
  if (env.windows) {
    if (!env.home.empty())
      for (const char* v : {"cuda_v13", "cuda_v12"})
        dirs.push_back(fs::path(env.home) / "AppData" / "Local" / "Programs" / "Ollama" / "lib" / "ollama" / v);
  } else {
    for (const char* root : {"/usr/local/lib/ollama", "/usr/lib/ollama"})
      for (const char* v : {"cuda_v13", "cuda_v12"}) dirs.push_back(fs::path(root) / v);
  }

  std::vector<std::string> out;
  for (const fs::path& d : dirs) {
    const std::string s = d.string();
    if (!s.empty() && !is_dir(d)) continue;
    if (std::find(out.begin(), out.end(), s) == out.end()) out.push_back(s);
  }
  return out;
}

std::vector<std::string> cublaslt_names(bool windows) {
  // The engine is built against CUDA 13: its cuBLASLt has the ABI it declares.
  if (windows) return {"cublasLt64_13.dll"};
  return {"libcublasLt.so.13"};
}

std::vector<std::string> nvml_names(bool windows) {
  if (windows) return {"nvml.dll"};
  return {"libnvidia-ml.so.1", "libnvidia-ml.so"};
}

std::vector<std::string> cuda_driver_names(bool windows) {
  if (windows) return {"nvcuda.dll"};
  return {"libcuda.so.1", "libcuda.so"};
}

void* Library::symbol(const char* name) const {
  if (!handle) return nullptr;
#ifdef _WIN32
  return reinterpret_cast<void*>(GetProcAddress(static_cast<HMODULE>(handle), name));
#else
  return dlsym(handle, name);
#endif
}

Library load_library(const std::vector<std::string>& names, const std::vector<std::string>& dirs) {
  Library lib;
  for (const std::string& dir : dirs) {
    for (const std::string& name : names) {
      const std::string path = dir.empty() ? name : (fs::path(dir) / name).string();
      if (!dir.empty() && !fs::exists(fs::path(path))) continue;  // nothing to try there
      lib.tried.push_back(path);
#ifdef _WIN32
      HMODULE h = LoadLibraryExA(path.c_str(), nullptr, dir.empty() ? 0 : LOAD_WITH_ALTERED_SEARCH_PATH);
      if (h) {
        lib.handle = h;
        lib.path = path;
        return lib;
      }
      if (lib.error.empty()) lib.error = "LoadLibrary error " + std::to_string(GetLastError());
#else
      if (void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) {
        lib.handle = h;
        lib.path = path;
        return lib;
      }
      const char* err = dlerror();
      if (lib.error.empty()) lib.error = err ? err : "dlopen failed";  // the first attempt's reason says most
#endif
    }
  }
  return lib;
}

}  // namespace qlora::gpu
