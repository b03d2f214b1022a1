// Run status from events.jsonl (resumed runs, crashes, broken logs) and the registry over real folders with a fake
// trainer process: scanning, the live run's events and snapshot, and how its end is reported.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { RunRegistry } from '../../extension/host/runs/registry';
import { deriveRunInfo, deriveStatus, listRunFolders, readEventFile, type RunFacts } from '../../extension/host/runs/runState';
import { TrainerProcess } from '../../extension/host/trainerProcess';
import { serializeEvent, type TrainerEvent } from '../../extension/protocol/events';
import { claimRunLock, RUN_LOCK_FILE } from '../../extension/trainer/runLock';
import type { RunStatus } from '../../extension/protocol/webview';
import { tempDir } from '../helpers/paths';
import { ev, fakeFork, memoryOutput, tick } from './hostFakes';

const facts = (events: TrainerEvent[], more: Partial<RunFacts> = {}): RunFacts => ({ runDir: '/runs/r', events, hasCheckpoint: false, live: false, modified: new Date(0), ...more });

test('status from the events of the current attempt', () => {
  const s = (events: TrainerEvent[], more: Partial<RunFacts> = {}) => deriveStatus(facts(events, more));
  assert.deepEqual(s([ev.started('/r'), ev.step(1, 2), ev.finished('completed', 10)]), { status: 'finished' });
  assert.deepEqual(s([ev.started('/r'), ev.finished('stopped', 4)]), { status: 'stopped' });
  assert.deepEqual(s([ev.started('/r'), ev.error('diverged'), ev.finished('failed', 3)]), { status: 'failed', error: 'diverged' });
  assert.deepEqual(s([ev.started('/r'), ev.error('out of memory')]), { status: 'failed', error: 'out of memory' });
  // A failed attempt, then a resume that completed: the history does not count.
  assert.deepEqual(s([ev.started('/r'), ev.error('x'), ev.finished('failed', 3), ev.started('/r', 10, 2), ev.finished('completed', 10)]), { status: 'finished' });
  // Killed without a word: resumable with a checkpoint, failed without one.
  assert.deepEqual(s([ev.started('/r'), ev.step(5, 2)], { hasCheckpoint: true }), { status: 'stopped' });
  assert.equal(s([ev.started('/r'), ev.step(5, 2)]).status, 'failed');
  assert.deepEqual(s([ev.started('/r')], { live: true }), { status: 'running' });
  assert.deepEqual(s([], { parseError: 'events.jsonl line 2: not valid JSON' }), { status: 'failed', error: 'events.jsonl line 2: not valid JSON' });
  assert.deepEqual(s([ev.started('/r'), ev.finished('stopped', 4)], { exitFailure: 'killed (SIGKILL)' }), { status: 'failed', error: 'killed (SIGKILL)' });
});

test('run info: progress, loss and time of the last event', () => {
  const info = deriveRunInfo(facts([ev.started('/r', 500), ev.step(119, 1.3, 500), ev.step(120, 1.234, 500, '2026-11-24T10:05:00.000Z')], { hasCheckpoint: true }));
  assert.equal(info.name, 'r');
  assert.equal(info.step, 120);
  assert.equal(info.totalSteps, 500);
  assert.equal(info.loss, 1.234);
  assert.equal(info.updated.toISOString(), '2026-11-24T10:05:00.000Z');
  const empty = deriveRunInfo(facts([], { modified: new Date(5) }));
  assert.deepEqual([empty.step, empty.totalSteps, empty.loss, empty.updated.getTime()], [0, null, null, 5]);
});

function writeRun(runsDir: string, name: string, events: TrainerEvent[], tail = '', checkpointStep?: number): string {
  const dir = path.join(runsDir, name);
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ model: '/m', data: '/d.jsonl' }));
  fs.writeFileSync(path.join(dir, 'events.jsonl'), events.map((e) => serializeEvent(e) + '\n').join('') + tail);
  if (checkpointStep !== undefined) {
    fs.mkdirSync(path.join(dir, 'checkpoints', `step-${checkpointStep}`), { recursive: true });
    fs.writeFileSync(path.join(dir, 'checkpoints', `step-${checkpointStep}`, 'DONE'), '{}');
  }
  return dir;
}

