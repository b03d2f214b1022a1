// The event protocol: every kind validates, bad fields are named, control messages are checked, and an
// events.jsonl cut short by a kill reads back without its partial last line.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { EventLog } from '../../extension/trainer/eventLog';
import { parseEventLog, ProtocolError, serializeEvent, validateControl, validateEvent, type TrainerEvent } from '../../extension/protocol/events';

const time = '2026-11-24T00:00:00.000Z';
const zero = { weights: 1, adapters: 2, gradients: 3, optimizer: 4, activations: 5, workspace: 6 };
const samples: TrainerEvent[] = [
  {
    kind: 'run-started', time, protocol: 1, runDir: '/r', config: { rank: 8 }, totalSteps: 10, resumedFrom: null, trainableParameters: 100, memoryEstimate: { categories: zero, peakTotal: 21 },
    dataset: { file: 'd.jsonl', format: 'jsonl', shape: 'messages', template: 'model', trainExamples: 9, evalExamples: 1, trainTokens: 90, trainedTokens: 40, truncated: 0, skippedInvalid: 0, droppedEmpty: 0, packed: false },
  },
  { kind: 'step', time, step: 1, totalSteps: 10, epoch: 0.1, loss: 2.5, lr: 1e-4, gradNorm: 0.7, tokensPerSecond: 100, elapsedSeconds: 1, etaSeconds: 9 },
  { kind: 'eval', time, step: 1, evalLoss: 2.4, evalTokens: 12 },
  { kind: 'memory', time, step: 1, current: zero, peak: zero, totalCurrent: 21, totalPeak: 21, highWater: zero, highWaterTotal: 21, device: null },
  { kind: 'page', time, dir: 'out', bytes: 4096, tensor: 'exp_avg', ms: 0.3 },
  { kind: 'gpu', time, index: 0, name: 'NVIDIA H100 80GB HBM3', memoryTotal: 85e9, memoryUsed: 40e9, memoryFree: 45e9, utilization: 93, temperature: 61, powerW: null },
  { kind: 'checkpoint', time, step: 5, path: '/r/checkpoints/step-5' },
  { kind: 'warning', time, message: 'w' },
  { kind: 'error', time, message: 'e', step: null, lastCheckpoint: null },
  { kind: 'finished', time, status: 'completed', step: 10, adapterPath: '/r/adapter', finalLoss: 1.2, elapsedSeconds: 10 },
];

test('every event kind validates and round-trips through events.jsonl', () => {
  for (const e of samples) assert.deepEqual(validateEvent(JSON.parse(serializeEvent(e))), e);
  const text = samples.map(serializeEvent).join('\n') + '\n';
  assert.deepEqual(parseEventLog(text), { events: samples, partialTail: false });
});

test('invalid events name the field at fault', () => {
  assert.throws(() => validateEvent({ kind: 'launch' }), /unknown event kind "launch"/);
  assert.throws(() => validateEvent({ ...samples[1], loss: '2.5' }), /step event: field "loss" must be a number, got string/);
  assert.throws(() => validateEvent({ ...samples[4], dir: 'sideways' }), /field "dir" must be one of out, in/);
  assert.throws(() => validateEvent({ ...samples[3], peak: { weights: 1 } }), /field "peak" must be bytes for each of weights/);
  assert.throws(() => validateEvent([1]), ProtocolError);
  // the run's device is absent in runs written before it was reported, and an object when present
  assert.throws(() => validateEvent({ ...samples[0], device: 'cuda' }), /run-started event: field "device" must be an object, null or absent/);
  const withDevice = { ...samples[0], device: { kind: 'cpu', name: 'x', computeDtype: 'f32', memoryBudget: null, pagedOptimizer: false } };
  assert.deepEqual(validateEvent(withDevice), withDevice);
});

test('a partial last line (a kill mid-write) is skipped; a bad complete line is named', () => {
  const good = serializeEvent(samples[1]);
  const log = parseEventLog(`${good}\n${good.slice(0, 20)}`);
  assert.equal(log.events.length, 1);
  assert.equal(log.partialTail, true);
  assert.throws(() => parseEventLog(`${good}\n{"kind": "step"}\n`, 'run/events.jsonl'), /run\/events.jsonl line 2: step event: field "time"/);
  assert.throws(() => parseEventLog('{oops\n', 'e.jsonl'), /e.jsonl line 1: not valid JSON/);
});

test('non-finite numbers are written as null; control messages are validated', () => {
  assert.match(serializeEvent({ ...samples[8], finalLoss: NaN } as TrainerEvent), /"finalLoss":null/);
  // an eval set whose loss overflowed: null, which the spec allows
  const overflowed = { ...samples[2], evalLoss: null };
  assert.deepEqual(validateEvent(JSON.parse(serializeEvent(overflowed as TrainerEvent))), overflowed);
  assert.deepEqual(validateControl({ kind: 'stop', extra: 1 }), { kind: 'stop' });
  assert.deepEqual(validateControl({ kind: 'save-now' }), { kind: 'save-now' });
  assert.throws(() => validateControl({ kind: 'rm -rf' }), /unknown control message "rm -rf"/);
});

test('the trainer writes only lines that read back: a non-finite number where null is not allowed is refused, unwritten', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-eventlog-'));
  try {
    const log = new EventLog(dir);
    log.emit({ kind: 'eval', step: 3, evalLoss: null, evalTokens: 0 });
    assert.throws(() => log.emit({ kind: 'step', step: 4, totalSteps: 10, epoch: 0.4, loss: NaN, lr: 1e-4, gradNorm: null, tokensPerSecond: 1, elapsedSeconds: 1, etaSeconds: null }),
      /step event: field "loss" must be a number, got null/);
    log.emit({ kind: 'warning', message: 'after' });
    log.close();
    const read = parseEventLog(fs.readFileSync(path.join(dir, 'events.jsonl'), 'utf8'));
    assert.deepEqual(read.events.map((e) => e.kind), ['eval', 'warning']);
    assert.equal((read.events[0] as { evalLoss: number | null }).evalLoss, null);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
