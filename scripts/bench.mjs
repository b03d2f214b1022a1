// npm run bench: CPU tokens/s of a QLoRA training step (forward + backward + AdamW) on a small model made here.
// A figure to compare across changes on the same machine, not a test.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const require = createRequire(import.meta.url);
const addon = require(path.join(root, 'build', 'Release', 'qlora_native.node'));

const dir = path.join(os.tmpdir(), 'qlora-bench-small');
if (!fs.existsSync(path.join(dir, 'model.safetensors')))
  execFileSync(process.execPath, [path.join(root, 'dist', 'cli.js'), 'make-tiny-model', '--out', dir, '--size', 'small', '--seed', '1']);

const batch = 4, seq = 256, warmup = 2, steps = 5;
const model = new addon.Model(dir, { quantize: true });
const config = model.config();
model.createLora({ rank: 16, alpha: 16, dropout: 0.05, seed: 1 });
const ids = new Int32Array(batch * seq).map((_, i) => (i * 7919 + 13) % config.vocabSize);

function trainStep(step) {
  model.zeroGrad();
  model.run(ids, ids, batch, seq, { computeGrads: true, training: true, seed: 1, step, gradientCheckpointing: true });
  model.optimizerStep({ lr: 2e-4, maxGradNorm: 0.3 });
}
for (let s = 0; s < warmup; s++) trainStep(s);
const t0 = process.hrtime.bigint();
for (let s = 0; s < steps; s++) trainStep(warmup + s);
const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
const mem = model.memory();
const info = addon.engineInfo();
console.log(`model: ${config.numLayers} layers, hidden ${config.hiddenSize}, intermediate ${config.intermediateSize}, vocab ${config.vocabSize}, NF4 base, LoRA r=16 on all linears`);
console.log(`batch ${batch} x ${seq} tokens, gradient checkpointing, ${info.threads} CPU threads`);
console.log(`CPU forward+backward+AdamW: ${((batch * seq * steps) / seconds).toFixed(0)} tokens/s (${(seconds / steps * 1000).toFixed(0)} ms/step over ${steps} steps)`);
console.log(`engine peak memory: ${(mem.totalPeak / 1048576).toFixed(1)} MiB`);
