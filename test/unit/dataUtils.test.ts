// Philox (bit-identical to the engine's C++), seeded shuffling, the eval split, packing and length statistics.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  EVAL_SPLIT_STEP,
  IGNORE_INDEX,
  mulhi32,
  packExamples,
  Philox,
  philox4x32,
  RngStream,
  shuffled,
  shuffleIndices,
  splitEval,
  tokenLengthStats,
  lengthHistogram,
} from '../../extension/data';

const hex = (words: ArrayLike<number>) => Array.from(words, (w) => w.toString(16).padStart(8, '0')).join(' ');

test('Philox4x32-10: the published known-answer vectors (Random123 kat_vectors)', () => {
  assert.equal(hex(philox4x32([0, 0, 0, 0], [0, 0])), '6627e8d5 e169c58d bc57ac4c 9b00dbd8');
  assert.equal(
    hex(philox4x32([0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff], [0xffffffff, 0xffffffff])),
    '408f276d 41c83b0e a20bc7c6 6d5451fd',
  );
  assert.equal(
    hex(philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0])),
    'd16cfe09 94fdcceb 5001e420 24126ea1',
  );
});

test('Philox class: counter (index lo, index hi, stream, step) and key (seed lo, seed hi) as native/src/util/philox packs them', () => {
  // Printed by a throwaway C++ program calling qlora::Philox(0x123456789abc, RngStream::Shuffle, 7).bits(i).
  const g = new Philox(0x123456789abc, RngStream.Shuffle, 7);
  const expected: [number, number][] = [
    [0, 0xa1db27b9], [1, 0x5c856668], [2, 0xc6f19596], [3, 0x1128fe80],
    [4, 0xe993d75d], [5, 0x71dddb77], [1000, 0x0b1a30cd], [2 ** 32 + 5, 0x4d59cce7],
  ];
  for (const [index, bits] of expected) {
    assert.equal(g.bits(index), bits, `bits(${index})`);
    const u = g.uniform(index);
    assert.equal(u, (bits >>> 8) / 2 ** 24);
    assert.equal(Math.fround(u), u, 'representable as the C++ float');
  }
  assert.equal(g.uniform(0), Math.fround(0.632250249));
  const h = new Philox(42, RngStream.Shuffle, 0);
  assert.equal(hex(Array.from({ length: 8 }, (_, i) => h.bits(i))), '0a51a6b2 72148a91 b918c659 99205bc7 85a8df3c 1d91b19b a9b1302c 3faa46e6');
  assert.equal(new Philox(42n, RngStream.Shuffle, 0).bits(5), h.bits(5), 'bigint seeds are the same generator');
  assert.equal(new Philox(2n ** 64n - 1n, RngStream.Dropout).block(0).length, 4);
  assert.throws(() => new Philox(-1, RngStream.Shuffle), RangeError);
  assert.throws(() => new Philox(1.5, RngStream.Shuffle), RangeError);
  assert.throws(() => new Philox(1, RngStream.Shuffle, 2 ** 32), RangeError);
});

test('mulhi32 is the exact high word of a 32x32-bit product', () => {
  const pairs: [number, number][] = [[0xffffffff, 0xffffffff], [0xd2511f53, 0x243f6a88], [1, 0xffffffff], [0x80000000, 2], [0, 12345]];
  for (const [a, b] of pairs) assert.equal(mulhi32(a, b), Number((BigInt(a) * BigInt(b)) >> 32n), `${a} * ${b}`);
});

