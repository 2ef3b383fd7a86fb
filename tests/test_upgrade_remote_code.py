"""qwen.tools.upgrade_remote_code: an original checkpoint's 2023 remote code (which fails on
transformers 5) is replaced by ours, keeping the originals, so trust_remote_code loaders work."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import qwen

GOLDEN = Path(__file__).parent / "fixtures" / "golden_models" / "tiny_default"
# Stand-ins for the 2023 files: like the real ones, they need a package transformers 5 breaks.
OLD_CODE = "from transformers_stream_generator import init_stream_support\n"
IDS = [[5, 17, 301, 1023, 42, 7]]

LOAD_WITHOUT_QWEN = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
assert "qwen" not in sys.modules
print(json.dumps({"logits": model(torch.tensor(%r)).logits.tolist(), "ids": tokenizer("你好")["input_ids"]}))
""" % (IDS,)


def original_checkpoint(tmp_path, vocab_path):
    directory = tmp_path / "Qwen-tiny"
    shutil.copytree(GOLDEN, directory)
    shutil.copy(vocab_path, directory / "qwen.tiktoken")
    tokenizer_config = {"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name in qwen.modeling_qwen.REMOTE_CODE_FILES:
        (directory / name).write_text(OLD_CODE)
    return directory


def run(args, tmp_path):
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def test_upgrade_makes_trust_remote_code_work_and_keeps_originals(tmp_path, vocab_path):
    directory = original_checkpoint(tmp_path, vocab_path)
    weights_digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    before = run(["-c", LOAD_WITHOUT_QWEN, str(directory)], tmp_path)
    assert before.returncode != 0 and "transformers_stream_generator" in before.stderr

    upgraded = run(["-m", "qwen.tools.upgrade_remote_code", str(directory)], Path.cwd())
    assert upgraded.returncode == 0, upgraded.stderr
    assert "originals kept" in upgraded.stdout

    after = run(["-c", LOAD_WITHOUT_QWEN, str(directory)], tmp_path)
    assert after.returncode == 0, after.stderr
    result = json.loads(after.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = qwen.QWenLMHeadModel.from_pretrained(GOLDEN)(torch.tensor(IDS)).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), ours, atol=1e-6, rtol=0)
    assert result["ids"] == [108386]
    for name in qwen.modeling_qwen.REMOTE_CODE_FILES:
        assert (directory / f"{name}.orig").read_text() == OLD_CODE
    assert hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest() == weights_digest

    again = run(["-m", "qwen.tools.upgrade_remote_code", str(directory)], Path.cwd())
    assert again.returncode == 0 and "originals kept" not in again.stdout  # the .orig files stay the originals
    assert (directory / "modeling_qwen.py.orig").read_text() == OLD_CODE


def test_upgrade_refuses_what_is_not_a_qwen_checkpoint(tmp_path):
    missing = run(["-m", "qwen.tools.upgrade_remote_code", str(tmp_path)], Path.cwd())
    assert missing.returncode == 2 and "no config.json" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    other = run(["-m", "qwen.tools.upgrade_remote_code", str(tmp_path)], Path.cwd())
    assert other.returncode == 2 and "'llama'" in other.stderr
    assert not (tmp_path / "modeling_qwen.py").exists()


def test_upgrade_never_writes_through_a_cache_symlink(tmp_path, vocab_path):
    """A Hugging Face cache snapshot: each file a symlink to a shared blob, which must not change."""
    original = original_checkpoint(tmp_path, vocab_path)
    config = json.loads((original / "config.json").read_text())
    del config["auto_map"]  # as in a checkpoint whose config upgrade has to rewrite
    (original / "config.json").write_text(json.dumps(config))
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    shutil.move(original, blobs)
    for blob in blobs.iterdir():
        (snapshot / blob.name).symlink_to(Path("..", "..", "blobs", blob.name))
    digests = {blob.name: hashlib.sha256(blob.read_bytes()).hexdigest() for blob in blobs.iterdir()}

    upgraded = run(["-m", "qwen.tools.upgrade_remote_code", str(snapshot)], Path.cwd())
    assert upgraded.returncode == 0, upgraded.stderr
    assert {blob.name: hashlib.sha256(blob.read_bytes()).hexdigest() for blob in blobs.iterdir()} == digests
    assert not (snapshot / "config.json").is_symlink()
    assert json.loads((snapshot / "config.json").read_text())["auto_map"] == qwen.modeling_qwen.CONFIG_AUTO_MAP
    assert (snapshot / "config.json.orig").read_bytes() == (blobs / "config.json").read_bytes()
    for name in qwen.modeling_qwen.REMOTE_CODE_FILES:
        assert not (snapshot / name).is_symlink() and (snapshot / f"{name}.orig").read_text() == OLD_CODE
    assert (snapshot / "model.safetensors").is_symlink()  # the weights are not touched
    assert "config.json.orig" in upgraded.stdout
