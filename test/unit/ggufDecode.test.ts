// llama.cpp itself decodes our quantized blocks (issue 8: "Q8_0 and Q4_K_M blocks decode, by llama.cpp, to within
// their formats' expected error of the original weights"). A llama GGUF, written with the project's writer, whose
// transformer block is all zeros (the residual stream stays the token's embedding) and whose token embeddings are
// one-hot: token k's normalized hidden state is X * e_k, so llama.cpp's logits for input token k are X * W[:, k], a
// column of output.weight as llama.cpp decoded it. output.weight is Gaussian, in the type under test, with one row
// exactly zero: a zero row stays zero in every format, its logit is exactly 0, and log p_i - log p_zero = X * W[i, k]
// pins the log-softmax's per-position constant. Every column of the decoded matrix comes back from one scoreTokens call.
//
// X is 15.875 = 127 * 0.125: llama.cpp quantizes the activations before a quantized matmul (q8_0 blocks with an fp16
// scale against q8_0 weights, q8_K blocks with an fp32 scale against k-quants, f16/bf16 against f16/bf16), and a
// one-hot of 15.875 goes through all of these exactly, so what comes back is the weights' decoding alone.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { after, test } from 'node:test';
import { ggmlDequantize, ggmlQuantize, type GgmlType } from '../../extension/engine/tools';
import { openGguf } from '../../extension/export/llamaCpp';
import { GGUF_ALIGNMENT, gguf, writeGguf, type GgufTensorSpec, type GgufValue } from '../../extension/export/gguf/writer';
import { makeMiniLlama, mulberry32 } from '../helpers/miniGguf';
import { tempDir } from '../helpers/paths';

const dir = tempDir('gguf-decode');
after(() => fs.rmSync(dir, { recursive: true, force: true }));

const HIDDEN = 512; // two 256-value super-blocks (sixteen q8_0 blocks) per row
const FFN = 64;
const HEADS = 4;
const RMS_EPS = 1e-5;
const X = 15.875; // the one nonzero activation: exact in fp16, bf16, and as 127 * an fp16 or fp32 scale
const SIGMA = 0.1; // logits X * W within about ±8: log-probs far above fp32 softmax's floor (about -87)

// The mini llama's byte-level BPE vocabulary (llama.cpp needs its byte tokens and merges), padded with plain tokens
// so that there is one token per hidden dimension to probe and output.weight has more rows than columns.
const mini = makeMiniLlama();
const tokens = [...mini.tokens];
while (tokens.length < 600) tokens.push(`<pad${tokens.length}>`);
const VOCAB = tokens.length;
const ZERO_ROW = 300; // output.weight's all-zero row: the reference logit

/** N(0, sigma) by Box-Muller, [VOCAB, HIDDEN] row-major, with ZERO_ROW all zeros. */
function gaussianWeights(seed: number): Float32Array {
  const rand = mulberry32(seed);
  const w = new Float32Array(VOCAB * HIDDEN);
  for (let i = 0; i < w.length; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - rand()));
    const a = 2 * Math.PI * rand();
    w[i] = SIGMA * r * Math.cos(a);
    w[i + 1] = SIGMA * r * Math.sin(a);
  }
  w.fill(0, ZERO_ROW * HIDDEN, (ZERO_ROW + 1) * HIDDEN);
  return w;
}

