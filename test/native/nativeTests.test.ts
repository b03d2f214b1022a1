// Runs the native test executable (fp64 finite differences of every kernel, NF4 vectors bit for bit, malformed
// files, whole-model gradients) and fails with its output when any native test fails.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { fixtures, repoRoot } from '../helpers/paths';

test('native engine tests pass', () => {
  const exe = path.join(repoRoot, 'build', 'Release', process.platform === 'win32' ? 'qlora_native_tests.exe' : 'qlora_native_tests');
  assert.ok(fs.existsSync(exe), `${exe} is missing: the native build did not run`);
  const r = spawnSync(exe, [fixtures], { encoding: 'utf8' });
  const summary = r.stdout.trim().split('\n').pop();
  assert.equal(r.status, 0, `native tests failed:\n${r.stdout}\n${r.stderr}`);
  assert.match(summary ?? '', /^\d+ passed, 0 failed$/);
});
