// npm run demo: the main job end to end on a tiny model made here (nothing is downloaded): make the model, score
// a sentence's tokens, quantize it to bnb-4bit NF4, and score the quantized model.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const cli = path.join(root, 'dist', 'cli.js');
const work = path.join(root, '.demo');
const run = (...args) => execFileSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
const step = (title) => console.log(`\n== ${title}`);

fs.rmSync(work, { recursive: true, force: true });
const model = path.join(work, 'tiny-llama');
const quantized = path.join(work, 'tiny-llama-bnb-4bit');

step('make a tiny Llama model with a byte-level BPE tokenizer');
process.stdout.write(run('make-tiny-model', '--out', model, '--arch', 'llama', '--seed', '1'));

// Token ids of a short chat turn, read from the model's own tokenizer vocabulary so the demo shows real tokens.
const tokenizer = JSON.parse(fs.readFileSync(path.join(model, 'tokenizer.json'), 'utf8'));
const special = Object.fromEntries(tokenizer.added_tokens.map((t) => [t.content, t.id]));
const vocab = tokenizer.model.vocab;
const words = ['Ġthe', 'Ġa', 'Ġand', 'Ġis', 'Ġof'].filter((w) => w in vocab).map((w) => vocab[w]);
const ids = [special['<|begin_of_text|>'], ...words, special['<|eot_id|>']];

step(`score ${ids.length} tokens (${ids.join(',')}) with the bf16 model`);
const plain = JSON.parse(run('score', '--model', model, '--ids', ids.join(','), '--json'));
console.log(`loss ${plain.loss.toFixed(4)} (a random model predicts about uniformly: log(512) = ${Math.log(512).toFixed(4)})`);

step('quantize to a bnb-4bit checkpoint (NF4, double quantization)');
process.stdout.write(run('quantize', '--model', model, '--out', quantized));

step('score the same tokens with the NF4 model');
const q = JSON.parse(run('score', '--model', quantized, '--ids', ids.join(','), '--json'));
const maxDiff = Math.max(...q.next_token_logprobs.map((lp, i) => Math.abs(lp - plain.next_token_logprobs[i])));
console.log(`loss ${q.loss.toFixed(4)}; largest log-prob change from quantization: ${maxDiff.toExponential(2)}`);
console.log(`\nfiles are in ${work}`);
