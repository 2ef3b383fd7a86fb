"""Qwen (v1) decoder: the original's numerics on today's transformers.

Module and parameter names follow the original checkpoints (`transformer.h.{i}.attn.c_attn`, ...)
so published weights load unchanged. This file is also written into saved checkpoints as remote
code: it imports only torch, transformers and its sibling files.
"""

import copy
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin, LogitsProcessorList
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_qwen import QWenConfig
from .qwen_generation_utils import (
    DEFAULT_SYSTEM,
    StopWordsLogitsProcessor,
    apply_generation_options,
    chat,
    chat_stream,
    check_generation_config,
    check_context_fits,
    check_local_checkpoint,
)


# ----------------------------------------------------------------------------- precision


def resolve_precision(config: QWenConfig) -> torch.dtype:
    """The original's rule: an explicit bf16/fp16/fp32 flag wins; with none set, pick bf16 if CUDA
    supports it, else fp16 on a capability >= 7 GPU, else fp32. Sets the chosen flag on `config`."""
    config.check_buildable()
    if not (config.bf16 or config.fp16 or config.fp32):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            config.bf16 = True
        elif torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 7:
            config.fp16 = True
        else:
            config.fp32 = True
    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32


def fast_dtype(on_cuda: bool) -> torch.dtype:
    """dtype="fast": the 16-bit dtype that runs fastest here (not the original's rule, which gives
    fp32 on a CPU). CUDA: bf16 where supported, else fp16 (the original's rule without its fp32
    fallback). CPU: bf16 where it multiplies bf16 natively (AVX512_BF16 or AMX: torch's bf16 GEMM
    prefills ~8x faster than its fp16 one, and our kernels decode both alike); elsewhere fp16, which
    decoded ~9% faster than bf16 in one run with AVX2 caps on Zen 4 and alike on an AVX2-only Zen 3
    (its GEMV reads the layers 1.2x faster there; bench/README.md), while both prefill alike:
    through fp32 products (qwen.quantization.gemm_dtype)."""
    if on_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from .quantization import native_cpu_gemm  # a remote-code file too

    return torch.bfloat16 if native_cpu_gemm(torch.bfloat16) else torch.float16


def set_precision_flags(config: QWenConfig, dtype: torch.dtype) -> None:
    """Make the config's precision flags agree with an explicitly requested dtype."""
    config.bf16, config.fp16, config.fp32 = dtype == torch.bfloat16, dtype == torch.float16, dtype == torch.float32


def flash_attn_enabled(config: QWenConfig) -> bool:
    """`use_flash_attn="auto"` means: on for 16-bit models (only used when installed and on CUDA);
    `attn_implementation="flash_attention_2"` turns it on too."""
    if config._attn_implementation == "flash_attention_2":
        return True
    if config.use_flash_attn == "auto":
        return bool(config.bf16 or config.fp16)
    return bool(config.use_flash_attn)


_FLASH_ATTN_FUNC = None


def _flash_attn_func():
    """flash-attn 2 is optional: imported on first use, None when not installed."""
    global _FLASH_ATTN_FUNC
    if _FLASH_ATTN_FUNC is None:
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            flash_attn_func = False
        _FLASH_ATTN_FUNC = flash_attn_func
    return _FLASH_ATTN_FUNC or None


# ----------------------------------------------------------------------------- positions


def ntk_alpha(true_length: int, seq_length: int) -> float:
    """Dynamic NTK: 1 up to seq_length, then 3, 7, 15, ... as the length doubles."""
    context_value = math.log(true_length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def rotary_cos_sin(positions: torch.Tensor, dim: int, base: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, dim] in fp32 for the given positions; the op order matches the original bit for bit."""
    scaled_base = base * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (scaled_base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    freqs = torch.outer(positions.type_as(inv_freq), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of t [B, N, T, d] in fp32, cast back."""
    rot_dim = cos.shape[-1]
    rotated = t[..., :rot_dim].float()
    half = rot_dim // 2
    rotate_half = torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1)
    rotated = rotated * cos + rotate_half * sin
    if rot_dim == t.shape[-1]:
        return rotated.type_as(t)
    return torch.cat((rotated, t[..., rot_dim:].float()), dim=-1).type_as(t)


def logn_factors(start: int, end: int, seq_length: int, device) -> torch.Tensor:
    """LogN query scaling for 0-based positions start..end-1: log(p+1)/log(S) past S, else 1.
    Python's math.log rounded to fp32, as the original's table; shaped [1, 1, T, 1] for [B, N, T, d]."""
    values = [math.log(p, seq_length) if p > seq_length else 1.0 for p in range(start + 1, end + 1)]
    return torch.tensor(values, dtype=torch.float32, device=device)[None, None, :, None]


def uses_manual_attention(config: QWenConfig, output_attentions: bool = False) -> bool:
    """The manual (eager) path: with the int8 cache (as in the original), for attention weights, or
    when asked for with attn_implementation="eager"."""
    return bool(output_attentions or config.use_cache_quantization or config._attn_implementation == "eager")


def attention_bias(
    padding_mask: torch.Tensor | None,
    query_len: int,
    key_len: int,
    window: int | None,
    dtype,
    device,
    manual: bool = False,
) -> torch.Tensor:
    """Additive mask [B or 1, 1, T, K]: 0 where a query may attend, finfo.min (or -inf) elsewhere.

    Causal within the chunk even after a cache (the original was not: a bug we fix), keys further
    back than `window` masked, padded keys masked. Rows of pad queries follow the original, which
    matters because the int8 cache's per-chunk scale sees pad positions too: its SDPA path
    replaces masked slots by min (a pad query attends to every key equally), while its manual path
    adds the padding mask on top (min + min = -inf: a pad query attends to its earlier keys only)."""
    query_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    key_pos = torch.arange(key_len, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window:
        allowed = allowed & (key_pos > query_pos - window)
    allowed = allowed[None, None]
    min_value = torch.finfo(dtype).min

    def additive(mask):
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, min_value)

    if padding_mask is None:
        return additive(allowed)
    keep = padding_mask[:, None, None, :].bool()
    return additive(allowed) + additive(keep) if manual else additive(allowed & keep)


