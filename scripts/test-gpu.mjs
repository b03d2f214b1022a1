// npm run test:gpu: the GPU test suite. On a machine whose GPU the engine cannot use it says so, with doctor's
// sentences, and skips (exit 0, or 1 with REQUIRE_GPU=1); with a usable GPU it runs every part and fails on any
// failure.
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
  // REQUIRE_GPU=1 (the GPU check on a lent machine): a skip there is a failure, not a pass
  process.exit(process.env.REQUIRE_GPU === '1' ? 1 : 0);
}
console.log(`test:gpu on ${doctor.gpus.map((g) => `${g.name} (compute capability ${g.computeCapability})`).join(', ')}, driver ${doctor.driverVersion}`);

// Each part: passed, failed, or not run (and why); the suite passes only when every part ran and passed.
const parts = [];
if (!fs.existsSync(gpuTests)) {
  parts.push(['kernels and device memory', 'not run', `${gpuTests} is missing (npm run build:native builds it with the CUDA backend)`]);
} else {
  const r = spawnSync(gpuTests, [path.join(root, 'test', 'fixtures'), ...process.argv.slice(2)], { stdio: 'inherit' });
  parts.push(['kernels and device memory', r.status === 0 ? 'passed' : 'failed', r.status === 0 ? '' : `exit status ${r.status ?? r.signal}`]);
}
if (doctor.device !== 'cuda') {
  parts.push(['the trainer on the GPU', 'not run', doctor.problems.join(' ')]);
} else {
  const dir = path.join(root, 'out', 'test', 'gpu');
  const files = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.endsWith('.test.js')).map((f) => path.join(dir, f)) : [];
  if (files.length === 0) {
    parts.push(['the trainer on the GPU', 'not run', 'no trainer GPU tests were built (out/test/gpu)']);
  } else {
    const r = spawnSync(process.execPath, ['--test', '--test-concurrency=1', ...files], { stdio: 'inherit' });
    parts.push(['the trainer on the GPU', r.status === 0 ? 'passed' : 'failed', '']);
  }
}
console.log('\ntest:gpu summary:');
for (const [name, result, why] of parts) console.log(`  ${name}: ${result}${why ? ` (${why})` : ''}`);
process.exit(parts.every(([, result]) => result === 'passed') ? 0 : 1);
