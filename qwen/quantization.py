"""Weight-only int8 / int4 linear layers for CPU decoding, quantized on load.

    model = QWenLMHeadModel.from_pretrained(path, quantization="int8")
    model = QWenLMHeadModel.from_pretrained(path, quantization="int4")      # group size 128
    model = QWenLMHeadModel.from_pretrained(path, quantization="int4:64")   # group size 32/64/128/256
    quantize_model(model, "int4", group_size=64)                            # a model already in memory

Every `nn.Linear` of the model (per block `attn.c_attn`, `attn.c_proj`, `mlp.w1`, `mlp.w2`,
`mlp.c_proj`, and `lm_head`) is replaced; the embedding `transformer.wte`, the norms and the biases
stay in the model dtype. Only the weights are quantized: activations, biases and outputs keep the
model dtype. The float weights of the replaced layers are released.

Canonical storage (what other kernels are written against; persistent buffers, in `state_dict`)
-----------------------------------------------------------------------------------------------
int8 (`Int8Linear`), symmetric per output channel:
    qweight  int8    [N, K]   w[n, k] ~= qweight[n, k] * scale[n]
    scale    float32 [N]      max_k |w[n, k]| / 127 (0 for an all-zero row); q = round(w / scale)
    -> 1 byte per weight + 4 bytes per row.

int4 (`Int4Linear`), asymmetric min-max per group of `group_size` consecutive k:
    packed   uint8   [N, K/2]  q[n, k] = (packed[n, k // 2] >> (4 * (k % 2))) & 0xF  (low nibble = even k)
    scales   float32 [N, K/g]  (max - min) / 15 of the group (0 when the group is constant)
    mins     float32 [N, K/g]  the group minimum;  w[n, k] ~= q[n, k] * scales[n, k // g] + mins[n, k // g]
    -> 0.5 byte per weight + 8/g bytes (0.0625 at the default g = 128: 4.5 bits per weight, the size
    of llama.cpp's Q4_0 and of the published GPTQ Int4 checkpoints, which also use groups of 128;
    g = 64 is 5 bits, Q4_1's size).
    q = round((w - min) / scale) clamped to 0..15, so |w - w~| <= scale / 2 (and min, max are exact).
    The scales stay float32: at 8/g bytes per weight they cost little, and the canonical weights
    are then fp32 values (`dequantize()` computes q * scale + min with one fused rounding).
    K must be a multiple of the group size. `Int4Linear.from_linear` raises a ValueError otherwise.
    `quantize_model` with the default group (no size given) uses the largest of 128, 64, 32 that
    divides a layer's K (every K of the Qwen checkpoints is a multiple of 128; small test models
    are not); with a size given it leaves such a layer in float and logs one warning naming the layers.

Backend copies (non-persistent buffers, built once at quantization time, never per call)
---------------------------------------------------------------------------------------
With qwen.kernels running (the qwen package on x86-64, QWEN_KERNELS not off, the extension built):
int8 keeps `scale_bf16` [N] bfloat16 (2 bytes per row, for torch's kernel at 17..23 rows and the
bf16 GEMM path); int4 keeps no copy: qwen.kernels reads the canonical buffers, 0.5 + 8/g bytes per
weight in all (0.5625 at g = 128, 0.625 at g = 64; int8 1.0).
Without it (QWEN_KERNELS=off, remote code, no compiler, other CPUs), for torch's kernels:
int8: `scale_bf16` as above.
int4: `packed_cpu` uint8 [N, K/2] in the blocked nibble order of `torch._convert_weight_to_int4pack_for_cpu`
    (it depends on the CPU's vector width, hence not canonical) and `scale_zeros` bfloat16 [K/g, N, 2]
    with torch's convention w = (q - 8) * scale + zero, i.e. zero = min + 8 * scale. Another 0.5 + 4/g
    bytes per weight: an int4 layer holds 1 + 12/g bytes per weight in all (1.09 at g = 128).
    Built only when N is a multiple of 16 (the kernel's rule); otherwise the layer always dequantizes.

Compute (timing tables: `python bench/gemv.py --dtype int8|int4`, `python tests/test_quantization.py`)
---------------------------------------------------------------------------------------------------
Rows M = the number of activation vectors in the call (batch x tokens). Activations in fp32 or fp16
are rounded to bfloat16 for the weight-only kernels and the result is cast back: one bf16 rounding
of x and of the output (relative 2^-9 each), well under the weights' own quantization error (up to
1/254 of the row maximum for int8, 1/30 of the group range for int4).
* M < `large_m_own` (96 for int8, 128 for int4) where qwen.kernels runs: its int8 / int4 GEMV
  (qwen/kernels/cpu_qgemv.cpp; more than 16 rows go in chunks of 16) on the canonical buffers: the
  integer q widened exactly and multiplied with the bf16 activations, fp32 sums, the fp32 scales (and
  int4 mins) applied in fp32, the bias added in fp32, one rounding to bf16; so the result is the
  product with the canonical weights up to fp32 rounding and the one output rounding (bounds:
  tests/test_kernels.py). On CPUs with AVX2 but not AVX-512 both take approach (c) instead: the
  activations as int16 in one power-of-two unit per group (int8: groups of 128 k), integer products
  and group sums, which adds at most 2^-16 of the group's largest |x| per activation (same file).
  Measured on an AMD EPYC (Zen 4), 2 threads, M = 1, the five Qwen-1.8B layer shapes
  (`bench/gemv.py --dtype int8|int4`, `t.sum()` 26-27 GB/s): int8 25-31 GB/s of weight bytes vs
  torch's `_weight_int8pack_mm` 15-22 (1.76x overall; 2.0x at M = 4 and 8); int4 g64 20-25 GB/s vs
  torch's `_weight_int4pack_mm_for_cpu` 20-21 GB/s on its 11% smaller copy (0.9-1.1x per layer;
  lm_head 10.8 vs 8.0 GB/s, slow in both; 1.03-1.17x at M = 8). Whole 1.8B model, greedy decode, 2 threads
  (`bench/decode.py --shape 1_8b --vs-torch-kernels`): int8 13.9 vs 9.2 tok/s, int4 17.6 vs 16.6;
  with the decode-step ops of qwen/kernels/cpu_ops.cpp, 18.0 and 25.2 (`bench/vs_llamacpp.py`).
* M < `large_m` (24 for int8, 64 for int4) otherwise: torch's weight-only kernels, which read the
  quantized weights directly: int8 `torch._weight_int8pack_mm`, int4 `torch._weight_int4pack_mm_for_cpu`.
  Both are fast only for bfloat16 activations: on 11008x2048 at M = 1 (8) the int8 kernel takes 1.4
  (3.2) ms with bf16 x, 9.2 (75) with fp32 x and 11 (88) with fp16 x; the int4 one 0.65 (2.2) ms with
  bf16, 19 (153) with fp32 (a scalar loop); dequantizing to fp32 + F.linear 12-16 ms. The int4 kernel
  also rounds scale and zero to bfloat16.
* Above (prefill): the weight is dequantized to the activation dtype, `gemm_chunk` weights
  at a time into a reused per-thread scratch buffer (8 MB in bf16, 16 MB in fp32; int4 adds ~6 MB
  for nibbles and expanded scales), and multiplied with `F.linear`: torch's GEMM beats the
  weight-only kernels there, and fp32 activations get an fp32 product. On a CPU without native
  bf16 products (no AVX512_BF16 or AMX: `gemm_dtype`) the weight is dequantized to fp32 instead and
  bf16 activations are widened: torch's bf16 GEMM emulates the products there, 3.2-3.3x slower
  (`bench/prefill.py`). int4 dequantizes into the
  column order "even k, then odd k" (x's columns are permuted to match), so each nibble half is
  masked in one int32 pass. This path still costs 1.1-2x a bf16 F.linear (the dequantization).
"""

