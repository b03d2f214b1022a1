// doctor: on a machine without an NVIDIA driver (this one, CI's) it says so in sentences and picks the CPU; its JSON
// has the fields the issue names; a cuBLASLt folder given by the user is searched first, and a file there that does
// not load is named with the loader's reason. The extension's document shows the same.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'node:test';
import { engineInfo } from '../../extension/engine';
import { doctorMarkdown, type DoctorSummary } from '../../extension/host/doctorView';
import { cliPath, tempDir } from '../helpers/paths';

const doctor = (...args: string[]) => execFileSync(process.execPath, [cliPath, 'doctor', ...args], { encoding: 'utf8' });

test('doctor --json: cudaCompiled, gpus, cublasLt, nvml, problems; without a driver the CPU and one sentence per problem', () => {
  const r = JSON.parse(doctor('--json')) as DoctorSummary & { nvml: { found: boolean; path: string | null } };
  assert.equal(r.cudaCompiled, engineInfo().cudaCompiled);
  for (const key of ['gpus', 'problems'] as const) assert.ok(Array.isArray(r[key]), key);
  for (const lib of [r.cublasLt, r.nvml]) assert.ok(typeof lib.found === 'boolean' && (lib.found ? typeof lib.path === 'string' : lib.path === null));
  if (!r.driver.found) {
    assert.equal(r.device, 'cpu');
    assert.deepEqual(r.gpus, []);
    assert.match(r.problems[r.cudaCompiled ? 0 : 1], /^No NVIDIA driver was found \(libcuda\.so\.1 could not be loaded: .*\); install the NVIDIA driver, 580 or newer/);
    for (const p of r.problems) assert.ok(!p.includes('\n') && p.endsWith('.'), p);
  }
  // the CPU kernels' version: on this machine (and CI's) an x86-64 one, chosen by what the CPU has
  const vectorCode = (r as DoctorSummary & { cpu: { name: string; vectorCode: string } }).cpu.vectorCode;
  assert.equal(vectorCode, engineInfo().cpuVectorCode);
  if (process.arch === 'x64' && process.platform === 'linux')
    assert.match(vectorCode, /^(AVX-512|AVX2|x86-64 baseline \(no AVX2\)), (16-lane vectors|8-lane vectors|tiles filled a value at a time \(built without GCC's shuffles\))$/);
  const text = doctor();
  assert.match(text, /^platform: /);
  assert.ok(text.split('\n')[1].startsWith('CPU: ') && text.split('\n')[1].endsWith(`; vector code: ${vectorCode}`), text);
  assert.match(text, r.device === 'cuda' ? /training would run on: the GPU/ : /training would run on: the CPU/);
});

test('a cuBLASLt folder from qlora.cudaLibraryPath is searched first; a file there that does not load is named', () => {
  const dir = tempDir('doctor-lib');
  fs.writeFileSync(path.join(dir, 'libcublasLt.so.13'), 'not a library');
  const r = JSON.parse(doctor('--json', '--cuda-lib-dir', dir)) as DoctorSummary;
  assert.equal(r.cublasLt.found, false);
  assert.equal(r.cublasLt.tried[0], path.join(dir, 'libcublasLt.so.13'));
  assert.match(r.cublasLt.error ?? '', /libcublasLt\.so\.13/);
  const problem = r.problems.find((p) => p.startsWith('cuBLASLt'))!;
  assert.ok(problem.includes(dir), problem);
  // every folder looked in, in order, the given one first (the problem's sentence names only the first few)
  const searched = (r.cublasLt as { searched: string[] }).searched;
  assert.equal(searched[0], dir);
  assert.ok(doctor('--cuda-lib-dir', dir).includes(`; searched ${dir}, `));
  // a folder that is not there is said to be missing, not searched in silence
  const missing = path.join(dir, 'no-such-folder');
  const m = JSON.parse(doctor('--json', '--cuda-lib-dir', missing)) as DoctorSummary;
  assert.ok(m.problems.some((p) => p === `The CUDA library folder given (${missing}) does not exist or is not a folder; correct qlora.cudaLibraryPath (or --cuda-lib-dir), or leave it empty to search the usual places.`), m.problems.join('\n'));
});

test('the Check GPU Setup document: the device, each library, the GPUs and what to do', () => {
  const base: DoctorSummary = {
    platform: 'linux x64', engine: '0.1.0', cudaCompiled: true, cudaRuntimeVersion: '13.0',
    driver: { found: true, path: 'libcuda.so.1', error: null }, driverVersion: '580.65.06', driverCudaVersion: '13.0',
    nvml: { found: true, path: 'libnvidia-ml.so.1', error: null },
    cublasLt: { found: false, path: null, error: 'libcublasLt.so.13: cannot open shared object file', tried: ['libcublasLt.so.13'] },
    gpus: [{ index: 0, name: 'NVIDIA H100 80GB HBM3', memoryTotal: 80 * 1024 ** 3, memoryFree: 79 * 1024 ** 3, computeCapability: '9.0' }],
    computeDtype: 'bf16', device: 'cpu', problems: ['cuBLASLt (libcublasLt.so.13) was not found in a | b: install it.'],
    cpu: { name: 'AMD EPYC 9R14 (2 threads)', vectorCode: 'AVX-512, 16-lane vectors' },
  };
  const md = doctorMarkdown(base);
  assert.match(md, /\| CPU \| AMD EPYC 9R14 \(2 threads\); vector code: AVX-512, 16-lane vectors \|/);
  assert.match(md, /Training runs on the \*\*CPU\*\*/);
  // a table with real column headers (an empty header row reads as two blank columns)
  assert.match(md, /\n\| Component \| Status \|\n\|---\|---\|\n\| Platform \| linux x64 \|/);
  assert.match(md, /\| GPU 0 \| NVIDIA H100 80GB HBM3, compute capability 9\.0, 80\.0 GiB \(79\.0 GiB free\) \|/);
  assert.match(md, /\| cuBLASLt \| \*\*not found\*\* \(libcublasLt\.so\.13: cannot open shared object file\) \|/);
  assert.match(md, /## What to do\n\n- cuBLASLt .* a \\\| b: install it\./);
  const listed = doctorMarkdown({ ...JSON.parse(JSON.stringify(base)), cublasLt: { ...base.cublasLt, searched: ['/opt/cuda', ''] } });
  assert.match(listed, /Folders searched for cuBLASLt, in order:\n\n- `\/opt\/cuda`\n- the loader's search path/);
});
