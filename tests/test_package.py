"""The package frame: optional dependencies stay optional, scripts answer --help."""

import subprocess
import sys

OPTIONAL = ("flash_attn", "gptqmodel", "auto_gptq", "deepspeed", "peft", "gradio", "fastapi", "dashscope")


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_qwen_pulls_in_no_optional_dependency():
    loaded = run_python(
        "import sys, qwen\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))"
    )
    assert loaded == "[]"


def test_import_qwen_registers_auto_classes():
    out = run_python(
        "import qwen\n"
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING\n"
        "cfg = AutoConfig.for_model('qwen', seq_length=16)\n"
        "print(type(cfg).__name__, AutoModelForCausalLM._model_mapping[type(cfg)].__name__)"
    )
    assert out == "QWenConfig QWenLMHeadModel"


def test_tools_answer_help():
    modules = ("qwen.tools.tiny_checkpoint", "qwen.tools.demo", "qwen.tools.export_qwen2", "qwen.tools.upgrade_remote_code")
    # All at once: each spends its seconds importing torch and transformers, which the cores share.
    running = [subprocess.Popen([sys.executable, "-m", module, "--help"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for module in modules]
    for module, proc in zip(modules, running):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "usage:" in out, (module, err)


def test_demo_runs_a_two_turn_chat(tmp_path):
    """What `make demo` runs, on a fresh tiny chat checkpoint."""
    checkpoint = tmp_path / "tiny_chat"
    for args in (["qwen.tools.tiny_checkpoint", str(checkpoint), "--chat"],
                 ["qwen.tools.demo", str(checkpoint), "--max-new-tokens", "4"]):
        result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    assert result.stdout.count("User: ") == 2 and result.stdout.count("Qwen: ") == 2
    assert "history holds 2 turns" in result.stdout
