#!/bin/bash
# Shared body of train_{performance,full}_{1p,8p}.sh: argument handling, launch, result extraction, summary.
#
#   bash test/launch_dino.sh perf|full DEFAULT_NPROC [--data_path=PATH] [--nproc=N] [--flag=value ...]
#
# Any other --flag=value (or --flag value) goes to main_dino.py and overrides the defaults below; eval-only
# flags (--nb_knn, --temperature, --use_cuda, --checkpoint_key, --dump_features, --load_features, --crop_size,
# --resize_size, --eval_batch_size) go to eval_knn.py; --arch, --patch_size, --device, --num_workers, --bin,
# --dist_timeout go to both.
# --nproc=N sets the number of processes; --dry_run prints the commands without running them.
set -u

mode=$1
nprocs=$2
shift 2

Network="DINO_ID3436_for_Pytorch"
test_path_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root_dir=$(dirname "$test_path_dir")
launch_dir=$(pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
SEP=$'\x1f'  # joins the values of one flag (some take several, e.g. --nb_knn 10 20)

# ---- arguments ----
declare -a order=()
declare -A opts=()
data_path=""
dry_run=0

canonical() {
    case $1 in
        batch_size_per_gpu) echo batch_size ;;
        *) echo "$1" ;;
    esac
}

set_opt() {  # name value...
    local name
    name=$(canonical "$1")
    shift
    [[ -z ${opts[$name]+set} ]] && order+=("$name")
    local IFS=$SEP
    opts[$name]="$*"
}

set_default() {  # like set_opt, but never overrides what the user gave
    local name
    name=$(canonical "$1")
    [[ -n ${opts[$name]+set} ]] || set_opt "$@"
}

fail() {
    echo "[Error] $*"
    exit 1
}

