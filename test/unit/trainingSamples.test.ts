// Sample answers during training: the run's sample prompts are answered at the start (the base model) and at every
// eval with the adapter of that step, recorded as `sample` events in events.jsonl, and the panel's view-model
// groups them by prompt, step by step, from the log as from live events (a resume cuts what it redoes).
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { trainArgs } from '../../extension/host/newRun';
import { parseOptions } from '../../extension/trainer/cliArgs';
import { trainOptions } from '../../extension/trainer/verbs/train';
import { parseEventLog, type TrainerEvent } from '../../extension/protocol/events';
import { ConfigError, resolveConfig } from '../../extension/trainer/config';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { train } from '../../extension/trainer/train';
import { applyEvent, emptyView, reduceRun, sampleRowLabel, sampleRows } from '../../webview/model';
import { repoRoot, tempDir } from '../helpers/paths';

const PROMPTS = ['What is the capital of France?', 'Name a color.'];

test('a run with sample prompts answers them at step 0 and at every eval; the answers change as it trains', async () => {
  const dir = tempDir('samples');
  const model = path.join(dir, 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 8 });
  const runDir = path.join(dir, 'run');
  const config = resolveConfig({}, {
    model, data: path.join(repoRoot, 'examples', 'chat-sample.jsonl'), preset: 'quick', maxSteps: 40, seqLen: 96, batchSize: 4, lr: 5e-3,
    checkpointEvery: 0, evalEvery: 20, samplePrompts: PROMPTS, sampleMaxTokens: 24,
  });
  const outcome = await train({ runDir, config, resume: false });
  assert.equal(outcome.status, 'completed');

  const { events } = parseEventLog(fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8'));
  const samples = events.filter((e): e is Extract<TrainerEvent, { kind: 'sample' }> => e.kind === 'sample');
  // step 0, the eval at 20, the final eval at 40; two prompts each
  assert.deepEqual(samples.map((s) => `${s.step}:${s.index}`), ['0:0', '0:1', '20:0', '20:1', '40:0', '40:1']);
  for (const s of samples) {
    assert.equal(s.prompt, PROMPTS[s.index]);
    assert.ok(s.tokens >= 1 && s.tokens <= 24 && s.ms > 0, JSON.stringify(s));
  }
  const france = samples.filter((s) => s.index === 0);
  assert.notEqual(france[0].text, france[2].text, 'training changed the answer');
  assert.match(france[2].text, /^The capital of/);
  assert.equal(france[0].finishReason, 'length', 'the untrained base never ends its turn');
  // the samples come right after the eval of their step
  const evalAt20 = events.findIndex((e) => e.kind === 'eval' && e.step === 20);
  assert.equal(events[evalAt20 + 1].kind, 'sample');

  // the panel, after a reload: read back from events.jsonl
  const view = reduceRun(events);
  assert.deepEqual(view.samples.map((t) => t.prompt), PROMPTS);
  assert.deepEqual(view.samples[0].answers.map((a) => a.step), [0, 20, 40]);
  assert.equal(view.samples[0].answers[2].text, france[2].text);
  const sampleMs = samples.reduce((ms, s) => ms + s.ms, 0);
  assert.ok(Math.abs(view.sampleMs - sampleMs) < 1e-6);
  // generation stays small beside training: well under the run's time
  const finished = events.find((e) => e.kind === 'finished') as Extract<TrainerEvent, { kind: 'finished' }>;
  assert.ok(sampleMs / 1000 < 0.5 * finished.elapsedSeconds, `${sampleMs} ms of ${finished.elapsedSeconds} s`);
});

test('the view-model: answers by prompt and step; a resumed run drops the answers after its checkpoint', () => {
  const t = (s: number) => new Date(Date.UTC(2026, 11, 2, 10, 0, s)).toISOString();
  const sample = (step: number, index: number, text: string): TrainerEvent => ({ kind: 'sample', time: t(step), step, index, prompt: PROMPTS[index], text, tokens: 3, finishReason: 'stop-token', ms: 5 });
  const started = (resumedFrom: number | null): TrainerEvent => ({
    kind: 'run-started', time: t(0), protocol: 1, runDir: '/r', config: {}, totalSteps: 30, resumedFrom, trainableParameters: 1, memoryEstimate: null,
    dataset: { file: 'd.jsonl', format: 'jsonl', shape: 'messages', template: 'chat_template', trainExamples: 1, evalExamples: 1, trainTokens: 1, trainedTokens: 1, truncated: 0, skippedInvalid: 0, droppedEmpty: 0, packed: false },
  });
  const log = [started(null), sample(0, 1, 'b0'), sample(0, 0, 'a0'), sample(10, 0, 'a10'), sample(10, 1, 'b10'), sample(20, 0, 'a20'), started(10), sample(20, 0, 'A20')];
  const view = reduceRun(log);
  assert.deepEqual(view.samples.map((s) => s.index), [0, 1]);
  assert.deepEqual(view.samples[0].answers.map((a) => a.text), ['a0', 'a10', 'A20']);
  assert.deepEqual(view.samples[1].answers.map((a) => a.text), ['b0', 'b10']);
  assert.equal(view.sampleMs, 25);
  const live = emptyView();
  for (const e of log) applyEvent(live, e);
  assert.deepEqual(live.samples, view.samples);
});

