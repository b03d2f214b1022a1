// The CPU's vector code is built for AVX-512, AVX2 and baseline x86-64 and chosen when the addon loads, so a machine
// runs only its own CPU's version. Here the native tests of those kernels (the GEMM's register blocks, the few-row
// tiles, attention's dot products, dropout, NF4 quantization, dequantization and matrix-vector products: each
// checked bit for bit) also run under qemu-user's emulated Haswell (AVX2, no AVX-512) and Nehalem (SSE4.2) CPUs.
// Skipped where qemu-x86_64 is not installed (.ci/run installs it) or the machine is not x86-64 Linux.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { fixtures, repoRoot } from '../helpers/paths';

const exe = path.join(repoRoot, 'build', 'Release', 'qlora_native_tests');
const qemu = spawnSync('qemu-x86_64', ['--version'], { encoding: 'utf8' });
const skip =
  process.platform !== 'linux' || process.arch !== 'x64'
    ? 'x86-64 Linux only'
    : qemu.error || qemu.status !== 0
      ? 'qemu-x86_64 is not installed (Debian: apt-get install qemu-user)'
      : false;

// The native tests whose names hold these (the harness runs those containing its filter): every kernel_ test (one of
// them checks that the CPU chose the version named below), the NF4 ones, NF4 quantization's vector code against the
// decision tree, and dropout's (with two CUDA-emulator tests of the CPU's dropout and one kernel_ test again).
const filters = ['kernel_', 'model_nf4', 'nf4_vector', 'dropout'];

for (const [cpu, what, vectorCode] of [
  ['Haswell', 'AVX2 without AVX-512', 'AVX2, 8-lane vectors'],
  ['Nehalem', 'baseline x86-64 (SSE4.2)', 'x86-64 baseline (no AVX2), 8-lane vectors'],
] as const) {
  test(`the CPU kernels' native tests pass on an emulated ${cpu} (${what})`, { skip }, () => {
    assert.ok(fs.existsSync(exe), `${exe} is missing: the native build did not run`);
    for (const filter of filters) {
      const r = spawnSync('qemu-x86_64', ['-cpu', cpu, exe, fixtures, filter], {
        encoding: 'utf8',
        timeout: 600_000,
        env: { ...process.env, QLORA_EXPECT_VECTOR_CODE: vectorCode },
      });
      assert.ok(!r.error, `${cpu}, tests matching ${filter}: ${r.error?.message}`);
      const summary = (r.stdout ?? '').trim().split('\n').pop() ?? '';
      assert.equal(r.status, 0, `${cpu}, tests matching ${filter}:\n${r.stdout}\n${r.stderr}`);
      assert.match(summary, /^[1-9]\d* passed, 0 failed$/, `${cpu}, tests matching ${filter}: ${summary}`);
    }
  });
}
