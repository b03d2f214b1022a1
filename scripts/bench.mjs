// npm run bench: figures to compare across changes on the same machine, not tests.
// 1. CPU tokens/s of a QLoRA training step (forward + backward + AdamW) on a small model made here.
// 2. GGUF export (export-gguf) of a model at a realistic width made here (hidden 2048 as TinyLlama and Llama 3.2 1B,
//    a 32000-token vocabulary, 4 layers, bf16): wall time, throughput and the export process's peak memory, which
//    shows the streaming (about one tensor plus the runtime, not the model).
// 3. Generation (the chat panel's and `generate`'s engine path): prefill and KV-cached decode tokens/s with the adapter
//    applied, on the small model and on the TinyLlama-width model of part 2, NF4 base as QLoRA trains it.
// QLORA_BENCH_TRAIN=0, QLORA_BENCH_GGUF=0 or QLORA_BENCH_GENERATE=0 skips a part.
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const require = createRequire(import.meta.url);
const addon = require(path.join(root, 'build', 'Release', 'qlora_native.node'));
const cli = path.join(root, 'dist', 'cli.js');
const enabled = (name) => process.env[name] !== '0';
const MiB = 1048576;

function benchTraining() {
  const dir = path.join(os.tmpdir(), 'qlora-bench-small');
  if (!fs.existsSync(path.join(dir, 'model.safetensors')))
    execFileSync(process.execPath, [cli, 'make-tiny-model', '--out', dir, '--size', 'small', '--seed', '1']);

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
  console.log(`engine peak memory: ${(mem.totalPeak / MiB).toFixed(1)} MiB`);
}

// TinyLlama-1.1B's widths with 4 of its 22 layers: 0.31 B parameters, 0.6 GB of bf16.
const WIDE = { hidden: 2048, intermediate: 5632, layers: 4, heads: 32, kvHeads: 4, headDim: 64, vocab: 32000 };

function wideTensorShapes(s) {
  const shapes = [['model.embed_tokens.weight', [s.vocab, s.hidden]]];
  for (let l = 0; l < s.layers; l++) {
    const p = `model.layers.${l}.`;
    shapes.push(
      [p + 'input_layernorm.weight', [s.hidden]],
      [p + 'self_attn.q_proj.weight', [s.heads * s.headDim, s.hidden]],
      [p + 'self_attn.k_proj.weight', [s.kvHeads * s.headDim, s.hidden]],
      [p + 'self_attn.v_proj.weight', [s.kvHeads * s.headDim, s.hidden]],
      [p + 'self_attn.o_proj.weight', [s.hidden, s.heads * s.headDim]],
      [p + 'post_attention_layernorm.weight', [s.hidden]],
      [p + 'mlp.gate_proj.weight', [s.intermediate, s.hidden]],
      [p + 'mlp.up_proj.weight', [s.intermediate, s.hidden]],
      [p + 'mlp.down_proj.weight', [s.hidden, s.intermediate]],
    );
  }
  shapes.push(['model.norm.weight', [s.hidden]], ['lm_head.weight', [s.vocab, s.hidden]]);
  return shapes;
}

/**
 * The wide model, made once into the temp folder: the tiny model's tokenizer and chat template (export-gguf pads the
 * vocabulary to vocab_size), its config.json at the wide shape, and random bf16 weights, std 1/sqrt(fan_in) (the
 * tensors are windows of one pool of normals: the export's cost does not depend on the values, and the model is made
 * in seconds). Like a trained model, and unlike a plain random one, it makes confident predictions, so the llama.cpp
 * check of a q4_k_m export has clear top tokens to compare: the embeddings have unit RMS and the attention and MLP
 * outputs a tenth of it (the residual stream stays near the token's embedding), and lm_head is the embedding scaled by
 * 1/(4 sqrt(hidden)), so each position predicts its own token with p about 0.7 (a logit of about sqrt(hidden) / 4
 * against N(0, 1/16) for the other tokens).
 */
