// Runs the mocha suite (test/e2e/suite) inside code-server's extension host, with the real vscode API.
// Usage: node host-driver.js <base URL> <workspace> <extensionDevelopmentPath> <extensionTestsPath> [user-data-dir]
// code-server must run with --vscode-option enable-smoke-test-driver (it accepts the payload below only then).
// The browser is just the window that starts the remote extension host; the tests execute in Node.
// Env: E2E_EXT_ENV (JSON object of env vars for the extension host), E2E_TIMEOUT_MS (default 15 min),
// E2E_CS_LOG (code-server log, dumped on failure), E2E_ARTIFACTS (a screenshot on timeout), DEBUG_CONSOLE=1.
const path = require('path');
const util = require('util');
const { launch, serverDump } = require('./browser');

const [base, folder, devPath, testsPath, userDataDir] = process.argv.slice(2);

(async () => {
  const authority = new URL(base).host;          // code-server's remote authority: host:port of the page
  const remote = p => `vscode-remote://${authority}${path.resolve(p)}`;
  const payload = [
    ['extensionDevelopmentPath', remote(devPath)],
    ['extensionTestsPath', remote(testsPath)],
    ['skipWelcome', 'true'],
  ];
  if (process.env.E2E_EXT_ENV) payload.push(['extensionEnvironment', process.env.E2E_EXT_ENV]);
  const url = `${base}/?folder=${encodeURIComponent(path.resolve(folder))}&payload=${encodeURIComponent(JSON.stringify(payload))}`;
  const { page, close } = await launch();
  let finish, summary = null;
  const done = new Promise(r => (finish = r));
  // The workbench calls these when it runs extension tests (the hooks @vscode/test-web uses).
  await page.exposeFunction('codeAutomationLog', (type, args) => {
    const line = util.format(...args);
    const m = /^(\d+) passed, (\d+) failed$/.exec(line.trim());
    if (m) summary = line.trim();
    if (!/ENOTFOUND|Failed to load resource/.test(line)) console.log(line);
  });
  await page.exposeFunction('codeAutomationExit', code => finish(code));
  if (process.env.DEBUG_CONSOLE) page.on('console', m => console.log('console.' + m.type() + ': ' + m.text().slice(0, 400)));
  const timeout = Number(process.env.E2E_TIMEOUT_MS || 15 * 60000);
  const timer = setTimeout(() => finish('timeout'), timeout);
  await page.goto(url);
  const code = await done;
  clearTimeout(timer);
  if (code !== 0) {
    if (code === 'timeout') console.log(`the suite did not finish within ${timeout / 1000}s`);
    if (process.env.E2E_ARTIFACTS) await page.screenshot({ path: path.join(process.env.E2E_ARTIFACTS, 'host-suite-failure.png') }).catch(() => {});
    console.log(serverDump(userDataDir));
  }
  await close();
  console.log(`extension host suite: exit code ${code}; ${summary || 'no summary (the suite did not run)'}`);
  process.exit(code === 0 ? 0 : 1);
})().catch(e => { console.error(e); process.exit(1); });
