// Chromium (Debian's) driven by playwright-core, and failure dumps shared by the e2e drivers.
const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require(process.env.PW_CORE || 'playwright-core');

async function launch(viewport = { width: 1400, height: 900 }) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'qlora-e2e-chromium-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, viewport,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      `--crash-dumps-dir=${path.join(profile, 'crash')}`, // not ~/.config/chromium
      '--disable-component-update', '--disable-sync'],
  });
  const page = ctx.pages()[0] || await ctx.newPage();
  const close = async () => { await ctx.close().catch(() => {}); fs.rmSync(profile, { recursive: true, force: true }); };
  return { ctx, page, close };
}

function tail(file, n = 40) {
  if (!file || !fs.existsSync(file)) return `(no ${file})`;
  // leave out the extension host's list of scanned extensions and blank lines
  return fs.readFileSync(file, 'utf8').split('\n').filter(l => l.trim() && !/^\s+file:\/\//.test(l)).slice(-n).join('\n');
}

/** The newest extension host log under a code-server user-data-dir (logs/<date>/.../remoteexthost.log). */
function extHostLog(userDataDir) {
  const found = [];
  const walk = d => { for (const e of fs.existsSync(d) ? fs.readdirSync(d, { withFileTypes: true }) : []) {
    const p = path.join(d, e.name);
    if (e.isDirectory()) walk(p); else if (/exthost\.log$/.test(e.name)) found.push(p);
  } };
  walk(path.join(userDataDir || '', 'logs'));
  found.sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs);
  return found[0];
}

function serverDump(userDataDir) {
  const csLog = process.env.E2E_CS_LOG;
  const eh = extHostLog(userDataDir);
  return `--- code-server.log tail (${csLog}) ---\n${tail(csLog, 30)}\n--- extension host log tail (${eh}) ---\n${tail(eh, 30)}`;
}

module.exports = { launch, tail, extHostLog, serverDump };
