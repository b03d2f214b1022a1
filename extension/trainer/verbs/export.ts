// export: copies the adapter of a run (its final adapter, or a given checkpoint's) to a folder, as a PEFT adapter.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { writeFolderAtomic } from '../../util/atomicFolder';
import { checkpointPath, latestCheckpoint } from '../checkpoints';
import { readJsonFile } from '../../util/jsonFile';

export interface ExportOptions {
  run: string;
  out: string;
  /** A checkpoint step; default: the run's final adapter, else its newest checkpoint. */
  checkpoint?: number;
}

/** The adapter folder of a run: a checkpoint's when `checkpoint` is given, else the final one, else the newest checkpoint's. */
export function runAdapterDir(run: string, checkpoint?: number): string {
  if (!fs.existsSync(path.join(run, 'config.json'))) throw new Error(`${run} is not a run folder (no config.json)`);
  if (checkpoint !== undefined) {
    const dir = checkpointPath(run, checkpoint);
    if (!fs.existsSync(path.join(dir, 'DONE'))) throw new Error(`${run} has no complete checkpoint at step ${checkpoint}`);
    return path.join(dir, 'adapter');
  }
  if (fs.existsSync(path.join(run, 'adapter', 'adapter_model.safetensors'))) return path.join(run, 'adapter');
  const latest = latestCheckpoint(run);
  if (!latest) throw new Error(`${run} has no adapter and no complete checkpoint yet`);
  return path.join(latest.dir, 'adapter');
}

/** The base model folder a run trained on (its config.json's `model`). */
export function runModelDir(run: string): string {
  const file = path.join(run, 'config.json');
  if (!fs.existsSync(file)) throw new Error(`${run} is not a run folder (no config.json)`);
  const model = (readJsonFile(file) as { model?: unknown }).model;
  if (typeof model !== 'string' || model === '') throw new Error(`${file} names no model`);
  return model;
}

export function exportAdapter(o: ExportOptions): { from: string; out: string } {
  const from = runAdapterDir(o.run, o.checkpoint);
  writeFolderAtomic(o.out, (tmp) => fs.cpSync(from, tmp, { recursive: true }));
  return { from, out: o.out };
}
