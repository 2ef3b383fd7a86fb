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

run_finetune \
    --model_name_or_path "$MODEL" \
    --data_path "$DATA" \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 5 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps 1000 \
    --save_total_limit 10 \
    --learning_rate 1e-5 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_steps 0.01 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --report_to none \
    --model_max_length 512 \
    --lazy_preprocess True \
    --activation_checkpointing True \
    --deepspeed "$DS_CONFIG_PATH"
