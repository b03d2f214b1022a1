// The one protocol between the trainer process, the extension host and the webview: every event the trainer
// reports and every control message it accepts, as TypeScript types with runtime validation. Each event is a JSON
// object whose `kind` names it; the run-started event carries the protocol version. The trainer appends each event
// as one line of <run>/events.jsonl and, when started by the extension host, also sends it over IPC.

export const PROTOCOL_VERSION = 1;

export type MemoryCategory = 'weights' | 'adapters' | 'gradients' | 'optimizer' | 'activations' | 'workspace';
export const MEMORY_CATEGORIES: readonly MemoryCategory[] = ['weights', 'adapters', 'gradients', 'optimizer', 'activations', 'workspace'];
export type ByCategory = Record<MemoryCategory, number>;

export interface DatasetStats {
  file: string;
  format: string;
  shape: string;
  template: string;
  trainExamples: number;
  evalExamples: number;
  trainTokens: number;
  trainedTokens: number;
  truncated: number;
  skippedInvalid: number;
  droppedEmpty: number;
  packed: boolean;
}

export interface MemoryEstimate {
  categories: ByCategory;
  peakTotal: number;
}

/** Where a run trains: the device chosen for it (`--device`, the qlora.device setting) and its memory budget. */
export interface RunDevice {
  kind: 'cpu' | 'cuda';
  /** The GPU's name, or the CPU model and thread count. */
  name: string;
  computeDtype: 'f32' | 'bf16' | 'fp16';
  /** Bytes the engine's allocations may hold at once; null without a budget. */
  memoryBudget: number | null;
  /** The optimizer state does not all fit beside a step's peak under the budget: its pages move to host memory. */
  pagedOptimizer: boolean;
  /** Not even so: the checkpointed inputs of this many of the lowest blocks move to host memory between forward and
   * backward too. Absent in runs written before activations could move. */
  offloadedBlockInputs?: number;
}

/** "3 block inputs offloaded": how New Finetune and the Training view name what a memory plan moved. */
export function blockInputsOffloaded(count: number): string {
  return `${count} block input${count === 1 ? '' : 's'} offloaded`;
}

export interface RunStartedEvent {
  kind: 'run-started';
  time: string;
  protocol: number;
  runDir: string;
  /** The resolved training configuration (config.json of the run). */
  config: Record<string, unknown>;
  dataset: DatasetStats;
  trainableParameters: number;
  memoryEstimate: MemoryEstimate | null;
  totalSteps: number;
  /** The step of the checkpoint this run resumed from; null for a new run. */
  resumedFrom: number | null;
  /** Absent in runs written before the device was reported. */
  device?: RunDevice | null;
}

export interface StepEvent {
  kind: 'step';
  time: string;
  step: number;
  totalSteps: number;
  epoch: number;
  loss: number;
  lr: number;
  /** null: fp16 gradients overflowed and the update was skipped (a warning event says so). */
  gradNorm: number | null;
  tokensPerSecond: number;
  elapsedSeconds: number;
  etaSeconds: number | null;
}

export interface EvalEvent {
  kind: 'eval';
  time: string;
  step: number;
  /** null where the loss over the eval set was not finite (an overflow, or no labelled tokens); a warning says which */
  evalLoss: number | null;
  evalTokens: number;
}

/** One sample prompt's answer with the adapter of `step` (step 0: before training, the base model). */
export interface SampleEvent {
  kind: 'sample';
  time: string;
  step: number;
  /** Position of the prompt in the run's samplePrompts. */
  index: number;
  prompt: string;
  text: string;
  /** Tokens generated, and why the answer ended. */
  tokens: number;
  finishReason: 'stop-token' | 'stop-string' | 'length' | 'context' | 'cancelled';
  /** Wall time of this answer (prefill and decode). */
  ms: number;
}

export interface MemoryEvent {
  kind: 'memory';
  time: string;
  step: number;
  current: ByCategory;
  peak: ByCategory;
  totalCurrent: number;
  totalPeak: number;
  /** By category at the highest point since the previous memory event: what the steps in between needed at once
   * (between steps, `current` has no activations). Sums to highWaterTotal. */
  highWater: ByCategory;
  highWaterTotal: number;
  /** The whole device as its driver sees it (NVML), when the engine runs on a GPU; null on the CPU. */
  device: { total: number; used: number } | null;
}

export interface PageEvent {
  kind: 'page';
  time: string;
  dir: 'out' | 'in';
  bytes: number;
  tensor: string;
  ms: number;
}

