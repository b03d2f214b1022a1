// A streaming GGUF (version 3) writer: the header (metadata and tensor infos) is laid out first from the tensors'
// shapes and types, then each tensor's bytes are produced and written one at a time, so a model never has to be in
// memory at once. Little-endian, tensor data aligned to `general.alignment` (32). The file is written under a
// temporary name and renamed when complete: a crash or kill never leaves a half-written .gguf behind.
// Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
import * as fs from 'node:fs';
import * as path from 'node:path';
import { removeStaleTemps } from '../../util/staleTemp';
import { syncFolder } from '../../util/atomicFile';
import { GGML_TYPES, type GgmlTypeName, tensorBytes } from './types';
import { IO_CHUNK_BYTES } from './safetensorsReader';

export const GGUF_ALIGNMENT = 32;

/** GGUF metadata value types (gguf_type). */
const enum ValueType {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
}

export type GgufScalarType = 'u8' | 'i8' | 'u16' | 'i16' | 'u32' | 'i32' | 'f32' | 'bool' | 'string' | 'u64' | 'i64' | 'f64';

export type GgufValue =
  | { type: Exclude<GgufScalarType, 'string' | 'bool'>; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'array'; itemType: 'string'; values: readonly string[] }
  | { type: 'array'; itemType: Exclude<GgufScalarType, 'string' | 'bool'>; values: ArrayLike<number> };

const SCALAR: Record<GgufScalarType, { id: ValueType; size: number }> = {
  u8: { id: ValueType.U8, size: 1 }, i8: { id: ValueType.I8, size: 1 }, u16: { id: ValueType.U16, size: 2 },
  i16: { id: ValueType.I16, size: 2 }, u32: { id: ValueType.U32, size: 4 }, i32: { id: ValueType.I32, size: 4 },
  f32: { id: ValueType.F32, size: 4 }, bool: { id: ValueType.BOOL, size: 1 }, string: { id: ValueType.STRING, size: 0 },
  u64: { id: ValueType.U64, size: 8 }, i64: { id: ValueType.I64, size: 8 }, f64: { id: ValueType.F64, size: 8 },
};

export const gguf = {
  u32: (value: number): GgufValue => ({ type: 'u32', value }),
  i32: (value: number): GgufValue => ({ type: 'i32', value }),
  f32: (value: number): GgufValue => ({ type: 'f32', value }),
  bool: (value: boolean): GgufValue => ({ type: 'bool', value }),
  str: (value: string): GgufValue => ({ type: 'string', value }),
  strings: (values: readonly string[]): GgufValue => ({ type: 'array', itemType: 'string', values }),
  i32s: (values: ArrayLike<number>): GgufValue => ({ type: 'array', itemType: 'i32', values }),
  f32s: (values: ArrayLike<number>): GgufValue => ({ type: 'array', itemType: 'f32', values }),
};

/** One tensor of the file: its GGUF shape (ne[0] is the innermost dimension: a matrix's column count). */
export interface GgufTensorSpec {
  name: string;
  shape: readonly number[];
  type: GgmlTypeName;
}

/** A growable little-endian byte buffer for the header. */
class ByteWriter {
  private buf = Buffer.alloc(1 << 16);
  length = 0;

  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    const next = Buffer.alloc(Math.max(this.buf.length * 2, this.length + n));
    this.buf.copy(next, 0, 0, this.length);
    this.buf = next;
  }
  u32(v: number): void { this.reserve(4); this.buf.writeUInt32LE(v, this.length); this.length += 4; }
  u64(v: number): void { this.reserve(8); this.buf.writeBigUInt64LE(BigInt(v), this.length); this.length += 8; }
  scalar(type: GgufScalarType, v: number | boolean): void {
    const size = SCALAR[type].size;
    this.reserve(size);
    const b = this.buf, o = this.length;
    switch (type) {
      case 'u8': b.writeUInt8(v as number, o); break;
      case 'i8': b.writeInt8(v as number, o); break;
      case 'u16': b.writeUInt16LE(v as number, o); break;
      case 'i16': b.writeInt16LE(v as number, o); break;
      case 'u32': b.writeUInt32LE(v as number, o); break;
      case 'i32': b.writeInt32LE(v as number, o); break;
      case 'f32': b.writeFloatLE(v as number, o); break;
      case 'bool': b.writeUInt8(v ? 1 : 0, o); break;
      case 'u64': b.writeBigUInt64LE(BigInt(v as number), o); break;
      case 'i64': b.writeBigInt64LE(BigInt(v as number), o); break;
      case 'f64': b.writeDoubleLE(v as number, o); break;
      case 'string': throw new Error('string is not a fixed-size scalar');
    }
    this.length += size;
  }
  string(s: string): void {
    const bytes = Buffer.from(s, 'utf8');
    this.u64(bytes.length);
    this.reserve(bytes.length);
    bytes.copy(this.buf, this.length);
    this.length += bytes.length;
  }
  pad(alignment: number): void {
    const n = (alignment - (this.length % alignment)) % alignment;
    this.reserve(n);
    this.buf.fill(0, this.length, this.length + n);
    this.length += n;
  }
  bytes(): Buffer { return this.buf.subarray(0, this.length); }
}

