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
  const dir = path.dirname(path.resolve(target));
  const prefix = `${path.basename(target)}.${tag}-`;
  const removed: string[] = [];
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    if (!name.startsWith(prefix)) continue;
    // the pid leads what follows the prefix: `<target>.merge-tmp-<pid>.tmp-<pid>` is one writer's temporary inside another's
    const pid = Number(/^\d+/.exec(name.slice(prefix.length))?.[0]);
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid || isAlive(pid)) continue;
    fs.rmSync(path.join(dir, name), { recursive: true, force: true });
    removed.push(path.join(dir, name));
  }
  return removed;
}
