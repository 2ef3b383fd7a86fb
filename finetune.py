"""Fine-tune a Qwen (v1) checkpoint: full, LoRA or Q-LoRA, on the Hugging Face Trainer with optional DeepSpeed.

    python finetune.py --model_name_or_path DIR --data_path data.json --output_dir out [--use_lora True] ...
    bash finetune/finetune_lora_ds.sh -m DIR -d data.json        # the launchers: see finetune/README.md

All arguments: python finetune.py --help (the original's, plus the Trainer's). The work is done by
qwen.finetune.train.
"""

import sys

from qwen.finetune.train import main

if __name__ == "__main__":
    sys.exit(main())
