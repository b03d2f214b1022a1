// trainer.lock: one trainer per run folder; a lock whose process is gone, or whose pid another process took since,
// or that names another machine, does not count; the release removes only this process's own lock.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { claimRunLock, liveRunLock, readRunLock, RUN_LOCK_FILE, runLockPath, signalableRunLock, STALE_HEARTBEAT_MS, type RunLock } from '../../extension/trainer/runLock';
import { tempDir } from '../helpers/paths';

const writeLock = (runDir: string, lock: RunLock) => fs.writeFileSync(path.join(runDir, RUN_LOCK_FILE), JSON.stringify(lock));
const now = () => new Date().toISOString();
const refuse = (message: string) => new Error(message);

/** The pid of a process that has exited (reaped, so nothing answers to it unless the system reuses it). */
function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', '0']);
  assert.equal(r.status, 0);
  return r.pid;
}

test('a claim writes this process into trainer.lock, and its release removes it', () => {
  const runDir = tempDir('lock-claim');
  const { release } = claimRunLock(runDir, refuse);
  const lock = readRunLock(runDir);
  assert.equal(lock?.pid, process.pid);
  assert.equal(lock?.hostname, os.hostname());
  assert.deepEqual(liveRunLock(runDir), lock);
  // a second trainer (here: a second claim) is refused, naming the holder
  assert.throws(() => claimRunLock(runDir, refuse), new RegExp(`is being trained by process ${process.pid} \\(started `));
  release();
  assert.equal(fs.existsSync(path.join(runDir, RUN_LOCK_FILE)), false);
  assert.equal(liveRunLock(runDir), null);
});

test('a live process of this machine holds the run; another process\'s lock is never released by this one', async () => {
  const runDir = tempDir('lock-other');
  const child = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)'], { stdio: 'ignore' });
  try {
    await new Promise((resolve) => child.once('spawn', resolve));
    writeLock(runDir, { pid: child.pid!, hostname: os.hostname(), started: now() });
    assert.equal(liveRunLock(runDir)?.pid, child.pid);
    assert.throws(() => claimRunLock(runDir, refuse), new RegExp(`is being trained by process ${child.pid}`));
  } finally {
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
  }
  // now stale: the next claim takes the folder over; releasing after someone else took it leaves theirs alone
  const { release } = claimRunLock(runDir, refuse);
  const theirs = { pid: child.pid!, hostname: os.hostname(), started: now() };
  writeLock(runDir, theirs);
  release();
  assert.deepEqual(readRunLock(runDir), theirs);
});

test('stale or foreign locks do not count: a dead pid, a pid another process got since, another machine, a torn file', () => {
  const runDir = tempDir('lock-stale');
  writeLock(runDir, { pid: deadPid(), hostname: os.hostname(), started: now() });
  assert.equal(liveRunLock(runDir), null);
  if (process.platform === 'linux') {
    // this process's own start, as /proc gives it: the lock is live with it, stale with any other start or boot
    const { release } = claimRunLock(runDir, refuse);
    const own = readRunLock(runDir)!;
    assert.ok(own.linuxStart && own.linuxStart.ticks > 0 && own.linuxStart.bootId.length > 0);
    release();
    writeLock(runDir, own);
    assert.equal(liveRunLock(runDir)?.pid, process.pid);
    writeLock(runDir, { ...own, linuxStart: { ...own.linuxStart!, ticks: own.linuxStart!.ticks + 1 } });
    assert.equal(liveRunLock(runDir), null, 'a trainer that died, whose pid this process got');
    writeLock(runDir, { ...own, linuxStart: { ...own.linuxStart!, bootId: 'another-boot' } });
    assert.equal(liveRunLock(runDir), null, 'a lock from before a reboot');
  }
  fs.writeFileSync(runLockPath(runDir), '{"pid": 12');
  assert.equal(readRunLock(runDir), null);
  const { release } = claimRunLock(runDir, refuse);
  assert.equal(readRunLock(runDir)?.pid, process.pid);
  release();
  assert.deepEqual(fs.readdirSync(runDir), [], 'no lock and no temporary file left');
});

test("another machine's lock: the run shows no trainer here, and a trainer here is refused, told what to delete", () => {
  const runDir = tempDir('lock-foreign');
  writeLock(runDir, { pid: process.pid, hostname: `${os.hostname()}-elsewhere`, started: now() });
  assert.equal(liveRunLock(runDir), null);
  assert.throws(() => claimRunLock(runDir, refuse), new RegExp(`is claimed by process ${process.pid} on ${os.hostname()}-elsewhere .*; if no trainer runs there any more, delete ${runLockPath(runDir).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`));
});

