#!/usr/bin/env bash
# The GPU machine's checks (issue #29 item 5), one prepared run of a few minutes:
#   1. the parity suite with mlx[cuda] and torch CUDA (tests/test_parity_torch.py picks CUDA),
#      plus the algorithm's torch tests and the engine's model tests;
#   2. bench_rollout --sampling-paths (the on-device sampling path);
#   3. bench_scale at the Qwen2.5-0.5B and 1.5B shapes (default settings), and the Mac
#      recipe's memory at 0.5B in 4-bit, at micro-batch 2 (the recipe's) and 4.
# The machine has no network: mlx[cuda] comes as a carried site folder (.devgpu/site.tar.xz,
# docs/benchmarks.md says how it is made) and the embedded model as a random-weight model of
# its shape (scripts/random_embedded.py), so accuracies mean nothing there; speed and memory do.
# Each stage has its own time limit and writes to $OUT as it goes.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD CAST_MLX_HOME=/tmp/cast-home CAST_MLX_HF_FROM_FOLDER=1
PY=${PY:-python3}
stage() { echo "== $1 ($(date +%T))"; }

stage install
tar xJf .devgpu/site.tar.xz -C /tmp/site || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import mlx.core as mx, torch; print('mlx', mx.__version__, mx.default_device(), 'cuda', mx.cuda.is_available(), 'torch', torch.__version__, torch.cuda.is_available())" | tee -a "$OUT/device.txt" || exit 1
$PY scripts/random_embedded.py --tokenizer .devgpu/tok || exit 1

stage parity
# The model parity tests alone first, with their tracebacks written as they come (a stage
# stopped by its time limit prints no summary: session 13 lost the reasons that way). MLX's
# CUDA backend runs float32 matmuls in TF32 unless MLX_ENABLE_TF32=0 (mlx issue #3860), and
# torch does not: the parity runs in full float32, then once more as MLX runs by default.
MLX_ENABLE_TF32=0 timeout 120 $PY -m pytest -p no:cacheprovider -o addopts="" -rfE --tb=short -v \
  tests/test_parity_torch.py > "$OUT/parity.txt" 2>&1
tail -12 "$OUT/parity.txt"
timeout 45 $PY -m pytest -p no:cacheprovider -o addopts="" -rfE --tb=short -v -x \
  tests/test_parity_torch.py > "$OUT/parity-tf32.txt" 2>&1
tail -12 "$OUT/parity-tf32.txt"
timeout 50 $PY -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" -rfE --tb=line \
  tests/test_advantages.py tests/test_loss.py tests/test_rollout.py > "$OUT/engine-tests.txt" 2>&1
tail -15 "$OUT/engine-tests.txt"

stage rollout
timeout 90 $PY scripts/bench_rollout.py --sampling-paths --repeats 2 2>&1 | tail -3 | tee "$OUT/rollout.jsonl"

stage scale
timeout 120 $PY scripts/bench_scale.py --models qwen2.5-0.5b qwen2.5-1.5b --settings default \
  --out "$OUT/scale.jsonl" 2>&1 | tail -5
for mb in 2 4; do  # the Mac recipe's micro-batch, and the 4 that measured 8.87 GB before the quantized head's transpose
  timeout 75 $PY scripts/bench_scale.py --models qwen2.5-0.5b --settings mac --dtype 4bit --warmup 0 \
    --rollout-tokens 320 --micro-batch $mb --out "$OUT/scale.jsonl" 2>&1 | tail -5
done
stage done
