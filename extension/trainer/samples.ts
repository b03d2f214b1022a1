// Sample answers during training: the run's sample prompts answered greedily with the adapter as it is at that
// step (at the start: the base model), each reported as a `sample` event so the panel shows how the answers change.
// Greedy and bounded, so an answer depends only on the adapter and costs little beside a training step.
import { renderGenerationPrompt, type ModelTokenizer } from '../data';
import type { EngineModel } from '../engine';
import { stopTokenIds } from '../generate/chatModel';
import { generate } from '../generate/generate';
import { GREEDY } from '../generate/sampling';
import type { SampleEvent } from '../protocol/events';

export class TrainingSamples {
  private readonly prompts: { text: string; ids: number[] }[];
  private readonly stopTokenIds: number[];
  /** config.json's max_position_embeddings (0: not given). */
  private readonly contextLength: number;

  /** Renders every prompt now, so a prompt the chat template refuses, or too long for the model, stops the run before it starts. */
  constructor(
    private readonly model: EngineModel,
    private readonly tok: ModelTokenizer,
    prompts: readonly string[],
    private readonly maxTokens: number,
  ) {
    const context = (this.contextLength = model.config().maxPositionEmbeddings);
    this.prompts = prompts.map((text, i) => {
      let ids: number[];
      try {
        ids = tok.encode(renderGenerationPrompt([{ role: 'user', content: text }], tok));
      } catch (err) {
        throw new Error(`sample prompt ${i + 1} cannot be rendered with the model's chat template: ${(err as Error).message}`);
      }
      if (context > 0 && ids.length >= context) {
        throw new Error(`sample prompt ${i + 1} is ${ids.length} tokens rendered, and the model's context is ${context} (max_position_embeddings): shorten it`);
      }
      return { text, ids };
    });
    this.stopTokenIds = stopTokenIds(tok, model.config().eosTokenIds);
  }
  get count(): number {
    return this.prompts.length;
  }

  /** Answers every prompt with the current adapter; returns the events (without their time) and the total ms. */
  async answer(step: number): Promise<{ events: Omit<SampleEvent, 'time'>[]; ms: number }> {
    const events: Omit<SampleEvent, 'time'>[] = [];
    let total = 0;
    for (const [index, prompt] of this.prompts.entries()) {
      const started = performance.now();
      const session = this.model.startGeneration();
      try {
        const r = await generate(session, this.tok, prompt.ids, { sampling: GREEDY, maxNewTokens: this.maxTokens, stopTokenIds: this.stopTokenIds, contextLength: this.contextLength });
        const ms = performance.now() - started;
        total += ms;
        events.push({ kind: 'sample', step, index, prompt: prompt.text, text: r.text, tokens: r.ids.length, finishReason: r.finishReason, ms });
      } finally {
        session.end();
      }
    }
    return { events, ms: total };
  }
}
