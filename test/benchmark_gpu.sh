#!/bin/bash
# The GPU measurement of BENCHMARKS.md in one go (about 7 minutes on one H100), in this order:
#   1. the CUDA-graph tests of tests/test_cuda_graphs.py (the real capture: graphed steps train as eager ones;
#      main_dino.py --cuda_graph runs and resumes) and the GPU's uint8 crops (normalization, a short
#      training on real images), when pytest is installed; if they fail, the rest runs without --cuda_graph;
#   2. benchmark.py, ViT-S/16 recipe, batch 64, synthetic crops: A (the reference's fp16 step) against
#      B (this package, fp16) and G (B with the backbones replayed as CUDA graphs), then a profile of one step
#      of each side (25 costliest kernels); if the process dies (G can fail beyond recovery), once more
#      without G;
#   3. the same with --amp (B and G in bf16);
#   4. a 40-step main_dino.py --synthetic --amp run, to check the trainer end to end;
#   5. when the host CPU has AMX: the CPU step of BENCHMARKS.md with --amp (bf16 on AMX) on 2 threads, each
#      side's timed step after an untimed one of its own (--round_warmup 1), the issue's AMX target, which the
#      development machines cannot measure;
#   6. with 140 s to spare, 100 steps of main_dino.py on real JPEGs (the loader's workers included), with the
#      default and the --use_color_jitter_opti pipeline;
#   7. with 60 s to spare, the fp32 CPU step (2 threads; B with oneDNN's linear layers on an Intel CPU);
#   8. with AMX and 150 s to spare, step 5 again with side C (compiled blocks).
# A failure never ends the run: every later stage still runs and every log comes back. A stage that would
# start with under 20 s of the budget left (45 s for the JPEG runs) is skipped. COMPILE=1 adds side C.
# Logs go to the folder given as the first argument (default: test/output/gpu_bench), the JSON results
# and the logs of retries and JPEG runs into json.tar there (at most 8 files in all).
#   bash test/benchmark_gpu.sh [OUTPUT_DIR]        (BUDGET_S=seconds for the whole run, default 500)
set -u
set -o pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out_dir=${1:-$root_dir/test/output/gpu_bench}
mkdir -p "$out_dir" || exit 1
out_dir=$(cd "$out_dir" && pwd)
cd "$root_dir" || exit 1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONUNBUFFERED=1
budget=${BUDGET_S:-500}

"$PYTHON" -c "import torch" 2>/dev/null || { echo "[Error] $PYTHON cannot import torch"; exit 1; }
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "[Error] no CUDA device is visible to $PYTHON"; exit 1; }
json_dir=$(mktemp -d)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    grep -m1 "model name" /proc/cpuinfo; echo "cores: $(nproc)"
} | tee "$out_dir/gpu.txt"

