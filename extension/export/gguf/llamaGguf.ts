// A Hugging Face LLaMA-family model folder (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; plain
// safetensors) as a GGUF llama.cpp loads: its architecture metadata, tensor names and layout, and tokenizer.
// Layout facts (llama.cpp's convert_hf_to_gguf.py and llama-arch.cpp):
// - a GGUF shape lists ne[0] first (the innermost dimension): a [out, in] weight is written with shape [in, out];
// - llama-architecture models (Llama, Mistral) use llama.cpp's interleaved ("normal") rope, so the rows of q_proj and
//   k_proj are permuted from Hugging Face's rotate-half order, per head; Qwen2 uses the NeoX rope and is not;
// - llama3 rope scaling is a `rope_freqs` tensor of per-frequency divisors; linear scaling is metadata.
import { readModelConfig } from '../../engine';
import type { NativeModelConfig } from '../../engine/native';
import { encodeTensor } from './encode';
import { floatsInto, TensorScratch } from './scratch';
import { listModelTensors, readTensorF32 } from './safetensorsReader';
import { tokenizerMetadata } from './tokenizerMetadata';
import { GGML_TYPES, LLAMA_FTYPE, tensorBytes, type GgmlTypeName, type GgufFileType } from './types';
import { GGUF_ALIGNMENT, gguf, writeGguf, type GgufTensorSpec, type GgufValue } from './writer';

export type GgufArch = 'llama' | 'qwen2';

export const ARCHITECTURES: Record<string, GgufArch> = {
  LlamaForCausalLM: 'llama',
  MistralForCausalLM: 'llama',
  Qwen2ForCausalLM: 'qwen2',
};

/** What each GGUF tensor is made of. */
interface PlannedTensor extends GgufTensorSpec {
  /** Reads and lays out the float32 values in GGUF order, in `scratch`'s arrays (good until the next tensor's). */
  values(scratch: TensorScratch): Float32Array;
}

/**
 * Hugging Face's rotate-half rows to llama.cpp's interleaved pairs, per head: within a head of `headDim` rows,
 * row (j * headDim/2 + i) moves to (2i + j) for i < headDim/2, j in {0, 1}.
 */
export function permuteForInterleavedRope(w: Float32Array, heads: number, cols: number, into?: Float32Array): Float32Array {
  const rows = w.length / cols;
  const headDim = rows / heads;
  if (!Number.isInteger(headDim) || headDim % 2 !== 0) throw new Error(`cannot permute ${rows} rows into ${heads} heads of even size`);
  const half = headDim / 2;
  const out = floatsInto(into, w.length, 'permuteForInterleavedRope');
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < half; i++) {
      for (let j = 0; j < 2; j++) {
        const from = h * headDim + j * half + i;
        const to = h * headDim + 2 * i + j;
        out.set(w.subarray(from * cols, (from + 1) * cols), to * cols);
      }
    }
  }
  return out;
}

/** llama3 rope scaling as llama.cpp's rope_freqs: for each frequency, what its angle is divided by. */
export function llama3RopeFactors(c: NativeModelConfig): Float32Array {
  const dim = c.headDim;
  const factor = c.ropeScalingFactor;
  const oldLen = c.ropeOriginalMaxPositionEmbeddings;
  const lowWavelen = oldLen / c.ropeLowFreqFactor;
  const highWavelen = oldLen / c.ropeHighFreqFactor;
  const out = new Float32Array(dim / 2);
  for (let i = 0; i < dim / 2; i++) {
    const freq = 1 / c.ropeTheta ** ((2 * i) / dim);
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < highWavelen) out[i] = 1;
    else if (wavelen > lowWavelen) out[i] = factor;
    else {
      const smooth = (oldLen / wavelen - c.ropeLowFreqFactor) / (c.ropeHighFreqFactor - c.ropeLowFreqFactor);
      out[i] = 1 / ((1 - smooth) / factor + smooth);
    }
  }
  return out;
}

