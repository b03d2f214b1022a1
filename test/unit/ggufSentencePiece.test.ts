// GGUF export of a SentencePiece-vocabulary model (Llama 2 / Mistral style: BPE with byte fallback, "▁" for spaces,
// scores instead of merges in the GGUF): llama.cpp tokenizes as the Hugging Face tokenizer does, and every type and
// the LoRA-only export of a briefly trained tiny MistralForCausalLM pass the llama.cpp check.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';
import { loadModelTokenizer } from '../../extension/data';
import { exportGguf } from '../../extension/export/exportGguf';
import { pieceScores } from '../../extension/export/gguf/tokenizerMetadata';
import type { GgufFileType } from '../../extension/export/gguf/types';
import { openGguf } from '../../extension/export/llamaCpp';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { trainBriefly } from '../helpers/briefRun';
import { assertVerified } from '../helpers/ggufAssert';
import { readGguf } from '../helpers/ggufReader';
import { cliPath, repoRoot, tempDir } from '../helpers/paths';

const cli = { execPath: process.execPath, cliPath };

function tinyMistral(size: 'tiny' | 'kquant', seed: number): string {
  const dir = path.join(tempDir(`gguf-spm-${size}`), 'model');
  makeTinyModel({ out: dir, arch: 'mistral', seed, size });
  return dir;
}

test('pieceScores: minus the rank of the first merge making each piece, 0 for pieces no merge makes', () => {
  const tokens = ['<unk>', 'a', 'b', 'c', 'ab', 'abc', 'bc'];
  const merges = ['a b', 'b c', 'ab c', 'a bc'];
  assert.deepEqual([...pieceScores(tokens, merges)], [0, 0, 0, 0, -0, -2, -1]);
});

test('the tiny Mistral vocabulary in llama.cpp: "llama" model, scores, byte tokens, and the same ids as our tokenizer', async () => {
  const model = tinyMistral('tiny', 3);
  const out = path.join(path.dirname(model), 'base-f32.gguf');
  const r = await exportGguf({ model, out, type: 'f32' });
  assertVerified(r, 'f32');
  assert.ok(r.verification!.maxAbsLogprobDiff < 1e-3, String(r.verification!.maxAbsLogprobDiff));

  const g = readGguf(out);
  assert.equal(g.metadata.get('general.architecture'), 'llama');
  assert.equal(g.metadata.get('tokenizer.ggml.model'), 'llama');
  assert.equal(g.metadata.get('tokenizer.ggml.add_space_prefix'), true);
  assert.equal(g.metadata.get('tokenizer.ggml.unknown_token_id'), 0);
  assert.equal(g.metadata.get('tokenizer.ggml.bos_token_id'), 1);
  assert.equal(g.metadata.get('tokenizer.ggml.eos_token_id'), 2);
  assert.equal(g.metadata.has('tokenizer.ggml.merges'), false);
  const tokens = g.metadata.get('tokenizer.ggml.tokens') as string[];
  const types = g.metadata.get('tokenizer.ggml.token_type') as number[];
  const scores = g.metadata.get('tokenizer.ggml.scores') as number[];
  assert.equal(tokens.length, 512);
  assert.deepEqual([types[0], types[1], types[2]], [2, 3, 3], 'unk unknown, bos/eos control');
  assert.equal(tokens[3 + 0x0a], '<0x0A>');
  assert.ok(types.slice(3, 259).every((t) => t === 6), 'the 256 byte tokens are typed BYTE');
  // merged pieces follow the bytes in merge order: strictly falling scores
  assert.ok(scores[259] === 0 && scores[260] < 0 && scores[300] < scores[260], `${scores[259]} ${scores[260]} ${scores[300]}`);

  const ours = await loadModelTokenizer(model);
  const cpp = await openGguf(out);
  try {
    const texts = [
      'Hello world, the weather is nice.',
      'Question: What is 12 plus 30?\nAnswer: 12 plus 30 is 42.',
      '  two leading spaces and   three inside ',
      'café, naïve, 東京 ✓ 🙂',
      'tabs\tand\r\nCRLF line ends',
      '<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s><s>[INST] And now? [/INST]',
    ];
    for (const text of texts) {
      const ids = ours.encode(text);
      assert.deepEqual(cpp.tokenize(text, { special: true }), ids, JSON.stringify(text));
      assert.equal(cpp.detokenize(ours.encode(text.replace(/<\/?s>/g, '')), { special: true }).trimStart(), text.replace(/<\/?s>/g, '').trimStart(), JSON.stringify(text));
    }
    // characters outside the vocabulary become their UTF-8 bytes
    assert.deepEqual(ours.encode('東').slice(-3), [0xe6, 0x9d, 0xb1].map((b) => 3 + b));
  } finally {
    await cpp.close();
  }
});

test('a briefly trained tiny Mistral run: f16, bf16, q8_0 and the LoRA-only export pass the llama.cpp check', async () => {
  const model = tinyMistral('tiny', 4);
  const runDir = await trainBriefly(model);
  const dir = path.dirname(model);
  for (const type of ['f16', 'bf16', 'q8_0'] as GgufFileType[]) {
    const r = await exportGguf({ run: runDir, out: path.join(dir, `merged-${type}.gguf`), type, ...(type === 'q8_0' ? { cli } : {}) });
    assertVerified(r, type);
  }
  const lora = await exportGguf({ run: runDir, out: path.join(dir, 'lora.gguf'), type: 'f16', loraOnly: true });
  assertVerified(lora, 'lora-only');
  assert.equal(readGguf(path.join(dir, 'lora.gguf')).metadata.get('general.type'), 'adapter');
});

test('q4_k_m of a briefly trained tiny Mistral run (k-quant width): verified', async () => {
  const model = tinyMistral('kquant', 5);
  const runDir = await trainBriefly(model);
  const r = await exportGguf({ run: runDir, out: path.join(path.dirname(model), 'q4km.gguf'), type: 'q4_k_m' });
  assertVerified(r, 'q4_k_m');
  assert.ok(r.verification!.meanKl < 0.1, JSON.stringify(r.verification));
});

test("Llama 2's real tokenizer (32000 pieces, 58980 merges) in a GGUF: llama.cpp tokenizes as Hugging Face does", async () => {
  const dir = tempDir('gguf-llama2-tokenizer');
  const model = path.join(dir, 'model');
  makeTinyModel({ out: model, arch: 'mistral', seed: 6, tokenizerFrom: path.join(repoRoot, 'node_modules', '@lenml', 'tokenizer-llama2', 'models') });
  const out = path.join(dir, 'f32.gguf');
  const r = await exportGguf({ model, out, type: 'f32' });
  assert.ok(r.verification!.verified && r.verification!.tokens >= 30, JSON.stringify(r.verification));
  const g = readGguf(out);
  assert.equal((g.metadata.get('tokenizer.ggml.tokens') as string[]).length, 32000);
  const ours = await loadModelTokenizer(model);
  const cpp = await openGguf(out);
  try {
    const texts = [
      'The quick brown fox jumps over the lazy dog.',
      "I'm sure you'll like it: they're coming at 6:30, don't be late!",
      '  indented code:\n    def add(a, b):\n        return a + b\n',
      'Überprüfung, naïveté, 東京タワー, Ελληνικά, emoji 🙂🚀',
      'numbers 1234567890 and 3.14159, URLs https://example.com/a?b=c',
      '<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nWhat is QLoRA? [/INST] A way to finetune. </s>',
    ];
    for (const text of texts) assert.deepEqual(cpp.tokenize(text, { special: true }), ours.encode(text), JSON.stringify(text));
  } finally {
    await cpp.close();
  }
});
