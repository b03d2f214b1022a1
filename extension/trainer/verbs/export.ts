// export: copies the adapter of a run (its final adapter, or a given checkpoint's) to a folder, as a PEFT adapter.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { writeFolderAtomic } from '../../util/atomicFolder';
import { checkpointPath, latestCheckpoint } from '../checkpoints';

export interface ExportOptions {
  run: string;
  out: string;
  /** A checkpoint step; default: the run's final adapter, else its newest checkpoint. */
  checkpoint?: number;
}

export function exportAdapter(o: ExportOptions): { from: string; out: string } {
  if (!fs.existsSync(path.join(o.run, 'config.json'))) throw new Error(`${o.run} is not a run folder (no config.json)`);
  let from: string;
  if (o.checkpoint !== undefined) {
    const dir = checkpointPath(o.run, o.checkpoint);
    if (!fs.existsSync(path.join(dir, 'DONE'))) throw new Error(`${o.run} has no complete checkpoint at step ${o.checkpoint}`);
    from = path.join(dir, 'adapter');
  } else if (fs.existsSync(path.join(o.run, 'adapter', 'adapter_model.safetensors'))) {
    from = path.join(o.run, 'adapter');
  } else {
    const latest = latestCheckpoint(o.run);
    if (!latest) throw new Error(`${o.run} has no adapter and no complete checkpoint yet`);
    from = path.join(latest.dir, 'adapter');
  }
  writeFolderAtomic(o.out, (tmp) => fs.cpSync(from, tmp, { recursive: true }));
  return { from, out: o.out };
}