/** What a tensor is, for the choice of its type (llama.cpp's Q4_K_M gives some of them more bits). */
export interface TensorRole {
  /** The output projection (or the token embedding when it doubles as the output: tied embeddings). */
  kind: 'output' | 'token_embd' | 'attn_v' | 'ffn_down' | 'other';
  layer: number;
  layers: number;
}

/** llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one in between. */
export function useMoreBits(layer: number, layers: number): boolean {
  const eighth = Math.floor(layers / 8);
  return layer < eighth || layer >= Math.floor((7 * layers) / 8) || (layer - eighth) % 3 === 2;
}

/**
 * A type the tensor's rows can hold: k-quants need rows of whole 256-value blocks, q5_0 and q8_0 of 32. Rows that do
 * not fit fall back as llama.cpp's quantizer does (llama-quant.cpp): q4_k to q5_0, q6_k to q8_0, and to f16 when
 * even blocks of 32 do not fit (Qwen2.5-0.5B's hidden size 896, for one, is 3.5 super-blocks).
 */
function fitting(type: GgmlTypeName, rowLength: number): GgmlTypeName {
  if (rowLength % GGML_TYPES[type].blockSize === 0) return type;
  const fallback: GgmlTypeName = type === 'q4_k' ? 'q5_0' : 'q8_0';
  return rowLength % GGML_TYPES[fallback].blockSize === 0 ? fallback : 'f16';
}

/**
 * The type a tensor gets in a file of `fileType`: vectors stay f32 (as llama.cpp keeps them); matrices follow the
 * file type, and for q4_k_m llama.cpp's own mix (llama-quant.cpp, llama_tensor_get_type): the output layer q6_k,
 * attn_v and ffn_down q6_k in the layers useMoreBits picks, everything else q4_k.
 */
export function tensorTypeFor(fileType: GgufFileType, shape: readonly number[], role: TensorRole = { kind: 'other', layer: 0, layers: 1 }): GgmlTypeName {
  if (shape.length < 2 || fileType === 'f32') return 'f32';
  if (fileType === 'f16' || fileType === 'bf16') return fileType;
  if (fileType === 'q8_0') return fitting('q8_0', shape[0]);
  const more = (role.kind === 'attn_v' || role.kind === 'ffn_down') && useMoreBits(role.layer, role.layers);
  return fitting(role.kind === 'output' || more ? 'q6_k' : 'q4_k', shape[0]);
}

/** Where a GGUF export's weights come from: a model folder's safetensors, or a merge computed a tensor at a time. */
export interface ModelTensorSource {
  /** The model folder the tensors are of, for messages. */
  where: string;
  /** Every tensor's Hugging Face shape, by name. */
  shapes: ReadonlyMap<string, readonly number[]>;
  /** A tensor's values in float32: in the start of `into` where it is given (the result is a view of it). */
  read(name: string, into?: Float32Array): Float32Array;
}

/** The tensors of a plain model folder, read from its safetensors files. */
export function folderTensors(modelDir: string): ModelTensorSource {
  const entries = listModelTensors(modelDir);
  return {
    where: modelDir,
    shapes: new Map([...entries].map(([name, e]) => [name, e.shape])),
    read: (name, into) => readTensorF32(entries.get(name)!, undefined, into),
  };
}

