"""Fine-tuning through the real launcher scripts on CPU (`make test-finetune`, not part of `make test`).

finetune/*.sh run exactly as a user runs them on a GPU cluster; here, without CUDA, they use
DeepSpeed's CPU accelerator with gloo and torchrun with 2 processes. Tiny random checkpoints with the
real vocabulary; nothing is mocked. Checked: LoRA on ZeRO-2 (2 processes, a base model, so wte and
lm_head train too), full fine-tuning on ZeRO-3 (2 processes, weights gathered at save), the
single-process LoRA script, both Q-LoRA scripts on a GPTQ Int4 checkpoint, resuming an interrupted
run, and the launchers' errors. A multi-process
CPU run sometimes aborts at teardown after saving (see finetune/launch.sh): the tests check what was
saved, not only the exit status.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qwen.tools.tiny_checkpoint import build

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ROOT / "finetune"
ANSWER = "I am Tiny Qwen, a small model fine-tuned on this machine."
QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "你是谁？"]
SMALL = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--model_max_length", "64",
         "--disable_tqdm", "True", "--save_strategy", "no", "--num_train_epochs", "1"]
PROBE = torch.tensor([[151644, 872, 198, 15191, 525, 498, 30, 151645, 198, 151644, 77091, 198]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("base") / "ckpt")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("chat") / "ckpt", chat=True)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    records = [{"id": f"who{i}", "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": ANSWER}]}
               for i, q in enumerate(QUESTIONS)]
    path = tmp_path_factory.mktemp("data") / "identity.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def free_port() -> int:
    from helpers import free_port as port

    return port()


def launch(script, *args, cwd, timeout=420):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return subprocess.run(["bash", str(LAUNCHERS / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def logits(model):
    with torch.no_grad():
        return model(PROBE).logits.float()


def epochs(out: Path) -> float:
    """Epochs done: with 4 records, batch 2 per process and 8 steps, 2 processes make 8 epochs, 1 makes 4."""
    return json.loads((out / "trainer_state.json").read_text())["epoch"]


def assert_ok(proc):
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def test_lora_on_zero2_with_two_processes(base_dir, data_path, tmp_path):
    out = tmp_path / "lora"
    proc = launch("finetune_lora_ds.sh", "-m", base_dir, "-d", data_path, "-o", out, "--master_port", free_port(),
                  "--", *SMALL, "--max_steps", "8", "--learning_rate", "1e-2", "--lora_r", "8", cwd=tmp_path)
    assert_ok(proc)
    history = losses(out)
    assert len(history) == 8 and min(history[4:]) < 0.8 * history[0], history  # one late spike allowed
    assert epochs(out) == 8  # two processes
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["modules_to_save"]) == ["lm_head", "wte"]
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    import qwen  # noqa: F401

    tuned = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert (logits(tuned) - logits(base)).abs().max() > 0.1


def test_full_fine_tuning_on_zero3_with_two_processes(chat_dir, data_path, tmp_path):
    out = tmp_path / "full"
    proc = launch("finetune_ds.sh", "-m", chat_dir, "-d", data_path, "-o", out, "--master_port", free_port(),
                  "--", *SMALL, "--max_steps", "8", "--learning_rate", "1e-2", cwd=tmp_path)
    assert_ok(proc)
    history = losses(out)
    assert min(history[len(history) // 2:]) < 0.85 * history[0], history  # one late spike allowed
    assert epochs(out) == 8  # two processes
    from transformers import AutoModelForCausalLM

    # The ZeRO-3 partitions were gathered: a complete checkpoint that loads as remote code.
    tuned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(chat_dir, trust_remote_code=True, dtype=torch.float32).eval()
    assert all(p.numel() > 0 for p in tuned.parameters())
    assert (logits(tuned) - logits(base)).abs().max() > 0.01
    assert (out / "modeling_qwen.py").is_file() and (out / "qwen.tiktoken").is_file()


def test_single_process_lora_script(base_dir, data_path, tmp_path):
    out = tmp_path / "single"
    proc = launch("finetune_lora_single_gpu.sh", "-m", base_dir, "-d", data_path, "-o", out,
                  "--", *SMALL, "--max_steps", "8", "--learning_rate", "2e-2", "--lora_r", "8", cwd=tmp_path)
    assert_ok(proc)
    history = losses(out)
    assert min(history[len(history) // 2:]) < 0.7 * history[0], history  # one late spike allowed
    assert (out / "adapter_model.safetensors").is_file() and (out / "qwen.tiktoken").is_file()


def test_plain_python_with_deepspeed_needs_no_launcher(chat_dir, data_path, tmp_path):
    """`python finetune.py --deepspeed ...` alone: finetune.py sets up a one-process rendezvous."""
    out = tmp_path / "plain"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", str(chat_dir), "--data_path",
         str(data_path), "--output_dir", str(out), "--use_lora", "True", "--lora_r", "8", "--max_steps", "2",
         "--deepspeed", str(LAUNCHERS / "ds_config_zero2.json"), "--bf16", "True", "--report_to", "none",
         "--logging_steps", "1", *SMALL],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert_ok(proc)
    assert (out / "adapter_model.safetensors").is_file() and len(losses(out)) == 2


def test_resume_after_an_interrupted_run_continues_from_the_saved_step(chat_dir, data_path, tmp_path):
    out = tmp_path / "resume"
    args = ["--model_name_or_path", chat_dir, "--data_path", data_path, "--output_dir", out, "--use_lora", "True",
            "--lora_r", "8", "--lazy_preprocess", "True", "--max_steps", "12", "--save_steps", "2",
            "--learning_rate", "1e-2", "--per_device_train_batch_size", "2", "--model_max_length", "64",
            "--disable_tqdm", "True", "--logging_steps", "1", "--report_to", "none"]
    first = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *map(str, args)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint-2" / "trainer_state.json").is_file():
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint-2 before the run ended"
            time.sleep(0.05)
    finally:
        first.kill()  # interrupted: no final save
        first.wait()
    saved = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    assert saved < 12 and not (out / "adapter_model.safetensors").exists()
    resumed = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args),
                              "--resume_from_checkpoint", "True"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, check=False)
    assert_ok(resumed)
    # Only the steps after the saved one ran again; the state continues the interrupted run's.
    assert resumed.stdout.count("'loss'") == 12 - saved, resumed.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 12 and steps == list(range(1, 13))
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-12").is_dir()
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None  # chat: LoRA only


def test_base_model_lora_under_zero3_is_refused(base_dir, data_path, tmp_path):
    proc = launch("finetune_lora_ds.sh", "-m", base_dir, "-d", data_path, "-o", tmp_path / "out",
                  "--deepspeed", LAUNCHERS / "ds_config_zero3.json", "--master_port", free_port(),
                  "--", *SMALL, "--max_steps", "1", cwd=tmp_path)
    assert proc.returncode != 0
    assert "does not work under ZeRO-3" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["-d", "missing.json"], "data file missing.json does not exist"),
    (["-d", "{data}", "--bogus"], "unknown option --bogus"),
    (["-d", "{data}", "--deepspeed", "nope.json"], "DeepSpeed config nope.json does not exist"),
])
def test_launcher_errors(data_path, tmp_path, args, message):
    proc = launch("finetune_lora_ds.sh", *[a.format(data=data_path) for a in args], cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_launcher_help():
    proc = launch("finetune_ds.sh", "--help", cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and "--master_port" in proc.stdout and "DS_ACCELERATOR" in proc.stdout


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    """A GPTQ Int4 checkpoint in the published layout, and the float one it was quantized from."""
    from helpers import quantizable_checkpoint
    from test_gptq import write_gptq

    root = tmp_path_factory.mktemp("gptq")
    float_dir = quantizable_checkpoint(root / "float", dtype="float32")
    write_gptq(float_dir, root / "int4")
    return root / "int4", float_dir


@pytest.mark.parametrize("script, processes", [("finetune_qlora_single_gpu.sh", 1), ("finetune_qlora_ds.sh", 2)])
def test_q_lora_scripts(gptq_dir, data_path, tmp_path, script, processes):
    """The Q-LoRA launchers as they are (fp16; under DeepSpeed on the CPU, bf16 with a warning): the
    loss goes down and the adapter merges into the float model the checkpoint came from."""
    int4_dir, float_dir = gptq_dir
    out = tmp_path / "qlora"
    proc = launch(script, "-m", int4_dir, "-d", data_path, "-o", out, "--master_port", free_port(),
                  "--", *SMALL, "--max_steps", "6", "--learning_rate", "5e-2", cwd=tmp_path)
    assert_ok(proc)
    assert ("training in bf16 instead" in proc.stderr) == (processes == 2)
    history = losses(out)
    assert len(history) == 6 and min(history[3:]) < history[0] - 0.3, history
    assert epochs(out) == 6 * processes / 2  # 4 records, batch 2 per process
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "qwen.tools.merge_lora", str(out), str(merged), "--base",
                           str(float_dir)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    from qwen import QWenLMHeadModel

    tuned = QWenLMHeadModel.from_pretrained(merged, dtype=torch.float32).eval()
    base = QWenLMHeadModel.from_pretrained(float_dir, dtype=torch.float32).eval()
    assert (logits(tuned) - logits(base)).abs().max() > 1e-3
