// The typed engine wrapper: errors arrive as EngineError with the engine's message naming the file and problem,
// a QLoRA step on NF4 weights lowers the loss, adapters save and load in PEFT's layout, memory is reported by
// category.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { EngineError, EngineModel, readModelConfig } from '../../extension/engine';
import { reference, tempDir } from '../helpers/paths';

function copyModel(name: string): string {
  const dir = path.join(tempDir('model'), name);
  fs.cpSync(reference(name), dir, { recursive: true });
  return dir;
}

function expectEngineError(fn: () => unknown, fragment: string) {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof EngineError, `expected EngineError, got ${String(err)}`);
    assert.ok(err.message.includes(fragment), `message '${err.message}' lacks '${fragment}'`);
    return true;
  });
}

test('malformed safetensors are rejected with the file named', () => {
  const dir = copyModel('llama-shared');
  const file = path.join(dir, 'model.safetensors');
  const bytes = fs.readFileSync(file);
  fs.writeFileSync(file, bytes.subarray(0, bytes.length - 100)); // truncated data
  expectEngineError(() => EngineModel.load(dir), file);
  fs.writeFileSync(file, Buffer.from([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x7b])); // header length beyond the file
  expectEngineError(() => EngineModel.load(dir), file);
});

test('unsupported architectures and bad configs are named', () => {
  const dir = copyModel('llama-shared');
  const configFile = path.join(dir, 'config.json');
  const config = JSON.parse(fs.readFileSync(configFile, 'utf8'));
  fs.writeFileSync(configFile, JSON.stringify({ ...config, architectures: ['GPT2LMHeadModel'] }));
  expectEngineError(() => readModelConfig(dir), "architecture 'GPT2LMHeadModel' is not supported");
  fs.writeFileSync(configFile, JSON.stringify({ ...config, num_key_value_heads: 3 }));
  expectEngineError(() => EngineModel.load(dir), 'num_key_value_heads');
  fs.writeFileSync(configFile, '{"architectures": ["LlamaForCausalLM"], ');
  expectEngineError(() => readModelConfig(dir), configFile);
});

test('a tensor of the wrong shape is named with both shapes', () => {
  const dir = copyModel('llama-shared');
  const configFile = path.join(dir, 'config.json');
  const config = JSON.parse(fs.readFileSync(configFile, 'utf8'));
  fs.writeFileSync(configFile, JSON.stringify({ ...config, intermediate_size: 128 }));
  expectEngineError(() => EngineModel.load(dir), "'model.layers.0.mlp.gate_proj.weight' has shape [256, 128], expected [128, 128]");
});

test('an adapter that does not fit the model is rejected naming the tensor', () => {
  const model = EngineModel.load(reference('llama3-shared'));
  expectEngineError(() => model.loadAdapter(reference('llama-shared-adapter')), 'lora_A.weight');
  expectEngineError(() => model.loadAdapter(tempDir('no-adapter')), 'no adapter_config.json');
  model.dispose();
});

test('logSoftmax: the whole next-token distribution at each position, consistent with logprobs', () => {
  const model = EngineModel.load(reference('llama-shared'));
  const vocab = model.config().vocabSize;
  const ids = Int32Array.from([1, 5, 200, 7, 31, 99]);
  const r = model.run({ ids, batch: 1, seq: 6 }, { logprobs: true, logSoftmax: true });
  assert.equal(r.logSoftmax!.length, 6 * vocab);
  for (let t = 0; t < 6; t++) {
    const row = r.logSoftmax!.subarray(t * vocab, (t + 1) * vocab);
    const total = row.reduce((a, x) => a + Math.exp(x), 0);
    assert.ok(Math.abs(total - 1) < 1e-5, `position ${t} sums to ${total}`);
    if (t < 5) assert.ok(Math.abs(row[ids[t + 1]] - r.logprobs![t]) < 1e-5);
  }
  model.dispose();
});

test('QLoRA steps on NF4 weights lower the loss; adapters round-trip through PEFT layout', () => {
  const model = EngineModel.load(reference('llama-shared'), { quantize: true });
  model.createLora({ rank: 8, alpha: 16, seed: 1 });
  const info = model.loraInfo()!;
  // Per layer, r * (in + out) for each module: q 128+128, k 128+64, v 128+64, o 128+128, gate and up 128+256,
  // down 256+128; two layers.
  const perLayer = 8 * (256 + 192 + 192 + 256 + 384 + 384 + 384);
  assert.equal(info.parameters, 2 * perLayer);
  assert.equal(info.scale, 2);
  const ids = Int32Array.from([1, 5, 200, 7, 31, 99, 4, 250, 13, 2, 1, 5, 200, 7, 31, 99]);
  const input = { ids, batch: 2, seq: 8 };
  const first = model.run(input).loss;
  let last = first;
  for (let step = 0; step < 10; step++) {
    model.zeroGrad();
    model.run(input, { computeGrads: true, training: true, seed: 5, step });
    const report = model.optimizerStep({ lr: 1e-2, maxGradNorm: 0.3 });
    assert.equal(report.step, step + 1);
    last = model.run(input).loss;
  }
  assert.ok(last < first - 0.2, `loss ${first} -> ${last}`);
  const mem = model.memory();
  assert.ok(mem.current.weights > 0 && mem.current.adapters > 0 && mem.current.optimizer === 2 * mem.current.adapters);
  assert.ok(mem.totalPeak >= mem.totalCurrent);

  const dir = path.join(tempDir('adapter'), 'adapter');
  model.saveAdapter(dir, 'llama-shared');
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'adapter_config.json'), 'utf8'));
  assert.equal(cfg.peft_type, 'LORA');
  assert.equal(cfg.r, 8);
  assert.deepEqual(cfg.target_modules, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
  const reloaded = EngineModel.load(reference('llama-shared'), { quantize: true });
  reloaded.loadAdapter(dir);
  assert.equal(reloaded.run(input).loss, last);
  const dir2 = path.join(tempDir('adapter2'), 'adapter');
  reloaded.saveAdapter(dir2, 'llama-shared');
  assert.ok(fs.readFileSync(path.join(dir, 'adapter_model.safetensors')).equals(fs.readFileSync(path.join(dir2, 'adapter_model.safetensors'))));
  model.dispose();
  reloaded.dispose();
});

test('a Mistral config computes what the same Llama weights compute; its sliding window is enforced', () => {
  const dir = copyModel('llama-shared');
  const configFile = path.join(dir, 'config.json');
  const config = JSON.parse(fs.readFileSync(configFile, 'utf8'));
  fs.writeFileSync(configFile, JSON.stringify({ ...config, architectures: ['MistralForCausalLM'], model_type: 'mistral', sliding_window: 6 }));
  const ref = JSON.parse(fs.readFileSync(reference('llama-shared.ref.json'), 'utf8'));
  const model = EngineModel.load(dir);
  assert.equal(model.config().architecture, 'MistralForCausalLM');
  const ids = Int32Array.from(ref.ids.slice(0, 6));
  const mistral = model.run({ ids, batch: 1, seq: 6 }, { logprobs: true });
  mistral.logprobs!.forEach((lp, i) => assert.ok(Math.abs(lp - ref.next_token_logprobs[i]) <= 1e-3, `log-prob ${i}`));
  expectEngineError(() => model.run({ ids: Int32Array.from(ref.ids), batch: 1, seq: ref.ids.length }), 'longer than the model\'s sliding attention window (6)');
  model.dispose();
});
