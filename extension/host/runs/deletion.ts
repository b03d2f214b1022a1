// What Delete Run may remove: a run folder directly inside the runs directory, itself no link, in a runs directory
// that stays where it seems to be. A cloned repository can hold `.qlora/runs` as a link to a folder outside it, where
// other projects then list as runs; removing one of those from a confirmation that names a path inside the workspace
// must not happen.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { folderKind } from '../../trainer/runFolder';

/** Why `runDir` must not be deleted, in a sentence; null when it may be. */
export function deletionRefusal(runDir: string, runsDir: string, workspaceFolders: readonly string[]): string | null {
  const name = path.basename(runDir);
  let stat: fs.Stats;
  try {
    stat = fs.lstatSync(runDir);
  } catch {
    return `${runDir} is not there any more.`;
  }
  if (stat.isSymbolicLink() || !stat.isDirectory()) return `${runDir} is a link or not a folder; QLoRA Studio deletes only run folders.`;
  const realRuns = realPath(runsDir);
  if (realRuns === null || realPath(path.dirname(runDir)) !== realRuns)
    return `${name} is not a folder of the runs directory (${runsDir}); QLoRA Studio deletes only its own runs.`;
  const inWorkspace = workspaceFolders.find((w) => isInside(path.resolve(runsDir), path.resolve(w)));
  if (inWorkspace !== undefined) {
    const realWorkspace = realPath(inWorkspace);
    if (realWorkspace === null || !isInside(realRuns, realWorkspace))
      return `${runsDir} leads outside the workspace (to ${realRuns}) through a link; QLoRA Studio does not delete runs there.`;
  }
  if (folderKind(runDir) !== 'run') return `${runDir} does not hold a run (no config.json naming the model it trains); QLoRA Studio deletes only runs.`;
  return null;
}

function realPath(p: string): string | null {
  try {
    return fs.realpathSync(p);
  } catch {
    return null;
  }
}

/** Whether `p` is `folder` or inside it (both absolute and resolved). */
function isInside(p: string, folder: string): boolean {
  const rel = path.relative(folder, p);
  return rel === '' || (rel !== '..' && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel));
}
