// merge end to end: the merged model scores like PEFT's merged reference, bf16 and sharded outputs load, config.json
// becomes a plain model's, and a failure leaves neither the output folder nor its temporary sibling behind.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { EngineError } from '../../extension/engine';
import { MergedWeights } from '../../extension/engine/tools';
import { parseOptions } from '../../extension/trainer/cliArgs';
import { merge, mergeVerb, parseByteSize, parseMergeDtype } from '../../extension/trainer/verbs/merge';
import { exportAdapter } from '../../extension/trainer/verbs/export';
import { quantize } from '../../extension/trainer/verbs/quantize';
import { score } from '../../extension/trainer/verbs/score';
import { reference, tempDir } from '../helpers/paths';
import { readSafetensors } from '../helpers/safetensors';
import { captureStdout } from '../helpers/stdout';

interface Ref {
  ids: number[];
  loss: number;
  next_token_logprobs: number[];
}

const mergedRef = JSON.parse(fs.readFileSync(reference('llama-shared-merged.ref.json'), 'utf8')) as Ref;

function expectScoresLike(model: string, ref: Ref, tol: number) {
  const result = score({ model, ids: Int32Array.from(ref.ids) });
  assert.ok(Math.abs(result.loss - ref.loss) <= tol, `loss ${result.loss} vs ${ref.loss}`);
  assert.equal(result.next_token_logprobs.length, ref.next_token_logprobs.length);
  result.next_token_logprobs.forEach((lp, i) => {
    assert.ok(Math.abs(lp - ref.next_token_logprobs[i]) <= tol, `log-prob ${i}: ${lp} vs ${ref.next_token_logprobs[i]}`);
  });
}

function leftovers(parent: string): string[] {
  return fs.readdirSync(parent).filter((name) => name.includes('.tmp-'));
}

// Runs the verb as the CLI would, capturing what it prints.
function runVerb(argv: string[]): Promise<string> {
  return captureStdout(() => mergeVerb.run(parseOptions('merge', argv, mergeVerb.options)));
}

test('merge --dtype f32 scores like PEFT merged it (loss and every log-prob within 1e-3)', async () => {
  const parent = tempDir('merge-f32');
  const out = path.join(parent, 'merged');
  const report = JSON.parse(
    await runVerb(['--model', reference('llama-shared'), '--adapter', reference('llama-shared-adapter'), '--out', out, '--dtype', 'f32', '--json']),
  ) as { shards: number; tensors: number; dtype: string; files: string[]; copied: string[] };
  assert.equal(report.shards, 1);
  assert.equal(report.tensors, 21);
  assert.equal(report.dtype, 'float32');
  assert.deepEqual(report.files, ['model.safetensors']);
  assert.deepEqual(fs.readdirSync(out).sort(), ['config.json', 'generation_config.json', 'model.safetensors']);
  assert.deepEqual(leftovers(parent), []);
  const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.equal(config.dtype, 'float32');
  assert.ok(!('torch_dtype' in config));
  expectScoresLike(out, mergedRef, 1e-3);
});

for (const [model, adapter] of [['llama3-shared', 'llama3-shared-adapter'], ['qwen2-shared', 'qwen2-shared-adapter']] as const) {
  test(`merge of ${model} in f32 scores as the base with its adapter does`, () => {
    const ref = JSON.parse(fs.readFileSync(reference(`${adapter}.ref.json`), 'utf8')) as Ref;
    const out = path.join(tempDir('merge-same'), 'merged');
    merge({ model: reference(model), adapter: reference(adapter), out, dtype: 'float32' });
    const withAdapter = score({ model: reference(model), adapter: reference(adapter), ids: Int32Array.from(ref.ids) });
    expectScoresLike(out, { ids: ref.ids, loss: withAdapter.loss, next_token_logprobs: withAdapter.next_token_logprobs }, 1e-4);
    // The config keeps its own form: llama3-shared is Hub-style (torch_dtype), qwen2-shared transformers-5 (dtype).
    const raw = JSON.parse(fs.readFileSync(reference(`${model}/config.json`), 'utf8')) as Record<string, unknown>;
    const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
    assert.equal('torch_dtype' in config, 'torch_dtype' in raw);
    assert.equal('dtype' in config, 'dtype' in raw || !('torch_dtype' in raw));
    assert.equal(config.torch_dtype ?? config.dtype, 'float32');
    for (const f of fs.readdirSync(reference(model))) assert.ok(fs.existsSync(path.join(out, f)), f);
  });
}

