// llama.cpp (node-llama-cpp's prebuilt CPU binary) on tiny GGUF files written by test/helpers/miniGguf: the log-probs
// scoreTokens returns are the log-softmax of the model's raw logits, known by hand when every block is zero and equal
// to an fp64 forward pass otherwise; the tokenizer applies the file's BPE merges.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, before, test } from 'node:test';
import { nextTokenLogprobs, openGguf, type GgufModel } from '../../extension/export/llamaCpp';
import { logSoftmax, makeMiniLlama, referenceLogits, writeMiniGguf, type MiniLlama } from '../helpers/miniGguf';
import { tempDir } from '../helpers/paths';

const dir = tempDir('llamacpp');
const zeroModel = makeMiniLlama({ seed: 7, zeroBlocks: true });
const fullModel = makeMiniLlama({ seed: 11 });
const zeroFile = path.join(dir, 'zero-blocks.gguf');
const fullFile = path.join(dir, 'tiny-llama.gguf');
let zero: GgufModel;
let full: GgufModel;
let exact: GgufModel;

// Token ids with repeats, so the same token is scored in different contexts.
const ids = [264, 104, 101, 108, 108, 111, 32, 116, 104, 101, 108, 108, 32, 119, 111, 114, 108, 100, 33, 10, 104, 101];

before(async () => {
  writeMiniGguf(zeroFile, zeroModel);
  writeMiniGguf(fullFile, fullModel);
  zero = await openGguf(zeroFile, { threads: 1 });
  full = await openGguf(fullFile, { threads: 1 });
  exact = await openGguf(fullFile, { threads: 1, f32Attention: true });
});

