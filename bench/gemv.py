"""Small-M bf16/fp16 matrix products on CPU: torch's F.linear against qwen.kernels.gemv, in GB/s of
weight bytes read, next to the machine's measured memory-read bandwidth.

    python bench/gemv.py [--threads 2] [--rows 1 4 8] [--dtypes bfloat16 float16] [--smoke]
    python bench/gemv.py --dtype int8       # weight-only int8: torch._weight_int8pack_mm vs kernels.int8_gemv
    python bench/gemv.py --dtype int4       # int4, group 64 (int4:32, int4:128, int4:256): torch's
                                            # _weight_int4pack_mm_for_cpu vs kernels.int4_gemv

Shapes are the Qwen-1.8B layers (N, K): c_attn (6144, 2048), attn c_proj (2048, 2048), w1/w2
(5504, 2048), mlp c_proj (2048, 5504) and lm_head (151936, 2048). Each weight is cycled through
enough copies to cover 256 MiB, so that every call reads it from memory as decoding does (a single
8 MiB matrix would sit in the last-level cache and flatter both kernels). torch and ours alternate
call by call; the table gives the median time, the weight GB/s, that GB/s as a share of the
measured read bandwidth (`t.sum()` over a 1 GiB fp32 tensor, median of 5, measured before and after the
table), and torch time / ours. A kernel can read faster than `t.sum()` (whose fp32 reduction is not
quite memory bound on every CPU), so shares above 100% are possible.
With --dtype int8 / int4 the weights are those of qwen.quantization's Int8Linear / Int4Linear
(bf16 activations), and each kernel's GB/s counts the bytes it reads: ours the canonical buffers
(int8: qweight + fp32 scale; int4: packed nibbles + fp32 scales + fp32 mins), torch's its own copies
(int8: qweight + bf16 scale; int4: its repacked nibbles + bf16 scale/zero pairs); the speed-up is the
ratio of the times.
--smoke runs one tiny shape in a few seconds (a check that the script works, not a measurement).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import memory_read_bandwidth  # noqa: E402  (bench/decode.py, next to this script)

from qwen import kernels  # noqa: E402
from qwen.machine import cpu_model  # noqa: E402

LAYERS = [
    ("c_attn", 6144, 2048),
    ("attn.c_proj", 2048, 2048),
    ("mlp.w1/w2", 5504, 2048),
    ("mlp.c_proj", 2048, 5504),
    ("lm_head", 151936, 2048),
]
SMOKE_LAYERS = [("smoke", 96, 160)]
SMOKE_QUANTIZED = [("smoke", 96, 256)]  # K: a multiple of every int4 group size
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
COVER_BYTES = 256 * 2**20  # weight copies per layer: at least this many bytes, well above the L3 cache


def time_pair(x, weights, calls, functions=None):
    """Median seconds per call of F.linear and of kernels.gemv (or of `functions`: {"torch": f,
    "ours": g}, each called as f(x, weight)), alternating call by call. Every call reads the next
    weight copy, so that no call finds its weight in cache from the call before."""
    runs = {"torch": [], "ours": []}
    functions = functions or {"torch": F.linear, "ours": kernels.gemv}
    turn = 0
    for name, function in functions.items():  # warm-up: one pass over the copies
        for weight in weights:
            function(x, weight)
    for _ in range(calls):
        for name, function in functions.items():
            weight = weights[turn % len(weights)]
            turn += 1
            start = time.perf_counter()
            function(x, weight)
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in runs.items()}


QUANTIZED = ("int8", "int4", "int4:32", "int4:64", "int4:128", "int4:256")


def quantized_layer(kind: str, n: int, k: int):
    """(layer, ours, torch's, ours' bytes, torch's bytes): a random Int8Linear / Int4Linear with torch's
    backend copies built whatever backend runs, and the two kernels as f(x, layer)."""
    from qwen.quantization import Int4Linear, Int8Linear

    linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
    if kind == "int8":
        layer = Int8Linear.from_linear(linear)
        ours = lambda x, q: kernels.int8_gemv(x, q.qweight, q.scale)  # noqa: E731
        torch_bytes = layer.qweight.nbytes + layer.scale_bf16.nbytes
        return layer, ours, lambda x, q: q._kernel(x), layer.qweight.nbytes + layer.scale.nbytes, torch_bytes
    group = int(kind.partition(":")[2] or 64)
    layer = Int4Linear.from_linear(linear, group)
    layer._own_kernel_runs = lambda: False  # torch's packed copy, for its kernel
    layer.refresh_backend()
    ours = lambda x, q: kernels.int4_gemv(x, q.packed, q.scales, q.mins, group)  # noqa: E731
    ours_bytes = layer.packed.nbytes + layer.scales.nbytes + layer.mins.nbytes
    return layer, ours, lambda x, q: q._kernel(x), ours_bytes, layer.packed_cpu.nbytes + layer.scale_zeros.nbytes


def quantized_rows(kind, layer_name, n, k, args, bandwidth, summary):
    """One layer shape in `kind` (int8 / int4[:g]): a table row per M, torch's kernel against ours."""
    import copy

    first, ours, theirs, ours_bytes, torch_bytes = quantized_layer(kind, n, k)
    layers = [first] + [copy.deepcopy(first) for _ in range(max(1, -(-COVER_BYTES // ours_bytes)) - 1)]
    if args.smoke:
        layers = [first]
    calls = max(7, min(args.max_calls, int(2e9 // ours_bytes)))
    for m in args.rows:
        x = torch.randn(m, k).to(torch.bfloat16)
        times = time_pair(x, layers, calls, {"torch": theirs, "ours": ours})
        cells = [f"{times[name] * 1e3:>8.3f} {size / times[name] / 1e9:>5.1f} {size / times[name] / bandwidth:>4.0%}"
                 for name, size in (("torch", torch_bytes), ("ours", ours_bytes))]
        print(f"{layer_name:<12} {n:>6} {k:>5} {kind:<8} {m:>2} | {cells[0]} | {cells[1]} | "
              f"{times['torch'] / times['ours']:.2f}x", flush=True)
        summary.setdefault((kind, m), []).append(((torch_bytes, ours_bytes), times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8], help="activation rows M")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16", "float16"])
    parser.add_argument("--dtype", choices=QUANTIZED, help="weight-only quantized weights instead of --dtypes "
                        "(int4 = int4:64)")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="tensor size for the t.sum() bandwidth")
    parser.add_argument("--max-calls", type=int, default=60, help="timed calls per cell at most (7 at least)")
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, quickly (checks the script runs)")
    args = parser.parse_args(argv)
    layers = SMOKE_LAYERS if args.smoke else LAYERS
    if args.smoke:
        args.rows, args.bandwidth_gib, args.max_calls = [1, 3], 0.05, 7

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    backend = kernels.backend()
    ready = time.perf_counter() - start
    print(f"cpu: {cpu_model()} | capability {torch.backends.cpu.get_cpu_capability()} | "
          f"torch threads {torch.get_num_threads()} | cores {os.cpu_count()}")
    print(f"torch {torch.__version__} | load average {os.getloadavg()[0]:.2f} (other processes skew the numbers)")
    print(f"qwen.kernels backend: {backend} (ready in {ready:.1f} s: a first run builds the extension, "
          f"later ones load it from {kernels.cache_dir()})")
    bandwidth = memory_read_bandwidth(args.bandwidth_gib)
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s "
          f"(t.sum() over {args.bandwidth_gib:g} GiB fp32, median of 5)")
    print()
    header = (f"{'layer':<12} {'N':>6} {'K':>5} {'dtype':<8} {'M':>2} | {'torch ms':>8} {'GB/s':>5} {'%bw':>4} | "
              f"{'ours ms':>8} {'GB/s':>5} {'%bw':>4} | ours/torch speed-up")
    print(header)
    print("-" * len(header))
    summary = {}
    if args.dtype:
        args.dtypes = [args.dtype]
    with torch.inference_mode():
        for dtype_name in args.dtypes:
            if dtype_name in QUANTIZED:
                for layer, n, k in SMOKE_QUANTIZED if args.smoke else layers:
                    quantized_rows(dtype_name, layer, n, k, args, bandwidth, summary)
                continue
            dtype = DTYPES[dtype_name]
            for layer, n, k in layers:
                size = n * k * 2
                first = torch.randn(n, k).to(dtype)
                weights = [first] + [first.clone() for _ in range(max(1, -(-COVER_BYTES // size)) - 1)]
                if args.smoke:
                    weights = [first]
                calls = max(7, min(args.max_calls, int(4e9 // size)))
                for m in args.rows:
                    x = torch.randn(m, k).to(dtype)
                    times = time_pair(x, weights, calls)
                    cells = [f"{times[name] * 1e3:>8.3f} {size / times[name] / 1e9:>5.1f} "
                             f"{size / times[name] / bandwidth:>4.0%}" for name in ("torch", "ours")]
                    print(f"{layer:<12} {n:>6} {k:>5} {dtype_name:<8} {m:>2} | {cells[0]} | {cells[1]} | "
                          f"{times['torch'] / times['ours']:.2f}x", flush=True)
                    summary.setdefault((dtype_name, m), []).append((size, times))
                del weights, first
    print()
    print("all layers together (bytes of every layer / sum of median times), share of the measured bandwidth:")
    for (dtype_name, m), cells in summary.items():
        sizes = [size if isinstance(size, tuple) else (size, size) for size, _ in cells]  # (torch's, ours)
        torch_time = sum(times["torch"] for _, times in cells)
        ours_time = sum(times["ours"] for _, times in cells)
        rates = {"torch": sum(s[0] for s in sizes) / torch_time, "ours": sum(s[1] for s in sizes) / ours_time}
        print(f"  {dtype_name:<8} M={m:<2}: "
              + ", ".join(f"{name} {rate / 1e9:5.1f} GB/s ({rate / bandwidth:4.0%})" for name, rate in rates.items())
              + f", ours/torch speed-up {torch_time / ours_time:.2f}x")
    again = memory_read_bandwidth(args.bandwidth_gib)
    print(f"memory read bandwidth again: {again / 1e9:.1f} GB/s (the % columns use the first; a large change means "
          f"the machine was busy) | load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
