"""The int8 KV-cache CUDA kernels against the torch path (dequantize, then matmul), and what a token
of context costs in the int8 cache against the 16-bit one.

    python bench/cache_kernels.py [--contexts 1024 4096 16384 32768] [--batch 1 8] [--dtypes float16 bfloat16]
                                  [--positions 1 4 16]

One step of one attention layer of Qwen-7B's shape (32 heads of 128) is timed with CUDA events,
median of --repeats after a warm-up, both paths interleaved in every repeat: qk (query @ keys^T) and
pv (probs @ values) over a cache of `context` tokens that is, as in the model, a view of a longer
buffer. A decode step by default; --positions (new tokens per step) shows where the kernels stop
paying, which sets modeling_qwen.CACHE_KERNEL_MAX_POSITIONS. It prints the medians, the ratio
torch/kernels (> 1: the kernels are faster) and the largest difference between the two paths
relative to the largest output. The bytes per token of context are measured from the engine's real
cache buffers for the 7B shape (all 32 layers), on the GPU when there is one. Without CUDA only the
memory part runs, and it says so.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import print_machine  # noqa: E402
from memory import kv_bytes_per_token  # noqa: E402

from qwen import QWenConfig, cache_kernels  # noqa: E402
from qwen.modeling_qwen import quantize_kv  # noqa: E402

HEADS, HEAD_DIM, LAYERS = 32, 128, 32  # Qwen-7B
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cache_view(batch: int, context: int, dtype: torch.dtype, spare: int = 256):
    """(keys, scale, zero) over `context` tokens: views of a [batch, heads, context + spare] buffer."""
    x = torch.randn(batch, HEADS, context + spare, HEAD_DIM, device="cuda", dtype=dtype)
    return [t.narrow(2, 0, context) for t in quantize_kv(x)]


def time_ms(run, repeats: int) -> list[list[float]]:
    """Per repeat, the milliseconds of each callable in `run` (interleaved), after one warm-up."""
    for fn in run:
        fn()
    times = []
    for _ in range(repeats):
        row = []
        for fn in run:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            row.append(start.elapsed_time(end))
        times.append(row)
    return times


def compare(ext, dtype: torch.dtype, batch: int, context: int, positions: int, repeats: int) -> dict:
    torch.manual_seed(context + batch)
    keys, values = cache_view(batch, context, dtype), cache_view(batch, context, dtype)
    query = torch.randn(batch, HEADS, positions, HEAD_DIM, device="cuda", dtype=dtype)
    probs = torch.softmax(torch.randn(batch, HEADS, positions, context, device="cuda"), -1).to(dtype)
    paths = {
        "kernels": lambda: (cache_kernels.qk(ext, query, *keys), cache_kernels.pv(ext, probs, *values)),
        "torch": lambda: (cache_kernels.qk_torch(query, *keys), cache_kernels.pv_torch(probs, *values)),
    }
    times = time_ms(list(paths.values()), repeats)
    medians = {name: statistics.median(row[i] for row in times) for i, name in enumerate(paths)}
    got, want = paths["kernels"](), paths["torch"]()
    error = max(((g.float() - w.float()).abs().max() / w.float().abs().max()).item() for g, w in zip(got, want))
    return {**medians, "error": error}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float16", "bfloat16"])
    parser.add_argument("--positions", type=int, nargs="+", default=[1], help="new tokens per step")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the CPU bandwidth probe")
    args = parser.parse_args(argv)
    print_machine(args.bandwidth_gib)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        print(f"gpu: {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")

    config = QWenConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                        kv_channels=HEAD_DIM)
    for name in args.dtypes:
        kv = kv_bytes_per_token(config, DTYPES[name], device)
        print(f"KV cache per token of context, 7B shape, {name} model, on {device}: 16-bit "
              f"{kv['plain'] / 1024:.1f} KiB, int8 {kv['int8'] / 1024:.1f} KiB "
              f"(int8/16-bit {kv['int8'] / kv['plain']:.3f})")

    if not cuda:
        print("no CUDA device: the kernel timings need one (the torch path is what runs here)")
        return 0
    ext = cache_kernels.load(None)
    if ext is None:
        print("the CUDA kernels did not build (see the log above)")
        return 1
    print(f"one step of one attention layer ({HEADS} heads x {HEAD_DIM}), qk + pv, median of "
          f"{args.repeats} (ms); ratio torch/kernels (> 1: kernels faster)")
    print(f"{'dtype':9} {'batch':>5} {'positions':>9} {'context':>8} {'kernels':>9} {'torch':>9} {'ratio':>7} "
          f"{'max rel err':>12}")
    for name in args.dtypes:
        for batch in args.batch:
            for positions in args.positions:
                for context in args.contexts:
                    r = compare(ext, DTYPES[name], batch, context, positions, args.repeats)
                    print(f"{name:9} {batch:5d} {positions:9d} {context:8d} {r['kernels']:9.3f} {r['torch']:9.3f} "
                          f"{r['torch'] / r['kernels']:7.2f} {r['error']:12.2e}")
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
