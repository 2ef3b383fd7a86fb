#!/usr/bin/env bash
# LoRA fine-tuning with DeepSpeed ZeRO-2 on one or more nodes (torchrun); `--help` for the options.
#   bash finetune/finetune_lora_ds.sh -m Qwen/Qwen-7B-Chat -d data.json [--deepspeed finetune/ds_config_zero2.json]
source "$(dirname "$0")/launch.sh"
MODEL="Qwen/Qwen-7B"  # or a local checkpoint directory; chat models train without wte/lm_head
DATA="path_to_data"
OUTPUT_DIR="output_qwen"
DS_CONFIG_PATH="$FINETUNE_DIR/ds_config_zero2.json"
parse_options "$@"
detect_device

# On top of the settings every script shares (launch.sh, run_finetune):
run_finetune \
    --bf16 True \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    --use_lora True \
    --deepspeed "$DS_CONFIG_PATH"
