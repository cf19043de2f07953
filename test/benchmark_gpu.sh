#!/bin/bash
# The GPU measurement of BENCHMARKS.md in one go (a few minutes on one H100):
#   1. benchmark.py, ViT-S/16 recipe, batch 64, synthetic crops: A (the reference's fp16 step) against
#      B (this package, fp16) and C (B with --compile);
#   2. the same with --amp (B and C in bf16); both print a profile of one step of each side (25 costliest
#      kernels, host time beside device time: the data for the next optimisation);
#   3. a 40-step main_dino.py --synthetic run with --amp, to check the trainer end to end on the GPU;
#   4. when the host CPU has AMX and time is left: the CPU step of BENCHMARKS.md with --amp (bf16 on AMX)
#      on 2 threads, the issue's AMX target, which the development machines cannot measure.
# Results (JSON and logs) go to the folder given as the first argument (default: test/output/gpu_bench).
# Each step has its own time limit (under 10 minutes in all).
#   bash test/benchmark_gpu.sh [OUTPUT_DIR]
set -u
set -o pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=${1:-$root_dir/test/output/gpu_bench}
mkdir -p "$out_dir" || exit 1
out_dir=$(cd "$out_dir" && pwd)
cd "$root_dir" || exit 1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1

"$PYTHON" -c "import torch" 2>/dev/null || { echo "[Error] $PYTHON cannot import torch"; exit 1; }
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "[Error] no CUDA device is visible to $PYTHON"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out_dir/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out_dir/gpu.txt"

status=0
common=(--what step --device cuda --arch vit_small --patch_size 16 --batch_size 64 --steps 5 --rounds 3
        --warmup 3 --compile --profile 25)
timeout 210 "$PYTHON" benchmark.py "${common[@]}" --json "$out_dir/step_fp16.json" 2>&1 \
    | tee "$out_dir/step_fp16.log" || status=1
timeout 210 "$PYTHON" benchmark.py "${common[@]}" --amp --json "$out_dir/step_bf16.json" 2>&1 \
    | tee "$out_dir/step_bf16.log" || status=1
timeout 120 "$PYTHON" main_dino.py --synthetic --device cuda --arch vit_small --patch_size 16 --batch_size 64 \
    --amp --epochs 1 --warmup_epochs 0 --num_steps 40 --num_workers 2 \
    --output_dir "${TMPDIR:-/tmp}/dino_gpu_check" 2>&1 \
    | grep -v "^Epoch" | tee "$out_dir/train.log" || status=1
left=$(( 590 - SECONDS ))
amx_cores=$(grep -c -w amx_bf16 /proc/cpuinfo 2>/dev/null)
if [ "${amx_cores:-0}" -gt 0 ] && [ "$left" -ge 45 ]; then
    timeout "$left" "$PYTHON" benchmark.py --what step --device cpu --threads 2 --batch_size 4 --steps 1 \
        --rounds 5 --warmup 1 --amp --json "$out_dir/cpu_amx_bf16.json" 2>&1 | tee "$out_dir/cpu_amx_bf16.log" \
        || status=1
else
    echo "CPU AMX step skipped (${amx_cores:-0} cores with AMX, ${left} s left)"
fi
grep -h -e "speed-up" -e "median" "$out_dir"/step_*.log "$out_dir"/cpu_*.log 2>/dev/null
grep "Training throughput" "$out_dir/train.log"
exit $status
