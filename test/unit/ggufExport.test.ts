// export-gguf end to end: models made here and the reference models with PEFT-written adapters, in every type,
// written as GGUF and checked in real llama.cpp (node-llama-cpp's prebuilt CPU binary) against the engine.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { Template } from '@huggingface/jinja';
import { alpacaFallbackTemplate, loadModelTokenizer, renderExample, renderGenerationPrompt, type ChatMessage } from '../../extension/data';
import { exportGguf } from '../../extension/export/exportGguf';
import { writeModelGguf } from '../../extension/export/gguf/llamaGguf';
import { merge, mergedChatTemplate } from '../../extension/trainer/verbs/merge';
import type { GgufFileType } from '../../extension/export/gguf/types';
import { logprobDifference, verifyGguf } from '../../extension/export/verifyGguf';
import { EngineModel } from '../../extension/engine';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { assertVerified } from '../helpers/ggufAssert';
import { readGguf } from '../helpers/ggufReader';
import { cliPath, reference, tempDir } from '../helpers/paths';
import { trainBriefly } from '../helpers/briefRun';

const cli = { execPath: process.execPath, cliPath };

function tiny(arch: 'llama' | 'qwen2', size: 'tiny' | 'kquant' = 'tiny', seed = 0): string {
  const dir = path.join(tempDir(`gguf-${arch}-${size}`), 'model');
  makeTinyModel({ out: dir, arch, seed, size });
  return dir;
}

test('tiny Llama in f32, f16, bf16 and q8_0: llama.cpp matches the engine within each type\'s tolerance', async () => {
  const model = tiny('llama');
  const dir = path.dirname(model);
  const limits: Record<string, number> = { f32: 1e-3, f16: 0.05, bf16: 0.05, q8_0: 0.2 };
  for (const type of ['f32', 'f16', 'bf16', 'q8_0'] as GgufFileType[]) {
    const out = path.join(dir, `tiny-${type}.gguf`);
    // one of them through the CLI's child process, as export-gguf runs it
    const r = await exportGguf({ model, out, type, ...(type === 'q8_0' ? { cli } : {}) });
    assertVerified(r, type);
    assert.ok(r.verification!.maxAbsLogprobDiff <= limits[type], `${type}: ${r.verification!.maxAbsLogprobDiff}`);
    assert.equal(readGguf(out).metadata.get('general.file_type'), ({ f32: 0, f16: 1, bf16: 32, q8_0: 7 } as Record<string, number>)[type]);
  }
  const sizes = Object.fromEntries(['f32', 'f16', 'q8_0'].map((t) => [t, fs.statSync(path.join(dir, `tiny-${t}.gguf`)).size]));
  assert.ok(sizes.f16 < 0.6 * sizes.f32 && sizes.q8_0 < 0.7 * sizes.f16, JSON.stringify(sizes));
});

test('Llama-3 style (llama3 rope scaling, tied embeddings) and Qwen2 (q/k/v biases) with PEFT-written adapters', async () => {
  const dir = tempDir('gguf-ref');
  for (const name of ['llama3-shared', 'qwen2-shared']) {
    for (const type of ['f32', 'bf16', 'q8_0'] as GgufFileType[]) {
      const out = path.join(dir, `${name}-${type}.gguf`);
      // the merged weights are computed as the GGUF is written: the temporary folder beside it holds no weights
      const tempFiles: string[] = [];
      const onProgress = (phase: string) => {
        if (phase === 'write') for (const f of fs.readdirSync(dir, { recursive: true }) as string[]) if (f.includes('merge-tmp') && !tempFiles.includes(f)) tempFiles.push(f);
      };
      const r = await exportGguf({ model: reference(name), adapter: reference(`${name}-adapter`), out, type, onProgress });
      assert.ok(tempFiles.length > 0 && tempFiles.every((f) => !f.endsWith('.safetensors')), tempFiles.join(', '));
      assertVerified(r, `${name} ${type}`);
      if (type === 'f32') assert.ok(r.verification!.maxAbsLogprobDiff < 1e-3, `${name} f32: ${r.verification!.maxAbsLogprobDiff}`);
      const g = readGguf(out);
      assert.equal(g.tensors.some((t) => t.name === 'rope_freqs.weight'), name === 'llama3-shared');
      assert.equal(g.tensors.some((t) => t.name === 'output.weight'), false, 'tied embeddings: no output.weight');
    }
    assert.deepEqual(fs.readdirSync(dir).filter((f) => !f.endsWith('.gguf')), [], 'no temporary merge folder left');
  }
});

