// A run trained outside this window (`qlora-studio train` in a terminal, into the runs directory): the Runs view
// shows it running and by which process, Resume and Delete leave it alone, and Stop ends it with a checkpoint, as
// Ctrl-C in its terminal would; deleted afterwards, its open panel closes with it.
const assert = require('assert');
const cp = require('child_process');
const fs = require('fs');
const path = require('path');
const vscode = require('vscode');
const h = require('./helpers');

suite('a run trained outside this window', () => {
  test('shows as running, refuses Resume and Delete, and Stop ends it with a checkpoint', async function () {
    if (process.platform === 'win32') this.skip(); // Stop there is the second Stop's quit; SIGINT is POSIX
    const a = await h.api();
    const { model, data } = h.fixtures();
    const runDir = path.join(a.runsDirectory(), 'e2e-terminal');
    const cli = path.join(h.extension().extensionPath, 'dist', 'cli.js');
    const args = [cli, 'train', '--model', model, '--data', data, '--out', runDir, '--preset', 'quick', '--max-steps', '100000',
      '--batch-size', '2', '--seq-len', '64', '--checkpoint-every', '10', '--eval-every', '0', '--json'];
    // the extension host's own executable, as Node (what a terminal's `node` would be)
    const child = cp.spawn(process.execPath, args, { env: { ...process.env, ELECTRON_RUN_AS_NODE: '1' }, stdio: 'ignore' });
    const exited = new Promise(resolve => child.on('exit', (code, signal) => resolve({ code, signal })));
    try {
      // found by the watcher or, at the latest, by the look every 10 s
      const info = await h.waitFor('the terminal run to show as running, by its process', async () => {
        const r = await h.runInfo(runDir);
        return r && r.status === 'running' && r.trainedBy && r.trainedBy.startsWith(`process ${child.pid} `) && r.step >= 2 && r;
      }, { timeout: 90000, runDir });
      console.log(`    ${info.name}: ${info.status} at step ${info.step}, trained by ${info.trainedBy}`);

      // Resume and Delete refuse (a warning), leaving the one trainer and the folder as they are
      await vscode.commands.executeCommand('qlora.resumeRun', runDir);
      assert.strictEqual(await vscode.commands.executeCommand('qlora.deleteRun', runDir, true), undefined);
      assert.ok(fs.existsSync(path.join(runDir, 'config.json')), 'the folder is still there');
      assert.deepStrictEqual(h.trainerPids(runDir), [child.pid], 'no second trainer');

      assert.strictEqual(await vscode.commands.executeCommand('qlora.stopTraining', runDir), true);
      const end = await exited;
      assert.deepStrictEqual(end, { code: 0, signal: null }, 'stopped as by Ctrl-C: a clean exit');
      const fin = h.finishedEvent(runDir);
      assert.ok(fin && fin.status === 'stopped' && fin.step < 100000, `finished event: ${JSON.stringify(fin)}`);
      assert.ok(fs.existsSync(path.join(runDir, 'checkpoints', `step-${fin.step}`, 'DONE')), 'a checkpoint at the step it stopped');
      assert.ok(!fs.existsSync(path.join(runDir, 'trainer.lock')), 'the lock went with its trainer');
      await h.waitStatus(runDir, 'stopped', 20000);

      // now it is this window's to delete; its open panel goes with it
      await vscode.commands.executeCommand('qlora.openRun', runDir);
      const tabs = () => vscode.window.tabGroups.all.flatMap(g => g.tabs).filter(t => t.label === path.basename(runDir));
      await h.waitFor('the run panel tab', () => tabs().length === 1, { timeout: 20000, runDir });
      assert.strictEqual(await vscode.commands.executeCommand('qlora.deleteRun', runDir, true), true);
      assert.ok(!fs.existsSync(runDir));
      await h.waitFor('the run panel to close with its run', () => tabs().length === 0, { timeout: 20000 });
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
  });
});