test('a release that cannot remove the lock does not throw, and a claim released at exit leaves no lock', () => {
  const runDir = tempDir('lock-release');
  const { release } = claimRunLock(runDir, refuse);
  // the removal fails (as antivirus or an indexer can make it on Windows): the run's outcome must not change
  // (the module object itself: runLock.js reads fs.rmSync from it at the call)
  const nodeFs = require('node:fs') as { rmSync: typeof fs.rmSync };
  const rmSync = nodeFs.rmSync;
  nodeFs.rmSync = () => {
    throw Object.assign(new Error('EBUSY: resource busy or locked'), { code: 'EBUSY' });
  };
  try {
    assert.doesNotThrow(release);
  } finally {
    nodeFs.rmSync = rmSync;
  }
  assert.equal(readRunLock(runDir)?.pid, process.pid, 'the lock stayed (and is stale once this process is gone)');
  // a process that exits without releasing (a second Ctrl-C: process.exit) leaves no lock
  const childRun = path.join(runDir, 'child');
  fs.mkdirSync(childRun);
  const module = path.join(__dirname, '..', '..', 'extension', 'trainer', 'runLock.js');
  const child = spawnSync(process.execPath, ['-e', `require(${JSON.stringify(module)}).claimRunLock(${JSON.stringify(childRun)}, (m) => new Error(m)); process.exit(130)`], { encoding: 'utf8' });
  assert.equal(child.status, 130, child.stderr);
  assert.deepEqual(fs.readdirSync(childRun), []);
});

test('without a start time to check (Windows, macOS), a lock untouched for hours shows no trainer, yet still refuses a claim', () => {
  const runDir = tempDir('lock-heartbeat');
  const { release, heartbeat } = claimRunLock(runDir, refuse);
  const lock = readRunLock(runDir)!;
  release();
  writeLock(runDir, { pid: lock.pid, hostname: lock.hostname, started: lock.started }); // no linuxStart
  const file = runLockPath(runDir);
  const old = new Date(Date.now() - STALE_HEARTBEAT_MS - 60_000);
  fs.utimesSync(file, old, old);
  assert.equal(liveRunLock(runDir), null, 'its trainer may be long gone and the pid another process\'s');
  assert.throws(() => claimRunLock(runDir, refuse), /is being trained by process/, 'but a trainer here waits for certainty');
  // the trainer's heartbeat after each step keeps it live
  const handle = { heartbeat };
  fs.utimesSync(file, old, old);
  handle.heartbeat();
  assert.equal(liveRunLock(runDir)?.pid, process.pid);
});

test('only a trainer is signalled (Stop, Quit Now): on Linux a lock must name its process\'s start and a train or resume command line', { skip: process.platform !== 'linux' && 'Linux only' }, async () => {
  const startOf = (pid: number): RunLock['linuxStart'] => {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const ticks = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]);
    return { bootId: fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim(), ticks };
  };
  const sleeper = (args: string[]) => spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)', ...args], { stdio: 'ignore' });
  const other = sleeper([]);
  const trainer = sleeper(['train', '--out', 'x']);
  try {
    await Promise.all([other, trainer].map((c) => new Promise((resolve) => c.once('spawn', resolve))));
    const runDir = tempDir('lock-signal');
    // planted: another program's pid, no start (as a lock written by hand would be)
    writeLock(runDir, { pid: other.pid!, hostname: os.hostname(), started: now() });
    assert.equal(liveRunLock(runDir)?.pid, other.pid, 'shown as training');
    assert.equal(signalableRunLock(runDir), null, 'but not signalled');
    writeLock(runDir, { pid: other.pid!, hostname: os.hostname(), started: now(), linuxStart: startOf(other.pid!) });
    assert.equal(signalableRunLock(runDir), null, 'its start right, but not a trainer');
    writeLock(runDir, { pid: trainer.pid!, hostname: os.hostname(), started: now(), linuxStart: startOf(trainer.pid!) });
    assert.equal(signalableRunLock(runDir)?.pid, trainer.pid);
  } finally {
    for (const c of [other, trainer]) c.kill('SIGKILL');
  }
});