test('a finetune\'s GGUF, its merge computed a tensor at a time, is the GGUF of the merged model folder, byte for byte; an output folder that does not exist yet is made', async () => {
  const dir = tempDir('gguf-streamed');
  const model = reference('llama3-shared');
  const adapter = reference('llama3-shared-adapter');
  const merged = path.join(dir, 'merged');
  merge({ model, adapter, out: merged, dtype: 'float32', chatTemplate: await mergedChatTemplate(model, adapter) });
  for (const type of ['f32', 'q8_0'] as GgufFileType[]) {
    const fromFolder = path.join(dir, `folder-${type}.gguf`);
    await writeModelGguf({ modelDir: merged, out: fromFolder, fileType: type, name: 'llama3-shared', finetuned: true });
    const streamed = path.join(dir, 'not', 'yet', `streamed-${type}.gguf`);
    await exportGguf({ model, adapter, out: streamed, type, verify: false });
    assert.ok(fs.readFileSync(streamed).equals(fs.readFileSync(fromFolder)), `${type}: the files differ`);
  }
});

for (const arch of ['llama', 'qwen2'] as const) {
  test(`q4_k_m of a briefly trained ${arch} run: llama.cpp's own type mix, verified`, async () => {
    const model = tiny(arch, 'kquant', 1);
    const runDir = await trainBriefly(model);
    const out = path.join(path.dirname(model), 'q4km.gguf');
    const r = await exportGguf({ run: runDir, out, type: 'q4_k_m', cli });
    assertVerified(r, `${arch} q4_k_m`);
    assert.ok(r.verification!.meanKl < 0.1 && r.verification!.confidentPositions >= 10, JSON.stringify(r.verification));
    // 2 layers: use_more_bits picks layer 1's attn_v and ffn_down; the output layer is q6_k too
    const types = Object.fromEntries(readGguf(out).tensors.map((t) => [t.name, t.type]));
    assert.equal(types['blk.1.attn_v.weight'], 14);
    assert.equal(types['blk.1.ffn_down.weight'], 14);
    assert.equal(types['blk.0.attn_v.weight'], 12);
    assert.equal(types['blk.0.attn_q.weight'], 12);
    assert.equal(types[arch === 'llama' ? 'output.weight' : 'token_embd.weight'], 14);
    assert.equal(types['blk.0.attn_norm.weight'], 0);
  });
}

