// estimate through the addon: the numbers equal what the engine's allocator reports after real training steps on
// the reference model, and the verb prints a table and JSON.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'node:test';
import { EngineModel } from '../../extension/engine';
import { estimateMemory } from '../../extension/engine/tools';
import { parseOptions } from '../../extension/trainer/cliArgs';
import { estimate, estimateVerb, formatEstimate } from '../../extension/trainer/verbs/estimate';
import { reference } from '../helpers/paths';
import { readSafetensors } from '../helpers/safetensors';
import { captureStdout } from '../helpers/stdout';

for (const quantize of [true, false]) {
  for (const gradientCheckpointing of [true, false]) {
    test(`estimateMemory equals the measured peaks (quantize ${quantize}, checkpointing ${gradientCheckpointing})`, () => {
      const batch = 2, seq = 7, rank = 4;
      const model = EngineModel.load(reference('llama-shared'), { quantize });
      try {
        model.createLora({ rank, alpha: 8, dropout: 0.05, seed: 1 });
        const ids = Int32Array.from({ length: batch * seq }, (_, i) => (i * 31 + 3) % 256);
        for (let step = 0; step < 2; step++) {
          model.zeroGrad();
          model.run({ ids, batch, seq }, { computeGrads: true, training: true, gradientCheckpointing, step });
          model.optimizerStep({ lr: 1e-3 });
        }
        const measured = model.memory();
        const estimated = estimateMemory(reference('llama-shared'), { batch, seq, rank, quantize, gradientCheckpointing, loraDropout: 0.05 });
        assert.deepEqual(estimated.categories, measured.peak);
        assert.equal(estimated.peakTotal, measured.totalPeak);
        assert.equal(estimated.loraParameters, model.loraInfo()?.parameters);
      } finally {
        model.dispose();
      }
    });
  }
}

test('estimate reads bnb-4bit checkpoints as NF4 and reports the config', () => {
  const e = estimate({ model: reference('llama-shared-bnb4-dq'), quantize: false });
  assert.equal(e.stored4bit, true);
  assert.equal(e.options.quantize, true);
  assert.equal(e.config.numLayers, 2);
  const dense = estimate({ model: reference('llama-shared'), quantize: false });
  assert.ok(e.categories.weights < dense.categories.weights);
  assert.equal(e.categories.activations, dense.categories.activations);
});

