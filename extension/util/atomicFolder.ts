// Writes a whole folder so that a crash or failure never leaves a half-written one under the real name: fill a
// temporary sibling `<out>.tmp-<pid>`, then rename it to `<out>` (atomic on the same file system).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { syncFolder, syncTree } from './atomicFile';
import { entriesOfGoneWriters, removeStaleTemps } from './staleTemp';

/**
 * Runs `fill(tmp)` on a fresh temporary folder beside `out` and renames it to `out` once `fill` returns. An `out`
 * that exists and is not empty is refused before anything is done; on any failure the temporary folder is removed.
 */
export function writeFolderAtomic<T>(out: string, fill: (tmp: string) => T): T {
  const target = path.resolve(out);
  assertEmptyOrAbsent(out);
  fs.mkdirSync(path.dirname(target), { recursive: true });
  removeStaleTemps(target, 'tmp'); // what writers killed before left
  const tmp = `${target}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true }); // a leftover of an earlier run of this same pid
  fs.mkdirSync(tmp);
  try {
    const result = fill(tmp);
    // An empty target (allowed above) is replaced; rename cannot replace a folder on every platform.
    syncTree(tmp);
    removeEmptyFolder(target);
    renameFolder(tmp, target);
    syncFolder(path.dirname(target));
    return result;
  } catch (err) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
}

/** Files a desktop puts in any folder it shows (Finder, Explorer): a folder holding only these counts as empty. */
export const DESKTOP_LITTER: ReadonlySet<string> = new Set(['.DS_Store', 'Thumbs.db', 'desktop.ini']);

/** Refuses an output folder that is a file or holds anything (but desktop litter). */
export function assertEmptyOrAbsent(out: string): void {
  const target = path.resolve(out);
  if (!fs.existsSync(target)) return;
  if (!fs.statSync(target).isDirectory()) throw new Error(`${out} exists and is not a folder`);
  if (fs.readdirSync(target).some((name) => !DESKTOP_LITTER.has(name))) throw new Error(`${out} already exists and is not empty; choose a new folder or empty it`);
}

/** Removes a folder assertEmptyOrAbsent let through (and its desktop litter), so that a rename can take its place. */
export function removeEmptyFolder(target: string): void {
  if (!fs.existsSync(target)) return;
  for (const name of fs.readdirSync(target)) if (DESKTOP_LITTER.has(name)) fs.rmSync(path.join(target, name), { force: true });
  fs.rmdirSync(target);
}

/**
 * Like writeFolderAtomic, but for outputs that are meant to be rewritten (a run's adapter): `fill` writes a temporary
 * sibling, the old `out` is renamed aside (`.<name>.old-<pid>`), the new one renamed into place, and only then is the
 * old one removed. A kill leaves the old `out` or the new one under the real name, never a half-removed folder; killed
 * between the two renames, it leaves no `out` and the old one aside, which the next call (or
 * restoreInterruptedReplace) puts back.
 */
export function replaceFolderAtomic<T>(out: string, fill: (tmp: string) => T): T {
  const target = path.resolve(out);
  restoreInterruptedReplace(target);
  removeLeftovers(target);
  const tmp = siblingName(target, 'tmp', process.pid);
  const aside = siblingName(target, 'old', process.pid);
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  let result: T;
  try {
    result = fill(tmp);
    syncTree(tmp);
    if (fs.existsSync(target)) renameFolder(target, aside);
    try {
      renameFolder(tmp, target);
    } catch (err) {
      if (fs.existsSync(aside)) renameFolder(aside, target);
      throw err;
    }
  } catch (err) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  syncFolder(path.dirname(target));
  fs.rmSync(aside, { recursive: true, force: true });
  return result;
}

/**
 * Removes a folder so that no reader ever sees it half removed (a recursive delete goes file by file, and a kill
 * in the middle would leave, say, a checkpoint's DONE beside a missing adapter): it is first renamed to a hidden
 * sibling (`.<name>.del-<pid>`), which is then deleted. A kill leaves at worst that hidden sibling, which
 * replaceFolderAtomic and removeLeftovers clear.
 */
export function removeFolderAtomic(dir: string): void {
  const target = path.resolve(dir);
  if (!fs.existsSync(target)) return;
  // its own tag: a folder on its way out is never put back (restoreInterruptedReplace takes only 'old')
  const aside = siblingName(target, 'del', process.pid);
  fs.rmSync(aside, { recursive: true, force: true });
  renameFolder(target, aside);
  syncFolder(path.dirname(target));
  fs.rmSync(aside, { recursive: true, force: true });
}

/**
 * A replaceFolderAtomic killed between its two renames leaves no `target` and its previous contents at
 * `.<name>.old-<pid>`: puts them back. Only an aside whose process is gone (a live writer is between its renames).
 */
export function restoreInterruptedReplace(target: string): void {
  const full = path.resolve(target);
  if (fs.existsSync(full)) return;
  const aside = deadSiblings(full, 'old')[0];
  if (aside === undefined) return;
  try {
    renameFolder(aside, full);
  } catch {
    // another reader put it back first, or the folder cannot be written (a read-only mount): listing goes on
  }
}

/**
 * Removes the siblings (`.<name>.tmp-<pid>`, `.<name>.old-<pid>`, `.<name>.del-<pid>`) that processes now gone left
 * while writing, replacing or removing `target`.
 */
export function removeLeftovers(target: string): void {
  const full = path.resolve(target);
  for (const tag of SIBLING_TAGS) for (const dir of deadSiblings(full, tag)) fs.rmSync(dir, { recursive: true, force: true });
}

/** tmp: being written; old: replaced, put back if its writer died before the new one was in place; del: being removed. */
const SIBLING_TAGS = ['tmp', 'old', 'del'] as const;
type SiblingTag = (typeof SIBLING_TAGS)[number];

function siblingName(target: string, tag: SiblingTag, pid: number): string {
  return path.join(path.dirname(target), `.${path.basename(target)}.${tag}-${pid}`);
}

/** `.<name>.<tag>-<pid>` siblings of `target` whose process no longer runs. */
function deadSiblings(target: string, tag: SiblingTag): string[] {
  return entriesOfGoneWriters(path.dirname(target), `.${path.basename(target)}.${tag}-`);
}

/**
 * Renames a folder. On Windows a folder cannot be renamed while any file in it is open, and antivirus scanners and
 * the search indexer open new files for a moment: there the rename is tried again for up to about two seconds.
 */
export function renameFolder(from: string, to: string): void {
  for (let attempt = 0; ; attempt++) {
    try {
      fs.renameSync(from, to);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (process.platform !== 'win32' || attempt >= 20 || !['EPERM', 'EACCES', 'EBUSY'].includes(code ?? '')) throw err;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100); // a synchronous pause
    }
  }
}
