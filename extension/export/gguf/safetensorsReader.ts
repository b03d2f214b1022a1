// Reads the tensors of a Hugging Face model folder one at a time (model.safetensors, or the shards listed in
// model.safetensors.index.json) as float32, for the GGUF export: only one tensor is in memory at once. Every
// header, offset and size is checked against the file; a problem names the file and the tensor.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { floatsInto } from './scratch';

export interface TensorEntry {
  name: string;
  dtype: string;
  shape: number[];
  file: string;
  /** Absolute byte range in `file`. */
  begin: number;
  end: number;
}

const DTYPE_BYTES: Record<string, number> = { F32: 4, BF16: 2, F16: 2, F64: 8, I64: 8, I32: 4, I16: 2, I8: 1, U8: 1, BOOL: 1 };

/** The tensors of one safetensors file, every offset and size checked against the file. */
export function readSafetensorsHeader(file: string): TensorEntry[] {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const lenBuf = Buffer.alloc(8);
    if (size < 8 || fs.readSync(fd, lenBuf, 0, 8, 0) !== 8) throw new Error(`${file}: not a safetensors file (shorter than its 8-byte header length)`);
    const headerLength = Number(lenBuf.readBigUInt64LE(0));
    if (headerLength > size - 8 || headerLength > 100_000_000) throw new Error(`${file}: header length ${headerLength} runs past the end of the file (${size} bytes)`);
    const json = Buffer.alloc(headerLength);
    fs.readSync(fd, json, 0, headerLength, 8);
    let header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
    try {
      header = JSON.parse(json.toString('utf8'));
    } catch {
      throw new Error(`${file}: the safetensors header is not valid JSON`);
    }
    const dataStart = 8 + headerLength;
    const entries: TensorEntry[] = [];
    for (const [name, info] of Object.entries(header)) {
      if (name === '__metadata__') continue;
      const [b, e] = info.data_offsets ?? [];
      const itemBytes = DTYPE_BYTES[info.dtype];
      const count = (info.shape ?? []).reduce((a, d) => a * d, 1);
      if (itemBytes === undefined) throw new Error(`${file}: tensor ${name} has dtype ${info.dtype}, which the export does not read`);
      if (!(Number.isInteger(b) && Number.isInteger(e) && b >= 0 && e >= b && dataStart + e <= size)) {
        throw new Error(`${file}: tensor ${name} has data offsets [${b}, ${e}] outside the file's ${size - dataStart} data bytes`);
      }
      if (e - b !== count * itemBytes) throw new Error(`${file}: tensor ${name} holds ${e - b} bytes, but ${info.dtype} [${info.shape.join(', ')}] needs ${count * itemBytes}`);
      entries.push({ name, dtype: info.dtype, shape: info.shape, file, begin: dataStart + b, end: dataStart + e });
    }
    return entries;
  } finally {
    fs.closeSync(fd);
  }
}

/** The shard files an index names, each checked to stay inside the model folder (as the engine's loader checks). */
function shardsOf(index: string): string[] {
  const map = (JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map?: unknown }).weight_map;
  if (typeof map !== 'object' || map === null || Array.isArray(map)) throw new Error(`${index}: no weight_map`);
  const shards = new Set<string>();
  for (const [name, shard] of Object.entries(map)) {
    if (typeof shard !== 'string') throw new Error(`${index}: weight_map['${name}'] is not a file name`);
    const inside = shard !== '' && !path.isAbsolute(shard) && !path.win32.isAbsolute(shard) && !shard.split(/[\\/]/).includes('..');
    if (!inside) throw new Error(`${index}: shard '${shard}' is outside the model folder`);
    shards.add(shard);
  }
  return [...shards];
}

