// A run's tokenized data in its folder (trainer/tokenCache.ts): read back exactly as written, at both id widths and
// across the reader's windows; keyed on the data file, the tokenizer's files and the settings; ignored when damaged
// or of another key; used by a resume (shown by a cache whose tokens differ under the same key) and rewritten when
// the data changed.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { IGNORE_INDEX, loadDataset, loadModelTokenizer, tokenizeDataset, type TokenizationStats, type TokenizedExample } from '../../extension/data';
import { parseEventLog, type TrainerEvent } from '../../extension/protocol/events';
import { resolveConfig } from '../../extension/trainer/config';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { readTokenCache, tokenCacheFile, tokenCacheKey, unchangedSince, writeTokenCache, type TokenizationSettings } from '../../extension/trainer/tokenCache';
import { train, TrainingControl } from '../../extension/trainer/train';
import { repoRoot, tempDir } from '../helpers/paths';

const settings: TokenizationSettings = { shape: null, skipInvalid: false, trainOnPrompt: false, maxLength: 128 };
const sample = path.join(repoRoot, 'examples', 'chat-sample.jsonl');

function tinyModel(name: string): string {
  const model = path.join(tempDir(name), 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 3 });
  return model;
}

function syntheticStats(examples: TokenizedExample[]): TokenizationStats {
  const tokens = examples.reduce((n, e) => n + e.ids.length, 0);
  return {
    template: null, examples: examples.length, lengths: { count: examples.length, min: 1, max: 1, mean: 1, p50: 1, p95: 1, truncated: 0 },
    histogram: { binWidth: 1, counts: [examples.length] }, droppedNoTrainable: 0, invalid: 0, toolsUnused: 0, systemLeftOut: 0, totalTokens: tokens, trainedTokens: 0,
  };
}

/** Examples of the given lengths with ids from `maxId` down and every third token trained. */
function syntheticExamples(lengths: number[], maxId: number): TokenizedExample[] {
  let next = 0;
  return lengths.map((n, i) => {
    const ids = Int32Array.from({ length: n }, () => maxId - (next++ % 1000));
    const labels = ids.map((id, t) => (t % 3 === 1 ? id : IGNORE_INDEX));
    return { ids, labels, source: `train.jsonl line ${i + 1}` };
  });
}

test('tokenized data reads back exactly: a real tokenization, ids past 16 bits, and more tokens than one read window', async () => {
  const model = tinyModel('token-cache-roundtrip');
  const tok = await loadModelTokenizer(model);
  const t = tokenizeDataset((await loadDataset(sample)).examples, tok, { maxLength: 128 });
  const runDir = tempDir('token-cache-roundtrip-run');
  assert.equal(writeTokenCache(runDir, 'train', 'k1', t), true);
  assert.deepEqual(readTokenCache(runDir, 'train', 'k1'), { examples: t.examples, stats: t.stats });

  const wide = syntheticExamples([5, 1, 0, 9], 150_000); // Qwen2's vocabulary is past 16 bits
  assert.equal(writeTokenCache(runDir, 'eval', 'k2', { examples: wide, stats: syntheticStats(wide) }), true);
  assert.deepEqual(readTokenCache(runDir, 'eval', 'k2')?.examples, wide);

  // 3,000 examples of 3,001 tokens at 16 bits: 18 MB of ids, past the reader's 16 MiB window
  const many = syntheticExamples(Array.from({ length: 3000 }, () => 3001), 60_000);
  assert.equal(writeTokenCache(runDir, 'train', 'k3', { examples: many, stats: syntheticStats(many) }), true);
  const back = readTokenCache(runDir, 'train', 'k3')!.examples;
  assert.equal(back.length, many.length);
  assert.ok(back.every((e, i) => e.source === many[i].source && e.ids.every((v, t) => v === many[i].ids[t]) && e.labels.every((v, t) => v === many[i].labels[t])));
});

test('a cache of another key, a damaged one or none is not read; labels it cannot hold are not written', () => {
  const runDir = tempDir('token-cache-damaged');
  assert.equal(readTokenCache(runDir, 'train', 'k'), null, 'none');
  const examples = syntheticExamples([4, 7], 100);
  writeTokenCache(runDir, 'train', 'k', { examples, stats: syntheticStats(examples) });
  assert.equal(readTokenCache(runDir, 'train', 'other'), null, 'another key');
  const file = tokenCacheFile(runDir, 'train');
  const whole = fs.readFileSync(file);
  for (const damaged of [whole.subarray(0, whole.length - 1), Buffer.concat([whole, Buffer.from([0])]), whole.subarray(0, 20), Buffer.from('not a cache')]) {
    fs.writeFileSync(file, damaged);
    assert.equal(readTokenCache(runDir, 'train', 'k'), null, `${damaged.length} bytes`);
  }
  const odd = [{ ids: Int32Array.from([5, 6]), labels: Int32Array.from([IGNORE_INDEX, 7]), source: 'x' }];
  assert.equal(writeTokenCache(runDir, 'eval', 'k', { examples: odd, stats: syntheticStats(odd) }), false);
  assert.equal(fs.existsSync(tokenCacheFile(runDir, 'eval')), false);
});

