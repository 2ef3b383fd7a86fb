"""Memory: the peak resident set to load a checkpoint against its file size, and KV-cache bytes
per token (plain and int8).

    python bench/memory.py [--shape 1_8b] [--dtype bfloat16] [--checkpoint DIR]

Without --checkpoint it saves a random model of the shape in a temporary directory first (the
1.8B shape takes ~3.7 GB of disk in bf16). The load runs in a fresh interpreter, so the peak
(VmHWM) is the load's alone; the figure is the growth over the interpreter's size after imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import DTYPES, SHAPES, print_machine, random_qwen  # noqa: E402

from qwen.serving.kv import SlotKVCache  # noqa: E402

LOAD_SCRIPT = """
import json, re, sys
import torch
from qwen import QWenLMHeadModel
def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
before = kib("VmRSS")
model = QWenLMHeadModel.from_pretrained(sys.argv[1])
peak, after = kib("VmHWM"), kib("VmRSS")
aligned = all(t.data_ptr() % 64 == 0 for t in model.parameters())
print(json.dumps({"before": before * 1024, "peak": (peak - before) * 1024, "after": (after - before) * 1024,
                  "aligned": aligned, "dtype": str(model.dtype)}))
"""


def measure_load(directory: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"loading {directory} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def kv_bytes_per_token(config, dtype: torch.dtype, device="cpu") -> dict:
    """Bytes one token of context takes in the engine's cache, plain and int8 (from real buffers)."""
    result = {}
    for name, int8 in (("plain", False), ("int8", True)):
        config.use_cache_quantization = int8
        cache = SlotKVCache(config, 1, 256, dtype, device)
        result[name] = cache.bytes() / 256
    config.use_cache_quantization = False
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1_8b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--checkpoint", type=Path, help="measure this checkpoint instead of a random one")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0)
    args = parser.parse_args(argv)
    print_machine(args.bandwidth_gib)
    with tempfile.TemporaryDirectory(prefix="qwen-memory-") as tmp:
        directory = args.checkpoint
        if directory is None:
            directory = Path(tmp) / "checkpoint"
            model = random_qwen(SHAPES[args.shape], args.vocab, 8192, DTYPES[args.dtype], seed=0)
            model.save_pretrained(directory)
            del model
        weights = sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))
        weights = weights or sum(f.stat().st_size for f in Path(directory).glob("*.bin"))
        load = measure_load(directory)
        config = json.loads((Path(directory) / "config.json").read_text())
        from qwen import QWenConfig

        kv = kv_bytes_per_token(QWenConfig(**config), getattr(torch, load["dtype"].split(".")[-1]))
    print(f"checkpoint: {directory if args.checkpoint else args.shape} ({load['dtype']}), weights {weights / 2**20:.0f} MiB")
    print(f"interpreter after imports: {load['before'] / 2**20:.0f} MiB")
    print(f"load: peak RSS growth {load['peak'] / 2**20:.0f} MiB = {load['peak'] / weights:.3f}x the weights; "
          f"resident after load {load['after'] / 2**20:.0f} MiB = {load['after'] / weights:.3f}x; "
          f"all parameters 64-byte aligned: {load['aligned']}")
    print(f"KV cache per token of context: plain {kv['plain'] / 1024:.1f} KiB, int8 {kv['int8'] / 1024:.1f} KiB "
          f"(int8/plain {kv['int8'] / kv['plain']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
