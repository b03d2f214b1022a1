const assert = require('assert');
const fs = require('fs');
const path = require('path');
const vscode = require('vscode');
const h = require('./helpers');

suite('QLoRA Studio in the real extension host', () => {
  test('the installed extension activates', async () => {
    const ext = h.extension();
    assert.ok(fs.existsSync(path.join(ext.extensionPath, 'dist', 'extension.js')), `no dist/extension.js in ${ext.extensionPath}`);
    assert.ok(fs.existsSync(path.join(ext.extensionPath, 'build', 'Release', 'qlora_native.node')), 'the native engine is not shipped');
    await ext.activate();
    assert.strictEqual(ext.isActive, true);
  });

  test('the workspace holds the tiny model and the sample dataset', () => {
    const { model, data } = h.fixtures();
    assert.ok(fs.existsSync(path.join(model, 'config.json')), `no model at ${model}`);
    assert.ok(fs.existsSync(data), `no dataset at ${data}`);
  });

  test('every qlora.* command of the manifest is registered', async () => {
    const declared = h.extension().packageJSON.contributes.commands.map(c => c.command);
    assert.ok(declared.length > 1);
    const registered = new Set(await vscode.commands.getCommands(true));
    const missing = declared.filter(c => !registered.has(c));
    assert.deepStrictEqual(missing, [], `declared in package.json but not registered: ${missing.join(', ')}`);
  });

  test('qlora.showEngineInfo runs the engine through the CLI', async () => {
    await vscode.commands.executeCommand('qlora.showEngineInfo');
  });

  test('qlora.checkGpuSetup reports the driver, cuBLASLt and the device in a document', async () => {
    const report = await vscode.commands.executeCommand('qlora.checkGpuSetup');
    assert.ok(report && Array.isArray(report.problems) && typeof report.cudaCompiled === 'boolean', JSON.stringify(report));
    const doc = vscode.window.activeTextEditor && vscode.window.activeTextEditor.document;
    assert.ok(doc && /# QLoRA Studio: GPU setup/.test(doc.getText()), 'the report document is not open');
    if (!report.driver.found) assert.strictEqual(report.device, 'cpu');
    await vscode.commands.executeCommand('workbench.action.closeActiveEditor');
  });

  test('qlora.selectDataset lists a dataset\'s invalid rows in the Problems panel at their line', async () => {
    const { data } = h.fixtures();
    const bad = path.join(h.workspaceDir(), 'with-invalid-rows.jsonl');
    const rows = fs.readFileSync(data, 'utf8').split('\n').filter(l => l.trim() !== '').slice(0, 3);
    fs.writeFileSync(bad, [...rows, '{"messages": 5}', ''].join('\n'));
    // inspect-data exits with 2 for a dataset with invalid rows; the host reads its report all the same
    assert.strictEqual(await vscode.commands.executeCommand('qlora.selectDataset', bad), bad);
    const problems = vscode.languages.getDiagnostics(vscode.Uri.file(bad));
    assert.deepStrictEqual(problems.map(d => [d.range.start.line, d.severity]), [[3, vscode.DiagnosticSeverity.Error]], JSON.stringify(problems.map(d => d.message)));
    await vscode.commands.executeCommand('workbench.action.closeAllEditors');
    fs.rmSync(bad);
  });

  test('the extension exports the run registry (runs.list())', async () => {
    const api = await h.api();
    assert.ok(Array.isArray(api.runs.list()));
  });
});
