// The bnb-4bit checkpoint layout that transformers writes and reads (facts/formats.md): for a linear weight W
// [out, in]: `W` U8 [out*in/2, 1], `W.absmax` (U8 with double quant, F32 without), `W.quant_map` F32[16], with
// double quant `W.nested_absmax` F32 and `W.nested_quant_map` F32[256], and `W.quant_state.bitsandbytes__nf4`
// (U8 bytes of a JSON object: quant_type, blocksize, dtype, shape[, nested_blocksize, nested_dtype,
// nested_offset]).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "quant/nf4.h"

namespace qlora::bnb4 {

// True when `name` is stored in the bnb-4bit layout in `store` (i.e. `<name>.quant_state.bitsandbytes__nf4` exists).
bool is_quantized(const TensorStore& store, const std::string& name);

// An NF4 weight as stored: codes and per-block absmax (already double-dequantized), plus the dtype the quant state
// says the dequantized values come out in.
// The block constants of a double-quantized weight as stored: absmax_i = code2[codes_i] * state2[i / blocksize2] +
// offset (nf4::double_dequantize).
struct DoubleQuantState {
  std::vector<uint8_t> codes;  // one byte per block constant
  std::vector<float> state2_absmax;
  std::vector<float> code2;  // the 256-value 8-bit map
  float offset = 0.0f;
  int blocksize2 = 256;
};

struct Nf4Weight {
  std::vector<int64_t> shape;   // [out, in]
  int blocksize = 64;
  std::vector<uint8_t> packed;
  std::vector<float> absmax;    // the block constants in fp32 (double-dequantized when nested)
  std::optional<DoubleQuantState> nested;  // with double quantization, as stored
  std::string dtype;            // "float32", "bfloat16", "float16"
};

// Reads and validates one bnb-4bit weight. Errors name the file and tensor: "<file>: tensor '<name>.absmax' has
// 100 values, expected 128 for shape [128, 256] in blocks of 64"; fp4 is "not supported".
Nf4Weight read_weight(const TensorStore& store, const std::string& name);

// Dequantizes to fp32 values rounded to the quant state's dtype (bf16/f16 round to nearest even), as bitsandbytes'
// dequantize_4bit returns them.
std::vector<float> dequantize_weight(const Nf4Weight& w);
void dequantize_weight_into(const Nf4Weight& w, float* out);  // into numel(w.shape) values

// Adds the bnb-4bit tensors of the weight `name` (row-major [out, in]), whose values `load` gives a block at a
// time, to `writer`. `dtype` is the dtype recorded in the quant state (the model's own dtype). With double
// quantization the block constants are computed here (the quant state holds their mean); the codes are computed
// when the writer writes them and freed once written, so `load` must stay valid until then.
void add_quantized_weight(SafetensorsWriter& writer, const std::string& name, const std::vector<int64_t>& shape,
                          nf4::BlockLoader load, bool double_quant, const std::string& dtype);
// The same for values in memory (copied: `values` need not outlive the call).
void add_quantized_weight(SafetensorsWriter& writer, const std::string& name, const std::vector<int64_t>& shape,
                          const std::vector<float>& values, bool double_quant, const std::string& dtype);

// True for the decoder-block linear weights QLoRA quantizes: model.layers.N.self_attn.{q,k,v,o}_proj.weight and
// model.layers.N.mlp.{gate,up,down}_proj.weight. Embeddings, norms, biases and lm_head stay as stored.
bool is_quantizable_linear(const std::string& name);

struct QuantizeReport {
  int64_t quantized_tensors = 0;
  int64_t copied_tensors = 0;
  int64_t bytes_in = 0;
  int64_t bytes_out = 0;
};

// Writes the model in `model_dir` as a bnb-4bit checkpoint `out_file` (one safetensors file, atomically), a tensor
// at a time: memory holds one quantized weight, not the output.
// `dtype` ("float32", "bfloat16", "float16") casts the model first, as transformers' torch_dtype does when it loads
// a model to quantize it: floating tensors that stay unquantized are written in it and the quant states record it.
// "" keeps each tensor's stored dtype (copied byte for byte). A model that is already bnb-4bit is rejected.
QuantizeReport quantize_model(const std::string& model_dir, const std::string& out_file, bool double_quant,
                              const std::string& dtype = "");

}  // namespace qlora::bnb4
