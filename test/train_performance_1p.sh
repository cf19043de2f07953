#!/bin/bash
# Throughput of DINO ViT-S/16 on one device: 1 epoch capped at 200 steps, batch 64, --amp.
# Synthetic crops unless --data_path is given. Logs and summary: test/output/${ASCEND_DEVICE_ID:-0}/.
#   bash test/train_performance_1p.sh [--data_path=/path/to/imagenet] [--nproc=N] [--main_dino_flag=value ...]
exec bash "$(dirname "$0")/launch_dino.sh" perf 1 "$@"
