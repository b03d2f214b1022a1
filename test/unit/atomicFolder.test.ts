// Folders that readers judge complete (checkpoints, a run's adapter) are replaced and removed so that a kill at any
// file-system call leaves a complete one under the real name: a child process writes a checkpoint and SIGKILLs
// itself at its n-th rename or removal, for every n, and the checkpoint found afterwards is whole, old or new.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { latestCheckpoint, listCheckpoints, pruneCheckpoints } from '../../extension/trainer/checkpoints';
import { removeFolderAtomic, replaceFolderAtomic, restoreInterruptedReplace, writeFolderAtomic } from '../../extension/util/atomicFolder';
import { removeStaleTemps } from '../../extension/util/staleTemp';
import { tempDir } from '../helpers/paths';

const checkpointsModule = path.join(__dirname, '../../extension/trainer/checkpoints.js');

// Writes the checkpoint of `step` with every file holding `tag`, then keeps the newest one; with KILL_AT = n it
// SIGKILLs itself at its n-th fs.renameSync / fs.rmSync call, and prints how many such calls it made otherwise.
const CHILD = `
const fs = require('node:fs');
const [mod, runDir, killAt, step, tag] = process.argv.slice(1);
let calls = 0;
for (const name of ['renameSync', 'rmSync']) {
  const original = fs[name];
  fs[name] = function (...args) {
    if (++calls === Number(killAt)) process.kill(process.pid, 'SIGKILL');
    return original.apply(this, args);
  };
}
const { writeCheckpoint, pruneCheckpoints } = require(mod);
const model = {
  saveAdapter(dir) {
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(dir + '/adapter_model.safetensors', tag);
    fs.writeFileSync(dir + '/adapter_config.json', tag);
  },
  saveOptimizerState(file) { fs.writeFileSync(file, tag); },
};
writeCheckpoint(runDir, model, { step: Number(step), tag }, 'base');
pruneCheckpoints(runDir, 1);
process.stdout.write(String(calls));
`;

function runChild(runDir: string, killAt: number, step: number, tag: string): { killed: boolean; calls: number } {
  const r = spawnSync(process.execPath, ['-e', CHILD, checkpointsModule, runDir, String(killAt), String(step), tag], { encoding: 'utf8' });
  if (r.signal === 'SIGKILL') return { killed: true, calls: 0 };
  assert.equal(r.status, 0, r.stderr);
  return { killed: false, calls: Number(r.stdout) };
}

/** The tag every file of a checkpoint holds; fails when the checkpoint is incomplete or mixes two writes. */
function checkpointTag(dir: string): string {
  const files = ['adapter/adapter_model.safetensors', 'adapter/adapter_config.json', 'optimizer.safetensors'];
  const tags = new Set(files.map((f) => fs.readFileSync(path.join(dir, f), 'utf8')));
  const state = JSON.parse(fs.readFileSync(path.join(dir, 'trainer_state.json'), 'utf8')) as { tag: string };
  tags.add(state.tag);
  assert.equal(tags.size, 1, `${dir} mixes two writes: ${[...tags].join(', ')}`);
  return [...tags][0];
}

function freshRun(name: string): string {
  const runDir = path.join(tempDir(`atomic-${name}`), 'run');
  fs.mkdirSync(runDir, { recursive: true });
  assert.equal(runChild(runDir, 0, 5, 'old').killed, false);
  return runDir;
}