test('merge writes bf16 by default, and the bf16 model loads and scores close to the f32 merge', () => {
  const out = path.join(tempDir('merge-bf16'), 'merged');
  const result = merge({ model: reference('llama-shared'), adapter: reference('llama-shared-adapter'), out });
  assert.equal(result.dtype, 'bfloat16');
  for (const [name, t] of readSafetensors(path.join(out, 'model.safetensors'))) assert.equal(t.dtype, 'BF16', name);
  assert.equal((JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as { dtype: string }).dtype, 'bfloat16');
  expectScoresLike(out, mergedRef, 0.05);
});

test('merge --max-shard-size writes shards and an index that load like the single file', async () => {
  const out = path.join(tempDir('merge-shards'), 'merged');
  await runVerb(['--model', reference('llama-shared'), '--adapter', reference('llama-shared-adapter'), '--out', out, '--dtype', 'f32', '--max-shard-size', '300KB']);
  const index = JSON.parse(fs.readFileSync(path.join(out, 'model.safetensors.index.json'), 'utf8')) as {
    metadata: { total_size: number };
    weight_map: Record<string, string>;
  };
  const shards = [...new Set(Object.values(index.weight_map))].sort();
  assert.ok(shards.length >= 2, `shards: ${shards.join(', ')}`);
  shards.forEach((name, i) => assert.equal(name, `model-${String(i + 1).padStart(5, '0')}-of-${String(shards.length).padStart(5, '0')}.safetensors`));
  let total = 0;
  for (const shard of shards) for (const t of readSafetensors(path.join(out, shard)).values()) total += t.bytes.length;
  assert.equal(index.metadata.total_size, total);
  assert.ok(!fs.existsSync(path.join(out, 'model.safetensors')));
  expectScoresLike(out, mergedRef, 1e-3);
});

test('merge of a bnb-4bit base writes a plain model: no quantization_config, no bnb tensors', () => {
  const out = path.join(tempDir('merge-bnb4'), 'merged');
  merge({ model: reference('llama-shared-bnb4-dq'), adapter: reference('llama-shared-adapter'), out, dtype: 'float32' });
  const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8')) as Record<string, unknown>;
  assert.ok(!('quantization_config' in config));
  const tensors = readSafetensors(path.join(out, 'model.safetensors'));
  const plain = readSafetensors(reference('llama-shared/model.safetensors'));
  assert.deepEqual([...tensors.keys()].sort(), [...plain.keys()].sort());
  assert.deepEqual(tensors.get('model.layers.0.mlp.down_proj.weight')?.shape, [128, 256]);
  const result = score({ model: out, ids: Int32Array.from(mergedRef.ids) });
  // NF4 moves the weights a little: close to the unquantized merge, not equal to it.
  assert.ok(Math.abs(result.loss - mergedRef.loss) < 0.1, `loss ${result.loss}`);
});

test('MergedWeights computes, a tensor at a time, what merge --dtype f32 writes, bit for bit (plain and bnb-4bit bases)', () => {
  for (const base of ['llama-shared', 'llama-shared-bnb4-dq']) {
    const out = path.join(tempDir('merged-weights'), 'merged');
    merge({ model: reference(base), adapter: reference('llama-shared-adapter'), out, dtype: 'float32' });
    const written = readSafetensors(path.join(out, 'model.safetensors'));
    const merged = MergedWeights.open(reference(base), reference('llama-shared-adapter'));
    try {
      const tensors = merged.tensors();
      assert.deepEqual(tensors.map((t) => t.name).sort(), [...written.keys()].sort(), base);
      // computed into one array reused from tensor to tensor too, its first values each time
      const largest = Math.max(...tensors.map((t) => t.shape.reduce((a, d) => a * d, 1)));
      const into = new Float32Array(largest + 3);
      for (const t of tensors) {
        const file = written.get(t.name)!;
        assert.deepEqual(t.shape, file.shape, `${base} ${t.name}`);
        assert.ok(Buffer.from(merged.values(t.name).buffer).equals(file.bytes), `${base} ${t.name}: not the bytes merge wrote`);
        const view = merged.values(t.name, into);
        assert.equal(view.buffer, into.buffer);
        assert.equal(view.length, file.bytes.length / 4);
        assert.ok(Buffer.from(view.buffer, 0, view.byteLength).equals(file.bytes), `${base} ${t.name}: not the bytes merge wrote, into an array`);
      }
      const embedding = 'model.embed_tokens.weight';
      assert.throws(() => merged.values(embedding, new Float32Array(3)), /into has 3 elements, fewer than the \d+ needed/);
      assert.throws(() => merged.values(embedding, new Uint8Array(largest * 4) as unknown as Float32Array), /into must be a Float32Array/);
      assert.throws(() => merged.values('model.layers.0.mlp.up_proj.weight.absmax'), /the merged model has no tensor/);
    } finally {
      merged.close();
    }
    assert.throws(() => merged.tensors(), /closed/);
  }
  assert.throws(() => MergedWeights.open(reference('llama3-shared'), reference('llama-shared-adapter')), EngineError);
});

