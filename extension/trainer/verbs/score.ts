// score: the loss and next-token log-probabilities of one token sequence, exactly as transformers computes
// model(input_ids, labels=input_ids) in fp32, optionally with a PEFT adapter and the LoRA gradients.
import { EngineModel } from '../../engine';
import type { NativeModelOptions } from '../../engine/native';

export interface ScoreOptions {
  model: string;
  adapter?: string;
  ids: Int32Array;
  /** Write d loss / d LoRA parameters here (safetensors, PEFT names). Needs an adapter. */
  gradsFile?: string;
  /** Where to compute (default: the CPU). */
  engine?: NativeModelOptions;
}

export interface ScoreResult {
  loss: number;
  next_token_logprobs: number[];
}

export function score(options: ScoreOptions): ScoreResult {
  if (options.ids.length < 2) throw new Error('score needs at least two token ids (one prediction)');
  if (options.gradsFile && !options.adapter) throw new Error('--grads needs --adapter: gradients are taken with respect to the LoRA parameters');
  const model = EngineModel.load(options.model, options.engine ?? {});
  try {
    // counted from 1 as --ids's other errors count its entries (the engine's message counts rows from 0)
    const vocab = model.config().vocabSize;
    const outside = options.ids.findIndex((id) => id >= vocab);
    if (outside >= 0) throw new Error(`--ids entry ${outside + 1} (${options.ids[outside]}) is outside the model's vocabulary (0..${vocab - 1})`);
    if (options.adapter) model.loadAdapter(options.adapter);
    const result = model.run(
      { ids: options.ids, labels: options.ids, batch: 1, seq: options.ids.length },
      { logprobs: true, computeGrads: options.gradsFile !== undefined },
    );
    if (options.gradsFile) model.saveGradients(options.gradsFile);
    return { loss: result.loss, next_token_logprobs: Array.from(result.logprobs ?? []) };
  } finally {
    model.dispose();
  }
}
