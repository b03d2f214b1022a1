// <run>/trainer.lock: which process is training a run now. The trainer writes it before its first event and removes it
// when it ends; a kill leaves it behind, and then its process is gone (or is another program that got the same pid,
// which Linux tells apart by the process's start). Two trainers never write one run folder, and a window that did
// not start the trainer (a reloaded window, a terminal's run) still sees the run as training. Pure Node (no vscode).
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

export interface RunLock {
  pid: number;
  hostname: string;
  /** When the trainer started (ISO time). */
  started: string;
  /** Linux: the boot and the process's start in clock ticks since it, exactly as /proc says (absent elsewhere). */
  linuxStart?: { bootId: string; ticks: number };
}

export const RUN_LOCK_FILE = 'trainer.lock';

export const runLockPath = (runDir: string) => path.join(runDir, RUN_LOCK_FILE);

function parseRunLock(text: string): RunLock | null {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return null;
  }
  const v = value as Partial<RunLock> | null;
  if (!v || typeof v.pid !== 'number' || !Number.isInteger(v.pid) || v.pid <= 0 || typeof v.hostname !== 'string' || typeof v.started !== 'string') return null;
  const lock: RunLock = { pid: v.pid, hostname: v.hostname, started: v.started };
  const ls = v.linuxStart as { bootId?: unknown; ticks?: unknown } | undefined;
  if (ls && typeof ls.bootId === 'string' && typeof ls.ticks === 'number') lock.linuxStart = { bootId: ls.bootId, ticks: ls.ticks };
  return lock;
}

export function readRunLock(runDir: string): RunLock | null {
  try {
    return parseRunLock(fs.readFileSync(runLockPath(runDir), 'utf8'));
  } catch {
    return null; // none
  }
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'; // alive, another user's
  }
}

/** Linux: the process's state letter and start (clock ticks since boot), from /proc/<pid>/stat; undefined elsewhere. */
function linuxProcessStart(pid: number | 'self'): { state: string; ticks: number } | undefined {
  if (process.platform !== 'linux') return undefined;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // the command name (field 2) may hold spaces and parentheses: the fields after it follow its last ')'
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[19]);
    return Number.isFinite(ticks) ? { state: fields[0], ticks } : undefined;
  } catch {
    return undefined;
  }
}

function linuxBootId(): string | undefined {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return undefined;
  }
}

function ownLinuxStart(): RunLock['linuxStart'] {
  const start = linuxProcessStart('self');
  const bootId = linuxBootId();
  return start && bootId ? { bootId, ticks: start.ticks } : undefined;
}

/** Whether the lock's process is still the trainer that wrote it (this machine's locks only). */
function holderAlive(lock: RunLock): boolean {
  if (!processExists(lock.pid)) return false;
  const now = linuxProcessStart(lock.pid);
  if (now === undefined) return true; // not Linux, or /proc unreadable: the pid is all there is to go by
  if (now.state === 'Z' || now.state === 'X') return false; // exited, not yet reaped
  // a pid another process got since (after a kill, or a reboot) starts at another tick, or in another boot
  if (lock.linuxStart) return lock.linuxStart.bootId === linuxBootId() && lock.linuxStart.ticks === now.ticks;
  return true;
}

/**
 * The lock's process when it is alive on this machine: the run is training. null when there is no lock, it is stale
 * (its process is gone, or its pid now belongs to another process), or it names another machine (a runs folder on a
 * network share: there is no telling from here, and the log decides what the run shows).
 */
export function liveRunLock(runDir: string): RunLock | null {
  const lock = readRunLock(runDir);
  if (!lock || lock.hostname !== os.hostname() || !holderAlive(lock)) return null;
  // Where the pid is all there is to go by (Windows, macOS), a lock its trainer has not touched for a long time is
  // taken for a killed trainer's whose pid another process got; for showing the run only: a trainer is still
  // refused the folder (claimRunLock), since a step can outlast any such limit.
  if (!lock.linuxStart && Date.now() - lockTouched(runDir) > STALE_HEARTBEAT_MS) return null;
  return lock;
}

/**
 * The live lock's process when it may be signalled (Stop, Quit Now): on Linux only a lock that names its process's
 * start (which every trainer writes there) and a process whose command line is a trainer's (a `train` or `resume`
 * verb), so that a trainer.lock planted in a run folder cannot direct a signal at another program. Elsewhere the pid
 * is all there is to go by.
 */
