/**
 * Philox4x32-10, bit-identical to native/src/util/philox.{h,cpp}: the engine's one counter-based generator, so
 * data shuffles drawn here in TypeScript and dropout/LoRA init drawn in C++/CUDA come from the same family and a
 * run is reproducible from (seed, step) alone.
 *
 * The key is (seed lo32, seed hi32); the counter is (index lo32, index hi32, stream id, step), exactly as
 * `qlora::Philox::block` packs it.
 */

/** Stream ids, mirroring `qlora::RngStream`: one per use so two uses never share numbers. */
export enum RngStream {
  LoraInit = 1,
  Dropout = 2,
  Shuffle = 3,
  TinyModelInit = 4,
  Sampling = 5,
}

const MUL0 = 0xd2511f53;
const MUL1 = 0xcd9e8d57;
const WEYL0 = 0x9e3779b9;
const WEYL1 = 0xbb67ae85;

/** High 32 bits of the 64-bit product of two uint32 (JS numbers lose exactness above 2^53, so split in 16-bit halves). */
export function mulhi32(a: number, b: number): number {
  const aLo = a & 0xffff;
  const aHi = a >>> 16;
  const bLo = b & 0xffff;
  const bHi = b >>> 16;
  const ll = aLo * bLo;
  const lh = aLo * bHi;
  const hl = aHi * bLo;
  const hh = aHi * bHi;
  const mid = (ll >>> 16) + (lh & 0xffff) + (hl & 0xffff);
  return (hh + (lh >>> 16) + (hl >>> 16) + (mid >>> 16)) >>> 0;
}

/** One Philox4x32-10 block: 10 rounds over a 4-word counter with a 2-word key. Inputs are uint32 values. */
export function philox4x32(counter: readonly number[], key: readonly number[]): Uint32Array {
  let c0 = counter[0] >>> 0;
  let c1 = counter[1] >>> 0;
  let c2 = counter[2] >>> 0;
  let c3 = counter[3] >>> 0;
  let k0 = key[0] >>> 0;
  let k1 = key[1] >>> 0;
  for (let round = 0; round < 10; round++) {
    const hi0 = mulhi32(MUL0, c0);
    const lo0 = Math.imul(MUL0, c0) >>> 0;
    const hi1 = mulhi32(MUL1, c2);
    const lo1 = Math.imul(MUL1, c2) >>> 0;
    const n0 = (hi1 ^ c1 ^ k0) >>> 0;
    const n2 = (hi0 ^ c3 ^ k1) >>> 0;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 = (k0 + WEYL0) >>> 0;
    k1 = (k1 + WEYL1) >>> 0;
  }
  return Uint32Array.of(c0, c1, c2, c3);
}

/** Splits a non-negative integer seed (number up to 2^53 - 1, or bigint up to 2^64 - 1) into its two 32-bit words. */
function seedWords(seed: number | bigint): [number, number] {
  if (typeof seed === 'bigint') {
    if (seed < 0n || seed >= 1n << 64n) throw new RangeError(`seed must be in [0, 2^64), got ${seed}`);
    return [Number(seed & 0xffffffffn), Number(seed >> 32n)];
  }
  if (!Number.isSafeInteger(seed) || seed < 0) throw new RangeError(`seed must be a non-negative integer, got ${seed}`);
  return [seed % 0x1_0000_0000, Math.floor(seed / 0x1_0000_0000)];
}

/** The generator for one (seed, stream, step): element i is word i & 3 of block i >> 2, as in the C++ class. */
export class Philox {
  private readonly key: [number, number];

  constructor(
    seed: number | bigint,
    private readonly stream: RngStream,
    private readonly step = 0,
  ) {
    this.key = seedWords(seed);
    if (!Number.isInteger(step) || step < 0 || step > 0xffffffff) throw new RangeError(`step must be a uint32, got ${step}`);
  }

  /** The four words of block `blockIndex` (elements 4*blockIndex .. 4*blockIndex+3). */
  block(blockIndex: number): Uint32Array {
    return philox4x32(
      [blockIndex % 0x1_0000_0000, Math.floor(blockIndex / 0x1_0000_0000), this.stream, this.step],
      this.key,
    );
  }

  /** 32 random bits for element `index`. */
  bits(index: number): number {
    return this.block(Math.floor(index / 4))[index % 4];
  }

  /** Uniform in [0, 1) with 24 bits, equal to the C++ float `uniform` (every value is exact in both). */
  uniform(index: number): number {
    return (this.bits(index) >>> 8) * 2 ** -24;
  }
}
