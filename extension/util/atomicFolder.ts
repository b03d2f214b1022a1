// Writes a whole folder so that a crash or failure never leaves a half-written one under the real name: fill a
// temporary sibling `<out>.tmp-<pid>`, then rename it to `<out>` (atomic on the same file system).
import * as fs from 'node:fs';
import * as path from 'node:path';

/**
 * Runs `fill(tmp)` on a fresh temporary folder beside `out` and renames it to `out` once `fill` returns. An `out`
 * that exists and is not empty is refused before anything is done; on any failure the temporary folder is removed.
 */
export function writeFolderAtomic<T>(out: string, fill: (tmp: string) => T): T {
  const target = path.resolve(out);
  if (fs.existsSync(target)) {
    if (!fs.statSync(target).isDirectory()) throw new Error(`${out} exists and is not a folder`);
    if (fs.readdirSync(target).length > 0) throw new Error(`${out} already exists and is not empty; choose a new folder or empty it`);
  }
  fs.mkdirSync(path.dirname(target), { recursive: true });
  const tmp = `${target}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true }); // a leftover of an earlier run of this same pid
  fs.mkdirSync(tmp);
  try {
    const result = fill(tmp);
    // An empty target (allowed above) is replaced; rename cannot replace a folder on every platform.
    if (fs.existsSync(target)) fs.rmdirSync(target);
    fs.renameSync(tmp, target);
    return result;
  } catch (err) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
}

/**
 * Like writeFolderAtomic, but for outputs that are meant to be rewritten (a run's adapter, a checkpoint of the same
 * step): `fill` writes a temporary sibling, which then replaces `out` whole. A kill leaves the old `out` or the
 * new one, plus at worst a temporary folder that the next write removes.
 */
export function replaceFolderAtomic<T>(out: string, fill: (tmp: string) => T): T {
  const target = path.resolve(out);
  const tmp = path.join(path.dirname(target), `.${path.basename(target)}.tmp-${process.pid}`);
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  try {
    const result = fill(tmp);
    fs.rmSync(target, { recursive: true, force: true });
    fs.renameSync(tmp, target);
    return result;
  } catch (err) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
}
