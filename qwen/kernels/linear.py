"""Routing a model's small-M products to our kernel.

    from qwen.kernels.linear import use_kernels
    use_kernels(model)   # done by QWenLMHeadModel.from_pretrained and Engine for CPU 16-bit models

Every `nn.Linear` of the model whose weight is bf16 or fp16 on the CPU becomes a `KernelLinear`: the
same module (same parameters, state dict, `isinstance(m, nn.Linear)`), whose forward sends calls of
up to `MAX_ROWS` activation rows without autograd (decoding) to `qwen.kernels.gemv` and everything
else (prefill, training) to `F.linear`; on a CPU without native products for the weight's dtype
(fp16 without AMX-FP16, bf16 without AVX512_BF16 or AMX) prefill multiplies in fp32 instead:
torch's 16-bit GEMM emulates the products there and is 2-8x slower. Where `qwen.kernels.gemm_runs()`
(the avx2 kernel path, AMD Zen 4) that is our GEMM (`qwen.kernels.gemm`, widening the weight as it
packs it), elsewhere torch's fp32 GEMM on the weight widened a chunk at a time
(`qwen.quantization.chunked_linear`). The model's RMSNorm and attention modules (those with a
`_cpu_ops` class attribute) get the decode-step ops of cpu_ops.cpp (RMSNorm, rotary, few-query
attention), which they use for 16-bit CPU activations. `QWEN_KERNELS=off` keeps torch's numerics
everywhere.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .. import kernels
from ..quantization import Int4Linear, Int8Linear, chunked_linear, gemm_dtype
from . import MAX_ROWS, backend, gemm, gemv


class KernelLinear(nn.Linear):
    # Weights converted to fp32 at a time on the many-rows path where the CPU has no native 16-bit
    # products (16 MB of fp32 scratch, which the GEMM then reads from cache).
    gemm_chunk = 1 << 22

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.numel() > MAX_ROWS * self.in_features and gemm_dtype(weight.dtype, weight.device) != weight.dtype \
                and x.dtype == weight.dtype and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            x2 = x.reshape(-1, self.in_features)
            y = gemm(x2, weight, self.bias)  # qwen.kernels' fp32 GEMM, widening as it packs (where gemm_runs())
            if y is None:
                y = chunked_linear(x2, self.out_features, self._weight_rows, self.bias, self.gemm_chunk)
            return y.view(*x.shape[:-1], self.out_features)
        return gemv(x, weight, self.bias)

    def _weight_rows(self, start: int, end: int, dtype: torch.dtype, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.weight[start:end])


def use_kernels(model: nn.Module) -> int:
    """Swap the model's CPU bf16/fp16 linear layers to KernelLinear; returns how many were swapped
    (0 when the kernel is unavailable or switched off: the model is left as it was)."""
    if backend() == "torch":
        return 0
    swapped = 0
    for module in model.modules():
        if hasattr(type(module), "_cpu_ops"):  # RMSNorm and attention: our decode-step ops (cpu_ops.cpp)
            module._cpu_ops = True
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and weight.device.type == "cpu"
            and weight.dtype in (torch.bfloat16, torch.float16)
        ):
            module.__class__ = KernelLinear
            swapped += 1
    return swapped


def use_torch(model: nn.Module) -> int:
    """Undo use_kernels: every KernelLinear computes with torch's F.linear again (torch's exact
    numerics, e.g. to compare bit for bit with the original); returns how many were swapped back."""
    swapped = 0
    for module in model.modules():
        if "_cpu_ops" in vars(module):
            del module._cpu_ops
        if type(module) is KernelLinear:
            module.__class__ = nn.Linear
            swapped += 1
    return swapped


# ----------------------------------------------------------------------------- a block's decode step in C++

_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> (key, DecodeBlock)


def _linear_spec(module: nn.Module) -> tuple | None:
    """(kind, weight, scales, mins, bias, group) of a linear layer whose decode step the C++ block
    computes as its forward does (KernelLinear: gemv; Int8Linear / Int4Linear: our int8 / int4
    kernels), or None."""
    cls, params, buffers = type(module), module._parameters, module._buffers
    if cls is KernelLinear:
        return 0, params["weight"], None, None, params["bias"], 0
    if cls is Int8Linear:
        return 1, buffers["qweight"], buffers["scale"], None, params["bias"], 0
    if cls is Int4Linear:
        return 2, buffers["packed"], buffers["scales"], buffers["mins"], params["bias"], module.group_size
    return None


def block_plan(block: nn.Module):
    """QWenBlock.decode as two C++ calls (cpu_decode.cpp's DecodeBlock: qkv, then out), for a block
    whose linear layers are all KernelLinear / Int8Linear / Int4Linear and whose RMSNorms and
    attention take the decode-step ops (the caller checks those flags and the hooks); None where
    the kernels are off or a part is something else. Built once per block and rebuilt when a
    module, a tensor or the kernel settings change (each step compares their identities: ~7 us)."""
    level = kernels._level
    if not level:
        return None
    parts = block._modules  # not attribute access (nn.Module.__getattr__): this runs every step
    attn, mlp, ln_1, ln_2 = parts["attn"], parts["mlp"], parts["ln_1"], parts["ln_2"]
    in_attn, in_mlp = attn._modules, mlp._modules
    linears = (in_attn["c_attn"], in_attn["c_proj"], in_mlp["w1"], in_mlp["w2"], in_mlp["c_proj"])
    specs = [_linear_spec(m) for m in linears]
    norms = (ln_1._parameters["weight"], ln_2._parameters["weight"])
    key = (level, kernels._INT4_EXACT, ln_1.eps, ln_2.eps, *map(id, linears), *map(id, norms),
           *(id(part) for spec in specs if spec is not None for part in spec[1:5]))
    cached = _plans.get(block)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = _build_plan(attn, norms, (ln_1.eps, ln_2.eps), specs, level)
    _plans[block] = (key, plan)
    return plan


def _build_plan(attn, norms, eps, specs, level: int):
    plain = kernels._PLAIN
    if any(spec is None for spec in specs) or not all(type(t) in plain for t in norms):
        return None
    if any(t is not None and type(t) not in plain for spec in specs for t in spec[1:5]):
        return None
    ext = kernels._ext
    linears = [ext.DecodeLinear(kind, weight, scales, mins, bias, group, kernels._INT4_EXACT)
               for kind, weight, scales, mins, bias, group in specs]
    return ext.DecodeBlock(norms[0], float(eps[0]), norms[1], float(eps[1]), *linears, heads=attn.num_heads,
                           head_dim=attn.head_dim, isa=level)
