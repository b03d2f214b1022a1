// <run>/trainer.lock: which process is training a run now. The trainer writes it before its first event and removes it
// when it ends; a kill leaves it behind, and then its process is gone (or is another program that got the same pid,
// which on Linux its start time tells apart). Two trainers never write one run folder, and a window that did not
// start the trainer (a reloaded window, a terminal's run) still sees the run as training. Pure Node (no vscode).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export interface RunLock {
  pid: number;
  hostname: string;
  /** When the trainer started (ISO time). */
  started: string;
}

export const RUN_LOCK_FILE = 'trainer.lock';

export function readRunLock(runDir: string): RunLock | null {
  let value: unknown;
  try {
    value = JSON.parse(fs.readFileSync(path.join(runDir, RUN_LOCK_FILE), 'utf8'));
  } catch {
    return null; // none, or cut short by a kill while it was written (then no trainer got as far as training)
  }
  const v = value as Partial<RunLock> | null;
  if (!v || typeof v.pid !== 'number' || !Number.isInteger(v.pid) || v.pid <= 0 || typeof v.hostname !== 'string' || typeof v.started !== 'string') return null;
  return { pid: v.pid, hostname: v.hostname, started: v.started };
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'; // alive, another user's
  }
}

// Linux only: when a process started (ms since the epoch), from /proc/<pid>/stat's 22nd field (clock ticks since
// boot; USER_HZ is 100 on every Linux that Node runs on) and /proc/stat's boot time.
function linuxStartTime(pid: number): number | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // the command name (field 2) may hold spaces and parentheses: the fields after it follow its last ')'
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[19]);
    const boot = /^btime (\d+)$/m.exec(fs.readFileSync('/proc/stat', 'utf8'));
    if (!boot || !Number.isFinite(ticks)) return undefined;
    return Number(boot[1]) * 1000 + ticks * 10;
  } catch {
    return undefined;
  }
}

/**
 * The lock's process when it is alive on this machine: the run is training. null when there is no lock, it is stale
 * (its process is gone, or its pid now belongs to a process started after the lock), or it names another machine
 * (a runs folder on a network share: there is no telling, and the log decides).
 */
export function liveRunLock(runDir: string): RunLock | null {
  const lock = readRunLock(runDir);
  if (!lock || lock.hostname !== os.hostname() || !processExists(lock.pid)) return null;
  const startedAt = process.platform === 'linux' ? linuxStartTime(lock.pid) : undefined;
  // the trainer writes its lock after it started, so a process that started later is another one with the same pid
  // (2 s of slack for the boot time's whole seconds and the clock's ticks)
  if (startedAt !== undefined && startedAt > Date.parse(lock.started) + 2000) return null;
  return lock;
}

export function describeRunLock(lock: RunLock): string {
  return `process ${lock.pid} (started ${lock.started})`;
}

/**
 * Claims the run folder for this process; throws `makeError`'s error when a live trainer holds it already.
 * Returns the release, which removes the lock only while it is still this process's.
 */
export function claimRunLock(runDir: string, makeError: (message: string) => Error): () => void {
  const file = path.join(runDir, RUN_LOCK_FILE);
  const mine: RunLock = { pid: process.pid, hostname: os.hostname(), started: new Date().toISOString() };
  // 'wx' creates the file only where there is none, so of two trainers started together one gets the run
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      fs.writeFileSync(file, JSON.stringify(mine) + '\n', { flag: 'wx' });
      return () => {
        const now = readRunLock(runDir);
        if (now && now.pid === mine.pid && now.started === mine.started) fs.rmSync(file, { force: true });
      };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const holder = liveRunLock(runDir);
    if (holder) throw makeError(`${runDir} is being trained by ${describeRunLock(holder)}; stop that run first`);
    fs.rmSync(file, { force: true }); // a killed trainer's
  }
  throw makeError(`could not claim ${file}: another trainer keeps claiming it`);
}
