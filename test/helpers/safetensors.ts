// A minimal safetensors reader for tests: parses the header and returns tensors as typed arrays, so tests can
// compare our outputs with reference files without going through the engine under test.
import * as fs from 'node:fs';

export interface TestTensor {
  dtype: string;
  shape: number[];
  bytes: Buffer;
}

export function readSafetensors(file: string): Map<string, TestTensor> {
  const buf = fs.readFileSync(file);
  const headerLen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLen).toString('utf8')) as Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const data = buf.subarray(8 + headerLen);
  const out = new Map<string, TestTensor>();
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    out.set(name, { dtype: info.dtype, shape: info.shape, bytes: data.subarray(info.data_offsets[0], info.data_offsets[1]) });
  }
  return out;
}

export function toF32(t: TestTensor): Float32Array {
  if (t.dtype !== 'F32') throw new Error(`expected F32, got ${t.dtype}`);
  const copy = Buffer.from(t.bytes);
  return new Float32Array(copy.buffer, copy.byteOffset, copy.length / 4);
}

export function relativeError(actual: Float32Array, expected: Float32Array): number {
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < expected.length; i++) {
    diff += (actual[i] - expected[i]) ** 2;
    norm += expected[i] ** 2;
  }
  return Math.sqrt(diff) / Math.sqrt(norm);
}
