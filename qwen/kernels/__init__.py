"""Our own CPU kernel for small-M products y = x @ W^T (+ bias) with bf16 or fp16 weights.

Decoding one token multiplies a handful of activation rows by every weight matrix, so the step time
is the time to stream the weights from memory. torch's bf16 matmul reads them well below the memory
bandwidth for M = 1; ``cpu_gemv.cpp`` reads each weight tile once, applies it to all M rows, sums in
fp32 and rounds once to the activation dtype.

    from qwen import kernels
    kernels.backend()                 # "avx512_bf16" | "avx512" | "avx2" | "torch"; builds on the first call
    y = kernels.gemv(x, weight, bias)  # x [..., K], weight [N, K], bias [N] or None -> [..., N] in x.dtype
    kernels.supports(x, weight)       # True when gemv runs our kernel for these (else it calls F.linear)
    kernels.MAX_ROWS                  # the most rows (x.numel() // K) the kernel takes

Weight-only int8 / int4 products (``cpu_qgemv.cpp``, the same extension), on the canonical buffers
of ``qwen.quantization`` (``Int8Linear`` / ``Int4Linear`` route their decode-sized calls here):

    y = kernels.int8_gemv(x, qweight, scale, bias)                # int8 [N, K], fp32 [N]
    y = kernels.int4_gemv(x, packed, scales, mins, group, bias)   # uint8 [N, K/2], fp32 [N, K/g] x 2
    kernels.supports_int8(x, qweight, scale), kernels.supports_int4(x, packed, scales, mins, group)

x: bf16 [..., K], 1..MAX_ROWS rows; y: bf16. The integer weights are widened exactly and multiplied
with the bf16 activations as they are (exact fp32 products), summed in fp32, scaled (int8: by the
row's scale; int4: group by group, plus the group minimum times the group's sum of x) in fp32, the
bias added in fp32, rounded once to bf16 (approach (a) of issue 13). Paths: avx512_bf16: int8
VCVTNE2PS2BF16 + VDPBF16PS; int4 nibbles -> bf16 by VPERMW + VDPBF16PS; avx512: VPMOVSX/ZX + VCVTDQ2PS
+ FMA; avx2: the same on 8 lanes for int8, and for int4 approach (c): activations as int16 in a
power-of-two unit per group (exact for every x within 2^7 of its group's largest |x|, else off by at
most 2^-16 of that largest), VPMADDWD, exact int32 sums per group (a Qwen-1.8B int4 decode 1.3x
faster than (a) on 8 lanes, with AVX2 caps on Zen 4). Where the kernel does not take the tensors, the
functions compute the fp32 reference (dequantized weight, F.linear): slow, for completeness.
Approach (b), llama.cpp's Q4_0 x Q8_0 (activations rounded to int8 per block of 32; VPDPBUSD on
avx512_bf16 CPUs with AVX512_VNNI, VPMADDUBSW on the avx2 and avx512 paths), is there for int4:
``int4_gemv(..., exact=False)`` or QWEN_INT4_ACTIVATIONS=int8 for the model. It adds an activation error of up to 1/254 of each 32-block's
largest |x| and, measured on Zen 4 with 2 threads, decodes no faster: 40 vs 32 G weights/s per
thread with the weights in cache, the same ~20-22 GB/s as (a) at M = 1 from memory (about 10-25%
faster at M = 4). So (a) is the default.
Measured (AMD EPYC Zen 4, 2 threads, Qwen-1.8B layer shapes, M = 1; bench/gemv.py, t.sum() 26-27
GB/s): int8 25-31 GB/s of weight bytes (torch's _weight_int8pack_mm 15-22: 1.76x), int4 g64 20-25
GB/s (torch's _weight_int4pack_mm_for_cpu 20-21 on its 11% smaller copy); see bench/README.md.

The decode-step ops (``cpu_ops.cpp``, the same extension), used by the model's RMSNorm and attention
modules for 16-bit CPU activations once ``qwen.kernels.linear.use_kernels`` has switched them on:

    out = kernels.attention(q, k, v, bias, causal)     # q [B, H, T <= 16, d] over k, v [B, H, L, d] -> [B, T, H * d]
    y = kernels.rms_norm(x, weight, eps)             # QWenRMSNorm in one call
    q, k = kernels.rotary_qk(qkv, cos, sin, heads, head_dim)   # c_attn's output -> rotated q, k [B, H, T, d]

Each returns None where it does not run (the caller then uses torch). attention: fp32 scores,
softmax and sums (keys and values widened exactly), one rounding at the end; 7-9x faster than
torch's scaled_dot_product_attention for one query over 80-8000 cached tokens (2 threads, Zen 4).
rms_norm rounds as torch does (only the mean's summation order differs); rotary_qk is bit for bit
modeling_qwen.apply_rotary.

A whole block's decode step (``cpu_decode.cpp``, the same extension): ``kernels.block_plan(block)``
gives a QWenBlock whose linear layers all run these kernels a ``DecodeBlock`` (two calls per step,
``qkv`` before the cache write and ``out`` after it: the same kernels and torch ops in the same
order as the modules, bit for bit, without the Python between them), which QWenBlock.decode uses.

Many-row products where the CPU has no native 16-bit products (``cpu_gemm.cpp``, the same
extension; prompts on AVX2-only CPUs, and fp16 prompts on Zen 4):

    y = kernels.gemm(x, weight, bias, out)                          # x [M, K], weight [N, K]: fp32/bf16/fp16
    y = kernels.int8_gemm(x, qweight, scale, bias, out)             # the int8 layer's buffers
    y = kernels.int4_gemm(x, packed, scales, mins, group, bias, out)  # the int4 layer's buffers

fp32 products and sums, one rounding to x.dtype, written into ``out`` (e.g. a column slice) when
given; None where they do not run (``kernels.gemm_runs()``): they run on the avx2 path and, on AMD
Zen 4, whose AVX-512 FMA is two 256-bit halves, on the AVX-512 paths too (CPUs with full-width
AVX-512 FMA keep torch's fp32 GEMM); ``kernels.GEMM = False`` switches them off. A blocked GEMM
(6 x 16 register tile over packed panels) that widens or dequantizes the weights while packing
them; with AVX2 caps on Zen 4, a 6-layer Qwen-1.8B prompt of 512 tokens ran 1.13-1.18x (bf16,
fp16) and 1.25-1.31x (int4, int8) faster than MKL's SGEMM on weights widened or dequantized a chunk
at a time by torch (bench/prefill.py); fp16 on Zen 4 uncapped 1.23x. KernelLinear and the
quantized layers use it for their many-row calls.

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` from the sources
shipped in this package into ``$QWEN_KERNEL_CACHE/<tag>`` (default ``~/.cache/qwen/kernels/<tag>``;
the tag hashes the sources, torch, Python and the flags), so later processes load the built library
without compiling (the first build takes ~40 s on 2 cores, and blocks the first call). One library
holds every code path (per-function target attributes, no -march), and the path is chosen at run
time from what the CPU offers, capped by:

- ``QWEN_KERNELS``: ``off`` (torch only), ``avx2``, ``avx512``, ``avx512_bf16``, or ``auto`` (default);
- torch's ``ATEN_CPU_CAPABILITY``: ``avx2`` or ``default`` rule out the AVX-512 paths, as they do
  for torch's own kernels.

When the extension cannot be built or loaded (no compiler, no ninja, ...) one warning is logged and
``gemv`` is ``torch.nn.functional.linear``; nothing raises (not x86-64: torch, without a warning). One
INFO line on the logger ``qwen.kernels`` says which backend runs.

Numerics: each output is one fp32 sum in a fixed order (independent of M, of the rows batched with
it and of the thread count), rounded once to nearest even; torch's bf16 kernels sum differently, so
results differ from F.linear's in the last bit now and then (see tests/test_kernels.py for the
bound). Autograd is not supported: with grad mode on and an input that requires grad, gemv calls
F.linear.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "MAX_ROWS", "attention", "backend", "gemm", "gemm_runs", "gemv", "int4_gemm", "int4_gemv", "int8_gemm",
    "int8_gemv", "rms_norm", "rotary_qk", "supports", "supports_int4", "supports_int8",
]

logger = logging.getLogger("qwen.kernels")

MAX_ROWS = 16  # activation rows per call; above it a matmul is compute bound and F.linear is the better kernel
GEMM = True  # False: gemm / int8_gemm / int4_gemm return None, so callers use torch's fp32 GEMM (benchmarks)

_SOURCES = ("cpu_gemv.cpp", "cpu_qgemv.cpp", "cpu_ops.cpp", "cpu_gemm.cpp", "cpu_decode.cpp")
_HEADERS = ("common.h",)  # included by the sources: part of the build tag
_CFLAGS = ("-O3",)
_NAMES = {0: "torch", 1: "avx2", 2: "avx512", 3: "avx512_bf16"}
_LEVELS = {name: level for level, name in _NAMES.items()}
_PLAIN = (torch.Tensor, torch.nn.Parameter)

# int4: QWEN_INT4_ACTIVATIONS=int8 selects approach (b) (any path but avx512_bf16 without VNNI), activations
# rounded to int8 per block of 32 (relative error of each activation at most 1/254 of its block's
# largest |x|); the default keeps them exact (bf16).
_INT4_EXACT = os.environ.get("QWEN_INT4_ACTIVATIONS", "bf16").strip().lower() != "int8"
INT4_ACTIVATION_ERROR = 1 / 254  # with exact=False: |x - x~| <= max |x| of its 32-block / 254

_lock = threading.RLock()
_ready = False  # the backend is chosen
_tried = False  # the extension was built or loaded, or failed to
_ext = None  # the loaded extension module, or None
_level = 0  # the path gemv runs: a key of _NAMES (0: torch)
_cpu_level = 0  # the best path the CPU offers (0 where the extension is not loaded)
_gemm_here = False  # gemm runs here (gemm_runs, before kernels.GEMM)


def backend() -> str:
    """The path gemv runs in this process: "avx512_bf16", "avx512", "avx2" or "torch" (builds or
    loads the extension on the first call)."""
    _ensure()
    return _NAMES[_level]


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when gemv(x, weight) runs our kernel: a contiguous [N, K] bf16/fp16 CPU weight, CPU
    activations x [..., K] of the same dtype with x.numel() // K rows, 1 to MAX_ROWS of them, and no
    autograd graph to record (grad mode off, or nothing requires grad). Non-contiguous activations
    are taken (gemv copies them: M * K elements); a non-contiguous weight is not."""
    if not _ready:
        _ensure()
    return _level > 0 and type(x) in _PLAIN and type(weight) in _PLAIN and _ext.supports(x, weight, None, _level)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [..., K], weight [N, K], bias [N] (fp32, bf16 or fp16) or
    None: our kernel where supports(x, weight) (fp32 sums, one rounding to x.dtype), else F.linear."""
    if not _ready:
        _ensure()
    if _level and type(x) in _PLAIN and type(weight) in _PLAIN and (bias is None or type(bias) in _PLAIN):
        y = _ext.gemv(x, weight, bias, _level)  # None when the kernel does not take these tensors
        if y is not None:
            return y
    return F.linear(x, weight, bias)


def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [M, K] @ weight[N, K].T (+ bias [N]) for many rows with fp32 products and sums, rounded once
    to x.dtype (x, weight, bias each fp32, bf16 or fp16; rows contiguous), written into `out` [M, N]
    when given (a column slice is fine); None where it does not run (gemm_runs)."""
    if not gemm_runs() or not _plain(x, weight, bias, out):
        return None
    return _ext.gemm(x, weight, bias, out, _level)