# ----------------------------------------------------------------------------- KV cache


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 KV quantization of a chunk [B, N, T, d]: one (scale, zero) per (b, n) over the chunk,
    repeated per token; arithmetic in the model dtype; the uint8 cast truncates."""
    flat = x.flatten(2)
    fmax, fmin = flat.amax(dim=-1, keepdim=True), flat.amin(dim=-1, keepdim=True)
    scale = (fmax - fmin) / 255.0
    zero = 0.0 - fmin / scale
    scale = scale.unsqueeze(-1).repeat(1, 1, x.shape[2], 1)
    zero = zero.unsqueeze(-1).repeat(1, 1, x.shape[2], 1)
    q = torch.clamp(x / scale + zero, 0, 255).to(torch.uint8)
    return q, scale, zero


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def _reserve(buffer: torch.Tensor | None, view: torch.Tensor | None, like: torch.Tensor, end: int,
             limit: int | None):
    """(buffer, view): a buffer [B, N, >= end, x] shaped as `like` that holds the tokens of `view`
    (the tokens cached so far, a prefix view of `buffer`), and their view in it. The buffer grows by
    doubling (at most to `limit` tokens, when known), so a decode step writes one token instead of
    copying the whole history."""
    length = 0 if view is None else view.shape[-2]
    fits = (
        buffer is not None
        and view is not None
        and view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()  # still a prefix view (crop keeps it; reordering does not)
        and buffer.shape[:2] == like.shape[:2]
        and end <= buffer.shape[-2]
    )
    if not fits:
        old = 0 if buffer is None else buffer.shape[-2]
        capacity = max(end + 256, 2 * old)
        if limit:
            capacity = max(min(capacity, limit), end)
        fresh = like.new_empty(*like.shape[:2], capacity, like.shape[-1])
        if length:
            fresh.narrow(2, 0, length).copy_(view)
        buffer, view = fresh, fresh.narrow(2, 0, length)
    return buffer, view


def _extend(buffer: torch.Tensor | None, view: torch.Tensor | None, new: torch.Tensor, limit: int | None):
    """Write `new` [B, N, t, x] after `view` in place (growing the buffer as _reserve does), and
    return (buffer, view of all tokens)."""
    length = 0 if view is None else view.shape[-2]
    end = length + new.shape[-2]
    buffer, _ = _reserve(buffer, view, new, end, limit)
    buffer.narrow(2, length, end - length).copy_(new)  # narrow: a few us less than indexing, every step
    return buffer, buffer.narrow(2, 0, end)


class PreallocatedLayer(DynamicLayer):
    """One layer of the KV cache: keys/values [B, N, K, d] written in place into a growing buffer
    (views of it are what attention reads); transformers' DynamicLayer concatenates every step."""

    def __init__(self, limit: int | None = None):
        super().__init__()
        self.limit = limit
        self._buffers = {}

    def _append(self, name: str, view, new):
        self._buffers[name], view = _extend(self._buffers.get(name), view, new, self.limit)
        return view

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = self.values = None
        self.keys = self._append("keys", self.keys, key_states)
        self.values = self._append("values", self.values, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def reserve(self, tokens: int):
        """Room for `tokens` more tokens after those cached: (keys buffer, values buffer, position of
        the first new token), for a writer that stores them in place (qwen.kernels.run_blocks);
        `advance(tokens)` then counts them in. Only once something is cached."""
        end = self.keys.shape[-2] + tokens
        for name in ("keys", "values"):
            self._buffers[name], view = _reserve(self._buffers.get(name), getattr(self, name), getattr(self, name), end,
                                                 self.limit)
            setattr(self, name, view)
        return self._buffers["keys"], self._buffers["values"], self.keys.shape[-2]

    def advance(self, tokens: int) -> None:
        end = self.keys.shape[-2] + tokens
        self.keys, self.values = self._buffers["keys"].narrow(2, 0, end), self._buffers["values"].narrow(2, 0, end)

    def reset(self):
        self._buffers = {}
        super().reset()


class Int8KVLayer(PreallocatedLayer):
    """One layer of the int8 KV cache: uint8 keys/values [B, N, K, d] with per-token scale and zero
    [B, N, K, 1]. `update` returns the dequantized full keys and values, as the original's torch path."""

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        self.keys = self.values = None
        self.key_params = self.value_params = None

    def update(self, key_states, value_states, cache_kwargs=None, *args, **kwargs):
        """Store the chunk; return the dequantized keys and values, or with cache_kwargs
        {"int8_raw": True} the stored ((keys, scale, zero), (values, scale, zero)) for the CUDA kernels."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        for name, states in (("key", key_states), ("value", value_states)):
            q, scale, zero = quantize_kv(states)
            stored = getattr(self, name + "s")
            params = getattr(self, name + "_params") or (None, None)
            setattr(self, name + "s", self._append(name, stored, q))
            setattr(self, name + "_params", (
                self._append(name + "_scale", params[0], scale), self._append(name + "_zero", params[1], zero),
            ))
        if cache_kwargs and cache_kwargs.get("int8_raw"):
            return (self.keys, *self.key_params), (self.values, *self.value_params)
        return dequantize_kv(self.keys, *self.key_params), dequantize_kv(self.values, *self.value_params)

    def _map(self, fn):
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.key_params = tuple(fn(t) for t in self.key_params)
            self.value_params = tuple(fn(t) for t in self.value_params)

    def reorder_cache(self, beam_idx):
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices, ...])

    def crop(self, max_length):
        length = self.get_seq_length()
        keep = max_length if max_length >= 0 else length + max_length
        if keep < length:
            self._map(lambda t: t[..., :keep, :])

    def reset(self):
        self.keys = self.values = None
        self.key_params = self.value_params = None
        self.is_initialized = False
        self._buffers = {}


class QWenCache(DynamicCache):
    """The KV cache (plain or int8 per `config.use_cache_quantization`), preallocated and written in
    place, plus the dynamic-NTK alphas chosen at prefill, which later decoding steps keep (as the
    original does). `max_length`, when known (generate knows it), caps how far the buffers grow."""

    int8_raw_views = True  # update(k, v, layer, {"int8_raw": True}) gives the int8 cache's tensors (CUDA kernels)

    def __init__(self, config: QWenConfig, max_length: int | None = None):
        layer_class = Int8KVLayer if config.use_cache_quantization else PreallocatedLayer
        Cache.__init__(self, layers=[layer_class(max_length) for _ in range(config.num_hidden_layers)])
        self.ntk_alphas: list[float] | None = None


# ----------------------------------------------------------------------------- modules


def _global_hooks() -> bool:
    """Whether forward hooks are registered for all modules (torch.nn.modules.module's globals)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _cpu_ops():
    """qwen.kernels, for the modules whose `_cpu_ops` flag qwen.kernels.linear.use_kernels set (it
    imported it; as remote code nothing sets the flag). A flag, not the module, is stored on them:
    models stay deep-copyable and picklable."""
    return sys.modules.get("qwen.kernels")


class QWenRMSNorm(nn.Module):
    # Set by qwen.kernels.linear.use_kernels: our CPU decode-step ops for 16-bit activations.
    _cpu_ops = False

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cpu_ops and x.dtype != torch.float32:
            y = _cpu_ops().rms_norm(x, self.weight, self.eps)  # one call, torch's roundings
            if y is not None:
                return y
        # Normalise in fp32, cast back, then scale (the weight multiplies after the cast).
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        width = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, width, bias=not config.no_bias)
        self.c_proj = nn.Linear(width, config.hidden_size, bias=not config.no_bias)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))  # w2 is the gated branch


