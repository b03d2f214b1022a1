#!/usr/bin/env node
// Builds .device/refcheck/: tiny models, adapters trained and exported by us, our merged models (f32), token-id
// sequences and our `score --json` for each (base, with adapter, merged), written to expected.json, for
// scripts/device/reference_check.py to compare with transformers + PEFT on the GPU machine (which has no Node).
// Also quantizes test/fixtures/reference/llama-shared with our `quantize --dtype float32` and compares the file
// with the reference bnb-4bit (double quant) checkpoint here, byte for byte; the result goes into expected.json.
//
// Run from anywhere after `npm ci` (which builds dist/cli.js and the native addon):
//   node scripts/device/prepare-reference-check.mjs [--out .device/refcheck]
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Tokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = path.join(ROOT, 'dist', 'cli.js');
const FIXTURES = path.join(ROOT, 'test', 'fixtures', 'reference');
const DATA = path.join(ROOT, 'examples', 'chat-sample.jsonl');

const argOut = process.argv.indexOf('--out');
const OUT = path.resolve(argOut > 0 ? process.argv[argOut + 1] : path.join(ROOT, '.device', 'refcheck'));
const TOLERANCE = 1e-3;
const ARCHS = ['llama', 'qwen2'];
const SENTENCES = [
  'The capital of France is Paris.',
  'Hello world! How are you today?',
  'QLoRA trains low-rank adapters on a 4-bit base model.',
];

function log(msg) {
  process.stdout.write(msg + '\n');
}

/** Runs our CLI; returns stdout parsed as JSON when json is true. */
function cli(args, json = true) {
  let stdout;
  try {
    stdout = execFileSync(process.execPath, [CLI, ...args], { cwd: ROOT, encoding: 'utf8', maxBuffer: 64 << 20 });
  } catch (err) {
    throw new Error(`qlora-studio ${args.join(' ')} failed (status ${err.status}):\n${err.stderr ?? ''}${err.stdout ?? ''}`);
  }
  return json ? JSON.parse(stdout.trim().split('\n').pop()) : stdout;
}

function rel(p) {
  return path.relative(OUT, p).split(path.sep).join('/');
}

function copyDir(src, dst) {
  fs.cpSync(src, dst, { recursive: true });
}

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

/** Our scores of `ids` with model (+ adapter). */
function scoreOf(model, ids, adapter) {
  const args = ['score', '--model', model, '--ids', ids.join(','), '--json'];
  if (adapter) args.push('--adapter', adapter);
  const r = cli(args);
  return { loss: r.loss, next_token_logprobs: r.next_token_logprobs };
}

/** Deterministic pseudo-random ids in [lo, hi) (a small LCG, so the list is the same on every run). */
function fixedIds(n, lo, hi, seed) {
  let s = seed >>> 0;
  const ids = [];
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    ids.push(lo + (s % (hi - lo)));
  }
  return ids;
}

function tokenText(v) {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof v.content === 'string') return v.content;
  return null;
}

// ---------------------------------------------------------------- safetensors header, bnb-4bit layout comparison

function readSafetensors(file) {
  const buf = fs.readFileSync(file);
  const n = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'));
  const base = 8 + n;
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const [a, b] = info.data_offsets;
    tensors[name] = { dtype: info.dtype, shape: info.shape, data: buf.subarray(base + a, base + b) };
  }
  return { metadata: header.__metadata__ ?? null, tensors };
}

function deepEqual(a, b) {
  return JSON.stringify(a) === JSON.stringify(b);
}

