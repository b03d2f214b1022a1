// train and resume: the trainer process. The extension host forks this same code with IPC; events then go both to
// <run>/events.jsonl and over IPC, and control messages (stop, save now) come back over IPC. On a terminal it shows
// progress; SIGINT/SIGTERM stop gracefully after the current step with a final checkpoint (a second SIGINT exits).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseEventLog, validateControl, type FinishedEvent, type TrainerEvent } from '../../protocol/events';
import { listOption, numberOption, requiredString, stringOption, UsageError, type OptionSpec, type ParsedOptions } from '../cliArgs';
import { checkSetting, PRESETS, readConfigFile, resolveConfig, type TrainConfig, type Tunables } from '../config';
import { placementFromFlags, placementOptions } from '../placement';
import { TerminalProgress } from '../progress';
import { assertRunFolder } from '../runFolder';
import { train, TrainingControl, type TrainOptions, type TrainOutcome } from '../train';

function installControl(control: TrainingControl): () => void {
  let interrupts = 0;
  const onSignal = () => {
    interrupts += 1;
    if (interrupts > 1) process.exit(130);
    control.stopRequested = true;
    process.stderr.write(
      control.training
        ? '\nstopping after this step (a checkpoint will be written; press Ctrl-C again to quit at once)\n'
        : '\nstopping before the first step (press Ctrl-C again to quit at once)\n',
    );
  };
  const onMessage = (message: unknown) => {
    try {
      const m = validateControl(message);
      if (m.kind === 'stop') control.stopRequested = true;
      else control.saveRequested = true;
    } catch {
      // A malformed control message is ignored: the host validates what it sends; nothing here acts on it.
    }
  };
  // The extension host that started this process is gone (its window closed or reloaded, or it crashed): nobody
  // watches the run any more, so it stops after this step with a checkpoint, as a stop message would have it.
  const onDisconnect = () => {
    control.stopRequested = true;
  };
  // (With the host gone its pipes are too: cli.ts drops what is still written to them, the outcome line.)
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('message', onMessage);
  process.on('disconnect', onDisconnect);
  return () => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('message', onMessage);
    process.off('disconnect', onDisconnect);
  };
}

type Watchers = Pick<TrainOptions, 'onEvent' | 'onPreparing'>;

async function runWithProgress(start: (control: TrainingControl, watchers: Watchers) => Promise<TrainOutcome>, json: boolean): Promise<TrainOutcome> {
  const control = new TrainingControl();
  const uninstall = installControl(control);
  const progress = json ? undefined : new TerminalProgress();
  try {
    return await start(control, progress ? { onEvent: (e) => progress.handle(e), onPreparing: (p) => progress.preparing(p) } : {});
  } finally {
    progress?.close(); // an error sentence then starts its own line
    uninstall();
  }
}

/** A tunable's default in each preset, for the help: "(default 4)" or "(default: qlora 64, quick 8)". */
function presetDefault(key: keyof Tunables): string {
  const show = (v: unknown) => (v === null ? 'none' : String(v));
  const [q, k] = [PRESETS.qlora.values[key], PRESETS.quick.values[key]].map(show);
  return q === k ? `(default ${q})` : `(default: qlora ${q}, quick ${k})`;
}

export const trainOptions: Record<string, OptionSpec> = {
  model: { type: 'string', description: 'Hugging Face model folder (required unless --config names it)' },
  data: { type: 'string', description: 'training data (.jsonl, .json, .csv, .parquet; required unless --config names it)' },
  out: { type: 'string', required: true, description: 'run folder to create (new or empty)' },
  config: { type: 'string', description: 'JSON config file (schemas/train-config.schema.json); flags override it' },
  'eval-data': { type: 'string', description: `evaluation data file (default: hold out ${PRESETS.qlora.values.evalFraction * 100}% of --data, at most ${PRESETS.qlora.values.evalMaxExamples} examples)` },
  shape: { type: 'string', description: 'messages, sharegpt, alpaca, completion or text (default: detected from the fields)' },
  preset: { type: 'string', description: `qlora (default: ${PRESETS.qlora.description}) or quick (${PRESETS.quick.description}); the defaults below are the preset's` },
  'max-steps': { type: 'string', description: 'optimizer steps (default: as many as --epochs take)' },
  epochs: { type: 'string', description: `passes over the data, when --max-steps is not given ${presetDefault('epochs')}` },
  lr: { type: 'string', description: `learning rate ${presetDefault('lr')}` },
  rank: { type: 'string', description: `LoRA rank ${presetDefault('rank')}` },
  alpha: { type: 'string', description: `LoRA alpha ${presetDefault('alpha')}` },
  'batch-size': { type: 'string', description: `sequences per micro-batch ${presetDefault('batchSize')}` },
  'grad-accum': { type: 'string', description: `micro-batches per optimizer step ${presetDefault('gradAccum')}` },
  'seq-len': { type: 'string', description: `maximum tokens per sequence ${presetDefault('seqLen')}` },
  'checkpoint-every': { type: 'string', description: `checkpoint every N steps; 0: only at the end ${presetDefault('checkpointEvery')}` },
  'eval-every': { type: 'string', description: `evaluate every N steps; 0: only at the end ${presetDefault('evalEvery')}` },
  seed: { type: 'string', description: `random seed ${presetDefault('seed')}` },
  'skip-invalid': { type: 'boolean', description: 'skip invalid rows instead of refusing to start' },
  packing: { type: 'boolean', description: 'pack examples into full sequences' },
  'sample-prompt': { type: 'string', repeatable: true, description: 'a user message answered with the current adapter at the start and at every eval (repeatable)' },
  'sample-max-tokens': { type: 'string', description: `most tokens of each sample answer ${presetDefault('sampleMaxTokens')}` },
  ...placementOptions,
  json: { type: 'boolean', description: 'print the outcome as JSON (no progress output)' },
};

