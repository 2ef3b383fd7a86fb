"""QWenConfig: every field of the original Qwen (v1) config.json.

This file is also written into saved checkpoints as remote code, so it imports
only transformers, huggingface_hub and the standard library.
"""

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassFieldValidationError
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


class QWenConfigError(ValueError):
    """An invalid QWenConfig field value; the message names the field and the value."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value):
    return _is_int(value) and value >= 1


# field -> (test, what a valid value is). Checked on every assignment, so also in __init__ and
# when config.json is loaded; cross-field consistency is left to `check_buildable`.
_FIELD_RULES = {
    "vocab_size": (_positive_int, "an integer >= 1"),
    "hidden_size": (_positive_int, "an integer >= 1"),
    "num_hidden_layers": (_positive_int, "an integer >= 1"),
    "num_attention_heads": (_positive_int, "an integer >= 1"),
    "kv_channels": (_positive_int, "an integer >= 1"),
    "intermediate_size": (_positive_int, "an integer >= 1"),
    "seq_length": (lambda v: v is None or _positive_int(v), "an integer >= 1 (or null before it is known)"),
    "window_attn_sizes": (
        lambda v: v is None or (isinstance(v, list) and all(w is None or _is_int(w) for w in v)),
        "null or a list of integers or nulls (one per layer)",
    ),
    "use_flash_attn": (lambda v: v is True or v is False or v == "auto", 'true, false or "auto"'),
    "rotary_pct": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "layer_norm_epsilon": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}


def _check_field(name, value):
    rule = _FIELD_RULES.get(name)
    if rule is not None and not rule[0](value):
        raise QWenConfigError(f"QWenConfig.{name} must be {rule[1]}, got {value!r}")


def _readable_field_errors(cls):
    """Wrap the @strict __setattr__: our rules run first, and strict's own type errors (which are
    not ValueErrors) become one QWenConfigError naming the field."""
    strict_setattr = cls.__setattr__

    def __setattr__(self, name, value):
        _check_field(name, value)
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as e:
            raise QWenConfigError(f"QWenConfig.{name}: {e.__cause__}") from None

    cls.__setattr__ = __setattr__
    return cls


@_readable_field_errors
@strict(accept_kwargs=True)
class QWenConfig(PreTrainedConfig):
    """Configuration of a Qwen (v1) decoder.

    `window_attn_sizes` is our addition (off by default): one attention window
    per layer (None or <= 0 means full attention), lower layers shorter.

    Each field is checked whenever it is set (an invalid value is a `QWenConfigError`, a
    ValueError naming the field); `check_buildable` adds the cross-field checks.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float | int = 0.0
    attn_dropout_prob: float | int = 0.0
    layer_norm_epsilon: float | int = 1e-6
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
                try:
                    setattr(self, new, kwargs.pop(old))
                except QWenConfigError as e:
                    raise QWenConfigError(f"{e} (given as the legacy key {old!r})") from None
        super().__post_init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' from_pretrained; an invalid field also names where the config came from."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except QWenConfigError as e:
            raise QWenConfigError(f"invalid config in {str(pretrained_model_name_or_path)!r}: {e}") from None

    def check_buildable(self):
        """Raise a ValueError naming the first invalid or inconsistent field."""
        for name in _FIELD_RULES:
            _check_field(name, getattr(self, name))
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

