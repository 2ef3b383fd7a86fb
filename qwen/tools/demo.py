"""A scripted two-turn `model.chat()` conversation with a checkpoint (`make demo` runs it on a tiny one).

    python -m qwen.tools.demo CHECKPOINT_DIR [--max-new-tokens N]

A tiny checkpoint has random weights, so its replies are random text: the point is that the whole
path (tokenizer, chat format, generation with the KV cache, stop words, decoding, history) runs.
"""

import argparse
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen  # noqa: F401  (registers the Qwen classes with the Auto* factories)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a Qwen checkpoint directory (original format)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, device_map="cpu").eval()
    print(f"loaded {args.checkpoint}: {model.num_parameters():,} parameters, {model.dtype}")
    history = None
    for query in ["你好", "Tell me a story about a young entrepreneur."]:
        response, history = model.chat(
            tokenizer, query, history=history, do_sample=False, max_new_tokens=args.max_new_tokens
        )
        print(f"User: {query}\nQwen: {response}\n")
    print(f"history holds {len(history)} turns")
    return 0


if __name__ == "__main__":
    sys.exit(main())
