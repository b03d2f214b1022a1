// The ggml tensor types a GGUF export writes, with their ids and block geometry (the engine's table), and
// llama.cpp's file types (llama_ftype) for general.file_type.
import { GGML_TYPES, type GgmlType as GgmlTypeName } from '../../engine/tools';

// The engine's table (it encodes these types); the export's name for them.
export { GGML_TYPES } from '../../engine/tools';
export type { GgmlType as GgmlTypeName } from '../../engine/tools';

/** Bytes of a tensor of this type and GGUF shape; ne[0] must be a whole number of blocks. */
export function tensorBytes(type: GgmlTypeName, shape: readonly number[]): number {
  const t = GGML_TYPES[type];
  const rowLength = shape[0] ?? 1;
  if (rowLength % t.blockSize !== 0) throw new Error(`a ${type} tensor needs rows of a multiple of ${t.blockSize} values, got ${rowLength}`);
  const rows = shape.slice(1).reduce((a, b) => a * b, 1);
  return (rowLength / t.blockSize) * t.blockBytes * rows;
}

/** What an export is asked for: a file type; each tensor's type follows from it (see tensorTypeFor). */
export type GgufFileType = 'f32' | 'f16' | 'bf16' | 'q8_0' | 'q4_k_m';

/** llama_ftype values (llama.h) for general.file_type. */
export const LLAMA_FTYPE: Record<GgufFileType, number> = { f32: 0, f16: 1, q8_0: 7, q4_k_m: 15, bf16: 32 };
