// Messages of the chat panel: between the extension host and the chat server process (`cli.js chat-server`, which
// holds the model), and between the host and the chat webview. Everything crossing a process or webview boundary
// is validated here before it is acted on.
import type { SamplingOptions } from '../generate/sampling';

/** A chat message (the same shape as extension/data's ChatMessage, which the webview bundle cannot import). */
export interface ChatMessage {
  role: 'system' | 'user' | 'assistant';
  content: string;
}

export type ChatColumnId = 'base' | 'finetuned';
export const CHAT_COLUMNS: readonly ChatColumnId[] = ['base', 'finetuned'];
export type FinishReason = 'stop-token' | 'stop-string' | 'length' | 'context' | 'cancelled';

/** The sampling options of extension/generate (temperature, top-k, top-p, min-p, repetition penalty, seed), plus: */
export interface ChatSettings extends SamplingOptions {
  maxNewTokens: number;
  /** Strings that end an answer. */
  stopStrings: string[];
}

/** What the model to chat with is: a run (and one of its checkpoints) or a model folder with an adapter. */
export interface ChatSource {
  run?: string;
  checkpoint?: number;
  model?: string;
  adapter?: string;
  /** Store the base as NF4 (a run: as it trained, by default). */
  quantize?: boolean;
}

/** What the server reports once the model is loaded. */
export interface ChatModelInfo {
  title: string;
  modelDir: string;
  adapterDir: string | null;
  /** The checkpoint whose adapter is loaded; null for the run's final adapter or a folder's. */
  checkpoint: number | null;
  /** The run's complete checkpoints (empty without a run). */
  checkpoints: number[];
  /** Whether the run has a final adapter (a finished or stopped run). */
  hasFinalAdapter: boolean;
  defaults: ChatSettings;
  /** User prompts of the run's eval data, to try first. */
  suggestions: string[];
  /** The system prompt the training conversations shared, if any. */
  system: string | null;
  /** Where the answers are computed, e.g. "GPU NVIDIA H100 80GB HBM3 (bf16)" or "CPU ... (16 threads)". */
  device: string;
  /** Why it is not the GPU when the GPU was wanted (the CPU fallback), else null. */
  deviceNote: string | null;
}

export interface AnswerStats {
  tokens: number;
  finishReason: FinishReason;
  promptTokens: number;
  prefillMs: number;
  decodeMs: number;
  tokensPerSecond: number;
}

// ---------------------------------------------------------------------------------------------------------------
// host <-> chat server (IPC)

export type HostToServer =
  | { type: 'load'; source: ChatSource }
  | { type: 'generate'; id: number; column: ChatColumnId; messages: ChatMessage[]; settings: ChatSettings }
  | { type: 'cancel'; id: number }
  | { type: 'reset' };

export type ServerToHost =
  | { type: 'loaded'; info: ChatModelInfo }
  | { type: 'delta'; id: number; text: string }
  | { type: 'done'; id: number; text: string; stats: AnswerStats }
  /** id null: the load (or the server) failed. */
  | { type: 'error'; id: number | null; message: string };

// ---------------------------------------------------------------------------------------------------------------
// host <-> chat webview

export type ChatWebviewToHost =
  | { type: 'ready' }
  | { type: 'ask'; prompt: string; system: string; settings: ChatSettings }
  | { type: 'stop' }
  | { type: 'clear' }
  /** null: the final adapter. */
  | { type: 'checkpoint'; step: number | null }
  | { type: 'copy'; column: ChatColumnId; turn: number };

export type ChatHostToWebview =
  | { type: 'loading'; message: string }
  | { type: 'loaded'; info: ChatModelInfo }
  /** A new turn: the user's prompt, shown in both columns. */
  | { type: 'turn'; turn: number; prompt: string }
  | { type: 'delta'; column: ChatColumnId; turn: number; text: string }
  | { type: 'done'; column: ChatColumnId; turn: number; stats: AnswerStats }
  | { type: 'cleared' }
  /** What became of a Copy: the answer is on the clipboard, or not (no such answer any more, or the clipboard refused it). */
  | { type: 'copied'; column: ChatColumnId; turn: number; ok: boolean }
  | { type: 'error'; message: string };

export class ChatMessageError extends Error {
  override readonly name = 'ChatMessageError';
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function fail(what: string): never {
  throw new ChatMessageError(what);
}

function finite(v: unknown, name: string, min: number, max: number, integer = false): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max || (integer && !Number.isInteger(v)))
    fail(`${name} must be ${integer ? 'a whole number' : 'a number'} from ${min} to ${max}`);
  return v as number;
}

