"""A scripted two-turn `model.chat()` conversation with a checkpoint (`make demo` runs it on a tiny one).

    python -m qwen.tools.demo CHECKPOINT_DIR [--max-new-tokens N]

A tiny checkpoint has random weights, so its replies are random text: the point is that the whole
path (tokenizer, chat format, generation with the KV cache, stop words, decoding, history) runs.
A checkpoint that is missing or not a Qwen (v1) chat model is one `error:` line (exit 2).
"""

import argparse
import sys

from ..loading import positive_int
from ..loading import error_text, load_chat_model
from . import run_cli_action

QUERIES = ["你好", "Tell me a story about a young entrepreneur."]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Qwen (v1) chat checkpoint directory (original format) or hub name")
    parser.add_argument("--max-new-tokens", type=positive_int, default=24, metavar="N")
    args = parser.parse_args(argv)

    def action():
        model, tokenizer = load_chat_model(args.checkpoint, cpu_only=True, path_option="CHECKPOINT_DIR")
        print(f"loaded {args.checkpoint}: {model.num_parameters():,} parameters, {model.dtype}")
        history = None
        for query in QUERIES:
            try:
                response, history = model.chat(
                    tokenizer, query, history=history, do_sample=False, max_new_tokens=args.max_new_tokens
                )
            except ValueError as exc:  # run_cli_action prints it; whole, on one line
                raise ValueError(f"chat failed: {error_text(exc)}") from exc
            print(f"User: {query}\nQwen: {response}\n")
        return f"history holds {len(history)} turns"

    return run_cli_action(action)


if __name__ == "__main__":
    sys.exit(main())
