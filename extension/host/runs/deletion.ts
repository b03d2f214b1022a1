// What Delete Run may remove: a run folder directly inside the runs directory, itself no link. A cloned repository
// can hold `.qlora/runs` as a link to the folder that holds the workspace (`../..`), where the projects beside it list
// as runs; those are not deleted. A runs directory linked elsewhere (a bigger disk) is the user's own doing, and the
// confirmation names where the folder really is.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { folderKind } from '../../trainer/runFolder';
import { isInsideFolder, realPathOr } from '../../util/containedCopy';

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
  const realRuns = realPathOr(runsDir);
  if (realPathOr(path.dirname(runDir)) !== realRuns) return `${name} is not a folder of the runs directory (${runsDir}); QLoRA Studio deletes only its own runs.`;
  if (workspaceFolders.some((w) => isInsideFolder(realPathOr(w), realRuns)))
    return `${runsDir} leads, through a link, to ${realRuns}, which holds the workspace itself; QLoRA Studio does not delete runs there.`;
  if (folderKind(runDir) !== 'run') return `${runDir} does not hold a run (no config.json naming the model it trains); QLoRA Studio deletes only runs.`;
  return null;
}