test('a finetune of a model without a chat template carries the Alpaca-style format it was trained with (the base alone carries none)', async () => {
  const model = tiny('llama', 'tiny', 5);
  const configFile = path.join(model, 'tokenizer_config.json');
  const { chat_template: _dropped, ...config } = JSON.parse(fs.readFileSync(configFile, 'utf8')) as Record<string, unknown>;
  fs.writeFileSync(configFile, JSON.stringify(config));
  const tok = await loadModelTokenizer(model);
  assert.equal(tok.chatTemplate, null);
  // the Jinja template renders what training rendered, BOS included (as apply_chat_template renders; llama.cpp drops
  // a rendered BOS where it adds its own)
  const fallback = alpacaFallbackTemplate(tok);
  assert.ok(fallback.startsWith('{{- bos_token }}'));
  const template = new Template(fallback);
  const turns: ChatMessage[] = [
    { role: 'user', content: 'What is the capital of France?' },
    { role: 'assistant', content: 'Paris.' },
    { role: 'user', content: 'And of Italy?' },
    { role: 'assistant', content: 'Rome.' },
  ];
  for (const system of [[], [{ role: 'system', content: 'Answer briefly.' }]] as ChatMessage[][]) {
    for (let n = 1; n <= turns.length; n++) {
      const messages = [...system, ...turns.slice(0, n)];
      const rendered = template.render({ messages, eos_token: tok.eosToken, bos_token: tok.bosToken, add_generation_prompt: n % 2 === 1 });
      const ours = n % 2 === 1 ? renderGenerationPrompt(messages, tok) : renderExample({ kind: 'chat', messages }, tok).segments.map((x) => x.text).join('');
      assert.equal(rendered, ours, `${messages.length} messages`);
    }
  }

  const run = await trainBriefly(model);
  const dir = path.dirname(model);
  const finetune = await exportGguf({ run, out: path.join(dir, 'finetune.gguf'), type: 'f16' });
  assertVerified(finetune, 'finetune of a model without a chat template');
  assert.equal(readGguf(finetune.file).metadata.get('tokenizer.chat_template'), fallback);
  const base = await exportGguf({ model, out: path.join(dir, 'base.gguf'), type: 'f16' });
  assertVerified(base, 'base without a chat template');
  assert.equal(readGguf(base.file).metadata.get('tokenizer.chat_template'), undefined);
  // a finetune's GGUF without it (as exported before it was written) is said to lack it
  const stale = await verifyGguf({ gguf: base.file, type: 'f16', model, adapter: path.join(run, 'adapter'), run });
  assert.ok(stale.problems.includes('the GGUF carries no chat template, where the Alpaca-style format this finetune was trained with (its model has none) belongs (a file exported before it was written: export it again)'), stale.problems.join('; '));
  // merge writes it into the merged model's tokenizer_config.json, so its own GGUF carries it too
  const merged = path.join(dir, 'merged');
  execFileSync(process.execPath, [cliPath, 'merge', '--model', model, '--adapter', path.join(run, 'adapter'), '--out', merged], { stdio: 'pipe' });
  const mergedConfig = JSON.parse(fs.readFileSync(path.join(merged, 'tokenizer_config.json'), 'utf8')) as { chat_template?: string };
  assert.equal(mergedConfig.chat_template, fallback);
  const fromMerged = await exportGguf({ model: merged, out: path.join(dir, 'merged.gguf'), type: 'f16', verify: false });
  assert.equal(readGguf(fromMerged.file).metadata.get('tokenizer.chat_template'), fallback);
});

test('a model with sharp predictions verifies: log-probs under llama.cpp\'s fp32 range (-Infinity there) compare at its floor', async () => {
  assert.equal(logprobDifference(-120, -Infinity), 0);
  assert.equal(logprobDifference(-90, -101.5), 0, 'both under the precise range');
  assert.equal(logprobDifference(-50, -Infinity), 37, 'a probable token llama.cpp calls impossible still differs');
  assert.ok(Math.abs(logprobDifference(-1, -1.02) - 0.02) < 1e-12);
  // the final norm's weights times 32 (exact in bf16): logits 32 times as far apart, many scored tokens under -103
  const model = tiny('llama', 'tiny', 3);
  const file = path.join(model, 'model.safetensors');
  const buf = fs.readFileSync(file);
  const headerLen = Number(buf.readBigUInt64LE(0));
  const norm = (JSON.parse(buf.subarray(8, 8 + headerLen).toString('utf8')) as Record<string, { dtype: string; data_offsets: [number, number] }>)['model.norm.weight'];
  assert.equal(norm.dtype, 'BF16');
  const scaled = new Float32Array(1);
  const bits = new Uint16Array(scaled.buffer, 2, 1); // the high half of a little-endian float: its bf16 bits
  for (let at = 8 + headerLen + norm.data_offsets[0]; at < 8 + headerLen + norm.data_offsets[1]; at += 2) {
    bits[0] = buf.readUInt16LE(at);
    scaled[0] *= 32;
    buf.writeUInt16LE(bits[0], at);
  }
  fs.writeFileSync(file, buf);
  const out = path.join(path.dirname(model), 'sharp.gguf');
  const r = await exportGguf({ model, out, type: 'f32' });
  const engine = EngineModel.load(model);
  try {
    const ids = [1, ...Array.from({ length: 40 }, (_, i) => 3 + ((i * 37) % 200))];
    const logSoftmax = engine.run({ ids: Int32Array.from(ids), batch: 1, seq: ids.length }, { logSoftmax: true }).logSoftmax!;
    const vocab = engine.config().vocabSize;
    const under = ids.slice(1).filter((id, t) => logSoftmax[t * vocab + id] < -103).length;
    assert.ok(under >= 5, `${under} of 40 next tokens under -103: the model is not sharp enough to test this`);
  } finally {
    engine.dispose();
  }
  assertVerified(r, 'sharp f32');
  assert.ok(r.verification!.maxAbsLogprobDiff <= 1e-3, `${r.verification!.maxAbsLogprobDiff}`);
});