for (const [label, step] of [
  ['a checkpoint of the same step replaced (a stop right after a periodic checkpoint)', 5],
  ['a newer checkpoint written and the older one pruned', 10],
] as const) {
  test(`kill -9 at any rename or removal: ${label} leaves a whole checkpoint, old or new`, () => {
    const { calls } = runChild(freshRun(`count-${step}`), 0, step, 'new');
    assert.ok(calls >= 4, `the child made ${calls} renames and removals`);
    const seen = new Set<string>();
    for (let killAt = 1; killAt <= calls; killAt++) {
      const runDir = freshRun(`${step}-${killAt}`);
      assert.equal(runChild(runDir, killAt, step, 'new').killed, true, `the child was not killed at call ${killAt}`);
      const latest = latestCheckpoint(runDir);
      assert.ok(latest, `no complete checkpoint after a kill at call ${killAt}`);
      const tag = checkpointTag(latest.dir);
      seen.add(`${latest.step}:${tag}`);
      assert.ok(latest.step === 5 ? tag === 'old' || step === 5 : tag === 'new', `step ${latest.step} holds ${tag}`);
      for (const c of listCheckpoints(runDir)) checkpointTag(c.dir);
      // the next trainer's prune clears what the killed one left
      pruneCheckpoints(runDir, 1);
      assert.deepEqual(fs.readdirSync(path.join(runDir, 'checkpoints')).filter((n) => n.startsWith('.')), [], `leftovers after a kill at call ${killAt}`);
    }
    // both outcomes occur: the kill points span the whole replacement
    assert.ok(seen.size === 2, `outcomes seen: ${[...seen].join(', ')}`);
  });
}

test('replaceFolderAtomic: the new folder replaces the old one whole; a failing fill leaves the old one as it was', () => {
  const dir = tempDir('atomic-replace');
  const target = path.join(dir, 'adapter');
  replaceFolderAtomic(target, (tmp) => fs.writeFileSync(path.join(tmp, 'a'), '1'));
  replaceFolderAtomic(target, (tmp) => fs.writeFileSync(path.join(tmp, 'b'), '2'));
  assert.deepEqual(fs.readdirSync(target), ['b']);
  assert.throws(
    () =>
      replaceFolderAtomic(target, (tmp) => {
        fs.writeFileSync(path.join(tmp, 'c'), '3');
        throw new Error('disk full');
      }),
    /disk full/,
  );
  assert.deepEqual(fs.readdirSync(target), ['b']);
  assert.deepEqual(fs.readdirSync(dir), ['adapter']);
});

test('restoreInterruptedReplace puts back a folder set aside by a process that is gone, never one of a live process', () => {
  const dir = tempDir('atomic-restore');
  const target = path.join(dir, 'adapter');
  const gone = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  const deadPid = Number(gone.stdout);
  fs.mkdirSync(path.join(dir, `.adapter.old-${process.ppid}`));
  restoreInterruptedReplace(target);
  assert.equal(fs.existsSync(target), false, 'a live process is between its renames');
  fs.rmSync(path.join(dir, `.adapter.old-${process.ppid}`), { recursive: true });
  fs.mkdirSync(path.join(dir, `.adapter.old-${deadPid}`));
  fs.writeFileSync(path.join(dir, `.adapter.old-${deadPid}`, 'x'), '1');
  restoreInterruptedReplace(target);
  assert.deepEqual(fs.readdirSync(target), ['x']);
  assert.deepEqual(fs.readdirSync(dir), ['adapter']);
});

test('removeFolderAtomic removes a folder and leaves nothing beside it', () => {
  const dir = tempDir('atomic-remove');
  const target = path.join(dir, 'step-3');
  fs.mkdirSync(path.join(target, 'adapter'), { recursive: true });
  fs.writeFileSync(path.join(target, 'DONE'), '{}');
  removeFolderAtomic(target);
  removeFolderAtomic(target); // already gone: nothing to do
  assert.deepEqual(fs.readdirSync(dir), []);
});


