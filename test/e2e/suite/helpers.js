// Shared helpers of the in-host suite: the extension, its API, the test workspace, polling with state dumps.
const assert = require('assert');
const cp = require('child_process');
const fs = require('fs');
const path = require('path');
const vscode = require('vscode');

const EXTENSION_ID = 'qlora-studio.qlora-studio';
const sleep = ms => new Promise(r => setTimeout(r, ms));

function workspaceDir() {
  const folders = vscode.workspace.workspaceFolders || [];
  assert.ok(folders.length >= 1, 'no workspace folder open');
  return folders[0].uri.fsPath;
}

const fixtures = () => ({
  model: path.join(workspaceDir(), 'models', 'tiny'),
  data: path.join(workspaceDir(), 'data', 'chat-sample.jsonl'),
});

function extension() {
  const ext = vscode.extensions.getExtension(EXTENSION_ID);
  assert.ok(ext, `extension ${EXTENSION_ID} is not installed`);
  return ext;
}

async function api() {
  const ext = extension();
  const exports = ext.isActive ? ext.exports : await ext.activate();
  assert.ok(exports && exports.runs && typeof exports.runs.list === 'function',
    `the extension's exports have no runs.list() (exports: ${exports ? Object.keys(exports).join(', ') : exports})`);
  return exports;
}

/** A command's result as a run folder path (the command may return a string, a Uri or a run info object). */
function asRunDir(r) {
  if (!r) return r;
  if (typeof r === 'string') return r;
  if (r instanceof vscode.Uri || r.fsPath) return r.fsPath;
  if (r.runDir) return asRunDir(r.runDir);
  return r;
}

function readEvents(runDir) {
  const file = path.join(runDir, 'events.jsonl');
  if (!fs.existsSync(file)) return [];
  const out = [];
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    try { out.push(JSON.parse(line)); } catch (e) { /* a line being written */ }
  }
  return out;
}

function eventsTail(runDir, n = 8) {
  const file = path.join(runDir, 'events.jsonl');
  if (!fs.existsSync(file)) return `(no ${file})`;
  return fs.readFileSync(file, 'utf8').trim().split('\n').slice(-n).map(l => l.slice(0, 300)).join('\n');
}

const samePath = (a, b) => a && b && path.resolve(a) === path.resolve(b);

async function runInfo(runDir) {
  const a = await api();
  return a.runs.list().find(r => samePath(r.runDir, runDir));
}

function stateDump(runDir) {
  let list = '(api unavailable)';
  try {
    const ext = vscode.extensions.getExtension(EXTENSION_ID);
    if (ext && ext.isActive) list = JSON.stringify(ext.exports.runs.list().map(r => ({ name: r.name, status: r.status, step: r.step, error: r.error })));
  } catch (e) { list = `(runs.list() threw ${e.message})`; }
  let ps = '';
  try { ps = cp.execFileSync('ps', ['-eo', 'pid,ppid,etime,args'], { encoding: 'utf8' }).split('\n').filter(l => /cli\.js/.test(l)).join('\n'); } catch (e) { /* */ }
  return `runs.list(): ${list}\ntrainer processes:\n${ps || '(none)'}\n` + (runDir ? `events.jsonl tail of ${runDir}:\n${eventsTail(runDir)}` : '');
}

/** Polls fn until it returns a truthy value; on timeout fails with what was awaited and the state. */
async function waitFor(what, fn, { timeout = 120000, interval = 250, runDir } = {}) {
  const t0 = Date.now();
  let last, lastErr;
  while (Date.now() - t0 < timeout) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) { lastErr = e; }
    await sleep(interval);
  }
  throw new Error(`timed out after ${timeout / 1000}s waiting for ${what}` +
    (lastErr ? ` (last error: ${lastErr.message})` : '') + `\n${stateDump(runDir)}`);
}

const finishedEvent = runDir => readEvents(runDir).find(e => e.kind === 'finished');

async function waitStatus(runDir, status, timeout = 120000) {
  return waitFor(`run ${path.basename(runDir)} to be ${status}`, async () => {
    const info = await runInfo(runDir);
    return info && info.status === status && info;
  }, { timeout, runDir });
}

/** Trainer processes of a run: `node .../dist/cli.js train|resume ...` naming the run folder (or its name). */
function trainerPids(runDir) {
  const out = cp.execFileSync('ps', ['-eo', 'pid,args'], { encoding: 'utf8' });
  return out.split('\n').map(l => l.trim()).filter(l => /cli\.js\s+(train|resume)\b/.test(l) &&
    (l.includes(runDir) || l.includes(path.basename(runDir)))).map(l => Number(l.split(/\s+/)[0]));
}

/** Starts a finetune through the command and returns its run folder. */
async function newFinetune(runName, overrides) {
  const { model, data } = fixtures();
  const r = await vscode.commands.executeCommand('qlora.newFinetune', { model, data, preset: 'quick', runName, overrides });
  const runDir = asRunDir(r);
  assert.ok(typeof runDir === 'string' && runDir.length, `qlora.newFinetune returned ${JSON.stringify(r)}, not a run folder`);
  return runDir;
}

module.exports = { EXTENSION_ID, sleep, workspaceDir, fixtures, extension, api, asRunDir, readEvents, eventsTail, runInfo,
  stateDump, waitFor, waitStatus, finishedEvent, trainerPids, newFinetune, samePath };
