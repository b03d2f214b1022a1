// Finding and loading the NVIDIA libraries the GPU engine uses at run time (the driver's libcuda and NVML, and
// cuBLASLt), with dlopen / LoadLibrary and our own declarations of the few functions we call, so that nothing of
// CUDA beyond the statically linked runtime is needed to build or to load the addon. The search order is the one
// users expect (see search_dirs); every attempt is recorded, so a missing library can be reported as one sentence
// saying what was looked for and where.
#pragma once
#include <string>
#include <vector>

namespace qlora::gpu {

// What the search depends on, so that the order is testable: environment variables (by name), the home folder,
// and the platform.
struct SearchEnv {
  std::string library_dir;  // qlora.cudaLibraryPath / QLORA_CUDA_LIB_DIR
  std::string cuda_path;    // CUDA_PATH
  std::string cuda_home;    // CUDA_HOME
  std::string virtual_env;  // VIRTUAL_ENV
  std::string conda_prefix; // CONDA_PREFIX
  std::string home;         // HOME / USERPROFILE
  bool windows = false;
};

// The environment of this process (the explicit library folder overrides QLORA_CUDA_LIB_DIR when not empty).
SearchEnv current_search_env(const std::string& library_dir = "");

// Folders to look in for cuBLASLt, in order: the configured folder, CUDA_PATH / CUDA_HOME (lib64, lib, and
// bin\x64 and bin on Windows), then "" (the loader's own search: LD_LIBRARY_PATH, the system folders), the CUDA
// toolkit's default folders, the nvidia/cu13/lib and nvidia/cublas/lib folders of Python environments (the active
// virtualenv or conda env, ~/.local, conda and miniforge envs, the system site-packages), and the cuda_v13 /
// cuda_v12 folders Ollama installs. Folders that do not exist are left out, except "".
std::vector<std::string> search_dirs(const SearchEnv& env);

// The file names of a library on this platform, newest first (e.g. libcublasLt.so.13).
std::vector<std::string> cublaslt_names(bool windows);
std::vector<std::string> nvml_names(bool windows);
std::vector<std::string> cuda_driver_names(bool windows);

struct Library {
  void* handle = nullptr;
  std::string path;                // what was loaded (the file name alone when the loader found it)
  std::vector<std::string> tried;  // every path attempted, in order
  std::string error;               // the loader's message for the last attempt when nothing loaded
  bool found() const { return handle != nullptr; }
  void* symbol(const char* name) const;
  // The symbol as a pointer to a function of type F (our own declaration of its C signature); null when missing.
  template <typename F>
  F function(const char* name) const {
    return reinterpret_cast<F>(symbol(name));
  }
};

// Tries each name in each folder ("" = the loader's own search) and keeps the first that loads. The handle stays
// loaded for the life of the process.
Library load_library(const std::vector<std::string>& names, const std::vector<std::string>& dirs);

}  // namespace qlora::gpu