export function configFromFlags(o: ParsedOptions): TrainConfig {
  const file = stringOption(o, 'config');
  const fromFile = file ? readConfigFile(file) : {};
  const overrides: Partial<TrainConfig> = {};
  // a bad value is said of the flag that gave it ("--rank must be at least 1"), not of the config key
  const set = <K extends keyof TrainConfig>(key: K, flag: string, value: TrainConfig[K] | undefined) => {
    if (value === undefined) return;
    checkSetting(key, value, `--${flag}`);
    overrides[key] = value;
  };
  const number = (flag: string) => numberOption(o, flag);
  set('model', 'model', stringOption(o, 'model'));
  set('data', 'data', stringOption(o, 'data'));
  set('evalData', 'eval-data', stringOption(o, 'eval-data'));
  set('shape', 'shape', stringOption(o, 'shape') as TrainConfig['shape'] | undefined);
  set('preset', 'preset', stringOption(o, 'preset') as TrainConfig['preset'] | undefined);
  set('maxSteps', 'max-steps', number('max-steps'));
  set('epochs', 'epochs', number('epochs'));
  set('lr', 'lr', number('lr'));
  set('rank', 'rank', number('rank'));
  set('alpha', 'alpha', number('alpha'));
  set('batchSize', 'batch-size', number('batch-size'));
  set('gradAccum', 'grad-accum', number('grad-accum'));
  set('seqLen', 'seq-len', number('seq-len'));
  set('checkpointEvery', 'checkpoint-every', number('checkpoint-every'));
  set('evalEvery', 'eval-every', number('eval-every'));
  set('seed', 'seed', number('seed'));
  if (o['skip-invalid']) overrides.skipInvalid = true;
  if (o.packing) overrides.packing = true;
  const samplePrompts = listOption(o, 'sample-prompt');
  if (samplePrompts.length > 0) overrides.samplePrompts = samplePrompts;
  set('sampleMaxTokens', 'sample-max-tokens', number('sample-max-tokens'));
  // Paths in a config file are relative to the file, as editors and users expect.
  if (file) {
    const base = path.dirname(path.resolve(file));
    for (const key of ['model', 'data', 'evalData'] as const) {
      const v = fromFile[key];
      if (typeof v === 'string' && overrides[key] === undefined) (fromFile as Record<string, unknown>)[key] = path.resolve(base, v);
    }
  }
  return resolveConfig(fromFile, overrides);
}

/** A run whose last event says it completed, with its adapter in place; null for one that can go on. */
function completedRun(runDir: string): FinishedEvent | null {
  let events: TrainerEvent[];
  try {
    events = parseEventLog(fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8')).events;
  } catch {
    return null; // no log, or one that does not parse: resume says what it finds
  }
  const last = events[events.length - 1];
  if (last?.kind !== 'finished' || last.status !== 'completed' || last.adapterPath === null) return null;
  return fs.existsSync(path.join(runDir, 'adapter', 'adapter_model.safetensors')) ? last : null;
}

function printOutcome(outcome: TrainOutcome, json: boolean): void {
  if (json) process.stdout.write(JSON.stringify(outcome) + '\n');
  else if (outcome.beforeStart)
    process.stderr.write(
      fs.existsSync(path.join(outcome.runDir, 'config.json'))
        ? `stopped before the first step: ${outcome.runDir} is as it was\n`
        : 'stopped before the run started: nothing was written\n',
    );
}

export async function trainVerb(o: ParsedOptions): Promise<void> {
  const placement = placementFromFlags(o);
  const config = configFromFlags(o);
  const runDir = requiredString(o, 'out');
  const json = Boolean(o.json);
  const outcome = await runWithProgress((control, watchers) => train({ runDir, config, resume: false, control, ...watchers, placement }), json);
  printOutcome(outcome, json);
}

export async function resumeVerb(o: ParsedOptions): Promise<void> {
  const runDir = requiredString(o, 'run');
  assertRunFolder(runDir, (m) => new UsageError(m));
  const json = Boolean(o.json);
  const placement = placementFromFlags(o);
  const done = completedRun(runDir);
  if (done) {
    // nothing to resume: the run is left as it is (no events appended)
    const outcome: TrainOutcome = { status: 'completed', step: done.step, totalSteps: done.step, adapterPath: done.adapterPath, finalLoss: done.finalLoss, runDir };
    if (json) printOutcome(outcome, json);
    else process.stderr.write(`${runDir} finished already (step ${done.step}); nothing to resume. Its adapter: ${done.adapterPath}\n`);
    return;
  }
  const outcome = await runWithProgress((control, watchers) => train({ runDir, resume: true, control, ...watchers, placement }), json);
  printOutcome(outcome, json);
}

