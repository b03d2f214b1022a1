// export-gguf: a run's merged model (base + adapter), or a base model alone, as one GGUF file for llama.cpp,
// Ollama and LM Studio. With an adapter (or a bnb-4bit base), the merged model's weights are computed in float32 a
// tensor at a time as the GGUF is written, and its config.json and tokenizer go to a small temporary folder beside the
// output, removed afterwards; the GGUF itself is written under a temporary name and renamed.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { readModelConfig } from '../engine';
import { MergedWeights } from '../engine/tools';
import { mergedChatTemplate, writeMergedSideFiles } from '../trainer/verbs/merge';
import { removeStaleTemps } from '../util/staleTemp';
import { runAdapterDir, runModelDir } from '../trainer/verbs/export';
import { writeModelGguf, type ModelGgufReport, type ModelTensorSource } from './gguf/llamaGguf';
import { LORA_GGUF_TYPES, planLoraGguf, writeLoraGguf, type LoraGgufType } from './gguf/loraGguf';
import type { GgufFileType } from './gguf/types';
import { verifyGguf, verifyGgufInChild, type VerifyReport } from './verifyGguf';

export const GGUF_FILE_TYPES: readonly GgufFileType[] = ['f32', 'f16', 'bf16', 'q8_0', 'q4_k_m'];

export interface ExportGgufOptions {
  /** A run folder: its base model and adapter (final, or `checkpoint`'s). */
  run?: string;
  checkpoint?: number;
  /** Or a model folder, with an optional PEFT adapter. */
  model?: string;
  adapter?: string;
  out: string;
  type: GgufFileType;
  /**
   * Write the adapter alone as a GGUF LoRA (llama.cpp's --lora, type f32, f16 or bf16) instead of the merged model.
   * The check then applies it in llama.cpp to a temporary f16 GGUF of the base.
   */
  loraOnly?: boolean;
  /** Check the file with llama.cpp against the engine (default true). */
  verify?: boolean;
  /** Run the check in a child process of this CLI (so a llama.cpp abort cannot take this process down). */
  cli?: { execPath: string; cliPath: string };
  /** 'base': the temporary GGUF of the base a --lora-only check applies the LoRA to. */
  onProgress?(phase: 'merge' | 'base' | 'write' | 'verify', done: number, total: number): void;
}

export interface ExportGgufReport extends ModelGgufReport {
  model: string;
  adapter: string | null;
  type: GgufFileType;
  /** llama.cpp's check of the written file; null when skipped. */
  verification: VerifyReport | null;
}

