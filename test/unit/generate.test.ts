// Generation: the KV-cached decode picks, token for token, what full forward passes pick; the base column equals a
// model with no adapter; sampling follows transformers' processors and is reproducible by seed; answers stream,
// stop at end-of-turn tokens and stop strings, and continue conversations from the cache.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { loadModelTokenizer, templateEndOfTurn } from '../../extension/data';
import { EngineModel, type GenerationSession } from '../../extension/engine';
import { ChatColumn, loadChatModel, readGenerationConfig, stopTokenIds } from '../../extension/generate/chatModel';
import { ContextLengthError, generate, safeLength } from '../../extension/generate/generate';
import { argmax, candidates, GREEDY, Sampler, type SamplingOptions } from '../../extension/generate/sampling';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { trainBriefly } from '../helpers/briefRun';
import { cliPath, tempDir } from '../helpers/paths';

let trained: { model: string; run: string } | undefined;
async function trainedRun(): Promise<{ model: string; run: string }> {
  if (!trained) {
    const model = path.join(tempDir('generate'), 'model');
    makeTinyModel({ out: model, arch: 'llama', seed: 7 });
    trained = { model, run: await trainBriefly(model) };
  }
  return trained;
}

/** The greedy choice of a full forward pass (no cache) after each prefix of `ids`. */
function fullPassArgmax(engine: EngineModel, ids: number[]): number[] {
  const r = engine.run({ ids: Int32Array.from(ids), batch: 1, seq: ids.length }, { logSoftmax: true });
  const vocab = engine.config().vocabSize;
  return ids.map((_, t) => argmax(r.logSoftmax!.subarray(t * vocab, (t + 1) * vocab)));
}

test('greedy decoding with the KV cache picks what a full forward pass picks at every position, with and without the adapter', async () => {
  const { model, run } = await trainedRun();
  const chat = await loadChatModel({ run, quantize: false });
  const bare = EngineModel.load(model);
  try {
    const prompt = chat.tok.encode('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of Italy?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n');
    const answers: Record<string, number[]> = {};
    for (const scale of [1, 0]) {
      const session = chat.engine.startGeneration({ loraScale: scale });
      const r = await generate(session, chat.tok, prompt, { sampling: GREEDY, maxNewTokens: 24, stopTokenIds: [] });
      session.end();
      assert.equal(r.ids.length, 24);
      const all = [...prompt, ...r.ids];
      // with the adapter loaded at this scale, and (scale 0) a model that never had one
      for (const engine of scale === 1 ? [chat.engine] : [bare]) {
        const picks = fullPassArgmax(engine, all);
        for (let i = 0; i < r.ids.length; i++) assert.equal(r.ids[i], picks[prompt.length - 1 + i], `scale ${scale}, token ${i}`);
      }
      answers[scale] = r.ids;
    }
    assert.notDeepEqual(answers[1], answers[0], 'the adapter changes the answer');
    // the base column is exactly the model without an adapter: same logits, bit for bit
    const withAdapterAtZero = chat.engine.startGeneration({ loraScale: 0 });
    const noAdapter = bare.startGeneration();
    assert.deepEqual(withAdapterAtZero.append(prompt), noAdapter.append(prompt));
    withAdapterAtZero.end();
    noAdapter.end();
  } finally {
    chat.dispose();
    bare.dispose();
  }
});

test('the finetuned column answers as trained and stops at <|eot_id|>; a seed reproduces a sampled answer', async () => {
  const { run } = await trainedRun();
  const chat = await loadChatModel({ run });
  try {
    const column = new ChatColumn(chat, 1);
    const greedy = await column.answer([{ role: 'user', content: 'What is the capital of France?' }], { sampling: GREEDY, maxNewTokens: 48 });
    assert.equal(greedy.finishReason, 'stop-token', greedy.text);
    assert.match(greedy.text, /^The capital of/);
    const sampled: SamplingOptions = { temperature: 1, topK: 40, topP: 0.95, minP: 0.01, repetitionPenalty: 1.1, seed: 11 };
    const texts = [];
    for (let i = 0; i < 2; i++) {
      const c = new ChatColumn(chat, 1);
      texts.push((await c.answer([{ role: 'user', content: 'Tell me about the weather.' }], { sampling: sampled, maxNewTokens: 30 })).text);
      c.end();
    }
    assert.equal(texts[0], texts[1]);
    const other = new ChatColumn(chat, 1);
    const otherText = (await other.answer([{ role: 'user', content: 'Tell me about the weather.' }], { sampling: { ...sampled, seed: 12 }, maxNewTokens: 30 })).text;
    assert.notEqual(otherText, texts[0]);
    other.end();
    column.end();
  } finally {
    chat.dispose();
  }
});

