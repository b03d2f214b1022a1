// A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) as a GGUF LoRA that llama.cpp applies to a
// GGUF of its base with --lora, laid out as llama.cpp's convert_lora_to_gguf.py writes it and as its loader
// (src/llama-adapter.cpp, llama_adapter_lora_init_impl) checks it:
// - metadata general.type = "adapter", adapter.type = "lora", adapter.lora.alpha (f32), and general.architecture
//   equal to the base GGUF's (a mismatch is refused at load);
// - tensors `<base GGUF tensor name>.lora_a` / `.lora_b`, PEFT's A [r, in] and B [out, r] as they are: GGUF shapes
//   [in, r] and [r, out], so lora_a.ne[0] is the base's ne[0], lora_b.ne[1] the base's ne[1], lora_a.ne[1] = lora_b.ne[0];
// - llama.cpp adds scale · alpha / rank · B·A·x with rank = lora_b.ne[0] (llama-adapter.h, get_scale), which is
//   PEFT's alpha / r; with alpha 0 it adds B·A·x unscaled;
// - for llama-architecture models q_proj/k_proj rows are permuted for the interleaved rope; a LoRA's rows are B's,
//   so B is permuted the same way (A is untouched); Qwen2 (NeoX rope) is not permuted.
// rsLoRA (scale alpha / sqrt(r)) is written with alpha' = alpha · sqrt(r), so that alpha' / r = alpha / sqrt(r).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readModelConfig } from '../../engine';
import type { NativeModelConfig } from '../../engine/native';
import { encodeTensor } from './encode';
import { ARCHITECTURES, permuteForInterleavedRope, type GgufArch, type ModelGgufReport } from './llamaGguf';
import { readSafetensorsHeader, readTensorF32, type TensorEntry } from './safetensorsReader';
import { LLAMA_FTYPE, type GgmlTypeName } from './types';
import { GGUF_ALIGNMENT, gguf, writeGguf, type GgufTensorSpec, type GgufValue } from './writer';

/** The types convert_lora_to_gguf.py's --outtype offers that llama.cpp applies without requantizing. */
export type LoraGgufType = 'f32' | 'f16' | 'bf16';
export const LORA_GGUF_TYPES: readonly LoraGgufType[] = ['f32', 'f16', 'bf16'];

// As llamaGguf.ts maps them (the LoRA's architecture must be the base GGUF's).

const MODULES = {
  q_proj: { parent: 'self_attn', gguf: 'attn_q' },
  k_proj: { parent: 'self_attn', gguf: 'attn_k' },
  v_proj: { parent: 'self_attn', gguf: 'attn_v' },
  o_proj: { parent: 'self_attn', gguf: 'attn_output' },
  gate_proj: { parent: 'mlp', gguf: 'ffn_gate' },
  up_proj: { parent: 'mlp', gguf: 'ffn_up' },
  down_proj: { parent: 'mlp', gguf: 'ffn_down' },
} as const;
type ModuleName = keyof typeof MODULES;

/** [out, in] of a module's base weight. */
function moduleShape(c: NativeModelConfig, m: ModuleName): [number, number] {
  const q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim;
  switch (m) {
    case 'q_proj': return [q, c.hiddenSize];
    case 'k_proj': case 'v_proj': return [kv, c.hiddenSize];
    case 'o_proj': return [c.hiddenSize, q];
    case 'gate_proj': case 'up_proj': return [c.intermediateSize, c.hiddenSize];
    case 'down_proj': return [c.hiddenSize, c.intermediateSize];
  }
}

const PEFT_NAME = /^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight$/;

/** What a GGUF LoRA cannot represent: llama.cpp adds only alpha / rank · B·A to the linear weights. */
function unrepresentable(dir: string, what: string): Error {
  return new Error(`${dir}: ${what} cannot be written as a GGUF LoRA, which llama.cpp applies only as alpha/r · B·A on linear weights; a merged export (export-gguf without --lora-only) is the way to carry it`);
}

