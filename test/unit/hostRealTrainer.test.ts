// The host's process manager and registry driving the real CLI (dist/cli.js) on a tiny model: a run trains with
// events over IPC, stops on request with a checkpoint, shows as stopped, resumes to finished; bad data fails
// before a run folder exists with the CLI's sentence; inspect-data's JSON gives row errors the Problems panel reads.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { before, test } from 'node:test';
import { runCliJson } from '../../extension/host/cliRunner';
import { INVALID_ROWS_EXIT_CODE } from '../../extension/trainer/exitCodes';
import { parseDataError, placementArgs, trainArgs } from '../../extension/host/newRun';
import { RunRegistry } from '../../extension/host/runs/registry';
import { TrainerProcess } from '../../extension/host/trainerProcess';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { cliPath, repoRoot, tempDir } from '../helpers/paths';
import { memoryOutput } from './hostFakes';

const launch = () => ({ cliPath, execPath: process.execPath });
const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
let model = '';

before(() => {
  model = path.join(tempDir('host-real-model'), 'tiny');
  makeTinyModel({ out: model, arch: 'llama', seed: 3 });
});

const args = (overrides: Record<string, unknown>) =>
  trainArgs({ model, data, preset: 'quick', seqLen: 96, checkpointEvery: 0, evalEvery: 0, overrides: { batchSize: 2, gradAccum: 1, rank: 4, ...overrides } });

test('train, stop over IPC, resume to the end', async () => {
  const runsDir = tempDir('host-real-runs');
  const output = memoryOutput();
  const trainer = new TrainerProcess(launch, output);
  const runs = new RunRegistry(trainer, () => runsDir, 5);
  const runDir = path.join(runsDir, 'run1');
  const kinds: string[] = [];
  runs.onDidReceiveEvent(({ event }) => {
    kinds.push(event.kind);
    if (event.kind === 'step' && event.step === 3) trainer.stop();
  });
  const first = await trainer.start('train', runDir, args({ maxSteps: 400 })).ended;
  assert.equal(first.status, 'stopped', output.lines.join('\n'));
  assert.ok(kinds.includes('run-started'));
  const info = runs.list().find((r) => r.name === 'run1');
  assert.equal(info?.status, 'stopped');
  assert.ok(info && info.step >= 3 && info.step < 400);
  assert.ok(output.lines.some((l) => l.includes('"status":"stopped"')), 'the --json outcome reaches the output channel');

  const second = await trainer.start('resume', runDir).ended;
  assert.equal(second.status, 'finished', output.lines.join('\n'));
  const snapshot = runs.snapshot(runDir);
  assert.equal(snapshot.status, 'finished');
  assert.equal(snapshot.events.filter((e) => e.kind === 'run-started').length, 2);
  assert.equal(runs.list()[0].step, 400);
  runs.dispose();
});

test('Stop while a new run prepares its data ends it as stopped, with no run folder', async () => {
  const trainer = new TrainerProcess(launch, memoryOutput());
  const runDir = path.join(tempDir('host-real-prepare'), 'runs', 'early');
  const sub = trainer.onDidPrepare(() => trainer.stop());
  const end = await trainer.start('train', runDir, args({ maxSteps: 50 })).ended;
  sub.dispose();
  assert.equal(end.status, 'stopped', end.reason);
  assert.equal(end.finished?.step, 0);
  assert.ok(!fs.existsSync(runDir));
});

test('bad data fails with the CLI sentence and leaves no run folder; inspect-data lists the rows', async () => {
  const dir = tempDir('host-real-bad');
  const bad = path.join(dir, 'bad.jsonl');
  fs.writeFileSync(bad, '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]}\n{"messages": 5}\n');
  const trainer = new TrainerProcess(launch, memoryOutput());
  const runDir = path.join(dir, 'runs', 'bad');
  const end = await trainer.start('train', runDir, trainArgs({ model, data: bad, preset: 'quick', seqLen: 64, checkpointEvery: 0, evalEvery: 0, overrides: { maxSteps: 2 } })).ended;
  assert.equal(end.status, 'failed');
  assert.match(end.reason ?? '', /^bad\.jsonl line 2: /);
  assert.ok(!fs.existsSync(runDir));

  // inspect-data exits with 2 on invalid rows; the host reads its report all the same, as New Finetune does
  const inspect = ['inspect-data', '--data', bad, '--model', model];
  const report = await runCliJson<{ rowCount: number; invalidRows: number; errors: string[] }>(launch(), inspect, { answerExitCodes: [INVALID_ROWS_EXIT_CODE] });
  assert.equal(report.rowCount, 2);
  assert.equal(report.invalidRows, 1);
  assert.equal(parseDataError(report.errors[0])?.line, 2);
  await assert.rejects(runCliJson(launch(), ['inspect-data', '--data', path.join(dir, 'missing.jsonl')]), /missing\.jsonl/);
});

test('qlora.device = cuda on a machine whose GPU cannot be used: the run fails before its folder with what is missing', async (t) => {
  const doctor = await runCliJson<{ device: string; problems: string[] }>(launch(), ['doctor', '--json']);
  if (doctor.device === 'cuda') return t.skip('this machine can train on its GPU');
  const dir = tempDir('host-real-device');
  const trainer = new TrainerProcess(launch, memoryOutput());
  const runDir = path.join(dir, 'runs', 'gpu');
  const settings = { device: 'cuda' as const, gpuMemoryBudget: 0, cudaLibraryPath: '' };
  const end = await trainer.start('train', runDir, [...args({ maxSteps: 2 }), ...placementArgs(settings)]).ended;
  assert.equal(end.status, 'failed');
  assert.equal(end.reason, `cannot use the GPU (--device cuda): ${doctor.problems.join(' ')}`);
  assert.ok(!fs.existsSync(runDir));
  // auto: the same run trains on the CPU and says why in a warning event
  const runs = new RunRegistry(trainer, () => path.join(dir, 'runs'), 5);
  const auto = await trainer.start('train', runDir, [...args({ maxSteps: 2 }), ...placementArgs({ ...settings, device: 'auto' })]).ended;
  assert.equal(auto.status, 'finished');
  const events = runs.snapshot(runDir).events;
  const started = events.find((e) => e.kind === 'run-started');
  assert.equal(started?.kind === 'run-started' && started.device?.kind, 'cpu');
  assert.ok(events.some((e) => e.kind === 'warning' && /^Training on the CPU: the GPU cannot be used \(/.test(e.message)));
  runs.dispose();
});