test('a GGUF checked against a model it was not made from fails the check, saying what differs', async () => {
  const a = tiny('llama', 'tiny', 0);
  const b = tiny('llama', 'tiny', 7);
  const out = path.join(path.dirname(a), 'a.gguf');
  await exportGguf({ model: a, out, type: 'f16', verify: false });
  const v = await verifyGguf({ gguf: out, type: 'f16', model: b, adapter: null, run: null });
  assert.equal(v.verified, false);
  assert.ok(v.meanKl > 0.1, `KL ${v.meanKl}`);
  assert.match(v.problems[0], /differ from the engine's by up to/);
  assert.ok(fs.existsSync(out), 'a failed check keeps the file');
  // the CLI says so and exits 1
  try {
    execFileSync(process.execPath, [cliPath, 'verify-gguf', '--gguf', out, '--type', 'f16', '--model', b], { stdio: 'pipe' });
    assert.fail('expected exit 1');
  } catch (e) {
    const err = e as { status: number; stdout: Buffer };
    assert.equal(err.status, 1);
    assert.match(err.stdout.toString(), /^NOT verified/);
  }
});

test('export-gguf refuses what it cannot do, naming it, and leaves no file', async () => {
  const dir = tempDir('gguf-bad');
  await assert.rejects(exportGguf({ model: reference('llama-shared-bnb4'), out: path.join(dir, 'x.gguf'), type: 'f16' }), /bnb-4bit model: export the original/);
  await assert.rejects(exportGguf({ model: tiny('llama'), out: path.join(dir, 'x.bin'), type: 'f16' }), /--out must name a \.gguf file/);
  await assert.rejects(exportGguf({ model: reference('llama-shared'), out: path.join(dir, 'y.gguf'), type: 'f16' }), /no tokenizer\.json/);
  await assert.rejects(exportGguf({ model: tiny('llama'), adapter: reference('qwen2-shared-adapter'), out: path.join(dir, 'z.gguf'), type: 'f16' }), /adapter|shape|tensor/i);
  assert.deepEqual(fs.readdirSync(dir), []);
  // the CLI: one sentence, exit 1
  try {
    execFileSync(process.execPath, [cliPath, 'export-gguf', '--model', reference('llama-shared-bnb4'), '--out', path.join(dir, 'x.gguf')], { stdio: 'pipe' });
    assert.fail('expected exit 1');
  } catch (e) {
    const err = e as { status: number; stderr: Buffer };
    assert.equal(err.status, 1);
    assert.match(err.stderr.toString(), /bnb-4bit model/);
    assert.doesNotMatch(err.stderr.toString(), /\n\s+at /, 'no stack trace');
  }
});

test('kill -9 mid-export leaves no .gguf; the next export removes the dead process\'s temporaries', async () => {
  const dir = tempDir('gguf-kill');
  const model = path.join(dir, 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 2, size: 'small' });
  const out = path.join(dir, 'small.gguf');
  const { spawn } = await import('node:child_process');
  const child = spawn(process.execPath, [cliPath, 'export-gguf', '--model', model, '--out', out, '--type', 'q4_k_m', '--no-verify'], { stdio: 'ignore' });
  // kill it once the temporary file has data in it
  const tmp = `${out}.tmp-${child.pid}`;
  for (let i = 0; i < 600 && !(fs.existsSync(tmp) && fs.statSync(tmp).size > 1_000_000); i++) await new Promise((r) => setTimeout(r, 25));
  assert.ok(fs.existsSync(tmp), 'the export never started writing');
  child.kill('SIGKILL');
  await new Promise((r) => child.on('close', r));
  assert.equal(fs.existsSync(out), false, 'no half-written GGUF under the final name');
  assert.ok(fs.existsSync(tmp), 'the killed process left its temporary');
  const alive = `${out}.tmp-${process.ppid}`; // a live process's temporary is left alone
  fs.writeFileSync(alive, 'x');
  const r = await exportGguf({ model, out, type: 'q8_0', verify: false });
  assert.ok(fs.statSync(out).size === r.bytes);
  assert.equal(fs.existsSync(tmp), false, 'the stale temporary is gone');
  assert.ok(fs.existsSync(alive));
});
