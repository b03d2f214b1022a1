// Samples during training and the chat panel, from the extension host: a run with sample prompts records their
// answers; QLoRA: Try Model opens a chat panel whose server process holds the model, and closing the panel ends it.
const assert = require('assert');
const path = require('path');
const vscode = require('vscode');
const h = require('./helpers');

const alive = pid => { try { process.kill(pid, 0); return true; } catch { return false; } };

suite('samples and the chat panel', () => {
  let runDir;

  test('a run with sample prompts answers them at the start and at every eval', async () => {
    runDir = await h.newFinetune('e2e-samples', { maxSteps: 40, lr: 0.01, batchSize: 8, seqLen: 128, checkpointEvery: 20, evalEvery: 20, samplePrompts: ['What is the capital of France?'], sampleMaxTokens: 24 });
    const fin = await h.waitFor('a finished event', () => h.finishedEvent(runDir), { timeout: 120000, runDir });
    assert.strictEqual(fin.status, 'completed', h.eventsTail(runDir));
    const samples = h.readEvents(runDir).filter(e => e.kind === 'sample');
    assert.deepStrictEqual(samples.map(s => s.step), [0, 20, 40]);
    assert.ok(samples.every(s => s.prompt === 'What is the capital of France?' && typeof s.text === 'string'));
  });

  test('qlora.tryModel opens a chat panel with a server process; closing the panel ends it', async () => {
    await h.waitStatus(runDir, 'finished', 15000);
    const title = await vscode.commands.executeCommand('qlora.tryModel', runDir);
    assert.strictEqual(title, `Try ${path.basename(runDir)}`);
    const a = await h.api();
    const chat = await h.waitFor('an open chat panel', () => a.chats().find(c => c.title === title), { timeout: 15000 });
    assert.ok(chat.pid && alive(chat.pid), 'no chat server process');
    // the same run again reveals the same panel
    await vscode.commands.executeCommand('qlora.tryModel', runDir);
    assert.strictEqual(a.chats().length, 1);
    await vscode.commands.executeCommand('workbench.action.closeActiveEditor');
    await h.waitFor('the chat panel to close', () => a.chats().length === 0, { timeout: 15000 });
    await h.waitFor(`chat server ${chat.pid} to exit`, () => !alive(chat.pid), { timeout: 15000 });
  });
});
