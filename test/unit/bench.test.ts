// bench --shape: a synthetic model trains (random tokens: the loss sits near log(vocabulary)), the JSON has the
// figures the issue names, the FLOP count follows the shape, a memory budget pages the optimizer without changing the
// numbers, and on the CPU there is no MFU (no peak figure) rather than a made-up one.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { test } from 'node:test';
import { estimateMemory } from '../../extension/engine/tools';
import { peakFlops, trainingFlopsPerToken } from '../../extension/trainer/flops';
import { bench, estimateDeviation, formatBench, formatGenerateBench, profilePerStep, type BenchResult, type GenerateBenchResult } from '../../extension/trainer/verbs/bench';
import { cliPath } from '../helpers/paths';

const quick = { shape: 'tiny' as const, batch: 2, seq: 48, steps: 2, warmup: 1, rank: 8 };

test('bench --shape tiny --json: tokens/s, step time, peak memory by category, paging, MFU, device', () => {
  const r = spawnSync(process.execPath, [cliPath, 'bench', '--shape', 'tiny', '--batch', '2', '--seq', '48', '--steps', '2', '--warmup', '1', '--device', 'cpu', '--json'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const b = JSON.parse(r.stdout) as BenchResult;
  assert.ok(b.tokens_per_s > 0 && Math.abs(b.tokens_per_s - (2 * 48) / (b.step_ms / 1000)) < 1e-6 * b.tokens_per_s);
  assert.equal(b.device.kind, 'cpu');
  assert.equal(b.mfu, null);
  assert.equal(b.page_bytes, 0);
  // random tokens over 8192: the loss of an untrained model is about log(8192) = 9.01
  assert.ok(Math.abs(b.loss - Math.log(8192)) < 0.5, `loss ${b.loss}`);
  // the engine's peaks are the estimate's, category by category (the synthetic model makes load()'s buffers)
  const e = estimateMemory({ shape: 'tiny' }, { batch: 2, seq: 48, rank: 16 });
  for (const c of ['weights', 'adapters', 'gradients', 'optimizer', 'activations', 'workspace'] as const) assert.equal(b.peak_bytes[c], e.categories[c], c);
  assert.equal(b.peak_bytes.total, e.peakTotal);
  assert.equal(b.estimated_peak_bytes, e.peakTotal);
  assert.equal(estimateDeviation(b), 'equal to');
  assert.equal(estimateDeviation({ peak_bytes: { ...b.peak_bytes, total: 0.9 * b.estimated_peak_bytes }, estimated_peak_bytes: b.estimated_peak_bytes }), '10.0% below');
  assert.equal(b.trainable_parameters, e.loraParameters);

  const text = spawnSync(process.execPath, [cliPath, 'bench', '--shape', 'tiny', '--seq', '32', '--steps', '1', '--warmup', '0', '--device', 'cpu'], { encoding: 'utf8' });
  assert.equal(text.status, 0, text.stderr);
  assert.match(text.stdout, /^bench tiny on CPU .* \(f32\): batch 1 x 32 tokens, LoRA r 16 on all linear layers/);
  assert.match(text.stdout, /MFU +unknown \(no peak FLOP\/s figure for /);
  // one step: the optimizer comes into being at its update, after the run's peak
  assert.match(text.stdout, /estimate +[\d.]+ [KMG]iB \(the measured peak [\d.]+% below it\)/);
  const bad = spawnSync(process.execPath, [cliPath, 'bench', '--shape', '13b'], { encoding: 'utf8' });
  assert.equal(bad.status, 1);
  assert.match(bad.stderr, /--shape must be one of tiny, 1b, 8b, 70b, got '13b'/);
});

test('bench under a memory budget pages the optimizer and computes the same losses', () => {
  const free = bench({ ...quick, placement: { device: 'cpu' } });
  const e = estimateMemory({ shape: 'tiny' }, { batch: 2, seq: 48, rank: 8 });
  const paged = bench({ ...quick, placement: { device: 'cpu', memoryBudgetBytes: e.peakTotal - e.categories.optimizer / 2 } });
  assert.equal(paged.loss, free.loss);
  assert.equal(paged.paged_optimizer, true);
  assert.ok(paged.page_moves >= 4 && paged.page_bytes === paged.page_moves * e.optimizerPageBytes, `${paged.page_moves} moves, ${paged.page_bytes} bytes`);
  assert.ok(paged.peak_bytes.total <= paged.memory_budget!);
  assert.throws(() => bench({ ...quick, placement: { device: 'cpu', memoryBudgetBytes: e.categories.weights } }), /^Error: This run needs at least .* To fit: lower the batch size \(now 2\)/);
});

test('bench --offload-activations: the block inputs move to host memory and back every step, with the same losses', () => {
  const free = bench({ ...quick, placement: { device: 'cpu' } });
  const e = estimateMemory({ shape: 'tiny' }, { batch: 2, seq: 48, rank: 8 });
  const offloaded = bench({ ...quick, placement: { device: 'cpu' }, offloadActivations: true });
  assert.equal(offloaded.loss, free.loss);
  assert.equal(free.offloaded_block_inputs, 0);
  // 4 layers: the inputs of blocks 0 and 1 out and back in, in each step (the warm-up's and the 2 timed ones)
  assert.equal(offloaded.offloaded_block_inputs, 2);
  assert.equal(offloaded.page_moves, 3 * 4);
  assert.equal(offloaded.page_bytes, offloaded.page_moves * e.activationPageBytes);
  assert.equal(offloaded.peak_bytes.activations, free.peak_bytes.activations - e.offloadableActivationBytes);
  assert.match(formatBench(offloaded), /\n {2}paging +12 moves, /);
  const cli = spawnSync(process.execPath, [cliPath, 'bench', '--shape', 'tiny', '--seq', '16', '--steps', '1', '--warmup', '0', '--device', 'cpu', '--offload-activations', '--json'], { encoding: 'utf8' });
  assert.equal(cli.status, 0, cli.stderr);
  assert.equal((JSON.parse(cli.stdout) as BenchResult).offloaded_block_inputs, 2);
});

test('bench --profile: device time per step by op, the most first; none on the CPU, said so', () => {
  // the per-step figures of a profile taken over several steps
  const perStep = profilePerStep([{ op: 'attention_backward_dkv', calls: 64, ms: 30 }, { op: 'gemm bf16 8192x2048x2048 NT', calls: 32, ms: 10 }], 2);
  assert.deepEqual(perStep, [
    { op: 'attention_backward_dkv', calls: 32, ms: 15, share: 0.75 },
    { op: 'gemm bf16 8192x2048x2048 NT', calls: 16, ms: 5, share: 0.25 },
  ]);
  const onCpu = bench({ ...quick, steps: 1, placement: { device: 'cpu' }, profile: true });
  assert.equal(onCpu.profile, null);
  const text = formatBench({ ...onCpu, profile: perStep });
  assert.match(text, /\n {2}profile +20\.0 ms of device time a step in 2 ops \(of a [\d.]+ ms step\); the most:\n {4}attention_backward_dkv +15\.00 ms +75\.0% +32 calls\n {4}gemm bf16 8192x2048x2048 NT +5\.00 ms +25\.0% +16 calls$/);
  const cli = spawnSync(process.execPath, [cliPath, 'bench', '--shape', 'tiny', '--seq', '16', '--steps', '1', '--warmup', '0', '--device', 'cpu', '--profile'], { encoding: 'utf8' });
  assert.equal(cli.status, 0, cli.stderr);
  assert.match(cli.stderr, /warning: --profile times GPU kernels; this run was on the CPU, which has none/);
  assert.doesNotMatch(cli.stdout, /profile/);
});

test('bench --generate --profile: device time per decoded token by op beside the token\'s time; none on the CPU, said so', () => {
  const r = spawnSync(process.execPath, [cliPath, 'bench', '--shape', 'tiny', '--generate', '--prompt-tokens', '8', '--new-tokens', '2', '--device', 'cpu', '--profile', '--json'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stderr, /warning: --profile times GPU kernels; this run was on the CPU, which has none/);
  const g = JSON.parse(r.stdout) as GenerateBenchResult;
  assert.equal(g.decode_profile, null);
  // two decoded tokens' worth, per token
  const profile = profilePerStep([{ op: 'nf4_matmul_nt', calls: 448, ms: 2.4 }, { op: 'gemm_few_rows_nt', calls: 448, ms: 0.8 }], 2);
  const text = formatGenerateBench({ ...g, decode_profile: profile });
  assert.match(text, /\n {2}profile +1\.60 ms of device time a decoded token in 2 ops \(of a [\d.]+ ms token\); the most:\n {4}nf4_matmul_nt +1\.200 ms +75\.0% +224 calls\n {4}gemm_few_rows_nt +0\.400 ms +25\.0% +224 calls$/);
});

test('model FLOPs per token: frozen base twice, LoRA three times, causal attention; peaks by GPU name', () => {
  const shape8b = { vocabSize: 128256, hiddenSize: 4096, intermediateSize: 14336, numLayers: 32, numHeads: 32, numKvHeads: 8, headDim: 128 };
  // 8B: 6.98e9 linear weights and 0.525e9 LM head weights, 4 FLOPs each; LoRA r 16: 42M parameters, 6 each;
  // attention at 2048 tokens: 3 * 4 * 4096 * 1024.5 per layer
  const expected = 4 * 6_979_321_856 + 4 * 525_336_576 + 6 * 41_943_040 + 32 * 3 * 4 * 4096 * 1024.5;
  assert.equal(trainingFlopsPerToken(shape8b, 16, 2048), expected);
  assert.equal(peakFlops('NVIDIA H100 80GB HBM3'), 989.4e12);
  assert.equal(peakFlops('NVIDIA H100 PCIe'), 756e12);
  assert.equal(peakFlops('NVIDIA H200'), 989.4e12);
  assert.equal(peakFlops('NVIDIA L4'), 121e12);
  assert.equal(peakFlops('Some Future GPU'), null);
});

test('bench --generate: prefill and decode tokens/s at batch 1 with the adapter applied', () => {
  const r = spawnSync(process.execPath, [cliPath, 'bench', '--shape', 'tiny', '--generate', '--prompt-tokens', '40', '--new-tokens', '6', '--device', 'cpu', '--json'], { encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
  const g = JSON.parse(r.stdout) as GenerateBenchResult;
  assert.deepEqual([g.shape, g.prompt_tokens, g.new_tokens, g.rank, g.device.kind], ['tiny', 40, 6, 16, 'cpu']);
  assert.ok(g.prefill_tokens_per_s > 0 && g.decode_tokens_per_s > 0);
  assert.ok(Math.abs(g.decode_ms_per_token - 1000 / g.decode_tokens_per_s) < 1e-6 * g.decode_ms_per_token);
  assert.ok(g.peak_bytes > 0);
  const text = spawnSync(process.execPath, [cliPath, 'bench', '--shape', 'tiny', '--generate', '--prompt-tokens', '8', '--new-tokens', '2', '--device', 'cpu'], { encoding: 'utf8' });
  assert.match(text.stdout, /^bench tiny generation on CPU .*: batch 1, NF4 base, LoRA r 16 applied\n  prefill +[\d.]+ tokens\/s \(8-token prompt\)\n  decode +[\d.]+ tokens\/s/);
});