test('event files: a partial last line is skipped, a broken line is a parse error, a missing file is no events', () => {
  const runs = tempDir('host-files');
  const partial = writeRun(runs, 'partial', [ev.started('/r'), ev.step(1, 2)], '{"kind":"st');
  assert.equal(readEventFile(partial).events.length, 2);
  const broken = writeRun(runs, 'broken', [ev.started('/r')], 'not json\n');
  const b = readEventFile(broken);
  assert.deepEqual(b.events, []);
  assert.match(b.parseError ?? '', /broken.events\.jsonl line 2: not valid JSON/);
  fs.mkdirSync(path.join(runs, 'no-config'));
  fs.writeFileSync(path.join(runs, 'stray.txt'), '');
  assert.deepEqual(listRunFolders(runs).map((d) => path.basename(d)).sort(), ['broken', 'partial']);
  assert.deepEqual(listRunFolders(path.join(runs, 'missing')), []);
  assert.deepEqual(readEventFile(path.join(runs, 'no-config')), { events: [] });
  // a log past the bound is not read into the window (a runs folder can hold anything)
  const size = fs.statSync(path.join(partial, 'events.jsonl')).size;
  assert.deepEqual(readEventFile(partial, size - 1), { events: [], parseError: `events.jsonl is 0 MiB, more than the window reads (0 MiB)` });
  assert.equal(readEventFile(partial, size).events.length, 2);
});

function registry(runsDir: string, pollMs?: number) {
  const f = fakeFork();
  const trainer = new TrainerProcess(() => ({ cliPath: '/cli.js', execPath: '/node' }), memoryOutput(), f.fork);
  const runs = new RunRegistry(trainer, () => runsDir, 5, pollMs);
  const statuses: { runDir: string; status: RunStatus; message?: string }[] = [];
  const live: TrainerEvent[] = [];
  let changes = 0;
  runs.onDidChangeStatus((s) => statuses.push(s));
  runs.onDidReceiveEvent(({ event }) => live.push(event));
  runs.onDidChangeRuns(() => changes++);
  return { ...f, trainer, runs, statuses, live, changes: () => changes };
}

test('the registry lists runs newest first with their status, and re-reads a log only when it changes', async () => {
  const runsDir = tempDir('host-registry');
  writeRun(runsDir, 'old', [ev.started('/r'), { ...ev.finished('completed', 10), time: '2026-01-01T00:00:00.000Z' }]);
  writeRun(runsDir, 'killed', [ev.started('/r'), { ...ev.step(5, 1.5), time: '2026-02-01T00:00:00.000Z' }], '', 5);
  writeRun(runsDir, 'broken', [ev.started('/r')], '{oops}\n');
  const r = registry(runsDir);
  const list = r.runs.list();
  const byName = Object.fromEntries(list.map((x) => [x.name, x]));
  assert.equal(byName.old.status, 'finished');
  assert.equal(byName.killed.status, 'stopped');
  assert.equal(byName.broken.status, 'failed');
  assert.match(byName.broken.error ?? '', /line 2/);
  assert.deepEqual(list.map((x) => x.name).slice(1), ['killed', 'old']);
  assert.equal(r.runs.activeRun(), undefined);
  assert.equal(r.runs.snapshot(path.join(runsDir, 'old')).events.length, 2);

  // A run the CLI made appears on refresh (the file watcher schedules one).
  writeRun(runsDir, 'from-cli', [ev.started('/r'), ev.finished('stopped', 2)]);
  r.runs.scheduleRefresh();
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.ok(r.runs.list().some((x) => x.name === 'from-cli' && x.status === 'stopped'));
  assert.ok(r.changes() >= 1);
  // the periodic look beside the watcher tells listeners only of a change
  const before = r.changes();
  r.runs.refreshIfChanged();
  assert.equal(r.changes(), before);
  writeRun(runsDir, 'from-terminal', [ev.started('/r'), ev.finished('completed', 2)]);
  r.runs.refreshIfChanged();
  assert.equal(r.changes(), before + 1);
  assert.ok(r.runs.list().some((x) => x.name === 'from-terminal' && x.status === 'finished'));
  r.runs.dispose();
});

