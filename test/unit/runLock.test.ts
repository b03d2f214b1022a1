// trainer.lock: one trainer per run folder; a lock whose process is gone, or whose pid another process took since,
// or that names another machine, does not count; the release removes only this process's own lock.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { claimRunLock, liveRunLock, readRunLock, RUN_LOCK_FILE, type RunLock } from '../../extension/trainer/runLock';
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
  const release = claimRunLock(runDir, refuse);
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
  const release = claimRunLock(runDir, refuse);
  const theirs = { pid: child.pid!, hostname: os.hostname(), started: now() };
  writeLock(runDir, theirs);
  release();
  assert.deepEqual(readRunLock(runDir), theirs);
});

test('stale or foreign locks do not count: a dead pid, a pid reused since, another machine, a torn file', () => {
  const runDir = tempDir('lock-stale');
  writeLock(runDir, { pid: deadPid(), hostname: os.hostname(), started: now() });
  assert.equal(liveRunLock(runDir), null);
  writeLock(runDir, { pid: process.pid, hostname: `${os.hostname()}-elsewhere`, started: now() });
  assert.equal(liveRunLock(runDir), null);
  if (process.platform === 'linux') {
    // this process started long after the lock: a trainer that died, whose pid this process got
    writeLock(runDir, { pid: process.pid, hostname: os.hostname(), started: new Date(Date.now() - 3_600_000 - process.uptime() * 1000).toISOString() });
    assert.equal(liveRunLock(runDir), null);
  }
  fs.writeFileSync(path.join(runDir, RUN_LOCK_FILE), '{"pid": 12');
  assert.equal(readRunLock(runDir), null);
  const release = claimRunLock(runDir, refuse);
  assert.equal(readRunLock(runDir)?.pid, process.pid);
  release();
});
