// make-tiny-model: a tiny random Llama (3-style), Mistral (Llama 2-style SentencePiece vocabulary) or Qwen2 model in
// Hugging Face layout (config.json, model.safetensors in bf16, a real tokenizer.json, tokenizer_config.json with a
// chat template), loadable by transformers. Tests and the demo use it; nothing is downloaded. The same seed gives the same files.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomNormal, writeSafetensors, type TensorToWrite } from '../../engine';
import { writeJsonAtomic } from '../../util/atomicFile';
import { writeFolderAtomic } from '../../util/atomicFolder';
import { buildSentencePieceTokenizer } from './sentencePieceTokenizer';
import { buildTinyTokenizer, type TinyArch, type TinyTokenizer } from './tokenizer';

export type TinySize = 'tiny' | 'kquant' | 'small';

export interface TinyModelOptions {
  out: string;
  arch: TinyArch;
  seed: number;
  /**
   * 'tiny' for tests (~0.2M parameters); 'kquant' for GGUF k-quant tests (every matrix row a whole number of
   * 256-value blocks, ~2M parameters); 'small' for benchmarks (~13M parameters). All share the tokenizer.
   */
  size?: TinySize;
  /**
   * A folder with a real tokenizer.json and tokenizer_config.json to use instead of the tiny tokenizer (tests of
   * vocabularies made elsewhere); the model's vocabulary is sized to it.
   */
  tokenizerFrom?: string;
}

export interface TinyModelSummary {
  dir: string;
  arch: TinyArch;
  parameters: number;
  vocabSize: number;
  files: string[];
}

// Small but not degenerate: GQA (query heads over half as many kv heads), an intermediate size that is not a
// multiple of the hidden size.
interface Shape {
  hidden: number;
  intermediate: number;
  layers: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  maxPositions: number;
}
const SHAPES: Record<TinySize, Shape> = {
  tiny: { hidden: 64, intermediate: 176, layers: 2, heads: 4, kvHeads: 2, headDim: 16, maxPositions: 2048 },
  kquant: { hidden: 256, intermediate: 768, layers: 2, heads: 4, kvHeads: 2, headDim: 64, maxPositions: 2048 },
  small: { hidden: 512, intermediate: 1408, layers: 4, heads: 8, kvHeads: 4, headDim: 64, maxPositions: 2048 },
};
const INIT_STD = 0.02; // transformers' initializer_range, recorded in config.json and used for the biases
// Linear weights are drawn with std 1/sqrt(fan_in) and the embeddings (also the LM head, tied or not) with
// 1/sqrt(hidden), so that a random tiny model passes signals through its layers at unit scale and its LM head can
// express confident predictions: a finetune on it then shows a clearly falling loss within a few dozen steps.
const fanInStd = (fanIn: number) => 1 / Math.sqrt(fanIn);

export function tinyModelConfig(arch: TinyArch, shape: Shape, vocabSize: number, bos: number | null, eos: number, pad: number): Record<string, unknown> {
  const common = {
    vocab_size: vocabSize,
    hidden_size: shape.hidden,
    intermediate_size: shape.intermediate,
    num_hidden_layers: shape.layers,
    num_attention_heads: shape.heads,
    num_key_value_heads: shape.kvHeads,
    hidden_act: 'silu',
    max_position_embeddings: shape.maxPositions,
    initializer_range: INIT_STD,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    rope_scaling: null,
    attention_dropout: 0.0,
    use_cache: true,
    bos_token_id: bos,
    eos_token_id: eos,
    pad_token_id: pad,
    torch_dtype: 'bfloat16',
  };
  if (arch === 'mistral') {
    // Mistral v0.2 and later: no sliding window (v0.1's 4096 would only limit sequence lengths here).
    return {
      architectures: ['MistralForCausalLM'],
      model_type: 'mistral',
      ...common,
      head_dim: shape.headDim,
      sliding_window: null,
      tie_word_embeddings: false,
    };
  }
  if (arch === 'llama') {
    return {
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      ...common,
      head_dim: shape.headDim,
      attention_bias: false,
      mlp_bias: false,
      pretraining_tp: 1,
      tie_word_embeddings: false,
    };
  }
  // Qwen2 omits head_dim (hidden / heads), has q/k/v biases and ties the embeddings, as the small Qwen2.5 do.
  return {
    architectures: ['Qwen2ForCausalLM'],
    model_type: 'qwen2',
    ...common,
    tie_word_embeddings: true,
    use_sliding_window: false,
    sliding_window: null,
    max_window_layers: shape.layers,
  };
}