test('a live run: running from the start, IPC events in its snapshot, failed with the reason when it dies', async () => {
  const runsDir = tempDir('host-live');
  const r = registry(runsDir);
  const runDir = path.join(runsDir, 'live');
  const run = r.trainer.start('train', runDir, []);
  assert.deepEqual(r.statuses, [{ runDir, status: 'running' }]);
  assert.equal(r.runs.activeRun()?.status, 'running', 'listed before the trainer wrote its folder');
  const child = r.children[0];
  child.emit('message', ev.started(runDir, 50));
  child.emit('message', ev.step(1, 2.25, 50));
  assert.deepEqual(r.live.map((e) => e.kind), ['run-started', 'step']);
  assert.deepEqual(r.runs.snapshot(runDir).events.map((e) => e.kind), ['run-started', 'step']);
  assert.equal(r.runs.snapshot(runDir).status, 'running');
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(r.runs.activeRun()?.step, 1);
  assert.equal(r.runs.activeRun()?.loss, 2.25);

  writeRun(runsDir, 'live', [ev.started(runDir, 50), ev.step(1, 2.25, 50)], '', 1);
  child.stderr.write('Segmentation fault (core dumped)\n');
  child.exit(null, 'SIGSEGV');
  await run.ended;
  await tick();
  assert.deepEqual(r.statuses.at(-1), { runDir, status: 'failed', message: 'Segmentation fault (core dumped)' });
  assert.equal(r.runs.activeRun(), undefined);
  const info = r.runs.list().find((x) => x.runDir === runDir);
  assert.equal(info?.status, 'failed', 'a crash seen by this window is a failure even with a checkpoint');
  assert.equal(info?.error, 'Segmentation fault (core dumped)');

  // Resumed: the history from events.jsonl comes first in the snapshot, and the old failure is forgotten.
  const resumed = r.trainer.start('resume', runDir);
  assert.equal(r.runs.snapshot(runDir).events.length, 2);
  r.children[1].emit('message', ev.started(runDir, 50, 1));
  assert.equal(r.runs.snapshot(runDir).events.length, 3);
  r.children[1].emit('message', ev.finished('completed', 50));
  fs.appendFileSync(path.join(runDir, 'events.jsonl'), serializeEvent(ev.started(runDir, 50, 1)) + '\n' + serializeEvent(ev.finished('completed', 50)) + '\n');
  r.children[1].exit(0);
  await resumed.ended;
  assert.deepEqual(r.statuses.at(-1), { runDir, status: 'finished' });
  assert.equal(r.runs.list().find((x) => x.runDir === runDir)?.status, 'finished');
  r.runs.dispose();
});

test('a run another process trains (its trainer.lock): running, followed through its log, and its end noticed', async () => {
  const runsDir = tempDir('host-elsewhere');
  const other = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)'], { stdio: 'ignore' });
  await new Promise((resolve) => other.once('spawn', resolve));
  try {
    const runDir = writeRun(runsDir, 'terminal', [ev.started('/r', 50), ev.step(1, 2.5, 50)], '', 1);
    fs.writeFileSync(path.join(runDir, RUN_LOCK_FILE), JSON.stringify({ pid: other.pid, hostname: os.hostname(), started: new Date().toISOString() }));
    const r = registry(runsDir, 20);
    const info = r.runs.list()[0];
    assert.equal(info.status, 'running');
    assert.equal(info.trainedBy?.startsWith(`process ${other.pid} (started `), true);
    assert.equal(r.runs.activeRun(), undefined, "another process's run is not this window's trainer");
    assert.deepEqual(r.statuses, [{ runDir, status: 'running' }]);
    assert.equal(r.runs.snapshot(runDir).status, 'running');

    // what it appends reaches the panels as this window's trainer's events would
    fs.appendFileSync(path.join(runDir, 'events.jsonl'), serializeEvent(ev.step(2, 2.25, 50)) + '\n');
    r.runs.refresh();
    assert.deepEqual(r.live.map((e) => e.kind), ['step']);

    // killed: no file changes, but the poll sees the process gone; with a checkpoint the run is resumable
    other.kill('SIGKILL');
    await new Promise((resolve) => other.once('exit', resolve));
    await new Promise((resolve) => setTimeout(resolve, 80));
    assert.equal(r.runs.list()[0].status, 'stopped');
    assert.equal(r.runs.list()[0].trainedBy, undefined);
    assert.deepEqual(r.statuses.at(-1), { runDir, status: 'stopped' });
    r.runs.dispose();
  } finally {
    other.kill('SIGKILL');
  }
});

