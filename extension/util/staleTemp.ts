// Temporary files and folders are named `<target>.<tag>-<pid>` while they are written, then renamed or removed. A
// process killed mid-write (kill -9, power loss) leaves its temporary behind; the next writer of the same target
// removes those whose process is gone.
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Whether a process with this id runs (on this machine). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'; // exists, owned by someone else
  }
}

/** Removes `<target>.<tag>-<pid>...` entries beside `target` whose process no longer runs; returns what it removed. */
export function removeStaleTemps(target: string, tag: string): string[] {
  const full = path.resolve(target);
  const removed = entriesOfGoneWriters(path.dirname(full), `${path.basename(full)}.${tag}-`);
  for (const entry of removed) fs.rmSync(entry, { recursive: true, force: true });
  return removed;
}

/**
 * Paths in `dir` named `<prefix><pid>...` whose process is gone (not this one, not a running one): what writers that
 * name their work in progress so left behind. The pid leads what follows the prefix: `<target>.merge-tmp-<pid>.tmp-<pid>`
 * is one writer's temporary inside another's.
 */
export function entriesOfGoneWriters(dir: string, prefix: string): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return [];
  }
  return names
    .filter((name) => {
      if (!name.startsWith(prefix)) return false;
      const pid = Number(/^\d+/.exec(name.slice(prefix.length))?.[0]);
      return Number.isInteger(pid) && pid > 0 && pid !== process.pid && !isAlive(pid);
    })
    .map((name) => path.join(dir, name));
}
