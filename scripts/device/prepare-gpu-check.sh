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
node scripts/build.mjs
npx tsc -p .
bash ../shared/device/pack-node.sh .device 22
node scripts/device/prepare-reference-check.mjs --out .device/refcheck
cp ../shared/bench/hf_reference.py .device/hf_reference.py
du -sh .device build/Release dist out node_modules/@huggingface node_modules/hyparquet