/** The GPU the engine trains on, as its driver (NVML) reports it, about once a second while training. */
export interface GpuEvent {
  kind: 'gpu';
  time: string;
  index: number;
  name: string;
  memoryTotal: number;
  memoryUsed: number;
  memoryFree: number;
  /** Percent of the last sample period the GPU was busy; null when the driver does not say. */
  utilization: number | null;
  temperature: number | null;
  powerW: number | null;
}

export interface CheckpointEvent {
  kind: 'checkpoint';
  time: string;
  step: number;
  path: string;
}

export interface WarningEvent {
  kind: 'warning';
  time: string;
  message: string;
}

export interface ErrorEvent {
  kind: 'error';
  time: string;
  message: string;
  step: number | null;
  /** The newest complete checkpoint, from which `resume` continues; null when there is none. */
  lastCheckpoint: string | null;
}

export interface FinishedEvent {
  kind: 'finished';
  time: string;
  status: 'completed' | 'stopped' | 'failed';
  step: number;
  adapterPath: string | null;
  finalLoss: number | null;
  elapsedSeconds: number;
}

export type TrainerEvent =
  | RunStartedEvent
  | StepEvent
  | EvalEvent
  | SampleEvent
  | MemoryEvent
  | PageEvent
  | GpuEvent
  | CheckpointEvent
  | WarningEvent
  | ErrorEvent
  | FinishedEvent;

export type EventKind = TrainerEvent['kind'];

/** Control messages from the extension host to the trainer. */
export type ControlMessage = { kind: 'stop' } | { kind: 'save-now' };

/**
 * What a trainer is doing before its run starts (sent to the host only, never in events.jsonl: a new run's folder
 * does not exist yet): tokenizing the data (done of total examples), or loading the model.
 */
export interface PreparingMessage {
  kind: 'preparing';
  stage: 'data' | 'model';
  done: number | null;
  total: number | null;
}

/** What a trainer does before its run starts, in words: "tokenizing the data: 1,024 of 20,000 examples". */
export function preparingText(p: PreparingMessage, ellipsis = '…'): string {
  if (p.stage === 'model') return `loading the model${ellipsis}`;
  const n = (v: number | null) => (v ?? 0).toLocaleString('en-US');
  return `tokenizing the data: ${n(p.done)} of ${n(p.total)} examples`;
}

/** A PreparingMessage, checked; null for any other message (an event); a ProtocolError when malformed. */
export function validatePreparing(message: unknown): PreparingMessage | null {
  if (!isObject(message) || message.kind !== 'preparing') return null;
  const count = (v: unknown) => v === null || (typeof v === 'number' && Number.isInteger(v) && v >= 0);
  if ((message.stage !== 'data' && message.stage !== 'model') || !count(message.done) || !count(message.total)) {
    throw new ProtocolError('preparing message: stage must be data or model, done and total whole numbers or null');
  }
  return { kind: 'preparing', stage: message.stage, done: message.done as number | null, total: message.total as number | null };
}

// ---------------------------------------------------------------------------------------------------------------
// Runtime validation: a field spec per kind. Messages cross a process boundary (and events.jsonl may be edited or
// truncated), so nothing is trusted until it passes here.

export class ProtocolError extends Error {
  override readonly name = 'ProtocolError';
}

// 'object?': an object, null, or absent (a field added after runs were written with the same protocol).
type FieldType = 'number' | 'string' | 'boolean' | 'object' | 'number|null' | 'string|null' | 'object|null' | 'object?' | 'byCategory';
type Spec = Record<string, FieldType | readonly string[]>;

