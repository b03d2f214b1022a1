// Checkpoints: <run>/checkpoints/step-N/ holds the adapter (PEFT layout), the optimizer state, the trainer state
// and, written last, a DONE marker. Each is assembled in a temporary sibling folder and renamed into place, so a
// kill at any moment leaves either a complete checkpoint or none; resume takes the newest with DONE.
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { EngineModel } from '../engine';
import type { ComputeDtype } from '../engine/native';
import { writeJsonAtomic } from '../util/atomicFile';
import type { BatchLayout } from './batches';
import type { LossScalerState } from './lossScaler';
import { removeFolderAtomic, removeLeftovers, replaceFolderAtomic, restoreInterruptedReplace } from '../util/atomicFolder';

export interface TrainerState {
  /** Optimizer steps completed. The data position follows from it (step * gradAccum micro-batches). */
  step: number;
  epoch: number;
  microBatchesDone: number;
  lastLoss: number;
  seed: number;
  elapsedSeconds: number;
  /** Identifies the config the state belongs to (its JSON), so a changed config is not resumed silently. */
  configDigest: string;
  /** fp16 compute's loss scale at the checkpoint (absent when the run computed in fp32 or bf16). */
  lossScaler?: LossScalerState;
  /** The GPU compute dtype the steps so far were computed in (absent on the CPU); a resumed run keeps it. */
  computeDtype?: ComputeDtype;
  /** Identifies the tokenized train and eval examples (absent in checkpoints written before it was kept). */
  dataDigest?: string;
  /** How the run's steps take micro-batches (absent in checkpoints written before 'epochs': those ran 'continuous'). */
  batchLayout?: BatchLayout;
}

const STEP_DIR = /^step-(\d+)$/;

export function checkpointsDir(runDir: string): string {
  return path.join(runDir, 'checkpoints');
}

export function checkpointPath(runDir: string, step: number): string {
  return path.join(checkpointsDir(runDir), `step-${step}`);
}

export function writeCheckpoint(runDir: string, model: EngineModel, state: TrainerState, baseModelName: string): string {
  const finalDir = checkpointPath(runDir, state.step);
  // A checkpoint of the same step (a stop right after a periodic checkpoint) is replaced whole; DONE goes last.
  replaceFolderAtomic(finalDir, (tmp) => {
    model.saveAdapter(path.join(tmp, 'adapter'), baseModelName);
    model.saveOptimizerState(path.join(tmp, 'optimizer.safetensors'));
    writeJsonAtomic(path.join(tmp, 'trainer_state.json'), state);
    writeJsonAtomic(path.join(tmp, 'DONE'), { step: state.step, time: new Date().toISOString() });
  });
  return finalDir;
}

const SET_ASIDE = /^\.(step-\d+)\.old-\d+$/;

/** Complete checkpoints (with DONE), oldest first. */
export function listCheckpoints(runDir: string): { step: number; dir: string }[] {
  const dir = checkpointsDir(runDir);
  if (!fs.existsSync(dir)) return [];
  // A writer killed while replacing a checkpoint of the same step may have left it set aside: it counts again.
  for (const name of fs.readdirSync(dir)) {
    const m = SET_ASIDE.exec(name);
    if (m) restoreInterruptedReplace(path.join(dir, m[1]));
  }
  return fs
    .readdirSync(dir)
    .map((name) => ({ name, m: STEP_DIR.exec(name) }))
    .filter(({ name, m }) => m && fs.existsSync(path.join(dir, name, 'DONE')))
    .map(({ name, m }) => ({ step: Number(m![1]), dir: path.join(dir, name) }))
    .sort((a, b) => a.step - b.step);
}

export function latestCheckpoint(runDir: string): { step: number; dir: string } | null {
  const all = listCheckpoints(runDir);
  return all.length ? all[all.length - 1] : null;
}

/** Keeps the newest `keep` complete checkpoints and removes leftovers of interrupted writes. */
export function pruneCheckpoints(runDir: string, keep: number): void {
  const dir = checkpointsDir(runDir);
  if (!fs.existsSync(dir)) return;
  const all = listCheckpoints(runDir);
  const newest = all.length > 0 ? all[all.length - 1].step : 0;
  for (const name of fs.readdirSync(dir)) {
    const m = /^\.(step-\d+)\.(tmp|old|del)-\d+$/.exec(name);
    if (m) removeLeftovers(path.join(dir, m[1]));
    // a step folder without DONE older than the newest complete one can never be completed (written before DONE
    // was kept, or a tool's copy): it only takes room
    const incomplete = STEP_DIR.exec(name);
    if (incomplete && Number(incomplete[1]) < newest && !fs.existsSync(path.join(dir, name, 'DONE'))) removeFolderAtomic(path.join(dir, name));
  }
  for (const old of all.slice(0, Math.max(0, all.length - keep))) removeFolderAtomic(old.dir);
}

export function readTrainerState(checkpointDir: string): TrainerState {
  const file = path.join(checkpointDir, 'trainer_state.json');
  let state: TrainerState;
  try {
    state = JSON.parse(fs.readFileSync(file, 'utf8')) as TrainerState;
  } catch (err) {
    throw new Error(`${file}: cannot read the trainer state (${err instanceof Error ? err.message : String(err)})`);
  }
  const s = state.lossScaler;
  if (s !== undefined && !(Number.isFinite(s?.scale) && s.scale > 0 && Number.isInteger(s.goodSteps) && s.goodSteps >= 0))
    throw new Error(`${file}: lossScaler must be {scale > 0, goodSteps >= 0}, got ${JSON.stringify(s)}`);
  if (state.computeDtype !== undefined && !['f32', 'bf16', 'fp16'].includes(state.computeDtype))
    throw new Error(`${file}: computeDtype must be f32, bf16 or fp16, got ${JSON.stringify(state.computeDtype)}`);
  return state;
}