function checkConfig(dir: string, cfg: Record<string, unknown>, layers: number): void {
  const refuse = (what: string): never => {
    throw unrepresentable(dir, what);
  };
  const nonEmpty = (v: unknown) => v !== undefined && v !== null && !(Array.isArray(v) && v.length === 0) && !(typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length === 0);
  if (cfg.peft_type !== undefined && cfg.peft_type !== 'LORA') throw new Error(`${dir}: peft_type ${String(cfg.peft_type)} is not a LoRA adapter`);
  if (cfg.use_dora === true) refuse('a DoRA adapter (use_dora: its magnitude vectors)');
  if (cfg.bias !== undefined && cfg.bias !== null && cfg.bias !== 'none') refuse(`bias "${String(cfg.bias)}" (trained biases)`);
  if (cfg.lora_bias === true) refuse('lora_bias (a bias on lora_B)');
  if (nonEmpty(cfg.modules_to_save)) refuse(`modules_to_save (${JSON.stringify(cfg.modules_to_save)}: whole replaced modules)`);
  if (nonEmpty(cfg.trainable_token_indices)) refuse('trainable_token_indices (trained embedding rows)');
  if (nonEmpty(cfg.layer_replication)) refuse('layer_replication (duplicated layers)');
  if (nonEmpty(cfg.alora_invocation_tokens)) refuse('an activated LoRA (alora_invocation_tokens)');
  if (cfg.use_qalora === true) refuse('a QA-LoRA adapter (use_qalora)');
  // Representable in principle (llama.cpp takes each tensor's own rank, an alpha can be folded into B, absent layers
  // are left alone), but the engine loads none of them, so neither this export nor a merged one could be checked.
  const unsupported = (what: string): never => {
    throw new Error(`${dir}: ${what} is not supported: the engine cannot load such an adapter to check the export`);
  };
  if (nonEmpty(cfg.rank_pattern)) unsupported('a per-module rank_pattern');
  if (nonEmpty(cfg.alpha_pattern)) unsupported('a per-module alpha_pattern');
  const lt = cfg.layers_to_transform;
  const all = Array.from({ length: layers }, (_, i) => i);
  if (nonEmpty(lt) && !(Array.isArray(lt) && all.every((l) => lt.includes(l)))) unsupported(`layers_to_transform ${JSON.stringify(lt)} (a subset of the layers)`);
  const targets = typeof cfg.target_modules === 'string' ? [cfg.target_modules] : Array.isArray(cfg.target_modules) ? (cfg.target_modules as unknown[]) : [];
  if (targets.some((t) => typeof t === 'string' && /(^|\W)(embed_tokens|lm_head)(\W|$)/.test(t))) refuse('a LoRA on embed_tokens or lm_head');
}

/** One tensor of the GGUF LoRA. */
interface PlannedLoraTensor extends GgufTensorSpec {
  values(): Float32Array;
}

export interface LoraGgufOptions {
  adapterDir: string;
  /** The base model folder (plain or bnb-4bit): its architecture and shapes. */
  baseModelDir: string;
  out: string;
  type: LoraGgufType;
  /** general.name. */
  name: string;
  onProgress?(done: number, total: number, bytes: number): void;
}

export interface LoraGgufPlan {
  architecture: GgufArch;
  /** adapter.lora.alpha as written (rsLoRA's alpha · sqrt(r)). */
  alpha: number;
  rank: number;
  rsLora: boolean;
  tensors: PlannedLoraTensor[];
}

export interface LoraGgufReport extends ModelGgufReport {
  alpha: number;
  rank: number;
  rsLora: boolean;
}

