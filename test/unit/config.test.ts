// Training configuration: presets, config files with clear errors, flags over files, the JSON schema in the repo
// kept in step with the code, and the learning-rate schedules against transformers' formulas.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { ConfigError, PRESETS, readConfigFile, resolveConfig, trainConfigSchema } from '../../extension/trainer/config';
import { learningRate, warmupWarning } from '../../extension/trainer/schedule';
import { repoRoot, tempDir } from '../helpers/paths';

test('the qlora preset is the QLoRA paper recipe', () => {
  const c = resolveConfig({}, { model: 'm', data: 'd.jsonl' });
  assert.equal(c.preset, 'qlora');
  assert.deepEqual([c.rank, c.alpha, c.dropout, c.lr, c.schedule, c.maxGradNorm, c.weightDecay], [64, 16, 0.05, 2e-4, 'constant', 0.3, 0]);
  assert.deepEqual(c.targets, ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']);
  const quick = resolveConfig({ preset: 'quick' }, { model: 'm', data: 'd', rank: 4 });
  assert.equal(quick.rank, 4, 'flags override the preset');
  assert.equal(quick.schedule, PRESETS.quick.values.schedule);
});

test('config files are validated with the file and key named', () => {
  const dir = tempDir('cfg');
  const file = path.join(dir, 'run.qlora.json');
  fs.writeFileSync(file, '\uFEFF{"rank": 16, "lr": 0.001, "targets": ["q_proj", "v_proj"]}');
  assert.deepEqual(readConfigFile(file), { rank: 16, lr: 0.001, targets: ['q_proj', 'v_proj'] });
  const bad: [string, string][] = [
    ['{"rank": 2.5}', '"rank" must be an integer'],
    ['{"lr": "fast"}', '"lr" must be a number'],
    ['{"targets": ["q_proj", "lm_head"]}', 'unknown module "lm_head"'],
    ['{"schedule": "step"}', '"schedule" must be one of constant, linear, cosine'],
    ['{"ranks": 8}', 'unknown setting "ranks"'],
    ['{"rank": 8,}', 'not valid JSON'],
    ['[1]', 'must hold a JSON object'],
    // torch's AdamW refuses betas of 1 too: the bias correction 1 - beta^t would be 0
    ['{"beta1": 1}', '"beta1" must be less than 1'],
    ['{"beta2": 1.5}', '"beta2" must be less than 1'],
  ];
  for (const [text, fragment] of bad) {
    fs.writeFileSync(file, text);
    assert.throws(() => readConfigFile(file), (e: unknown) => e instanceof ConfigError && e.message.startsWith(file) && e.message.includes(fragment), text);
  }
  assert.throws(() => resolveConfig({}, { data: 'd' }), /no model/);
  assert.throws(() => resolveConfig({}, { model: 'm', data: 'd', batchSize: 0 }), /"batchSize" must be at least 1/);
});

test('schemas/train-config.schema.json matches the code', () => {
  const committed = JSON.parse(fs.readFileSync(path.join(repoRoot, 'schemas', 'train-config.schema.json'), 'utf8'));
  assert.deepEqual(committed, trainConfigSchema(), 'regenerate it with: npx tsc -p . && node scripts/write-schema.mjs');
});

test('learning-rate schedules follow transformers (first warmup step at 0)', () => {
  const s = { lr: 1e-3, warmupSteps: 10, totalSteps: 110 };
  assert.equal(learningRate({ ...s, kind: 'constant' }, 1), 0);
  assert.equal(learningRate({ ...s, kind: 'constant' }, 6), 5e-4);
  assert.equal(learningRate({ ...s, kind: 'constant' }, 50), 1e-3);
  assert.equal(learningRate({ ...s, kind: 'linear' }, 11), 1e-3);
  assert.ok(Math.abs(learningRate({ ...s, kind: 'linear' }, 61) - 5e-4) < 1e-15);
  assert.equal(learningRate({ ...s, kind: 'cosine' }, 11), 1e-3);
  assert.ok(Math.abs(learningRate({ ...s, kind: 'cosine' }, 61) - 5e-4) < 1e-15);
  assert.ok(learningRate({ ...s, kind: 'cosine' }, 110) < 1e-6);
});

test('a warmup as long as the run or longer is a warning saying what it does', () => {
  const s = { kind: 'cosine' as const, lr: 1e-3, warmupSteps: 5 };
  assert.equal(warmupWarning({ ...s, totalSteps: 6 }), null);
  assert.equal(warmupWarning({ ...s, warmupSteps: 0, totalSteps: 1 }), null);
  assert.equal(
    warmupWarning({ ...s, totalSteps: 1 }),
    'the warmup (warmupSteps 5) is not shorter than the run (1 step): every step trains at learning rate 0, so the adapter will not change; lower warmupSteps or train more steps',
  );
  assert.equal(
    warmupWarning({ ...s, totalSteps: 3 }),
    'the warmup (warmupSteps 5) is not shorter than the run (3 steps): the learning rate rises to 4.00e-4 at the last step and never reaches its peak 0.001; lower warmupSteps or train more steps',
  );
});
