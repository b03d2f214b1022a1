// The GGUF writer against an independent reader, and the Hugging Face → GGUF layout of the tiny models: names,
// shapes, the Q/K row permutation, biases, tied embeddings, llama3 rope factors, tokenizer metadata.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { readModelConfig } from '../../extension/engine';
import { llama3RopeFactors, permuteForInterleavedRope, tensorTypeFor, writeModelGguf } from '../../extension/export/gguf/llamaGguf';
import { listModelTensors, readTensorF32 } from '../../extension/export/gguf/safetensorsReader';
import { looksLikeControlToken, tokenizerMetadata } from '../../extension/export/gguf/tokenizerMetadata';
import { tensorBytes } from '../../extension/export/gguf/types';
import { gguf, writeGguf, type GgufValue } from '../../extension/export/gguf/writer';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { readGguf } from '../helpers/ggufReader';
import { tempDir } from '../helpers/paths';

test('GGUF writer: every metadata type, aligned tensor data, read back by an independent reader', async () => {
  const file = path.join(tempDir('gguf-writer'), 'x.gguf');
  const metadata = new Map<string, GgufValue>([
    ['general.alignment', gguf.u32(32)],
    ['a.u8', { type: 'u8', value: 250 }],
    ['a.i8', { type: 'i8', value: -5 }],
    ['a.u16', { type: 'u16', value: 65000 }],
    ['a.i16', { type: 'i16', value: -30000 }],
    ['a.i32', gguf.i32(-7)],
    ['a.f32', gguf.f32(0.5)],
    ['a.bool', gguf.bool(true)],
    ['a.str', gguf.str('héllo ✓')],
    ['a.u64', { type: 'u64', value: 2 ** 40 }],
    ['a.i64', { type: 'i64', value: -(2 ** 40) }],
    ['a.f64', { type: 'f64', value: Math.PI }],
    ['a.strings', gguf.strings(['x', '', 'yz'])],
    ['a.i32s', gguf.i32s([1, -2, 3])],
  ]);
  const t1 = Float32Array.from([1, 2, 3]); // 12 bytes: the next tensor starts 32-aligned after padding
  const t2 = Float32Array.from({ length: 8 }, (_, i) => i / 8);
  const specs = [
    { name: 'one', shape: [3], type: 'f32' as const },
    { name: 'two', shape: [4, 2], type: 'f32' as const },
  ];
  const { bytes } = await writeGguf(file, metadata, specs, (i) => new Uint8Array([t1, t2][i].buffer));
  const r = readGguf(file);
  assert.equal(r.version, 3);
  assert.equal(bytes, fs.statSync(file).size);
  for (const [k, v] of metadata) {
    const expected = v.type === 'array' ? Array.from(v.values as ArrayLike<unknown>) : v.value;
    assert.deepEqual(r.metadata.get(k), expected, k);
  }
  assert.deepEqual(r.tensors.map((t) => [t.name, t.shape, t.type, t.offset]), [['one', [3], 0, 0], ['two', [4, 2], 0, 32]]);
  assert.equal(r.dataStart % 32, 0);
  assert.deepEqual(new Float32Array(Uint8Array.from(r.tensorBytes('two', 32)).buffer), t2);
  assert.deepEqual(fs.readdirSync(path.dirname(file)), ['x.gguf'], 'no temporary file left');
});

test('GGUF writer: a wrong tensor size or a failing producer leaves no file', async () => {
  const dir = tempDir('gguf-fail');
  const md = new Map<string, GgufValue>([['general.alignment', gguf.u32(32)]]);
  const specs = [{ name: 'w', shape: [4], type: 'f32' as const }];
  await assert.rejects(writeGguf(path.join(dir, 'a.gguf'), md, specs, () => new Uint8Array(12)), /tensor w \(f32 \[4\]\) has 12 bytes, expected 16/);
  await assert.rejects(writeGguf(path.join(dir, 'b.gguf'), md, specs, () => { throw new Error('disk full'); }), /disk full/);
  assert.deepEqual(fs.readdirSync(dir), []);
  assert.throws(() => tensorBytes('q8_0', [33, 2]), /multiple of 32 values, got 33/);
  assert.equal(tensorBytes('q8_0', [64, 3]), 2 * 34 * 3);
  assert.equal(tensorBytes('q4_k', [512, 2]), 2 * 144 * 2);
});

