# Shared by the finetune/*.sh launchers (sourced, not run): options, the CPU fallback and the launch.
#
# Options (the original's, plus a few):
#   -m, --model PATH        checkpoint directory or hub name         (default: $MODEL)
#   -d, --data PATH         training data, JSON list or JSON Lines    (default: $DATA)
#   -o, --output_dir PATH   where checkpoints and the result go        (default: $OUTPUT_DIR)
#   --deepspeed PATH        DeepSpeed config                           (default: $DS_CONFIG_PATH, if any)
#   --gpus N                processes per node (GPUS_PER_NODE)         (default: all GPUs; 2 on a CPU-only machine)
#   --nnodes N, --node_rank R, --master_addr A, --master_port P      multi-node torchrun (defaults 1, 0, localhost, 6001)
#   -- ARGS                 everything after -- goes to finetune.py and overrides the script's settings
# The same settings can be given as environment variables: GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT. `python finetune.py --help` lists every finetune.py argument.
#
# Without CUDA the scripts run on the CPU: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) with gloo,
# torchrun with GPUS_PER_NODE processes, and finetune.py adds --use_cpu True. The first DeepSpeed run
# builds DeepSpeed's shm-comm extension (~20 s) into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
#
# Exit status: finetune.py's. A multi-process CPU run sometimes aborts at teardown ("terminate called
# without an active exception") after everything is saved; when the run's trainer_state.json was written
# (the last thing finetune.py does), that abort is reported as a warning and the status is 0.

set -euo pipefail

usage() {
    sed -n '3,20p' "$FINETUNE_DIR/launch.sh" | sed 's/^# \{0,1\}//'
}

FINETUNE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$FINETUNE_DIR")"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
EXTRA_ARGS=()

parse_options() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -m|--model) MODEL="$2"; shift 2 ;;
            -d|--data) DATA="$2"; shift 2 ;;
            -o|--output_dir) OUTPUT_DIR="$2"; shift 2 ;;
            --deepspeed) DS_CONFIG_PATH="$2"; shift 2 ;;
            --gpus) GPUS_PER_NODE="$2"; shift 2 ;;
            --nnodes) NNODES="$2"; shift 2 ;;
            --node_rank) NODE_RANK="$2"; shift 2 ;;
            --master_addr) MASTER_ADDR="$2"; shift 2 ;;
            --master_port) MASTER_PORT="$2"; shift 2 ;;
            -h|--help) usage; exit 0 ;;
            --) shift; EXTRA_ARGS=("$@"); break ;;
            *) echo "error: unknown option $1 (see --help; finetune.py arguments go after --)" >&2; exit 2 ;;
        esac
    done
    if [[ ! -e "$DATA" ]]; then
        echo "error: data file $DATA does not exist (pass -d PATH)" >&2
        exit 2
    fi
    if [[ -n "${DS_CONFIG_PATH:-}" && ! -f "$DS_CONFIG_PATH" ]]; then
        echo "error: DeepSpeed config $DS_CONFIG_PATH does not exist" >&2
        exit 2
    fi
}

# CUDA or not decides the defaults; on the CPU, DeepSpeed's CPU accelerator.
detect_device() {
    if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        CUDA=1
        GPUS_PER_NODE="${GPUS_PER_NODE:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
    else
        CUDA=0
        export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
        GPUS_PER_NODE="${GPUS_PER_NODE:-2}"
    fi
}

# run_finetune ARGS...: finetune.py under torchrun (or plain python for the single-device scripts)
# with the settings every script shares (the original's), then the script's ARGS, then the user's
# arguments after -- (the last value of an option wins).
run_finetune() {
    local stamp status
    local shared=(
        --model_name_or_path "$MODEL" --data_path "$DATA" --output_dir "$OUTPUT_DIR"
        --num_train_epochs 5 --per_device_eval_batch_size 1
        --eval_strategy no --save_strategy steps --save_steps 1000 --save_total_limit 10
        --weight_decay 0.1 --adam_beta2 0.95 --warmup_steps 0.01 --lr_scheduler_type cosine
        --logging_steps 1 --report_to none --model_max_length 512 --lazy_preprocess True
        --activation_checkpointing True
    )
    stamp="$(mktemp)"
    set +e
    if [[ "${SINGLE_PROCESS:-0}" == 1 ]]; then
        "$PYTHON" "$REPO_DIR/finetune.py" "${shared[@]}" "$@" "${EXTRA_ARGS[@]}"
    else
        "$PYTHON" -m torch.distributed.run --nproc_per_node "$GPUS_PER_NODE" --nnodes "${NNODES:-1}" \
            --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-localhost}" \
            --master_port "${MASTER_PORT:-6001}" "$REPO_DIR/finetune.py" "${shared[@]}" "$@" "${EXTRA_ARGS[@]}"
    fi
    status=$?
    set -e
    local out
    out="$(output_dir_of "${shared[@]}" "$@" "${EXTRA_ARGS[@]}")"
    if [[ $status -ne 0 && -f "$out/trainer_state.json" && "$out/trainer_state.json" -nt "$stamp" ]]; then
        echo "warning: finetune.py exited with status $status after finishing and saving to $out" \
             "(a known teardown abort of multi-process CPU runs); treating the run as successful" >&2
        status=0
    fi
    rm -f "$stamp"
    return $status
}

# The last --output_dir among the arguments.
output_dir_of() {
    local out="" previous=""
    for arg in "$@"; do
        if [[ "$previous" == "--output_dir" ]]; then out="$arg"; fi
        if [[ "$arg" == --output_dir=* ]]; then out="${arg#--output_dir=}"; fi
        previous="$arg"
    done
    echo "$out"
}