test('a failed merge leaves no output folder and no .tmp- folder', () => {
  const parent = tempDir('merge-fail');
  const out = path.join(parent, 'merged');
  assert.throws(
    () => merge({ model: reference('llama-shared'), adapter: path.join(parent, 'no-such-adapter'), out }),
    (err: unknown) => err instanceof EngineError && /no adapter_config\.json/.test(err.message),
  );
  assert.throws(
    () => merge({ model: reference('llama-shared'), adapter: reference('llama3-shared-adapter'), out }),
    (err: unknown) => err instanceof EngineError && /lora_A\.weight' has shape/.test(err.message),
  );
  assert.deepEqual(fs.readdirSync(parent), []);
});

test('merge refuses a non-empty output folder and leaves it as it was', () => {
  const out = tempDir('merge-nonempty');
  fs.writeFileSync(path.join(out, 'notes.txt'), 'keep me');
  assert.throws(() => merge({ model: reference('llama-shared'), adapter: reference('llama-shared-adapter'), out }), /not empty/);
  assert.deepEqual(fs.readdirSync(out), ['notes.txt']);
  assert.deepEqual(leftovers(path.dirname(out)).filter((n) => n.startsWith(path.basename(out))), []);
});

test('merge option parsing: dtypes and shard sizes', () => {
  assert.equal(parseMergeDtype('bf16'), 'bfloat16');
  assert.equal(parseMergeDtype('F16'), 'float16');
  assert.equal(parseMergeDtype('float32'), 'float32');
  assert.throws(() => parseMergeDtype('int8'), /bf16, f16 or f32/);
  assert.equal(parseByteSize('5GB'), 5e9);
  assert.equal(parseByteSize('500MB'), 5e8);
  assert.equal(parseByteSize('2GiB'), 2 * 2 ** 30);
  assert.equal(parseByteSize('1.5kb'), 1500);
  assert.equal(parseByteSize('12345'), 12345);
  assert.throws(() => parseByteSize('5 apples'), /size such as 5GB/);
  assert.throws(() => parseByteSize('0'), /size such as 5GB/);
});

test('a model in a Hugging Face cache snapshot (its files links to blobs): merge and quantize copy what the links point to', () => {
  // the cache's layout: snapshots/<revision>/<file> -> ../../blobs/<hash>
  const cache = path.join(tempDir('hf-snapshot'), 'models--org--tiny');
  const blobs = path.join(cache, 'blobs');
  const snapshot = path.join(cache, 'snapshots', 'abc123');
  fs.mkdirSync(blobs, { recursive: true });
  fs.mkdirSync(snapshot, { recursive: true });
  for (const name of fs.readdirSync(reference('llama-shared'))) {
    fs.copyFileSync(path.join(reference('llama-shared'), name), path.join(blobs, `blob-${name}`));
    fs.symlinkSync(path.join('..', '..', 'blobs', `blob-${name}`), path.join(snapshot, name));
  }
  const merged = path.join(tempDir('hf-merged'), 'out');
  merge({ model: snapshot, adapter: reference('llama-shared-adapter'), out: merged, dtype: 'float32' });
  const quantized = path.join(tempDir('hf-quantized'), 'out');
  quantize({ model: snapshot, out: quantized, doubleQuant: true });
  // a model folder that is a link to the snapshot (~/models/llama -> the cache's snapshot) is that snapshot
  const linked = path.join(tempDir('hf-linked'), 'llama');
  fs.symlinkSync(snapshot, linked);
  const viaLink = path.join(tempDir('hf-quantized-link'), 'out');
  assert.deepEqual(quantize({ model: linked, out: viaLink, doubleQuant: true }).notCopied, []);
  for (const out of [merged, quantized, viaLink]) {
    const copied = path.join(out, 'generation_config.json');
    assert.ok(fs.existsSync(copied), `${out} lacks generation_config.json`);
    assert.equal(fs.lstatSync(copied).isSymbolicLink(), false);
    assert.equal(fs.readFileSync(copied, 'utf8'), fs.readFileSync(path.join(reference('llama-shared'), 'generation_config.json'), 'utf8'));
  }
});

