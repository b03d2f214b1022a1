// A tiny llama-architecture GGUF for tests, written here from the format's description (GGUF v3, F32 tensors, a
// byte-level BPE vocabulary) so llama.cpp can be tested without the project's exporter, plus an fp64 forward pass in
// llama.cpp's own conventions (tensors in GGUF layout, adjacent-pair "normal" RoPE) to compare its logits with.
import * as fs from 'node:fs';

export interface MiniLlama {
  nEmbd: number;
  nLayer: number;
  nHead: number;
  nHeadKv: number;
  nFf: number;
  contextLength: number;
  rmsEps: number;
  ropeBase: number;
  /** Byte-level BPE tokens (GPT-2's byte-to-unicode mapping): 256 bytes, then one per merge, then <s> and </s>. */
  tokens: string[];
  merges: string[];
  bos: number;
  eos: number;
  /** GGUF names to row-major data; a weight [out, in] is the GGUF shape [in, out] (ne[0] first). */
  tensors: Map<string, { shape: number[]; data: Float32Array }>;
}

export interface MiniLlamaOptions {
  seed?: number;
  /** Every transformer block all zeros: the logits then depend only on the current token (see handLogits). */
  zeroBlocks?: boolean;
}

const MERGES = ['h e', 'l l', 'Ġ t', 'Ġt he', 'o r', 'Ġ a', 'i n', 'Ġ w'];

function gpt2ByteTokens(): string[] {
  const printable: number[] = [];
  for (let b = 33; b <= 126; b++) printable.push(b);
  for (let b = 161; b <= 172; b++) printable.push(b);
  for (let b = 174; b <= 255; b++) printable.push(b);
  const out: string[] = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) out[b] = String.fromCodePoint(printable.includes(b) ? b : 256 + extra++);
  return out;
}

