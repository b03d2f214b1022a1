#!/usr/bin/env bash
# There (the GPU machine, from the repository root, with what prepare-gpu-check.sh made carried along): every GPU
# check of issues 2, 3 and 6 in one go, each step's log in $OUT and one line per step in $OUT/summary.txt:
#   reference_check  transformers + PEFT against our scores, adapters and merges (issues 2, 3)
#   test_gpu         the GPU suite: CUDA kernels and the whole model against the CPU, then the trainer on the GPU
#   sanitize_attention  compute-sanitizer's racecheck and memcheck on the tensor-core attention's GPU test
#   turing_path      the tensor-core attention and fp16 compute of a build from compute_75 PTX alone (Turing's code)
#   bench_*          bench --shape 8b --batch 1 --seq 2048 (bf16, its per-kernel profile, f32), 1b at 4 x 2048,
#                    8b under a budget that pages, and 8b with its block inputs offloaded
#   bench_*_generate bench --generate on 8b and 1b: prefill and decode tokens/s at batch 1 with LoRA applied (issue 9;
#                    8b's with a third run's per-token device time by kernel)
#   ncu_attention    Nsight Compute's speed-of-light and occupancy of the tensor-core attention kernels (1b, 4 x 2048)
#   hf_reference     transformers + PEFT LoRA on the same shape, for the speed ratio (last: it takes longest)
# then scripts/device/bench-summary.mjs: one line per JSON benchmark (tokens/s, MFU, the measured peak beside the
# estimate's) and the offloaded 8B run beside the kept one.
# Steps run in that order whatever the earlier ones gave; SKIP=name,name leaves steps out. Run it as
#   bash scripts/device/gpu_check.sh                       (about 9 minutes at most)
#   SKIP=reference_check,test_gpu bash scripts/device/gpu_check.sh   (a second call: the benchmarks)
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
mkdir -p /tmp/qlora-node && xz -dc .device/node.xz > /tmp/qlora-node/node && chmod +x /tmp/qlora-node/node
export PATH=/tmp/qlora-node:$PATH
export PYTHONUNBUFFERED=1
# cuBLASLt: the engine searches the CUDA folders and Python's nvidia wheels itself; name the first one found too
lib=$(find /usr/local /usr/lib /opt $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null) \
  -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
[ -n "$lib" ] && export QLORA_CUDA_LIB_DIR=$(dirname "$lib")
{ nvidia-smi; echo "QLORA_CUDA_LIB_DIR=${QLORA_CUDA_LIB_DIR:-}"; node --version; } > "$OUT/machine.txt" 2>&1
node dist/cli.js doctor --json > "$OUT/doctor.json" 2> "$OUT/doctor.stderr"

# Steps share DEADLINE seconds (default 540, inside the run tool's 600): each gets its own limit or what is left.
DEADLINE=${DEADLINE:-540}
step() {
  local name=$1 limit=$2; shift 2
  case ",${SKIP:-}," in *",$name,"*) echo "$name: skipped" >> "$OUT/summary.txt"; return;; esac
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then echo "$name: not run (out of time)" >> "$OUT/summary.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}
step reference_check 120 python3 scripts/device/reference_check.py .device/refcheck --device cpu,cuda --out "$OUT"
step test_gpu 300 env REQUIRE_GPU=1 node scripts/test-gpu.mjs
# the warp-level kernels (mma.sync, shuffles) have no emulator for races between real warps: the sanitizer looks
step sanitize_attention 120 bash -c 'compute-sanitizer --tool racecheck --error-exitcode 3 build/Release/qlora_gpu_tests test/fixtures tensor_core && compute-sanitizer --tool memcheck --error-exitcode 3 build/Release/qlora_gpu_tests test/fixtures tensor_core'
# Turing's path on this GPU: the test program built from compute_75 PTX alone (fp16 attention as m16n8k8 products)
step turing_path 120 bash -c '.device/qlora_gpu_tests_ptx75 test/fixtures tensor_core && .device/qlora_gpu_tests_ptx75 test/fixtures fp16'
step bench_8b_bf16 150 node dist/cli.js bench --device cuda --shape 8b --batch 1 --seq 2048 --steps 3 --warmup 1 --json
step bench_8b_profile 120 node dist/cli.js bench --device cuda --shape 8b --batch 1 --seq 2048 --steps 2 --warmup 1 --profile
step bench_1b_bf16 120 node dist/cli.js bench --device cuda --shape 1b --batch 4 --seq 2048 --steps 3 --warmup 1 --json
# issue 9's figures: prefill of 512 tokens and 128 decoded one by one, LoRA r 16 applied (its goal: 8B >= 150 tok/s)
step bench_8b_generate 120 node dist/cli.js bench --device cuda --shape 8b --generate --profile --json
step bench_1b_generate 90 node dist/cli.js bench --device cuda --shape 1b --generate --json
step ncu_attention 120 ncu --clock-control none --kernel-name regex:flash_attention --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats node dist/cli.js bench --device cuda --shape 1b --batch 4 --seq 2048 --steps 1 --warmup 0
step bench_8b_f32 150 node dist/cli.js bench --device cuda --shape 8b --batch 1 --seq 2048 --steps 2 --warmup 1 --dtype f32 --json
# a budget half the optimizer state short of the estimated peak: the optimizer pages, the loss stays
budget=$(node -e "const e = require('./out/extension/engine/tools').estimateMemory({ shape: '8b' }, { batch: 1, seq: 2048, rank: 16, device: 'cuda', computeDtype: 'bf16' }); console.log(((e.peakTotal - e.categories.optimizer / 2) / 2 ** 30).toFixed(4))" 2>> "$OUT/summary.txt")
echo "paged budget: ${budget:-none (the estimate failed)} GiB" >> "$OUT/summary.txt"
[ -n "$budget" ] || SKIP="${SKIP:-},bench_8b_paged"
step bench_8b_paged 150 node dist/cli.js bench --device cuda --shape 8b --batch 1 --seq 2048 --steps 3 --warmup 1 --gpu-memory-budget "$budget" --json
# the 30 block inputs that can move, through pinned host memory (bench-summary.mjs sets it beside bench_8b_bf16)
step bench_8b_offload 150 node dist/cli.js bench --device cuda --shape 8b --batch 1 --seq 2048 --steps 3 --warmup 1 --offload-activations --json
step hf_reference 300 python3 .device/hf_reference.py --mode lora --configs 8b:1x2048 --optim adamw
# each JSON benchmark in one line, and the offloaded 8B run beside the kept one
node scripts/device/bench-summary.mjs "$OUT" >> "$OUT/summary.txt" 2>&1
