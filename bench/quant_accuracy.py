"""What weight-only int8 / int4 cost in accuracy, on a model that has learned something.

    python bench/quant_accuracy.py                       # trains ~4 minutes, then measures
    python bench/quant_accuracy.py --cache /tmp/qa       # keeps the trained model for reruns
    python bench/quant_accuracy.py --smoke               # seconds: the code path only, no meaning

No trained Qwen weights can be downloaded here, and random weights give every token about the
same probability (a perplexity of about the vocabulary size, whatever the quantization). So the
bench first trains a small Qwen v1 model (same architecture and code as the published ones: RoPE,
SwiGLU, RMSNorm, untied lm_head; a smaller width and a compact vocabulary) on Python's own
standard-library sources, tokenized with the real Qwen vocabulary and mapped to the most frequent
ids. Every tenth file is held out. It then reports, for bf16 and each quantization of that bf16
model (what `from_pretrained(..., quantization=...)` gives a user):

- perplexity on the held-out files (non-overlapping windows; the prefill path of the layers);
- greedy decoding (the decode path: our kernels where they run) from prompts cut out of the
  held-out files: how many of the first 16 (and of all `--new-tokens`) tokens equal bf16's, and
  where a path parts from bf16's, how close bf16's own choice was there (its top-2 log-probability
  gap: a near-tie flips on a last-bit change).

The unquantized fp32 and fp16 models are measured the same way: how often they part from bf16's
tokens is the yardstick for the quantized rows (two 16-bit formats part at near-ties too).
"""

import argparse
import math
import os
import statistics
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import agreement  # noqa: E402  (bench/decode.py, next to this script)

from qwen import QWenConfig, QWenLMHeadModel, QWenTokenizer  # noqa: E402
from qwen.quantization import quantize_model  # noqa: E402
from qwen.vocab import find_qwen_tiktoken  # noqa: E402

QUANTIZATIONS = ("int8", "int4:32", "int4:64", "int4:128")


def corpus(max_train_tokens: int, max_eval_tokens: int):
    """(train ids, held-out ids) in the real Qwen vocabulary: the standard library's modules (its
    packages and tests included) in path order, every tenth file held out."""
    tokenizer = QWenTokenizer(find_qwen_tiktoken(None))
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    train, held_out = [], []
    for i, path in enumerate(files):
        target, limit = (held_out, max_eval_tokens) if i % 10 == 9 else (train, max_train_tokens)
        if len(target) >= limit:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        target.extend(tokenizer.encode(text, allowed_special="all")[: limit - len(target)])
    return train, held_out


def compact_vocabulary(train: list[int], size: int) -> dict[int, int]:
    """The `size - 1` most frequent training ids -> 0.. (in frequency order); the rest -> size - 1."""
    return {token: i for i, (token, _) in enumerate(Counter(train).most_common(size - 1))}


def remap(ids: list[int], table: dict[int, int], size: int) -> torch.Tensor:
    return torch.tensor([table.get(t, size - 1) for t in ids])