CACHE_KERNEL_MAX_POSITIONS = 4  # the longest forward that attends with the int8-cache CUDA kernels


class QWenAttention(nn.Module):
    _cpu_ops = False  # as QWenRMSNorm._cpu_ops: rotary and few-query attention in one call each

    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size)  # bias always present
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=not config.no_bias)
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)
        windows = config.window_attn_sizes
        self.window = windows[layer_idx] if windows and windows[layer_idx] and windows[layer_idx] > 0 else None

    def _heads(self, qkv, rotary, ops):
        """q, k, v [B, N, T, d] from c_attn's output, q and k rotated."""
        batch, length, _ = qkv.shape
        cos, sin = rotary
        rotated = ops.rotary_qk(qkv, cos, sin, self.num_heads, self.head_dim) if ops is not None else None
        if rotated is not None:  # bit for bit apply_rotary's result
            q, k = rotated
            v = qkv[..., 2 * self.config.hidden_size :].view(batch, length, self.num_heads, self.head_dim)
            return q, k, v.transpose(1, 2)
        q, k, v = qkv.split(self.config.hidden_size, dim=2)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def decode(self, hidden_states, rotary, write, bias, causal):
        """forward() for the decode step QWenModel._decode_writers admits (no LogN, no manual
        attention, CPU ops on): the same ops in the same order, so bit for bit its result, with the
        linear layers' forward called directly (no hooks to run: checked) and this layer's KV
        written by `write(k, v)` (the cache layer's or the serving cache's update)."""
        q, k, v = self._heads(self.c_attn.forward(hidden_states), rotary, _cpu_ops())
        k, v = write(k, v)
        return self.decode_attend(q, k, v, bias, causal)

    def decode_attend(self, q, k, v, bias, causal):
        """decode() from the cache write on: attention over the cached keys and values, c_proj."""
        out = _cpu_ops().attention(q, k, v, bias, causal)
        if out is None:
            batch, length = q.shape[0], q.shape[2]
            out = self._fast(q, k, v, bias, causal).transpose(1, 2).reshape(batch, length, self.config.hidden_size)
        return self.c_proj.forward(out)

    def forward(self, hidden_states, rotary, logn, bias, causal, cache=None, output_attentions=False):
        batch, length, _ = hidden_states.shape
        qkv = self.c_attn(hidden_states)
        ops = _cpu_ops() if self._cpu_ops and qkv.dtype != torch.float32 else None
        q, k, v = self._heads(qkv, rotary, ops)

        int8 = None  # (extension, keys, values) for the int8-cache CUDA kernels
        # Only for a few new positions (decode steps): each position re-reads the whole uint8 cache in
        # the kernels, while dequantize-then-matmul reads it once and multiplies on tensor cores, which
        # wins for a prompt (`bench/cache_kernels.py --positions` measures where they cross).
        if cache is not None and self.config.use_cache_kernel and q.is_cuda and self.config.use_cache_quantization \
                and length <= CACHE_KERNEL_MAX_POSITIONS and getattr(cache, "int8_raw_views", False):
            from .cache_kernels import load as load_cache_kernels

            ext = load_cache_kernels(self.config)
            if ext is not None:
                int8 = (ext, *cache.update(k, v, self.layer_idx, {"int8_raw": True}))
        if int8 is None and cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif int8 is None and self.config.use_cache_quantization:
            # The original quantizes the chunk before attention even without a cache.
            k, v = dequantize_kv(*quantize_kv(k)), dequantize_kv(*quantize_kv(v))

        if logn is not None:
            q = q * logn.type_as(q)  # after RoPE; the cache holds unscaled keys only

        if int8 is not None:
            out, weights = self._eager(q, None, None, bias, causal, int8)
        elif uses_manual_attention(self.config, output_attentions):
            out, weights = self._eager(q, k, v, bias, causal)
        else:
            weights = None
            # A decode step (a few new queries over the cache): our CPU kernel, in fp32 throughout,
            # several times faster than torch's scaled_dot_product_attention at these shapes.
            few = ops is not None and not (self.training and self.config.attn_dropout_prob > 0)
            out = ops.attention(q, k, v, bias, causal) if few and length <= 16 else None
            if out is not None:
                return self.c_proj(out), weights
            if ops is not None and q.dtype == torch.float16 and not self.training:
                # A prompt in fp16 on the CPU: torch's fp16 attention there ran 2x slower than in fp32
                # with the operands widened (Zen 4, 512 tokens, with and without AVX2 caps).
                wide = None if bias is None else bias.float()
                out = self._fast(q.float(), k.float(), v.float(), wide, causal).to(q.dtype)
            else:
                out = self._fast(q, k, v, bias, causal)
        out = out.transpose(1, 2).reshape(batch, length, self.config.hidden_size)
        return self.c_proj(out), weights

    def _eager(self, q, k, v, bias, causal, int8=None):
        if int8 is None:
            scores = torch.matmul(q, k.transpose(-1, -2)) / (v.size(-1) ** 0.5)
        else:  # the CUDA kernels read the uint8 cache directly (qwen/cache_kernels.py)
            from .cache_kernels import pv, qk

            ext, keys, values = int8
            scores = qk(ext, q, *keys) / (self.head_dim ** 0.5)
        if bias is not None:
            scores = scores + bias
        elif causal:
            tril = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores = torch.where(tril, scores, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float() if self.config.softmax_in_fp32 else scores, dim=-1).type(q.dtype)
        probs = self.attn_dropout(probs)
        if int8 is not None:
            return pv(ext, probs, *values), probs
        return torch.matmul(probs, v), probs

    def _fast(self, q, k, v, bias, causal):
        dropout = self.config.attn_dropout_prob if self.training else 0.0
        flash = _flash_attn_func() if q.is_cuda and q.dtype != torch.float32 else None
        if flash is not None and flash_attn_enabled(self.config) and bias is None:
            # Only unpadded, unwindowed chunks reach here (bias is None); flash wants [B, T, N, d].
            out = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout, causal=causal)
            return out.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, is_causal=causal)


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, rotary, logn, bias, causal, cache=None, output_attentions=False, **replay):
        # `replay`: what calibration tools add when they call a block on its own (gptqmodel passes
        # attention_mask and position_ids); the mask is already in `bias` and positions in `rotary`.
        attn_out, weights = self.attn(self.ln_1(hidden_states), rotary, logn, bias, causal, cache, output_attentions)
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, weights

    def decode(self, hidden_states, rotary, write, bias, causal):
        """forward() for the decode step QWenModel._decode_writers admits: see QWenAttention.decode.
        Where qwen.kernels has this block's step in C++ (block_plan: the same kernels in the same
        order, without the Python between them), that runs it."""
        plan = _cpu_ops().block_plan(self)
        qkv = plan.qkv(hidden_states, *rotary) if plan is not None else None
        if qkv is not None:
            q, k, v = qkv
            k, v = write(k, v)
            out = plan.out(hidden_states, q, k, v, bias, causal)
            if out is not None:
                return out
            return self._decode_mlp(hidden_states + self.attn.decode_attend(q, k, v, bias, causal))
        return self._decode_mlp(
            hidden_states + self.attn.decode(self.ln_1.forward(hidden_states), rotary, write, bias, causal)
        )

    def _decode_mlp(self, hidden_states):
        mlp, x = self.mlp, self.ln_2.forward(hidden_states)
        return hidden_states + mlp.c_proj.forward(mlp.w1.forward(x) * F.silu(mlp.w2.forward(x)))  # as QWenMLP


