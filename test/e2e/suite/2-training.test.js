// A finetune started through the command runs to the end, its loss falls, and its adapter exports, merges and
// exports as a GGUF that llama.cpp verifies.
const assert = require('assert');
const fs = require('fs');
const path = require('path');
const vscode = require('vscode');
const h = require('./helpers');

suite('training through the commands', () => {
  let runDir;

  test('qlora.newFinetune starts a run that finishes with an adapter', async () => {
    runDir = await h.newFinetune('e2e-run', { maxSteps: 30, lr: 0.01, batchSize: 8, seqLen: 128, checkpointEvery: 10 });
    assert.ok(path.isAbsolute(runDir), `run folder ${runDir} is not absolute`);
    const fin = await h.waitFor('a finished event in events.jsonl', () => h.finishedEvent(runDir), { timeout: 120000, runDir });
    assert.strictEqual(fin.status, 'completed', `finished with status ${fin.status}\n${h.eventsTail(runDir)}`);
    assert.strictEqual(fin.step, 30);
    assert.ok(fs.existsSync(path.join(runDir, 'adapter', 'adapter_model.safetensors')), 'no adapter/adapter_model.safetensors');
    assert.ok(fs.existsSync(path.join(runDir, 'adapter', 'adapter_config.json')), 'no adapter/adapter_config.json');
  });

  test('the loss falls', () => {
    const steps = h.readEvents(runDir).filter(e => e.kind === 'step');
    assert.strictEqual(steps.length, 30);
    const first = steps[0].loss, last = steps[steps.length - 1].loss;
    assert.ok(last < first, `last step loss ${last} is not below the first ${first}`);
  });

  test('the run registry reports the run finished', async () => {
    const info = await h.waitStatus(runDir, 'finished', 15000);
    assert.strictEqual(info.step, 30);
  });

  test('qlora.exportAdapter(runDir, outDir) writes the PEFT adapter', async () => {
    const out = path.join(h.workspaceDir(), 'exports', 'e2e-adapter');
    await vscode.commands.executeCommand('qlora.exportAdapter', runDir, out);
    await h.waitFor(`${out}/adapter_config.json`, () => fs.existsSync(path.join(out, 'adapter_config.json')), { timeout: 60000, runDir });
    assert.ok(fs.existsSync(path.join(out, 'adapter_model.safetensors')));
  });

  test("qlora.mergeAndSave(runDir, outDir, 'f32') writes a plain model", async () => {
    const out = path.join(h.workspaceDir(), 'exports', 'e2e-merged');
    await vscode.commands.executeCommand('qlora.mergeAndSave', runDir, out, 'f32');
    await h.waitFor(`${out}/config.json and model.safetensors`, () =>
      fs.existsSync(path.join(out, 'config.json')) && fs.existsSync(path.join(out, 'model.safetensors')), { timeout: 60000, runDir });
  });

  // llama.cpp (node-llama-cpp's binary, shipped in the VSIX) loads the export and reproduces the engine
  test("qlora.exportGguf(runDir, file, 'q8_0') writes a GGUF that llama.cpp verifies", async () => {
    const out = path.join(h.workspaceDir(), 'exports', 'e2e-q8_0.gguf');
    const report = await vscode.commands.executeCommand('qlora.exportGguf', runDir, out, 'q8_0');
    assert.ok(report, 'the command returned nothing (see the QLoRA Studio output channel)');
    assert.ok(fs.statSync(out).size > 0);
    const v = report.verification;
    assert.ok(v && v.verified, `not verified: ${JSON.stringify(v)}`);
    assert.ok(v.maxAbsLogprobDiff <= 0.2 && v.top1Agreement >= 0.9, JSON.stringify(v));
  });

  test("qlora.exportOllama(runDir, folder, 'q8_0') writes model.gguf and a Modelfile", async () => {
    const out = path.join(h.workspaceDir(), 'exports', 'e2e-ollama');
    const report = await vscode.commands.executeCommand('qlora.exportOllama', runDir, out, 'q8_0');
    assert.ok(report, 'the command returned nothing (see the QLoRA Studio output channel)');
    const modelfile = fs.readFileSync(path.join(out, 'Modelfile'), 'utf8');
    assert.ok(/^FROM \.\/model\.gguf$/m.test(modelfile) && /^TEMPLATE """/m.test(modelfile) && /^PARAMETER stop "<\|eot_id\|>"$/m.test(modelfile), modelfile);
    assert.ok(fs.statSync(path.join(out, 'model.gguf')).size > 0);
    assert.ok(report.gguf.verification.verified, JSON.stringify(report.gguf.verification));
    assert.deepStrictEqual(report.createCommand.slice(0, 2), ['ollama', 'create']);
  });
});
