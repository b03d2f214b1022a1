// What a folder that is not a loadable Hugging Face model holds instead, for the error that refuses it: PyTorch
// pickles (never loaded), a llama.cpp GGUF, an adapter, Meta's or Mistral's original checkpoint layout.
#pragma once
#include <string>

namespace qlora {

// A clause naming what `dir` holds instead of safetensors weights and what to do about it ("it holds
// pytorch_model.bin, a PyTorch pickle, which is never loaded: ..."), or "" when nothing there says more.
std::string weights_hint(const std::string& dir);

// The same for a folder without config.json (a GGUF file, an adapter folder, an original checkpoint), or "".
std::string config_hint(const std::string& dir);

}  // namespace qlora
