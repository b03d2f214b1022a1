// score reproduces transformers + PEFT + bitsandbytes on the reference files: loss and every next-token log-prob
// within 1e-3, and PEFT's LoRA gradients within 1% relative error per tensor.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { score } from '../../extension/trainer/verbs/score';
import { reference, tempDir } from '../helpers/paths';
import { readSafetensors, relativeError, toF32 } from '../helpers/safetensors';

interface Ref {
  ids: number[];
  loss: number;
  next_token_logprobs: number[];
}

const cases: { name: string; model: string; adapter?: string; ref: string }[] = [
  { name: 'llama (transformers-5 config, untied, GQA 8:4)', model: 'llama-shared', ref: 'llama-shared.ref.json' },
  { name: 'llama with a PEFT adapter', model: 'llama-shared', adapter: 'llama-shared-adapter', ref: 'llama-shared-adapter.ref.json' },
  { name: 'PEFT-merged llama in f32', model: 'llama-shared-merged-f32', ref: 'llama-shared-merged.ref.json' },
  { name: 'bnb-4bit llama (fp32 block constants)', model: 'llama-shared-bnb4', ref: 'llama-shared-bnb4.ref.json' },
  { name: 'bnb-4bit llama with double quantization', model: 'llama-shared-bnb4-dq', ref: 'llama-shared-bnb4-dq.ref.json' },
  { name: 'llama3 rope scaling, tied, bf16, Hub config', model: 'llama3-shared', ref: 'llama3-shared.ref.json' },
  { name: 'llama3 with a PEFT adapter', model: 'llama3-shared', adapter: 'llama3-shared-adapter', ref: 'llama3-shared-adapter.ref.json' },
  { name: 'qwen2 with q/k/v biases, tied, 5:1 GQA', model: 'qwen2-shared', ref: 'qwen2-shared.ref.json' },
  { name: 'qwen2 with an adapter on q, v, down', model: 'qwen2-shared', adapter: 'qwen2-shared-adapter', ref: 'qwen2-shared-adapter.ref.json' },
];

for (const c of cases) {
  test(`score matches the reference: ${c.name}`, () => {
    const ref = JSON.parse(fs.readFileSync(reference(c.ref), 'utf8')) as Ref;
    const result = score({ model: reference(c.model), adapter: c.adapter && reference(c.adapter), ids: Int32Array.from(ref.ids) });
    assert.ok(Math.abs(result.loss - ref.loss) <= 1e-3, `loss ${result.loss} vs ${ref.loss}`);
    assert.equal(result.next_token_logprobs.length, ref.next_token_logprobs.length);
    result.next_token_logprobs.forEach((lp, i) => {
      assert.ok(Math.abs(lp - ref.next_token_logprobs[i]) <= 1e-3, `log-prob ${i}: ${lp} vs ${ref.next_token_logprobs[i]}`);
    });
  });
}

test('score --grads matches PEFT gradients within 1% per tensor', () => {
  const ref = JSON.parse(fs.readFileSync(reference('llama-shared-adapter.ref.json'), 'utf8')) as Ref;
  const out = path.join(tempDir('grads'), 'grads.safetensors');
  score({ model: reference('llama-shared'), adapter: reference('llama-shared-adapter'), ids: Int32Array.from(ref.ids), gradsFile: out });
  const ours = readSafetensors(out);
  const theirs = readSafetensors(reference('llama-shared-adapter.grads.safetensors'));
  assert.deepEqual([...ours.keys()].sort(), [...theirs.keys()].sort());
  for (const [name, expected] of theirs) {
    const actual = ours.get(name)!;
    assert.deepEqual(actual.shape, expected.shape, name);
    const err = relativeError(toF32(actual), toF32(expected));
    assert.ok(err <= 0.01, `${name}: relative error ${err}`);
  }
});
