// A run of 60 quick steps on examples/chat-sample.jsonl beside `model` (<model>/../run): enough for a tiny model to
// make confident predictions and end its answers with its end-of-turn token.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { resolveConfig } from '../../extension/trainer/config';
import { train } from '../../extension/trainer/train';
import { repoRoot } from './paths';

export async function trainBriefly(model: string): Promise<string> {
  const runDir = path.join(path.dirname(model), 'run');
  const config = resolveConfig({}, {
    model, data: path.join(repoRoot, 'examples', 'chat-sample.jsonl'), preset: 'quick', maxSteps: 60, seqLen: 96, batchSize: 4, lr: 5e-3,
    checkpointEvery: 0, evalEvery: 0,
    // the held-out examples these runs were tuned with (the split followed the seed before evalSeed existed)
    evalSeed: 42,
  });
  const outcome = await train({ runDir, config, resume: false });
  assert.equal(outcome.status, 'completed');
  return runDir;
}
