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

run_finetune \
    --model_name_or_path "$MODEL" \
    --data_path "$DATA" \
    --fp16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 5 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 8 \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps 1000 \
    --save_total_limit 10 \
    --learning_rate 3e-4 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_steps 0.01 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --report_to none \
    --model_max_length 512 \
    --lazy_preprocess True \
    --use_lora True \
    --q_lora True \
    --activation_checkpointing True
