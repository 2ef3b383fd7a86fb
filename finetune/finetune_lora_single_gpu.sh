#!/usr/bin/env bash
# LoRA fine-tuning in one process, without DeepSpeed (one GPU, or the CPU); `--help` for the options.
#   bash finetune/finetune_lora_single_gpu.sh -m Qwen/Qwen-7B-Chat -d data.json
source "$(dirname "$0")/launch.sh"
MODEL="Qwen/Qwen-7B"
DATA="path_to_data"
OUTPUT_DIR="output_qwen"
parse_options "$@"
detect_device
SINGLE_PROCESS=1
[[ "$CUDA" == 1 ]] && export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

# On top of the settings every script shares (launch.sh, run_finetune):
run_finetune \
    --bf16 True \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    --use_lora True