function wideModel() {
  const dir = path.join(os.tmpdir(), `qlora-bench-gguf-${WIDE.hidden}x${WIDE.layers}-v3`);
  const weights = path.join(dir, 'model.safetensors');
  if (fs.existsSync(weights)) return dir;
  const t0 = process.hrtime.bigint();
  execFileSync(process.execPath, [cli, 'make-tiny-model', '--out', dir, '--size', 'tiny', '--seed', '1']);
  const configFile = path.join(dir, 'config.json');
  const config = JSON.parse(fs.readFileSync(configFile, 'utf8'));
  Object.assign(config, {
    vocab_size: WIDE.vocab, hidden_size: WIDE.hidden, intermediate_size: WIDE.intermediate, num_hidden_layers: WIDE.layers,
    num_attention_heads: WIDE.heads, num_key_value_heads: WIDE.kvHeads, head_dim: WIDE.headDim,
  });
  fs.writeFileSync(configFile, JSON.stringify(config, null, 2) + '\n');
  fs.rmSync(weights);
  const pool = addon.randomNormal(1, 1 << 26); // more than the embedding, so no two of its rows are equal
  let offset = 0;
  let embedding;
  const tensors = wideTensorShapes(WIDE).map(([name, shape]) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = new Float32Array(n);
    if (name === 'lm_head.weight') {
      const scale = 1 / (4 * Math.sqrt(WIDE.hidden));
      for (let i = 0; i < n; i++) data[i] = scale * embedding[i];
    } else if (shape.length === 1) data.fill(1);
    else {
      const std = name === 'model.embed_tokens.weight' ? 1 : (/o_proj|down_proj/.test(name) ? 0.1 : 1) / Math.sqrt(shape[1]);
      for (let i = 0; i < n; i++) data[i] = std * pool[(offset + i) & (pool.length - 1)];
      offset += 7919 * 1031; // a different window for each tensor
    }
    if (name === 'model.embed_tokens.weight') embedding = data;
    return { name, dtype: 'BF16', shape, data };
  });
  addon.writeSafetensors(weights, tensors, { format: 'pt' });
  console.log(`made ${dir} in ${(Number(process.hrtime.bigint() - t0) / 1e9).toFixed(1)} s`);
  return dir;
}

// Appended to a log by each Node process of the CLI as it exits: its peak resident memory. On Linux that is VmHWM of
// /proc/self/status, this program's own high-water mark (getrusage's ru_maxrss would carry over the resident size of
// the parent it was forked from, here the bench itself); elsewhere process.resourceUsage().maxRSS.
const MAXRSS_HOOK = `process.on('exit', () => {
  const fs = require('node:fs');
  let kib = process.resourceUsage().maxRSS;
  try { kib = Number(/VmHWM:\\s*(\\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1]); } catch {}
  fs.appendFileSync(process.env.QLORA_BENCH_MAXRSS_LOG, JSON.stringify({ argv: process.argv.slice(2), kib }) + '\\n');
});
`;

