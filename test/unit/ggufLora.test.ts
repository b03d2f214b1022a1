// PEFT adapters as GGUF LoRAs (export-gguf --lora-only): llama.cpp's names, shapes and orientation read back with
// an independent reader; llama.cpp (node-llama-cpp's prebuilt CPU binary) applying the LoRA to a GGUF of the base
// against the engine's base + adapter, and against the merged GGUF; rsLoRA through alpha; what is refused.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { readModelConfig, writeSafetensors } from '../../extension/engine';
import { exportGguf } from '../../extension/export/exportGguf';
import { permuteForInterleavedRope, writeModelGguf } from '../../extension/export/gguf/llamaGguf';
import { writeLoraGguf } from '../../extension/export/gguf/loraGguf';
import { openGguf } from '../../extension/export/llamaCpp';
import { verifyGguf } from '../../extension/export/verifyGguf';
import { readGguf } from '../helpers/ggufReader';
import { cliPath, reference, tempDir } from '../helpers/paths';
import { readSafetensors, toF32 } from '../helpers/safetensors';

const cli = { execPath: process.execPath, cliPath };
const MODELS = ['llama3-shared', 'qwen2-shared'] as const;
const GGUF_NAMES: Record<string, string> = {
  q_proj: 'attn_q', k_proj: 'attn_k', v_proj: 'attn_v', o_proj: 'attn_output', gate_proj: 'ffn_gate', up_proj: 'ffn_up', down_proj: 'ffn_down',
};

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

/** A tensor of a GGUF read back as float32 (f32 or f16). */
function ggufValues(file: string, name: string): { shape: number[]; type: number; values: Float32Array } {
  const g = readGguf(file);
  const t = g.tensors.find((x) => x.name === name);
  assert.ok(t, `${name} is in ${file}`);
  const n = t.shape.reduce((a, b) => a * b, 1);
  const bytes = g.tensorBytes(name, n * (t.type === 0 ? 4 : 2));
  const values = new Float32Array(n);
  for (let i = 0; i < n; i++) values[i] = t.type === 0 ? bytes.readFloatLE(4 * i) : halfToFloat(bytes.readUInt16LE(2 * i));
  return { shape: t.shape, type: t.type, values };
}