def train_model(args, train_ids: torch.Tensor) -> QWenLMHeadModel:
    torch.manual_seed(0)
    config = QWenConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, kv_channels=args.hidden // args.heads,
                        intermediate_size=args.hidden * 16 // 3 // 2 * 2, seq_length=args.seq,
                        max_position_embeddings=4096, fp32=True)
    model = QWenLMHeadModel(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    rows = (len(train_ids) - 1) // args.seq
    windows = train_ids[: rows * args.seq].view(rows, args.seq)
    generator = torch.Generator().manual_seed(0)
    start, step, losses = time.perf_counter(), 0, []
    while step < args.steps and time.perf_counter() - start < args.minutes * 60:
        # Short warm-up, then a cosine decay to a tenth over the budget (steps or minutes, whichever
        # runs out first): the low-rate end sharpens the next-token distributions.
        done = max(step / args.steps, (time.perf_counter() - start) / (args.minutes * 60))
        lr = args.lr * min(1.0, (step + 1) / 20) * (0.55 + 0.45 * math.cos(math.pi * min(done, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows[torch.randint(rows, (args.batch,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            print(f"  step {step}: loss {statistics.mean(losses[-25:]):.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    print(f"trained {step} steps x {args.batch} x {args.seq} tokens in {time.perf_counter() - start:.0f} s; "
          f"loss {losses[0]:.2f} -> {statistics.mean(losses[-10:]):.2f}")
    return model.eval()


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    rows = len(ids) // window
    total, count = 0.0, 0
    for row in ids[: rows * window].view(rows, window).split(4):
        logits = model(input_ids=row).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), row[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + nll.item(), count + row[:, 1:].numel()
    return math.exp(total / count)


@torch.inference_mode()
def greedy(model, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    out = []
    for prompt in prompts:
        ids = model.generate(prompt[None], do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             eos_token_id=None, pad_token_id=0, top_p=None, top_k=None, repetition_penalty=None)
        out.append(ids[0, len(prompt):].tolist())
    return out


@torch.inference_mode()
def top2_gaps(model, prompts: list[torch.Tensor], tokens: list[list[int]]) -> list[list[float]]:
    """Per prompt, at each new position: the model's log-probability gap between its best and its
    second-best next token, teacher-forced along `tokens` (a small gap is a near-tie)."""
    gaps = []
    for prompt, new in zip(prompts, tokens):
        ids = torch.cat([prompt, torch.tensor(new[:-1], dtype=prompt.dtype)])[None]
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 :].float().log_softmax(-1)
        top = logits.topk(2, dim=-1).values
        gaps.append((top[:, 0] - top[:, 1]).tolist())
    return gaps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192, help="compact vocabulary size")
    parser.add_argument("--seq", type=int, default=128, help="training window")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--minutes", type=float, default=4.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=100_000, help="training step budget")
    parser.add_argument("--train-tokens", type=int, default=4_000_000)
    parser.add_argument("--eval-tokens", type=int, default=32_768)
    parser.add_argument("--prompts", type=int, default=8, help="greedy prompts (cut from held-out text)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache", help="directory to keep (and reuse) the trained model in")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="a few seconds: tiny sizes, two training steps")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.heads, args.vocab, args.seq, args.batch = 64, 1, 2, 512, 32, 2
        args.steps, args.train_tokens, args.eval_tokens, args.prompts, args.new_tokens = 2, 4096, 1024, 2, 4
    if args.threads:
        torch.set_num_threads(args.threads)

    from qwen import kernels
    print(f"cpu: {platform_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"kernels: {kernels.backend()}")
    train_ids, held_out = corpus(args.train_tokens, args.eval_tokens)
    table = compact_vocabulary(train_ids, args.vocab)
    train_t, eval_t = remap(train_ids, table, args.vocab), remap(held_out, table, args.vocab)
    print(f"corpus: {len(train_t)} training tokens, {len(eval_t)} held-out tokens; vocabulary {args.vocab} "
          f"(the rest: {100 * (eval_t == args.vocab - 1).float().mean():.1f}% of held-out tokens)")

    cached = Path(args.cache) if args.cache else None
    if cached and (cached / "config.json").exists():
        model = QWenLMHeadModel.from_pretrained(cached, dtype=torch.float32).eval()
        print(f"loaded the trained model from {cached}")
    else:
        model = train_model(args, train_t)
        if cached:
            model.save_pretrained(cached)

    window = min(256, args.seq * 2)
    prompts = [eval_t[i * window: i * window + 32] for i in range(args.prompts)]
    # fp32 and fp16 are the yardstick: how often two unquantized paths already part from bf16's
    fp32_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {"fp32": (perplexity(model, eval_t, window), greedy(model, prompts, args.new_tokens))}
    model = model.to(torch.bfloat16)
    reference = greedy(model, prompts, args.new_tokens)
    results["bf16"] = (perplexity(model, eval_t, window), reference)
    fp16 = QWenLMHeadModel(model.config)
    fp16.load_state_dict(fp32_state)
    fp16 = fp16.to(torch.float16).eval()
    results["fp16"] = (perplexity(fp16, eval_t, window), greedy(fp16, prompts, args.new_tokens))
    del fp16, fp32_state
    gaps = top2_gaps(model, prompts, reference)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in QUANTIZATIONS:
        if method.startswith("int4") and args.hidden % int(method.split(":")[1]):
            continue
        quantized = QWenLMHeadModel(model.config).to(torch.bfloat16)
        quantized.load_state_dict(state)
        quantize_model(quantized.eval(), method)
        results[method] = (perplexity(quantized, eval_t, window), greedy(quantized, prompts, args.new_tokens))

    base = results["bf16"][0]
    print(f"\nheld-out perplexity (window {window}) and greedy agreement with bf16 over {len(prompts)} prompts "
          f"of 32 tokens, {args.new_tokens} new tokens each:")
    print(f"{'weights':<10} {'perplexity':>11} {'vs bf16':>8} {'first 16 equal':>15} {'all equal':>10} "
          f"{'median agreeing prefix':>23}  where a path parts (prompt #, position): bf16's top-2 gap there")
    for name, (ppl, tokens) in results.items():
        prefixes = [agreement(a, b) for a, b in zip(tokens, reference)]
        first16 = sum(p >= min(16, args.new_tokens) for p in prefixes)
        parted = ", ".join(f"#{i} at {p}: {gaps[i][p]:.3f}" for i, p in enumerate(prefixes)
                           if p < args.new_tokens) or "-"
        print(f"{name:<10} {ppl:>11.3f} {100 * (ppl / base - 1):>+7.2f}% {first16:>9}/{len(prompts):<5} "
              f"{sum(p == args.new_tokens for p in prefixes):>4}/{len(prompts):<5} {statistics.median(prefixes):>23}  "
              f"{parted}")
    every = sorted(g for row in gaps for g in row)
    print(f"\nbf16's top-2 log-probability gap over all {len(every)} greedy positions: median {statistics.median(every):.3f}, "
          f"{sum(g < 0.05 for g in every)} under 0.05 (near-ties, where a last-bit change can flip the choice)")


def platform_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = "unknown"
    except OSError:
        name = "unknown"
    return f"{name} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} logical CPUs"


if __name__ == "__main__":
    main()
