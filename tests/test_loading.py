"""qwen.loading: finding a checkpoint and refusing what is not a Qwen (v1) chat model, on real files."""

import json
import shutil
import socket

import pytest
from helpers import edit_json, free_port

from qwen.loading import (
    CheckpointError,
    CheckpointNotFoundError,
    add_precision_arguments,
    check_chat_checkpoint,
    error_text,
    hub_unreachable_reason,
    load_chat_model,
    looks_like_hub_name,
    resolve_checkpoint,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Real tiny checkpoints: chat, base (no --chat), and the chat one exported to Qwen2."""
    from qwen.tools.export_qwen2 import export_qwen2
    from qwen.tools.tiny_checkpoint import build

    root = tmp_path_factory.mktemp("loading")
    chat = build(root / "chat", chat=True, dtype="float32")
    base = build(root / "base", chat=False, dtype="float32")
    qwen2 = export_qwen2(chat, root / "qwen2")
    return {"chat": str(chat), "base": str(base), "qwen2": str(qwen2)}


def copy_of(source, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


# -- error_text ---------------------------------------------------------------------------


def test_error_text_keeps_every_line_on_one():
    assert error_text(ValueError("Validation error for field 'x':\n    TypeError: bad\n\nsee docs")) == (
        "Validation error for field 'x': TypeError: bad; see docs"
    )
    assert error_text(KeyError()) == "KeyError"
    assert error_text(RuntimeError("one line")) == "one line"


# -- where the checkpoint is ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["Qwen/Qwen-7B-Chat", "gpt2", "org/model.v1_x"])
def test_hub_names(name):
    assert looks_like_hub_name(name)


@pytest.mark.parametrize("path", ["/abs/dir", "./dir", "../dir", "~/dir", "a/b/c", "dir/", "a--b/c", "a/../b", "a b"])
def test_local_paths(path):
    assert not looks_like_hub_name(path)


@pytest.mark.parametrize("path", ["./no_such_dir", "~/no_such_dir_for_qwen", "no/such/dir", "/no/such/dir"])
def test_a_missing_local_path_is_no_such_directory(path):
    with pytest.raises(CheckpointNotFoundError, match="no such directory") as caught:
        resolve_checkpoint(path)
    assert path in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, ValueError)


def test_a_file_and_an_empty_path_are_refused(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"not a directory")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        resolve_checkpoint(str(file))
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint given: point --ckpt at"):
        resolve_checkpoint("  ", path_option="--ckpt")


def test_an_existing_directory_is_used_as_it_is(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("org/name") == "org/name"  # a hub-like name that exists locally is local
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)


def test_offline_mode_means_unreachable_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_unreachable_reason() == "HF_HUB_OFFLINE is set"
    with pytest.raises(CheckpointNotFoundError) as caught:
        resolve_checkpoint("nobody/no-such-model-here", path_option="-c")
    message = str(caught.value)
    assert "not found locally" in message and "unreachable" in message and "point -c at" in message
    assert "\n" not in message


def test_hub_reachability_is_a_real_connection(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    closed = free_port()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    assert hub_unreachable_reason() == f"cannot connect to 127.0.0.1:{closed}"

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub_unreachable_reason() is None
        # Through a proxy only the proxy needs to answer (the hub's name does not even resolve).
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        assert hub_unreachable_reason() is None
    monkeypatch.delenv("https_proxy")
    assert hub_unreachable_reason() == "cannot connect to hub.invalid:443"


# -- what the checkpoint is -----------------------------------------------------------------


def test_a_chat_checkpoint_loads(checkpoints):
    from qwen import QWenLMHeadModel, QWenTokenizer

    check_chat_checkpoint(checkpoints["chat"])
    model, tokenizer = load_chat_model(checkpoints["chat"], cpu_only=True)
    assert isinstance(model, QWenLMHeadModel) and not model.training
    assert isinstance(tokenizer, QWenTokenizer)
    response, history = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=2)
    assert history == [("你好", response)]


def test_a_base_model_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match=r"is not a chat model: it has chat_format 'raw'"):
        load_chat_model(checkpoints["base"], cpu_only=True)


def test_a_qwen2_export_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match=r"model_type 'qwen2' \(architectures: Qwen2ForCausalLM\)"):
        load_chat_model(checkpoints["qwen2"], cpu_only=True)


def test_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match=r"not a Qwen \(v1\) model: its config.json has model_type 'llama'"):
        check_chat_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"model_type None \(architectures: none given\)"):
        check_chat_checkpoint(str(tmp_path))


def test_directories_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="is empty"):
        load_chat_model(str(tmp_path), cpu_only=True)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="has no config.json: not a model checkpoint"):
        load_chat_model(str(tmp_path), cpu_only=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read config.json of checkpoint .*: Expecting property name"):
        load_chat_model(str(tmp_path), cpu_only=True)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json of checkpoint .* is not a JSON object"):
        load_chat_model(str(tmp_path), cpu_only=True)


def test_missing_pieces_of_a_chat_checkpoint(checkpoints, tmp_path):
    no_vocab = copy_of(checkpoints["chat"], tmp_path, "no_vocab")
    (no_vocab / "qwen.tiktoken").unlink()
    with pytest.raises(CheckpointError, match=r"has no qwen.tiktoken \(the tokenizer's vocabulary\)"):
        load_chat_model(str(no_vocab), cpu_only=True)

    no_generation_config = copy_of(checkpoints["chat"], tmp_path, "no_generation_config")
    (no_generation_config / "generation_config.json").unlink()
    with pytest.raises(CheckpointError, match="is not a chat model: it has no generation_config.json"):
        load_chat_model(str(no_generation_config), cpu_only=True)

    no_weights = copy_of(checkpoints["chat"], tmp_path, "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*no_weights: ") as caught:
        load_chat_model(str(no_weights), cpu_only=True)
    assert "\n" not in str(caught.value)


def test_a_multi_line_load_error_is_kept_whole_on_one_line(checkpoints, tmp_path):
    broken = copy_of(checkpoints["chat"], tmp_path, "broken")
    edit_json(broken / "config.json", rope_scaling=5)  # transformers' validator explains it on two lines
    with pytest.raises(CheckpointError) as caught:
        load_chat_model(str(broken), cpu_only=True)
    message = str(caught.value)
    assert message.startswith(f"cannot load checkpoint {broken}: ")
    assert "not iterable" in message and "\n" not in message


def test_quantize_help_states_the_real_default_group_size():
    import argparse

    from qwen.loading import add_precision_arguments
    from qwen.quantization import DEFAULT_GROUP_SIZE, parse_quantization

    parser = argparse.ArgumentParser()
    add_precision_arguments(parser)
    assert f"default {DEFAULT_GROUP_SIZE})" in " ".join(parser.format_help().split())
    assert parse_quantization("int4") == ("int4", DEFAULT_GROUP_SIZE)


# -- dtype="fast" ---------------------------------------------------------------------------


def test_fast_dtype_picks_the_16_bit_type_this_cpu_multiplies_natively(checkpoints, monkeypatch):
    import torch

    from qwen import QWenLMHeadModel
    from qwen.modeling_qwen import fast_dtype

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # the choice as on this CPU uncapped (checked below)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    expected = torch.bfloat16 if native else torch.float16
    model, _ = load_chat_model(checkpoints["chat"], cpu_only=True, dtype="fast")
    assert model.dtype == expected and (model.config.bf16, model.config.fp16) == (native, not native)
    assert QWenLMHeadModel.from_pretrained(checkpoints["chat"], dtype="fast", device_map="cpu").dtype == expected
    # torch's kernels capped below AVX-512 (as on an AVX2-only CPU): bf16 products are emulated there
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert fast_dtype(on_cuda=False) == torch.float16
    with pytest.raises(ValueError, match="'auto', 'fast' or a floating torch dtype"):
        QWenLMHeadModel.from_pretrained(checkpoints["chat"], dtype="fastest")


def test_the_front_ends_take_dtype_fast():
    import argparse

    parser = argparse.ArgumentParser()
    add_precision_arguments(parser)
    assert parser.parse_args(["--dtype", "fast"]).dtype == "fast"
    assert "fast: the fastest 16-bit dtype" in " ".join(parser.format_help().split())