function compareBnb4(oursDir, refDir) {
  const ours = readSafetensors(path.join(oursDir, 'model.safetensors')).tensors;
  const ref = readSafetensors(path.join(refDir, 'model.safetensors')).tensors;
  const oursNames = Object.keys(ours).sort();
  const refNames = Object.keys(ref).sort();
  const result = {
    ours: rel(oursDir),
    reference: rel(refDir),
    tensor_count: { ours: oursNames.length, reference: refNames.length },
    missing_in_ours: refNames.filter((n) => !(n in ours)),
    extra_in_ours: oursNames.filter((n) => !(n in ref)),
    dtype_or_shape_mismatch: [],
    quant_state_json_mismatch: [],
    quant_state_bytes_identical: true,
    data_mismatch: [],
    tensors_byte_identical: 0,
    config_quantization_config_equal: null,
  };
  for (const name of refNames) {
    const o = ours[name];
    const r = ref[name];
    if (!o) continue;
    if (o.dtype !== r.dtype || !deepEqual(o.shape, r.shape)) {
      result.dtype_or_shape_mismatch.push({ name, ours: [o.dtype, o.shape], reference: [r.dtype, r.shape] });
      continue;
    }
    if (name.includes('.quant_state.')) {
      const oj = JSON.parse(o.data.toString('utf8'));
      const rj = JSON.parse(r.data.toString('utf8'));
      // nested_offset is a float computed from the data: compare it numerically, the rest exactly.
      const { nested_offset: oo, ...orest } = oj;
      const { nested_offset: ro, ...rrest } = rj;
      const offsetOk = oo === ro || (typeof oo === 'number' && typeof ro === 'number' && Math.abs(oo - ro) <= 1e-7 * Math.max(1, Math.abs(ro)));
      if (!deepEqual(sortKeys(orest), sortKeys(rrest)) || !offsetOk) result.quant_state_json_mismatch.push({ name, ours: oj, reference: rj });
      if (!o.data.equals(r.data)) result.quant_state_bytes_identical = false;
    }
    if (o.data.equals(r.data)) {
      result.tensors_byte_identical++;
    } else {
      let differing = 0;
      const len = Math.min(o.data.length, r.data.length);
      for (let i = 0; i < len; i++) if (o.data[i] !== r.data[i]) differing++;
      result.data_mismatch.push({ name, dtype: r.dtype, bytes: r.data.length, differing_bytes: differing + Math.abs(o.data.length - r.data.length) });
    }
  }
  const oc = readJson(path.join(oursDir, 'config.json')).quantization_config ?? null;
  const rc = readJson(path.join(refDir, 'config.json')).quantization_config ?? null;
  result.quantization_config = { ours: oc, reference: rc };
  // The keys that matter for loading; the reference may carry more (defaults written by transformers).
  const keys = ['quant_method', 'load_in_4bit', 'bnb_4bit_quant_type', 'bnb_4bit_use_double_quant', 'bnb_4bit_compute_dtype'];
  result.config_quantization_config_equal = !!oc && !!rc && keys.every((k) => deepEqual(oc[k], rc[k]));
  result.layout_ok =
    result.missing_in_ours.length === 0 &&
    result.extra_in_ours.length === 0 &&
    result.dtype_or_shape_mismatch.length === 0 &&
    result.quant_state_json_mismatch.length === 0 &&
    result.config_quantization_config_equal;
  result.byte_identical = result.layout_ok && result.data_mismatch.length === 0;
  return result;
}

function sortKeys(o) {
  return Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : 1)));
}

// ---------------------------------------------------------------- main

