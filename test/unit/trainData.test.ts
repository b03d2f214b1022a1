// The held-out eval split: drawn with evalSeed, apart from the run's seed, so that runs differing in seed are
// evaluated on the same examples; a run whose config.json predates evalSeed keeps the split its seed drew. At most
// evalMaxExamples are held out; a config.json from before that setting holds out the whole fraction.
import assert from 'node:assert/strict';
import * as path from 'node:path';
import { test } from 'node:test';
import { formatLocation } from '../../extension/data';
import { resolveConfig, type TrainConfig } from '../../extension/trainer/config';
import { prepareData } from '../../extension/trainer/data';
import { makeTinyModel } from '../../extension/trainer/tinyModel/makeTinyModel';
import { repoRoot, tempDir } from '../helpers/paths';

test('the eval split follows evalSeed, not the run seed; an older config without evalSeed splits by its seed', async () => {
  const model = path.join(tempDir('eval-split'), 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 1 });
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const heldOut = async (overrides: Partial<TrainConfig>, dropEvalSeed = false) => {
    const config = resolveConfig({}, { model, data, seqLen: 128, ...overrides });
    if (dropEvalSeed) delete config.evalSeed;
    return (await prepareData(config)).heldOut.map((e) => formatLocation(e.at));
  };
  const seed1 = await heldOut({ seed: 1 });
  assert.equal(seed1.length, 3);
  assert.deepEqual(await heldOut({ seed: 2 }), seed1, 'another run seed, the same eval examples');
  assert.notDeepEqual(await heldOut({ seed: 1, evalSeed: 5 }), seed1, 'another evalSeed, other eval examples');
  const old1 = await heldOut({ seed: 1 }, true);
  assert.deepEqual(await heldOut({ seed: 1, evalSeed: 1 }), old1, 'without evalSeed the split is the one its seed draws');
  assert.notDeepEqual(await heldOut({ seed: 2 }, true), old1);
});

test('at most evalMaxExamples are held out (500 by default); a config.json without the setting holds out the whole fraction', async () => {
  const model = path.join(tempDir('eval-cap'), 'model');
  makeTinyModel({ out: model, arch: 'llama', seed: 1 });
  const data = path.join(repoRoot, 'examples', 'chat-sample.jsonl');
  const prepared = async (overrides: Partial<TrainConfig>, dropCap = false) => {
    const config = resolveConfig({}, { model, data, seqLen: 128, evalFraction: 0.5, ...overrides });
    if (dropCap) delete config.evalMaxExamples;
    const p = await prepareData(config);
    return { eval: p.eval.length, train: p.train.length, heldOut: p.heldOut.map((e) => formatLocation(e.at)) };
  };
  assert.equal(resolveConfig({}, { model, data }).evalMaxExamples, 500);
  assert.equal(resolveConfig({}, { model, data, preset: 'quick' }).evalMaxExamples, 500);
  const whole = await prepared({});
  assert.deepEqual([whole.eval, whole.train], [30, 30], '60 rows, half held out: under the default cap');
  const capped = await prepared({ evalMaxExamples: 4 });
  assert.deepEqual([capped.eval, capped.train, capped.heldOut.length], [4, 56, 4]);
  assert.ok(capped.heldOut.every((at) => whole.heldOut.includes(at)), 'the capped split is part of the whole one');
  assert.deepEqual(await prepared({ evalMaxExamples: 4 }, true), whole, 'an older run\'s config: no cap');
});
