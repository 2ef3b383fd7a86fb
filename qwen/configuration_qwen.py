"""QWenConfig: every field of the original Qwen (v1) config.json.

This file is also written into saved checkpoints as remote code, so it imports
only transformers and the standard library.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# Keys used by the Aug-2023 chat checkpoints, mapped to today's names.
_LEGACY_KEYS = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
    "ffn_hidden_size": "intermediate_size",
    "padded_vocab_size": "vocab_size",
}


@strict(accept_kwargs=True)
class QWenConfig(PreTrainedConfig):
    """Configuration of a Qwen (v1) decoder.

    `window_attn_sizes` is our addition (off by default): one attention window
    per layer (None or <= 0 means full attention), lower layers shorter.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float | int = 0.0
    attn_dropout_prob: float | int = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float | int = 0.02
    max_position_embeddings: int = 8192
    seq_length: int | None = None
    scale_attn_weights: bool = True
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    kv_channels: int = 128
    rotary_pct: float | int = 1.0
    rotary_emb_base: float | int = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = "auto"
    intermediate_size: int = 22016
    no_bias: bool = True
    tie_word_embeddings: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False
    softmax_in_fp32: bool = False
    window_attn_sizes: list | None = None
    onnx_safe: bool | None = None

    def __post_init__(self, **kwargs):
        for old, new in _LEGACY_KEYS.items():
            if old in kwargs:
                setattr(self, new, kwargs.pop(old))
        super().__post_init__(**kwargs)

    def check_buildable(self):
        """Raise a ValueError naming the first inconsistent field."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ValueError(
                f"kv_channels * num_attention_heads ({self.kv_channels} * {self.num_attention_heads}) must equal "
                f"hidden_size ({self.hidden_size})"
            )
        if self.seq_length is None:
            raise ValueError("config.seq_length is required (the trained context length used by NTK and LogN)")
        if sum(bool(flag) for flag in (self.bf16, self.fp16, self.fp32)) > 1:
            raise ValueError("at most one of config.bf16, config.fp16 and config.fp32 may be true")
        if self.window_attn_sizes is not None and len(self.window_attn_sizes) != self.num_hidden_layers:
            raise ValueError(
                f"window_attn_sizes has {len(self.window_attn_sizes)} entries; it needs one per layer "
                f"({self.num_hidden_layers})"
            )