test('a continuing conversation reuses the cached tokens and answers as a fresh session does', async () => {
  const { run } = await trainedRun();
  const chat = await loadChatModel({ run });
  try {
    const first = [{ role: 'user' as const, content: 'What is the capital of Spain?' }];
    const cont = new ChatColumn(chat, 1);
    const a1 = await cont.answer(first, { sampling: GREEDY, maxNewTokens: 40 });
    const second = [...first, { role: 'assistant' as const, content: a1.text }, { role: 'user' as const, content: 'And of Germany?' }];
    const a2 = await cont.answer(second, { sampling: GREEDY, maxNewTokens: 40 });
    const fresh = new ChatColumn(chat, 1);
    const b2 = await fresh.answer(second, { sampling: GREEDY, maxNewTokens: 40 });
    // the whole first turn (prompt and answer) came from the cache; only what follows the common prefix ran
    assert.ok(b2.promptTokens - a2.promptTokens >= 25, `${a2.promptTokens} of ${b2.promptTokens} prompt tokens ran`);
    assert.deepEqual(a2.ids, b2.ids);
    cont.end();
    fresh.end();
  } finally {
    chat.dispose();
  }
});

test('streaming: deltas add up to the text, nothing of a stop string is shown, and cancellation stops between tokens', async () => {
  const { run } = await trainedRun();
  const chat = await loadChatModel({ run });
  try {
    const ask = [{ role: 'user' as const, content: 'What is the capital of France?' }];
    const full = await new ChatColumn(chat, 1).answer(ask, { sampling: GREEDY, maxNewTokens: 48 });
    const word = full.text.split(' ')[2]; // "of"
    let streamed = '';
    const cut = await new ChatColumn(chat, 1).answer(ask, { sampling: GREEDY, maxNewTokens: 48, stopStrings: [` ${word}`], onText: (d) => (streamed += d) });
    assert.equal(cut.finishReason, 'stop-string');
    assert.equal(cut.text, full.text.slice(0, full.text.indexOf(` ${word}`)));
    assert.equal(streamed, cut.text);

    const controller = new AbortController();
    let pieces = 0;
    const cancelled = await new ChatColumn(chat, 0).answer(ask, {
      sampling: GREEDY, maxNewTokens: 48, signal: controller.signal,
      onText: () => { if (++pieces === 3) controller.abort(); },
    });
    assert.equal(cancelled.finishReason, 'cancelled');
    assert.ok(cancelled.ids.length >= 3 && cancelled.ids.length < 10, String(cancelled.ids.length));
  } finally {
    chat.dispose();
  }
});

test('the model\'s context: a longer conversation is refused, an answer ends where the conversation reaches it', async () => {
  // a session that always makes token 1 the likeliest and counts what it holds
  let held = 0;
  const session = {
    append(ids: ArrayLike<number>) {
      held += ids.length;
      return Float32Array.from([0, 5, 0]);
    },
  } as unknown as GenerationSession;
  const tok = { decode: (ids: ArrayLike<number>) => Array.from(ids, () => 'x').join('') };
  const options = { sampling: GREEDY, maxNewTokens: 50, stopTokenIds: [], contextLength: 10 };
  const r = await generate(session, tok, [2, 2, 2, 2], options);
  assert.equal(r.finishReason, 'context');
  assert.equal(r.ids.length, 6, 'the prompt (4) and the answer (6) fill the context (10)');
  assert.equal(held, 4 + 5, 'the last token is not run');
  // a continued conversation counts its history
  const again = await generate(session, tok, [2], options, [2, 2, 2, 2, 2, 2, 2, 2]);
  assert.deepEqual([again.ids.length, again.finishReason], [2, 'context']);
  await assert.rejects(generate(session, tok, [2], options, new Array(10).fill(2)), (e: unknown) => e instanceof ContextLengthError &&
    e.message === "the conversation is 10 tokens, and the model's context is 10 (max_position_embeddings in its config.json): start a new conversation, or shorten the prompt");
  // no context known: the token limit alone
  assert.equal((await generate(session, tok, new Array(20).fill(2), { ...options, contextLength: 0, maxNewTokens: 3 })).finishReason, 'length');
});

