// What a folder given as a run or as a new run's --out holds, and whether the host sees a checkpoint to resume from.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { hasCompleteCheckpoint } from '../../extension/host/runs/runState';
import { assertNewRunFolder, assertRunFolder, folderKind } from '../../extension/trainer/runFolder';
import { tempDir } from '../helpers/paths';

test('folder kinds: a run names its model; a model has model_type; a config.json that does not parse is a damaged run\'s', () => {
  const dir = tempDir('run-folder');
  const make = (name: string, files: Record<string, string>) => {
    const d = path.join(dir, name);
    fs.mkdirSync(d);
    for (const [f, text] of Object.entries(files)) fs.writeFileSync(path.join(d, f), text);
    return d;
  };
  const run = make('run', { 'config.json': '{"model": "/m", "data": "/d.jsonl"}', 'events.jsonl': '' });
  const model = make('model', { 'config.json': '{"model_type": "llama"}' });
  const damaged = make('damaged', { 'config.json': '{bad' });
  const noModel = make('no-model', { 'config.json': '{}' });
  const eventsOnly = make('events-only', { 'events.jsonl': '' });
  const locked = make('locked', { 'trainer.lock': '{}', '.hidden': '' });
  assert.deepEqual(
    [run, model, damaged, noModel, eventsOnly, locked, path.join(dir, 'missing')].map(folderKind),
    ['run', 'model', 'run', 'other', 'other', 'empty', 'missing'],
  );
  assert.doesNotThrow(() => assertRunFolder(run));
  assert.throws(() => assertRunFolder(noModel), /no-model is not a run folder \(no config.json naming the model it trains\)/);
  assert.doesNotThrow(() => assertNewRunFolder(locked)); // what a trainer itself wrote before it checks again
  assert.throws(() => assertNewRunFolder(eventsOnly), /is not empty and holds no run/);
});

test('the host sees a checkpoint a trainer killed while replacing it left set aside, as resume does', () => {
  const runDir = tempDir('run-aside');
  const dir = path.join(runDir, 'checkpoints');
  const dead = Number(spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' }).stdout);
  fs.mkdirSync(path.join(dir, `.step-5.old-${process.ppid}`), { recursive: true });
  fs.writeFileSync(path.join(dir, `.step-5.old-${process.ppid}`, 'DONE'), '{}');
  assert.equal(hasCompleteCheckpoint(runDir), false, 'a live trainer is between its renames');
  fs.renameSync(path.join(dir, `.step-5.old-${process.ppid}`), path.join(dir, `.step-5.old-${dead}`));
  assert.equal(hasCompleteCheckpoint(runDir), true);
});