def gemm_runs() -> bool:
    """Whether gemm / int8_gemm / int4_gemm run here (else they return None): on the avx2 path, and
    on the AVX-512 paths of CPUs whose AVX-512 FMA is two 256-bit halves (AMD Zen 4), where the
    GEMM's 256-bit FMAs reach the same peak; CPUs with full-width AVX-512 FMA (Intel, Zen 5) keep
    torch's fp32 GEMM. kernels.GEMM = False switches it off."""
    if not _ready:
        _ensure()
    return _gemm_here and GEMM


def int8_gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor | None:
    """gemm for int8 weights: w~ = qweight [N, K] (int8) * scale [N] (fp32), each weight dequantized
    (one fp32 rounding) as it is packed; None where it does not run."""
    if not gemm_runs() or not _plain(x, qweight, scale, bias, out):
        return None
    return _ext.gemm_int8(x, qweight, scale, bias, out, _level)


def int4_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """gemm for int4 weights: w~ = q * scales + mins per group (one fused fp32 rounding), q the
    nibbles of packed [N, K/2] (element 2j low), scales and mins fp32 [N, K/g], dequantized as they
    are packed; None where it does not run."""
    if not gemm_runs() or not _plain(x, packed, scales, mins, bias, out):
        return None
    return _ext.gemm_int4(x, packed, scales, mins, group_size, bias, out, _level)