# ----------------------------------------------------------------------------- models


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    # forward averages its loss per micro-batch (the original's loss) and takes no num_items_in_batch:
    # the Trainer must not rescale it by processes or stop dividing it by gradient accumulation.
    accepts_loss_kwargs = False
    _no_split_modules = ["QWenBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _keys_to_ignore_on_load_missing = [r"h\.\d+\.attn\.rotary_emb\.inv_freq"]
    _keys_to_ignore_on_load_unexpected = [r"h\.\d+\.attn\.masked_bias", r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, QWenRMSNorm):
            init.ones_(module.weight)
        # Residual projections get a depth-scaled std, as in the original.
        if isinstance(module, (QWenAttention, QWenMLP)):
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))


def _as_cache(cache, past_key_values):
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, Cache) and not hasattr(cache, "row_starts"):
        raise TypeError(
            f"past_key_values must be a transformers Cache (e.g. qwen.QWenCache), not {type(cache).__name__}; "
            "legacy tuples are not supported on transformers 5"
        )
    return cache


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        config.check_buildable()
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList([QWenBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = QWenRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_dim = head_dim if config.rotary_pct == 1.0 else int(config.kv_channels * config.rotary_pct)
        self.gradient_checkpointing = False
        self._rotary_tables: dict = {}  # (alpha, device) -> cos, sin [positions, rotary_dim]
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def _rotary_table(self, alpha: float, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions 0..end-1 (or more) at this NTK alpha, computed once and grown by
        doubling; a row of it is bit-identical to computing that position alone."""
        key = (alpha, str(device))
        table = self._rotary_tables.get(key)
        if table is None or table[0].shape[0] < end:
            size = max(end, 2 * (table[0].shape[0] if table is not None else 256))
            base = float(self.config.rotary_emb_base)
            table = rotary_cos_sin(torch.arange(size, device=device), self.rotary_dim, base, alpha)
            self._rotary_tables[key] = table
        return table

    def set_input_embeddings(self, value):
        self.wte = value

    def _ntk_alphas(self, cache, query_len, key_len, padding_mask) -> list[float]:
        config = self.config
        if self.training or not config.use_dynamic_ntk:
            alphas = [1.0]
        elif key_len != query_len:
            # Decoding after a prefill: keep the alphas chosen for the prompt.
            alphas = getattr(cache, "ntk_alphas", None) or [ntk_alpha(key_len, config.seq_length)]
        elif padding_mask is not None and key_len > config.seq_length:
            true_lengths = padding_mask.sum(dim=-1).tolist()
            alphas = [ntk_alpha(int(n), config.seq_length) for n in true_lengths]
        else:
            alphas = [ntk_alpha(key_len, config.seq_length)]
        if cache is not None:
            cache.ntk_alphas = alphas
        return alphas

    def _rotary(self, alphas, query_len, key_len, device):
        start = key_len - query_len
        tables = {a: self._rotary_table(a, key_len, device) for a in set(alphas)}
        cos = torch.stack([tables[a][0][start:key_len] for a in alphas])[:, None]  # [B or 1, 1, T, D]
        sin = torch.stack([tables[a][1][start:key_len] for a in alphas])[:, None]
        return cos, sin

    def _decode_writers(self, hidden_states, cache, rows, logn, output_attentions, output_hidden_states):
        """Each block's KV writer `write(k, v) -> (keys, values)` where the blocks may run their
        `decode` path, else None. It runs a step of at most kernels.MAX_ROWS (16) new tokens in 16-bit
        on the CPU with the decode-step ops on, no LogN, attention that needs no manual path, nothing
        to record or return per layer, no hooks on the blocks' modules (decode calls their forward
        directly), and either a plain QWenCache with a preallocated layer per block or the serving
        engine's cache (`rows`, qwen.serving.kv). On a Qwen-1.8B int4 step (2 threads) it saves ~1 ms
        of ~35 (module calls and cache bookkeeping)."""
        if (
            self.training or logn is not None or output_attentions or output_hidden_states
            or hidden_states.shape[1] > 16 or hidden_states.dtype not in (torch.bfloat16, torch.float16)
            or hidden_states.device.type != "cpu" or uses_manual_attention(self.config) or _global_hooks()
        ):
            return None
        if rows is not None:
            writers = [functools.partial(cache.update, layer_idx=i) for i in range(len(self.h))]
        elif (type(cache) is QWenCache and not cache.offloading and len(cache.layers) == len(self.h)
              and all(type(layer) is PreallocatedLayer for layer in cache.layers)):
            writers = [layer.update for layer in cache.layers]
        else:
            return None
        for block in self.h:  # _modules, not attribute access: this runs every step
            parts = block._modules
            attn, mlp = parts["attn"], parts["mlp"]
            if not (attn._cpu_ops and parts["ln_1"]._cpu_ops and parts["ln_2"]._cpu_ops):
                return None
            for module in (block, parts["ln_1"], parts["ln_2"], attn, mlp, *attn._modules.values(),
                           *mlp._modules.values()):
                if module._forward_hooks or module._forward_pre_hooks:
                    return None
        return writers

    def _run_blocks(self, hidden_states, rotary, cache, rows, biases, causal):
        """The decode step of the leading blocks that have a C++ step (kernels.block_plan) in one
        call, kernels.run_blocks, which stores their keys and values into the cache's buffers itself:
        for the plain cache, and for the engine's when the rows are consecutive slots at one position
        (one sequence, most often). The same ops on the same operands as QWenBlock.decode, without
        the Python between blocks. Returns (hidden_states, how many blocks ran)."""
        ops, length = _cpu_ops(), hidden_states.shape[1]
        plans = []
        for block in self.h:
            plan = ops.block_plan(block)
            if plan is None:
                break
            plans.append(plan)
        if not plans:
            return hidden_states, 0
        layers = None
        if rows is not None:
            layout = rows.plain_rows(length)
            if layout is None:
                return hidden_states, 0
            keys, values, position = layout
        else:
            layers = cache.layers[: len(plans)]
            if any(getattr(layer, "keys", None) is None for layer in layers):  # nothing cached yet
                return hidden_states, 0
            keys, values, positions = zip(*(layer.reserve(length) for layer in layers))
            position = positions[0]
        count = len(plans)
        hidden_states, done, pending = ops.run_blocks(
            plans, hidden_states, *rotary, keys[:count], values[:count], position, biases[:count], causal
        )
        if layers is not None:
            for layer in layers[: done + (pending is not None)]:
                layer.advance(length)
        if pending is not None:  # block `done` declined after its cache write: the modules finish it
            block, bias = self.h[done], biases[done]
            attended = block.attn.decode_attend(*pending, bias, causal and bias is None)
            hidden_states, done = block._decode_mlp(hidden_states + attended), done + 1
        return hidden_states, done

    def _row_layout(self, rows, query_len, dtype, device):
        """Rotary, LogN and masks for a serving batch of independent sequences: row b holds the
        tokens at positions rows.row_starts[b] + 0..query_len-1 and keeps its own dynamic-NTK alpha
        (rows.row_alphas[b], chosen from its whole prompt), so it gets what it would get alone.
        Positions are host integers: nothing here waits on the device."""
        starts = list(rows.row_starts)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(query_len, device=device)
        key_len = max(starts) + query_len
        tables = [self._rotary_table(a, s + query_len, device) for s, a in zip(starts, rows.row_alphas)]
        rotary = (
            torch.stack([c[s : s + query_len] for (c, _), s in zip(tables, starts)])[:, None],
            torch.stack([t[s : s + query_len] for (_, t), s in zip(tables, starts)])[:, None],
        )
        seq_length = self.config.seq_length
        logn = None
        if self.config.use_logn_attn and key_len > seq_length:
            logn = torch.cat([logn_factors(s, s + query_len, seq_length, device) for s in starts])
        windows = [b.attn.window if b.attn.window and b.attn.window < key_len else None for b in self.h]
        query_pos = positions[:, None, :, None]
        key_pos = torch.arange(key_len, device=device)
        biases = {}
        for window in set(windows):
            allowed = key_pos <= query_pos  # also hides the unused tail of shorter rows
            if window:
                allowed = allowed & (key_pos > query_pos - window)
            biases[window] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return rotary, logn, windows, biases

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,  # ignored, as in the original: positions come from the cache length
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        past_key_values=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = _as_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = QWenCache(self.config)
        if not use_cache:
            cache = None
        rows = cache if hasattr(cache, "row_starts") else None  # a serving batch (qwen.serving)
        if input_ids is not None and input_ids.numel() and rows is None:  # the engine checks at admission
            low, high = torch.aminmax(input_ids)
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids hold token id {int(high) if high >= self.config.vocab_size else int(low)}, "
                    f"outside the model's vocabulary (0..{self.config.vocab_size - 1})"
                )
        hidden_states = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        batch, query_len = hidden_states.shape[:2]
        key_len = query_len + (cache.get_seq_length() if cache is not None else 0)

        padding_mask, full_mask = None, None
        if attention_mask is not None and attention_mask.dim() == 4:
            # Which keys each query may see, in full (e.g. several packed records per row, each causal
            # within itself): bool (True = attend) or additive, [batch or 1, 1, new tokens, keys].
            if attention_mask.shape[1:] != (1, query_len, key_len) or attention_mask.shape[0] not in (1, batch):
                raise ValueError(
                    f"a 4-d attention_mask must have shape ({batch}, 1, {query_len}, {key_len}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            full_mask = attention_mask
            if full_mask.dtype == torch.bool:
                full_mask = torch.zeros(full_mask.shape, dtype=hidden_states.dtype, device=full_mask.device) \
                    .masked_fill(~full_mask, torch.finfo(hidden_states.dtype).min)
            full_mask = full_mask.to(hidden_states.dtype)
        elif attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, key_len):
                raise ValueError(
                    f"attention_mask must have shape (batch, past + new tokens) = ({batch}, {key_len}) or "
                    f"({batch}, 1, {query_len}, {key_len}), got {tuple(attention_mask.shape)}"
                )
            if not bool(attention_mask.all()):
                padding_mask = attention_mask

        if rows is not None:
            rotary, logn, windows, biases = self._row_layout(rows, query_len, hidden_states.dtype, hidden_states.device)
            causal = False
        else:
            alphas = self._ntk_alphas(cache, query_len, key_len, padding_mask)
            rotary = self._rotary(alphas, query_len, key_len, hidden_states.device)
            logn = None
            if self.config.use_logn_attn and not self.training and key_len > self.config.seq_length:
                logn = logn_factors(key_len - query_len, key_len, self.config.seq_length, hidden_states.device)
            # One additive mask per distinct window; None where plain causal (or nothing) suffices.
            windows = [b.attn.window if b.attn.window and b.attn.window < key_len else None for b in self.h]
            biases = {}
            for window in set(windows):
                if full_mask is not None:  # the caller's mask, narrowed by the layer's window if any
                    biases[window] = full_mask if window is None else full_mask + attention_bias(
                        None, query_len, key_len, window, hidden_states.dtype, hidden_states.device)
                elif padding_mask is None and window is None and (query_len == 1 or query_len == key_len):
                    biases[window] = None
                else:
                    biases[window] = attention_bias(
                        padding_mask, query_len, key_len, window, hidden_states.dtype, hidden_states.device,
                        manual=uses_manual_attention(self.config, output_attentions),
                    )
            causal = query_len > 1 and query_len == key_len

        hidden_states = self.drop(hidden_states)
        all_hidden, all_attn = [], []
        writers = self._decode_writers(hidden_states, cache, rows, logn, output_attentions, output_hidden_states)
        if writers is not None:
            layer_biases = [biases[window] for window in windows]
            hidden_states, done = self._run_blocks(hidden_states, rotary, cache, rows, layer_biases, causal)
            for index in range(done, len(self.h)):
                bias = layer_biases[index]
                hidden_states = self.h[index].decode(hidden_states, rotary, writers[index], bias, causal and bias is None)
            windows = ()  # done: the loop below has nothing left to run
        for block, window in zip(self.h, windows):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            bias = biases[window]
            hidden_states, weights = block(  # by keyword: tools that replay a block (gptqmodel) keep them
                hidden_states, rotary=rotary, logn=logn, bias=bias, causal=causal and bias is None, cache=cache,
                output_attentions=bool(output_attentions),
            )
            if output_attentions:
                all_attn.append(weights)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )


def _parse_dtype(dtype, on_cuda: bool = False):
    """None for "pick by the precision flags", else a floating torch.dtype ("fast": fast_dtype); a
    clear error otherwise."""
    if dtype is None or dtype == "auto":
        return None
    if dtype == "fast":
        return fast_dtype(on_cuda)
    parsed = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
        raise ValueError(
            f"dtype must be 'auto', 'fast' or a floating torch dtype such as torch.bfloat16 or 'float32', got {dtype!r}"
        )
    return parsed


def _unmodified_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file mappings that hold no privately modified page: every
    page still reads back from the file (Linux /proc/self/smaps; empty elsewhere)."""
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return []
    ranges, current = [], None
    for line in lines:
        fields = line.split(maxsplit=5)
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            current = None
            if len(fields) == 6 and fields[5].startswith("/"):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                current = (low, high)
        elif current is not None and fields[:1] == ["Anonymous:"]:
            if fields[1] == "0":
                ranges.append(current)
            current = None
    return ranges


def _release_pages(address: int, length: int) -> None:
    """Drop the whole pages of [address, address + length) from the resident set. Only used on
    unmodified file mappings: their pages stay in the page cache and read back unchanged if touched."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    first, last = -(-address // page) * page, (address + length) // page * page
    if last > first:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def align_cpu_tensors(model: nn.Module, alignment: int = 64, chunk_bytes: int = 64 << 20) -> None:
    """Move every CPU parameter and buffer that is not `alignment`-byte aligned into fresh memory.

    transformers 5 leaves safetensors weights as zero-copy views into the memory-mapped file, at
    8-byte-aligned offsets. torch's single-row matmul (every decode step) sums in another order on
    such memory, so results drift from the original (whose transformers 4 copied the weights) by an
    ulp, which the int8 KV cache's truncation turns into whole quantisation steps. Tensors are copied
    one at a time, in chunks, and the file pages already copied leave the resident set at once, so
    loading peaks at about the model's size (not twice it); ties survive since each object is moved once."""
    mappings = None
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "cpu" or not tensor.numel() or tensor.data_ptr() % alignment == 0:
            continue
        source = tensor.data
        fresh = torch.empty_like(source, memory_format=torch.contiguous_format)
        if mappings is None:
            mappings = _unmodified_file_mappings()
        address = source.data_ptr()
        mapped = source.is_contiguous() and any(low <= address < high for low, high in mappings)
        if not mapped:
            fresh.copy_(source)
        else:
            src, dst = source.reshape(-1).view(torch.uint8), fresh.view(-1).view(torch.uint8)
            for begin in range(0, src.numel(), chunk_bytes):
                dst[begin : begin + chunk_bytes].copy_(src[begin : begin + chunk_bytes])
                _release_pages(address + begin, min(chunk_bytes, src.numel() - begin))
        tensor.data = fresh


def use_cpu_kernels(model: nn.Module) -> int:
    """Decode-time products of CPU bf16/fp16 linear layers through the qwen package's own kernel
    (qwen/kernels; `QWEN_KERNELS=off` keeps torch's). A no-op as remote code (the kernels are not
    among its files, and remote code never imports the qwen package)."""
    if __package__ != "qwen":
        return 0
    import importlib  # not `from .kernels...`: transformers would look for that file beside remote code

    return importlib.import_module("qwen.kernels.linear").use_kernels(model)


def checkpoint_weight_files(directory) -> list[Path]:
    """The weight files of a checkpoint directory: those its index names (safetensors or .bin), else
    model*.safetensors, else pytorch_model*.bin. Raises ValueError for an unreadable index and
    FileNotFoundError when there are none."""
    directory = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"cannot read {index}: {exc!r}") from exc
            return [directory / name for name in sorted(set(weight_map.values()))]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no model*.safetensors or pytorch_model*.bin in {directory}: not a checkpoint directory")


def _unreadable_safetensors(directory) -> str:
    """The first *.safetensors file in `directory` that safetensors cannot open (for error messages)."""
    from safetensors import safe_open

    for path in sorted(Path(directory).glob("*.safetensors")) if Path(directory).is_dir() else []:
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception:
            return str(path)
    return str(directory)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        # The original casts to the flagged precision at construction.
        if config.bf16:
            self.to(torch.bfloat16)
        elif config.fp16:
            self.to(torch.float16)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' from_pretrained, plus the original's precision flags: an explicit
        `dtype`/`torch_dtype` wins (and sets the flags); otherwise the flags (or their auto rule) pick it.
        Config fields such as `bf16=True` or `use_flash_attn=False` may be passed as keyword arguments.
        `dtype="fast"` picks the fastest 16-bit dtype for the machine (fast_dtype: bf16 or fp16).
        `quantization="int8"`, `"int4"` or `"int4:<group size>"` (32/64/128/256, default 128) replaces the
        linear layers by weight-only quantized ones after loading (see qwen/quantization.py)."""
        quantization = kwargs.pop("quantization", None)
        if quantization is not None:
            from .quantization import parse_quantization, quantize_model  # a remote-code file too

            parse_quantization(quantization)  # a bad name fails before any weight is read
        config = kwargs.pop("config", None)
        check_local_checkpoint(pretrained_model_name_or_path, "config.json")
        if config is None or isinstance(config, (str, bytes)) or hasattr(config, "__fspath__"):
            hub_keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            hub_kwargs = {k: kwargs[k] for k in hub_keys if k in kwargs}
            config = cls.config_class.from_pretrained(config or pretrained_model_name_or_path, **hub_kwargs)
        else:
            config = copy.deepcopy(config)
        for key in list(kwargs):
            if key in cls.config_class.__dataclass_fields__ and key not in ("dtype", "torch_dtype"):
                setattr(config, key, kwargs.pop(key))
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        dtype = dtype if dtype is not None else torch_dtype
        device_map = kwargs.get("device_map")
        on_cpu = device_map in ("cpu", {"": "cpu"}) or getattr(device_map, "type", None) == "cpu"
        dtype = _parse_dtype(dtype, on_cuda=torch.cuda.is_available() and not on_cpu)
        if dtype is None:
            dtype = resolve_precision(config)
        else:
            set_precision_flags(config, dtype)
        want_info = kwargs.pop("output_loading_info", False)
        allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
        from .gptq import gptq_settings  # a remote-code file too

        local = Path(pretrained_model_name_or_path) if Path(pretrained_model_name_or_path).is_dir() else None
        gptq = gptq_settings(config, local)
        if gptq is not None:  # a published Int4/Int8 checkpoint: our own unpacking, no GPTQ library
            model = cls._from_gptq(pretrained_model_name_or_path, local, config, dtype, gptq, quantization, kwargs)
            info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
            return (model, info) if want_info else model
        try:
            # Mismatches are collected and reported below, naming the tensors (transformers' own
            # error only points at a log table).
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, config=config, dtype=dtype,
                output_loading_info=True, ignore_mismatched_sizes=True, **kwargs,
            )
        except Exception as exc:
            if type(exc).__name__ != "SafetensorError":
                raise
            # safetensors' own message names no file: find the shard it could not read.
            raise OSError(
                f"cannot read {_unreadable_safetensors(pretrained_model_name_or_path)}: {exc} "
                "(the file is truncated or corrupt)"
            ) from exc
        # transformers would leave these randomly initialised and only log it: a broken checkpoint
        # (or a config with more layers than the weights) must not chat.
        problems = [f"missing {key}" for key in sorted(info["missing_keys"])]
        if not allow_mismatch:
            problems += [
                f"{key} has shape {tuple(found)} in the checkpoint, the config needs {tuple(wanted)}"
                for key, found, wanted in sorted(info["mismatched_keys"])
            ]
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"checkpoint {pretrained_model_name_or_path} does not fit its config: {shown}")
        if quantization is not None:
            quantize_model(model, quantization)  # before aligning: the float weights are then never copied
        align_cpu_tensors(model)
        use_cpu_kernels(model)
        return (model, info) if want_info else model

    @classmethod
    def _from_gptq(cls, name, local, config, dtype, settings, quantization, kwargs):
        from transformers import GenerationConfig

        from .gptq import load_gptq_model

        if quantization is not None:
            raise ValueError(f"{name} is already GPTQ-quantized ({settings['bits']} bits): quantization= does not apply")
        if local is None:  # a hub name: fetch the files first
            from huggingface_hub import snapshot_download

            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            local = Path(snapshot_download(str(name), allow_patterns=["*.json", "*.safetensors"], **hub))
        device_map = kwargs.get("device_map")
        device = None
        if device_map not in (None, "cpu") and torch.cuda.is_available():
            device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else "cuda"
        model = load_gptq_model(cls, local, config, dtype, settings, device)
        if (local / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(local)
        align_cpu_tensors(model)
        use_cpu_kernels(model)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write the original format plus our remote-code files, so the directory loads anywhere.

        As with transformers, the directory may hold other files: same-named ones are replaced and the
        weight files this save did not write (stale shards, index or single file) are removed. The
        files are written to a staging folder and renamed into place, so a failed save changes
        nothing and a symlink (e.g. into a Hugging Face cache) becomes a regular file, its target
        untouched. Remote code that is not ours is kept as `<name>.orig` (see write_remote_code)."""
        self.config.auto_map = dict(CONFIG_AUTO_MAP)
        self.config.architectures = ["QWenLMHeadModel"]
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        if kwargs.get("push_to_hub"):
            kwargs.setdefault("repo_id", directory.resolve().name)  # transformers would take the staging name
        staging = Path(tempfile.mkdtemp(prefix=".qwen-save-", dir=directory))
        try:
            super().save_pretrained(staging, *args, **kwargs)
            written = {path.name for path in staging.iterdir()}
            for name in written:
                os.replace(staging / name, directory / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        variant = re.escape(f".{kwargs['variant']}") if kwargs.get("variant") else ""
        weights = re.compile(
            rf"model{variant}(-\d{{5}}-of-\d{{5}})?\.safetensors|model\.safetensors\.index{variant}\.json"
        )
        if any(weights.fullmatch(name) for name in written):
            for path in directory.iterdir():
                if weights.fullmatch(path.name) and path.name not in written:
                    path.unlink()
        write_remote_code(directory)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        past_key_values=None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep and labels is None:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            # Shifted cross-entropy on model-dtype logits (no upcast), -100 ignored.
            labels = labels.to(logits.device)
            shift_logits = logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        result = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return result if return_dict is not False else result.to_tuple()

    # ------------------------------------------------------------------------- generation

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # Our own cache: int8 layers when configured, and a home for the prefill NTK alphas.
        if (
            model_kwargs.get("cache") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation in (None, "dynamic")
        ):
            model_kwargs["cache"] = QWenCache(self.config, generation_config.max_length)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def generate(self, inputs=None, generation_config=None, logits_processor=None, **kwargs):
        """transformers' generate plus the original's `stop_words_ids` (kwarg or generation config)."""
        # Fold generation options given as keyword arguments into a private copy of the config.
        if generation_config is not None:
            check_generation_config(generation_config)
        generation_config = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        kwargs.pop("max_window_size", None)  # a chat() option the original forwards here
        stop_words_ids = kwargs.pop("stop_words_ids", None)
        kwargs = apply_generation_options(generation_config, kwargs)
        prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if prompt is not None:
            check_context_fits(prompt.shape[1], generation_config, self.config.max_position_embeddings)
        if stop_words_ids is None:
            stop_words_ids = getattr(generation_config, "stop_words_ids", None)
        processors = LogitsProcessorList(logits_processor or [])  # never mutate the caller's list
        if stop_words_ids:
            eos = generation_config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
            if eos is None:
                raise ValueError("stop_words_ids need an eos_token_id (the stop boosts eos, as in the original)")
            processors.append(StopWordsLogitsProcessor(stop_words_ids, eos_token_id=eos))
        return super().generate(inputs, generation_config=generation_config, logits_processor=processors, **kwargs)

    def chat(
        self,
        tokenizer,
        query: str,
        history=None,
        system: str = DEFAULT_SYSTEM,
        stream=None,
        stop_words_ids=None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ):
        """One chat turn: returns (response, history + [(query, response)]); the caller's history is not changed."""
        return chat(self, tokenizer, query, history, system, stream, stop_words_ids, generation_config, **kwargs)

    def chat_stream(
        self,
        tokenizer,
        query: str,
        history=None,
        system: str = DEFAULT_SYSTEM,
        stop_words_ids=None,
        logits_processor=None,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> Iterator[str]:
        """Yield the cumulative response text as tokens arrive; the last value equals what chat()
        returns for the same (greedy) generation. History is neither copied nor updated."""
        return chat_stream(
            self, tokenizer, query, history, system, stop_words_ids, logits_processor, generation_config, **kwargs
        )


# Files written next to saved weights so `trust_remote_code=True` loaders find our implementation,
# and the config.json entries that point at them.
REMOTE_CODE_FILES = (
    "configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "tokenization_qwen.py", "quantization.py",
    "gptq.py", "cache_kernels.py", "cache_kernels.cpp", "cache_kernels.cu", "cache_kernels.cuh",
)
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}


def write_remote_code(directory, names=REMOTE_CODE_FILES) -> list[str]:
    """Copy our implementation files into a checkpoint directory (they import only each other).

    A different file of the same name that is not ours (the 2023 code) is kept once as
    `<name>.orig`. Each file is written under a temporary name and renamed into place, so a
    symlink (e.g. into a Hugging Face cache) is replaced by a regular file, its target untouched.
    Returns the names of the backups made."""
    here, directory = Path(__file__).resolve().parent, Path(directory)
    kept = []
    for name in names:
        code, target, backup = (here / name).read_bytes(), directory / name, directory / f"{name}.orig"
        if target.is_file():
            old = target.read_bytes()
            if old == code:
                continue
            # Our files (any version) say so at the top of their docstring; the 2023 ones do not.
            if b"into saved checkpoints as remote" not in old[:1000] and not os.path.lexists(backup):
                shutil.copyfile(target, backup)
                kept.append(backup.name)
        staged = directory / f".{name}.partial"
        staged.write_bytes(code)
        os.replace(staged, target)
    return kept
