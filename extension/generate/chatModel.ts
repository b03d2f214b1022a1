// A model loaded for chatting: the engine model (base, with a run's or a folder's adapter when given), its
// tokenizer and chat template, the tokens that end an answer, and the model's own sampling defaults. One loaded
// model serves both the base answers (adapter scale 0) and the finetuned ones.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadModelTokenizer, renderGenerationPrompt, templateEndOfTurn, type ChatMessage, type ModelTokenizer } from '../data';
import { EngineModel, engineInfo, readModelConfig, type GenerationSession } from '../engine';
import { cpuDevice } from '../engine/device';
import { engineOptions, placeRun, type PlacementOptions } from '../trainer/placement';
import { runAdapterDir, runModelDir } from '../trainer/verbs/export';
import { generate, type GenerateOptions, type GenerateResult } from './generate';
import { DEFAULT_SAMPLING, type SamplingOptions } from './sampling';
import { readJsonFile } from '../util/jsonFile';

export interface ChatModelSource {
  /** A base model folder (with `adapter`, or alone); or give `run`. */
  model?: string;
  adapter?: string;
  /** A run folder: its base model, loaded as it trained (NF4 when it trained with QLoRA), and its adapter. */
  run?: string;
  /** With `run`: a checkpoint step's adapter instead of the final one (or the newest checkpoint's). */
  checkpoint?: number;
  /** Store the base's linear weights as NF4, as QLoRA training does (default: as the run trained; else false). */
  quantize?: boolean;
}

export interface ChatModel {
  engine: EngineModel;
  tok: ModelTokenizer;
  modelDir: string;
  /** The adapter folder loaded, or null (base model only). */
  adapterDir: string | null;
  stopTokenIds: number[];
  /** config.json's max_position_embeddings (0: not given). */
  contextLength: number;
  /** generation_config.json's sampling settings over our defaults. */
  defaultSampling: SamplingOptions;
  /** Where it computes, in words ("GPU <name> (bf16)", "CPU <model> (N threads)"). */
  device: string;
  /** Why it is on the CPU when the GPU was wanted, else null. */
  deviceNote: string | null;
  dispose(): void;
}

/**
 * Loads what `source` names, where `placement` says (default: the CPU). With --device auto, a model that does not
 * load on the GPU (no room beside a training run, say) is loaded on the CPU instead, and deviceNote says why.
 * Errors name the folder and what is wrong.
 */
export async function loadChatModel(source: ChatModelSource, placement: PlacementOptions = { device: 'cpu' }): Promise<ChatModel> {
  if (source.run === undefined && source.model === undefined) throw new Error('give a model folder (--model) or a run (--run)');
  if (source.run !== undefined && (source.model !== undefined || source.adapter !== undefined)) {
    throw new Error('a run names its own model and adapter: give --run alone, or --model with --adapter');
  }
  if (source.checkpoint !== undefined && source.run === undefined) throw new Error('--checkpoint picks one of a run\'s checkpoints: it needs --run');
  const modelDir = source.run !== undefined ? runModelDir(source.run) : source.model!;
  const adapterDir = source.run !== undefined ? runAdapterDir(source.run, source.checkpoint) : (source.adapter ?? null);
  const quantize = source.quantize ?? (source.run !== undefined ? runQuantized(source.run) : false);
  const config = readModelConfig(modelDir);
  const tok = await loadModelTokenizer(modelDir);
  const placed = placeRun(placement);
  let device = describeDevice(placed.device.kind, placed.device.name, placed.device.computeDtype);
  // a machine without a usable GPU needs no note (the device line says CPU), unless a GPU dtype was asked for
  let deviceNote: string | null = placed.ignoredDtype
    ? `--dtype ${placed.ignoredDtype} applies on the GPU; answering on the CPU, which computes in fp32.`
    : null;
  let engine: EngineModel;
  try {
    // under the GPU's free memory less the margin, as training: loading beside a training run fails early, here
    engine = EngineModel.load(modelDir, { quantize, ...engineOptions(placed) });
  } catch (err) {
    if (placed.device.kind !== 'cuda' || (placement.device ?? 'auto') !== 'auto') throw err;
    const cpu = cpuDevice(engineInfo().threads);
    engine = EngineModel.load(modelDir, { quantize });
    device = describeDevice(cpu.kind, cpu.name, cpu.computeDtype);
    deviceNote = `Answering on the CPU: the model does not fit on the GPU now (${(err as Error).message.replace(/[.;]\s.*$/s, '')}).`;
  }
  try {
    if (adapterDir !== null) engine.loadAdapter(adapterDir);
  } catch (err) {
    engine.dispose();
    throw err;
  }
  return {
    engine,
    tok,
    modelDir,
    adapterDir,
    stopTokenIds: stopTokenIds(tok, config.eosTokenIds),
    contextLength: config.maxPositionEmbeddings,
    defaultSampling: readGenerationConfig(modelDir).sampling,
    device,
    deviceNote,
    dispose: () => engine.dispose(),
  };
}

