// The GPU library search: folders in the documented order (configured folder, CUDA_PATH, the loader, the toolkit,
// Python wheels, Ollama), missing folders left out, and a load that records every attempt and the reason it failed.
// No GPU or NVIDIA software is needed: the folders are made here.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gpu/libraries.h"
#include "gpu/probe.h"
#include "harness.h"

using namespace qlora::gpu;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("qlora-gpu-test-" + name);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

long index_of(const std::vector<std::string>& v, const fs::path& p) {
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] == p.string()) return static_cast<long>(i);
  return -1;
}

}  // namespace

TEST(gpu_library_search_order) {
  const fs::path root = fresh_dir("search");
  const fs::path configured = root / "configured", cuda = root / "cuda-13", home = root / "home";
  const fs::path wheel = home / ".local" / "lib" / "python3.12" / "site-packages" / "nvidia" / "cu13" / "lib";
  const fs::path conda = home / "miniconda3" / "envs" / "train" / "lib" / "python3.11" / "site-packages" / "nvidia" / "cublas" / "lib";
  for (const fs::path& d : {configured, cuda / "lib64", wheel, conda}) fs::create_directories(d);
  SearchEnv env;
  env.library_dir = configured.string();
  env.cuda_path = cuda.string();
  env.home = home.string();
  const std::vector<std::string> dirs = search_dirs(env);
  const long c = index_of(dirs, configured), cp = index_of(dirs, cuda / "lib64"), w = index_of(dirs, wheel),
             k = index_of(dirs, conda);
  long loader = -1;
  for (size_t i = 0; i < dirs.size(); ++i)
    if (dirs[i].empty()) loader = static_cast<long>(i);
  EXPECT_TRUE(c == 0, "the configured folder first, got ", c);
  EXPECT_TRUE(cp == 1, "CUDA_PATH/lib64 second, got ", cp);
  EXPECT_TRUE(loader == 2, "then the loader's own search, got ", loader);
  EXPECT_TRUE(w > loader && k > w, "then Python wheels (~/.local before conda envs): ", w, " ", k);
  EXPECT_TRUE(index_of(dirs, cuda / "lib") < 0, "folders that do not exist are left out");
  // no duplicates
  for (size_t i = 0; i < dirs.size(); ++i)
    for (size_t j = i + 1; j < dirs.size(); ++j) EXPECT_TRUE(dirs[i] != dirs[j], "duplicate ", dirs[i]);
}

TEST(gpu_library_search_windows_python_folders) {
  // the folder layout only: the search reads SearchEnv, not the machine it runs on
  const fs::path home = fresh_dir("search-windows") / "home";
  const fs::path org = home / "AppData" / "Local" / "Programs" / "Python" / "Python312" / "Lib" / "site-packages" / "nvidia" / "cu13" / "bin" / "x86_64";
  const fs::path user = home / "AppData" / "Roaming" / "Python" / "Python313" / "site-packages" / "nvidia" / "cu13" / "bin";
  for (const fs::path& d : {org, user}) fs::create_directories(d);
  SearchEnv env;
  env.windows = true;
  env.home = home.string();
  const std::vector<std::string> dirs = search_dirs(env);
  EXPECT_TRUE(index_of(dirs, org) >= 0, "python.org install's wheel folder (bin/x86_64) searched");
  EXPECT_TRUE(index_of(dirs, user) >= 0, "the user site's wheel folder searched");
}

TEST(gpu_library_load_records_attempts_and_reason) {
  const fs::path dir = fresh_dir("load");
  std::ofstream(dir / "libcublasLt.so.13") << "not a shared library";
  const Library lib = load_library({"libcublasLt.so.13"}, {dir.string()});
  EXPECT_TRUE(!lib.found(), "a file that is not a library must not load");
  EXPECT_EQ(lib.tried.size(), size_t{1});
  EXPECT_TRUE(lib.tried[0] == (dir / "libcublasLt.so.13").string(), lib.tried[0]);
  EXPECT_TRUE(!lib.error.empty(), "the loader's reason is kept");
  // a folder without the file is not an attempt
  const Library none = load_library({"libcublasLt.so.13"}, {(dir / "missing").string()});
  EXPECT_EQ(none.tried.size(), size_t{0});
}

TEST(gpu_probe_without_a_driver_says_what_to_install) {
  // This machine (and CI's) has no NVIDIA driver: the probe must say so in sentences, never throw.
  const GpuReport r = probe((fresh_dir("probe") / "empty").string());
  if (r.driver.found) return;  // a machine with a driver: nothing to check here
  bool driver_sentence = false, cublas_sentence = false;
  for (const std::string& p : r.problems) {
    driver_sentence |= p.find("No NVIDIA driver was found") == 0 && p.find("580") != std::string::npos;
    cublas_sentence |= p.find("cuBLASLt (") == 0 && p.find("qlora.cudaLibraryPath") != std::string::npos;
  }
  EXPECT_TRUE(driver_sentence, "no driver sentence");
  EXPECT_TRUE(r.gpus.empty() && r.compute_dtype.empty(), "no GPU without a driver");
  if (!r.cublaslt.found) EXPECT_TRUE(cublas_sentence, "no cuBLASLt sentence");
  EXPECT_TRUE(cuda_version_text(13000) == "13.0" && cuda_version_text(12040) == "12.4", cuda_version_text(12040));
}