function planTensors(source: ModelTensorSource, c: NativeModelConfig, arch: GgufArch, fileType: GgufFileType): PlannedTensor[] {
  const modelDir = source.where;
  const hf = source.shapes;
  const used = new Set<string>();
  const need = (name: string): string => {
    if (!hf.has(name)) throw new Error(`${modelDir}: tensor ${name} is missing`);
    used.add(name);
    return name;
  };
  const planned: PlannedTensor[] = [];
  const add = (ggufName: string, name: string, transform?: (w: Float32Array, into: Float32Array) => Float32Array, role?: TensorRole) => {
    const shape = [...hf.get(name)!].reverse();
    const count = shape.reduce((a, d) => a * d, 1);
    const values = (scratch: TensorScratch) => {
      const read = source.read(name, scratch.read.view(count));
      return transform ? transform(read, scratch.laidOut.view(count)) : read;
    };
    planned.push({ name: ggufName, shape, type: tensorTypeFor(fileType, shape, role), values });
  };
  const role = (kind: TensorRole['kind'], layer = 0): TensorRole => ({ kind, layer, layers: c.numLayers });
  const outputIsEmbedding = c.tieWordEmbeddings || !hf.has('lm_head.weight');

  add('token_embd.weight', need('model.embed_tokens.weight'), undefined, role(outputIsEmbedding ? 'output' : 'token_embd'));
  if (c.ropeScaling === 'llama3') {
    const factors = llama3RopeFactors(c);
    planned.push({ name: 'rope_freqs.weight', shape: [factors.length], type: 'f32', values: () => factors });
  }
  for (let l = 0; l < c.numLayers; l++) {
    const p = `model.layers.${l}`;
    const b = `blk.${l}`;
    add(`${b}.attn_norm.weight`, need(`${p}.input_layernorm.weight`));
    const q = need(`${p}.self_attn.q_proj.weight`);
    const k = need(`${p}.self_attn.k_proj.weight`);
    const cols = c.hiddenSize;
    add(`${b}.attn_q.weight`, q, arch === 'llama' ? (w, into) => permuteForInterleavedRope(w, c.numHeads, cols, into) : undefined);
    add(`${b}.attn_k.weight`, k, arch === 'llama' ? (w, into) => permuteForInterleavedRope(w, c.numKvHeads, cols, into) : undefined);
    add(`${b}.attn_v.weight`, need(`${p}.self_attn.v_proj.weight`), undefined, role('attn_v', l));
    if (c.qkvBias) {
      add(`${b}.attn_q.bias`, need(`${p}.self_attn.q_proj.bias`));
      add(`${b}.attn_k.bias`, need(`${p}.self_attn.k_proj.bias`));
      add(`${b}.attn_v.bias`, need(`${p}.self_attn.v_proj.bias`));
    }
    add(`${b}.attn_output.weight`, need(`${p}.self_attn.o_proj.weight`));
    add(`${b}.ffn_norm.weight`, need(`${p}.post_attention_layernorm.weight`));
    add(`${b}.ffn_gate.weight`, need(`${p}.mlp.gate_proj.weight`));
    add(`${b}.ffn_up.weight`, need(`${p}.mlp.up_proj.weight`));
    add(`${b}.ffn_down.weight`, need(`${p}.mlp.down_proj.weight`), undefined, role('ffn_down', l));
  }
  add('output_norm.weight', need('model.norm.weight'));
  // Tied embeddings: llama.cpp falls back to token_embd when output.weight is absent.
  const head = hf.get('lm_head.weight');
  if (head && !c.tieWordEmbeddings) add('output.weight', need('lm_head.weight'), undefined, role('output'));
  else if (!c.tieWordEmbeddings) throw new Error(`${modelDir}: tensor lm_head.weight is missing (tie_word_embeddings is false)`);
  else if (head) used.add('lm_head.weight');
  // rotary_emb.inv_freq buffers some old checkpoints carry are recomputed by llama.cpp
  const left = [...hf.keys()].filter((n) => !used.has(n) && !n.endsWith('rotary_emb.inv_freq'));
  if (left.length > 0) throw new Error(`${modelDir}: tensor ${left[0]} is not part of a ${c.architecture} the export knows (${left.length} such tensors)`);
  return planned;
}

