// The trainer process manager with a fake child: events are validated (garbage logged and ignored), output lines
// reach the output channel, control messages go out, and every way a process can end gives a status and a reason.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { failureFromStderr, LineSplitter, runEnd, TrainerBusyError, TrainerProcess, type RunEnd } from '../../extension/host/trainerProcess';
import { preparingText, type TrainerEvent } from '../../extension/protocol/events';
import { ev, fakeFork, memoryOutput, tick } from './hostFakes';

const launch = () => ({ cliPath: '/ext/dist/cli.js', execPath: '/usr/bin/node-custom' });

function setup() {
  const f = fakeFork();
  const out = memoryOutput();
  const trainer = new TrainerProcess(launch, out, f.fork);
  const events: TrainerEvent[] = [];
  const ends: RunEnd[] = [];
  trainer.onDidReceiveEvent(({ event }) => events.push(event));
  trainer.onDidEnd((e) => ends.push(e));
  return { ...f, out, trainer, events, ends };
}

test('train is forked with an argument array, IPC, the chosen Node and ELECTRON_RUN_AS_NODE', () => {
  const s = setup();
  s.trainer.start('train', '/runs/a b', ['--model', '/m', '--data', '/d.jsonl']);
  const call = s.calls[0];
  assert.equal(call.modulePath, '/ext/dist/cli.js');
  assert.deepEqual(call.args, ['train', '--model', '/m', '--data', '/d.jsonl', '--out', '/runs/a b', '--json']);
  const options = call.options as { execPath: string; execArgv: string[]; env: Record<string, string>; stdio: unknown[] };
  assert.equal(options.execPath, '/usr/bin/node-custom');
  assert.deepEqual(options.execArgv, []);
  assert.equal(options.env.ELECTRON_RUN_AS_NODE, '1');
  assert.deepEqual(options.stdio, ['ignore', 'pipe', 'pipe', 'ipc']);
  assert.equal(s.trainer.active?.name, 'a b');
});

test('resume runs "resume --run <dir> --json"', () => {
  const s = setup();
  s.trainer.start('resume', '/runs/r1');
  assert.deepEqual(s.calls[0].args, ['resume', '--run', '/runs/r1', '--json']);
});

test('valid events pass, garbage and malformed events are logged and ignored; a clean finish is finished', async () => {
  const s = setup();
  const run = s.trainer.start('train', '/runs/r1');
  const child = s.children[0];
  const prepared: string[] = [];
  s.trainer.onDidPrepare(({ runDir, preparing }) => prepared.push(`${runDir} ${preparingText(preparing)}`));
  child.emit('message', { kind: 'preparing', stage: 'data', done: 1500, total: 20000 });
  child.emit('message', { kind: 'preparing', stage: 'model', done: null, total: null });
  child.emit('message', { kind: 'preparing', stage: 'weights', done: 1, total: 2 });
  child.emit('message', ev.started('/runs/r1'));
  child.emit('message', 'garbage');
  child.emit('message', { kind: 'step', step: 'one' });
  child.emit('message', { kind: 'nonsense' });
  child.emit('message', ev.step(1, 2.5));
  child.emit('message', ev.finished('completed', 10));
  child.stdout.write('{"status":"completed"}\n');
  child.stderr.write('a warning line\npartial');
  child.exit(0);
  const end = await run.ended;
  assert.deepEqual(s.events.map((e) => e.kind), ['run-started', 'step', 'finished']);
  assert.equal(s.out.lines.filter((l) => l.startsWith('ignored a malformed message')).length, 4);
  assert.deepEqual(prepared, ['/runs/r1 tokenizing the data: 1,500 of 20,000 examples', '/runs/r1 loading the model…']);
  assert.ok(s.out.lines.includes('{"status":"completed"}'));
  assert.ok(s.out.lines.includes('a warning line'));
  assert.ok(s.out.lines.includes('partial'), 'a last line without newline is flushed at exit');
  assert.equal(end.status, 'finished');
  assert.equal(end.reason, undefined);
  assert.deepEqual(s.ends, [end]);
  assert.equal(s.trainer.active, undefined);
});

test('a stopped run (exit 0, finished stopped) ends stopped', async () => {
  const s = setup();
  const run = s.trainer.start('train', '/runs/r1');
  s.children[0].emit('message', ev.finished('stopped', 4));
  s.children[0].exit(0);
  assert.equal((await run.ended).status, 'stopped');
});

