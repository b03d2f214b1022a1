// The batch schedule: which examples each optimizer step trains on. Steps stay within an epoch as transformers'
// Trainer keeps them (an epoch whose micro-batches do not divide by gradient accumulation ends with a shorter step),
// so N epochs see every example exactly N times.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BatchSchedule, evalMicroBatches, type TrainExample } from '../../extension/trainer/batches';
import { epochOrder } from '../../extension/trainer/data';

const examples = (n: number): TrainExample[] =>
  Array.from({ length: n }, (_, i) => ({ ids: Int32Array.from([i, i]), labels: Int32Array.from([i, i]), source: `row ${i + 1}` }));

function seenCounts(n: number, batchSize: number, gradAccum: number, epochs: number): { counts: number[]; steps: number } {
  const data = examples(n);
  const schedule = new BatchSchedule(data, batchSize, (epoch) => epochOrder(n, 42, epoch), gradAccum);
  const steps = Math.ceil(epochs * schedule.stepsPerEpoch);
  const counts = new Array<number>(n).fill(0);
  for (let step = 0; step < steps; step++) {
    const micro = schedule.microBatchesOf(step);
    assert.ok(micro.length >= 1 && micro.length <= gradAccum, `step ${step}: ${micro.length} micro-batches`);
    for (const g of micro) for (const e of schedule.examplesOf(g)) counts[e.ids[0]]++;
  }
  return { counts, steps };
}

test('N epochs see every example exactly N times, whatever the batch size and gradient accumulation', () => {
  for (const [n, batchSize, gradAccum] of [[57, 4, 4], [10, 1, 4], [57, 64, 1], [57, 4, 1], [16, 4, 2], [7, 2, 3]]) {
    for (const epochs of [1, 3]) {
      const { counts } = seenCounts(n, batchSize, gradAccum, epochs);
      assert.deepEqual(new Set(counts), new Set([epochs]), `${n} examples, batch ${batchSize}, accumulation ${gradAccum}, ${epochs} epochs`);
    }
  }
});

test('an epoch ends with a step of the micro-batches left; steps, epochs and micro-batches done follow', () => {
  // 57 examples in batches of 4: 15 micro-batches an epoch; accumulation 4: steps of 4, 4, 4 and 3
  const schedule = new BatchSchedule(examples(57), 4, (epoch) => epochOrder(57, 1, epoch), 4);
  assert.equal(schedule.perEpoch, 15);
  assert.equal(schedule.stepsPerEpoch, 4);
  assert.deepEqual([0, 1, 2, 3, 4, 7].map((s) => schedule.microBatchesOf(s)), [
    [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18], [27, 28, 29],
  ]);
  assert.deepEqual([0, 1, 3, 4, 5, 8].map((s) => schedule.epochsAfter(s)), [0, 4 / 15, 12 / 15, 1, 1 + 4 / 15, 2]);
  assert.deepEqual([0, 1, 3, 4, 5, 8].map((s) => schedule.microBatchesAfter(s)), [0, 4, 12, 15, 19, 30]);
  // the last micro-batch of an epoch holds the examples left (57 = 14 x 4 + 1)
  assert.equal(schedule.examplesOf(14).length, 1);
  assert.throws(() => new BatchSchedule(examples(3), 1, () => [0, 1, 2], 0), /gradAccum must be a positive integer, got 0/);
});

test("the 'continuous' layout of runs checkpointed before: gradAccum micro-batches a step, across epoch ends", () => {
  const schedule = new BatchSchedule(examples(57), 4, (epoch) => epochOrder(57, 1, epoch), 4, 'continuous');
  assert.deepEqual([0, 3, 4].map((s) => schedule.microBatchesOf(s)), [[0, 1, 2, 3], [12, 13, 14, 15], [16, 17, 18, 19]]);
  assert.deepEqual([schedule.epochsAfter(4), schedule.microBatchesAfter(4)], [16 / 15, 16]);
  assert.deepEqual([schedule.totalSteps(1), schedule.totalSteps(3)], [4, 12]);
  const epochs = new BatchSchedule(examples(57), 64, (epoch) => epochOrder(57, 1, epoch), 1);
  assert.deepEqual([epochs.totalSteps(1), epochs.totalSteps(2.5), epochs.totalSteps(0)], [1, 3, 1]);
});

test('eval micro-batches take the examples longest first, ties in data order, each example once', () => {
  const lengths = [3, 9, 1, 9, 5, 2, 7];
  const data = lengths.map((n, i): TrainExample => ({ ids: new Int32Array(n), labels: new Int32Array(n), source: `row ${i + 1}` }));
  const batches = evalMicroBatches(data, 3);
  assert.deepEqual(batches.map((b) => b.map((e) => e.source)), [['row 2', 'row 4', 'row 7'], ['row 5', 'row 1', 'row 6'], ['row 3']]);
  assert.deepEqual(evalMicroBatches(data, 100).flat().map((e) => e.ids.length), [9, 9, 7, 5, 3, 2, 1]);
  assert.deepEqual(evalMicroBatches([], 4), []);
  assert.deepEqual(data.map((e) => e.ids.length), lengths, 'the input untouched');
});