test('a bnb-4bit checkpoint is estimated by its tensors: double-quantized block constants or not, whatever config.json says', () => {
  const plain = estimate({ model: reference('llama-shared-bnb4'), quantize: false });
  const nested = estimate({ model: reference('llama-shared-bnb4-dq'), quantize: false });
  // 8-bit codes, one fp32 constant per 256 and the 256-value map, instead of one fp32 constant a block (the map
  // makes it more on a model this small)
  assert.notEqual(nested.categories.weights, plain.categories.weights);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-estimate-'));
  try {
    for (const f of fs.readdirSync(reference('llama-shared-bnb4'))) fs.copyFileSync(path.join(reference('llama-shared-bnb4'), f), path.join(dir, f));
    const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
    config.quantization_config.bnb_4bit_use_double_quant = true;  // wrong: its tensors have no nested state
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
    const mislabelled = estimate({ model: dir, quantize: false });
    assert.deepEqual(mislabelled.categories, plain.categories);
    const model = EngineModel.load(dir, { quantize: false });
    try {
      assert.equal(model.memory().current.weights, plain.categories.weights);
    } finally {
      model.dispose();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('estimate verb: --json gives bytes, the table gives MiB by category and the peak', async () => {
  const out = await captureStdout(() =>
    estimateVerb.run(parseOptions('estimate', ['--model', reference('llama-shared'), '--seq-len', '64', '--rank', '16', '--no-checkpointing', '--json'], estimateVerb.options)),
  );
  const json = JSON.parse(out) as ReturnType<typeof estimate>;
  assert.equal(json.options.seq, 64);
  assert.equal(json.options.rank, 16);
  assert.equal(json.options.gradientCheckpointing, false);
  assert.equal(json.peakTotal, Object.values(json.categories).reduce((a, b) => a + b, 0));
  const table = formatEstimate(json);
  for (const word of ['weights', 'adapters', 'gradients', 'optimizer', 'activations', 'workspace', 'peak', 'MiB']) assert.ok(table.includes(word), word);
  // without checkpointing the block inputs stay in each block's saved activations: nothing of them can move
  assert.equal(json.offloadableActivationBytes, 0);
  assert.doesNotMatch(table, /block inputs/);
  const checkpointed = estimate({ model: reference('llama-shared'), seq: 64, rank: 16 });
  assert.equal(checkpointed.activationPageBytes, 64 * checkpointed.config.hiddenSize * 4);
  // two layers: both block inputs stay (backward's first block and the one it prefetches)
  assert.equal(checkpointed.offloadableActivationBytes, 0);
  const long = estimate({ model: reference('llama-shared'), seq: 64, rank: 16, device: 'cuda' });
  assert.equal(long.activationPageBytes, 64 * long.config.hiddenSize * 2, 'bf16 block inputs on the GPU');
  // its untied bf16 embedding table stays in host memory there, with a buffer for a step's rows
  const embeddingTable = long.config.vocabSize * long.config.hiddenSize * 2;
  assert.equal(long.hostBytes, embeddingTable + 64 * long.config.hiddenSize * 2);
  assert.equal(long.categories.weights, estimate({ model: reference('llama-shared'), seq: 64, rank: 16 }).categories.weights - embeddingTable);
  assert.match(formatEstimate(long), /Host memory besides: [0-9.]+ MiB \(the embedding table/);
  assert.equal(checkpointed.hostBytes, 0, 'on the CPU every byte is in the categories');
  assert.throws(() => estimate({ model: reference('llama-shared'), targets: ['q_proj', 'nope'] }), /unknown LoRA target module 'nope'/);
  assert.throws(() => estimate({ model: reference('llama-shared'), seq: 0 }), /--seq-len must be a positive integer/);
});

test('estimate: LoRA dropout adds drop(x)\'s workspace, and on the GPU under bf16 keeps SwiGLU\'s output in fp32 and no dequantized weight for backward', () => {
  const model = reference('llama-shared'), seq = 64, rank = 16;
  for (const [device, computeDtype] of [['cpu', undefined], ['cuda', 'f32'], ['cuda', 'bf16']] as const) {
    const plain = estimate({ model, seq, rank, device, computeDtype });
    const dropped = estimate({ model, seq, rank, device, computeDtype, loraDropout: 0.05 });
    const c = plain.config;
    // drop(x) of the widest linear input; one block's m as 16-bit rows with room for LoRA's 16 columns, or fp32
    const widest = Math.max(c.hiddenSize, c.intermediateSize, c.numHeads * c.headDim);
    // without dropout under bf16, q k v o gate up dequantized for a block's forward and its backward, with room for
    // LoRA's 16 columns beside and rows under each (dropout's mask keeps LoRA out of the input gradient's GEMM)
    const q = c.numHeads * c.headDim, kv = c.numKvHeads * c.headDim, h = c.hiddenSize, inter = c.intermediateSize;
    const shapes = [[q, h], [kv, h], [kv, h], [h, q], [inter, h], [inter, h]];
    const kept = computeDtype === 'bf16' ? shapes.reduce((sum, [out, inp]) => sum + (out + 16) * (inp + 16) * 2, 0) : 0;
    assert.equal(dropped.categories.workspace - plain.categories.workspace, seq * widest * 4 - kept, `${device} ${computeDtype}`);
    const m = computeDtype === 'bf16' ? seq * c.intermediateSize * 4 - seq * (c.intermediateSize + 16) * 2 : 0;
    assert.equal(dropped.categories.activations - plain.categories.activations, m, `${device} ${computeDtype}`);
    assert.equal(dropped.options.loraDropout, 0.05);
    assert.match(formatEstimate(dropped), /dropout 0\.05/);
  }
  assert.throws(() => estimate({ model, loraDropout: 1 }), /--lora-dropout must be at least 0 and below 1, got 1/);
  assert.throws(() => estimateVerb.run(parseOptions('estimate', ['--model', model, '--lora-dropout', 'x'], estimateVerb.options)), /--lora-dropout must be a number, got 'x'/);
});

test('estimate verb: its defaults are the preset\'s that train would use (qlora, or --preset quick)', async () => {
  const run = async (...args: string[]) => {
    const out = await captureStdout(() => estimateVerb.run(parseOptions('estimate', ['--model', reference('llama-shared'), '--json', ...args], estimateVerb.options)));
    const o = (JSON.parse(out) as ReturnType<typeof estimate>).options;
    return [o.seq, o.batch, o.rank, o.loraDropout, o.targets.length];
  };
  assert.deepEqual(await run(), [1024, 4, 64, 0.05, 7]);
  assert.deepEqual(await run('--preset', 'quick'), [512, 4, 8, 0.05, 7]);
  assert.deepEqual(await run('--preset', 'quick', '--rank', '4', '--lora-dropout', '0'), [512, 4, 4, 0, 7]);
  await assert.rejects(run('--preset', 'fast'), /--preset must be qlora or quick, got 'fast'/);
});

test('estimate of a bnb-4bit checkpoint whose linears are partly stored dense (unsloth\'s dynamic 4-bit) counts those at their stored size, as the engine loads them', () => {
  // llama-shared-bnb4 with layer 1's MLP as llama-shared stores it: fp32, no quant state
  const bnb = readSafetensors(path.join(reference('llama-shared-bnb4'), 'model.safetensors'));
  const dense = readSafetensors(path.join(reference('llama-shared'), 'model.safetensors'));
  const skipped = (name: string) => name.startsWith('model.layers.1.mlp.');
  const entries = [...[...bnb].filter(([name]) => !skipped(name)), ...[...dense].filter(([name]) => skipped(name))];
  const header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> = {};
  let offset = 0;
  for (const [name, t] of entries) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  const json = Buffer.from(JSON.stringify(header));
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(json.length));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-dynamic-'));
  try {
    fs.copyFileSync(path.join(reference('llama-shared-bnb4'), 'config.json'), path.join(dir, 'config.json'));
    fs.writeFileSync(path.join(dir, 'model.safetensors'), Buffer.concat([length, json, ...entries.map(([, t]) => t.bytes)]));
    const stored = estimateMemory(reference('llama-shared-bnb4'));
    const dynamic = estimateMemory(dir);
    const c = stored.config;
    const mlp = 3 * c.hiddenSize * c.intermediateSize;
    // fp32 in place of NF4 codes (half a byte a weight) and one fp32 constant per block of 64 (no double quantization)
    assert.equal(dynamic.categories.weights - stored.categories.weights, mlp * 4 - (mlp / 2 + (mlp / 64) * 4));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
