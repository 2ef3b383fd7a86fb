"""Which CPU kernels torch runs here: the facts that decide the last bits of CPU results.

torch picks its CPU kernels from the instruction sets it finds (and from ATEN_CPU_CAPABILITY,
which can only lower the choice). 16-bit matmuls, and reductions in general, sum in a different
order under AVX2, AVX-512, AVX-512-BF16 or AMX kernels, so 16-bit logits differ by an ulp or so
between CPU classes, and the int8 KV cache's truncating quantization turns such last-bit
differences into whole quantization steps. A value recorded on one class is reproducible bit for
bit only on the same class (same torch capability, same kernel-relevant flags, same torch).
The thread count can change a summation order too (fp32 batched decode logits moved by 2e-6
between 1 and 2 threads); it is recorded but not compared, as the fixtures' values came out
identical at 1 to 64 threads.

`python -m qwen.machine` prints the fingerprint; tests compare it with the one stored with a
fixture. Only the standard library and torch are imported, so a script running under another
interpreter (e.g. the original code's transformers 4 venv) can load this file by path."""

from __future__ import annotations

import os
import platform

import torch

# /proc/cpuinfo flags that change which kernels torch or its oneDNN/MKL back ends choose.
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile")
# Environment variables that cap the instruction set torch, oneDNN or MKL may use (recorded and
# printed; ATEN_CPU_CAPABILITY already shows in torch's capability).
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def cpuinfo_field(name: str, cpuinfo: str | None = None) -> str | None:
    """The value of the first `name : value` line of /proc/cpuinfo (None where there is none)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
                cpuinfo = file.read()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (informative: the same model name can hide different microcode or
    settings, and different names share kernels)."""
    return cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine() or "unknown"


def cpu_flags(cpuinfo: str | None = None) -> dict[str, bool]:
    """Whether the CPU reports each of KERNEL_FLAGS (all False where /proc/cpuinfo is missing)."""
    present = set((cpuinfo_field("flags", cpuinfo) or "").split())
    return {flag: flag in present for flag in KERNEL_FLAGS}


def fingerprint() -> dict:
    """The running machine as a fixture records it. `torch_cpu_capability` is the kernel class
    torch dispatches to (DEFAULT, AVX2, AVX512, ...), ATEN_CPU_CAPABILITY included."""
    return {
        "cpu_model": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "flags": cpu_flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "env": {name: os.environ[name] for name in KERNEL_ENV if name in os.environ},
    }


def same_cpu_class(recorded: dict, current: dict | None = None) -> bool:
    """True when `current` (default: this machine) runs the kernels `recorded` ran: the same torch
    CPU capability and the same KERNEL_FLAGS. The CPU model name, threads and env do not count."""
    current = fingerprint() if current is None else current
    return recorded.get("torch_cpu_capability") == current.get("torch_cpu_capability") and all(
        recorded.get("flags", {}).get(flag) == current.get("flags", {}).get(flag) for flag in KERNEL_FLAGS
    )


def same_kernels(recorded: dict, current: dict | None = None) -> bool:
    """same_cpu_class and the same torch release (kernels change between releases too)."""
    current = fingerprint() if current is None else current
    return same_cpu_class(recorded, current) and recorded.get("torch") == current.get("torch")


def describe(info: dict | None = None) -> str:
    """A few readable lines: CPU model, torch capability, flags, threads, torch, overriding env."""
    info = fingerprint() if info is None else info
    flags = " ".join(flag for flag, present in info["flags"].items() if present) or "(none of the kernel flags)"
    lines = [
        f"CPU model:            {info['cpu_model']}",
        f"torch CPU capability: {info['torch_cpu_capability']}",
        f"kernel flags:         {flags}",
        f"torch threads:        {info['threads']}",
        f"torch:                {info['torch']}",
    ]
    for name, value in info.get("env", {}).items():
        lines.append(f"{name}={value}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())