function tinyTensors(arch: TinyArch, shape: Shape, vocabSize: number, seed: number): TensorToWrite[] {
  const tensors: TensorToWrite[] = [];
  let stream = 0;
  const normal = (name: string, shape: number[], std: number) => {
    const n = shape.reduce((a, b) => a * b, 1);
    // Each tensor draws from its own seed so that adding a tensor never changes the others.
    const data = randomNormal(seed * 1000 + ++stream, n);
    for (let i = 0; i < n; i++) data[i] *= std;
    tensors.push({ name, dtype: 'BF16', shape, data });
  };
  const ones = (name: string, n: number) => tensors.push({ name, dtype: 'BF16', shape: [n], data: new Float32Array(n).fill(1) });
  const { hidden, intermediate, heads, kvHeads, headDim } = shape;
  const qOut = heads * headDim;
  const kvOut = kvHeads * headDim;
  normal('model.embed_tokens.weight', [vocabSize, hidden], fanInStd(hidden));
  for (let l = 0; l < shape.layers; l++) {
    const p = `model.layers.${l}.`;
    ones(p + 'input_layernorm.weight', hidden);
    ones(p + 'post_attention_layernorm.weight', hidden);
    normal(p + 'self_attn.q_proj.weight', [qOut, hidden], fanInStd(hidden));
    normal(p + 'self_attn.k_proj.weight', [kvOut, hidden], fanInStd(hidden));
    normal(p + 'self_attn.v_proj.weight', [kvOut, hidden], fanInStd(hidden));
    if (arch === 'qwen2') {
      normal(p + 'self_attn.q_proj.bias', [qOut], INIT_STD);
      normal(p + 'self_attn.k_proj.bias', [kvOut], INIT_STD);
      normal(p + 'self_attn.v_proj.bias', [kvOut], INIT_STD);
    }
    normal(p + 'self_attn.o_proj.weight', [hidden, qOut], fanInStd(qOut));
    normal(p + 'mlp.gate_proj.weight', [intermediate, hidden], fanInStd(hidden));
    normal(p + 'mlp.up_proj.weight', [intermediate, hidden], fanInStd(hidden));
    normal(p + 'mlp.down_proj.weight', [hidden, intermediate], fanInStd(intermediate));
  }
  ones('model.norm.weight', hidden);
  if (arch !== 'qwen2') normal('lm_head.weight', [vocabSize, hidden], fanInStd(hidden));
  return tensors;
}

/** The tokenizer files of a tiny model of this architecture. */
export function tinyTokenizerFor(arch: TinyArch): TinyTokenizer {
  return arch === 'mistral' ? buildSentencePieceTokenizer() : buildTinyTokenizer(arch);
}

/** A tokenizer copied from `dir`: its files as they are, with the ids the config needs. */
function tokenizerFromFolder(dir: string): TinyTokenizer {
  const read = (name: string) => JSON.parse(fs.readFileSync(path.join(dir, name), 'utf8')) as Record<string, unknown>;
  const tokenizerJson = read('tokenizer.json');
  const tokenizerConfig = read('tokenizer_config.json');
  const model = tokenizerJson.model as { vocab: Record<string, number> };
  const added = (tokenizerJson.added_tokens ?? []) as { id: number; content: string }[];
  const idOf = new Map<string, number>([...Object.entries(model.vocab), ...added.map((a) => [a.content, a.id] as [string, number])]);
  const ids = [...idOf.values()];
  const vocabSize = ids.reduce((m, i) => Math.max(m, i), 0) + 1; // no spread: 128k arguments overflow the stack
  const tokenText = (v: unknown) => (typeof v === 'string' ? v : (v as { content?: string } | null)?.content);
  const id = (key: string): number | null => {
    const text = tokenText(tokenizerConfig[key]);
    return text === undefined ? null : idOf.get(text) ?? null;
  };
  const eos = id('eos_token');
  if (eos === null) throw new Error(`${dir}: tokenizer_config.json names no eos_token of the vocabulary`);
  return {
    tokenizerJson,
    tokenizerConfig,
    specialTokensMap: {},
    vocabSize,
    bosTokenId: id('bos_token'),
    eosTokenId: eos,
    eosTokenIds: [eos],
    padTokenId: id('pad_token') ?? eos,
  };
}

export function makeTinyModel(options: TinyModelOptions): TinyModelSummary {
  const { out, arch, seed } = options;
  const tok = options.tokenizerFrom ? tokenizerFromFolder(options.tokenizerFrom) : tinyTokenizerFor(arch);
  const shape = SHAPES[options.size ?? 'tiny'];
  const config = tinyModelConfig(arch, shape, tok.vocabSize, tok.bosTokenId, tok.eosTokenId, tok.padTokenId);
  const tensors = tinyTensors(arch, shape, tok.vocabSize, seed);
  // a whole model or none, and never mixed into a folder that holds other files (another model's shards)
  writeFolderAtomic(out, (dir) => {
    writeSafetensors(path.join(dir, 'model.safetensors'), tensors, { format: 'pt' });
    writeJsonAtomic(path.join(dir, 'config.json'), config);
    writeJsonAtomic(path.join(dir, 'generation_config.json'), {
      bos_token_id: tok.bosTokenId,
      eos_token_id: tok.eosTokenIds,
      pad_token_id: tok.padTokenId,
    });
    writeJsonAtomic(path.join(dir, 'tokenizer.json'), tok.tokenizerJson);
    writeJsonAtomic(path.join(dir, 'tokenizer_config.json'), tok.tokenizerConfig);
    writeJsonAtomic(path.join(dir, 'special_tokens_map.json'), tok.specialTokensMap);
  });
  return {
    dir: out,
    arch,
    parameters: tensors.reduce((sum, t) => sum + t.data.length, 0),
    vocabSize: tok.vocabSize,
    files: ['config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'],
  };
}
