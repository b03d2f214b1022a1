// An independent GGUF v3 reader for tests, written from the format's description (not from our writer): header,
// metadata, tensor infos, and each tensor's bytes at its aligned offset.
import * as fs from 'node:fs';

export interface ReadGguf {
  version: number;
  metadata: Map<string, unknown>;
  tensors: { name: string; shape: number[]; type: number; offset: number }[];
  dataStart: number;
  bytes: Buffer;
  tensorBytes(name: string, size: number): Buffer;
}

export function readGguf(file: string): ReadGguf {
  const b = fs.readFileSync(file);
  let p = 0;
  const u32 = () => { const v = b.readUInt32LE(p); p += 4; return v; };
  const u64 = () => { const v = Number(b.readBigUInt64LE(p)); p += 8; return v; };
  const str = () => { const n = u64(); const s = b.toString('utf8', p, p + n); p += n; return s; };
  const value = (type: number): unknown => {
    switch (type) {
      case 0: return b.readUInt8(p++);
      case 1: return b.readInt8(p++);
      case 2: { const v = b.readUInt16LE(p); p += 2; return v; }
      case 3: { const v = b.readInt16LE(p); p += 2; return v; }
      case 4: return u32();
      case 5: { const v = b.readInt32LE(p); p += 4; return v; }
      case 6: { const v = b.readFloatLE(p); p += 4; return v; }
      case 7: return b.readUInt8(p++) !== 0;
      case 8: return str();
      case 9: { const t = u32(); const n = u64(); return Array.from({ length: n }, () => value(t)); }
      case 10: return u64();
      case 11: { const v = Number(b.readBigInt64LE(p)); p += 8; return v; }
      case 12: { const v = b.readDoubleLE(p); p += 8; return v; }
      default: throw new Error(`unknown GGUF value type ${type} at byte ${p}`);
    }
  };
  if (b.toString('latin1', 0, 4) !== 'GGUF') throw new Error('not a GGUF file');
  p = 4;
  const version = u32();
  const nTensors = u64();
  const nKv = u64();
  const metadata = new Map<string, unknown>();
  for (let i = 0; i < nKv; i++) {
    const key = str();
    metadata.set(key, value(u32()));
  }
  const tensors: ReadGguf['tensors'] = [];
  for (let i = 0; i < nTensors; i++) {
    const name = str();
    const dims = u32();
    const shape = Array.from({ length: dims }, () => u64());
    tensors.push({ name, shape, type: u32(), offset: u64() });
  }
  const alignment = (metadata.get('general.alignment') as number | undefined) ?? 32;
  const dataStart = Math.ceil(p / alignment) * alignment;
  return {
    version, metadata, tensors, dataStart, bytes: b,
    tensorBytes(name, size) {
      const t = tensors.find((x) => x.name === name);
      if (!t) throw new Error(`no tensor ${name}`);
      return b.subarray(dataStart + t.offset, dataStart + t.offset + size);
    },
  };
}
