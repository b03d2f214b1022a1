// Model FLOP utilization for `bench`: the matrix-multiply FLOPs a QLoRA training step needs by the model's shape
// (PaLM's definition: what the model needs, not what the implementation does, so gradient checkpointing's
// recomputation does not count), over the step time, over the GPU's dense bf16 tensor peak.
import type { NativeModelConfig } from '../engine/native';

export type ModelShape = Pick<NativeModelConfig, 'vocabSize' | 'hiddenSize' | 'intermediateSize' | 'numLayers' | 'numHeads' | 'numKvHeads' | 'headDim'>;

/**
 * FLOPs per trained token of a sequence of `seq` tokens, LoRA of rank `rank` on all seven linear layers:
 * - frozen base linears and LM head: forward (2 per weight) and the input gradient (2 per weight); a frozen weight
 *   has no weight gradient;
 * - LoRA A and B: forward, input gradient and weight gradient (6 per parameter);
 * - attention scores and weighted values: 4 * heads * head_dim FLOPs per attended position forward, causal (on
 *   average (seq + 1) / 2 positions), and twice that backward.
 */
export function trainingFlopsPerToken(c: ModelShape, rank: number, seq: number): number {
  const q = c.numHeads * c.headDim;
  const kv = c.numKvHeads * c.headDim;
  const baseLinear = c.hiddenSize * (q + 2 * kv) + q * c.hiddenSize + 3 * c.hiddenSize * c.intermediateSize;
  const lora = rank * ((c.hiddenSize + q) + 2 * (c.hiddenSize + kv) + (q + c.hiddenSize) + 3 * (c.hiddenSize + c.intermediateSize));
  const attentionForward = 4 * q * ((seq + 1) / 2);
  const perLayer = 4 * baseLinear + 6 * lora + 3 * attentionForward;
  return c.numLayers * perLayer + 4 * c.vocabSize * c.hiddenSize;
}

// Dense (no sparsity) bf16 tensor-core peaks with fp32 accumulation, from NVIDIA's datasheets; the first name that
// the GPU's name contains wins, so the more specific come first.
const PEAK_BF16: readonly [string, number][] = [
  ['H100 PCIe', 756e12],
  ['H100 NVL', 835e12],
  ['H100', 989.4e12],
  ['H200', 989.4e12],
  ['GH200', 989.4e12],
  ['B200', 2250e12],
  ['A100', 312e12],
  ['A800', 312e12],
  ['L40S', 362e12],
  ['L40', 181e12],
  ['L4', 121e12],
  ['A10G', 70e12],
  ['A10', 125e12],
  ['RTX 6000 Ada', 364e12],
  ['RTX 5090', 209.5e12],
  ['RTX 4090', 165.2e12],
  ['RTX 4080', 97.5e12],
  ['RTX 3090', 71e12],
  ['T4', 65e12],
];

/** The GPU's dense bf16 (fp16 on Turing) tensor peak in FLOP/s, or null when this table does not know it. */
export function peakFlops(gpuName: string): number | null {
  for (const [name, flops] of PEAK_BF16) if (gpuName.includes(name)) return flops;
  return null;
}
