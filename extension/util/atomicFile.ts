// Writes files so that a crash or kill never leaves a half-written file under the real name: write a temporary
// file beside the target, flush it, then rename it over the target (atomic on the same file system).
import * as fs from 'node:fs';
import * as path from 'node:path';
import { entriesOfGoneWriters } from './staleTemp';

export function writeFileAtomic(file: string, data: string | Uint8Array): void {
  writeFileAtomicWith(file, (fd) => fs.writeFileSync(fd, data));
}

/** writeFileAtomic for a file written in parts: `write` writes the whole content through `fd`. */
export function writeFileAtomicWith(file: string, write: (fd: number) => void): void {
  const tmpPrefix = `.${path.basename(file)}.tmp-`;
  const tmp = path.join(path.dirname(file), `${tmpPrefix}${process.pid}`);
  // what writers of this file killed mid-write left (a run's tokenized data can be gigabytes)
  for (const stale of entriesOfGoneWriters(path.dirname(file), tmpPrefix)) fs.rmSync(stale, { force: true });
  try {
    const fd = fs.openSync(tmp, 'w');
    try {
      write(fd);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    syncFolder(path.dirname(file));
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
}

/**
 * Makes renames and new entries in `dir` durable: on POSIX a directory entry reaches the disk only when the directory
 * itself is synced, so a power cut after a rename could otherwise bring back the old name. Best effort: Windows cannot
 * open a folder this way, and some file systems refuse to sync one; the files' data is synced already.
 */
export function syncFolder(dir: string): void {
  if (process.platform === 'win32') return;
  let fd: number | undefined;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch {
    // not possible here; see above
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

/**
 * Flushes every file under `dir` and every folder's entries to disk, before `dir` is renamed into place: files copied
 * into it (fs.copyFileSync, fs.cpSync) are otherwise only in the page cache, and after a power cut the renamed folder
 * could hold them empty. Files already synced cost little. Copies keep their source's permissions, so a file may be
 * read-only: POSIX flushes through a read-only descriptor; Windows needs write access, and a read-only file is left.
 */
export function syncTree(dir: string): void {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) syncTree(p);
    else if (entry.isFile()) syncFile(p);
  }
  syncFolder(dir);
}

function syncFile(file: string): void {
  let fd: number;
  try {
    fd = fs.openSync(file, process.platform === 'win32' ? 'r+' : 'r');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (process.platform === 'win32' && (code === 'EPERM' || code === 'EACCES')) return;
    throw err;
  }
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export function writeJsonAtomic(file: string, value: unknown): void {
  writeFileAtomic(file, JSON.stringify(value, null, 2) + '\n');
}
