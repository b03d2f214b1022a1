// Stop a long run with qlora.stopTraining, then resume it to the end with qlora.resumeRun.
const assert = require('assert');
const fs = require('fs');
const path = require('path');
const vscode = require('vscode');
const h = require('./helpers');

suite('stop and resume', () => {
  test('qlora.stopTraining stops the run, qlora.resumeRun finishes it', async () => {
    const total = 300; // stopped at ~12; long enough that the stop lands mid-run, short enough to resume to the end
    const runDir = await h.newFinetune('e2e-resume', { maxSteps: total, batchSize: 2, seqLen: 64, checkpointEvery: 10 });
    await h.waitFor('step 12', () => h.readEvents(runDir).some(e => e.kind === 'step' && e.step >= 12), { timeout: 60000, runDir });
    await vscode.commands.executeCommand('qlora.stopTraining');
    await h.waitStatus(runDir, 'stopped', 60000);
    const stoppedAt = Math.max(...h.readEvents(runDir).filter(e => e.kind === 'step').map(e => e.step));
    assert.ok(stoppedAt < total, `the run went to the end (${stoppedAt}) instead of stopping`);

    await vscode.commands.executeCommand('qlora.resumeRun', runDir);
    await h.waitFor('the resumed run to start', () => h.readEvents(runDir).some(e => e.kind === 'run-started' && e.resumedFrom !== null), { timeout: 60000, runDir });
    const fin = await h.waitFor('a completed finished event', () => h.readEvents(runDir).find(e => e.kind === 'finished' && e.status === 'completed'), { timeout: 300000, runDir });
    assert.strictEqual(fin.step, total);
    await h.waitStatus(runDir, 'finished', 15000);
    assert.ok(fs.existsSync(path.join(runDir, 'adapter', 'adapter_model.safetensors')));
    console.log(`    stopped at step ${stoppedAt}, resumed to ${fin.step}`);
  });
});
