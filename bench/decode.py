"""Prefill latency and greedy decode speed: our Qwen v1 model against transformers' Qwen2ForCausalLM
holding the same weights (exported in memory by qwen.tools.export_qwen2), measured in one run.

    python bench/decode.py [--shape {default,1_8b}] [--dtype bfloat16] [--prompt-len 256] [--new-tokens 64]
    python bench/decode.py --shape 1_8b --dtype int8 --batch 8     # weight-only int8 (int4, int4:32...), 8 rows

It first prints the machine (CPU model, torch's CPU capability, threads) and a measured memory-read
bandwidth, then the model's weight bytes and the decode roofline they imply, then medians for both
models and the ratio ours/qwen2. With --dtype int8 / int4[:group] ours holds weight-only quantized
weights (bf16 activations) while qwen2 keeps bf16: the ratio is then the gain over transformers' bf16.
--batch B decodes B prompts at once (tokens/s counts all rows). The default shape needs about 2 GB in bf16 (4 GB in fp32) for the two
models; --shape 1_8b (Qwen-1.8B) needs about 8 GB in bf16 (16 GB in fp32).
--no-baseline times ours alone (no qwen2 copy): --shape 1_8b --dtype int8 then needs about 4 GB (the
bf16 model, quantized layer by layer). QWEN_KERNELS=off in the environment gives torch's kernels
(for int8/int4: torch's weight-only kernels) for a before/after comparison; --vs-torch-kernels
(int8/int4, implies --no-baseline) times both in one process, interleaved ("torchq": the same
model with qwen.kernels' int8/int4 GEMV switched off; int4 adds torch's packed copy, +0.56 byte per
weight), which a busy machine skews less than two separate runs.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import transformers  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from qwen import QWenConfig, QWenLMHeadModel  # noqa: E402
from qwen.tools.export_qwen2 import to_qwen2  # noqa: E402

SHAPES = {
    "default": dict(hidden=1024, layers=12, heads=16, intermediate=5504),
    "half_b": dict(hidden=1024, layers=24, heads=16, intermediate=5504),  # ~0.6B with the full vocabulary
    "1_8b": dict(hidden=2048, layers=24, heads=16, intermediate=11008),  # Qwen-1.8B
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=256),  # for smoke tests of the scripts
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZED = ("int8", "int4", "int4:32", "int4:64", "int4:128")  # weight-only, bf16 activations


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s reading a `gib` GiB fp32 tensor with t.sum(), median of `repeats` after a warm-up."""
    t = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    t.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - start)
    return t.numel() * 4 / statistics.median(times)


def print_machine(bandwidth_gib: float = 1.0) -> float:
    """Print what the numbers depend on (CPU, torch's kernels, threads, load, versions) and the
    measured read bandwidth, which it returns in bytes/s."""
    print(f"cpu: {cpu_model()} | capability {torch.backends.cpu.get_cpu_capability()} | "
          f"torch threads {torch.get_num_threads()} | cores {os.cpu_count()}")
    print(f"torch {torch.__version__} | transformers {transformers.__version__} | python {platform.python_version()} "
          f"| load average {os.getloadavg()[0]:.2f} (other processes skew the numbers)")
    bandwidth = memory_read_bandwidth(bandwidth_gib)
    print(f"memory read bandwidth: {bandwidth / 1e9:.1f} GB/s (t.sum() over {bandwidth_gib:g} GiB fp32, median of 5)")
    return bandwidth


# ----------------------------------------------------------------------------- models


def build_models(shape: dict, vocab: int, seq_length: int, dtype: torch.dtype, seed: int):
    """A random Qwen v1 model in `dtype` and its Qwen2 export."""
    ours = random_qwen(shape, vocab, seq_length, dtype, seed)
    return ours, to_qwen2(ours)


