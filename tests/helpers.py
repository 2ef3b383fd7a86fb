"""Small helpers shared by test modules (importable because pytest puts tests/ on sys.path)."""

import json
import signal
import socket
import subprocess


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def edit_json(path, **changes):
    """Update the top-level keys of a JSON file in place."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


USER = [{"role": "user", "content": "Hello, who are you?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def stop_server(proc) -> str:
    """Ctrl-C a server process and wait for it (killed after 30 s, then the test fails); its stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return err


def quantizable_checkpoint(path, dtype="float16"):
    """A tiny random chat checkpoint (real vocabulary) whose every block linear has an input size that
    is a multiple of 128 (GPTQ's group size): hidden 128, MLP 256 per branch, 2 layers."""
    import torch

    from qwen import QWenConfig, QWenLMHeadModel, QWenTokenizer
    from qwen.tools.tiny_checkpoint import generation_config
    from qwen.vocab import find_qwen_tiktoken

    torch.manual_seed(0)
    config = QWenConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, kv_channels=64,
                        intermediate_size=512, seq_length=2048, max_position_embeddings=8192,
                        **{"fp16" if dtype == "float16" else "bf16" if dtype == "bfloat16" else "fp32": True})
    config.tokenizer_class = "QWenTokenizer"
    model = QWenLMHeadModel(config).to(getattr(torch, dtype))
    model.generation_config = generation_config(chat=True)
    model.save_pretrained(path)
    QWenTokenizer(find_qwen_tiktoken(None)).save_pretrained(path)
    return path
