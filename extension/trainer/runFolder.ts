// What a folder given as a run (--run, resume) or as a new run's --out holds: a run (config.json naming the base
// model, or one that does not parse), a Hugging Face model (config.json with model_type or architectures), something
// else, or nothing. The refusals say which, so that a model folder given as a run is not called "a run" or "not a run
// folder" alone.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DESKTOP_LITTER } from '../util/atomicFolder';
import { RUN_LOCK_FILE } from './runLock';

export type FolderKind = 'missing' | 'empty' | 'run' | 'model' | 'other';

export function folderKind(dir: string): FolderKind {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return 'missing';
  }
  if (names.includes('config.json')) {
    let config: unknown;
    try {
      config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    } catch {
      return 'run'; // a damaged run's, most likely: reading it says what is wrong with the file
    }
    const c = (typeof config === 'object' && config !== null ? config : {}) as Record<string, unknown>;
    if (typeof c.model_type === 'string' || Array.isArray(c.architectures)) return 'model';
    if (typeof c.model === 'string') return 'run';
  }
  return names.some((n) => !n.startsWith('.') && n !== RUN_LOCK_FILE && !DESKTOP_LITTER.has(n)) ? 'other' : 'empty';
}

/** Refuses a folder that is not a run, saying what it is instead. */
export function assertRunFolder(dir: string, makeError: (message: string) => Error = (m) => new Error(m)): void {
  switch (folderKind(dir)) {
    case 'run':
      return;
    case 'model':
      throw makeError(`${dir} is a model folder (its config.json describes a model), not a run folder; give the folder a run was trained into (--out of train)`);
    case 'missing':
      throw makeError(`${dir} does not exist; give the folder a run was trained into (--out of train)`);
    default:
      throw makeError(`${dir} is not a run folder (no config.json naming the model it trains)`);
  }
}

/** Refuses a new run's --out that holds anything but nothing: a run (resume it instead), a model, other files. */
export function assertNewRunFolder(dir: string, makeError: (message: string) => Error = (m) => new Error(m)): void {
  if (fs.existsSync(dir) && !fs.statSync(dir).isDirectory()) throw makeError(`${dir} exists and is not a folder; choose another --out`);
  switch (folderKind(dir)) {
    case 'run':
      throw makeError(`${dir} already holds a run; continue it with "resume --run ${dir}" or choose another --out`);
    case 'model':
      throw makeError(`${dir} is a model folder (its config.json describes a model); choose a new or empty folder for --out`);
    case 'other':
      throw makeError(`${dir} is not empty and holds no run; choose a new or empty folder for --out`);
    default:
      return;
  }
}