after(async () => {
  await zero?.close();
  await full?.close();
  await exact?.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  assert.equal(a.length, b.length);
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

function argmax(a: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < a.length; i++) if (a[i] > a[best]) best = i;
  return best;
}

// With every block zero the residual stream is the token's embedding, so the logits are
// output · (rmsnorm(embedding) * output_norm), whatever came before.
function handLogits(m: MiniLlama, id: number): Float64Array {
  const e = m.tensors.get('token_embd.weight')!.data.subarray(id * m.nEmbd, (id + 1) * m.nEmbd);
  const g = m.tensors.get('output_norm.weight')!.data;
  const out = m.tensors.get('output.weight')!.data;
  const rms = Math.sqrt(e.reduce((s, v) => s + v * v, 0) / m.nEmbd + m.rmsEps);
  const vocab = m.tokens.length;
  return Float64Array.from({ length: vocab }, (_, v) => {
    let s = 0;
    for (let i = 0; i < m.nEmbd; i++) s += out[v * m.nEmbd + i] * ((e[i] / rms) * g[i]);
    return s;
  });
}

test('the GGUF loads with its vocabulary, special tokens and metadata', () => {
  assert.equal(full.architecture, 'llama');
  assert.equal(full.vocabSize, fullModel.tokens.length);
  assert.equal(full.vocabSize, 266);
  assert.equal(full.bos, fullModel.bos);
  assert.equal(full.eos, fullModel.eos);
  assert.equal(full.trainContextSize, 512);
  assert.equal(full.chatTemplate, undefined);
});

test('zero blocks: scoreTokens is the log-softmax of output · rmsnorm(embedding), exactly the known logits', async () => {
  const rows = await zero.scoreTokens(ids);
  assert.equal(rows.length, ids.length);
  rows.forEach((row, t) => {
    assert.equal(row.length, zero.vocabSize);
    const expected = logSoftmax(handLogits(zeroModel, ids[t]));
    assert.ok(maxAbsDiff(row, expected) < 2e-5, `position ${t}: max |diff| ${maxAbsDiff(row, expected)}`);
    const total = row.reduce((s, v) => s + Math.exp(v), 0);
    assert.ok(Math.abs(total - 1) < 1e-5, `position ${t}: probabilities sum to ${total}`);
  });
  // No temperature, top-k or repetition penalty: a repeated token gets the same row wherever it stands.
  assert.equal(maxAbsDiff(rows[2], rows[9]), 0);
  const lp = nextTokenLogprobs(rows, ids);
  assert.equal(lp.length, ids.length - 1);
  lp.forEach((v, t) => assert.ok(Math.abs(v - logSoftmax(handLogits(zeroModel, ids[t]))[ids[t + 1]]) < 2e-5));
});

test('a random 2-layer llama (GQA 4:2, RoPE, SwiGLU) with f32 attention matches an fp64 forward pass', async () => {
  const rows = await exact.scoreTokens(ids);
  const reference = referenceLogits(fullModel, ids).map(logSoftmax);
  rows.forEach((row, t) => assert.ok(maxAbsDiff(row, reference[t]) < 1e-4, `position ${t}: max |diff| ${maxAbsDiff(row, reference[t])}`));
  // The context matters: the same token after different prefixes gets different distributions.
  assert.ok(maxAbsDiff(rows[2], rows[9]) > 0.1);
});

test('with llama.cpp defaults (f16 K/V cache, flash attention) the log-probs stay within 0.03 and the top-1 agrees', async () => {
  const rows = await full.scoreTokens(ids);
  const reference = referenceLogits(fullModel, ids).map(logSoftmax);
  let worst = 0;
  rows.forEach((row, t) => {
    worst = Math.max(worst, maxAbsDiff(row, reference[t]));
    assert.equal(argmax(row), argmax(reference[t]), `position ${t}: top-1`);
  });
  assert.ok(worst > 1e-4 && worst < 0.03, `max |log-prob diff| ${worst}`);
});

test('teacher forcing is causal and each call starts from an empty context', async () => {
  const all = await full.scoreTokens(ids);
  const prefix = await full.scoreTokens(ids.slice(0, 8));
  prefix.forEach((row, t) => assert.ok(maxAbsDiff(row, all[t]) < 1e-4, `position ${t}: ${maxAbsDiff(row, all[t])}`));
  const again = await full.scoreTokens(ids);
  again.forEach((row, t) => assert.equal(maxAbsDiff(row, all[t]), 0, `position ${t} differs between calls`));
});

test('the thread count does not change the log-probs beyond rounding', async () => {
  const two = await openGguf(fullFile, { threads: 2, f32Attention: true });
  try {
    const a = await exact.scoreTokens(ids);
    const b = await two.scoreTokens(ids);
    a.forEach((row, t) => assert.ok(maxAbsDiff(row, b[t]) < 1e-5, `position ${t}: ${maxAbsDiff(row, b[t])}`));
  } finally {
    await two.close();
  }
});

test('tokenize applies the BPE merges of the file and detokenize inverts it', () => {
  // 'he' (256), 'll' (257), 'Ġt' (258), 'Ġthe' (259), 'or' (260), 'Ġa' (261), 'in' (262), 'Ġw' (263)
  assert.deepEqual(full.tokenize('hello the world'), [256, 257, 111, 259, 263, 260, 108, 100]);
  assert.equal(full.detokenize([256, 257, 111, 259, 263, 260, 108, 100]), 'hello the world');
  assert.deepEqual(full.tokenize('<s>hi', { special: true }), [full.bos!, 104, 105]);
  assert.deepEqual(full.tokenize('<s>', { special: false }), [60, 115, 62]);
});

test('scoreTokens rejects ids outside the vocabulary and returns nothing for no tokens', async () => {
  await assert.rejects(full.scoreTokens([1, 266]), /token 1 is 266, outside the vocabulary \[0, 266\)/);
  await assert.rejects(full.scoreTokens([1.5]), /token 0 is 1.5/);
  assert.deepEqual(await full.scoreTokens([]), []);
});

test('openGguf names a missing file and rejects a bad thread count', async () => {
  await assert.rejects(openGguf(path.join(dir, 'nope.gguf')), /GGUF file not found: .*nope\.gguf/);
  await assert.rejects(openGguf(fullFile, { threads: 0 }), /threads must be a positive integer, got 0/);
});
