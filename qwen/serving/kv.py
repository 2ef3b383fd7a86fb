"""The engine's KV cache: one preallocated slot per running (or prefix-cached) sequence.

Each layer holds keys and values [slots, heads, capacity, head_dim] in the model dtype, or uint8
with a per-token scale and zero for the int8 cache (`use_cache_quantization`; each written chunk
of a row is quantised as one group, as the original does per forward). Before a forward the engine
says which slots the batch rows are and where each row starts (`select`); the model then reads
`row_starts` / `row_alphas` for per-row positions and dynamic-NTK alphas, and every attention
layer calls `update`, which writes the new keys and values into the rows' slots and returns the
rows' keys and values up to the longest row (the mask hides each row's unused tail).

Memory follows use, not the limit: the buffers start at 256 tokens per slot and double (up to
`capacity`, the engine's context) when a row needs more, so a server whose context allows 32k
tokens does not hold 32k tokens of KV for every slot from the start."""

from __future__ import annotations

import torch

from ..modeling_qwen import dequantize_kv, quantize_kv


class SlotKVCache:
    def __init__(self, config, slots: int, capacity: int, dtype: torch.dtype, device, initial: int = 256):
        self.slots, self.capacity = slots, capacity
        self.int8 = bool(config.use_cache_quantization)
        heads = config.num_attention_heads
        self._shape = (slots, heads, config.hidden_size // heads)
        self._dtype, self._device, self._layers = dtype, device, config.num_hidden_layers
        self.keys, self.values, self.key_params, self.value_params = [], [], [], []
        self.allocated = 0  # tokens per slot the buffers hold now
        self._grow(min(initial, capacity))
        self.row_slots: list[int] = []
        self.row_starts: list[int] = []
        self.row_alphas: list[float] = []

    def _grow(self, tokens: int) -> None:
        """Buffers for `tokens` tokens per slot, keeping what they hold."""
        slots, heads, head_dim = self._shape
        store = torch.uint8 if self.int8 else self._dtype

        def resized(old, last, dtype):
            fresh = torch.zeros((slots, heads, tokens, last), dtype=dtype, device=self._device)
            if old is not None:
                fresh[:, :, : old.shape[2]] = old
            return fresh

        def each(tensors, last, dtype):
            return [resized(tensors[i] if tensors else None, last, dtype) for i in range(self._layers)]

        self.keys, self.values = each(self.keys, head_dim, store), each(self.values, head_dim, store)
        if self.int8:  # (scale, zero) per token, in the model dtype
            for name in ("key_params", "value_params"):
                pairs = getattr(self, name)
                scales = each([p[0] for p in pairs], 1, self._dtype)
                zeros = each([p[1] for p in pairs], 1, self._dtype)
                setattr(self, name, list(zip(scales, zeros)))
        self.allocated = tokens

    def bytes(self) -> int:
        tensors = self.keys + self.values
        if self.int8:
            tensors += [t for pair in self.key_params + self.value_params for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def select(self, slots: list[int], starts: list[int], alphas: list[float]) -> None:
        """The next forward's rows: slot, first position written, NTK alpha of each."""
        self.row_slots, self.row_starts, self.row_alphas = list(slots), list(starts), list(alphas)
        self._index = torch.tensor(self.row_slots, device=self.keys[0].device)
        self._contiguous = self.row_slots == list(range(self.row_slots[0], self.row_slots[0] + len(self.row_slots)))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.row_starts) if self.row_starts else 0

    def _rows(self, t: torch.Tensor, length: int) -> torch.Tensor:
        if self._contiguous:  # a view, no copy
            return t[self.row_slots[0] : self.row_slots[0] + len(self.row_slots), :, :length]
        return t[:, :, :length].index_select(0, self._index)  # copies only the rows' used part

    def _make_room(self, end: int) -> None:
        if end > self.allocated:  # the first layer of a forward grows them all
            if end > self.capacity:
                raise ValueError(f"KV cache: a row needs {end} tokens, the limit is {self.capacity}")
            self._grow(min(self.capacity, max(end, 2 * self.allocated)))

    def plain_rows(self, length: int):
        """For a forward of `length` new tokens whose rows are consecutive slots that all start at one
        position (one sequence, most often): (keys, values, position), each layer's buffers of those
        slots [rows, heads, allocated, d], for a writer that stores into them in place what `update`
        would (qwen.kernels.run_blocks). None for the int8 cache and other batches."""
        if self.int8 or not self._contiguous or len(set(self.row_starts)) != 1:
            return None
        position = self.row_starts[0]
        self._make_room(position + length)
        first, count = self.row_slots[0], len(self.row_slots)
        return ([t.narrow(0, first, count) for t in self.keys], [t.narrow(0, first, count) for t in self.values],
                position)

    # update(k, v, layer, {"int8_raw": True}) returns the int8 cache's (keys, scale, zero) and
    # (values, scale, zero) of the rows (views when their slots are consecutive) for the CUDA kernels.
    int8_raw_views = True

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, *args, **kwargs):
        length = key_states.shape[2]
        end = max(self.row_starts) + length
        self._make_room(end)
        if self.int8:
            for states, store, params in (
                (key_states, self.keys[layer_idx], self.key_params[layer_idx]),
                (value_states, self.values[layer_idx], self.value_params[layer_idx]),
            ):
                q, scale, zero = quantize_kv(states)  # one group per (row, head) over the chunk
                for row, (slot, start) in enumerate(zip(self.row_slots, self.row_starts)):
                    store[slot, :, start : start + length] = q[row]
                    params[0][slot, :, start : start + length] = scale[row]
                    params[1][slot, :, start : start + length] = zero[row]
            keys, values = (
                tuple(self._rows(t, end) for t in (stored[layer_idx], *scale_zero[layer_idx]))
                for stored, scale_zero in ((self.keys, self.key_params), (self.values, self.value_params))
            )
            if cache_kwargs and cache_kwargs.get("int8_raw"):
                return keys, values
            return dequantize_kv(*keys), dequantize_kv(*values)
        for row, (slot, start) in enumerate(zip(self.row_slots, self.row_starts)):
            self.keys[layer_idx][slot, :, start : start + length] = key_states[row]
            self.values[layer_idx][slot, :, start : start + length] = value_states[row]
        return self._rows(self.keys[layer_idx], end), self._rows(self.values[layer_idx], end)
