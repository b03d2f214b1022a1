// The command line end to end, as a user runs it: make-tiny-model, score, quantize, engine-info, and the way
// errors are reported (one sentence on stderr, exit status 1, no stack trace without --debug).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { EngineModel, readModelConfig } from '../../extension/engine';
import { cliPath, reference, repoRoot, tempDir } from '../helpers/paths';
import { readSafetensors } from '../helpers/safetensors';

function cli(...args: string[]) {
  const r = spawnSync(process.execPath, [cliPath, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function expectCleanError(r: ReturnType<typeof cli>, fragment: string | RegExp) {
  assert.equal(r.status, 1, `exit status; stderr: ${r.stderr}`);
  const first = r.stderr.split('\n')[0];
  assert.match(first, /^qlora-studio: /);
  if (typeof fragment === 'string') assert.ok(first.includes(fragment), `stderr: ${r.stderr}`);
  else assert.match(first, fragment);
  assert.ok(!/\n\s+at /.test(r.stderr), `no stack trace without --debug: ${r.stderr}`);
}

for (const arch of ['llama', 'qwen2'] as const) {
  test(`make-tiny-model --arch ${arch} writes a loadable model that scores near uniform`, () => {
    const dir = path.join(tempDir(`tiny-${arch}`), 'model');
    const made = cli('make-tiny-model', '--out', dir, '--arch', arch, '--seed', '3', '--json');
    assert.equal(made.status, 0, made.stderr);
    for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json'])
      assert.ok(fs.existsSync(path.join(dir, f)), f);
    const config = readModelConfig(dir);
    assert.equal(config.architecture, arch === 'llama' ? 'LlamaForCausalLM' : 'Qwen2ForCausalLM');
    assert.equal(config.vocabSize, 512);
    assert.equal(config.qkvBias, arch === 'qwen2');
    assert.equal(config.tieWordEmbeddings, arch === 'qwen2');
    const tensors = readSafetensors(path.join(dir, 'model.safetensors'));
    assert.equal(tensors.get('model.embed_tokens.weight')?.dtype, 'BF16');
    // A random model predicts about uniformly: its logits have unit spread, which costs about half a nat over
    // log(512).
    const scored = cli('score', '--model', dir, '--ids', '1,2,3,4,5,6,7,8', '--json');
    assert.equal(scored.status, 0, scored.stderr);
    const { loss, next_token_logprobs } = JSON.parse(scored.stdout) as { loss: number; next_token_logprobs: number[] };
    assert.equal(next_token_logprobs.length, 7);
    assert.ok(loss > Math.log(512) - 0.1 && loss < Math.log(512) + 1.0, `loss ${loss}`);
    // Same seed, same bytes; another seed, other weights.
    const again = path.join(tempDir(`tiny-${arch}-again`), 'model');
    cli('make-tiny-model', '--out', again, '--arch', arch, '--seed', '3');
    assert.ok(fs.readFileSync(path.join(dir, 'model.safetensors')).equals(fs.readFileSync(path.join(again, 'model.safetensors'))));
    const other = path.join(tempDir(`tiny-${arch}-other`), 'model');
    cli('make-tiny-model', '--out', other, '--arch', arch, '--seed', '4');
    assert.ok(!fs.readFileSync(path.join(dir, 'model.safetensors')).equals(fs.readFileSync(path.join(other, 'model.safetensors'))));
  });
}

test('quantize writes the NF4 codes and block constants bitsandbytes writes', () => {
  // The references were written by transformers loading the bf16 model with torch_dtype=float32, hence --dtype.
  for (const [flag, refName] of [[[], 'llama-shared-bnb4-dq'], [['--no-double-quant'], 'llama-shared-bnb4']] as const) {
    const out = path.join(tempDir('quant'), 'model');
    const r = cli('quantize', '--model', reference('llama-shared'), '--out', out, '--dtype', 'float32', ...flag, '--json');
    assert.equal(r.status, 0, r.stderr);
    const ours = readSafetensors(path.join(out, 'model.safetensors'));
    const theirs = readSafetensors(reference(`${refName}/model.safetensors`));
    assert.deepEqual([...ours.keys()].sort(), [...theirs.keys()].sort());
    for (const [name, t] of theirs) {
      const o = ours.get(name)!;
      assert.equal(o.dtype, t.dtype, name);
      assert.deepEqual(o.shape, t.shape, name);
      assert.ok(o.bytes.equals(t.bytes), `${name} differs from bitsandbytes' bytes`);
    }
    const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
    assert.equal(config.quantization_config.quant_method, 'bitsandbytes');
    assert.equal(config.quantization_config.bnb_4bit_use_double_quant, flag.length === 0);
    // The engine reads it back as a 4-bit checkpoint and scores it as the reference stack did.
    const ref = JSON.parse(fs.readFileSync(reference(`${refName}.ref.json`), 'utf8'));
    const scored = JSON.parse(cli('score', '--model', out, '--ids', ref.ids.join(','), '--json').stdout);
    assert.ok(Math.abs(scored.loss - ref.loss) <= 1e-3, `${scored.loss} vs ${ref.loss}`);
  }
});

test('quantize of a tiny bf16 model keeps the tokenizer and records bf16 dequantization', () => {
  const dir = path.join(tempDir('tiny-q'), 'model');
  cli('make-tiny-model', '--out', dir);
  const out = path.join(tempDir('tiny-q-out'), 'model');
  const r = cli('quantize', '--model', dir, '--out', out);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /quantized 14 linear weights/);
  assert.ok(fs.existsSync(path.join(out, 'tokenizer.json')));
  const state = readSafetensors(path.join(out, 'model.safetensors')).get('model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4')!;
  assert.equal(JSON.parse(state.bytes.toString('utf8')).dtype, 'bfloat16');
  const model = EngineModel.load(out);
  assert.equal(model.stored4bit(), true);
  model.dispose();
  expectCleanError(cli('quantize', '--model', out, '--out', path.join(tempDir('again'), 'm')), 'already');
});

test('errors are one clear sentence on stderr with exit status 1', () => {
  expectCleanError(cli('frobnicate'), "unknown verb 'frobnicate'");
  expectCleanError(cli('score', '--ids', '1,2'), 'needs --model');
  expectCleanError(cli('score', '--model', reference('llama-shared'), '--ids', '1,x,3'), "entry 2 ('x') is not a token id");
  expectCleanError(cli('score', '--model', reference('llama-shared'), '--ids', '1,999'), "--ids entry 2 (999) is outside the model's vocabulary (0..255)");
  expectCleanError(cli('score', '--model', reference('llama-shared'), '--ids', '1,2', '--grads', 'g.safetensors'), '--grads needs --adapter');
  expectCleanError(cli('score', '--model', tempDir('empty'), '--ids', '1,2'), 'no config.json');
  expectCleanError(cli('make-tiny-model', '--out', tempDir('x'), '--arch', 'gpt2'), '--arch must be llama, mistral or qwen2');
  expectCleanError(cli('score', '--model', reference('llama-shared'), '--ids', '1,2', '--bogus'), 'unknown option --bogus');
  const debug = cli('score', '--model', tempDir('empty'), '--ids', '1,2', '--debug');
  assert.equal(debug.status, 1);
  assert.match(debug.stderr, /\n\s+at /, 'a stack with --debug');
});

test('flags that do not apply, folders that hold something else and unreadable run files are refused by name', () => {
  const model = path.join(tempDir('refusals'), 'model');
  assert.equal(cli('make-tiny-model', '--out', model).status, 0);
  // a folder that holds files is never written into (another model's shards would stay beside the new weights)
  const busy = tempDir('busy');
  fs.writeFileSync(path.join(busy, 'model-00001-of-00002.safetensors'), '');
  expectCleanError(cli('quantize', '--model', model, '--out', busy), 'already exists and is not empty');
  expectCleanError(cli('make-tiny-model', '--out', busy), 'already exists and is not empty');
  assert.deepEqual(fs.readdirSync(busy), ['model-00001-of-00002.safetensors']);
  expectCleanError(cli('generate', '--model', model, '--prompt', 'hi', '--raw', '--system', 'be brief'), '--raw continues --prompt as plain text');
  expectCleanError(cli('export-gguf', '--model', model, '--checkpoint', '5', '--out', path.join(tempDir('g'), 'm.gguf')), '--checkpoint 5 picks a checkpoint of a run: it needs --run');
  expectCleanError(cli('generate', '--model', model, '--stop', '---', '--prompt', 'hi'), '--stop needs a value (a value that starts with -- is written --stop=---)');
  // a run whose config.json was damaged: the file is named
  const run = tempDir('damaged-run');
  fs.writeFileSync(path.join(run, 'config.json'), '{bad');
  expectCleanError(cli('resume', '--run', run), `${path.join(run, 'config.json')}: not valid JSON`);
  expectCleanError(cli('generate', '--run', run, '--prompt', 'hi'), `${path.join(run, 'config.json')}: not valid JSON`);
  // train's flags are named in what is wrong with them, and --shape is one
  const data = path.join(tempDir('shape-data'), 'qa.jsonl');
  fs.writeFileSync(data, '{"question": "q", "answer": "a"}\n');
  const train = (...extra: string[]) => cli('train', '--model', model, '--data', data, '--out', path.join(tempDir('r'), 'run'), ...extra);
  expectCleanError(train('--rank', '0'), '--rank must be at least 1');
  expectCleanError(train('--seed', '1e20'), '--seed must be at most 9007199254740991');
  expectCleanError(train('--shape', 'qa'), '--shape must be one of messages, sharegpt, alpaca, completion, text');
  expectCleanError(train(), '(or pass --shape)');
  expectCleanError(train('--shape', 'text'), 'qa.jsonl line 1');
  // a file where a folder belongs, and the other way round, is said to be one, before any work
  const file = path.join(tempDir('a-file'), 'notes.txt');
  fs.writeFileSync(file, 'x');
  expectCleanError(cli('train', '--model', model, '--data', data, '--out', file, '--shape', 'text'), `${file} exists and is not a folder; choose another --out`);
  expectCleanError(cli('score', '--model', path.join(model, 'config.json'), '--ids', '1,2'), `${path.join(model, 'config.json')} is a file; name the model's folder`);
  expectCleanError(cli('inspect-data', '--data', path.dirname(data)), 'is a directory, not a data file');
  expectCleanError(cli('inspect-data', '--data', data, '--model', model, '--seq-len', '0'), '--seq-len must be at least 2, got 0');
  expectCleanError(cli('bench', '--device', 'cpu', '--shape', 'tiny', '--seq', '1'), '--seq must be at least 2');
  // a tokenizer.json the library cannot load is named
  const badTokenizer = path.join(tempDir('bad-tokenizer'), 'model');
  fs.cpSync(model, badTokenizer, { recursive: true });
  fs.writeFileSync(path.join(badTokenizer, 'tokenizer.json'), '{"version": "1.0"}');
  // a run folder where an adapter folder belongs says which adapter to give; a checkpoint that is not there lists those that are
  const adapterRun = path.join(tempDir('adapter-run'), 'run');
  const trained = cli('train', '--model', model, '--data', path.join(repoRoot, 'examples', 'chat-sample.jsonl'), '--out', adapterRun, '--preset', 'quick', '--max-steps', '2', '--seq-len', '64', '--json');
  assert.equal(trained.status, 0, trained.stderr);
  expectCleanError(cli('merge', '--model', model, '--adapter', adapterRun, '--out', path.join(tempDir('m'), 'merged')), `--adapter ${adapterRun} is a run folder; give its adapter, --adapter ${path.join(adapterRun, 'adapter')}`);
  expectCleanError(cli('generate', '--model', model, '--adapter', adapterRun, '--prompt', 'hi'), `, or the run itself, --run ${adapterRun}`);
  expectCleanError(cli('export', '--run', adapterRun, '--checkpoint', '7', '--out', path.join(tempDir('e'), 'a')), `${adapterRun} has no complete checkpoint at step 7 (its checkpoints: step 2)`);
  expectCleanError(cli('generate', '--model', badTokenizer, '--prompt', 'hi'), `tokenizer.json: is not a tokenizer the tokenizers library can load (Tokenizer must contain a "model" property; in ${badTokenizer})`);
  // a finished run has nothing to resume: said, exit 0, its log left alone
  const log = fs.readFileSync(path.join(adapterRun, 'events.jsonl'), 'utf8');
  const again = cli('resume', '--run', adapterRun);
  assert.equal(again.status, 0, again.stderr);
  assert.match(again.stderr, /finished already \(step 2\); nothing to resume/);
  assert.equal(fs.readFileSync(path.join(adapterRun, 'events.jsonl'), 'utf8'), log);
  // a model folder is not a run, and no new run goes into it or into any folder with files
  expectCleanError(cli('resume', '--run', model), `${model} is a model folder (its config.json describes a model), not a run folder`);
  expectCleanError(cli('export', '--run', model, '--out', path.join(tempDir('e'), 'a')), `${model} is a model folder`);
  expectCleanError(cli('train', '--model', model, '--data', data, '--out', model, '--shape', 'text'), `${model} is a model folder (its config.json describes a model); choose a new or empty folder for --out`);
  const notEmpty = tempDir('not-empty');
  fs.writeFileSync(path.join(notEmpty, 'adapter_config.json'), '{}');
  expectCleanError(cli('train', '--model', model, '--data', data, '--out', notEmpty, '--shape', 'text'), `${notEmpty} is not empty and holds no run; choose a new or empty folder for --out`);
  // a run whose data moved away says so, and how to go on
  const movingData = path.join(tempDir('moving'), 'chat.jsonl');
  fs.copyFileSync(path.join(repoRoot, 'examples', 'chat-sample.jsonl'), movingData);
  const movingRun = path.join(tempDir('moving-run'), 'run');
  assert.equal(cli('train', '--model', model, '--data', movingData, '--out', movingRun, '--preset', 'quick', '--max-steps', '1', '--seq-len', '64', '--json').status, 0);
  fs.rmSync(path.join(movingRun, 'adapter'), { recursive: true });
  fs.renameSync(movingData, movingData + '.moved');
  expectCleanError(cli('resume', '--run', movingRun), `${movingData}: the run's training data is not there any more; resume reads it from where the run started`);
});

test('a conversation file with a byte-order mark is read; output to a pipe closed early ends quietly', () => {
  const model = path.join(tempDir('bom'), 'model');
  assert.equal(cli('make-tiny-model', '--out', model).status, 0);
  const messages = path.join(tempDir('bom-messages'), 'messages.json');
  fs.writeFileSync(messages, '\uFEFF' + JSON.stringify([{ role: 'user', content: 'hi' }]));
  const r = cli('generate', '--model', model, '--messages', messages, '--max-new-tokens', '2', '--temperature', '0', '--json');
  assert.equal(r.status, 0, r.stderr);
  // a conversation the model's chat template refuses (Mistral's: roles must alternate) names its file
  const mistral = path.join(tempDir('bom-mistral'), 'model');
  assert.equal(cli('make-tiny-model', '--out', mistral, '--arch', 'mistral').status, 0);
  const twice = path.join(tempDir('twice'), 'twice.json');
  fs.writeFileSync(twice, JSON.stringify([{ role: 'user', content: 'a' }, { role: 'user', content: 'b' }]));
  expectCleanError(cli('generate', '--model', mistral, '--messages', twice, '--max-new-tokens', '2'), new RegExp(`^qlora-studio: ${twice.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: the model's chat template error: `));
  // `score ... | head -1`, the reader gone before the output comes (here at once: `true` reads nothing)
  const piped = spawnSync('bash', ['-c', `"${process.execPath}" "${cliPath}" score --model "${model}" --ids 1,2,3 | true; echo " status \${PIPESTATUS[0]}"`], { encoding: 'utf8' });
  assert.match(piped.stdout, / status 0$/m, piped.stderr);
  assert.equal(piped.stderr, '');
});

test('engine-info reports the CPU backend', () => {
  const r = cli('engine-info', '--json');
  assert.equal(r.status, 0, r.stderr);
  const info = JSON.parse(r.stdout);
  assert.ok(info.backends.includes('cpu'));
  assert.ok(info.threads >= 1);
});

test('inspect-data reports shape, invalid rows and the trained part of rendered examples', () => {
  const dir = path.join(tempDir('inspect'), 'model');
  cli('make-tiny-model', '--out', dir);
  const data = path.join(tempDir('inspect-data'), 'mixed.jsonl');
  fs.writeFileSync(data, [JSON.stringify({ prompt: 'Say hi.', completion: ' Hi!' }), '{"prompt": 3, "completion": "x"}', ''].join('\n'));
  const r = cli('inspect-data', '--data', data, '--model', dir, '--json');
  assert.equal(r.status, 2, r.stderr); // the report is complete; some rows are invalid
  const report = JSON.parse(r.stdout);
  assert.equal(report.shape, 'completion');
  assert.equal(report.validRows, 1);
  assert.deepEqual(report.errors, ['mixed.jsonl line 2: field "prompt" must be a string, got number']);
  const segments: { text: string; trained: boolean }[] = report.tokenization.examples[0].segments;
  assert.equal(segments.filter((s) => s.trained).map((s) => s.text).join(''), ' Hi!<|eot_id|>');
  const human = cli('inspect-data', '--data', data, '--model', dir);
  assert.match(human.stdout, /⟦ Hi!<\|eot_id\|>⟧/);
  assert.equal(human.status, 2);
  const valid = path.join(tempDir('inspect-valid'), 'valid.jsonl');
  fs.writeFileSync(valid, JSON.stringify({ prompt: 'Say hi.', completion: ' Hi!' }) + '\n');
  const plain = cli('inspect-data', '--data', valid);
  assert.equal(plain.status, 0);
  assert.match(plain.stdout, /token lengths and rendered examples: give --model DIR/);
  // a pretty-printed JSON array saved as .jsonl is said to be one, once
  const document = path.join(tempDir('inspect-document'), 'rows.jsonl');
  fs.writeFileSync(document, JSON.stringify([{ prompt: 'a', completion: 'b' }, { prompt: 'c', completion: 'd' }], null, 2));
  expectCleanError(cli('inspect-data', '--data', document), 'rows.jsonl: is a JSON array of 2 items, not JSON Lines (one object per line): name it .json');
  assert.equal(report.tokenization.sample, null);
  // --sample: every row is checked, the token statistics come from the first examples
  const many = path.join(tempDir('inspect-sample'), 'many.jsonl');
  fs.writeFileSync(many, Array.from({ length: 30 }, (_, i) => JSON.stringify({ prompt: `Q${i}?`, completion: ` A${i}.` })).concat(['{"prompt": 1}']).join('\n'));
  const sampled = JSON.parse(cli('inspect-data', '--data', many, '--model', dir, '--sample', '10', '--json').stdout);
  assert.deepEqual([sampled.rowCount, sampled.invalidRows, sampled.tokenization.stats.lengths.count, sampled.tokenization.sample], [31, 1, 10, { tokenized: 10, of: 30 }]);
  assert.match(cli('inspect-data', '--data', many, '--model', dir, '--sample', '10').stdout, /tokens per example \(the first 10 of 30\): min/);
  expectCleanError(cli('inspect-data', '--data', many, '--sample', '0'), '--sample must be at least 1, got 0');
});