export async function exportGguf(o: ExportGgufOptions): Promise<ExportGgufReport> {
  if (o.run === undefined && o.model === undefined) throw new Error('export-gguf needs --run or --model');
  if (o.run !== undefined && (o.model !== undefined || o.adapter !== undefined)) throw new Error('--run takes its model and adapter from the run; leave out --model and --adapter');
  if (o.run === undefined && o.checkpoint !== undefined) throw new Error(`--checkpoint ${o.checkpoint} picks a checkpoint of a run: it needs --run`);
  const model = o.run !== undefined ? runModelDir(o.run) : o.model!;
  const adapter = o.run !== undefined ? runAdapterDir(o.run, o.checkpoint) : (o.adapter ?? null);
  if (!o.out.toLowerCase().endsWith('.gguf')) throw new Error(`--out must name a .gguf file, got ${o.out}`);
  if (fs.existsSync(o.out) && fs.statSync(o.out).isDirectory()) throw new Error(`--out ${o.out} is a folder; name the .gguf file to write`);
  const config = readModelConfig(model); // the architecture and files are checked before any work
  if (o.loraOnly) return exportLoraGguf(o, model, adapter, config.quantized4bit);
  if (config.quantized4bit && adapter === null) {
    throw new Error(`${model} is a bnb-4bit model: export the original (unquantized) model, or a run's merged model`);
  }
  const name = path.basename(o.run ?? model);

  let source = model;
  let tmp: string | null = null;
  let merged: MergedWeights | null = null;
  try {
    if (adapter !== null) {
      // The merged model's config.json and tokenizer in a small temporary folder; its weights merged in float32 (so
      // that the GGUF's own rounding is the only one) a tensor at a time as the GGUF is written, never on disk.
      removeStaleTemps(o.out, 'merge-tmp');
      tmp = `${o.out}.merge-tmp-${process.pid}`;
      fs.rmSync(tmp, { recursive: true, force: true });
      o.onProgress?.('merge', 0, 1);
      merged = MergedWeights.open(model, adapter);
      fs.mkdirSync(tmp, { recursive: true }); // the output's folder too, as the GGUF writer makes it
      writeMergedSideFiles(model, adapter, tmp, 'float32', await mergedChatTemplate(model, adapter));
      o.onProgress?.('merge', 1, 1);
      source = tmp;
    }
    const tensors = merged === null ? undefined : mergedTensors(merged, model);
    const report = await writeModelGguf({ modelDir: source, tensors, out: o.out, fileType: o.type, name, finetuned: adapter !== null, onProgress: (done, total) => o.onProgress?.('write', done, total) });
    // the base model unmapped and the adapter freed before the check loads the model again
    merged?.close();
    merged = null;
    let verification: VerifyReport | null = null;
    if (o.verify !== false) {
      o.onProgress?.('verify', 0, 1);
      const v = { gguf: o.out, type: o.type, model, adapter, run: o.run ?? null };
      verification = o.cli ? await verifyGgufInChild(v, o.cli) : await verifyGguf(v);
      o.onProgress?.('verify', 1, 1);
    }
    return { ...report, model, adapter, type: o.type, verification };
  } finally {
    merged?.close();
    if (tmp !== null) fs.rmSync(tmp, { recursive: true, force: true });
  }
}

function mergedTensors(merged: MergedWeights, model: string): ModelTensorSource {
  return { where: model, shapes: new Map(merged.tensors().map((t) => [t.name, t.shape])), read: (name, into) => merged.values(name, into) };
}

/** export-gguf --lora-only: the adapter as a GGUF LoRA, checked in llama.cpp on a temporary GGUF of its base. */
async function exportLoraGguf(o: ExportGgufOptions, model: string, adapter: string | null, base4bit: boolean): Promise<ExportGgufReport> {
  if (adapter === null) throw new Error('--lora-only writes an adapter: give --run, or --model with --adapter');
  if (!(LORA_GGUF_TYPES as readonly string[]).includes(o.type)) throw new Error(`a GGUF LoRA is written in ${LORA_GGUF_TYPES.join(', ')}, not ${o.type}`);
  const type = o.type as LoraGgufType;
  const verify = o.verify !== false;
  if (base4bit && verify) {
    throw new Error(`${model} is a bnb-4bit model: the check applies the LoRA to a GGUF of the unquantized base; give the original model with --model and --adapter, or pass --no-verify`);
  }
  planLoraGguf({ adapterDir: adapter, baseModelDir: model, type }); // what it refuses, before any file is written
  const name = path.basename(o.run ?? adapter);
  removeStaleTemps(o.out, 'base-tmp'); // the base GGUF of a killed export, and its writer's temporary
  const base = `${o.out}.base-tmp-${process.pid}.gguf`;
  try {
    // the base first: what stops its GGUF (a missing tokenizer.json, say) stops the export before the LoRA is written
    if (verify) {
      o.onProgress?.('base', 0, 1);
      await writeModelGguf({ modelDir: model, out: base, fileType: 'f16', name: path.basename(model) });
      o.onProgress?.('base', 1, 1);
    }
    const report = await writeLoraGguf({ adapterDir: adapter, baseModelDir: model, out: o.out, type, name, onProgress: (done, total) => o.onProgress?.('write', done, total) });
    let verification: VerifyReport | null = null;
    if (verify) {
      o.onProgress?.('verify', 0, 1);
      const v = { gguf: base, lora: o.out, type: o.type, model, adapter, run: o.run ?? null };
      verification = o.cli ? await verifyGgufInChild(v, o.cli) : await verifyGguf(v);
      o.onProgress?.('verify', 1, 1);
    }
    return { ...report, model, adapter, type: o.type, verification };
  } finally {
    fs.rmSync(base, { force: true });
  }
}
