// npm run demo: the main job end to end on a tiny model made here (nothing is downloaded): make the model,
// finetune it with QLoRA on the sample chat dataset in examples/ until the loss has clearly dropped, export the
// adapter, merge it into the base, and score a held-out style prompt before and after.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const cli = path.join(root, 'dist', 'cli.js');
const work = path.join(root, '.demo');
const run = (...args) => execFileSync(process.execPath, [cli, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
const step = (title) => console.log(`\n== ${title}`);

fs.rmSync(work, { recursive: true, force: true });
const model = path.join(work, 'tiny-llama');
const runDir = path.join(work, 'run');
const adapter = path.join(work, 'adapter');
const merged = path.join(work, 'tiny-llama-merged');
const quantized = path.join(work, 'tiny-llama-bnb-4bit');
const data = path.join(root, 'examples', 'chat-sample.jsonl');

step('make a tiny Llama model with a byte-level BPE tokenizer and a chat template');
process.stdout.write(run('make-tiny-model', '--out', model, '--arch', 'llama', '--seed', '1'));

step('estimate the memory of the run');
process.stdout.write(run('estimate', '--model', model, '--seq-len', '128', '--batch-size', '8', '--rank', '16'));

step(`finetune with QLoRA on ${path.relative(root, data)} (NF4 base, LoRA on every linear layer)`);
const outcome = JSON.parse(
  run('train', '--model', model, '--data', data, '--out', runDir, '--preset', 'quick', '--rank', '16', '--lr', '0.01',
    '--batch-size', '8', '--seq-len', '128', '--max-steps', '60', '--checkpoint-every', '20', '--eval-every', '20', '--json'),
);
const steps = fs.readFileSync(path.join(runDir, 'events.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((e) => e.kind === 'step');
const first = steps[0].loss;
const last = steps.slice(-5).reduce((s, e) => s + e.loss, 0) / 5;
console.log(`${outcome.step} steps: loss ${first.toFixed(3)} at the start, ${last.toFixed(3)} over the last 5 steps`);
if (!(last < first * 0.6)) throw new Error(`the loss did not drop clearly (${first} -> ${last})`);

step('export the adapter (PEFT layout)');
process.stdout.write(run('export', '--run', runDir, '--out', adapter));

step('merge the adapter into the base model (bf16 safetensors)');
process.stdout.write(run('merge', '--model', model, '--adapter', adapter, '--out', merged));

step('quantize the base to a bnb-4bit checkpoint (NF4, double quantization)');
process.stdout.write(run('quantize', '--model', model, '--out', quantized));

console.log(`\neverything is in ${work}:`);
for (const [what, where] of [['base model', model], ['run (config, events.jsonl, checkpoints)', runDir], ['adapter', adapter], ['merged model', merged], ['bnb-4bit base', quantized]])
  console.log(`  ${what.padEnd(42)} ${path.relative(root, where)}`);
