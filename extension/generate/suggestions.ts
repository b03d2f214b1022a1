// Prompts to try a finetuned model with: the user messages of the run's held-out examples (its eval file, or the
// eval split training made, found through the same data preparation so they are the examples the run never
// trained on).
import * as path from 'node:path';
import type { NormalizedExample } from '../data';
import type { TrainConfig } from '../trainer/config';
import { prepareData } from '../trainer/data';
import { readJsonFile } from '../util/jsonFile';

/** The question an example asks: its first user message, or a completion's prompt; null for plain text. */
export function promptOf(example: NormalizedExample): string | null {
  if (example.kind === 'chat') return example.messages.find((m) => m.role === 'user')?.content ?? null;
  if (example.kind === 'completion') return example.prompt;
  return null;
}

export async function evalPrompts(run: string, limit = 8): Promise<string[]> {
  const config = readJsonFile(path.join(run, 'config.json')) as TrainConfig;
  const data = await prepareData(config, { runDir: run });
  const prompts: string[] = [];
  for (const example of data.heldOut) {
    const prompt = promptOf(example)?.trim();
    if (prompt && !prompts.includes(prompt)) prompts.push(prompt);
    if (prompts.length >= limit) break;
  }
  return prompts;
}
