// The extension host suite (test/e2e/suite, the same files run.sh runs in code-server) under desktop VS Code,
// downloaded by @vscode/test-electron: `npm run test:desktop` on a machine that can reach update.code.visualstudio.com.
// Runs the extension from the repo (extensionDevelopmentPath = repo root, so build first: npm run build) on a fresh
// workspace holding a tiny model and the sample dataset. Env: VSCODE_VERSION (default 'stable'), QLORA_E2E_GREP.
const cp = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { runTests } = require('@vscode/test-electron');

(async () => {
  const root = path.resolve(__dirname, '../..');
  if (!fs.existsSync(path.join(root, 'dist', 'extension.js'))) throw new Error('dist/extension.js is missing: run npm run build first');
  const ws = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-e2e-ws-'));
  fs.mkdirSync(path.join(ws, 'data'), { recursive: true });
  fs.copyFileSync(path.join(root, 'examples', 'chat-sample.jsonl'), path.join(ws, 'data', 'chat-sample.jsonl'));
  cp.execFileSync(process.execPath, [path.join(root, 'dist', 'cli.js'), 'make-tiny-model', '--out', path.join(ws, 'models', 'tiny')], { stdio: 'inherit' });
  const userData = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-e2e-ud-'));
  try {
    await runTests({
      version: process.env.VSCODE_VERSION || 'stable',
      extensionDevelopmentPath: root,
      extensionTestsPath: path.join(__dirname, 'suite', 'index.js'),
      launchArgs: [ws, '--disable-extensions', '--disable-workspace-trust', `--user-data-dir=${userData}`],
      extensionTestsEnv: { QLORA_E2E_GREP: process.env.QLORA_E2E_GREP || '' },
    });
  } finally {
    fs.rmSync(ws, { recursive: true, force: true });
    fs.rmSync(userData, { recursive: true, force: true });
  }
})().catch(err => {
  console.error(err instanceof Error ? err.message : err);
  process.exit(1);
});
