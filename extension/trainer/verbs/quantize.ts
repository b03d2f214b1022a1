// quantize: writes a model as a bnb-4bit checkpoint (NF4, blocks of 64, double quantization by default) that
// transformers loads as it loads any *-bnb-4bit model: model.safetensors in bitsandbytes' layout, config.json with
// quantization_config, and the model's other files (tokenizer, generation config) copied as they are.
import * as path from 'node:path';
import { copyModelSideFiles } from '../modelFiles';
import { quantizeModel, readModelConfig, type QuantizeDtype, type QuantizeReport } from '../../engine';
import { writeJsonAtomic } from '../../util/atomicFile';
import { writeFolderAtomic } from '../../util/atomicFolder';
import { readJsonFile } from '../../util/jsonFile';

export interface QuantizeOptions {
  model: string;
  out: string;
  doubleQuant: boolean;
  /** Cast the model to this dtype first (transformers' torch_dtype); default: as stored. */
  dtype?: QuantizeDtype;
}

/** What quantize wrote, and the links in the model folder leading outside it that were not followed (a sentence each). */
export type QuantizeResult = QuantizeReport & { out: string; notCopied: string[] };

export function quantize(options: QuantizeOptions): QuantizeResult {
  const { model, out, doubleQuant, dtype } = options;
  if (path.resolve(model) === path.resolve(out)) throw new Error('--out must be a different folder from --model');
  const configPath = path.join(model, 'config.json');
  const config = readModelConfig(model); // validates the architecture before any work
  if (config.quantized4bit) throw new Error(`${model} is already a bnb-4bit checkpoint`);
  const rawConfig = readJsonFile(configPath) as Record<string, unknown>;
  // the whole checkpoint or nothing, and never mixed into a folder holding another model's files (its shards would
  // stay beside the new model.safetensors, and its index would still point at them)
  return writeFolderAtomic(out, (tmp) => ({ ...writeQuantized(model, tmp, rawConfig, config.dtype, doubleQuant, dtype), out }));
}

function writeQuantized(model: string, out: string, rawConfig: Record<string, unknown>, storedDtype: string, doubleQuant: boolean, dtype: QuantizeDtype | undefined): QuantizeReport & { notCopied: string[] } {
  const report = quantizeModel(model, path.join(out, 'model.safetensors'), doubleQuant, dtype);
  const { notCopied } = copyModelSideFiles(model, out);
  const modelDtype = dtype ?? storedDtype;
  const computeDtype = modelDtype === 'float32' || modelDtype === 'float16' ? modelDtype : 'bfloat16';
  if (dtype) {
    // Record the cast in whichever key the config uses (transformers 5: dtype; older: torch_dtype).
    if ('torch_dtype' in rawConfig && !('dtype' in rawConfig)) rawConfig.torch_dtype = dtype;
    else rawConfig.dtype = dtype;
  }
  rawConfig.quantization_config = {
    quant_method: 'bitsandbytes',
    load_in_4bit: true,
    load_in_8bit: false,
    bnb_4bit_quant_type: 'nf4',
    bnb_4bit_use_double_quant: doubleQuant,
    bnb_4bit_compute_dtype: computeDtype,
    bnb_4bit_quant_storage: 'uint8',
    llm_int8_threshold: 6.0,
    llm_int8_skip_modules: null,
    llm_int8_enable_fp32_cpu_offload: false,
    llm_int8_has_fp16_weight: false,
    _load_in_4bit: true,
    _load_in_8bit: false,
  };
  writeJsonAtomic(path.join(out, 'config.json'), rawConfig);
  return { ...report, notCopied };
}
