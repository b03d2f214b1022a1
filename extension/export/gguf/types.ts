// The ggml tensor types a GGUF export writes, with their ids and block geometry (ggml.h's ggml_type and
// ggml-common.h's block structs), and llama.cpp's file types (llama_ftype) for general.file_type.

export type GgmlTypeName = 'f32' | 'f16' | 'bf16' | 'q5_0' | 'q8_0' | 'q4_k' | 'q6_k';

export interface GgmlTypeInfo {
  id: number;
  /** Values per block along ne[0]. */
  blockSize: number;
  /** Bytes per block. */
  typeSize: number;
}

export const GGML_TYPES: Record<GgmlTypeName, GgmlTypeInfo> = {
  f32: { id: 0, blockSize: 1, typeSize: 4 },
  f16: { id: 1, blockSize: 1, typeSize: 2 },
  q5_0: { id: 6, blockSize: 32, typeSize: 2 + 4 + 16 }, // fp16 d, qh[4] (the fifth bits), qs[16] (low nibbles)
  q8_0: { id: 8, blockSize: 32, typeSize: 2 + 32 }, // fp16 d, int8 qs[32]
  q4_k: { id: 12, blockSize: 256, typeSize: 2 + 2 + 12 + 128 }, // fp16 d, fp16 dmin, scales[12], qs[128]
  q6_k: { id: 14, blockSize: 256, typeSize: 128 + 64 + 16 + 2 }, // ql[128], qh[64], int8 scales[16], fp16 d
  bf16: { id: 30, blockSize: 1, typeSize: 2 },
};

/** Bytes of a tensor of this type and GGUF shape; ne[0] must be a whole number of blocks. */
export function tensorBytes(type: GgmlTypeName, shape: readonly number[]): number {
  const t = GGML_TYPES[type];
  const rowLength = shape[0] ?? 1;
  if (rowLength % t.blockSize !== 0) throw new Error(`a ${type} tensor needs rows of a multiple of ${t.blockSize} values, got ${rowLength}`);
  const rows = shape.slice(1).reduce((a, b) => a * b, 1);
  return (rowLength / t.blockSize) * t.typeSize * rows;
}

/** What an export is asked for: a file type; each tensor's type follows from it (see tensorTypeFor). */
export type GgufFileType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_k_m';

/** llama_ftype values (llama.h) for general.file_type. */
export const LLAMA_FTYPE: Record<GgufFileType, number> = { f32: 0, f16: 1, q8_0: 7, q4_k_m: 15, bf16: 32 };