def random_qwen(shape: dict, vocab: int, seq_length: int, dtype: torch.dtype, seed: int) -> QWenLMHeadModel:
    """A random Qwen v1 model in `dtype` (initialised directly in it, no fp32 copy), never stopping early."""
    config = QWenConfig(
        vocab_size=vocab,
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        kv_channels=shape["hidden"] // shape["heads"],
        intermediate_size=shape["intermediate"],
        seq_length=seq_length,
        max_position_embeddings=seq_length,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp32=dtype == torch.float32,
        use_flash_attn=False,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        ours = QWenLMHeadModel(config).eval()
    finally:
        torch.set_default_dtype(previous)
    ours.generation_config.eos_token_id = None  # a random model must not stop early
    ours.generation_config.pad_token_id = 0
    return ours


def random_model(shape: dict, vocab: int, seq_length: int, dtype_name: str, seed: int) -> QWenLMHeadModel:
    """random_qwen for a bench's --dtype: a 16-bit dtype as is, or int8/int4 weights quantized from
    the bf16 model (bf16 activations), as from_pretrained(..., quantization=...) gives them."""
    if dtype_name not in QUANTIZED:
        return random_qwen(shape, vocab, seq_length, DTYPES[dtype_name], seed)
    from qwen.quantization import quantize_model

    return quantize_model(random_qwen(shape, vocab, seq_length, torch.bfloat16, seed), dtype_name)


def weight_bytes(model) -> tuple[int, int]:
    """(all weight bytes, bytes read per decode step): the embedding table is only gathered (one row).
    Quantized layers count what their kernel reads (`bytes_read`), not the copies they keep."""
    total = read = 0
    for module in model.modules():
        own = [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))]
        size = sum(t.numel() * t.element_size() for t in own)
        total += size
        read += getattr(module, "bytes_read", lambda: size)()
    embedding = model.get_input_embeddings().weight
    return total, read - embedding.numel() * embedding.element_size()


# ----------------------------------------------------------------------------- measurements


class _TorchKernels:
    """The same quantized model, run with qwen.kernels' int8/int4 GEMV switched off in qwen.quantization
    (torch's weight-only kernels; int4 gets torch's packed copy built here): a before/after in one
    process, interleaved, so that the load of a shared machine hits both alike."""

    def __init__(self, model):
        import qwen.quantization as Q

        self.model, self.Q, self._own = model, Q, Q._own_kernels
        for module in model.modules():
            if isinstance(module, Q.Int4Linear):
                module._own_kernel_runs = lambda: False
                module.refresh_backend()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def _switched(self, function, *args, **kwargs):
        self.Q._own_kernels = lambda weight: None
        try:
            return function(*args, **kwargs)
        finally:
            self.Q._own_kernels = self._own

    def __call__(self, *args, **kwargs):
        return self._switched(self.model, *args, **kwargs)

    def generate(self, *args, **kwargs):
        return self._switched(self.model.generate, *args, **kwargs)


class _Clock(BaseStreamer):
    """Timestamps from generate(): the first put() carries the prompt, each later one a new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


@torch.inference_mode()
def prefill_seconds(model, ids) -> float:
    # As generate() does: fill the cache, logits for the last position only.
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


@torch.inference_mode()
def decode(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(tokens/s after the first new token, the generated ids) for a greedy generate()."""
    clock = _Clock()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        streamer=clock,
    )
    first, last = clock.times[1], clock.times[-1]
    return ids.shape[0] * (len(clock.times) - 2) / (last - first), out[:, ids.shape[1]:]


