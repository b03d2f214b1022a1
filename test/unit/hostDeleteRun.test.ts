// Delete Run removes only run folders directly inside the runs directory: not through a `.qlora/runs` that a cloned
// repository made a link to the folder holding it (the projects beside it would list as runs), not a linked entry,
// not a model folder, not a path from elsewhere.
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { deletionRefusal } from '../../extension/host/runs/deletion';
import { tempDir } from '../helpers/paths';

function folderWith(dir: string, config: object): string {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
  return dir;
}

test('a run folder of the workspace runs directory may be deleted; links, models and other paths may not', () => {
  const ws = tempDir('delete-ws');
  const runs = path.join(ws, '.qlora', 'runs');
  const run = folderWith(path.join(runs, 'run1'), { model: '/models/tiny' });
  assert.equal(deletionRefusal(run, runs, [ws]), null);

  const outside = folderWith(path.join(tempDir('delete-outside'), 'project'), { model: '/models/tiny' });
  fs.symlinkSync(outside, path.join(runs, 'linked'));
  assert.match(deletionRefusal(path.join(runs, 'linked'), runs, [ws]) ?? '', /is a link or not a folder/);
  assert.match(deletionRefusal(outside, runs, [ws]) ?? '', /is not a folder of the runs directory/);
  const model = folderWith(path.join(runs, 'model'), { model_type: 'llama', architectures: ['LlamaForCausalLM'] });
  assert.match(deletionRefusal(model, runs, [ws]) ?? '', /does not hold a run/);
  assert.match(deletionRefusal(path.join(runs, 'gone'), runs, [ws]) ?? '', /not there any more/);
  assert.ok(fs.existsSync(outside) && fs.existsSync(model));
});

test('a workspace whose .qlora/runs links to a folder holding the workspace deletes nothing there; a runs directory linked elsewhere may be deleted from', () => {
  const elsewhere = tempDir('delete-elsewhere');
  const victim = folderWith(path.join(elsewhere, 'important-project'), { model: 'anything' });
  const ws = path.join(elsewhere, 'evil-repo');
  fs.mkdirSync(path.join(ws, '.qlora'), { recursive: true });
  fs.symlinkSync('../..', path.join(ws, '.qlora', 'runs'));
  const runs = path.join(ws, '.qlora', 'runs');
  const listed = path.join(runs, 'important-project');
  assert.ok(fs.existsSync(path.join(listed, 'config.json')), 'the folder outside lists as a run');
  assert.match(deletionRefusal(listed, runs, [ws]) ?? '', /leads, through a link, to .*, which holds the workspace itself/);
  assert.ok(fs.existsSync(victim));
  // the runs directory linked to a bigger disk: the user's own setup, deleted from as before
  const ws2 = tempDir('delete-ws2');
  const disk = tempDir('delete-bigdisk');
  fs.mkdirSync(path.join(ws2, '.qlora'));
  fs.symlinkSync(disk, path.join(ws2, '.qlora', 'runs'));
  folderWith(path.join(disk, 'run3'), { model: 'x' });
  assert.equal(deletionRefusal(path.join(ws2, '.qlora', 'runs', 'run3'), path.join(ws2, '.qlora', 'runs'), [ws2]), null);

  // qlora.runsDirectory set by the user to a link outside any workspace: the user's own choice
  const userRuns = path.join(tempDir('delete-user'), 'runs-link');
  const realRuns = tempDir('delete-user-real');
  fs.symlinkSync(realRuns, userRuns);
  folderWith(path.join(realRuns, 'run2'), { model: 'x' });
  assert.equal(deletionRefusal(path.join(userRuns, 'run2'), userRuns, [ws]), null);
});
