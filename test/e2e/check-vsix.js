// Checks that a VSIX holds exactly what the extension ships: the bundles in dist/ (no source maps), the native
// engine, media, schemas, package.json, README and LICENSE, node-llama-cpp with this platform's CPU binary of
// llama.cpp and the packages it needs, and nothing else (no sources, tests, other platforms' or GPU binaries).
// Usage: node test/e2e/check-vsix.js <file.vsix>      (uses `unzip -l`)
const { execFileSync } = require('child_process');
const fs = require('fs');
const path = require('path');

const vsix = process.argv[2];
if (!vsix) { console.error('usage: check-vsix.js <file.vsix>'); process.exit(2); }
const root = path.resolve(__dirname, '../..');
const listing = execFileSync('unzip', ['-Z1', vsix], { encoding: 'utf8' });
const entries = listing.split('\n').map(s => s.trim()).filter(s => s && !s.endsWith('/'));

const allowed = [
  /^extension\.vsixmanifest$/, /^\[Content_Types\]\.xml$/,
  /^extension\/package\.json$/, /^extension\/readme\.md$/i, /^extension\/LICENSE(\.txt)?$/,
  /^extension\/dist\/[^/]+\.(js|css)$/,
  /^extension\/build\/Release\/qlora_native\.node$/,
  /^extension\/media\/.+/, /^extension\/schemas\/.+\.json$/,
  /^extension\/node_modules\/(?!@node-llama-cpp\/).+/,
  /^extension\/node_modules\/@node-llama-cpp\/linux-x64\/.+/,
];
const required = ['extension/package.json', 'extension/readme.md', 'extension/LICENSE.txt', 'extension/dist/extension.js',
  'extension/dist/cli.js', 'extension/build/Release/qlora_native.node', 'extension/schemas/train-config.schema.json',
  'extension/node_modules/node-llama-cpp/package.json', 'extension/node_modules/node-llama-cpp/dist/index.js',
  'extension/node_modules/@node-llama-cpp/linux-x64/package.json'];
// Whatever the build puts in dist/ as .js/.css (webview.js, webview.css once the panel lands) must ship too.
for (const f of fs.existsSync(path.join(root, 'dist')) ? fs.readdirSync(path.join(root, 'dist')) : [])
  if (/\.(js|css)$/.test(f)) required.push(`extension/dist/${f}`);
for (const f of fs.readdirSync(path.join(root, 'media'))) required.push(`extension/media/${f}`);

const lower = new Set(entries.map(e => e.toLowerCase()));
const unexpected = entries.filter(e => !allowed.some(re => re.test(e)));
const missing = required.filter(r => !lower.has(r.toLowerCase()));
console.log(`${path.basename(vsix)}: ${entries.length} files, ${(fs.statSync(vsix).size / 1024).toFixed(0)} KiB`);
for (const e of entries.filter(e => !e.startsWith('extension/node_modules/'))) console.log(`  ${e}`);
const modules = new Set(entries.filter(e => e.startsWith('extension/node_modules/')).map(e => e.split('/').slice(2, e.split('/')[2].startsWith('@') ? 4 : 3).join('/')));
console.log(`  node_modules: ${[...modules].sort().join(', ')}`);
if (unexpected.length) console.error(`unexpected in the VSIX:\n  ${unexpected.join('\n  ')}`);
if (missing.length) console.error(`missing from the VSIX:\n  ${missing.join('\n  ')}`);
process.exit(unexpected.length || missing.length ? 1 : 0);
