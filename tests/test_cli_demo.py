"""cli_demo.py on a tiny chat checkpoint: in a real terminal (pexpect), with piped stdin, with
--prompt, through an OpenAI-compatible upstream, and refusing checkpoints it cannot use (real
subprocesses).

The CLI is a front end of the serving engine. Greedy replies (`:conf do_sample=False`) are compared
with `model.chat()` run in this process on the same checkpoint: the engine path gives the original's
chat output, and `:conf` reaches generation (QWEN_SPEC §10). Sampled replies are compared with the
same request (qwen.serving.chat.chat_request, same seed) on an in-process Engine over the same
checkpoint. Each spawned demo costs a few seconds of start-up, so the commands are grouped into a
few sessions.
"""

import copy
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest
from helpers import edit_json, free_port

from qwen.qwen_generation_utils import DEFAULT_SYSTEM

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60
PROMPT = "User> "
MAX_NEW_TOKENS = 8
QUERY_1 = "你好"
QUERY_2 = "Tell me a story about a young entrepreneur."
SYSTEM = "You are a pirate. Answer like one."


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


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The engine the CLI builds (qwen.cli.load_engine), in this process."""
    from qwen.cli import DEFAULT_MAX_CONTEXT
    from qwen.serving import Engine

    engine = Engine.from_pretrained(checkpoint, cpu_only=True, chat=True, max_running=1, max_waiting=4,
                                    prefix_slots=1, max_context=DEFAULT_MAX_CONTEXT)
    yield engine
    engine.shutdown()


def greedy_chat(chat_model, query, history=None, max_new_tokens=MAX_NEW_TOKENS, **options):
    model, tokenizer = chat_model
    return model.chat(tokenizer, query, history=history, do_sample=False, max_new_tokens=max_new_tokens, **options)


def engine_reply(engine, query, history=(), system=DEFAULT_SYSTEM, seed=1234, max_new_tokens=MAX_NEW_TOKENS, **conf):
    """What the CLI answers with the checkpoint's generation config changed by `conf`: the same
    request on `engine`. The CLI asks for one token fewer than max_new_tokens (the reply of
    model.chat(), which drops the last token of a reply cut at max_new_tokens; see
    qwen.cli.engine_max_new_tokens), and strips the reply as chat() does."""
    from qwen.serving.chat import ChatDefaults, chat_request

    config = copy.deepcopy(engine.model.generation_config)
    for key, value in conf.items():
        setattr(config, key, value)
    request = chat_request(engine, query, history, system, max_new_tokens=max_new_tokens - 1, seed=seed,
                           defaults=ChatDefaults.from_config(config))
    return engine.submit(request.prompt_ids, request.params).result().text.strip()


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
    for flag in ("-c", "--checkpoint-path", "-s", "--seed", "--cpu-only", "--max-new-tokens", "Qwen/Qwen-7B-Chat",
                 "--prompt TEXT", "piped stdin", "end of the", "exit status is 1", "--system TEXT",
                 "You are a helpful assistant.", "--max-context TOKENS", "--upstream URL", "--upstream-api-key KEY",
                 "--upstream-model NAME", "--dtype", "--quantize"):
        assert flag in " ".join(result.stdout.split())  # (argparse wraps the lines)


def test_the_engine_request_gives_model_chats_reply(engine, chat_model):
    """In process: the request the CLI sends (one token fewer than max_new_tokens) gives exactly
    model.chat()'s greedy reply, for any max_new_tokens (1: chat() answers nothing), with history
    and with another system prompt."""
    from qwen.cli import engine_max_new_tokens

    assert engine_max_new_tokens(MAX_NEW_TOKENS) == MAX_NEW_TOKENS - 1
    for max_new_tokens in (2, 3, 5, MAX_NEW_TOKENS):
        reply, _ = greedy_chat(chat_model, QUERY_2, max_new_tokens=max_new_tokens)
        assert engine_reply(engine, QUERY_2, do_sample=False, max_new_tokens=max_new_tokens) == reply
    assert greedy_chat(chat_model, QUERY_2, max_new_tokens=1)[0] == ""
    reply_1, history = greedy_chat(chat_model, QUERY_1, system=SYSTEM)
    reply_2, _ = greedy_chat(chat_model, QUERY_2, history, system=SYSTEM)
    assert engine_reply(engine, QUERY_1, system=SYSTEM, do_sample=False) == reply_1
    assert engine_reply(engine, QUERY_2, [(QUERY_1, reply_1)], SYSTEM, do_sample=False) == reply_2


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
    rewarded_reply, _ = greedy_chat(chat_model, QUERY_2, repetition_penalty=0.5)  # (a penalty < 1 rewards repeats)
    assert rewarded_reply != greedy_chat(chat_model, QUERY_2)[0]  # (the checkpoint's penalty is 1.1)

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
        assert "error: unknown generation config key 'nosuchkey'" in out
        out = command(child, ":conf num_beams=2 min_new_tokens=5")  # generation would ignore them: refused
        assert out.count("the serving engine does not use it") == 2, out
        assert "error: cannot change num_beams: the serving engine does not use it" in out
        out = command(child, ":conf max_new_tokens=abc")
        assert "error: bad value abc for max_new_tokens: must be an integer >= 1; max_new_tokens stays 3" in out
        out = command(child, ":conf temperature=0 top_p=1.5 repetition_penalty=0")
        assert out.count("error: bad value") == 3 and "temperature stays None" in out and "top_p stays 0.8" in out
        assert re.search(r'"max_new_tokens": 3\b', command(child, ":conf"))  # the bad values changed nothing
        # A float field takes floats after an integer was set, and an integer becomes a float.
        assert "top_p = 1.0" in command(child, ":conf top_p=1")
        assert "top_p = 0.9" in command(child, ":conf top_p=0.9")
        assert "temperature = 0.7" in command(child, ":conf temperature=0.7")
        shown = command(child, ":conf")
        assert '"top_p": 0.9' in shown and '"temperature": 0.7' in shown
        command(child, ":clh")
        assert ask(child, QUERY_1) == plain(short_reply)  # still greedy: the sampling settings are unused

        out = command(child, ":reset-conf")
        assert re.search(r'"max_new_tokens": 8\b', out)  # the config as loaded: checkpoint + --max-new-tokens
        assert '"do_sample": true' in out
        assert re.search(r'"max_new_tokens": 8\b', command(child, ":conf"))

        # The sampling settings reach the engine: sampling among the top 1 token is greedy decoding,
        # and another repetition penalty changes the greedy reply as it changes chat()'s.
        command(child, ":clh")
        assert "top_k = 1" in command(child, ":conf top_k=1")
        assert ask(child, QUERY_1) == plain(reply_1)
        command(child, ":reset-conf")
        command(child, ":clh")
        command(child, ":conf do_sample=False repetition_penalty=0.5")
        assert ask(child, QUERY_2) == plain(rewarded_reply)

        child.sendline(":q")
        assert finish(child) == 0
    finally:
        child.close(force=True)


def test_seed_help_and_unknown_commands(checkpoint, chat_model, engine):
    unknown_reply, _ = greedy_chat(chat_model, ":x")
    sampled_5 = engine_reply(engine, QUERY_2, seed=5)  # the checkpoint's settings: top_p 0.8, sampling
    sampled_7 = engine_reply(engine, QUERY_2, seed=7)
    assert sampled_5 != sampled_7
    child = spawn(checkpoint, "--seed", "5")
    try:
        assert "Current random seed: 5" in command(child, ":seed")
        # The seed makes sampling reproducible: every turn's request carries it.
        assert ask(child, QUERY_2) == plain(sampled_5)
        command(child, ":clh")
        assert ask(child, QUERY_2) == plain(sampled_5)
        command(child, ":clh")
        assert "Random seed changed to 7" in command(child, ":seed 7")
        assert "Current random seed: 7" in command(child, ":seed")
        out = command(child, ":seed x")
        assert "error: cannot set the random seed: 'x' is not an integer; it stays 7" in out
        assert "Traceback" not in out
        assert "Current random seed: 7" in command(child, ":seed")  # still running, seed unchanged
        command(child, ":clh")
        assert ask(child, QUERY_2) == plain(sampled_7)

        out = command(child, ":h")
        for name in (":help", ":exit", ":clear", ":clear-his", ":history", ":seed", ":conf", ":reset-conf"):
            assert name in out
        from qwen.cli import ENGINE_KEYS

        assert all(key in out for key in ENGINE_KEYS)
        command(child, ":clh")

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
        command(child, ":conf do_sample=False max_new_tokens=4000")
        child.sendline(QUERY_2)
        child.expect_exact("Qwen: ")
        child.expect(r"\S{3}")  # a few tokens have come
        sent = time.monotonic()
        child.sendintr()
        child.expect_exact("Generation interrupted")
        child.expect_exact(PROMPT)
        assert time.monotonic() - sent < 5  # cancelled at once, not after 4000 tokens
        assert "History (0)" in command(child, ":his")  # the interrupted reply is not kept

        command(child, ":reset-conf")
        command(child, ":conf do_sample=False")
        assert ask(child, QUERY_1) == plain(reply_1)  # the stopped generation left nothing behind

        child.sendintr()  # at the prompt: exit
        assert finish(child) == 0
        assert "Traceback" not in child.before
    finally:
        child.close(force=True)


def test_ctrl_c_during_a_reply_cancels_the_engine_request_at_once(engine):
    """In process: a KeyboardInterrupt while a reply streams (here raised by the terminal's third
    write) cancels the request: the engine stops generating before its next step."""
    import io

    from qwen.cli import ChatSession

    class InterruptedTerminal(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            if self.writes == 3:
                raise KeyboardInterrupt
            return super().write(text)

    config = copy.deepcopy(engine.model.generation_config)
    config.do_sample, config.max_new_tokens = False, 4000
    out, err = InterruptedTerminal(), io.StringIO()
    session = ChatSession(engine, config, 1234, out=out, err=err, interactive=True)
    before = engine.stats()
    assert session.chat(QUERY_2) is None
    assert "Generation interrupted" in out.getvalue() and session.history == [] and err.getvalue() == ""
    deadline = time.monotonic() + 10
    while engine.stats()["running"] or engine.stats().get("finished_cancelled_total", 0) == before.get(
            "finished_cancelled_total", 0):
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.01)
    generated = engine.stats()["generation_tokens_total"] - before.get("generation_tokens_total", 0)
    assert generated < 50, generated  # of the 4000 asked for


# -- :conf values, checked when they are set ---------------------------------------------------


@pytest.fixture
def loaded_config(checkpoint):
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(checkpoint)  # top_p 0.8, top_k 0, no temperature


@pytest.mark.parametrize("key, text, stored", [
    ("top_p", "1", 1.0), ("top_p", "0.5", 0.5), ("temperature", "2", 2.0), ("temperature", "0.01", 0.01),
    ("temperature", "None", None), ("repetition_penalty", "1", 1.0), ("top_k", "40", 40), ("top_k", "0", 0),
    ("max_new_tokens", "5", 5), ("do_sample", "False", False), ("max_window_size", "1024", 1024),
    ("chat_format", "'chatml'", "chatml"), ("chat_format", "chatml", "chatml"),
])
def test_conf_accepts(loaded_config, key, text, stored):
    from qwen.cli import set_config_value

    assert set_config_value(loaded_config, key, text) == stored
    value = getattr(loaded_config, key)
    assert value == stored and type(value) is type(stored)


@pytest.mark.parametrize("key, text, reason", [
    ("temperature", "0", "must be a number > 0 (for greedy decoding set do_sample=False)"),
    ("temperature", "-1", "must be a number > 0"),
    ("temperature", "1e999", "must be a number > 0"),  # inf
    ("temperature", "hot", "must be a number > 0"),
    ("top_p", "0", "must be a number in (0, 1]"),
    ("top_p", "1.01", "must be a number in (0, 1]"),
    ("top_p", "True", "must be a number in (0, 1]"),
    ("top_k", "-1", "must be an integer >= 0"),
    ("top_k", "2.5", "must be an integer >= 0"),
    ("max_new_tokens", "0", "must be an integer >= 1"),
    ("max_new_tokens", "None", "must be an integer >= 1, not None"),
    ("repetition_penalty", "0", "must be a number > 0"),
    ("repetition_penalty", "-0.5", "must be a number > 0"),
    ("do_sample", "1", "must be True or False"),
    ("max_window_size", "0", "must be an integer >= 1"),
    ("chat_format", "raw", "must be 'chatml'"),
    ("chat_format", "1", "must be 'chatml'"),
])
def test_conf_refuses_and_keeps_the_old_value(loaded_config, key, text, reason):
    from qwen.cli import set_config_value

    before, old = loaded_config.to_dict(), getattr(loaded_config, key)
    with pytest.raises(ValueError) as caught:
        set_config_value(loaded_config, key, text)
    message = str(caught.value)
    assert message.startswith(f"bad value {text} for {key}: {reason}") and message.endswith(f"; {key} stays {old!r}")
    assert loaded_config.to_dict() == before


@pytest.mark.parametrize("key", ["num_beams", "min_new_tokens", "typical_p", "no_repeat_ngram_size", "eos_token_id"])
def test_conf_refuses_what_the_engine_does_not_use(loaded_config, key):
    """Generation on the engine would ignore these: setting one is an error, not a silent no-op."""
    from qwen.cli import ENGINE_KEYS, set_config_value

    before = loaded_config.to_dict()
    with pytest.raises(ValueError) as caught:
        set_config_value(loaded_config, key, "2")
    assert str(caught.value) == (f"cannot change {key}: the serving engine does not use it "
                                 f"(:conf changes {', '.join(ENGINE_KEYS)})")
    assert loaded_config.to_dict() == before
    with pytest.raises(ValueError, match=r"unknown generation config key 'temprature' \(did you mean temperature\?\)"):
        set_config_value(loaded_config, "temprature", "0.5")


def test_conf_after_an_integer_a_float_field_still_takes_floats(loaded_config):
    from qwen.cli import set_config_value

    for key in ("top_p", "temperature", "repetition_penalty"):
        set_config_value(loaded_config, key, "1")
        assert set_config_value(loaded_config, key, "0.9") == 0.9


# -- without a terminal: --prompt and piped stdin -----------------------------------------------

RUN_TIMEOUT = 300  # a subprocess that hangs fails the test instead of blocking it


def run_demo(*args, stdin=b"", env=None, module=None):
    """Run cli_demo.py (or `python -m module`) with `stdin` piped; (exit status, stdout, stderr)."""
    command = [sys.executable, *(["-m", module] if module else ["cli_demo.py"]), *args]
    result = subprocess.run(
        command, cwd=ROOT, env=env or _env(), input=stdin, capture_output=True, timeout=RUN_TIMEOUT, check=False,
    )
    return result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8")


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def offline_env(tmp_path, **extra):
    """An empty Hugging Face cache and no proxies, so only `extra` decides whether the hub answers."""
    env = _env()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT", "https_proxy",
                 "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    env.update(HF_HOME=str(tmp_path / "hf_home"), **extra)
    return env


def test_prompt_prints_only_the_reply(checkpoint, engine):
    reply = engine_reply(engine, QUERY_2)  # sampling, as loaded: the default seed 1234 decides

    status, out, err = run_demo(
        "-c", checkpoint, "--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS), "--prompt", QUERY_2,
        stdin=b":q\nnot read\n",
    )
    assert status == 0, err
    assert out == reply + "\n"  # no banner, prompt, prefix or escape codes
    assert err == ""  # transformers' loading bar and warnings are off


def test_piped_input_is_a_transcript_and_survives_bad_lines(checkpoint, chat_model):
    reply_1, history = greedy_chat(chat_model, QUERY_1)
    reply_2, _ = greedy_chat(chat_model, QUERY_2, history)
    script = (
        f":conf do_sample=False\n{QUERY_1}\n".encode()
        + b"\xff\xfe not UTF-8 \xc3\n"  # line 3
        + f"{QUERY_2}\n:conf top_p=2\n:q\nnot read\n".encode()
    )
    status, out, err = run_demo("-c", checkpoint, "--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS), stdin=script)
    assert status == 1  # a line gave an error
    # The line after the bad one is answered, with the turn before it in its history; :q ends the input.
    assert out == (
        "[INFO] Generation config changed: do_sample = False\n"
        f"User: {QUERY_1}\nQwen: {reply_1}\nUser: {QUERY_2}\nQwen: {reply_2}\n"
    )
    assert error_lines(err) == [
        "error: line 3 is not valid UTF-8, skipped",
        "error: bad value 2 for top_p: must be a number in (0, 1]; top_p stays 0.8",
    ]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def greedy_checkpoint(checkpoint, tmp_path_factory):
    """The checkpoint with do_sample false in its generation config: greedy --prompt replies."""
    path = tmp_path_factory.mktemp("cli_greedy") / "chat"
    shutil.copytree(checkpoint, path)
    edit_json(path / "generation_config.json", do_sample=False)
    return str(path)


def test_system_prompt_reaches_the_engine(checkpoint, chat_model, engine):
    """--system replaces the system prompt of every turn: the greedy replies are model.chat()'s
    with that system prompt (and differ from the default's)."""
    reply_1, history = greedy_chat(chat_model, QUERY_1, system=SYSTEM)
    reply_2, _ = greedy_chat(chat_model, QUERY_2, history, system=SYSTEM)
    assert reply_1 != greedy_chat(chat_model, QUERY_1)[0]
    assert engine_reply(engine, QUERY_1, system=SYSTEM, do_sample=False) == reply_1
    script = f":conf do_sample=False\n{QUERY_1}\n{QUERY_2}\n".encode()
    status, out, err = run_demo("-c", checkpoint, "--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS),
                                "--system", SYSTEM, stdin=script)
    assert status == 0, err
    assert out == (
        "[INFO] Generation config changed: do_sample = False\n"
        f"User: {QUERY_1}\nQwen: {reply_1}\nUser: {QUERY_2}\nQwen: {reply_2}\n"
    )

    # Sampled, with the seed: the engine's reply to that request.
    status, out, err = run_demo("-c", checkpoint, "--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS),
                                "--system", "", "--seed", "99", "--prompt", QUERY_2)
    assert status == 0, err
    assert out == engine_reply(engine, QUERY_2, system="", seed=99) + "\n"


def test_upstream_gives_the_local_reply(checkpoint, greedy_checkpoint, chat_model, engine):
    """--upstream URL: the replies come from an OpenAI-compatible server (ours, in this process,
    over the same checkpoint) and are the ones generated locally; a model the upstream does not
    serve, or no URL, is one error line."""
    from qwen.api.app import create_app
    from qwen.api.server import BackgroundServer

    reply, _ = greedy_chat(chat_model, QUERY_2)
    args = ["--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS), "--prompt", QUERY_2]
    status, out, err = run_demo("-c", greedy_checkpoint, *args)
    assert status == 0 and out == reply + "\n", err
    with BackgroundServer(create_app(engine)) as api:
        before = engine.stats().get("requests_total", 0)  # none yet when this test runs first
        status, out, err = run_demo("-c", greedy_checkpoint, "--upstream", api.url, *args)
        assert status == 0, err
        assert out == reply + "\n" and err == ""
        assert engine.stats()["requests_total"] == before + 1  # generated by the server's engine

        # A conversation, with history and another system prompt; sampled turns carry the seed.
        reply_1, history = greedy_chat(chat_model, QUERY_1, system=SYSTEM)
        reply_2, _ = greedy_chat(chat_model, QUERY_2, history, system=SYSTEM)
        sampled = engine_reply(engine, QUERY_1, system=SYSTEM, seed=5)
        script = f":conf do_sample=False\n{QUERY_1}\n{QUERY_2}\n:reset-conf\n:clh\n:seed 5\n{QUERY_1}\n:q\n"
        status, out, err = run_demo("-c", checkpoint, "--upstream", api.url + "/v1", "--system", SYSTEM,
                                    "--max-new-tokens", str(MAX_NEW_TOKENS), stdin=script.encode())
        assert status == 0, err
        assert f"User: {QUERY_1}\nQwen: {reply_1}\nUser: {QUERY_2}\nQwen: {reply_2}\n" in out
        assert out.endswith(f"User: {QUERY_1}\nQwen: {sampled}\n")

        status, out, err = run_demo("-c", checkpoint, "--upstream", api.url, "--upstream-model", "nosuch",
                                    "--prompt", QUERY_1)
        assert status == 2 and out == "" and "Traceback" not in err
        assert error_lines(err) == [err.strip()] and "does not serve model 'nosuch'" in err, err
    status, out, err = run_demo("-c", checkpoint, "--upstream", "ftp://example.com", "--prompt", QUERY_1)
    assert status == 2 and "--upstream must be an http:// or https:// URL" in err
    status, out, err = run_demo("-c", checkpoint, "--upstream-model", "x", "--prompt", QUERY_1)
    assert status == 2 and "need --upstream URL" in err


def test_a_cached_hub_checkpoint_is_used_when_the_hub_is_unreachable(checkpoint, chat_model, tmp_path):
    """Also `make demo`'s script, which ends at the end of its input with status 0."""
    reply_1, history = greedy_chat(chat_model, QUERY_1)
    reply_2, history = greedy_chat(chat_model, QUERY_2, history)
    env = offline_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    # The Hugging Face cache layout: hub/models--<org>--<name>/{refs/main, snapshots/<commit>/...}.
    repo = tmp_path / "hf_home" / "hub" / "models--tiny--qwen-chat"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    script = f":conf do_sample=False\n{QUERY_1}\n{QUERY_2}\n:his\n"
    status, out, err = run_demo(
        "-c", "tiny/qwen-chat", "--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS), stdin=script.encode(), env=env,
    )
    assert status == 0, err
    assert err == ""
    transcript = (
        "[INFO] Generation config changed: do_sample = False\n"
        f"User: {QUERY_1}\nQwen: {reply_1}\nUser: {QUERY_2}\nQwen: {reply_2}\n"
    )
    assert out.startswith(transcript)
    shown = out[len(transcript):]
    assert "History (2)" in shown and f"User[1]: {QUERY_2}\nQwen[1]: {reply_2}\n" in shown
    assert "\x1b" not in out and PROMPT not in out and "Welcome" not in out


def test_a_turn_that_the_model_refuses_is_an_error_and_the_chat_goes_on(checkpoint, tmp_path):
    short = tmp_path / "short_context"
    shutil.copytree(checkpoint, short)
    edit_json(short / "config.json", seq_length=64, max_position_embeddings=64)
    too_long = "hello " * 300
    args = ["-c", str(short), "--cpu-only", "--max-new-tokens", str(MAX_NEW_TOKENS)]

    status, out, err = run_demo(*args, stdin=f":conf do_sample=False\n{too_long}\n{QUERY_1}\n:his\n".encode())
    assert status == 1
    errors = error_lines(err)
    assert len(errors) == 1 and "context" in errors[0], err
    assert "Traceback" not in err
    assert f"User: {too_long.strip()}\nUser: {QUERY_1}\nQwen: " in out  # no reply to the long one
    assert "History (1)" in out and f"User[0]: {QUERY_1}\n" in out

    status, out, err = run_demo(*args, "--prompt", too_long)
    assert status == 1 and out == ""
    assert len(error_lines(err)) == 1 and "context" in error_lines(err)[0], err


def test_a_closed_output_pipe_ends_quietly(checkpoint):
    child = subprocess.Popen(
        [sys.executable, "cli_demo.py", "-c", checkpoint, "--cpu-only", "--max-new-tokens", "2", "--prompt", QUERY_1],
        cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    child.stdout.close()  # the reader (say `| head`) is gone before the reply is written
    try:
        err = child.stderr.read().decode("utf-8")
        assert child.wait(timeout=RUN_TIMEOUT) == 1
    finally:
        child.kill()
        child.stderr.close()
    assert err == ""


# -- checkpoints that cannot be used: one error line at start-up --------------------------------


@pytest.fixture(scope="module")
def unusable(checkpoint, tmp_path_factory):
    from qwen.tools.export_qwen2 import export_qwen2
    from qwen.tools.tiny_checkpoint import build

    root = tmp_path_factory.mktemp("unusable")
    broken = root / "broken_config"
    shutil.copytree(checkpoint, broken)
    edit_json(broken / "config.json", rope_scaling=5)  # transformers explains this one on two lines
    (root / "empty").mkdir()
    return {
        "base": str(build(root / "base", chat=False, dtype="float32")),
        "qwen2": str(export_qwen2(checkpoint, root / "qwen2")),
        "empty": str(root / "empty"),
        "broken_config": str(broken),
    }


@pytest.mark.parametrize("kind, reason", [
    ("base", "is not a chat model: it has chat_format 'raw', a chat model has 'chatml'"),
    ("qwen2", "is not a Qwen (v1) model: its config.json has model_type 'qwen2' (architectures: Qwen2ForCausalLM)"),
    ("empty", "is empty"),
    ("broken_config", "not iterable"),  # the second line of the message
])
def test_an_unusable_checkpoint_is_refused_at_start(unusable, kind, reason):
    status, out, err = run_demo("-c", unusable[kind], "--cpu-only", stdin=f"{QUERY_1}\n".encode())
    assert status == 2 and out == ""
    assert "Traceback" not in err
    errors = error_lines(err)
    assert len(errors) == 1 and reason in errors[0] and unusable[kind] in errors[0], err
    if kind != "broken_config":  # (that one also gets transformers' deprecation warning)
        assert err == errors[0] + "\n"


@pytest.mark.parametrize("hub", ["offline", "no_connection"])
def test_the_default_checkpoint_fails_fast_without_the_hub(tmp_path, hub):
    extra = {"HF_HUB_OFFLINE": "1"} if hub == "offline" else {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    start = time.monotonic()
    status, out, err = run_demo("--cpu-only", env=offline_env(tmp_path, **extra))  # -c Qwen/Qwen-7B-Chat
    elapsed = time.monotonic() - start
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: checkpoint Qwen/Qwen-7B-Chat was not found locally"), err
    assert "hub is unreachable" in err and "point -c at its local directory" in err
    assert elapsed < 40  # transformers' own retries take about a minute


def test_the_demo_tool_reports_an_unusable_checkpoint_in_one_line(unusable, tmp_path):
    status, out, err = run_demo(unusable["base"], module="qwen.tools.demo")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: checkpoint ") and "is not a chat model" in err, err
    env = offline_env(tmp_path, HF_HUB_OFFLINE="1")
    status, out, err = run_demo("missing_model", module="qwen.tools.demo", env=env)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "point CHECKPOINT_DIR at its local directory" in err, err


def test_dtype_and_quantize_flags_load_that_model(checkpoint):
    """--dtype and --quantize reach from_pretrained: the reply is the one an engine over the same
    quantized model gives in this process (same seed), and a bad value is a usage error, not a
    traceback."""
    import torch

    from qwen.quantization import Int4Linear
    from qwen.serving import Engine

    quantized = Engine.from_pretrained(checkpoint, cpu_only=True, dtype="bfloat16", quantization="int4:32",
                                       max_running=1, prefix_slots=1)
    try:
        model = quantized.model
        assert model.dtype == torch.bfloat16 and isinstance(model.transformer.h[0].mlp.w1, Int4Linear)
        reply = engine_reply(quantized, QUERY_2)
    finally:
        quantized.shutdown()
    status, out, err = run_demo("-c", checkpoint, "--cpu-only", "--dtype", "bfloat16", "--quantize", "int4:32",
                                "--max-new-tokens", str(MAX_NEW_TOKENS), "--prompt", QUERY_2)
    assert status == 0, err
    assert out == reply + "\n"
    status, out, err = run_demo("-c", checkpoint, "--quantize", "int3", "--prompt", "hi")
    assert status == 2 and "unknown quantization 'int3'" in err and "Traceback" not in err

