// A model loaded for chatting: the engine model (base, with a run's or a folder's adapter when given), its
// tokenizer and chat template, the tokens that end an answer, and the model's own sampling defaults. One loaded
// model serves both the base answers (adapter scale 0) and the finetuned ones.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { loadModelTokenizer, renderGenerationPrompt, type ChatMessage, type ModelTokenizer } from '../data';
import { EngineModel, readModelConfig, type GenerationSession } from '../engine';
import { runAdapterDir, runModelDir } from '../trainer/verbs/export';
import { generate, type GenerateOptions, type GenerateResult } from './generate';
import { DEFAULT_SAMPLING, type SamplingOptions } from './sampling';

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
  /** generation_config.json's sampling settings over our defaults. */
  defaultSampling: SamplingOptions;
  dispose(): void;
}

/** Loads what `source` names. Errors name the folder and what is wrong. */
export async function loadChatModel(source: ChatModelSource): Promise<ChatModel> {
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
  const engine = EngineModel.load(modelDir, { quantize });
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
    defaultSampling: readGenerationConfig(modelDir).sampling,
    dispose: () => engine.dispose(),
  };
}

/** The tokens that end an answer: the tokenizer's EOS, config.json's eos_token_id(s) and generation_config.json's. */
export function stopTokenIds(tok: ModelTokenizer, configEosIds: readonly number[]): number[] {
  return [...new Set([tok.eosId, ...configEosIds, ...readGenerationConfig(tok.modelDir).eosTokenIds])];
}

function runQuantized(run: string): boolean {
  const config = JSON.parse(fs.readFileSync(path.join(run, 'config.json'), 'utf8')) as { quantize?: unknown };
  return config.quantize !== false;
}

interface GenerationConfig {
  eosTokenIds: number[];
  sampling: SamplingOptions;
}

/** generation_config.json: the stop ids and sampling defaults the model's authors chose (greedy when do_sample is false). */
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
  if (g.do_sample === false) sampling.temperature = 0;
  else if (g.do_sample === true) {
    sampling.temperature = num('temperature') ?? sampling.temperature;
    sampling.topP = num('top_p') ?? sampling.topP;
    sampling.topK = num('top_k') ?? sampling.topK;
    sampling.minP = num('min_p') ?? sampling.minP;
  }
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
    const result = await generate(this.session, this.chat.tok, prompt.slice(common), { ...options, stopTokenIds: this.chat.stopTokenIds }, prompt);
    this.tokens = [...prompt, ...result.ids].slice(0, this.session.length);
    return result;
  }

  end(): void {
    this.session.end();
  }
}
