"""Prefill on a CPU without native 16-bit products: torch's 16-bit GEMM, torch's fp32 GEMM, ours.

    python bench/prefill.py --shape 1_8b --layers 6 --dtype float16 --prompt-len 512
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 QWEN_KERNELS=avx2 \\
        python bench/prefill.py --shape 1_8b --layers 6 --dtype bfloat16     # an AVX2-only CPU, simulated
    python bench/prefill.py --smoke

Where the CPU has no native products for a 16-bit dtype (fp16 without AMX-FP16; bf16 without
AVX512_BF16 or AMX; `qwen.quantization.native_cpu_gemm`), torch emulates them in its 16-bit GEMM.
There our prefill multiplies in fp32 (16-bit models and the int8/int4 layers' many-rows path
alike): where qwen.kernels' own GEMM runs (cpu_gemm.cpp, widening or dequantizing the weights as it
packs them: the avx2 kernel path, and AMD Zen 4) with it, elsewhere with torch's fp32 GEMM on
weights widened a chunk at a time. This times a prompt's forward (the cache filled, logits for the
last position, as generate() does) each way in one process, alternating ("fp32 qwen" where our GEMM
runs), and prints the medians, min-max, the ratios, and how far each path's last logits are from
the same model computed in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import DTYPES, QUANTIZED, SHAPES, print_machine, random_model  # noqa: E402  (bench/decode.py)

import qwen.quantization as Q  # noqa: E402
from qwen import kernels  # noqa: E402
from qwen.kernels.linear import use_kernels  # noqa: E402


@torch.inference_mode()
def last_logits(model, ids) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[:, -1].float()
    return time.perf_counter() - start, logits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1_8b")
    parser.add_argument("--layers", type=int, help="override the shape's layer count")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", *QUANTIZED], default="float16",
                        help="16-bit weights, or weight-only int8/int4 (bf16 activations)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few seconds (checks the script runs)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.layers, args.prompt_len, args.repeats, args.vocab = "tiny", None, 40, 1, 4096
    torch.set_num_threads(args.threads)
    print_machine(0.25 if args.smoke else 1.0)

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    quantized = args.dtype in QUANTIZED
    activations = torch.bfloat16 if quantized else DTYPES[args.dtype]
    model = random_model(shape, args.vocab, 4096, args.dtype, seed=0)
    use_kernels(model)
    ids = torch.randint(0, args.vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    print(f"shape {args.shape} ({shape['layers']} layers), {args.dtype}, {args.prompt_len}-token prompt; "
          f"{activations} products native on this CPU: {Q.native_cpu_gemm(activations)} "
          f"(so by default prefill multiplies in {Q.gemm_dtype(activations, 'cpu')})")
    name = str(activations).removeprefix("torch.")
    # (torch's 16-bit GEMM?, qwen.kernels' GEMM?) per mode: ours where kernels.gemm_runs().
    modes = {f"torch {name}": (True, False), "fp32 torch": (False, False)}
    if kernels.gemm_runs():
        modes["fp32 qwen"] = (False, True)
    else:
        print(f"(qwen.kernels' GEMM does not run here: path {kernels.backend()}, see kernels.gemm_runs)")
    saved, saved_gemm = dict(Q._NATIVE_GEMM), kernels.GEMM
    seconds = {mode: [] for mode in modes}
    logits = {}
    try:
        for repeat in range(args.repeats + 1):  # the first round warms up (scratch buffers, oneDNN)
            for mode, (native, ours) in modes.items():
                Q._NATIVE_GEMM[activations], kernels.GEMM = native, ours
                elapsed, logits[mode] = last_logits(model, ids)
                if repeat:
                    seconds[mode].append(elapsed)
    finally:
        Q._NATIVE_GEMM.clear()
        Q._NATIVE_GEMM.update(saved)
        kernels.GEMM = saved_gemm
    reference = last_logits(model.float(), ids)[1] if not quantized else None

    print(f"\n{'GEMM':<16} {'median ms':>10} {'min-max':>16} {'tok/s':>8} {'max |logit - fp32 model|':>26}")
    for mode, times in seconds.items():
        error = f"{(logits[mode] - reference).abs().max().item():.4f}" if reference is not None else "-"
        print(f"{mode:<16} {1e3 * statistics.median(times):>10.1f} "
              f"{f'{1e3 * min(times):.0f}-{1e3 * max(times):.0f}':>16} "
              f"{args.prompt_len / statistics.median(times):>8.1f} {error:>26}")
    median = {mode: statistics.median(times) for mode, times in seconds.items()}
    print(f"\nfp32 products (torch's GEMM): {median[f'torch {name}'] / median['fp32 torch']:.2f}x the speed of "
          f"torch's {name} GEMM")
    if "fp32 qwen" in median:
        print(f"fp32 products (qwen's GEMM): {median['fp32 torch'] / median['fp32 qwen']:.2f}x the speed of torch's "
              f"fp32 GEMM, {median[f'torch {name}'] / median['fp32 qwen']:.2f}x that of its {name} GEMM")


if __name__ == "__main__":
    main()