def _plain(*tensors) -> bool:
    return all(t is None or type(t) in _PLAIN for t in tensors)


# ----------------------------------------------------------------------------- int8 / int4 weights


def supports_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> bool:
    """True when int8_gemv runs our kernel: bf16 CPU activations x [..., K] with 1 to MAX_ROWS rows,
    a contiguous int8 qweight [N, K], a contiguous fp32 scale [N], no autograd graph to record."""
    if not _ready:
        _ensure()
    return _level > 0 and _ext.int8_supports(x, qweight, scale, None, _level)


def supports_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  group_size: int) -> bool:
    """True when int4_gemv runs our kernel: bf16 CPU activations x [..., K] with 1 to MAX_ROWS rows,
    contiguous packed uint8 [N, K/2], fp32 scales and mins [N, K/group_size], group_size 32 or a
    multiple of 64 dividing K, no autograd graph to record."""
    if not _ready:
        _ensure()
    return _level > 0 and _ext.int4_supports(x, packed, scales, mins, group_size, None, _level)


def int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (qweight * scale[:, None]).T + bias for the canonical int8 buffers of
    qwen.quantization.Int8Linear: our kernel where supports_int8 (fp32 sums, one rounding to bf16),
    else the dequantized weight in fp32 through F.linear, rounded to x.dtype (slow: a reference)."""
    y = _int8_or_none(x, qweight, scale, bias)
    if y is None:
        w = qweight.float() * scale.float()[:, None]
        y = F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    return y


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, exact: bool | None = None) -> torch.Tensor:
    """x @ W~.T + bias for the canonical int4 buffers of qwen.quantization.Int4Linear (W~[n, k] =
    q[n, k] * scales[n, k // g] + mins[n, k // g], q the nibbles of packed, low nibble = even k):
    our kernel where supports_int4, else the dequantized weight in fp32 through F.linear.
    exact=False (default: QWEN_INT4_ACTIVATIONS=int8 in the environment, else True) lets the
    avx512_bf16 path, on a CPU with AVX512_VNNI, round the activations to int8 per block of 32
    (llama.cpp's Q4_0 x Q8_0 scheme; see INT4_ACTIVATION_ERROR); elsewhere it changes nothing."""
    y = _int4_or_none(x, packed, scales, mins, group_size, bias, exact)
    if y is None:
        n = packed.shape[0]
        q = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(n, -1, group_size).float()
        w = (q * scales.float()[..., None] + mins.float()[..., None]).view(n, -1)
        y = F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
    return y


def _int8_or_none(x, qweight, scale, bias=None):
    """Our int8 kernel's result, or None where it does not run (qwen.quantization falls back itself)."""
    if not _ready:
        _ensure()
    if _level and type(x) in _PLAIN:
        return _ext.int8_gemv(x, qweight, scale, bias, _level)
    return None


def _int4_or_none(x, packed, scales, mins, group_size, bias=None, exact=None):
    """Our int4 kernel's result, or None where it does not run."""
    if not _ready:
        _ensure()
    if _level and type(x) in _PLAIN:
        return _ext.int4_gemv(x, packed, scales, mins, group_size, bias, _level, _INT4_EXACT if exact is None else exact)
    return None


def _int8_at(x, qweight, scale, bias, level: int) -> torch.Tensor:
    """Tests: int8_gemv through the path `level`, whatever the caps say."""
    _check_level(level)
    y = _ext.int8_gemv(x, qweight, scale, bias, level)
    if y is None:
        raise ValueError("these tensors are not supported by the kernel")
    return y


def _int4_at(x, packed, scales, mins, group_size, bias, level: int, exact: bool = True) -> torch.Tensor:
    """Tests: int4_gemv through the path `level`, whatever the caps say."""
    _check_level(level)
    y = _ext.int4_gemv(x, packed, scales, mins, group_size, bias, level, exact)
    if y is None:
        raise ValueError("these tensors are not supported by the kernel")
    return y


def _gemm_at(x, weight, bias, out, level: int) -> torch.Tensor | None:
    """Tests: gemm through the path `level`, whatever gemm_runs says (the GEMM is AVX2 code at every level)."""
    _check_level(level)
    return _ext.gemm(x, weight, bias, out, level)


def _check_level(level: int) -> None:
    _ensure()
    if _x86():
        _extension()
    if _ext is None or not 1 <= level <= _cpu_level:
        raise RuntimeError(f"kernel level {level} is not available here (CPU offers {_NAMES[_cpu_level]})")


def _gemv_at(x, weight, bias, level: int) -> torch.Tensor:
    """Tests: gemv through the path `level` (1..3, at most _cpu_level), whatever the caps say."""
    _ensure()
    if _x86():
        _extension()
    if _ext is None or not 1 <= level <= _cpu_level:
        raise RuntimeError(f"kernel level {level} is not available here (CPU offers {_NAMES[_cpu_level]})")
    y = _ext.gemv(x, weight, bias, level)
    if y is None:
        raise ValueError("these tensors are not supported by the kernel")
    return y


# ----------------------------------------------------------------------------- decode-step ops (cpu_ops.cpp)


def _recording(*tensors) -> bool:
    """Whether autograd would record an op on these tensors (the ops below know no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              causal: bool = False, scale: float | None = None) -> torch.Tensor | None:
    """softmax(q @ k^T * scale + bias) @ v for q [B, H, T, d] with T <= MAX_ROWS new queries over
    k, v [B, H, L, d] (views of a cache are fine: any strides but the last), as [B, T, H * d] in q's
    dtype; bias: additive [B|1, H|1, T, L] or None; causal (without bias): query t sees keys up to
    L - T + t. Scores, softmax and sums in fp32 (keys and values widened exactly), one rounding at
    the end. None where it does not run (the caller uses torch)."""
    if not _ready:
        _ensure()
    if not _level or type(q) not in _PLAIN or _recording(q, k, v, bias):
        return None
    return _ext.attention(q, k, v, bias, bool(causal), float(q.shape[-1] ** -0.5 if scale is None else scale), _level)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """QWenRMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, times weight (same
    dtype as x), rounded again: torch's roundings, only the mean's summation order differs. None
    where it does not run."""
    if not _ready:
        _ensure()
    if not _level or type(x) not in _PLAIN or _recording(x, weight):
        return None
    return _ext.rms_norm(x, weight, float(eps))


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, k) [B, heads, T, head_dim] from c_attn's output qkv [B, T, 3 * heads * head_dim], rotated
    by cos/sin fp32 [B|1, 1, T, rot] exactly as modeling_qwen.apply_rotary does (bit for bit). None
    where it does not run."""
    if not _ready:
        _ensure()
    if not _level or type(qkv) not in _PLAIN or _recording(qkv):
        return None
    return _ext.rotary_qk(qkv, cos, sin, int(heads), int(head_dim))


def block_plan(block: torch.nn.Module):
    """A QWenBlock's decode step in C++ (two calls), or None: see qwen.kernels.linear.block_plan."""
    from .linear import block_plan as plan

    return plan(block)


def run_blocks(plans, h, cos, sin, keys, values, position: int, biases, causal: bool):
    """Consecutive blocks' decode steps (block_plan's plans) in one call, each block's keys and
    values stored into its plain cache buffers [B, N, capacity, d] at `position`: (h, blocks done,
    None or the (q, keys, values) of a block that declined after its cache write). See
    cpu_decode.cpp."""
    return _ext.run_blocks(plans, h, cos, sin, keys, values, int(position), biases, bool(causal))


def _attention_at(q, k, v, bias, causal, scale, level: int) -> torch.Tensor:
    """Tests: attention through the path `level`, whatever the caps say."""
    _check_level(level)
    y = _ext.attention(q, k, v, bias, causal, scale, level)
    if y is None:
        raise ValueError("these tensors are not supported by the kernel")
    return y


# ----------------------------------------------------------------------------- choosing the path


def _requested_level() -> tuple[int, str]:
    """The highest path the environment allows, and why."""
    setting = os.environ.get("QWEN_KERNELS", "auto").strip().lower()
    if setting in ("off", "torch", "none", "0", "false", "no"):
        return 0, f"QWEN_KERNELS={setting}"
    if setting in _LEVELS:
        level, why = _LEVELS[setting], f"QWEN_KERNELS={setting}"
    else:
        if setting not in ("", "auto", "on", "1", "true", "yes"):
            logger.warning("QWEN_KERNELS=%r is not one of off, avx2, avx512, avx512_bf16, auto: using auto", setting)
        level, why = 3, "auto"
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten in ("avx2", "default") and level > 1:
        level, why = 1, f"ATEN_CPU_CAPABILITY={aten}"
    return level, why


def _ensure() -> None:
    global _ready, _level, _gemm_here
    if _ready:
        return
    with _lock:
        if _ready:
            return
        cap, why = _requested_level()
        if cap == 0:
            logger.info("backend: torch (%s)", why)
        elif not _x86():
            logger.info("backend: torch (no kernel for %s on %s)", platform.machine(), sys.platform)
        else:
            how = _extension()
            if _ext is not None:
                _level = min(cap, _cpu_level)
                if int(_ext.max_rows) != MAX_ROWS:  # a stale build: never expected, but never wrong either
                    logger.warning("qwen.kernels: the extension takes %s rows, not %s; using torch", _ext.max_rows,
                                   MAX_ROWS)
                    _level = 0
                _gemm_here = _level == 1 or (_level >= 2 and half_width_avx512())
                offers = _NAMES[_cpu_level] if _cpu_level else "none of avx2+fma+f16c"
                logger.info("backend: %s (CPU offers %s, %s; extension %s)", _NAMES[_level], offers, why, how)
        _ready = True


def half_width_avx512(cpuinfo: str | None = None) -> bool:
    """Whether this CPU runs 512-bit FMAs as two 256-bit halves: AMD family 0x19 (Zen 4; Zen 3, the
    same family, has no AVX-512). From /proc/cpuinfo (False where it cannot be read)."""
    from ..machine import cpuinfo_field

    return cpuinfo_field("vendor_id", cpuinfo) == "AuthenticAMD" and cpuinfo_field("cpu family", cpuinfo) == "25"


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"


def _extension() -> str | None:
    """Build or load the extension once per process (whatever the caps say); how it came, or None."""
    global _tried, _ext, _cpu_level
    with _lock:
        if _tried:
            return None
        _tried = True
        ext, how = _load_extension()
        if ext is not None:
            _ext, _cpu_level = ext, int(ext.cpu_isa())
        return how


# ----------------------------------------------------------------------------- building


def _source_dir() -> Path:
    return Path(__file__).resolve().parent


def _extra_cflags() -> list[str]:
    flags = list(_CFLAGS)
    # at::parallel_for is inlined into the extension: with torch's OpenMP backend it needs the
    # OpenMP pragmas compiled in. Only the compile step gets -fopenmp: the GOMP symbols then bind
    # to the OpenMP runtime torch already loaded (one thread pool, torch.set_num_threads applies).
    if torch.backends.openmp.is_available():
        flags.append("-fopenmp")
    return flags


def _tag() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update(name.encode())
        digest.update((_source_dir() / name).read_bytes())
    for part in (torch.__version__, getattr(torch.version, "git_version", ""), sys.implementation.cache_tag,
                 platform.machine(), " ".join(_extra_cflags())):
        digest.update(b"\0" + str(part).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where the extension is built: $QWEN_KERNEL_CACHE/<tag>, default ~/.cache/qwen/kernels/<tag>."""
    base = os.environ.get("QWEN_KERNEL_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "qwen", "kernels")
    return Path(base) / _tag()


def _import_built(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_extension():
    """(module, how) or (None, None) after one warning."""
    start = time.perf_counter()
    try:
        directory = cache_dir()
        name = f"qwen_cpu_gemv_{directory.name}"
        built = directory / f"{name}.so"
        if built.is_file():
            try:
                return _import_built(name, built), f"loaded from {directory}"
            except Exception:  # a partial or foreign file: let torch (re)build it under its lock
                logger.debug("could not load %s, rebuilding", built, exc_info=True)
        module = _build(name, directory)
        return module, f"built in {time.perf_counter() - start:.1f} s into {directory}"
    except Exception as exc:  # never raise: torch's kernels always work
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # A failed compilation: its first "error:" line says more than the command line before it.
        reason = next((line for line in lines if "error:" in line), lines[0] if lines else "")
        logger.warning("qwen.kernels: could not build the CPU kernel extension (%s: %s); using torch "
                       "(QWEN_KERNELS=off skips the attempt)", type(exc).__name__, reason[:300])
        logger.debug("build failure", exc_info=True)
        return None, None


def _build(name: str, directory: Path):
    from torch.utils import cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        raise RuntimeError(f"C++ compiler {compiler!r} not found (set CXX)")
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(_source_dir() / source) for source in _SOURCES]
    # ninja may come from the PyPI package, whose binary lives next to this interpreter.
    saved_path = os.environ.get("PATH")
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in (saved_path or "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + (os.pathsep + saved_path if saved_path else "")
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    saved_level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # our one warning says it if the build fails
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(name=name, sources=sources, extra_cflags=_extra_cflags(),
                                      build_directory=str(directory), verbose=False)
    finally:
        torch_logger.setLevel(saved_level)
        if saved_path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved_path
