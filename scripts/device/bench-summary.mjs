// There (the GPU machine, from the repository root, after gpu_check.sh's benchmarks): one line per JSON benchmark
// in $OUT (tokens/s, MFU, the measured peak beside the estimate's: issue 7 holds it within 10%; generation's decode
// and prefill tokens/s), and the offloaded 8B run beside the one that keeps its block inputs (the same loss: a race
// between the copy stream and the compute would change it).
//   node scripts/device/bench-summary.mjs "$OUT"
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createRequire } from 'node:module';

const { estimateDeviation } = createRequire(import.meta.url)('../../out/extension/trainer/verbs/bench.js');
const out = process.argv[2];

/** The last JSON line of a benchmark's log (bench --json prints one), or null. */
function result(name) {
  const file = path.join(out, `${name}.log`);
  if (!fs.existsSync(file)) return null;
  const line = fs.readFileSync(file, 'utf8').trim().split('\n').filter((l) => l.startsWith('{')).pop();
  return line ? JSON.parse(line) : null;
}

const gib = (bytes) => `${(bytes / 2 ** 30).toFixed(2)} GiB`;
for (const file of fs.readdirSync(out).filter((f) => /^bench_.*\.log$/.test(f)).sort()) {
  const name = path.basename(file, '.log');
  const b = result(name);
  if (!b) {
    console.log(`${name}: no JSON`);
    continue;
  }
  if (b.decode_tokens_per_s !== undefined) {  // bench --generate
    const device = b.decode_profile ? `, ${b.decode_profile.reduce((sum, e) => sum + e.ms, 0).toFixed(2)} ms of it on the device` : '';
    console.log(`${name}: decode ${b.decode_tokens_per_s.toFixed(0)} tok/s (${b.decode_ms_per_token.toFixed(2)} ms a token${device}), ` +
      `prefill ${b.prefill_tokens_per_s.toFixed(0)} tok/s, peak ${gib(b.peak_bytes)}`);
    continue;
  }
  const mfu = b.mfu === null ? '?' : `${(100 * b.mfu).toFixed(1)}%`;
  const memory = b.paged_optimizer ? `, paged under ${gib(b.memory_budget)}` : ` (${estimateDeviation(b)} the estimate, ${gib(b.estimated_peak_bytes)})`;
  console.log(`${name}: ${b.tokens_per_s.toFixed(0)} tok/s, MFU ${mfu}, peak ${gib(b.peak_bytes.total)}${memory}`);
}

const kept = result('bench_8b_bf16'), moved = result('bench_8b_offload');
if (kept && moved)
  console.log(`offload: loss ${moved.loss === kept.loss ? 'equal' : 'DIFFERS'} (${moved.loss} vs ${kept.loss}), step ` +
    `${moved.step_ms.toFixed(1)} ms vs ${kept.step_ms.toFixed(1)} ms, ${moved.page_moves} moves`);
