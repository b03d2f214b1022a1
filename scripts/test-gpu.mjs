// npm run test:gpu: the GPU test suite. On a machine whose GPU the engine cannot use it says so, with doctor's
// sentences, and skips (exit 0); with a usable GPU it runs every part and fails on any failure.
// Parts: 1. the CUDA kernels and device memory against the CPU reference (build/Release/qlora_gpu_tests);
//        2. the trainer on the GPU (whole-model parity, a short training run, paging under a small budget,
//           telemetry), which needs the engine's CUDA training backend.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const cli = path.join(root, 'dist', 'cli.js');
const gpuTests = path.join(root, 'build', 'Release', process.platform === 'win32' ? 'qlora_gpu_tests.exe' : 'qlora_gpu_tests');

const doctor = JSON.parse(spawnSync(process.execPath, [cli, 'doctor', '--json'], { encoding: 'utf8' }).stdout);
const hardware = doctor.gpus.length > 0 && doctor.driver.found && doctor.runtimeDevices > 0;
if (!doctor.cudaCompiled || !hardware) {
  console.log('test:gpu: skipped, no usable GPU on this machine:');
  for (const p of doctor.problems) console.log(`  - ${p}`);
  process.exit(0);
}
console.log(`test:gpu on ${doctor.gpus.map((g) => `${g.name} (compute capability ${g.computeCapability})`).join(', ')}, driver ${doctor.driverVersion}`);

let failed = false;
if (!fs.existsSync(gpuTests)) {
  console.log(`FAIL ${gpuTests} is missing: the CUDA backend was compiled but not its tests (npm run build:native)`);
  failed = true;
} else {
  const r = spawnSync(gpuTests, [path.join(root, 'test', 'fixtures'), ...process.argv.slice(2)], { stdio: 'inherit' });
  if (r.status !== 0) failed = true;
}

const trainerOnGpu = doctor.device === 'cuda';
if (!trainerOnGpu) {
  console.log('FAIL the trainer cannot run on this GPU yet:');
  for (const p of doctor.problems) console.log(`  - ${p}`);
  failed = true;
} else {
  const dir = path.join(root, 'out', 'test', 'gpu');
  const files = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.endsWith('.test.js')).map((f) => path.join(dir, f)) : [];
  if (files.length === 0) {
    console.log('FAIL no trainer GPU tests were built (out/test/gpu)');
    failed = true;
  } else {
    const r = spawnSync(process.execPath, ['--test', '--test-concurrency=1', ...files], { stdio: 'inherit' });
    if (r.status !== 0) failed = true;
  }
}
process.exit(failed ? 1 : 0);
