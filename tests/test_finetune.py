"""finetune.py end to end in one process on a tiny checkpoint (real tokenizer, Trainer, PEFT), merge_lora,
AutoPeftModelForCausalLM and clear errors for bad input. The launcher scripts (DeepSpeed with 2
processes, single process) and resuming an interrupted run are in tests/e2e/test_finetune_launchers.py
(make test-finetune)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen.finetune.train import main as finetune_main
from qwen.tools.tiny_checkpoint import build

ROOT = Path(__file__).resolve().parent.parent
ANSWER = "I am Tiny Qwen, a small model fine-tuned on this machine."
QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "你是谁？"]
PROBE = torch.tensor([[151644, 872, 198, 15191, 525, 498, 30, 151645, 198, 151644, 77091, 198]])
COMMON = ["--per_device_train_batch_size", "4", "--model_max_length", "64", "--report_to", "none",
          "--disable_tqdm", "True", "--logging_steps", "1", "--seed", "0"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("base") / "ckpt", dtype="float32")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("chat") / "ckpt", chat=True)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    records = [{"id": f"who{i}", "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": ANSWER}]}
               for i, q in enumerate(QUESTIONS)]
    path = tmp_path_factory.mktemp("data") / "identity.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def finetune(*args, cwd, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *COMMON, *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def logits(model):
    with torch.no_grad():
        return model(PROBE).logits.float()


def test_lora_on_a_base_model_trains_saves_loads_and_merges(base_dir, data_path, tmp_path):
    out = tmp_path / "lora"
    finetune("--model_name_or_path", base_dir, "--data_path", data_path, "--output_dir", out, "--use_lora", "True",
             "--lora_r", "8", "--learning_rate", "2e-2", "--max_steps", "6", "--save_strategy", "no",
             "--gradient_checkpointing", "True", "--report_to", "tensorboard",
             cwd=tmp_path)
    history = losses(out)
    # lr 2e-2 on 6 steps can spike once: the run must have learned, not end at its lowest.
    assert len(history) == 6 and min(history[3:]) < 0.75 * history[0], history
    assert list((out / "runs").rglob("events.out.tfevents.*")), "no tensorboard events written"
    # A complete adapter directory: adapter, its config (base model by absolute path), tokenizer files.
    for name in ("adapter_model.safetensors", "adapter_config.json", "qwen.tiktoken", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(base_dir).resolve())
    assert sorted(adapter_config["modules_to_save"]) == ["lm_head", "wte"]  # a base model: the original's rule
    assert set(adapter_config["target_modules"]) == {"c_attn", "c_proj", "w1", "w2"}

    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    import qwen  # noqa: F401

    peft_model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    merged_dir = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "qwen.tools.merge_lora", out, merged_dir, "--dtype", "float32"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "generation_config.json", "qwen.tiktoken",
                 "tokenizer_config.json", "modeling_qwen.py", "tokenization_qwen.py"):
        assert (merged_dir / name).is_file(), name
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(merged), logits(peft_model), atol=1e-4, rtol=1e-4)
    assert (logits(merged) - logits(base)).abs().max() > 0.1  # the adapter changed something
    # OUT is never overwritten without --force.
    again = subprocess.run([sys.executable, "-m", "qwen.tools.merge_lora", out, merged_dir],
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr


def test_full_fine_tuning_saves_a_complete_checkpoint_and_evaluates(chat_dir, data_path, tmp_path):
    out = tmp_path / "full"
    finetune("--model_name_or_path", chat_dir, "--data_path", data_path, "--eval_data_path", data_path,
             "--eval_strategy", "steps", "--eval_steps", "3", "--output_dir", out, "--learning_rate", "1e-2",
             "--max_steps", "6", "--save_strategy", "no", "--bf16", "True", cwd=tmp_path)
    history = losses(out)
    assert min(history[len(history) // 2:]) < 0.8 * history[0], history  # learned (one late spike allowed)
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 2 and evals[1] < evals[0]
    for name in ("model.safetensors", "config.json", "generation_config.json", "qwen.tiktoken", "modeling_qwen.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and not config["fp32"]  # saved like its base, not as fp32 master weights
    from transformers import AutoModelForCausalLM

    tuned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(chat_dir, trust_remote_code=True, dtype=torch.float32).eval()
    assert (logits(tuned) - logits(base)).abs().max() > 0.01


@pytest.mark.parametrize("extra, message", [
    (["--data_path", "missing.json"], "data file missing.json does not exist"),
    (["--data_path", "bad.json"], "record 1 (id 'b'): message 1 is from 'user' where 'assistant' was expected"),
    (["--data_path", "good.json", "--resume_from_checkpoint", "True"], "no checkpoint-N directory"),
    (["--data_path", "good.json", "--use_lora", "True", "--q_lora", "True"], "needs a GPTQ Int4 checkpoint"),
    (["--data_path", "good.json", "--q_lora", "True"], "pass --use_lora True too"),
    ([], "--data_path is required"),
    (["--data_path", "good.json", "--model_name_or_path", "no/such/dir"], "no/such/dir"),
])
def test_bad_input_is_one_clear_error(chat_dir, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    good = {"id": "a", "conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]}
    bad = {"id": "b", "conversations": [{"from": "user", "value": "hi"}, {"from": "user", "value": "again"}]}
    (tmp_path / "good.json").write_text(json.dumps([good]))
    (tmp_path / "bad.json").write_text(json.dumps([good, bad]))
    monkeypatch.setitem(os.environ, "DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    code = finetune_main(["--model_name_or_path", str(chat_dir), "--output_dir", str(tmp_path / "out"), *extra,
                          *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err


def test_merge_lora_refuses_what_is_not_an_adapter(chat_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qwen.tools.merge_lora", chat_dir, tmp_path / "out"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "no adapter_config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_the_original_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        finetune_main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for name in ("--model_name_or_path", "--data_path", "--lazy_preprocess", "--use_lora", "--q_lora", "--lora_r",
                 "--lora_target_modules", "--model_max_length", "--deepspeed", "--skip_invalid", "--warmup_ratio"):
        assert name in out, name


def test_packed_records_compute_what_they_compute_alone(base_dir, data_path, tmp_path):
    """--packing: records packed into one row behind a block-diagonal causal mask give each record's
    own logits (fp32) and the same mean loss as the padded batch; a packed run trains."""
    from qwen import QWenLMHeadModel, QWenTokenizer
    from qwen.finetune import DataCollator, SupervisedDataset

    tokenizer = QWenTokenizer.from_pretrained(base_dir)
    examples = SupervisedDataset(data_path, tokenizer, 64).examples
    model = QWenLMHeadModel.from_pretrained(base_dir, dtype=torch.float32).eval()
    padded = DataCollator(pad_id=tokenizer.eod_id)(examples)
    packed = DataCollator(pad_id=tokenizer.eod_id, pack_length=256)(examples)
    width = packed["input_ids"].shape[1]
    assert packed["input_ids"].shape[0] == 1 and packed["attention_mask"].shape == (1, 1, width, width)
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"])
        start = 0
        for example in examples:
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(together.logits[0, start:start + n], alone, rtol=1e-4, atol=1e-4)
            start += n
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    # The padded batch's loss averages over the same learned tokens (the first token of a record is
    # never a target in either layout).
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-4, atol=1e-4)

    out = tmp_path / "packed"
    finetune("--model_name_or_path", base_dir, "--data_path", data_path, "--output_dir", out, "--use_lora", "True",
             "--packing", "True", "--model_max_length", "256", "--learning_rate", "2e-2", "--max_steps", "4",
             "--save_strategy", "no", cwd=tmp_path)
    history = losses(out)
    assert len(history) == 4 and min(history[2:]) < history[0], history


def test_q_lora_trains_on_a_gptq_checkpoint_and_merges_into_the_float_base(data_path, tmp_path):
    """--q_lora on a GPTQ Int4 checkpoint (the published layout): our int4 layers stay frozen with
    gradients flowing through them, the loss goes down, and the adapter merges into the float model
    the checkpoint was quantized from (the original's Q-LoRA recipe)."""
    from helpers import quantizable_checkpoint
    from test_gptq import write_gptq

    from qwen import QWenLMHeadModel

    float_dir = quantizable_checkpoint(tmp_path / "float", dtype="float32")
    write_gptq(float_dir, tmp_path / "int4")
    out = tmp_path / "qlora"
    finetune("--model_name_or_path", tmp_path / "int4", "--data_path", data_path, "--output_dir", out,
             "--use_lora", "True", "--q_lora", "True", "--learning_rate", "5e-2", "--max_steps", "6",
             "--save_strategy", "no", cwd=tmp_path)
    history = losses(out)
    assert len(history) == 6 and min(history[3:]) < history[0] - 0.3, history  # nats: LoRA alone learns slowly here
    assert (out / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "qwen.tools.merge_lora", str(out), str(merged), "--base",
                           str(float_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    tuned = QWenLMHeadModel.from_pretrained(merged, dtype=torch.float32).eval()
    base = QWenLMHeadModel.from_pretrained(float_dir, dtype=torch.float32).eval()
    assert not torch.allclose(logits(tuned), logits(base), atol=1e-3)  # the adapter changed the model


def test_fp16_becomes_bf16_under_deepspeed_on_the_cpu(caplog):
    """DeepSpeed's CPU accelerator has no fp16: the Q-LoRA launchers' --fp16 True turns into bf16, said once."""
    from qwen.finetune.train import _fp16_to_bf16

    with caplog.at_level("WARNING"):
        assert _fp16_to_bf16(["--fp16", "True", "--lr", "1"]) == ["--bf16", "True", "--lr", "1"]
        assert _fp16_to_bf16(["--fp16=true"]) == ["--bf16=True"]
    assert caplog.text.count("training in bf16 instead") == 2
    assert _fp16_to_bf16(["--fp16", "False", "--bf16", "True"]) == ["--fp16", "False", "--bf16", "True"]
