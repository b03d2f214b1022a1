// Float32 values to a ggml type's bytes: f32 as is; the others through the engine's quantizers (native, threaded;
// native/src/quant/ggml_quants.cpp), which write ggml's block layouts byte for byte.
import { ggmlQuantize } from '../../engine/tools';
import type { GgmlTypeName } from './types';

/** `values` in GGUF order: shape[0] values per row. Quantized bytes go to the start of `into` where it is given. */
export function encodeTensor(type: GgmlTypeName, values: Float32Array, shape: readonly number[], into?: Uint8Array): Uint8Array {
  if (type === 'f32') return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const cols = shape[0];
  const rows = values.length / cols;
  return ggmlQuantize(type, values, rows, cols, into);
}
