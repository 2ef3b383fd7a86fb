"""GPTQ checkpoints (the published Qwen-*-Chat-Int4 / Int8) loaded without any GPTQ library.

This file is also written into saved checkpoints as remote code: it imports only torch,
safetensors and its sibling files.

    model = QWenLMHeadModel.from_pretrained("Qwen-7B-Chat-Int4")   # what from_pretrained does for them

A GPTQ checkpoint says so in config.json (`quantization_config` with `"quant_method": "gptq"`) or
in AutoGPTQ's `quantize_config.json`. Each quantized linear layer `L` (every `attn.c_attn`,
`attn.c_proj`, `mlp.w1`, `mlp.w2`, `mlp.c_proj`) is stored in the AutoGPTQ layout, for K inputs,
N outputs, groups of g inputs:

    L.qweight  int32   [K * bits / 32, N]  input k of output n: bits b*(k % p) .. of qweight[k // p, n], p = 32 / bits
    L.qzeros   int32   [K / g, N * bits / 32]  the zero of group j, output n: bits b*(n % p) .. of qzeros[j, n // p]
    L.scales   float16 [K / g, N]
    L.g_idx    int32   [K]  the group of each input (k // g unless the act-order option reordered them)
    L.bias     float16 [N]  (c_attn only)

and w[n, k] = scales[j, n] * (q[k, n] - zero[j, n]) with j = g_idx[k]. In the "gptq" checkpoint
format (AutoGPTQ's, the published one) the stored zero is the real zero minus one; in "gptq_v2" it
is the real zero.

4-bit layers with groups in order become `Int4Linear`s (qwen/quantization.py: the CPU int4 kernels),
holding exactly these weights: q * scale + min with min = -zero * scale is exact in float32. 8-bit
layers, and 4-bit layers whose g_idx is reordered (desc_act), have no exact form there yet: they are
dequantized once into ordinary linear layers in the model dtype (twice the memory of the int8
weights), with one log line saying so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["gptq_settings", "load_gptq_model", "unpack_gptq"]


def gptq_settings(config, directory) -> dict | None:
    """The checkpoint's GPTQ settings (bits, group_size, desc_act, sym, checkpoint_format), or None
    when it is not a GPTQ checkpoint."""
    settings = getattr(config, "quantization_config", None)
    if hasattr(settings, "to_dict"):
        settings = settings.to_dict()
    if not isinstance(settings, dict) or settings.get("quant_method") != "gptq":
        settings = None
        path = Path(directory) / "quantize_config.json" if directory is not None else None
        if path is not None and path.is_file():
            settings = json.loads(path.read_text())
    if settings is None:
        return None
    bits, group = settings.get("bits"), settings.get("group_size", 128)
    if bits not in (4, 8):
        raise ValueError(f"GPTQ checkpoint with bits={bits!r}: only 4 and 8 bits are supported")
    if not isinstance(group, int) or group < -1 or group == 0:
        raise ValueError(f"GPTQ checkpoint with group_size={group!r}: expected a positive integer or -1")
    fmt = settings.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (expected 'gptq' or 'gptq_v2')")
    return {"bits": bits, "group_size": group, "desc_act": bool(settings.get("desc_act", False)),
            "sym": bool(settings.get("sym", True)), "checkpoint_format": fmt}


def _unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The `bits`-bit fields of int32 `packed`, lowest first, spread along `dim` (as uint8 values)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32).unsqueeze(dim + 1)
    view = [1] * words.dim()
    view[dim + 1] = per_word
    fields = (words >> shifts.view(view)) & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per_word
    return fields.reshape(shape).to(torch.uint8)


def unpack_gptq(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str = "gptq"):
    """(q uint8 [N, K], real zeros int16 [K/g, N], scales float32 [K/g, N], g_idx int64 [K]) from one
    layer's GPTQ tensors."""
    q = _unpack_int32(qweight, bits, 0).t().contiguous()  # [N, K]
    zeros = _unpack_int32(qzeros, bits, 1).to(torch.int16)  # [groups, N]
    if checkpoint_format == "gptq":
        zeros = zeros + 1  # as AutoGPTQ reads its format: a stored 2^bits - 1 means 2^bits, not 0
    return q, zeros, scales.float(), g_idx.long()