from __future__ import annotations

import logging
import os
import re
import threading

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Int4Linear", "Int8Linear", "chunked_linear", "gemm_dtype", "parse_quantization", "quantize_model"]

logger = logging.getLogger(__name__)

# Group 128: the published GPTQ Int4 checkpoints' group size, and 4.5 bits per weight like
# llama.cpp's Q4_0. Group 64 has a 10-19% smaller weight error on 2048x2048 test weights (Gaussian /
# Student-t) for 11% more bytes; a Qwen-1.8B decode step's int4 products took 15-22% less time at
# group 128 (qwen.kernels, 2 threads, Zen 4, interleaved in one process: fewer bytes and half the
# per-group work). "int4:64" (or group_size=64) chooses the other trade.
DEFAULT_GROUP_SIZE = 128
GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel accepts
_CHUNK_ELEMENTS = 1 << 24  # rows are processed in chunks of about this many weights (64 MB in fp32)


def _row_chunks(n_rows: int, n_cols: int, multiple: int = 64):
    """(start, end) row ranges of about _CHUNK_ELEMENTS weights, each a multiple of `multiple` rows."""
    step = max(multiple, _CHUNK_ELEMENTS // max(n_cols, 1) // multiple * multiple)
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def native_cpu_gemm(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMM multiplies `dtype` operands natively here: fp32 always; bf16 with
    AVX512_BF16 or AMX, fp16 with AMX-FP16 (unless ATEN_CPU_CAPABILITY caps torch below AVX-512,
    which simulates an older CPU). Elsewhere its 16-bit GEMM emulates the products and runs 2-8x
    slower than converting the operands to fp32 and multiplying in fp32 (measured on Zen 4 with and
    without the AVX2 cap: bench/README.md, "Prefill without native 16-bit products")."""
    if dtype == torch.float32:
        return True
    if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() in ("avx2", "default"):
        return False
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return False


def gemm_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The dtype a product of `dtype` operands with many rows is computed in on `device`: `dtype`
    itself, except 16-bit on a CPU without native products for it (native_cpu_gemm): fp32 there
    (exact widening, fp32 sums, one rounding of the result)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    native = _NATIVE_GEMM.get(dtype)
    if native is None:  # resolved once per process: every large-M call asks
        native = _NATIVE_GEMM[dtype] = native_cpu_gemm(dtype)
    return dtype if native else torch.float32


_NATIVE_GEMM: dict = {}


def chunked_linear(x2: torch.Tensor, out_features: int, weight_rows, bias: torch.Tensor | None,
                   chunk: int) -> torch.Tensor:
    """x2 [M, K] @ W.T + bias in x2's dtype, with W [out_features, K] never held whole: weight_rows(
    start, end, dtype, out) writes rows start:end of W in `dtype` into `out` (scratch) and returns
    it, about `chunk` weights at a time. Multiplied with F.linear in gemm_dtype (fp32 for 16-bit x on
    a CPU without native 16-bit products: the bias added in fp32, one rounding per output)."""
    rows, k = x2.shape
    n = out_features
    compute = gemm_dtype(x2.dtype, x2.device)
    step = min(n, max(16, chunk // k // 16 * 16))
    scratch = _scratch("weight", step * k, compute, x2.device)
    # qwen.kernels' GEMM (where it runs) widens x2 itself and writes each chunk's columns in place.
    kernels = _own_kernels(x2) if compute != x2.dtype else None
    if kernels is not None:
        y = torch.empty(rows, n, dtype=x2.dtype, device=x2.device)
        for start in range(0, n, step):
            end = min(start + step, n)
            w = weight_rows(start, end, compute, scratch[: (end - start) * k].view(end - start, k))
            if kernels.gemm(x2, w, None if bias is None else bias[start:end], y[:, start:end]) is None:
                break
        else:
            return y
    x_in = x2 if compute == x2.dtype else x2.to(compute)
    bias = None if bias is None else bias.to(compute)
    y = None
    for start in range(0, n, step):
        end = min(start + step, n)
        w = weight_rows(start, end, compute, scratch[: (end - start) * k].view(end - start, k))
        part = F.linear(x_in, w, None if bias is None else bias[start:end])
        if end - start == n and compute == x2.dtype:
            return part
        if y is None:
            y = torch.empty(rows, n, dtype=x2.dtype, device=x2.device)
        y[:, start:end] = part  # the one rounding to x2's dtype where compute is fp32
    return y


def _check_finite(w: torch.Tensor, what: str) -> None:
    if not torch.isfinite(w).all():
        raise ValueError(f"cannot quantize {what}: the weight has inf or nan values")


class _QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: shapes, bias, the float32 buffers and the M dispatch."""

    _FLOAT32_BUFFERS: tuple[str, ...] = ()
    _BF16_BUFFERS: tuple[str, ...] = ()
    # Calls with at least this many rows dequantize and use a GEMM (set per class from measurements):
    # `large_m` where torch's weight-only kernels run, `large_m_own` where qwen.kernels' run.
    large_m = 32
    large_m_own = 32
    # ... and from this many rows on where qwen.kernels' GEMM runs for them (kernels.gemm_runs, and no
    # native 16-bit products: on AVX2-only CPUs).
    large_m_gemm = 32
    # Weights dequantized at a time on the large-M path: 4M (an 8 MB bf16 scratch) stays in cache
    # for the GEMM; 32M measured 1.2-2x slower for int8 at M = 64 and 512 (11008x2048).
    gemm_chunk = 1 << 22

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() / .float() must move these buffers but not change their dtype:
        # they are converted with `fn` only to learn the new device; the values kept are the originals.
        fixed = {}
        for name in self._FLOAT32_BUFFERS + self._BF16_BUFFERS:
            if self._buffers.get(name) is not None:
                fixed[name] = self._buffers[name]
                self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, tensor in fixed.items():
                device = fn(tensor[:1].clone()).device if tensor.numel() else fn(tensor).device
                self._buffers[name] = tensor.to(device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def bytes_read(self) -> int:
        """Bytes one small-M forward reads (what bounds decoding): the kernel's tensors and the bias."""
        tensors = [getattr(self, name) for name in self._KERNEL_TENSORS] + [self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] the layer stands for: q * scale (+ min) with one fp32 rounding; a
        16-bit `dtype` rounds scale, min and the result once more."""
        return torch.cat(
            [self._dequantize_rows(a, b, dtype) for a, b in _row_chunks(self.out_features, self.in_features)]
        )

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        """torch's weight-only kernel's product for bf16 rows x2 [M, K] (no bias), or None if there is none."""
        raise NotImplementedError

    def _qwen_kernel(self, x2: torch.Tensor) -> torch.Tensor | None:
        """qwen.kernels' product for bf16 rows x2 [M, K], bias included (bf16), or None where it does
        not run (not the qwen package, QWEN_KERNELS=off, no extension). Above kernels.MAX_ROWS rows,
        in chunks of MAX_ROWS (each chunk reads the weights again, from cache for the most part)."""
        kernels = _own_kernels(self._KERNEL_WEIGHT)
        if kernels is None:
            return None
        step, parts = kernels.MAX_ROWS, []
        for start in range(0, x2.shape[0], step):
            part = self._own_call(kernels, x2[start : start + step])
            if part is None:
                return None
            parts.append(part)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _own_call(self, kernels, x2: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
            # The decode step, first and with the fewest Python steps: qwen.kernels takes [..., K] as is.
            kernels = _own_kernels(self._KERNEL_WEIGHT)
            if kernels is not None and x.numel() <= kernels.MAX_ROWS * self.in_features:
                y = self._own_call(kernels, x)
                if y is not None:
                    return y
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and x.requires_grad:
            # Training through the frozen layer (Q-LoRA): gradients flow to x only. The kernels and
            # the reused scratch buffer know no autograd, so the product gets its own backward.
            return _FrozenQuantizedProduct.apply(x2, self).reshape(*shape[:-1], self.out_features)
        rows, y = x2.shape[0], None
        own_limit = self.large_m_own
        if self.large_m_gemm <= rows < own_limit and self._own_gemm_runs(x2):
            own_limit = rows  # qwen.kernels' GEMM beats the GEMV chunks from large_m_gemm on
        if rows < max(self.large_m, own_limit) and x.device.type == "cpu":
            xb = x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)
            if rows < own_limit:
                y = self._qwen_kernel(xb)
                if y is not None:
                    y = y.to(x.dtype)
            if y is None and rows < self.large_m:
                y = self._kernel(xb.contiguous())
                if y is not None:
                    y = y.to(x.dtype)
                    if self.bias is not None:
                        y = y.add_(self.bias.to(y.dtype))
        if y is None:
            y = self._dequantized_linear(x2)
        return y.reshape(*shape[:-1], self.out_features)

    def _gemm_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 with its columns in the order of _gemm_weight's columns."""
        return x2

    def _gemm_weight(self, start: int, end: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        """Rows start:end of the weight in `dtype`, written into `out` (scratch), columns in the order
        _gemm_input gives x."""
        raise NotImplementedError

    def _dequantized_linear(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 @ w~.T + bias through F.linear, dequantizing `gemm_chunk` weights at a time into scratch
        (in fp32 where the CPU has no native products for x2's dtype: chunked_linear). There, where
        qwen.kernels' GEMM runs, it dequantizes as it packs instead (no scratch, no torch passes)."""
        if gemm_dtype(x2.dtype, x2.device) != x2.dtype:
            kernels = _own_kernels(x2)
            y = None if kernels is None else self._own_gemm(kernels, x2)
            if y is not None:
                return y
        return chunked_linear(self._gemm_input(x2), self.out_features, self._gemm_weight, self.bias, self.gemm_chunk)

    def _own_gemm(self, kernels, x2: torch.Tensor) -> torch.Tensor | None:
        """qwen.kernels' many-row product (fp32 products, one rounding to x2's dtype), or None."""
        raise NotImplementedError

    @staticmethod
    def _own_gemm_runs(x2: torch.Tensor) -> bool:
        """Whether _dequantized_linear(x2) runs qwen.kernels' GEMM."""
        if gemm_dtype(x2.dtype, x2.device) == x2.dtype:
            return False
        kernels = _own_kernels(x2)
        return kernels is not None and kernels.gemm_runs()


class _FrozenQuantizedProduct(torch.autograd.Function):
    """y = x @ w~.T + bias with a gradient for x alone; the weight is dequantized again in backward
    (into a fresh tensor) rather than kept, so training holds no float copy of the weights."""

    @staticmethod
    def forward(ctx, x2, layer):
        ctx.layer = layer
        return layer._dequantized_linear(x2)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None


_SCRATCH = threading.local()


def _scratch(slot: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A flat per-thread buffer reused across calls and layers. A fresh multi-megabyte tensor costs
    page faults on every call (measured: 6 ms to allocate and fill 16 MB, 0.5 ms to refill); this
    costs them once. Callers must be done with one call's contents before the next call."""
    pool = _SCRATCH.__dict__.setdefault("pool", {})
    key = (slot, dtype, torch.device(device))
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        # A normal tensor even when the first call runs under inference_mode (the engine's steps):
        # an inference tensor could not be written by a later call outside it (generate() runs
        # under no_grad only).
        with torch.inference_mode(False):
            buffer = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


class Int8Linear(_QuantizedLinear):
    """y = x @ (qweight * scale[:, None]).T + bias, with int8 weights and one float32 scale per row."""

    # Crossover measured at 2 threads, bf16 (CPU ms, kernel vs dequantize + GEMM): 11008x2048 M = 16
    # 11.2 vs 12.5, M = 24 16.7 vs 14.2; 2048x5504 M = 24 7.0 vs 7.1, M = 32 9.2 vs 8.2.
    large_m = 24
    # qwen.kernels (16-row chunks) vs dequantize + GEMM, same conditions: 5504x2048 M = 64 5.9 vs 6.3,
    # M = 96 9.2 vs 8.7; 2048x5504 M = 96 8.8 vs 10.1, M = 128 11.6 vs 11.7.
    large_m_own = 96
    # qwen.kernels' GEMM vs its GEMV (16-row chunks), AVX2 caps on Zen 4, 2 threads, ms: 6144x2048
    # M = 32 6.6 vs 5.7, M = 48 7.8 vs 10.1; 5504x2048 M = 48 6.8 vs 9.0; 2048x5504 M = 48 7.4 vs 8.5.
    large_m_gemm = 48

    _FLOAT32_BUFFERS = ("scale",)
    _BF16_BUFFERS = ("scale_bf16",)

    @property
    def _KERNEL_TENSORS(self):  # ours reads the canonical buffers, torch's the bf16 scales
        return ("qweight", "scale") if _own_kernels(self.qweight) is not None else ("qweight", "scale_bf16")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=torch.bfloat16, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer(
            "scale_bf16", torch.zeros(out_features, dtype=torch.bfloat16, device=device), persistent=False
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach()
        n, k = weight.shape
        layer = cls(k, n, linear.bias is not None, dtype=weight.dtype, device=weight.device)
        for start, end in _row_chunks(n, k):
            w = weight[start:end].float()
            _check_finite(w, f"a {n}x{k} linear layer")
            scale = w.abs().amax(dim=1) / 127
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
            layer.qweight[start:end] = torch.round(w / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
            layer.scale[start:end] = scale
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        layer.refresh_backend()
        return layer

    def refresh_backend(self) -> None:
        """Rebuild the backend copies from the canonical buffers (after loading a state_dict)."""
        self.scale_bf16 = self.scale.to(torch.bfloat16)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_backend()

    def _dequantize_rows(self, start, end, dtype):
        if dtype == torch.float32:
            return self.qweight[start:end].float().mul_(self.scale[start:end, None])
        # |q| <= 127 is exact in 16 bits; one rounding of the scale and one of the product.
        return self.qweight[start:end].to(dtype).mul_(self.scale[start:end, None].to(dtype))

    def _gemm_weight(self, start, end, dtype, out):
        scale = self.scale_bf16 if dtype == torch.bfloat16 else self.scale.to(dtype)
        return torch.mul(self.qweight[start:end], scale[start:end, None], out=out)  # one pass, one rounding

    @property
    def _KERNEL_WEIGHT(self):
        return self.qweight

    def _own_call(self, kernels, x2):
        return kernels._int8_or_none(x2, self.qweight, self.scale, self.bias)

    def _own_gemm(self, kernels, x2):
        return kernels.int8_gemm(x2, self.qweight, self.scale, self.bias)

    def _kernel(self, x2):
        # torch 2.13's kernel reads past the row (wrong sums, even a crash) unless K is a multiple
        # of 16; every published Qwen shape is (multiples of 256), tiny test models may not be.
        if self.in_features % 16:
            return None
        return torch._weight_int8pack_mm(x2, self.qweight, self.scale_bf16)


class Int4Linear(_QuantizedLinear):
    """y = x @ w~.T + bias with w~[n, k] = q * scales[n, k // g] + mins[n, k // g], q 4-bit unsigned."""

    # Crossover measured at 2 threads, bf16, group 128 (CPU ms, kernel vs dequantize + GEMM):
    # 11008x2048 M = 32 16.8 vs 24.7, M = 64 33.3 vs 31.4; 2048x5504 M = 64 16.8 vs 17.1, M = 96 24.9 vs 20.1.
    large_m = 64
    # qwen.kernels (16-row chunks) vs dequantize + GEMM, group 64: 5504x2048 M = 96 11.8 vs 12.1,
    # M = 128 15.6 vs 14.1; 2048x5504 M = 128 14.2 vs 16.6, M = 192 21.9 vs 20.1.
    large_m_own = 128
    # qwen.kernels' GEMM vs its GEMV, as for int8, group 128: 6144x2048 M = 64 10.5 vs 10.2, M = 96
    # 14.0 vs 15.1; 5504x2048 M = 64 9.8 vs 9.8, M = 96 13.5 vs 15.4; 2048x5504 M = 96 13.4 vs 16.7.
    large_m_gemm = 96

    _FLOAT32_BUFFERS = ("scales", "mins")
    _BF16_BUFFERS = ("scale_zeros",)

    @property
    def _KERNEL_TENSORS(self):  # the canonical buffers for qwen.kernels (or no kernel), else torch's packed copy
        if self.packed_cpu is None or _own_kernels(self.packed) is not None:
            return ("packed", "scales", "mins")
        return ("packed_cpu", "scale_zeros")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = DEFAULT_GROUP_SIZE,
        dtype=torch.bfloat16,
        device=None,
    ):
        group_size = _check_group_size(group_size)
        if in_features % group_size:
            raise ValueError(
                f"int4 group size {group_size} does not divide the layer's input size {in_features}; "
                f"use a group size that divides it"
            )
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("mins", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("packed_cpu", None, persistent=False)
        self.register_buffer("scale_zeros", None, persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"

    @property
    def qweight(self) -> torch.Tensor:
        """The packed 4-bit weights under the name quantized-layer tools (PEFT) look for."""
        return self.packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        weight = linear.weight.detach()
        n, k = weight.shape
        layer = cls(k, n, linear.bias is not None, group_size, dtype=weight.dtype, device=weight.device)
        g = layer.group_size
        for start, end in _row_chunks(n, k):
            w = weight[start:end].float().view(end - start, k // g, g)
            _check_finite(w, f"a {n}x{k} linear layer")
            low = w.amin(dim=2)
            scale = (w.amax(dim=2) - low) / 15
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round((w - low[..., None]) / divisor[..., None]).clamp_(0, 15).to(torch.uint8)
            q = q.view(end - start, k)
            layer.packed[start:end] = q[:, 0::2] | (q[:, 1::2] << 4)
            layer.scales[start:end] = scale
            layer.mins[start:end] = low
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        layer.refresh_backend()
        return layer

    def refresh_backend(self) -> None:
        """Build torch's packed copy and bf16 scale/zero table from the canonical buffers, unless
        qwen.kernels' int4 kernel runs here: it reads the canonical buffers, and no copy is kept."""
        if self.out_features % 16 or self.packed.device.type != "cpu" or self._own_kernel_runs():
            self.packed_cpu = self.scale_zeros = None
            return
        parts = []
        for start, end in _row_chunks(self.out_features, self.in_features):  # multiples of 64 rows: see tests
            parts.append(torch._convert_weight_to_int4pack_for_cpu(self._unpack_rows(start, end).to(torch.int32), 1))
        self.packed_cpu = torch.cat(parts)
        zeros = self.mins + 8 * self.scales
        self.scale_zeros = torch.stack([self.scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_backend()

    def _unpack_rows(self, start: int, end: int) -> torch.Tensor:
        """The 4-bit values q of rows start:end as uint8 [rows, K]."""
        p = self.packed[start:end]
        return torch.stack([p & 0xF, p >> 4], dim=-1).view(end - start, self.in_features)

    def _dequantize_rows(self, start, end, dtype):
        rows, g = end - start, self.group_size
        q = self._unpack_rows(start, end).view(rows, -1, g)
        scales, mins = self.scales[start:end, :, None].to(dtype), self.mins[start:end, :, None].to(dtype)
        return torch.addcmul(mins, q.to(dtype), scales).view(rows, self.in_features)

    def _gemm_input(self, x2):
        return torch.cat([x2[:, 0::2], x2[:, 1::2]], dim=1)

    def _gemm_weight(self, start, end, dtype, out):
        # Columns: all even k, then all odd k (x is permuted to match), so that the low and the high
        # nibbles are each masked in one int32 pass over 4 bytes and land in place with one addcmul.
        # The scales and mins are first expanded to one per weight (torch's broadcasting over a short
        # innermost group, 16 for g = 32, was 5x slower). Row blocks of ~1 MB of nibbles keep a block's
        # passes in cache and the op count low (each op is a sync point of torch's threads).
        groups, half, width = self.in_features // self.group_size, self.group_size // 2, self.in_features // 2
        block = max(1, (1 << 20) // width)
        device = self.packed.device
        low_buf, high_buf = (_scratch(slot, block * width // 4, torch.int32, device) for slot in ("low", "high"))
        scale_buf, min_buf = (_scratch(slot, block * width, dtype, device) for slot in ("scale", "min"))
        out2 = out.view(end - start, 2, width)
        for a in range(start, end, block):
            b = min(a + block, end)
            rows, at = b - a, slice(a - start, b - start)
            packed = self.packed[a:b].view(torch.int32)
            low = torch.bitwise_and(packed, 0x0F0F0F0F, out=low_buf[: packed.numel()].view_as(packed))
            high = torch.bitwise_right_shift(packed, 4, out=high_buf[: packed.numel()].view_as(packed))
            high.bitwise_and_(0x0F0F0F0F)
            scales = scale_buf[: rows * width].view(rows, groups, half)
            scales.copy_(self.scales[a:b, :, None].expand(rows, groups, half))
            mins = min_buf[: rows * width].view(rows, groups, half)
            mins.copy_(self.mins[a:b, :, None].expand(rows, groups, half))
            for i, nibbles in enumerate((low, high)):
                torch.addcmul(
                    mins.view(rows, width),
                    nibbles.view(torch.uint8).view(rows, width),
                    scales.view(rows, width),
                    out=out2[at, i],
                )
        return out

    def _own_kernel_runs(self) -> bool:
        kernels = _own_kernels(self.packed)
        return kernels is not None and kernels.supports_int4(
            torch.empty(1, self.in_features, dtype=torch.bfloat16), self.packed, self.scales, self.mins, self.group_size)

    @property
    def _KERNEL_WEIGHT(self):
        return self.packed

    def _own_call(self, kernels, x2):
        return kernels._int4_or_none(x2, self.packed, self.scales, self.mins, self.group_size, self.bias)

    def _own_gemm(self, kernels, x2):
        return kernels.int4_gemm(x2, self.packed, self.scales, self.mins, self.group_size, self.bias)

    def _kernel(self, x2):
        if self.packed_cpu is None:
            return None
        return torch._weight_int4pack_mm_for_cpu(x2, self.packed_cpu, self.group_size, self.scale_zeros)


def _own_kernels(weight: torch.Tensor):
    """The qwen.kernels module when its CPU kernels run in this process for a CPU weight, else None
    (remote code never imports the qwen package: there the layers use torch's kernels)."""
    if weight.device.type != "cpu":
        return None
    if not _KERNELS:  # resolved once per process (every layer asks on every call)
        kernels = None
        if __package__ == "qwen":
            import importlib  # not `from .kernels`: transformers would look for that file beside remote code

            kernels = importlib.import_module("qwen.kernels")
            kernels = kernels if kernels.backend() != "torch" else None
        _KERNELS.append(kernels)
    return _KERNELS[0]


_KERNELS: list = []  # [qwen.kernels or None] once _own_kernels has looked


def _check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size!r}")
    return group_size


def parse_quantization(method, group_size=None) -> tuple[str, int | None]:
    """("int8", None) or ("int4", group size) from "int8", "int4", "int4:<g>" and an optional group_size."""
    kind, group = _parse(method, group_size)
    return kind, DEFAULT_GROUP_SIZE if kind == "int4" and group is None else group


def _parse(method, group_size=None) -> tuple[str, int | None]:
    """parse_quantization, with None for an int4 group size neither the method nor group_size gives."""
    text = method.strip().lower() if isinstance(method, str) else None
    match = re.fullmatch(r"(int8|int4)(?::(\w+))?", text or "")
    if not match:
        raise ValueError(
            f"unknown quantization {method!r}: expected 'int8', 'int4' or 'int4:<group size>' "
            f"(group size {', '.join(map(str, GROUP_SIZES))})"
        )
    kind, suffix = match.groups()
    if kind == "int8":
        if suffix is not None or group_size is not None:
            raise ValueError("int8 quantization is per output channel: it takes no group size")
        return kind, None
    if suffix is not None:
        if not suffix.isdigit():
            raise ValueError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {suffix!r}")
        if group_size is not None and group_size != int(suffix):
            raise ValueError(f"quantization {method!r} and group_size={group_size!r} disagree")
        group_size = int(suffix)
    return kind, None if group_size is None else _check_group_size(group_size)


def quantize_model(model: nn.Module, method: str = "int8", group_size: int | None = None) -> nn.Module:
    """Replace every nn.Linear in `model` by an Int8Linear or Int4Linear, in place; returns `model`.

    `method` is "int8", "int4" or "int4:<group size>"; `group_size` (int4 only) is 32, 64, 128 or 256,
    default 128. Layers are converted one at a time, so memory peaks at the model plus one layer's
    copy; each float weight is released as its layer is replaced (unless something else holds it,
    e.g. a tied embedding). With the default group, a layer whose input size 128 does not divide
    gets the largest of 64 and 32 that does; with a group size given, such a layer stays float (one
    warning lists them). Raises ValueError for an unknown method or group size."""
    kind, given = _parse(method, group_size)
    group = DEFAULT_GROUP_SIZE if kind == "int4" and given is None else given
    # Names only: holding the modules would keep every float weight alive until the end.
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    skipped, used = [], set()
    for name in names:
        linear = model.get_submodule(name)
        size = group
        if kind == "int4" and given is None:
            size = next((g for g in GROUP_SIZES[::-1] if g <= group and linear.in_features % g == 0), group)
        if kind == "int4" and linear.in_features % size:
            skipped.append(name)
            continue
        used.add(size)
        new = Int8Linear.from_linear(linear) if kind == "int8" else Int4Linear.from_linear(linear, size)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        del linear, new
    if skipped:
        logger.warning(
            "int4 group size %d does not divide the input size of %d linear layer(s), left unquantized: %s",
            group,
            len(skipped),
            ", ".join(skipped[:4]) + (", ..." if len(skipped) > 4 else ""),
        )
    sizes = "/".join(str(g) for g in sorted(used or {group}, reverse=True))
    model.qwen_quantization = kind if kind == "int8" else f"int4:{sizes}"
    return model