export function signalableRunLock(runDir: string): RunLock | null {
  const lock = liveRunLock(runDir);
  if (!lock || process.platform !== 'linux') return lock;
  if (!lock.linuxStart) return null;
  let args: string[];
  try {
    args = fs.readFileSync(`/proc/${lock.pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return null;
  }
  return args.includes('train') || args.includes('resume') ? lock : null;
}

/** A trainer touches its lock after every step and eval; far longer without a touch, and no pid check beside it, is a stale lock. */
export const STALE_HEARTBEAT_MS = 2 * 60 * 60 * 1000;

function lockTouched(runDir: string): number {
  try {
    return fs.statSync(runLockPath(runDir)).mtimeMs;
  } catch {
    return 0;
  }
}

export function describeRunLock(lock: RunLock): string {
  return `process ${lock.pid}${lock.hostname === os.hostname() ? '' : ` on ${lock.hostname}`} (started ${lock.started})`;
}

export interface RunLockHandle {
  /** Removes the lock while it is still this process's; never throws (a lock it could not remove is stale once this process is gone). */
  release(): void;
  /** Says the trainer is alive (the lock's modification time), for machines where the pid is all there is to go by. */
  heartbeat(): void;
}

/**
 * Claims the run folder for this process; throws `makeError`'s error when a live trainer holds it (or one on another
 * machine might). The release also runs at exit, for an exit that skips it (a second Ctrl-C).
 */
export function claimRunLock(runDir: string, makeError: (message: string) => Error): RunLockHandle {
  const file = runLockPath(runDir);
  const mine: RunLock = { pid: process.pid, hostname: os.hostname(), started: new Date().toISOString() };
  const linuxStart = ownLinuxStart();
  if (linuxStart) mine.linuxStart = linuxStart;
  const text = JSON.stringify(mine) + '\n';
  for (let attempt = 0; attempt < 3; attempt++) {
    if (createWhole(file, text)) {
      const release = () => {
        process.off('exit', release);
        try {
          const now = readRunLock(runDir);
          if (now && now.pid === mine.pid && now.started === mine.started) fs.rmSync(file, { force: true });
        } catch {
          // best effort: see above
        }
      };
      process.on('exit', release);
      const heartbeat = () => {
        try {
          const t = new Date();
          fs.utimesSync(file, t, t);
        } catch {
          // a lock someone removed: the run shows as not training elsewhere, which is all it costs
        }
      };
      return { release, heartbeat };
    }
    const holder = readRunLock(runDir);
    if (holder && holder.hostname !== os.hostname())
      throw makeError(`${runDir} is claimed by ${describeRunLock(holder)}; if no trainer runs there any more, delete ${file}`);
    if (holder && holderAlive(holder)) throw makeError(`${runDir} is being trained by ${describeRunLock(holder)}; stop that run first`);
    breakStaleLock(file, holder);
  }
  throw makeError(`could not claim ${file}: other trainers keep claiming it`);
}

/**
 * Creates `file` holding `text` only where there is none, whole: written beside it, then hard-linked into place
 * (the link fails when the file exists, so of two trainers one wins, and no reader sees it half written). Where
 * the file system has no hard links, an exclusive create instead. False when the file exists.
 */
function createWhole(file: string, text: string): boolean {
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, text);
  try {
    fs.linkSync(tmp, file);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return false;
    try {
      fs.writeFileSync(file, text, { flag: 'wx' });
      return true;
    } catch (err2) {
      if ((err2 as NodeJS.ErrnoException).code === 'EEXIST') return false;
      throw err2;
    }
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

/**
 * Removes a stale lock (`judged`: what was read of it; null when unreadable) without removing a fresh one that
 * another trainer put in its place meanwhile: the lock is moved aside first and looked at; if it is not the one
 * judged, it is moved back.
 */
function breakStaleLock(file: string, judged: RunLock | null): void {
  const aside = `${file}.stale-${process.pid}`;
  try {
    fs.renameSync(file, aside);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return; // another claimer removed it: try again
    throw err;
  }
  let moved: RunLock | null = null;
  try {
    moved = parseRunLock(fs.readFileSync(aside, 'utf8'));
  } catch {
    moved = null;
  }
  const same = moved === null ? judged === null : judged !== null && moved.pid === judged.pid && moved.started === judged.started;
  if (!same) {
    try {
      fs.linkSync(aside, file); // back where it was, unless yet another claimer took the place
    } catch {
      // that claimer holds the run now; ours goes on to find it
    }
  }
  fs.rmSync(aside, { force: true });
}