/** The tensors of a model folder by name. */
export function listModelTensors(modelDir: string): Map<string, TensorEntry> {
  const index = path.join(modelDir, 'model.safetensors.index.json');
  const files = fs.existsSync(index) ? shardsOf(index) : ['model.safetensors'];
  const out = new Map<string, TensorEntry>();
  for (const f of files) {
    const file = path.join(modelDir, f);
    if (!fs.existsSync(file)) throw new Error(`${modelDir}: ${f} is missing`);
    for (const e of readSafetensorsHeader(file)) out.set(e.name, e);
  }
  return out;
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/**
 * Bytes read from a file in one call at most: fs.readSync and fs.writeSync take at most 2 GiB - 1, and a 7B model's
 * embedding is more than that in float32 (Qwen2.5-7B: 152064 x 3584 x 4 bytes).
 */
export const IO_CHUNK_BYTES = 1 << 28;

const ELEMENT_BYTES: Record<string, number> = { F32: 4, BF16: 2, F16: 2 };

/** Bytes read from a file at a time into one buffer reused by every read (its own ArrayBuffer: aligned for any view). */
const READ_BUFFER_BYTES = 1 << 24;
let reusedReadBuffer = new Uint8Array(0);
function readBuffer(bytes: number): Uint8Array {
  if (reusedReadBuffer.length < bytes) reusedReadBuffer = new Uint8Array(new ArrayBuffer(bytes));
  return reusedReadBuffer.subarray(0, bytes);
}

/**
 * Reads a floating tensor as float32 (F32 as is, BF16 and F16 widened exactly), `chunkBytes` at a time, so that no
 * read and no buffer but the result is larger than that. The values go to the start of `into` where it is given
 * (the result is a view of it).
 */
export function readTensorF32(entry: TensorEntry, chunkBytes = IO_CHUNK_BYTES, into?: Float32Array): Float32Array {
  const size = ELEMENT_BYTES[entry.dtype];
  if (size === undefined) throw new Error(`${entry.file}: tensor ${entry.name} is ${entry.dtype}, not a floating tensor`);
  const count = entry.shape.reduce((a, d) => a * d, 1);
  const total = entry.end - entry.begin;
  if (total !== count * size) throw new Error(`${entry.file}: tensor ${entry.name} holds ${total} bytes, not ${count} ${entry.dtype} values`);
  const out = floatsInto(into, count, `readTensorF32 of tensor ${entry.name}`);
  const chunk = Math.min(chunkBytes, READ_BUFFER_BYTES);
  const step = Math.max(size, chunk - (chunk % size));
  const bytes = readBuffer(Math.min(total, step));
  const fd = fs.openSync(entry.file, 'r');
  try {
    for (let done = 0; done < total; ) {
      const want = Math.min(step, total - done);
      for (let off = 0; off < want; ) {
        const n = fs.readSync(fd, bytes, off, want - off, entry.begin + done + off);
        if (n === 0) throw new Error(`${entry.file}: tensor ${entry.name} ends early`);
        off += n;
      }
      widenInto(entry.dtype, bytes, want / size, out, done / size);
      done += want;
    }
  } finally {
    fs.closeSync(fd);
  }
  return out;
}

/** n values of `dtype` from the start of `bytes` (little-endian, as the platforms Node runs VS Code on) as float32 into out[at..]. */
function widenInto(dtype: string, bytes: Uint8Array, n: number, out: Float32Array, at: number): void {
  switch (dtype) {
    case 'F32':
      out.set(new Float32Array(bytes.buffer, bytes.byteOffset, n), at);
      break;
    case 'BF16': {
      // a bfloat16 is the top half of the float32 it stands for
      const halves = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      const words = new Uint32Array(out.buffer, out.byteOffset + at * 4, n);
      for (let i = 0; i < n; i++) words[i] = halves[i] << 16;
      break;
    }
    case 'F16': {
      const halves = new Uint16Array(bytes.buffer, bytes.byteOffset, n);
      for (let i = 0; i < n; i++) out[at + i] = halfToFloat(halves[i]);
      break;
    }
  }
}
