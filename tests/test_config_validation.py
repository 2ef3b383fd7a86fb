"""QWenConfig field validation: every invalid value is a ValueError naming the field and the value,
whether the config is built directly, assigned to, or loaded from a checkpoint's config.json."""

import json
import re
import shutil
from pathlib import Path

import pytest

import qwen
from qwen.configuration_qwen import QWenConfigError
from transformers import AutoConfig, AutoModelForCausalLM

GOLDEN = Path(__file__).parent / "fixtures" / "golden_models"
GOLDEN_NAMES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())
TINY = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_channels=16,
            intermediate_size=344, seq_length=16)

INVALID = [
    ("num_attention_heads", 0),
    ("num_attention_heads", -4),
    ("num_attention_heads", "4"),
    ("seq_length", 0),
    ("seq_length", -1),
    ("num_hidden_layers", -1),
    ("num_hidden_layers", 0),
    ("num_hidden_layers", 2.0),
    ("num_hidden_layers", "abc"),
    ("hidden_size", 0),
    ("intermediate_size", -2),
    ("vocab_size", 0),
    ("kv_channels", 0),
    ("kv_channels", True),
    ("window_attn_sizes", [1.5, None]),
    ("window_attn_sizes", ["abc", 4]),
    ("window_attn_sizes", [True, 4]),
    ("window_attn_sizes", "abc"),
    ("use_flash_attn", "yes"),
    ("use_flash_attn", 1),
    ("use_flash_attn", None),
    ("rotary_pct", 0),
    ("rotary_pct", 1.5),
    ("rotary_pct", -0.5),
    ("layer_norm_epsilon", 0),
    ("layer_norm_epsilon", -1e-6),
]
INVALID_IDS = [f"{field}={value!r}" for field, value in INVALID]


def names_field_and_value(field, value):
    """A regex for a message that names `field` and then shows `value`."""
    return re.escape(field) + ".*" + re.escape(repr(value))


def golden_copy(tmp_path, **config_changes):
    out = tmp_path / "checkpoint"
    shutil.copytree(GOLDEN / "tiny_default", out)
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("field, value", INVALID, ids=INVALID_IDS)
def test_invalid_value_in_constructor(field, value):
    with pytest.raises(ValueError, match=names_field_and_value(field, value)):
        qwen.QWenConfig(**{**TINY, field: value})


@pytest.mark.parametrize("field, value", INVALID, ids=INVALID_IDS)
def test_invalid_value_in_config_json(tmp_path, field, value):
    checkpoint = golden_copy(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=names_field_and_value(field, value)) as info:
        qwen.QWenLMHeadModel.from_pretrained(checkpoint)
    assert str(checkpoint) in str(info.value)


@pytest.mark.parametrize("load", [AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained],
                         ids=["AutoConfig", "AutoModelForCausalLM"])
def test_invalid_value_through_auto_classes(tmp_path, load):
    with pytest.raises(ValueError, match=r"num_hidden_layers must be an integer >= 1, got 0"):
        load(golden_copy(tmp_path, num_hidden_layers=0))


def test_invalid_legacy_key_names_both_keys(tmp_path):
    checkpoint = golden_copy(tmp_path, n_layer=0)
    with pytest.raises(ValueError, match=r"num_hidden_layers must be .*got 0 \(given as the legacy key 'n_layer'\)"):
        qwen.QWenConfig.from_pretrained(checkpoint)


def test_invalid_assignment_is_rejected_and_leaves_the_value():
    config = qwen.QWenConfig(**TINY)
    with pytest.raises(ValueError, match=r"rotary_pct must be a number in \(0, 1\], got 2"):
        config.rotary_pct = 2
    assert config.rotary_pct == 1.0


def test_invalid_keyword_override_in_from_pretrained():
    with pytest.raises(ValueError, match=r"num_attention_heads must be an integer >= 1, got 0"):
        qwen.QWenLMHeadModel.from_pretrained(GOLDEN / "tiny_default", num_attention_heads=0)


def test_check_buildable_rechecks_values_set_behind_the_validator():
    config = qwen.QWenConfig(**TINY)
    config.__dict__["num_hidden_layers"] = 0  # bypasses __setattr__
    with pytest.raises(ValueError, match=r"num_hidden_layers must be an integer >= 1, got 0"):
        qwen.QWenLMHeadModel(config)


def test_strict_type_error_on_another_field_is_one_readable_value_error():
    with pytest.raises(ValueError, match=r"^QWenConfig\.use_cache: Field 'use_cache' expected bool, got str") as info:
        qwen.QWenConfig(use_cache="yes")
    assert isinstance(info.value, QWenConfigError)


@pytest.mark.parametrize(
    "field, value",
    [
        ("window_attn_sizes", [None, 4]),
        ("window_attn_sizes", [0, -1]),
        ("window_attn_sizes", None),
        ("use_flash_attn", True),
        ("use_flash_attn", False),
        ("use_flash_attn", "auto"),
        ("rotary_pct", 1),
        ("rotary_pct", 0.5),
        ("layer_norm_epsilon", 1e-5),
        ("layer_norm_epsilon", 1),
    ],
    ids=lambda v: repr(v),
)
def test_valid_edge_values_are_accepted(field, value):
    config = qwen.QWenConfig(**{**TINY, field: value})
    config.check_buildable()
    assert getattr(config, field) == value


def test_seq_length_may_be_unset_until_the_model_is_built():
    config = qwen.QWenConfig()
    assert config.seq_length is None
    with pytest.raises(ValueError, match="seq_length is required"):
        config.check_buildable()


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_configs_are_valid(name):
    qwen.QWenConfig.from_pretrained(GOLDEN / name).check_buildable()
