"""Write a small random Qwen checkpoint in the original format, with the real vocabulary.

    python -m qwen.tools.tiny_checkpoint OUT [--chat] [--vocab PATH] [--force]

The directory holds config.json (with auto_map), generation_config.json, model.safetensors,
qwen.tiktoken, tokenizer_config.json and our remote-code files: it loads with `import qwen`
or with `trust_remote_code=True`, exactly like a published checkpoint. Tests and demos use it.
A non-empty OUT is refused unless --force (see qwen/tools/output_dir.py for what that replaces).
"""

import argparse
import sys

import torch
from transformers import GenerationConfig

from ..configuration_qwen import QWenConfig
from ..modeling_qwen import QWenLMHeadModel
from ..tokenization_qwen import QWenTokenizer
from ..vocab import find_qwen_tiktoken
from . import run_cli_action
from .output_dir import staged_output

EOD_ID = 151643


def generation_config(chat: bool) -> GenerationConfig:
    """The published base/chat generation settings (QWEN_SPEC §1)."""
    common = dict(eos_token_id=EOD_ID, pad_token_id=EOD_ID, max_new_tokens=512, do_sample=True, top_k=0, top_p=0.8)
    if chat:
        return GenerationConfig(chat_format="chatml", max_window_size=6144, repetition_penalty=1.1, **common)
    return GenerationConfig(chat_format="raw", stop_words_ids=[[EOD_ID]], **common)


def build(out, chat=False, vocab=None, hidden_size=64, layers=2, heads=4, seq_length=2048, seed=0, dtype="bfloat16",
          force=False):
    """Write the checkpoint to `out`, which must be empty or absent unless `force`; returns `out`."""
    vocab_file = find_qwen_tiktoken(vocab)
    with staged_output(out, force) as staging:  # refuses before any work
        tokenizer = QWenTokenizer(vocab_file, model_max_length=32768)
        torch.manual_seed(seed)
        config = QWenConfig(
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            kv_channels=hidden_size // heads,
            intermediate_size=hidden_size * 16 // 3 // 2 * 2,  # 8/3 * H per branch, as in the tech report
            seq_length=seq_length,
            max_position_embeddings=32768,
            fp32=dtype == "float32",
        )
        config.tokenizer_class = "QWenTokenizer"
        model = QWenLMHeadModel(config).to(getattr(torch, dtype))
        model.generation_config = generation_config(chat)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--chat", action="store_true", help="chat model generation config (chatml)")
    parser.add_argument("--vocab", help="path to qwen.tiktoken (default: the copy in the dashscope package)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT: replace the checkpoint there and delete its stale weight "
                             "files (other files stay; remote code that is not ours is kept as *.py.orig)")
    args = parser.parse_args(argv)

    def action():
        build(args.out, args.chat, args.vocab, args.hidden_size, args.layers, args.heads, args.seq_length,
              args.seed, args.dtype, force=args.force)
        return f"wrote a tiny {'chat' if args.chat else 'base'} checkpoint to {args.out}"

    return run_cli_action(action)


if __name__ == "__main__":
    sys.exit(main())