/** Checks the adapter against its base and lays out the GGUF LoRA; reads no tensor data. Throws what it refuses. */
export function planLoraGguf(o: Pick<LoraGgufOptions, 'adapterDir' | 'baseModelDir' | 'type'>): LoraGgufPlan {
  if (!LORA_GGUF_TYPES.includes(o.type)) throw new Error(`a GGUF LoRA is written in ${LORA_GGUF_TYPES.join(', ')}, not ${String(o.type)}`);
  const c = readModelConfig(o.baseModelDir);
  const architecture = ARCHITECTURES[c.architecture];
  if (!architecture) throw new Error(`${o.baseModelDir}: architecture ${c.architecture} is not supported for GGUF export (Llama, Mistral and Qwen2 are)`);
  const configFile = path.join(o.adapterDir, 'adapter_config.json');
  if (!fs.existsSync(configFile)) throw new Error(`${o.adapterDir}: no adapter_config.json (is this a PEFT adapter folder?)`);
  const cfg = JSON.parse(fs.readFileSync(configFile, 'utf8')) as Record<string, unknown>;
  checkConfig(o.adapterDir, cfg, c.numLayers);
  const rank = cfg.r, alphaIn = cfg.lora_alpha;
  if (!(typeof rank === 'number' && Number.isInteger(rank) && rank > 0)) throw new Error(`${configFile}: r must be a positive integer, got ${JSON.stringify(rank)}`);
  if (!(typeof alphaIn === 'number' && Number.isFinite(alphaIn))) throw new Error(`${configFile}: lora_alpha must be a number, got ${JSON.stringify(alphaIn)}`);
  // llama.cpp reads adapter.lora.alpha 0 as "no alpha: scale 1", where PEFT's alpha 0 is a zero update.
  if (alphaIn === 0) throw new Error(`${configFile}: lora_alpha 0 makes the adapter do nothing, and llama.cpp would read it as unscaled`);
  const rsLora = cfg.use_rslora === true;
  const alpha = rsLora ? alphaIn * Math.sqrt(rank) : alphaIn;

  const file = path.join(o.adapterDir, 'adapter_model.safetensors');
  if (!fs.existsSync(file)) throw new Error(`${o.adapterDir}: no adapter_model.safetensors`);
  const pairs = new Map<string, { layer: number; module: ModuleName; A?: TensorEntry; B?: TensorEntry }>();
  for (const e of readSafetensorsHeader(file)) {
    const m = PEFT_NAME.exec(e.name);
    const module = m?.[3] as ModuleName | undefined;
    if (!m || module === undefined || !(module in MODULES) || MODULES[module].parent !== m[2]) {
      // what the tensors show even when adapter_config.json does not say it
      if (e.name.includes('modules_to_save')) throw unrepresentable(o.adapterDir, `modules_to_save (tensor ${e.name})`);
      if (/embed_tokens|lm_head|lora_embedding/.test(e.name)) throw unrepresentable(o.adapterDir, `a LoRA on embed_tokens or lm_head (tensor ${e.name})`);
      if (e.name.includes('lora_magnitude_vector')) throw unrepresentable(o.adapterDir, `a DoRA adapter (tensor ${e.name})`);
      if (e.name.endsWith('.bias')) throw unrepresentable(o.adapterDir, `a trained bias (tensor ${e.name})`);
      throw new Error(`${file}: tensor ${e.name} is not a LoRA A or B of q/k/v/o/gate/up/down_proj, which is all a GGUF LoRA of a ${c.architecture} holds`);
    }
    const layer = Number(m[1]);
    if (layer >= c.numLayers) throw new Error(`${file}: tensor ${e.name} is for layer ${layer}, but ${o.baseModelDir} has ${c.numLayers} layers: the adapter was made for another base model`);
    if (!['F32', 'F16', 'BF16'].includes(e.dtype) || e.shape.length !== 2) throw new Error(`${file}: tensor ${e.name} is ${e.dtype} [${e.shape.join(', ')}], not a floating matrix`);
    const key = `${layer}.${module}`;
    const pair = pairs.get(key) ?? { layer, module };
    pair[m[4] as 'A' | 'B'] = e;
    pairs.set(key, pair);
  }
  if (pairs.size === 0) throw new Error(`${file}: the adapter has no LoRA tensors`);

  const order = Object.keys(MODULES) as ModuleName[];
  const sorted = [...pairs.values()].sort((a, b) => a.layer - b.layer || order.indexOf(a.module) - order.indexOf(b.module));
  const tensors: PlannedLoraTensor[] = [];
  for (const { layer, module, A, B } of sorted) {
    const peft = (w: 'A' | 'B') => `base_model.model.model.layers.${layer}.${MODULES[module].parent}.${module}.lora_${w}.weight`;
    if (!A || !B) throw new Error(`${file}: ${peft(A ? 'B' : 'A')} is missing (every LoRA A needs its B)`);
    const [out, inp] = moduleShape(c, module);
    const another = `: the adapter was made for another base model`;
    if (A.shape[1] !== inp) throw new Error(`${file}: tensor ${A.name} has shape [${A.shape.join(', ')}], but ${module} of ${o.baseModelDir} takes ${inp} inputs${another}`);
    if (B.shape[0] !== out) throw new Error(`${file}: tensor ${B.name} has shape [${B.shape.join(', ')}], but ${module} of ${o.baseModelDir} has ${out} outputs${another}`);
    // llama.cpp takes the rank from each tensor, PEFT from r: they must agree for the scale to be the same.
    if (A.shape[0] !== rank || B.shape[1] !== rank) throw new Error(`${file}: ${A.name} and ${B.name} have rank ${A.shape[0]} and ${B.shape[1]}, but adapter_config.json says r = ${rank}`);
    const name = `blk.${layer}.${MODULES[module].gguf}.weight`;
    const heads = module === 'q_proj' ? c.numHeads : module === 'k_proj' ? c.numKvHeads : 0;
    const permute = architecture === 'llama' && heads > 0;
    tensors.push({ name: `${name}.lora_a`, shape: [inp, rank], type: o.type, values: () => readTensorF32(A) });
    tensors.push({
      name: `${name}.lora_b`, shape: [rank, out], type: o.type,
      values: () => (permute ? permuteForInterleavedRope(readTensorF32(B), heads, rank) : readTensorF32(B)),
    });
  }
  return { architecture, alpha, rank, rsLora, tensors };
}

/** Writes the GGUF LoRA of a PEFT adapter (temporary file, renamed when complete); one tensor in memory at a time. */
export async function writeLoraGguf(o: LoraGgufOptions): Promise<LoraGgufReport> {
  const plan = planLoraGguf(o);
  const metadata = new Map<string, GgufValue>([
    ['general.architecture', gguf.str(plan.architecture)],
    ['general.type', gguf.str('adapter')],
    ['general.name', gguf.str(o.name)],
    ['general.file_type', gguf.u32(LLAMA_FTYPE[o.type])],
    ['general.quantization_version', gguf.u32(2)],
    ['general.alignment', gguf.u32(GGUF_ALIGNMENT)],
    ['adapter.type', gguf.str('lora')],
    ['adapter.lora.alpha', gguf.f32(plan.alpha)],
  ]);
  const t = plan.tensors;
  const { bytes } = await writeGguf(o.out, metadata, t, (i) => encodeTensor(t[i].type, t[i].values(), t[i].shape), { onProgress: o.onProgress });
  const types: Partial<Record<GgmlTypeName, number>> = { [o.type]: t.length };
  return { file: o.out, bytes, tensors: t.length, architecture: plan.architecture, types, alpha: plan.alpha, rank: plan.rank, rsLora: plan.rsLora };
}
