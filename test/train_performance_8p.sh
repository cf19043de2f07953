#!/bin/bash
# Throughput of DINO ViT-S/16 on 8 devices (torchrun, one process per device): 1 epoch capped at 200 steps,
# batch 64 per device, --amp. Synthetic crops unless --data_path is given.
# Logs and summary: test/output/${ASCEND_DEVICE_ID:-0}/.
#   bash test/train_performance_8p.sh [--data_path=/path/to/imagenet] [--nproc=N] [--main_dino_flag=value ...]
exec bash "$(dirname "$0")/launch_dino.sh" perf 8 "$@"