test('links that lead outside the model or adapter folder are not followed by merge, quantize or export: a warning names each', () => {
  // a downloaded model or run whose README.md links to a private file: it must not end up in what the user shares
  const secrets = tempDir('link-secrets');
  fs.writeFileSync(path.join(secrets, 'id_rsa'), 'PRIVATE KEY');
  const model = path.join(tempDir('link-model'), 'model');
  fs.cpSync(reference('llama-shared'), model, { recursive: true });
  fs.symlinkSync(path.join(secrets, 'id_rsa'), path.join(model, 'README.md'));
  fs.writeFileSync(path.join(model, 'NOTES.md'), 'kept');
  fs.symlinkSync('NOTES.md', path.join(model, 'NOTES-link.md')); // inside: followed
  const adapter = path.join(tempDir('link-adapter'), 'adapter');
  fs.cpSync(reference('llama-shared-adapter'), adapter, { recursive: true });
  fs.symlinkSync(path.join(secrets, 'id_rsa'), path.join(adapter, 'tokenizer_config.json'));
  fs.mkdirSync(path.join(adapter, 'additional_chat_templates'));
  fs.symlinkSync(secrets, path.join(adapter, 'additional_chat_templates', 'more'));

  const merged = path.join(tempDir('link-merged'), 'out');
  const result = merge({ model, adapter, out: merged, dtype: 'float32' });
  const quantized = path.join(tempDir('link-quantized'), 'out');
  const q = quantize({ model, out: quantized, doubleQuant: true });
  for (const out of [merged, quantized]) {
    assert.equal(fs.existsSync(path.join(out, 'README.md')), false, `${out}: README.md`);
    assert.equal(fs.readFileSync(path.join(out, 'NOTES-link.md'), 'utf8'), 'kept');
  }
  assert.equal(fs.existsSync(path.join(merged, 'tokenizer_config.json')), false);
  assert.equal(fs.existsSync(path.join(merged, 'additional_chat_templates', 'more')), false);
  assert.deepEqual(result.notCopied.map((w) => path.basename(w.split(' ')[0])).sort(), ['README.md', 'more', 'tokenizer_config.json']);
  assert.ok(result.notCopied.every((w) => /is a link that leads outside .* \(to .*id_rsa\)|\(to .*link-secrets/.test(w)), result.notCopied.join('\n'));
  assert.deepEqual(q.notCopied.map((w) => path.basename(w.split(' ')[0])), ['README.md']);
  const leaked = (dir: string): boolean => fs.readdirSync(dir, { recursive: true, encoding: 'utf8' }).some((f) => {
    const p = path.join(dir, f);
    return fs.statSync(p).isFile() && fs.readFileSync(p).includes('PRIVATE KEY');
  });
  assert.equal(leaked(merged) || leaked(quantized), false);

  const run = tempDir('link-run');
  fs.writeFileSync(path.join(run, 'config.json'), JSON.stringify({ model }));
  fs.cpSync(adapter, path.join(run, 'adapter'), { recursive: true, verbatimSymlinks: true });
  const exported = path.join(tempDir('link-export'), 'out');
  const e = exportAdapter({ run, out: exported });
  assert.ok(fs.existsSync(path.join(exported, 'adapter_model.safetensors')));
  assert.deepEqual(e.notCopied.map((w) => path.basename(w.split(' ')[0])).sort(), ['more', 'tokenizer_config.json']);
  assert.equal(leaked(exported), false);
});

test("a run whose adapter folder is a link out of the run is not exported; a folder named snapshots outside a Hugging Face cache is no snapshot", () => {
  const secrets = tempDir('link-secrets2');
  fs.cpSync(reference('llama-shared-adapter'), secrets, { recursive: true });
  fs.writeFileSync(path.join(secrets, 'id_rsa'), 'PRIVATE KEY');
  const run = tempDir('link-run2');
  fs.writeFileSync(path.join(run, 'config.json'), JSON.stringify({ model: 'x' }));
  fs.mkdirSync(path.join(run, 'checkpoints', 'step-1'), { recursive: true });
  fs.writeFileSync(path.join(run, 'checkpoints', 'step-1', 'DONE'), '{}');
  fs.symlinkSync(secrets, path.join(run, 'checkpoints', 'step-1', 'adapter'));
  const out = path.join(tempDir('link-export2'), 'out');
  assert.throws(() => exportAdapter({ run, out }), /adapter is a link that leads outside .*; a run's adapter must be inside the run/);
  assert.equal(fs.existsSync(out), false);

  // ~/Downloads/snapshots/m: a README linking two levels up is outside the model folder, as anywhere else
  const downloads = tempDir('link-downloads');
  fs.writeFileSync(path.join(downloads, 'notes.txt'), 'PRIVATE NOTES');
  const model = path.join(downloads, 'snapshots', 'm');
  fs.mkdirSync(path.dirname(model));
  fs.cpSync(reference('llama-shared'), model, { recursive: true });
  fs.symlinkSync(path.join('..', '..', 'notes.txt'), path.join(model, 'README.md'));
  const quantized = path.join(tempDir('link-quantized2'), 'out');
  const q = quantize({ model, out: quantized, doubleQuant: true });
  assert.deepEqual(q.notCopied.map((w) => path.basename(w.split(' ')[0])), ['README.md']);
  assert.equal(fs.existsSync(path.join(quantized, 'README.md')), false);
});