function architectureMetadata(c: NativeModelConfig, arch: GgufArch, name: string, fileType: GgufFileType): [string, GgufValue][] {
  const a = (key: string) => `${arch}.${key}`;
  const entries: [string, GgufValue][] = [
    ['general.architecture', gguf.str(arch)],
    ['general.type', gguf.str('model')],
    ['general.name', gguf.str(name)],
    ['general.file_type', gguf.u32(LLAMA_FTYPE[fileType])],
    ['general.quantization_version', gguf.u32(2)],
    ['general.alignment', gguf.u32(GGUF_ALIGNMENT)],
    [a('vocab_size'), gguf.u32(c.vocabSize)],
    [a('context_length'), gguf.u32(c.maxPositionEmbeddings)],
    [a('embedding_length'), gguf.u32(c.hiddenSize)],
    [a('block_count'), gguf.u32(c.numLayers)],
    [a('feed_forward_length'), gguf.u32(c.intermediateSize)],
    [a('attention.head_count'), gguf.u32(c.numHeads)],
    [a('attention.head_count_kv'), gguf.u32(c.numKvHeads)],
    [a('attention.layer_norm_rms_epsilon'), gguf.f32(c.rmsNormEps)],
    [a('attention.key_length'), gguf.u32(c.headDim)],
    [a('attention.value_length'), gguf.u32(c.headDim)],
    [a('rope.dimension_count'), gguf.u32(c.headDim)],
    [a('rope.freq_base'), gguf.f32(c.ropeTheta)],
  ];
  if (c.ropeScaling === 'linear') {
    entries.push([a('rope.scaling.type'), gguf.str('linear')], [a('rope.scaling.factor'), gguf.f32(c.ropeScalingFactor)]);
  }
  return entries;
}

export interface ModelGgufOptions {
  modelDir: string;
  out: string;
  fileType: GgufFileType;
  /** general.name; default the folder's name. */
  name: string;
  /** The folder holds a merged finetune (its chat template: exportedChatTemplate). */
  finetuned?: boolean;
  /**
   * The weights, where they are not the folder's own safetensors (a merge computed a tensor at a time, whose folder
   * holds only config.json and the tokenizer).
   */
  tensors?: ModelTensorSource;
  onProgress?(done: number, total: number, bytes: number): void;
}

export interface ModelGgufReport {
  file: string;
  bytes: number;
  tensors: number;
  architecture: GgufArch;
  types: Partial<Record<GgmlTypeName, number>>;
}

/** Writes the GGUF of a plain (not 4-bit) Hugging Face model folder; one tensor in memory at a time. */
export async function writeModelGguf(o: ModelGgufOptions): Promise<ModelGgufReport> {
  const c = readModelConfig(o.modelDir);
  const arch = ARCHITECTURES[c.architecture];
  if (!arch) throw new Error(`${o.modelDir}: architecture ${c.architecture} is not supported for GGUF export (Llama, Mistral and Qwen2 are)`);
  if (c.quantized4bit) throw new Error(`${o.modelDir}: a bnb-4bit model must be dequantized (merged) before GGUF export`);
  const tokenizer = await tokenizerMetadata(o.modelDir, c.vocabSize, o.finetuned ?? false);
  const tensors = planTensors(o.tensors ?? folderTensors(o.modelDir), c, arch, o.fileType);
  const metadata = new Map<string, GgufValue>([...architectureMetadata(c, arch, o.name, o.fileType), ...tokenizer.entries]);
  const scratch = new TensorScratch();
  // f32 is written from the values themselves, with no encoded copy
  const encode = (t: PlannedTensor) =>
    encodeTensor(t.type, t.values(scratch), t.shape, t.type === 'f32' ? undefined : scratch.encoded.view(tensorBytes(t.type, t.shape)));
  const { bytes } = await writeGguf(o.out, metadata, tensors, (i) => encode(tensors[i]), { onProgress: o.onProgress });
  const types: Partial<Record<GgmlTypeName, number>> = {};
  for (const t of tensors) types[t.type] = (types[t.type] ?? 0) + 1;
  return { file: o.out, bytes, tensors: tensors.length, architecture: arch, types };
}