function writeValue(w: ByteWriter, key: string, v: GgufValue): void {
  if (v.type === 'array') {
    w.u32(ValueType.ARRAY);
    w.u32(SCALAR[v.itemType].id);
    w.u64(v.values.length);
    if (v.itemType === 'string') for (const s of v.values as readonly string[]) w.string(s);
    else for (let i = 0; i < v.values.length; i++) w.scalar(v.itemType, (v.values as ArrayLike<number>)[i]);
    return;
  }
  w.u32(SCALAR[v.type].id);
  if (v.type === 'string') w.string(v.value);
  else if (v.type === 'bool') w.scalar('bool', v.value);
  else {
    if (v.type !== 'f32' && v.type !== 'f64' && !Number.isInteger(v.value)) throw new Error(`GGUF metadata ${key}: ${v.value} is not an integer`);
    w.scalar(v.type, v.value);
  }
}

/** The header: magic, version, counts, metadata, tensor infos, padding to the data section. */
export function ggufHeader(metadata: ReadonlyMap<string, GgufValue>, tensors: readonly GgufTensorSpec[]): { header: Buffer; offsets: number[]; dataBytes: number } {
  const w = new ByteWriter();
  w.u32(0x46554747); // "GGUF" read as a little-endian u32
  w.u32(3);
  w.u64(tensors.length);
  w.u64(metadata.size);
  for (const [key, value] of metadata) {
    w.string(key);
    writeValue(w, key, value);
  }
  const offsets: number[] = [];
  let offset = 0;
  const seen = new Set<string>();
  for (const t of tensors) {
    if (seen.has(t.name)) throw new Error(`GGUF: tensor ${t.name} appears twice`);
    seen.add(t.name);
    w.string(t.name);
    w.u32(t.shape.length);
    for (const d of t.shape) w.u64(d);
    w.u32(GGML_TYPES[t.type].id);
    w.u64(offset);
    offsets.push(offset);
    offset += tensorBytes(t.type, t.shape);
    offset += (GGUF_ALIGNMENT - (offset % GGUF_ALIGNMENT)) % GGUF_ALIGNMENT;
  }
  w.pad(GGUF_ALIGNMENT);
  return { header: w.bytes(), offsets, dataBytes: offset };
}

export interface WriteGgufOptions {
  /** Called after each tensor with how many are done and the bytes written so far. */
  onProgress?(done: number, total: number, bytes: number): void;
  /** Bytes written in one call at most (default IO_CHUNK_BYTES; tests pass a small one). */
  chunkBytes?: number;
}

/**
 * Writes `file` (through `file.tmp-<pid>`, renamed at the end). `produce(i)` returns tensor i's bytes, exactly
 * tensorBytes(type, shape) long; it is called in order, once per tensor.
 */
export async function writeGguf(
  file: string,
  metadata: ReadonlyMap<string, GgufValue>,
  tensors: readonly GgufTensorSpec[],
  produce: (index: number) => Uint8Array | Promise<Uint8Array>,
  options: WriteGgufOptions = {},
): Promise<{ bytes: number }> {
  if (metadata.get('general.alignment') === undefined) throw new Error('GGUF: general.alignment must be set');
  const { header, dataBytes } = ggufHeader(metadata, tensors);
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  removeStaleTemps(file, 'tmp');
  const tmp = `${file}.tmp-${process.pid}`;
  const chunkBytes = options.chunkBytes ?? IO_CHUNK_BYTES;
  const fd = fs.openSync(tmp, 'w');
  let ok = false;
  try {
    let position = 0;
    // fs.writeSync takes at most 2 GiB - 1 bytes a call; a tensor can be more (a 7B model's embedding in f32)
    const put = (b: Uint8Array) => {
      let off = 0;
      while (off < b.length) off += fs.writeSync(fd, b, off, Math.min(b.length - off, chunkBytes), position + off);
      position += b.length;
    };
    put(header);
    const zeros = new Uint8Array(GGUF_ALIGNMENT);
    for (let i = 0; i < tensors.length; i++) {
      const t = tensors[i];
      const bytes = await produce(i);
      const expected = tensorBytes(t.type, t.shape);
      if (bytes.length !== expected) throw new Error(`GGUF: tensor ${t.name} (${t.type} [${t.shape.join(', ')}]) has ${bytes.length} bytes, expected ${expected}`);
      put(bytes);
      const pad = (GGUF_ALIGNMENT - (bytes.length % GGUF_ALIGNMENT)) % GGUF_ALIGNMENT;
      if (pad) put(zeros.subarray(0, pad));
      options.onProgress?.(i + 1, tensors.length, position);
    }
    if (position !== header.length + dataBytes) throw new Error(`GGUF: wrote ${position} bytes, laid out ${header.length + dataBytes}`);
    fs.fsyncSync(fd);
    ok = true;
  } finally {
    fs.closeSync(fd);
    if (!ok) fs.rmSync(tmp, { force: true });
  }
  fs.renameSync(tmp, file);
  syncFolder(path.dirname(file));
  return { bytes: header.length + dataBytes };
}
