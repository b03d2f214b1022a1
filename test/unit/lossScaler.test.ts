// fp16's dynamic loss scaling: halve on overflow (down to the minimum), double after a run of good steps, and a
// snapshot restores the same schedule (what a checkpoint keeps).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { DEFAULT_LOSS_SCALER, LossScaler } from '../../extension/trainer/lossScaler';

test('the loss scale backs off on overflow, grows after growthInterval good steps, and resumes from a snapshot', () => {
  const s = new LossScaler();
  assert.equal(s.scale, 65536);
  s.update(true);
  assert.equal(s.scale, 32768);
  for (let i = 0; i < DEFAULT_LOSS_SCALER.growthInterval - 1; i++) s.update(false);
  assert.equal(s.scale, 32768, 'one good step short of the interval');
  const resumed = new LossScaler(DEFAULT_LOSS_SCALER, s.snapshot());
  s.update(false);
  resumed.update(false);
  assert.equal(s.scale, 65536);
  assert.deepEqual(resumed.snapshot(), s.snapshot());
  // an overflow resets the run of good steps
  s.update(false);
  s.update(true);
  assert.deepEqual(s.snapshot(), { scale: 32768, goodSteps: 0 });
});

test('the loss scale stops at its minimum, where an overflow can no longer be skipped', () => {
  const s = new LossScaler({ ...DEFAULT_LOSS_SCALER, initialScale: 4, minScale: 1 });
  assert.ok(s.canBackOff);
  s.update(true);
  s.update(true);
  assert.equal(s.scale, 1);
  assert.equal(s.canBackOff, false);
  s.update(true);
  assert.equal(s.scale, 1);
});
