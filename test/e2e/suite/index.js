// Mocha entry point run inside a real extension host: by code-server (test/e2e/host-driver.js, payload
// extensionTestsPath) and by desktop VS Code (@vscode/test-electron, test/e2e/desktop.js). Plain JS: no build step.
// mocha comes from $QLORA_E2E_MOCHA (set by run.sh through the payload's extensionEnvironment), else the project's
// node_modules (npm run test:desktop), else the e2e tools folder.
const fs = require('fs');
const path = require('path');

function loadMocha() {
  const tries = [process.env.QLORA_E2E_MOCHA, 'mocha', path.resolve(__dirname, '../../../.vscode-e2e/tools/node_modules/mocha')];
  for (const t of tries.filter(Boolean)) {
    try { return require(t); } catch (e) { /* next */ }
  }
  throw new Error(`mocha not found (tried ${tries.filter(Boolean).join(', ')})`);
}

exports.run = function run() {
  const Mocha = loadMocha();
  const mocha = new Mocha({ ui: 'tdd', color: false, timeout: 180000, grep: process.env.QLORA_E2E_GREP || undefined });
  for (const f of fs.readdirSync(__dirname).filter(f => f.endsWith('.test.js')).sort()) mocha.addFile(path.join(__dirname, f));
  return new Promise((resolve, reject) => {
    const runner = mocha.run(failures => {
      console.log(`${runner.stats.passes} passed, ${runner.stats.failures} failed`);
      failures ? reject(new Error(`${failures} tests failed`)) : resolve();
    });
  });
};