function main() {
  if (!fs.existsSync(CLI)) throw new Error(`${CLI} is missing: run npm ci (or npm run build) first`);
  fs.rmSync(OUT, { recursive: true, force: true });
  fs.mkdirSync(OUT, { recursive: true });
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'refcheck-'));
  const rows = fs
    .readFileSync(DATA, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => JSON.parse(l));
  const chatMessages = rows.find((r) => r.messages.some((m) => m.role === 'system'))?.messages ?? rows[0].messages;

  const expected = {
    generated_by: 'scripts/device/prepare-reference-check.mjs',
    created: new Date().toISOString(),
    engine: cli(['engine-info', '--json']),
    tolerance: TOLERANCE,
    note: 'paths are relative to this folder; next_token_logprobs[i] = log p(ids[i+1] | ids[0..i]); loss = mean over them',
    cases: [],
    bnb4_layout: null,
  };

  try {
    for (const arch of ARCHS) {
      const dir = path.join(OUT, arch);
      const model = path.join(dir, 'model');
      const adapter = path.join(dir, 'adapter');
      const merged = path.join(dir, 'merged-f32');
      fs.mkdirSync(dir, { recursive: true });
      const made = cli(['make-tiny-model', '--out', model, '--arch', arch, '--seed', '7', '--json']);
      const run = path.join(scratch, `${arch}-run`);
      const trained = cli([
        'train', '--model', model, '--data', DATA, '--out', run, '--preset', 'quick', '--max-steps', '30', '--lr', '0.01',
        '--batch-size', '8', '--seq-len', '128', '--rank', '8', '--json',
      ]);
      if (trained.status !== 'completed') throw new Error(`${arch}: training did not complete: ${JSON.stringify(trained)}`);
      cli(['export', '--run', run, '--out', adapter, '--json']);
      cli(['merge', '--model', model, '--adapter', adapter, '--out', merged, '--dtype', 'f32', '--json']);

      // Tokenizer: plain sentences (with and without special tokens) and one rendered chat.
      const tokJson = readJson(path.join(model, 'tokenizer.json'));
      const tokCfg = readJson(path.join(model, 'tokenizer_config.json'));
      const tokenizer = new Tokenizer(tokJson, tokCfg);
      const samples = SENTENCES.map((text) => ({
        text,
        ids_with_special: tokenizer.encode(text, { add_special_tokens: true }).ids,
        ids_no_special: tokenizer.encode(text, { add_special_tokens: false }).ids,
      }));
      const specials = {};
      for (const k of ['bos_token', 'eos_token', 'pad_token', 'unk_token']) {
        const t = tokenText(tokCfg[k]);
        if (t !== null) specials[k] = t;
      }
      const rendered = new Template(tokCfg.chat_template).render({ messages: chatMessages, add_generation_prompt: false, ...specials });
      const chatIds = tokenizer.encode(rendered, { add_special_tokens: false }).ids;

      const vocab = made.vocabSize;
      const sequences = [
        { name: 'fixed-short', ids: [1, 5, 200, 7, 31, 99, 4, 250, 13, 2].map((i) => i % vocab) },
        { name: 'fixed-long', ids: fixedIds(48, 0, vocab, 12345) },
        { name: 'sentence-0', ids: samples[0].ids_with_special },
        { name: 'sentence-1', ids: samples[1].ids_with_special },
        { name: 'chat', ids: chatIds },
      ].filter((s) => s.ids.length >= 2);
      for (const s of sequences) {
        s.base = scoreOf(model, s.ids);
        s.adapter = scoreOf(model, s.ids, adapter);
        s.merged = scoreOf(merged, s.ids);
      }
      expected.cases.push({
        name: `tiny-${arch}`,
        arch,
        model: rel(model),
        adapter: rel(adapter),
        merged: rel(merged),
        train: { finalLoss: trained.finalLoss, steps: trained.step },
        tokenizer: { samples, chat: { messages: chatMessages, rendered, ids: chatIds } },
        sequences,
      });
      log(`${arch}: model ${made.parameters} parameters, vocab ${vocab}; trained 30 steps (final loss ${trained.finalLoss.toFixed(4)}); ${sequences.length} sequences scored`);
    }

    // The shared reference model and its PEFT adapter (written by transformers + PEFT), scored by us.
    const shared = path.join(OUT, 'llama-shared');
    const sharedAdapter = path.join(OUT, 'llama-shared-adapter');
    const sharedMerged = path.join(OUT, 'llama-shared-merged-f32');
    copyDir(path.join(FIXTURES, 'llama-shared'), shared);
    copyDir(path.join(FIXTURES, 'llama-shared-adapter'), sharedAdapter);
    cli(['merge', '--model', shared, '--adapter', sharedAdapter, '--out', sharedMerged, '--dtype', 'f32', '--json']);
    const sharedVocab = readJson(path.join(shared, 'config.json')).vocab_size;
    const refIds = readJson(path.join(FIXTURES, 'llama-shared.ref.json')).ids;
    const sharedSeqs = [
      { name: 'reference-ids', ids: refIds },
      { name: 'fixed-long', ids: fixedIds(40, 0, sharedVocab, 777) },
    ];
    for (const s of sharedSeqs) {
      s.base = scoreOf(shared, s.ids);
      s.adapter = scoreOf(shared, s.ids, sharedAdapter);
      s.merged = scoreOf(sharedMerged, s.ids);
    }
    expected.cases.push({
      name: 'llama-shared',
      arch: 'llama',
      model: rel(shared),
      adapter: rel(sharedAdapter),
      merged: rel(sharedMerged),
      tokenizer: null,
      sequences: sharedSeqs,
    });
    log(`llama-shared: ${sharedSeqs.length} sequences scored (base, adapter, our merge)`);

    // bnb-4bit: ours vs the reference checkpoint (bitsandbytes wrote it; the GPU machine has no bitsandbytes).
    const oursQ = path.join(OUT, 'ours-bnb4-dq');
    const refQ = path.join(OUT, 'llama-shared-bnb4-dq');
    cli(['quantize', '--model', shared, '--out', oursQ, '--dtype', 'float32', '--json']);
    copyDir(path.join(FIXTURES, 'llama-shared-bnb4-dq'), refQ);
    expected.bnb4_layout = compareBnb4(oursQ, refQ);
    const q = expected.bnb4_layout;
    log(
      `bnb4-dq vs reference: layout ${q.layout_ok ? 'OK' : 'MISMATCH'}, ${q.tensors_byte_identical}/${q.tensor_count.reference} tensors byte-identical` +
        (q.data_mismatch.length ? `; differing: ${q.data_mismatch.map((m) => `${m.name} (${m.differing_bytes}/${m.bytes} bytes)`).join(', ')}` : ''),
    );
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }

  fs.writeFileSync(path.join(OUT, 'expected.json'), JSON.stringify(expected, null, 1) + '\n');
  let bytes = 0;
  const walk = (d) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else bytes += fs.statSync(p).size;
    }
  };
  walk(OUT);
  log(`wrote ${path.relative(ROOT, OUT)}/ (${(bytes / 1048576).toFixed(2)} MB); expected.json has ${expected.cases.length} cases`);
  if (!expected.bnb4_layout.layout_ok) {
    log('WARNING: our bnb-4bit layout differs from the reference checkpoint (see expected.json bnb4_layout)');
    process.exitCode = 2;
  }
}

main();