/** A small seeded uniform [0, 1) generator (mulberry32) for reproducible test weights. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function makeMiniLlama(options: MiniLlamaOptions = {}): MiniLlama {
  const [nEmbd, nLayer, nHead, nHeadKv, nFf] = [64, 2, 4, 2, 128];
  const tokens = [...gpt2ByteTokens(), ...MERGES.map((m) => m.replace(' ', '')), '<s>', '</s>'];
  const vocab = tokens.length;
  const kvDim = (nEmbd / nHead) * nHeadKv;
  const rand = mulberry32(options.seed ?? 1);
  const uniform = (n: number, scale: number) => Float32Array.from({ length: n }, () => (rand() * 2 - 1) * scale);
  const tensors = new Map<string, { shape: number[]; data: Float32Array }>();
  const put = (name: string, shape: number[], data: Float32Array) => tensors.set(name, { shape, data });
  put('token_embd.weight', [nEmbd, vocab], uniform(nEmbd * vocab, 1));
  for (let l = 0; l < nLayer; l++) {
    const block = (n: number, scale: number) => (options.zeroBlocks ? new Float32Array(n) : uniform(n, scale));
    const norm = () => (options.zeroBlocks ? new Float32Array(nEmbd) : Float32Array.from(uniform(nEmbd, 0.3), (v) => 1 + v));
    put(`blk.${l}.attn_norm.weight`, [nEmbd], norm());
    put(`blk.${l}.attn_q.weight`, [nEmbd, nEmbd], block(nEmbd * nEmbd, 0.4));
    put(`blk.${l}.attn_k.weight`, [nEmbd, kvDim], block(nEmbd * kvDim, 0.4));
    put(`blk.${l}.attn_v.weight`, [nEmbd, kvDim], block(nEmbd * kvDim, 0.4));
    put(`blk.${l}.attn_output.weight`, [nEmbd, nEmbd], block(nEmbd * nEmbd, 0.2));
    put(`blk.${l}.ffn_norm.weight`, [nEmbd], norm());
    put(`blk.${l}.ffn_gate.weight`, [nEmbd, nFf], block(nEmbd * nFf, 0.3));
    put(`blk.${l}.ffn_up.weight`, [nEmbd, nFf], block(nEmbd * nFf, 0.3));
    put(`blk.${l}.ffn_down.weight`, [nFf, nEmbd], block(nFf * nEmbd, 0.2));
  }
  put('output_norm.weight', [nEmbd], Float32Array.from(uniform(nEmbd, 0.5), (v) => 1 + v));
  put('output.weight', [nEmbd, vocab], uniform(nEmbd * vocab, 0.5));
  return {
    nEmbd, nLayer, nHead, nHeadKv, nFf, contextLength: 512, rmsEps: 1e-5, ropeBase: 10000,
    tokens, merges: MERGES, bos: vocab - 2, eos: vocab - 1, tensors,
  };
}

// GGUF metadata value types (gguf.h's gguf_type).
const U32 = 4;
const I32 = 5;
const F32 = 6;
const STRING = 8;
const ARRAY = 9;
const ALIGNMENT = 32;

type Kv = [key: string, type: typeof U32 | typeof F32 | typeof STRING, value: number | string] | [key: string, type: typeof ARRAY, items: (number | string)[], itemType: typeof I32 | typeof STRING];

class ByteWriter {
  readonly parts: Buffer[] = [];
  length = 0;
  bytes(b: Buffer): void {
    this.parts.push(b);
    this.length += b.length;
  }
  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    this.bytes(b);
  }
  i32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeInt32LE(v);
    this.bytes(b);
  }
  f32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeFloatLE(v);
    this.bytes(b);
  }
  u64(v: number): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.bytes(b);
  }
  str(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.bytes(b);
  }
  padTo(alignment: number): void {
    const pad = (alignment - (this.length % alignment)) % alignment;
    if (pad > 0) this.bytes(Buffer.alloc(pad));
  }
}

/** Writes the model as GGUF v3 with what llama.cpp needs to load a llama-architecture model, and nothing more. */
export function writeMiniGguf(file: string, m: MiniLlama): void {
  const kvs: Kv[] = [
    ['general.architecture', STRING, 'llama'],
    ['llama.context_length', U32, m.contextLength],
    ['llama.embedding_length', U32, m.nEmbd],
    ['llama.block_count', U32, m.nLayer],
    ['llama.feed_forward_length', U32, m.nFf],
    ['llama.attention.head_count', U32, m.nHead],
    ['llama.attention.head_count_kv', U32, m.nHeadKv],
    ['llama.attention.layer_norm_rms_epsilon', F32, m.rmsEps],
    ['llama.rope.freq_base', F32, m.ropeBase],
    ['tokenizer.ggml.model', STRING, 'gpt2'],
    ['tokenizer.ggml.pre', STRING, 'default'],
    ['tokenizer.ggml.tokens', ARRAY, m.tokens, STRING],
    ['tokenizer.ggml.token_type', ARRAY, m.tokens.map((_, i) => (i === m.bos || i === m.eos ? 3 : 1)), I32], // 3: control, 1: normal
    ['tokenizer.ggml.merges', ARRAY, m.merges, STRING],
    ['tokenizer.ggml.bos_token_id', U32, m.bos],
    ['tokenizer.ggml.eos_token_id', U32, m.eos],
  ];
  const w = new ByteWriter();
  w.bytes(Buffer.from('GGUF', 'ascii'));
  w.u32(3);
  w.u64(m.tensors.size);
  w.u64(kvs.length);
  const scalar = (type: number, v: number | string) => {
    if (type === U32) w.u32(v as number);
    else if (type === I32) w.i32(v as number);
    else if (type === F32) w.f32(v as number);
    else w.str(v as string);
  };
  for (const kv of kvs) {
    w.str(kv[0]);
    w.u32(kv[1]);
    if (kv[1] === ARRAY) {
      w.u32(kv[3]);
      w.u64(kv[2].length);
      for (const item of kv[2]) scalar(kv[3], item);
    } else scalar(kv[1], kv[2]);
  }
  const offsets: number[] = [];
  let offset = 0;
  for (const [name, t] of m.tensors) {
    w.str(name);
    w.u32(t.shape.length);
    for (const d of t.shape) w.u64(d);
    w.u32(0); // GGML_TYPE_F32
    w.u64(offset);
    offsets.push(offset);
    offset += Math.ceil(t.data.byteLength / ALIGNMENT) * ALIGNMENT;
  }
  w.padTo(ALIGNMENT);
  for (const t of m.tensors.values()) {
    w.bytes(Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    w.padTo(ALIGNMENT);
  }
  fs.writeFileSync(file, Buffer.concat(w.parts));
}

function rmsNorm(x: Float64Array, weight: Float32Array, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const scale = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * scale * weight[i]);
}

