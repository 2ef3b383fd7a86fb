"""Decode speed with weights in aligned memory (what QWenLMHeadModel.from_pretrained now gives)
against the same checkpoint left as transformers 5 maps it: zero-copy views into the safetensors
file at 8-byte-aligned offsets. Both are loaded from one saved random checkpoint and measured
alternately in one run.

    python bench/alignment.py [--shape default] [--dtypes bfloat16 float32] [--prompt-len 64] [--new-tokens 32]

Prints the machine, its read bandwidth, each run, the medians and the ratio aligned/mapped, and
whether the greedy tokens agree.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import DTYPES, SHAPES, decode, print_machine, random_qwen  # noqa: E402

from qwen import QWenLMHeadModel  # noqa: E402


def shift_tensor_data(path: Path, offset: int = 8) -> None:
    """Pad the safetensors header (with spaces, which the format allows) so the tensor data starts
    at `offset` mod 64, as it does in most published files; whether a freshly saved file is aligned
    is otherwise down to its header's length."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    padded = size + (offset - (8 + size)) % 64
    path.write_bytes(padded.to_bytes(8, "little") + data[8 : 8 + size] + b" " * (padded - size) + data[8 + size :])


def load_mapped(directory, dtype):
    """transformers' own loading, without our alignment step."""
    return PreTrainedModel.from_pretrained.__func__(QWenLMHeadModel, directory, dtype=dtype).eval()


def misaligned_fraction(model) -> float:
    tensors = list(model.parameters())
    return sum(t.data_ptr() % 64 != 0 for t in tensors) / len(tensors)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16", "float32"])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine()
    print(f"shape {args.shape}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {args.repeats} repeats")
    ids = torch.randint(0, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    for name in args.dtypes:
        dtype = DTYPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            random_qwen(SHAPES[args.shape], args.vocab, 8192, dtype, seed=0).save_pretrained(tmp)
            shift_tensor_data(Path(tmp) / "model.safetensors")
            models = {"aligned": QWenLMHeadModel.from_pretrained(tmp, dtype=dtype).eval(),
                      "mapped": load_mapped(tmp, dtype)}
            for model in models.values():
                model.generation_config.eos_token_id = None
                model.generation_config.pad_token_id = 0
                decode(model, ids, 4)  # warm-up
            speed = {key: [] for key in models}
            tokens = {}
            for _ in range(args.repeats):
                for key, model in models.items():
                    rate, tokens[key] = decode(model, ids, args.new_tokens)
                    speed[key].append(rate)
            print(f"\n{name}: misaligned parameters: aligned {misaligned_fraction(models['aligned']):.0%}, "
                  f"mapped {misaligned_fraction(models['mapped']):.0%}")
            for key in models:
                print(f"  {key:<8} decode tok/s median {statistics.median(speed[key]):7.2f}  runs {[round(r, 2) for r in speed[key]]}")
            ratio = statistics.median(speed["aligned"]) / statistics.median(speed["mapped"])
            same = bool(torch.equal(tokens["aligned"], tokens["mapped"]))
            print(f"  ratio aligned/mapped: {ratio:.3f} (> 1: aligned faster) | greedy tokens identical: {same}")
            del models
    return 0


if __name__ == "__main__":
    sys.exit(main())