def agreement(a, b) -> int:
    """How many leading tokens of two sequences are equal."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Memory: the default shape needs ~2 GB in bf16 (~4 GB in fp32) for the two models; "
        "--shape 1_8b needs ~8 GB in bf16 (~16 GB in fp32). Not part of `make test`.",
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default",
                        help="default: hidden 1024, 12 layers, 16 heads, intermediate 5504; "
                        "1_8b: hidden 2048, 24 layers, 16 heads, intermediate 11008")
    parser.add_argument("--hidden", type=int, help="override the shape's hidden size")
    parser.add_argument("--layers", type=int, help="override the shape's layer count")
    parser.add_argument("--heads", type=int, help="override the shape's head count")
    parser.add_argument("--intermediate", type=int, help="override the shape's intermediate_size (both branches)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--dtype", choices=sorted(DTYPES) + list(QUANTIZED), default="bfloat16",
                        help="weights of ours (int8/int4[:group]: quantized from bf16; qwen2 stays bf16)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (rows per step)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth probe tensor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="time ours only (no qwen2 copy: half the memory)")
    parser.add_argument("--vs-torch-kernels", action="store_true",
                        help="int8/int4: instead of qwen2, the same model on torch's weight-only kernels "
                        "(before qwen.kernels' int8/int4 GEMV), interleaved with ours in every repeat")
    args = parser.parse_args(argv)
    if args.vs_torch_kernels:
        if args.dtype not in QUANTIZED:
            parser.error("--vs-torch-kernels compares weight-only kernels: use --dtype int8 or int4[:g]")
        args.no_baseline = True
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is measured after the first new token)")
    if args.prompt_len + args.new_tokens > args.seq_length:
        print("note: prompt + new tokens exceed --seq-length; our model then uses NTK/LogN and qwen2 does not")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(SHAPES[args.shape])
    for key in ("hidden", "layers", "heads", "intermediate"):
        if getattr(args, key):
            shape[key] = getattr(args, key)
    quantization = args.dtype if args.dtype in QUANTIZED else None
    dtype = torch.bfloat16 if quantization else DTYPES[args.dtype]

    bandwidth = print_machine(args.bandwidth_gib)

    start = time.perf_counter()
    if args.no_baseline:
        ours, theirs = random_qwen(shape, args.vocab, args.seq_length, dtype, args.seed), None
    else:
        ours, theirs = build_models(shape, args.vocab, args.seq_length, dtype, args.seed)
    if quantization:
        from qwen.quantization import quantize_model

        quantize_model(ours, quantization)
    from qwen.kernels import backend
    from qwen.modeling_qwen import use_cpu_kernels

    use_cpu_kernels(ours)  # as from_pretrained does (QWEN_KERNELS=off: torch's matmul)
    print(f"ours: CPU kernel {backend()} for 16-bit decode steps")
    print(f"model: hidden {shape['hidden']}, layers {shape['layers']}, heads {shape['heads']}, "
          f"intermediate {shape['intermediate']}, vocab {args.vocab}, ours {args.dtype}"
          + ("" if theirs is None else f", qwen2 {'bfloat16' if quantization else args.dtype}") + " "
          f"(built in {time.perf_counter() - start:.1f} s)")
    models = {"ours": ours} if theirs is None else {"ours": ours, "qwen2": theirs}
    if args.vs_torch_kernels:
        models["torchq"] = _TorchKernels(ours)
    roofline = {}
    for name, model in models.items():
        total, per_step = model._switched(weight_bytes, model.model) if isinstance(model, _TorchKernels) \
            else weight_bytes(model)
        roofline[name] = args.batch * bandwidth / per_step
        print(f"{name:<6} weights {total / 1e9:.3f} GB; read per decode step (all but the embedding table) "
              f"{per_step / 1e9:.3f} GB; roofline {roofline[name]:.1f} tokens/s (batch x bandwidth / bytes per step)")
    print(f"prompt {args.prompt_len} tokens x batch {args.batch}, {args.new_tokens} new tokens (greedy), "
          f"{args.repeats} repeats, models interleaved")

    ids = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    for model in models.values():  # warm-up: allocator, kernels, first-call paths
        prefill_seconds(model, ids)
        decode(model, ids, 4)
    prefill = {name: [] for name in models}
    speed = {name: [] for name in models}
    tokens = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            prefill[name].append(prefill_seconds(model, ids))
            rate, tokens[name] = decode(model, ids, args.new_tokens)
            speed[name].append(rate)

    med = {name: (statistics.median(prefill[name]), statistics.median(speed[name])) for name in models}
    print()
    print(f"{'model':<6} {'prefill ms (median)':>20} {'decode tok/s (median)':>22} {'% of roofline':>14}")
    for name in models:
        p, s = med[name]
        print(f"{name:<6} {p * 1e3:>20.1f} {s:>22.2f} {100 * s / roofline[name]:>13.0f}%")
    if theirs is None:
        for name in models:
            print(f"{name:<6} runs: prefill ms {[round(t * 1e3, 1) for t in prefill[name]]}, "
                  f"decode tok/s {[round(r, 2) for r in speed[name]]}")
        if "torchq" in models:
            print(f"ratio ours/torchq (qwen.kernels' int8/int4 GEMV / torch's weight-only kernels, same model): "
                  f"decode tokens/s {med['ours'][1] / med['torchq'][1]:.3f} (> 1: ours faster), prefill latency "
                  f"{med['ours'][0] / med['torchq'][0]:.3f}")
            same = (tokens["ours"][0] == tokens["torchq"][0]).long()
            print(f"greedy tokens (row 0) ours vs torchq: first {int(same.cumprod(0).sum())} of {len(same)} identical")
        print(f"(no baseline) | load average at the end {os.getloadavg()[0]:.2f}")
        return 0
    prefill_ratio = med["ours"][0] / med["qwen2"][0]
    decode_ratio = med["ours"][1] / med["qwen2"][1]
    for name in models:
        print(f"{name:<6} runs: prefill ms {[round(t * 1e3, 1) for t in prefill[name]]}, "
              f"decode tok/s {[round(r, 2) for r in speed[name]]}")
    print(f"ratio ours/qwen2: prefill latency {prefill_ratio:.3f} (< 1: ours faster), "
          f"decode tokens/s {decode_ratio:.3f} (> 1: ours faster)")
    same = (tokens["ours"][0] == tokens["qwen2"][0]).long()
    agree = int(same.cumprod(0).sum())
    print(f"greedy tokens (row 0): {'identical' if agree == len(same) else f'first {agree} of {len(same)} identical'}"
          f" | load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