/** A copy of a reference adapter with its adapter_config.json changed (and optionally extra tensors). */
function adapterVariant(from: string, change: Record<string, unknown>, extra?: { name: string; shape: number[] }): string {
  const dir = path.join(tempDir('lora-variant'), 'adapter');
  fs.mkdirSync(dir);
  const cfg = JSON.parse(fs.readFileSync(path.join(reference(from), 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
  fs.writeFileSync(path.join(dir, 'adapter_config.json'), JSON.stringify({ ...cfg, ...change }));
  const weights = path.join(reference(from), 'adapter_model.safetensors');
  if (!extra) fs.copyFileSync(weights, path.join(dir, 'adapter_model.safetensors'));
  else {
    const tensors = [...readSafetensors(weights)].map(([name, t]) => ({ name, dtype: 'F32' as const, shape: t.shape, data: toF32(t) }));
    tensors.push({ name: extra.name, dtype: 'F32', shape: extra.shape, data: new Float32Array(extra.shape[0] * extra.shape[1]) });
    writeSafetensors(path.join(dir, 'adapter_model.safetensors'), tensors);
  }
  return dir;
}

for (const name of MODELS) {
  test(`${name}: the GGUF LoRA holds llama.cpp's names, shapes and orientation, B of q/k permuted only for llama`, async () => {
    const out = path.join(tempDir('lora-layout'), 'lora.gguf');
    const adapter = reference(`${name}-adapter`);
    const report = await writeLoraGguf({ adapterDir: adapter, baseModelDir: reference(name), out, type: 'f32', name: 'my-lora' });
    const c = readModelConfig(reference(name));
    const arch = name === 'qwen2-shared' ? 'qwen2' : 'llama';
    const g = readGguf(out);
    assert.equal(g.metadata.get('general.architecture'), arch);
    assert.equal(g.metadata.get('general.type'), 'adapter');
    assert.equal(g.metadata.get('adapter.type'), 'lora');
    assert.equal(g.metadata.get('adapter.lora.alpha'), 16);
    assert.equal(g.metadata.get('general.name'), 'my-lora');
    assert.equal(g.metadata.get('general.alignment'), 32);

    const peft = readSafetensors(path.join(adapter, 'adapter_model.safetensors'));
    assert.equal(report.tensors, peft.size);
    assert.equal(g.tensors.length, peft.size);
    let permuted = 0;
    for (const [peftName, t] of peft) {
      const m = /layers\.(\d+)\.\w+\.(\w+_proj)\.lora_([AB])\.weight$/.exec(peftName)!;
      const ggufName = `blk.${m[1]}.${GGUF_NAMES[m[2]]}.weight.lora_${m[3].toLowerCase()}`;
      const got = ggufValues(out, ggufName);
      // GGUF lists ne[0] first: A [r, in] -> [in, r], B [out, r] -> [r, out], the bytes unchanged (no transpose)
      assert.deepEqual(got.shape, [...t.shape].reverse(), ggufName);
      const heads = m[2] === 'q_proj' ? c.numHeads : m[2] === 'k_proj' ? c.numKvHeads : 0;
      const permute = arch === 'llama' && m[3] === 'B' && heads > 0;
      if (permute) permuted++;
      assert.deepEqual(got.values, permute ? permuteForInterleavedRope(toF32(t), heads, 8) : toF32(t), ggufName);
    }
    assert.equal(permuted, arch === 'llama' ? 2 * c.numLayers : 0, 'lora_b of attn_q and attn_k in every layer');
    assert.deepEqual(ggufValues(out, 'blk.0.attn_q.weight.lora_a').shape, [c.hiddenSize, 8]);
    assert.deepEqual(ggufValues(out, 'blk.1.ffn_down.weight.lora_b').shape, [8, c.hiddenSize]);

    const f16 = path.join(path.dirname(out), 'lora-f16.gguf');
    await writeLoraGguf({ adapterDir: adapter, baseModelDir: reference(name), out: f16, type: 'f16', name: 'my-lora' });
    const a32 = ggufValues(out, 'blk.0.attn_v.weight.lora_b'), a16 = ggufValues(f16, 'blk.0.attn_v.weight.lora_b');
    assert.equal(a16.type, 1);
    let worst = 0;
    for (let i = 0; i < a32.values.length; i++) worst = Math.max(worst, Math.abs(a16.values[i] - a32.values[i]) / Math.max(Math.abs(a32.values[i]), 2 ** -14));
    assert.ok(worst <= 2 ** -11, `f16 rounding ${worst}`);
  });
}

test('llama.cpp applies an f32 GGUF LoRA to an f32 GGUF of the base as the engine runs base + adapter (to 1e-4)', async () => {
  const dir = tempDir('lora-f32');
  for (const name of MODELS) {
    const base = path.join(dir, `${name}.gguf`), lora = path.join(dir, `${name}-lora.gguf`);
    await writeModelGguf({ modelDir: reference(name), out: base, fileType: 'f32', name });
    await writeLoraGguf({ adapterDir: reference(`${name}-adapter`), baseModelDir: reference(name), out: lora, type: 'f32', name });
    const common = { gguf: base, type: 'f32' as const, model: reference(name), adapter: reference(`${name}-adapter`), run: null };
    const v = await verifyGguf({ ...common, lora });
    assert.ok(v.verified, `${name}: ${v.problems.join('; ')}`);
    assert.ok(v.tokens >= 60 && v.maxAbsLogprobDiff < 1e-4, `${name}: ${v.tokens} tokens, max |Δ| ${v.maxAbsLogprobDiff}`);
    // the adapter matters: the base alone is far from the engine's base + adapter
    const without = await verifyGguf(common);
    assert.ok(without.maxAbsLogprobDiff > 0.5, `${name} without the LoRA: ${without.maxAbsLogprobDiff}`);
    // bf16 (8 bits of mantissa) within its tolerance
    const bf16 = path.join(dir, `${name}-lora-bf16.gguf`);
    await writeLoraGguf({ adapterDir: reference(`${name}-adapter`), baseModelDir: reference(name), out: bf16, type: 'bf16', name });
    assert.equal(readGguf(bf16).tensors[0].type, 30);
    const vb = await verifyGguf({ ...common, type: 'bf16', lora: bf16 });
    assert.ok(vb.verified && vb.maxAbsLogprobDiff <= 0.05, `${name} bf16: ${vb.maxAbsLogprobDiff}`);
  }
});

/** Max |Δ log-prob| of the next tokens, and top-1 agreement, between two llama.cpp models on the same texts. */
async function compareInLlamaCpp(a: { file: string; lora?: string }, b: { file: string }): Promise<{ maxAbs: number; top1: number; tokens: number }> {
  const ma = await openGguf(a.file, { f32Attention: true, ...(a.lora ? { lora: { file: a.lora } } : {}) });
  const mb = await openGguf(b.file, { f32Attention: true });
  try {
    const texts = ['The capital of France is Paris. It is known for the Eiffel Tower.', 'def add(a, b):\n    return a + b\n', 'A language model predicts the next token.'];
    let maxAbs = 0, agree = 0, tokens = 0;
    for (const text of texts) {
      const ids = [...(ma.bos !== null ? [ma.bos] : []), ...ma.tokenize(text)];
      const [ra, rb] = [await ma.scoreTokens(ids), await mb.scoreTokens(ids)];
      for (let t = 0; t + 1 < ids.length; t++) {
        maxAbs = Math.max(maxAbs, Math.abs(ra[t][ids[t + 1]] - rb[t][ids[t + 1]]));
        const top = (row: Float32Array) => row.reduce((best, v, i) => (v > row[best] ? i : best), 0);
        if (top(ra[t]) === top(rb[t])) agree++;
        tokens++;
      }
    }
    return { maxAbs, top1: agree / tokens, tokens };
  } finally {
    await ma.close();
    await mb.close();
  }
}

test('export-gguf --lora-only f16: verified in llama.cpp, and base + LoRA matches the merged f16 GGUF within the f16 tolerance', async () => {
  for (const name of MODELS) {
    const dir = tempDir(`lora-${name}`);
    const lora = path.join(dir, 'lora.gguf');
    // one through the CLI's child process (verify-gguf --lora), as export-gguf runs it
    const r = await exportGguf({ model: reference(name), adapter: reference(`${name}-adapter`), out: lora, type: 'f16', loraOnly: true, ...(name === 'qwen2-shared' ? { cli } : {}) });
    const v = r.verification!;
    assert.ok(v.verified, `${name}: ${v.problems.join('; ')}`);
    assert.ok(v.tokens >= 60 && v.maxAbsLogprobDiff <= 0.05 && v.promptTokensMatch, `${name}: ${JSON.stringify(v)}`);
    assert.deepEqual(fs.readdirSync(dir), ['lora.gguf'], 'the temporary base GGUF is removed');
    assert.equal(r.tensors, name === 'qwen2-shared' ? 12 : 28);
    assert.deepEqual(r.types, { f16: r.tensors });

    const merged = path.join(dir, 'merged.gguf'), base = path.join(dir, 'base.gguf');
    await exportGguf({ model: reference(name), adapter: reference(`${name}-adapter`), out: merged, type: 'f16', verify: false });
    await writeModelGguf({ modelDir: reference(name), out: base, fileType: 'f16', name });
    const d = await compareInLlamaCpp({ file: base, lora }, { file: merged });
    assert.ok(d.tokens >= 40 && d.maxAbs <= 0.05 && d.top1 === 1, `${name} LoRA vs merged: ${JSON.stringify(d)}`);
  }
});

test('rsLoRA is written exactly: adapter.lora.alpha = alpha·sqrt(r), so llama.cpp\'s alpha/r is PEFT\'s alpha/sqrt(r)', async () => {
  const adapter = adapterVariant('llama3-shared-adapter', { use_rslora: true });
  const dir = tempDir('lora-rs');
  const base = path.join(dir, 'base.gguf'), lora = path.join(dir, 'rs.gguf');
  await writeModelGguf({ modelDir: reference('llama3-shared'), out: base, fileType: 'f32', name: 'base' });
  const report = await writeLoraGguf({ adapterDir: adapter, baseModelDir: reference('llama3-shared'), out: lora, type: 'f32', name: 'rs' });
  assert.equal(report.rsLora, true);
  assert.equal(readGguf(lora).metadata.get('adapter.lora.alpha'), Math.fround(16 * Math.sqrt(8)));
  const common = { gguf: base, type: 'f32' as const, model: reference('llama3-shared'), adapter, run: null };
  const v = await verifyGguf({ ...common, lora });
  assert.ok(v.verified && v.maxAbsLogprobDiff < 1e-4, `rsLoRA: ${v.maxAbsLogprobDiff} ${v.problems.join('; ')}`);
  // the same tensors with alpha/r (rsLoRA ignored) are far off: the alpha carries the difference
  const plain = path.join(dir, 'plain.gguf');
  await writeLoraGguf({ adapterDir: reference('llama3-shared-adapter'), baseModelDir: reference('llama3-shared'), out: plain, type: 'f32', name: 'plain' });
  const off = await verifyGguf({ ...common, lora: plain });
  assert.ok(off.maxAbsLogprobDiff > 0.1, `alpha/r against the rsLoRA engine: ${off.maxAbsLogprobDiff}`);
});

test('--lora-only refuses what llama.cpp cannot represent, in one sentence, and leaves no file', async () => {
  const dir = tempDir('lora-refuse');
  const out = path.join(dir, 'x.gguf');
  const model = reference('llama3-shared');
  const lora = (adapter: string, type: 'f16' | 'q8_0' = 'f16') => exportGguf({ model, adapter, out, type, loraOnly: true });
  const merged = /cannot be written as a GGUF LoRA, which llama\.cpp applies only as alpha\/r · B·A on linear weights; a merged export \(export-gguf without --lora-only\) is the way to carry it$/;
  const refusals: [Record<string, unknown>, RegExp][] = [
    [{ modules_to_save: ['lm_head'] }, /modules_to_save \(\["lm_head"\]: whole replaced modules\)/],
    [{ use_dora: true }, /a DoRA adapter/],
    [{ bias: 'lora_only' }, /bias "lora_only"/],
    [{ target_modules: ['q_proj', 'embed_tokens'] }, /a LoRA on embed_tokens or lm_head/],
  ];
  for (const [change, what] of refusals) {
    const adapter = adapterVariant('llama3-shared-adapter', change);
    await assert.rejects(lora(adapter), (e: Error) => what.test(e.message) && merged.test(e.message) && !e.message.includes('\n'), JSON.stringify(change));
  }
  // seen in the tensors even when adapter_config.json does not say it
  const embedding = adapterVariant('llama3-shared-adapter', {}, { name: 'base_model.model.model.embed_tokens.lora_embedding_A', shape: [8, 300] });
  await assert.rejects(lora(embedding), /a LoRA on embed_tokens or lm_head \(tensor base_model\.model\.model\.embed_tokens\.lora_embedding_A\)/);
  await assert.rejects(lora(adapterVariant('llama3-shared-adapter', { rank_pattern: { q_proj: 4 } })), /rank_pattern is not supported: the engine cannot load such an adapter/);
  await assert.rejects(
    lora(reference('qwen2-shared-adapter')),
    /tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \[8, 80\], but q_proj of .*llama3-shared takes 96 inputs: the adapter was made for another base model/,
  );
  await assert.rejects(exportGguf({ model, out, type: 'f16', loraOnly: true }), /--lora-only writes an adapter/);
  await assert.rejects(lora(reference('llama3-shared-adapter'), 'q8_0'), /a GGUF LoRA is written in f32, f16, bf16, not q8_0/);
  await assert.rejects(exportGguf({ model: reference('llama-shared'), adapter: reference('llama-shared-adapter'), out, type: 'f16', loraOnly: true }), /no tokenizer\.json/);
  assert.deepEqual(fs.readdirSync(dir), []);
  // the CLI: a usage error for a quantized LoRA type, exit 1, no stack trace
  try {
    execFileSync(process.execPath, [cliPath, 'export-gguf', '--lora-only', '--type', 'q4_k_m', '--model', model, '--adapter', reference('llama3-shared-adapter'), '--out', out], { stdio: 'pipe' });
    assert.fail('expected exit 1');
  } catch (e) {
    const err = e as { status: number; stderr: Buffer };
    assert.equal(err.status, 1);
    assert.match(err.stderr.toString(), /--type must be one of f32, f16, bf16 with --lora-only, got 'q4_k_m'/);
    assert.doesNotMatch(err.stderr.toString(), /\n\s+at /);
  }
  assert.deepEqual(fs.readdirSync(dir), []);
});

test('export-gguf --lora-only on the command line: the default f16 LoRA, its JSON report', () => {
  const out = path.join(tempDir('lora-cli'), 'adapter.gguf');
  const stdout = execFileSync(process.execPath, [cliPath, 'export-gguf', '--lora-only', '--model', reference('qwen2-shared'), '--adapter', reference('qwen2-shared-adapter'), '--out', out, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] }).toString();
  const r = JSON.parse(stdout.trim().split('\n').pop()!) as { architecture: string; tensors: number; types: Record<string, number>; alpha: number; verification: { verified: boolean; maxAbsLogprobDiff: number } };
  assert.equal(r.architecture, 'qwen2');
  assert.deepEqual(r.types, { f16: 12 });
  assert.equal(r.alpha, 16);
  assert.ok(r.verification.verified && r.verification.maxAbsLogprobDiff <= 0.05, JSON.stringify(r.verification));
  assert.equal(readGguf(out).tensors[0].type, 1);
  assert.deepEqual(fs.readdirSync(path.dirname(out)), ['adapter.gguf']);
});
