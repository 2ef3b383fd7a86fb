"""Export to transformers' native Qwen2ForCausalLM: same logits and greedy tokens within seq_length,
refusals for what Qwen2 cannot express, the tokenizer carried over, and the CLI."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qwen
from qwen.tools.export_qwen2 import export_qwen2, main, to_qwen2
from qwen.tools.tiny_checkpoint import build
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

GOLDEN = Path(__file__).parent / "fixtures" / "golden_models"
REPO_ROOT = Path(__file__).resolve().parent.parent


def run_python(args, cwd, env=None):
    env = env or dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def random_ids(vocab, length, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_function(ours, theirs, vocab, lengths=(8, 16)):
    """Logits within 1e-5 for each prompt length, and 8 identical greedy tokens after 8 tokens."""
    ids = random_ids(vocab, max(lengths))
    with torch.no_grad():
        for n in lengths:
            a, b = ours(ids[:, :n]).logits, theirs(ids[:, :n]).logits
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"logits differ for {n} tokens")
    prompt = ids[:, :8]
    greedy = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    torch.testing.assert_close(theirs.generate(prompt, **greedy), ours.generate(prompt, **greedy), atol=0, rtol=0)


def load_ours(path):
    return qwen.QWenLMHeadModel.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny_chat"), chat=True, dtype="float32")


# ----------------------------------------------------------------------------- same function


def test_golden_checkpoint_exports_to_the_same_function(tmp_path, caplog):
    src = GOLDEN / "tiny_default"  # fp32, seq_length 16, vocab 1024, no tokenizer
    with caplog.at_level(logging.WARNING, logger="qwen.tools.export_qwen2"):
        export_qwen2(src, tmp_path)
    assert "dynamic NTK and LogN not carried over" in caplog.text

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 4
    assert config["intermediate_size"] == 344 // 2
    assert config["max_position_embeddings"] == 16
    assert config["rope_parameters"]["rope_theta"] == 10000
    assert config["rms_norm_eps"] == 1e-6 and config["tie_word_embeddings"] is False
    assert config["dtype"] == "float32"
    assert "auto_map" not in config and not list(tmp_path.glob("*.py"))  # no remote code
    assert (tmp_path / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert not (tmp_path / "tokenizer_config.json").exists()

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # native class, no remote code
    assert type(theirs) is Qwen2ForCausalLM
    assert_same_function(load_ours(src), theirs, vocab=1024)


def test_tensor_mapping(tmp_path):
    src = GOLDEN / "tiny_default"
    export_qwen2(src, tmp_path)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        old = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        new = {k: f.get_tensor(k) for k in f.keys()}
    assert len(new) == len(old) + 2 * 2 * 2  # per layer: c_attn weight and bias become three each
    q, k, v = old["transformer.h.1.attn.c_attn.weight"].split(64)
    assert torch.equal(new["model.layers.1.self_attn.q_proj.weight"], q)
    assert torch.equal(new["model.layers.1.self_attn.k_proj.weight"], k)
    assert torch.equal(new["model.layers.1.self_attn.v_proj.weight"], v)
    assert torch.equal(new["model.layers.1.self_attn.v_proj.bias"], old["transformer.h.1.attn.c_attn.bias"][128:])
    assert torch.equal(new["model.layers.0.mlp.gate_proj.weight"], old["transformer.h.0.mlp.w2.weight"])
    assert torch.equal(new["model.layers.0.mlp.up_proj.weight"], old["transformer.h.0.mlp.w1.weight"])
    assert torch.equal(new["model.layers.0.mlp.down_proj.weight"], old["transformer.h.0.mlp.c_proj.weight"])
    assert torch.equal(new["model.layers.0.self_attn.o_proj.weight"], old["transformer.h.0.attn.c_proj.weight"])
    assert torch.equal(new["model.layers.0.input_layernorm.weight"], old["transformer.h.0.ln_1.weight"])
    assert torch.equal(new["model.layers.0.post_attention_layernorm.weight"], old["transformer.h.0.ln_2.weight"])
    assert torch.equal(new["model.embed_tokens.weight"], old["transformer.wte.weight"])
    assert torch.equal(new["model.norm.weight"], old["transformer.ln_f.weight"])
    assert torch.equal(new["lm_head.weight"], old["lm_head.weight"])


def test_real_vocab_checkpoint_with_tokenizer(tiny_chat, tmp_path):
    out = export_qwen2(tiny_chat, tmp_path / "out")
    for name in ("qwen.tiktoken", "tokenizer_config.json", "tokenization_qwen.py", "qwen_generation_utils.py"):
        assert (out / name).is_file(), name
    assert not (out / "modeling_qwen.py").exists()
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["chat_format"] == "chatml" and generation["eos_token_id"] == 151643
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 151643 and config["vocab_size"] == 151936

    theirs = Qwen2ForCausalLM.from_pretrained(out).eval()
    assert_same_function(load_ours(tiny_chat), theirs, vocab=151936)

    # The tokenizer loads with trust_remote_code in an interpreter that cannot import qwen.
    code = (
        "from transformers import AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained('out', trust_remote_code=True)\n"
        "print(type(t).__name__, t.encode('Hello, world!'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = run_python(["-c", code], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["QWenTokenizer", "[9707,", "11,", "1879,", "0]"]


def test_in_memory_model_exports(tmp_path):
    ours = load_ours(GOLDEN / "tiny_default")
    theirs = to_qwen2(ours)
    assert type(theirs) is Qwen2ForCausalLM and not theirs.training
    assert_same_function(ours, theirs, vocab=1024)
    # The copy owns its weights: changing ours does not change it.
    with torch.no_grad():
        ours.transformer.h[0].attn.c_attn.weight.zero_()
    assert theirs.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0

    export_qwen2(load_ours(GOLDEN / "tiny_default"), tmp_path, dtype="bfloat16")
    saved = Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert saved.dtype == torch.bfloat16
    assert torch.equal(saved.lm_head.weight, theirs.lm_head.weight.bfloat16())


def test_dtype_cast_and_sharded_source(tmp_path):
    src = tmp_path / "sharded"
    ours = load_ours(GOLDEN / "tiny_default")
    ours.save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    export_qwen2(src, tmp_path / "out", dtype="bfloat16")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and len(index["weight_map"]) == 27
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path / "out")
    assert theirs.dtype == torch.bfloat16
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(theirs.model.embed_tokens.weight, ours.transformer.wte.weight.bfloat16())


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fixture, field", [("tiny_bias_everywhere", "no_bias"), ("tiny_rotary_pct_half", "rotary_pct")]
)
def test_refuses_what_qwen2_cannot_express_on_disk(tmp_path, fixture, field):
    with pytest.raises(ValueError, match=field):
        export_qwen2(GOLDEN / fixture, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(no_bias=False), "no_bias"),
        (dict(rotary_pct=0.5), "rotary_pct"),
        (dict(window_attn_sizes=[4, None]), "window_attn_sizes"),
    ],
)
def test_refuses_what_qwen2_cannot_express_in_memory(tmp_path, overrides, field):
    config = qwen.QWenConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
        intermediate_size=64, seq_length=16, fp32=True, **overrides,
    )
    model = qwen.QWenLMHeadModel(config).eval()
    with pytest.raises(ValueError, match=field):
        export_qwen2(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_windows_that_are_all_off_are_plain_attention(tmp_path):
    config = qwen.QWenConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
        intermediate_size=64, seq_length=16, fp32=True, window_attn_sizes=[None, 0],
    )
    ours = qwen.QWenLMHeadModel(config).eval()
    assert_same_function(ours, to_qwen2(ours), vocab=64)


def test_refuses_tensors_without_a_qwen2_counterpart(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    load_ours(GOLDEN / "tiny_default").save_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    state["transformer.h.0.attn.c_attn.qweight"] = torch.zeros(4, 4, dtype=torch.int32)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ValueError, match="qweight"):
        export_qwen2(src, tmp_path / "out")


# ----------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "SRC" in text.upper() and "--dtype" in text and "--force" in text and "Qwen2ForCausalLM" in text


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main([str(GOLDEN / "tiny_bias_everywhere"), str(tmp_path / "out")]) == 2
    assert "no_bias" in capsys.readouterr().err


def test_cli_subprocess(tmp_path):
    src = GOLDEN / "tiny_default"
    proc = run_python(["-m", "qwen.tools.export_qwen2", str(src), str(tmp_path / "out"), "--dtype", "float32"],
                      cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "wrote a Qwen2ForCausalLM checkpoint" in proc.stdout
    assert "not carried over" in proc.stderr
    theirs = Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert_same_function(load_ours(src), theirs, vocab=1024)