# Runs "$@" under a time limit of min(cap, what is left of the budget); name is the log's stem. A stage
# needs min_s seconds (default 20) to start; one that ignores SIGTERM is killed 10 s later.
timed() {
    local name=$1 cap=$2; shift 2
    local left=$(( budget - SECONDS ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt "${min_s:-20}" ]; then
        echo "$name skipped: ${left} s left" | tee "$logs_to/$name.log"; return 1
    fi
    echo "== $name (limit ${limit} s, $(( SECONDS )) s elapsed)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$logs_to/$name.log"
    local rc=$?
    tar -cf "$out_dir/json.tar" -C "$json_dir" . 2>/dev/null  # after every stage: a killed run keeps its results
    return $rc
}
logs_to=$out_dir

status=0
common=(--what step --device cuda --arch vit_small --patch_size 16 --batch_size 64 --steps 10 --rounds 7
        --warmup 3)
graph=(--cuda_graph)
[ "${COMPILE:-0}" = 1 ] && common+=(--compile)
finish() {
    trap - TERM INT
    grep -h -e "speed-up" -e "median" -e "MFU" -e "left out" "$out_dir"/step_*.log "$json_dir"/step_*.log \
        "$out_dir"/cpu_*.log "$json_dir"/cpu_*.log 2>/dev/null
    grep -h "Training throughput" "$out_dir/train.log" 2>/dev/null
    for log in "$json_dir"/train_jpeg_*.log; do  # the last logged step time: a mean over 20 steps, so it
        [ -f "$log" ] && echo "$(basename "$log"): $(grep "time:" "$log" | tail -n 1)"  # is past the prefetch
    done
    tail -n 1 "$out_dir/graph_tests.log" 2>/dev/null
    tar -cf "$out_dir/json.tar" -C "$json_dir" . 2>/dev/null
    rm -rf "$json_dir"
    echo "elapsed: ${SECONDS} s"
    exit $status
}
trap 'status=1; echo "stopped by a signal"; finish' TERM INT
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    timed graph_tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
        tests/test_training_parts.py::test_uint8_crops_normalized_on_a_gpu_equal_the_cpus \
        tests/test_training_parts.py::test_trainer_on_images_on_a_gpu_takes_pinned_uint8_crops || {
        status=1; graph=(); echo "graph tests failed: the measurements below run without --cuda_graph"; }
else
    echo "CUDA-graph tests skipped: $PYTHON has no pytest" | tee "$out_dir/graph_tests.log"
fi
# A failure benchmark.py cannot survive (a sticky CUDA error in G): once more without G, logged into json.tar
# (the folder's file count is capped), and the later stages without G.
step() {  # name cap args...
    local name=$1 cap=$2; shift 2
    timed "$name" "$cap" "$PYTHON" benchmark.py "${common[@]}" ${graph[@]+"${graph[@]}"} "$@" \
        --json "$json_dir/$name.json" && return 0
    status=1
    if [ ${#graph[@]} -gt 0 ]; then
        logs_to=$json_dir
        timed "${name}_without_g" "$cap" "$PYTHON" benchmark.py "${common[@]}" "$@" \
            --json "$json_dir/${name}_without_g.json"
        logs_to=$out_dir
        graph=()  # later stages run without G
    fi
}
step step_fp16 240 --profile 25
step step_bf16 200 --amp
rm -rf "${TMPDIR:-/tmp}/dino_gpu_check"  # a fresh run, never a resumed one
timed train 100 "$PYTHON" main_dino.py --synthetic --device cuda --arch vit_small --patch_size 16 \
    --batch_size 64 --amp --epochs 1 --warmup_epochs 0 --num_steps 40 --num_workers 2 \
    --output_dir "${TMPDIR:-/tmp}/dino_gpu_check" || status=1
amx_cores=$(grep -c -w amx_bf16 /proc/cpuinfo 2>/dev/null)
if [ "${amx_cores:-0}" -gt 0 ]; then
    # --round_warmup 1: each side's timed step follows its own, as in training (on these hosts B alone took
    # 0.97 s a step, 1.37-1.67 s right after A's)
    timed cpu_amx_bf16 100 "$PYTHON" benchmark.py --what step --device cpu --threads 2 --batch_size 4 --steps 1 \
        --rounds 5 --warmup 1 --round_warmup 1 --amp --json "$json_dir/cpu_amx_bf16.json" || status=1
fi
# Real JPEGs through the loader's workers (uint8 crops, normalized on the GPU), as the seed's figures were taken:
# 6400 links to scikit-image's three photos, 100 steps of 64, default and --use_color_jitter_opti pipelines.
# Their logs travel in json.tar (the folder's file count is capped).
if [ $(( budget - SECONDS )) -ge 140 ] && "$PYTHON" -c "import skimage" 2>/dev/null; then
    jpeg_dir=${TMPDIR:-/tmp}/dino_jpegs
    "$PYTHON" - "$jpeg_dir" <<'PY'
import os, sys
import benchmark
root = sys.argv[1]
os.makedirs(os.path.join(root, "photos"), exist_ok=True)
photos = benchmark.write_photos(os.path.join(root, "photos"))
for i in range(6400):
    folder = os.path.join(root, "train", f"class{i % 8}")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, f"{i:05d}.jpg")
    if not os.path.exists(target):
        os.link(photos[i % len(photos)], target)
PY
    logs_to=$json_dir
    workers=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
    for pipeline in default fast; do
        extra=(); [ $pipeline = fast ] && extra=(--use_color_jitter_opti)
        rm -rf "${TMPDIR:-/tmp}/dino_jpeg_$pipeline"
        min_s=45 timed "train_jpeg_$pipeline" 60 "$PYTHON" main_dino.py --data_path "$jpeg_dir" --device cuda \
            --arch vit_small --patch_size 16 --batch_size 64 --amp --epochs 1 --warmup_epochs 0 --num_steps 100 \
            --num_workers "$workers" ${extra[@]+"${extra[@]}"} \
            --output_dir "${TMPDIR:-/tmp}/dino_jpeg_$pipeline" || status=1
    done
    logs_to=$out_dir
fi
# The fp32 CPU step (B with oneDNN's linear layers, measured so far on AMD only) on this host's Intel CPU;
# its log travels in json.tar.
if [ $(( budget - SECONDS )) -ge 60 ]; then
    logs_to=$json_dir
    timed cpu_fp32 80 "$PYTHON" benchmark.py --what step --device cpu --threads 2 --batch_size 4 --steps 1 \
        --rounds 3 --warmup 1 --json "$json_dir/cpu_fp32.json" || status=1
    logs_to=$out_dir
fi
if [ "${amx_cores:-0}" -gt 0 ]; then
    # with time to spare, the same with side C: where AMX makes the matrix products cheap, the fused
    # elementwise work of the compiled blocks weighs more (compiling takes about a minute on 2 threads)
    if [ $(( budget - SECONDS )) -ge 150 ]; then
        timed cpu_amx_bf16_compiled 150 "$PYTHON" benchmark.py --what step --device cpu --threads 2 --batch_size 4 \
            --steps 1 --rounds 4 --warmup 1 --round_warmup 1 --amp --compile \
            --json "$json_dir/cpu_amx_bf16_compiled.json" || status=1
    fi
else
    echo "CPU AMX step skipped: this host's CPU has no AMX"
fi
finish
