"""Fine-tuning cost on this machine: seconds per optimizer step and peak memory, LoRA and full.

    python bench/finetune.py                          # 0.5B shape, LoRA and full, lengths 256 512 1024
    python bench/finetune.py --methods lora --lengths 256 --steps 2

A random model of the chosen shape (no checkpoint needed; the cost does not depend on the weights)
trains on random tokens as finetune.py would: gradient checkpointing, batch 1, AdamW (torch), LoRA
r=64/alpha 16 on c_attn/c_proj/w1/w2 through PEFT (`lora`, the chat-model rule) or every weight
(`full`). Each configuration runs in its own process, so its peak RSS is its own. The original
README's profile (one A100-80G, batch 1 x accumulation 8, flash attention 2, s/it per 8 sequences)
is printed beside ours for orientation only: different hardware, model size and step definition
(ours is one sequence per step), so no ratio is claimed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SHAPES = {
    # hidden, layers, heads, intermediate_size (both SwiGLU branches together, as Qwen v1's config counts it)
    "0_5b": (1024, 24, 16, 5632),
    "tiny": (64, 2, 4, 340),
}

# The original README, "Profiling of Memory and Speed": GPU memory / seconds per iteration
# (batch 1, gradient accumulation 8) on A100-SXM4-80G, at 256 / 512 / 1024 tokens.
ORIGINAL_A100 = {
    ("1.8B", "LoRA"): ("6.7G / 1.0s/it", "7.4G / 1.0s/it", "8.4G / 1.1s/it"),
    ("1.8B", "LoRA (emb)"): ("13.7G / 1.0s/it", "14.0G / 1.0s/it", "14.0G / 1.1s/it"),
    ("1.8B", "Full-parameter"): ("43.5G / 2.1s/it", "43.5G / 2.2s/it", "43.5G / 2.2s/it"),
    ("7B", "LoRA"): ("20.1G / 1.2s/it", "20.4G / 1.5s/it", "21.5G / 2.8s/it"),
    ("7B", "LoRA (emb)"): ("33.7G / 1.4s/it", "34.1G / 1.6s/it", "35.2G / 2.9s/it"),
    ("7B", "Full-parameter (2 GPUs)"): ("139.2G / 4.0s/it", "148.0G / 4.0s/it", "162.0G / 4.5s/it"),
}


def measure(shape: str, method: str, length: int, steps: int, dtype: str) -> dict:
    """One configuration, in this process: seconds per step (after one warm-up step) and peak RSS."""
    import torch

    from qwen.configuration_qwen import QWenConfig
    from qwen.modeling_qwen import QWenLMHeadModel

    hidden, layers, heads, intermediate = SHAPES[shape]
    torch.manual_seed(0)
    config = QWenConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        kv_channels=hidden // heads, intermediate_size=intermediate, seq_length=2048,
                        use_cache=False)
    model = QWenLMHeadModel(config).to(getattr(torch, dtype))
    model.gradient_checkpointing_enable()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=["c_attn", "c_proj", "w1", "w2"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, 151643, (1, length))
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
    return {
        "shape": shape, "method": method, "length": length, "dtype": dtype,
        "trainable": sum(p.numel() for p in params), "params": sum(p.numel() for p in model.parameters()),
        "s_per_step": sorted(times)[len(times) // 2],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0_5b")
    parser.add_argument("--methods", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (median shown)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args(argv)
    if args.steps < 1 or any(n < 8 for n in args.lengths):
        parser.error("--steps must be at least 1 and every length at least 8")
    if args.one:
        method, length = args.one.split(":")
        print(json.dumps(measure(args.shape, method, int(length), args.steps, args.dtype)))
        return 0

    import torch

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} (other processes skew the timings)")
    hidden, layers, heads, _ = SHAPES[args.shape]
    print(f"model: {args.shape} shape (hidden {hidden}, {layers} layers, {heads} heads), {args.dtype}, batch 1, "
          "gradient checkpointing, AdamW")
    print(f"{'method':<8}{'length':>8}{'trainable':>14}{'s/step':>10}{'peak RSS':>12}")
    for method in args.methods:
        for length in args.lengths:
            proc = subprocess.run(
                [sys.executable, __file__, "--shape", args.shape, "--steps", str(args.steps), "--dtype", args.dtype,
                 "--one", f"{method}:{length}"], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"{method:<8}{length:>8}  failed: {last}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{method:<8}{length:>8}{r['trainable']:>14,}{r['s_per_step']:>10.2f}{r['peak_rss_gib']:>10.2f} GiB")
    print("\nThe original README (A100-SXM4-80G, batch 1 x accumulation 8, flash attention 2; GPU memory / s per it):")
    print(f"{'model':<6}{'method':<26}{'256':>18}{'512':>18}{'1024':>18}")
    for (size, method), cells in ORIGINAL_A100.items():
        print(f"{size:<6}{method:<26}" + "".join(f"{c:>18}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