test('tensors over 2 GiB: reads and writes go in pieces (fs takes at most 2 GiB - 1 bytes a call); small pieces give the same bytes', async () => {
  const dir = tempDir('gguf-chunks');
  const model = path.join(dir, 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 3 });
  const entry = listModelTensors(model).get('model.embed_tokens.weight')!;
  const whole = readTensorF32(entry);
  for (const chunk of [1, 2, 3, 7, 64, 1000]) assert.deepEqual(readTensorF32(entry, chunk), whole, `${entry.dtype} read ${chunk} bytes at a time`);
  // each dtype: the same values as F32, BF16 and F16 files
  const values = Float32Array.from([1, -2.5, 0.15625, 65504, -0, 3e-5, 7, 1e-7]);
  const bf16 = new Uint16Array(values.length);
  const f16 = Uint16Array.from([0x3c00, 0xc100, 0x3100, 0x7bff, 0x8000, 0x01f7, 0x4700, 0x0002]);
  new Uint32Array(values.buffer).forEach((bits, i) => (bf16[i] = bits >>> 16));
  for (const [dtype, data, expected] of [
    ['F32', new Uint8Array(values.buffer), values],
    ['BF16', new Uint8Array(bf16.buffer), Float32Array.from(bf16, (b) => new Float32Array(new Uint32Array([b << 16]).buffer)[0])],
    ['F16', new Uint8Array(f16.buffer), Float32Array.from([1, -2.5, 0.15625, 65504, -0, 503 * 2 ** -24, 7, 2 * 2 ** -24])],
  ] as const) {
    const file = path.join(dir, `${dtype}.bin`);
    fs.writeFileSync(file, Buffer.concat([Buffer.from('pad'), data]));
    const e = { name: 't', file, dtype, shape: [2, 4], begin: 3, end: 3 + data.length };
    for (const chunk of [1, 3, 5, 1 << 28]) assert.deepEqual(readTensorF32(e, chunk), expected, `${dtype} in ${chunk}-byte reads`);
    // into the start of a longer array, the rest left as it was
    const into = new Float32Array(11).fill(9);
    const view = readTensorF32(e, 5, into);
    assert.equal(view.buffer, into.buffer);
    assert.deepEqual(view, expected, `${dtype} into an array`);
    assert.deepEqual(Array.from(into.subarray(8)), [9, 9, 9]);
    assert.throws(() => readTensorF32(e, 5, new Float32Array(7)), /readTensorF32 of tensor t: 7 values of room for 8/);
  }
  assert.throws(() => readTensorF32({ name: 't', file: path.join(dir, 'F32.bin'), dtype: 'F32', shape: [3, 4], begin: 3, end: 35 }), /tensor t holds 32 bytes, not 12 F32 values/);

  const md = new Map<string, GgufValue>([['general.alignment', gguf.u32(32)]]);
  const t = Float32Array.from({ length: 37 }, (_, i) => i * 0.25 - 3);
  const specs = [{ name: 'w', shape: [37], type: 'f32' as const }, { name: 'v', shape: [37], type: 'f32' as const }];
  const produce = () => new Uint8Array(t.buffer);
  await writeGguf(path.join(dir, 'one.gguf'), md, specs, produce);
  await writeGguf(path.join(dir, 'pieces.gguf'), md, specs, produce, { chunkBytes: 5 });
  assert.deepEqual(fs.readFileSync(path.join(dir, 'pieces.gguf')), fs.readFileSync(path.join(dir, 'one.gguf')));
});

test('token types: added tokens marked special, or that look like control tokens ("<|...|>", as Qwen2.5\'s FIM tokens), are CONTROL as llama.cpp\'s converter makes them; other added tokens USER_DEFINED', async () => {
  const model = path.join(tempDir('gguf-token-types'), 'model');
  makeTinyModel({ out: model, arch: 'qwen2', seed: 2 });
  const file = path.join(model, 'tokenizer.json');
  const json = JSON.parse(fs.readFileSync(file, 'utf8')) as { added_tokens: { id: number; content: string; special: boolean }[] };
  const imStart = json.added_tokens.find((t) => t.content === '<|im_start|>')!;
  imStart.special = false;  // as tokenizer.json marks <|fim_prefix|>, <|repo_name|>, <|file_sep|>
  json.added_tokens.push({ ...imStart, id: 512, content: '<custom>', special: false }, { ...imStart, id: 513, content: '<｜tool▁sep｜>', special: false });
  fs.writeFileSync(file, JSON.stringify(json));
  const { entries } = await tokenizerMetadata(model, 514);
  const meta = new Map(entries);
  const tokens = meta.get('tokenizer.ggml.tokens') as unknown as { values: string[] };
  const types = meta.get('tokenizer.ggml.token_type') as unknown as { values: Int32Array };
  const typeOf = (text: string) => types.values[tokens.values.indexOf(text)];
  assert.deepEqual(['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<custom>', '<｜tool▁sep｜>'].map(typeOf), [3, 3, 3, 4, 3]);
  assert.deepEqual(['<pad>', '<unused12>', '<|a|>', '<|a', 'a|>', '<b>'].map(looksLikeControlToken), [true, true, true, false, false, false]);
});

