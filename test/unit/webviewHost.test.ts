// The host side of the training webviews that runs without VS Code: the HTML and its Content-Security-Policy, and
// how a button press is checked against the run on show and mapped to its command.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ACTION_COMMANDS, resolveAction } from '../../extension/host/panel/actions';
import { buildWebviewHtml, contentSecurityPolicy, makeNonce } from '../../extension/host/panel/html';
import { validateWebviewMessage, type WebviewToHost } from '../../extension/protocol/webview';

const cspSource = 'https://file+.vscode-resource.vscode-cdn.net';
const opts = {
  cspSource,
  scriptUri: `${cspSource}/ext/dist/webview.js`,
  styleUri: `${cspSource}/ext/dist/webview.css`,
  nonce: makeNonce(),
  title: 'Run <a & "b">',
};

test('the CSP: nothing by default, the nonced script only, local styles/images/fonts, no unsafe-*', () => {
  const csp = contentSecurityPolicy(cspSource, opts.nonce);
  const directives = Object.fromEntries(csp.split(';').map((d) => d.trim().split(/\s+/)).map(([name, ...values]) => [name, values]));
  assert.deepEqual(directives['default-src'], ["'none'"]);
  assert.deepEqual(directives['script-src'], [`'nonce-${opts.nonce}'`]);
  assert.deepEqual(directives['style-src'], [cspSource, `'nonce-${opts.nonce}'`]);
  assert.deepEqual(directives['img-src'], [cspSource, 'data:']);
  assert.deepEqual(directives['font-src'], [cspSource]);
  assert.doesNotMatch(csp, /unsafe-eval|unsafe-inline|\*/);
});

test('the HTML carries the policy and the nonce, loads only the webview resources, escapes the title', () => {
  const html = buildWebviewHtml(opts);
  assert.ok(html.includes(`content="${contentSecurityPolicy(cspSource, opts.nonce).replace(/'/g, '&#39;')}"`));
  assert.ok(html.includes(`<script nonce="${opts.nonce}" src="${opts.scriptUri}"></script>`));
  assert.ok(html.includes(`<link rel="stylesheet" href="${opts.styleUri}"`));
  assert.ok(html.includes('<title>Run &#60;a &#38; &#34;b&#34;&#62;</title>'));
  // No inline script or style, and every URL is the webview resource origin (nothing remote).
  assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>[^<]/);
  assert.doesNotMatch(html, /<style|style="/);
  const urls = html.match(/https?:\/\/[^"'\s)]+/g) ?? [];
  assert.ok(urls.length > 0 && urls.every((u) => u.startsWith(cspSource)), urls.join(', '));
});

test('nonces are fresh and valid CSP base64', () => {
  const a = makeNonce();
  assert.match(a, /^[A-Za-z0-9+/]{22}==$/);
  assert.notEqual(a, makeNonce());
});

const action = (raw: unknown) => validateWebviewMessage(raw) as Extract<WebviewToHost, { type: 'action' }>;

test('button presses for the run on show run their command with that run', () => {
  const shown = '/ws/.qlora/runs/r1';
  for (const [name, command] of Object.entries(ACTION_COMMANDS)) {
    if (name === 'newFinetune') continue;
    assert.deepEqual(resolveAction(action({ type: 'action', action: name, runDir: shown }), shown), { command, args: [shown] });
  }
  // The same folder spelled differently still matches; the command gets the host's spelling.
  assert.deepEqual(resolveAction(action({ type: 'action', action: 'stop', runDir: '/ws/.qlora/runs/./r1/' }), shown), { command: 'qlora.stopTraining', args: [shown] });
  assert.deepEqual(ACTION_COMMANDS, {
    stop: 'qlora.stopTraining', resume: 'qlora.resumeRun', try: 'qlora.tryModel', export: 'qlora.exportAdapter', merge: 'qlora.mergeAndSave', gguf: 'qlora.exportGguf',
    openFolder: 'qlora.revealRun', newFinetune: 'qlora.newFinetune',
  });
});

test('a press for another run, or with no run on show, is refused; New Finetune needs no run', () => {
  assert.ok('rejected' in resolveAction(action({ type: 'action', action: 'stop', runDir: '/ws/runs/other' }), '/ws/runs/r1'));
  assert.ok('rejected' in resolveAction(action({ type: 'action', action: 'export', runDir: null }), '/ws/runs/r1'));
  assert.ok('rejected' in resolveAction(action({ type: 'action', action: 'resume', runDir: '/ws/runs/r1' }), undefined));
  assert.deepEqual(resolveAction(action({ type: 'action', action: 'newFinetune', runDir: null }), undefined), { command: 'qlora.newFinetune', args: [] });
});
