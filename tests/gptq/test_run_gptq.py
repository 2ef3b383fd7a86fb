"""`run_gptq.py` end to end with the real gptqmodel on CPU (`make test-gptq`: its own virtualenv,
torch 2.14.1, which gptqmodel needs). A tiny random chat model is quantized to 4 and 8 bits from
fine-tuning-format calibration data; the output directory must load through our from_pretrained (no
GPTQ library involved), chat, and stay close to the float model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import quantizable_checkpoint

from qwen import QWenLMHeadModel, QWenTokenizer
from qwen.modeling_qwen import REMOTE_CODE_FILES
from qwen.quantization import Int4Linear

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ["the weather", "a recipe for bread", "prime numbers", "the history of tea", "how rockets fly",
          "a poem about rain", "sorting algorithms", "the moon", "你好，介绍一下你自己", "the ocean"]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return quantizable_checkpoint(tmp_path_factory.mktemp("gptq") / "float", dtype="float32")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    records = [{"id": f"calib_{i}", "conversations": [
        {"from": "user", "value": f"Tell me about {topic}."},
        {"from": "assistant", "value": f"Here is what I know about {topic}: " + " ".join(["it is interesting"] * 20)},
    ]} for i, topic in enumerate(TOPICS)]
    path = tmp_path_factory.mktemp("calib") / "calib.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def run_gptq(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_gptq.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=1200, cwd=ROOT, env={**os.environ, "GPTQMODEL_CPU_WORKERS": "2"})


def last_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def quantized(float_model, calibration, tmp_path_factory):
    out = {}
    for bits in (4, 8):
        path = tmp_path_factory.mktemp("out") / f"int{bits}"
        done = run_gptq("--model_name_or_path", float_model, "--data_path", calibration, "--out_path", path,
                        "--bits", bits, "--max_len", 64)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"wrote the {bits}-bit GPTQ checkpoint" in done.stdout
        assert not (ROOT / "logs").exists(), "gptqmodel's logs/ landed in the working directory"
        out[bits] = path
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_the_output_is_a_complete_checkpoint_that_loads_and_chats(float_model, quantized, bits):
    out = quantized[bits]
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quantize_config.json", "generation_config.json", "qwen.tiktoken",
            "tokenizer_config.json", *REMOTE_CODE_FILES} <= names
    settings = json.loads((out / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "gptq" and settings["bits"] == bits and settings["group_size"] == 128
    assert settings["desc_act"] is False and settings["sym"] is True

    model = QWenLMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    layer = model.transformer.h[0].mlp.w1
    assert isinstance(layer, Int4Linear) if bits == 4 else type(layer).__name__ in ("Linear", "KernelLinear")
    reference = QWenLMHeadModel.from_pretrained(float_model, dtype=torch.float32).eval()
    tokenizer = QWenTokenizer.from_pretrained(out)
    ids = tokenizer.encode("Tell me about the weather and a recipe for bread, please. " * 8)
    # Random weights are the hard case for GPTQ (no structure to exploit); on them gptqmodel's own
    # 4-bit kernel reached cosine 0.973 (ENVIRONMENT.md). Bounds below that, per bit width.
    cosine = torch.nn.functional.cosine_similarity(last_logits(model, ids), last_logits(reference, ids), dim=-1)
    assert cosine.min() > (0.95 if bits == 4 else 0.995), cosine.min()
    reply, _ = model.chat(tokenizer, "你好", history=None, max_new_tokens=6, do_sample=False)
    assert isinstance(reply, str)


def test_bad_calibration_data_and_existing_output_are_clear_errors(float_model, calibration, tmp_path):
    bad = tmp_path / "bad.json"
    records = json.loads(calibration.read_text())
    records.append({"id": "broken", "conversations": [{"from": "robot", "value": "?"}]})
    bad.write_text(json.dumps(records))
    done = run_gptq("--model_name_or_path", float_model, "--data_path", bad, "--out_path", tmp_path / "o1")
    assert done.returncode == 2 and "broken" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o1").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    done = run_gptq("--model_name_or_path", float_model, "--data_path", calibration, "--out_path", taken)
    assert done.returncode == 2 and "--force" in done.stderr
    assert (taken / "notes.txt").read_text() == "mine"
