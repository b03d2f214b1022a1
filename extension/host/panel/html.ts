// The training webviews' HTML: an empty body the bundled app (dist/webview.js) fills in, under a strict
// Content-Security-Policy. Pure (no vscode import) so the policy is unit-tested.
//
// CSP decisions:
// - default-src 'none': nothing not listed below; no connect-src, frame-src or remote origins at all.
// - script-src 'nonce-…' only: the one bundled script; no 'unsafe-eval' (chart.js and lit need none).
// - style-src ${cspSource} 'nonce-…', no 'unsafe-inline': the app's CSS is a file (dist/webview.css). chart.js sizes
//   its canvas through the CSSOM (canvas.style.width = …), which CSP does not govern (only style attributes and
//   <style> elements are), and the vscode-elements components style their shadow roots with constructable
//   stylesheets (adoptedStyleSheets), which CSP does not govern either. Checked in headless Chromium under this
//   exact policy: no securitypolicyviolation events while the charts and components draw.
// - img-src ${cspSource} data: and font-src ${cspSource}: local images/fonts only (no codicon font is loaded now).
import { randomBytes } from 'node:crypto';

export interface HtmlOptions {
  /** webview.cspSource: the origin VS Code serves local resources from. */
  cspSource: string;
  /** webview.asWebviewUri(dist/webview.js), as a string. */
  scriptUri: string;
  /** webview.asWebviewUri(dist/webview.css), as a string. */
  styleUri: string;
  nonce: string;
  title: string;
}

/** A fresh nonce per HTML build: 128 random bits, base64 (a valid CSP nonce-source). */
export function makeNonce(): string {
  return randomBytes(16).toString('base64');
}

export function contentSecurityPolicy(cspSource: string, nonce: string): string {
  return [
    "default-src 'none'",
    `script-src 'nonce-${nonce}'`,
    `style-src ${cspSource} 'nonce-${nonce}'`,
    `img-src ${cspSource} data:`,
    `font-src ${cspSource}`,
  ].join('; ');
}

export const escapeHtml = (s: string) => s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

export function buildWebviewHtml(o: HtmlOptions): string {
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${escapeHtml(contentSecurityPolicy(o.cspSource, o.nonce))}">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<link rel="stylesheet" href="${escapeHtml(o.styleUri)}" nonce="${escapeHtml(o.nonce)}">
<title>${escapeHtml(o.title)}</title>
</head>
<body>
<script nonce="${escapeHtml(o.nonce)}" src="${escapeHtml(o.scriptUri)}"></script>
</body>
</html>
`;
}
