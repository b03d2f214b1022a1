// A trainer killed from outside: the extension host survives and the run is reported failed.
const assert = require('assert');
const vscode = require('vscode');
const h = require('./helpers');

suite('a trainer killed from outside', () => {
  test('the host stays alive and the run is reported failed', async () => {
    const runDir = await h.newFinetune('e2e-kill', { maxSteps: 5000, batchSize: 2, seqLen: 64, checkpointEvery: 50 });
    await h.waitFor('a first step event', () => h.readEvents(runDir).some(e => e.kind === 'step'), { timeout: 60000, runDir });
    const pids = await h.waitFor('the trainer process in ps', () => { const p = h.trainerPids(runDir); return p.length && p; }, { timeout: 10000, runDir });
    for (const pid of pids) process.kill(pid, 'SIGKILL');
    const info = await h.waitStatus(runDir, 'failed', 30000);
    assert.ok(!h.readEvents(runDir).some(e => e.kind === 'finished' && e.status === 'completed'), 'a killed run claims completion');
    // the extension host is alive and still serves commands
    await vscode.commands.executeCommand('qlora.showEngineInfo');
    assert.ok((await vscode.commands.getCommands(true)).includes('qlora.newFinetune'));
    console.log(`    killed pid ${pids.join(',')}; reported: ${info.status}${info.error ? ` (${info.error})` : ''}`);
  });
});