/** The limits of every sampling setting (the webview's inputs use the same). */
export const SETTING_LIMITS = {
  temperature: [0, 100], topK: [0, 1_000_000], topP: [0.001, 1], minP: [0, 0.999], repetitionPenalty: [0.01, 10], seed: [0, 2 ** 31 - 1], maxNewTokens: [1, 32768],
} as const;

export function validateSettings(v: unknown): ChatSettings {
  if (!isObject(v)) fail('settings must be an object');
  const s = v as Record<string, unknown>;
  const L = SETTING_LIMITS;
  const stops = s.stopStrings;
  if (!Array.isArray(stops) || stops.length > 16 || stops.some((x) => typeof x !== 'string' || x === '' || x.length > 200))
    fail('stopStrings must be a list of up to 16 non-empty strings');
  return {
    temperature: finite(s.temperature, 'temperature', ...L.temperature),
    topK: finite(s.topK, 'top-k', ...L.topK, true),
    topP: finite(s.topP, 'top-p', ...L.topP),
    minP: finite(s.minP, 'min-p', ...L.minP),
    repetitionPenalty: finite(s.repetitionPenalty, 'repetition penalty', ...L.repetitionPenalty),
    seed: finite(s.seed, 'seed', ...L.seed, true),
    maxNewTokens: finite(s.maxNewTokens, 'max new tokens', ...L.maxNewTokens, true),
    stopStrings: [...(stops as string[])],
  };
}

function validateMessages(v: unknown): ChatMessage[] {
  if (!Array.isArray(v) || v.length === 0) fail('messages must be a non-empty list');
  return (v as unknown[]).map((m) => {
    if (!isObject(m) || !['system', 'user', 'assistant'].includes(m.role as string) || typeof m.content !== 'string') fail('each message needs a role and text content');
    const msg = m as { role: ChatMessage['role']; content: string };
    return { role: msg.role, content: msg.content };
  });
}

function validateSource(v: unknown): ChatSource {
  if (!isObject(v)) fail('source must be an object');
  const s = v as Record<string, unknown>;
  const out: ChatSource = {};
  for (const key of ['run', 'model', 'adapter'] as const) {
    if (s[key] !== undefined) {
      if (typeof s[key] !== 'string' || s[key] === '') fail(`source.${key} must be a path`);
      out[key] = s[key] as string;
    }
  }
  if (s.checkpoint !== undefined) out.checkpoint = finite(s.checkpoint, 'checkpoint', 0, Number.MAX_SAFE_INTEGER, true);
  if (s.quantize !== undefined) {
    if (typeof s.quantize !== 'boolean') fail('source.quantize must be true or false');
    out.quantize = s.quantize;
  }
  return out;
}

const isColumn = (v: unknown): v is ChatColumnId => v === 'base' || v === 'finetuned';

export function validateHostToServer(v: unknown): HostToServer {
  if (!isObject(v)) fail('a message must be an object');
  switch (v.type) {
    case 'load':
      return { type: 'load', source: validateSource(v.source) };
    case 'generate':
      if (!isColumn(v.column)) fail('column must be base or finetuned');
      return { type: 'generate', id: finite(v.id, 'id', 0, Number.MAX_SAFE_INTEGER, true), column: v.column as ChatColumnId, messages: validateMessages(v.messages), settings: validateSettings(v.settings) };
    case 'cancel':
      return { type: 'cancel', id: finite(v.id, 'id', 0, Number.MAX_SAFE_INTEGER, true) };
    case 'reset':
      return { type: 'reset' };
    default:
      return fail(`unknown message type ${JSON.stringify(v.type)}`);
  }
}

function validateStats(v: unknown): AnswerStats {
  if (!isObject(v)) fail('stats must be an object');
  const s = v as Record<string, unknown>;
  for (const k of ['tokens', 'promptTokens', 'prefillMs', 'decodeMs', 'tokensPerSecond']) if (typeof s[k] !== 'number') fail(`stats.${k} must be a number`);
  if (!['stop-token', 'stop-string', 'length', 'context', 'cancelled'].includes(s.finishReason as string)) fail('stats.finishReason is not known');
  return s as unknown as AnswerStats;
}

