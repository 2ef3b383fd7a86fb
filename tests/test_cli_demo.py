"""cli_demo.py in a real terminal (pexpect) on a tiny chat checkpoint.

Replies are made deterministic with `:conf do_sample=False` and compared with `model.chat()` run
in this process on the same checkpoint, which also shows that `:conf` reaches generation (QWEN_SPEC
§10). Each spawned demo costs a few seconds of start-up, so the commands are grouped into a few
sessions.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60
PROMPT = "User> "
MAX_NEW_TOKENS = 8
QUERY_1 = "你好"
QUERY_2 = "Tell me a story about a young entrepreneur."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qwen.tools.tiny_checkpoint import build

    return str(build(tmp_path_factory.mktemp("cli_tiny") / "chat", chat=True, dtype="float32"))


@pytest.fixture(scope="module")
def chat_model(checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu").eval()
    return model, tokenizer


def greedy_chat(chat_model, query, history=None, max_new_tokens=MAX_NEW_TOKENS):
    model, tokenizer = chat_model
    return model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=max_new_tokens)


def _env():
    env = dict(os.environ, PYTHONUTF8="1", PYTHONIOENCODING="utf-8", TERM="dumb")
    env.pop("PYTHONSTARTUP", None)
    return env


def spawn(checkpoint, *extra):
    args = ["cli_demo.py", "-c", checkpoint, "--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS), *extra]
    child = pexpect.spawn(
        sys.executable, args, cwd=str(ROOT), env=_env(), encoding="utf-8", codec_errors="replace",
        timeout=TIMEOUT, dimensions=(50, 200),
    )
    child.expect_exact("Welcome to use Qwen-Chat model")
    child.expect_exact(PROMPT)
    return child


def command(child, line):
    """Send one line; return everything printed before the next prompt, without carriage returns."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.replace("\r", "")


def ask(child, query):
    """Send a query; return the reply as it stands on the screen at the end of the stream."""
    out = command(child, query)
    assert "Qwen: " in out, out
    # The last "Qwen: " starts either the whole reply (the suffixes follow it) or its last redraw.
    return out.rsplit("Qwen: ", 1)[1].removesuffix("\n")


def plain(text):
    return text.replace("\r", "")


def finish(child):
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


# -- tests ------------------------------------------------------------------------------


def test_help_lists_the_flags():
    result = subprocess.run(
        [sys.executable, "cli_demo.py", "--help"], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=TIMEOUT, check=False,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("-c", "--checkpoint-path", "-s", "--seed", "--cpu-only", "--max-new-tokens", "Qwen/Qwen-7B-Chat"):
        assert flag in result.stdout


def test_missing_checkpoint_is_one_error_line(tmp_path):
    missing = str(tmp_path / "no_such_checkpoint")
    result = subprocess.run(
        [sys.executable, "cli_demo.py", "-c", missing, "--cpu-only"], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and missing in lines[0], result.stderr


def test_chat_history_and_conf(checkpoint, chat_model):
    reply_1, history = greedy_chat(chat_model, QUERY_1)
    reply_2, history = greedy_chat(chat_model, QUERY_2, history)
    short_reply, _ = greedy_chat(chat_model, QUERY_1, max_new_tokens=3)
    assert short_reply != reply_1  # otherwise the max_new_tokens check below proves nothing

    child = spawn(checkpoint)
    try:
        assert "do_sample = False" in command(child, ":conf do_sample=False")
        assert ask(child, QUERY_1) == plain(reply_1)
        assert ask(child, QUERY_2) == plain(reply_2)  # the second turn sees the first in its history

        shown = command(child, ":his")
        assert "History (2)" in shown
        for index, (query, reply) in enumerate(history):
            assert f"User[{index}]: {query}\n" in shown
            assert f"Qwen[{index}]: {plain(reply)}\n" in shown

        assert "All 2 history cleared" in command(child, ":clh")
        shown = command(child, ":his")
        assert "History (0)" in shown and "User[0]" not in shown

        # :conf changes what generation uses; with an empty history the reply is chat()'s.
        assert "max_new_tokens = 3" in command(child, ":conf max_new_tokens=3")
        assert re.search(r'"max_new_tokens": 3\b', command(child, ":conf"))
        assert ask(child, QUERY_1) == plain(short_reply)

        out = command(child, ":conf nosuchkey=1")
        assert "[ERROR]" in out and "unknown generation config key 'nosuchkey'" in out
        out = command(child, ":conf max_new_tokens=abc")
        assert "[ERROR]" in out and "max_new_tokens" in out
        assert re.search(r'"max_new_tokens": 3\b', command(child, ":conf"))  # the bad values changed nothing

        out = command(child, ":reset-conf")
        assert re.search(r'"max_new_tokens": 8\b', out)  # the config as loaded: checkpoint + --max-new-tokens
        assert '"do_sample": true' in out
        assert re.search(r'"max_new_tokens": 8\b', command(child, ":conf"))

        child.sendline(":q")
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_seed_help_and_unknown_commands(checkpoint, chat_model):
    unknown_reply, _ = greedy_chat(chat_model, ":x")
    child = spawn(checkpoint, "--seed", "5")
    try:
        assert "Current random seed: 5" in command(child, ":seed")
        assert "Random seed changed to 7" in command(child, ":seed 7")
        assert "Current random seed: 7" in command(child, ":seed")
        out = command(child, ":seed x")
        assert "[ERROR]" in out and "'x'" in out and "Traceback" not in out
        assert "Current random seed: 7" in command(child, ":seed")  # still running, seed unchanged

        out = command(child, ":h")
        for name in (":help", ":exit", ":clear", ":clear-his", ":history", ":seed", ":conf", ":reset-conf"):
            assert name in out

        assert command(child, "   ").strip() == ""  # empty input: nothing happens
        command(child, ":conf do_sample=False")
        assert ask(child, ":x") == plain(unknown_reply)  # an unknown command is a query
        assert "History (1)" in command(child, ":history")

        child.sendeof()
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_ctrl_c_stops_a_reply_then_exits_at_the_prompt(checkpoint, chat_model):
    reply_1, _ = greedy_chat(chat_model, QUERY_1)
    child = spawn(checkpoint)
    try:
        command(child, ":conf do_sample=False max_new_tokens=3000 min_new_tokens=3000")
        child.sendline(QUERY_2)
        child.expect_exact("Qwen: ")
        child.sendintr()
        child.expect_exact("Generation interrupted")
        child.expect_exact(PROMPT)
        assert "History (0)" in command(child, ":his")  # the interrupted reply is not kept

        command(child, ":reset-conf")
        command(child, ":conf do_sample=False")
        assert ask(child, QUERY_1) == plain(reply_1)  # the stopped generation left nothing behind

        child.sendintr()  # at the prompt: exit
        assert finish(child) == 0
        assert "Traceback" not in child.before
    finally:
        child.close(force=True)
