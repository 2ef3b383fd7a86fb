#!/usr/bin/env bash
# Full-parameter fine-tuning with DeepSpeed ZeRO-3 on one or more nodes (torchrun); `--help` for the options.
#   bash finetune/finetune_ds.sh -m Qwen/Qwen-7B -d data.json
source "$(dirname "$0")/launch.sh"
MODEL="Qwen/Qwen-7B"
DATA="path_to_data"
OUTPUT_DIR="output_qwen"
DS_CONFIG_PATH="$FINETUNE_DIR/ds_config_zero3.json"
parse_options "$@"
detect_device

# On top of the settings every script shares (launch.sh, run_finetune):
run_finetune \
    --bf16 True \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --learning_rate 1e-5 \
    --deepspeed "$DS_CONFIG_PATH"