function validateInfo(v: unknown): ChatModelInfo {
  if (!isObject(v)) fail('info must be an object');
  const i = v as Record<string, unknown>;
  if (typeof i.title !== 'string' || typeof i.modelDir !== 'string') fail('info needs a title and a model folder');
  if (i.adapterDir !== null && typeof i.adapterDir !== 'string') fail('info.adapterDir must be a path or null');
  if (i.checkpoint !== null && typeof i.checkpoint !== 'number') fail('info.checkpoint must be a number or null');
  if (!Array.isArray(i.checkpoints) || i.checkpoints.some((c) => typeof c !== 'number')) fail('info.checkpoints must be numbers');
  if (typeof i.hasFinalAdapter !== 'boolean') fail('info.hasFinalAdapter must be true or false');
  if (!Array.isArray(i.suggestions) || i.suggestions.some((s) => typeof s !== 'string')) fail('info.suggestions must be strings');
  if (i.system !== null && typeof i.system !== 'string') fail('info.system must be text or null');
  if (typeof i.device !== 'string') fail('info.device must be text');
  if (i.deviceNote !== null && typeof i.deviceNote !== 'string') fail('info.deviceNote must be text or null');
  return { ...(i as unknown as ChatModelInfo), defaults: validateSettings(i.defaults) };
}

export function validateServerToHost(v: unknown): ServerToHost {
  if (!isObject(v)) fail('a message must be an object');
  switch (v.type) {
    case 'loaded':
      return { type: 'loaded', info: validateInfo(v.info) };
    case 'delta':
      if (typeof v.text !== 'string') fail('delta.text must be text');
      return { type: 'delta', id: finite(v.id, 'id', 0, Number.MAX_SAFE_INTEGER, true), text: v.text as string };
    case 'done':
      if (typeof v.text !== 'string') fail('done.text must be text');
      return { type: 'done', id: finite(v.id, 'id', 0, Number.MAX_SAFE_INTEGER, true), text: v.text as string, stats: validateStats(v.stats) };
    case 'error':
      if (typeof v.message !== 'string') fail('error.message must be text');
      return { type: 'error', id: v.id === null ? null : finite(v.id, 'id', 0, Number.MAX_SAFE_INTEGER, true), message: v.message as string };
    default:
      return fail(`unknown message type ${JSON.stringify(v.type)}`);
  }
}

export function validateChatWebviewMessage(v: unknown): ChatWebviewToHost {
  if (!isObject(v)) fail('a webview message must be an object');
  switch (v.type) {
    case 'ready':
    case 'stop':
    case 'clear':
      return { type: v.type };
    case 'ask':
      if (typeof v.prompt !== 'string' || v.prompt.trim() === '' || v.prompt.length > 100_000) fail('prompt must be non-empty text');
      if (typeof v.system !== 'string' || v.system.length > 100_000) fail('system must be text');
      return { type: 'ask', prompt: v.prompt as string, system: v.system as string, settings: validateSettings(v.settings) };
    case 'checkpoint':
      return { type: 'checkpoint', step: v.step === null ? null : finite(v.step, 'step', 0, Number.MAX_SAFE_INTEGER, true) };
    case 'copy':
      if (!isColumn(v.column)) fail('column must be base or finetuned');
      return { type: 'copy', column: v.column as ChatColumnId, turn: finite(v.turn, 'turn', 0, 1_000_000, true) };
    default:
      return fail(`unknown webview message type ${JSON.stringify(v.type)}`);
  }
}

export function validateChatHostMessage(v: unknown): ChatHostToWebview {
  if (!isObject(v)) fail('a host message must be an object');
  switch (v.type) {
    case 'loading':
    case 'error':
      if (typeof v.message !== 'string') fail(`${v.type}.message must be text`);
      return { type: v.type, message: v.message as string };
    case 'loaded':
      return { type: 'loaded', info: validateInfo(v.info) };
    case 'turn':
      if (typeof v.prompt !== 'string') fail('turn.prompt must be text');
      return { type: 'turn', turn: finite(v.turn, 'turn', 0, 1_000_000, true), prompt: v.prompt as string };
    case 'delta':
      if (!isColumn(v.column) || typeof v.text !== 'string') fail('delta needs a column and text');
      return { type: 'delta', column: v.column as ChatColumnId, turn: finite(v.turn, 'turn', 0, 1_000_000, true), text: v.text as string };
    case 'done':
      if (!isColumn(v.column)) fail('done needs a column');
      return { type: 'done', column: v.column as ChatColumnId, turn: finite(v.turn, 'turn', 0, 1_000_000, true), stats: validateStats(v.stats) };
    case 'cleared':
      return { type: 'cleared' };
    case 'copied':
      if (!isColumn(v.column) || typeof v.ok !== 'boolean') fail('copied needs a column and ok');
      return { type: 'copied', column: v.column as ChatColumnId, turn: finite(v.turn, 'turn', 0, 1_000_000, true), ok: v.ok as boolean };
    default:
      return fail(`unknown host message type ${JSON.stringify(v.type)}`);
  }
}