args=("$@")
i=0
while (( i < ${#args[@]} )); do
    arg=${args[i]}
    i=$((i + 1))
    [[ $arg == --* ]] || fail "unexpected argument '$arg': use --flag=value or --flag value"
    name=${arg#--}
    values=()
    if [[ $name == *=* ]]; then
        values=("${name#*=}")
        name=${name%%=*}
    else
        while (( i < ${#args[@]} )) && [[ ${args[i]} != --* ]]; do
            values+=("${args[i]}")
            i=$((i + 1))
        done
    fi
    case $name in
        data_path) data_path=${values[0]:-} ;;
        nproc) nprocs=${values[0]:-} ;;
        dry_run) dry_run=1 ;;
        local_rank|local-rank) ;;  # set by the launcher, never by hand
        *) set_opt "$name" "${values[@]}" ;;
    esac
done
[[ $nprocs =~ ^[1-9][0-9]*$ ]] || fail "para \"nproc\" must be a positive integer (got '$nprocs')"

if [[ -n $data_path ]]; then
    [[ -d $data_path ]] || fail "para \"data_path\": no such folder: $data_path"
    data_path=$(cd "$launch_dir" && cd "$data_path" && pwd)
elif [[ $mode == full ]]; then
    echo "[Error] para \"data_path\" must be given: --data_path=/path/to/dataset (with train/ and val/)"
    exit 1
fi
if [[ $mode == full ]]; then
    for split in train val; do
        [[ -d $data_path/$split ]] || fail "para \"data_path\": $data_path has no $split/ folder (full runs \
train on train/ and evaluate the teacher with k-NN on val/)"
    done
fi

# ---- environment ----
if [[ ${etp_running_flag:-} != true && -d ${ASCEND_HOME:-/usr/local/Ascend} ]]; then
    set +u  # CANN's set_env.sh expands PYTHONPATH and LD_LIBRARY_PATH without defaults
    source "$test_path_dir/env_npu.sh"
    set -u
fi
cd "$root_dir" || exit 1

cores=$(nproc 2>/dev/null || echo 1)
cores_per_proc=$(( cores / nprocs > 0 ? cores / nprocs : 1 ))
workers=$(( cores_per_proc < 32 ? cores_per_proc : 32 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cores_per_proc}
export PYTHONUNBUFFERED=1

ASCEND_DEVICE_ID=${ASCEND_DEVICE_ID:-0}
export ASCEND_DEVICE_ID
out_dir=$test_path_dir/output/$ASCEND_DEVICE_ID
train_log=$out_dir/train_${ASCEND_DEVICE_ID}.log
eval_log=$out_dir/test_${ASCEND_DEVICE_ID}.log

# ---- defaults of the Ascend port (the user's flags above win) ----
set_default arch vit_small
set_default amp
set_default optimizer npufusedadamw
set_default num_workers "$workers"
set_default batch_size 64
set_default use_color_jitter_opti
if [[ $mode == perf ]]; then
    set_default output_dir "$out_dir/ckpt_perf"
    set_default warmup_epochs 0
    set_default epochs 1
    set_default num_steps 200
    [[ -n $data_path ]] || set_default synthetic
else
    set_default output_dir "$out_dir/ckpt_full_${nprocs}p"  # kept: running the same command again resumes
    set_default epochs 100
fi
batch_size=${opts[batch_size]}
output_dir=${opts[output_dir]}
[[ $output_dir == /* ]] || output_dir=$launch_dir/$output_dir  # relative to where the script was started
set_opt output_dir "$output_dir"

# ---- who gets which flag ----
eval_only=" nb_knn temperature use_cuda checkpoint_key dump_features load_features crop_size resize_size \
eval_batch_size "
shared=" arch patch_size device num_workers bin dist_timeout "
switches=" amp compile cuda_graph synthetic use_color_jitter_opti "

append_flag() {  # array-name flag-name values(joined by SEP)
    local -n target=$1
    local name=$2 joined=$3
    if [[ $switches == *" $name "* ]]; then
        case ${joined,,} in
            false|0|off) return ;;
            ""|true|1|on) target+=("--$name"); return ;;
            *) fail "--$name takes no value (or true/false), got '$joined'" ;;
        esac
    fi
    local -a vals=()
    [[ -n $joined ]] && IFS=$SEP read -r -a vals <<< "$joined"
    target+=("--$name" "${vals[@]}")
}

train_args=()
eval_args=()
for name in "${order[@]}"; do
    if [[ $eval_only != *" $name "* ]]; then
        append_flag train_args "$name" "${opts[$name]}"
    fi
    if [[ $shared == *" $name "* ]]; then
        append_flag eval_args "$name" "${opts[$name]}"
    elif [[ $eval_only == *" $name "* ]]; then
        if [[ $name == eval_batch_size ]]; then
            append_flag eval_args batch_size_per_gpu "${opts[$name]}"
        else
            append_flag eval_args "$name" "${opts[$name]}"
        fi
    fi
done
[[ -n $data_path ]] && train_args+=(--data_path "$data_path")
# evaluate at the training resolution (224 -> resize 256, crop 224 as the reference)
if [[ -z ${opts[crop_size]+set} ]]; then
    crop=${opts[global_crop_size]:-224}
    eval_args+=(--crop_size "$crop")
    [[ -n ${opts[resize_size]+set} ]] || eval_args+=(--resize_size $(( (crop * 256 + 112) / 224 )))
fi

run_python() {  # script args...: one process, or one per device under torchrun
    if (( nprocs > 1 )); then
        "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nprocs" "$@"
    else
        "$PYTHON" "$@"
    fi
}

show_failure() {  # what log
    echo "[Error] $1 failed (exit code $2); the end of $3:"
    tail -n 20 "$3"
    exit "$2"
}

# ---- run ----
if (( dry_run )); then  # --dry_run: show the commands, run nothing
    echo "train:$(printf ' %q' main_dino.py "${train_args[@]}")"
    [[ $mode == full ]] && echo "eval:$(printf ' %q' eval_knn.py --pretrained_weights "$output_dir/checkpoint.pth" \
        --checkpoint_key teacher --data_path "$data_path" "${eval_args[@]}")"
    echo "processes: $nprocs"
    exit 0
fi
mkdir -p "$out_dir"
find "$out_dir" -maxdepth 1 -type f -delete  # the previous run's logs (full-run checkpoints are kept)
if [[ $output_dir == "$out_dir/ckpt_perf" ]]; then
    rm -rf "$output_dir"  # throughput of a fresh run, never of a resumed one
fi
echo "Device ID: $ASCEND_DEVICE_ID, processes: $nprocs"
echo "Training log: $train_log"
start_time=$(date +%s)
run_python main_dino.py "${train_args[@]}" > "$train_log" 2>&1 < /dev/null
rc=$?
(( rc == 0 )) || show_failure training $rc "$train_log"

if [[ $mode == full ]]; then
    echo "Evaluation log: $eval_log"
    run_python eval_knn.py --pretrained_weights "$output_dir/checkpoint.pth" --checkpoint_key teacher \
        --data_path "$data_path" "${eval_args[@]}" > "$eval_log" 2>&1 < /dev/null
    rc=$?
    (( rc == 0 )) || show_failure "k-NN evaluation" $rc "$eval_log"
fi
end_time=$(date +%s)
e2e_time=$(( end_time - start_time ))

# ---- results ----
FPS=$(grep -a 'Training throughput:' "$train_log" | tail -n 1 | sed -E 's/.*Training throughput: *([0-9.eE+-]+).*/\1/')
loss_file=$out_dir/train_${Network}_bs${batch_size}_${nprocs}p_${mode/full/acc}_loss.txt
grep -aoE '(^|[[:space:]])loss: [^[:space:]]+' "$train_log" | awk '{print $2}' > "$loss_file"
ActualLoss=$(tail -n 1 "$loss_file")
if [[ -z $ActualLoss && -f $output_dir/log.txt ]]; then
    ActualLoss=$(tail -n 1 "$output_dir/log.txt" | grep -oE '"train_loss": *[^,}]+' | sed -E 's/.*: *//')
fi

echo "------------------ Final result ------------------"
if [[ -n $FPS ]]; then
    TrainingTime=$(awk -v b="$batch_size" -v n="$nprocs" -v f="$FPS" 'BEGIN{printf "%.4f", b * n / f}')
else
    FPS="N/A"
    TrainingTime="N/A"
    echo "[Warning] no 'Training throughput' line in $train_log (nothing left to train after a resume?)"
fi
echo "Final Performance images/sec : $FPS"
if [[ $mode == full ]]; then
    result=$(grep -a '^10-NN classifier result: Top1:' "$eval_log" | head -n 1)
    [[ -n $result ]] || result=$(grep -a 'NN classifier result: Top1:' "$eval_log" | head -n 1)
    train_accuracy=$(sed -E 's/.*Top1: *([^,]+),.*/\1/' <<< "$result")
    echo "Final Train Accuracy : ${train_accuracy}"
fi
echo "E2E Training Duration sec : $e2e_time"

# ---- summary ----
BatchSize=$batch_size
RankSize=$nprocs
DeviceType=$(uname -m)
CaseName=${Network}_bs${BatchSize}_${RankSize}p_${mode/full/acc}
summary=$out_dir/${CaseName}.log
{
    echo "Network = ${Network}"
    echo "RankSize = ${RankSize}"
    echo "BatchSize = ${BatchSize}"
    echo "DeviceType = ${DeviceType}"
    echo "CaseName = ${CaseName}"
    echo "ActualFPS = ${FPS}"
    echo "TrainingTime = ${TrainingTime}"
    [[ $mode == full ]] && echo "TrainAccuracy = ${train_accuracy}"
    echo "ActualLoss = ${ActualLoss}"
    echo "E2ETrainingTime = ${e2e_time}"
} > "$summary"
echo "Summary: $summary"
if [[ $mode == perf && $FPS == "N/A" ]]; then
    exit 1
fi