const eventSpecs: Record<EventKind, Spec> = {
  'run-started': {
    time: 'string', protocol: 'number', runDir: 'string', config: 'object', dataset: 'object',
    trainableParameters: 'number', memoryEstimate: 'object|null', totalSteps: 'number', resumedFrom: 'number|null',
    device: 'object?',
  },
  step: {
    time: 'string', step: 'number', totalSteps: 'number', epoch: 'number', loss: 'number', lr: 'number',
    gradNorm: 'number|null', tokensPerSecond: 'number', elapsedSeconds: 'number', etaSeconds: 'number|null',
  },
  eval: { time: 'string', step: 'number', evalLoss: 'number|null', evalTokens: 'number' },
  sample: {
    time: 'string', step: 'number', index: 'number', prompt: 'string', text: 'string', tokens: 'number',
    finishReason: ['stop-token', 'stop-string', 'length', 'context', 'cancelled'], ms: 'number',
  },
  memory: {
    time: 'string', step: 'number', current: 'byCategory', peak: 'byCategory', totalCurrent: 'number',
    totalPeak: 'number', highWater: 'byCategory', highWaterTotal: 'number', device: 'object|null',
  },
  page: { time: 'string', dir: ['out', 'in'], bytes: 'number', tensor: 'string', ms: 'number' },
  gpu: {
    time: 'string', index: 'number', name: 'string', memoryTotal: 'number', memoryUsed: 'number', memoryFree: 'number',
    utilization: 'number|null', temperature: 'number|null', powerW: 'number|null',
  },
  checkpoint: { time: 'string', step: 'number', path: 'string' },
  warning: { time: 'string', message: 'string' },
  error: { time: 'string', message: 'string', step: 'number|null', lastCheckpoint: 'string|null' },
  finished: {
    time: 'string', status: ['completed', 'stopped', 'failed'], step: 'number', adapterPath: 'string|null',
    finalLoss: 'number|null', elapsedSeconds: 'number',
  },
};

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function checkField(kind: string, name: string, value: unknown, type: FieldType | readonly string[]): void {
  const fail = (expected: string) => {
    throw new ProtocolError(`${kind} event: field "${name}" must be ${expected}, got ${value === null ? 'null' : typeof value}`);
  };
  if (Array.isArray(type)) {
    if (typeof value !== 'string' || !type.includes(value)) fail(`one of ${type.join(', ')}`);
    return;
  }
  switch (type) {
    case 'number':
      // NaN and Infinity are legitimate training numbers (a diverged loss); JSON turns them into null, so accept
      // null for numbers only where the spec says so.
      if (typeof value !== 'number') fail('a number');
      return;
    case 'string':
      if (typeof value !== 'string') fail('a string');
      return;
    case 'boolean':
      if (typeof value !== 'boolean') fail('a boolean');
      return;
    case 'object':
      if (!isObject(value)) fail('an object');
      return;
    case 'number|null':
      if (value !== null && typeof value !== 'number') fail('a number or null');
      return;
    case 'string|null':
      if (value !== null && typeof value !== 'string') fail('a string or null');
      return;
    case 'object|null':
      if (value !== null && !isObject(value)) fail('an object or null');
      return;
    case 'object?':
      if (value !== undefined && value !== null && !isObject(value)) fail('an object, null or absent');
      return;
    case 'byCategory':
      if (!isObject(value) || MEMORY_CATEGORIES.some((c) => typeof value[c] !== 'number')) fail(`bytes for each of ${MEMORY_CATEGORIES.join(', ')}`);
      return;
  }
}

/** Validates an untrusted value as a TrainerEvent; throws ProtocolError naming the field at fault. */
export function validateEvent(value: unknown): TrainerEvent {
  if (!isObject(value)) throw new ProtocolError('an event must be a JSON object');
  const kind = value.kind;
  if (typeof kind !== 'string' || !(kind in eventSpecs)) throw new ProtocolError(`unknown event kind ${JSON.stringify(kind)}`);
  for (const [name, type] of Object.entries(eventSpecs[kind as EventKind])) checkField(kind, name, value[name], type);
  return value as unknown as TrainerEvent;
}

export function isTrainerEvent(value: unknown): value is TrainerEvent {
  try {
    validateEvent(value);
    return true;
  } catch {
    return false;
  }
}

export function validateControl(value: unknown): ControlMessage {
  if (!isObject(value) || (value.kind !== 'stop' && value.kind !== 'save-now'))
    throw new ProtocolError(`unknown control message ${JSON.stringify(isObject(value) ? value.kind : value)}`);
  return { kind: value.kind };
}

/**
 * Reads events.jsonl text: every complete line must be a valid event; a last line without its newline is a write
 * cut short by a kill and is ignored (reported in `partialTail`).
 */
export function parseEventLog(text: string, source = 'events.jsonl'): { events: TrainerEvent[]; partialTail: boolean } {
  const lines = text.split('\n');
  const tail = lines.pop() ?? '';
  const events: TrainerEvent[] = [];
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(line);
    } catch (err) {
      throw new ProtocolError(`${source} line ${i + 1}: not valid JSON (${err instanceof Error ? err.message : String(err)})`);
    }
    try {
      events.push(validateEvent(parsed));
    } catch (err) {
      throw new ProtocolError(`${source} line ${i + 1}: ${err instanceof Error ? err.message : String(err)}`);
    }
  });
  return { events, partialTail: tail.trim() !== '' };
}

/** JSON for one events.jsonl line; non-finite numbers (a diverged loss) are written as null. */
export function serializeEvent(event: TrainerEvent): string {
  return JSON.stringify(event, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? null : v));
}