def _gptq_linear(tensors: dict, settings: dict, dtype: torch.dtype) -> nn.Module:
    from .quantization import GROUP_SIZES, Int4Linear

    bits = settings["bits"]
    q, zeros, scales, g_idx = unpack_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                          tensors["g_idx"], bits, settings["checkpoint_format"])
    n, k = q.shape
    groups = scales.shape[0]
    group = k // groups
    if scales.shape != (groups, n) or zeros.shape != (groups, n) or g_idx.shape != (k,) or k % groups:
        raise ValueError(f"GPTQ tensors do not fit together: qweight gives {n}x{k}, scales {tuple(scales.shape)}, "
                         f"qzeros {tuple(zeros.shape)}, g_idx {tuple(g_idx.shape)}")
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
        raise ValueError(f"GPTQ g_idx has groups outside 0..{groups - 1}")
    bias = tensors.get("bias")
    in_order = torch.equal(g_idx, torch.arange(k) // group)
    if bits == 4 and in_order and group in GROUP_SIZES:
        layer = Int4Linear(k, n, bias is not None, group, dtype=dtype)
        layer.packed.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        layer.scales.copy_(scales.t())
        layer.mins.copy_(-(zeros.t().float() * scales.t()))  # exact: an 11-bit scale times a 4-bit zero
        layer.refresh_backend()
    else:
        # w[n, k] = scale[g_idx[k], n] * (q[n, k] - zero[g_idx[k], n]), computed in float32.
        weight = (q.float() - zeros.t().float()[:, g_idx]) * scales.t()[:, g_idx]
        layer = nn.Linear(k, n, bias is not None, dtype=dtype)
        layer.weight.data = weight.to(dtype)
    if bias is not None:
        layer.bias.data = bias.to(dtype)
    return layer


def load_gptq_model(cls, directory, config, dtype: torch.dtype, settings: dict, device=None):
    """A `cls` model with the GPTQ checkpoint's weights: quantized layers as described in the module
    docstring, every other tensor in `dtype`. Raises ValueError naming missing or unexpected tensors."""
    from safetensors import safe_open

    from .modeling_qwen import checkpoint_weight_files

    directory = Path(directory)
    files = checkpoint_weight_files(directory)
    if any(path.suffix != ".safetensors" for path in files):
        raise ValueError(f"GPTQ checkpoint {directory}: only *.safetensors weights are supported")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    quantized = sorted(key[: -len(".qweight")] for key in tensors if key.endswith(".qweight"))
    if not quantized:
        raise ValueError(f"{directory} says it is a GPTQ checkpoint but holds no '*.qweight' tensor")
    with torch.device("meta"):
        model = cls(config)
    dequantized = 0
    for name in quantized:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"GPTQ tensor {name}.qweight is for a layer this model does not have") from None
        parts = {}
        for part in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            if f"{name}.{part}" in tensors:
                parts[part] = tensors.pop(f"{name}.{part}")
        missing = [p for p in ("qzeros", "scales", "g_idx") if p not in parts]
        if missing:
            raise ValueError(f"GPTQ layer {name} lacks {', '.join(missing)}")
        layer = _gptq_linear(parts, settings, dtype)
        if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
            raise ValueError(f"GPTQ layer {name} is {layer.out_features}x{layer.in_features}, the config needs "
                             f"{module.out_features}x{module.in_features}")
        dequantized += isinstance(layer, nn.Linear)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in tensors.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in result.unexpected_keys if not k.endswith(("rotary_emb.inv_freq", "attn.masked_bias"))]
    still_meta = [name for name, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if unexpected or still_meta:
        problems = [f"missing {k}" for k in still_meta] + [f"unexpected {k}" for k in unexpected]
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"GPTQ checkpoint {directory} does not fit its config: {shown}")
    bits, group = settings["bits"], settings["group_size"]
    if dequantized:
        logger.info("GPTQ %d-bit: %d of %d layers dequantized to %s (no exact packed form for %s)", bits, dequantized,
                    len(quantized), dtype, "8 bits" if bits == 8 else "reordered groups (desc_act)")
    model.qwen_quantization = f"gptq-int{bits}:{group}"
    if device is not None:
        model.to(device)
    return model.eval()
