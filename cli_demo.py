"""Qwen-Chat command-line interactive chat demo (QWEN_SPEC §7); the logic is in `qwen/cli.py`.

    python cli_demo.py -c CHECKPOINT_DIR [-s SEED] [--cpu-only] [--max-new-tokens N]
"""

import sys

from qwen.cli import main

if __name__ == "__main__":
    sys.exit(main())
