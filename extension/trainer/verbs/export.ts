// export: copies the adapter of a run (its final adapter, or a given checkpoint's) to a folder, as a PEFT adapter.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { copyContained, leadsOutside, linkRoot, realPathOr, staysInside } from '../../util/containedCopy';
import { writeFolderAtomic } from '../../util/atomicFolder';
import { checkpointPath, latestCheckpoint, listCheckpoints } from '../checkpoints';
import { requiredString, stringOption, UsageError, type ParsedOptions } from '../cliArgs';
import { readJsonFile } from '../../util/jsonFile';
import { assertRunFolder } from '../runFolder';

export interface ExportOptions {
  run: string;
  out: string;
  /** A checkpoint step; default: the run's final adapter, else its newest checkpoint. */
  checkpoint?: number;
}

/**
 * The adapter folder of a run: a checkpoint's when `checkpoint` is given, else the final one, else the newest
 * checkpoint's. One that is a link leading out of the run is refused: what is exported from a run (a folder that may
 * have come with a cloned repository) is the run's own.
 */
export function runAdapterDir(run: string, checkpoint?: number): string {
  const dir = findRunAdapterDir(run, checkpoint);
  const outside = adapterOutsideRun(run, dir);
  if (outside !== null) throw new Error(outside);
  return dir;
}

/** Why the adapter folder `dir` of the run `run` is not the run's own (links lead it outside the run folder); null when it is. */
export function adapterOutsideRun(run: string, dir: string): string | null {
  const root = realPathOr(run);
  return staysInside(dir, root) ? null : `${leadsOutside(dir, root)}; a run's adapter must be inside the run`;
}

function findRunAdapterDir(run: string, checkpoint?: number): string {
  assertRunFolder(run);
  if (checkpoint !== undefined) {
    const dir = checkpointPath(run, checkpoint);
    if (!fs.existsSync(path.join(dir, 'DONE'))) {
      const steps = listCheckpoints(run).map((c) => c.step);
      throw new Error(`${run} has no complete checkpoint at step ${checkpoint} (${steps.length === 0 ? 'it has none yet' : `its checkpoints: step ${steps.join(', ')}`})`);
    }
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
  assertRunFolder(run);
  const model = (readJsonFile(file) as { model?: unknown }).model;
  if (typeof model !== 'string' || model === '') throw new Error(`${file} names no model`);
  return model;
}

/** Copies a run's adapter; links in it that lead outside it are not followed (notCopied: a sentence each). */
export function exportAdapter(o: ExportOptions): { from: string; out: string; notCopied: string[] } {
  const from = runAdapterDir(o.run, o.checkpoint);
  const notCopied = writeFolderAtomic(o.out, (tmp) => copyContained(from, tmp, linkRoot(from)));
  return { from, out: o.out, notCopied };
}

/**
 * The --adapter flag's folder; a run folder given there (the adapter is inside it) is refused with what to give
 * instead, rather than failing later on a missing adapter_config.json.
 */
export function adapterFlag(o: ParsedOptions, options: { required: true; runFlag?: boolean }): string;
export function adapterFlag(o: ParsedOptions, options?: { required?: false; runFlag?: boolean }): string | undefined;
export function adapterFlag(o: ParsedOptions, options: { required?: boolean; runFlag?: boolean } = {}): string | undefined {
  const dir = options.required ? requiredString(o, 'adapter') : stringOption(o, 'adapter');
  if (dir !== undefined && !fs.existsSync(path.join(dir, 'adapter_config.json')) && fs.existsSync(path.join(dir, 'config.json')) && fs.existsSync(path.join(dir, 'events.jsonl'))) {
    const inside = fs.existsSync(path.join(dir, 'adapter', 'adapter_config.json')) ? path.join(dir, 'adapter') : path.join(dir, 'checkpoints', 'step-N', 'adapter');
    throw new UsageError(`--adapter ${dir} is a run folder; give its adapter, --adapter ${inside}${options.runFlag ? `, or the run itself, --run ${dir}` : ''}`);
  }
  return dir;
}