/** Writes the probe model with output.weight (row-major [VOCAB, HIDDEN]) stored as `type`; returns its bytes. */
async function writeProbeGguf(file: string, type: GgmlType, weights: Float32Array): Promise<Uint8Array> {
  const metadata = new Map<string, GgufValue>([
    ['general.architecture', gguf.str('llama')],
    ['general.alignment', gguf.u32(GGUF_ALIGNMENT)],
    ['llama.context_length', gguf.u32(1024)],
    ['llama.embedding_length', gguf.u32(HIDDEN)],
    ['llama.block_count', gguf.u32(1)],
    ['llama.feed_forward_length', gguf.u32(FFN)],
    ['llama.attention.head_count', gguf.u32(HEADS)],
    ['llama.attention.head_count_kv', gguf.u32(HEADS)],
    ['llama.attention.layer_norm_rms_epsilon', gguf.f32(RMS_EPS)],
    ['llama.rope.freq_base', gguf.f32(10000)],
    ['tokenizer.ggml.model', gguf.str('gpt2')],
    ['tokenizer.ggml.pre', gguf.str('default')],
    ['tokenizer.ggml.tokens', gguf.strings(tokens)],
    ['tokenizer.ggml.token_type', gguf.i32s(tokens.map((_, i) => (i === mini.bos || i === mini.eos ? 3 : 1)))],
    ['tokenizer.ggml.merges', gguf.strings(mini.merges)],
    ['tokenizer.ggml.bos_token_id', gguf.u32(mini.bos)],
    ['tokenizer.ggml.eos_token_id', gguf.u32(mini.eos)],
  ]);
  // Token t's embedding is e_(t mod HIDDEN); rmsnorm makes it Y * e_k, and output_norm scales that to X * e_k.
  const embd = new Float32Array(VOCAB * HIDDEN);
  for (let t = 0; t < VOCAB; t++) embd[t * HIDDEN + (t % HIDDEN)] = 1;
  const y = 1 / Math.sqrt(1 / HIDDEN + RMS_EPS);
  const quantized = ggmlQuantize(type, weights, VOCAB, HIDDEN);
  // the same bytes into the start of a longer array
  const into = new Uint8Array(quantized.length + 5).fill(7);
  const encoded = ggmlQuantize(type, weights, VOCAB, HIDDEN, into);
  assert.equal(encoded.buffer, into.buffer);
  assert.deepEqual(encoded, quantized);
  assert.deepEqual(Array.from(into.subarray(quantized.length)), [7, 7, 7, 7, 7]);
  assert.throws(() => ggmlQuantize(type, weights, VOCAB, HIDDEN, new Uint8Array(quantized.length - 1)), /fewer than the \d+ needed/);
  const f32 = (n: number, v = 0) => new Float32Array(n).fill(v);
  const tensors: { spec: GgufTensorSpec; data: Float32Array | Uint8Array }[] = [
    { spec: { name: 'token_embd.weight', shape: [HIDDEN, VOCAB], type: 'f32' }, data: embd },
    { spec: { name: 'blk.0.attn_norm.weight', shape: [HIDDEN], type: 'f32' }, data: f32(HIDDEN) },
    { spec: { name: 'blk.0.attn_q.weight', shape: [HIDDEN, HIDDEN], type: 'f32' }, data: f32(HIDDEN * HIDDEN) },
    { spec: { name: 'blk.0.attn_k.weight', shape: [HIDDEN, HIDDEN], type: 'f32' }, data: f32(HIDDEN * HIDDEN) },
    { spec: { name: 'blk.0.attn_v.weight', shape: [HIDDEN, HIDDEN], type: 'f32' }, data: f32(HIDDEN * HIDDEN) },
    { spec: { name: 'blk.0.attn_output.weight', shape: [HIDDEN, HIDDEN], type: 'f32' }, data: f32(HIDDEN * HIDDEN) },
    { spec: { name: 'blk.0.ffn_norm.weight', shape: [HIDDEN], type: 'f32' }, data: f32(HIDDEN) },
    { spec: { name: 'blk.0.ffn_gate.weight', shape: [HIDDEN, FFN], type: 'f32' }, data: f32(HIDDEN * FFN) },
    { spec: { name: 'blk.0.ffn_up.weight', shape: [HIDDEN, FFN], type: 'f32' }, data: f32(HIDDEN * FFN) },
    { spec: { name: 'blk.0.ffn_down.weight', shape: [FFN, HIDDEN], type: 'f32' }, data: f32(FFN * HIDDEN) },
    { spec: { name: 'output_norm.weight', shape: [HIDDEN], type: 'f32' }, data: f32(HIDDEN, X / y) },
    { spec: { name: 'output.weight', shape: [HIDDEN, VOCAB], type }, data: quantized },
  ];
  await writeGguf(file, metadata, tensors.map((t) => t.spec), (i) => {
    const d = tensors[i].data;
    return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
  });
  return quantized;
}

