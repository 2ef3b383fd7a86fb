#!/usr/bin/env bash
# Q-LoRA (LoRA on a GPTQ Int4 checkpoint) in one process, without DeepSpeed; `--help` for the options.
#   bash finetune/finetune_qlora_single_gpu.sh -m Qwen/Qwen-7B-Chat-Int4 -d data.json
# No GPTQ library needed (finetune/README.md, "Q-LoRA"); fp16, as in the original (bf16 under DeepSpeed on a CPU).
source "$(dirname "$0")/launch.sh"
MODEL="Qwen/Qwen-7B-Chat-Int4"
DATA="path_to_data"
OUTPUT_DIR="output_qwen"
parse_options "$@"
detect_device
SINGLE_PROCESS=1
[[ "$CUDA" == 1 ]] && export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

# On top of the settings every script shares (launch.sh, run_finetune):
run_finetune \
    --fp16 True \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --learning_rate 3e-4 \
    --use_lora True \
    --q_lora True
