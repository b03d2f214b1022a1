// Merging a PEFT LoRA adapter into its base model, written out as a plain Hugging Face model: for every adapted
// linear W' = W + scale * B @ A (PEFT's merge; scale = alpha / r, or alpha / sqrt(r) with rsLoRA), with W
// dequantized first when the base is bnb-4bit. The sum is computed in double and rounded once to the output dtype;
// every other floating tensor is converted to it, non-floating tensors are copied, and a bnb-4bit base's auxiliary
// tensors (.absmax, .quant_map, .nested_*, .quant_state.*) are dropped. Tensor names stay the base model's.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/dtype.h"

namespace qlora {

class Backend;
class LoraAdapter;
class TensorStore;
struct LoraParam;

constexpr int64_t kDefaultMaxShardBytes = 5'000'000'000;  // transformers' default max_shard_size ("5GB")

struct MergeReport {
  int64_t shards = 0;               // files written: 1 means a single model.safetensors
  int64_t tensors = 0;              // tensors written
  int64_t bytes = 0;                // tensor bytes written (the index's total_size)
  std::vector<std::string> files;   // file names written in `folder`, index included
};

// A merge of an adapter into its base model, planned from their headers and checked (names, shapes, dtypes; an
// adapter that does not fit the base fails naming the tensor) before anything is computed: the tensors of the merged
// model in the order they are written, each computed on request. merge_weights writes them; a GGUF export converts
// them one at a time, with no merged copy of the model on disk.
class MergePlan {
 public:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;  // as written (a bnb-4bit weight's real shape, not its packed one)
    DType dtype = DType::F32;    // as written
    int64_t nbytes = 0;
    bool quantized = false;      // bnb-4bit in the base: dequantized first
    const LoraParam* lora = nullptr;
  };

  // `dtype` ("bfloat16", "float16" or "float32") is what the floating tensors are written in.
  MergePlan(const std::string& model_dir, const std::string& adapter_dir, const std::string& dtype);
  ~MergePlan();
  MergePlan(const MergePlan&) = delete;
  MergePlan& operator=(const MergePlan&) = delete;

  const std::vector<Tensor>& tensors() const { return tensors_; }
  const Tensor* find(const std::string& name) const;  // nullptr when the merged model has no such tensor
  const TensorStore& store() const { return *store_; }

  // Whether `t` is written as the base stores it (not adapted, not 4-bit, already in its output dtype or not
  // floating).
  bool copied_as_stored(const Tensor& t) const;
  // A floating tensor's values in fp32 into `out`, which holds its element count (the addon fills a JS array in
  // place): a bnb-4bit weight dequantized; an adapted one W + scale * B @ A, accumulated in double and rounded once,
  // to fp32 nearest for a float32 plan and "to odd" for a 16-bit one (so that rounding that to bf16 or f16 rounds the
  // double sum correctly).
  void merged_values_into(const Tensor& t, float* out) const;

 private:
  std::unique_ptr<TensorStore> store_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LoraAdapter> adapter_;
  double scale_ = 1.0;
  int64_t rank_ = 0;
  std::vector<Tensor> tensors_;
};

// Writes the merged weights into `folder` (created when absent): model.safetensors when every tensor fits in one
// file of at most `max_shard_bytes` tensor bytes, else model-0000i-of-0000N.safetensors shards (a tensor larger
// than the limit gets a shard of its own) and model.safetensors.index.json. `dtype` is "bfloat16", "float16" or
// "float32". The folder, names, shapes and dtypes are checked before anything is written: a `folder` that exists
// and is not empty is refused, and an adapter that does not fit the base fails naming the tensor. Memory stays at
// the one weight being merged (each is computed as its file's writer reaches it); each file is written atomically,
// and on a later failure (a corrupt bnb-4bit weight, a full disk) the files written so far are removed, and `folder`
// too when this call created it. config.json, tokenizer files and the like are the caller's to write.
MergeReport merge_weights(const std::string& model_dir, const std::string& adapter_dir, const std::string& folder,
                          const std::string& dtype, int64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace qlora
