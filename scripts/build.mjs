// Bundles the TypeScript entry points with esbuild: the extension (for VS Code), the CLI / trainer process, and the
// training webview (browser IIFE dist/webview.js plus the CSS it imports as dist/webview.css), and the chat webview
// (dist/chat.js, dist/chat.css).
import { build } from 'esbuild';

const common = { bundle: true, platform: 'node', target: 'node20', sourcemap: true, logLevel: 'warning' };

await Promise.all([
  build({ ...common, entryPoints: ['extension/host/extension.ts'], outfile: 'dist/extension.js', format: 'cjs', external: ['vscode'] }),
  build({ ...common, entryPoints: ['extension/trainer/cli.ts'], outfile: 'dist/cli.js', format: 'cjs', banner: { js: '#!/usr/bin/env node' } }),
  // VS Code 1.90 webviews run Chromium 122; minified since the webview loads it on every show.
  build({ entryPoints: ['webview/main.ts'], outfile: 'dist/webview.js', bundle: true, platform: 'browser', format: 'iife', target: 'chrome120', minify: true, sourcemap: true, logLevel: 'warning' }),
  // the chat panel's app (dist/chat.js + dist/chat.css)
  build({ entryPoints: ['webview/chat/main.ts'], outfile: 'dist/chat.js', bundle: true, platform: 'browser', format: 'iife', target: 'chrome120', minify: true, sourcemap: true, logLevel: 'warning' }),
]);