test('the panel lists a prompt\'s answers newest first, evals in a row that answered alike in one row, the base apart', () => {
  const answer = (step: number, text: string, finishReason = 'stop-token') => ({ step, text, tokens: step + 1, finishReason, ms: 2 * step });
  const thread = {
    index: 0, prompt: 'p',
    answers: [
      answer(0, 'Paris'), answer(100, 'Paris'), answer(200, 'Paris'), answer(300, 'Lyon'), answer(400, 'Paris'),
      answer(500, 'Paris'), answer(600, 'Paris', 'length'), answer(700, 'Paris', 'length'), answer(1200, 'Paris'),
    ],
  };
  const rows = sampleRows(thread);
  assert.deepEqual(rows.map(sampleRowLabel), ['step 1,200', 'steps 600–700 (2 evals)', 'steps 400–500 (2 evals)', 'step 300', 'steps 100–200 (2 evals)', 'step 0 (base)']);
  assert.deepEqual(rows.map((r) => [r.text, r.cut]), [['Paris', false], ['Paris', true], ['Paris', false], ['Lyon', false], ['Paris', false], ['Paris', false]]);
  // a row's tooltip figures are its newest answer's
  assert.deepEqual([rows[1].tokens, rows[1].ms], [701, 1400]);
  // answers arrive in step order, but a resumed run's replaced step may come later: sorted first
  assert.deepEqual(sampleRows({ ...thread, answers: [answer(200, 'a'), answer(0, 'a'), answer(100, 'a')] }).map(sampleRowLabel), ['steps 100–200 (2 evals)', 'step 0 (base)']);
  assert.deepEqual(sampleRows({ ...thread, answers: [] }), []);
});

test('sample prompts in the config: validated, and passed on by the extension as repeated --sample-prompt flags', () => {
  const base = { model: 'm', data: 'd.jsonl' };
  assert.deepEqual(resolveConfig({}, base).samplePrompts, []);
  assert.equal(resolveConfig({}, base).sampleMaxTokens, 64);
  assert.throws(() => resolveConfig({}, { ...base, samplePrompts: ['ok', ''] }), (e: unknown) => e instanceof ConfigError && /"samplePrompts" must hold non-empty strings/.test((e as Error).message));
  assert.throws(() => resolveConfig({}, { ...base, samplePrompts: 'x' as unknown as string[] }), /must be a list of strings/);
  const args = trainArgs({ model: 'm', data: 'd', preset: 'quick', seqLen: 512, checkpointEvery: 10, evalEvery: 10, samplePrompts: ['a b', '--help me'] });
  assert.deepEqual(args.slice(-2), ['--sample-prompt=a b', '--sample-prompt=--help me']);
  assert.deepEqual(parseOptions('train', [...args, '--out', 'r'], trainOptions)['sample-prompt'], ['a b', '--help me']);
  const overridden = trainArgs({ model: 'm', data: 'd', preset: 'quick', seqLen: 512, checkpointEvery: 10, evalEvery: 10, samplePrompts: ['a'], overrides: { samplePrompts: ['z'], sampleMaxTokens: 16 } });
  assert.deepEqual(overridden.slice(-3), ['--sample-prompt=z', '--sample-max-tokens', '16']);
});

test('a sample prompt the chat template refuses stops the run before its folder is written', async () => {
  const dir = tempDir('samples-bad');
  const model = path.join(dir, 'model');
  makeTinyModel({ out: model, arch: 'mistral', seed: 9 });
  // a template that renders conversations (the training data) but refuses to open an answer
  const tc = path.join(model, 'tokenizer_config.json');
  const cfg = JSON.parse(fs.readFileSync(tc, 'utf8'));
  cfg.chat_template = "{% if add_generation_prompt %}{{ raise_exception('no generation prompt') }}{% endif %}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}";
  fs.writeFileSync(tc, JSON.stringify(cfg));
  const runDir = path.join(dir, 'run');
  const config = resolveConfig({}, { model, data: path.join(repoRoot, 'examples', 'chat-sample.jsonl'), preset: 'quick', maxSteps: 2, skipInvalid: true, samplePrompts: ['Hi'] });
  await assert.rejects(train({ runDir, config, resume: false }), /sample prompt 1 cannot be rendered with the model's chat template: .*no generation prompt/);
  assert.equal(fs.existsSync(runDir), false);
});

test('a sample prompt longer than the model\'s context stops the run before its folder is written, naming it', async () => {
  const dir = tempDir('samples-long');
  const model = path.join(dir, 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 9 });
  const runDir = path.join(dir, 'run');
  const long = 'word '.repeat(3000);
  const config = resolveConfig({}, { model, data: path.join(repoRoot, 'examples', 'chat-sample.jsonl'), preset: 'quick', maxSteps: 2, samplePrompts: ['Hi', long] });
  await assert.rejects(train({ runDir, config, resume: false }), /^Error: sample prompt 2 is \d+ tokens rendered, and the model's context is 2048 \(max_position_embeddings\): shorten it$/);
  assert.equal(fs.existsSync(runDir), false);
});