/** output.weight as llama.cpp decoded it, row-major [VOCAB, HIDDEN], from one teacher-forced pass over 0..HIDDEN-1. */
async function llamaCppDecoded(file: string): Promise<Float64Array> {
  const model = await openGguf(file, { threads: 2, f32Attention: true });
  try {
    const ids = Array.from({ length: HIDDEN }, (_, k) => k);
    const rows = await model.scoreTokens(ids);
    const w = new Float64Array(VOCAB * HIDDEN);
    rows.forEach((row, k) => {
      for (let i = 0; i < VOCAB; i++) {
        assert.ok(row[i] > -60, `input ${k}, token ${i}: log-prob ${row[i]} is near fp32 softmax's floor`);
        w[i * HIDDEN + k] = (row[i] - row[ZERO_ROW]) / X;
      }
    });
    return w;
  } finally {
    await model.close();
  }
}

function rms(a: ArrayLike<number>): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * a[i];
  return Math.sqrt(s / a.length);
}

function diffStats(a: ArrayLike<number>, b: ArrayLike<number>): { max: number; rms: number } {
  assert.equal(a.length, b.length);
  let max = 0, s = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    max = Math.max(max, d);
    s += d * d;
  }
  return { max, rms: Math.sqrt(s / a.length) };
}

// Relative RMS error of the decoded weights against the Gaussian originals, measured here (seed 8, 307k weights; the
// same figures from llama.cpp and from ggmlDequantize): q8_0 0.536%, q5_0 4.275%, q6_k 1.774%, q4_k 7.077%, f16
// 0.021%, bf16 0.166%; llama.cpp and ggmlDequantize agree to at most 9e-7 of the weights' RMS. q5_0's step is a
// block-of-32 absmax / 16 (~4%). Rounding to a uniform grid gives
// about step / sqrt(12): q8_0's step is a block-of-32 absmax / 127 (~0.5%), q6_k's a block-of-16 absmax / 32, q4_k's
// a block-of-32 range / 15 (~7%). The bounds are the formats' expected errors, just above these.
const CASES: { type: GgmlType; maxRelRms: number }[] = [
  { type: 'q8_0', maxRelRms: 0.006 },
  { type: 'q5_0', maxRelRms: 0.05 },
  { type: 'q6_k', maxRelRms: 0.02 },
  { type: 'q4_k', maxRelRms: 0.075 },
  { type: 'f16', maxRelRms: 0.0005 },
  { type: 'bf16', maxRelRms: 0.003 },
];

for (const { type, maxRelRms } of CASES) {
  test(`${type}: llama.cpp decodes our blocks as ggmlDequantize does, within the format's error of the weights`, async (t) => {
    const weights = gaussianWeights(8);
    const file = path.join(dir, `${type}.gguf`);
    const bytes = await writeProbeGguf(file, type, weights);
    const ours = ggmlDequantize(type, bytes, VOCAB, HIDDEN);
    const theirs = await llamaCppDecoded(file);
    const scale = rms(weights);
    for (let k = 0; k < HIDDEN; k++) assert.ok(ours[ZERO_ROW * HIDDEN + k] === 0, 'a zero row decodes to zeros (q6_k: some -0)');

    // llama.cpp reads our block layout as we do: agreement to the fp32 softmax's precision
    const agree = diffStats(theirs, ours);
    assert.ok(agree.max / scale < 1e-5, `${type}: llama.cpp vs ggmlDequantize max |diff| ${(agree.max / scale).toExponential(2)} of the weights' RMS`);

    // and both are within the format's expected error of the original floats
    const relOurs = diffStats(ours, weights).rms / scale;
    const relTheirs = diffStats(theirs, weights).rms / scale;
    assert.ok(relOurs < maxRelRms, `${type}: relative RMS error ${(relOurs * 100).toFixed(3)}% (bound ${maxRelRms * 100}%)`);
    assert.ok(relTheirs < maxRelRms, `${type}: llama.cpp's relative RMS error ${(relTheirs * 100).toFixed(3)}% (bound ${maxRelRms * 100}%)`);
    assert.ok(Math.abs(relTheirs - relOurs) < 1e-5, `${type}: ${relTheirs} vs ${relOurs}`);
    t.diagnostic(`${type}: relative RMS error ${(relOurs * 100).toFixed(3)}%; llama.cpp vs ggmlDequantize max |diff| ${(agree.max / scale).toExponential(2)} of the weights' RMS`);
  });
}