/** y = W x for a GGUF weight of shape [in, out] (ggml_mul_mat). */
function matVec(w: { shape: number[]; data: Float32Array }, x: Float64Array): Float64Array {
  const [n, out] = w.shape;
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = 0;
    for (let i = 0; i < n; i++) s += w.data[o * n + i] * x[i];
    y[o] = s;
  }
  return y;
}

/** RoPE as llama.cpp applies it to LLM_ARCH_LLAMA (LLAMA_ROPE_TYPE_NORM): rotates adjacent pairs of each head. */
function rope(v: Float64Array, heads: number, pos: number, base: number): void {
  const hd = v.length / heads;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < hd / 2; i++) {
      const theta = pos * Math.pow(base, (-2 * i) / hd);
      const [c, s] = [Math.cos(theta), Math.sin(theta)];
      const [a, b] = [v[h * hd + 2 * i], v[h * hd + 2 * i + 1]];
      v[h * hd + 2 * i] = a * c - b * s;
      v[h * hd + 2 * i + 1] = a * s + b * c;
    }
  }
}

/** The model's raw logits after each position of ids, in fp64: row t predicts the token after ids[0..t]. */
export function referenceLogits(m: MiniLlama, ids: readonly number[]): Float64Array[] {
  const t = (name: string) => m.tensors.get(name)!;
  const hd = m.nEmbd / m.nHead;
  const group = m.nHead / m.nHeadKv; // query head h reads key/value head floor(h / group)
  const embd = t('token_embd.weight').data;
  const hidden = ids.map((id) => Float64Array.from(embd.subarray(id * m.nEmbd, (id + 1) * m.nEmbd)));
  for (let l = 0; l < m.nLayer; l++) {
    const p = `blk.${l}.`;
    const qs: Float64Array[] = [];
    const ks: Float64Array[] = [];
    const vs: Float64Array[] = [];
    hidden.forEach((x, pos) => {
      const n = rmsNorm(x, t(p + 'attn_norm.weight').data, m.rmsEps);
      const q = matVec(t(p + 'attn_q.weight'), n);
      const k = matVec(t(p + 'attn_k.weight'), n);
      rope(q, m.nHead, pos, m.ropeBase);
      rope(k, m.nHeadKv, pos, m.ropeBase);
      qs.push(q);
      ks.push(k);
      vs.push(matVec(t(p + 'attn_v.weight'), n));
    });
    hidden.forEach((x, pos) => {
      const attn = new Float64Array(m.nEmbd);
      for (let h = 0; h < m.nHead; h++) {
        const kvh = Math.floor(h / group);
        const scores = Array.from({ length: pos + 1 }, (_, j) => {
          let s = 0;
          for (let d = 0; d < hd; d++) s += qs[pos][h * hd + d] * ks[j][kvh * hd + d];
          return s / Math.sqrt(hd);
        });
        const max = Math.max(...scores);
        const e = scores.map((s) => Math.exp(s - max));
        const z = e.reduce((a, b) => a + b, 0);
        for (let j = 0; j <= pos; j++) for (let d = 0; d < hd; d++) attn[h * hd + d] += (e[j] / z) * vs[j][kvh * hd + d];
      }
      const o = matVec(t(p + 'attn_output.weight'), attn);
      for (let i = 0; i < m.nEmbd; i++) x[i] += o[i];
      const n = rmsNorm(x, t(p + 'ffn_norm.weight').data, m.rmsEps);
      const g = matVec(t(p + 'ffn_gate.weight'), n);
      const u = matVec(t(p + 'ffn_up.weight'), n);
      const act = g.map((gi, i) => (gi / (1 + Math.exp(-gi))) * u[i]);
      const d = matVec(t(p + 'ffn_down.weight'), act);
      for (let i = 0; i < m.nEmbd; i++) x[i] += d[i];
    });
  }
  return hidden.map((x) => matVec(t('output.weight'), rmsNorm(x, t('output_norm.weight').data, m.rmsEps)));
}

export function logSoftmax(logits: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) max = Math.max(max, logits[i]);
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(logits, (v) => v - lse);
}