/** Runs the CLI with MAXRSS_HOOK preloaded (through NODE_OPTIONS, so also in the llama.cpp check it runs as a child). */
function timedCli(args, work) {
  const hook = path.join(work, 'maxrss-hook.cjs');
  const log = path.join(work, 'maxrss.log');
  fs.writeFileSync(hook, MAXRSS_HOOK);
  fs.rmSync(log, { force: true });
  const env = { ...process.env, QLORA_BENCH_MAXRSS_LOG: log, NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --require ${JSON.stringify(hook)}`.trim() };
  const t0 = process.hrtime.bigint();
  const r = spawnSync(process.execPath, [cli, ...args], { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`qlora-studio ${args.join(' ')} failed (${r.status ?? r.signal}):\n${r.stderr}`);
  const processes = fs.readFileSync(log, 'utf8').trim().split('\n').map((l) => JSON.parse(l));
  const peak = (verb) => {
    const p = processes.find((x) => x.argv[0] === verb);
    return p === undefined ? null : (p.kib * 1024) / MiB;
  };
  return { seconds, report: JSON.parse(r.stdout), exportPeakMiB: peak('export-gguf'), verifyPeakMiB: peak('verify-gguf') };
}

function benchGgufExport() {
  const model = wideModel();
  const shapes = wideTensorShapes(WIDE);
  const params = shapes.reduce((s, [, shape]) => s + shape.reduce((a, b) => a * b, 1), 0);
  const largest = Math.max(...shapes.map(([, shape]) => shape.reduce((a, b) => a * b, 1)));
  const sourceBytes = fs.statSync(path.join(model, 'model.safetensors')).size;
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-bench-gguf-out-'));
  console.log(`\nGGUF export: ${WIDE.layers} layers, hidden ${WIDE.hidden}, intermediate ${WIDE.intermediate}, vocab ${WIDE.vocab}: ` +
    `${(params / 1e6).toFixed(0)} M parameters, ${(sourceBytes / MiB).toFixed(0)} MiB of bf16 safetensors ` +
    `(${((params * 4) / MiB).toFixed(0)} MiB as f32; largest tensor ${((largest * 4) / MiB).toFixed(0)} MiB as f32)`);
  const rows = [];
  try {
    for (const [type, verify] of [['f16', false], ['q8_0', false], ['q4_k_m', false], ['q4_k_m', true]]) {
      const out = path.join(work, `model-${type}.gguf`);
      const r = timedCli(['export-gguf', '--model', model, '--out', out, '--type', type, '--json', ...(verify ? [] : ['--no-verify'])], work);
      const gguf = fs.statSync(out).size;
      fs.rmSync(out);
      const v = r.report.verification;
      const check = v === null ? '' : `${v.verified ? 'verified' : 'NOT verified'}: mean KL ${v.meanKl.toFixed(4)}, top-1 ${(100 * v.confidentTop1Agreement).toFixed(0)}% at ${v.confidentPositions}/${v.tokens} confident positions`;
      rows.push([type + (verify ? ' + check' : ''), (gguf / MiB).toFixed(0), r.seconds.toFixed(1), (sourceBytes / 1e6 / r.seconds).toFixed(0),
        (params / 1e6 / r.seconds).toFixed(0), r.exportPeakMiB?.toFixed(0) ?? '?', r.verifyPeakMiB?.toFixed(0) ?? '', check]);
    }
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
  const head = ['type', 'GGUF MiB', 'wall s', 'bf16 MB/s', 'Mparam/s', 'export peak RSS MiB', 'check peak RSS MiB', 'llama.cpp check'];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells) => cells.map((c, i) => (i === 0 || i === cells.length - 1 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd();
  console.log(line(head));
  for (const r of rows) console.log(line(r));
  console.log(`(wall time of the whole CLI process, start-up included; ${os.cpus().length} CPU cores; peak RSS: each process's high-water mark.`);
  console.log(` The export streams: its peak is the largest tensor's bf16 bytes, f32 values and encoding plus the runtime, whatever the`);
  console.log(` layer count; the check maps the whole model into the engine (bf16, read in place) and loads the GGUF in llama.cpp.)`);
}

/** Prefill of a `prompt`-token prompt, then `decode` tokens one at a time (greedy: argmax of the logits). */
function generationFigures(dir, prompt, decode) {
  const model = new addon.Model(dir, { quantize: true });
  try {
    const config = model.config();
    model.createLora({ rank: 16, alpha: 16, seed: 1 });
    const ids = new Int32Array(prompt).map((_, i) => (i * 7919 + 13) % config.vocabSize);
    const argmax = (x) => x.reduce((best, v, i) => (v > x[best] ? i : best), 0);
    const run = () => {
      const id = model.generationStart({ loraScale: 1 });
      const t0 = process.hrtime.bigint();
      let logits = model.generationAppend(id, ids, {});
      const t1 = process.hrtime.bigint();
      for (let i = 0; i < decode; i++) logits = model.generationAppend(id, Int32Array.of(argmax(logits)), {});
      const t2 = process.hrtime.bigint();
      model.generationEnd(id);
      return { prefill: prompt / (Number(t1 - t0) / 1e9), decode: decode / (Number(t2 - t1) / 1e9) };
    };
    run(); // warm-up
    const r = run();
    const params = config.numLayers * (config.hiddenSize * (2 * config.numHeads * config.headDim + 2 * config.numKvHeads * config.headDim) + 3 * config.hiddenSize * config.intermediateSize);
    console.log(`  ${config.numLayers} layers, hidden ${config.hiddenSize}, vocab ${config.vocabSize} (${(params / 1e6).toFixed(0)} M linear parameters): ` +
      `prefill ${r.prefill.toFixed(0)} tokens/s (${prompt}-token prompt), decode ${r.decode.toFixed(1)} tokens/s (${decode} tokens)`);
  } finally {
    model.dispose();
  }
}

function benchGeneration() {
  const small = path.join(os.tmpdir(), 'qlora-bench-small');
  if (!fs.existsSync(path.join(small, 'model.safetensors')))
    execFileSync(process.execPath, [cli, 'make-tiny-model', '--out', small, '--size', 'small', '--seed', '1']);
  console.log(`\nGeneration on the CPU (${addon.engineInfo().threads} threads), NF4 base, LoRA r=16 applied, batch 1:`);
  generationFigures(small, 256, 64);
  generationFigures(wideModel(), 256, 32);
  console.log('  (decode reads the NF4 codes in place, dequantizing inside the matrix-vector product; prefill dequantizes a layer at a');
  console.log('  time for the GEMM. The 1B/8B shapes are GPU figures.)');
}

if (enabled('QLORA_BENCH_TRAIN')) benchTraining();
if (enabled('QLORA_BENCH_GGUF')) benchGgufExport();
if (enabled('QLORA_BENCH_GENERATE')) benchGeneration();