function describeDevice(kind: 'cpu' | 'cuda', name: string, dtype: string): string {
  return kind === 'cuda' ? `GPU ${name} (${dtype})` : `CPU ${name}`;
}

/**
 * The tokens that end an answer: the tokenizer's EOS, config.json's eos_token_id(s), generation_config.json's, and
 * the end-of-turn token the chat template writes after each answer, which training teaches (where it is none of the
 * others, as a base model's: Qwen2.5 base ends turns with <|im_end|> and lists only <|endoftext|>).
 */
export function stopTokenIds(tok: ModelTokenizer, configEosIds: readonly number[]): number[] {
  const endOfTurn = templateEndOfTurn(tok);
  const endOfTurnIds = endOfTurn === null ? [] : tok.encode(endOfTurn);
  return [...new Set([tok.eosId, ...configEosIds, ...readGenerationConfig(tok.modelDir).eosTokenIds, ...(endOfTurnIds.length === 1 ? endOfTurnIds : [])])];
}

function runQuantized(run: string): boolean {
  const config = readJsonFile(path.join(run, 'config.json')) as { quantize?: unknown };
  return config.quantize !== false;
}

interface GenerationConfig {
  eosTokenIds: number[];
  sampling: SamplingOptions;
}

/**
 * generation_config.json: the stop ids and sampling defaults the model's authors chose, with transformers' meaning
 * (greedy unless do_sample is true). Without the file: DEFAULT_SAMPLING (temperature 0.7, top-p 0.9), for a chat.
 */
export function readGenerationConfig(modelDir: string): GenerationConfig {
  const file = path.join(modelDir, 'generation_config.json');
  const sampling = { ...DEFAULT_SAMPLING };
  if (!fs.existsSync(file)) return { eosTokenIds: [], sampling };
  let g: Record<string, unknown>;
  try {
    g = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch (err) {
    throw new Error(`${file}: not valid JSON (${(err as Error).message})`);
  }
  const eos = g.eos_token_id;
  const eosTokenIds = (Array.isArray(eos) ? eos : [eos]).filter((x): x is number => Number.isInteger(x));
  const num = (key: string) => (typeof g[key] === 'number' ? (g[key] as number) : undefined);
  // as transformers' GenerationConfig reads it: greedy unless do_sample is true, and each setting the file leaves out
  // at transformers' default (temperature 1, top-k 50, top-p 1), which the chat panel shows and sampling then uses
  sampling.temperature = g.do_sample === true ? (num('temperature') ?? 1) : 0;
  sampling.topP = num('top_p') ?? 1;
  sampling.topK = num('top_k') ?? 50;
  sampling.minP = num('min_p') ?? 0;
  sampling.repetitionPenalty = num('repetition_penalty') ?? sampling.repetitionPenalty;
  return { eosTokenIds, sampling };
}

/**
 * One column of a chat: a generation session that keeps its KV cache between turns. Each answer renders the whole
 * conversation and reuses the cached tokens the new prompt starts with, so a continuing conversation only runs
 * its new tokens.
 */
export class ChatColumn {
  private readonly session: GenerationSession;
  private tokens: number[] = [];

  /** `loraScale` 0 is the base model; 1 the finetuned one. */
  constructor(private readonly chat: ChatModel, loraScale: number) {
    this.session = chat.engine.startGeneration({ loraScale });
  }

  async answer(messages: ChatMessage[], options: Omit<GenerateOptions, 'stopTokenIds'>): Promise<GenerateResult> {
    const prompt = this.chat.tok.encode(renderGenerationPrompt(messages, this.chat.tok));
    return this.answerIds(prompt, options);
  }

  /** Continues after exactly these prompt ids (already rendered). */
  async answerIds(prompt: number[], options: Omit<GenerateOptions, 'stopTokenIds'>): Promise<GenerateResult> {
    let common = 0;
    while (common < this.tokens.length && common < prompt.length - 1 && this.tokens[common] === prompt[common]) common++;
    this.session.truncate(common);
    this.tokens = prompt.slice(0, common);
    const result = await generate(this.session, this.chat.tok, prompt.slice(common), { ...options, stopTokenIds: this.chat.stopTokenIds, contextLength: this.chat.contextLength }, prompt);
    this.tokens = [...prompt, ...result.ids].slice(0, this.session.length);
    return result;
  }

  end(): void {
    this.session.end();
  }
}