test('failure reasons: the error event, else the CLI sentence on stderr, else the signal or exit code', async () => {
  {
    const s = setup();
    const run = s.trainer.start('train', '/runs/r1');
    s.children[0].emit('message', ev.error('the loss became NaN at step 3'));
    s.children[0].emit('message', ev.finished('failed', 3));
    s.children[0].stderr.write('qlora-studio: the loss became NaN at step 3\n');
    s.children[0].exit(1);
    assert.deepEqual(await run.ended, { runDir: '/runs/r1', status: 'failed', reason: 'the loss became NaN at step 3', finished: ev.finished('failed', 3) });
  }
  {
    const s = setup();
    const run = s.trainer.start('train', '/runs/r1');
    s.children[0].stderr.write('qlora-studio: d.jsonl line 3: field "output" must be a string\nrun "qlora-studio train --help" for usage\n');
    s.children[0].exit(1);
    assert.equal((await run.ended).reason, 'd.jsonl line 3: field "output" must be a string');
  }
  {
    const s = setup();
    const run = s.trainer.start('train', '/runs/r1');
    s.children[0].emit('message', ev.step(1, 2));
    s.children[0].exit(null, 'SIGKILL');
    assert.deepEqual(await run.ended, { runDir: '/runs/r1', status: 'failed', reason: 'the trainer process was killed (SIGKILL)' });
  }
  {
    const s = setup();
    const run = s.trainer.start('train', '/runs/r1');
    s.children[0].exit(3);
    assert.equal((await run.ended).reason, 'the trainer process exited with code 3');
  }
  {
    // Exit 0 without a finished event is not a success.
    const s = setup();
    const run = s.trainer.start('train', '/runs/r1');
    s.children[0].exit(0);
    assert.equal((await run.ended).status, 'failed');
  }
});

test('a process that cannot start (bad qlora.nodePath) fails with the reason', async () => {
  const s = setup();
  const run = s.trainer.start('train', '/runs/r1');
  const child = s.children[0];
  child.pid = undefined;
  child.emit('error', new Error('spawn /nope ENOENT'));
  child.emit('close', -2, null); // a late close is ignored
  assert.deepEqual(await run.ended, { runDir: '/runs/r1', status: 'failed', reason: 'the trainer could not start: spawn /nope ENOENT' });
  assert.equal(s.ends.length, 1);
});

test('an error of a running trainer (a send on a closing channel) does not pass for a failed start', async () => {
  const s = setup();
  const run = s.trainer.start('train', '/runs/r1');
  const child = s.children[0];
  child.emit('error', new Error('channel closed'));
  child.stderr.write('qlora-studio: out of memory\n');
  child.exit(1);
  assert.deepEqual(await run.ended, { runDir: '/runs/r1', status: 'failed', reason: 'out of memory' });
});

test('one run at a time; a second start is refused with the run named', async () => {
  const s = setup();
  const run = s.trainer.start('train', '/runs/first');
  assert.throws(() => s.trainer.start('train', '/runs/second'), (err: Error) => err instanceof TrainerBusyError && err.message === 'A run is already training (first); stop it first.');
  s.children[0].exit(1);
  await run.ended;
  s.trainer.start('train', '/runs/second');
  assert.equal(s.trainer.active?.name, 'second');
});

test('stop and save-now go over IPC; without a channel stop falls back to SIGTERM', () => {
  const s = setup();
  assert.equal(s.trainer.stop(), false, 'nothing to stop');
  s.trainer.start('train', '/runs/r1');
  assert.equal(s.trainer.send({ kind: 'save-now' }), true);
  assert.equal(s.trainer.stop(), true);
  assert.deepEqual(s.children[0].sent, [{ kind: 'save-now' }, { kind: 'stop' }]);
  s.children[0].connected = false;
  assert.equal(s.trainer.stop(), true);
  assert.deepEqual(s.children[0].signals, ['SIGTERM']);
});

test('shutdown sends stop and returns once the trainer exits within the grace period', async () => {
  const s = setup();
  s.trainer.start('train', '/runs/r1');
  const child = s.children[0];
  const done = s.trainer.shutdown(2000);
  await tick();
  assert.deepEqual(child.sent, [{ kind: 'stop' }]);
  child.emit('message', ev.finished('stopped', 2));
  child.exit(0);
  await done;
  assert.deepEqual(child.signals, []);
});

test('shutdown leaves a trainer still in its step to stop on its own: asked to stop, disconnected, never killed', async () => {
  const s = setup();
  s.trainer.start('train', '/runs/r1');
  const child = s.children[0];
  await s.trainer.shutdown(50);
  assert.deepEqual(child.sent, [{ kind: 'stop' }]);
  assert.equal(child.disconnected, true);
  assert.deepEqual(child.signals, []);
  assert.ok(s.out.lines.some((l) => /finishes its step, saves a checkpoint and exits on its own/.test(l)));
});

test('line splitting and stderr sentences', () => {
  const lines: string[] = [];
  const split = new LineSplitter((l) => lines.push(l));
  split.push('a\r\nb');
  split.push('c\n\n');
  split.flush();
  assert.deepEqual(lines, ['a', 'bc', '']);
  assert.equal(failureFromStderr(['x', 'qlora-studio: bad thing', 'run "qlora-studio train --help" for usage']), 'bad thing');
  assert.equal(failureFromStderr(['Segmentation fault', '']), 'Segmentation fault');
  assert.equal(failureFromStderr([]), undefined);
  assert.equal(runEnd('/r', { code: 0, signal: null, finished: ev.finished('completed', 1) as never, stderr: [] }).status, 'finished');
});
