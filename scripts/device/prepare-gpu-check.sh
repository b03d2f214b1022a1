#!/usr/bin/env bash
# Here (development machine, after npm ci): everything the GPU check (scripts/device/gpu_check.sh) needs on a GPU
# machine that has no Node and no npm. Builds the addon and the GPU test program for sm_90 (H100/H200) only, the
# bundles and the compiled tests, Node 22 (xz, ~29 MB) and the reference-check bundle into .device/. Then call the
# device tool's run with
#   carry: [".device", "build/Release", "dist", "out", "node_modules/@huggingface", "node_modules/hyparquet"]
#   command: bash scripts/device/gpu_check.sh
# (about 40 MB in all).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
npx cmake-js compile --directory native --out build --CDCMAKE_BUILD_TYPE=Release --CDQLORA_CUDA_ARCHS=90-real
# The GPU test program again with compute_75 PTX alone: the driver compiles it for the H100 as Turing code (the
# backend then takes the GPU for an sm_75), so the tensor-core attention's Turing path, fp16 as two m16n8k8 products
# each, runs on the H100 too.
cmake -S native -B build-ptx75 -G Ninja -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA_ARCHS=75-virtual > /dev/null
cmake --build build-ptx75 --target qlora_gpu_tests
mkdir -p .device
cp build-ptx75/Release/qlora_gpu_tests .device/qlora_gpu_tests_ptx75
node scripts/build.mjs
npx tsc -p .
bash ../shared/device/pack-node.sh .device 22
node scripts/device/prepare-reference-check.mjs --out .device/refcheck
cp ../shared/bench/hf_reference.py .device/hf_reference.py
du -sh .device build/Release dist out node_modules/@huggingface node_modules/hyparquet