test('the key follows the data file, the tokenizer files (chat templates included) and the settings, and nothing else; a file saved since is seen', async () => {
  const model = tinyModel('token-cache-key');
  const dir = tempDir('token-cache-key-data');
  const data = path.join(dir, 'train.jsonl');
  fs.copyFileSync(sample, data);
  const key = async () => (await tokenCacheKey(data, model, settings))!.digest;
  const first = await key();
  assert.equal(await key(), first);
  fs.utimesSync(data, new Date(2001, 1, 1), new Date(2001, 1, 1));
  assert.equal(await key(), first, 'a touched file with the same bytes');
  const seen = new Set([first]);
  const differs = async (what: string, k: Promise<string>) => {
    const v = await k;
    assert.ok(!seen.has(v), what);
    seen.add(v);
  };
  for (const change of [{ shape: 'messages' }, { skipInvalid: true }, { trainOnPrompt: true }, { maxLength: 64 }])
    await differs(JSON.stringify(change), tokenCacheKey(data, model, { ...settings, ...change }).then((k) => k!.digest));
  fs.appendFileSync(data, '\n');
  await differs('a byte more of data', key());
  const tokConfig = path.join(model, 'tokenizer_config.json');
  fs.writeFileSync(tokConfig, fs.readFileSync(tokConfig, 'utf8').replace(/\}\s*$/, ', "x": 1}'));
  await differs('tokenizer_config.json', key());
  fs.writeFileSync(path.join(model, 'chat_template.jinja'), '{{ messages }}');
  await differs('chat_template.jinja', key());
  fs.mkdirSync(path.join(model, 'additional_chat_templates'));
  fs.writeFileSync(path.join(model, 'additional_chat_templates', 'tool_use.jinja'), '{{ tools }}');
  await differs('a named template', key());
  fs.writeFileSync(path.join(model, 'README.md'), 'no part of the tokenizer');
  assert.ok(seen.has(await key()), 'another file of the model folder');

  // a file that cannot be read has no key: reading it for tokenizing says what is wrong
  assert.equal(await tokenCacheKey(path.join(dir, 'missing.jsonl'), model, settings), null);

  // a file saved after the key was taken (while it is read for tokenizing): the key no longer stands for it
  const taken = (await tokenCacheKey(data, model, settings))!;
  assert.equal(unchangedSince(taken), true);
  fs.appendFileSync(data, '\n');
  assert.equal(unchangedSince(taken), false, 'the data file');
  const again = (await tokenCacheKey(data, model, settings))!;
  fs.appendFileSync(path.join(model, 'tokenizer.json'), ' ');
  assert.equal(unchangedSince(again), false, 'a tokenizer file');
});

test('training keeps its tokenized data in the run folder, a resume reads it, and data changed since is tokenized again', async () => {
  const model = tinyModel('token-cache-train');
  const dir = tempDir('token-cache-train-data');
  const data = path.join(dir, 'train.jsonl');
  const evalData = path.join(dir, 'eval.jsonl');
  const lines = fs.readFileSync(sample, 'utf8').trim().split('\n');
  fs.writeFileSync(data, lines.slice(0, 40).join('\n') + '\n');
  fs.writeFileSync(evalData, lines.slice(40).join('\n') + '\n');
  const runDir = path.join(dir, 'run');
  const config = resolveConfig({}, { model, data, evalData, preset: 'quick', rank: 4, batchSize: 2, seqLen: 96, maxSteps: 6, warmupSteps: 0, checkpointEvery: 1, evalEvery: 0 });
  const stopAt = (n: number) => {
    const control = new TrainingControl();
    return { control, placement: { device: 'cpu' as const }, onEvent: (e: TrainerEvent) => { if (e.kind === 'step' && e.step === n) control.stopRequested = true; } };
  };
  await train({ runDir, config, resume: false, ...stopAt(1) });
  const trainKey = (await tokenCacheKey(data, model, { shape: null, skipInvalid: false, trainOnPrompt: false, maxLength: 96 }))!.digest;
  const cached = readTokenCache(runDir, 'train', trainKey);
  assert.equal(cached?.examples.length, 40);
  assert.ok(fs.existsSync(tokenCacheFile(runDir, 'eval')));

  // the same key over other tokens: a resume that reads the cache trains on data other than its checkpoint's
  const shifted = cached!.examples.map((e) => ({ ...e, ids: e.ids.map((v) => (v + 1) % 64), labels: e.labels.map((v) => (v === IGNORE_INDEX ? v : (v + 1) % 64)) }));
  writeTokenCache(runDir, 'train', trainKey, { examples: shifted, stats: cached!.stats });
  const warnings = () => parseEventLog(fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8')).events.flatMap((e) => (e.kind === 'warning' ? [e.message] : []));
  const dataChanged = () => warnings().filter((w) => w.startsWith('the training data is not what it was')).length;
  await train({ runDir, resume: true, ...stopAt(2) });
  assert.equal(dataChanged(), 1, 'the cached tokens were trained on');

  // an edited data file has another key: tokenized again, and the cache rewritten under the new key
  fs.appendFileSync(data, lines[0] + '\n');
  const resumed = await train({ runDir, resume: true, placement: { device: 'cpu' } });
  assert.equal(resumed.status, 'completed');
  const newKey = (await tokenCacheKey(data, model, { shape: null, skipInvalid: false, trainOnPrompt: false, maxLength: 96 }))!.digest;
  assert.equal(readTokenCache(runDir, 'train', newKey)?.examples.length, 41);
  assert.equal(readTokenCache(runDir, 'train', trainKey), null);
  assert.deepEqual(fs.readdirSync(path.join(runDir, 'tokenized')).sort(), ['eval.tokens', 'train.tokens']);
});
