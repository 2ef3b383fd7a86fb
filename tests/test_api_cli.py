"""`openai_api.py` as a program: its options, its errors, and a real run on a tiny checkpoint."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from helpers import free_port, stop_server

from qwen.api.server import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "openai_api.py"


def run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=ROOT)


def test_help_lists_every_option():
    result = run("--help")
    assert result.returncode == 0
    for option in ("--checkpoint-path", "--api-auth", "--api-key", "--cpu-only", "--server-port", "--server-name",
                   "--disable-gc", "--served-model-name", "--max-running", "--max-waiting", "--max-context",
                   "--cors-origins", "/v1/chat/completions", "/health", "/metrics"):
        assert option in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--api-auth", "nocolon"], "user:password"),
    (["--server-port", "70000"], "port"),
    (["--max-running", "0"], ">= 1"),
    (["--max-context", "x"], "integer"),
])
def test_bad_options(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        parse_args(args)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_body_limit_default_matches_the_app():
    from qwen.api import protocol, server

    assert server.MAX_BODY_BYTES == protocol.MAX_BODY_BYTES


def test_options(monkeypatch):
    monkeypatch.delenv("QWEN_API_KEY", raising=False)
    args = parse_args([])
    assert (args.checkpoint_path, args.server_name, args.server_port) == ("Qwen/Qwen-7B-Chat", "127.0.0.1", 8000)
    assert args.api_key is None and args.api_auth is None and args.cors_origins is None and not args.disable_gc
    monkeypatch.setenv("QWEN_API_KEY", "from-env")
    args = parse_args(["--cors-origins", "https://a.example, https://b.example", "--api-auth", "u:p:w"])
    assert args.api_key == "from-env" and args.api_auth == "u:p:w"
    assert args.cors_origins == ["https://a.example", "https://b.example"]


def test_missing_checkpoint_fails_before_serving(tmp_path, capsys):
    assert main(["-c", str(tmp_path / "nowhere"), "--server-port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not found" in err


def test_other_architecture_fails_before_serving(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["-c", str(tmp_path)]) == 1
    assert "not a Qwen (v1) model" in capsys.readouterr().err


def test_serves_a_checkpoint(tmp_path):
    from qwen.tools.tiny_checkpoint import build

    checkpoint = build(tmp_path / "tiny-chat", chat=True, dtype="float32")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "-c", str(checkpoint), "--cpu-only", "--server-port", str(port),
         "--max-context", "256", "--max-running", "2", "--api-key", "sk-test", "--disable-gc",
         "--log-level", "warning"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, statuses = time.monotonic() + 90, []
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                status = httpx.get(url + "/health", timeout=5).status_code
            except httpx.TransportError:
                status = None
            statuses.append(status)
            if status == 200:
                break
            assert status in (None, 503)
            time.sleep(0.1)
        assert statuses[-1] == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        reply = client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
        assert reply.model == "tiny-chat" and reply.usage.completion_tokens >= 1
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        err = stop_server(proc)
    assert proc.returncode == 0, err


def test_precision_options(capsys):
    args = parse_args(["--dtype", "float16", "--quantize", "int4:32"])
    assert (args.dtype, args.quantize) == ("float16", "int4:32")
    assert (parse_args([]).dtype, parse_args([]).quantize) == ("auto", None)
    for bad, message in ((["--dtype", "int8"], "invalid choice"), (["--quantize", "int4:7"], "group size")):
        with pytest.raises(SystemExit) as info:
            parse_args(bad)
        assert info.value.code == 2 and message in capsys.readouterr().err
