#!/bin/bash
# Full DINO ViT-S/16 run on 8 devices (torchrun, one process per device): 100 epochs on <data_path>/train
# (batch 64 per device, --amp), then the weighted k-NN evaluation of the teacher on <data_path>/val, also on
# 8 processes. Logs and summary: test/output/${ASCEND_DEVICE_ID:-0}/.
#   bash test/train_full_8p.sh --data_path=/path/to/imagenet [--nproc=N] [--main_dino_flag=value ...]
exec bash "$(dirname "$0")/launch_dino.sh" full 8 "$@"