test('named chat templates: the default one is tokenizer.chat_template, tool_use is tokenizer.chat_template.tool_use, listed in tokenizer.chat_templates', async () => {
  const model = path.join(tempDir('gguf-named-templates'), 'model');
  makeTinyModel({ out: model, arch: 'qwen2', seed: 2 });
  const configFile = path.join(model, 'tokenizer_config.json');
  const config = JSON.parse(fs.readFileSync(configFile, 'utf8')) as { chat_template: string };
  const toolUse = '{{ tools | length }}' + config.chat_template;
  fs.writeFileSync(configFile, JSON.stringify({ ...config, chat_template: [{ name: 'default', template: config.chat_template }, { name: 'tool_use', template: toolUse }] }));
  const meta = new Map((await tokenizerMetadata(model, 512)).entries);
  const value = (key: string) => (meta.get(key) as unknown as { value?: string; values?: string[] } | undefined);
  assert.equal(value('tokenizer.chat_template')?.value, config.chat_template);
  assert.equal(value('tokenizer.chat_template.tool_use')?.value, toolUse);
  assert.deepEqual(value('tokenizer.chat_templates')?.values, ['tool_use']);
});

test('Q/K permutation: rotate-half rows become interleaved pairs within each head', () => {
  // 2 heads of 4 rows, 1 column: per head rows [a0 a1 b0 b1] -> [a0 b0 a1 b1]
  const w = Float32Array.from([0, 1, 2, 3, 10, 11, 12, 13]);
  assert.deepEqual(Array.from(permuteForInterleavedRope(w, 2, 1)), [0, 2, 1, 3, 10, 12, 11, 13]);
  // columns move with their rows
  const w2 = Float32Array.from([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]);
  assert.deepEqual(Array.from(permuteForInterleavedRope(w2, 1, 2)), [0, 0.5, 2, 2.5, 1, 1.5, 3, 3.5]);
  // into the start of a longer array
  const into = new Float32Array(10).fill(-1);
  const view = permuteForInterleavedRope(w, 2, 1, into);
  assert.equal(view.buffer, into.buffer);
  assert.deepEqual(Array.from(into), [0, 2, 1, 3, 10, 12, 11, 13, -1, -1]);
  assert.throws(() => permuteForInterleavedRope(w, 2, 1, new Float32Array(7)), /permuteForInterleavedRope: 7 values of room for 8/);
});

test('tensor types: vectors stay f32; matrices follow the file type; q8_0 needs rows of 32', () => {
  assert.equal(tensorTypeFor('q8_0', [64]), 'f32');
  assert.equal(tensorTypeFor('q8_0', [64, 8]), 'q8_0');
  assert.equal(tensorTypeFor('q8_0', [48, 8]), 'f16');
  assert.equal(tensorTypeFor('bf16', [48, 8]), 'bf16');
  assert.equal(tensorTypeFor('f32', [48, 8]), 'f32');
  // q4_k_m: rows that are not whole super-blocks fall back as llama.cpp's do: q4_k to q5_0, q6_k to q8_0
  assert.equal(tensorTypeFor('q4_k_m', [896, 8], { kind: 'other', layer: 0, layers: 24 }), 'q5_0');
  assert.equal(tensorTypeFor('q4_k_m', [896, 8], { kind: 'output', layer: 0, layers: 24 }), 'q8_0');
  assert.equal(tensorTypeFor('q4_k_m', [1024, 8], { kind: 'other', layer: 0, layers: 24 }), 'q4_k');
  assert.equal(tensorTypeFor('q4_k_m', [40, 8], { kind: 'other', layer: 0, layers: 24 }), 'f16');
});

function layout(arch: 'llama' | 'qwen2') {
  const dir = path.join(tempDir(`gguf-${arch}`), 'model');
  makeTinyModel({ out: dir, arch, seed: 3, size: 'tiny' });
  return dir;
}

