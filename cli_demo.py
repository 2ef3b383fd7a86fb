"""Qwen-Chat command-line chat demo (QWEN_SPEC §7); the logic is in `qwen/cli.py`.

    python cli_demo.py -c CHECKPOINT_DIR [-s SEED] [--cpu-only] [--max-new-tokens N] [--system TEXT]
                       [--prompt TEXT] [--upstream URL]

Interactive on a terminal; with stdin piped it answers each line and prints a plain transcript;
`--prompt TEXT` prints the reply to TEXT alone. Replies come from the serving engine (qwen.serving),
or with `--upstream URL` from an OpenAI-compatible server. `--help` says more.
"""

import sys

from qwen.cli import main

if __name__ == "__main__":
    sys.exit(main())