test('shuffle: a deterministic permutation per (seed, epoch), pinned, and uniform over permutations', () => {
  assert.deepEqual(Array.from(shuffleIndices(10, 42, 0)), [1, 7, 6, 2, 9, 3, 8, 5, 4, 0]);
  assert.deepEqual(Array.from(shuffleIndices(10, 42, 1)), [0, 4, 9, 3, 6, 2, 1, 8, 7, 5]);
  assert.deepEqual(shuffleIndices(10, 42, 0), shuffleIndices(10, 42, 0));
  assert.notDeepEqual(shuffleIndices(10, 43, 0), shuffleIndices(10, 42, 0));
  assert.deepEqual(Array.from(shuffleIndices(0, 1, 0)), []);
  assert.deepEqual(Array.from(shuffleIndices(1, 1, 0)), [0]);
  const big = Array.from(shuffleIndices(1000, 7, 3)).sort((a, b) => a - b);
  assert.deepEqual(big, Array.from({ length: 1000 }, (_, i) => i));

  // All 24 orders of 4 items appear about equally often over 2400 seeds.
  const counts = new Map<string, number>();
  for (let seed = 0; seed < 2400; seed++) {
    const key = shuffleIndices(4, seed, 0).join('');
    counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  assert.equal(counts.size, 24);
  for (const [order, n] of counts) assert.ok(n > 60 && n < 140, `${order} appeared ${n} times`);

  const items = ['a', 'b', 'c', 'd'];
  const out = shuffled(items, 5, 2);
  assert.deepEqual(items, ['a', 'b', 'c', 'd'], 'input untouched');
  assert.deepEqual(out, Array.from(shuffleIndices(4, 5, 2), (i) => items[i]));
});

test('eval split: seeded, both sides non-empty when possible, input order kept', () => {
  const items = [...'abcdefghij'];
  const split = splitEval(items, 0.2, 42);
  assert.deepEqual(split, { train: ['a', 'c', 'd', 'e', 'f', 'g', 'i', 'j'], eval: ['b', 'h'] });
  assert.deepEqual(splitEval(items, 0.2, 42), split);
  // The held-out items are the first of the permutation drawn with step EVAL_SPLIT_STEP.
  const order = shuffleIndices(10, 42, EVAL_SPLIT_STEP);
  assert.deepEqual(split.eval, [order[0], order[1]].sort((a, b) => a - b).map((i) => items[i]));

  assert.deepEqual(splitEval(['x', 'y'], 0.01, 1).eval.length, 1, 'at least one eval example');
  assert.deepEqual(splitEval(['x', 'y', 'z'], 0.99, 1).train.length, 1, 'at least one training example');
  assert.deepEqual(splitEval(['x'], 0.5, 1), { train: ['x'], eval: [] });
  for (const bad of [0, 1, -0.1, Number.NaN]) assert.throws(() => splitEval(items, bad, 1), /eval fraction must be between 0 and 1/);
});

test('a capped eval split holds out at most maxCount items, the first of the uncapped split\'s permutation', () => {
  const items = Array.from({ length: 1000 }, (_, i) => i);
  const whole = splitEval(items, 0.05, 7);
  assert.equal(whole.eval.length, 50);
  const capped = splitEval(items, 0.05, 7, 20);
  assert.equal(capped.eval.length, 20);
  assert.equal(capped.train.length, 980);
  const order = shuffleIndices(1000, 7, EVAL_SPLIT_STEP);
  assert.deepEqual(capped.eval, Array.from(order.subarray(0, 20)).sort((a, b) => a - b), 'the first 20 of the permutation, in input order');
  assert.ok(capped.eval.every((i) => whole.eval.includes(i)), 'a subset of the uncapped split');
  assert.deepEqual(splitEval(items, 0.05, 7, 50), whole, 'a cap at the fraction\'s count changes nothing');
  assert.deepEqual(splitEval(items, 0.05, 7, 1e9), whole);
  assert.equal(splitEval(['x', 'y'], 0.5, 1, 1).eval.length, 1);
  for (const bad of [0, 0.5, -1, Number.NaN]) assert.throws(() => splitEval(items, 0.05, 1, bad), /largest size must be at least 1/);
});

test('packing: exactly seqLen tokens per sequence, labels carried, the last partial sequence kept', () => {
  const ex = (source: string, n: number, base: number, trainedFrom: number) => ({
    source,
    ids: Int32Array.from({ length: n }, (_, i) => base + i),
    labels: Int32Array.from({ length: n }, (_, i) => (i >= trainedFrom ? base + i : IGNORE_INDEX)),
  });
  const examples = [ex('a', 5, 100, 2), ex('b', 3, 200, 1), ex('c', 7, 300, 0)];
  const packed = packExamples(examples, 4);
  assert.deepEqual(packed.map((p) => p.ids.length), [4, 4, 4, 3]);
  assert.deepEqual(packed.map((p) => Array.from(p.ids)), [
    [100, 101, 102, 103],
    [104, 200, 201, 202],
    [300, 301, 302, 303],
    [304, 305, 306],
  ]);
  assert.deepEqual(Array.from(packed[0].labels), [IGNORE_INDEX, IGNORE_INDEX, 102, 103]);
  assert.deepEqual(Array.from(packed[1].labels), [104, IGNORE_INDEX, 201, 202]);
  assert.deepEqual(packed.map((p) => p.sources), [['a'], ['a', 'b'], ['c'], ['c']]);
  const all = packed.flatMap((p) => Array.from(p.labels));
  assert.deepEqual(all, examples.flatMap((e) => Array.from(e.labels)), 'no label lost or moved');

  assert.deepEqual(packExamples([ex('a', 4, 0, 0), ex('b', 4, 10, 0)], 4).map((p) => p.ids.length), [4, 4]);
  assert.deepEqual(packExamples([], 8), []);
  assert.throws(() => packExamples(examples, 1), /seqLen must be an integer >= 2/);
});

test('token length statistics', () => {
  const lengths = Array.from({ length: 20 }, (_, i) => 20 - i);
  assert.deepEqual(tokenLengthStats(lengths, 3), { count: 20, min: 1, max: 20, mean: 10.5, p50: 10, p95: 19, truncated: 3 });
  assert.deepEqual(tokenLengthStats([7]), { count: 1, min: 7, max: 7, mean: 7, p50: 7, p95: 7, truncated: 0 });
  assert.deepEqual(tokenLengthStats([]), { count: 0, min: 0, max: 0, mean: 0, p50: 0, p95: 0, truncated: 0 });
});

test('token length histogram: round bin widths from 0 that cover the maximum length', () => {
  // top 512 (the max length) / 24 bins = 21.3 -> width 50; bins [0,50) ... [500,550)
  const h = lengthHistogram([0, 49, 50, 120, 130, 499, 500, 512], 512);
  assert.equal(h.binWidth, 50);
  assert.equal(h.counts.length, 11);
  assert.deepEqual(h.counts, [2, 1, 2, 0, 0, 0, 0, 0, 0, 1, 2]);
  // longer than the max length: the range grows to the longest example
  const long = lengthHistogram([10, 3000], 128);
  assert.equal(long.binWidth, 200);
  assert.equal(long.counts.reduce((a, b) => a + b, 0), 2);
  assert.equal(long.counts[15], 1);
  assert.deepEqual(lengthHistogram([], undefined), { binWidth: 1, counts: [0, 0] });
});