/** The pid of a process that has ended. */
function deadPid(): number {
  return Number(spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' }).stdout);
}

test('a folder killed on its way out is never put back: removals leave .del-, which is only ever removed', () => {
  const dir = tempDir('atomic-del');
  const target = path.join(dir, 'adapter');
  const dead = deadPid();
  // a resume that removed the stop's adapter was killed after renaming it aside
  fs.mkdirSync(path.join(dir, `.adapter.del-${dead}`));
  fs.writeFileSync(path.join(dir, `.adapter.del-${dead}`, 'stale'), 'step 9');
  restoreInterruptedReplace(target);
  assert.equal(fs.existsSync(target), false, 'a removed folder came back');
  replaceFolderAtomic(target, (tmp) => fs.writeFileSync(path.join(tmp, 'fresh'), 'step 60'));
  assert.deepEqual(fs.readdirSync(target), ['fresh']);
  assert.deepEqual(fs.readdirSync(dir), ['adapter']);
});

test('pruning clears what killed writers left: set-aside and removed checkpoints, and step folders without DONE behind a complete one', () => {
  const runDir = tempDir('atomic-prune');
  const dir = path.join(runDir, 'checkpoints');
  const complete = (name: string) => {
    fs.mkdirSync(path.join(dir, name), { recursive: true });
    fs.writeFileSync(path.join(dir, name, 'DONE'), '{}');
  };
  complete('step-6');
  complete('step-9');
  const dead = deadPid();
  fs.mkdirSync(path.join(dir, 'step-3')); // no DONE, older than the newest complete one
  fs.mkdirSync(path.join(dir, `.step-3.del-${dead}`));
  fs.mkdirSync(path.join(dir, `.step-9.tmp-${dead}`));
  fs.mkdirSync(path.join(dir, `.step-6.old-${dead}`)); // step-6 exists: nothing to put back
  pruneCheckpoints(runDir, 2);
  assert.deepEqual(fs.readdirSync(dir).sort(), ['step-6', 'step-9']);
});

test('stale temporaries: the pid leads what follows the tag (a writer\'s temporary inside another\'s), and writeFolderAtomic clears its own', () => {
  const dir = tempDir('atomic-stale');
  const out = path.join(dir, 'model.gguf');
  const dead = deadPid();
  fs.mkdirSync(path.join(dir, `model.gguf.merge-tmp-${dead}.tmp-${dead}`));
  fs.writeFileSync(path.join(dir, `model.gguf.base-tmp-${dead}.gguf`), 'x');
  fs.writeFileSync(path.join(dir, `model.gguf.base-tmp-${process.ppid}.gguf`), 'a live export');
  assert.equal(removeStaleTemps(out, 'merge-tmp').length, 1);
  assert.equal(removeStaleTemps(out, 'base-tmp').length, 1);
  assert.deepEqual(fs.readdirSync(dir), [`model.gguf.base-tmp-${process.ppid}.gguf`]);
  const merged = path.join(dir, 'merged');
  fs.mkdirSync(`${merged}.tmp-${dead}`);
  writeFolderAtomic(merged, (tmp) => {
    fs.mkdirSync(path.join(tmp, 'sub'));
    fs.copyFileSync(path.join(dir, `model.gguf.base-tmp-${process.ppid}.gguf`), path.join(tmp, 'sub', 'copied'));
  });
  assert.deepEqual(fs.readdirSync(dir).sort(), ['merged', `model.gguf.base-tmp-${process.ppid}.gguf`]);
  assert.equal(fs.readFileSync(path.join(merged, 'sub', 'copied'), 'utf8'), 'a live export');
});

test('an output folder holding only what a desktop puts in every folder (.DS_Store, Thumbs.db) counts as empty', () => {
  const out = tempDir('atomic-litter');
  fs.writeFileSync(path.join(out, '.DS_Store'), 'finder');
  fs.writeFileSync(path.join(out, 'Thumbs.db'), 'explorer');
  writeFolderAtomic(out, (tmp) => fs.writeFileSync(path.join(tmp, 'model.safetensors'), 'x'));
  assert.deepEqual(fs.readdirSync(out), ['model.safetensors']);
  const busy = tempDir('atomic-busy');
  fs.writeFileSync(path.join(busy, 'notes.txt'), 'mine');
  assert.throws(() => writeFolderAtomic(busy, () => undefined), /already exists and is not empty/);
});