/** A lock naming this test process as the trainer (on Linux with its exact start, as a trainer writes it). */
function lockByThisProcess(runDir: string): void {
  const { release } = claimRunLock(runDir, (m) => new Error(m));
  const lock = fs.readFileSync(path.join(runDir, RUN_LOCK_FILE), 'utf8');
  release();
  fs.writeFileSync(path.join(runDir, RUN_LOCK_FILE), lock);
}

test('a run another process finishes: its last events, written before it let go of the lock, are followed too', async (t) => {
  const runsDir = tempDir('host-elsewhere-end');
  const runDir = writeRun(runsDir, 'terminal', [ev.started('/r', 50)], '', undefined);
  lockByThisProcess(runDir);
  const r = registry(runsDir, 1000);
  t.after(() => r.runs.dispose());
  assert.equal(r.runs.list()[0].status, 'running');
  fs.appendFileSync(path.join(runDir, 'events.jsonl'), serializeEvent(ev.finished('completed', 50)) + '\n');
  fs.rmSync(path.join(runDir, RUN_LOCK_FILE));
  r.runs.refresh();
  assert.deepEqual(r.live.map((e) => e.kind), ['finished']);
  assert.deepEqual(r.statuses, [{ runDir, status: 'running' }, { runDir, status: 'finished' }]);
});

test('events another process appends reach a panel that opens the run on its run-started exactly once', (t) => {
  const runsDir = tempDir('host-elsewhere-once');
  const runDir = writeRun(runsDir, 'terminal', [], '');
  const r = registry(runsDir, 1000);
  t.after(() => r.runs.dispose());
  r.runs.list();
  // the lock, run-started and two steps land between two reads
  lockByThisProcess(runDir);
  fs.appendFileSync(path.join(runDir, 'events.jsonl'), [ev.started('/r', 50), ev.step(1, 2, 50), ev.step(2, 1.9, 50)].map((e) => serializeEvent(e) + '\n').join(''));
  // a panel following new runs: a snapshot on run-started, then the events that come
  let shown: string[] | undefined;
  r.runs.onDidReceiveEvent(({ event }) => {
    if (shown === undefined) {
      if (event.kind === 'run-started') shown = r.runs.snapshot(runDir).events.map((e) => e.kind);
    } else {
      shown.push(event.kind);
    }
  });
  r.runs.refresh();
  assert.deepEqual(shown, ['run-started', 'step', 'step']);
  // a status listener reads the list the status describes
  assert.equal(r.runs.list()[0].status, 'running');
});

test("a resume of this window refused by another trainer's lock leaves the run training there, not failed", async (t) => {
  const runsDir = tempDir('host-refused');
  const runDir = writeRun(runsDir, 'r', [ev.started('/r', 50), ev.finished('stopped', 3)], '', 3);
  const r = registry(runsDir, 1000);
  t.after(() => r.runs.dispose());
  assert.equal(r.runs.list()[0].status, 'stopped');
  const run = r.trainer.start('resume', runDir);
  // meanwhile a terminal's resume took the run; this window's trainer is refused
  lockByThisProcess(runDir);
  r.children[0].stderr.write(`qlora-studio: ${runDir} is being trained by process ${process.pid} (started x); stop that run first\n`);
  r.children[0].exit(1);
  await run.ended;
  await tick();
  const info = r.runs.list()[0];
  assert.equal(info.status, 'running');
  assert.equal(info.error, undefined);
  assert.deepEqual(r.statuses.map((x) => x.status), ['running', 'running']);
  // when that trainer is done, the log decides, not the refusal
  fs.appendFileSync(path.join(runDir, 'events.jsonl'), serializeEvent(ev.started('/r', 50, 3)) + '\n' + serializeEvent(ev.finished('completed', 50)) + '\n');
  fs.rmSync(path.join(runDir, RUN_LOCK_FILE));
  r.runs.refresh();
  assert.equal(r.runs.list()[0].status, 'finished');
  assert.deepEqual(r.statuses.at(-1), { runDir, status: 'finished' });
});
