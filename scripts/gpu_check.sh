#!/usr/bin/env bash
# The GPU figures of the speed issue in one run, for a session lent a GPU machine (H100/H200).
#
# That machine has torch, torchvision, timm, typer, rich, pyyaml, onnx, onnxruntime and pytest but no
# PyAV and no package registry, so PyAV travels as a wheel. Here, in the repository root, once:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av==18.1.0
#
# then run this script there with `.whl` carried (the device tool's `carry`), OUT set to a folder
# whose files come back. It writes, under $OUT:
#
#   gpu.txt              the GPU
#   test_cuda.txt        tests/test_cuda.py (CUDA graphs, grad checkpointing, nvJPEG, GPU transform)
#   bench_device.json    ssv2 student and teacher at batch 90: synthetic, the plain path, and end to end
#                        from 256-px JPEG frames decoded (nvJPEG) and augmented on the GPU
#   bench_loader.json    the same end to end with the CPU loader workers decoding and augmenting
#   bench_compiled.json  train.compile=true with CUDA graphs (synthetic)
#
# About 8 minutes on one H200 (most of it the three benches); the dataset is generated here (toy
# videos at 256 px, 24 frames, 1000 training clips), as the issue allows.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
glitr() { python3 -m glitr_cli "$@"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pytest -q tests/test_cuda.py 2>&1 | tail -40 | tee "$OUT/test_cuda.txt"

data=/tmp/gpu_data
glitr prepare-data toy --out "$data" --toy-size 256 --toy-frames 24 --toy-train 1000 --toy-val 10 --toy-test 0 \
    -j "$(nproc)" > "$OUT/prepare.txt" 2>&1 || { tail -5 "$OUT/prepare.txt"; exit 1; }

glitr bench ssv2 --batch-size 90 --data --repeats 3 --warmup 1 --json "$OUT/bench_device.json" \
    "data.root=$data" data.augment_on=device data.decode_on=device 2>&1 | tail -60
glitr bench ssv2 --batch-size 90 --data --no-baseline --repeats 3 --warmup 1 --json "$OUT/bench_loader.json" \
    "data.root=$data" 2>&1 | grep -E "data|train_clips"
glitr bench ssv2 --batch-size 90 --no-baseline --repeats 3 --warmup 1 --json "$OUT/bench_compiled.json" \
    train.compile=true 2>&1 | grep -E "train|online|failed"