for (const arch of ['llama', 'qwen2'] as const) {
  test(`a tiny ${arch} model as an f32 GGUF: names, shapes, permutation, tokenizer metadata`, async () => {
    const model = layout(arch);
    const out = path.join(path.dirname(model), 'model.gguf');
    const report = await writeModelGguf({ modelDir: model, out, fileType: 'f32', name: 'tiny' });
    const c = readModelConfig(model);
    const r = readGguf(out);
    assert.equal(r.metadata.get('general.architecture'), arch);
    assert.equal(r.metadata.get(`${arch}.block_count`), c.numLayers);
    assert.equal(r.metadata.get(`${arch}.attention.head_count_kv`), c.numKvHeads);
    assert.equal(r.metadata.get(`${arch}.rope.freq_base`), Math.fround(c.ropeTheta));
    assert.equal(r.metadata.get('tokenizer.ggml.model'), 'gpt2');
    assert.equal(r.metadata.get('tokenizer.ggml.pre'), arch === 'llama' ? 'llama-bpe' : 'qwen2');
    assert.equal((r.metadata.get('tokenizer.ggml.tokens') as string[]).length, c.vocabSize);
    assert.ok(typeof r.metadata.get('tokenizer.chat_template') === 'string');
    assert.equal(report.tensors, r.tensors.length);

    const hf = listModelTensors(model);
    const tensor = (name: string) => {
      const t = r.tensors.find((x) => x.name === name)!;
      const n = t.shape.reduce((a, b) => a * b, 1);
      return { shape: t.shape, values: new Float32Array(Uint8Array.from(r.tensorBytes(name, n * 4)).buffer) };
    };
    const embd = tensor('token_embd.weight');
    assert.deepEqual(embd.shape, [c.hiddenSize, c.vocabSize]);
    assert.deepEqual(embd.values, readTensorF32(hf.get('model.embed_tokens.weight')!));
    const q = tensor('blk.1.attn_q.weight');
    const hfQ = readTensorF32(hf.get('model.layers.1.self_attn.q_proj.weight')!);
    assert.deepEqual(q.values, arch === 'llama' ? permuteForInterleavedRope(hfQ, c.numHeads, c.hiddenSize) : hfQ);
    const k = tensor('blk.0.attn_k.weight');
    assert.deepEqual(k.shape, [c.hiddenSize, c.numKvHeads * c.headDim]);
    assert.equal(r.tensors.some((t) => t.name === 'blk.0.attn_q.bias'), c.qkvBias);
    assert.equal(r.tensors.some((t) => t.name === 'output.weight'), !c.tieWordEmbeddings);
    assert.equal(r.tensors.length, 1 + c.numLayers * (9 + (c.qkvBias ? 3 : 0)) + 1 + (c.tieWordEmbeddings ? 0 : 1));
  });
}

test('llama3 rope factors: 1 for high frequencies, the factor for low ones, smooth in between', () => {
  const c = {
    headDim: 64, ropeTheta: 500000, ropeScalingFactor: 8, ropeLowFreqFactor: 1, ropeHighFreqFactor: 4, ropeOriginalMaxPositionEmbeddings: 8192,
  } as Parameters<typeof llama3RopeFactors>[0];
  const f = llama3RopeFactors(c);
  assert.equal(f.length, 32);
  assert.equal(f[0], 1);
  assert.equal(f[31], 8);
  for (let i = 1; i < 32; i++) assert.ok(f[i] >= f[i - 1], 'monotone');
  assert.ok(f.some((x) => x > 1 && x < 8), 'a smooth band');
});

test("the export's tensor reader refuses an index whose shards lie outside the model folder, as the engine's loader does", () => {
  const dir = tempDir('gguf-shard-outside');
  const outside = path.join(dir, 'outside.safetensors');
  fs.writeFileSync(outside, '');
  const model = path.join(dir, 'model');
  fs.mkdirSync(model);
  const index = path.join(model, 'model.safetensors.index.json');
  for (const shard of ['../outside.safetensors', outside, 'sub/../../outside.safetensors', 'C:\\\\weights.safetensors', '']) {
    fs.writeFileSync(index, JSON.stringify({ weight_map: { 'model.norm.weight': shard } }));
    assert.throws(() => listModelTensors(model), (err: Error) => err.message === `${index}: shard '${shard}' is outside the model folder`, shard);
  }
  fs.writeFileSync(index, JSON.stringify({ weight_map: { 'model.norm.weight': 7 } }));
  assert.throws(() => listModelTensors(model), /weight_map\['model.norm.weight'\] is not a file name/);
});