test('safeLength holds back an unfinished character and a possible stop-string start', () => {
  assert.equal(safeLength('Hello wor', ['world']), 6);
  assert.equal(safeLength('Hello\uFFFD', []), 5);
  assert.equal(safeLength('Hello', ['\nUser:']), 5);
  assert.equal(safeLength('Hello\nUs', ['\nUser:', 'xyz']), 5);
});

test('sampling: repetition penalty, temperature, top-k, top-p and min-p as transformers applies them', () => {
  const logits = Float32Array.from([2, 1, 0, -1, 3]);
  const o = (over: Partial<SamplingOptions>): SamplingOptions => ({ temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 0, ...over });
  const softmax = (x: number[]) => { const m = Math.max(...x); const e = x.map((v) => Math.exp(v - m)); const s = e.reduce((a, b) => a + b); return e.map((v) => v / s); };
  // no filtering: every token (in id order), softmax probabilities
  const all = candidates(logits, o({}));
  assert.deepEqual(all.ids, [0, 1, 2, 3, 4]);
  const p = softmax([2, 1, 0, -1, 3]);
  all.ids.forEach((id, i) => assert.ok(Math.abs(all.probs[i] - p[id]) < 1e-12));
  // temperature 0.5 sharpens: softmax(x / 0.5)
  const t = candidates(logits, o({ temperature: 0.5 }));
  assert.ok(Math.abs(t.probs[t.ids.indexOf(4)] - softmax([4, 2, 0, -2, 6])[4]) < 1e-12);
  assert.deepEqual(candidates(logits, o({ topK: 2 })).ids, [4, 0]);
  // top-p 0.9: p = [.64, .24, .09, .03, .01] sorted; .64 + .24 = .88 < .9, so three are kept
  assert.deepEqual(candidates(logits, o({ topP: 0.9 })).ids, [4, 0, 1]);
  assert.deepEqual(candidates(logits, o({ topP: 0.5 })).ids, [4]);
  // min-p 0.3: keep p >= 0.3 * 0.64
  assert.deepEqual(candidates(logits, o({ minP: 0.3 })).ids, [4, 0]);
  // repetition penalty 2 over token 4 (positive: divided) and 3 (negative: multiplied): greedy moves to token 0
  const s = new Sampler({ ...GREEDY, repetitionPenalty: 2 });
  assert.equal(s.next(logits, [4, 3]), 0);
  assert.equal(new Sampler(GREEDY).next(logits, [4]), 4);
  // draws follow the probabilities: over many seeds, the frequencies of top-k 2 match 0.73 / 0.27
  let first = 0;
  for (let seed = 0; seed < 2000; seed++) if (new Sampler(o({ topK: 2, seed })).next(logits, []) === 4) first++;
  assert.ok(Math.abs(first / 2000 - Math.E / (Math.E + 1)) < 0.04, String(first / 2000));
  assert.throws(() => new Sampler(o({ topP: 0 })), /top-p must be in \(0, 1\]/);
  // scores that are not numbers are an error, not token 0 (greedy) or no token at all (filters)
  for (const bad of [Float32Array.from([NaN, NaN]), Float32Array.from([-Infinity, -Infinity])]) {
    for (const options of [GREEDY, o({ topK: 1 }), o({ minP: 0.1 })]) {
      assert.throws(() => new Sampler(options).next(bad, []), /the model's next-token scores are not finite numbers/);
    }
  }
});

test('sampling candidates equal a plain reference (the whole vocabulary sorted) on random logits, ties with the k-th included', () => {
  // transformers' warpers over a full sort: top-k keeps every token at least as likely as the k-th, top-p the smallest
  // most-likely prefix reaching p of what is left, min-p those at least min-p times the most likely
  const reference = (logits: Float32Array, o: SamplingOptions): number[] => {
    const max = Math.max(...logits);
    const w = Array.from(logits, (x) => Math.exp((x - max) / o.temperature));
    let ids = Array.from(w.keys()).sort((a, b) => w[b] - w[a] || a - b);
    if (o.topK > 0 && o.topK < ids.length) ids = ids.filter((id) => w[id] >= w[ids[o.topK - 1]]);
    if (o.topP < 1) {
      const mass = ids.reduce((s, id) => s + w[id], 0);
      let cumulative = 0;
      let keep = 0;
      while (keep < ids.length && (keep === 0 || cumulative < o.topP * mass)) cumulative += w[ids[keep++]];
      ids = ids.slice(0, keep);
    }
    if (o.minP > 0) ids = ids.filter((id, i) => i === 0 || w[id] >= o.minP * w[ids[0]]);
    return ids;
  };
  let state = 12345;
  const random = () => ((state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  for (let trial = 0; trial < 400; trial++) {
    const n = 1 + Math.floor(random() * 300);
    // coarse values make ties; a wide range makes tokens under 1e-9 of the best
    const logits = Float32Array.from({ length: n }, () => Math.round((random() * 60 - 40) * (trial % 2 ? 1 : 4)) / 4);
    const o: SamplingOptions = {
      temperature: [0.3, 0.7, 1, 2][trial % 4], topK: [0, 1, 3, 50, 400][Math.floor(random() * 5)],
      topP: [1, 0.9, 0.5, 0.999999][Math.floor(random() * 4)], minP: [0, 0, 0.05, 0.5][Math.floor(random() * 4)], repetitionPenalty: 1, seed: 0,
    };
    const got = candidates(logits, o);
    const expected = reference(logits, o);
    if ((o.topK === 0 || o.topK >= n) && o.topP === 1 && o.minP === 0) {
      assert.deepEqual(got.ids, Array.from(logits.keys()), `trial ${trial}: every token, in id order`);
    } else {
      assert.deepEqual(got.ids, expected, `trial ${trial}: ${JSON.stringify(o)}`);
    }
    assert.ok(Math.abs(got.probs.reduce((a, b) => a + b, 0) - 1) < 1e-9);
  }
  // ties at the k-th: [5, 5, 5, 1] with top-k 2 keeps the three 5s, as transformers does
  assert.deepEqual(candidates(Float32Array.from([5, 5, 5, 1]), { ...GREEDY, temperature: 1, topK: 2 }).ids, [0, 1, 2]);
});

test('generate on the command line: --compare prints the base and the finetuned answer; bad input is one sentence', async () => {
  const { run } = await trainedRun();
  const out = execFileSync(process.execPath, [cliPath, 'generate', '--run', run, '--prompt', 'What is the capital of France?', '--compare', '--temperature', '0', '--max-new-tokens', '30', '--json'], { encoding: 'utf8' });
  const r = JSON.parse(out) as { answers: { label: string; text: string; finishReason: string }[] };
  assert.deepEqual(r.answers.map((a) => a.label), ['base', 'finetuned']);
  assert.notEqual(r.answers[0].text, r.answers[1].text);
  assert.equal(r.answers[1].finishReason, 'stop-token');
  const streamed = execFileSync(process.execPath, [cliPath, 'generate', '--run', run, '--prompt', 'What is the capital of France?', '--temperature', '0', '--max-new-tokens', '30'], { encoding: 'utf8' });
  assert.equal(streamed.trim(), r.answers[1].text.trim());
  for (const [args, message] of [
    [['--run', run], /give the question as --prompt TEXT or --messages FILE/],
    [['--run', run, '--prompt', 'x', '--top-p', '1.5'], /top-p must be in \(0, 1\], got 1.5/],
    [['--model', path.dirname(run), '--prompt', 'x', '--compare'], /./],
    [['--run', run, '--messages', path.join(run, 'missing.json')], /missing.json: no such file/],
  ] as [string[], RegExp][]) {
    let err = '';
    try {
      execFileSync(process.execPath, [cliPath, 'generate', ...args], { encoding: 'utf8', stdio: 'pipe' });
    } catch (e) {
      err = (e as { stderr: string }).stderr;
    }
    assert.match(err, message);
    assert.equal(err.trim().split('\n').length <= 2, true, err);
  }
});

test('a GPU dtype asked for where the answer is computed on the CPU is said, not dropped in silence', async (t) => {
  const { model } = await trainedRun();
  const chat = await loadChatModel({ model }, { computeDtype: 'bf16' });
  try {
    if (chat.device.startsWith('GPU')) return t.skip(`the answer is computed on the ${chat.device} here`);
    assert.equal(chat.deviceNote, '--dtype bf16 applies on the GPU; answering on the CPU, which computes in fp32.');
  } finally {
    chat.dispose();
  }
  const plain = await loadChatModel({ model });
  plain.dispose();
  assert.equal(plain.deviceNote, null);
});

test('an answer stops at the end-of-turn token the chat template writes, even where it is not an EOS id (a base model\'s layout)', async () => {
  // Qwen2.5 base: EOS <|endoftext|> (509 here) everywhere, while its ChatML template ends turns with <|im_end|> (511)
  const model = path.join(tempDir('generate-base-eot'), 'model');
  makeTinyModel({ out: model, arch: 'qwen2', seed: 3 });
  const edit = (file: string, change: (json: Record<string, unknown>) => void) => {
    const json = JSON.parse(fs.readFileSync(path.join(model, file), 'utf8')) as Record<string, unknown>;
    change(json);
    fs.writeFileSync(path.join(model, file), JSON.stringify(json));
  };
  edit('tokenizer_config.json', (c) => (c.eos_token = '<|endoftext|>'));
  edit('config.json', (c) => (c.eos_token_id = 509));
  edit('generation_config.json', (c) => (c.eos_token_id = 509));
  const tok = await loadModelTokenizer(model);
  assert.equal(templateEndOfTurn(tok), '<|im_end|>');
  assert.deepEqual(stopTokenIds(tok, [509]), [509, 511]);
  // a template whose turns end with the EOS adds nothing; no template, nothing to add
  const { model: llama } = await trainedRun();
  const llamaTok = await loadModelTokenizer(llama);
  assert.equal(templateEndOfTurn(llamaTok), '<|eot_id|>');
  assert.deepEqual(stopTokenIds(llamaTok, []), [...new Set([llamaTok.eosId, ...readGenerationConfig(llama).eosTokenIds])]);
  edit('tokenizer_config.json', (c) => delete c.chat_template);
  assert.equal(templateEndOfTurn(await loadModelTokenizer(model)), null);
});

test('generation_config.json is read as transformers reads it: greedy unless do_sample, unset settings at its defaults', () => {
  const dir = tempDir('generation-config');
  const read = (g: Record<string, unknown> | null) => {
    fs.rmSync(path.join(dir, 'generation_config.json'), { force: true });
    if (g !== null) fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify(g));
    const { temperature, topK, topP, minP, repetitionPenalty } = readGenerationConfig(dir).sampling;
    return { temperature, topK, topP, minP, repetitionPenalty };
  };
  // Mistral-7B-Instruct-v0.3 and TinyLlama-Chat ship ids only: transformers decodes greedily
  assert.deepEqual(read({ bos_token_id: 1, eos_token_id: 2 }), { temperature: 0, topK: 50, topP: 1, minP: 0, repetitionPenalty: 1 });
  // Llama-3.1-8B-Instruct's: top-k is transformers' 50, not off
  assert.deepEqual(read({ do_sample: true, temperature: 0.6, top_p: 0.9, eos_token_id: [128001, 128008, 128009] }), { temperature: 0.6, topK: 50, topP: 0.9, minP: 0, repetitionPenalty: 1 });
  // Qwen2.5-7B-Instruct's
  assert.deepEqual(read({ do_sample: true, temperature: 0.7, top_p: 0.8, top_k: 20, repetition_penalty: 1.05 }), { temperature: 0.7, topK: 20, topP: 0.8, minP: 0, repetitionPenalty: 1.05 });
  assert.deepEqual(read({ do_sample: true }), { temperature: 1, topK: 50, topP: 1, minP: 0, repetitionPenalty: 1 });
  assert.deepEqual(read({ do_sample: false, temperature: 0.6 }), { temperature: 0, topK: 50, topP: 1, minP: 0, repetitionPenalty: 1 });
  // no file: a chat's defaults
  assert.deepEqual(read(null), { temperature: 0.7, topK: 0, topP: 0.9, minP: 0, repetitionPenalty: 1 });
  assert.deepEqual(readGenerationConfig(dir).eosTokenIds, []);
});
